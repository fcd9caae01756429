#!/usr/bin/env bash
# How `mmx merge` scales: wall time and peak RSS (from /usr/bin/time -v) of merges of synthetic
# Qwen2-shaped bf16 models (a base and three fine-tunes, scripts/make_bench_models.py) at
# 0.5B, 1.5B and 3B parameters under one memory budget.
#
# usage: scripts/bench-scale.sh [WORKDIR] [--sizes LIST] [--every-method-at SIZE]
#                               [--methods LIST] [--max-memory SIZE] [--keep]
#
#   WORKDIR              scratch directory (default /tmp/mmx-scale); the models of one size at
#                        a time live in WORKDIR/models and are deleted before the next size
#   --sizes LIST         comma-separated sizes (default 0.5b,1.5b,3b)
#   --every-method-at S  the size at which every full-model method runs (default 1.5b)
#   --methods LIST       the methods run at the other sizes (default ties,dare_ties,caci_restore)
#   --max-memory SIZE    mmx's --max-memory (default 2G)
#   --keep               keep the last size's models
#
# environment:
#   MMX_BIN           mmx binary (default target/release/mmx under the repository root)
#   MMX_BENCH_PYTHON  python with numpy (default /tmp/ref/bin/python)
#
# Disk: the models of the largest size (4 x 6.2 GB at 3b) plus one output (6.2 GB), about
# 31 GB at the peak; the script prints the peak it saw. Output: a table on stdout and in
# WORKDIR/results.md; logs in WORKDIR/logs. Exits 1 if any merge failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORKDIR=/tmp/mmx-scale
SIZES=0.5b,1.5b,3b
EVERY_AT=1.5b
SUBSET=ties,dare_ties,caci_restore
BUDGET=2G
KEEP=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --sizes) SIZES=${2:?--sizes needs a value}; shift 2 ;;
        --every-method-at) EVERY_AT=${2:?--every-method-at needs a value}; shift 2 ;;
        --methods) SUBSET=${2:?--methods needs a value}; shift 2 ;;
        --max-memory) BUDGET=${2:?--max-memory needs a value}; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option: $1" >&2; exit 2 ;;
        *) WORKDIR=$1; shift ;;
    esac
done
PY=${MMX_BENCH_PYTHON:-/tmp/ref/bin/python}
MMX=${MMX_BIN:-$ROOT/target/release/mmx}
[[ -x $MMX ]] || { echo "mmx binary not found: $MMX (cargo build --release)" >&2; exit 2; }
[[ -x /usr/bin/time ]] || { echo "/usr/bin/time not found (apt-get install time)" >&2; exit 2; }
"$PY" -c 'import numpy' 2>/dev/null || { echo "python with numpy not found: $PY (set MMX_BENCH_PYTHON)" >&2; exit 2; }

EVERY=(linear task_arithmetic ties dare_linear dare_ties breadcrumbs breadcrumbs_ties della
    della_linear magnitude_prune caci caci_restore)
IFS=, read -r -a SIZE_LIST <<<"$SIZES"
IFS=, read -r -a SUBSET_LIST <<<"$SUBSET"
for m in "${SUBSET_LIST[@]}"; do
    [[ " ${EVERY[*]} " = *" $m "* ]] || { echo "unknown method: $m (one of ${EVERY[*]})" >&2; exit 2; }
done

mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
MODELS=$WORKDIR/models
LOGS=$WORKDIR/logs
OUT=$WORKDIR/out
RECIPES=$WORKDIR/recipes
mkdir -p "$LOGS" "$RECIPES"

# The recipe of one method over the current models: density 0.5 where the method trims,
# weights 1.0 / 0.7 / 0.5 as in scripts/bench-vs-mergekit.sh.
recipe() {
    local name=$1 method=$1 params='density = 0.5'
    case $name in
        linear) params= ;;
        breadcrumbs | breadcrumbs_ties) params=$'density = 0.5\ngamma = 0.01' ;;
        della | della_linear) params=$'density = 0.5\nepsilon = 0.1' ;;
        caci_restore) method=caci; params=$'density = 0.5\nrestore = 0.85' ;;
    esac
    cat >"$RECIPES/$name.toml" <<EOF
[merge]
method = "$method"
base = "$MODELS/base"
dtype = "bfloat16"

[merge.parameters]
$params

[[merge.experts]]
source = "$MODELS/ft1"
weight = 1.0

[[merge.experts]]
source = "$MODELS/ft2"
weight = 0.7

[[merge.experts]]
source = "$MODELS/ft3"
weight = 0.5
EOF
    echo "$RECIPES/$name.toml"
}

disk_peak=0
note_disk() {
    local used
    used=$(du -sb "$WORKDIR" | cut -f1)
    if ((used > disk_peak)); then disk_peak=$used; fi
}

rows=()
FAILED=0
for size in "${SIZE_LIST[@]}"; do
    rm -rf "$MODELS" "$OUT"
    echo "== generating $size models in $MODELS"
    "$PY" "$ROOT/scripts/make_bench_models.py" --out "$MODELS" --size "$size" | tail -n 1
    params=$("$PY" - "$MODELS/base" <<'EOF'
import glob, json, math, sys
n = 0
for f in glob.glob(sys.argv[1] + "/*.safetensors"):
    with open(f, "rb") as h:
        header = json.loads(h.read(int.from_bytes(h.read(8), "little")))
    n += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
print(n)
EOF
)
    note_disk
    if [[ $size = "$EVERY_AT" ]]; then methods=("${EVERY[@]}"); else methods=("${SUBSET_LIST[@]}"); fi
    for method in "${methods[@]}"; do
        config=$(recipe "$method")
        rm -rf "$OUT"
        sync
        cat "$MODELS"/*/*.safetensors >/dev/null # warm cache, as in bench-vs-mergekit.sh
        log=$LOGS/$size-$method.log
        echo "== $size $method"
        if ! /usr/bin/time -v "$MMX" merge "$config" -o "$OUT" --seed 0 --max-memory "$BUDGET" >"$log" 2>&1; then
            echo "!! $size $method failed; last lines of $log:"
            tail -n 15 "$log" | sed 's/^/   | /'
            rows+=("| $size | $params | $method | failed | | | |")
            FAILED=1
            continue
        fi
        note_disk
        wall=$(awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.2f", s }' "$log")
        rss=$(awk -F': ' '/Maximum resident set size/ { printf "%d", $2 / 1024 }' "$log")
        cpu=$(awk -F': ' '/Percent of CPU/ { print $2 }' "$log")
        per_b=$(awk -v w="$wall" -v p="$params" 'BEGIN { printf "%.2f", w / (p / 1e9) }')
        echo "   wall ${wall}s  peak RSS ${rss} MiB  CPU ${cpu}  ${per_b} s per 1e9 parameters"
        rows+=("| $size | $(awk -v p="$params" 'BEGIN { printf "%.3f", p / 1e9 }') | $method | $wall | $per_b | $rss | $cpu |")
        rm -rf "$OUT"
    done
done
if ((KEEP == 0)); then rm -rf "$MODELS"; fi
rm -rf "$OUT"

cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
{
    echo "### mmx merge at scale, --max-memory $BUDGET"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $(nproc) CPUs, ${cpu_model:-$(uname -m)}," \
        "$(awk '/MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo) GiB RAM"
    echo "- mmx: $("$MMX" --version 2>/dev/null | head -1) ($MMX)"
    echo "- models: scripts/make_bench_models.py --size S (Qwen2 shapes, bf16, tied embeddings)," \
        "a base and three fine-tunes; density 0.5, weights 1.0 / 0.7 / 0.5; caci_restore: restore 0.85"
    echo "- each merge: warm page cache, \`mmx merge RECIPE -o OUT --seed 0 --max-memory $BUDGET\`," \
        "timed by /usr/bin/time -v (peak RSS = its maximum resident set size, mapped input pages included)"
    echo "- peak disk use of the work directory: $(awk -v b="$disk_peak" 'BEGIN { printf "%.1f", b / 1e9 }') GB"
    echo
    echo "| size | parameters (1e9) | method | wall s | s per 1e9 parameters | peak RSS MiB | CPU |"
    echo "| --- | ---: | --- | ---: | ---: | ---: | ---: |"
    printf '%s\n' "${rows[@]}"
} | tee "$WORKDIR/results.md"
echo
echo "(written to $WORKDIR/results.md; logs in $LOGS)"
exit $FAILED
