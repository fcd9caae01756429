#!/usr/bin/env bash
# Trains the bundled demo from its seeded recipes and publishes it into the bundled registry:
# the tiny base (tiny-med-base:v2, recipes/train/base.toml) and one DSA adapter per specialty
# (<specialty>:v2, recipes/train/dsa-*.toml); then scores the base, each expert and the
# merges of recipes/quickstart.toml (CACI) and recipes/baselines/ (TIES, task arithmetic) on
# each specialty's test split (synthetic cases, seed 0) and writes the table to
# out/train/results.md. About 3 minutes on 2 cores.
#
# usage: scripts/train-demo.sh      (needs a release build: cargo build --release)
#        SKIP_BASE=1 scripts/train-demo.sh   keeps the published tiny-med-base:v2
#        SKIP_TRAIN=1 scripts/train-demo.sh  keeps every published model: merges and scores only
#
# The merges' settings come from recipes/demo-sweep.toml (each method's best on the validation
# split); after retraining, run that sweep and carry its best settings into the recipes.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MMX=${MMX_BIN:-$ROOT/target/release/mmx}
REG=$ROOT/registry
OUT=$ROOT/out/train
SPECIALTIES="cardiology radiology pathology dermatology"
mkdir -p "$OUT"
cd "$ROOT"

# Tags are immutable: a rerun replaces the demo's own tags.
if [[ -z "${SKIP_TRAIN:-}" ]]; then
    for tag in $SPECIALTIES; do
        "$MMX" rm "$tag:v2" --registry "$REG" >/dev/null 2>&1 || true
    done
    if [[ -z "${SKIP_BASE:-}" ]]; then
        "$MMX" rm tiny-med-base:v2 --registry "$REG" >/dev/null 2>&1 || true
        rm -rf "${OUT:?}/base"
        "$MMX" train base recipes/train/base.toml -o "$OUT/base" --quiet \
            --publish tiny-med-base:v2 --registry "$REG"
    fi
    for s in $SPECIALTIES; do
        rm -rf "${OUT:?}/$s"
        "$MMX" train dsa "recipes/train/dsa-$s.toml" -o "$OUT/$s" --quiet \
            --publish "$s:v2" --registry "$REG"
    done
    "$MMX" gc --grace 0s --registry "$REG" >/dev/null
fi
"$MMX" verify --read-data --registry "$REG"

# The test split every recipe held out (same seed and counts as the recipes' data).
"$MMX" data generate -o "$OUT/data" --seed 0 --train 1000 --validation 100 --test 100 --force >/dev/null
tests=()
for s in $SPECIALTIES; do tests+=("$OUT/data/$s/test.jsonl"); done

for m in quickstart baselines/ties baselines/task_arithmetic; do
    name=$(basename "$m")
    "$MMX" merge "recipes/$m.toml" -o "$OUT/merge-$name" --force >/dev/null
done

score() { "$MMX" eval registry:tiny-med-base:v2 --registry "$REG" --data "${tests[@]}" --json "$@"; }
{
    echo "| model | cardiology | radiology | pathology | dermatology | mean |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: |"
    row() {
        python3 -c '
import json, sys
label, report = sys.argv[1], json.load(sys.stdin)
acc = report["accuracy"]
cells = [acc[s] for s in ["cardiology", "radiology", "pathology", "dermatology"]]
print(f"| {label} | " + " | ".join(f"{100*a:.0f}%" for a in cells) + f" | {100*sum(cells)/len(cells):.1f}% |")
' "$1"
    }
    score | row "base"
    for s in $SPECIALTIES; do score --adapter "registry:$s:v2" | row "$s expert"; done
    score --adapter "$OUT/merge-quickstart" | row "CACI merge (quickstart)"
    score --adapter "$OUT/merge-ties" | row "TIES merge"
    score --adapter "$OUT/merge-task_arithmetic" | row "task arithmetic merge"
} | tee "$OUT/results.md"
