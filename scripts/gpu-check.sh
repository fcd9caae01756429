#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU (issue 20): the hardware, every kernel
# compiled, the CUDA tests (each kernel against the CPU), the merge and conflicts commands on
# both devices (TIES bytes equal, conflict reports equal), `mmx train dsa` of the tiny model on
# the GPU against the CPU run's loss curve, and the benchmarks: the fused TIES kernel against a
# device-to-device copy of the same bytes, TIES of the Qwen2-0.5B-shaped models on GPU and CPU,
# TIES of four 7B-shaped LoRAs, and training tokens/s. Every step has its own time limit and
# the whole run stops by 450 s; it ends with a table (also in $OUT/gpu-check.md with the logs).
#
# The GPU machines here have the CUDA toolkit but neither Rust nor a network, so everything is
# built here and travels as one compressed file:
#
#   scripts/gpu-check.sh --prepare   # here: build target/gpu-bundle.tar.zst (about 35 MB)
#   scripts/gpu-check.sh --dry-run   # here: the same run on the CPU; each GPU step must fail
#                                    # fast and say why, none may hang
#   scripts/gpu-check.sh             # there, with carry = ["target/gpu-bundle.tar.zst"]
#
# `--prepare` builds the default binaries (the merge kernels load NVRTC and the driver at run
# time) and `mmx` with `--features cuda` (candle's CUDA backend for training) against the CUDA
# 13 toolkit that scripts/cuda-toolkit.sh fetches from PyPI; that binary loads the cu13
# libcublas, libcurand and libnvrtc of PyTorch's wheels on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bundle=target/gpu-bundle
archive=target/gpu-bundle.tar.zst
mode=${1:-run}

prepare() {
    cargo build --release --bin mmx --examples
    local tests
    tests=$(cargo test --release --test cuda --no-run --message-format=json 2>/dev/null |
        grep -o '"executable":"[^"]*cuda-[^"]*"' | cut -d'"' -f4 | tail -1)
    rm -rf "$bundle" && mkdir -p "$bundle"
    cp target/release/mmx target/release/examples/gpu_bench \
        target/release/examples/lora_merge_bench "$bundle/"
    cp "$tests" "$bundle/cuda-tests"
    local cuda
    if cuda=$(scripts/cuda-toolkit.sh); then
        # Its own target directory: the feature changes candle, and so every crate above it.
        if PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda" CUDA_COMPUTE_CAP=90 \
            cargo build --release --features cuda --bin mmx --target-dir target/cuda; then
            cp target/cuda/release/mmx "$bundle/mmx-cuda"
        else
            echo "gpu-check --prepare: the --features cuda build failed: the run will train on the CPU only" >&2
        fi
    else
        echo "gpu-check --prepare: no CUDA toolkit (scripts/cuda-toolkit.sh failed): the run will train on the CPU only" >&2
    fi
    echo "$root" >"$bundle/built-in"
    strip "$bundle"/* 2>/dev/null || true
    tar -C target -cf - gpu-bundle | zstd -q -19 -T0 -f -o "$archive"
    local tree size
    tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    size=$(stat -c %s "$archive")
    echo "bundle: $archive, $((size >> 20)) MiB ($(ls "$bundle" | tr '\n' ' ')); with the tracked tree $(((tree + size) >> 20)) MiB of the 64 MiB a call carries"
    if ((tree + size > 64 << 20)); then
        echo "gpu-check --prepare: the tree and the bundle exceed 64 MiB: the device would refuse the call" >&2
        exit 1
    fi
}

if [[ $mode == --prepare ]]; then
    prepare
    exit 0
fi
if [[ $mode != run && $mode != --dry-run ]]; then
    echo "usage: scripts/gpu-check.sh [--prepare | --dry-run]" >&2
    exit 2
fi

start=$(date +%s)
deadline=$((start + 450))
out=${OUT:-$root/target/gpu-check-out}
work=${TMPDIR:-/tmp}/mmx-gpu-check
rm -rf "$work" && mkdir -p "$out" "$work"
report=$out/gpu-check.md
: >"$report"
row() { printf '| %s | %s |\n' "$1" "$2" | tee -a "$report"; }
# Runs a step under its own limit, never past the deadline; its output goes to $out/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - $(date +%s)))
    ((left < limit)) && limit=$left
    if ((limit <= 5)); then
        echo "skipped (out of time)" >"$out/$name.log"
        return 124
    fi
    echo "== $name (at most ${limit}s)" >&2
    timeout --kill-after=5 "$limit" "$@" >"$out/$name.log" 2>&1
}
verdict() { # status of the last step: ok, failed (rc), timed out
    case $1 in 0) echo ok ;; 124 | 137) echo "timed out" ;; *) echo "failed (exit $1)" ;; esac
}

# The bundle: unpacked from the archive that traveled (or built here, where cargo is).
if [[ ! -f $archive ]] && command -v cargo >/dev/null; then
    prepare >"$out/prepare.log" 2>&1 || { echo "--prepare failed, see $out/prepare.log"; exit 2; }
fi
[[ -f $archive ]] || { echo "no $archive: run scripts/gpu-check.sh --prepare first and carry it"; exit 2; }
rm -rf "$bundle" && mkdir -p target && zstd -q -d -c "$archive" | tar -C target -xf -
built_in=$(cat "$bundle/built-in")
if [[ $built_in != "$root" ]]; then
    # The tests find the binary and the fixtures at the paths they were built with.
    mkdir -p "$(dirname "$built_in")" && ln -sfn "$root" "$built_in" ||
        echo "cannot link $built_in to $root: the command tests will not find their files"
fi
mkdir -p target/release && cp "$bundle/mmx" target/release/mmx
mmx=$bundle/mmx
mmx_cuda=$bundle/mmx-cuda
[[ -x $mmx_cuda ]] || mmx_cuda=

# NVRTC, cuBLAS and cuRAND: the toolkit's, else the Python packages' (PyTorch's nvidia wheels).
libs=/usr/local/cuda/lib64
for dir in target/nvrtc-venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib $(python3 - <<'EOF' 2>/dev/null
import glob, site
for s in site.getsitepackages():
    for d in glob.glob(s + "/nvidia/*/lib") + glob.glob(s + "/nvidia/cu*/lib"):
        print(d)
EOF
); do
    [[ -d $dir ]] && libs="$libs:$dir"
done
# The default build's loader asks for libnvrtc.so, .so.12, .so.11... and PyTorch's cu13 wheels
# hold only libnvrtc.so.13 (issue 19): unversioned links to whichever is there come first.
shim=$work/libs
mkdir -p "$shim"
for name in nvrtc cublas cublasLt; do
    for dir in ${libs//:/ }; do
        found=$(ls "$dir/lib$name.so".1[23] 2>/dev/null | tail -1 || true)
        if [[ -n $found ]]; then
            ln -sfn "$found" "$shim/lib$name.so"
            break
        fi
    done
done
export LD_LIBRARY_PATH="$shim:$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "| check | result |" | tee -a "$report"
echo "| --- | --- |" | tee -a "$report"
gpu=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1 || true)
cuda_version=$(timeout 20 nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | cut -d' ' -f3 || true)
if [[ -z $gpu ]]; then
    if [[ $mode == run ]]; then
        row device "none: nvidia-smi sees no NVIDIA GPU (scripts/gpu-check.sh --dry-run rehearses on the CPU)"
        exit 2
    fi
    row device "none (dry run on $(nproc) CPUs: every GPU step below must fail fast)"
else
    row device "$gpu, CUDA $cuda_version"
fi
rc=0; step doctor 30 "$mmx" doctor || rc=$?
row "mmx doctor" "$(verdict $rc): $(grep -E '^(driver|nvrtc|device|kernels)' "$out/doctor.log" | tr -s ' ' | paste -sd ';' -)"

# The training runs take longest: they run beside the checks below, the CPU one on the cores.
train_recipe=recipes/train/dsa-cardiology.toml
(
    rc=0
    step train-cpu 300 "$mmx" train dsa "$train_recipe" -o "$work/train-cpu" --device cpu --quiet || rc=$?
    echo $rc >"$work/train-cpu.rc"
) &
train_cpu=$!
if [[ -n $mmx_cuda ]]; then
    (
        rc=0
        step train-gpu 300 "$mmx_cuda" train dsa "$train_recipe" -o "$work/train-gpu" --device cuda --quiet || rc=$?
        echo $rc >"$work/train-gpu.rc"
    ) &
    train_gpu=$!
fi

rc=0; step cuda-tests 180 env MMX_REQUIRE_NVRTC=1 MMX_GPU_LARGE=1 "$bundle/cuda-tests" --test-threads 1 || rc=$?
row "CUDA tests (tests/cuda.rs)" "$(verdict $rc): $(grep -o 'test result: [a-zA-Z]*\. [0-9]* passed; [0-9]* failed' "$out/cuda-tests.log" | tail -1); $(grep -c SKIPPED "$out/cuda-tests.log" || true) skipped lines"

# The merge command on both devices: TIES of the bundled adapters into full f32 models.
rc=0
step merge-gpu 60 "$mmx" merge recipes/ties.toml -o "$work/ties-gpu" --device cuda || rc=$?
if [[ $rc == 0 ]] && step merge-cpu 60 "$mmx" merge recipes/ties.toml -o "$work/ties-cpu" --device cpu; then
    same=yes
    for f in "$work"/ties-cpu/*.safetensors; do cmp -s "$f" "$work/ties-gpu/$(basename "$f")" || same=no; done
    row "TIES merge, GPU vs CPU" "bytes equal: $same ($(grep -o '[0-9]* on cuda:[0-9]*' "$out/merge-gpu.log" || echo '? on cuda') tensors)"
else
    row "TIES merge, GPU vs CPU" "$(verdict $rc): $(tail -1 "$out/merge-gpu.log")"
fi
rc=0
step conflicts-gpu 60 "$mmx" conflicts recipes/ties.toml --device cuda --json "$work/conflicts-gpu.json" || rc=$?
if [[ $rc == 0 ]] && step conflicts-cpu 60 "$mmx" conflicts recipes/ties.toml --device cpu --json "$work/conflicts-cpu.json"; then
    row "conflicts, GPU vs CPU" "$(python3 - "$work/conflicts-cpu.json" "$work/conflicts-gpu.json" <<'EOF'
import json, sys
cpu, gpu = (json.load(open(p)) for p in sys.argv[1:])
worst = [0.0]
def walk(a, b):
    if isinstance(a, dict):
        for k in a:
            if k not in ("device", "seconds"):
                walk(a[k], b.get(k) if isinstance(b, dict) else None)
    elif isinstance(a, list):
        for x, y in zip(a, b or []):
            walk(x, y)
    elif isinstance(a, float) and isinstance(b, (int, float)):
        worst[0] = max(worst[0], abs(a - b))
walk(cpu, gpu)
print(f"largest difference of any statistic {worst[0]:.3g}")
EOF
)"
else
    row "conflicts, GPU vs CPU" "$(verdict $rc): $(tail -1 "$out/conflicts-gpu.log")"
fi

rc=0; step gpu-bench 60 "$bundle/gpu_bench" || rc=$?
row "fused TIES kernel vs device copy" "$(verdict $rc): $(grep -E '^\| (f32|bf16)' "$out/gpu-bench.log" | awk -F'|' '{ printf "%s %s of copy;", $2, $6 }')$(grep -h 'nothing measured' "$out/gpu-bench.log" || true)"
rc=0; step lora-bench 90 "$bundle/lora_merge_bench" cuda 32 || rc=$?
row "TIES of 4 rank-64 LoRAs, 7B shape, GPU" "$(verdict $rc): $(tail -1 "$out/lora-bench.log")"

# TIES of three Qwen2-0.5B-shaped bf16 fine-tunes (synthetic) into their base, GPU then CPU.
models=$work/models
rc=0; step make-models 90 python3 scripts/make_bench_models.py --out "$models" || rc=$?
if [[ $rc == 0 ]]; then
    cat >"$work/qwen-ties.toml" <<EOF
[merge]
method = "ties"
base = "$models/base"
output = "full"
dtype = "bfloat16"
[merge.parameters]
density = 0.5
[[merge.experts]]
source = "$models/ft1"
[[merge.experts]]
source = "$models/ft2"
[[merge.experts]]
source = "$models/ft3"
EOF
    # Seconds a step took, or why it did not finish.
    timed() {
        local name=$1 limit=$2 t0 rc=0
        shift 2
        t0=$(date +%s.%N)
        step "$name" "$limit" "$@" || rc=$?
        if [[ $rc == 0 ]]; then
            awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f s", b - a }'
        else
            verdict $rc
        fi
    }
    gpu_time=$(timed qwen-gpu 60 "$mmx" merge "$work/qwen-ties.toml" -o "$work/qwen-gpu" --device cuda)
    cpu_time=$(timed qwen-cpu 90 "$mmx" merge "$work/qwen-ties.toml" -o "$work/qwen-cpu" --device cpu)
    row "TIES, Qwen2-0.5B shape, 3 bf16 models" "GPU $gpu_time, CPU ($(nproc) cores) $cpu_time"
    rm -rf "$models" "$work"/qwen-*
else
    row "TIES, Qwen2-0.5B shape" "$(verdict $rc): making the models: $(tail -1 "$out/make-models.log")"
fi

# The training runs: loss curves, and tokens/s.
wait "$train_cpu" || true
cpu_rc=$(cat "$work/train-cpu.rc" 2>/dev/null || echo 124)
row "train dsa, CPU" "$(verdict "$cpu_rc"): $(grep -o 'trained.*' "$out/train-cpu.log" || tail -1 "$out/train-cpu.log")"
if [[ -n $mmx_cuda ]]; then
    wait "$train_gpu" || true
    gpu_rc=$(cat "$work/train-gpu.rc" 2>/dev/null || echo 124)
    row "train dsa, GPU" "$(verdict "$gpu_rc"): $(grep -o 'trained.*' "$out/train-gpu.log" || tail -1 "$out/train-gpu.log")"
    if [[ $cpu_rc == 0 && $gpu_rc == 0 ]]; then
        row "loss curve, GPU vs CPU" "$(python3 - "$work/train-cpu/metrics.jsonl" "$work/train-gpu/metrics.jsonl" <<'EOF'
import json, sys
cpu, gpu = ([json.loads(l)["loss"] for l in open(p)] for p in sys.argv[1:])
n = min(len(cpu), len(gpu))
worst = max(abs(a - b) / max(abs(a), 1e-9) for a, b in zip(cpu, gpu))
first = next((i + 1 for i, (a, b) in enumerate(zip(cpu, gpu)) if abs(a - b) > 0.02 * abs(a)), None)
print(f"{n} steps; largest relative difference {worst:.2e}; "
      + ("every step within 2%" if first is None else f"first step off by more than 2%: {first}"))
EOF
)"
        cp "$work/train-cpu/metrics.jsonl" "$out/metrics-cpu.jsonl"
        cp "$work/train-gpu/metrics.jsonl" "$out/metrics-gpu.jsonl"
    fi
else
    row "train dsa, GPU" "not run: the bundle has no mmx-cuda (see --prepare's output)"
fi
row wall "$(($(date +%s) - start)) s"
