#!/usr/bin/env python3
"""PEFT's logits of an adapter mmx trained on the fixture LLaVA (see
scripts/make_vlm_trained_fixture.sh): `peft_vlm_logits.py FIXTURES NAME` loads FIXTURES/NAME with
PeftModel on transformers' LlavaForConditionalGeneration (FIXTURES/tiny-llava, eager attention)
and writes FIXTURES/NAME-logits.safetensors: `logits` of `input_ids` with `pixel_values` and
`text_logits` of `text_ids`, both taken from FIXTURES/tiny-llava-logits.safetensors. A saved
projector (`modules_to_save`) must differ from the base's, so that it shows in the logits."""

import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

fixtures, name = sys.argv[1], sys.argv[2]
base = LlavaForConditionalGeneration.from_pretrained(
    os.path.join(fixtures, "tiny-llava"), attn_implementation="eager"
)
before = {k: v.clone() for k, v in base.model.multi_modal_projector.state_dict().items()}
model = PeftModel.from_pretrained(base, os.path.join(fixtures, name)).eval()
adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
assert adapted and all("language_model" in n for n in adapted), adapted
print(f"PEFT adapted {len(adapted)} modules, all in the language model")
saved = model.base_model.model.model.multi_modal_projector
if hasattr(saved, "modules_to_save"):
    after = saved.modules_to_save["default"].state_dict()
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-3, moved
    print(f"PEFT replaced the projector (largest change {moved:.3g})")
inputs = load_file(os.path.join(fixtures, "tiny-llava-logits.safetensors"))
with torch.no_grad():
    logits = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    text_logits = model(input_ids=inputs["text_ids"]).logits
save_file(
    {"logits": logits.contiguous(), "text_logits": text_logits.contiguous()},
    os.path.join(fixtures, f"{name}-logits.safetensors"),
)
