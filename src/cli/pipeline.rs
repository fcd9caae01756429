//! `mmx pipeline PIPELINE.toml`: the whole recipe in one command: the cases, the base, a DSA
//! expert and a GBA expert per specialty, the conflicts of each set of experts, merges of each
//! set chosen on validation by a sweep, and an evaluation table with a plot.
//!
//! Every stage runs the same code as its own command, in this process, and records a key in
//! `OUTPUT/pipeline-state.json`: the blake3 of its recipe's text and of the keys of the stages
//! it reads. A stage whose key is recorded and whose result is still there (its registry tag,
//! its sweep results) is skipped, so a rerun after a crash or a change redoes only what the
//! change reaches; training stages resume from their own checkpoints.
//!
//! ```toml
//! [pipeline]
//! output = "../out/pipeline"             # stages write here (relative to this file)
//! registry = "../out/pipeline/registry"  # and publish here
//! specialties = ["cardiology", "radiology", "pathology", "dermatology"]
//! data = { seed = 0, train = 64, validation = 100, test = 200, answer_only = 512 }
//! base = { recipe = "gba/base.toml", publish = "tiny-med-base:v3" }
//! dsa = { recipe = "gba/dsa-{specialty}.toml", publish = "{specialty}:v3" }
//! gba = { recipe = "gba/gba-{specialty}.toml", publish = "{specialty}-gba:v3" }
//! merges = [
//!     { name = "dsa", experts = "dsa", sweep = "gba/merge-dsa-sweep.toml" },
//!     { name = "gba", experts = "gba", sweep = "gba/merge-gba-sweep.toml", publish = "expert:v3" },
//! ]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;

use super::print::{note, say, Printer};
use mmx::plot::{heatmap, ColorMap, Heatmap};
use mmx::registry::Registry;
use mmx::sweep::{best_by_method, TrialResult};

/// Arguments of `mmx pipeline`.
#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// The pipeline file (TOML).
    pipeline: PathBuf,
    /// Run every stage again, whatever is recorded.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    pipeline: WirePipeline,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WirePipeline {
    output: String,
    registry: String,
    specialties: Vec<String>,
    data: WireData,
    base: Stage,
    dsa: Stage,
    gba: Stage,
    #[serde(default)]
    merges: Vec<Merge>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireData {
    seed: u64,
    train: usize,
    validation: usize,
    test: usize,
    answer_only: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stage {
    recipe: String,
    publish: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Merge {
    name: String,
    /// Which experts its sweep merges: `dsa` or `gba` (its key follows theirs).
    experts: String,
    sweep: String,
    /// Publish the sweep's best merge by validation (with its lineage) as this tag.
    publish: Option<String>,
}

/// The keys of finished stages, kept in `pipeline-state.json`.
struct State {
    path: PathBuf,
    keys: BTreeMap<String, String>,
}

impl State {
    fn load(path: PathBuf) -> anyhow::Result<State> {
        let keys = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("`{}` is not a pipeline state", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading `{}`", path.display())),
        };
        Ok(State { path, keys })
    }

    fn record(&mut self, stage: &str, key: &str) -> anyhow::Result<()> {
        self.keys.insert(stage.to_string(), key.to_string());
        mmx::tensor::write_atomic(&self.path, &serde_json::to_vec_pretty(&self.keys)?)?;
        Ok(())
    }
}

/// Progress on stderr, one line per stage.
struct Progress {
    done: usize,
    total: usize,
    started: Instant,
}

impl Progress {
    fn report(&mut self, stage: &str, ran: bool, since: Instant) {
        self.done += 1;
        let what = if ran { "done" } else { "unchanged, skipped" };
        note!(
            Printer::text(),
            "[{}/{}] {stage}: {what} ({:.0} s; {:.0} s in all)",
            self.done,
            self.total,
            since.elapsed().as_secs_f64(),
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// A stage's key: its recipe's text, the keys it reads, the tool's version.
fn key(text: &str, inputs: &[&str]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(text.as_bytes());
    for i in inputs {
        h.update(b"\0");
        h.update(i.as_bytes());
    }
    h.finalize().to_hex()[..16].to_string()
}

/// Runs `mmx ARGS...` in this process.
fn mmx(args: &[&str]) -> anyhow::Result<()> {
    let code = super::dispatch(std::iter::once("mmx").chain(args.iter().copied()))?;
    if code != ExitCode::SUCCESS {
        bail!("`mmx {}` failed", args.join(" "));
    }
    Ok(())
}

/// Runs `mmx pipeline`.
pub fn run(args: PipelineArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.pipeline)
        .with_context(|| format!("reading `{}`", args.pipeline.display()))?;
    let wire: Wire =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("`{}`: {e}", args.pipeline.display()))?;
    let p = wire.pipeline;
    let dir = args.pipeline.parent().unwrap_or(Path::new("."));
    let output = dir.join(&p.output);
    let registry = dir.join(&p.registry);
    std::fs::create_dir_all(&output)?;
    let output = output.canonicalize()?;
    let store = Registry::create(&registry)?;
    let registry = registry.canonicalize()?;
    let reg = registry.display().to_string();
    // Every registry source the stages name without a registry of their own comes from here.
    std::env::set_var("MMX_REGISTRY", &registry);
    let mut state = State::load(output.join("pipeline-state.json"))?;
    let started = Instant::now();
    let total = 2 + 2 * p.specialties.len() + 2 * p.merges.len() + 1;
    let mut progress = Progress {
        done: 0,
        total,
        started,
    };
    let read = |path: &Path| -> anyhow::Result<String> {
        std::fs::read_to_string(path).with_context(|| format!("reading `{}`", path.display()))
    };
    // A trained stage: skipped when its key is recorded and its tag still resolves.
    let train = |state: &mut State,
                 progress: &mut Progress,
                 stage: &str,
                 method: &str,
                 recipe: &Path,
                 tag: &str,
                 inputs: &[&str]|
     -> anyhow::Result<String> {
        let since = Instant::now();
        let k = key(&read(recipe)?, inputs);
        let have = store.resolve(tag).is_ok();
        if !args.force && have && state.keys.get(stage) == Some(&k) {
            progress.report(stage, false, since);
            return Ok(k);
        }
        let out = output.join(stage);
        if args.force || state.keys.get(stage) != Some(&k) {
            // Another recipe's checkpoints cannot be resumed, and a forced stage starts over.
            let _ = std::fs::remove_dir_all(&out);
        }
        if have {
            let reference = mmx::registry::Reference::parse(tag).map_err(anyhow::Error::msg)?;
            store.remove(&reference)?;
        }
        let out_s = out.display().to_string();
        mmx(&[
            "train",
            method,
            &recipe.display().to_string(),
            "-o",
            &out_s,
            "--resume",
            "--quiet",
            "--publish",
            tag,
            "--registry",
            &reg,
        ])?;
        state.record(stage, &k)?;
        progress.report(stage, true, since);
        Ok(k)
    };

    // The cases: cheap and deterministic, written again every time.
    let since = Instant::now();
    let data = output.join("data");
    let d = &p.data;
    let data_text = format!(
        "{:?}",
        (d.seed, d.train, d.validation, d.test, d.answer_only)
    );
    let data_key = key(&data_text, &[]);
    mmx(&[
        "data",
        "generate",
        "-o",
        &data.display().to_string(),
        "--seed",
        &d.seed.to_string(),
        "--train",
        &d.train.to_string(),
        "--validation",
        &d.validation.to_string(),
        "--test",
        &d.test.to_string(),
        "--guidelines",
        "--answer-only",
        &d.answer_only.to_string(),
        "--force",
    ])?;
    progress.report("data", true, since);

    let base_key = train(
        &mut state,
        &mut progress,
        "base",
        "base",
        &dir.join(&p.base.recipe),
        &p.base.publish,
        &[&data_key],
    )?;
    let of = |template: &str, s: &str| template.replace("{specialty}", s);
    let (mut dsa_keys, mut gba_keys) = (Vec::new(), Vec::new());
    for s in &p.specialties {
        let dsa = train(
            &mut state,
            &mut progress,
            &format!("dsa-{s}"),
            "dsa",
            &dir.join(of(&p.dsa.recipe, s)),
            &of(&p.dsa.publish, s),
            &[&base_key],
        )?;
        let gba = train(
            &mut state,
            &mut progress,
            &format!("gba-{s}"),
            "gba",
            &dir.join(of(&p.gba.recipe, s)),
            &of(&p.gba.publish, s),
            &[&dsa],
        )?;
        dsa_keys.push(dsa);
        gba_keys.push(gba);
    }

    // Conflicts and merges of each set of experts, each merge method's setting chosen on
    // validation by the sweep.
    let mut merged: Vec<(String, TrialResult)> = Vec::new();
    for m in &p.merges {
        let sweep = dir.join(&m.sweep);
        let sweep_text = read(&sweep)?;
        let template = mmx::sweep::file::Sweep::load(&sweep)?;
        let experts: Vec<&str> = match m.experts.as_str() {
            "dsa" => dsa_keys.iter().map(String::as_str).collect(),
            "gba" => gba_keys.iter().map(String::as_str).collect(),
            other => bail!(
                "`{}`: merge `{}` has `experts = \"{other}\"`; expected dsa or gba",
                args.pipeline.display(),
                m.name
            ),
        };
        // The template's text too: it names the experts and the merge's base settings.
        let template_text = match &template.template {
            mmx::sweep::file::Template::Recipe(path) => read(path)?,
            _ => String::new(),
        };
        let k = key(&format!("{sweep_text}\n{template_text}"), &experts);
        let out = output.join(format!("merge-{}", m.name));
        let since = Instant::now();
        let conflicts = output.join(format!("conflicts-{}.json", m.name));
        let template_path = match &template.template {
            mmx::sweep::file::Template::Recipe(path) => path.clone(),
            _ => bail!(
                "`{}`: a pipeline sweep's template is a merge recipe",
                sweep.display()
            ),
        };
        let stage = format!("conflicts-{}", m.name);
        if args.force || state.keys.get(&stage) != Some(&k) || !conflicts.exists() {
            mmx(&[
                "conflicts",
                &template_path.display().to_string(),
                "--json",
                &conflicts.display().to_string(),
                "--plot",
                &output
                    .join(format!("conflicts-{}.png", m.name))
                    .display()
                    .to_string(),
            ])?;
            state.record(&stage, &k)?;
            progress.report(&stage, true, since);
        } else {
            progress.report(&stage, false, since);
        }
        let since = Instant::now();
        let stage = format!("merge-{}", m.name);
        let results = out.join("results.json");
        let swept = args.force || state.keys.get(&stage) != Some(&k) || !results.exists();
        if swept {
            let _ = std::fs::remove_dir_all(&out);
            mmx(&[
                "sweep",
                &sweep.display().to_string(),
                "-o",
                &out.display().to_string(),
            ])?;
            state.record(&stage, &k)?;
            progress.report(&stage, true, since);
        } else {
            progress.report(&stage, false, since);
        }
        let document: serde_json::Value = serde_json::from_slice(&std::fs::read(&results)?)
            .with_context(|| format!("reading `{}`", results.display()))?;
        let trials: Vec<TrialResult> = serde_json::from_value(document["trials"].clone())
            .with_context(|| format!("the trials of `{}`", results.display()))?;
        if let Some(tag) = &m.publish {
            let best = trials
                .iter()
                .filter(|t| t.error.is_none())
                .max_by(|a, b| {
                    a.validation
                        .unwrap_or(f64::NAN)
                        .total_cmp(&b.validation.unwrap_or(f64::NAN))
                })
                .with_context(|| format!("`{}` has no successful trial", results.display()))?;
            let dir = out.join("outputs").join(&best.id);
            if !dir.is_dir() {
                bail!(
                    "`{}`: publishing the best merge needs `keep_outputs = true`",
                    sweep.display()
                );
            }
            let reference = mmx::registry::Reference::parse(tag).map_err(anyhow::Error::msg)?;
            let recorded = store.resolve(tag).ok();
            let recipe = mmx::recipe::MergeRecord::read(&dir)?.recipe.text;
            // A sweep that ran again (forced, or its results gone) made merges the published
            // one may not be: its best replaces it.
            let stale = swept || state.keys.get(&format!("publish-{}", m.name)) != Some(&k);
            if recorded.is_some() && stale {
                store.remove(&reference)?;
            }
            if store.resolve(tag).is_err() {
                super::registry::publish_merge(Some(&registry), &dir, &reference, &recipe)?;
                state.record(&format!("publish-{}", m.name), &k)?;
            }
        }
        for best in best_by_method(&trials) {
            merged.push((m.name.clone(), best.clone()));
        }
    }

    // The table: test accuracy per specialty of the base, every expert and every merge.
    let since = Instant::now();
    let tests: Vec<PathBuf> = p
        .specialties
        .iter()
        .map(|s| data.join(s).join("test.jsonl"))
        .collect();
    let base_ref = format!("registry:{}", p.base.publish);
    let mut rows: Vec<(String, BTreeMap<String, f64>)> = Vec::new();
    rows.push((
        "base".into(),
        super::eval::accuracy(&base_ref, None, &tests, &registry)?,
    ));
    for (label, template) in [("DSA", &p.dsa.publish), ("GBA", &p.gba.publish)] {
        for s in &p.specialties {
            let adapter = format!("registry:{}", of(template, s));
            let acc = super::eval::accuracy(&base_ref, Some(&adapter), &tests, &registry)?;
            rows.push((format!("{s} {label} expert"), acc));
        }
    }
    for (name, best) in &merged {
        let Some((_, test)) = &best.by_task else {
            continue;
        };
        let acc = p
            .specialties
            .iter()
            .cloned()
            .zip(test.iter().copied())
            .collect();
        rows.push((
            format!(
                "{} merge of the {name} experts ({})",
                best.method,
                mmx::sweep::describe(best)
            ),
            acc,
        ));
    }
    let mut table = String::from("| model |");
    for s in &p.specialties {
        table.push_str(&format!(" {s} |"));
    }
    table.push_str(" mean |\n| --- |");
    table.push_str(&" ---: |".repeat(p.specialties.len() + 1));
    table.push('\n');
    for (label, acc) in &rows {
        let cells: Vec<f64> = p
            .specialties
            .iter()
            .map(|s| acc.get(s).copied().unwrap_or(f64::NAN))
            .collect();
        table.push_str(&format!("| {label} |"));
        for c in &cells {
            table.push_str(&format!(" {:.1}% |", 100.0 * c));
        }
        table.push_str(&format!(
            " {:.1}% |\n",
            100.0 * cells.iter().sum::<f64>() / cells.len() as f64
        ));
    }
    mmx::tensor::write_atomic(&output.join("table.md"), table.as_bytes())?;
    heatmap(
        &output.join("table.png"),
        &Heatmap {
            title: "test accuracy".into(),
            rows: rows.iter().map(|(l, _)| l.clone()).collect(),
            columns: p.specialties.clone(),
            values: rows
                .iter()
                .map(|(_, acc)| p.specialties.iter().map(|s| acc.get(s).copied()).collect())
                .collect(),
            range: (0.0, 1.0),
            colors: ColorMap::Sequential,
        },
    )?;
    progress.report("table", true, since);
    say!(Printer::text(), "{table}");
    say!(
        Printer::text(),
        "pipeline finished in {:.0} s: {} (table.md, table.png)",
        started.elapsed().as_secs_f64(),
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}
