#!/usr/bin/env python3
"""PEFT's logits of an adapter mmx trained on the fixture LLaVA (see
scripts/make_vlm_trained_fixture.sh): loads FIXTURES/trained-lora with PeftModel on
transformers' LlavaForConditionalGeneration (FIXTURES/tiny-llava, eager attention) and writes
FIXTURES/trained-lora-logits.safetensors: `logits` of `input_ids` with `pixel_values` and
`text_logits` of `text_ids`, both taken from FIXTURES/tiny-llava-logits.safetensors."""

import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

fixtures = sys.argv[1]
base = LlavaForConditionalGeneration.from_pretrained(
    os.path.join(fixtures, "tiny-llava"), attn_implementation="eager"
)
model = PeftModel.from_pretrained(base, os.path.join(fixtures, "trained-lora")).eval()
adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
assert adapted and all("language_model" in n for n in adapted), adapted
print(f"PEFT adapted {len(adapted)} modules, all in the language model")
inputs = load_file(os.path.join(fixtures, "tiny-llava-logits.safetensors"))
with torch.no_grad():
    logits = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    text_logits = model(input_ids=inputs["text_ids"]).logits
save_file(
    {"logits": logits.contiguous(), "text_logits": text_logits.contiguous()},
    os.path.join(fixtures, "trained-lora-logits.safetensors"),
)
