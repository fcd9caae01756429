//! `mmx calibrate MODEL [--adapter A] --data CASES.jsonl... [-n N] [--fisher] -o STATS.safetensors`:
//! an expert's calibration statistics (the Gram of every projection's inputs over its cases, and
//! with `--fisher` the diagonal Fisher of its weights), for
//! data-aware recipes (`calibration = "STATS.safetensors"`); and the same for the experts of a
//! recipe that gives their cases (`calibration = { data = ..., n = ... }`) before `mmx merge`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use super::print::{say, Printer};
use super::progress::{bar, Counting};
use mmx::merge::calibration::{write_calibration, ModuleStats};
use mmx::merge::Method;
use mmx::recipe::{CalibrationSpec, Recipe, Source};
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
    /// Also measure each projection's diagonal Fisher (squared gradients of the completion's
    /// log-likelihood; a backward pass per case, and memory for one f32 copy of the weights),
    /// as `method = "fisher"` reads it.
    #[arg(long)]
    fisher: bool,
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

/// What one calibration measured.
struct Measured {
    modules: usize,
    cases: usize,
    tokens: u64,
    seconds: f64,
}

/// What to measure: the first `n` cases of `data` through `model` with `adapter`, and the
/// Fisher too with `fisher`.
struct Measure<'a> {
    model: &'a str,
    adapter: Option<&'a str>,
    data: &'a [PathBuf],
    n: Option<usize>,
    fisher: bool,
}

/// Measures the statistics `what` says and writes them to `output`.
fn measure(
    what: &Measure<'_>,
    output: &Path,
    registry: &Path,
    quiet: bool,
) -> anyhow::Result<Measured> {
    let Measure {
        model,
        adapter,
        data,
        n,
        fisher,
    } = *what;
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
        let adapter_dir = Materialized::open(adapter, registry)?;
        match images.as_mut() {
            Some(images) => images.load_adapter(&mut lm, adapter_dir.dir())?,
            None => lm.load_adapter(adapter_dir.dir())?,
        }
    }
    let mut cases = read_case_files(data)?;
    if let Some(n) = n {
        cases.truncate(n);
    }
    if cases.is_empty() {
        anyhow::bail!("no cases to calibrate on");
    }
    let progress = bar("calibrating", Counting::Items, cases.len() as u64, quiet);
    let start = Instant::now();
    let calibrated = calibrate(
        &mut lm,
        images.as_ref(),
        &tokenizer,
        &cases,
        fisher,
        &|_| progress.inc(1),
    )?;
    progress.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let mut modules: BTreeMap<String, ModuleStats> = calibrated
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
    for (module, f) in calibrated.fishers {
        modules.entry(module).or_default().fisher = Some((f.values, f.shape.to_vec()));
    }
    write_calibration(output, &modules)?;
    Ok(Measured {
        modules: modules.len(),
        cases: calibrated.cases,
        tokens: calibrated.tokens,
        seconds,
    })
}

/// Runs `mmx calibrate`.
pub fn run(args: CalibrateArgs) -> anyhow::Result<ExitCode> {
    let registry = mmx::registry::registry_path(args.registry.as_deref());
    let what = Measure {
        model: &args.model,
        adapter: args.adapter.as_deref(),
        data: &args.data,
        n: args.cases,
        fisher: args.fisher,
    };
    let measured = measure(&what, &args.output, &registry, args.quiet || args.json)?;
    let rate = measured.tokens as f64 / measured.seconds;
    let summary = json!({
        "output": args.output.display().to_string(),
        "modules": measured.modules,
        "cases": measured.cases,
        "tokens": measured.tokens,
        "seconds": measured.seconds,
        "tokens_per_second": rate,
    });
    Printer::new(args.json).result(&summary, |p| {
        say!(
            p,
            "calibrated {} modules on {} cases ({} tokens, {rate:.0} tokens/s) into {}",
            measured.modules,
            measured.cases,
            measured.tokens,
            args.output.display()
        );
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Measures the statistics of the experts whose recipe entry gives cases
/// (`calibration = { data = ..., n = ... }`) into `<output>.calibration/expertN.safetensors`, and
/// points the recipe at those files, before `mmx merge` plans the merge.
pub(super) fn calibrate_recipe(
    recipe: &mut Recipe,
    output: &Path,
    quiet: bool,
) -> anyhow::Result<()> {
    let registry = mmx::registry::registry_path(recipe.registry.as_deref());
    let folder = PathBuf::from(format!("{}.calibration", output.display()));
    let base = recipe.base.as_ref().map(ToString::to_string);
    // Fisher-weighted averaging reads each expert's Fisher; the others only its Grams.
    let fisher = Method::from_name(&recipe.method) == Some(Method::Fisher);
    for (i, expert) in recipe.experts.iter_mut().enumerate() {
        let Some(CalibrationSpec::Cases { data, n }) = &expert.calibration else {
            continue;
        };
        let Some(base) = &base else {
            anyhow::bail!("expert {i}: calibrating on cases needs the recipe's `base`");
        };
        if matches!(expert.source, Source::WithLora { .. }) {
            anyhow::bail!(
                "expert {i} (`{}`): calibrating a `model+lora` expert is not supported; give a PEFT adapter",
                expert.source
            );
        }
        std::fs::create_dir_all(&folder)
            .map_err(|e| anyhow::anyhow!("`{}`: {e}", folder.display()))?;
        let path = folder.join(format!("expert{i}.safetensors"));
        let adapter = expert.source.to_string();
        let what = Measure {
            model: base,
            adapter: Some(&adapter),
            data,
            n: *n,
            fisher,
        };
        let measured = measure(&what, &path, &registry, quiet)?;
        Printer::text().note(format_args!(
            "calibrated expert {i} (`{adapter}`) on {} cases ({} tokens) into {}",
            measured.cases,
            measured.tokens,
            path.display()
        ));
        expert.calibration = Some(CalibrationSpec::File(path));
    }
    Ok(())
}
