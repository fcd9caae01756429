#!/usr/bin/env bash
# Copies the guideline demo's base and its four GBA experts from the pipeline's registry
# (`mmx pipeline recipes/pipeline.toml` makes them in out/pipeline/registry) into the bundled
# registry: tiny-med-base:v3 and <specialty>-gba:v3, byte for byte (`mmx pull`, then `mmx
# publish` with the specialty and the base). Their DSA parents and the pipeline's lineage stay
# in the pipeline's registry (`mmx log <specialty>-gba:v3 --registry out/pipeline/registry`):
# the bundled registry keeps to its 20 MiB. Then merges them by recipes/gba-expert.toml and
# scores the merge on each specialty's test split of the guideline demo.
#
# usage: scripts/bundle-gba.sh      (needs a release build and the pipeline's registry)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MMX=${MMX_BIN:-$ROOT/target/release/mmx}
FROM=$ROOT/out/pipeline/registry
REG=$ROOT/registry
TMP=$ROOT/out/bundle-gba
SPECIALTIES="cardiology radiology pathology dermatology"
cd "$ROOT"
rm -rf "$TMP"
mkdir -p "$TMP"

# Tags are immutable: a rerun replaces the bundle's own tags.
for tag in tiny-med-base:v3 $(for s in $SPECIALTIES; do echo "$s-gba:v3"; done); do
    "$MMX" rm "$tag" --registry "$REG" >/dev/null 2>&1 || true
done
"$MMX" pull tiny-med-base:v3 -o "$TMP/base" --registry "$FROM" >/dev/null
"$MMX" publish "$TMP/base" tiny-med-base:v3 --kind base --registry "$REG"
for s in $SPECIALTIES; do
    "$MMX" pull "$s-gba:v3" -o "$TMP/$s" --registry "$FROM" >/dev/null
    "$MMX" publish "$TMP/$s" "$s-gba:v3" --specialty "$s" --base tiny-med-base:v3 \
        --registry "$REG"
done
"$MMX" gc --grace 0s --registry "$REG" >/dev/null
"$MMX" verify --registry "$REG"
du -sh "$REG/blobs"

"$MMX" merge recipes/gba-expert.toml -o "$TMP/expert" --force
for s in $SPECIALTIES; do
    "$MMX" eval registry:tiny-med-base:v3 --adapter "$TMP/expert" \
        --data "out/pipeline/data/$s/test.jsonl"
done
