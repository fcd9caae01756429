//! Supervised fine-tuning (DSA, DESIGN.md §7): the loss on the completion only, AdamW with
//! f32 moments, global-norm clipping, warmup and cosine decay, gradient accumulation,
//! checkpoints every N steps and resume from the latest, and a JSON Lines metrics log.
//!
//! Each micro-batch is cut into shards of [`SHARD`] examples, each run forward and backward on
//! its own thread; the shards depend on the recipe only, so the result does not depend on the
//! machine.
//! On small models candle's own threads (`RAYON_NUM_THREADS`, read at every operation) cost
//! more than they bring: `mmx train` sets it to 1 unless it is set, which doubles the
//! throughput on two cores; a library caller should do the same.
//!
//! Two engines run the shards: the fused engine ([`super::fused`], a hand-written forward and
//! backward pass, about four times faster on small models) wherever it applies (f32 on the CPU
//! without LoRA dropout), candle's autograd (the reference) otherwise, on a CUDA device too
//! ([`RunOptions::device`], with the `cuda` feature). `MMX_TRAIN_ENGINE=candle`
//! forces candle's, for parity tests and benchmarks, and `MMX_TRAIN_ENGINE=fused` insists on the
//! fused one; both give the same training to rounding.
//!
//! The data order is a function of the seed and the step (epoch `e` is the permutation drawn
//! from `(seed, e)`), so a resumed run sees exactly the batches the uninterrupted run would
//! have: resuming needs the adapter, the optimizer's moments and the step, all in the
//! checkpoint.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use super::batch::{summed_nll, Batch, Example, ImageRows};
use super::checkpoint::{latest_checkpoint, load_checkpoint, save_checkpoint, TrainerState};
use super::fused::Engine;
use super::images::{is_vision_language, language_config, refuse_images_without_tower, Images};
use super::model::{candle, CausalLm, LoraSpec, PROJECTOR_MODULE};
use super::optim::{clip_gradients, AdamW, AdamWConfig};
use super::prompt::RuleBook;
use super::recipe::{CompletionKind, TrainMethod, TrainRecipe, TrainingCase};
use super::schedule::Schedule;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::rng::SplitMix;

/// Examples per shard of a micro-batch.
pub const SHARD: usize = 8;

/// The environment variable that picks the engine: `auto` (the default), `fused` or `candle`.
pub const ENGINE_VAR: &str = "MMX_TRAIN_ENGINE";

/// One optimizer step's figures, as written to `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    /// Optimizer steps done (1-based).
    pub step: usize,
    /// All optimizer steps of the run.
    pub total_steps: usize,
    /// The epoch the step's batches came from (0-based).
    pub epoch: usize,
    /// Mean negative log-likelihood per completion token over the step.
    pub loss: f64,
    /// The learning rate of the step.
    pub lr: f64,
    /// The gradients' global L2 norm before clipping.
    pub grad_norm: f64,
    /// Input tokens of the step.
    pub tokens: usize,
    /// Input tokens per second since the run (or the resume) started.
    pub tokens_per_second: f64,
    /// Seconds since the run (or the resume) started.
    pub elapsed: f64,
}

/// What a training run did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Where the adapter (or model) was written.
    pub output: PathBuf,
    /// Optimizer steps run in this call.
    pub steps: usize,
    /// The step the run resumed from (0 for a fresh run).
    pub resumed_from: usize,
    /// The last step's loss.
    pub final_loss: f64,
    /// Input tokens per second over this call.
    pub tokens_per_second: f64,
    /// Training examples.
    pub examples: usize,
}

/// How a training run goes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Continue from the latest checkpoint in the output directory.
    pub resume: bool,
    /// Where the model trains: the CPU (the fused engine), or a CUDA device (candle's
    /// autograd; needs a build with the `cuda` feature).
    pub device: Device,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            resume: false,
            device: Device::Cpu,
        }
    }
}

/// Trains what the recipe says on `cases` from the model in `base_dir`, writing the result
/// (a PEFT adapter for `dsa`, the whole model for `base`), `metrics.jsonl` and
/// `checkpoints/` into `output`. With `options.resume`, continues from the latest checkpoint
/// in `output`. `on_step` sees every step.
pub fn train(
    recipe: &TrainRecipe,
    base_dir: &Path,
    base_name: &str,
    cases: &[TrainingCase],
    output: &Path,
    options: &RunOptions,
    on_step: &mut dyn FnMut(&StepMetrics),
) -> Result<TrainSummary> {
    let device = options.device.clone();
    let resume = options.resume;
    let tokenizer = Tokenizer::load(base_dir)?;
    // Before any weight is read: a tokenizer that does not fit the model is its own error.
    tokenizer.check_vocab(&language_config(base_dir)?)?;
    let checkpoints = output.join("checkpoints");
    let recipe_digest = blake3::hash(recipe.text.as_bytes()).to_hex().to_string();
    let latest = if resume {
        latest_checkpoint(&checkpoints)?
    } else {
        None
    };
    let mut restored = None;
    if let Some(dir) = &latest {
        let (state, moments) = load_checkpoint(dir, &device)?;
        if state.recipe_digest != recipe_digest {
            return Err(Error::Recipe {
                path: recipe.path.clone(),
                message: format!(
                    "`{}` was saved by another recipe (its text changed): train into a new output directory",
                    dir.display()
                ),
            });
        }
        restored = Some((state, moments));
    }
    let resumed = latest.as_deref().filter(|_| restored.is_some());
    let (images, mut model, projector_vars) = load_model(recipe, base_dir, resumed, &device)?;
    tokenizer.check_vocab(model.config())?;
    let examples = encode(&tokenizer, &model, images.as_ref(), cases, recipe)?;
    if examples.is_empty() {
        return Err(Error::Recipe {
            path: recipe.path.clone(),
            message: "no training case left after the specialty filter".into(),
        });
    }
    let pad = model
        .config()
        .pad_token_id
        .or(model.config().eos_token_ids.first().copied())
        .unwrap_or(0);

    let micro_per_epoch = examples.len().div_ceil(recipe.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(recipe.grad_accum);
    let mut total = recipe.epochs * steps_per_epoch;
    if let Some(max) = recipe.max_steps {
        total = total.min(max);
    }
    let schedule = Schedule {
        lr: recipe.optim.lr,
        warmup: recipe.optim.warmup_steps,
        total,
        decay: recipe.optim.decay,
        min_lr_ratio: recipe.optim.min_lr_ratio,
    };
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    let config = AdamWConfig {
        betas: recipe.optim.betas,
        eps: recipe.optim.eps,
        weight_decay: recipe.optim.weight_decay,
    };
    let trained = match (recipe.method, &images) {
        (TrainMethod::Dsa, _) => [model.lora_vars(), projector_vars].concat(),
        (TrainMethod::Base, Some(_)) => projector_vars,
        (TrainMethod::Base, None) => model.weight_vars().to_vec(),
    };
    let mut optimizer = AdamW::new(trained, config)?;
    let mut start_step = 0;
    if let Some((state, moments)) = &restored {
        optimizer.restore(moments, state.step as u64)?;
        start_step = state.step;
    }
    let vars: Vec<Var> = optimizer.vars().map(|(_, v)| v.clone()).collect();
    let named: Vec<(String, Var)> = optimizer
        .vars()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    let projector_trained = images.as_ref().is_some_and(Images::projector_trained);
    let mut fused = fused_engine(&model, &named, projector_trained)?;
    if let (Some(engine), Some(images)) = (fused.take(), &images) {
        fused = Some(engine.with_image_token(images.image_token()));
    }

    // What a checkpoint and the output hold: the adapter (with a trained projector), or the
    // whole model.
    let write_weights = |model: &CausalLm, dir: &Path| match (recipe.method, &images) {
        (TrainMethod::Dsa, Some(images)) => images.save_adapter(model, dir, base_name),
        (TrainMethod::Dsa, None) => model.save_adapter(dir, base_name),
        (TrainMethod::Base, Some(images)) => images.save_model(dir),
        (TrainMethod::Base, None) => model.save_model(dir),
    };
    let metrics_path = output.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    model.set_training(true);
    let started = Instant::now();
    let (mut seen_tokens, mut last_loss) = (0usize, f64::NAN);
    for step in start_step..total {
        let micro: Vec<usize> = (0..recipe.grad_accum)
            .map(|i| step * recipe.grad_accum + i)
            .filter(|&m| m < recipe.epochs * micro_per_epoch)
            .collect();
        let batches: Vec<Vec<&Example>> = micro
            .iter()
            .map(|&m| micro_batch(&examples, recipe, m, micro_per_epoch))
            .collect();
        let step_targets: usize = batches
            .iter()
            .flatten()
            .map(|e| e.target_tokens())
            .sum::<usize>()
            .max(1);
        let (mut nll, mut tokens) = (0f64, 0usize);
        let grads = match fused.as_mut() {
            Some(engine) => {
                for examples in &batches {
                    let (n, t) = engine.micro_batch(examples, SHARD, step_targets)?;
                    nll += n;
                    tokens += t;
                }
                engine.take_gradients()?
            }
            None => {
                let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
                for examples in &batches {
                    let (n, t) = candle_micro_batch(
                        &model,
                        images.as_ref(),
                        &vars,
                        examples,
                        pad,
                        step_targets,
                        &device,
                        &mut grads,
                    )?;
                    nll += n;
                    tokens += t;
                }
                grads
                    .into_iter()
                    .zip(&vars)
                    .map(|(g, v)| match g {
                        Some(g) => Ok(g),
                        None => v.as_tensor().zeros_like().map_err(candle("zero gradient")),
                    })
                    .collect::<Result<_>>()?
            }
        };
        let (grads, grad_norm) = clip_gradients(grads, recipe.optim.max_grad_norm)?;
        let lr = schedule.at(step);
        optimizer.step(&grads, lr)?;
        if let Some(engine) = fused.as_mut() {
            engine.refresh(&model)?;
        }
        seen_tokens += tokens;
        last_loss = nll / step_targets as f64;
        let elapsed = started.elapsed().as_secs_f64();
        let m = StepMetrics {
            step: step + 1,
            total_steps: total,
            epoch: micro.first().map_or(0, |&m| m / micro_per_epoch),
            loss: last_loss,
            lr,
            grad_norm,
            tokens,
            tokens_per_second: seen_tokens as f64 / elapsed.max(1e-9),
            elapsed,
        };
        let line = serde_json::to_string(&m).expect("metrics serialise");
        writeln!(metrics, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
        on_step(&m);
        let done = step + 1;
        if recipe.checkpoint_every > 0 && done % recipe.checkpoint_every == 0 && done < total {
            let state = TrainerState {
                step: done,
                total_steps: total,
                seed: recipe.seed,
                recipe_digest: recipe_digest.clone(),
                loss: last_loss,
            };
            let write = |dir: &Path| write_weights(&model, dir);
            save_checkpoint(&checkpoints, &write, &optimizer, &state)?;
        }
    }
    metrics
        .sync_all()
        .map_err(|e| Error::io(&metrics_path, e))?;
    model.set_training(false);
    write_weights(&model, output)?;
    let elapsed = started.elapsed().as_secs_f64();
    Ok(TrainSummary {
        output: output.to_path_buf(),
        steps: total - start_step,
        resumed_from: start_step,
        final_loss: last_loss,
        tokens_per_second: seen_tokens as f64 / elapsed.max(1e-9),
        examples: examples.len(),
    })
}

/// A run's model: its image side (a LLaVA base), its language model, the projector's
/// variables where the projector is trained.
type Loaded = (Option<Images>, CausalLm, Vec<(String, Var)>);

/// The model a run trains and what it trains besides the model's own variables: the base in
/// `base_dir` (a LLaVA base with its image side), with fresh LoRA updates for `dsa`, then the
/// checkpoint `resumed` from if any (for `base`, its weights instead of the base's), and the
/// projector's variables where it is trained (`modules_to_save`, or a LLaVA `base` run).
fn load_model(
    recipe: &TrainRecipe,
    base_dir: &Path,
    resumed: Option<&Path>,
    device: &Device,
) -> Result<Loaded> {
    let mut projector_vars = Vec::new();
    let (images, model) = match recipe.method {
        TrainMethod::Dsa => {
            let lora = recipe.lora.as_ref().ok_or_else(|| Error::Recipe {
                path: recipe.path.clone(),
                message: "method `dsa` needs a `[train.lora]` table".into(),
            })?;
            let spec = LoraSpec {
                r: lora.r,
                alpha: lora.alpha,
                dropout: lora.dropout,
                use_rslora: lora.use_rslora,
                target_modules: lora.target_modules.clone(),
                seed: recipe.seed,
            };
            let (mut images, mut model) = Images::load(base_dir, Some(&spec), DType::F32, device)?;
            if let Some(dir) = resumed {
                match images.as_mut() {
                    Some(images) => images.load_adapter(&mut model, dir)?,
                    None => model.load_adapter(dir)?,
                }
            }
            match images.as_mut() {
                Some(images) if lora.train_projector => {
                    projector_vars = images.train_projector()?;
                }
                None if lora.train_projector => {
                    return Err(Error::Recipe {
                        path: recipe.path.clone(),
                        message: format!(
                            "`modules_to_save = [\"{PROJECTOR_MODULE}\"]` trains a LLaVA model's projector; `{}` is a text-only model",
                            base_dir.display()
                        ),
                    });
                }
                _ => {}
            }
            (images, model)
        }
        // A resumed base run continues from the checkpoint's own weights. A LLaVA base trains
        // its projector only (the tower and the language model frozen).
        TrainMethod::Base => {
            let dir = resumed.unwrap_or(base_dir);
            if is_vision_language(dir)? {
                let (mut images, model) = Images::load(dir, None, DType::F32, device)?;
                if let Some(images) = images.as_mut() {
                    projector_vars = images.train_projector()?;
                }
                (images, model)
            } else {
                (None, CausalLm::load_trainable(dir, DType::F32, device)?)
            }
        }
    };
    Ok((images, model, projector_vars))
}

/// The engine [`ENGINE_VAR`] asks for: unset or `auto`, the fused engine where it applies
/// (see [`Engine::unsupported`]) and candle's autograd (`None`) elsewhere; `candle` or `fused`,
/// that one (`fused` refused where it does not apply).
/// A trained projector is candle's: the fused engine runs the language model only.
fn fused_engine(
    model: &CausalLm,
    trained: &[(String, Var)],
    projector_trained: bool,
) -> Result<Option<Engine>> {
    let choice = std::env::var(ENGINE_VAR).unwrap_or_default();
    let unsupported = match projector_trained {
        true => Some("the fused engine does not train the projector (`modules_to_save`)".into()),
        false => Engine::unsupported(model),
    };
    match (choice.as_str(), unsupported) {
        ("candle", _) | ("" | "auto", Some(_)) => Ok(None),
        ("fused", Some(reason)) => Err(Error::ModelInput {
            message: format!("`{ENGINE_VAR}=fused`: {reason}"),
        }),
        ("" | "auto" | "fused", None) => Engine::new(model, trained).map(Some),
        (other, _) => Err(Error::ModelInput {
            message: format!("`{ENGINE_VAR}` is `{other}`; it must be `auto`, `fused` or `candle`"),
        }),
    }
}

/// Forward and backward of a micro-batch through candle's autograd, [`SHARD`] examples per
/// thread: adds its gradients into `grads` and returns its summed NLL and input tokens.
#[allow(clippy::too_many_arguments)]
fn candle_micro_batch(
    model: &CausalLm,
    images: Option<&Images>,
    vars: &[Var],
    examples: &[&Example],
    pad: u32,
    step_targets: usize,
    device: &Device,
    grads: &mut [Option<Tensor>],
) -> Result<(f64, usize)> {
    // The shards forward and backward at once. Their gradients add up to the whole
    // micro-batch's; the shards and the order of the sum are fixed, so a run repeats.
    let shards: Vec<Result<ShardGrads>> = std::thread::scope(|scope| {
        let handles: Vec<_> = examples
            .chunks(SHARD)
            .map(|shard| {
                scope.spawn(move || {
                    shard_grads(model, images, vars, shard, pad, step_targets, device)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a training shard does not panic"))
            .collect()
    });
    let (mut nll, mut tokens) = (0f64, 0usize);
    for shard in shards {
        let shard = shard?;
        nll += shard.nll;
        tokens += shard.tokens;
        for (slot, g) in grads.iter_mut().zip(shard.grads) {
            let Some(g) = g else { continue };
            *slot = Some(match slot.take() {
                Some(sum) => (sum + g).map_err(candle("gradient accumulation"))?,
                None => g,
            });
        }
    }
    Ok((nll, tokens))
}

/// One shard's summed loss, input tokens and gradients (one per variable, `None` where the
/// variable got none).
struct ShardGrads {
    nll: f64,
    tokens: usize,
    grads: Vec<Option<Tensor>>,
}

/// Forward and backward of one shard of a micro-batch, its loss scaled by the step's target
/// count.
fn shard_grads(
    model: &CausalLm,
    images: Option<&Images>,
    vars: &[Var],
    examples: &[&Example],
    pad: u32,
    step_targets: usize,
    device: &Device,
) -> Result<ShardGrads> {
    let batch = Batch::new(examples, pad, device)?;
    let logits = batch_logits(model, images, &batch, examples, device)?;
    let summed = summed_nll(&logits, &batch)?;
    let nll = f64::from(summed.to_scalar::<f32>().map_err(candle("loss"))?);
    let scaled = (summed / step_targets as f64).map_err(candle("loss"))?;
    let store = scaled.backward().map_err(candle("backward"))?;
    Ok(ShardGrads {
        nll,
        tokens: batch.tokens,
        grads: vars
            .iter()
            .map(|v| store.get(v.as_tensor()).cloned())
            .collect(),
    })
}

/// The logits `[b, s, vocab]` of `batch`, made of `examples`, as training computes them: a
/// vision-language model's image rows (projected here when the projector is trained) in place
/// of the image tokens.
pub(crate) fn batch_logits(
    model: &CausalLm,
    images: Option<&Images>,
    batch: &Batch,
    examples: &[&Example],
    device: &Device,
) -> Result<Tensor> {
    let Some(images) = images else {
        return model.forward(&batch.inputs, Some(&batch.attention), None);
    };
    let mut features = batch_images(examples, device)?;
    if images.projector_trained() {
        features = features.map(|f| images.encoder().project(&f)).transpose()?;
    }
    let embeds = images
        .encoder()
        .merge(model, &batch.inputs, features.as_ref())?;
    model.forward_embeds(&embeds, Some(&batch.attention), None)
}

/// The images of `examples`, in order, as `[images, tokens, width]` (`None` if none has one).
fn batch_images(examples: &[&Example], device: &Device) -> Result<Option<Tensor>> {
    let shown: Vec<&ImageRows> = examples.iter().filter_map(|e| e.image.as_ref()).collect();
    let Some(first) = shown.first() else {
        return Ok(None);
    };
    let values: Vec<f32> = shown
        .iter()
        .flat_map(|i| i.values.iter().copied())
        .collect();
    Tensor::from_vec(values, (shown.len(), first.rows(), first.width), device)
        .map(Some)
        .map_err(candle("image rows"))
}

/// The examples of micro-batch `m` (counted over all epochs): epoch `m / per_epoch` in the
/// order drawn from `(seed, epoch)`.
fn micro_batch<'a>(
    examples: &'a [Example],
    recipe: &TrainRecipe,
    m: usize,
    per_epoch: usize,
) -> Vec<&'a Example> {
    let (epoch, index) = (m / per_epoch, m % per_epoch);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    SplitMix::derive(recipe.seed, &[0x6461_7461, epoch as u64]).shuffle(&mut order);
    order
        .iter()
        .skip(index * recipe.batch_size)
        .take(recipe.batch_size)
        .map(|&i| &examples[i])
        .collect()
}

/// Tokenizes each case as `<bos> prompt completion <eos>`, a case's image tokens first in
/// the prompt ([`Images::prompt_with_image`]) with its image's rows.
fn encode(
    tokenizer: &Tokenizer,
    model: &CausalLm,
    images: Option<&Images>,
    cases: &[TrainingCase],
    recipe: &TrainRecipe,
) -> Result<Vec<Example>> {
    if images.is_none() {
        let shown: Vec<&super::Case> = cases.iter().map(|c| &c.case).collect();
        refuse_images_without_tower(&shown, model.dir())?;
    }
    let config = model.config();
    let eos = *config.eos_token_ids.first().ok_or_else(|| Error::Model {
        path: model.dir().join("config.json"),
        message: "no `eos_token_id`: the trainer ends every example with it".into(),
    })?;
    let rules = RuleBook::from_cases(cases.iter().map(|c| &c.case));
    cases
        .iter()
        .map(|TrainingCase { case, completion }| {
            let completion = match completion {
                CompletionKind::Full => case.completion(),
                CompletionKind::Format => case.format_completion(recipe.seed, &rules),
            };
            example_of(tokenizer, model, images, case, &completion, eos)
        })
        .collect()
}

/// The training example of `case` with `completion`: `<bos> prompt completion <eos>`, with a
/// vision-language model's image tokens and rows where the case shows an image.
pub(crate) fn example_of(
    tokenizer: &Tokenizer,
    model: &CausalLm,
    images: Option<&Images>,
    case: &super::Case,
    completion: &str,
    eos: u32,
) -> Result<Example> {
    let bos = model.config().bos_token_id;
    let prompt = tokenizer.encode(&case.prompt(), false)?;
    let completion = tokenizer.encode(completion, false)?;
    let Some(images) = images else {
        return Ok(Example::new(bos, &prompt, &completion, eos));
    };
    let rows = images.training_rows(case, model.device())?;
    let prompt = images.prompt_with_image(bos, &prompt, rows.is_some());
    Ok(Example::new(None, &prompt, &completion, eos).with_image(rows))
}
