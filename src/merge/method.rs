//! The standard merge methods, one tensor at a time: [`merge_tensor`] runs a [`Method`]
//! on a [`TensorJob`] and returns a [`MergedTensor`].
//!
//! The semantics are mergekit 0.1.5's (`merge_methods/generalized_task_arithmetic.py`,
//! `linear.py`, `sparsify.py`), in `f32`, with options for the papers' variants:
//!
//! | method | trim | consensus | normalize | rescale |
//! |---|---|---|---|---|
//! | `linear` | — | — | true | — |
//! | `task_arithmetic` | — | — | false | false |
//! | `ties` | magnitude | sign | true | false |
//! | `dare_linear` | random | — | false | true |
//! | `dare_ties` | random | sign | false | true |
//! | `breadcrumbs` | outliers | — | false | false |
//! | `breadcrumbs_ties` | outliers | sign | false | false |
//! | `della` | della | sign | true | true |
//! | `della_linear` | della | — | false | true |
//! | `magnitude_prune` (PEFT) | top-k | — | false | false |
//!
//! The task-arithmetic family computes, per tensor: `δ_m = X_m − B`, trims each `δ_m`
//! with its own parameters (and rescales it when `rescale` is on), weights it, elects
//! signs where the method has a consensus step, sums (dividing by the divisor when
//! `normalize` is on), multiplies by `lambda` and adds `B` back.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::merge::caci;
use crate::merge::consensus;
pub use crate::merge::consensus::{DisjointMean, SignElection};
use crate::merge::rng::MaskRng;
use crate::merge::sparsify;

/// A merge method, named as in mergekit (and PEFT for `magnitude_prune`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// `Σ w·X / Σ w` over the experts' full tensors; no base (model soup).
    Linear,
    /// `B + λ·Σ w·δ` (Ilharco et al.).
    TaskArithmetic,
    /// Magnitude trim, sign election, disjoint mean (Yadav et al.).
    Ties,
    /// Random drop and rescale, then task arithmetic (Yu et al.).
    DareLinear,
    /// Random drop and rescale, then TIES's election and sum.
    DareTies,
    /// Drop the largest outliers and the smallest entries, then task arithmetic
    /// (Davari & Belilovsky).
    Breadcrumbs,
    /// Breadcrumbs' trim with TIES's election.
    BreadcrumbsTies,
    /// Rank-dependent random drop (MagPrune), rescale, election (Deep et al.).
    Della,
    /// DELLA's drop and rescale without the election.
    DellaLinear,
    /// PEFT's `magnitude_prune`: keep each delta's top `floor(density·numel)` entries by
    /// magnitude, then the weighted sum, with no election and no normalisation. mergekit
    /// has no such method.
    MagnitudePrune,
    /// Conflict-aware capability integration (DESIGN.md §5): TIES's trim, a sign vote weighted
    /// by each expert's confidence, the disjoint mean, contested coordinates attenuated by
    /// `(1 − κ)^γ`, and optionally each expert's share restored. With `gamma = 0`,
    /// `confidence = "none"` and no `restore` it is TIES.
    Caci,
}

/// How CACI weighs an expert's vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    /// `w / rms(Δ)`: a loud expert does not dictate every sign.
    Rms,
    /// `w`, as TIES.
    None,
}

/// How trimmed deltas are scaled back up when `rescale` is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RescaleMode {
    /// Match the untrimmed delta's L1 norm, per tensor (mergekit).
    L1,
    /// Divide by `density` (the DARE paper, PEFT). For DELLA this is not the paper's
    /// per-element `1/p`, only its mean.
    InverseDensity,
}

/// Method-wide parameters, one value per tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalParams {
    /// Multiplies the merged delta.
    pub lambda: f32,
    /// Divide the merged delta by the sum of weights (or the disjoint-mean divisor).
    pub normalize: bool,
    /// Rescale trimmed deltas (see [`RescaleMode`]).
    pub rescale: bool,
    /// How to rescale.
    pub rescale_mode: RescaleMode,
    /// What the sign vote sums (consensus methods).
    pub sign_election: SignElection,
    /// What the disjoint mean divides by (consensus methods).
    pub disjoint_mean: DisjointMean,
    /// Keys the random masks, with the tensor name and the expert index.
    pub seed: u64,
    /// CACI's attenuation exponent γ (1 by default).
    pub attenuation: f32,
    /// CACI's vote weights.
    pub confidence: Confidence,
    /// CACI's restore target τ: each expert's share of the merge made `τ·w_t`
    /// (see `restore.rs`); `None` leaves the coordinate-wise merge as it is.
    pub restore: Option<f32>,
}

/// Per-expert parameters for one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExpertParams {
    /// The expert's weight.
    pub weight: f32,
    /// The fraction of the delta to keep.
    pub density: f32,
    /// Breadcrumbs: the fraction of largest-magnitude entries to drop.
    pub gamma: f32,
    /// DELLA: the spread of keep probabilities around `density`.
    pub epsilon: f32,
}

/// One tensor to merge.
#[derive(Debug, Clone)]
pub struct TensorJob<'a> {
    /// The tensor's name (keys the random masks and names errors).
    pub name: &'a str,
    /// The tensor's shape (DELLA ranks along axis 1).
    pub shape: &'a [usize],
    /// The base model's tensor; every method but [`Method::Linear`] needs it.
    pub base: Option<&'a [f32]>,
    /// Each expert's full tensor (not a delta), as many elements as `shape`; the buffers
    /// are reused for the result.
    pub experts: Vec<Vec<f32>>,
    /// One entry per expert.
    pub params: Vec<ExpertParams>,
    /// Each expert's index in the recipe: it keys the expert's random mask, so leaving an
    /// expert out of one tensor does not change the others' masks.
    pub expert_ids: Vec<usize>,
}

/// What a merge did to one tensor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorStats {
    /// Per expert: the fraction of nonzero delta entries after trimming (1 for each
    /// expert under [`Method::Linear`], which takes everything).
    pub kept_fraction: Vec<f32>,
    /// Consensus methods: the fraction of coordinates where some kept entry opposes the
    /// elected sign.
    pub sign_conflict: Option<f32>,
    /// `‖merged − base‖₂` (`‖merged‖₂` for a linear merge without a base).
    pub delta_l2: f64,
}

/// A merged tensor and its statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedTensor {
    /// The merged values, in the input's layout.
    pub values: Vec<f32>,
    /// What the merge did.
    pub stats: TensorStats,
}

/// The trim step of a task-arithmetic method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trim {
    None,
    Magnitude,
    Random,
    Outliers,
    Della,
    TopK,
}

const ALL: [Method; 11] = [
    Method::Linear,
    Method::TaskArithmetic,
    Method::Ties,
    Method::DareLinear,
    Method::DareTies,
    Method::Breadcrumbs,
    Method::BreadcrumbsTies,
    Method::Della,
    Method::DellaLinear,
    Method::MagnitudePrune,
    Method::Caci,
];

impl Method {
    /// The method for a mergekit (or PEFT) name, e.g. `"dare_ties"`.
    pub fn from_name(name: &str) -> Option<Method> {
        ALL.into_iter().find(|m| m.name() == name)
    }

    /// The mergekit (or PEFT) name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::TaskArithmetic => "task_arithmetic",
            Method::Ties => "ties",
            Method::DareLinear => "dare_linear",
            Method::DareTies => "dare_ties",
            Method::Breadcrumbs => "breadcrumbs",
            Method::BreadcrumbsTies => "breadcrumbs_ties",
            Method::Della => "della",
            Method::DellaLinear => "della_linear",
            Method::MagnitudePrune => "magnitude_prune",
            Method::Caci => "caci",
        }
    }

    /// Every method.
    pub fn all() -> &'static [Method] {
        &ALL
    }

    /// Whether the method needs a base model: all but [`Method::Linear`].
    ///
    /// mergekit's `linear` ignores the base role, but a configured `base_model` still
    /// enters it as an ordinary input with its own (required) weight; a recipe that
    /// wants that lists the base as an expert.
    pub fn needs_base(self) -> bool {
        self != Method::Linear
    }

    /// Whether the result depends on [`GlobalParams::seed`].
    pub fn is_random(self) -> bool {
        matches!(self.trim(), Trim::Random | Trim::Della)
    }

    /// Whether the method elects signs.
    pub(crate) fn has_consensus(self) -> bool {
        matches!(
            self,
            Method::Ties | Method::DareTies | Method::BreadcrumbsTies | Method::Della
        )
    }

    /// The method's trim step.
    pub(crate) fn trim(self) -> Trim {
        match self {
            Method::Linear | Method::TaskArithmetic => Trim::None,
            Method::Ties => Trim::Magnitude,
            Method::DareLinear | Method::DareTies => Trim::Random,
            Method::Breadcrumbs | Method::BreadcrumbsTies => Trim::Outliers,
            Method::Della | Method::DellaLinear => Trim::Della,
            Method::MagnitudePrune => Trim::TopK,
            Method::Caci => Trim::Magnitude,
        }
    }

    /// The method-wide parameter names a recipe may set.
    ///
    /// The task-arithmetic family accepts mergekit's `lambda`, `normalize`, `rescale` and
    /// `int8_mask`; `int8_mask` only picks the dtype of mergekit's intermediate sign
    /// tensors and has no effect here, and `rescale` has none on `task_arithmetic`,
    /// which trims nothing. Ours: `rescale_mode` where there is a trim, `sign_election`
    /// and `disjoint_mean` where there is a consensus. The seed is not a method
    /// parameter.
    pub fn global_parameters(self) -> &'static [&'static str] {
        const MERGEKIT: [&str; 4] = ["lambda", "normalize", "rescale", "int8_mask"];
        match self {
            Method::Linear => &["normalize"],
            Method::TaskArithmetic => &MERGEKIT,
            Method::DareLinear | Method::Breadcrumbs | Method::DellaLinear => &[
                "lambda",
                "normalize",
                "rescale",
                "int8_mask",
                "rescale_mode",
            ],
            Method::Ties | Method::DareTies | Method::BreadcrumbsTies | Method::Della => &[
                "lambda",
                "normalize",
                "rescale",
                "int8_mask",
                "rescale_mode",
                "sign_election",
                "disjoint_mean",
            ],
            Method::MagnitudePrune => &["lambda"],
            Method::Caci => &["lambda", "gamma", "confidence", "normalize", "restore"],
        }
    }

    /// The per-expert parameter names a recipe may set. `task_arithmetic` accepts
    /// `density`, as mergekit does, and ignores it.
    pub fn expert_parameters(self) -> &'static [&'static str] {
        match self {
            Method::Linear => &["weight"],
            Method::Breadcrumbs | Method::BreadcrumbsTies => &["weight", "density", "gamma"],
            Method::Della | Method::DellaLinear => &["weight", "density", "epsilon"],
            Method::TaskArithmetic
            | Method::Ties
            | Method::DareLinear
            | Method::DareTies
            | Method::MagnitudePrune
            | Method::Caci => &["weight", "density"],
        }
    }

    /// mergekit's defaults for this method (see the module table), with the mergekit
    /// variants of the options and seed 0.
    pub fn default_globals(self) -> GlobalParams {
        let (normalize, rescale) = match self {
            Method::Linear | Method::Ties => (true, false),
            Method::Della => (true, true),
            Method::DareLinear | Method::DareTies | Method::DellaLinear => (false, true),
            Method::TaskArithmetic
            | Method::Breadcrumbs
            | Method::BreadcrumbsTies
            | Method::MagnitudePrune => (false, false),
            Method::Caci => (true, false),
        };
        GlobalParams {
            lambda: 1.0,
            normalize,
            rescale,
            rescale_mode: RescaleMode::L1,
            sign_election: SignElection::Weighted,
            disjoint_mean: DisjointMean::Weights,
            seed: 0,
            attenuation: 1.0,
            confidence: Confidence::Rms,
            restore: None,
        }
    }

    /// mergekit's per-expert defaults: density 1, gamma 0.01, epsilon 0.15. mergekit
    /// requires `weight`; ours defaults to 1.
    pub fn default_expert(self) -> ExpertParams {
        ExpertParams {
            weight: 1.0,
            // CACI keeps each expert's top half by default (DESIGN.md §5).
            density: if self == Method::Caci { 0.5 } else { 1.0 },
            gamma: 0.01,
            epsilon: 0.15,
        }
    }
}

fn parameter_error(name: &str, tensor: &str, message: String) -> Error {
    Error::Parameter {
        name: name.into(),
        tensor: tensor.into(),
        message,
    }
}

/// Merges one tensor.
///
/// # Errors
/// [`Error::Parameter`] when the job is inconsistent (counts or lengths that do not
/// match `shape`), when a method other than [`Method::Linear`] has no base, when a
/// parameter is outside its domain (a non-finite value, a negative density, gamma
/// outside `[0, 1]`, DELLA's `density ± epsilon` outside `(0, 1)`), or when a normalised
/// linear merge's weights sum to zero (mergekit divides by zero there). All checks run
/// before any arithmetic.
pub fn merge_tensor(
    method: Method,
    globals: &GlobalParams,
    job: TensorJob<'_>,
) -> Result<MergedTensor> {
    let TensorJob {
        name,
        shape,
        base,
        mut experts,
        params,
        expert_ids,
    } = job;
    let numel = check_job(name, shape, base, &experts, &params, &expert_ids)?;
    check_params(method, globals, name, &params)?;

    if method == Method::Linear {
        return linear(name, base, experts, &params, globals.normalize);
    }
    let base = base.ok_or_else(|| {
        parameter_error(
            "base_model",
            name,
            format!("method `{}` needs a base model", method.name()),
        )
    })?;
    if experts.is_empty() {
        return Ok(MergedTensor {
            values: base.to_vec(),
            stats: TensorStats {
                kept_fraction: Vec::new(),
                sign_conflict: method.has_consensus().then_some(0.0),
                delta_l2: 0.0,
            },
        });
    }

    if method == Method::Caci {
        return caci::merge(name, base, experts, &params, globals);
    }
    let mut trimmer = Trimmer {
        trim: method.trim(),
        globals,
        name,
        shape,
        order: Vec::new(),
    };
    let mut kept_fraction = Vec::with_capacity(experts.len());
    for ((delta, p), &id) in experts.iter_mut().zip(&params).zip(&expert_ids) {
        for (d, &b) in delta.iter_mut().zip(base) {
            *d -= b;
        }
        trimmer.apply(delta, p, id)?;
        kept_fraction.push(fraction(delta.iter().filter(|v| **v != 0.0).count(), numel));
    }

    let weights: Vec<f32> = params.iter().map(|p| p.weight).collect();
    let sign_conflict = if method.has_consensus() {
        let conflicts = consensus::disjoint_merge(
            &mut experts,
            &weights,
            globals.sign_election,
            globals.disjoint_mean,
            globals.normalize,
        );
        Some(fraction(conflicts, numel))
    } else {
        weighted_sum(&mut experts, &weights, globals.normalize);
        None
    };

    let mut values = experts.swap_remove(0);
    if globals.lambda != 1.0 {
        for v in values.iter_mut() {
            *v *= globals.lambda;
        }
    }
    for (v, &b) in values.iter_mut().zip(base) {
        *v += b;
    }
    let delta_l2 = distance(&values, Some(base));
    Ok(MergedTensor {
        values,
        stats: TensorStats {
            kept_fraction,
            sign_conflict,
            delta_l2,
        },
    })
}

/// Checks that the job is self-consistent; returns the element count.
fn check_job(
    name: &str,
    shape: &[usize],
    base: Option<&[f32]>,
    experts: &[Vec<f32>],
    params: &[ExpertParams],
    expert_ids: &[usize],
) -> Result<usize> {
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| parameter_error("shape", name, format!("shape {shape:?} overflows")))?;
    if params.len() != experts.len() || expert_ids.len() != experts.len() {
        return Err(parameter_error(
            "experts",
            name,
            format!(
                "{} experts but {} parameter sets and {} ids",
                experts.len(),
                params.len(),
                expert_ids.len()
            ),
        ));
    }
    let lengths = base.map(<[f32]>::len).into_iter();
    if let Some(len) = lengths
        .chain(experts.iter().map(Vec::len))
        .find(|&len| len != numel)
    {
        return Err(parameter_error(
            "shape",
            name,
            format!("an input holds {len} elements, shape {shape:?} needs {numel}"),
        ));
    }
    Ok(numel)
}

/// Checks the parameters that `method` reads.
pub(crate) fn check_params(
    method: Method,
    globals: &GlobalParams,
    name: &str,
    params: &[ExpertParams],
) -> Result<()> {
    if !globals.lambda.is_finite() {
        return Err(parameter_error(
            "lambda",
            name,
            format!("{} is not finite", globals.lambda),
        ));
    }
    let trim = method.trim();
    for p in params {
        if !p.weight.is_finite() {
            return Err(parameter_error(
                "weight",
                name,
                format!("{} is not finite", p.weight),
            ));
        }
        if trim == Trim::None {
            continue;
        }
        if !(p.density.is_finite() && p.density >= 0.0) {
            return Err(parameter_error(
                "density",
                name,
                format!(
                    "{} is not a fraction (0 or more; 1 or more keeps everything)",
                    p.density
                ),
            ));
        }
        match trim {
            Trim::Outliers if !(0.0..=1.0).contains(&p.gamma) => {
                return Err(parameter_error(
                    "gamma",
                    name,
                    format!("{} is outside [0, 1]", p.gamma),
                ));
            }
            Trim::Della => sparsify::check_della(p.density, p.epsilon, name)?,
            _ => {}
        }
    }
    Ok(())
}

/// The trim step for one tensor, with the scratch buffer (DELLA's row order) its experts share.
struct Trimmer<'a> {
    trim: Trim,
    globals: &'a GlobalParams,
    name: &'a str,
    shape: &'a [usize],
    order: Vec<usize>,
}

impl Trimmer<'_> {
    /// Trims (and rescales) the delta of the expert with recipe index `expert_id`.
    fn apply(&mut self, delta: &mut [f32], p: &ExpertParams, expert_id: usize) -> Result<()> {
        // As in mergekit, nothing happens at density >= 1, not even the rescale.
        if self.trim == Trim::None || p.density >= 1.0 {
            return Ok(());
        }
        let globals = self.globals;
        let original_l1 = (globals.rescale && globals.rescale_mode == RescaleMode::L1)
            .then(|| sparsify::l1_norm(delta));
        let rng = MaskRng::new(globals.seed, self.name, expert_id);
        match self.trim {
            Trim::None => {}
            Trim::Magnitude => {
                sparsify::magnitude(delta, p.density);
            }
            Trim::Random => {
                sparsify::random(delta, p.density, &rng);
            }
            Trim::Outliers => {
                sparsify::outliers(delta, p.density, p.gamma);
            }
            Trim::Della => {
                let (shape, name) = (self.shape, self.name);
                sparsify::della(
                    delta,
                    shape,
                    p.density,
                    p.epsilon,
                    &rng,
                    &mut self.order,
                    name,
                )?;
            }
            Trim::TopK => {
                let k = sparsify::keep_count(p.density, delta.len());
                sparsify::top_k(delta, k);
            }
        }
        if globals.rescale {
            match original_l1 {
                Some(l1) => sparsify::rescale_l1(delta, l1),
                None => sparsify::rescale_inverse(delta, p.density),
            }
        }
        Ok(())
    }
}

/// `Σ w_m·δ_m` into `deltas[0]`, divided by `Σ w_m` when normalising (a sum under 1e-8
/// in magnitude counts as 1, as in mergekit).
pub(crate) fn weighted_sum(deltas: &mut [Vec<f32>], weights: &[f32], normalize: bool) {
    let Some(((first, rest), (&w0, w_rest))) = deltas.split_first_mut().zip(weights.split_first())
    else {
        return;
    };
    for v in first.iter_mut() {
        *v *= w0;
    }
    for (delta, &w) in rest.iter().zip(w_rest) {
        for (acc, &x) in first.iter_mut().zip(delta) {
            *acc += w * x;
        }
    }
    if normalize {
        let sum: f32 = weights.iter().sum();
        let divisor = if sum.abs() < 1e-8 { 1.0 } else { sum };
        for v in first.iter_mut() {
            *v /= divisor;
        }
    }
}

/// mergekit `linear`: `Σ w·X`, divided by `Σ w` when normalising. The base, if any, is
/// not an input (see [`Method::needs_base`]); it only anchors `delta_l2`.
pub(crate) fn linear(
    name: &str,
    base: Option<&[f32]>,
    mut experts: Vec<Vec<f32>>,
    params: &[ExpertParams],
    normalize: bool,
) -> Result<MergedTensor> {
    let weights: Vec<f32> = params.iter().map(|p| p.weight).collect();
    let sum: f32 = weights.iter().sum();
    if experts.is_empty() {
        let base = base
            .ok_or_else(|| parameter_error("experts", name, "no tensors to merge".to_string()))?;
        return Ok(MergedTensor {
            values: base.to_vec(),
            stats: TensorStats {
                kept_fraction: Vec::new(),
                sign_conflict: None,
                delta_l2: 0.0,
            },
        });
    }
    if normalize && sum == 0.0 {
        return Err(parameter_error(
            "weight",
            name,
            format!("the weights {weights:?} sum to zero and linear divides by their sum"),
        ));
    }
    // mergekit divides by the exact f32 sum (no 1e-8 guard, unlike task arithmetic).
    weighted_sum(&mut experts, &weights, false);
    let mut values = experts.swap_remove(0);
    if normalize {
        for v in values.iter_mut() {
            *v /= sum;
        }
    }
    let delta_l2 = distance(&values, base);
    Ok(MergedTensor {
        values,
        stats: TensorStats {
            kept_fraction: vec![1.0; weights.len()],
            sign_conflict: None,
            delta_l2,
        },
    })
}

/// `‖values − base‖₂` in `f64`, or `‖values‖₂` without a base.
fn distance(values: &[f32], base: Option<&[f32]>) -> f64 {
    squared_distance(values, base).sqrt()
}

/// `‖values − base‖₂²` in `f64`, or `‖values‖₂²` without a base.
pub(crate) fn squared_distance(values: &[f32], base: Option<&[f32]>) -> f64 {
    match base {
        Some(base) => {
            let mut lanes = [0f64; 8];
            let (v8, b8) = (values.chunks_exact(8), base.chunks_exact(8));
            let tail: f64 = v8
                .remainder()
                .iter()
                .zip(b8.remainder())
                .map(|(&v, &b)| (f64::from(v) - f64::from(b)).powi(2))
                .sum();
            for (vc, bc) in v8.zip(b8) {
                for ((lane, &v), &b) in lanes.iter_mut().zip(vc).zip(bc) {
                    *lane += (f64::from(v) - f64::from(b)).powi(2);
                }
            }
            lanes.iter().sum::<f64>() + tail
        }
        None => sparsify::lane_sum(values, |v| f64::from(v).powi(2)),
    }
}

/// `count / numel` (0 for an empty tensor).
pub(crate) fn fraction(count: usize, numel: usize) -> f32 {
    if numel == 0 {
        0.0
    } else {
        (count as f64 / numel as f64) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NAME: &str = "model.layers.0.mlp.down_proj.weight";

    fn expert(weight: f32, density: f32) -> ExpertParams {
        ExpertParams {
            weight,
            density,
            ..Method::Ties.default_expert()
        }
    }

    fn run(
        method: Method,
        globals: &GlobalParams,
        shape: &[usize],
        base: Option<&[f32]>,
        experts: &[&[f32]],
        params: &[ExpertParams],
    ) -> Result<MergedTensor> {
        merge_tensor(
            method,
            globals,
            TensorJob {
                name: NAME,
                shape,
                base,
                experts: experts.iter().map(|e| e.to_vec()).collect(),
                params: params.to_vec(),
                expert_ids: (0..experts.len()).collect(),
            },
        )
    }

    fn close(actual: &[f32], expected: &[f32]) {
        assert_eq!(actual.len(), expected.len());
        for (a, e) in actual.iter().zip(expected) {
            assert!(
                (a - e).abs() <= 1e-6 * (1.0 + e.abs()),
                "{actual:?} != {expected:?}"
            );
        }
    }

    /// Whether `expert`'s element `i` survives a Bernoulli(`p`) drop.
    fn kept(seed: u64, expert: usize, i: usize, p: f32) -> bool {
        MaskRng::new(seed, NAME, expert).uniform(i as u64) < p
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(Method::all().len(), 11);
        for &m in Method::all() {
            assert_eq!(Method::from_name(m.name()), Some(m));
            assert_eq!(
                serde_json::to_string(&m).unwrap(),
                format!("\"{}\"", m.name())
            );
        }
        assert_eq!(Method::from_name("dare_ties"), Some(Method::DareTies));
        assert_eq!(
            Method::from_name("breadcrumbs_ties"),
            Some(Method::BreadcrumbsTies)
        );
        assert_eq!(Method::from_name("slerp"), None);
        assert_eq!(Method::from_name("TIES"), None);
    }

    #[test]
    fn defaults_are_mergekits() {
        // (method, normalize, rescale) from mergekit 0.1.5 `registry.py` and `linear.py`;
        // CACI (ours) normalises like TIES.
        let table = [
            (Method::Linear, true, false),
            (Method::TaskArithmetic, false, false),
            (Method::Ties, true, false),
            (Method::DareLinear, false, true),
            (Method::DareTies, false, true),
            (Method::Breadcrumbs, false, false),
            (Method::BreadcrumbsTies, false, false),
            (Method::Della, true, true),
            (Method::DellaLinear, false, true),
            (Method::MagnitudePrune, false, false),
            (Method::Caci, true, false),
        ];
        for (m, normalize, rescale) in table {
            let g = m.default_globals();
            assert_eq!((g.normalize, g.rescale), (normalize, rescale), "{m:?}");
            assert_eq!(g.lambda, 1.0);
            assert_eq!(g.rescale_mode, RescaleMode::L1);
            assert_eq!(g.sign_election, SignElection::Weighted);
            assert_eq!(g.disjoint_mean, DisjointMean::Weights);
            let e = m.default_expert();
            // CACI keeps half by default (DESIGN.md §5); mergekit's methods keep everything.
            let density = if m == Method::Caci { 0.5 } else { 1.0 };
            assert_eq!(
                (e.weight, e.density, e.gamma, e.epsilon),
                (1.0, density, 0.01, 0.15)
            );
        }
    }

    #[test]
    fn roles_and_parameter_names() {
        let random: Vec<Method> = Method::all()
            .iter()
            .copied()
            .filter(|m| m.is_random())
            .collect();
        assert_eq!(
            random,
            [
                Method::DareLinear,
                Method::DareTies,
                Method::Della,
                Method::DellaLinear
            ]
        );
        for &m in Method::all() {
            assert_eq!(m.needs_base(), m != Method::Linear);
            assert!(m.expert_parameters().contains(&"weight"));
            assert_eq!(
                m.expert_parameters().contains(&"gamma"),
                m.name().starts_with("breadcrumbs")
            );
            assert_eq!(
                m.expert_parameters().contains(&"epsilon"),
                m.name().starts_with("della")
            );
            assert_eq!(
                m.global_parameters().contains(&"sign_election"),
                m.has_consensus()
            );
        }
        assert_eq!(Method::Linear.global_parameters(), ["normalize"]);
        assert!(Method::Ties.global_parameters().contains(&"int8_mask"));
        assert!(!Method::Linear.expert_parameters().contains(&"density"));
    }

    #[test]
    fn linear_is_the_weighted_mean() {
        // (1·[1, 2, 3, 4] + 3·[3, 2, 1, 0]) = [10, 8, 6, 4]; / 4.
        let experts: [&[f32]; 2] = [&[1.0, 2.0, 3.0, 4.0], &[3.0, 2.0, 1.0, 0.0]];
        let params = [expert(1.0, 1.0), expert(3.0, 1.0)];
        let mut g = Method::Linear.default_globals();
        let out = run(Method::Linear, &g, &[4], None, &experts, &params).unwrap();
        assert_eq!(out.values, [2.5, 2.0, 1.5, 1.0]);
        assert_eq!(out.stats.kept_fraction, [1.0, 1.0]);
        assert_eq!(out.stats.sign_conflict, None);
        // ‖[2.5, 2, 1.5, 1]‖ = √13.5 without a base; ‖[1.5, 1, 0.5, 0]‖ = √3.5 from 1s.
        assert!((out.stats.delta_l2 - 13.5f64.sqrt()).abs() < 1e-12);
        let base = [1.0; 4];
        let out = run(Method::Linear, &g, &[4], Some(&base), &experts, &params).unwrap();
        assert_eq!(out.values, [2.5, 2.0, 1.5, 1.0]);
        assert!((out.stats.delta_l2 - 3.5f64.sqrt()).abs() < 1e-12);
        g.normalize = false;
        let out = run(Method::Linear, &g, &[4], None, &experts, &params).unwrap();
        assert_eq!(out.values, [10.0, 8.0, 6.0, 4.0]);
    }

    #[test]
    fn linear_with_zero_weight_sum_is_an_error() {
        let experts: [&[f32]; 2] = [&[1.0], &[3.0]];
        let params = [expert(1.0, 1.0), expert(-1.0, 1.0)];
        let mut g = Method::Linear.default_globals();
        let err = run(Method::Linear, &g, &[1], None, &experts, &params).unwrap_err();
        assert!(matches!(err, Error::Parameter { ref name, ref tensor, .. }
            if name == "weight" && tensor == NAME));
        g.normalize = false;
        let out = run(Method::Linear, &g, &[1], None, &experts, &params).unwrap();
        assert_eq!(out.values, [-2.0]);
    }

    #[test]
    fn task_arithmetic_adds_the_scaled_deltas() {
        // δ1 = [1, −1, 0, 2], δ2 = [0, 2, −1, 0]; 0.5·δ1 + δ2 = [0.5, 1.5, −1, 1];
        // λ = 2 → [1, 3, −2, 2]; + 1.
        let base = [1.0; 4];
        let experts: [&[f32]; 2] = [&[2.0, 0.0, 1.0, 3.0], &[1.0, 3.0, 0.0, 1.0]];
        // density is accepted and ignored.
        let params = [expert(0.5, 0.1), expert(1.0, 0.1)];
        let mut g = Method::TaskArithmetic.default_globals();
        g.lambda = 2.0;
        let out = run(
            Method::TaskArithmetic,
            &g,
            &[4],
            Some(&base),
            &experts,
            &params,
        )
        .unwrap();
        assert_eq!(out.values, [2.0, 4.0, -1.0, 3.0]);
        assert_eq!(out.stats.kept_fraction, [0.75, 0.5]);
        assert_eq!(out.stats.sign_conflict, None);
        assert!((out.stats.delta_l2 - 18f64.sqrt()).abs() < 1e-12);
        // normalize divides by Σw = 1.5 before λ.
        g.normalize = true;
        let out = run(
            Method::TaskArithmetic,
            &g,
            &[4],
            Some(&base),
            &experts,
            &params,
        )
        .unwrap();
        close(
            &out.values,
            &[1.0 + 2.0 / 3.0, 3.0, 1.0 - 4.0 / 3.0, 1.0 + 4.0 / 3.0],
        );
    }

    #[test]
    fn ties_trims_elects_and_averages() {
        // δ1 = [4, −3, 2, −1, 0.5] → top 3: [4, −3, 2, 0, 0];
        // δ2 = [−2, 1, 3, −4, 0.25] → top 3: [−2, 0, 3, −4, 0].
        // Sums [2, −3, 5, −4, 0] elect [+, −, +, −, +]; coordinate 0 drops δ2 (a conflict).
        // Disjoint mean: [4, −3, (2 + 3)/2, −4, 0]; + 1.
        let base = [1.0; 5];
        let experts: [&[f32]; 2] = [&[5.0, -2.0, 3.0, 0.0, 1.5], &[-1.0, 2.0, 4.0, -3.0, 1.25]];
        let params = [expert(1.0, 0.6), expert(1.0, 0.6)];
        let g = Method::Ties.default_globals();
        let out = run(Method::Ties, &g, &[5], Some(&base), &experts, &params).unwrap();
        assert_eq!(out.values, [5.0, -2.0, 3.5, -3.0, 1.0]);
        assert_eq!(out.stats.kept_fraction, [0.6, 0.6]);
        assert_eq!(out.stats.sign_conflict, Some(0.2));
    }

    #[test]
    fn ties_variants_follow_the_options() {
        // One coordinate, δ = (2, −1), weights (1, 3), density 1.
        // Weighted: 2 − 3 < 0 elects −; δ2 agrees: 3·(−1) / 3 = −1.
        // Unweighted: 2 − 1 > 0 elects +; δ1 agrees: 2 / 1 (weights) or / 1 (counts).
        let base = [0.0];
        let experts: [&[f32]; 2] = [&[2.0], &[-1.0]];
        let params = [expert(1.0, 1.0), expert(3.0, 1.0)];
        let mut g = Method::Ties.default_globals();
        let out = run(Method::Ties, &g, &[1], Some(&base), &experts, &params).unwrap();
        assert_eq!(out.values, [-1.0]);
        g.sign_election = SignElection::Unweighted;
        let out = run(Method::Ties, &g, &[1], Some(&base), &experts, &params).unwrap();
        assert_eq!(out.values, [2.0]);
        // Both agree at density 1 with δ = (2, 1): weights divide 2 + 3 by 4, counts by 2.
        let experts: [&[f32]; 2] = [&[2.0], &[1.0]];
        g.disjoint_mean = DisjointMean::Counts;
        let out = run(Method::Ties, &g, &[1], Some(&base), &experts, &params).unwrap();
        assert_eq!(out.values, [2.5]);
        g.disjoint_mean = DisjointMean::Weights;
        let out = run(Method::Ties, &g, &[1], Some(&base), &experts, &params).unwrap();
        assert_eq!(out.values, [1.25]);
    }

    #[test]
    fn dare_linear_drops_and_rescales_by_the_l1_norm() {
        // δ = ±2 everywhere: if K of 8 survive, the L1 rescale multiplies them by 16/(2K).
        let base = [1.0; 8];
        let x: Vec<f32> = (0..8)
            .map(|i| if i % 2 == 0 { 3.0 } else { -1.0 })
            .collect();
        let mut g = Method::DareLinear.default_globals();
        for seed in 0..10 {
            g.seed = seed;
            let out = run(
                Method::DareLinear,
                &g,
                &[8],
                Some(&base),
                &[&x],
                &[expert(0.5, 0.5)],
            )
            .unwrap();
            let survivors = (0..8).filter(|&i| kept(seed, 0, i, 0.5)).count();
            let expected: Vec<f32> = (0..8)
                .map(|i| {
                    if !kept(seed, 0, i, 0.5) {
                        1.0
                    } else {
                        // 1 + 0.5 · (±2) · 8/K
                        let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                        1.0 + sign * 8.0 / survivors as f32
                    }
                })
                .collect();
            close(&out.values, &expected);
            assert_eq!(out.stats.kept_fraction, [survivors as f32 / 8.0]);
        }
        // The paper's rescale: kept entries become ±2 / 0.5 = ±4, times 0.5.
        g.rescale_mode = RescaleMode::InverseDensity;
        let out = run(
            Method::DareLinear,
            &g,
            &[8],
            Some(&base),
            &[&x],
            &[expert(0.5, 0.5)],
        )
        .unwrap();
        for (i, v) in out.values.iter().enumerate() {
            let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
            let expect = if kept(g.seed, 0, i, 0.5) {
                1.0 + 2.0 * sign
            } else {
                1.0
            };
            assert_eq!(*v, expect);
        }
    }

    #[test]
    fn masks_are_keyed_by_the_recipe_index() {
        let base = [0.0; 64];
        let a = vec![1.0f32; 64];
        let b: Vec<f32> = (0..64).map(|i| i as f32 + 1.0).collect();
        let g = GlobalParams {
            rescale: false,
            seed: 77,
            ..Method::DareLinear.default_globals()
        };
        let job = |experts: Vec<Vec<f32>>, params: Vec<ExpertParams>, ids: Vec<usize>| TensorJob {
            name: NAME,
            shape: &[64],
            base: Some(&base),
            experts,
            params,
            expert_ids: ids,
        };
        // Expert `a` at weight 0 adds nothing, so both merges are b's masked delta.
        let both = merge_tensor(
            Method::DareLinear,
            &g,
            job(
                vec![a, b.clone()],
                vec![expert(0.0, 0.5), expert(1.0, 0.5)],
                vec![0, 1],
            ),
        )
        .unwrap();
        let alone = merge_tensor(
            Method::DareLinear,
            &g,
            job(vec![b.clone()], vec![expert(1.0, 0.5)], vec![1]),
        )
        .unwrap();
        assert_eq!(both.values, alone.values);
        for (i, v) in alone.values.iter().enumerate() {
            assert_eq!(*v, if kept(77, 1, i, 0.5) { b[i] } else { 0.0 });
        }
        // Under id 0 the mask differs.
        let renumbered = merge_tensor(
            Method::DareLinear,
            &g,
            job(vec![b], vec![expert(1.0, 0.5)], vec![0]),
        )
        .unwrap();
        assert_ne!(renumbered.values, alone.values);
    }

    #[test]
    fn dare_ties_elects_over_the_surviving_entries() {
        // δ1 = +3, δ2 = −1 everywhere, density 0.5, no rescale, no normalize (default):
        // both kept → + wins, 3 (a conflict); only δ1 → 3; only δ2 → −1; none → 0.
        let base = [0.5; 16];
        let x1 = [3.5f32; 16];
        let x2 = [-0.5f32; 16];
        let g = GlobalParams {
            rescale: false,
            seed: 3,
            ..Method::DareTies.default_globals()
        };
        let params = [expert(1.0, 0.5), expert(1.0, 0.5)];
        let out = run(
            Method::DareTies,
            &g,
            &[16],
            Some(&base),
            &[&x1, &x2],
            &params,
        )
        .unwrap();
        let mut conflicts = 0;
        for (i, v) in out.values.iter().enumerate() {
            let delta = match (kept(3, 0, i, 0.5), kept(3, 1, i, 0.5)) {
                (true, true) => {
                    conflicts += 1;
                    3.0
                }
                (true, false) => 3.0,
                (false, true) => -1.0,
                (false, false) => 0.0,
            };
            assert_eq!(*v, 0.5 + delta, "element {i}");
        }
        assert_eq!(out.stats.sign_conflict, Some(conflicts as f32 / 16.0));
    }

    #[test]
    fn breadcrumbs_and_breadcrumbs_ties() {
        // density 0.5, gamma 0.1 on 10 elements: drop the largest, keep the next 5.
        // δ1 = [1, −2, …, −10] keeps [0, 0, 0, 0, 5, −6, 7, −8, 9, 0];
        // δ2 = [5, 4.5, 4, 3.5, −3, −2.5, 2, 1.5, 1, 0.5] keeps [0, 4.5, 4, 3.5, −3, −2.5, 0, …].
        // Weights (2, 1): Σ = [0, 4.5, 4, 3.5, 7, −14.5, 14, −16, 18, 0]; + 10.
        let base = [10.0; 10];
        let x1: Vec<f32> = (1..=10)
            .map(|v| 10.0 + if v % 2 == 0 { -(v as f32) } else { v as f32 })
            .collect();
        let x2 = [15.0, 14.5, 14.0, 13.5, 7.0, 7.5, 12.0, 11.5, 11.0, 10.5];
        let p = ExpertParams {
            gamma: 0.1,
            ..expert(2.0, 0.5)
        };
        let params = [p, ExpertParams { weight: 1.0, ..p }];
        let g = Method::Breadcrumbs.default_globals();
        let out = run(
            Method::Breadcrumbs,
            &g,
            &[10],
            Some(&base),
            &[&x1, &x2],
            &params,
        )
        .unwrap();
        assert_eq!(
            out.values,
            [10.0, 14.5, 14.0, 13.5, 17.0, -4.5, 24.0, -6.0, 28.0, 10.0]
        );
        assert_eq!(out.stats.kept_fraction, [0.5, 0.5]);
        assert_eq!(out.stats.sign_conflict, None);
        // With the election, coordinate 4 (+10 against −3) keeps only δ1's 10; normalize
        // is off by default, so nothing is divided.
        let g = Method::BreadcrumbsTies.default_globals();
        let out = run(
            Method::BreadcrumbsTies,
            &g,
            &[10],
            Some(&base),
            &[&x1, &x2],
            &params,
        )
        .unwrap();
        assert_eq!(
            out.values,
            [10.0, 14.5, 14.0, 13.5, 20.0, -4.5, 24.0, -6.0, 28.0, 10.0]
        );
        assert_eq!(out.stats.sign_conflict, Some(0.1));
    }

    #[test]
    fn della_and_della_linear() {
        // δ = [[1, −2], [3, −4]], density 0.5, epsilon 0.2: in each row the smaller keeps
        // with p = 0.3, the larger with p = 0.7. The L1 rescale multiplies survivors by
        // 10 / (their L1 norm); an empty mask is left at zero.
        let base = [1.0; 4];
        let x = [2.0, -1.0, 4.0, -3.0];
        let delta = [1.0f32, -2.0, 3.0, -4.0];
        let p_keep = [0.3, 0.7, 0.3, 0.7];
        let params = [ExpertParams {
            epsilon: 0.2,
            ..expert(2.0, 0.5)
        }];
        for seed in 0..10 {
            let survives: Vec<bool> = (0..4).map(|i| kept(seed, 0, i, p_keep[i])).collect();
            let l1: f32 = (0..4)
                .filter(|&i| survives[i])
                .map(|i| delta[i].abs())
                .sum();
            let rescaled = |i: usize| {
                if survives[i] {
                    delta[i] * 10.0 / l1
                } else {
                    0.0
                }
            };
            // della normalises by the agreeing weight: 2·r / 2 = r.
            let g = GlobalParams {
                seed,
                ..Method::Della.default_globals()
            };
            let out = run(Method::Della, &g, &[2, 2], Some(&base), &[&x], &params).unwrap();
            let expected: Vec<f32> = (0..4).map(|i| 1.0 + rescaled(i)).collect();
            close(&out.values, &expected);
            // della_linear does not normalise: 2·r.
            let g = GlobalParams {
                seed,
                ..Method::DellaLinear.default_globals()
            };
            let out = run(
                Method::DellaLinear,
                &g,
                &[2, 2],
                Some(&base),
                &[&x],
                &params,
            )
            .unwrap();
            let expected: Vec<f32> = (0..4).map(|i| 1.0 + 2.0 * rescaled(i)).collect();
            close(&out.values, &expected);
        }
    }

    #[test]
    fn magnitude_prune_is_peft_s() {
        // δ1 at density 0.5 keeps floor(2.5) = 2: [0, 0, 3, −4, 0]. δ2 at density 0.1 keeps
        // floor(0.5) = 0 entries (TIES would keep 1). Weights (2, 1), no normalisation.
        let base = [0.0; 5];
        let experts: [&[f32]; 2] = [&[1.0, -2.0, 3.0, -4.0, 0.5], &[0.1, 0.2, 0.3, 0.4, 0.5]];
        let params = [expert(2.0, 0.5), expert(1.0, 0.1)];
        let g = Method::MagnitudePrune.default_globals();
        let out = run(
            Method::MagnitudePrune,
            &g,
            &[5],
            Some(&base),
            &experts,
            &params,
        )
        .unwrap();
        assert_eq!(out.values, [0.0, 0.0, 6.0, -8.0, 0.0]);
        assert_eq!(out.stats.kept_fraction, [0.4, 0.0]);
    }

    #[test]
    fn no_experts_gives_the_base() {
        let base = [1.0, -2.0];
        for &m in Method::all() {
            let out = run(m, &m.default_globals(), &[2], Some(&base), &[], &[]).unwrap();
            assert_eq!(out.values, base);
            assert_eq!(out.stats.delta_l2, 0.0);
        }
        let err = run(
            Method::Linear,
            &Method::Linear.default_globals(),
            &[2],
            None,
            &[],
            &[],
        );
        assert!(err.is_err());
    }

    #[test]
    fn missing_base_is_an_error() {
        for &m in Method::all().iter().filter(|m| m.needs_base()) {
            let err = run(
                m,
                &m.default_globals(),
                &[1],
                None,
                &[&[1.0]],
                &[expert(1.0, 1.0)],
            )
            .unwrap_err();
            assert!(matches!(err, Error::Parameter { ref name, .. } if name == "base_model"));
        }
    }

    #[test]
    fn bad_parameters_are_errors_before_any_work() {
        let base = [0.0; 4];
        let x: [&[f32]; 1] = [&[1.0, 2.0, 3.0, 4.0]];
        let check = |m: Method, g: &GlobalParams, p: ExpertParams, param: &str| {
            let err = run(m, g, &[4], Some(&base), &x, &[p]).unwrap_err();
            assert!(
                matches!(err, Error::Parameter { ref name, ref tensor, .. }
                    if name == param && tensor == NAME),
                "{m:?} {param}: {err}"
            );
        };
        let della = Method::Della.default_globals();
        check(
            Method::Della,
            &della,
            ExpertParams {
                epsilon: 0.5,
                ..expert(1.0, 0.5)
            },
            "epsilon",
        );
        check(
            Method::DellaLinear,
            &della,
            ExpertParams {
                epsilon: 0.15,
                ..expert(1.0, 0.1)
            },
            "epsilon",
        );
        let ties = Method::Ties.default_globals();
        check(Method::Ties, &ties, expert(1.0, -0.5), "density");
        check(Method::DareTies, &ties, expert(1.0, f32::NAN), "density");
        check(Method::Ties, &ties, expert(f32::INFINITY, 0.5), "weight");
        let crumbs = Method::Breadcrumbs.default_globals();
        check(
            Method::Breadcrumbs,
            &crumbs,
            ExpertParams {
                gamma: 1.5,
                ..expert(1.0, 0.5)
            },
            "gamma",
        );
        let bad_lambda = GlobalParams {
            lambda: f32::NAN,
            ..ties.clone()
        };
        check(Method::Ties, &bad_lambda, expert(1.0, 0.5), "lambda");
        // Wrong lengths.
        let err = run(
            Method::Ties,
            &ties,
            &[3],
            Some(&base[..3]),
            &x,
            &[expert(1.0, 1.0)],
        );
        assert!(matches!(err, Err(Error::Parameter { ref name, .. }) if name == "shape"));
        let err = run(Method::Ties, &ties, &[4], Some(&base), &x, &[]);
        assert!(matches!(err, Err(Error::Parameter { ref name, .. }) if name == "experts"));
        // Epsilon is not checked where density makes it irrelevant, as in mergekit.
        let p = ExpertParams {
            epsilon: 0.9,
            ..expert(1.0, 1.0)
        };
        assert!(run(Method::Della, &della, &[4], Some(&base), &x, &[p]).is_ok());
        let p = ExpertParams { density: 0.0, ..p };
        assert!(run(Method::Della, &della, &[4], Some(&base), &x, &[p]).is_ok());
    }

    proptest! {
        #[test]
        fn one_expert_through_task_arithmetic_is_the_identity(
            pairs in prop::collection::vec((-1e3f32..1e3, -1e3f32..1e3), 1..64),
        ) {
            let (base, x): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            let g = Method::TaskArithmetic.default_globals();
            let out = run(Method::TaskArithmetic, &g, &[x.len()], Some(&base), &[&x], &[expert(1.0, 1.0)]).unwrap();
            for ((o, x), b) in out.values.iter().zip(&x).zip(&base) {
                // (x − b) + b is x up to the two roundings.
                prop_assert!((o - x).abs() <= f32::EPSILON * (x.abs() + b.abs()));
            }
        }

        #[test]
        fn ties_at_full_density_without_conflicts_is_the_weighted_mean(
            magnitudes in prop::collection::vec(prop::collection::vec(0.0f32..5.0, 12), 1..4),
            signs in prop::collection::vec(any::<bool>(), 12),
            weights in prop::collection::vec(0.1f32..2.0, 4),
        ) {
            let m = magnitudes.len();
            let base: Vec<f32> = (0..12).map(|i| i as f32 - 6.0).collect();
            let deltas: Vec<Vec<f32>> = magnitudes
                .iter()
                .map(|row| row.iter().zip(&signs).map(|(v, &s)| if s { *v } else { -*v }).collect())
                .collect();
            let experts: Vec<Vec<f32>> = deltas
                .iter()
                .map(|d| d.iter().zip(&base).map(|(d, b)| b + d).collect())
                .collect();
            let refs: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
            let params: Vec<ExpertParams> = weights[..m].iter().map(|&w| expert(w, 1.0)).collect();
            let g = Method::Ties.default_globals();
            let out = run(Method::Ties, &g, &[12], Some(&base), &refs, &params).unwrap();
            prop_assert_eq!(out.stats.sign_conflict, Some(0.0));
            for j in 0..12 {
                // Recompute the delta from the expert as the merge does.
                let d: Vec<f32> = (0..m).map(|e| experts[e][j] - base[j]).collect();
                let num: f32 = (0..m).map(|e| weights[e] * d[e]).sum();
                let den: f32 = (0..m).filter(|&e| d[e] != 0.0).map(|e| weights[e]).sum();
                let mean = if den == 0.0 { 0.0 } else { num / den };
                let expect = base[j] + mean;
                prop_assert!((out.values[j] - expect).abs() <= 1e-5 * (1.0 + expect.abs()));
            }
        }
    }
}
