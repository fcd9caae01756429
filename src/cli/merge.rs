//! `mmx merge RECIPE`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::{choose_device, default_max_memory, human_bytes, output_dir, parse_size, Device};
use crate::backend::Backend;
use crate::merge::lora_native::{merges_adapters, LoraMerge};
use crate::merge::{check_target, write_merge, OutputOptions, Plan};
use crate::recipe::Recipe;

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
    #[arg(long)]
    threads: Option<usize>,
    /// Replace an existing output directory even if it is not an earlier mmx output.
    #[arg(long)]
    force: bool,
}

/// Runs `mmx merge`.
pub fn run(args: MergeArgs) -> anyhow::Result<ExitCode> {
    let backend = choose_device(args.device)?;
    let publish = args
        .publish
        .as_deref()
        .map(super::registry::publish_target)
        .transpose()?;
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot set up the worker threads")?;
    }
    let mut recipe = Recipe::load(&args.recipe)?;
    let recipe_text = recipe.text.clone();
    if let Some(seed) = args.seed {
        recipe.seed = seed;
    }
    let output = output_dir(args.output.as_deref(), &args.recipe, "merge");
    if merges_adapters(&recipe) {
        return run_lora_native(recipe, &output, &args, backend);
    }
    let plan = Plan::build(recipe)?;
    let max_memory = args.max_memory.unwrap_or_else(default_max_memory);
    let merged = plan.tensors.iter().filter(|t| t.merge.is_some()).count();
    let copied = plan.tensors.len() - merged;
    // Peak: as many tensors in flight as the budget admits, but at least the largest one.
    let threads = rayon::current_num_threads() as u64;
    let mut sizes: Vec<u64> = plan.tensors.iter().map(|t| t.working_bytes).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let in_flight: u64 = sizes.iter().take(threads as usize).sum();
    let estimate = in_flight.min(max_memory).max(plan.peak_tensor_bytes());

    if args.dry_run {
        check_target(&output, args.force)?;
        if args.json {
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
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            println!("method      {}", plan.method.name());
            if let Some(b) = &plan.base {
                println!("base        {}", b.dir().display());
            }
            for e in &plan.experts {
                println!("expert {:<4} {}", e.index, e.label);
            }
            println!("tensors     {merged} merged, {copied} copied from the base");
            println!(
                "output      {} ({})",
                output.display(),
                human_bytes(plan.output_bytes())
            );
            println!(
                "memory      about {} at peak (largest tensor {}, budget {})",
                human_bytes(estimate),
                human_bytes(plan.peak_tensor_bytes()),
                human_bytes(max_memory)
            );
        }
        return Ok(ExitCode::SUCCESS);
    }

    let bar = ProgressBar::new(plan.output_bytes());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} merging [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let start = Instant::now();
    let options = OutputOptions {
        max_memory,
        shard_bytes: args.shard_size,
        force: args.force,
        backend,
    };
    let summary = write_merge(&plan, &output, &options, &|bytes| bar.inc(bytes))?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    if args.json {
        let out = json!({
            "output": summary.output.display().to_string(),
            "method": plan.method.name(),
            "tensors": {"merged": summary.merged, "copied": summary.copied, "on_device": summary.device_tensors},
            "bytes": summary.bytes,
            "seconds": seconds,
            "files": summary.files,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let on_device = match backend {
            Backend::Cuda(ordinal) => format!(", {} on cuda:{ordinal}", summary.device_tensors),
            Backend::Cpu => String::new(),
        };
        println!(
            "merged {} tensors ({} copied{on_device}) with {} into {} in {seconds:.2}s",
            summary.merged,
            summary.copied,
            plan.method.name(),
            summary.output.display()
        );
    }
    if let Some(reference) = &publish {
        super::registry::publish_merge(args.registry.as_deref(), &output, reference, &recipe_text)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `cat` and `svd`: adapters to one adapter.
fn run_lora_native(
    recipe: Recipe,
    output: &std::path::Path,
    args: &MergeArgs,
    backend: Backend,
) -> anyhow::Result<ExitCode> {
    let method = recipe.method.clone();
    let text = recipe.text.clone();
    let mut merge = LoraMerge::build(recipe)?;
    if let Backend::Cuda(ordinal) = backend {
        merge = merge.on_device(crate::backend::device::Gpu::open(ordinal)?);
    }
    let (modules, max_rank) = merge.shape();
    if args.dry_run {
        check_target(output, args.force)?;
        if args.json {
            let plan = json!({"dry_run": true, "method": method, "output": output.display().to_string(), "modules": modules, "max_rank": max_rank});
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            println!("method      {method} (LoRA output)");
            println!("modules     {modules}, ranks up to {max_rank}");
            println!("output      {}", output.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let start = Instant::now();
    let summary = merge.write(output, args.force)?;
    let seconds = start.elapsed().as_secs_f64();
    if args.json {
        let retained: serde_json::Map<String, serde_json::Value> = summary
            .retained_by_expert
            .iter()
            .map(|(label, share)| (label.clone(), json!(share)))
            .collect();
        let out = json!({"output": output.display().to_string(), "method": method, "modules": summary.modules, "whole_tensors": summary.whole_tensors, "max_rank": summary.max_rank, "max_discarded_energy": summary.max_discarded, "mean_sign_conflict": summary.mean_sign_conflict, "retained_energy": retained, "seconds": seconds, "files": summary.files});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "merged {} modules with {method} into a LoRA adapter (ranks up to {}, at most {:.2}% of a module's energy discarded) in {} in {seconds:.2}s",
            summary.modules,
            summary.max_rank,
            100.0 * summary.max_discarded,
            output.display()
        );
        if summary.whole_tensors > 0 {
            println!(
                "merged {} tensors the experts store whole (`modules_to_save`) as full tensors",
                summary.whole_tensors
            );
        }
        if let Some(conflict) = summary.mean_sign_conflict {
            println!(
                "conflicts: {:.1}% of core coordinates had kept entries of both signs (mean over modules)",
                100.0 * conflict
            );
        }
        for (label, share) in &summary.retained_by_expert {
            println!("kept {:>5.1}% of the update of {label}", 100.0 * share);
        }
    }
    if let Some(reference) = &args.publish {
        let reference = super::registry::publish_target(reference)?;
        super::registry::publish_merge(args.registry.as_deref(), output, &reference, &text)?;
    }
    Ok(ExitCode::SUCCESS)
}
