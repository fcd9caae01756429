//! `mmx merge RECIPE`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use super::print::{say, Printer};
use super::progress::{bar, Counting};
use super::{choose_device, default_max_memory, human_bytes, output_dir, parse_size, Device};
use mmx::backend::Backend;
use mmx::merge::lora_native::{LoraMerge, LoraSummary};
use mmx::merge::{merge, MergePlan, MergeSummary, Merged, OutputOptions, Plan};
use mmx::recipe::{check_target, Recipe};

/// Arguments of `mmx merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The recipe: mmx TOML (`.toml`) or a mergekit config (`.yml`, `.yaml`).
    recipe: PathBuf,
    /// Output directory [default: `out/RECIPE-NAME`].
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Where to compute.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// Print the plan and its memory estimate; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Publish the output to the registry as NAME:TAG, with its lineage (recipe, tool).
    #[arg(long, value_name = "NAME:TAG")]
    publish: Option<String>,
    /// The registry for --publish (default: $MMX_REGISTRY, else ./registry).
    #[arg(long, value_name = "DIR")]
    registry: Option<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// Memory budget for tensors in flight [default: half of the available memory].
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    max_memory: Option<u64>,
    /// Largest output shard [default: 5G].
    #[arg(long, value_parser = parse_size, value_name = "SIZE", default_value = "5G")]
    shard_size: u64,
    /// Seed of the random methods (overrides the recipe's).
    #[arg(long)]
    seed: Option<u64>,
    /// Worker threads [default: all cores].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// Replace an existing output directory even if it is not an earlier mmx output.
    #[arg(long)]
    force: bool,
}

/// Runs `mmx merge`.
pub fn run(args: MergeArgs) -> anyhow::Result<ExitCode> {
    let p = Printer::new(args.json);
    let backend = choose_device(args.device)?;
    let publish = args
        .publish
        .as_deref()
        .map(super::registry::publish_target)
        .transpose()?;
    let mut recipe = Recipe::load(&args.recipe)?;
    let recipe_text = recipe.text.clone();
    if let Some(seed) = args.seed {
        recipe.seed = seed;
    }
    let output = output_dir(args.output.as_deref(), &args.recipe, "merge");
    super::calibrate::calibrate_recipe(&mut recipe, &output, args.json)?;
    let plan = MergePlan::build(recipe)?;
    for warning in plan.warnings() {
        p.warning(warning);
    }
    let max_memory = args.max_memory.unwrap_or_else(default_max_memory);
    if args.dry_run {
        check_target(&output, args.force)?;
        match &plan {
            MergePlan::Model(plan) => {
                print_plan(&p, plan, &output, max_memory, args.threads.map(usize::from))?
            }
            MergePlan::Adapter(merge) => print_lora_plan(&p, merge, &output)?,
        }
        return Ok(ExitCode::SUCCESS);
    }

    let options = OutputOptions {
        max_memory,
        shard_bytes: args.shard_size,
        force: args.force,
        backend,
        threads: args.threads.map(usize::from),
    };
    let bar = match &plan {
        MergePlan::Model(plan) => bar("merging", Counting::Bytes, plan.output_bytes(), false),
        MergePlan::Adapter(_) => bar("merging", Counting::Bytes, 0, true),
    };
    let start = Instant::now();
    let merged = merge(&plan, &output, &options, &|bytes| bar.inc(bytes))?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let method = &plan.recipe().method;
    match &merged {
        Merged::Model(summary) => print_model(&p, summary, method, backend, seconds)?,
        Merged::Adapter(summary) => print_adapter(&p, summary, &output, method, seconds)?,
    }
    if let Some(reference) = &publish {
        super::registry::publish_merge(args.registry.as_deref(), &output, reference, &recipe_text)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `--dry-run` of a model or delta output: the plan and its memory estimate.
fn print_plan(
    p: &Printer,
    plan: &Plan,
    output: &Path,
    max_memory: u64,
    threads: Option<usize>,
) -> anyhow::Result<()> {
    let merged = plan.tensors.iter().filter(|t| t.merge.is_some()).count();
    let copied = plan.tensors.len() - merged;
    let estimate = plan.memory_estimate(
        max_memory,
        threads.unwrap_or_else(rayon::current_num_threads),
    );
    let summary = json!({
        "dry_run": true,
        "method": plan.method.name(),
        "output": output.display().to_string(),
        "experts": plan.experts.iter().map(|e| e.label.clone()).collect::<Vec<_>>(),
        "tensors": {"merged": merged, "copied": copied},
        "output_bytes": plan.output_bytes(),
        "memory_estimate_bytes": estimate,
        "max_memory_bytes": max_memory,
    });
    p.result(&summary, |p| {
        say!(p, "method      {}", plan.method.name());
        if let Some(b) = &plan.base {
            say!(p, "base        {}", b.dir().display());
        }
        for e in &plan.experts {
            say!(p, "expert {:<4} {}", e.index, e.label);
        }
        say!(
            p,
            "tensors     {merged} merged, {copied} copied from the base"
        );
        say!(
            p,
            "output      {} ({})",
            output.display(),
            human_bytes(plan.output_bytes())
        );
        say!(
            p,
            "memory      about {} at peak (largest tensor {}, budget {})",
            human_bytes(estimate),
            human_bytes(plan.peak_tensor_bytes()),
            human_bytes(max_memory)
        );
    })
}

/// `--dry-run` of a LoRA output.
fn print_lora_plan(p: &Printer, merge: &LoraMerge, output: &Path) -> anyhow::Result<()> {
    let method = &merge.recipe().method;
    let (modules, max_rank) = merge.shape();
    let plan = json!({"dry_run": true, "method": method, "output": output.display().to_string(), "modules": modules, "max_rank": max_rank});
    p.result(&plan, |p| {
        say!(p, "method      {method} (LoRA output)");
        say!(p, "modules     {modules}, ranks up to {max_rank}");
        say!(p, "output      {}", output.display());
    })
}

fn print_model(
    p: &Printer,
    summary: &MergeSummary,
    method: &str,
    backend: Backend,
    seconds: f64,
) -> anyhow::Result<()> {
    let out = json!({
        "output": summary.output.display().to_string(),
        "method": method,
        "tensors": {"merged": summary.merged, "copied": summary.copied, "on_device": summary.device_tensors},
        "bytes": summary.bytes,
        "seconds": seconds,
        "files": summary.files,
    });
    p.result(&out, |p| {
        let on_device = match backend {
            Backend::Cuda(ordinal) => format!(", {} on cuda:{ordinal}", summary.device_tensors),
            Backend::Cpu => String::new(),
        };
        say!(
            p,
            "merged {} tensors ({} copied{on_device}) with {method} into {} in {seconds:.2}s",
            summary.merged,
            summary.copied,
            summary.output.display()
        );
    })
}

fn print_adapter(
    p: &Printer,
    summary: &LoraSummary,
    output: &Path,
    method: &str,
    seconds: f64,
) -> anyhow::Result<()> {
    let retained: serde_json::Map<String, serde_json::Value> = summary
        .retained_by_expert
        .iter()
        .map(|(label, share)| (label.clone(), json!(share)))
        .collect();
    let out = json!({"output": output.display().to_string(), "method": method, "modules": summary.modules, "whole_tensors": summary.whole_tensors, "max_rank": summary.max_rank, "max_discarded_energy": summary.max_discarded, "mean_sign_conflict": summary.mean_sign_conflict, "retained_energy": retained, "modules_on_device": summary.device_modules, "seconds": seconds, "files": summary.files});
    p.result(&out, |p| {
    say!(p,
        "merged {} modules with {method} into a LoRA adapter (ranks up to {}, at most {:.2}% of a module's energy discarded) in {} in {seconds:.2}s",
        summary.modules,
        summary.max_rank,
        100.0 * summary.max_discarded,
        output.display()
    );
    if summary.whole_tensors > 0 {
        say!(p,
            "merged {} tensors the experts store whole (`modules_to_save`) as full tensors",
            summary.whole_tensors
        );
    }
    if let Some(conflict) = summary.mean_sign_conflict {
        say!(p,
            "conflicts: {:.1}% of core coordinates had kept entries of both signs (mean over modules)",
            100.0 * conflict
        );
    }
    for (label, share) in &summary.retained_by_expert {
        say!(p, "kept {:>5.1}% of the update of {label}", 100.0 * share);
    }
    })
}
