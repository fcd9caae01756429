#!/usr/bin/env bash
# Scores the bundled demo's merges on a larger held-out set than the 100-case test split, so
# that a difference of a point is more than a few cases: about 580 synthetic cases per
# specialty (seed 0, 600 test cases drawn, minus any question found in the training or
# validation cases of the base or the experts). Prints one table per seed shift and writes
# them to out/heldout/results.md.
#
# usage: scripts/heldout-eval.sh [SHIFT...]     (needs a release build: cargo build --release)
#   0 (the default): the published experts (registry <specialty>:v2);
#   K > 0: experts retrained from recipes/train/dsa-*.toml with each seed + K (same base,
#          same data; about 40 s each), merged with the same recipes.
# Each shift takes about 4 minutes on 2 cores (each model scored on 2,336 cases). RegMean's
# calibration statistics come from each specialty's validation cases of the experts' corpus.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MMX=${MMX_BIN:-$ROOT/target/release/mmx}
REG=$ROOT/registry
OUT=$ROOT/out/heldout
SPECIALTIES="cardiology radiology pathology dermatology"
mkdir -p "$OUT"

# The cases: 600 test cases per specialty from seed 0, less every question the base's corpus
# (2000 training cases per specialty) or the experts' (1000) holds in training or validation.
"$MMX" data generate -o "$OUT/seen-base" --seed 0 --train 2000 --validation 100 --test 100 --force >/dev/null
"$MMX" data generate -o "$OUT/seen-experts" --seed 0 --train 1000 --validation 100 --test 100 --force >/dev/null
seen=()
for corpus in seen-base seen-experts; do
    for s in $SPECIALTIES; do
        seen+=(--held-out-from "$OUT/$corpus/$s/train.jsonl" --held-out-from "$OUT/$corpus/$s/validation.jsonl")
    done
done
"$MMX" data generate -o "$OUT/drawn" --seed 0 --train 2000 --validation 100 --test 600 "${seen[@]}" --force |
    grep '^held' >&2
for s in $SPECIALTIES; do cp "$OUT/drawn/$s/test.jsonl" "$OUT/$s.jsonl"; done
data=()
for s in $SPECIALTIES; do data+=("$OUT/$s.jsonl"); done

row() {
    python3 -c '
import json, sys
a = json.load(sys.stdin)["accuracy"]
c = [a[s] for s in ["cardiology", "radiology", "pathology", "dermatology"]]
print(f"| {sys.argv[1]} | " + " | ".join(f"{100*x:.1f}" for x in c) + f" | {100*sum(c)/4:.2f} |")' "$1"
}
score() { # NAME [ADAPTER]
    "$MMX" eval registry:tiny-med-base:v2 --registry "$REG" ${2:+--adapter "$2"} --data "${data[@]}" --json | row "$1"
}

for shift in "${@:-0}"; do
    dir=$OUT/shift$shift
    mkdir -p "$dir"
    declare -A expert=()
    for s in $SPECIALTIES; do
        if [[ $shift == 0 ]]; then
            expert[$s]="registry:$s:v2"
        else
            recipe=$ROOT/recipes/train/dsa-$s.toml
            seed=$(awk '/^seed = / {print $3; exit}' "$recipe")
            sed -e "s|^registry = .*|registry = \"$REG\"|" -e "s/^seed = .*/seed = $((seed + shift))/" \
                "$recipe" >"$dir/dsa-$s.toml"
            [[ -f $dir/$s/adapter_model.safetensors ]] ||
                "$MMX" train dsa "$dir/dsa-$s.toml" -o "$dir/$s" --quiet >/dev/null
            expert[$s]="$dir/$s"
        fi
    done
    # The demo's merge recipes with these experts; and CACI's restore after TIES's own vote
    # (attenuation 0, confidence "none"), to see what the restore alone does.
    merge() { # NAME RECIPE [SED...]
        local name=$1 recipe=$2
        shift 2
        local args=(-e "s|^registry = .*|registry = \"$REG\"|")
        for s in $SPECIALTIES; do args+=(-e "s|\"registry:$s:v2\"|\"${expert[$s]}\"|"); done
        sed "${args[@]}" "$@" "$ROOT/recipes/$recipe" >"$dir/$name.toml"
        "$MMX" merge "$dir/$name.toml" -o "$dir/$name" --force --device cpu >/dev/null 2>&1
    }
    merge caci quickstart.toml
    merge ties baselines/ties.toml
    merge task_arithmetic baselines/task_arithmetic.toml
    merge ties_vote_restore quickstart.toml -e 's/^attenuation = .*/attenuation = 0.0/' -e 's/^confidence = .*/confidence = "none"/'
    # RegMean from each expert's calibration statistics: its modules' input Grams over its own
    # specialty's validation cases (those the experts were validated on).
    calibration=()
    mkdir -p "$dir/calibration"
    for s in $SPECIALTIES; do
        [[ -f $dir/calibration/$s.safetensors ]] ||
            "$MMX" calibrate registry:tiny-med-base:v2 --registry "$REG" --adapter "${expert[$s]}" \
                --data "$OUT/seen-experts/$s/validation.jsonl" -o "$dir/calibration/$s.safetensors" --quiet >/dev/null
        calibration+=(-e "s|\"../../out/calibration/$s.safetensors\"|\"$dir/calibration/$s.safetensors\"|")
    done
    merge regmean baselines/regmean.toml "${calibration[@]}"
    # CACI with the activation-aware vote: the quickstart's settings, each expert's statistics.
    activation=(-e 's/^confidence = .*/confidence = "activation"/')
    for s in $SPECIALTIES; do
        activation+=(-e "s|^source = \"${expert[$s]}\"|source = \"${expert[$s]}\"\ncalibration = \"$dir/calibration/$s.safetensors\"|")
    done
    merge caci_activation quickstart.toml "${activation[@]}"
    {
        echo "### Experts' seeds + $shift ($(wc -l <"$OUT/cardiology.jsonl") / $(wc -l <"$OUT/radiology.jsonl") / $(wc -l <"$OUT/pathology.jsonl") / $(wc -l <"$OUT/dermatology.jsonl") cases)"
        echo
        echo "| model | cardiology | radiology | pathology | dermatology | mean |"
        echo "| --- | ---: | ---: | ---: | ---: | ---: |"
        score base
        for s in $SPECIALTIES; do score "$s expert" "${expert[$s]}"; done
        score "CACI merge (quickstart)" "$dir/caci"
        score "TIES merge" "$dir/ties"
        score "task arithmetic merge" "$dir/task_arithmetic"
        score "TIES's vote + restore (CACI γ 0, confidence none)" "$dir/ties_vote_restore"
        score "RegMean merge" "$dir/regmean"
        score "CACI merge, confidence activation" "$dir/caci_activation"
        echo
    } | tee -a "$OUT/results.md"
done
