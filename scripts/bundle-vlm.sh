#!/usr/bin/env bash
# Copies the image experiment's VLM base and its four seed-1 image experts
# (scripts/vlm-experiment.sh makes them in WORK) into the bundled registry:
# tiny-med-vlm:v1 (kind base) and <specialty>-vlm:v1 (LoRA r 8 plus the projector as
# modules_to_save, with the specialty and the base). The base's language model shares its
# blobs with tiny-med-base:v3 and the experts share nothing with the base but their own
# tensors, so the registry grows by the vision tower, the projector and the four adapters.
# Then merges them by recipes/quickstart-vlm.toml and scores the merge on each specialty's
# test cases with the image and with a blank one.
#
# usage: scripts/bundle-vlm.sh [WORK]     (needs a release build; WORK as for vlm-experiment.sh)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MMX=${MMX_BIN:-$ROOT/target/release/mmx}
WORK=${1:-/tmp/mmx-vlm-experiment}
REG=$ROOT/registry
SPECIALTIES="cardiology radiology dermatology pathology"
cd "$ROOT"
[ -f "$WORK/vlm-base/model.safetensors" ] || { echo "no $WORK/vlm-base: run scripts/vlm-experiment.sh $WORK first" >&2; exit 1; }

# Tags are immutable: a rerun replaces the bundle's own tags.
for tag in tiny-med-vlm:v1 $(for s in $SPECIALTIES; do echo "$s-vlm:v1"; done); do
    "$MMX" rm "$tag" --registry "$REG" >/dev/null 2>&1 || true
done
"$MMX" publish "$WORK/vlm-base" tiny-med-vlm:v1 --kind base --registry "$REG"
for s in $SPECIALTIES; do
    "$MMX" publish "$WORK/$s-s1" "$s-vlm:v1" --specialty "$s" --base tiny-med-vlm:v1 \
        --registry "$REG"
done
"$MMX" gc --grace 0s --registry "$REG" >/dev/null
"$MMX" verify --registry "$REG"
du -sh "$REG/blobs"

out=$ROOT/out/quickstart-vlm
"$MMX" merge recipes/quickstart-vlm.toml -o "$out" --force
for s in $SPECIALTIES; do
    for blank in "" --blank-images; do
        "$MMX" eval registry:tiny-med-vlm:v1 --registry "$REG" --adapter "$out" \
            --data "$WORK/data/$s/test.jsonl" $blank
    done
done
