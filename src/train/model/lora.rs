//! [`LoraLinear`], a frozen linear layer with an optional trainable low-rank update, and
//! [`LoraSpec`], which says where such updates go and how they are scaled and initialised.
//!
//! The semantics are PEFT's: `y = x·Wᵀ + b + s·((dropout(x)·Aᵀ)·Bᵀ)` with `A [r, in]`,
//! `B [out, r]`, `s = alpha / r` (or `alpha / √r` with rsLoRA), A drawn Kaiming-uniform as
//! `nn.init.kaiming_uniform_(a=√5)` draws it (uniform in ±1/√in) and B zero, so that a fresh
//! adapter changes nothing.

use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use super::input_gram::InputGram;

use crate::rng::SplitMix;

/// The target name that selects every projection of every layer (PEFT's `all-linear`, which
/// leaves the output head out).
pub const ALL_LINEAR: &str = "all-linear";

/// Where LoRA updates go and how they are made.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The rank r.
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// Dropout on the LoRA branch's input, in training mode only.
    pub dropout: f64,
    /// Scale by `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Module names (`q_proj`, `self_attn.o_proj`, `model.layers.0.mlp.up_proj`) matched
    /// against each module path's end at a `.` boundary, as PEFT matches a list; or
    /// `all-linear`. Each must match at least one module.
    pub target_modules: Vec<String>,
    /// Seeds the draw of every A; the same seed gives the same adapter.
    pub seed: u64,
}

/// Why a LoRA spec was refused, naming the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoraSpecError {
    /// `r = 0`.
    #[error("LoRA `r` must be positive")]
    ZeroRank,
    /// A non-finite `lora_alpha`.
    #[error("`lora_alpha` {0} is not finite")]
    Alpha(f64),
    /// `lora_dropout` outside [0, 1).
    #[error("`lora_dropout` {0} is outside [0, 1)")]
    Dropout(f64),
    /// No target modules.
    #[error("LoRA `target_modules` is empty")]
    NoTargets,
}

impl LoraSpec {
    /// A spec with PEFT's other defaults: no dropout, no rsLoRA, seed 0.
    pub fn new(r: usize, alpha: f64, target_modules: Vec<String>) -> Self {
        LoraSpec {
            r,
            alpha,
            dropout: 0.0,
            use_rslora: false,
            target_modules,
            seed: 0,
        }
    }

    /// The scaling s of a module of rank `r` under this spec's alpha and rsLoRA setting.
    pub fn scaling(&self) -> f64 {
        scaling(self.alpha, self.r, self.use_rslora)
    }

    /// Checks the numbers; the error names the field.
    pub fn check(&self) -> Result<(), LoraSpecError> {
        if self.r == 0 {
            return Err(LoraSpecError::ZeroRank);
        }
        if !self.alpha.is_finite() {
            return Err(LoraSpecError::Alpha(self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraSpecError::Dropout(self.dropout));
        }
        if self.target_modules.is_empty() {
            return Err(LoraSpecError::NoTargets);
        }
        Ok(())
    }

    /// Whether `target` selects the module at `path` (`model.layers.0.self_attn.q_proj`).
    pub fn target_matches(target: &str, path: &str) -> bool {
        target == ALL_LINEAR
            || path == target
            || path
                .strip_suffix(target)
                .is_some_and(|head| head.ends_with('.'))
    }

    /// Whether any target selects the module at `path`.
    pub fn selects(&self, path: &str) -> bool {
        self.target_modules
            .iter()
            .any(|t| Self::target_matches(t, path))
    }
}

/// `alpha / r`, or `alpha / √r` with rsLoRA.
pub(crate) fn scaling(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// The dtype LoRA factors are kept in for a model of `dtype`: f32 master weights under a
/// half-precision base (half-precision optimiser state is fragile), f64 under an f64 base.
pub(crate) fn lora_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The trainable part of an adapted layer.
#[derive(Debug, Clone)]
struct Factors {
    a: Var,
    b: Var,
    alpha: f64,
    scaling: f64,
    dropout: f32,
}

/// A linear layer `x·Wᵀ + b` with frozen `W [out, in]` and `b`, and an optional LoRA update.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<Factors>,
    /// Sums the layer's inputs' Gram while set (calibration).
    tap: Option<Arc<InputGram>>,
}

/// `x·wᵀ` for `x [.., in]` and `w [out, in]`, through one 2-D product.
pub(crate) fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let (lead, inner) = dims.split_at(dims.len().saturating_sub(1));
    let rows = lead.iter().product::<usize>();
    let flat = x.reshape((rows, inner.iter().product::<usize>()))?;
    let y = flat.matmul(&w.t()?)?;
    let mut shape = lead.to_vec();
    shape.push(w.dim(0)?);
    y.reshape(shape)
}

impl LoraLinear {
    /// A plain (not adapted) layer.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        LoraLinear {
            weight,
            bias,
            lora: None,
            tap: None,
        }
    }

    /// `(out_features, in_features)`.
    pub fn shape(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    /// Adds a fresh PEFT-initialised update of rank `r`: A uniform in ±1/√in drawn from
    /// `seed`, B zero, both in f32 (f64 under an f64 base weight).
    pub fn init_lora(
        &mut self,
        r: usize,
        alpha: f64,
        scaling: f64,
        dropout: f64,
        seed: u64,
    ) -> candle_core::Result<()> {
        let (out_features, in_features) = self.shape();
        let bound = 1.0 / (in_features as f64).sqrt();
        let mut rng = SplitMix::new(seed);
        let values: Vec<f64> = (0..r * in_features)
            .map(|_| bound * (2.0 * unit(&mut rng) - 1.0))
            .collect();
        let dtype = lora_dtype(self.weight.dtype());
        let device = self.weight.device();
        let a = Tensor::from_vec(values, (r, in_features), device)?.to_dtype(dtype)?;
        let b = Tensor::zeros((out_features, r), dtype, device)?;
        self.set_lora(a, b, alpha, scaling, dropout)
    }

    /// Sets the update from given factors `a [r, in]` and `b [out, r]` (copied into new
    /// trainable variables, f32 or f64 as for [`init_lora`](Self::init_lora)).
    pub fn set_lora(
        &mut self,
        a: Tensor,
        b: Tensor,
        alpha: f64,
        scaling: f64,
        dropout: f64,
    ) -> candle_core::Result<()> {
        let (out_features, in_features) = self.shape();
        let (r, a_in) = a.dims2()?;
        let (b_out, b_r) = b.dims2()?;
        if r == 0 || a_in != in_features || b_out != out_features || b_r != r {
            candle_core::bail!(
                "LoRA factors of shapes {:?} and {:?} do not fit a [{out_features}, {in_features}] weight",
                a.dims(),
                b.dims()
            );
        }
        let dtype = lora_dtype(self.weight.dtype());
        self.lora = Some(Factors {
            a: Var::from_tensor(&a.to_dtype(dtype)?)?,
            b: Var::from_tensor(&b.to_dtype(dtype)?)?,
            alpha,
            scaling,
            dropout: dropout as f32,
        });
        Ok(())
    }

    /// Sums the Gram of every input the layer is fed into `tap` from now on (`None`: stops).
    pub fn set_input_gram(&mut self, tap: Option<Arc<InputGram>>) {
        self.tap = tap;
    }

    /// Makes the frozen weight a variable (a copy of it) so that a backward pass reaches it,
    /// and returns that variable: calibration squares its gradients (the diagonal Fisher).
    pub fn track_weight(&mut self) -> candle_core::Result<Var> {
        let var = Var::from_tensor(&self.weight)?;
        self.weight = var.as_tensor().clone();
        Ok(var)
    }

    /// Freezes the weight again after [`track_weight`](Self::track_weight) (same values).
    pub fn freeze_weight(&mut self) {
        self.weight = self.weight.detach();
    }

    /// Removes the update.
    pub fn remove_lora(&mut self) {
        self.lora = None;
    }

    /// The frozen weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The frozen bias `[out]`, if any.
    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The down factor A `[r, in]`, if adapted.
    pub fn lora_a(&self) -> Option<&Var> {
        self.lora.as_ref().map(|f| &f.a)
    }

    /// The up factor B `[out, r]`, if adapted.
    pub fn lora_b(&self) -> Option<&Var> {
        self.lora.as_ref().map(|f| &f.b)
    }

    /// The rank, if adapted.
    pub fn rank(&self) -> Option<usize> {
        self.lora.as_ref().map(|f| f.a.dim(0).unwrap_or(0))
    }

    /// `lora_alpha`, if adapted.
    pub fn alpha(&self) -> Option<f64> {
        self.lora.as_ref().map(|f| f.alpha)
    }

    /// The scaling s, if adapted.
    pub fn scaling(&self) -> Option<f64> {
        self.lora.as_ref().map(|f| f.scaling)
    }

    /// The dropout probability of the LoRA branch, if adapted.
    pub fn dropout(&self) -> Option<f64> {
        self.lora.as_ref().map(|f| f64::from(f.dropout))
    }

    /// `y = x·Wᵀ + b`, plus `s·((dropout(x)·Aᵀ)·Bᵀ)` when adapted and `lora` is on; dropout
    /// only when `train`. The update is computed in the factors' dtype and added in `x`'s.
    pub fn forward(&self, x: &Tensor, lora: bool, train: bool) -> candle_core::Result<Tensor> {
        if let Some(tap) = &self.tap {
            tap.add(x)?;
        }
        let mut y = matmul_t(x, &self.weight)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        let Some(f) = self.lora.as_ref().filter(|_| lora) else {
            return Ok(y);
        };
        let input = if train && f.dropout > 0.0 {
            candle_nn::ops::dropout(x, f.dropout)?
        } else {
            x.clone()
        };
        let input = input.to_dtype(f.a.dtype())?;
        let down = matmul_t(&input, f.a.as_tensor())?;
        let up = matmul_t(&down, f.b.as_tensor())?;
        let update = (up * f.scaling)?.to_dtype(y.dtype())?;
        y + update
    }
}

/// A uniform draw in [0, 1) with 53 random bits.
pub(crate) fn unit(rng: &mut SplitMix) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn sum_sq(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    fn linear(out_f: usize, in_f: usize) -> LoraLinear {
        let w: Vec<f32> = (0..out_f * in_f).map(|i| (i as f32 * 0.37).sin()).collect();
        let w = Tensor::from_vec(w, (out_f, in_f), &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.5f32, -1.0, 2.0][..out_f], &Device::Cpu).unwrap();
        LoraLinear::new(w, Some(b))
    }

    #[test]
    fn init_is_seeded_kaiming_uniform_with_zero_b() {
        let mut l = linear(3, 16);
        l.init_lora(4, 8.0, 2.0, 0.0, 7).unwrap();
        let a: Vec<Vec<f32>> = l.lora_a().unwrap().to_vec2().unwrap();
        let bound = 1.0 / 4.0;
        let flat: Vec<f32> = a.concat();
        assert!(flat.iter().all(|v| v.abs() <= bound), "{flat:?}");
        // Spread over the interval, not bunched: some values beyond half the bound each side.
        assert!(flat.iter().any(|&v| v > bound / 2.0) && flat.iter().any(|&v| v < -bound / 2.0));
        assert_eq!(sum_sq(l.lora_b().unwrap()), 0.0);
        let mut again = linear(3, 16);
        again.init_lora(4, 8.0, 2.0, 0.0, 7).unwrap();
        assert_eq!(again.lora_a().unwrap().to_vec2::<f32>().unwrap(), a);
        let mut other = linear(3, 16);
        other.init_lora(4, 8.0, 2.0, 0.0, 8).unwrap();
        assert_ne!(other.lora_a().unwrap().to_vec2::<f32>().unwrap(), a);
    }

    #[test]
    fn forward_adds_the_scaled_low_rank_update() {
        // W = 0, bias (0.5, -1): y = b + s·B·A·x. A = [[1, 2]], B = [[1], [3]], s = 0.5,
        // x = (1, 1): A·x = 3, B·3 = (3, 9), times 0.5 = (1.5, 4.5).
        let w = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let bias = Tensor::new(&[0.5f32, -1.0], &Device::Cpu).unwrap();
        let mut l = LoraLinear::new(w, Some(bias));
        let a = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1f32], [3.0]], &Device::Cpu).unwrap();
        l.set_lora(a, b, 1.0, 0.5, 0.0).unwrap();
        let x = Tensor::new(&[[[1f32, 1.0]]], &Device::Cpu).unwrap();
        let y: Vec<f32> = l
            .forward(&x, true, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, [2.0, 3.5]);
        let off: Vec<f32> = l
            .forward(&x, false, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(off, [0.5, -1.0]);
    }

    #[test]
    fn dropout_acts_on_the_lora_branch_in_training_only() {
        let mut l = linear(3, 64);
        l.init_lora(4, 4.0, 1.0, 0.5, 1).unwrap();
        let b = Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap();
        let a = l.lora_a().unwrap().as_tensor().clone();
        l.set_lora(a, b, 4.0, 1.0, 0.5).unwrap();
        let x = Tensor::ones((1, 2, 64), DType::F32, &Device::Cpu).unwrap();
        let eval = l.forward(&x, true, false).unwrap();
        assert_eq!(
            sum_sq(&(l.forward(&x, true, false).unwrap() - &eval).unwrap()),
            0.0,
            "inference is deterministic"
        );
        let trained = l.forward(&x, true, true).unwrap();
        assert!(
            sum_sq(&(trained - &eval).unwrap()) > 0.0,
            "dropout changes the update"
        );
        let base = l.forward(&x, false, false).unwrap();
        let base_train = l.forward(&x, false, true).unwrap();
        assert_eq!(
            sum_sq(&(base_train - base).unwrap()),
            0.0,
            "the base path has no dropout"
        );
    }

    #[test]
    fn mismatched_factors_are_refused() {
        let mut l = linear(3, 4);
        let a = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(l.set_lora(a, b, 1.0, 1.0, 0.0).is_err());
    }

    #[test]
    fn targets_match_at_dot_boundaries() {
        let path = "model.layers.0.self_attn.q_proj";
        assert!(LoraSpec::target_matches("q_proj", path));
        assert!(LoraSpec::target_matches("self_attn.q_proj", path));
        assert!(LoraSpec::target_matches(path, path));
        assert!(LoraSpec::target_matches("all-linear", path));
        assert!(!LoraSpec::target_matches("proj", path));
        assert!(!LoraSpec::target_matches("_proj", path));
        assert!(!LoraSpec::target_matches("k_proj", path));
    }

    #[test]
    fn scaling_follows_rslora() {
        assert_eq!(scaling(8.0, 4, false), 2.0);
        assert_eq!(scaling(8.0, 4, true), 4.0);
        let mut spec = LoraSpec::new(16, 3.0, vec!["q_proj".into()]);
        spec.use_rslora = true;
        assert_eq!(spec.scaling(), 0.75);
        spec.dropout = 1.0;
        assert!(spec
            .check()
            .unwrap_err()
            .to_string()
            .contains("lora_dropout"));
    }
}
