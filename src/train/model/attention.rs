//! [`Attention`]: causal grouped-query self-attention with rotary positions and LoRA-capable
//! projections, written from differentiable operations (`candle_nn::ops::softmax`, not the
//! fused `softmax_last_dim`, which records no gradient).

use candle_core::{Tensor, D};

use super::cache::KvCache;
use super::lora::LoraLinear;
use super::norm::upcast;
use super::rope::Rope;

/// The attention of one decoder layer.
#[derive(Debug, Clone)]
pub struct Attention {
    pub(super) q: LoraLinear,
    pub(super) k: LoraLinear,
    pub(super) v: LoraLinear,
    pub(super) o: LoraLinear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// What one attention call needs besides its input: the rotary tables for the new positions,
/// the additive mask, the cache (with this layer's index), and the LoRA and training switches.
pub(crate) struct Context<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub bias: &'a Tensor,
    pub lora: bool,
    pub train: bool,
}

/// Repeats each of `x [b, kv, t, d]`'s heads `n` times in place: `[b, kv·n, t, d]`, head h
/// being kv head h / n (Hugging Face's `repeat_kv`).
fn repeat_heads(x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n, t, d))?
        .reshape((b, kv * n, t, d))
}

impl Attention {
    /// Attention from its four projections and head counts.
    pub fn new(
        projections: [LoraLinear; 4],
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        let [q, k, v, o] = projections;
        Attention {
            q,
            k,
            v,
            o,
            num_heads,
            num_kv_heads,
            head_dim,
        }
    }

    /// Attends `x [b, s, hidden]` over the cached keys (if any) and its own.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        ctx: &Context<'_>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> candle_core::Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let heads = |proj: &LoraLinear, n: usize| -> candle_core::Result<Tensor> {
            proj.forward(x, ctx.lora, ctx.train)?
                .reshape((b, s, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = Rope::apply(&heads(&self.q, self.num_heads)?, ctx.cos, ctx.sin)?;
        let k = Rope::apply(&heads(&self.k, self.num_kv_heads)?, ctx.cos, ctx.sin)?;
        let v = heads(&self.v, self.num_kv_heads)?;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, &k, &v)?,
            None => (k, v),
        };
        let n = self.num_heads / self.num_kv_heads;
        let k = repeat_heads(&k, n)?;
        let v = repeat_heads(&v, n)?;

        let scores = (q.matmul(&k.t()?)? * (1.0 / (self.head_dim as f64).sqrt()))?;
        let scores = scores.broadcast_add(ctx.bias)?;
        let dtype = scores.dtype();
        let probs = candle_nn::ops::softmax(&scores.to_dtype(upcast(dtype))?, D::Minus1)?
            .to_dtype(dtype)?;
        let out =
            probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, s, self.num_heads * self.head_dim))?;
        self.o.forward(&out, ctx.lora, ctx.train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn repeated_heads_follow_their_kv_head() {
        let x = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 2, 2))
            .unwrap();
        let y = repeat_heads(&x, 3).unwrap();
        assert_eq!(y.dims(), [1, 6, 2, 2]);
        let heads: Vec<Vec<Vec<f32>>> = y.squeeze(0).unwrap().to_vec3().unwrap();
        for (h, head) in heads.iter().enumerate() {
            let base = (h / 3) as f32 * 4.0;
            assert_eq!(
                head,
                &[[base, base + 1.0], [base + 2.0, base + 3.0]],
                "head {h}"
            );
        }
    }
}
