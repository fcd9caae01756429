#!/usr/bin/env bash
# PEFT's check of the adapters mmx trains on image cases (tests/vlm_train.rs): trains
# tests/fixtures/vlm/train/dsa.toml (LoRA, the fused engine) into tests/fixtures/vlm/trained-lora/
# and dsa-projector.toml (LoRA and the projector as `modules_to_save`, candle's autograd) into
# tests/fixtures/vlm/trained-projector/, then loads each with PEFT on transformers' LLaVA and
# writes its logits of the fixture prompts (tests/fixtures/vlm/tiny-llava-logits.safetensors) to
# tests/fixtures/vlm/<name>-logits.safetensors. Not run by CI; its outputs are committed.
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
cp "$fixtures/train/dsa-projector.toml" "$work/train/"
root=$PWD
for run in "dsa trained-lora" "dsa-projector trained-projector"; do
    set -- $run
    (cd "$work/train" && "$root/target/release/mmx" train dsa "$1.toml" -o "$2" --quiet)
    rm -rf "${fixtures:?}/$2"
    mkdir -p "$fixtures/$2"
    cp "$work/train/$2"/{adapter_config.json,adapter_model.safetensors} "$fixtures/$2/"
    "$PYTHON" scripts/peft_vlm_logits.py "$fixtures" "$2"
done
