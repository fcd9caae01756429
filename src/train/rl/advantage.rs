//! Advantage estimators: one scalar per rollout from the rewards of its group (a case's K
//! rollouts) and, for GBA, of its stratum (the rollouts of the group drawn under the same
//! guideline). Each is a pure function of the rewards and the labels.
//!
//! - GRPO (TRL's default): `A = (r − μ_group) / (σ + 1e-4)`, σ by `scale_rewards`: the group's
//!   Bessel-corrected std (`group`), the whole batch's (`batch`), or no division (`none`).
//! - Dr. GRPO: `A = r − μ_group` (no std: no question-difficulty bias).
//! - RLOO: `A = r − mean of the group's other rewards`.
//! - GBA (DESIGN.md §7): `A = α·(r − μ_s)/(σ_s + ε) + (1 − α)·(r − μ)/(σ + ε)`, μ_s, σ_s over
//!   the stratum, μ, σ over the group; `scale_rewards` chooses the σ of both terms as for GRPO.
//!   α = 0 is GRPO exactly.
//! - GBA, pooled scale: the same with the group's σ dividing the stratum term too,
//!   `A = α·(r − μ_s)/(σ + ε) + (1 − α)·(r − μ)/(σ + ε)`: a per-guideline baseline without the
//!   stratum's own std, which with two or three rollouts a stratum blows small reward
//!   differences up to ±1.
//!
//! A group (or stratum) of one rollout has no spread: its term is 0, as TRL's NaN std becomes.

use serde::{Deserialize, Serialize};

/// Added to every std before dividing (TRL's 1e-4).
pub const EPSILON: f64 = 1e-4;

/// How rewards are scaled before they become advantages (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// By the std of the group.
    Group,
    /// By the std of the whole batch.
    Batch,
    /// Not at all.
    None,
}

/// Which advantage estimator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Estimator {
    /// Group-normalised rewards.
    Grpo,
    /// Group-centred rewards without a std.
    DrGrpo,
    /// Leave-one-out baselines.
    Rloo,
    /// Guideline-based: a mix of stratum- and group-normalised rewards, with weight `alpha`
    /// on the stratum.
    Gba {
        /// The stratum's weight, in [0, 1].
        alpha: f64,
    },
    /// GBA with the group's std scaling the stratum term.
    GbaPooled {
        /// The stratum's weight, in [0, 1].
        alpha: f64,
    },
}

/// The mean and the Bessel-corrected std of `values` (std 0 for fewer than two).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, var.sqrt())
}

/// The advantage of each rollout. `groups[i]` labels rollout i's group, `strata[i]` its
/// guideline (used by GBA only); the three slices have one entry per rollout.
pub fn advantages(
    rewards: &[f64],
    groups: &[usize],
    strata: &[usize],
    estimator: Estimator,
    scale: ScaleRewards,
) -> Vec<f64> {
    assert_eq!(rewards.len(), groups.len(), "one group label per reward");
    assert_eq!(rewards.len(), strata.len(), "one stratum label per reward");
    let batch_std = mean_std(rewards).1;
    // The members of a rollout's set (its group, or its group and stratum).
    let members = |i: usize, with_stratum: bool| -> Vec<f64> {
        (0..rewards.len())
            .filter(|&j| groups[j] == groups[i] && (!with_stratum || strata[j] == strata[i]))
            .map(|j| rewards[j])
            .collect()
    };
    // Centred on the stratum's (or group's) mean; scaled by the group's std when `pooled`.
    let scaled = |i: usize, with_stratum: bool, scale: ScaleRewards, pooled: bool| -> f64 {
        let set = members(i, with_stratum);
        if set.len() < 2 {
            return 0.0;
        }
        let (mean, own_std) = mean_std(&set);
        let std = if pooled {
            mean_std(&members(i, false)).1
        } else {
            own_std
        };
        let centred = rewards[i] - mean;
        match scale {
            ScaleRewards::Group => centred / (std + EPSILON),
            ScaleRewards::Batch => centred / (batch_std + EPSILON),
            ScaleRewards::None => centred,
        }
    };
    let normalised =
        |i: usize, with_stratum: bool, scale: ScaleRewards| scaled(i, with_stratum, scale, false);
    (0..rewards.len())
        .map(|i| match estimator {
            Estimator::Grpo => normalised(i, false, scale),
            Estimator::DrGrpo => normalised(i, false, ScaleRewards::None),
            Estimator::Rloo => {
                let set = members(i, false);
                if set.len() < 2 {
                    return 0.0;
                }
                let others = (set.iter().sum::<f64>() - rewards[i]) / (set.len() - 1) as f64;
                rewards[i] - others
            }
            Estimator::Gba { alpha } => {
                let group = normalised(i, false, scale);
                if alpha == 0.0 {
                    return group;
                }
                alpha * normalised(i, true, scale) + (1.0 - alpha) * group
            }
            Estimator::GbaPooled { alpha } => {
                alpha * scaled(i, true, scale, true) + (1.0 - alpha) * normalised(i, false, scale)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn grpo_normalises_within_each_group_with_bessel_std() {
        // Group 0: [1, 0, 0, 1] mean 0.5, std sqrt(1/3); group 1: [2, 2] std 0.
        let r = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0];
        let g = [0, 0, 0, 0, 1, 1];
        let a = advantages(&r, &g, &[0; 6], Estimator::Grpo, ScaleRewards::Group);
        let s = (1.0f64 / 3.0).sqrt() + EPSILON;
        close(&a, &[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0.0, 0.0]);
        // Batch std of all six: mean 1, squares 0+1+1+0+1+1 = 4 over 5.
        let b = advantages(&r, &g, &[0; 6], Estimator::Grpo, ScaleRewards::Batch);
        let s = 0.8f64.sqrt() + EPSILON;
        close(&b, &[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0.0, 0.0]);
        let n = advantages(&r, &g, &[0; 6], Estimator::Grpo, ScaleRewards::None);
        close(&n, &[0.5, -0.5, -0.5, 0.5, 0.0, 0.0]);
    }

    #[test]
    fn dr_grpo_centres_and_rloo_leaves_one_out() {
        let r = [3.0, 1.0, 2.0];
        let g = [0, 0, 0];
        let d = advantages(&r, &g, &[0; 3], Estimator::DrGrpo, ScaleRewards::Group);
        close(&d, &[1.0, -1.0, 0.0]);
        let l = advantages(&r, &g, &[0; 3], Estimator::Rloo, ScaleRewards::Group);
        // 3 − (1+2)/2, 1 − (3+2)/2, 2 − (3+1)/2: n/(n−1) times the centred reward.
        close(&l, &[1.5, -1.5, 0.0]);
        let single = advantages(&[5.0], &[0], &[0], Estimator::Rloo, ScaleRewards::Group);
        close(&single, &[0.0]);
    }

    #[test]
    fn gba_mixes_stratum_and_group_terms() {
        // One group of four, two guidelines: stratum 0 = [1, 0], stratum 1 = [1, 1].
        let r = [1.0, 0.0, 1.0, 1.0];
        let g = [0; 4];
        let s = [0, 0, 1, 1];
        let alpha = 0.5;
        let a = advantages(&r, &g, &s, Estimator::Gba { alpha }, ScaleRewards::Group);
        // Group: mean 0.75, std sqrt(0.75/3) = 0.5; stratum 0: mean 0.5, std sqrt(0.5).
        let group = |x: f64| (x - 0.75) / (0.5 + EPSILON);
        let stratum0 = 0.5 / (0.5f64.sqrt() + EPSILON);
        close(
            &a,
            &[
                alpha * stratum0 + (1.0 - alpha) * group(1.0),
                alpha * -stratum0 + (1.0 - alpha) * group(0.0),
                (1.0 - alpha) * group(1.0),
                (1.0 - alpha) * group(1.0),
            ],
        );
        let only_strata = advantages(
            &r,
            &g,
            &s,
            Estimator::Gba { alpha: 1.0 },
            ScaleRewards::None,
        );
        close(&only_strata, &[0.5, -0.5, 0.0, 0.0]);
    }

    #[test]
    fn pooled_gba_scales_the_stratum_term_by_the_group_std() {
        let r = [1.0, 0.0, 1.0, 1.0];
        let (g, s) = ([0; 4], [0, 0, 1, 1]);
        let a = advantages(
            &r,
            &g,
            &s,
            Estimator::GbaPooled { alpha: 1.0 },
            ScaleRewards::Group,
        );
        // Stratum 0 centred: ±0.5; the group's std is 0.5.
        let x = 0.5 / (0.5 + EPSILON);
        close(&a, &[x, -x, 0.0, 0.0]);
        let grpo = advantages(&r, &g, &s, Estimator::Grpo, ScaleRewards::Group);
        let zero = advantages(
            &r,
            &g,
            &s,
            Estimator::GbaPooled { alpha: 0.0 },
            ScaleRewards::Group,
        );
        assert_eq!(grpo, zero);
    }

    #[test]
    fn gba_with_alpha_zero_or_one_guideline_and_alpha_zero_is_grpo_exactly() {
        let r = [0.2, 1.7, 0.9, 0.9, 3.0, 0.0, 1.0, 0.5];
        let g = [0, 0, 0, 0, 1, 1, 1, 1];
        for scale in [ScaleRewards::Group, ScaleRewards::Batch, ScaleRewards::None] {
            let grpo = advantages(&r, &g, &[0; 8], Estimator::Grpo, scale);
            let gba = advantages(&r, &g, &[0; 8], Estimator::Gba { alpha: 0.0 }, scale);
            assert_eq!(grpo, gba, "bit for bit");
            // With one guideline the stratum is the group: any alpha gives GRPO (to rounding).
            let one = advantages(&r, &g, &[3; 8], Estimator::Gba { alpha: 0.7 }, scale);
            close(&grpo, &one);
        }
    }
}
