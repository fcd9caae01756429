// Shared by every kernel file: src/backend/cuda.rs prepends it to each before NVRTC compiles
// it, so that the embedded sources need no include path.

typedef unsigned long long u64;
// bf16 as its bits; converted by hand so that no CUDA header is needed.
typedef unsigned short bf16;

#define MAX_EXPERTS 16

__device__ __forceinline__ float load(float x) { return x; }
__device__ __forceinline__ float load(bf16 x) { return __uint_as_float(((unsigned)x) << 16); }

__device__ __forceinline__ void store(float* p, float x) { *p = x; }
// Round to nearest even, NaN kept quiet: what `half::bf16::from_f32` does.
__device__ __forceinline__ void store(bf16* p, float x) {
    unsigned bits = __float_as_uint(x);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
        *p = (bf16)((bits >> 16) | 0x40u);
        return;
    }
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    *p = (bf16)(bits >> 16);
}

// The bits of |x|: an f32 with its sign cleared orders like an unsigned integer.
__device__ __forceinline__ unsigned magnitude_bits(float x) {
    return __float_as_uint(x) & 0x7FFFFFFFu;
}

// Expert t's update at j from f32 deltas laid out expert after expert.
struct F32Deltas {
    const float* deltas;
    u64 n;
    __device__ __forceinline__ float operator()(int t, u64 j) const {
        return deltas[(u64)t * n + j];
    }
};

// Expert t's update at j from bf16 tensors and their base: x - base in f32, as the CPU.
struct Bf16Updates {
    const bf16* tensors;
    const bf16* base;
    u64 n;
    __device__ __forceinline__ float operator()(int t, u64 j) const {
        return load(tensors[(u64)t * n + j]) - load(base[j]);
    }
};

// Adds every thread's `value` into *target with one atomic per block. Every thread of the
// block must call it (it synchronises); blockDim.x is a multiple of 32.
template <typename T>
__device__ void block_add(T* target, T value) {
    __shared__ T partial[32];
    unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    for (int offset = 16; offset > 0; offset >>= 1) {
        value += __shfl_down_sync(0xFFFFFFFFu, value, offset);
    }
    if (lane == 0) partial[warp] = value;
    __syncthreads();
    if (warp == 0) {
        unsigned warps = (blockDim.x + 31u) >> 5;
        value = lane < warps ? partial[lane] : (T)0;
        for (int offset = 16; offset > 0; offset >>= 1) {
            value += __shfl_down_sync(0xFFFFFFFFu, value, offset);
        }
        if (lane == 0 && value != (T)0) atomicAdd(target, value);
    }
    __syncthreads();
}
