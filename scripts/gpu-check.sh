#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU: build, report the hardware, compile every
# kernel, run the CUDA tests, print a short table. Meant to finish well within 8 minutes.
#
# usage: scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
cargo build --release --examples 2>&1 | tail -1
venv=target/nvrtc-venv
if ! ls "$venv"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 >/dev/null 2>&1 \
    && ! ldconfig -p | grep -q libnvrtc.so; then
    python3 -m venv "$venv" && "$venv/bin/pip" install --quiet "nvidia-cuda-nvrtc-cu12==12.9.*"
fi
if ls -d "$venv"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib >/dev/null 2>&1; then
    nvrtc_lib=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib | head -1)
    export LD_LIBRARY_PATH="$PWD/$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
./target/release/mmx doctor
MMX_REQUIRE_NVRTC=1 MMX_GPU_LARGE=1 cargo test --release --test cuda -- --nocapture 2>&1 | grep -E "^test |SKIPPED|result"
cargo run --release --example gpu_bench 2>/dev/null
echo "| check | result |"
echo "| --- | --- |"
echo "| kernels compile | $(./target/release/mmx doctor --json | grep -o '"kernels_compile": [a-z]*' | cut -d' ' -f2) |"
echo "| devices | $(./target/release/mmx doctor --json | grep -c '"ordinal"') |"
echo "| wall | $(( $(date +%s) - start )) s |"
