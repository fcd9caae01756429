//! `mmx-merge.json`, the record every merge leaves beside its output: the recipe as run (its
//! text, format and seed), the inputs with their digests, and what happened to each tensor or
//! module. [`MergeRecord::recipe`] gives back the recipe that re-makes the merge.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{OutputKind, Recipe, RecipeFormat};
use crate::error::{Error, Result};
use crate::tensor::write_atomic;

/// The record's file name, in every merge output directory.
pub const MERGE_RECORD: &str = "mmx-merge.json";

/// The contents of `mmx-merge.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeRecord {
    /// The tool that wrote it.
    pub tool: ToolRecord,
    /// The recipe as run.
    pub recipe: RecipeRecord,
    /// The method's name as the recipe gives it.
    pub method: String,
    /// What was written.
    pub output: OutputKind,
    /// LoRA output: `"core"` (a standard method on each module's core space) or `"factors"`
    /// (`cat`, `svd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space: Option<String>,
    /// LoRA output: the rank target, a number, `"energy:F"`, or `cat`'s exact sum of ranks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<RankRecord>,
    /// The output dtype (`None`: each tensor's base dtype).
    #[serde(default)]
    pub dtype: Option<String>,
    /// The seed of the random methods, as run (a `--seed` overrides the recipe's text). Records
    /// written before LoRA outputs recorded it have none: the text's seed applies.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Every input, with the digests of the files the merge read.
    pub inputs: Vec<InputRecord>,
    /// The files written, this record last.
    #[serde(default)]
    pub files: Vec<String>,
    /// Full and delta outputs: every tensor, merged or copied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tensors: Vec<TensorEntry>,
    /// LoRA output: every module.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<ModuleEntry>,
    /// LoRA output: the tensors the experts store whole, merged as full tensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<SavedEntry>>,
}

/// Who wrote a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolRecord {
    /// `"mmx"`.
    pub name: String,
    /// Its version.
    pub version: String,
}

impl ToolRecord {
    /// This build of mmx.
    pub fn this() -> ToolRecord {
        ToolRecord {
            name: "mmx".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// The recipe as run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipeRecord {
    /// The recipe file (relative paths in the text are relative to its directory).
    pub path: PathBuf,
    /// `"mmx"` or `"mergekit"`; records without one are read by the path's extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// The recipe's text.
    pub text: String,
}

/// A LoRA output's rank target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RankRecord {
    /// A fixed rank.
    Fixed(usize),
    /// `"energy:F"`, or `cat`'s `"sum of the experts' ranks"`.
    Text(String),
}

/// One input: the files read from disk with their digests, or the registry manifests read
/// (each already a digest of everything in it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRecord {
    /// `base:DIR`, `expert:LABEL`.
    pub input: String,
    /// The files read.
    #[serde(default)]
    pub files: Vec<FileRecord>,
    /// The manifests read (`blake3:<hex>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifests: Vec<String>,
}

/// One file an input was read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Where it was.
    pub path: String,
    /// Its size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// The blake3 of the whole file, where the merge read all of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// The blake3 of its safetensors header, where the merge read only some tensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_blake3: Option<String>,
}

/// What happened to one tensor of a full or delta output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// The tensor.
    pub name: String,
    /// `"merged"` or `"copied"` (from the base, unchanged).
    pub action: String,
    /// Merged: per expert, the share of its delta kept after trimming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_fraction: Option<Vec<f32>>,
    /// Merged by a method that elects signs: the share of coordinates in conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign_conflict: Option<f32>,
    /// Merged: `‖merged − base‖₂`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_l2: Option<f64>,
    /// Merged: where it ran, `"cpu"` or `"cuda"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Merged by a data-aware method's fallback (no statistics for it): the fallback's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

/// What happened to one module of a LoRA output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleEntry {
    /// The module path (the base weight's name without `.weight`).
    pub module: String,
    /// Its rank in the output.
    pub rank: usize,
    /// The share of the merged update's squared norm the factoring discarded.
    #[serde(default)]
    pub discarded_energy: Option<f64>,
    /// Core space, methods that elect signs: the share of core coordinates in conflict.
    #[serde(default)]
    pub sign_conflict: Option<f32>,
    /// Core space: per expert label, the share of its update the merge keeps.
    #[serde(default)]
    pub retained_energy: BTreeMap<String, f64>,
    /// Where its module-sized products ran, `"cpu"` or `"cuda"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Merged by a data-aware method's fallback (no statistics for it): the fallback's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

/// One tensor the experts of a LoRA merge store whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedEntry {
    /// The base tensor.
    pub tensor: String,
    /// Its key in the adapters.
    pub key: String,
    /// The experts that store it.
    pub experts: Vec<String>,
    /// The blake3 of the base tensor's bytes.
    pub base_blake3: String,
}

impl MergeRecord {
    /// Reads `DIR/mmx-merge.json`.
    pub fn read(dir: &Path) -> Result<MergeRecord> {
        let path = dir.join(MERGE_RECORD);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Json { path, source })
    }

    /// Writes `DIR/mmx-merge.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("a record serialises");
        write_atomic(&dir.join(MERGE_RECORD), &bytes)
    }

    /// The registry manifests the merge read, in input order.
    pub fn manifests(&self) -> impl Iterator<Item = &str> {
        self.inputs
            .iter()
            .flat_map(|i| &i.manifests)
            .map(String::as_str)
    }

    /// The recipe that re-makes this merge: the recorded text in its format, read as if from
    /// the recorded path, with the recorded seed.
    pub fn recipe(&self) -> Result<Recipe> {
        let path = &self.recipe.path;
        let format = match self.recipe.format.as_deref() {
            Some("mmx") => RecipeFormat::Native,
            Some("mergekit") => RecipeFormat::Mergekit,
            Some(other) => {
                return Err(Error::Recipe {
                    path: path.clone(),
                    message: format!(
                        "{MERGE_RECORD} names recipe format `{other}` (known: mmx, mergekit)"
                    ),
                })
            }
            None => RecipeFormat::of_path(path)?,
        };
        let mut recipe = Recipe::parse(path, format, self.recipe.text.clone())?;
        if let Some(seed) = self.seed {
            recipe.seed = seed;
        }
        Ok(recipe)
    }
}

impl RecipeFormat {
    /// The name a record gives the format.
    pub fn record_name(self) -> &'static str {
        match self {
            RecipeFormat::Native => "mmx",
            RecipeFormat::Mergekit => "mergekit",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_without_the_newer_fields_reads() {
        // A LoRA record as mmx wrote them before the seed and format were recorded.
        let text = r#"{
            "tool": {"name": "mmx", "version": "0.1.0"},
            "recipe": {"path": "r.toml", "text": "method = \"cat\""},
            "method": "cat", "space": "factors", "output": "lora",
            "rank": "sum of the experts' ranks",
            "inputs": [{"input": "expert:a", "files": [{"path": "a/adapter_config.json", "blake3": "00"}]}],
            "modules": [{"module": "m.q_proj", "rank": 8, "discarded_energy": null,
                         "sign_conflict": null, "retained_energy": {}}],
            "modules_to_save": []
        }"#;
        let record: MergeRecord = serde_json::from_str(text).unwrap();
        assert_eq!(record.seed, None);
        assert_eq!(record.output, OutputKind::Lora);
        assert_eq!(record.modules[0].rank, 8);
        assert_eq!(
            record.rank,
            Some(RankRecord::Text("sum of the experts' ranks".into()))
        );
    }

    #[test]
    fn an_unknown_format_is_refused_naming_it() {
        let record = MergeRecord {
            tool: ToolRecord::this(),
            recipe: RecipeRecord {
                path: "r.toml".into(),
                format: Some("yaml2".into()),
                text: String::new(),
            },
            method: "ties".into(),
            output: OutputKind::Full,
            space: None,
            rank: None,
            dtype: None,
            seed: Some(1),
            inputs: Vec::new(),
            files: Vec::new(),
            tensors: Vec::new(),
            modules: Vec::new(),
            modules_to_save: None,
        };
        let err = record.recipe().unwrap_err().to_string();
        assert!(err.contains("yaml2"), "{err}");
    }
}
