//! TIES sign election and the disjoint mean (mergekit `get_mask(method="sum")` plus the
//! masked sum in `GeneralizedTaskArithmeticMerge`, and PEFT's `ties` for the paper's
//! variant).
//!
//! Per coordinate: the elected sign is that of `Σ_m f_m·δ_m` (`f_m = w_m` or 1, see
//! [`SignElection`]), a zero sum electing `+`. Expert `m` agrees iff `sign(f_m·δ_m)`
//! equals it, so a zero (trimmed) entry never agrees. The merged delta is
//! `Σ_agree w_m·δ_m`, divided (when normalising) by the sum of the agreeing experts'
//! weights or by their count ([`DisjointMean`]), a zero divisor counting as 1.

use serde::{Deserialize, Serialize};

/// What the sign vote sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignElection {
    /// The weighted deltas `w_m·δ_m` (mergekit): a weight scales a vote and a negative
    /// weight flips it (mergekit issue #474).
    Weighted,
    /// The trimmed deltas before weighting, as in the TIES paper's Algorithm 1 and PEFT.
    Unweighted,
}

/// What the disjoint mean divides by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisjointMean {
    /// The sum of the agreeing experts' weights (mergekit).
    Weights,
    /// The number of agreeing experts (the TIES paper and PEFT).
    Counts,
}

/// Coordinates handled per block: small enough for the three accumulators to live on the
/// stack, large enough for the inner loops to vectorise.
const BLOCK: usize = 512;

/// Elects signs over the trimmed, unweighted `deltas` and writes the disjoint merge into
/// `deltas[0]` (the others are left as they were). With `normalize` off the result is the
/// agreeing weighted sum, undivided (mergekit's dare_ties default).
///
/// Returns the number of coordinates where some kept (nonzero) entry opposes the elected
/// sign. Sums run over experts in order, in `f32`, as mergekit's do.
///
/// # Panics
/// If `weights.len() != deltas.len()` or the deltas differ in length: the caller checks
/// both before any arithmetic.
pub fn disjoint_merge(
    deltas: &mut [Vec<f32>],
    weights: &[f32],
    election: SignElection,
    mean: DisjointMean,
    normalize: bool,
) -> usize {
    // Wider vectors where the CPU has them; the arithmetic, and so the result, is the same.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has the feature the function is compiled for.
        return unsafe { disjoint_merge_avx2(deltas, weights, election, mean, normalize) };
    }
    disjoint_merge_generic(deltas, weights, election, mean, normalize)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn disjoint_merge_avx2(
    deltas: &mut [Vec<f32>],
    weights: &[f32],
    election: SignElection,
    mean: DisjointMean,
    normalize: bool,
) -> usize {
    disjoint_merge_generic(deltas, weights, election, mean, normalize)
}

#[inline(always)]
fn disjoint_merge_generic(
    deltas: &mut [Vec<f32>],
    weights: &[f32],
    election: SignElection,
    mean: DisjointMean,
    normalize: bool,
) -> usize {
    assert_eq!(deltas.len(), weights.len(), "one weight per delta");
    let n = deltas.first().map_or(0, Vec::len);
    assert!(
        deltas.iter().all(|d| d.len() == n),
        "deltas differ in length"
    );
    let vote_factor = |w: f32| match election {
        SignElection::Weighted => w,
        SignElection::Unweighted => 1.0,
    };
    let share = |w: f32| match mean {
        DisjointMean::Weights => w,
        DisjointMean::Counts => 1.0,
    };
    let mut conflicts = 0;
    let mut start = 0;
    while start < n {
        let end = (start + BLOCK).min(n);
        let len = end - start;
        let mut vote = [0.0f32; BLOCK];
        let mut mixed = [0.0f32; BLOCK];
        let mut divisor = [0.0f32; BLOCK];
        let mut conflict = [0u8; BLOCK];
        for (delta, &w) in deltas.iter().zip(weights) {
            let f = vote_factor(w);
            for (s, &x) in vote[..len].iter_mut().zip(&delta[start..end]) {
                *s += f * x;
            }
        }
        for (delta, &w) in deltas.iter().zip(weights) {
            let (f, part) = (vote_factor(w), share(w));
            let block = &delta[start..end];
            let lanes = block
                .iter()
                .zip(&vote[..len])
                .zip(&mut mixed[..len])
                .zip(&mut divisor[..len])
                .zip(&mut conflict[..len]);
            for ((((&x, &v), m), d), c) in lanes {
                // Oriented by the elected sign: > 0 agrees, < 0 opposes, 0 abstains. A NaN
                // vote fails `>= 0` and elects `−`, as in mergekit. Branch-free to vectorise.
                let elected = if v >= 0.0 { 1.0 } else { -1.0 };
                let oriented = f * x * elected;
                let agrees = oriented > 0.0;
                *m += if agrees { w * x } else { 0.0 };
                *d += if agrees { part } else { 0.0 };
                *c |= u8::from(oriented < 0.0);
            }
        }
        conflicts += conflict[..len]
            .iter()
            .map(|&c| usize::from(c))
            .sum::<usize>();
        let out = &mut deltas[0][start..end];
        if normalize {
            for ((o, &m), &d) in out.iter_mut().zip(&mixed).zip(&divisor) {
                *o = m / if d == 0.0 { 1.0 } else { d };
            }
        } else {
            out.copy_from_slice(&mixed[..len]);
        }
        start = end;
    }
    conflicts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn merge(
        deltas: &[&[f32]],
        weights: &[f32],
        election: SignElection,
        mean: DisjointMean,
        normalize: bool,
    ) -> (Vec<f32>, usize) {
        let mut d: Vec<Vec<f32>> = deltas.iter().map(|d| d.to_vec()).collect();
        let conflicts = disjoint_merge(&mut d, weights, election, mean, normalize);
        (d.swap_remove(0), conflicts)
    }

    #[test]
    fn weighted_election_with_weight_divisor() {
        // Coordinate by coordinate, weights (1, 2, 1):
        // 0: deltas (1, 1, −4) → weighted (1, 2, −4), sum −1 → elect −; only the third
        //    agrees: −4 / 1 = −4. Conflict.
        // 1: (2, −1, 0) → (2, −2, 0), sum 0 → elect +; the first agrees: 2 / 1 = 2.
        //    Conflict.
        // 2: (0, 0, 0) → nobody agrees, divisor 0 → 1: 0.
        // 3: (3, 1, 2) → all agree: (3 + 2 + 2) / 4 = 1.75.
        let (out, conflicts) = merge(
            &[
                &[1.0, 2.0, 0.0, 3.0],
                &[1.0, -1.0, 0.0, 1.0],
                &[-4.0, 0.0, 0.0, 2.0],
            ],
            &[1.0, 2.0, 1.0],
            SignElection::Weighted,
            DisjointMean::Weights,
            true,
        );
        assert_eq!(out, [-4.0, 2.0, 0.0, 1.75]);
        assert_eq!(conflicts, 2);
    }

    #[test]
    fn unweighted_election_with_count_divisor() {
        // Same deltas, the paper's rules:
        // 0: unweighted sum 1 + 1 − 4 = −2 → elect −; third agrees: −4 / 1 = −4.
        // 1: 2 − 1 + 0 = 1 → +; the first agrees: 2 / 1 = 2.
        // 3: all agree: (3 + 2 + 2) / 3 = 7/3.
        let (out, conflicts) = merge(
            &[
                &[1.0, 2.0, 0.0, 3.0],
                &[1.0, -1.0, 0.0, 1.0],
                &[-4.0, 0.0, 0.0, 2.0],
            ],
            &[1.0, 2.0, 1.0],
            SignElection::Unweighted,
            DisjointMean::Counts,
            true,
        );
        assert_eq!(out, [-4.0, 2.0, 0.0, 7.0 / 3.0]);
        assert_eq!(conflicts, 2);
    }

    #[test]
    fn the_two_elections_differ_when_weights_outvote() {
        // Deltas (1, −3), weights (4, 1): weighted votes 4 − 3 = 1 → +, unweighted
        // 1 − 3 = −2 → −.
        let deltas: [&[f32]; 2] = [&[1.0], &[-3.0]];
        let w = [4.0, 1.0];
        let weighted = merge(
            &deltas,
            &w,
            SignElection::Weighted,
            DisjointMean::Weights,
            true,
        );
        assert_eq!(weighted.0, [1.0]); // 4·1 / 4
        let unweighted = merge(
            &deltas,
            &w,
            SignElection::Unweighted,
            DisjointMean::Weights,
            true,
        );
        assert_eq!(unweighted.0, [-3.0]); // 1·(−3) / 1
    }

    #[test]
    fn negative_weight_flips_a_weighted_vote() {
        // Deltas (2, 1), weights (−1, 1): weighted votes (−2, 1), sum −1 → −; the first
        // agrees with weight −1: (−2) / (−1) = 2. Unweighted: 3 → +, both agree:
        // (−2 + 1) / (−1 + 1 = 0 → 1) = −1.
        let deltas: [&[f32]; 2] = [&[2.0], &[1.0]];
        let w = [-1.0, 1.0];
        let weighted = merge(
            &deltas,
            &w,
            SignElection::Weighted,
            DisjointMean::Weights,
            true,
        );
        assert_eq!(weighted, (vec![2.0], 1));
        let unweighted = merge(
            &deltas,
            &w,
            SignElection::Unweighted,
            DisjointMean::Weights,
            true,
        );
        assert_eq!(unweighted, (vec![-1.0], 0));
    }

    #[test]
    fn zero_weight_votes_only_in_the_unweighted_election() {
        // Deltas (1, −2), weights (1, 0). Weighted: votes (1, 0) → +, the zero vote
        // never agrees: 1 / 1. Unweighted with counts: 1 − 2 → −, the second agrees and
        // adds 0·(−2): 0 / 1 = 0.
        let deltas: [&[f32]; 2] = [&[1.0], &[-2.0]];
        let w = [1.0, 0.0];
        let weighted = merge(
            &deltas,
            &w,
            SignElection::Weighted,
            DisjointMean::Weights,
            true,
        );
        assert_eq!(weighted, (vec![1.0], 0));
        let paper = merge(
            &deltas,
            &w,
            SignElection::Unweighted,
            DisjointMean::Counts,
            true,
        );
        assert_eq!(paper, (vec![0.0], 1));
    }

    #[test]
    fn without_normalize_the_agreeing_sum_is_returned() {
        // Coordinate 3 of the first test: 3 + 2 + 2 = 7, undivided.
        let (out, _) = merge(
            &[&[3.0], &[1.0], &[2.0]],
            &[1.0, 2.0, 1.0],
            SignElection::Weighted,
            DisjointMean::Weights,
            false,
        );
        assert_eq!(out, [7.0]);
    }

    #[test]
    fn blocks_cover_every_coordinate() {
        // 2·BLOCK + 3 coordinates alternating in sign; each expert alone.
        let n = 2 * BLOCK + 3;
        let a: Vec<f32> = (0..n)
            .map(|i| if i % 2 == 0 { 2.0 } else { -2.0 })
            .collect();
        let b: Vec<f32> = (0..n)
            .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        let (out, conflicts) = merge(
            &[&a, &b],
            &[1.0, 1.0],
            SignElection::Weighted,
            DisjointMean::Weights,
            true,
        );
        let mut expected_conflicts = 0;
        for i in 0..n {
            // |a| > |b| everywhere, so a's sign wins; b agrees iff the signs match.
            let expect = if a[i].signum() == b[i].signum() {
                (a[i] + b[i]) / 2.0
            } else {
                expected_conflicts += 1;
                a[i]
            };
            assert_eq!(out[i], expect, "coordinate {i}");
        }
        assert_eq!(conflicts, expected_conflicts);
    }

    proptest! {
        #[test]
        fn without_conflicts_it_is_the_weighted_mean(
            magnitudes in prop::collection::vec(prop::collection::vec(0.0f32..10.0, 16), 1..5),
            signs in prop::collection::vec(any::<bool>(), 16),
            weights in prop::collection::vec(0.1f32..3.0, 5),
        ) {
            // All experts share each coordinate's sign, so nothing conflicts.
            let m = magnitudes.len();
            let deltas: Vec<Vec<f32>> = magnitudes
                .iter()
                .map(|row| row.iter().zip(&signs).map(|(v, &s)| if s { *v } else { -*v }).collect())
                .collect();
            let w = &weights[..m];
            let mut work = deltas.clone();
            let conflicts = disjoint_merge(&mut work, w, SignElection::Weighted, DisjointMean::Weights, true);
            prop_assert_eq!(conflicts, 0);
            for j in 0..16 {
                let num: f32 = (0..m).map(|e| w[e] * deltas[e][j]).sum();
                let den: f32 = (0..m).filter(|&e| deltas[e][j] != 0.0).map(|e| w[e]).sum();
                let expect = if den == 0.0 { num } else { num / den };
                prop_assert!((work[0][j] - expect).abs() <= 1e-5 * (1.0 + expect.abs()));
            }
        }
    }
}
