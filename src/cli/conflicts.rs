//! `mmx conflicts RECIPE|ADAPTER...`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;

use super::print::{say, Printer};
use super::{choose_device, Device};
use mmx::adapter::Adapter;
use mmx::conflict::{analyze, analyze_adapters, plot_report, Group};
use mmx::merge::kernels_for;
use mmx::plot::Format;
use mmx::recipe::Recipe;
use mmx::tensor::write_atomic;

/// Arguments of `mmx conflicts`.
#[derive(Debug, Args)]
pub struct ConflictsArgs {
    /// A recipe whose experts to compare (mmx TOML or mergekit YAML), or two or more PEFT
    /// adapter directories.
    #[arg(required = true, value_name = "RECIPE|ADAPTER")]
    inputs: Vec<PathBuf>,
    /// Adapters only: the share of each update kept by magnitude before votes are counted
    /// (a recipe sets its own).
    #[arg(long, default_value_t = 0.5)]
    density: f32,
    /// Also write the full report (every module, every pair) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also draw the report to this file (FILE.png or FILE.svg): the sign-conflict rate per layer
    /// and module type, and the experts' cosine matrix, as two heatmaps.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Where to compute.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
}

fn print_groups(title: &str, groups: &[Group]) {
    let p = Printer::text();
    say!(
        p,
        "{title:<16} {:>7} {:>13} {:>10} {:>14}",
        "modules",
        "sign conflict",
        "mean κ",
        "minority mass"
    );
    for g in groups {
        say!(
            p,
            "{:<16} {:>7} {:>12.1}% {:>10.3} {:>13.1}%",
            g.name,
            g.modules,
            100.0 * g.sign_conflict,
            g.mean_kappa,
            100.0 * g.minority_mass
        );
    }
}

/// Runs `mmx conflicts`.
pub fn run(args: ConflictsArgs) -> anyhow::Result<ExitCode> {
    let p = Printer::text();
    // A bad plot file name is refused before the analysis, not after it.
    if let Some(path) = &args.plot {
        Format::from_path(path)?;
    }
    let kernels = kernels_for(choose_device(args.device)?)?;
    let report = match args.inputs.as_slice() {
        [recipe] if recipe.is_file() => analyze(Recipe::load(recipe)?, kernels.as_ref())?,
        dirs => {
            if let Some(other) = dirs.iter().find(|d| !Adapter::is_adapter_dir(d)) {
                bail!(
                    "`{}`: expected a recipe file or PEFT adapter directories (with adapter_config.json)",
                    other.display()
                );
            }
            if dirs.len() < 2 {
                bail!("comparing adapters needs at least two adapter directories");
            }
            if !(args.density > 0.0 && args.density <= 1.0) {
                bail!("`--density` must be in (0, 1], got {}", args.density);
            }
            analyze_adapters(dirs, args.density, kernels.as_ref())?
        }
    };
    print_groups("module type", &report.by_type);
    say!(p);
    print_groups("layer", &report.by_layer);
    say!(p);
    say!(
        p,
        "cosine of the experts' updates (mean over {} modules)",
        report.modules.len()
    );
    for (label, row) in report.experts.iter().zip(&report.cosine) {
        let cells: Vec<String> = row.iter().map(|c| format!("{c:>6.2}")).collect();
        say!(p, "{} {label}", cells.join(" "));
    }
    if let Some(kept) = &report.retained_energy {
        say!(p);
        say!(
            p,
            "energy of each expert's update that the recipe's merge keeps (mean over modules)"
        );
        for (label, share) in report.experts.iter().zip(kept) {
            if let Some(share) = share {
                say!(p, "{:>6.1}% {label}", 100.0 * share);
            }
        }
    }
    if let Some(path) = &args.json {
        let bytes = serde_json::to_vec_pretty(&report).context("serialising the report")?;
        write_atomic(path, &bytes)?;
    }
    if let Some(path) = &args.plot {
        plot_report(&report, path)?;
    }
    Ok(ExitCode::SUCCESS)
}
