// DARE/DELLA random masks on the GPU, bit-identical to the CPU's (src/merge/rng.rs): element i
// of expert e on a tensor is kept when uniform(i) < p, with
//   bits(i)    = mix64(key + (i + 1) * 0x9E3779B97F4A7C15)      (wrapping 64-bit arithmetic)
//   uniform(i) = (bits(i) >> 40) * 2^-24                          (exact in f32)
// and key = MaskRng::new(seed, tensor, expert).key(), derived on the host.


__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float mask_uniform(u64 key, u64 index) {
    u64 bits = mix64(key + (index + 1ULL) * 0x9E3779B97F4A7C15ULL);
    return (float)(bits >> 40) * (1.0f / 16777216.0f);
}

// keep[i] = 1 when element first + i survives a drop with keep probability `density`.
extern "C" __global__ void dare_mask(unsigned char* keep, u64 key, u64 first, float density, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        keep[i] = mask_uniform(key, first + i) < density ? 1 : 0;
    }
}

// Zeroes the dropped entries of `delta` in place and counts the kept ones into `kept`.
extern "C" __global__ void dare_apply(float* delta, u64 key, u64 first, float density, u64 n,
                                      u64* kept) {
    u64 count = 0;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        bool survive = mask_uniform(key, first + i) < density;
        count += survive ? 1 : 0;
        if (!survive) delta[i] = 0.0f;
    }
    atomicAdd(kept, count);
}

// DELLA's keep probability per element: `probability[i]` (ranked on the host) instead of one
// density.
extern "C" __global__ void della_mask(unsigned char* keep, u64 key, u64 first,
                                      const float* probability, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        keep[i] = mask_uniform(key, first + i) < probability[i] ? 1 : 0;
    }
}
