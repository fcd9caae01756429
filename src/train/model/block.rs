//! [`Block`]: one pre-norm decoder layer, `h = x + attn(norm₁(x))`, `y = h + mlp(norm₂(h))`.

use candle_core::Tensor;

use super::attention::{Attention, Context};
use super::cache::KvCache;
use super::lora::LoraLinear;
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::projection::Projection;

/// A decoder layer.
#[derive(Debug, Clone)]
pub struct Block {
    input_norm: RmsNorm,
    attention: Attention,
    post_attention_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// A layer from its parts.
    pub fn new(
        input_norm: RmsNorm,
        attention: Attention,
        post_attention_norm: RmsNorm,
        mlp: Mlp,
    ) -> Self {
        Block {
            input_norm,
            attention,
            post_attention_norm,
            mlp,
        }
    }

    /// One of its seven projections.
    pub fn projection(&self, p: Projection) -> &LoraLinear {
        match p {
            Projection::Q => &self.attention.q,
            Projection::K => &self.attention.k,
            Projection::V => &self.attention.v,
            Projection::O => &self.attention.o,
            Projection::Gate => &self.mlp.gate,
            Projection::Up => &self.mlp.up,
            Projection::Down => &self.mlp.down,
        }
    }

    /// Mutable access to one of its seven projections.
    pub fn projection_mut(&mut self, p: Projection) -> &mut LoraLinear {
        match p {
            Projection::Q => &mut self.attention.q,
            Projection::K => &mut self.attention.k,
            Projection::V => &mut self.attention.v,
            Projection::O => &mut self.attention.o,
            Projection::Gate => &mut self.mlp.gate,
            Projection::Up => &mut self.mlp.up,
            Projection::Down => &mut self.mlp.down,
        }
    }

    /// The norms before attention and before the MLP.
    pub(crate) fn norms(&self) -> (&RmsNorm, &RmsNorm) {
        (&self.input_norm, &self.post_attention_norm)
    }

    /// Applies the layer to the residual stream `x [b, s, hidden]`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        ctx: &Context<'_>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> candle_core::Result<Tensor> {
        let attended = self
            .attention
            .forward(&self.input_norm.forward(x)?, ctx, cache)?;
        let h = (x + attended)?;
        let fed = self
            .mlp
            .forward(&self.post_attention_norm.forward(&h)?, ctx.lora, ctx.train)?;
        h + fed
    }
}
