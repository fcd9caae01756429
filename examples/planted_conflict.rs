//! The planted-conflict benchmark, scripted through the library API as merge sweeps.
//!
//! For each overlap level and seed, a sweep generates a planted-conflict problem (synthetic
//! linear tasks, see `mmx::sweep::planted`), merges its experts with every method over a grid of λ
//! (for `svd`, of the expert weight, which plays λ's part), picks each method's λ on the
//! validation inputs and reports its score on the test inputs: mean ± std over the seeds.
//!
//!     cargo run --release --example planted_conflict -- [--seeds 5] [--vary overlap|conflict]
//!         [--rank 32] [--densities 0.5] [--out DIR]
//!
//! `--vary overlap` (the default) runs overlap 0, 0.25, ..., 1 at conflict 0.5; `--vary
//! conflict` runs conflict 0, 0.25, 0.5 at overlap 0.5 (conflict 0.5 is a coin flip per entry:
//! as conflicted as it gets). `--rank` is the rank of the LoRA outputs (svd, core-space
//! methods): 32 is the experts' ranks summed, so nothing is truncated. `--densities` lists the
//! densities tried (with λ) for the methods that trim.
//!
//! Sweeps resume: a rerun with the same output directory only prints the table.

use std::collections::BTreeMap;
use std::path::PathBuf;

use mmx::recipe::Scalar;
use mmx::sweep::file::{MethodEntry, Search, Sweep, Template, Values};
use mmx::sweep::planted::PlantedSpec;
use mmx::sweep::{run_sweep, Shard, SweepOptions, TrialResult};

const LEVELS: [f64; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];
const LAMBDAS: [f64; 9] = [0.25, 0.375, 0.5, 0.625, 0.75, 1.0, 1.25, 1.5, 2.0];

fn list(values: &[f64]) -> Values {
    Values::List(values.iter().map(|&v| Scalar::Number(v)).collect())
}

fn text(value: &str) -> Values {
    Values::List(vec![Scalar::Text(value.to_string())])
}

/// The methods compared, each with the label the table uses.
fn methods(rank: usize, densities: &[f64]) -> Vec<(&'static str, MethodEntry)> {
    let entry = |method: &str, lora: bool, params: Vec<(&str, Values)>| MethodEntry {
        method: method.to_string(),
        output: Some(if lora { "lora" } else { "delta" }.to_string()),
        space: Some(if lora { "core" } else { "full" }.to_string()).filter(|_| method != "svd"),
        rank: lora.then(|| serde_json::json!(rank)),
        parameters: params
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    };
    let half = || list(densities);
    vec![
        (
            "task_arithmetic",
            entry("task_arithmetic", false, vec![("lambda", list(&LAMBDAS))]),
        ),
        (
            "ties",
            entry(
                "ties",
                false,
                vec![("density", half()), ("lambda", list(&LAMBDAS))],
            ),
        ),
        (
            "dare_ties",
            entry(
                "dare_ties",
                false,
                vec![("density", half()), ("lambda", list(&LAMBDAS))],
            ),
        ),
        ("svd", entry("svd", true, vec![("weight", list(&LAMBDAS))])),
        (
            "ties (core)",
            entry(
                "ties",
                true,
                vec![("density", half()), ("lambda", list(&LAMBDAS))],
            ),
        ),
        (
            "caci",
            entry(
                "caci",
                true,
                vec![
                    ("density", half()),
                    ("attenuation", list(&[1.0])),
                    ("confidence", text("rms")),
                    ("lambda", list(&LAMBDAS)),
                ],
            ),
        ),
        // CACI scoring each core coordinate by its effect on the expert's outputs on the
        // expert's own (validation) inputs.
        (
            "caci (activation)",
            entry(
                "caci",
                true,
                vec![
                    ("density", half()),
                    ("attenuation", list(&[1.0])),
                    ("confidence", text("activation")),
                    ("lambda", list(&LAMBDAS)),
                ],
            ),
        ),
        // The data-aware methods read each expert's calibration statistics (the Grams of its
        // validation inputs), at their default settings but λ.
        (
            "regmean",
            entry("regmean", false, vec![("lambda", list(&LAMBDAS))]),
        ),
        (
            "regmean (core)",
            entry("regmean", true, vec![("lambda", list(&LAMBDAS))]),
        ),
        (
            "fisher",
            entry("fisher", false, vec![("lambda", list(&LAMBDAS))]),
        ),
    ]
}

fn label_of(result: &TrialResult, labels: &[(&'static str, MethodEntry)]) -> &'static str {
    let space = result.settings["space"].as_str();
    let confidence = result.settings["parameters"]["confidence"].as_str();
    let entry_confidence = |e: &MethodEntry| match e.parameters.get("confidence") {
        Some(Values::List(v)) => match v.first() {
            Some(Scalar::Text(t)) => Some(t.clone()),
            _ => None,
        },
        _ => None,
    };
    labels
        .iter()
        .find(|(_, e)| {
            e.method == result.method
                && e.space.as_deref() == space
                && entry_confidence(e).as_deref() == confidence
        })
        .map(|(l, _)| *l)
        .expect("every trial comes from one of the methods")
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut seeds = 5u64;
    let mut vary = "overlap".to_string();
    let mut rank = 32usize;
    let mut densities = vec![0.5];
    let mut out = PathBuf::from("out/planted-conflict");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--seeds" => seeds = value()?.parse()?,
            "--vary" => vary = value()?,
            "--rank" => rank = value()?.parse()?,
            "--densities" => {
                densities = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--out" => out = PathBuf::from(value()?),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let levels: Vec<(f64, f64)> = match vary.as_str() {
        "overlap" => LEVELS.iter().map(|&o| (o, 0.5)).collect(),
        "conflict" => LEVELS[..3].iter().map(|&c| (0.5, c)).collect(),
        other => return Err(format!("--vary {other}: expected overlap or conflict").into()),
    };
    let labels = methods(rank, &densities);
    let tag: Vec<String> = densities.iter().map(|d| d.to_string()).collect();
    // (level index, label) -> test score of the validation-best trial, one per seed.
    let mut scores: BTreeMap<(usize, &str), Vec<f64>> = BTreeMap::new();
    for (o, &(overlap, conflict)) in levels.iter().enumerate() {
        for seed in 0..seeds {
            let spec = PlantedSpec {
                overlap,
                conflict,
                seed,
                ..PlantedSpec::default()
            };
            let dir = out.join(format!(
                "overlap{overlap}-conflict{conflict}-seed{seed}-rank{rank}-density{}",
                tag.join("_")
            ));
            let sweep = Sweep {
                path: dir.join("sweep (built by examples/planted_conflict.rs)"),
                template: Template::Planted(spec),
                search: Search::Grid,
                parameters: BTreeMap::new(),
                methods: labels.iter().map(|(_, e)| e.clone()).collect(),
                keep_outputs: false,
                eval: None,
                publish: None,
                registry: None,
            };
            let options = SweepOptions {
                shard: Shard::ALL,
                resume: true,
                max_memory: 1 << 30,
                backend: mmx::backend::Backend::Cpu,
            };
            let report = run_sweep(&sweep, &dir, &options, &mut |_, _| {})?;
            if let Some(failed) = report.results.iter().find(|r| r.error.is_some()) {
                return Err(format!("trial {} failed: {:?}", failed.id, failed.error).into());
            }
            let mut best: BTreeMap<&str, &TrialResult> = BTreeMap::new();
            for r in &report.results {
                let entry = best.entry(label_of(r, &labels)).or_insert(r);
                if r.validation > entry.validation {
                    *entry = r;
                }
            }
            for (label, r) in best {
                scores
                    .entry((o, label))
                    .or_default()
                    .push(r.test.expect("planted trials are scored"));
            }
            eprintln!(
                "overlap {overlap} conflict {conflict} seed {seed}: {} trials ({} run now)",
                report.results.len(),
                report.ran
            );
        }
    }

    println!(
        "Normalised test performance (1 = each expert on its own task, 0 = the base), λ{} picked on validation; mean ± std over {seeds} seeds; 4 experts of rank 8, 2 layers × (q_proj, v_proj) of 64×64, leak 0.5; LoRA outputs of rank {rank}.\n",
        if densities.len() > 1 { format!(" and density ({})", tag.join(", ")) } else { format!(" (density {})", tag.join(", ")) }
    );
    let header: Vec<String> = levels
        .iter()
        .map(|(o, c)| {
            if vary == "overlap" {
                format!("overlap {o}")
            } else {
                format!("conflict {c}")
            }
        })
        .collect();
    println!("| method | {} | mean |", header.join(" | "));
    println!("|---|{}---|", "---|".repeat(levels.len()));
    for (label, _) in &labels {
        let cells: Vec<String> = (0..levels.len())
            .map(|o| {
                let (m, s) = mean_std(&scores[&(o, *label)]);
                format!("{m:.3} ± {s:.3}")
            })
            .collect();
        // The average over levels, per seed, then mean ± std over seeds.
        let per_seed: Vec<f64> = (0..seeds as usize)
            .map(|i| {
                (0..levels.len())
                    .map(|o| scores[&(o, *label)][i])
                    .sum::<f64>()
                    / levels.len() as f64
            })
            .collect();
        let (m, s) = mean_std(&per_seed);
        println!("| {label} | {} | {m:.3} ± {s:.3} |", cells.join(" | "));
    }
    // Seeds share their problems across methods: the paired difference is the sharper test.
    println!("\nCACI minus each method, paired by seed (mean ± std over seeds):\n");
    println!("| caci − | {} | mean |", header.join(" | "));
    println!("|---|{}---|", "---|".repeat(levels.len()));
    let difference = |o: usize, label: &str| -> Vec<f64> {
        scores[&(o, "caci")]
            .iter()
            .zip(&scores[&(o, label)])
            .map(|(c, m)| c - m)
            .collect()
    };
    for (label, _) in labels.iter().filter(|(l, _)| *l != "caci") {
        let cells: Vec<String> = (0..levels.len())
            .map(|o| {
                let (m, s) = mean_std(&difference(o, label));
                format!("{m:+.3} ± {s:.3}")
            })
            .collect();
        let per_seed: Vec<f64> = (0..seeds as usize)
            .map(|i| {
                (0..levels.len())
                    .map(|o| difference(o, label)[i])
                    .sum::<f64>()
                    / levels.len() as f64
            })
            .collect();
        let (m, s) = mean_std(&per_seed);
        println!("| {label} | {} | {m:+.3} ± {s:.3} |", cells.join(" | "));
    }
    Ok(())
}
