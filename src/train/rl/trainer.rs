//! The GRPO-family trainer (`mmx train gba`): per step, `cases_per_step` cases each get K
//! rollouts split across the guidelines by their priors, sampled through the KV cache in one
//! batch; each rollout is scored by the weighted rewards; the advantages come from the chosen
//! estimator; then μ updates of the PPO-clip objective (old log-probabilities kept from the
//! first) run through the fused engine, each one optimizer step.
//!
//! Everything random is a function of the seed and the step (the case order of an epoch, each
//! step's sampling), so `resume` from a checkpoint (adapter, moments, step) repeats the
//! uninterrupted run.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::advantage::advantages;
use super::metrics::{GbaStepMetrics, RolloutFigures};
use super::objective::{clip_term, k3, sequence_weights};
use super::recipe::GbaRecipe;
use super::reward::WeightedReward;
use super::rollout::{Rollout, Rollouts, Sampler};
use crate::error::{Error, Result};
use crate::rng::SplitMix;
use crate::train::batch::Example;
use crate::train::checkpoint::{latest_checkpoint, load_checkpoint, save_checkpoint, TrainerState};
use crate::train::fused::{Engine, TokenStat};
use crate::train::guideline::config::Guidelines;
use crate::train::model::CausalLm;
use crate::train::optim::{clip_gradients, AdamW, AdamWConfig};
use crate::train::schedule::Schedule;
use crate::train::sft::SHARD;
use crate::train::tokenizer::Tokenizer;
use crate::train::Case;

/// What a GBA run did.
#[derive(Debug, Clone)]
pub struct GbaSummary {
    /// Where the adapter was written.
    pub output: PathBuf,
    /// Steps run in this call.
    pub steps: usize,
    /// The step it resumed from.
    pub resumed_from: usize,
    /// The last step's mean reward.
    pub final_reward: f64,
}

/// Refines the adapter in `adapter_dir` (on the base in `base_dir`) by the recipe on `cases`,
/// writing the PEFT adapter, `metrics.jsonl` and `checkpoints/` into `output`.
#[allow(clippy::too_many_arguments)]
pub fn train_gba(
    recipe: &GbaRecipe,
    guidelines: &Guidelines,
    rewards: &[WeightedReward],
    base_dir: &Path,
    base_name: &str,
    adapter_dir: &Path,
    cases: &[Case],
    output: &Path,
    resume: bool,
    on_step: &mut dyn FnMut(&GbaStepMetrics),
) -> Result<GbaSummary> {
    let fail = |message: String| Error::Recipe {
        path: recipe.path.clone(),
        message,
    };
    if cases.is_empty() {
        return Err(fail(
            "no training case left after the specialty filter".into(),
        ));
    }
    let device = Device::Cpu;
    let tokenizer = Tokenizer::load(base_dir)?;
    let checkpoints = output.join("checkpoints");
    let digest_text = format!("{}\n{}", recipe.text, guidelines.text);
    let recipe_digest = blake3::hash(digest_text.as_bytes()).to_hex().to_string();
    let latest = if resume {
        latest_checkpoint(&checkpoints)?
    } else {
        None
    };
    let mut model = CausalLm::load(base_dir, None, DType::F32, &device)?;
    tokenizer.check_vocab(model.config())?;
    model.load_adapter(latest.as_deref().unwrap_or(adapter_dir))?;
    let mu = recipe.num_iterations;
    let total_updates = recipe.steps * mu;
    let mut optimizer = AdamW::new(
        model.lora_vars(),
        AdamWConfig {
            betas: recipe.optim.betas,
            eps: recipe.optim.eps,
            weight_decay: recipe.optim.weight_decay,
        },
    )?;
    let mut start = 0;
    if let Some(dir) = &latest {
        let (state, moments) = load_checkpoint(dir, &device)?;
        if state.recipe_digest != recipe_digest {
            return Err(fail(format!(
                "`{}` was saved by another recipe or guidelines file: train into a new output directory",
                dir.display()
            )));
        }
        optimizer.restore(&moments, (state.step * mu) as u64)?;
        start = state.step;
    }
    let named: Vec<_> = optimizer
        .vars()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    let mut engine = Engine::new(&model, &named).map_err(|e| {
        fail(format!(
            "GBA trains through the fused engine (f32 on the CPU, no LoRA dropout): {e}"
        ))
    })?;
    let mut reference = if recipe.beta > 0.0 {
        model.set_adapter_enabled(false);
        let r = Engine::new(&model, &[])?;
        model.set_adapter_enabled(true);
        Some(r)
    } else {
        None
    };
    let schedule = Schedule {
        lr: recipe.optim.lr,
        warmup: recipe.optim.warmup_steps,
        total: total_updates,
        decay: recipe.optim.decay,
        min_lr_ratio: recipe.optim.min_lr_ratio,
    };
    let config = model.config().clone();
    let eos = *config.eos_token_ids.first().ok_or_else(|| Error::Model {
        path: base_dir.join("config.json"),
        message: "no `eos_token_id`: rollouts stop at it".into(),
    })?;
    let pad = config.pad_token_id.unwrap_or(eos);
    let rollouts = Rollouts::new(
        cases,
        guidelines,
        rewards,
        &tokenizer,
        config.bos_token_id,
        recipe.num_generations,
        Sampler {
            max_new_tokens: recipe.max_completion_length,
            temperature: recipe.temperature,
            top_p: recipe.top_p,
            eos_token_ids: config.eos_token_ids.clone(),
            pad_token_id: pad,
        },
    )?;

    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    let metrics_path = output.join("metrics.jsonl");
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    let started = Instant::now();
    let mut final_reward = f64::NAN;
    // Cases are drawn epoch by epoch in an order from (seed, epoch); a step takes the next ones.
    let case_at = |index: usize| -> usize {
        let (epoch, at) = (index / cases.len(), index % cases.len());
        let mut order: Vec<usize> = (0..cases.len()).collect();
        SplitMix::derive(recipe.seed, &[0x0067_6261, epoch as u64]).shuffle(&mut order);
        order[at]
    };
    let per_step = recipe.cases_per_step
        * if recipe.dynamic_sampling {
            recipe.max_generation_batches
        } else {
            1
        };
    for step in start..recipe.steps {
        let mut time: BTreeMap<String, f64> = BTreeMap::new();
        let mut clock = Instant::now();
        let mut lap = |name: &str, clock: &mut Instant| {
            *time.entry(name.to_string()).or_default() += clock.elapsed().as_secs_f64();
            *clock = Instant::now();
        };
        // Generation and scoring, batch by batch until the step has its groups.
        let mut kept: Vec<Rollout> = Vec::new();
        let mut all: Vec<Rollout> = Vec::new();
        let mut groups_kept = 0;
        let mut groups_generated = 0;
        let mut generated_tokens = 0usize;
        let mut generation_seconds = 0f64;
        for attempt in 0..recipe.max_generation_batches {
            if groups_kept >= recipe.cases_per_step || (attempt > 0 && !recipe.dynamic_sampling) {
                break;
            }
            let first = step * per_step + attempt * recipe.cases_per_step;
            let batch_cases: Vec<usize> = (0..recipe.cases_per_step)
                .map(|j| case_at(first + j))
                .collect();
            let generation = Instant::now();
            let sampled = rollouts.sample(&engine, &batch_cases, groups_generated, |shard| {
                SplitMix::derive(
                    recipe.seed,
                    &[0x726f_6c6c, step as u64, attempt as u64, shard as u64],
                )
                .next_u64()
            })?;
            generation_seconds += generation.elapsed().as_secs_f64();
            generated_tokens += sampled.tokens();
            lap("generation", &mut clock);
            let batch = rollouts.score(sampled)?;
            groups_generated += batch_cases.len();
            for j in 0..batch_cases.len() {
                let group = groups_generated - batch_cases.len() + j;
                let members: Vec<f64> = batch
                    .iter()
                    .filter(|r| r.group == group)
                    .map(|r| r.reward)
                    .collect();
                let flat = members.iter().all(|&r| r == members[0]);
                if !(recipe.dynamic_sampling && flat) && groups_kept < recipe.cases_per_step {
                    groups_kept += 1;
                    kept.extend(batch.iter().filter(|r| r.group == group).cloned());
                }
            }
            all.extend(batch);
            lap("scoring", &mut clock);
        }

        // Advantages over the kept groups.
        let rewards_of: Vec<f64> = kept.iter().map(|r| r.reward).collect();
        let groups: Vec<usize> = kept.iter().map(|r| r.group).collect();
        let strata: Vec<usize> = kept.iter().map(|r| r.guideline).collect();
        let adv = advantages(
            &rewards_of,
            &groups,
            &strata,
            recipe.estimator,
            recipe.scale_rewards,
        );
        let active: Vec<usize> = kept
            .iter()
            .map(|r| {
                if recipe.mask_truncated_completions && r.truncated {
                    0
                } else {
                    r.completion_len
                }
            })
            .collect();
        let step_tokens: usize = active.iter().sum();
        let examples: Vec<&Example> = kept.iter().map(|r| &r.example).collect();
        let t = recipe.temperature as f32;
        let refs: Option<Vec<Vec<TokenStat>>> = match reference.as_mut() {
            Some(r) if !examples.is_empty() => {
                Some(r.policy_batch(&examples, SHARD, t, &|_, _, _| 0.0, false)?)
            }
            _ => None,
        };
        let micro = recipe.micro_batch;
        let grad_accum = examples.len().div_ceil(micro).max(1);
        let mut weights = Vec::with_capacity(examples.len());
        for chunk in active.chunks(micro) {
            weights.extend(sequence_weights(
                recipe.loss_type,
                chunk,
                recipe.max_completion_length,
                grad_accum,
                step_tokens,
            ));
        }
        let mut old: Vec<Vec<TokenStat>> = Vec::new();
        let (mut clip_low, mut clip_high, mut counted) = (0usize, 0usize, 0usize);
        let (mut kl_sum, mut entropy_sum) = (0f64, 0f64);
        let (mut lr, mut grad_norm) = (0.0, 0.0);
        for iteration in 0..mu {
            let mut stats: Vec<Vec<TokenStat>> = Vec::with_capacity(examples.len());
            for (m, chunk) in examples.chunks(micro).enumerate() {
                let offset = m * micro;
                let old = &old;
                let refs = &refs;
                let coef = |e: usize, tok: usize, logp: f64| -> f64 {
                    let i = offset + e;
                    if tok >= active[i] || step_tokens == 0 {
                        return 0.0;
                    }
                    let old_logp = if iteration == 0 {
                        logp
                    } else {
                        f64::from(old[i][tok].logp)
                    };
                    let mut grad =
                        clip_term(logp, old_logp, adv[i], recipe.epsilon, recipe.epsilon_high).grad;
                    if let Some(refs) = refs {
                        grad += recipe.beta * k3(logp, f64::from(refs[i][tok].logp)).1;
                    }
                    weights[i] * grad
                };
                stats.extend(engine.policy_batch(chunk, SHARD, t, &coef, true)?);
            }
            lap("forward_backward", &mut clock);
            // Figures of the step's last update (TRL logs those of each).
            (clip_low, clip_high, counted, kl_sum, entropy_sum) = (0, 0, 0, 0.0, 0.0);
            for (i, s) in stats.iter().enumerate() {
                for (tok, st) in s.iter().enumerate().take(active[i]) {
                    let logp = f64::from(st.logp);
                    let old_logp = if iteration == 0 {
                        logp
                    } else {
                        f64::from(old[i][tok].logp)
                    };
                    let term =
                        clip_term(logp, old_logp, adv[i], recipe.epsilon, recipe.epsilon_high);
                    clip_low += usize::from(term.low_clipped);
                    clip_high += usize::from(term.high_clipped);
                    counted += 1;
                    entropy_sum += f64::from(st.entropy);
                    if let Some(refs) = &refs {
                        kl_sum += k3(logp, f64::from(refs[i][tok].logp)).0;
                    }
                }
            }
            if iteration == 0 {
                old = stats;
            }
            let grads: Vec<Tensor> = engine.take_gradients()?;
            let (grads, norm) = clip_gradients(grads, recipe.optim.max_grad_norm)?;
            lr = schedule.at(step * mu + iteration);
            grad_norm = norm;
            optimizer.step(&grads, lr)?;
            engine.refresh(&model)?;
            lap("optimizer", &mut clock);
        }

        // Metrics over every rollout generated this step.
        let figures = RolloutFigures::of(&all, &kept, &adv, rewards, guidelines, groups_generated);
        final_reward = figures.reward;
        let share = |n: usize| n as f64 / counted.max(1) as f64;
        let m = GbaStepMetrics {
            step: step + 1,
            total_steps: recipe.steps,
            rollouts: figures,
            groups_generated,
            clip_low: share(clip_low),
            clip_high: share(clip_high),
            clip_region: share(clip_low + clip_high),
            kl: refs.as_ref().map(|_| kl_sum / counted.max(1) as f64),
            entropy: entropy_sum / counted.max(1) as f64,
            generation_tokens_per_second: generated_tokens as f64 / generation_seconds.max(1e-9),
            time,
            lr,
            grad_norm,
            elapsed: started.elapsed().as_secs_f64(),
        };
        let line = serde_json::to_string(&m).expect("metrics serialise");
        writeln!(metrics_file, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
        on_step(&m);
        let done = step + 1;
        if recipe.checkpoint_every > 0 && done % recipe.checkpoint_every == 0 && done < recipe.steps
        {
            let state = TrainerState {
                step: done,
                total_steps: recipe.steps,
                seed: recipe.seed,
                recipe_digest: recipe_digest.clone(),
                loss: final_reward,
            };
            let write = |dir: &Path| model.save_adapter(dir, base_name);
            save_checkpoint(&checkpoints, &write, &optimizer, &state)?;
        }
    }
    metrics_file
        .sync_all()
        .map_err(|e| Error::io(&metrics_path, e))?;
    model.save_adapter(output, base_name)?;
    Ok(GbaSummary {
        output: output.to_path_buf(),
        steps: recipe.steps - start,
        resumed_from: start,
        final_reward,
    })
}
