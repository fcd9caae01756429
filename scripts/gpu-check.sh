#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU: report the hardware, compile every kernel,
# run the CUDA tests (every kernel against the CPU, the merge and conflicts commands on both),
# the kernel and end-to-end benchmarks, and print a short table. Finishes within 8 minutes.
#
# The GPU machines here have the CUDA toolkit but neither Rust nor a network, so the binaries
# are built beforehand on a machine that has them and travel with the tree:
#
#   scripts/gpu-check.sh --prepare     # here: build the binaries into target/gpu-bundle
#   scripts/gpu-check.sh               # there (with target/gpu-bundle carried along)
#
# With cargo at hand the run builds what it needs itself. The test binary looks for the `mmx`
# binary and the repository where they were built (compiled-in paths): the run links them there.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bundle=target/gpu-bundle

if [[ "${1:-}" == "--prepare" ]]; then
    cargo build --release --bin mmx --examples
    test_binary=$(cargo test --release --test cuda --no-run --message-format=json 2>/dev/null |
        grep -o '"executable":"[^"]*cuda-[^"]*"' | cut -d'"' -f4 | tail -1)
    rm -rf "$bundle" && mkdir -p "$bundle"
    cp target/release/mmx target/release/examples/gpu_bench \
        target/release/examples/lora_merge_bench "$bundle/"
    cp "$test_binary" "$bundle/cuda-tests"
    echo "$root" > "$bundle/built-in"
    strip "$bundle"/* 2>/dev/null || true
    du -sh "$bundle"
    exit 0
fi

start=$(date +%s)
if command -v cargo >/dev/null; then
    scripts/gpu-check.sh --prepare >/dev/null
fi
[[ -x "$bundle/mmx" ]] || { echo "no $bundle: run scripts/gpu-check.sh --prepare first"; exit 2; }
built_in=$(cat "$bundle/built-in")
if [[ "$built_in" != "$root" ]]; then
    # The tests find the binary and the recipes at the paths they were built with.
    mkdir -p "$(dirname "$built_in")" && ln -sfn "$root" "$built_in" ||
        echo "cannot link $built_in to $root: the command tests will not find their files"
fi
mkdir -p target/release && cp "$bundle/mmx" target/release/mmx

# NVRTC and cuBLAS: the toolkit's, else the Python packages' (PyTorch's nvidia-* wheels).
libs=/usr/local/cuda/lib64
for dir in /usr/local/cuda/lib64 target/nvrtc-venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib $(python3 - <<'EOF' 2>/dev/null
import glob, site
for s in site.getsitepackages():
    for d in glob.glob(s + "/nvidia/*/lib"):
        print(d)
EOF
); do
    [[ -d "$dir" ]] && libs="$libs:$dir"
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$bundle/mmx" doctor
# A failing test is reported in the table; the benchmarks run anyway.
(MMX_REQUIRE_NVRTC=1 MMX_GPU_LARGE=1 "$bundle/cuda-tests" --nocapture --test-threads 1 2>&1 || true) |
    grep -E "^test |SKIPPED|result|panicked|assert" | tee /tmp/gpu-tests.txt || true
"$bundle/gpu_bench"
"$bundle/lora_merge_bench" cuda 32
echo "| check | result |"
echo "| --- | --- |"
echo "| kernels compile | $("$bundle/mmx" doctor --json | grep -o '"kernels_compile": [a-z]*' | cut -d' ' -f2) |"
echo "| devices | $("$bundle/mmx" doctor --json | grep -c '"ordinal"') |"
echo "| tests | $(grep -o 'test result: [a-z]*\. [0-9]* passed; [0-9]* failed' /tmp/gpu-tests.txt) |"
echo "| wall | $(($(date +%s) - start)) s |"
