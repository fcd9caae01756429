// Conflict statistics of one module (src/conflict/metrics.rs) as block reductions, over T
// experts' updates (f32 deltas, or bf16 tensors minus a bf16 base), each trimmed by its cut
// (threshold bits, tie limit) as cuda/consensus.cu trims, and weighted by |w_t|:
//   stats[0] coordinates some expert keeps, stats[1] those where kept entries disagree,
//   stats[2] sum of kappa, stats[3] minority mass, stats[4] total mass;
//   dots[a * T + b]   = sum_j x_a[j] * x_b[j] over the untrimmed updates (a <= b);
//   both[a * T + b]   = coordinates both a and b keep (nonzero), a < b;
//   either[a * T + b] = coordinates a or b keeps, a < b.
// Accumulated in f64 and u64 per block in shared memory, then atomically into global memory.
// Prepended: cuda/common.cuh.

template <typename Updates>
__device__ void conflicts(Updates updates, int experts, u64 n, const unsigned* thresholds,
                          const u64* tie_limits, const float* weights, double* stats,
                          double* dots, u64* both, u64* either) {
    __shared__ double block_dots[MAX_EXPERTS * MAX_EXPERTS];
    __shared__ unsigned block_both[MAX_EXPERTS * MAX_EXPERTS];
    __shared__ unsigned block_either[MAX_EXPERTS * MAX_EXPERTS];
    for (int i = threadIdx.x; i < experts * experts; i += blockDim.x) {
        block_dots[i] = 0.0;
        block_both[i] = 0;
        block_either[i] = 0;
    }
    __syncthreads();
    double local[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x; j < n;
         j += (u64)gridDim.x * blockDim.x) {
        float x[MAX_EXPERTS];
        unsigned kept = 0;  // bit t: expert t keeps a nonzero entry here
        double p = 0.0, q = 0.0;
        for (int t = 0; t < experts; ++t) {
            x[t] = updates(t, j);
            unsigned bits = magnitude_bits(x[t]);
            bool keep = bits > thresholds[t] || (bits == thresholds[t] && j < tie_limits[t]);
            double k = keep ? (double)x[t] * fabs((double)weights[t]) : 0.0;
            if (keep && x[t] != 0.0f) kept |= 1u << t;
            if (k > 0.0) p += k; else q -= k;
        }
        if (p + q > 0.0) {
            double low = p < q ? p : q, high = p < q ? q : p;
            local[0] += 1.0;
            local[1] += (p > 0.0 && q > 0.0) ? 1.0 : 0.0;
            local[2] += low / high;
            local[3] += low;
            local[4] += p + q;
        }
        for (int a = 0; a < experts; ++a) {
            double xa = (double)x[a];
            for (int b = a; b < experts; ++b) {
                double product = xa * (double)x[b];
                if (product != 0.0) atomicAdd(&block_dots[a * experts + b], product);
                if (b > a) {
                    unsigned ka = (kept >> a) & 1u, kb = (kept >> b) & 1u;
                    if (ka & kb) atomicAdd(&block_both[a * experts + b], 1u);
                    if (ka | kb) atomicAdd(&block_either[a * experts + b], 1u);
                }
            }
        }
    }
    for (int i = 0; i < 5; ++i) block_add(&stats[i], local[i]);
    for (int i = threadIdx.x; i < experts * experts; i += blockDim.x) {
        if (block_dots[i] != 0.0) atomicAdd(&dots[i], block_dots[i]);
        if (block_both[i]) atomicAdd(&both[i], (u64)block_both[i]);
        if (block_either[i]) atomicAdd(&either[i], (u64)block_either[i]);
    }
}

extern "C" __global__ void conflict_stats(const float* deltas, int experts, u64 n,
                                          const unsigned* thresholds, const u64* tie_limits,
                                          const float* weights, double* stats, double* dots,
                                          u64* both, u64* either) {
    conflicts(F32Deltas{deltas, n}, experts, n, thresholds, tie_limits, weights, stats, dots,
              both, either);
}

extern "C" __global__ void conflict_stats_bf16(const bf16* tensors, const bf16* base, int experts,
                                               u64 n, const unsigned* thresholds,
                                               const u64* tie_limits, const float* weights,
                                               double* stats, double* dots, u64* both,
                                               u64* either) {
    conflicts(Bf16Updates{tensors, base, n}, experts, n, thresholds, tie_limits, weights, stats,
              dots, both, either);
}
