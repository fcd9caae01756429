//! The training recipe (`mmx train dsa|base RECIPE`): what to train, on which cases, and how.
//!
//! ```toml
//! [train]
//! method = "dsa"                      # LoRA on a base; "base": the base's own weights
//! base = "registry:tiny-med-base:v1"  # a model directory (relative to the recipe) or a registry
//!                                     # ref; a `base` recipe may start from `[train.init]` instead
//! registry = "../registry"            # where registry refs come from (relative to the recipe)
//! specialty = "cardiology"            # recorded in the adapter's registry entry
//! seed = 1                            # LoRA init, data order, dropout
//! epochs = 3
//! batch_size = 16
//! grad_accum = 1
//! checkpoint_every = 100              # optimizer steps; 0: only at the end
//!
//! [train.data]
//! synthetic = { seed = 0, train = 1000, validation = 100, test = 100 }   # or files = ["..."]
//!                                     # (add `shuffle_options = true` to shuffle the options)
//! specialties = ["cardiology"]        # keep these specialties' cases
//! completion = "full"                 # "format": findings only and a seeded random answer
//! replay = 0.5                        # other specialties' cases per own case, as "format"
//!
//! [train.lora]
//! r = 8
//! alpha = 16
//! dropout = 0.0
//! target_modules = ["q_proj", "v_proj"]
//! use_rslora = false
//! modules_to_save = ["multi_modal_projector"]   # a LLaVA base: train its projector in full
//!
//! [train.vision]                     # a `base` recipe only: `base` (a text model) becomes a
//! image_size = 32                     # LLaVA model with this tower, drawn from `seed`, and
//! patch_size = 8                      # the run trains its projector (LLaVA's first stage)
//! hidden_size = 32
//! num_hidden_layers = 2
//! num_attention_heads = 4
//! intermediate_size = 64
//!
//! [train.optim]
//! lr = 2e-3
//! betas = [0.9, 0.999]
//! eps = 1e-8
//! weight_decay = 0.0
//! max_grad_norm = 1.0
//! warmup_steps = 10
//! decay = "cosine"                    # or "constant"
//! min_lr_ratio = 0.1
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::init::InitSpec;
use super::model::PROJECTOR_MODULE as PROJECTOR;
use super::schedule::Decay;
use super::vlm_init::VisionInit;
use super::{read_case_files, synth, Case};
use crate::error::{Error, Result};

/// A checked training recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainRecipe {
    /// The recipe file.
    pub path: PathBuf,
    /// Its text.
    pub text: String,
    /// What is trained.
    pub method: TrainMethod,
    /// The base model: a directory (resolved against the recipe) or `registry:NAME:TAG`;
    /// `None` for a `base` recipe that starts from [`TrainRecipe::init`].
    pub base: Option<String>,
    /// A `base` recipe's new model, drawn from `seed` ([`crate::train::init`]).
    pub init: Option<InitSpec>,
    /// A `base` recipe's vision tower, drawn from `seed`: the base (a text model) becomes a
    /// LLaVA model ([`crate::train::vlm_init`]) whose projector the run trains (LLaVA's
    /// first stage: the tower and the language model frozen).
    pub vision: Option<VisionInit>,
    /// The registry for registry refs and `--publish`, resolved against the recipe.
    pub registry: Option<PathBuf>,
    /// The specialty the adapter learns.
    pub specialty: Option<String>,
    /// Seeds the LoRA init, the data order and dropout.
    pub seed: u64,
    /// Passes over the training cases.
    pub epochs: usize,
    /// Stop after this many optimizer steps, if fewer than the epochs give.
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Save a checkpoint every this many optimizer steps (0: at the end only).
    pub checkpoint_every: usize,
    /// The cases.
    pub data: DataSpec,
    /// The adapter (method `dsa`).
    pub lora: Option<LoraRecipe>,
    /// The optimizer and schedule.
    pub optim: OptimRecipe,
}

/// What a recipe trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainMethod {
    /// Domain-specific adaptation: a LoRA on a frozen base.
    Dsa,
    /// The base model's own weights.
    Base,
}

/// Where the cases come from.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSpec {
    /// Case files (JSON Lines), resolved against the recipe.
    pub files: Vec<PathBuf>,
    /// Or the synthetic generator's cases.
    pub synthetic: Option<synth::SynthSpec>,
    /// Keep only these specialties (empty: all).
    pub specialties: Vec<String>,
    /// The completion each case trains on.
    pub completion: CompletionKind,
    /// With `specialties`: add this many of the other specialties' cases per own case, in
    /// the `format` form (findings and a drawn option), so that the adapter learns to leave
    /// the base's behaviour on them alone.
    pub replay: f64,
}

/// A training case and the completion it trains on.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingCase {
    /// The case.
    pub case: Case,
    /// Its completion's form.
    pub completion: CompletionKind,
}

/// The completion a case trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompletionKind {
    /// The reasoning and the answer.
    Full,
    /// The findings only, then an answer drawn at random from the seed and the case id: the
    /// language and the format of the cases without their rules.
    Format,
}

/// The adapter a DSA recipe trains.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraRecipe {
    /// Rank.
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// Dropout on the LoRA input.
    pub dropout: f64,
    /// Target modules (`q_proj`, ... or `all-linear`).
    pub target_modules: Vec<String>,
    /// Scale by α/√r.
    pub use_rslora: bool,
    /// Train a LLaVA model's projector in full, saved as PEFT's `modules_to_save`
    /// (`modules_to_save = ["multi_modal_projector"]`).
    pub train_projector: bool,
}

/// Optimizer and schedule settings.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimRecipe {
    /// Peak learning rate.
    pub lr: f64,
    /// Adam's β₁, β₂.
    pub betas: (f64, f64),
    /// Adam's ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: none).
    pub max_grad_norm: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Decay after warmup.
    pub decay: Decay,
    /// Floor of the decay, as a share of `lr`.
    pub min_lr_ratio: f64,
}

impl DataSpec {
    /// The training cases: the files' cases, or the generator's training split, kept to the
    /// listed specialties, then the replayed cases of the others (in their order).
    pub fn training_cases(&self) -> Result<Vec<TrainingCase>> {
        let cases = match &self.synthetic {
            Some(spec) => synth::generate(spec)?.train,
            None => read_case_files(&self.files)?,
        };
        let (own, others): (Vec<Case>, Vec<Case>) = cases.into_iter().partition(|c| {
            self.specialties.is_empty() || self.specialties.iter().any(|s| s == c.specialty())
        });
        let own_count = own.len();
        let replayed = (self.replay * own_count as f64).round() as usize;
        let mut out: Vec<TrainingCase> = own
            .into_iter()
            .map(|case| TrainingCase {
                case,
                completion: self.completion,
            })
            .collect();
        // Taken in turn from each other specialty, so that all of them are replayed.
        let mut by_specialty: BTreeMap<String, std::collections::VecDeque<Case>> = BTreeMap::new();
        for case in others {
            by_specialty
                .entry(case.specialty().to_string())
                .or_default()
                .push_back(case);
        }
        while out.len() < own_count + replayed && by_specialty.values().any(|q| !q.is_empty()) {
            for queue in by_specialty.values_mut() {
                if out.len() == own_count + replayed {
                    break;
                }
                if let Some(case) = queue.pop_front() {
                    out.push(TrainingCase {
                        case,
                        completion: CompletionKind::Format,
                    });
                }
            }
        }
        Ok(out)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    train: WireTrain,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireTrain {
    method: TrainMethod,
    base: Option<String>,
    init: Option<InitSpec>,
    vision: Option<VisionInit>,
    registry: Option<String>,
    specialty: Option<String>,
    #[serde(default)]
    seed: u64,
    #[serde(default = "one")]
    epochs: usize,
    max_steps: Option<usize>,
    #[serde(default = "eight")]
    batch_size: usize,
    #[serde(default = "one")]
    grad_accum: usize,
    #[serde(default)]
    checkpoint_every: usize,
    data: WireData,
    lora: Option<WireLora>,
    #[serde(default)]
    optim: WireOptim,
}

fn one() -> usize {
    1
}

fn eight() -> usize {
    8
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireData {
    #[serde(default)]
    files: Vec<String>,
    synthetic: Option<WireSynthetic>,
    #[serde(default)]
    specialties: Vec<String>,
    #[serde(default = "full")]
    completion: CompletionKind,
    #[serde(default)]
    replay: f64,
}

fn full() -> CompletionKind {
    CompletionKind::Full
}

/// `synthetic = { ... }` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WireSynthetic {
    #[serde(default)]
    seed: u64,
    train: usize,
    #[serde(default)]
    validation: usize,
    #[serde(default)]
    test: usize,
    #[serde(default)]
    shuffle_options: bool,
    #[serde(default)]
    guidelines: bool,
    #[serde(default)]
    answer_only: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireLora {
    r: usize,
    alpha: f64,
    #[serde(default)]
    dropout: f64,
    target_modules: Vec<String>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    modules_to_save: Vec<String>,
}

/// `[train.optim]` (and `[gba.optim]`) as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct WireOptim {
    lr: f64,
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
    max_grad_norm: f64,
    warmup_steps: usize,
    decay: Decay,
    min_lr_ratio: f64,
}

impl WireSynthetic {
    /// The generator's spec.
    pub(crate) fn spec(self) -> synth::SynthSpec {
        synth::SynthSpec {
            seed: self.seed,
            per_specialty: self.train,
            validation: self.validation,
            test: self.test,
            shuffle_options: self.shuffle_options,
            guidelines: self.guidelines,
            answer_only: self.answer_only,
        }
    }
}

/// Optimizer settings out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("`lr` must be positive and each of `betas` in [0, 1)")]
pub struct OptimError;

impl WireOptim {
    /// The checked settings, or what is wrong with them.
    pub(crate) fn check(self) -> std::result::Result<OptimRecipe, OptimError> {
        let valid = self.lr > 0.0
            && self.lr.is_finite()
            && (0.0..1.0).contains(&self.betas[0])
            && (0.0..1.0).contains(&self.betas[1]);
        if !valid {
            return Err(OptimError);
        }
        Ok(OptimRecipe {
            lr: self.lr,
            betas: (self.betas[0], self.betas[1]),
            eps: self.eps,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            warmup_steps: self.warmup_steps,
            decay: self.decay,
            min_lr_ratio: self.min_lr_ratio,
        })
    }
}

impl Default for WireOptim {
    fn default() -> Self {
        WireOptim {
            lr: 2e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            warmup_steps: 0,
            decay: Decay::Cosine,
            min_lr_ratio: 0.0,
        }
    }
}

impl TrainRecipe {
    /// Reads and checks a training recipe.
    pub fn load(path: &Path) -> Result<TrainRecipe> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let fail = |message: String| Error::Recipe {
            path: path.to_path_buf(),
            message,
        };
        let wire: Wire = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
        let t = wire.train;
        let dir = path.parent().unwrap_or(Path::new("."));
        let relative = |p: &str| dir.join(p);
        let base = t.base.as_ref().map(|b| {
            if b.starts_with("registry:") || b.starts_with("blake3:") {
                b.clone()
            } else {
                relative(b).display().to_string()
            }
        });
        match (t.method, &base, &t.init) {
            (TrainMethod::Dsa, None, _) => {
                return Err(fail("method `dsa` needs a `base` model".into()))
            }
            (TrainMethod::Dsa, Some(_), Some(_)) => {
                return Err(fail(
                    "`[train.init]` makes a new model: method `dsa` trains an adapter on `base`"
                        .into(),
                ))
            }
            (TrainMethod::Base, None, None) | (TrainMethod::Base, Some(_), Some(_)) => {
                return Err(fail(
                    "method `base` starts from either `base` or `[train.init]`".into(),
                ))
            }
            _ => {}
        }
        if t.batch_size == 0 || t.grad_accum == 0 || t.epochs == 0 {
            return Err(fail(
                "`batch_size`, `grad_accum` and `epochs` must be positive".into(),
            ));
        }
        let data = DataSpec {
            files: t.data.files.iter().map(|f| relative(f)).collect(),
            synthetic: t.data.synthetic.map(WireSynthetic::spec),
            specialties: t.data.specialties,
            completion: t.data.completion,
            replay: t.data.replay,
        };
        if !(0.0..=16.0).contains(&data.replay) {
            return Err(fail("`[train.data] replay` must be in [0, 16]".into()));
        }
        if data.files.is_empty() == data.synthetic.is_none() {
            return Err(fail(
                "`[train.data]` needs either `files` or `synthetic`, not both".into(),
            ));
        }
        if let Some(other) = t
            .lora
            .iter()
            .flat_map(|l| &l.modules_to_save)
            .find(|m| m.as_str() != PROJECTOR)
        {
            return Err(fail(format!(
                "`[train.lora] modules_to_save` names `{other}`: the trainers train `{PROJECTOR}` (a LLaVA model's projector) in full, nothing else"
            )));
        }
        let lora = t.lora.map(|l| LoraRecipe {
            r: l.r,
            alpha: l.alpha,
            dropout: l.dropout,
            target_modules: l.target_modules,
            use_rslora: l.use_rslora,
            train_projector: !l.modules_to_save.is_empty(),
        });
        match (t.method, &lora) {
            (TrainMethod::Dsa, None) => {
                return Err(fail("method `dsa` needs a `[train.lora]` table".into()))
            }
            _ if t.vision.is_some() && (t.base.is_none() || t.init.is_some()) => return Err(fail(
                "`[train.vision]` needs a `base` (the text model it extends) and no `[train.init]`"
                    .into(),
            )),
            (TrainMethod::Dsa, Some(_)) if t.vision.is_some() => return Err(fail(
                "`[train.vision]` makes a LLaVA base (method `base`); a `dsa` recipe trains on one"
                    .into(),
            )),
            (TrainMethod::Base, Some(_)) => {
                return Err(fail(
                    "method `base` trains the model's own weights: remove `[train.lora]`".into(),
                ))
            }
            _ => {}
        }
        let optim = t
            .optim
            .check()
            .map_err(|m| fail(format!("`[train.optim]`: {m}")))?;
        Ok(TrainRecipe {
            path: path.to_path_buf(),
            text,
            method: t.method,
            base,
            init: t.init,
            vision: t.vision,
            registry: t.registry.map(|r| relative(&r)),
            specialty: t.specialty,
            seed: t.seed,
            epochs: t.epochs,
            max_steps: t.max_steps,
            batch_size: t.batch_size,
            grad_accum: t.grad_accum,
            checkpoint_every: t.checkpoint_every,
            data,
            lora,
            optim,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<TrainRecipe> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, text).unwrap();
        TrainRecipe::load(&path)
    }

    const MINIMAL: &str = "[train]\nmethod = \"dsa\"\nbase = \"base\"\n[train.data]\nsynthetic = { train = 10 }\n[train.lora]\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\"]\n";

    #[test]
    fn a_minimal_recipe_takes_the_defaults() {
        let r = load(MINIMAL).unwrap();
        assert_eq!(r.method, TrainMethod::Dsa);
        assert!(r.base.unwrap().ends_with("base"));
        assert_eq!((r.epochs, r.batch_size, r.grad_accum), (1, 8, 1));
        let synthetic = r.data.synthetic.unwrap();
        assert_eq!(
            (synthetic.per_specialty, synthetic.shuffle_options),
            (10, false)
        );
        assert_eq!(r.optim.lr, 2e-4);
        assert_eq!(r.lora.unwrap().r, 4);
    }

    #[test]
    fn replay_adds_the_other_specialties_in_turn_as_format() {
        let text = MINIMAL.replace(
            "synthetic = { train = 10 }",
            "synthetic = { train = 10 }\nspecialties = [\"cardiology\"]\nreplay = 0.6",
        );
        let cases = load(&text).unwrap().data.training_cases().unwrap();
        assert_eq!(cases.len(), 16);
        assert!(cases[..10]
            .iter()
            .all(|c| c.case.specialty() == "cardiology" && c.completion == CompletionKind::Full));
        let replayed: Vec<&str> = cases[10..].iter().map(|c| c.case.specialty()).collect();
        assert_eq!(
            replayed,
            [
                "dermatology",
                "pathology",
                "radiology",
                "dermatology",
                "pathology",
                "radiology"
            ]
        );
        assert!(cases[10..]
            .iter()
            .all(|c| c.completion == CompletionKind::Format));
    }

    #[test]
    fn bad_recipes_name_what_is_wrong() {
        let no_lora = MINIMAL.split("[train.lora]").next().unwrap();
        assert!(load(no_lora)
            .unwrap_err()
            .to_string()
            .contains("`[train.lora]`"));
        let unknown = MINIMAL
            .replace("seed", "sed")
            .replace("[train]\n", "[train]\nlearning_rate = 1\n");
        assert!(load(&unknown)
            .unwrap_err()
            .to_string()
            .contains("learning_rate"));
        let both = MINIMAL.replace("synthetic", "files = [\"a\"]\nsynthetic");
        assert!(load(&both).unwrap_err().to_string().contains("not both"));
        let zero = MINIMAL.replace("[train.data]", "batch_size = 0\n[train.data]");
        assert!(load(&zero).unwrap_err().to_string().contains("batch_size"));
    }
}
