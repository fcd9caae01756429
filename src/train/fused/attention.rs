//! Rotary positions and causal grouped-query attention of one unpadded sequence, forward and
//! backward. Queries are `[t, heads·d]`, keys and values `[t, kv_heads·d]`, token-major as the
//! projections write them; a head is a strided view, so nothing is transposed or copied.

use super::matmul::{gemm, View};

/// Cosine and sine tables `[positions, d/2]`, computed as [`crate::train::model::Rope`]
/// computes them (in f64, rounded to f32), so that both engines rotate by the same values.
#[derive(Debug, Clone)]
pub(crate) struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    pub(crate) fn new(head_dim: usize, positions: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
            .collect();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for pos in 0..positions {
            for f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { half, cos, sin }
    }

    /// The positions the table covers.
    pub(crate) fn positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates every head of `x` (`[t, heads·d]`, row `i` at position `start + i`) in place: the two
    /// halves of a head turn together, `(x₁, x₂) → (x₁c − x₂s, x₂c + x₁s)`. `inverse` turns
    /// the other way, which is the backward pass (the rotation is orthogonal).
    pub(crate) fn rotate(&self, x: &mut [f32], width: usize, start: usize, inverse: bool) {
        for (pos, row) in (start..).zip(x.chunks_exact_mut(width)) {
            self.rotate_token(row, pos, inverse);
        }
    }

    /// Rotates every head of one token's row at position `pos` in place, as [`Self::rotate`].
    pub(crate) fn rotate_token(&self, row: &mut [f32], pos: usize, inverse: bool) {
        let half = self.half;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        for head in row.chunks_exact_mut(2 * half) {
            let (x1, x2) = head.split_at_mut(half);
            for (((a, b), &c), &s) in x1.iter_mut().zip(x2).zip(cos).zip(sin) {
                let s = if inverse { -s } else { s };
                let (u, v) = (*a, *b);
                *a = u * c - v * s;
                *b = v * c + u * s;
            }
        }
    }
}

/// The shape of one sequence's attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub t: usize,
    /// Keys and values every query sees before the sequence's own (a shared prompt's).
    pub prefix: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    /// Query rows per block ([`BLOCK`]).
    pub block: usize,
}

impl Shape {
    fn q_width(&self) -> usize {
        self.heads * self.d
    }

    fn kv_width(&self) -> usize {
        self.kv_heads * self.d
    }

    /// The key/value head that query head `h` reads.
    fn kv_head(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads)
    }

    /// The keys a query row can reach: the prefix's and the sequence's own.
    fn width(&self) -> usize {
        self.prefix + self.t
    }

    fn scale(&self) -> f32 {
        (1.0 / (self.d as f64).sqrt()) as f32
    }
}

/// Query rows per block: a block of queries attends only to the keys up to its last row, which
/// skips most of the products' masked upper triangle.
pub(crate) const BLOCK: usize = 64;

/// The blocks `[r0, r1)` of `t` query rows.
fn blocks(t: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(block.max(1))
        .map(move |r0| (r0, (r0 + block.max(1)).min(t)))
}

/// Scores to probabilities in place: `exp(s − max)` over their sum.
pub(crate) fn softmax(scores: &mut [f32]) {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in scores.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in scores.iter_mut() {
        *v *= inv;
    }
}

/// A shared prefix's keys and values (`[prefix, kv_heads·d]`, rotated), seen by every query of
/// the sequence before its own keys; empty when the sequence stands alone.
#[derive(Clone, Copy)]
pub(crate) struct Prefix<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
}

#[cfg(test)]
impl Prefix<'_> {
    pub(crate) const NONE: Prefix<'static> = Prefix { k: &[], v: &[] };
}

/// Causal attention after a prefix: `p` (`[heads, t, prefix + t]`) gets each head's
/// probabilities (row i over the prefix's keys, then its own first i + 1; zero beyond) and
/// `out` (`[t, heads·d]`) the attended values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    s: Shape,
    prefix: Prefix<'_>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    p: &mut [f32],
    out: &mut [f32],
) {
    let (t, d, qw, kw, pre, w) = (s.t, s.d, s.q_width(), s.kv_width(), s.prefix, s.width());
    for h in 0..s.heads {
        let kv = s.kv_head(h);
        let ph = &mut p[h * t * w..(h + 1) * t * w];
        for (r0, r1) in blocks(t, s.block) {
            let rows = r1 - r0;
            let qh = View::rows(&q[r0 * qw + h * d..], qw);
            if pre > 0 {
                let keys = View::cols(&prefix.k[kv * d..], kw);
                gemm(rows, d, pre, s.scale(), qh, keys, 0.0, &mut ph[r0 * w..], w);
            }
            let keys = View::cols(&k[kv * d..], kw);
            gemm(
                rows,
                d,
                r1,
                s.scale(),
                qh,
                keys,
                0.0,
                &mut ph[r0 * w + pre..],
                w,
            );
            for (i, row) in (r0..).zip(ph[r0 * w..r1 * w].chunks_exact_mut(w)) {
                let (seen, future) = row.split_at_mut(pre + i + 1);
                softmax(seen);
                future.fill(0.0);
            }
            let oh = &mut out[r0 * qw + h * d..];
            if pre > 0 {
                let probs = View::rows(&ph[r0 * w..], w);
                gemm(
                    rows,
                    pre,
                    d,
                    1.0,
                    probs,
                    View::rows(&prefix.v[kv * d..], kw),
                    0.0,
                    oh,
                    qw,
                );
            }
            let (probs, beta) = (View::rows(&ph[r0 * w + pre..], w), f32::from(pre > 0));
            gemm(
                rows,
                r1,
                d,
                1.0,
                probs,
                View::rows(&v[kv * d..], kw),
                beta,
                oh,
                qw,
            );
        }
    }
}

/// Where [`backward`] adds the prefix's key and value gradients (`[prefix, kv_heads·d]`, added
/// to: several sequences share one prefix).
pub(crate) struct PrefixGrads<'a> {
    pub dk: &'a mut [f32],
    pub dv: &'a mut [f32],
}

/// The gradients of [`forward`] for `dout`: `dq`, `dk` and `dv` overwritten (the query heads
/// of a group add up into their key/value head), the prefix's added into `prefix_grads`. `dp` is
/// `[t, prefix + t]` scratch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    s: Shape,
    prefix: Prefix<'_>,
    prefix_grads: Option<PrefixGrads<'_>>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    p: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dp: &mut [f32],
) {
    let (t, d, qw, kw, pre, w) = (s.t, s.d, s.q_width(), s.kv_width(), s.prefix, s.width());
    let scale = s.scale();
    dk[..t * kw].fill(0.0);
    dv[..t * kw].fill(0.0);
    let mut prefix_grads = prefix_grads.filter(|_| pre > 0);
    for h in 0..s.heads {
        let kv = s.kv_head(h);
        let ph = &p[h * t * w..(h + 1) * t * w];
        for (r0, r1) in blocks(t, s.block) {
            let rows = r1 - r0;
            let dh = View::rows(&dout[r0 * qw + h * d..], qw);
            let dpb = &mut dp[r0 * w..];
            if pre > 0 {
                let values = View::cols(&prefix.v[kv * d..], kw);
                gemm(rows, d, pre, 1.0, dh, values, 0.0, dpb, w);
            }
            let values = View::cols(&v[kv * d..], kw);
            gemm(rows, d, r1, 1.0, dh, values, 0.0, &mut dpb[pre..], w);
            if let Some(g) = prefix_grads.as_mut() {
                let probs = View::cols(&ph[r0 * w..], w);
                gemm(pre, rows, d, 1.0, probs, dh, 1.0, &mut g.dv[kv * d..], kw);
            }
            let probs = View::cols(&ph[r0 * w + pre..], w);
            gemm(r1, rows, d, 1.0, probs, dh, 1.0, &mut dv[kv * d..], kw);
            // Softmax backward, with the score scale folded in: ds = p·(dp − Σ p·dp)·scale.
            let prows = ph[r0 * w..r1 * w].chunks_exact(w);
            for (i, (prow, drow)) in (r0..).zip(prows.zip(dpb.chunks_exact_mut(w))) {
                let n = pre + i + 1;
                let dot: f32 = prow[..n].iter().zip(&drow[..n]).map(|(a, b)| a * b).sum();
                for (g, &pv) in drow[..n].iter_mut().zip(&prow[..n]) {
                    *g = pv * (*g - dot) * scale;
                }
                drow[n..pre + r1].fill(0.0);
            }
            let dpb = &dp[r0 * w..];
            let dqh = &mut dq[r0 * qw + h * d..];
            let qh = View::rows(&q[r0 * qw + h * d..], qw);
            if pre > 0 {
                let keys = View::rows(&prefix.k[kv * d..], kw);
                gemm(rows, pre, d, 1.0, View::rows(dpb, w), keys, 0.0, dqh, qw);
            }
            let (keys, beta) = (View::rows(&k[kv * d..], kw), f32::from(pre > 0));
            gemm(
                rows,
                r1,
                d,
                1.0,
                View::rows(&dpb[pre..], w),
                keys,
                beta,
                dqh,
                qw,
            );
            if let Some(g) = prefix_grads.as_mut() {
                gemm(
                    pre,
                    rows,
                    d,
                    1.0,
                    View::cols(dpb, w),
                    qh,
                    1.0,
                    &mut g.dk[kv * d..],
                    kw,
                );
            }
            gemm(
                r1,
                rows,
                d,
                1.0,
                View::cols(&dpb[pre..], w),
                qh,
                1.0,
                &mut dk[kv * d..],
                kw,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_turns_pairs_of_halves_and_inverts() {
        // d 4, theta 100: frequencies 1 and 0.1; position 2 turns (x0, x2) by 2 rad and
        // (x1, x3) by 0.2 rad.
        let table = RopeTable::new(4, 3, 100.0);
        let mut x = vec![0f32; 12];
        x[8..].copy_from_slice(&[1.0, 0.0, 0.0, 1.0]);
        let original = x.clone();
        table.rotate(&mut x, 4, 0, false);
        let expected = [2f32.cos(), -(0.2f32.sin()), 2f32.sin(), 0.2f32.cos()];
        for (g, e) in x[8..].iter().zip(expected) {
            assert!((g - e).abs() < 1e-6, "{x:?} vs {expected:?}");
        }
        table.rotate(&mut x, 4, 0, true);
        for (g, e) in x.iter().zip(&original) {
            assert!((g - e).abs() < 1e-6);
        }
    }

    #[test]
    fn the_first_query_sees_only_itself() {
        // One head, d 2, t 2: query 0 attends to key 0 only, so its output is value 0.
        let s = Shape {
            t: 2,
            prefix: 0,
            heads: 1,
            kv_heads: 1,
            d: 2,
            block: BLOCK,
        };
        let q = [1f32, 0.0, 0.0, 1.0];
        let k = [1f32, 0.0, 0.0, 1.0];
        let v = [3f32, 4.0, 5.0, 6.0];
        let (mut p, mut out) = ([0f32; 4], [0f32; 4]);
        forward(s, Prefix::NONE, &q, &k, &v, &mut p, &mut out);
        assert_eq!(&out[..2], &[3.0, 4.0]);
        // Query 1 scores (0, 1/√2): weights 1/(1 + e^{1/√2}) and the rest.
        let w1 = 1.0 / (1.0 + (1.0f32 / 2f32.sqrt()).exp());
        assert!((p[2] - w1).abs() < 1e-6 && p[1] == 0.0);
        assert!((out[2] - (3.0 * w1 + 5.0 * (1.0 - w1))).abs() < 1e-5);
    }

    /// A reproducible stream in ±1.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn blocks_of_queries_change_nothing_but_rounding() {
        let (t, heads, kv_heads, d) = (11, 4, 2, 4);
        let shape = |block| Shape {
            t,
            prefix: 0,
            heads,
            kv_heads,
            d,
            block,
        };
        let (q, k, v) = (
            values(t * heads * d, 1),
            values(t * kv_heads * d, 2),
            values(t * kv_heads * d, 3),
        );
        let dout = values(t * heads * d, 4);
        let run = |block| {
            let (mut p, mut out) = (vec![f32::NAN; heads * t * t], vec![0f32; t * heads * d]);
            forward(shape(block), Prefix::NONE, &q, &k, &v, &mut p, &mut out);
            let (mut dq, mut dk, mut dv) = (
                vec![f32::NAN; t * heads * d],
                vec![f32::NAN; t * kv_heads * d],
                vec![f32::NAN; t * kv_heads * d],
            );
            let mut dp = vec![f32::NAN; t * t];
            let s = shape(block);
            let (none, (q, k, v)) = (Prefix::NONE, (&q, &k, &v));
            backward(
                s, none, None, q, k, v, &p, &dout, &mut dq, &mut dk, &mut dv, &mut dp,
            );
            [p, out, dq, dk, dv]
        };
        let whole = run(t);
        for block in [1, 3, 4] {
            for (a, b) in run(block).iter().zip(&whole) {
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() < 1e-5, "block {block}: {x} vs {y}");
                }
            }
        }
        // Query 0 attends to key 0 alone in every head.
        assert!((0..heads).all(|h| whole[0][h * t * t] == 1.0));
    }

    #[test]
    fn a_prefix_is_the_start_of_one_longer_sequence() {
        // Rows 0..5 of a causal sequence of 12 as a prefix, rows 5..12 as the sequence after it:
        // the same outputs for the last 7 rows, and the same gradients of everything when only
        // those rows carry an output gradient.
        let (pre, t, heads, kv_heads, d) = (5, 7, 4, 2, 4);
        let (qw, kw, n) = (heads * d, kv_heads * d, pre + t);
        let shape = |t, prefix, block| Shape {
            t,
            prefix,
            heads,
            kv_heads,
            d,
            block,
        };
        let (q, k, v) = (values(n * qw, 5), values(n * kw, 6), values(n * kw, 7));
        let mut dout = values(n * qw, 8);
        dout[..pre * qw].fill(0.0);
        let s = shape(n, 0, BLOCK);
        let (mut p, mut out) = (vec![0f32; heads * n * n], vec![0f32; n * qw]);
        forward(s, Prefix::NONE, &q, &k, &v, &mut p, &mut out);
        let (mut dq, mut dk, mut dv) = (vec![0f32; n * qw], vec![0f32; n * kw], vec![0f32; n * kw]);
        let mut dp = vec![0f32; n * n];
        let none = Prefix::NONE;
        backward(
            s, none, None, &q, &k, &v, &p, &dout, &mut dq, &mut dk, &mut dv, &mut dp,
        );
        for block in [3, BLOCK] {
            let s = shape(t, pre, block);
            let prefix = Prefix {
                k: &k[..pre * kw],
                v: &v[..pre * kw],
            };
            let (q2, k2, v2) = (&q[pre * qw..], &k[pre * kw..], &v[pre * kw..]);
            let (mut p2, mut out2) = (vec![f32::NAN; heads * t * n], vec![0f32; t * qw]);
            forward(s, prefix, q2, k2, v2, &mut p2, &mut out2);
            let close = |a: &[f32], b: &[f32], what: &str| {
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() < 1e-5, "block {block}, {what}: {x} vs {y}");
                }
            };
            close(&out2, &out[pre * qw..], "outputs");
            let (mut dq2, mut dk2, mut dv2) = (
                vec![0f32; t * qw],
                vec![f32::NAN; t * kw],
                vec![f32::NAN; t * kw],
            );
            // The prefix's gradients add to what is there.
            let (mut dkp, mut dvp) = (vec![1f32; pre * kw], vec![1f32; pre * kw]);
            let grads = PrefixGrads {
                dk: &mut dkp,
                dv: &mut dvp,
            };
            let mut dp2 = vec![f32::NAN; t * n];
            let dout2 = &dout[pre * qw..];
            backward(
                s,
                prefix,
                Some(grads),
                q2,
                k2,
                v2,
                &p2,
                dout2,
                &mut dq2,
                &mut dk2,
                &mut dv2,
                &mut dp2,
            );
            close(&dq2, &dq[pre * qw..], "dq");
            close(&dk2, &dk[pre * kw..], "dk");
            close(&dv2, &dv[pre * kw..], "dv");
            let minus_one = |g: &[f32]| g.iter().map(|x| x - 1.0).collect::<Vec<_>>();
            close(&minus_one(&dkp), &dk[..pre * kw], "prefix dk");
            close(&minus_one(&dvp), &dv[..pre * kw], "prefix dv");
        }
    }
}
