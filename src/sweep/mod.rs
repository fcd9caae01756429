//! Running a sweep ([`run_sweep`]): each trial of a [`Sweep`] is a merge plus its metrics (sign
//! conflict, retained energy, and the planted-conflict scores when the sweep is planted).
//!
//! Results go to `OUT/trials-I-of-N.jsonl`, one line per finished trial, appended and synced
//! as each trial ends, so that a killed sweep loses at most the trial in flight and `--resume`
//! skips every trial already recorded (by id, in any shard's file). After the run,
//! `results.json` and `results.csv` gather every shard's trials found in `OUT`, and
//! `scores.svg` plots score against each swept parameter, per method (summary.rs); [`gather`]
//! does that alone and names the trials no shard recorded. Shards run anywhere that sees `OUT`:
//! by hand, or as a Slurm array job (slurm.rs). With `publish`, each trial's output is
//! published to the shared registry as `NAME:<trial id>` before the trial is recorded.

pub mod file;
pub mod planted;
mod slurm;
mod summary;

pub use slurm::{submit, write_scripts, SlurmOptions, Submission};
pub use summary::results_csv;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::merge::{merge, MergePlan, OutputOptions};
use candle_core::{DType, Device};

use crate::recipe::{native, Recipe};
use crate::registry::{Reference, Registry};
use crate::sweep::file::EvalSpec;
use crate::sweep::file::{accepted_parameters, Sweep, Template, Trial};
use crate::sweep::planted::{Planted, Split, SPEC_FILE};
use crate::tensor::write_atomic;
use crate::train::eval::{evaluate, Shown};
use crate::train::images::Images;
use crate::train::read_cases;
use crate::train::source::Materialized;
use crate::train::tokenizer::Tokenizer;

/// Which part of the trials this run takes: trial `i` belongs to shard `i mod count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard, from 0.
    pub index: usize,
    /// Shards in all.
    pub count: usize,
}

/// A shard that is not `I/N` with 0 ≤ I < N.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}`: expected I/N with 0 ≤ I < N, e.g. 0/4 for the first of four shards")]
pub struct ShardError(pub String);

impl Shard {
    /// Every trial.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Parses `I/N` (0 ≤ I < N).
    pub fn parse(text: &str) -> std::result::Result<Shard, ShardError> {
        let parsed = text
            .split_once('/')
            .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Shard { index, count }),
            _ => Err(ShardError(text.to_string())),
        }
    }

    fn file_name(self) -> String {
        format!("trials-{}-of-{}.jsonl", self.index, self.count)
    }
}

/// How to run a sweep.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// The part of the trials to run.
    pub shard: Shard,
    /// Skip trials already recorded in the output directory (without it, recorded trials of
    /// this shard are an error rather than being silently mixed with new ones).
    pub resume: bool,
    /// Memory budget of each merge.
    pub max_memory: u64,
    /// Where the merges compute.
    pub backend: Backend,
}

/// One finished trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialResult {
    /// The trial's id (see [`Trial::id`]).
    pub id: String,
    /// Its position in the sweep.
    pub index: usize,
    /// The method.
    pub method: String,
    /// Output, space and rank overrides, and the swept parameters.
    pub settings: Value,
    /// Mean share of coordinates in sign conflict (methods that elect signs).
    pub sign_conflict: Option<f64>,
    /// Core-space merges: each expert's share of its update that the merge keeps.
    pub retained_energy: BTreeMap<String, f64>,
    /// Planted sweeps: mean normalised performance over the tasks, validation inputs.
    pub validation: Option<f64>,
    /// Planted sweeps: the same on test inputs.
    pub test: Option<f64>,
    /// Per task, validation then test: a planted sweep's tasks, or an accuracy sweep's
    /// specialties in the order they first appear in its case files.
    pub by_task: Option<(Vec<f64>, Vec<f64>)>,
    /// Seconds the merge and its evaluation took.
    pub seconds: f64,
    /// Sweeps with `publish`: the manifest the trial's output was published as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<String>,
    /// Why the trial failed, if it did.
    pub error: Option<String>,
}

impl TrialResult {
    /// The mean retained energy over the experts, for core-space merges.
    pub fn retained_mean(&self) -> Option<f64> {
        (!self.retained_energy.is_empty())
            .then(|| self.retained_energy.values().sum::<f64>() / self.retained_energy.len() as f64)
    }

    /// A swept parameter's value as a number, if it is one.
    pub fn parameter(&self, name: &str) -> Option<f64> {
        self.settings["parameters"][name].as_f64()
    }
}

/// What a sweep run did.
#[derive(Debug, Clone)]
pub struct SweepReport {
    /// Trials this run merged.
    pub ran: usize,
    /// Trials of this shard skipped because `--resume` found them recorded.
    pub skipped: usize,
    /// Trials of this run that failed (recorded with their error).
    pub failed: usize,
    /// Every trial recorded in the output directory, by index.
    pub results: Vec<TrialResult>,
    /// The files written or rewritten.
    pub files: Vec<PathBuf>,
}

fn fail(path: &Path, message: String) -> Error {
    Error::Output {
        path: path.to_path_buf(),
        message,
    }
}

/// The template recipe and the text that keys trial ids; a planted problem is generated into
/// `OUT/planted` first (or checked, if it is already there).
fn prepare_template(sweep: &Sweep, out: &Path) -> Result<(Recipe, String, Option<Planted>)> {
    match &sweep.template {
        Template::Recipe(path) => {
            let recipe = Recipe::load(path)?;
            if recipe.format != crate::recipe::RecipeFormat::Native {
                return Err(Error::Recipe {
                    path: path.clone(),
                    message: "a sweep's template must be an mmx TOML recipe".to_string(),
                });
            }
            let key = recipe.text.clone();
            Ok((recipe, key, None))
        }
        Template::Planted(spec) => {
            let dir = out.join("planted");
            let spec_path = dir.join(SPEC_FILE);
            let problem = if spec_path.exists() {
                let existing = Planted::open(&dir)?;
                if existing.spec() != spec {
                    return Err(fail(
                        &dir,
                        "holds a different planted problem than the sweep's `[sweep.planted]`: use another output directory".to_string(),
                    ));
                }
                existing
            } else {
                let problem = Planted::generate(spec.clone())?;
                problem.write(&dir)?;
                problem
            };
            let mut text = String::from(
                "# The template of a planted-conflict sweep (synthetic tasks, see planted.json).\n[merge]\nmethod = \"task_arithmetic\"\nbase = \"base\"\noutput = \"delta\"\n",
            );
            for t in 0..spec.experts {
                text.push_str(&format!(
                    "\n[[merge.experts]]\nsource = \"experts/task{t}\"\ncalibration = \"calibration/task{t}.safetensors\"\n"
                ));
            }
            let path = dir.join("recipe.toml");
            write_atomic(&path, text.as_bytes())?;
            let key = format!(
                "{}\n{}",
                serde_json::to_string(spec).expect("JSON serialises"),
                text
            );
            Ok((Recipe::load(&path)?, key, Some(problem)))
        }
    }
}

/// The trial's recipe: the template's TOML with the trial's method, settings and parameters
/// (template parameters the method does not take are dropped).
pub fn trial_recipe(template: &Recipe, trial: &Trial, id: &str) -> Result<Recipe> {
    let fail = |message: String| Error::Recipe {
        path: template.path.clone(),
        message,
    };
    let mut doc: toml::Table = toml::from_str(&template.text).map_err(|e| fail(e.to_string()))?;
    let merge = doc
        .get_mut("merge")
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| fail("no `[merge]` table".to_string()))?;
    merge.insert("method".into(), trial.method.clone().into());
    if let Some(output) = &trial.output {
        merge.insert("output".into(), output.clone().into());
        if trial.space.is_none() {
            merge.remove("space");
        }
        if output != "lora" {
            merge.remove("rank");
        }
    }
    if let Some(space) = &trial.space {
        merge.insert("space".into(), space.clone().into());
    }
    if let Some(rank) = &trial.rank {
        let value = match rank {
            Value::Number(n) => toml::Value::Integer(n.as_i64().unwrap_or(0)),
            other => toml::Value::String(other.as_str().unwrap_or_default().to_string()),
        };
        merge.insert("rank".into(), value);
    }
    let accepted = accepted_parameters(&trial.method).unwrap_or_default();
    let mut parameters = match merge.remove("parameters") {
        Some(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    parameters.retain(|name, _| accepted.contains(&name));
    for (name, value) in &trial.parameters {
        let value = match value {
            crate::recipe::Scalar::Number(n) => toml::Value::Float(*n),
            crate::recipe::Scalar::Bool(b) => toml::Value::Boolean(*b),
            crate::recipe::Scalar::Text(t) => toml::Value::String(t.clone()),
        };
        parameters.insert(name.clone(), value);
    }
    merge.insert("parameters".into(), toml::Value::Table(parameters));
    let text = format!(
        "# mmx sweep trial {id} (from {})\n{}",
        template.path.display(),
        toml::to_string(&doc).map_err(|e| fail(e.to_string()))?
    );
    native::parse(&template.path, text)
}

/// The `trials-*.jsonl` files in `out`, sorted.
fn shard_files(out: &Path) -> Result<Vec<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(Vec::new());
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("trials-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads every `trials-*.jsonl` in `out`; lines cut short by a crash are skipped.
fn read_results(out: &Path) -> Result<BTreeMap<String, TrialResult>> {
    let mut results = BTreeMap::new();
    for file in shard_files(out)? {
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        for line in text.lines() {
            if let Ok(result) = serde_json::from_str::<TrialResult>(line) {
                results.entry(result.id.clone()).or_insert(result);
            }
        }
    }
    Ok(results)
}

/// Appends one result line to `path` and syncs it.
fn append(path: &Path, result: &TrialResult) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut line = serde_json::to_string(result).expect("JSON serialises");
    line.push('\n');
    if len > 0 {
        // A line cut short by a crash must not swallow this one.
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if text.last() != Some(&b'\n') {
            line.insert(0, '\n');
        }
    }
    file.write_all(line.as_bytes())
        .and_then(|()| file.sync_data())
        .map_err(|e| Error::io(path, e))
}

/// How a sweep scores its merges.
enum Scoring<'a> {
    /// On the planted-conflict tasks.
    Planted(&'a Planted),
    /// By task accuracy on case files.
    Accuracy(&'a EvalSpec),
    /// Not at all (metrics only).
    None,
}

/// Per-specialty accuracy of the merge in `target` on the validation and test files (the
/// specialties in the order they first appear in the files): a merged model answers itself, a merged adapter on the eval's base.
fn accuracy(template: &Recipe, spec: &EvalSpec, target: &Path) -> Result<(Vec<f64>, Vec<f64>)> {
    let registry = template
        .registry
        .clone()
        .unwrap_or_else(|| crate::registry::registry_path(None));
    let is_adapter = target.join("adapter_config.json").is_file();
    let base = match (&spec.base, is_adapter) {
        (Some(b), true) => Some(Materialized::open(b, &registry)?),
        (None, true) => {
            return Err(fail(
                target,
                "is a LoRA adapter: `[sweep.eval]` needs the `base` it applies to".to_string(),
            ))
        }
        (_, false) => None,
    };
    let model_dir = base.as_ref().map_or(target, |b| b.dir());
    let tokenizer = Tokenizer::load(model_dir)?;
    let (mut images, mut model) = Images::load(model_dir, None, DType::F32, &Device::Cpu)?;
    if is_adapter {
        match images.as_mut() {
            Some(images) => images.load_adapter(&mut model, target)?,
            None => model.load_adapter(target)?,
        }
    }
    let score = |files: &[PathBuf]| -> Result<Vec<f64>> {
        if files.is_empty() {
            return Ok(Vec::new());
        }
        let mut cases = Vec::new();
        for f in files {
            cases.extend(read_cases(f)?);
        }
        let shown = images.as_ref().map(|i| (i, Shown::Image));
        let report = evaluate(
            &model,
            shown,
            &tokenizer,
            &cases,
            spec.batch,
            spec.max_new_tokens,
        )?;
        Ok(in_file_order(
            cases.iter().map(|c| c.specialty()),
            &report.accuracy,
        ))
    };
    Ok((score(&spec.validation)?, score(&spec.test)?))
}

/// The accuracies (keyed by specialty) in the order the specialties first appear among the
/// cases, as the sweep's files list them.
fn in_file_order<'a>(
    specialties: impl Iterator<Item = &'a str>,
    accuracy: &BTreeMap<String, f64>,
) -> Vec<f64> {
    let mut order: Vec<&str> = Vec::new();
    for s in specialties {
        if !order.contains(&s) {
            order.push(s);
        }
    }
    order
        .iter()
        .filter_map(|s| accuracy.get(*s).copied())
        .collect()
}

/// Where a sweep with `publish` puts each trial's output: `NAME:<trial id>` in `registry`.
struct Publish<'a> {
    name: &'a str,
    registry: Registry,
}

/// Runs one trial: merge, metrics, evaluation. Errors of the trial itself are recorded in the
/// result rather than returned.
fn run_trial(
    template: &Recipe,
    trial: &Trial,
    id: &str,
    target: &Path,
    scoring: Scoring<'_>,
    publish: Option<&Publish<'_>>,
    options: &SweepOptions,
) -> TrialResult {
    let start = Instant::now();
    let mut result = TrialResult {
        id: id.to_string(),
        index: trial.index,
        method: trial.method.clone(),
        settings: trial.settings(),
        sign_conflict: None,
        retained_energy: BTreeMap::new(),
        validation: None,
        test: None,
        by_task: None,
        seconds: 0.0,
        published: None,
        error: None,
    };
    let outcome = (|| -> Result<()> {
        let recipe = trial_recipe(template, trial, id)?;
        let recipe_text = recipe.text.clone();
        let merge_options = OutputOptions {
            max_memory: options.max_memory,
            shard_bytes: 5 << 30,
            force: false,
            backend: options.backend,
            threads: None,
        };
        let merged = merge(&MergePlan::build(recipe)?, target, &merge_options, &|_| {})?;
        result.sign_conflict = merged.mean_sign_conflict();
        result.retained_energy = merged.retained_by_expert().iter().cloned().collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let scores = match scoring {
            Scoring::Planted(problem) => {
                let deltas = problem.read_merged(target)?;
                Some((
                    problem.score(&deltas, Split::Validation)?,
                    problem.score(&deltas, Split::Test)?,
                ))
            }
            Scoring::Accuracy(spec) => Some(accuracy(template, spec, target)?),
            Scoring::None => None,
        };
        if let Some((validation, test)) = scores {
            result.validation = Some(mean(&validation));
            result.test = (!test.is_empty()).then(|| mean(&test));
            result.by_task = Some((validation, test));
        }
        if let Some(publish) = publish {
            let reference = Reference {
                name: publish.name.to_string(),
                tag: id.to_string(),
            };
            let options = crate::registry::PublishOptions::merged(target, &recipe_text)?;
            let published = publish.registry.publish(target, &reference, &options)?;
            result.published = Some(published.manifest.to_string());
        }
        Ok(())
    })();
    result.error = outcome.err().map(|e| e.to_string());
    result.seconds = start.elapsed().as_secs_f64();
    result
}

/// The registry a sweep with `publish` publishes to: the sweep's `registry`, else the
/// template recipe's, else `$MMX_REGISTRY`, else `./registry`.
fn publish_target<'a>(sweep: &'a Sweep, template: &Recipe) -> Result<Option<Publish<'a>>> {
    let Some(name) = &sweep.publish else {
        return Ok(None);
    };
    if let Some(problem) = crate::registry::name::component_problem(name) {
        return Err(Error::Recipe {
            path: sweep.path.clone(),
            message: format!("`sweep.publish` = {name:?} {problem}"),
        });
    }
    let path = sweep
        .registry
        .clone()
        .or_else(|| template.registry.clone())
        .unwrap_or_else(|| crate::registry::registry_path(None));
    Ok(Some(Publish {
        name,
        registry: Registry::create(&path)?,
    }))
}

/// Runs this shard's trials of `sweep` into `out`, then rewrites the gathered results.
/// `progress` sees each trial as it finishes.
pub fn run_sweep(
    sweep: &Sweep,
    out: &Path,
    options: &SweepOptions,
    progress: &mut dyn FnMut(&TrialResult, usize),
) -> Result<SweepReport> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let own = out.join(options.shard.file_name());
    let recorded = read_results(out)?;
    if !options.resume && own.exists() {
        return Err(fail(
            &own,
            "already holds results of this sweep shard: pass `--resume` to skip the trials it records, or use another output directory".to_string(),
        ));
    }
    let (template, key, problem) = prepare_template(sweep, out)?;
    let publish = publish_target(sweep, &template)?;
    let trials: Vec<Trial> = sweep
        .trials()
        .into_iter()
        .filter(|t| t.index % options.shard.count == options.shard.index)
        .collect();
    let outputs = out.join("outputs");
    let (mut ran, mut skipped, mut failed) = (0, 0, 0);
    for trial in &trials {
        let id = trial.id(&key);
        if recorded.contains_key(&id) {
            skipped += 1;
            continue;
        }
        let target = outputs.join(&id);
        if target.exists() {
            // Left by a run killed between its merge and its record: the trial runs again.
            std::fs::remove_dir_all(&target).map_err(|e| Error::io(&target, e))?;
        }
        let scoring = match (&problem, &sweep.eval) {
            (Some(p), _) => Scoring::Planted(p),
            (None, Some(spec)) => Scoring::Accuracy(spec),
            (None, None) => Scoring::None,
        };
        let result = run_trial(
            &template,
            trial,
            &id,
            &target,
            scoring,
            publish.as_ref(),
            options,
        );
        if !sweep.keep_outputs && target.exists() {
            std::fs::remove_dir_all(&target).map_err(|e| Error::io(&target, e))?;
        }
        append(&own, &result)?;
        ran += 1;
        failed += usize::from(result.error.is_some());
        progress(&result, trials.len());
    }
    if !sweep.keep_outputs && options.shard.count == 1 {
        // Only empty: the folder may hold outputs a `keep_outputs` run kept. Shards leave it,
        // as another shard running beside them may be writing into it.
        let _ = std::fs::remove_dir(&outputs);
    }
    let results = sorted(read_results(out)?);
    let files = summary::write_summaries(sweep, out, &results)?;
    Ok(SweepReport {
        ran,
        skipped,
        failed,
        results,
        files,
    })
}

fn sorted(recorded: BTreeMap<String, TrialResult>) -> Vec<TrialResult> {
    let mut results: Vec<TrialResult> = recorded.into_values().collect();
    results.sort_by_key(|r| r.index);
    results
}

/// A trial of the sweep that no shard has recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// Its position in the sweep.
    pub index: usize,
    /// Its id.
    pub id: String,
}

/// What [`gather`] found in the output directory.
#[derive(Debug, Clone)]
pub struct Gathered {
    /// Every trial recorded, by index.
    pub results: Vec<TrialResult>,
    /// Trials of the sweep recorded by no shard (a task that was killed or never ran).
    pub missing: Vec<Missing>,
    /// The files written.
    pub files: Vec<PathBuf>,
}

impl Gathered {
    /// Recorded trials that failed.
    pub fn failed(&self) -> usize {
        self.results.iter().filter(|r| r.error.is_some()).count()
    }
}

/// The shards of `count` that hold one of the `missing` trials, in order.
fn pending_shards(missing: &[Missing], count: usize) -> Vec<usize> {
    let mut shards: Vec<usize> = missing.iter().map(|m| m.index % count).collect();
    shards.sort_unstable();
    shards.dedup();
    shards
}

/// The sweep's trials with their ids, and which of them no shard has recorded in `out`.
fn missing_trials(sweep: &Sweep, out: &Path) -> Result<(Recipe, Vec<TrialResult>, Vec<Missing>)> {
    let (template, key, _) = prepare_template(sweep, out)?;
    let recorded = read_results(out)?;
    let missing = sweep
        .trials()
        .iter()
        .map(|t| Missing {
            index: t.index,
            id: t.id(&key),
        })
        .filter(|m| !recorded.contains_key(&m.id))
        .collect();
    Ok((template, sorted(recorded), missing))
}

/// Gathers what every shard recorded in `out` into the summaries (as the end of a run does)
/// and names the trials still missing: the gather step of a sweep run as separate shards.
pub fn gather(sweep: &Sweep, out: &Path) -> Result<Gathered> {
    if !out.is_dir() {
        return Err(fail(
            out,
            "does not exist: no shard of this sweep has run here".to_string(),
        ));
    }
    let (_, results, missing) = missing_trials(sweep, out)?;
    let files = summary::write_summaries(sweep, out, &results)?;
    Ok(Gathered {
        results,
        missing,
        files,
    })
}

/// Best trial of each method by validation score (trials without a score are left out).
pub fn best_by_method(results: &[TrialResult]) -> Vec<&TrialResult> {
    let mut best: BTreeMap<&str, &TrialResult> = BTreeMap::new();
    for r in results.iter().filter(|r| r.validation.is_some()) {
        let entry = best.entry(&r.method).or_insert(r);
        if r.validation > entry.validation {
            *entry = r;
        }
    }
    best.into_values().collect()
}

/// The swept parameters of a result as `name=value` pairs.
pub fn describe(result: &TrialResult) -> String {
    let mut parts: Vec<String> = Vec::new();
    for key in ["output", "space", "rank"] {
        if !result.settings[key].is_null() {
            parts.push(format!(
                "{key}={}",
                summary::json_text(&result.settings[key])
            ));
        }
    }
    if let Some(p) = result.settings["parameters"].as_object() {
        parts.extend(
            p.iter()
                .map(|(k, v)| format!("{k}={}", summary::json_text(v))),
        );
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracies_follow_the_files_not_the_alphabet() {
        let accuracy: BTreeMap<String, f64> = [
            ("cardiology".to_string(), 0.75),
            ("radiology".to_string(), 0.25),
        ]
        .into();
        let cases = ["radiology", "radiology", "cardiology", "radiology"];
        assert_eq!(in_file_order(cases.into_iter(), &accuracy), [0.25, 0.75]);
    }

    #[test]
    fn parses_shards() {
        assert_eq!(Shard::parse("1/4"), Ok(Shard { index: 1, count: 4 }));
        assert!(Shard::parse("4/4")
            .unwrap_err()
            .to_string()
            .contains("0 ≤ I < N"));
        assert!(Shard::parse("x").is_err());
        assert!(Shard::parse("0/0").is_err());
    }
}
