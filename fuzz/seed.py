#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target from the repository's own files (fuzz/corpus/);
cargo-fuzz grows and minimises it from there. Run from anywhere: python3 fuzz/seed.py"""
import glob, hashlib, json, os, struct

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
corpus = os.path.join(root, "fuzz", "corpus")


def files(*patterns):
    out = []
    for p in patterns:
        out += sorted(f for f in glob.glob(os.path.join(root, p), recursive=True) if "/target/" not in f and "/out/" not in f)
    return out


def put(target, data):
    os.makedirs(os.path.join(corpus, target), exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(corpus, target, name), "wb") as f:
        f.write(data)


for path in files("tests/fixtures/**/*.safetensors", "examples/**/*.safetensors")[:40]:
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        header = f.read(min(n, 4000))
    # The claimed file length, then the file's first bytes (its header).
    put("safetensors_header", struct.pack("<Q", os.path.getsize(path)) + head + header)
for path in files("**/adapter_config.json")[:40]:
    put("adapter_config", open(path, "rb").read())
for path in files("recipes/**/*.toml", "tests/fixtures/**/*.toml"):
    text = open(path, "rb").read()
    put("sweep" if b"[sweep" in text else "recipe_toml", text)
for path in files("tests/fixtures/**/*.yml", "tests/fixtures/**/*.yaml"):
    put("recipe_yaml", open(path, "rb").read())
for ref in files("registry/refs/*/*"):
    digest = open(ref).read().strip().removeprefix("blake3:")
    put("manifest", open(os.path.join(root, "registry/blobs/blake3", digest[:2], digest[2:]), "rb").read())
for path in files("examples/**/*.jsonl", "tests/fixtures/**/*.jsonl", "registry/**/*.jsonl")[:20]:
    lines = open(path, "rb").read().split(b"\n")
    put("cases", b"\n".join(lines[:3]) + b"\n")
# Case files as `mmx data generate` writes them (text, guideline steps, images).
mmx = os.path.join(root, "target/release/mmx")
if os.path.exists(mmx):
    import subprocess, tempfile
    with tempfile.TemporaryDirectory() as tmp:
        for i, flags in enumerate([[], ["--guidelines"], ["--images"], ["--answer-only", "3"]]):
            out = os.path.join(tmp, str(i))
            subprocess.run([mmx, "data", "generate", "-o", out, "--seed", str(i), "--train", "4", "--validation", "2", "--test", "2", *flags], check=True, capture_output=True)
            for path in sorted(glob.glob(os.path.join(out, "**/*.jsonl"), recursive=True))[:6]:
                put("cases", open(path, "rb").read())
for target in os.listdir(corpus):
    print(target, len(os.listdir(os.path.join(corpus, target))))
