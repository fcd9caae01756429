#!/usr/bin/env bash
# Benchmark mmx against mergekit on CPU: wall time and peak RSS for a TIES, a DARE-TIES and a
# DELLA merge of a synthetic Qwen2-0.5B-shaped base model and three fine-tunes, plus the I/O
# floor (reading every input byte + writing the output's bytes with fsync), and mmx's CACI
# (with and without `restore`; mergekit has no CACI) against mmx's own TIES.
#
# usage: scripts/bench-vs-mergekit.sh [WORKDIR] [--layers N] [--vocab N] [--repeat N]
#                                     [--no-check] [--check-f32]
#
#   WORKDIR      scratch directory (default /tmp/mmx-bench); models live in WORKDIR/models and
#                are generated once (reused while their layers/vocab match)
#   --layers N   decoder layers of the synthetic models (default 24, as Qwen2-0.5B)
#   --vocab N    vocabulary size (default 151936, as Qwen2-0.5B)
#   --repeat N   timed runs per (method, tool); the table shows the fastest (default 1)
#   --mergekit-repeat N  timed runs of mergekit (default: as --repeat)
#   --methods L  comma-separated subset of ties,dare_ties,della,caci,caci_restore (default all)
#   --no-check   skip the comparison of the mmx and mergekit TIES outputs
#   --check-f32  also compare mmx's TIES output with an extra, untimed mergekit run that
#                computes in float32 (mmx should match it except at magnitude ties)
#
# environment:
#   MMX_BIN           mmx binary (default target/release/mmx under the repository root)
#   MMX_BENCH_PYTHON  python with numpy (default /tmp/ref/bin/python)
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
CHECK=1
CHECK_F32=0
METHODS=ties,dare_ties,della,caci,caci_restore
while [[ $# -gt 0 ]]; do
    case $1 in
        --layers) LAYERS=${2:?--layers needs a value}; shift 2 ;;
        --layers=*) LAYERS=${1#*=}; shift ;;
        --vocab) VOCAB=${2:?--vocab needs a value}; shift 2 ;;
        --vocab=*) VOCAB=${1#*=}; shift ;;
        --repeat) REPEAT=${2:?--repeat needs a value}; shift 2 ;;
        --repeat=*) REPEAT=${1#*=}; shift ;;
        --mergekit-repeat) MK_REPEAT=${2:?--mergekit-repeat needs a value}; shift 2 ;;
        --methods) METHODS=${2:?--methods needs a value}; shift 2 ;;
        --methods=*) METHODS=${1#*=}; shift ;;
        --no-check) CHECK=0; shift ;;
        --check-f32) CHECK_F32=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option: $1" >&2; exit 2 ;;
        *) WORKDIR=$1; shift ;;
    esac
done
MK_REPEAT=${MK_REPEAT:-$REPEAT}
for v in LAYERS VOCAB REPEAT MK_REPEAT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "--${v,,} must be a positive integer" >&2; exit 2; }
done
IFS=, read -r -a METHOD_LIST <<<"$METHODS"
for m in "${METHOD_LIST[@]}"; do
    case $m in ties | dare_ties | della | caci | caci_restore) ;;
        *) echo "unknown method in --methods: $m" >&2; exit 2 ;;
    esac
done
# the tools that run a method: mergekit has no CACI
tools_for() { case $1 in caci*) echo mmx ;; *) echo mmx mergekit ;; esac; }

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
# `dtype: bfloat16`, as most published mergekit configs have. Note that mergekit then does the
# merge arithmetic in bf16, while mmx always computes in f32 (and stores bf16), so the two do
# not run the same arithmetic: mmx's is the more precise (see the output check below).
for method in ties dare_ties della; do
    # DELLA's epsilon: keep probabilities spread over density ± 0.1 by magnitude rank.
    extra=
    [[ $method = della ]] && extra=$'\n      epsilon: 0.1'
    cat >"$CONFIGS/$method.yml" <<EOF
merge_method: $method
base_model: $MODELS/base
models:
  - model: $MODELS/ft1
    parameters:
      density: 0.5
      weight: 1.0${extra}
  - model: $MODELS/ft2
    parameters:
      density: 0.5
      weight: 0.7${extra}
  - model: $MODELS/ft3
    parameters:
      density: 0.5
      weight: 0.5${extra}
dtype: bfloat16 # mergekit computes in bf16 with this; mmx always computes in f32
EOF
done
# CACI in mmx's own recipe format: the experts, weights and density of TIES above.
for method in caci caci_restore; do
    restore=
    [[ $method = caci_restore ]] && restore='restore = 0.85'
    cat >"$CONFIGS/$method.toml" <<EOF
[merge]
method = "caci"
base = "$MODELS/base"
dtype = "bfloat16"

[merge.parameters]
density = 0.5
$restore

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
done

# Compares two merged outputs tensor by tensor (numpy only; reads safetensors itself).
cat >"$WORKDIR/compare_outputs.py" <<'EOF'
# usage: compare_outputs.py MMX_OUT MERGEKIT_OUT BASE DENSITY FT...
import glob, json, sys
import numpy as np

def index(d):
    """tensor name -> (file, dtype, shape, start, end) for every *.safetensors in d."""
    idx = {}
    for f in sorted(glob.glob(d + "/*.safetensors")):
        with open(f, "rb") as h:
            n = int.from_bytes(h.read(8), "little")
            header = json.loads(h.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                idx[k] = (f, v["dtype"], v["shape"], 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
    return idx

NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}

def get(idx, k):
    """The tensor as flat float32."""
    f, dt, shape, s, e = idx[k]
    raw = np.fromfile(f, dtype=NP[dt], count=(e - s) // np.dtype(NP[dt]).itemsize, offset=s)
    if dt == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)

def bf16_round(x):
    u = x.view(np.uint32)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.view(np.float32)

def ambiguous(delta, density):
    """Elements whose keep/drop under magnitude top-k depends on how ties are broken."""
    w = np.abs(delta)
    k = max(1, int(density * w.size))
    if k >= w.size:
        return np.zeros(w.size, bool)
    thr = np.partition(w, w.size - k)[w.size - k]  # k-th largest
    at = w == thr
    if np.count_nonzero(w > thr) + np.count_nonzero(at) <= k:
        return np.zeros(w.size, bool)
    return at

mmx_dir, mk_dir, base_dir, density = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
a, b, base = index(mmx_dir), index(mk_dir), index(base_dir)
fts = [index(d) for d in sys.argv[5:]]
odd = sorted(set(a) ^ set(b))
msg = []
if odd:
    msg.append(f"tensor names differ: {odd[:3]}{' ...' if len(odd) > 3 else ''}")
n = n_diff = n_tie = 0
worst, worst_name = 0.0, ""
common = sorted(set(a) & set(b))
for k in common:
    if a[k][2] != b[k][2]:
        msg.append(f"{k}: shape {a[k][2]} vs {b[k][2]}")
        continue
    x, y = get(a, k), get(b, k)
    diff = x != y
    n += diff.size
    nd = np.count_nonzero(diff)
    if nd == 0:
        continue
    z = get(base, k)
    tie = np.zeros(diff.size, bool)
    for ft in fts:
        d = get(ft, k) - z  # exact in f32 (mmx's view); mergekit with dtype bf16 rounds it
        tie |= ambiguous(d, density)
        tie |= ambiguous(bf16_round(d), density)
    n_diff += nd
    n_tie += np.count_nonzero(diff & tie)
    rest = diff & ~tie
    if rest.any():
        upd = y - z
        rms = float(np.sqrt(np.mean(upd.astype(np.float64) ** 2))) or 1.0
        rel = float(np.max(np.abs(x[rest] - y[rest]))) / rms
        if rel > worst:
            worst, worst_name = rel, k
msg.append(f"{len(common)} tensors, {100 * n_diff / max(n, 1):.2f}% of elements differ")
if n_diff:
    msg.append(f"{100 * n_tie / n_diff:.1f}% of those sit on a magnitude tie at the density cut-off "
               f"(mergekit's argsort breaks ties arbitrarily)")
    if n_diff > n_tie:
        msg.append(f"the other {100 * (n_diff - n_tie) / n:.2f}% differ by at most "
                   f"{worst:.2f}x the RMS of the merged update (in {worst_name})")
print("; ".join(msg))
EOF

# ---------------------------------------------------------------- timing helpers
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

warm_inputs() { cat "${INPUTS[@]}" >/dev/null; }

# timer_run RESULT_FILE LOG_FILE CMD...: writes "wall_s maxrss_kib user_s sys_s" to RESULT_FILE
# and returns the command's exit status.
if [[ -x /usr/bin/time ]]; then
    TIMER="/usr/bin/time"
    timer_run() {
        local res=$1 log=$2; shift 2
        local rc=0
        /usr/bin/time -f '%e %M %U %S' -o "$res.raw" "$@" >"$log" 2>&1 || rc=$?
        tail -n 1 "$res.raw" >"$res"; rm -f "$res.raw"
        return $rc
    }
else
    TIMER="python resource.getrusage(RUSAGE_CHILDREN)"
    timer_run() {
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

# peak_anon PID: while PID lives, samples every 0.1 s the RssAnon (heap, not page cache or
# mapped files) summed over the leaf processes below PID, i.e. the merge tool itself, not the
# timer; prints the peak in KiB. Peak RSS from the timer also counts the resident pages of
# memory-mapped input files, which both tools use; this is the memory they allocate.
peak_anon() {
    local root=$1 peak=0 total p t k v kids leaf
    local -a stack
    while kill -0 "$root" 2>/dev/null; do
        total=0
        stack=("$root")
        while ((${#stack[@]})); do
            p=${stack[-1]}
            unset 'stack[-1]'
            leaf=1
            for t in /proc/"$p"/task/*/children; do
                kids=()
                read -r -a kids 2>/dev/null <"$t" || true  # no trailing newline: read "fails" at EOF
                if ((${#kids[@]})); then leaf=0; stack+=("${kids[@]}"); fi
            done
            if ((leaf)) && [[ $p != "$root" ]]; then
                while read -r k v _; do
                    if [[ $k = RssAnon: ]]; then total=$((total + v)); break; fi
                done 2>/dev/null <"/proc/$p/status" || true
            fi
        done
        if ((total > peak)); then peak=$total; fi
        sleep 0.1
    done
    echo "$peak"
}

# timed RESULT_FILE LOG_FILE CMD...: writes "wall_s maxrss_kib user_s sys_s peak_anon_kib"
timed() {
    local res=$1 rc=0 run sampler
    timer_run "$@" &
    run=$!
    peak_anon "$run" >"$res.anon" &
    sampler=$!
    wait "$run" || rc=$?
    wait "$sampler" || true
    printf '%s %s\n' "$(cat "$res" 2>/dev/null || echo 0 0 0 0)" "$(cat "$res.anon" 2>/dev/null || echo 0)" >"$res.all"
    mv "$res.all" "$res"
    rm -f "$res.anon"
    return $rc
}

# ---------------------------------------------------------------- (c) merges
MK_FLAGS=(--random-seed 0 --no-cuda --device cpu --no-copy-tokenizer --no-write-model-card)
set_cmd() { # tool method out -> cmd array
    case $1 in
        mmx)
            local config=$CONFIGS/$2.yml
            [[ -f $config ]] || config=$CONFIGS/$2.toml
            cmd=("$MMX" merge "$config" -o "$3" --seed 0)
            ;;
        mergekit) cmd=("$MERGEKIT" "$CONFIGS/$2.yml" "$3" "${MK_FLAGS[@]}") ;;
    esac
}
st_bytes() { find "$@" -name '*.safetensors' -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f", s }'; }

declare -A WALL RSS ANON CPU STATUS
OUT_BYTES=
FAILED=0
for method in "${METHOD_LIST[@]}"; do
    for tool in $(tools_for "$method"); do
        key=$method/$tool
        out=$OUTS/$method-$tool
        best=
        reps=$REPEAT
        [[ $tool = mergekit ]] && reps=$MK_REPEAT
        for ((r = 1; r <= reps; r++)); do
            rm -rf "$out"
            sync
            warm_inputs
            log=$LOGS/$method-$tool-$r.log
            res=$LOGS/$method-$tool-$r.time
            set_cmd "$tool" "$method" "$out"
            if [[ $tool = mmx && ! -x $MMX ]]; then
                echo "mmx binary not found: $MMX" >"$log"; echo "0 0 0 0 0" >"$res"; rc=127
            else
                echo "== $key run $r/$reps: ${cmd[*]}"
                rc=0; timed "$res" "$log" "${cmd[@]}" || rc=$?
            fi
            if [[ $rc -ne 0 ]]; then
                echo "!! $key failed (exit $rc); last lines of $log:"
                tail -n 15 "$log" | sed 's/^/   | /'
                STATUS[$key]="failed (exit $rc)"
                FAILED=1
                break
            fi
            read -r wall rss user sys anon <"$res"
            echo "   wall ${wall}s  peak RSS $((rss / 1024)) MiB  peak anon $((anon / 1024)) MiB  user ${user}s  sys ${sys}s"
            if [[ -z $best ]] || awk -v a="$wall" -v b="$best" 'BEGIN { exit !(a < b) }'; then
                best=$wall
                WALL[$key]=$wall
                CPU[$key]=$(awk -v u="$user" -v s="$sys" -v w="$wall" 'BEGIN { printf "%.0f", (w > 0 ? 100 * (u + s) / w : 0) }')
            fi
            # worst case over the repeats for memory
            if [[ -z ${RSS[$key]:-} || $rss -gt ${RSS[$key]} ]]; then RSS[$key]=$rss; fi
            if [[ -z ${ANON[$key]:-} || $anon -gt ${ANON[$key]} ]]; then ANON[$key]=$anon; fi
            STATUS[$key]=ok
        done
        if [[ ${STATUS[$key]:-} = ok && -z $OUT_BYTES ]]; then
            OUT_BYTES=$(st_bytes "$out")
        fi
    done

    # Output check for TIES (deterministic): mmx and mergekit should pick the same elements
    # except where magnitudes tie at the density cut-off. Against the timed run (dtype bfloat16)
    # mergekit's bf16 arithmetic adds its own rounding; --check-f32 also compares against an
    # untimed mergekit run computing in float32, which mmx should match except for those ties.
    if [[ $method = ties && $CHECK = 1 && ${STATUS[ties/mmx]:-} = ok && ${STATUS[ties/mergekit]:-} = ok ]]; then
        echo "== comparing ties outputs: mmx vs mergekit (dtype bfloat16, the timed run)"
        CHECK_BF16=$("$PY" "$WORKDIR/compare_outputs.py" "$OUTS/ties-mmx" "$OUTS/ties-mergekit" \
            "$MODELS/base" 0.5 "$MODELS/ft1" "$MODELS/ft2" "$MODELS/ft3" 2>&1) ||
            CHECK_BF16="comparison failed: $CHECK_BF16"
        echo "   $CHECK_BF16"
        if [[ $CHECK_F32 = 1 ]]; then
            echo "== comparing ties outputs: mmx vs mergekit (dtype float32, out_dtype bfloat16; untimed)"
            sed 's/^dtype: bfloat16.*/dtype: float32\nout_dtype: bfloat16/' "$CONFIGS/ties.yml" >"$CONFIGS/ties-f32.yml"
            rm -rf "$OUTS/ties-mergekit-f32"
            if "$MERGEKIT" "$CONFIGS/ties-f32.yml" "$OUTS/ties-mergekit-f32" "${MK_FLAGS[@]}" \
                >"$LOGS/ties-mergekit-f32.log" 2>&1; then
                CHECK_F32_MSG=$("$PY" "$WORKDIR/compare_outputs.py" "$OUTS/ties-mmx" "$OUTS/ties-mergekit-f32" \
                    "$MODELS/base" 0.5 "$MODELS/ft1" "$MODELS/ft2" "$MODELS/ft3" 2>&1) ||
                    CHECK_F32_MSG="comparison failed: $CHECK_F32_MSG"
            else
                CHECK_F32_MSG="mergekit float32 run failed, see $LOGS/ties-mergekit-f32.log"
            fi
            echo "   $CHECK_F32_MSG"
            rm -rf "$OUTS/ties-mergekit-f32"
        fi
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

# mergekit's fixed cost (python + torch + transformers imports), for reading small-scale numbers
timed "$LOGS/mergekit-startup.time" "$LOGS/mergekit-startup.log" "$MERGEKIT" --help ||
    echo "0 0 0 0 0" >"$LOGS/mergekit-startup.time"
read -r mk_start_s mk_start_rss _ <"$LOGS/mergekit-startup.time"

# ---------------------------------------------------------------- (e) report
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
[[ -n $cpu_model ]] || cpu_model=$(uname -m)
mem_gib=$(awk '/MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
mk_version=$("$PY" -c 'import importlib.metadata as m; print(m.version("mergekit"))' 2>/dev/null || echo "?")
torch_version=$("$PY" -c 'import torch; print(torch.__version__, "threads", torch.get_num_threads())' 2>/dev/null || echo "?")
mmx_version=$("$MMX" --version 2>/dev/null | head -1 || true)
params=$(awk -v b="$OUT_BYTES" 'BEGIN { printf "%.0f", b / 2 / 1e6 }')

fmt_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else printf "–" }'; }
row() { printf '| %-9s | %-8s | %8s | %12s | %13s | %5s | %11s | %13s | %12s |\n' "$@"; }

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
        "(mergekit computes in bf16, mmx in f32); della: epsilon 0.1; caci: mmx's defaults" \
        "(confidence rms, attenuation 1), caci_restore adds restore = 0.85"
    echo "- commands: \`mmx merge CONFIG -o OUT --seed 0\`;" \
        "\`mergekit-yaml CONFIG OUT ${MK_FLAGS[*]}\`"
    echo "- warm page cache, outputs removed and \`sync\` before each run; timed with $TIMER;" \
        "best wall of $REPEAT run(s) of mmx and $MK_REPEAT of mergekit, worst peak RSS"
    echo "- I/O floor ${FLOOR_S} s = read all inputs ${READ_S} s (cat, warm cache)" \
        "+ write output size ${WRITE_S} s (dd conv=fsync)"
    echo "- mergekit start-up alone (\`mergekit-yaml --help\`): ${mk_start_s} s, $((mk_start_rss / 1024)) MiB peak RSS"
    echo "- mmx fsyncs its output files, mergekit does not (its output may still be dirty in the page" \
        "cache when it exits)"
    echo "- peak RSS (from the timer) counts resident pages of the memory-mapped inputs, which both" \
        "tools use; peak anon is the largest RssAnon (allocated memory) sampled every 0.1 s"
    if [[ -n ${CHECK_BF16:-} ]]; then echo "- ties output, mmx vs mergekit (bf16 compute): $CHECK_BF16"; fi
    if [[ -n ${CHECK_F32_MSG:-} ]]; then echo "- ties output, mmx vs mergekit (f32 compute, untimed): $CHECK_F32_MSG"; fi
    echo
    row method tool "wall s" "peak RSS MiB" "peak anon MiB" "CPU%" "/ I/O floor" "time mk / mmx" "RSS mmx / mk"
    row "---" "---" "---:" "---:" "---:" "---:" "---:" "---:" "---:"
    for method in "${METHOD_LIST[@]}"; do
        for tool in $(tools_for "$method"); do
            key=$method/$tool
            if [[ ${STATUS[$key]:-} != ok ]]; then
                row "$method" "$tool" "${STATUS[$key]:-not run}" "" "" "" "" "" ""
                continue
            fi
            speed= mem=
            if [[ $tool = mmx && ${STATUS[$method/mergekit]:-} = ok ]]; then
                speed=$(fmt_ratio "${WALL[$method/mergekit]}" "${WALL[$key]}")
                mem=$(fmt_ratio "${RSS[$key]}" "${RSS[$method/mergekit]}")
            elif [[ $method = caci* && ${STATUS[ties/mmx]:-} = ok ]]; then
                speed="$(fmt_ratio "${WALL[$key]}" "${WALL[ties/mmx]}") of mmx ties"
            fi
            row "$method" "$tool" "$(printf '%.2f' "${WALL[$key]}")" "$((RSS[$key] / 1024))" "$((ANON[$key] / 1024))" "${CPU[$key]}" \
                "$(fmt_ratio "${WALL[$key]}" "$FLOOR_S")" "$speed" "$mem"
        done
    done
} | tee "$WORKDIR/results.md"
echo
echo "(written to $WORKDIR/results.md; logs in $LOGS)"
exit $FAILED
