//! [`Projector`]: LLaVA's `multi_modal_projector`, two linear layers with an activation
//! between them, from the vision tower's width to the language model's.

use candle_core::{Tensor, Var};

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

    /// Its tensors by their names within the module (`linear_1.weight`, `linear_1.bias`, …).
    pub(crate) fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (name, affine) in [("linear_1", &self.linear_1), ("linear_2", &self.linear_2)] {
            out.push((format!("{name}.weight"), affine.w.clone()));
            if let Some(b) = &affine.b {
                out.push((format!("{name}.bias"), b.clone()));
            }
        }
        out
    }

    /// Replaces the tensor named `name` (as [`Projector::tensors`] names it) by `value`, of
    /// its shape.
    pub(crate) fn set(&mut self, name: &str, value: Tensor) -> std::result::Result<(), String> {
        let slot = match name {
            "linear_1.weight" => Some(&mut self.linear_1.w),
            "linear_2.weight" => Some(&mut self.linear_2.w),
            "linear_1.bias" => self.linear_1.b.as_mut(),
            "linear_2.bias" => self.linear_2.b.as_mut(),
            _ => None,
        }
        .ok_or_else(|| format!("the projector has no tensor `{name}`"))?;
        if slot.dims() != value.dims() {
            return Err(format!(
                "`{name}` is {:?}; the projector's is {:?}",
                value.dims(),
                slot.dims()
            ));
        }
        *slot = value;
        Ok(())
    }

    /// Turns its tensors into variables, which it reads from then on (so that an optimizer's
    /// updates reach it): returned with [`Projector::tensors`]' names.
    pub(crate) fn make_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let mut vars = Vec::new();
        for (name, tensor) in self.tensors() {
            let var = Var::from_tensor(&tensor).map_err(candle(format!("projector `{name}`")))?;
            self.set(&name, var.as_tensor().clone())
                .expect("a tensor of its own shape");
            vars.push((name, var));
        }
        Ok(vars)
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
