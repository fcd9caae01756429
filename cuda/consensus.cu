// Fused trim + sign election + disjoint mean + attenuation for TIES and CACI, per coordinate,
// as src/merge/consensus.rs (TIES) and src/merge/caci.rs (CACI) compute it on the CPU:
//   kept_t   = x_t if |x_t| > thr_t, or |x_t| == thr_t and j < tie_limit_t; else 0
//   vote     = sum_t f_t * kept_t          (f_t: weight or 1 for TIES; w_t / rms_t for CACI)
//   elected  = vote >= 0 ? +1 : -1
//   agree_t  = f_t * kept_t * elected > 0
//   mean     = sum_agree w_t * kept_t / divisor   (divisor: sum of agreeing weights, or their
//              count; 1 when zero; not divided when normalize is 0)
//   kappa    = min(P, N) / max(P, N), P = sum f_t max(kept_t, 0), N = sum f_t max(-kept_t, 0)
//   out      = base + lambda * mean * (1 - kappa)^gamma     (gamma 0: TIES; no base: the delta)
// Sums run over experts in order in f32; compile with --fmad=false so that no multiply-add is
// fused and every result matches the CPU's bit for bit.
//
// The updates x_t come either as f32 deltas laid out expert after expert (from an upload or
// from the LoRA products), or as bf16 expert tensors with a bf16 base, x_t = x - base in f32
// as the CPU computes it. The output is f32 or bf16 (rounded to nearest even, as `half`).
// Besides the values, each launch adds to: conflicts (coordinates where a kept entry opposes
// the vote), kept[t] (nonzero entries expert t keeps) and delta_sq (sum of (out - base)^2 in
// f64, before rounding to the output type), reduced per block.

// Prepended: cuda/common.cuh (src/backend/cuda.rs joins them before compiling).

template <typename Updates, typename Base, typename Out>
__device__ void consensus(Updates updates, int experts, u64 n, const unsigned* thresholds,
                          const u64* tie_limits, const float* vote_factor, const float* weights,
                          int divide_by_count, int normalize, float gamma, float lambda,
                          const Base* base, Out* out, u64* conflicts, u64* kept,
                          double* delta_sq) {
    u64 opposed_here = 0;
    u64 kept_here[MAX_EXPERTS];
    for (int t = 0; t < MAX_EXPERTS; ++t) kept_here[t] = 0;
    double squares_here = 0.0;
    for (u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x; j < n;
         j += (u64)gridDim.x * blockDim.x) {
        float kept_x[MAX_EXPERTS];
        float vote = 0.0f, positive = 0.0f, negative = 0.0f;
        for (int t = 0; t < experts; ++t) {
            float x = updates(t, j);
            unsigned bits = magnitude_bits(x);
            bool keep = bits > thresholds[t] || (bits == thresholds[t] && j < tie_limits[t]);
            x = keep ? x : 0.0f;
            kept_x[t] = x;
            kept_here[t] += x != 0.0f ? 1 : 0;
            float f = vote_factor[t];
            vote += f * x;
            positive += f * fmaxf(x, 0.0f);
            negative += f * fmaxf(-x, 0.0f);
        }
        float elected = vote >= 0.0f ? 1.0f : -1.0f;
        float mixed = 0.0f, divisor = 0.0f;
        bool opposed = false;
        for (int t = 0; t < experts; ++t) {
            float x = kept_x[t];
            float oriented = vote_factor[t] * x * elected;
            if (oriented > 0.0f) {
                mixed += weights[t] * x;
                divisor += divide_by_count ? 1.0f : weights[t];
            }
            opposed = opposed || oriented < 0.0f;
        }
        opposed_here += opposed ? 1 : 0;
        float mean = normalize ? mixed / (divisor == 0.0f ? 1.0f : divisor) : mixed;
        float low = fminf(positive, negative), high = fmaxf(positive, negative);
        float kappa = high > 0.0f ? low / high : 0.0f;
        float merged = gamma == 0.0f ? mean : mean * powf(1.0f - kappa, gamma);
        merged = lambda == 1.0f ? merged : merged * lambda;
        float b = base ? load(base[j]) : 0.0f;
        float value = base ? b + merged : merged;
        double moved = (double)value - (double)b;
        squares_here += moved * moved;
        store(&out[j], value);
    }
    block_add(conflicts, opposed_here);
    for (int t = 0; t < experts; ++t) block_add(&kept[t], kept_here[t]);
    block_add(delta_sq, squares_here);
}

#define CONSENSUS_ARGS                                                                       \
    int experts, u64 n, const unsigned *thresholds, const u64 *tie_limits,                   \
        const float *vote_factor, const float *weights, int divide_by_count, int normalize,  \
        float gamma, float lambda
#define CONSENSUS_PASS                                                                        \
    experts, n, thresholds, tie_limits, vote_factor, weights, divide_by_count, normalize, gamma, \
        lambda

// f32 deltas (expert after expert), f32 base (or null: the merged delta alone), f32 out.
extern "C" __global__ void consensus_merge(const float* deltas, CONSENSUS_ARGS, const float* base,
                                           float* out, u64* conflicts, u64* kept,
                                           double* delta_sq) {
    consensus(F32Deltas{deltas, n}, CONSENSUS_PASS, base, out, conflicts, kept, delta_sq);
}

// f32 deltas and base (or null), bf16 out.
extern "C" __global__ void consensus_merge_to_bf16(const float* deltas, CONSENSUS_ARGS,
                                                   const float* base, bf16* out, u64* conflicts,
                                                   u64* kept, double* delta_sq) {
    consensus(F32Deltas{deltas, n}, CONSENSUS_PASS, base, out, conflicts, kept, delta_sq);
}

// bf16 expert tensors (expert after expert) and bf16 base, bf16 out.
extern "C" __global__ void consensus_merge_bf16(const bf16* tensors, CONSENSUS_ARGS,
                                                const bf16* base, bf16* out, u64* conflicts,
                                                u64* kept, double* delta_sq) {
    consensus(Bf16Updates{tensors, base, n}, CONSENSUS_PASS, base, out, conflicts, kept,
              delta_sq);
}
