// Top-k magnitude thresholds by radix select, as the CPU finds them (src/merge/sparsify.rs):
// magnitudes are compared as the bits of |x|. Four passes of one byte each, from the top: the
// host reads the 256-bin histogram of the elements that match the prefix found so far and
// picks the bin holding the k-th largest, so the threshold is exact. Ties at the threshold
// keep the lowest indices: the host places the cut with the per-block counts of
// `count_equal`. The values are expert `t`'s update: f32 deltas, or bf16 tensor - bf16 base.
// Prepended: cuda/common.cuh.

// hist[b] += number of i with (bits(i) & prefix_mask) == prefix and byte `shift` of bits(i) == b.
template <typename Updates>
__device__ void histogram(Updates updates, int t, u64 n, unsigned prefix, unsigned prefix_mask,
                          int shift, u64* hist) {
    __shared__ unsigned local[256];
    for (int b = threadIdx.x; b < 256; b += blockDim.x) local[b] = 0;
    __syncthreads();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        unsigned bits = magnitude_bits(updates(t, i));
        if ((bits & prefix_mask) == prefix) {
            atomicAdd(&local[(bits >> shift) & 0xFFu], 1u);
        }
    }
    __syncthreads();
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
        if (local[b]) atomicAdd(&hist[b], (u64)local[b]);
    }
}

// counts[block] = number of elements of the block's contiguous range [block * span, ...)
// whose magnitude bits equal `threshold`.
template <typename Updates>
__device__ void equal_counts(Updates updates, int t, u64 n, unsigned threshold, u64 span,
                             u64* counts) {
    u64 start = blockIdx.x * span;
    u64 end = start + span < n ? start + span : n;
    u64 count = 0;
    for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        count += magnitude_bits(updates(t, i)) == threshold ? 1 : 0;
    }
    block_add(&counts[blockIdx.x], count);
}

extern "C" __global__ void magnitude_histogram(const float* deltas, int t, u64 n,
                                               unsigned prefix, unsigned prefix_mask, int shift,
                                               u64* hist) {
    histogram(F32Deltas{deltas, n}, t, n, prefix, prefix_mask, shift, hist);
}

extern "C" __global__ void magnitude_histogram_bf16(const bf16* tensors, const bf16* base, int t,
                                                    u64 n, unsigned prefix, unsigned prefix_mask,
                                                    int shift, u64* hist) {
    histogram(Bf16Updates{tensors, base, n}, t, n, prefix, prefix_mask, shift, hist);
}

extern "C" __global__ void count_equal(const float* deltas, int t, u64 n, unsigned threshold,
                                       u64 span, u64* counts) {
    equal_counts(F32Deltas{deltas, n}, t, n, threshold, span, counts);
}

extern "C" __global__ void count_equal_bf16(const bf16* tensors, const bf16* base, int t, u64 n,
                                            unsigned threshold, u64 span, u64* counts) {
    equal_counts(Bf16Updates{tensors, base, n}, t, n, threshold, span, counts);
}

// sums[0] += sum over i of update(t, i)^2 in f64: the rms behind CACI's confidence.
template <typename Updates>
__device__ void squares(Updates updates, int t, u64 n, double* sums) {
    double local = 0.0;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        double x = (double)updates(t, i);
        local += x * x;
    }
    block_add(sums, local);
}

extern "C" __global__ void sum_squares(const float* deltas, int t, u64 n, double* sums) {
    squares(F32Deltas{deltas, n}, t, n, sums);
}

extern "C" __global__ void sum_squares_bf16(const bf16* tensors, const bf16* base, int t, u64 n,
                                            double* sums) {
    squares(Bf16Updates{tensors, base, n}, t, n, sums);
}
