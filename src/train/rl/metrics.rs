//! What a GBA step logs (`metrics.jsonl`, TRL's names where TRL has the figure): the rewards
//! of its rollouts overall, per reward and per guideline, the completions' lengths, and the
//! update's clip ratios, KL, entropy, learning rate and timings.

use std::collections::BTreeMap;

use serde::Serialize;

use super::advantage::mean_std;
use super::reward::WeightedReward;
use super::rollout::Rollout;
use crate::train::guideline::config::Guidelines;

/// Mean and std of a set of values.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Spread {
    /// Mean.
    pub mean: f64,
    /// Bessel-corrected std.
    pub std: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Spread {
        let (mean, std) = mean_std(values);
        Spread { mean, std }
    }
}

/// One guideline's figures in a step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GuidelineMetrics {
    /// Rollouts drawn under it.
    pub rollouts: usize,
    /// Their summed reward.
    pub reward: Spread,
    /// Their mean advantage.
    pub advantage_mean: f64,
    /// Their accuracy (the letter read against the answer).
    pub accuracy: f64,
    /// Their mean adherence to the guideline.
    pub adherence: f64,
}

/// One step's figures, as written to `metrics.jsonl` (TRL's names where TRL has the figure).
#[derive(Debug, Clone, Serialize)]
pub struct GbaStepMetrics {
    /// Generation batches done (1-based).
    pub step: usize,
    /// All generation batches of the run.
    pub total_steps: usize,
    /// The rewards and the completions of the step's rollouts.
    #[serde(flatten)]
    pub rollouts: RolloutFigures,
    /// Groups generated this step (more than `cases_per_step` with dynamic sampling).
    pub groups_generated: usize,
    /// Tokens where the clip bound from below (ρ < 1 − ε_low, A < 0), as a share.
    #[serde(rename = "clip_ratio/low_mean")]
    pub clip_low: f64,
    /// From above (ρ > 1 + ε_high, A > 0).
    #[serde(rename = "clip_ratio/high_mean")]
    pub clip_high: f64,
    /// Either.
    #[serde(rename = "clip_ratio/region_mean")]
    pub clip_region: f64,
    /// Mean k3 KL to the adapter-disabled model (with β > 0).
    pub kl: Option<f64>,
    /// Mean per-token entropy of the policy at the sampling temperature.
    pub entropy: f64,
    /// Completion tokens generated per second of generation.
    pub generation_tokens_per_second: f64,
    /// Seconds in each phase: generation, scoring, forward and backward, optimizer.
    pub time: BTreeMap<String, f64>,
    /// The learning rate of the step's last update.
    pub lr: f64,
    /// The gradients' global norm before clipping, at the last update.
    pub grad_norm: f64,
    /// Seconds since the run (or the resume) started.
    pub elapsed: f64,
}

/// The figures of a step's rollouts.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutFigures {
    /// The summed reward, mean over rollouts.
    pub reward: f64,
    /// Its std.
    pub reward_std: f64,
    /// Per reward function.
    pub rewards: BTreeMap<String, Spread>,
    /// Per guideline.
    pub guidelines: BTreeMap<String, GuidelineMetrics>,
    /// Groups whose rewards are all equal (no learning signal), as a share.
    pub frac_reward_zero_std: f64,
    /// Completion lengths.
    #[serde(rename = "completions/mean_length")]
    pub mean_length: f64,
    /// The longest completion.
    #[serde(rename = "completions/max_length")]
    pub max_length: usize,
    /// Completions cut at `max_completion_length`, as a share.
    #[serde(rename = "completions/clipped_ratio")]
    pub clipped_ratio: f64,
}

impl RolloutFigures {
    /// The figures of `all` the rollouts generated (groups `0..groups`), with the advantages
    /// `adv` of those `kept` for the update.
    pub(super) fn of(
        all: &[Rollout],
        kept: &[Rollout],
        adv: &[f64],
        rewards: &[WeightedReward],
        guidelines: &Guidelines,
        groups: usize,
    ) -> RolloutFigures {
        let spread = Spread::of(&all.iter().map(|r| r.reward).collect::<Vec<_>>());
        let mut per_reward = BTreeMap::new();
        for (k, r) in rewards.iter().enumerate() {
            let v: Vec<f64> = all.iter().map(|x| x.rewards[k]).collect();
            per_reward.insert(r.reward.name().to_string(), Spread::of(&v));
        }
        let accuracy_at = rewards.iter().position(|r| r.reward.name() == "accuracy");
        let adherence_at = rewards.iter().position(|r| r.reward.name() == "adherence");
        let mut per_guideline = BTreeMap::new();
        for (g, guideline) in guidelines.guidelines.iter().enumerate() {
            let mine: Vec<&Rollout> = all.iter().filter(|r| r.guideline == g).collect();
            let kept_adv: Vec<f64> = kept
                .iter()
                .zip(adv)
                .filter(|(r, _)| r.guideline == g)
                .map(|(_, a)| *a)
                .collect();
            let mean_of = |at: Option<usize>| {
                at.map_or(0.0, |k| {
                    mine.iter().map(|r| r.rewards[k]).sum::<f64>() / mine.len().max(1) as f64
                })
            };
            per_guideline.insert(
                guideline.name.clone(),
                GuidelineMetrics {
                    rollouts: mine.len(),
                    reward: Spread::of(&mine.iter().map(|r| r.reward).collect::<Vec<_>>()),
                    advantage_mean: kept_adv.iter().sum::<f64>() / kept_adv.len().max(1) as f64,
                    accuracy: mean_of(accuracy_at),
                    adherence: mean_of(adherence_at),
                },
            );
        }
        let zero_std = (0..groups)
            .filter(|&g| {
                let m: Vec<f64> = all
                    .iter()
                    .filter(|r| r.group == g)
                    .map(|r| r.reward)
                    .collect();
                m.iter().all(|&r| r == m[0])
            })
            .count();
        let lengths: Vec<usize> = all.iter().map(|r| r.completion_len).collect();
        RolloutFigures {
            reward: spread.mean,
            reward_std: spread.std,
            rewards: per_reward,
            guidelines: per_guideline,
            frac_reward_zero_std: zero_std as f64 / groups.max(1) as f64,
            mean_length: lengths.iter().sum::<usize>() as f64 / lengths.len().max(1) as f64,
            max_length: lengths.iter().copied().max().unwrap_or(0),
            clipped_ratio: all.iter().filter(|r| r.truncated).count() as f64
                / all.len().max(1) as f64,
        }
    }
}
