//! `mmx calibrate MODEL [--adapter A] --data CASES.jsonl... [-n N] -o STATS.safetensors`: an
//! expert's calibration statistics (the Gram of every projection's inputs over its cases), for
//! `regmean` recipes (`calibration = "STATS.safetensors"`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use super::print::{say, Printer};
use super::progress::{bar, Counting};
use mmx::merge::calibration::{write_calibration, ModuleStats};
use mmx::train::calibrate::calibrate;
use mmx::train::images::Images;
use mmx::train::read_case_files;
use mmx::train::source::Materialized;
use mmx::train::tokenizer::Tokenizer;

/// Arguments of `mmx calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// The base model: a Hugging Face directory or a registry reference (`registry:NAME:TAG`).
    model: String,
    /// The expert's PEFT adapter, applied while its inputs are measured.
    #[arg(long)]
    adapter: Option<String>,
    /// The expert's cases (JSON Lines), e.g. its specialty's validation split.
    #[arg(long, required = true, num_args = 1.., value_name = "FILE")]
    data: Vec<PathBuf>,
    /// Use the first N cases only.
    #[arg(short = 'n', long, value_name = "N")]
    cases: Option<usize>,
    /// The statistics file to write.
    #[arg(short, long, value_name = "STATS.safetensors")]
    output: PathBuf,
    /// The registry for registry references (default: $MMX_REGISTRY, else ./registry).
    #[arg(long, value_name = "DIR")]
    registry: Option<PathBuf>,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
    /// Print what was measured as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `mmx calibrate`.
pub fn run(args: CalibrateArgs) -> anyhow::Result<ExitCode> {
    let registry = mmx::registry::registry_path(args.registry.as_deref());
    let model_dir = Materialized::open(&args.model, &registry)?;
    let tokenizer = Tokenizer::load(model_dir.dir())?;
    let (images, mut lm) = Images::load(
        model_dir.dir(),
        None,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    if images.is_some() {
        anyhow::bail!(
            "`{}` is a vision-language model: calibration of its language model is not supported yet",
            args.model
        );
    }
    tokenizer.check_vocab(lm.config())?;
    if let Some(adapter) = &args.adapter {
        lm.load_adapter(Materialized::open(adapter, &registry)?.dir())?;
    }
    let mut cases = read_case_files(&args.data)?;
    if let Some(n) = args.cases {
        cases.truncate(n);
    }
    if cases.is_empty() {
        anyhow::bail!("no cases to calibrate on");
    }
    let progress = bar(
        "calibrating",
        Counting::Items,
        cases.len() as u64,
        args.quiet || args.json,
    );
    let start = Instant::now();
    let calibrated = calibrate(&mut lm, &tokenizer, &cases, &|_| progress.inc(1))?;
    progress.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let modules: BTreeMap<String, ModuleStats> = calibrated
        .grams
        .into_iter()
        .map(|(module, g)| {
            let stats = ModuleStats {
                gram: Some((g.values, g.side, g.tokens)),
                fisher: None,
            };
            (module, stats)
        })
        .collect();
    write_calibration(&args.output, &modules)?;
    let summary = json!({
        "output": args.output.display().to_string(),
        "modules": modules.len(),
        "cases": calibrated.cases,
        "tokens": calibrated.tokens,
        "seconds": seconds,
        "tokens_per_second": calibrated.tokens as f64 / seconds,
    });
    Printer::new(args.json).result(&summary, |p| {
        say!(
            p,
            "calibrated {} modules on {} cases ({} tokens, {:.0} tokens/s) into {}",
            modules.len(),
            calibrated.cases,
            calibrated.tokens,
            calibrated.tokens as f64 / seconds,
            args.output.display()
        );
    })?;
    Ok(ExitCode::SUCCESS)
}
