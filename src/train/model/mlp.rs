//! [`Mlp`]: the SwiGLU feed-forward block, `down(silu(gate(x)) · up(x))`.

use candle_core::Tensor;

use super::lora::LoraLinear;

/// The feed-forward block of one decoder layer.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub(super) gate: LoraLinear,
    pub(super) up: LoraLinear,
    pub(super) down: LoraLinear,
}

impl Mlp {
    /// The block from its gate, up and down projections.
    pub fn new(projections: [LoraLinear; 3]) -> Self {
        let [gate, up, down] = projections;
        Mlp { gate, up, down }
    }

    /// Applies the block to `x [.., hidden]`.
    pub fn forward(&self, x: &Tensor, lora: bool, train: bool) -> candle_core::Result<Tensor> {
        let gate = self.gate.forward(x, lora, train)?.silu()?;
        let up = self.up.forward(x, lora, train)?;
        self.down.forward(&(gate * up)?, lora, train)
    }
}
