#!/usr/bin/env python3
"""Write the transformers/PEFT reference fixtures for the trainers' model (tests/model.rs).

How to run (not run by CI; the fixtures it writes are committed):

    python3 -m venv /tmp/ref
    /tmp/ref/bin/pip install torch transformers peft safetensors
    /tmp/ref/bin/python scripts/make_model_fixtures.py            # from the repository root

It writes, for ARCH in llama and qwen2, under tests/fixtures/model/:

    ARCH/config.json, ARCH/model.safetensors        a tiny random model, float32
    ARCH-lora/adapter_config.json,
    ARCH-lora/adapter_model.safetensors             a PEFT LoRA on it with non-zero random B
    ARCH-logits.safetensors                         the inputs and transformers' logits

The models: 2 layers, hidden 64, 4 heads, 2 key/value heads (grouped-query attention),
vocabulary 256. Llama ties its embeddings and has no biases; Qwen2 has q/k/v biases and an
untied `lm_head`. Weights are drawn at a larger scale than the usual init so that attention is
far from uniform and every part of the forward pass shows in the logits.

The adapters: r=4, lora_alpha=8, targets q_proj, v_proj, up_proj, down_proj; Qwen2's uses
rsLoRA (scale alpha/sqrt(r)). PEFT initialises B to zero; here B is redrawn at random so
that the adapter changes the logits.

The logits file holds `input_ids` [2, 7] (I64), `attention_mask` [2, 7] (I64; row 1 is
left-padded by two pad tokens), `position_ids` [2, 7] (I64: counted from each row's first
real token, as `generate` does), `logits` (adapter disabled) and `logits_lora` (adapter on),
both [2, 7, 256] float32. Logits at padded positions carry no meaning and are not compared.

The same script checks that an adapter trained by mmx loads in PEFT and gives mmx's logits:

    cargo run --release --example adapter_logits -- BASE ADAPTER /tmp/mmx-logits.safetensors
    /tmp/ref/bin/python scripts/make_model_fixtures.py --check-adapter BASE ADAPTER \
        /tmp/mmx-logits.safetensors

(BASE and ADAPTER are directories, e.g. `mmx pull tiny-med-base:v2 -o BASE` and
`mmx pull cardiology:v2 -o ADAPTER`.) It prints the worst relative difference and exits 1
above 1e-4.

The eager attention implementation is used so that the reference is plain matmul + softmax.
Everything is seeded; the output depends on the library versions only.
"""

import json
import os
import shutil

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "model")

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

INPUT_IDS = [
    [1, 17, 250, 33, 96, 5, 128],
    [0, 0, 1, 200, 64, 9, 71],
]
ATTENTION_MASK = [
    [1, 1, 1, 1, 1, 1, 1],
    [0, 0, 1, 1, 1, 1, 1],
]


def build(arch):
    if arch == "llama":
        config = LlamaConfig(
            **COMMON,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        model_cls = LlamaForCausalLM
    else:
        config = Qwen2Config(
            **COMMON,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
        model_cls = Qwen2ForCausalLM
    config._attn_implementation = "eager"
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


def main():
    torch.manual_seed(20240607)
    ids = torch.tensor(INPUT_IDS, dtype=torch.int64)
    mask = torch.tensor(ATTENTION_MASK, dtype=torch.int64)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    for arch in ["llama", "qwen2"]:
        model = build(arch)
        model_dir = os.path.join(ROOT, arch)
        shutil.rmtree(model_dir, ignore_errors=True)
        model.save_pretrained(model_dir, safe_serialization=True)
        gen = os.path.join(model_dir, "generation_config.json")
        if os.path.exists(gen):
            os.remove(gen)

        lora = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
            use_rslora=(arch == "qwen2"),
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora).eval()
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.2 * torch.randn_like(p))
            logits_lora = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            with peft_model.disable_adapter():
                logits = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        adapter_dir = os.path.join(ROOT, f"{arch}-lora")
        shutil.rmtree(adapter_dir, ignore_errors=True)
        peft_model.save_pretrained(adapter_dir, safe_serialization=True)
        readme = os.path.join(adapter_dir, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
        # PEFT records the in-memory model's name or path; make it stable and relative.
        cfg_path = os.path.join(adapter_dir, "adapter_config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["base_model_name_or_path"] = f"tests/fixtures/model/{arch}"
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)

        save_file(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "position_ids": positions,
                "logits": logits.contiguous(),
                "logits_lora": logits_lora.contiguous(),
            },
            os.path.join(ROOT, f"{arch}-logits.safetensors"),
        )
        delta = (logits_lora - logits).abs().max().item()
        print(f"{arch}: wrote fixtures; max |logits_lora - logits| = {delta:.4f}")


def check_adapter(base, adapter, logits_file):
    """Loads an mmx-trained adapter with PEFT and compares the logits with mmx's."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(logits_file)
    model = AutoModelForCausalLM.from_pretrained(
        base, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"]).logits
    ours = saved["logits"]
    worst = ((logits - ours).abs().max() / ours.abs().max()).item()
    print(f"PEFT loaded {adapter}: worst relative difference to mmx's logits {worst:.2e}")
    return worst <= 1e-4


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 5 and sys.argv[1] == "--check-adapter":
        sys.exit(0 if check_adapter(*sys.argv[2:]) else 1)
    main()
