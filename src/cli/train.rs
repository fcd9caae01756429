//! `mmx train dsa|base RECIPE`: supervised fine-tuning of a specialty LoRA, or of a base
//! model's own weights, with a progress bar on stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::registry::{publish::PublishOptions, Kind, Registry};
use crate::train::init::init_model;
use crate::train::recipe::{TrainMethod, TrainRecipe};
use crate::train::sft::train;
use crate::train::source::Materialized;

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
}

/// Runs `mmx train`.
pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    // The trainer runs one shard of each batch per core; candle's own per-operation threads
    // only slow small models down (see `crate::train::sft`). Set before any thread starts.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let (method, args) = match args.command {
        TrainCommand::Dsa(a) => (TrainMethod::Dsa, a),
        TrainCommand::Base(a) => (TrainMethod::Base, a),
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
    let publish = args
        .publish
        .as_deref()
        .map(super::registry::publish_target)
        .transpose()?;
    let registry = args
        .registry
        .clone()
        .or_else(|| recipe.registry.clone())
        .unwrap_or_else(|| crate::registry::registry_path(None));
    let output = super::output_dir(args.output.as_deref(), &args.recipe, "train");
    // The starting model: the recipe's base, or a new one drawn from its seed.
    let (base, base_name, _scratch) = match (&recipe.base, &recipe.init) {
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
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} training [{bar:30}] step {pos}/{len} {msg} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let summary = train(
        &recipe,
        base.dir(),
        &base_name,
        &cases,
        &output,
        args.resume,
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
        eprintln!("resumed from step {}", summary.resumed_from);
    }
    println!(
        "trained {} steps on {} cases into {}: final loss {:.4}, {:.0} tokens/s",
        summary.steps,
        summary.examples,
        output.display(),
        summary.final_loss,
        summary.tokens_per_second
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
            ..PublishOptions::default()
        };
        // Only the result: not the checkpoints and the metrics beside it.
        let staging = RemoveOnDrop(output.join(".publish"));
        std::fs::create_dir_all(&staging.0)?;
        for entry in std::fs::read_dir(&output)? {
            let path = entry?.path();
            if path.is_file() && path.file_name().is_some_and(|n| n != "metrics.jsonl") {
                std::fs::copy(&path, staging.0.join(path.file_name().unwrap_or_default()))?;
            }
        }
        let published = store
            .publish(&staging.0, &reference, &options)
            .with_context(|| format!("publishing {} as {reference}", output.display()))?;
        println!("published as {reference}: manifest {}", published.manifest);
    }
    Ok(ExitCode::SUCCESS)
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
