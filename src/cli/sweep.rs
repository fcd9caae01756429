//! `mmx sweep SWEEP.toml`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{default_max_memory, parse_size};
use crate::recipe::sweep::Sweep;
use crate::sweep::{best_by_method, describe, run_sweep, Shard, SweepOptions, TrialResult};

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

/// Runs `mmx sweep`.
pub fn run(args: SweepArgs) -> anyhow::Result<ExitCode> {
    let sweep = Sweep::load(&args.sweep)?;
    let output = super::output_dir(args.output.as_deref(), &args.sweep, "sweep");
    let options = SweepOptions {
        shard: args.shard.unwrap_or(Shard::ALL),
        resume: args.resume,
        max_memory: args.max_memory.unwrap_or_else(default_max_memory),
    };
    let mut done = 0;
    let report = run_sweep(&sweep, &output, &options, &mut |result, total| {
        done += 1;
        eprintln!("[{done}/{total}] {} {}", result.id, line(result));
    })?;
    println!(
        "{} trials run, {} skipped (already recorded), {} failed; {} recorded in {}",
        report.ran,
        report.skipped,
        report.failed,
        report.results.len(),
        output.display()
    );
    let best = best_by_method(&report.results);
    if !best.is_empty() {
        println!("best trial of each method, by validation score:");
        for r in best {
            println!("  {}", line(r));
        }
    }
    for file in &report.files {
        println!("wrote {}", file.display());
    }
    Ok(if report.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
