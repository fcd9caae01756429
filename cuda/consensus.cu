// Fused trim + sign election + disjoint mean + attenuation for TIES and CACI, per coordinate,
// as src/merge/consensus.rs (TIES) and src/merge/caci.rs (CACI) compute it on the CPU:
//   kept_t   = x_t if |x_t| > thr_t, or |x_t| == thr_t and j < tie_limit_t; else 0
//   vote     = sum_t f_t * kept_t          (f_t: weight or 1 for TIES; w_t / rms_t for CACI)
//   elected  = vote >= 0 ? +1 : -1
//   agree_t  = f_t * kept_t * elected > 0
//   mean     = sum_agree w_t * kept_t / divisor   (divisor: sum of agreeing weights, or their
//              count; 1 when zero; not divided when normalize is 0)
//   kappa    = min(P, N) / max(P, N), P = sum f_t max(kept_t, 0), N = sum f_t max(-kept_t, 0)
//   out      = base + lambda * mean * (1 - kappa)^gamma     (gamma 0: TIES)
// Sums run over experts in order in f32; compile with --fmad=false so that no multiply-add is
// fused and every result matches the CPU's bit for bit.

typedef unsigned long long u64;

extern "C" __global__ void consensus_merge(const float* deltas, int experts, u64 n,
                                           const unsigned* thresholds, const u64* tie_limits,
                                           const float* vote_factor, const float* weights,
                                           int divide_by_count, int normalize, float gamma,
                                           float lambda, const float* base, float* out,
                                           unsigned long long* conflicts) {
    unsigned long long opposed_here = 0;
    for (u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x; j < n; j += (u64)gridDim.x * blockDim.x) {
        float vote = 0.0f, positive = 0.0f, negative = 0.0f;
        for (int t = 0; t < experts; ++t) {
            float x = deltas[(u64)t * n + j];
            unsigned bits = __float_as_uint(x) & 0x7FFFFFFFu;
            bool keep = bits > thresholds[t] || (bits == thresholds[t] && j < tie_limits[t]);
            x = keep ? x : 0.0f;
            float f = vote_factor[t];
            vote += f * x;
            positive += f * fmaxf(x, 0.0f);
            negative += f * fmaxf(-x, 0.0f);
        }
        float elected = vote >= 0.0f ? 1.0f : -1.0f;
        float mixed = 0.0f, divisor = 0.0f;
        bool opposed = false;
        for (int t = 0; t < experts; ++t) {
            float x = deltas[(u64)t * n + j];
            unsigned bits = __float_as_uint(x) & 0x7FFFFFFFu;
            bool keep = bits > thresholds[t] || (bits == thresholds[t] && j < tie_limits[t]);
            x = keep ? x : 0.0f;
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
        out[j] = base ? base[j] + merged : merged;
    }
    atomicAdd(conflicts, opposed_here);
}
