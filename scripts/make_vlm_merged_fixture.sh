#!/usr/bin/env bash
# PEFT's check of an adapter-to-adapter merge of LLaVA experts (tests/vlm_merge.rs): `cat` of
# tests/fixtures/vlm/trained-lora (weight 0.7) and trained-projector (weight 0.5, the projector
# as `modules_to_save`) into tests/fixtures/vlm/merged-cat/, then its logits of the fixture
# prompts with PEFT on transformers' LLaVA in tests/fixtures/vlm/merged-cat-logits.safetensors.
# Not run by CI; its outputs are committed.
#
#   python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers peft safetensors
#   scripts/make_vlm_merged_fixture.sh            # from the repository root
set -euo pipefail
PYTHON=${PYTHON:-/tmp/ref/bin/python}
fixtures=$PWD/tests/fixtures/vlm
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --release --quiet
cat > "$work/cat.toml" <<TOML
[merge]
method = "cat"
base = "$fixtures/tiny-llava"
output = "lora"

[[merge.experts]]
source = "$fixtures/trained-lora"
weight = 0.7

[[merge.experts]]
source = "$fixtures/trained-projector"
weight = 0.5
TOML
target/release/mmx merge "$work/cat.toml" -o "$work/merged-cat"
rm -rf "$fixtures/merged-cat"
mkdir -p "$fixtures/merged-cat"
cp "$work/merged-cat"/{adapter_config.json,adapter_model.safetensors} "$fixtures/merged-cat/"
"$PYTHON" scripts/peft_vlm_logits.py "$fixtures" merged-cat
