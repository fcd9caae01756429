//! [`Projector`]: LLaVA's `multi_modal_projector`, two linear layers with an activation
//! between them, from the vision tower's width to the language model's.

use candle_core::Tensor;

use super::{Activation, Affine};
use crate::error::Result;
use crate::train::model::candle;
use crate::train::model::weights::Weights;

/// The projector.
#[derive(Debug, Clone)]
pub struct Projector {
    linear_1: Affine,
    act: Activation,
    linear_2: Affine,
}

impl Projector {
    /// The projector whose tensors are named `{prefix}linear_1.…` and `{prefix}linear_2.…`,
    /// from `vision` features to `text` embeddings, with biases if `bias`.
    pub(crate) fn load(
        weights: &Weights<'_>,
        prefix: &str,
        vision: usize,
        text: usize,
        act: Activation,
        bias: bool,
    ) -> Result<Self> {
        let affine = |name: &str, out: usize, inp: usize| -> Result<Affine> {
            Ok(Affine {
                w: weights.get(&format!("{prefix}{name}.weight"), &[out, inp])?,
                b: bias
                    .then(|| weights.get(&format!("{prefix}{name}.bias"), &[out]))
                    .transpose()?,
            })
        };
        Ok(Projector {
            linear_1: affine("linear_1", text, vision)?,
            act,
            linear_2: affine("linear_2", text, text)?,
        })
    }

    /// Vision features `[…, vision]` as embeddings `[…, text]`.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        self.linear_1
            .forward(features)
            .and_then(|h| self.act.apply(&h))
            .and_then(|h| self.linear_2.forward(&h))
            .map_err(candle("multi_modal_projector"))
    }
}
