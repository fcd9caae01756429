#!/usr/bin/env bash
# The cost of data-aware merging (issue 18): `mmx calibrate`'s tokens/s on the bundled demo,
# and the time of a merge with calibration statistics (RegMean, activation-aware CACI) against
# the same merge by weight-only CACI (confidence "rms"), all in core space to a LoRA of rank
# Σ r_t = 64: the four bundled experts (tiny-med-base:v2 shapes), and four random rank-16 LoRAs
# over every linear layer of a Qwen2-0.5B-shaped model with synthetic statistics
# (examples/synthetic_calibration.rs: the shapes and the arithmetic of real ones).
#
# usage: scripts/bench-data-aware.sh [WORKDIR] [REPEAT]  (default /tmp/mmx-bench-data, 3: best of 3)
# Needs a release build (cargo build --release --examples) and, for the Qwen2-0.5B shapes,
# python3 with numpy (MMX_BENCH_PYTHON). Writes about 11 GB of statistics into WORKDIR.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORKDIR=${1:-/tmp/mmx-bench-data}
REPEAT=${2:-3}
PY=${MMX_BENCH_PYTHON:-python3}
MMX=${MMX_BIN:-$ROOT/target/release/mmx}
SYNTH=$ROOT/target/release/examples/synthetic_calibration
REG=$ROOT/registry
SPECIALTIES="cardiology radiology pathology dermatology"
mkdir -p "$WORKDIR/calibration"

echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

# Calibration of the bundled experts on their specialties' validation cases.
"$MMX" data generate -o "$WORKDIR/data" --seed 0 --train 1000 --validation 100 --test 100 --force >/dev/null
tokens=0 seconds=0
for s in $SPECIALTIES; do
    out=$("$MMX" calibrate registry:tiny-med-base:v2 --registry "$REG" --adapter "registry:$s:v2" \
        --data "$WORKDIR/data/$s/validation.jsonl" -o "$WORKDIR/calibration/$s.safetensors" --json)
    tokens=$((tokens + $(echo "$out" | sed -n 's/.*"tokens": \([0-9]*\).*/\1/p')))
    seconds=$(awk -v a="$seconds" -v b="$(echo "$out" | sed -n 's/.*"seconds": \([0-9.e-]*\).*/\1/p')" 'BEGIN { print a + b }')
done
echo "calibration: $tokens tokens in $seconds s: $(awk -v t="$tokens" -v s="$seconds" 'BEGIN { printf "%.0f", t / s }') tokens/s (4 experts × 100 validation cases)"

recipe() { # FILE METHOD_KEYS BASE SOURCE... (each source followed by its statistics file)
    local file=$1 keys=$2 base=$3
    shift 3
    {
        printf "[merge]\nregistry = '%s'\nbase = '%s'\noutput = 'lora'\nspace = 'core'\nseed = 7\n%b\n" "$REG" "$base" "$keys"
        while (($#)); do
            printf "[[merge.experts]]\nsource = '%s'\ncalibration = '%s'\n" "$1" "$2"
            shift 2
        done
    } > "$file"
}
CACI="method = 'caci'\nrank = 64\n[merge.parameters]\ndensity = 0.5\nattenuation = 1.0\nrestore = 0.85"
REGMEAN="method = 'regmean'"

best() { # RECIPE: the best wall time of REPEAT merges
    local best=""
    for _ in $(seq "$REPEAT"); do
        rm -rf "$WORKDIR/out"
        /usr/bin/time -f "%e" -o "$WORKDIR/time" "$MMX" merge "$1" -o "$WORKDIR/out" --device cpu >/dev/null 2>&1
        local wall
        wall=$(cat "$WORKDIR/time")
        if [[ -z $best ]] || awk -v a="$wall" -v b="$best" 'BEGIN { exit !(a < b) }'; then best=$wall; fi
    done
    echo "$best"
}

table() { # LABEL BASE SOURCE STATS ...
    local label=$1 base=$2
    shift 2
    recipe "$WORKDIR/caci-rms.toml" "$CACI\nconfidence = 'rms'" "$base" "$@"
    recipe "$WORKDIR/caci-activation.toml" "$CACI\nconfidence = 'activation'" "$base" "$@"
    recipe "$WORKDIR/regmean.toml" "$REGMEAN" "$base" "$@"
    local rms activation regmean
    rms=$(best "$WORKDIR/caci-rms.toml")
    activation=$(best "$WORKDIR/caci-activation.toml")
    regmean=$(best "$WORKDIR/regmean.toml")
    ratio() { awk -v a="$1" -v b="$rms" 'BEGIN { printf "%.2f", a / b }'; }
    printf '| %s | %s | %s (%sx) | %s (%sx) |\n' "$label" "$rms" "$activation" "$(ratio "$activation")" "$regmean" "$(ratio "$regmean")"
}

echo
echo "best of $REPEAT merges each, wall s (ratio to weight-only CACI)"
echo
echo "| shapes | CACI, confidence rms | CACI, confidence activation | RegMean |"
echo "| --- | ---: | ---: | ---: |"
args=()
for s in $SPECIALTIES; do args+=("registry:$s:v2" "$WORKDIR/calibration/$s.safetensors"); done
table "bundled (tiny-med-base:v2, 28 modules)" "registry:tiny-med-base:v2" "${args[@]}"

[[ -f $WORKDIR/qwen/base/config.json ]] || "$PY" "$ROOT/scripts/make_bench_models.py" --out "$WORKDIR/qwen" --vocab 1024 >/dev/null
[[ -f $WORKDIR/qwen-loras/lora3/adapter_model.safetensors ]] || "$PY" "$ROOT/scripts/make_bench_loras.py" --out "$WORKDIR/qwen-loras" >/dev/null
args=()
for i in 0 1 2 3; do
    [[ -f $WORKDIR/qwen-calibration/lora$i.safetensors ]] || {
        mkdir -p "$WORKDIR/qwen-calibration"
        "$SYNTH" "$WORKDIR/qwen-loras/lora$i" "$WORKDIR/qwen-calibration/lora$i.safetensors" "$i" >/dev/null
    }
    args+=("$WORKDIR/qwen-loras/lora$i" "$WORKDIR/qwen-calibration/lora$i.safetensors")
done
table "Qwen2-0.5B (168 modules, synthetic)" "$WORKDIR/qwen/base" "${args[@]}"
