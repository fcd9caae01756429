//! The metrics of one module measured on a CUDA device (cuda/conflict.cu): the same numbers as
//! [`super::module_conflicts`], sums within 1e-6 relative, counts exact, turned into metrics by
//! the same function.

use super::metrics::from_sums;
use super::ModuleConflicts;
use crate::backend::device::{Gpu, Updates};
use crate::error::Result;
use crate::merge::sparsify::magnitude_keep;

/// [`super::module_conflicts`] of the experts' `updates`, already on `gpu`.
pub(crate) fn module_conflicts_on_device(
    gpu: &Gpu,
    module: &str,
    updates: &Updates,
    weights: &[f32],
    densities: &[f32],
) -> Result<ModuleConflicts> {
    let n = updates.len();
    let cuts = densities
        .iter()
        .enumerate()
        .map(|(i, &d)| gpu.cut(updates, i, magnitude_keep(d, n)))
        .collect::<Result<Vec<_>>>()?;
    Ok(from_sums(module, &gpu.conflicts(updates, &cuts, weights)?))
}
