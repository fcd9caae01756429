//! `mmx eval MODEL [--adapter A] --data FILE... [--json] [--blank-images]`: per-specialty
//! accuracy of greedy answers (a LLaVA model's with each case's image, or a blank one).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use super::print::{say, Printer};

use mmx::train::eval::{evaluate, Shown};
use mmx::train::images::Images;
use mmx::train::read_case_files;
use mmx::train::source::Materialized;
use mmx::train::tokenizer::Tokenizer;

/// The evaluation of `model` (with `adapter`) on the cases of `data`.
fn report(
    model: &str,
    adapter: Option<&str>,
    data: &[PathBuf],
    registry: &std::path::Path,
    batch: usize,
    max_new_tokens: usize,
    shown: Shown,
) -> anyhow::Result<mmx::train::eval::EvalReport> {
    let model_dir = Materialized::open(model, registry)?;
    let tokenizer = Tokenizer::load(model_dir.dir())?;
    let (mut images, mut lm) = Images::load(
        model_dir.dir(),
        None,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    tokenizer.check_vocab(lm.config())?;
    if let Some(adapter) = adapter {
        let adapter = Materialized::open(adapter, registry)?;
        match images.as_mut() {
            Some(images) => images.load_adapter(&mut lm, adapter.dir())?,
            None => lm.load_adapter(adapter.dir())?,
        }
    }
    let cases = read_case_files(data)?;
    let images = images.as_ref().map(|i| (i, shown));
    Ok(evaluate(
        &lm,
        images,
        &tokenizer,
        &cases,
        batch,
        max_new_tokens,
    )?)
}

/// Per-specialty accuracy of `model` (with `adapter`) on `data`, as `mmx eval` measures it.
pub(super) fn accuracy(
    model: &str,
    adapter: Option<&str>,
    data: &[PathBuf],
    registry: &std::path::Path,
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    Ok(report(model, adapter, data, registry, 32, 96, Shown::Image)?.accuracy)
}

/// Arguments of `mmx eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model: a Hugging Face directory or a registry reference (`registry:NAME:TAG`).
    model: String,
    /// A PEFT adapter to apply: a directory or a registry reference.
    #[arg(long)]
    adapter: Option<String>,
    /// Case files (JSON Lines), e.g. each specialty's test split.
    #[arg(long, required = true, num_args = 1.., value_name = "FILE")]
    data: Vec<PathBuf>,
    /// Prompts generated together.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// The longest answer, in tokens.
    #[arg(long, default_value_t = 96)]
    max_new_tokens: usize,
    /// The registry for registry references (default: $MMX_REGISTRY, else ./registry).
    #[arg(long, value_name = "DIR")]
    registry: Option<PathBuf>,
    /// Show a vision-language model a blank image in place of each case's image (the gap to
    /// the accuracy with images is what the model reads from them).
    #[arg(long)]
    blank_images: bool,
    /// Print {"accuracy": {...}, "n": {...}} as JSON.
    #[arg(long)]
    json: bool,
    /// Also write every case's answer to FILE, one JSON object a line (id, specialty,
    /// expected, answer, correct, output, and the image shown: its file or `blank`).
    #[arg(long, value_name = "FILE")]
    samples: Option<PathBuf>,
}

/// Runs `mmx eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let registry = mmx::registry::registry_path(args.registry.as_deref());
    let report = report(
        &args.model,
        args.adapter.as_deref(),
        &args.data,
        &registry,
        args.batch,
        args.max_new_tokens,
        if args.blank_images {
            Shown::Blank
        } else {
            Shown::Image
        },
    )?;
    if let Some(path) = &args.samples {
        let mut text = String::new();
        for sample in &report.samples {
            text.push_str(&serde_json::to_string(sample)?);
            text.push('\n');
        }
        mmx::tensor::write_atomic(path, text.as_bytes())?;
    }
    let summary = json!({"accuracy": report.accuracy, "n": report.n});
    Printer::new(args.json).result(&summary, |p| {
        say!(p, "{:<14} {:>8} {:>6}", "specialty", "accuracy", "n");
        for (specialty, accuracy) in &report.accuracy {
            say!(
                p,
                "{specialty:<14} {:>7.1}% {:>6}",
                100.0 * accuracy,
                report.n[specialty]
            );
        }
        say!(p, "{:<14} {:>7.1}%", "mean", 100.0 * report.mean_accuracy());
    })?;
    Ok(ExitCode::SUCCESS)
}
