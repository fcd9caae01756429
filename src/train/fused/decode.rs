//! Generation through the fused engine: the same decoding as [`CausalLm::generate`] (the same
//! samplers, seeds, stopping rule and checks) on the engine's plain f32 weights, with a KV
//! cache written in place. Each row is its own unpadded sequence, so a prompt needs no padding
//! and a finished row costs nothing; rows whose prompts start alike (a group's rollouts) share
//! the prefill of that start; every step's live rows go through each projection as one
//! product. Candle's per-operation overhead and its cache's concatenation at every step are
//! what this avoids: on small models they, not the arithmetic, set the speed.
//!
//! [`CausalLm::generate`]: crate::train::model::CausalLm::generate

use super::attention::{softmax, RopeTable};
use super::linear;
use super::norm;
use super::share::{clusters, image_kinds, Cluster};
use super::step::{output_head, take};
use super::weights::Weights;
use super::Dims;
use crate::error::Result;
use crate::train::batch::ImageRows;
use crate::train::model::GenerateOptions;

/// Every layer's keys and values, `[rows, capacity, kv_width]` per layer; row r's position p
/// is written when its token is fed.
struct Cache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    capacity: usize,
    width: usize,
}

impl Cache {
    fn new(layers: usize, rows: usize, capacity: usize, width: usize) -> Self {
        let len = rows * capacity * width;
        Cache {
            keys: vec![vec![0.0; len]; layers],
            values: vec![vec![0.0; len]; layers],
            capacity,
            width,
        }
    }

    /// Copies the first `len` positions of row `source` into row `row`, in every layer (none
    /// when they are the same row).
    fn copy_row(&mut self, source: usize, row: usize, len: usize) {
        if source == row {
            return;
        }
        let (from, to, n) = (self.at(source, 0), self.at(row, 0), len * self.width);
        for layer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            layer.copy_within(from..from + n, to);
        }
    }

    /// Where row `row`'s position `pos` starts in a layer's buffers.
    fn at(&self, row: usize, pos: usize) -> usize {
        (row * self.capacity + pos) * self.width
    }
}

/// A token fed to the model: its row, its position in the row, its id, and the image row it
/// takes instead of its embedding (an image token's).
#[derive(Debug, Clone, Copy)]
struct Token<'a> {
    row: usize,
    pos: usize,
    id: u32,
    image: Option<&'a [f32]>,
}

/// Each prompt token's image row, if it is an image token and the prompt shows an image: the
/// k-th image token takes the image's k-th row.
fn image_rows<'a>(
    prompt: &[u32],
    image: Option<&'a ImageRows>,
    image_token: Option<u32>,
) -> Vec<Option<&'a [f32]>> {
    let mut rows = image.map(|i| i.values.chunks_exact(i.width));
    prompt
        .iter()
        .map(|&id| match &mut rows {
            Some(rows) if Some(id) == image_token => rows.next(),
            _ => None,
        })
        .collect()
}

/// Working memory, reused from step to step.
#[derive(Default)]
struct Buffers {
    x: Vec<f32>,
    h: Vec<f32>,
    rstd: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    ctx: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    scores: Vec<f32>,
    last: Vec<f32>,
    logits: Vec<f32>,
}

/// Continues every prompt as [`CausalLm::generate`] does (the prompts' tokens already checked
/// against the vocabulary, and their image tokens against `images`, one per prompt or none):
/// each row's new tokens, its end-of-sequence token included when it produced one.
///
/// [`CausalLm::generate`]: crate::train::model::CausalLm::generate
pub(crate) fn generate(
    w: &Weights,
    dims: &Dims,
    rope: &RopeTable,
    prompts: &[Vec<u32>],
    images: &[Option<&ImageRows>],
    options: &GenerateOptions,
) -> Result<Vec<Vec<u32>>> {
    let image_of = |row: usize| images.get(row).copied().flatten();
    let mut samplers = options.samplers(prompts.len())?;
    let mut out = vec![Vec::new(); prompts.len()];
    if prompts.is_empty() || options.max_new_tokens == 0 {
        return Ok(out);
    }
    options.check_prompts(prompts, rope.positions())?;
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let kv_width = dims.kv_heads * dims.head_dim;
    let mut cache = Cache::new(
        w.layers.len(),
        prompts.len(),
        width + options.max_new_tokens,
        kv_width,
    );
    let mut buffers = Buffers::default();
    // The prefill. Rows whose prompts start alike (a group's rollouts) run the common start
    // once, in their first row, whose keys and values the others copy; then every row runs the
    // rest of its prompt, with logits at its last token.
    let starts: Vec<&[u32]> = prompts.iter().map(|p| &p[..p.len() - 1]).collect();
    let shown: Vec<Vec<Option<&[f32]>>> = prompts
        .iter()
        .enumerate()
        .map(|(row, p)| image_rows(p, image_of(row), dims.image_token))
        .collect();
    let token = |row: usize, pos: usize| Token {
        row,
        pos,
        id: prompts[row][pos],
        image: shown[row][pos],
    };
    let mut tokens: Vec<Token> = Vec::with_capacity(prompts.iter().map(Vec::len).sum());
    let mut done_to = vec![0; prompts.len()];
    let kinds = image_kinds(&(0..prompts.len()).map(image_of).collect::<Vec<_>>());
    let shared: Vec<Cluster> = clusters(&starts, &kinds)
        .into_iter()
        .filter(|c| c.members.len() > 1)
        .collect();
    for c in &shared {
        let row = c.members[0];
        tokens.extend((0..c.shared).map(|pos| token(row, pos)));
    }
    if !tokens.is_empty() {
        forward(w, dims, rope, &mut cache, &tokens, &[], &mut buffers);
        for c in &shared {
            for &row in &c.members {
                cache.copy_row(c.members[0], row, c.shared);
                done_to[row] = c.shared;
            }
        }
    }
    tokens.clear();
    let mut heads = Vec::with_capacity(prompts.len());
    for (row, p) in prompts.iter().enumerate() {
        tokens.extend((done_to[row]..p.len()).map(|pos| token(row, pos)));
        heads.push(tokens.len() - 1);
    }
    let mut live: Vec<usize> = (0..prompts.len()).collect();
    let vocab = dims.vocab;
    for step in 0..options.max_new_tokens {
        let logits = forward(w, dims, rope, &mut cache, &tokens, &heads, &mut buffers);
        let mut next = Vec::with_capacity(live.len());
        for (&row, logits) in live.iter().zip(logits.chunks_exact(vocab)) {
            let token = samplers[row].sample(logits)?;
            out[row].push(token);
            if !options.eos_token_ids.contains(&token) {
                next.push(row);
            }
        }
        if next.is_empty() || step + 1 == options.max_new_tokens {
            break;
        }
        tokens.clear();
        tokens.extend(next.iter().map(|&row| Token {
            row,
            pos: prompts[row].len() + out[row].len() - 1,
            id: *out[row].last().expect("a live row has a token"),
            image: None,
        }));
        heads.clear();
        heads.extend(0..next.len());
        live = next;
    }
    Ok(out)
}

/// Feeds `tokens` through the model, writing their keys and values into the cache (a row's
/// tokens in position order, so that each attends to those before it), and returns the logits
/// `[heads.len(), vocab]` of the tokens at indices `heads`.
fn forward<'b>(
    w: &Weights,
    dims: &Dims,
    rope: &RopeTable,
    cache: &mut Cache,
    tokens: &[Token],
    heads: &[usize],
    b: &'b mut Buffers,
) -> &'b [f32] {
    let (n, hd, inter) = (tokens.len(), dims.hidden, dims.intermediate);
    let (qw, kw) = (dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim);
    let x = take(&mut b.x, n * hd);
    for (row, t) in x.chunks_exact_mut(hd).zip(tokens) {
        let id = t.id as usize;
        row.copy_from_slice(t.image.unwrap_or(&w.embed[id * hd..(id + 1) * hd]));
    }
    let (h, rstd) = (take(&mut b.h, n * hd), take(&mut b.rstd, n));
    let (q, k, v) = (
        take(&mut b.q, n * qw),
        take(&mut b.k, n * kw),
        take(&mut b.v, n * kw),
    );
    let ctx = take(&mut b.ctx, n * qw);
    let (gate, up) = (take(&mut b.gate, n * inter), take(&mut b.up, n * inter));
    for (l, lw) in w.layers.iter().enumerate() {
        let [pq, pk, pv, po, pg, pu, pdown] = &lw.proj[..] else {
            unreachable!("a layer has seven projections")
        };
        norm::forward(x, &lw.input_norm.w, dims.eps, h, rstd);
        linear::apply(pq, n, h, 0.0, q);
        linear::apply(pk, n, h, 0.0, k);
        linear::apply(pv, n, h, 0.0, v);
        for (i, t) in tokens.iter().enumerate() {
            rope.rotate_token(&mut q[i * qw..(i + 1) * qw], t.pos, false);
            rope.rotate_token(&mut k[i * kw..(i + 1) * kw], t.pos, false);
            let at = cache.at(t.row, t.pos);
            cache.keys[l][at..at + kw].copy_from_slice(&k[i * kw..(i + 1) * kw]);
            cache.values[l][at..at + kw].copy_from_slice(&v[i * kw..(i + 1) * kw]);
        }
        for (i, t) in tokens.iter().enumerate() {
            let (from, to) = (cache.at(t.row, 0), cache.at(t.row, t.pos + 1));
            attend(
                dims,
                &q[i * qw..(i + 1) * qw],
                &cache.keys[l][from..to],
                &cache.values[l][from..to],
                &mut b.scores,
                &mut ctx[i * qw..(i + 1) * qw],
            );
        }
        linear::apply(po, n, ctx, 1.0, x);
        norm::forward(x, &lw.post_norm.w, dims.eps, h, rstd);
        linear::apply(pg, n, h, 0.0, gate);
        linear::apply(pu, n, h, 0.0, up);
        for (g, &u) in gate.iter_mut().zip(&*up) {
            *g = *g * (1.0 / (1.0 + (-*g).exp())) * u;
        }
        linear::apply(pdown, n, gate, 1.0, x);
    }
    let m = heads.len();
    let last = take(&mut b.last, m * hd);
    for (row, &i) in last.chunks_exact_mut(hd).zip(heads) {
        row.copy_from_slice(&x[i * hd..(i + 1) * hd]);
    }
    let logits = take(&mut b.logits, m * dims.vocab);
    output_head(w, dims, m, last, &mut h[..m * hd], &mut rstd[..m], logits);
    logits
}

/// One query token's attention over its row's cached keys and values (`[len, kv_width]`, the
/// token's own last): each head's softmax of `q·kᵀ/√d`, as the training pass computes it.
fn attend(
    dims: &Dims,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (d, kw) = (dims.head_dim, dims.kv_heads * dims.head_dim);
    let len = keys.len() / kw;
    let group = dims.heads / dims.kv_heads;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let s = take(scores, len);
    for h in 0..dims.heads {
        let kv = h / group;
        let qh = &q[h * d..(h + 1) * d];
        for (sj, key) in s.iter_mut().zip(keys.chunks_exact(kw)) {
            *sj = scale * dot(qh, &key[kv * d..(kv + 1) * d]);
        }
        softmax(s);
        let oh = &mut out[h * d..(h + 1) * d];
        oh.fill(0.0);
        for (&p, value) in s.iter().zip(values.chunks_exact(kw)) {
            for (o, &x) in oh.iter_mut().zip(&value[kv * d..(kv + 1) * d]) {
                *o += p * x;
            }
        }
    }
}

/// `a·b` over eight running sums, which the compiler can keep in one vector register (a single
/// sum in order cannot be vectorised: f32 addition is not associative).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::dot;

    #[test]
    fn dot_sums_every_product() {
        let a: Vec<f32> = (1..=11).map(|i| i as f32).collect();
        let b = vec![2f32; 11];
        // 2·(1 + … + 11) = 132, with a tail of three past the eight-wide chunk.
        assert_eq!(dot(&a, &b), 132.0);
        assert_eq!(dot(&a[..8], &b[..8]), 72.0);
    }
}
