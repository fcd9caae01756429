//! AdamW with f32 moments, as `torch.optim.AdamW` defines it (decoupled weight decay, bias
//! correction), global-norm gradient clipping, and the optimizer's state for checkpoints.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use super::model::candle;
use crate::error::{Error, Result};

/// AdamW's hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β₁, β₂.
    pub betas: (f64, f64),
    /// Added to √v̂.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW over named variables; the moments are f32 whatever the variables' dtype.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    /// Optimizer steps taken.
    step: u64,
    /// (name, variable, first moment, second moment).
    slots: Vec<(String, Var, Tensor, Tensor)>,
}

impl AdamW {
    /// An optimizer for `vars` with zero moments.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<AdamW> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())
                    .map_err(candle(format!("moments of `{name}`")))?;
                Ok((name, var, zeros.clone(), zeros))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            config,
            step: 0,
            slots,
        })
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The variables, in order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|(n, v, _, _)| (n.as_str(), v))
    }

    /// One update with learning rate `lr` from `grads` (one per variable, in order, f32).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.slots.len() {
            return Err(Error::ModelInput {
                message: format!(
                    "{} gradients for {} variables",
                    grads.len(),
                    self.slots.len()
                ),
            });
        }
        self.step += 1;
        let (b1, b2) = self.config.betas;
        let t = self.step as i32;
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for ((name, var, m, v), g) in self.slots.iter_mut().zip(grads) {
            let ctx = || candle(format!("AdamW step of `{name}`"));
            let g = g.to_dtype(DType::F32).map_err(ctx())?;
            *m = ((&*m * b1).map_err(ctx())? + (&g * (1.0 - b1)).map_err(ctx())?).map_err(ctx())?;
            *v = ((&*v * b2).map_err(ctx())?
                + (g.sqr().map_err(ctx())? * (1.0 - b2)).map_err(ctx())?)
            .map_err(ctx())?;
            let m_hat = (&*m / c1).map_err(ctx())?;
            let v_hat = (&*v / c2).map_err(ctx())?;
            let update = (m_hat
                / (v_hat.sqrt().map_err(ctx())? + self.config.eps).map_err(ctx())?)
            .map_err(ctx())?;
            let p = var.as_tensor().to_dtype(DType::F32).map_err(ctx())?;
            let decayed = (&p * (1.0 - lr * self.config.weight_decay)).map_err(ctx())?;
            let next = (decayed - (update * lr).map_err(ctx())?).map_err(ctx())?;
            var.set(&next.to_dtype(var.dtype()).map_err(ctx())?)
                .map_err(ctx())?;
        }
        Ok(())
    }

    /// The moments by name (`<name>.exp_avg`, `<name>.exp_avg_sq`), for a checkpoint.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut state = BTreeMap::new();
        for (name, _, m, v) in &self.slots {
            state.insert(format!("{name}.exp_avg"), m.clone());
            state.insert(format!("{name}.exp_avg_sq"), v.clone());
        }
        state
    }

    /// Restores the moments and the step count of a checkpoint; every moment must be there
    /// with its variable's shape.
    pub fn restore(&mut self, state: &BTreeMap<String, Tensor>, steps: u64) -> Result<()> {
        for (name, var, m, v) in &mut self.slots {
            for (suffix, slot) in [("exp_avg", &mut *m), ("exp_avg_sq", &mut *v)] {
                let key = format!("{name}.{suffix}");
                let saved = state.get(&key).ok_or_else(|| Error::ModelInput {
                    message: format!("the optimizer state has no `{key}`"),
                })?;
                if saved.dims() != var.dims() {
                    return Err(Error::ModelInput {
                        message: format!(
                            "the optimizer state `{key}` is {:?}, the variable {:?}",
                            saved.dims(),
                            var.dims()
                        ),
                    });
                }
                *slot = saved.to_dtype(DType::F32).map_err(candle(key.clone()))?;
            }
        }
        self.step = steps;
        Ok(())
    }
}

/// The global L2 norm of `grads`, and the factor that scales it down to `max_norm` (1 when it
/// is already within it), as `torch.nn.utils.clip_grad_norm_`.
pub fn clip_factor(grads: &[Tensor], max_norm: f64) -> Result<(f64, f64)> {
    let mut sum = 0f64;
    for g in grads {
        sum += g
            .to_dtype(DType::F64)
            .and_then(|g| g.sqr())
            .and_then(|g| g.sum_all())
            .and_then(|s| s.to_scalar::<f64>())
            .map_err(candle("gradient norm"))?;
    }
    let norm = sum.sqrt();
    let factor = if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    };
    Ok((norm, factor))
}

/// `grads` scaled down to a global norm of `max_norm` where they exceed it (0: no clipping),
/// and their norm before.
pub fn clip_gradients(grads: Vec<Tensor>, max_norm: f64) -> Result<(Vec<Tensor>, f64)> {
    let (norm, factor) = clip_factor(&grads, max_norm)?;
    if factor >= 1.0 {
        return Ok((grads, norm));
    }
    let scaled = grads
        .iter()
        .map(|g| (g * factor).map_err(candle("clipping")))
        .collect::<Result<Vec<_>>>()?;
    Ok((scaled, norm))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn two_adamw_steps_by_hand() {
        // One scalar p = 1, lr 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.1.
        let var = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let config = AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(vec![("p".into(), var.clone())], config).unwrap();
        let g = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
        opt.step(std::slice::from_ref(&g), 0.1).unwrap();
        // Step 1: m̂ = g, v̂ = g², update = g/|g| = 1: p = 1·(1 − 0.01) − 0.1 = 0.89.
        let p1 = var.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((p1 - 0.89).abs() < 1e-6, "{p1}");
        opt.step(&[g], 0.1).unwrap();
        // Step 2, same gradient: m̂ = g, v̂ = g² again: p = 0.89·0.99 − 0.1 = 0.7811.
        let p2 = var.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((p2 - 0.7811).abs() < 1e-6, "{p2}");
        assert_eq!(opt.steps(), 2);
        // The state round-trips.
        let state = opt.state();
        let mut other = AdamW::new(vec![("p".into(), var)], config).unwrap();
        other.restore(&state, 2).unwrap();
        assert_eq!(
            other.state()["p.exp_avg"].to_vec1::<f32>().unwrap(),
            state["p.exp_avg"].to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let g = [
            Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
        ];
        let (norm, factor) = clip_factor(&g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-12);
        assert!((factor - 1.0 / (5.0 + 1e-6)).abs() < 1e-12);
        assert_eq!(clip_factor(&g, 10.0).unwrap().1, 1.0);
    }
}
