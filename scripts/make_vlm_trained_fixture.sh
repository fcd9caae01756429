#!/usr/bin/env bash
# PEFT's check of an adapter mmx trains on image cases (tests/vlm_train.rs): trains
# tests/fixtures/vlm/train/dsa.toml with the fused engine into tests/fixtures/vlm/trained-lora/,
# then loads it with PEFT on transformers' LLaVA and writes its logits of the fixture prompts
# (tests/fixtures/vlm/tiny-llava-logits.safetensors) to
# tests/fixtures/vlm/trained-lora-logits.safetensors. Not run by CI; its outputs are committed.
#
#   python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers peft safetensors
#   scripts/make_vlm_trained_fixture.sh            # from the repository root
set -euo pipefail
PYTHON=${PYTHON:-/tmp/ref/bin/python}
fixtures=tests/fixtures/vlm
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --release --quiet
mkdir -p "$work/train/llava"
cp "$fixtures"/tiny-llava/{config.json,model.safetensors,preprocessor_config.json} "$work/train/llava/"
cp "$fixtures"/train/{dsa.toml,cases.jsonl,tokenizer.json} "$work/train/"
cp "$fixtures/train/tokenizer.json" "$work/train/llava/"
cp "$fixtures"/{square.png,wide.png} "$work/"
(cd "$work/train" && MMX_TRAIN_ENGINE=fused "$OLDPWD/target/release/mmx" train dsa dsa.toml -o out --quiet)
rm -rf "$fixtures/trained-lora"
mkdir -p "$fixtures/trained-lora"
cp "$work"/train/out/{adapter_config.json,adapter_model.safetensors} "$fixtures/trained-lora/"
"$PYTHON" scripts/peft_vlm_logits.py "$fixtures"
