//! The merge methods and their parameters: what a [`Method`] is, which parameters it reads,
//! and their defaults. `merge_tensor` (tensor_merge.rs) runs one on a `TensorJob`.
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

pub use super::consensus::{DisjointMean, SignElection};

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
    /// `(1 − κ)^γ`, and optionally each expert's share restored. With `attenuation = 0`,
    /// `confidence = "none"` and no `restore` it is TIES.
    Caci,
    /// Per linear module, the update that keeps each expert's outputs on its own inputs best in
    /// least squares (Jin et al., RegMean): `Δ = (Σ w_t·Δ_t·G_t)(Σ w_t·G_t)⁻¹` with each
    /// expert's calibration Gram `G_t` (see `regmean.rs`). Needs calibration statistics.
    #[serde(rename = "regmean")]
    RegMean,
    /// Fisher-weighted averaging (Matena & Raffel): `Δ = Σ w_t·F_t·Δ_t / Σ w_t·F_t`
    /// elementwise, with each expert's diagonal Fisher `F_t`. Needs calibration statistics.
    Fisher,
    /// LoRA adapters into one adapter, exactly: the experts' factors concatenated, at rank
    /// Σ r_t (PEFT's `combination_type="cat"`, without its padding). Adapter output only.
    Cat,
    /// LoRA adapters into one adapter: the exact weighted sum truncated by SVD to a rank
    /// target (PEFT's `combination_type="svd"`). Adapter output only.
    Svd,
}

/// How CACI weighs an expert's vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    /// `w / rms(Δ)`: a loud expert does not dictate every sign.
    Rms,
    /// `w`, as TIES.
    None,
    /// `w / rms(Δ·σ)`, with each coordinate scored by what it does to the expert's outputs on
    /// its own inputs (`σ`: the input features' RMS over its calibration tokens); the trim,
    /// the vote and the conflict measure use the scored values. Needs calibration statistics.
    Activation,
}

/// What a data-aware method does with a tensor the experts have no statistics for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// The weighted mean of the experts' updates (what RegMean gives when every expert's
    /// inputs are the same), times `lambda`.
    Linear,
    /// `lambda·Σ w·Δ`, as `task_arithmetic`.
    TaskArithmetic,
    /// Activation-aware CACI's: weight-only CACI (`confidence = "rms"`).
    RmsConfidence,
}

impl Fallback {
    /// Its name in recipes.
    pub fn method_name(self) -> &'static str {
        match self {
            Fallback::Linear => "linear",
            Fallback::TaskArithmetic => "task_arithmetic",
            Fallback::RmsConfidence => "caci with confidence rms",
        }
    }
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
    /// RegMean: the factor on the Grams' off-diagonal entries (1: exact least squares).
    pub alpha: f32,
    /// RegMean: the ridge added to the summed Gram, relative to its mean diagonal entry.
    pub ridge: f32,
    /// Fisher: the floor added to every Fisher entry, relative to the mean entry of each
    /// expert's Fisher of that tensor.
    pub fisher_floor: f32,
    /// Data-aware methods: how tensors without statistics are merged.
    pub fallback: Fallback,
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

const ALL: [Method; 15] = [
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
    Method::RegMean,
    Method::Fisher,
    Method::Cat,
    Method::Svd,
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
            Method::RegMean => "regmean",
            Method::Fisher => "fisher",
            Method::Cat => "cat",
            Method::Svd => "svd",
        }
    }

    /// Every method.
    pub fn all() -> &'static [Method] {
        &ALL
    }

    /// Whether the method merges adapters into an adapter and nothing else (`cat`, `svd`): it
    /// works on LoRA factors, not tensor by tensor.
    pub fn adapters_only(self) -> bool {
        matches!(self, Method::Cat | Method::Svd)
    }

    /// Whether the method reads calibration statistics (`regmean`, `fisher`).
    pub fn data_aware(self) -> bool {
        matches!(self, Method::RegMean | Method::Fisher)
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
            Method::Cat | Method::Svd | Method::RegMean | Method::Fisher => Trim::None,
        }
    }

    /// mergekit's defaults for this method (see the module table and parameters.rs), with the
    /// mergekit variants of the options and seed 0.
    pub fn default_globals(self) -> GlobalParams {
        let (normalize, rescale) = match self {
            Method::Linear | Method::Ties => (true, false),
            Method::Della => (true, true),
            Method::DareLinear | Method::DareTies | Method::DellaLinear => (false, true),
            Method::TaskArithmetic
            | Method::Breadcrumbs
            | Method::BreadcrumbsTies
            | Method::MagnitudePrune
            | Method::Cat
            | Method::Svd
            | Method::RegMean
            | Method::Fisher => (false, false),
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
            alpha: 1.0,
            ridge: 1e-4,
            fisher_floor: 1e-6,
            fallback: Fallback::Linear,
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
