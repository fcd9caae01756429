//! The policy objective per token and its aggregation, as TRL's GRPOTrainer computes them.
//!
//! Per completion token, with `ρ = exp(logp − old_logp)` and the rollout's advantage `A`:
//! `ℓ = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) + β·KL`, KL the k3 estimator
//! `exp(ref − logp) − (ref − logp) − 1` to the adapter-disabled model. Only `dℓ/dlogp` is
//! needed to train (the engine turns it into logit gradients), so each term returns it.
//! [`sequence_weights`] gives each token's weight in the step's loss for the four loss types.

use serde::{Deserialize, Serialize};

/// How token losses are summed into the step's loss (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// The mean over sequences of each sequence's token mean (length-biased).
    Grpo,
    /// The token mean over each micro-batch.
    Bnpo,
    /// The token sum over `B · max_completion_length` (Dr. GRPO: no length bias).
    DrGrpo,
    /// The token sum over the active tokens of the whole accumulated batch (TRL's default).
    Dapo,
}

/// A token's PPO-clip term.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipTerm {
    /// `−min(ρA, clip(ρ)A)`.
    pub loss: f64,
    /// Its derivative in `logp`: `−ρA` where the unclipped term is the minimum, else 0.
    pub grad: f64,
    /// `ρ < 1 − ε_low` with `A < 0`: the clip binds from below.
    pub low_clipped: bool,
    /// `ρ > 1 + ε_high` with `A > 0`: the clip binds from above.
    pub high_clipped: bool,
}

/// The PPO-clip term of one token.
pub fn clip_term(
    logp: f64,
    old_logp: f64,
    advantage: f64,
    eps_low: f64,
    eps_high: f64,
) -> ClipTerm {
    let ratio = (logp - old_logp).exp();
    let clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high);
    let (plain, capped) = (ratio * advantage, clipped * advantage);
    let low_clipped = ratio < 1.0 - eps_low && advantage < 0.0;
    let high_clipped = ratio > 1.0 + eps_high && advantage > 0.0;
    ClipTerm {
        loss: -plain.min(capped),
        // Where the clip binds the minimum is the constant clipped term.
        grad: if low_clipped || high_clipped {
            0.0
        } else {
            -plain
        },
        low_clipped,
        high_clipped,
    }
}

/// The k3 estimate of KL(π‖π_ref) at one token and its derivative in `logp`.
pub fn k3(logp: f64, ref_logp: f64) -> (f64, f64) {
    let d = ref_logp - logp;
    (d.exp() - d - 1.0, 1.0 - d.exp())
}

/// Each sequence's token weight in the step's loss: the loss is `Σ_i w_i Σ_t m_it ℓ_it`.
/// `micro` holds the active completion tokens of each sequence of one micro-batch, of the
/// `grad_accum` that make the step, whose active tokens total `step_tokens`.
pub fn sequence_weights(
    loss: LossType,
    micro: &[usize],
    max_completion_length: usize,
    grad_accum: usize,
    step_tokens: usize,
) -> Vec<f64> {
    let b = micro.len().max(1) as f64;
    let ga = grad_accum.max(1) as f64;
    let micro_tokens = micro.iter().sum::<usize>().max(1) as f64;
    micro
        .iter()
        .map(|&n| match loss {
            LossType::Grpo => 1.0 / (b * n.max(1) as f64) / ga,
            LossType::Bnpo => 1.0 / micro_tokens / ga,
            LossType::DrGrpo => 1.0 / (b * max_completion_length.max(1) as f64) / ga,
            LossType::Dapo => 1.0 / step_tokens.max(1) as f64,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_policy_the_ratio_is_one_and_the_gradient_is_minus_a() {
        let t = clip_term(-1.3, -1.3, 0.7, 0.2, 0.28);
        assert_eq!(t.loss, -0.7);
        assert_eq!(t.grad, -0.7);
        assert!(!t.low_clipped && !t.high_clipped);
    }

    #[test]
    fn the_clip_binds_only_where_the_advantage_pushes_past_it() {
        let (lo, hi) = (0.2, 0.28);
        // ρ = 1.5: past 1.28. With A > 0 the clipped term is the minimum: no gradient.
        let up = clip_term(1.5f64.ln(), 0.0, 2.0, lo, hi);
        assert!(up.high_clipped && up.grad == 0.0);
        assert!((up.loss + 1.28 * 2.0).abs() < 1e-12);
        // With A < 0 the unclipped term is the minimum: the gradient flows.
        let down = clip_term(1.5f64.ln(), 0.0, -2.0, lo, hi);
        assert!(!down.high_clipped && !down.low_clipped);
        assert!((down.grad - 3.0).abs() < 1e-12 && (down.loss - 3.0).abs() < 1e-12);
        // ρ = 0.5 below 0.8: clipped for A < 0 only.
        let low = clip_term(0.5f64.ln(), 0.0, -1.0, lo, hi);
        assert!(low.low_clipped && low.grad == 0.0 && (low.loss - 0.8).abs() < 1e-12);
        let low_pos = clip_term(0.5f64.ln(), 0.0, 1.0, lo, hi);
        assert!(!low_pos.low_clipped && (low_pos.grad + 0.5).abs() < 1e-12);
    }

    #[test]
    fn k3_is_zero_at_the_reference_and_positive_elsewhere() {
        assert_eq!(k3(-2.0, -2.0), (0.0, 0.0));
        for (p, r) in [(-1.0, -2.0), (-3.0, -0.5), (-0.1, -0.2)] {
            let (kl, grad) = k3(p, r);
            assert!(kl > 0.0);
            let h = 1e-6;
            let numeric = (k3(p + h, r).0 - k3(p - h, r).0) / (2.0 * h);
            assert!((grad - numeric).abs() < 1e-6, "{grad} vs {numeric}");
        }
    }

    #[test]
    fn each_loss_type_normalises_as_trl() {
        // Two sequences of 2 and 6 active tokens in one micro-batch, max length 8.
        let w = |l| sequence_weights(l, &[2, 6], 8, 1, 8);
        assert_eq!(w(LossType::Grpo), [1.0 / 4.0, 1.0 / 12.0]);
        assert_eq!(w(LossType::Bnpo), [1.0 / 8.0, 1.0 / 8.0]);
        assert_eq!(w(LossType::DrGrpo), [1.0 / 16.0, 1.0 / 16.0]);
        assert_eq!(w(LossType::Dapo), [1.0 / 8.0, 1.0 / 8.0]);
    }

    #[test]
    fn dapo_weighs_every_token_alike_however_the_step_is_split() {
        let lengths = [3usize, 1, 4, 7];
        let total: usize = lengths.iter().sum();
        let whole = sequence_weights(LossType::Dapo, &lengths, 8, 1, total);
        let halves: Vec<f64> = lengths
            .chunks(2)
            .flat_map(|c| sequence_weights(LossType::Dapo, c, 8, 2, total))
            .collect();
        assert_eq!(whole, halves);
        // bnpo does depend on the split: its micro-batches have 4 and 11 tokens.
        let bnpo: Vec<f64> = lengths
            .chunks(2)
            .flat_map(|c| sequence_weights(LossType::Bnpo, c, 8, 2, total))
            .collect();
        assert_ne!(bnpo[0], bnpo[2]);
    }
}
