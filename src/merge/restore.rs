//! CACI's restore step (DESIGN.md §5): what the sign vote and the attenuation took from an
//! expert is given back along that expert's own update.
//!
//! After the coordinate-wise merge `Δ`, expert t is present in it to the degree
//! `ρ_t = ⟨Δ, Δ_t⟩ / ‖Δ_t‖²` (1: as much as the expert alone). A vote lost, a coordinate
//! attenuated or trimmed lowers one expert's `ρ_t` more than another's, and `lambda` cannot
//! tell them apart. Restore adds `Σ_s β_s·Δ_s`, with `β` solving
//! `Σ_s ⟨Δ_t, Δ_s⟩·β_s = τ·w_t·‖Δ_t‖² − ⟨Δ, Δ_t⟩` for every t, so that afterwards
//! `ρ_t = τ·w_t` for each expert: every expert is represented at the same level, and what the
//! merge kept of one expert is not counted as another's. The correction lies in the span of
//! the experts' updates, so a LoRA merge in core space stays lossless at the same rank; the
//! inner products are the same in core space as in full space (the frame keeps them).
//!
//! Experts whose updates are linearly dependent (two identical experts, an untrained one)
//! make the system singular: its least-norm solution is used, through the eigenvalues of the
//! Gram matrix that are not negligible.

use faer::Mat;

use super::linalg::significant;
use crate::error::Result;

/// Eigenvalues of the experts' Gram matrix below this share of the largest count as zero.
const NEGLIGIBLE: f64 = 1e-12;

/// Adds to `merged` (a merged update, the base not in it) the combination of the experts'
/// untrimmed `updates` that makes each expert's share `⟨Δ, Δ_t⟩ / ‖Δ_t‖²` equal
/// `target · weights[t]`. `tensor` names errors.
pub(crate) fn restore(
    merged: &mut [f32],
    updates: &[Vec<f32>],
    weights: &[f32],
    target: f32,
    tensor: &str,
) -> Result<()> {
    let gram = gram(updates);
    let shares: Vec<f64> = updates.iter().map(|u| dot(merged, u)).collect();
    let beta = coefficients(&gram, &shares, weights, target, tensor)?;
    add_along(merged, updates, &beta);
    Ok(())
}

/// The experts' Gram matrix `⟨Δ_i, Δ_j⟩`, row-major `t × t`: each pair once, mirrored (the
/// products are the same either way round, so the matrix is exactly symmetric).
pub(crate) fn gram(updates: &[Vec<f32>]) -> Vec<f64> {
    let t = updates.len();
    let mut gram = vec![0f64; t * t];
    for i in 0..t {
        for j in i..t {
            let g = dot(&updates[i], &updates[j]);
            gram[i * t + j] = g;
            gram[j * t + i] = g;
        }
    }
    gram
}

/// The coefficients `β` of the restoring combination, from the experts' Gram matrix `gram`
/// (row-major, `t × t`) and `shares[t] = ⟨Δ, Δ_t⟩`: the sums a merge streamed in chunks adds
/// up chunk by chunk.
pub(crate) fn coefficients(
    gram: &[f64],
    shares: &[f64],
    weights: &[f32],
    target: f32,
    tensor: &str,
) -> Result<Vec<f64>> {
    let t = shares.len();
    let gram = Mat::<f64>::from_fn(t, t, |i, j| gram[i * t + j]);
    let shortfall: Vec<f64> = (0..t)
        .map(|i| f64::from(target) * f64::from(weights[i]) * gram[(i, i)] - shares[i])
        .collect();
    least_norm_solve(&gram, &shortfall, tensor)
}

/// `merged += Σ_s β_s·Δ_s`, element by element in `f64`.
pub(crate) fn add_along(merged: &mut [f32], updates: &[Vec<f32>], beta: &[f64]) {
    for (update, &b) in updates.iter().zip(beta) {
        if b == 0.0 {
            continue;
        }
        for (m, u) in merged.iter_mut().zip(update) {
            *m = (f64::from(*m) + b * f64::from(*u)) as f32;
        }
    }
}

/// `Σ x·y` in `f64`, in index order.
pub(crate) fn dot(x: &[f32], y: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum()
}

/// The least-norm `x` with `G·x = b` for a symmetric positive semi-definite `G`, `b` in its
/// range (it is here: `b` is a combination of `G`'s columns and of inner products with the
/// vectors `G` is the Gram matrix of): `x = Σ_k v_k·(v_kᵀ·b) / λ_k` over the eigenpairs that
/// are not negligible.
fn least_norm_solve(gram: &Mat<f64>, b: &[f64], tensor: &str) -> Result<Vec<f64>> {
    let (vectors, values) = significant(gram.as_ref(), NEGLIGIBLE, tensor)?;
    let mut x = vec![0.0; b.len()];
    for (k, lambda) in values.iter().enumerate() {
        let v = vectors.col(k);
        let along: f64 = b.iter().enumerate().map(|(i, bi)| v[i] * bi).sum::<f64>() / lambda;
        for (i, xi) in x.iter_mut().enumerate() {
            *xi += along * v[i];
        }
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use faer::Side;
    use proptest::prelude::*;

    use super::*;

    fn share(merged: &[f32], update: &[f32]) -> f64 {
        dot(merged, update) / dot(update, update)
    }

    #[test]
    fn orthogonal_experts_each_get_the_target_share() {
        // Δ_1 = [2, 0, 0], Δ_2 = [0, 1, 0], orthogonal: the merge [1, 1, 5] holds half of
        // Δ_1 and all of Δ_2; with τ = 0.8 the correction is β = (0.8 − 0.5, 0.8 − 1) =
        // (0.3, −0.2): [1 + 0.6, 1 − 0.2, 5]. The third coordinate, no expert's, is untouched.
        let updates = [vec![2.0, 0.0, 0.0], vec![0.0, 1.0, 0.0]];
        let mut merged = vec![1.0, 1.0, 5.0];
        restore(&mut merged, &updates, &[1.0, 1.0], 0.8, "t").unwrap();
        let expected = [1.6f32, 0.8, 5.0];
        for (m, e) in merged.iter().zip(expected) {
            assert!((m - e).abs() < 1e-6, "{merged:?}");
        }
    }

    #[test]
    fn overlapping_experts_are_solved_together() {
        // Δ_1 = [1, 0], Δ_2 = [1, 1]: G = [[1, 1], [1, 2]]. The merge 0 with τ = 1 needs
        // G·β = (1, 2): β = (0, 1), the merge becomes Δ_2 = [1, 1], whose shares are
        // ⟨[1,1],[1,0]⟩/1 = 1 and ⟨[1,1],[1,1]⟩/2 = 1. Adding each expert's own shortfall
        // alone (β = (1, 1)) would give [2, 1] and shares 2 and 1.5.
        let updates = [vec![1.0, 0.0], vec![1.0, 1.0]];
        let mut merged = vec![0.0, 0.0];
        restore(&mut merged, &updates, &[1.0, 1.0], 1.0, "t").unwrap();
        assert!((merged[0] - 1.0).abs() < 1e-6 && (merged[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn identical_and_empty_experts_give_finite_values() {
        // Two copies of one update and a zero update: G is singular. The least-norm solution
        // splits the correction between the copies; the zero expert asks for nothing.
        let updates = [vec![1.0, 2.0], vec![1.0, 2.0], vec![0.0, 0.0]];
        let mut merged = vec![0.0, 0.0];
        restore(&mut merged, &updates, &[1.0; 3], 0.5, "t").unwrap();
        assert!(merged.iter().all(|v| v.is_finite()), "{merged:?}");
        assert!(
            (share(&merged, &updates[0]) - 0.5).abs() < 1e-6,
            "{merged:?}"
        );
    }

    proptest! {
        /// Afterwards each expert's share is `τ·w_t`, for any merge of independent updates.
        #[test]
        fn every_share_meets_its_target(
            updates in prop::collection::vec(prop::collection::vec(-4.0f32..4.0, 16), 1..5),
            merged in prop::collection::vec(-4.0f32..4.0, 16),
            weights in prop::collection::vec(0.2f32..2.0, 5),
            target in 0.1f32..2.0,
        ) {
            let gram = Mat::<f64>::from_fn(updates.len(), updates.len(), |i, j| dot(&updates[i], &updates[j]));
            let eigen = gram.self_adjoint_eigen(Side::Lower).unwrap();
            let values = eigen.S().column_vector();
            let largest = (0..updates.len()).map(|i| values[i]).fold(0.0, f64::max);
            // Well-conditioned draws only: the shares of nearly dependent updates are
            // sensitive to f32 rounding of the result, which the property is not about.
            prop_assume!(values[0] > largest * 1e-3);
            let mut merged = merged;
            restore(&mut merged, &updates, &weights, target, "t").unwrap();
            for (u, w) in updates.iter().zip(&weights) {
                let got = share(&merged, u);
                let want = f64::from(target) * f64::from(*w);
                prop_assert!((got - want).abs() < 1e-3 * (1.0 + want.abs()), "share {got} for target {want}");
            }
        }
    }
}
