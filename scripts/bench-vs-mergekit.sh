#!/usr/bin/env bash
# Benchmark mmx against mergekit on CPU: wall time and peak RSS for a TIES and a DARE-TIES
# merge of a synthetic Qwen2-0.5B-shaped base model and three fine-tunes, plus the I/O floor
# (reading every input byte + writing the output's bytes with fsync).
#
# usage: scripts/bench-vs-mergekit.sh [WORKDIR] [--layers N] [--vocab N] [--repeat N]
#
#   WORKDIR      scratch directory (default /tmp/mmx-bench); models live in WORKDIR/models and
#                are generated once (reused while their layers/vocab match)
#   --layers N   decoder layers of the synthetic models (default 24, as Qwen2-0.5B)
#   --vocab N    vocabulary size (default 151936, as Qwen2-0.5B)
#   --repeat N   timed runs per (method, tool); the table shows the fastest (default 1)
#
# environment:
#   MMX_BIN           mmx binary (default target/release/mmx under the repository root)
#   MMX_BENCH_PYTHON  python with numpy (+ torch/safetensors for the output check)
#                     (default /tmp/ref/bin/python)
#   MERGEKIT_YAML     mergekit-yaml (default: next to MMX_BENCH_PYTHON)
#
# Output: a table on stdout, and the same table as markdown in WORKDIR/results.md.
# Logs of every run are kept in WORKDIR/logs. Exits 1 if any merge failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORKDIR=/tmp/mmx-bench
LAYERS=24
VOCAB=151936
REPEAT=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --layers) LAYERS=${2:?--layers needs a value}; shift 2 ;;
        --layers=*) LAYERS=${1#*=}; shift ;;
        --vocab) VOCAB=${2:?--vocab needs a value}; shift 2 ;;
        --vocab=*) VOCAB=${1#*=}; shift ;;
        --repeat) REPEAT=${2:?--repeat needs a value}; shift 2 ;;
        --repeat=*) REPEAT=${1#*=}; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option: $1" >&2; exit 2 ;;
        *) WORKDIR=$1; shift ;;
    esac
done
for v in LAYERS VOCAB REPEAT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "--${v,,} must be a positive integer" >&2; exit 2; }
done

PY=${MMX_BENCH_PYTHON:-/tmp/ref/bin/python}
MMX=${MMX_BIN:-$ROOT/target/release/mmx}
[[ $MMX = /* ]] || MMX=$ROOT/$MMX
MERGEKIT=${MERGEKIT_YAML:-$(dirname "$PY")/mergekit-yaml}
command -v "$PY" >/dev/null || { echo "python not found: $PY (set MMX_BENCH_PYTHON)" >&2; exit 2; }
command -v "$MERGEKIT" >/dev/null || { echo "mergekit-yaml not found: $MERGEKIT (set MERGEKIT_YAML)" >&2; exit 2; }

mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
MODELS=$WORKDIR/models
CONFIGS=$WORKDIR/configs
LOGS=$WORKDIR/logs
OUTS=$WORKDIR/out
mkdir -p "$CONFIGS" "$LOGS" "$OUTS"

# ---------------------------------------------------------------- (a) models
want="layers=$LAYERS vocab=$VOCAB seed=0"
if [[ ! -f $MODELS/.complete || $(cat "$MODELS/.complete") != "$want" ]]; then
    echo "== generating models ($want) in $MODELS"
    rm -rf "$MODELS"
    "$PY" "$ROOT/scripts/make_bench_models.py" --out "$MODELS" --layers "$LAYERS" --vocab "$VOCAB"
else
    echo "== reusing models in $MODELS ($want)"
fi
mapfile -t INPUTS < <(find "$MODELS" -name '*.safetensors' | sort)
IN_BYTES=$(find "$MODELS" -name '*.safetensors' -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f", s }')

# ---------------------------------------------------------------- (b) configs
# dtype: bfloat16 as most published mergekit configs use. With it mergekit does the merge
# arithmetic in bf16, while mmx always computes in f32 and only stores bf16, so mmx does
# at least as much arithmetic work per element and is the more accurate of the two.
for method in ties dare_ties; do
    cat >"$CONFIGS/$method.yml" <<EOF
merge_method: $method
base_model: $MODELS/base
models:
  - model: $MODELS/ft1
    parameters:
      density: 0.5
      weight: 1.0
  - model: $MODELS/ft2
    parameters:
      density: 0.5
      weight: 0.7
  - model: $MODELS/ft3
    parameters:
      density: 0.5
      weight: 0.5
dtype: bfloat16 # mergekit computes in bf16 with this; mmx always computes in f32
EOF
done

# ---------------------------------------------------------------- timing helpers
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

warm_inputs() { cat "${INPUTS[@]}" >/dev/null; }

# timed RESULT_FILE LOG_FILE CMD...: writes "wall_s maxrss_kib user_s sys_s" to RESULT_FILE
# and returns the command's exit status.
if [[ -x /usr/bin/time ]]; then
    TIMER="/usr/bin/time"
    timed() {
        local res=$1 log=$2; shift 2
        local rc=0
        /usr/bin/time -f '%e %M %U %S' -o "$res.raw" "$@" >"$log" 2>&1 || rc=$?
        tail -n 1 "$res.raw" >"$res"; rm -f "$res.raw"
        return $rc
    }
else
    TIMER="python resource.getrusage(RUSAGE_CHILDREN)"
    timed() {
        local res=$1 log=$2; shift 2
        "$PY" - "$res" "$@" >"$log" 2>&1 <<'EOF'
import resource, subprocess, sys, time
res, cmd = sys.argv[1], sys.argv[2:]
t = time.monotonic()
rc = subprocess.call(cmd)
wall = time.monotonic() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(res, "w") as f:
    f.write(f"{wall:.2f} {ru.ru_maxrss} {ru.ru_utime:.2f} {ru.ru_stime:.2f}\n")
sys.exit(rc)
EOF
    }
fi

# ---------------------------------------------------------------- (c) merges
MK_FLAGS=(--random-seed 0 --no-cuda --device cpu --no-copy-tokenizer --no-write-model-card)
set_cmd() { # tool method out -> cmd array
    case $1 in
        mmx) cmd=("$MMX" merge "$CONFIGS/$2.yml" -o "$3" --seed 0) ;;
        mergekit) cmd=("$MERGEKIT" "$CONFIGS/$2.yml" "$3" "${MK_FLAGS[@]}") ;;
    esac
}
st_bytes() { find "$@" -name '*.safetensors' -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f", s }'; }

declare -A WALL RSS CPU STATUS
OUT_BYTES=
FAILED=0
for method in ties dare_ties; do
    for tool in mmx mergekit; do
        key=$method/$tool
        out=$OUTS/$method-$tool
        best=
        for ((r = 1; r <= REPEAT; r++)); do
            rm -rf "$out"
            sync
            warm_inputs
            log=$LOGS/$method-$tool-$r.log
            res=$LOGS/$method-$tool-$r.time
            set_cmd "$tool" "$method" "$out"
            if [[ $tool = mmx && ! -x $MMX ]]; then
                echo "mmx binary not found: $MMX" >"$log"; echo "0 0 0 0" >"$res"; rc=127
            else
                echo "== $key run $r/$REPEAT: ${cmd[*]}"
                rc=0; timed "$res" "$log" "${cmd[@]}" || rc=$?
            fi
            if [[ $rc -ne 0 ]]; then
                echo "!! $key failed (exit $rc); last lines of $log:"
                tail -n 15 "$log" | sed 's/^/   | /'
                STATUS[$key]="failed (exit $rc)"
                FAILED=1
                break
            fi
            read -r wall rss user sys <"$res"
            echo "   wall ${wall}s  peak RSS $((rss / 1024)) MiB  user ${user}s  sys ${sys}s"
            if [[ -z $best ]] || awk -v a="$wall" -v b="$best" 'BEGIN { exit !(a < b) }'; then
                best=$wall
                WALL[$key]=$wall
                CPU[$key]=$(awk -v u="$user" -v s="$sys" -v w="$wall" 'BEGIN { printf "%.0f", (w > 0 ? 100 * (u + s) / w : 0) }')
            fi
            # worst case over the repeats for memory
            if [[ -z ${RSS[$key]:-} || $rss -gt ${RSS[$key]} ]]; then RSS[$key]=$rss; fi
            STATUS[$key]=ok
        done
        if [[ ${STATUS[$key]:-} = ok && -z $OUT_BYTES ]]; then
            OUT_BYTES=$(st_bytes "$out")
        fi
    done

    # sanity check: for TIES (deterministic) the two outputs should agree up to bf16 rounding
    # (mergekit rounds every intermediate to bf16; mmx computes in f32 and rounds once).
    if [[ $method = ties && ${STATUS[ties/mmx]:-} = ok && ${STATUS[ties/mergekit]:-} = ok ]]; then
        echo "== comparing ties outputs (mmx vs mergekit)"
        CHECK=$("$PY" - "$OUTS/ties-mmx" "$OUTS/ties-mergekit" "$MODELS/base" <<'EOF' 2>&1
import glob, sys, torch
from safetensors import safe_open
def index(d):
    idx = {}
    for f in sorted(glob.glob(d + "/*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                idx[k] = f
    return idx
a, b, base = (index(d) for d in sys.argv[1:4])
missing = sorted(set(a) ^ set(b))
if missing:
    print(f"tensor names differ: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
worst, worst_name, n, n_diff, sum_rel = 0.0, "", 0, 0, 0.0
for k in sorted(set(a) & set(b)):
    with safe_open(a[k], "pt") as h: x = h.get_tensor(k).float()
    with safe_open(b[k], "pt") as h: y = h.get_tensor(k).float()
    with safe_open(base[k], "pt") as h: z = h.get_tensor(k).float()
    if x.shape != y.shape:
        print(f"{k}: shape {tuple(x.shape)} vs {tuple(y.shape)}"); continue
    d = (x - y).abs()
    # error relative to the size of the task-vector update (merged - base)
    rel = (d.norm() / ((y - z).norm() + 1e-12)).item()
    n += d.numel(); n_diff += int((d > 0).sum()); sum_rel += rel
    if rel > worst:
        worst, worst_name = rel, k
m = len(set(a) & set(b))
print(f"{m} tensors; {100 * n_diff / max(n, 1):.2f}% of elements differ; "
      f"||mmx - mergekit|| / ||mergekit - base||: mean {sum_rel / max(m, 1):.4f}, "
      f"max {worst:.4f} ({worst_name})")
EOF
) || CHECK="check failed: $CHECK"
        echo "   $CHECK"
    fi
    rm -rf "$OUTS/$method-mmx" "$OUTS/$method-mergekit"
done

# ---------------------------------------------------------------- (d) I/O floor
[[ -n $OUT_BYTES ]] || OUT_BYTES=$(st_bytes "$MODELS/base")
echo "== I/O floor: read $IN_BYTES input bytes (warm cache), write $OUT_BYTES bytes with fsync"
warm_inputs
t0=$(now); warm_inputs; t1=$(now)
READ_S=$(elapsed "$t0" "$t1")
sync
t0=$(now)
dd if=/dev/zero of="$WORKDIR/iofloor.bin" bs=4M count="$OUT_BYTES" iflag=count_bytes conv=fsync status=none
t1=$(now)
WRITE_S=$(elapsed "$t0" "$t1")
rm -f "$WORKDIR/iofloor.bin"
FLOOR_S=$(awk -v a="$READ_S" -v b="$WRITE_S" 'BEGIN { printf "%.3f", a + b }')
echo "   read ${READ_S}s + write ${WRITE_S}s = ${FLOOR_S}s"

# ---------------------------------------------------------------- (e) report
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
[[ -n $cpu_model ]] || cpu_model=$(uname -m)
mem_gib=$(awk '/MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
mk_version=$("$PY" -c 'import importlib.metadata as m; print(m.version("mergekit"))' 2>/dev/null || echo "?")
torch_version=$("$PY" -c 'import torch; print(torch.__version__, "threads", torch.get_num_threads())' 2>/dev/null || echo "?")
mmx_version=$("$MMX" --version 2>/dev/null | head -1 || true)
params=$(awk -v b="$OUT_BYTES" 'BEGIN { printf "%.0f", b / 2 / 1e6 }')

fmt_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else printf "–" }'; }
row() { printf '| %-9s | %-8s | %8s | %12s | %5s | %10s | %15s | %14s |\n' "$@"; }

{
    echo "### mmx vs mergekit $mk_version, CPU"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- machine: $(nproc) CPUs, $cpu_model, $mem_gib GiB RAM"
    echo "- mmx: ${mmx_version:-?} ($MMX); mergekit $mk_version, torch $torch_version"
    echo "- models: synthetic Qwen2-0.5B shapes, $LAYERS layers, vocab $VOCAB, bf16," \
        "base + 3 fine-tunes, ~${params}M params each; inputs $(awk -v b="$IN_BYTES" 'BEGIN { printf "%.2f", b / 1e9 }') GB," \
        "output $(awk -v b="$OUT_BYTES" 'BEGIN { printf "%.2f", b / 1e9 }') GB"
    echo "- configs: density 0.5, weights 1.0 / 0.7 / 0.5, \`dtype: bfloat16\`" \
        "(mergekit computes in bf16, mmx in f32)"
    echo "- commands: \`mmx merge CONFIG -o OUT --seed 0\`;" \
        "\`mergekit-yaml CONFIG OUT ${MK_FLAGS[*]}\`"
    echo "- warm page cache, outputs removed and \`sync\` before each run; timed with $TIMER;" \
        "best wall of $REPEAT run(s), worst peak RSS"
    echo "- I/O floor ${FLOOR_S} s = read all inputs ${READ_S} s (cat, warm cache)" \
        "+ write output size ${WRITE_S} s (dd conv=fsync)"
    [[ -n ${CHECK:-} ]] && echo "- ties output check: $CHECK"
    echo
    row method tool "wall s" "peak RSS MiB" "CPU%" "/ I/O floor" "time mk / mmx" "RSS mmx / mk"
    row "---" "---" "---:" "---:" "---:" "---:" "---:" "---:"
    for method in ties dare_ties; do
        for tool in mmx mergekit; do
            key=$method/$tool
            if [[ ${STATUS[$key]:-} != ok ]]; then
                row "$method" "$tool" "${STATUS[$key]:-not run}" "" "" "" "" ""
                continue
            fi
            speed= mem=
            if [[ $tool = mmx && ${STATUS[$method/mergekit]:-} = ok ]]; then
                speed=$(fmt_ratio "${WALL[$method/mergekit]}" "${WALL[$key]}")
                mem=$(fmt_ratio "${RSS[$key]}" "${RSS[$method/mergekit]}")
            fi
            row "$method" "$tool" "$(printf '%.2f' "${WALL[$key]}")" "$((RSS[$key] / 1024))" "${CPU[$key]}" \
                "$(fmt_ratio "${WALL[$key]}" "$FLOOR_S")" "$speed" "$mem"
        done
    done
} | tee "$WORKDIR/results.md"
echo
echo "(written to $WORKDIR/results.md; logs in $LOGS)"
exit $FAILED
