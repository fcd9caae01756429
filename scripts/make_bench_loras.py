#!/usr/bin/env python3
"""Write four random rank-16 PEFT LoRA adapters for the Qwen2-0.5B-shaped benchmark base.

    python scripts/make_bench_loras.py --out DIR [--rank 16] [--layers 24] [--experts 4]

Each DIR/lora{i}/ holds adapter_config.json and adapter_model.safetensors (float32) with
lora_A [r, in] and lora_B [out, r] on q/k/v/o/gate/up/down of every layer, keyed as PEFT saves
them (base_model.model.model.layers.N.<proj>.lora_{A,B}.weight). The factors are seeded random
numbers, not trained weights: they exist to time merges. Needs numpy only.
"""

import argparse
import json
import os
import struct

import numpy as np

HIDDEN, INTERMEDIATE, KV = 896, 4864, 128
PROJECTIONS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def write_safetensors(path, tensors):
    """tensors: list of (name, float32 array); written in order with an 8-byte aligned header."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, array in tensors:
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, array in tensors:
            f.write(np.ascontiguousarray(array, dtype="<f4").tobytes())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--experts", type=int, default=4)
    args = parser.parse_args()
    for e in range(args.experts):
        rng = np.random.default_rng(1000 + e)
        tensors = []
        for layer in range(args.layers):
            for proj, (out_dim, in_dim) in PROJECTIONS.items():
                prefix = f"base_model.model.model.layers.{layer}.{proj}"
                a = rng.normal(0.0, 1.0 / np.sqrt(in_dim), size=(args.rank, in_dim)).astype(np.float32)
                b = rng.normal(0.0, 0.01, size=(out_dim, args.rank)).astype(np.float32)
                tensors.append((f"{prefix}.lora_A.weight", a))
                tensors.append((f"{prefix}.lora_B.weight", b))
        directory = os.path.join(args.out, f"lora{e}")
        os.makedirs(directory, exist_ok=True)
        write_safetensors(os.path.join(directory, "adapter_model.safetensors"), tensors)
        config = {
            "peft_type": "LORA",
            "r": args.rank,
            "lora_alpha": 2 * args.rank,
            "target_modules": sorted(p.split(".")[1] for p in PROJECTIONS),
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "qwen2-0.5b-shaped",
        }
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
