//! The metrics of one module measured on a CUDA device (cuda/conflict.cu): the same numbers as
//! [`super::module_conflicts`], sums within 1e-6 relative, counts exact.

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
    let (t, n) = (updates.experts(), updates.len());
    let cuts = densities
        .iter()
        .enumerate()
        .map(|(i, &d)| gpu.cut(updates, i, magnitude_keep(d, n)))
        .collect::<Result<Vec<_>>>()?;
    let stats = gpu.conflicts(updates, &cuts, weights)?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let norms: Vec<f64> = (0..t).map(|a| stats.dots[a][a].sqrt()).collect();
    let mut cosine = vec![vec![1.0; t]; t];
    let mut topk_overlap = vec![vec![1.0; t]; t];
    for a in 0..t {
        for b in a + 1..t {
            let c = if norms[a] > 0.0 && norms[b] > 0.0 {
                stats.dots[a][b] / (norms[a] * norms[b])
            } else {
                0.0
            };
            cosine[a][b] = c;
            cosine[b][a] = c;
            let o = ratio(stats.both[a][b] as f64, stats.either[a][b] as f64);
            topk_overlap[a][b] = o;
            topk_overlap[b][a] = o;
        }
    }
    Ok(ModuleConflicts {
        module: module.to_string(),
        sign_conflict: ratio(stats.conflicted, stats.active),
        mean_kappa: ratio(stats.kappa_sum, stats.active),
        minority_mass: ratio(stats.minority, stats.total),
        cosine,
        topk_overlap,
        norms,
        retained_energy: None,
    })
}
