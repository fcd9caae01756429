#!/usr/bin/env bash
# A CUDA 13.0 toolkit from PyPI, for building `--features cuda` (candle's CUDA backend for the
# trainers) on a machine with no GPU and no NVIDIA package repository: nvcc, its headers and
# the libraries to link (cuBLAS, cuRAND, NVRTC, the runtime), unpacked from NVIDIA's wheels,
# plus a stub libcuda.so (the driver is only on the GPU machine; the stub names its
# functions, as the toolkit's own lib/stubs does, so that the linker records libcuda.so.1).
#
#   scripts/cuda-toolkit.sh [DIR]      # default target/cuda-toolkit; prints the CUDA_ROOT
#
# CUDA 13, not 12: the GPU machines here run driver 580 with PyTorch's cu13 wheels, whose
# libcublas.so.13, libcurand.so.10 and libnvrtc.so.13 the binary then loads.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$ROOT/target/cuda-toolkit}
CUDA=$DIR/nvidia/cu13
if [ -x "$CUDA/bin/nvcc" ] && [ -f "$CUDA/lib/stubs/libcuda.so" ]; then
    echo "$CUDA"
    exit 0
fi
mkdir -p "$DIR/wheels"
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$DIR/wheels" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-curand==10.4.*" >&2
for wheel in "$DIR"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$DIR" >&2
done
chmod +x "$CUDA"/bin/* "$CUDA"/nvvm/bin/*
# The linker looks for the unversioned names.
for lib in "$CUDA"/lib/lib*.so.*; do
    name=$(basename "$lib")
    ln -sfn "$name" "$CUDA/lib/${name%%.so.*}.so"
done
# The driver's functions, as cudarc's bindings name them.
bindings=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19*/src/driver/sys/mod.rs 2>/dev/null | tail -1)
if [ -z "$bindings" ]; then
    (cd "$ROOT" && cargo fetch >&2)
    bindings=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19*/src/driver/sys/mod.rs | tail -1)
fi
mkdir -p "$CUDA/lib/stubs"
grep -oE "pub (unsafe )?fn cu[A-Z][A-Za-z0-9_]*" "$bindings" | awk '{ print $NF }' | sort -u |
    awk '{ print "void " $1 "(void) {}" }' >"$CUDA/lib/stubs/libcuda.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA/lib/stubs/libcuda.so" "$CUDA/lib/stubs/libcuda.c"
"$CUDA/bin/nvcc" --version >&2
echo "$CUDA"
