//! Merge recipes: mmx's native TOML ([`native`]) and mergekit YAML configs ([`mergekit`]),
//! both read into one [`Recipe`].
//!
//! ```no_run
//! let recipe = mmx::recipe::Recipe::load("recipes/quickstart.toml".as_ref()).unwrap();
//! println!("{} experts merged with {}", recipe.experts.len(), recipe.method);
//! ```

pub mod mergekit;
pub mod native;
mod output_dir;
mod param;
pub mod record;
pub mod reference;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use output_dir::{check_target, write_output_dir};
pub use param::{layer_index, layer_position, ParamValue, Scalar, ValueError};
pub use record::{MergeRecord, MERGE_RECORD};

use crate::error::{Error, Result};
use crate::tensor::Dtype;

/// Where a model, adapter or expert comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local directory: a Hugging Face model or a PEFT adapter (told apart by their files).
    Dir(PathBuf),
    /// mergekit's `model+lora`: a model with a PEFT adapter applied in memory.
    WithLora {
        /// The model directory.
        model: PathBuf,
        /// The adapter directory.
        lora: PathBuf,
    },
    /// A published manifest: `NAME:TAG` or `blake3:<hex>`, read straight from the registry.
    Registry(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Dir(p) => write!(f, "{}", p.display()),
            Source::WithLora { model, lora } => {
                write!(f, "{}+{}", model.display(), lora.display())
            }
            Source::Registry(reference) if reference.starts_with("blake3:") => {
                write!(f, "{reference}")
            }
            Source::Registry(reference) => write!(f, "registry:{reference}"),
        }
    }
}

/// What a merge writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// A complete Hugging Face model directory.
    Full,
    /// Only the merged update (merged − base) of the tensors the experts change.
    Delta,
    /// A LoRA adapter (needs core-space merging).
    Lora,
}

/// Which file format a recipe came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipeFormat {
    /// mmx's TOML.
    Native,
    /// A mergekit YAML config.
    Mergekit,
}

/// Parameters by name, as written (not yet resolved per tensor).
pub type Parameters = BTreeMap<String, ParamValue>;

/// One expert to merge.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertSpec {
    /// Where it comes from.
    pub source: Source,
    /// Its own parameters (override the recipe-wide ones).
    pub parameters: Parameters,
    /// Its calibration statistics (for the data-aware methods), if the recipe names them.
    pub calibration: Option<CalibrationSpec>,
}

/// Where an expert's calibration statistics come from.
#[derive(Debug, Clone, PartialEq)]
pub enum CalibrationSpec {
    /// A statistics file (`calibration = "stats.safetensors"`).
    File(PathBuf),
    /// Cases to measure them on first, at most `n` of them (`calibration = { data = "cases.jsonl",
    /// n = 256 }`): `mmx merge` runs the calibration before it plans the merge.
    Cases {
        /// Case files (JSON Lines).
        data: Vec<PathBuf>,
        /// Use the first `n` cases only.
        n: Option<usize>,
    },
}

/// A merge recipe, format-independent.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// The recipe file.
    pub path: PathBuf,
    /// Its format.
    pub format: RecipeFormat,
    /// Its text, recorded in `mmx-merge.json`.
    pub text: String,
    /// The method name (validated against the methods when planned).
    pub method: String,
    /// The base model.
    pub base: Option<Source>,
    /// The experts, in recipe order.
    pub experts: Vec<ExpertSpec>,
    /// Recipe-wide parameters.
    pub parameters: Parameters,
    /// What to write.
    pub output: OutputKind,
    /// Output dtype; `None` keeps each tensor's base dtype.
    pub dtype: Option<Dtype>,
    /// Seed of the random methods.
    pub seed: u64,
    /// Where LoRA experts are merged: in each module's core space, or on the full weights.
    pub space: Space,
    /// Rank of a LoRA output (`rank = 16` or `rank = "energy:0.99"`); `None` keeps the methods'
    /// own default.
    pub rank: Option<RankTarget>,
    /// The registry that `registry:` and `blake3:` sources come from (`registry = "..."`,
    /// relative to the recipe); `None`: `$MMX_REGISTRY`, else `./registry`.
    pub registry: Option<PathBuf>,
}

/// Where a merge of LoRA experts happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// On the full weights (or full updates), as mergekit does.
    Full,
    /// In each module's core space: with `U_B` an orthonormal basis of the experts' stacked `B`s
    /// and `V_A` of their stacked `A`s, expert t's update is `U_B·M_t·V_Aᵀ` with a small `M_t`;
    /// the method runs on the `M_t`.
    Core,
}

/// How many singular directions a LoRA output keeps per module.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankTarget {
    /// Exactly this rank (or less where the update has less).
    Fixed(usize),
    /// The smallest rank whose singular values hold this fraction of the squared norm.
    Energy(f64),
}

impl Recipe {
    /// Reads a recipe, choosing the format by extension: `.toml` native, `.yml`/`.yaml` mergekit.
    pub fn load(path: &Path) -> Result<Recipe> {
        let format = RecipeFormat::of_path(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Recipe::parse(path, format, text)
    }

    /// Reads a recipe's `text` in `format` as if from `path` (relative paths in it are relative
    /// to the path's directory).
    pub fn parse(path: &Path, format: RecipeFormat, text: String) -> Result<Recipe> {
        match format {
            RecipeFormat::Native => native::parse(path, text),
            RecipeFormat::Mergekit => mergekit::parse(path, text),
        }
    }
}

impl RecipeFormat {
    /// The format a recipe file's extension names: `.toml` native, `.yml`/`.yaml` mergekit.
    pub fn of_path(path: &Path) -> Result<RecipeFormat> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => Ok(RecipeFormat::Native),
            Some("yml" | "yaml") => Ok(RecipeFormat::Mergekit),
            _ => Err(Error::Recipe {
                path: path.to_path_buf(),
                message: "unknown recipe format: use `.toml` (mmx) or `.yml`/`.yaml` (mergekit)"
                    .to_string(),
            }),
        }
    }
}

/// Reads a parameter table from JSON, naming the key path of a bad value.
fn parameters(path: &Path, at: &str, value: Option<&serde_json::Value>) -> Result<Parameters> {
    let mut out = Parameters::new();
    match value {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(map)) => {
            for (k, v) in map {
                let parsed = ParamValue::from_json(v).map_err(|message| Error::Recipe {
                    path: path.to_path_buf(),
                    message: format!("`{at}.{k}`: {message}"),
                })?;
                out.insert(k.clone(), parsed);
            }
        }
        Some(other) => {
            return Err(Error::Recipe {
                path: path.to_path_buf(),
                message: format!("`{at}` must be a table of parameters, found {other}"),
            })
        }
    }
    Ok(out)
}

/// Where a recipe's `registry` is: a remote URL (`s3://bucket/prefix`) as written, a
/// directory relative to the recipe.
pub(crate) fn registry_location(root: &Path, text: &str) -> PathBuf {
    if text.contains("://") {
        PathBuf::from(text)
    } else {
        lexically_normal(&root.join(text))
    }
}

/// Removes `.` and `name/..` pairs from a path without touching the file system, so that
/// recipes name their inputs as people would (`examples/x`, not `recipes/../examples/x`).
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Turns a source string into a [`Source`]: `model+lora`, refusing registry and hub references
/// this build cannot resolve. Relative paths are joined to `root`.
fn source(path: &Path, at: &str, text: &str, root: &Path) -> Result<Source> {
    let fail = |message: String| Error::Recipe {
        path: path.to_path_buf(),
        message: format!("`{at}`: {message}"),
    };
    if let Some(reference) = text.strip_prefix("registry:") {
        if reference.split_once(':').is_none() {
            return Err(fail(format!(
                "`{text}`: a registry source is `registry:NAME:TAG`"
            )));
        }
        reference::Reference::parse(reference).map_err(|e| fail(e.to_string()))?;
        return Ok(Source::Registry(reference.to_string()));
    }
    if text.starts_with("blake3:") {
        return Ok(Source::Registry(text.to_string()));
    }
    let local = |p: &str| -> Result<PathBuf> {
        let (p, revision) = match p.split_once('@') {
            Some((p, rev)) => (p, Some(rev)),
            None => (p, None),
        };
        if let Some(rev) = revision {
            return Err(fail(format!(
                "`{p}@{rev}` names a hub revision; mmx reads local directories only and never downloads"
            )));
        }
        let joined = lexically_normal(&root.join(p));
        if !joined.is_dir() {
            return Err(fail(format!(
                "`{}` is not a directory (mmx reads local directories only and never downloads from a hub)",
                joined.display()
            )));
        }
        Ok(joined)
    };
    let parts: Vec<&str> = text.split('+').collect();
    match parts.as_slice() {
        [model] => Ok(Source::Dir(local(model)?)),
        [model, lora] => Ok(Source::WithLora {
            model: local(model)?,
            lora: local(lora)?,
        }),
        _ => Err(fail(format!(
            "`{text}` has more than one `+`; the syntax is `model+lora`"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_paths_lexically() {
        assert_eq!(
            lexically_normal(Path::new("recipes/../examples/a")),
            PathBuf::from("examples/a")
        );
        assert_eq!(lexically_normal(Path::new("./a/./b")), PathBuf::from("a/b"));
        assert_eq!(lexically_normal(Path::new("../a")), PathBuf::from("../a"));
        assert_eq!(lexically_normal(Path::new("/x/../y")), PathBuf::from("/y"));
        assert_eq!(lexically_normal(Path::new("a/..")), PathBuf::from("."));
    }
}
