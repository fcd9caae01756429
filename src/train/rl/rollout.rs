//! The rollouts of a GBA step: each case's K completions, split across the guidelines by
//! their priors, sampled through the fused engine in shards of [`GENERATION_SHARD`] rows, and
//! scored by the weighted rewards.

use super::reward::{Completion, WeightedReward};
use crate::error::Result;
use crate::train::batch::Example;
use crate::train::fused::Engine;
use crate::train::guideline::config::Guidelines;
use crate::train::model::{GenerateOptions, Sampling};
use crate::train::tokenizer::Tokenizer;
use crate::train::Case;

/// Rollouts per generation thread (fixed by the recipe, not the machine, so that the
/// rollouts repeat anywhere).
pub const GENERATION_SHARD: usize = 32;

/// A rollout: its group (the case's K completions), the guideline it was drawn under, its
/// tokens (prompt then completion) and its rewards.
#[derive(Debug, Clone)]
pub(super) struct Rollout {
    /// The group, numbered within the step.
    pub group: usize,
    /// The guideline's index in the guidelines file.
    pub guideline: usize,
    /// Prompt and completion tokens.
    pub example: Example,
    /// Completion tokens.
    pub completion_len: usize,
    /// Cut at the length limit.
    pub truncated: bool,
    /// Each reward function's score, in the recipe's order.
    pub rewards: Vec<f64>,
    /// Their weighted sum.
    pub reward: f64,
}

/// Sampled completions before scoring: per row its (case, group, guideline), its prompt and
/// its new tokens.
pub(super) struct Sampled {
    rows: Vec<(usize, usize, usize)>,
    prompts: Vec<Vec<u32>>,
    outputs: Vec<Vec<u32>>,
}

impl Sampled {
    /// The completion tokens drawn.
    pub(super) fn tokens(&self) -> usize {
        self.outputs.iter().map(Vec::len).sum()
    }
}

/// How the completions are sampled.
#[derive(Debug, Clone)]
pub(super) struct Sampler {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
}

/// Everything a step's rollouts are drawn from and scored by: the cases, each one's prompt
/// under each guideline (tokenized once) and its split of K across the guidelines.
pub(super) struct Rollouts<'a> {
    pub cases: &'a [Case],
    pub guidelines: &'a Guidelines,
    pub rewards: &'a [WeightedReward],
    pub tokenizer: &'a Tokenizer,
    pub sampler: Sampler,
    prompts: Vec<Vec<Vec<u32>>>,
    splits: Vec<Vec<usize>>,
}

impl<'a> Rollouts<'a> {
    /// Tokenizes every case's prompt under every guideline (after `bos`, if the model has one)
    /// and splits `k` rollouts per case by the guidelines' priors for its specialty.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        cases: &'a [Case],
        guidelines: &'a Guidelines,
        rewards: &'a [WeightedReward],
        tokenizer: &'a Tokenizer,
        bos: Option<u32>,
        k: usize,
        sampler: Sampler,
    ) -> Result<Self> {
        let prompts = cases
            .iter()
            .map(|c| {
                guidelines
                    .guidelines
                    .iter()
                    .map(|g| {
                        let mut ids: Vec<u32> = bos.into_iter().collect();
                        ids.extend(tokenizer.encode(&c.prompt_under(Some(&g.prompt)), false)?);
                        Ok(ids)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        let splits = cases
            .iter()
            .map(|c| guidelines.split(c.specialty(), k))
            .collect::<Result<_>>()?;
        Ok(Rollouts {
            cases,
            guidelines,
            rewards,
            tokenizer,
            sampler,
            prompts,
            splits,
        })
    }

    /// Samples the completions of `batch_cases` (indices into the cases), their groups
    /// numbered from `first_group`, generation shard `i` drawing from `seed(i)`.
    pub(super) fn sample(
        &self,
        engine: &Engine,
        batch_cases: &[usize],
        first_group: usize,
        seed: impl Fn(usize) -> u64 + Sync,
    ) -> Result<Sampled> {
        // (case, group, guideline) per row.
        let mut rows: Vec<(usize, usize, usize)> = Vec::new();
        for (j, &c) in batch_cases.iter().enumerate() {
            for (g, &n) in self.splits[c].iter().enumerate() {
                rows.extend(std::iter::repeat_n((c, first_group + j, g), n));
            }
        }
        let prompts: Vec<Vec<u32>> = rows
            .iter()
            .map(|&(c, _, g)| self.prompts[c][g].clone())
            .collect();
        let s = &self.sampler;
        let outputs =
            engine.generate_sharded(&prompts, GENERATION_SHARD, |shard| GenerateOptions {
                max_new_tokens: s.max_new_tokens,
                sampling: Sampling::Sample {
                    temperature: s.temperature,
                    top_p: s.top_p,
                },
                seed: seed(shard),
                eos_token_ids: s.eos_token_ids.clone(),
                pad_token_id: s.pad_token_id,
            })?;
        Ok(Sampled {
            rows,
            prompts,
            outputs,
        })
    }

    /// Scores what [`Rollouts::sample`] drew.
    pub(super) fn score(&self, sampled: Sampled) -> Result<Vec<Rollout>> {
        let Sampled {
            rows,
            prompts,
            outputs,
        } = sampled;
        let s = &self.sampler;
        let mut batch = Vec::with_capacity(rows.len());
        for ((&(c, group, g), prompt), out) in rows.iter().zip(prompts).zip(outputs) {
            let truncated = out.last().is_none_or(|t| !s.eos_token_ids.contains(t));
            let text = self.tokenizer.decode(&out, true)?;
            let completion = Completion {
                case: &self.cases[c],
                guideline: &self.guidelines.guidelines[g],
                text: &text,
                truncated,
            };
            let scores: Vec<f64> = self
                .rewards
                .iter()
                .map(|r| r.reward.score(&completion))
                .collect();
            let reward = scores
                .iter()
                .zip(self.rewards)
                .map(|(s, r)| s * r.weight)
                .sum();
            let prompt_len = prompt.len();
            let mut tokens = prompt;
            tokens.extend_from_slice(&out);
            batch.push(Rollout {
                group,
                guideline: g,
                completion_len: out.len(),
                example: Example {
                    tokens,
                    prompt_len,
                    image: None,
                },
                truncated,
                rewards: scores,
                reward,
            });
        }
        Ok(batch)
    }
}
