//! One tensor's merge: what goes in ([`TensorJob`]) and what comes out ([`MergedTensor`]),
//! with the distances its statistics report.

use serde::Serialize;

use super::method::ExpertParams;
use super::sparsify;

/// One tensor to merge.
#[derive(Debug, Clone)]
pub struct TensorJob<'a> {
    /// The tensor's name (keys the random masks and names errors).
    pub name: &'a str,
    /// The tensor's shape (DELLA ranks along axis 1).
    pub shape: &'a [usize],
    /// The base model's tensor; every method but `linear` needs it.
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
    /// expert under `linear`, which takes everything).
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

/// `‖values − base‖₂` in `f64`, or `‖values‖₂` without a base.
pub(crate) fn distance(values: &[f32], base: Option<&[f32]>) -> f64 {
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
