// Conflict statistics of one module (src/conflict/metrics.rs) as block reductions, over T
// experts' trimmed, weighted updates laid out expert after expert:
//   stats[0] coordinates some expert keeps, stats[1] those where kept entries disagree,
//   stats[2] sum of kappa, stats[3] minority mass, stats[4] total mass;
//   dots[a * T + b] = sum_j x_a[j] * x_b[j] (untrimmed), for the cosines and norms.
// Accumulated in f64 per block in shared memory, then atomically into global memory.



extern "C" __global__ void conflict_stats(const float* deltas, const float* kept, int experts,
                                          u64 n, const float* weights, double* stats,
                                          double* dots) {
    __shared__ double block_stats[5];
    __shared__ double block_dots[MAX_EXPERTS * MAX_EXPERTS];
    for (int i = threadIdx.x; i < 5; i += blockDim.x) block_stats[i] = 0.0;
    for (int i = threadIdx.x; i < experts * experts; i += blockDim.x) block_dots[i] = 0.0;
    __syncthreads();
    double local[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x; j < n; j += (u64)gridDim.x * blockDim.x) {
        double p = 0.0, q = 0.0;
        for (int t = 0; t < experts; ++t) {
            double x = (double)kept[(u64)t * n + j] * fabs((double)weights[t]);
            if (x > 0.0) p += x; else q -= x;
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
            double xa = (double)deltas[(u64)a * n + j];
            for (int b = a; b < experts; ++b) {
                atomicAdd(&block_dots[a * experts + b], xa * (double)deltas[(u64)b * n + j]);
            }
        }
    }
    for (int i = 0; i < 5; ++i) atomicAdd(&block_stats[i], local[i]);
    __syncthreads();
    for (int i = threadIdx.x; i < 5; i += blockDim.x) atomicAdd(&stats[i], block_stats[i]);
    for (int i = threadIdx.x; i < experts * experts; i += blockDim.x) {
        if (block_dots[i] != 0.0) atomicAdd(&dots[i], block_dots[i]);
    }
}
