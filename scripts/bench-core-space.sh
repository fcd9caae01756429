#!/usr/bin/env bash
# Core space vs full space: the same TIES merge of four rank-16 LoRAs over every linear layer
# of a Qwen2-0.5B-shaped model, written as a LoRA (core space: never forms an out×in matrix)
# and as a full delta (full space: every expert's update materialised per tensor).
#
# usage: scripts/bench-core-space.sh [WORKDIR] [REPEAT]   (default /tmp/mmx-bench, 3: best of 3)
# Needs the base from scripts/make_bench_models.py in WORKDIR/models/base (made if absent,
# with MMX_BENCH_PYTHON, default python3 with numpy) and a release build of mmx.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORKDIR=${1:-/tmp/mmx-bench}
REPEAT=${2:-3}
PY=${MMX_BENCH_PYTHON:-python3}
MMX=${MMX_BIN:-$ROOT/target/release/mmx}
mkdir -p "$WORKDIR"
[[ -f $WORKDIR/models/base/config.json ]] || "$PY" "$ROOT/scripts/make_bench_models.py" --out "$WORKDIR/models"
[[ -f $WORKDIR/loras/lora3/adapter_model.safetensors ]] || "$PY" "$ROOT/scripts/make_bench_loras.py" --out "$WORKDIR/loras"

recipe() { # $1 name, $2 extra [merge] keys
    {
        printf "[merge]\nmethod = 'ties'\nbase = '%s'\nseed = 0\n%b\n[merge.parameters]\ndensity = 0.5\n" "$WORKDIR/models/base" "$2"
        for i in 0 1 2 3; do printf "[[merge.experts]]\nsource = '%s'\nweight = 1.0\n" "$WORKDIR/loras/lora$i"; done
    } > "$WORKDIR/$1.toml"
}
recipe core "output = 'lora'\nspace = 'core'\nrank = 16"
recipe full "output = 'delta'\ndtype = 'bfloat16'"

run() { # $1 name: the best wall time of REPEAT runs, with its peak RSS
    local best="" best_kb=0
    for _ in $(seq "$REPEAT"); do
        rm -rf "$WORKDIR/out-$1"
        /usr/bin/time -f "%e %M" -o "$WORKDIR/time-$1" "$MMX" merge "$WORKDIR/$1.toml" -o "$WORKDIR/out-$1" >/dev/null
        read -r wall rss < "$WORKDIR/time-$1"
        if [[ -z $best ]] || awk -v a="$wall" -v b="$best" 'BEGIN { exit !(a < b) }'; then
            best=$wall best_kb=$rss
        fi
    done
    echo "$best $best_kb"
}
read -r core_s core_kb < <(run core)
read -r full_s full_kb < <(run full)
ratio=$(awk -v a="$full_s" -v b="$core_s" 'BEGIN { printf "%.1f", a / b }')
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "best of $REPEAT runs each"
echo "TIES (density 0.5) of 4 rank-16 LoRAs over 168 linear layers of a Qwen2-0.5B-shaped model"
printf '| space | output | wall s | peak RSS MiB |\n| --- | --- | ---: | ---: |\n'
printf '| core | LoRA, rank 16 | %s | %d |\n' "$core_s" $((core_kb / 1024))
printf '| full | delta, bf16 | %s | %d |\n' "$full_s" $((full_kb / 1024))
echo "full / core: ${ratio}x"
