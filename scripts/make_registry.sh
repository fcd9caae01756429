#!/usr/bin/env bash
# Rebuilds the bundled registry (registry/) from examples/: the tiny base and the four synthetic
# specialty adapters, tagged v1. The same files always give the same digests.
#
# usage: scripts/make_registry.sh      (needs a release build: cargo build --release)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MMX=${MMX_BIN:-$ROOT/target/release/mmx}
REG=$ROOT/registry
rm -rf "$REG"
"$MMX" publish "$ROOT/examples/tiny-med-base" tiny-med-base:v1 --registry "$REG"
for s in cardiology radiology pathology dermatology; do
    "$MMX" publish "$ROOT/examples/adapters/$s" "$s:v1" --specialty "$s" --base tiny-med-base:v1 --registry "$REG"
done
"$MMX" verify --read-data --registry "$REG"
