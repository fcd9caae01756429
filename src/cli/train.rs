//! `mmx train dsa|base|gba RECIPE`: supervised fine-tuning of a specialty LoRA or of a base
//! model's own weights, or reinforcement learning of a DSA adapter with guideline-based
//! advantages, with a progress bar on stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::ProgressBar;

use super::print::{note, say, Printer};
use mmx::registry::{publish::PublishOptions, Kind, Registry};
use mmx::train::guideline::config::Guidelines;
use mmx::train::init::init_model;
use mmx::train::recipe::{TrainMethod, TrainRecipe};
use mmx::train::rl::recipe::GbaRecipe;
use mmx::train::rl::reward::{builtin, WeightedReward};
use mmx::train::rl::trainer::train_gba;
use mmx::train::sft::{train, RunOptions};
use mmx::train::source::Materialized;
use mmx::train::vlm_init::init_llava;

/// Arguments of `mmx train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(subcommand)]
    command: TrainCommand,
}

#[derive(Debug, Subcommand)]
enum TrainCommand {
    /// Domain-specific adaptation: a specialty LoRA by supervised fine-tuning (loss on the
    /// reasoning and the answer only). Writes a PEFT adapter.
    Dsa(RunArgs),
    /// The base model's own weights, from `base` or a new model drawn from the recipe's seed.
    /// Writes a Hugging Face model directory.
    Base(RunArgs),
    /// Guideline-based advantages: GRPO-family reinforcement learning of a DSA adapter on
    /// answer-only cases, rollouts drawn under several clinical guidelines. Writes a PEFT
    /// adapter.
    Gba(RunArgs),
}

/// Arguments of one training run.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The training recipe (TOML).
    recipe: PathBuf,
    /// Output directory [default: `out/RECIPE-NAME`].
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Continue from the latest checkpoint in the output directory.
    #[arg(long)]
    resume: bool,
    /// Publish the result to the registry as NAME:TAG (an adapter with its specialty and
    /// base, or a base model).
    #[arg(long, value_name = "NAME:TAG")]
    publish: Option<String>,
    /// The registry for registry sources and --publish [default: the recipe's `registry`,
    /// else $MMX_REGISTRY, else ./registry].
    #[arg(long, value_name = "DIR")]
    registry: Option<PathBuf>,
    /// Print no progress bar.
    #[arg(long)]
    quiet: bool,
    /// Where to train: `cpu`, `cuda` (the first GPU; needs a build with `--features cuda`), or
    /// `auto` (the GPU when this build can use one, else the CPU). `mmx train gba` runs on the
    /// CPU.
    #[arg(long, value_enum, default_value = "cpu")]
    device: super::Device,
}

/// The candle device `--device` names for training.
fn training_device(device: super::Device) -> anyhow::Result<candle_core::Device> {
    let p = Printer::text();
    let cuda = || candle_core::Device::new_cuda(0);
    match device {
        super::Device::Cpu => Ok(candle_core::Device::Cpu),
        super::Device::Cuda => cuda().map_err(|e| {
            anyhow::anyhow!(
                "--device cuda: {e}\nhint: training on a GPU needs candle's CUDA backend: `cargo build --release --features cuda` (with a CUDA toolkit; scripts/cuda-toolkit.sh fetches one from PyPI)"
            )
        }),
        super::Device::Auto => Ok(match cuda() {
            Ok(device) => device,
            Err(e) => {
                note!(p, "--device auto: training on the CPU: {e}");
                candle_core::Device::Cpu
            }
        }),
    }
}

/// Runs `mmx train`.
pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let p = Printer::text();
    // The trainer runs one shard of each batch per core; candle's own per-operation threads
    // only slow small models down (see `mmx::train::sft`). Set before any thread starts.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let (method, args) = match args.command {
        TrainCommand::Dsa(a) => (TrainMethod::Dsa, a),
        TrainCommand::Base(a) => (TrainMethod::Base, a),
        TrainCommand::Gba(a) => return run_gba(a),
    };
    let recipe = TrainRecipe::load(&args.recipe)?;
    if recipe.method != method {
        bail!(
            "`{}` is a `{}` recipe: run `mmx train {}`",
            args.recipe.display(),
            name(recipe.method),
            name(recipe.method)
        );
    }
    let (publish, registry, output) = destination(&args, recipe.registry.as_ref())?;
    // The starting model: the recipe's base, or a new one drawn from its seed.
    let (base, base_name, _scratch) = match (&recipe.base, &recipe.init) {
        (Some(source), _) if recipe.vision.is_some() => {
            let text = Materialized::open(source, &registry)?;
            let scratch = output.join(".init");
            let spec = recipe.vision.as_ref().expect("checked");
            init_llava(text.dir(), &scratch, spec, recipe.seed)?;
            let base = Materialized::open(&scratch.display().to_string(), &registry)?;
            (base, source.clone(), Some(RemoveOnDrop(scratch)))
        }
        (Some(source), _) => (Materialized::open(source, &registry)?, source.clone(), None),
        (None, Some(spec)) => {
            let scratch = output.join(".init");
            init_model(&scratch, spec, recipe.seed)?;
            let base = Materialized::open(&scratch.display().to_string(), &registry)?;
            (base, "init".to_string(), Some(RemoveOnDrop(scratch)))
        }
        (None, None) => bail!(
            "`{}` names no base and no `[train.init]`",
            args.recipe.display()
        ),
    };
    let cases = recipe.data.training_cases()?;
    let options = RunOptions {
        resume: args.resume,
        device: training_device(args.device)?,
    };
    let bar = progress(args.quiet, "training");
    let summary = train(
        &recipe,
        base.dir(),
        &base_name,
        &cases,
        &output,
        &options,
        &mut |m| {
            bar.set_length(m.total_steps as u64);
            bar.set_position(m.step as u64);
            bar.set_message(format!(
                "loss {:.4} | {:.0} tok/s | lr {:.2e}",
                m.loss, m.tokens_per_second, m.lr
            ));
        },
    )?;
    bar.finish_and_clear();
    if summary.resumed_from > 0 {
        note!(p, "resumed from step {}", summary.resumed_from);
    }
    say!(
        p,
        "trained {} steps on {} cases into {}: final loss {:.4}, {:.0} tokens/s on the {}",
        summary.steps,
        summary.examples,
        output.display(),
        summary.final_loss,
        summary.tokens_per_second,
        if options.device.is_cuda() {
            "GPU"
        } else {
            "CPU"
        }
    );
    if let Some(reference) = publish {
        let store = Registry::create(&registry)?;
        let options = PublishOptions {
            kind: Some(match method {
                TrainMethod::Dsa => Kind::Adapter,
                TrainMethod::Base => Kind::Base,
            }),
            specialty: recipe.specialty.clone(),
            base: base.manifest().copied(),
            result_only: true,
            ..PublishOptions::default()
        };
        publish_outputs(&store, &output, &reference, &options)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `mmx train gba`.
fn run_gba(args: RunArgs) -> anyhow::Result<ExitCode> {
    let p = Printer::text();
    if matches!(args.device, super::Device::Cuda) {
        bail!("--device cuda: `mmx train gba` runs on the CPU only (its rollouts use the fused engine)");
    }
    let recipe = GbaRecipe::load(&args.recipe)?;
    let guidelines = Guidelines::load(&recipe.guidelines)?;
    let mut rewards = Vec::new();
    for (name, &weight) in &recipe.rewards {
        let Some(reward) = builtin(name) else {
            bail!(
                "`{}`: reward `{name}` is not built in (accuracy, format, adherence); add others through the library (examples/custom_reward.rs)",
                args.recipe.display()
            );
        };
        rewards.push(WeightedReward { reward, weight });
    }
    let (publish, registry, output) = destination(&args, recipe.registry.as_ref())?;
    let base = Materialized::open(&recipe.base, &registry)?;
    let adapter = Materialized::open(&recipe.adapter, &registry)?;
    let cases = recipe.data.cases()?;
    let bar = progress(args.quiet, "gba");
    let summary = train_gba(
        &recipe,
        &guidelines,
        &rewards,
        base.dir(),
        &recipe.base,
        adapter.dir(),
        &cases,
        &output,
        args.resume,
        &mut |m| {
            bar.set_length(m.total_steps as u64);
            bar.set_position(m.step as u64);
            let accuracy = m
                .rollouts
                .rewards
                .get("accuracy")
                .map_or(f64::NAN, |s| s.mean);
            bar.set_message(format!(
                "reward {:.3} | accuracy {:.2} | zero-std {:.2} | {:.0} gen tok/s",
                m.rollouts.reward,
                accuracy,
                m.rollouts.frac_reward_zero_std,
                m.generation_tokens_per_second
            ));
        },
    )?;
    bar.finish_and_clear();
    if summary.resumed_from > 0 {
        note!(p, "resumed from step {}", summary.resumed_from);
    }
    say!(
        p,
        "trained {} GBA steps on {} cases into {}: final mean reward {:.4}",
        summary.steps,
        cases.len(),
        output.display(),
        summary.final_reward
    );
    if let Some(reference) = publish {
        let store = Registry::create(&registry)?;
        // The lineage: the recipe and the guidelines it drew under, and the parent adapter.
        let lineage = format!(
            "# {}\n{}\n# {}\n{}",
            args.recipe.display(),
            recipe.text,
            recipe.guidelines.display(),
            guidelines.text
        );
        let options = PublishOptions {
            kind: Some(Kind::Adapter),
            specialty: recipe.specialty.clone(),
            base: base.manifest().copied(),
            recipe: Some(lineage),
            inputs: adapter.manifest().copied().into_iter().collect(),
            result_only: true,
            ..PublishOptions::default()
        };
        publish_outputs(&store, &output, &reference, &options)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Where a run publishes (`--publish`), the registry it reads and publishes to (`--registry`,
/// else the recipe's, else the default) and its output directory.
fn destination(
    args: &RunArgs,
    recipe_registry: Option<&PathBuf>,
) -> anyhow::Result<(Option<mmx::registry::Reference>, PathBuf, PathBuf)> {
    let publish = args
        .publish
        .as_deref()
        .map(super::registry::publish_target)
        .transpose()?;
    let registry = args
        .registry
        .clone()
        .or_else(|| recipe_registry.cloned())
        .unwrap_or_else(|| mmx::registry::registry_path(None));
    let output = super::output_dir(args.output.as_deref(), &args.recipe, "train");
    Ok((publish, registry, output))
}

/// A progress bar for `what` (hidden when quiet).
fn progress(quiet: bool, what: &str) -> ProgressBar {
    super::progress::bar(what, super::progress::Counting::Steps, 0, quiet)
}

/// Publishes a training output's result (`options.result_only`: not its metrics or
/// checkpoints).
fn publish_outputs(
    store: &Registry,
    output: &std::path::Path,
    reference: &mmx::registry::Reference,
    options: &PublishOptions,
) -> anyhow::Result<()> {
    let p = Printer::text();
    let published = store
        .publish(output, reference, options)
        .with_context(|| format!("publishing {} as {reference}", output.display()))?;
    say!(
        p,
        "published as {reference}: manifest {}",
        published.manifest
    );
    Ok(())
}

fn name(method: TrainMethod) -> &'static str {
    match method {
        TrainMethod::Dsa => "dsa",
        TrainMethod::Base => "base",
    }
}

/// Removes a scratch directory when the command ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
