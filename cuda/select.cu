// Top-k magnitude thresholds by radix select, as the CPU finds them (src/merge/sparsify.rs):
// magnitudes are compared as the bits of |x| (an f32 with the sign bit cleared orders like an
// unsigned integer). Four passes of one byte each, from the top: the host reads the 256-bin
// histogram of the elements that match the prefix found so far and picks the bin holding the
// k-th largest, so the threshold is exact. Ties at the threshold keep the lowest indices: the
// host places the cut with the per-block counts of `count_equal`.

typedef unsigned long long u64;

__device__ __forceinline__ unsigned magnitude_bits(float x) {
    return __float_as_uint(x) & 0x7FFFFFFFu;
}

// hist[b] += number of i with (bits(i) & prefix_mask) == prefix and byte `shift` of bits(i) == b.
extern "C" __global__ void magnitude_histogram(const float* x, u64 n, unsigned prefix,
                                               unsigned prefix_mask, int shift,
                                               unsigned long long* hist) {
    __shared__ unsigned local[256];
    for (int b = threadIdx.x; b < 256; b += blockDim.x) local[b] = 0;
    __syncthreads();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        unsigned bits = magnitude_bits(x[i]);
        if ((bits & prefix_mask) == prefix) {
            atomicAdd(&local[(bits >> shift) & 0xFFu], 1u);
        }
    }
    __syncthreads();
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
        if (local[b]) atomicAdd(&hist[b], (unsigned long long)local[b]);
    }
}

// counts[block] = number of elements of the block's contiguous range [block * span, ...)
// whose magnitude bits equal `threshold`.
extern "C" __global__ void count_equal(const float* x, u64 n, unsigned threshold, u64 span,
                                       unsigned long long* counts) {
    u64 start = blockIdx.x * span;
    u64 end = start + span < n ? start + span : n;
    unsigned long long count = 0;
    for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        count += magnitude_bits(x[i]) == threshold ? 1 : 0;
    }
    atomicAdd(&counts[blockIdx.x], count);
}
