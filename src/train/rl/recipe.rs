//! The GBA recipe (`mmx train gba RECIPE`): which DSA adapter to refine, on which answer-only
//! cases, under which guidelines, and the GRPO-family settings (TRL's names and defaults where
//! TRL has the setting).
//!
//! ```toml
//! [gba]
//! base = "registry:tiny-med-base:v3"   # the adapter's base (directory or registry ref)
//! adapter = "registry:cardiology:v3"   # the DSA adapter it starts from
//! registry = "../../registry"
//! guidelines = "../guidelines.toml"
//! specialty = "cardiology"
//! seed = 1
//! steps = 40                           # optimizer steps (one generation batch each, × μ)
//! cases_per_step = 8                   # groups per generation batch
//! num_generations = 8                  # K rollouts per case, split across guidelines by prior
//! max_completion_length = 96
//! temperature = 1.0
//! top_p = 1.0
//! num_iterations = 1                   # μ: updates per generation batch
//! epsilon = 0.2                        # ε_low
//! epsilon_high = 0.28                  # default: epsilon
//! beta = 0.0                           # k3 KL to the adapter-disabled model
//! loss_type = "dapo"                   # grpo | bnpo | dr_grpo | dapo
//! scale_rewards = "group"              # group | batch | none
//! estimator = "gba"                    # grpo | dr_grpo | rloo | gba | gba_pooled
//! alpha = 0.5                          # GBA's weight on the guideline stratum
//! mask_truncated_completions = false
//! dynamic_sampling = false             # drop groups whose rewards are all equal, refill
//! max_generation_batches = 3           # dynamic sampling's cap per step
//! micro_batch = 32                     # completions per forward and backward
//! checkpoint_every = 10
//!
//! [gba.rewards]                        # weights of the built-in rewards
//! accuracy = 1.0
//! format = 0.25
//! adherence = 0.5
//!
//! [gba.data]
//! synthetic = { seed = 0, train = 64, answer_only = 512, guidelines = true }  # its answers.jsonl
//! # files = ["cases.jsonl"]           # or any case files (reasoning not needed)
//! specialties = ["cardiology"]
//!
//! [gba.optim]                          # as [train.optim]
//! lr = 1e-4
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::advantage::{Estimator, ScaleRewards};
use super::objective::LossType;
use crate::error::{Error, Result};
use crate::train::recipe::{OptimRecipe, WireOptim, WireSynthetic};
use crate::train::{read_case_files, synth, Case};

/// A checked GBA recipe.
#[derive(Debug, Clone)]
pub struct GbaRecipe {
    /// The recipe file.
    pub path: PathBuf,
    /// Its text.
    pub text: String,
    /// The base model (a directory resolved against the recipe, or a registry ref).
    pub base: String,
    /// The DSA adapter it starts from.
    pub adapter: String,
    /// The registry of registry refs and `--publish`.
    pub registry: Option<PathBuf>,
    /// The guidelines file.
    pub guidelines: PathBuf,
    /// The specialty (recorded in the registry entry).
    pub specialty: Option<String>,
    /// Seeds the case order and the sampling.
    pub seed: u64,
    /// Optimizer steps per iteration of μ (the run makes `steps` generation batches).
    pub steps: usize,
    /// Cases (groups) per generation batch.
    pub cases_per_step: usize,
    /// K.
    pub num_generations: usize,
    /// The most tokens a completion may have.
    pub max_completion_length: usize,
    /// Sampling temperature (also divides the logits of the loss, as in TRL).
    pub temperature: f64,
    /// Nucleus mass.
    pub top_p: f64,
    /// μ.
    pub num_iterations: usize,
    /// ε_low.
    pub epsilon: f64,
    /// ε_high.
    pub epsilon_high: f64,
    /// The KL coefficient.
    pub beta: f64,
    /// The loss aggregation.
    pub loss_type: LossType,
    /// The reward scaling.
    pub scale_rewards: ScaleRewards,
    /// The advantage estimator.
    pub estimator: Estimator,
    /// Zero the loss of completions cut at the length limit.
    pub mask_truncated_completions: bool,
    /// Drop groups whose rewards are all equal and draw more cases.
    pub dynamic_sampling: bool,
    /// Dynamic sampling's most generation batches per step.
    pub max_generation_batches: usize,
    /// Completions per micro-batch.
    pub micro_batch: usize,
    /// Checkpoint every N steps (0: none).
    pub checkpoint_every: usize,
    /// Reward weights by reward name.
    pub rewards: BTreeMap<String, f64>,
    /// Case source.
    pub data: GbaData,
    /// Optimizer.
    pub optim: OptimRecipe,
}

/// Where a GBA run's cases come from.
#[derive(Debug, Clone)]
pub struct GbaData {
    /// Case files (their reasoning, if any, is not trained on).
    pub files: Vec<PathBuf>,
    /// Or the generator's answer-only split.
    pub synthetic: Option<synth::SynthSpec>,
    /// Keep these specialties.
    pub specialties: Vec<String>,
}

impl GbaData {
    /// The training cases, reasoning dropped.
    pub fn cases(&self) -> Result<Vec<Case>> {
        let all = match &self.synthetic {
            Some(spec) => synth::generate(spec)?.answer_only,
            None => read_case_files(&self.files)?,
        };
        Ok(all
            .into_iter()
            .filter(|c| {
                self.specialties.is_empty() || self.specialties.iter().any(|s| s == c.specialty())
            })
            .map(|c| c.answer_only())
            .collect())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    gba: WireGba,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireGba {
    base: String,
    adapter: String,
    registry: Option<String>,
    guidelines: String,
    specialty: Option<String>,
    #[serde(default)]
    seed: u64,
    steps: usize,
    #[serde(default = "default_cases")]
    cases_per_step: usize,
    #[serde(default = "default_k")]
    num_generations: usize,
    #[serde(default = "default_len")]
    max_completion_length: usize,
    #[serde(default = "one_f")]
    temperature: f64,
    #[serde(default = "one_f")]
    top_p: f64,
    #[serde(default = "one")]
    num_iterations: usize,
    #[serde(default = "default_eps")]
    epsilon: f64,
    epsilon_high: Option<f64>,
    #[serde(default)]
    beta: f64,
    #[serde(default = "default_loss")]
    loss_type: LossType,
    #[serde(default = "default_scale")]
    scale_rewards: ScaleRewards,
    #[serde(default = "default_estimator")]
    estimator: String,
    alpha: Option<f64>,
    #[serde(default)]
    mask_truncated_completions: bool,
    #[serde(default)]
    dynamic_sampling: bool,
    #[serde(default = "default_batches")]
    max_generation_batches: usize,
    #[serde(default = "default_micro")]
    micro_batch: usize,
    #[serde(default)]
    checkpoint_every: usize,
    rewards: Option<BTreeMap<String, f64>>,
    data: WireData,
    #[serde(default)]
    optim: WireOptim,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireData {
    #[serde(default)]
    files: Vec<String>,
    synthetic: Option<WireSynthetic>,
    #[serde(default)]
    specialties: Vec<String>,
}

fn default_cases() -> usize {
    8
}
fn default_k() -> usize {
    8
}
fn default_len() -> usize {
    128
}
fn one_f() -> f64 {
    1.0
}
fn one() -> usize {
    1
}
fn default_eps() -> f64 {
    0.2
}
fn default_loss() -> LossType {
    LossType::Dapo
}
fn default_scale() -> ScaleRewards {
    ScaleRewards::Group
}
fn default_estimator() -> String {
    "gba".into()
}
fn default_batches() -> usize {
    3
}
fn default_micro() -> usize {
    32
}

/// The built-in rewards and their default weights.
pub const DEFAULT_REWARDS: [(&str, f64); 3] =
    [("accuracy", 1.0), ("format", 0.25), ("adherence", 0.5)];

impl GbaRecipe {
    /// Reads and checks a GBA recipe.
    pub fn load(path: &Path) -> Result<GbaRecipe> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let fail = |message: String| Error::Recipe {
            path: path.to_path_buf(),
            message,
        };
        let wire: Wire = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
        let g = wire.gba;
        let dir = path.parent().unwrap_or(Path::new("."));
        let source = |s: &str| {
            if s.starts_with("registry:") || s.starts_with("blake3:") {
                s.to_string()
            } else {
                dir.join(s).display().to_string()
            }
        };
        let alpha = g.alpha.unwrap_or(0.5);
        let estimator = match (g.estimator.as_str(), g.alpha) {
            ("gba", _) => Estimator::Gba { alpha },
            ("gba_pooled", _) => Estimator::GbaPooled { alpha },
            ("grpo", None) => Estimator::Grpo,
            ("dr_grpo", None) => Estimator::DrGrpo,
            ("rloo", None) => Estimator::Rloo,
            ("grpo" | "dr_grpo" | "rloo", Some(_)) => {
                return Err(fail(format!(
                    "`alpha` is GBA's; estimator `{}` has none",
                    g.estimator
                )))
            }
            (other, _) => {
                return Err(fail(format!(
                    "`estimator = \"{other}\"`: expected grpo, dr_grpo, rloo, gba or gba_pooled"
                )))
            }
        };
        if !(0.0..=1.0).contains(&alpha) {
            return Err(fail(format!("`alpha` {alpha} is outside [0, 1]")));
        }
        let positive = [
            ("steps", g.steps),
            ("cases_per_step", g.cases_per_step),
            ("num_generations", g.num_generations),
            ("max_completion_length", g.max_completion_length),
            ("num_iterations", g.num_iterations),
            ("micro_batch", g.micro_batch),
            ("max_generation_batches", g.max_generation_batches),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(fail(format!("`{name}` must be positive")));
        }
        if !(g.temperature.is_finite() && g.temperature > 0.0) {
            return Err(fail(format!(
                "`temperature` {} must be above 0",
                g.temperature
            )));
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            return Err(fail(format!("`top_p` {} must be in (0, 1]", g.top_p)));
        }
        let epsilon_high = g.epsilon_high.unwrap_or(g.epsilon);
        if !((0.0..1.0).contains(&g.epsilon) && epsilon_high >= 0.0 && epsilon_high.is_finite()) {
            return Err(fail(
                "`epsilon` must be in [0, 1) and `epsilon_high` at or above 0".into(),
            ));
        }
        if !(g.beta >= 0.0 && g.beta.is_finite()) {
            return Err(fail(format!("`beta` {} must be at or above 0", g.beta)));
        }
        let rewards = g.rewards.unwrap_or_else(|| {
            DEFAULT_REWARDS
                .iter()
                .map(|(n, w)| (n.to_string(), *w))
                .collect()
        });
        if let Some((n, w)) = rewards.iter().find(|(_, w)| !w.is_finite()) {
            return Err(fail(format!("reward weight `{n}` is {w}")));
        }
        let data = GbaData {
            files: g.data.files.iter().map(|f| dir.join(f)).collect(),
            synthetic: g.data.synthetic.map(WireSynthetic::spec),
            specialties: g.data.specialties,
        };
        if data.files.is_empty() == data.synthetic.is_none() {
            return Err(fail(
                "`[gba.data]` needs either `files` or `synthetic`, not both".into(),
            ));
        }
        if data.synthetic.is_some_and(|s| s.answer_only == 0) {
            return Err(fail(
                "`[gba.data] synthetic` trains on its answer-only split: set `answer_only`".into(),
            ));
        }
        let optim = g
            .optim
            .check()
            .map_err(|m| fail(format!("`[gba.optim]`: {m}")))?;
        Ok(GbaRecipe {
            path: path.to_path_buf(),
            base: source(&g.base),
            adapter: source(&g.adapter),
            registry: g.registry.map(|r| dir.join(r)),
            guidelines: dir.join(&g.guidelines),
            specialty: g.specialty,
            seed: g.seed,
            steps: g.steps,
            cases_per_step: g.cases_per_step,
            num_generations: g.num_generations,
            max_completion_length: g.max_completion_length,
            temperature: g.temperature,
            top_p: g.top_p,
            num_iterations: g.num_iterations,
            epsilon: g.epsilon,
            epsilon_high,
            beta: g.beta,
            loss_type: g.loss_type,
            scale_rewards: g.scale_rewards,
            estimator,
            mask_truncated_completions: g.mask_truncated_completions,
            dynamic_sampling: g.dynamic_sampling,
            max_generation_batches: g.max_generation_batches,
            micro_batch: g.micro_batch,
            checkpoint_every: g.checkpoint_every,
            rewards,
            data,
            optim,
            text,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[gba]\nbase = \"b\"\nadapter = \"registry:a:v1\"\nguidelines = \"g.toml\"\nsteps = 3\n[gba.data]\nfiles = [\"c.jsonl\"]\n";

    fn load(text: &str) -> Result<GbaRecipe> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, text).unwrap();
        GbaRecipe::load(&path)
    }

    #[test]
    fn a_minimal_recipe_takes_trl_s_defaults() {
        let r = load(MINIMAL).unwrap();
        assert_eq!(r.adapter, "registry:a:v1");
        assert!(r.base.ends_with("b"));
        assert_eq!((r.num_generations, r.num_iterations), (8, 1));
        assert_eq!((r.epsilon, r.epsilon_high, r.beta), (0.2, 0.2, 0.0));
        assert_eq!(r.loss_type, LossType::Dapo);
        assert_eq!(r.scale_rewards, ScaleRewards::Group);
        assert_eq!(r.estimator, Estimator::Gba { alpha: 0.5 });
        assert_eq!(r.rewards["accuracy"], 1.0);
        assert!(!r.mask_truncated_completions && !r.dynamic_sampling);
    }

    #[test]
    fn bad_settings_are_named() {
        let cases = [
            ("steps = 3", "steps = 0", "`steps`"),
            ("steps = 3", "steps = 3\nestimator = \"ppo\"", "ppo"),
            (
                "steps = 3",
                "steps = 3\nestimator = \"rloo\"\nalpha = 0.3",
                "`alpha`",
            ),
            ("steps = 3", "steps = 3\nalpha = 1.5", "1.5"),
            ("steps = 3", "steps = 3\ntemperature = 0.0", "`temperature`"),
            ("steps = 3", "steps = 3\nloss_type = \"sum\"", "sum"),
            (
                "steps = 3",
                "steps = 3\nnum_generation = 4",
                "num_generation",
            ),
        ];
        for (from, to, named) in cases {
            let err = load(&MINIMAL.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains(named), "`{to}`: {err}");
        }
        let rloo = load(&MINIMAL.replace("steps = 3", "steps = 3\nestimator = \"rloo\"")).unwrap();
        assert_eq!(rloo.estimator, Estimator::Rloo);
    }
}
