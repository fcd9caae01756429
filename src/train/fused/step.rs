//! The forward and backward pass of a shard of examples through the fused engine, adding
//! their gradients into a flat buffer. The examples run as one stack of unpadded sequences:
//! everything but attention and rotary positions works row by row, so the projections see all
//! the shard's tokens at once (large products, each weight packed once), and attention runs
//! within each sequence, after the prefix it continues if it has one (a shared prompt start,
//! [`super::share`]). Every buffer lives in a [`Scratch`] that is reused from shard to
//! shard, so the pass allocates only when a shard outgrows every one before it.

use super::attention::{self, Prefix, PrefixGrads, RopeTable, Shape};
use super::linear;
use super::loss::{cross_entropy, policy, TokenStat};
use super::matmul::{gemm, View};
use super::norm;
use super::weights::{Linear, Weights};
use super::Dims;

/// One example as the pass sees it: its input tokens (all but the last, checked against the
/// vocabulary and the rotary table), the first position in the loss, and the tokens predicted
/// from there on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seq<'a> {
    pub inputs: &'a [u32],
    pub first: usize,
    pub targets: &'a [u32],
    /// The earlier sequence this one continues (a shared prompt): its inputs come first, at
    /// positions `0..`, and this one's from where it ends.
    pub parent: Option<usize>,
    /// The embeddings its image tokens take instead of the token's, in order (`hidden` each).
    pub image: &'a [f32],
}

/// What the head computes on the loss's positions.
pub(crate) enum Head<'a> {
    /// The summed NLL, its gradient scaled by `scale`.
    CrossEntropy { scale: f32 },
    /// A per-token policy objective on `logits / temperature`: each target's log-probability
    /// and the entropy are pushed to `stats` (rows in sequence order), and the gradient is
    /// `coef(row, logp) · ∇logp`. Without `backward` the pass stops after the head.
    Policy {
        temperature: f32,
        coef: &'a (dyn Fn(usize, f64) -> f64 + Sync),
        stats: &'a mut Vec<TokenStat>,
        backward: bool,
    },
}

/// What one layer's forward pass keeps for its backward pass.
#[derive(Debug, Default)]
struct Saved {
    rstd1: Vec<f32>,
    h1: Vec<f32>,
    /// The LoRA down-projections of the seven projections, `[n, r]` each.
    z: [Vec<f32>; 7],
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
    ctx: Vec<f32>,
    mid: Vec<f32>,
    rstd2: Vec<f32>,
    h2: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    /// σ(gate), kept so that the backward pass needs no exponential.
    sig: Vec<f32>,
    m: Vec<f32>,
}

/// A thread's working memory for [`pass`]; start from `Scratch::default()`.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    layers: Vec<Saved>,
    /// The residual stream entering each layer and leaving the last, `[layers + 1, n, hidden]`.
    xs: Vec<f32>,
    /// The last residual rows at the loss's positions, their norm and their logits.
    xl: Vec<f32>,
    rstdf: Vec<f32>,
    hf: Vec<f32>,
    logits: Vec<f32>,
    targets: Vec<u32>,
    dx: Vec<f32>,
    dh: Vec<f32>,
    dhf: Vec<f32>,
    dm: Vec<f32>,
    dctx: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dp: Vec<f32>,
    dz: Vec<f32>,
}

/// The first `n` elements of `v`, grown (never shrunk) to fit.
pub(crate) fn take<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// The output head on `n` rows `x` of the last residual stream: the final norm into `normed`
/// (each row's `rstd` kept) and the logits `[n, vocab]`.
pub(crate) fn output_head(
    w: &Weights,
    dims: &Dims,
    n: usize,
    x: &[f32],
    normed: &mut [f32],
    rstd: &mut [f32],
    logits: &mut [f32],
) {
    let hd = dims.hidden;
    norm::forward(x, &w.final_norm.w, dims.eps, normed, rstd);
    gemm(
        n,
        hd,
        dims.vocab,
        1.0,
        View::rows(normed, hd),
        View::cols(w.head(), hd),
        0.0,
        logits,
        dims.vocab,
    );
}

/// The length of the prefix `s` continues (0 if none).
fn prefix_len(seqs: &[Seq<'_>], s: &Seq<'_>) -> usize {
    s.parent.map_or(0, |i| seqs[i].inputs.len())
}

/// The largest LoRA rank of a layer's projections (0 without LoRA).
fn max_rank(proj: &[Linear]) -> usize {
    proj.iter()
        .filter_map(|l| l.lora.as_ref().map(|l| l.r))
        .max()
        .unwrap_or(0)
}

/// Forward and backward of `seqs`: adds the gradient of the head's objective into `grads`
/// and returns their summed NLL.
pub(crate) fn pass(
    w: &Weights,
    dims: &Dims,
    rope: &RopeTable,
    seqs: &[Seq<'_>],
    objective: Head<'_>,
    scratch: &mut Scratch,
    grads: &mut [f32],
) -> f64 {
    let n: usize = seqs.iter().map(|s| s.inputs.len()).sum();
    let (hd, nl) = (dims.hidden, w.layers.len());
    let nh = n * hd;
    let (qw, kw) = (dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim);
    let inter = dims.intermediate;
    // Each sequence's first row, and where its attention probabilities start.
    let mut starts = Vec::with_capacity(seqs.len());
    let (mut row, mut p_at, mut widest) = (0, 0, 0);
    for s in seqs {
        let (t, prefix) = (s.inputs.len(), prefix_len(seqs, s));
        starts.push((row, p_at));
        row += t;
        p_at += dims.heads * t * (prefix + t);
        widest = widest.max(t * (prefix + t));
    }
    // A sequence's rows in the stack, and those of the prefix it continues.
    let rows_of = |i: usize| starts[i].0..starts[i].0 + seqs[i].inputs.len();
    let prefix_rows = |s: &Seq<'_>| s.parent.map_or(0..0, rows_of);
    let shape = |s: &Seq<'_>| Shape {
        t: s.inputs.len(),
        prefix: prefix_rows(s).len(),
        heads: dims.heads,
        kv_heads: dims.kv_heads,
        d: dims.head_dim,
        block: attention::BLOCK,
    };
    let rank = w
        .layers
        .iter()
        .map(|l| max_rank(&l.proj))
        .max()
        .unwrap_or(0);
    if scratch.layers.len() < nl {
        scratch.layers.resize_with(nl, Saved::default);
    }
    let Scratch {
        layers,
        xs,
        xl,
        rstdf,
        hf,
        logits,
        targets,
        dx,
        dh,
        dhf,
        dm,
        dctx,
        dq,
        dk,
        dv,
        dp,
        dz,
    } = scratch;
    let xs = take(xs, (nl + 1) * nh);
    let ids = seqs.iter().flat_map(|s| s.inputs);
    let mut rows = xs.chunks_exact_mut(hd);
    for s in seqs {
        let mut image = s.image.chunks_exact(hd);
        // The sequence's tokens first: zip takes no row past its last token.
        for (&id, row) in s.inputs.iter().zip(rows.by_ref()) {
            match (Some(id) == dims.image_token)
                .then(|| image.next())
                .flatten()
            {
                Some(features) => row.copy_from_slice(features),
                None => {
                    let id = id as usize;
                    row.copy_from_slice(&w.embed[id * hd..(id + 1) * hd]);
                }
            }
        }
    }

    // Forward.
    for (l, (lw, s)) in w.layers.iter().zip(layers.iter_mut()).enumerate() {
        let (done, rest) = xs.split_at_mut((l + 1) * nh);
        let (x, next) = (&done[l * nh..], &mut rest[..nh]);
        let [zq, zk, zv, zo, zg, zu, zd] = &mut s.z;
        let [pq, pk, pv, po, pg, pu, pdown] = &lw.proj[..] else {
            unreachable!("a layer has seven projections")
        };
        let h1 = take(&mut s.h1, nh);
        norm::forward(x, &lw.input_norm.w, dims.eps, h1, take(&mut s.rstd1, n));
        let q = take(&mut s.q, n * qw);
        linear::forward(pq, n, h1, 0.0, q, take(zq, n * rank));
        let k = take(&mut s.k, n * kw);
        linear::forward(pk, n, h1, 0.0, k, take(zk, n * rank));
        let v = take(&mut s.v, n * kw);
        linear::forward(pv, n, h1, 0.0, v, take(zv, n * rank));
        let ctx = take(&mut s.ctx, n * qw);
        let p = take(&mut s.p, p_at);
        // A prefix comes before the sequences that continue it, so its keys are rotated
        // by the time they read them.
        for (seq, &(at, p_at)) in seqs.iter().zip(&starts) {
            let (t, pre) = (seq.inputs.len(), prefix_rows(seq));
            let (prefix_k, own_k) = k.split_at_mut(at * kw);
            let own_k = &mut own_k[..t * kw];
            let q = &mut q[at * qw..(at + t) * qw];
            rope.rotate(q, qw, pre.len(), false);
            rope.rotate(own_k, kw, pre.len(), false);
            let prefix = Prefix {
                k: &prefix_k[pre.start * kw..pre.end * kw],
                v: &v[pre.start * kw..pre.end * kw],
            };
            attention::forward(
                shape(seq),
                prefix,
                q,
                own_k,
                &v[at * kw..(at + t) * kw],
                &mut p[p_at..p_at + dims.heads * t * (pre.len() + t)],
                &mut ctx[at * qw..(at + t) * qw],
            );
        }
        let mid = take(&mut s.mid, nh);
        mid.copy_from_slice(x);
        linear::forward(po, n, ctx, 1.0, mid, take(zo, n * rank));
        let h2 = take(&mut s.h2, nh);
        norm::forward(mid, &lw.post_norm.w, dims.eps, h2, take(&mut s.rstd2, n));
        let g = take(&mut s.g, n * inter);
        linear::forward(pg, n, h2, 0.0, g, take(zg, n * rank));
        let u = take(&mut s.u, n * inter);
        linear::forward(pu, n, h2, 0.0, u, take(zu, n * rank));
        let m = take(&mut s.m, n * inter);
        let sig = take(&mut s.sig, n * inter);
        for (((m, sig), &g), &u) in m.iter_mut().zip(sig.iter_mut()).zip(&*g).zip(&*u) {
            *sig = 1.0 / (1.0 + (-g).exp());
            *m = g * *sig * u;
        }
        next.copy_from_slice(mid);
        linear::forward(pdown, n, m, 1.0, next, take(zd, n * rank));
    }

    // The head, on the loss's positions only: the others' logits are never used.
    let last = &xs[nl * nh..];
    let npos: usize = seqs.iter().map(|s| s.inputs.len() - s.first).sum();
    let xl = take(xl, npos * hd);
    let targets = take(targets, npos);
    let mut g = 0;
    for (seq, &(at, _)) in seqs.iter().zip(&starts) {
        let (a, b) = (at + seq.first, at + seq.inputs.len());
        xl[g * hd..(g + b - a) * hd].copy_from_slice(&last[a * hd..b * hd]);
        targets[g..g + b - a].copy_from_slice(seq.targets);
        g += b - a;
    }
    let (vocab, head) = (dims.vocab, w.head());
    let hf = take(hf, npos * hd);
    let rstdf = take(rstdf, npos);
    let logits = take(logits, npos * vocab);
    output_head(w, dims, npos, xl, hf, rstdf, logits);
    let nll = match objective {
        Head::CrossEntropy { scale } => cross_entropy(logits, vocab, targets, scale),
        Head::Policy {
            temperature,
            coef,
            stats,
            backward,
        } => {
            let nll = policy(logits, vocab, targets, temperature, coef, stats);
            if !backward {
                return nll;
            }
            nll
        }
    };

    // Backward.
    let dhf = take(dhf, npos * hd);
    gemm(
        npos,
        vocab,
        hd,
        1.0,
        View::rows(logits, vocab),
        View::rows(head, hd),
        0.0,
        dhf,
        hd,
    );
    if let Some(at) = w.grad_lm_head {
        gemm(
            vocab,
            npos,
            hd,
            1.0,
            View::cols(logits, vocab),
            View::rows(hf, hd),
            1.0,
            &mut grads[at..at + vocab * hd],
            hd,
        );
    }
    let dx = take(dx, nh);
    dx.fill(0.0);
    let mut dwf = w.final_norm.grad.map(|at| &mut grads[at..at + hd]);
    let mut g = 0;
    for (seq, &(at, _)) in seqs.iter().zip(&starts) {
        let (a, b) = (at + seq.first, at + seq.inputs.len());
        let rows = g..g + b - a;
        norm::backward(
            &xl[rows.start * hd..rows.end * hd],
            &w.final_norm.w,
            &rstdf[rows.clone()],
            &dhf[rows.start * hd..rows.end * hd],
            &mut dx[a * hd..b * hd],
            dwf.as_deref_mut(),
        );
        g = rows.end;
    }
    let dh = take(dh, nh);
    let dm = take(dm, n * inter);
    let dctx = take(dctx, n * qw);
    let (dq, dk, dv) = (take(dq, n * qw), take(dk, n * kw), take(dv, n * kw));
    let dp = take(dp, widest);
    let dz = take(dz, n * rank);
    let need_input = w.grad_embed.is_some();
    for (l, (lw, s)) in w.layers.iter().zip(layers.iter_mut()).enumerate().rev() {
        let x = &xs[l * nh..(l + 1) * nh];
        let [pq, pk, pv, po, pg, pu, pdown] = &lw.proj[..] else {
            unreachable!("a layer has seven projections")
        };
        let [zq, zk, zv, zo, zg, zu, zd] = &s.z;
        let (g, u) = (&mut s.g[..n * inter], &mut s.u[..n * inter]);
        linear::backward(pdown, n, &s.m, zd, dx, Some((dm, 0.0)), dz, grads);
        // SiLU·up backward, in place: g and u become their gradients.
        for (((g, u), &sig), &dm) in g.iter_mut().zip(u.iter_mut()).zip(&s.sig).zip(&*dm) {
            let du = dm * *g * sig;
            *g = dm * *u * sig * (1.0 + *g * (1.0 - sig));
            *u = du;
        }
        linear::backward(pg, n, &s.h2, zg, g, Some((dh, 0.0)), dz, grads);
        linear::backward(pu, n, &s.h2, zu, u, Some((dh, 1.0)), dz, grads);
        let dw2 = lw.post_norm.grad.map(|at| &mut grads[at..at + hd]);
        norm::backward(&s.mid[..nh], &lw.post_norm.w, &s.rstd2, dh, dx, dw2);

        linear::backward(po, n, &s.ctx, zo, dx, Some((dctx, 0.0)), dz, grads);
        // A prefix's own pass writes its key and value gradients before the sequences that
        // continue it add theirs; the rotations are undone once all are in.
        for (seq, &(at, p_at)) in seqs.iter().zip(&starts) {
            let (t, pre) = (seq.inputs.len(), prefix_rows(seq));
            let (qs, ks) = (at * qw..(at + t) * qw, at * kw..(at + t) * kw);
            let (dk_before, dk_own) = dk.split_at_mut(at * kw);
            let (dv_before, dv_own) = dv.split_at_mut(at * kw);
            let prefix_grads = PrefixGrads {
                dk: &mut dk_before[pre.start * kw..pre.end * kw],
                dv: &mut dv_before[pre.start * kw..pre.end * kw],
            };
            let prefix = Prefix {
                k: &s.k[pre.start * kw..pre.end * kw],
                v: &s.v[pre.start * kw..pre.end * kw],
            };
            attention::backward(
                shape(seq),
                prefix,
                Some(prefix_grads),
                &s.q[qs.clone()],
                &s.k[ks.clone()],
                &s.v[ks],
                &s.p[p_at..p_at + dims.heads * t * (pre.len() + t)],
                &dctx[qs.clone()],
                &mut dq[qs],
                &mut dk_own[..t * kw],
                &mut dv_own[..t * kw],
                dp,
            );
        }
        for (seq, &(at, _)) in seqs.iter().zip(&starts) {
            let (t, start) = (seq.inputs.len(), prefix_rows(seq).len());
            rope.rotate(&mut dq[at * qw..(at + t) * qw], qw, start, true);
            rope.rotate(&mut dk[at * kw..(at + t) * kw], kw, start, true);
        }
        // The first layer's input gradient feeds only a trained embedding or norm.
        let input = (l > 0 || need_input || lw.input_norm.grad.is_some()).then_some(());
        linear::backward(
            pq,
            n,
            &s.h1,
            zq,
            dq,
            input.map(|_| (&mut *dh, 0.0)),
            dz,
            grads,
        );
        linear::backward(
            pk,
            n,
            &s.h1,
            zk,
            dk,
            input.map(|_| (&mut *dh, 1.0)),
            dz,
            grads,
        );
        linear::backward(
            pv,
            n,
            &s.h1,
            zv,
            dv,
            input.map(|_| (&mut *dh, 1.0)),
            dz,
            grads,
        );
        if input.is_some() {
            let dw1 = lw.input_norm.grad.map(|at| &mut grads[at..at + hd]);
            norm::backward(x, &lw.input_norm.w, &s.rstd1, dh, dx, dw1);
        }
    }
    if let Some(at) = w.grad_embed {
        // An image token's row came from the image, not the table.
        let from_table = |&(_, &id): &(&[f32], &u32)| Some(id) != dims.image_token;
        for (row, &id) in dx.chunks_exact(hd).zip(ids).filter(from_table) {
            let id = id as usize;
            for (g, d) in grads[at + id * hd..at + (id + 1) * hd].iter_mut().zip(row) {
                *g += d;
            }
        }
    }
    nll
}
