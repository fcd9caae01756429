#!/usr/bin/env python3
"""Write a synthetic Qwen2-0.5B-shaped base model and three fine-tunes for benchmarking.

Layout written under --out DIR:

    DIR/base/  DIR/ft1/  DIR/ft2/  DIR/ft3/   (Hugging Face model directories)
    DIR/.complete                             (marker with the generation parameters)

Each directory holds a config.json (Qwen2ForCausalLM, bfloat16) and bfloat16 safetensors:
a single model.safetensors, or model-0000i-of-0000n.safetensors shards plus
model.safetensors.index.json when the model is larger than --max-shard-bytes (2 GB).

Tensor names and shapes follow Qwen2ForCausalLM, biases on q/k/v, RMSNorm weights and tied
word embeddings (no lm_head.weight), at one of three sizes (--size):

    0.5b  hidden  896, intermediate  4864, 14 heads, 2 key/value heads, 24 layers (Qwen2-0.5B)
    1.5b  hidden 1536, intermediate  8960, 12 heads, 2 key/value heads, 28 layers (Qwen2-1.5B)
    3b    hidden 2048, intermediate 11008, 16 heads, 2 key/value heads, 36 layers (Qwen2.5-3B)

The fine-tunes are base + small random deltas:

    delta_i = scale_i * ref * (c_i * shared + sqrt(1 - c_i^2) * noise_i)

with scale_i = 0.10 / 0.06 / 0.15 and c_i = 0.6 / 0.5 / -0.4, so the three task vectors
have different magnitudes and only partially agree in sign (ft3 leans against ft1/ft2).
`ref` is the base tensor's standard deviation (0.1 for the RMSNorm weights, whose base
values sit near 1.0, so that their deltas survive bfloat16 rounding).

Everything is generated row-chunk by row-chunk with numpy and streamed to disk with a
small safetensors writer, so memory stays around a few hundred MB whatever the size.
Output is deterministic for a given --seed.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

# --size -> (hidden, intermediate, attention heads, key/value heads, decoder layers)
SIZES = {
    "0.5b": (896, 4864, 14, 2, 24),
    "1.5b": (1536, 8960, 12, 2, 28),
    "3b": (2048, 11008, 16, 2, 36),
}
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, _ = SIZES["0.5b"]


def set_size(size):
    """Makes the module's shape constants those of `size`; returns its layer count."""
    global HIDDEN, INTERMEDIATE, HEADS, KV_HEADS
    HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, layers = SIZES[size]
    return layers


def kv_dim():
    return KV_HEADS * (HIDDEN // HEADS)

MODELS = ["base", "ft1", "ft2", "ft3"]
FT_SCALE = [0.10, 0.06, 0.15]
FT_SHARED = [0.6, 0.5, -0.4]

CHUNK_ELEMS = 8 * 1024 * 1024  # elements generated per step (32 MiB of float32)


def tensor_specs(layers, vocab):
    """(name, shape, kind) in file order; kind picks the base distribution."""
    specs = [("model.embed_tokens.weight", (vocab, HIDDEN), "embed")]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (HIDDEN,), "norm"),
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN), "linear"),
            (p + "self_attn.q_proj.bias", (HIDDEN,), "bias"),
            (p + "self_attn.k_proj.weight", (kv_dim(), HIDDEN), "linear"),
            (p + "self_attn.k_proj.bias", (kv_dim(),), "bias"),
            (p + "self_attn.v_proj.weight", (kv_dim(), HIDDEN), "linear"),
            (p + "self_attn.v_proj.bias", (kv_dim(),), "bias"),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN), "linear"),
            (p + "post_attention_layernorm.weight", (HIDDEN,), "norm"),
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN), "linear"),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN), "linear"),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE), "linear"),
        ]
    specs.append(("model.norm.weight", (HIDDEN,), "norm"))
    return specs


# base distribution per kind: (mean, std, delta reference scale)
KIND = {
    "embed": (0.0, 0.02, 0.02),
    "linear": (0.0, 0.02, 0.02),
    "bias": (0.0, 0.05, 0.05),
    "norm": (1.0, 0.05, 0.1),
}


def config_json(layers, vocab):
    special = min(151643, vocab - 1)
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": special,
        "eos_token_id": special,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 32768,
        "max_window_layers": layers,
        "model_type": "qwen2",
        "num_attention_heads": HEADS,
        "num_hidden_layers": layers,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }


def to_bf16(x):
    """float32 array -> uint16 bfloat16 bits, round to nearest even (clobbers x)."""
    u = x.view(np.uint32)
    t = u >> 16
    t &= 1
    t += 0x7FFF
    u += t
    u >>= 16
    return u.astype(np.uint16)


def plan_shards(specs, max_shard_bytes):
    """Greedy split of specs (in order) into shards of at most max_shard_bytes."""
    shards, cur, cur_bytes = [], [], 0
    for spec in specs:
        nbytes = 2 * math.prod(spec[1])
        if cur and cur_bytes + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(spec)
        cur_bytes += nbytes
    if cur:
        shards.append(cur)
    return shards


def safetensors_header(shard):
    header, offset = {}, 0
    for name, shape, _ in shard:
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # keep the data section 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw, offset


def generate(out, layers, vocab, seed, max_shard_bytes):
    specs = tensor_specs(layers, vocab)
    shards = plan_shards(specs, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    dirs = [os.path.join(out, m) for m in MODELS]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            if f.endswith(".safetensors") or f.endswith(".json"):
                os.remove(os.path.join(d, f))

    total_params = sum(math.prod(s[1]) for s in specs)
    done = 0
    t0 = last_report = time.time()
    tty = sys.stderr.isatty()
    weight_map = {}
    for si, (shard, fname) in enumerate(zip(shards, names)):
        head, data_len = safetensors_header(shard)
        files = [open(os.path.join(d, fname), "wb") for d in dirs]
        for f in files:
            f.write(head)
        for name, shape, kind in shard:
            weight_map[name] = fname
            mean, std, ref = KIND[kind]
            # one independent stream per tensor and per role, so tensors do not share noise
            tidx = len(weight_map)
            gens = [np.random.default_rng([seed, tidx, role]) for role in range(5)]
            g_base, g_shared, g_noise = gens[0], gens[1], gens[2:]
            rows = shape[0]
            cols = math.prod(shape[1:]) if len(shape) > 1 else 1
            step = max(1, CHUNK_ELEMS // cols)
            for r0 in range(0, rows, step):
                count = (min(rows, r0 + step) - r0) * cols
                base = g_base.standard_normal(count, dtype=np.float32)
                base *= std
                base += mean
                files[0].write(to_bf16(base.copy()).tobytes())
                shared = g_shared.standard_normal(count, dtype=np.float32)
                for k in range(3):
                    c = FT_SHARED[k]
                    d = g_noise[k].standard_normal(count, dtype=np.float32)
                    d *= math.sqrt(1.0 - c * c)
                    d += c * shared
                    d *= FT_SCALE[k] * ref
                    d += base
                    files[k + 1].write(to_bf16(d).tobytes())
                done += count
            now = time.time()
            if tty and now - last_report >= 1.0:
                last_report = now
                sys.stderr.write(f"\r{done / total_params * 100:5.1f}%  {now - t0:6.1f}s  shard {si + 1}/{n}")
                sys.stderr.flush()
        for f in files:
            if f.tell() != len(head) + data_len:
                raise RuntimeError(f"{f.name}: wrote {f.tell()} bytes, expected {len(head) + data_len}")
            f.close()
    if tty:
        sys.stderr.write("\n")

    cfg = config_json(layers, vocab)
    for d in dirs:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        with open(os.path.join(d, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, f, indent=2)
            f.write("\n")
        if n > 1:
            index = {"metadata": {"total_size": 2 * total_params}, "weight_map": weight_map}
            with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
    return total_params, n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory to hold base/ ft1/ ft2/ ft3/")
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5b", help="model shapes (default 0.5b)")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the size's)")
    ap.add_argument("--vocab", type=int, default=151936, help="vocabulary size (default 151936)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--max-shard-bytes", type=int, default=2_000_000_000,
                    help="largest safetensors shard in bytes (default 2e9)")
    args = ap.parse_args()
    default_layers = set_size(args.size)
    if args.layers is None:
        args.layers = default_layers
    if args.layers < 1 or args.vocab < 2:
        ap.error("--layers must be >= 1 and --vocab >= 2")

    marker = os.path.join(args.out, ".complete")
    if os.path.exists(marker):
        os.remove(marker)
    t0 = time.time()
    params, shards = generate(args.out, args.layers, args.vocab, args.seed, args.max_shard_bytes)
    secs = time.time() - t0
    with open(marker, "w") as f:
        size = "" if args.size == "0.5b" else f"size={args.size} "
        f.write(f"{size}layers={args.layers} vocab={args.vocab} seed={args.seed}\n")
    print(f"wrote {len(MODELS)} models x {params:,} params ({2 * params / 1e9:.2f} GB each, "
          f"{shards} shard(s)) to {args.out} in {secs:.1f}s")


if __name__ == "__main__":
    main()
