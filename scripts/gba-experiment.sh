#!/usr/bin/env bash
# The learning comparison of issue 14 on the guideline demo (synthetic cases, seed 0): the
# base tiny-med-base:v3 (recipes/gba/base.toml), one DSA expert per specialty on 64 traced
# cases (recipes/gba/dsa-*.toml), then from each expert the same number of RL steps and
# rollouts with each advantage estimator (GRPO, Dr. GRPO with its loss, RLOO, GBA with alpha 0.5
# and 1, GBA with the pooled scale) over three seeds (recipes/gba/gba-*.toml, estimator and
# seed replaced). Every model is scored greedily on the validation (100) and test (200) cases of
# its specialty; scripts/gba_report.py writes the tables (means and standard deviations over
# seeds, and the per-guideline accuracy and adherence of the rollouts) to out/gba/learning.md;
# every score is in out/gba/scores.jsonl. Everything is published into a scratch registry,
# out/gba/registry.
#
# usage: scripts/gba-experiment.sh          (needs a release build; about 70 minutes on 2 cores)
#        SEEDS="1 2" SPECIALTIES=cardiology METHODS="grpo gba" scripts/gba-experiment.sh
#        APPEND=1 METHODS=gba_pooled scripts/gba-experiment.sh   adds runs to the scores
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MMX=${MMX_BIN:-$ROOT/target/release/mmx}
OUT=$ROOT/out/gba
REG=$OUT/registry
SPECIALTIES=${SPECIALTIES:-"cardiology radiology pathology dermatology"}
METHODS=${METHODS:-"grpo dr_grpo rloo gba gba_alpha1 gba_pooled"}
SEEDS=${SEEDS:-"1 2 3"}
mkdir -p "$OUT/runs"
cd "$ROOT"

"$MMX" data generate -o "$OUT/data" --seed 0 --train 64 --validation 100 --test 200 \
    --guidelines --answer-only 512 --force >/dev/null
if ! "$MMX" show tiny-med-base:v3 --registry "$REG" >/dev/null 2>&1; then
    rm -rf "$OUT/base"
    "$MMX" train base recipes/gba/base.toml -o "$OUT/base" --quiet \
        --publish tiny-med-base:v3 --registry "$REG"
fi
score() { # score LABEL SPECIALTY [--adapter A]
    local label=$1 s=$2
    shift 2
    for split in validation test; do
        "$MMX" eval registry:tiny-med-base:v3 --registry "$REG" "$@" \
            --data "$OUT/data/$s/$split.jsonl" --json |
            python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"model": sys.argv[1], "specialty": sys.argv[2], "split": sys.argv[3], "accuracy": r["accuracy"][sys.argv[2]]}))' \
                "$label" "$s" "$split" >>"$OUT/scores.jsonl"
    done
}
[[ -n "${APPEND:-}" ]] || : >"$OUT/scores.jsonl"
for s in $SPECIALTIES; do
    [[ -n "${APPEND:-}" ]] || score base "$s"
    if ! "$MMX" show "$s:v3" --registry "$REG" >/dev/null 2>&1; then
        rm -rf "$OUT/dsa-$s"
        "$MMX" train dsa "recipes/gba/dsa-$s.toml" -o "$OUT/dsa-$s" --quiet \
            --publish "$s:v3" --registry "$REG"
    fi
    [[ -n "${APPEND:-}" ]] || score dsa "$s" --adapter "registry:$s:v3"
    for method in $METHODS; do
        for seed in $SEEDS; do
            run=$OUT/runs/$s-$method-$seed
            recipe=$OUT/runs/$s-$method-$seed.toml
            case $method in
                gba) settings='estimator = "gba"\nalpha = 0.5' ;;
                gba_alpha1) settings='estimator = "gba"\nalpha = 1.0' ;;
                gba_pooled) settings='estimator = "gba_pooled"\nalpha = 0.5' ;;
                grpo) settings='estimator = "grpo"' ;;
                rloo) settings='estimator = "rloo"' ;;
                dr_grpo) settings='estimator = "dr_grpo"\nloss_type = "dr_grpo"' ;;
            esac
            sed -e "s#^guidelines = .*#guidelines = \"$ROOT/recipes/guidelines.toml\"#" \
                -e "s#^registry = .*#registry = \"$REG\"#" \
                -e "s#^seed = .*#seed = $seed#" \
                -e '/^estimator = /d' -e '/^alpha = /d' \
                -e "s#^checkpoint_every = .*#checkpoint_every = 0\n$settings#" \
                "recipes/gba/gba-$s.toml" >"$recipe"
            rm -rf "$run"
            start=$(date +%s)
            "$MMX" train gba "$recipe" -o "$run" --quiet >/dev/null
            echo "$s $method seed $seed: $(( $(date +%s) - start )) s" >&2
            score "$method" "$s" --adapter "$run"
        done
    done
done
python3 scripts/gba_report.py "$OUT"
