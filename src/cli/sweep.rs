//! `mmx sweep SWEEP.toml`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::print::{note, say, Printer};
use super::{choose_device, default_max_memory, parse_size, Device};
use mmx::sweep::file::Sweep;
use mmx::sweep::{
    best_by_method, describe, gather, run_sweep, submit, write_scripts, Shard, SlurmOptions,
    SweepOptions, TrialResult,
};

/// Arguments of `mmx sweep`.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The sweep file (TOML, `[sweep]`).
    sweep: PathBuf,
    /// Output directory for results (default: `out/<sweep file stem>`).
    #[arg(short, long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// Run only trials I, I+N, I+2N, ... (0 ≤ I < N), e.g. one shard of an array job.
    #[arg(long, value_name = "I/N", value_parser = Shard::parse)]
    shard: Option<Shard>,
    /// Skip the trials already recorded in the output directory.
    #[arg(long)]
    resume: bool,
    /// Memory budget of each merge, e.g. 8G (default: half of the machine's memory).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Where the merges compute.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// Run nothing: gather every shard's recorded trials into results.csv, results.json and
    /// scores.svg, list the trials none recorded, and fail if any is missing or failed.
    #[arg(long, conflicts_with_all = ["shard", "slurm"])]
    gather: bool,
    /// Submit the sweep to Slurm: an array job, one task per shard, and a gather job after it.
    #[arg(long, conflicts_with = "shard")]
    slurm: bool,
    /// Shards of a Slurm sweep (default: one per trial, at most 1000).
    #[arg(long, value_name = "N", requires = "slurm")]
    shards: Option<usize>,
    /// Slurm partition (default: the cluster's default).
    #[arg(long, value_name = "P", requires = "slurm")]
    partition: Option<String>,
    /// At most K array tasks at once.
    #[arg(long, value_name = "K", requires = "slurm")]
    array_parallel: Option<usize>,
    /// CPUs of each array task; its merges use as many threads.
    #[arg(long, value_name = "C", default_value_t = 1, requires = "slurm")]
    cpus_per_task: usize,
    /// One more `#SBATCH` option for both jobs, e.g. `--sbatch-option=--time=02:00:00`.
    #[arg(
        long,
        value_name = "OPTION",
        requires = "slurm",
        allow_hyphen_values = true
    )]
    sbatch_option: Vec<String>,
    /// Write the Slurm scripts to OUT/slurm/ and print how to submit them; submit nothing.
    #[arg(long, requires = "slurm")]
    print_script: bool,
}

fn line(result: &TrialResult) -> String {
    let mut text = format!("{:<16} {}", result.method, describe(result));
    if let (Some(v), Some(t)) = (result.validation, result.test) {
        text.push_str(&format!("  validation {v:.4} test {t:.4}"));
    }
    if let Some(c) = result.sign_conflict {
        text.push_str(&format!("  sign conflict {:.1}%", 100.0 * c));
    }
    if let Some(r) = result.retained_mean() {
        text.push_str(&format!("  energy kept {:.1}%", 100.0 * r));
    }
    if let Some(e) = &result.error {
        text.push_str(&format!("  FAILED: {e}"));
    }
    text
}

/// Prints the summaries written and what is still missing; fails if anything is.
fn run_gather(sweep: &Sweep, output: &std::path::Path) -> anyhow::Result<ExitCode> {
    let p = Printer::text();
    let gathered = gather(sweep, output)?;
    let failed = gathered.failed();
    say!(
        p,
        "{} trials recorded in {}, {} failed, {} missing",
        gathered.results.len(),
        output.display(),
        failed,
        gathered.missing.len()
    );
    for m in &gathered.missing {
        say!(p, "  missing: trial {} ({})", m.index, m.id);
    }
    for file in &gathered.files {
        say!(p, "wrote {}", file.display());
    }
    if !gathered.missing.is_empty() {
        note!(p,
            "hint: `mmx sweep {} -o {} --resume` runs the missing trials (add `--slurm` to submit them)",
            sweep.path.display(),
            output.display()
        );
    }
    Ok(if gathered.missing.is_empty() && failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Writes the Slurm scripts and submits them (or, with `--print-script`, says how to).
fn run_slurm(
    args: &SweepArgs,
    sweep: &Sweep,
    output: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let p = Printer::text();
    let options = SlurmOptions {
        shards: args
            .shards
            .unwrap_or_else(|| sweep.trials().len().clamp(1, 1000)),
        array_parallel: args.array_parallel,
        partition: args.partition.clone(),
        cpus_per_task: args.cpus_per_task,
        sbatch_options: args.sbatch_option.clone(),
        max_memory: args.max_memory,
        resume: args.resume,
        mmx: std::env::current_exe()?,
    };
    let scripts = write_scripts(sweep, output, &options)?;
    say!(
        p,
        "wrote {} and {}",
        scripts.array.display(),
        scripts.gather.display()
    );
    if scripts.shards.is_empty() {
        say!(p, "every trial is recorded: nothing to submit");
        return run_gather(sweep, output);
    }
    let shards = scripts
        .shards
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if args.print_script {
        say!(p, "to submit (shards {shards} of {}):", options.shards);
        say!(
            p,
            "  array=$(sbatch --parsable {})",
            scripts.array.display()
        );
        say!(
            p,
            "  sbatch --dependency=afterany:$array {}",
            scripts.gather.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let submission = submit(&scripts)?;
    say!(
        p,
        "submitted array job {} ({} tasks: shards {shards} of {}, {} trials to run)",
        submission.array_job,
        scripts.shards.len(),
        options.shards,
        scripts.missing.len()
    );
    say!(
        p,
        "submitted gather job {} (after the array; writes results.csv, results.json, scores.svg)",
        submission.gather_job
    );
    say!(p, "logs: {}", output.join("slurm").display());
    Ok(ExitCode::SUCCESS)
}

/// Runs `mmx sweep`.
pub fn run(args: SweepArgs) -> anyhow::Result<ExitCode> {
    let p = Printer::text();
    let sweep = Sweep::load(&args.sweep)?;
    let output = super::output_dir(args.output.as_deref(), &args.sweep, "sweep");
    if args.gather {
        return run_gather(&sweep, &output);
    }
    if args.slurm {
        return run_slurm(&args, &sweep, &output);
    }
    let options = SweepOptions {
        shard: args.shard.unwrap_or(Shard::ALL),
        resume: args.resume,
        max_memory: args.max_memory.unwrap_or_else(default_max_memory),
        backend: choose_device(args.device)?,
    };
    let mut done = 0;
    let report = run_sweep(&sweep, &output, &options, &mut |result, total| {
        done += 1;
        note!(p, "[{done}/{total}] {} {}", result.id, line(result));
    })?;
    say!(
        p,
        "{} trials run, {} skipped (already recorded), {} failed; {} recorded in {}",
        report.ran,
        report.skipped,
        report.failed,
        report.results.len(),
        output.display()
    );
    let best = best_by_method(&report.results);
    if !best.is_empty() {
        say!(p, "best trial of each method, by validation score:");
        for r in best {
            say!(p, "  {}", line(r));
        }
    }
    for file in &report.files {
        say!(p, "wrote {}", file.display());
    }
    Ok(if report.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
