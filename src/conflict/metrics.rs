//! Conflict metrics of one module's expert updates (DESIGN.md §5): where the experts' trimmed
//! updates disagree in sign, how contested those coordinates are, how much the disjoint mean
//! throws away, and how alike the experts are.

use serde::Serialize;

use crate::backend::device::ConflictSums;
use crate::merge::kernels::conflict_sums;

/// The metrics of one module.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModuleConflicts {
    /// The base tensor the experts update.
    pub module: String,
    /// Fraction of coordinates, among those some expert keeps, where kept entries disagree in
    /// sign.
    pub sign_conflict: f64,
    /// Mean of `κ = min(P, N) / max(P, N)` over the coordinates some expert keeps (P and N the
    /// weighted positive and negative mass of the kept entries).
    pub mean_kappa: f64,
    /// Share of the kept entries' weighted magnitude on the losing side of the sign vote: what
    /// a disjoint mean discards.
    pub minority_mass: f64,
    /// Cosine similarity of every pair of experts' full updates.
    pub cosine: Vec<Vec<f64>>,
    /// Jaccard overlap of every pair of experts' kept coordinates (top `density` by magnitude).
    pub topk_overlap: Vec<Vec<f64>>,
    /// Frobenius norm of each expert's update.
    pub norms: Vec<f64>,
    /// For a recipe merged in core space: the share of each expert's update the merge keeps
    /// (`‖Π·Δt‖ / ‖Δt‖`, Π the projector onto the merge's subspaces); `None` for an expert that
    /// does not adapt the module, and for other merges.
    pub retained_energy: Option<Vec<Option<f64>>>,
}

/// Computes the metrics of one module from the experts' updates, their weights and trim
/// densities (each expert keeps its top `density` by magnitude, as TIES and CACI do).
pub fn module_conflicts(
    module: &str,
    deltas: &[Vec<f32>],
    weights: &[f32],
    densities: &[f32],
) -> ModuleConflicts {
    from_sums(module, &conflict_sums(deltas, weights, densities))
}

/// The metrics from their sums, wherever those were computed.
pub(crate) fn from_sums(module: &str, sums: &ConflictSums) -> ModuleConflicts {
    let t = sums.dots.len();
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let norms: Vec<f64> = (0..t).map(|a| sums.dots[a][a].sqrt()).collect();
    let mut cosine = vec![vec![1.0; t]; t];
    let mut topk_overlap = vec![vec![1.0; t]; t];
    for a in 0..t {
        for b in a + 1..t {
            let c = if norms[a] > 0.0 && norms[b] > 0.0 {
                sums.dots[a][b] / (norms[a] * norms[b])
            } else {
                0.0
            };
            cosine[a][b] = c;
            cosine[b][a] = c;
            let o = ratio(sums.both[a][b] as f64, sums.either[a][b] as f64);
            topk_overlap[a][b] = o;
            topk_overlap[b][a] = o;
        }
    }
    ModuleConflicts {
        module: module.to_string(),
        sign_conflict: ratio(sums.conflicted, sums.active),
        mean_kappa: ratio(sums.kappa_sum, sums.active),
        minority_mass: ratio(sums.minority, sums.total),
        cosine,
        topk_overlap,
        norms,
        retained_energy: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_metrics() {
        // a = [2, -1, 0, 4], b = [1, 1, -3, -4], weights 1, no trim.
        // Active coordinates: all 4. Conflicts at 1 (−1 vs 1), 3 (4 vs −4); not at 0, 2.
        // κ: c0 0, c1 1, c2 0, c3 1 → mean 0.5. Minority: 0 + 1 + 0 + 4 = 5 of 16 in all.
        // cos = (2 − 1 + 0 − 16) / (√21 · √27).
        let a = vec![2.0, -1.0, 0.0, 4.0];
        let b = vec![1.0, 1.0, -3.0, -4.0];
        let m = module_conflicts("m", &[a, b], &[1.0, 1.0], &[1.0, 1.0]);
        assert_eq!(m.sign_conflict, 0.5);
        assert_eq!(m.mean_kappa, 0.5);
        assert_eq!(m.minority_mass, 5.0 / 16.0);
        let cos = -15.0 / (21f64.sqrt() * 27f64.sqrt());
        assert!((m.cosine[0][1] - cos).abs() < 1e-12);
        assert_eq!(m.cosine[0][1], m.cosine[1][0]);
        // Kept sets at density 1: a keeps {0,1,3} (its zero is not kept), b keeps all 4.
        assert_eq!(m.topk_overlap[0][1], 0.75);
    }

    #[test]
    fn trimming_removes_conflicts_among_small_entries() {
        // At density 0.5 each keeps its two largest: a {0, 3}, b {2, 3}; conflict only at 3.
        let a = vec![2.0, -1.0, 0.0, 4.0];
        let b = vec![1.0, 1.0, -3.0, -4.0];
        let m = module_conflicts("m", &[a, b], &[1.0, 1.0], &[0.5, 0.5]);
        assert_eq!(m.sign_conflict, 1.0 / 3.0);
        assert_eq!(m.topk_overlap[0][1], 1.0 / 3.0);
    }

    #[test]
    fn identical_experts_do_not_conflict() {
        let a = vec![1.0, -2.0, 3.0];
        let m = module_conflicts("m", &[a.clone(), a], &[1.0, 0.5], &[0.5, 0.5]);
        assert_eq!(
            (m.sign_conflict, m.mean_kappa, m.minority_mass),
            (0.0, 0.0, 0.0)
        );
        assert!((m.cosine[0][1] - 1.0).abs() < 1e-12);
    }
}
