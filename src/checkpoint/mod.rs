//! Hugging Face model directories: `config.json` plus `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, read lazily one tensor at a time ([`Checkpoint`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::tensor::{SafetensorsFile, TensorInfo};

/// Files copied from the base into a merged model directory beside the weights.
pub const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    // A vision-language model's image processing.
    "preprocessor_config.json",
    "processor_config.json",
];

/// An open model directory. Shards are memory-mapped; nothing is read until asked for.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: serde_json::Map<String, Value>,
    shards: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
    /// For a model read from the registry: its manifest digest and its other files' bytes.
    stored: Option<Stored>,
}

/// A model read from somewhere other than a directory (the registry).
#[derive(Debug)]
struct Stored {
    origin: String,
    files: BTreeMap<String, Vec<u8>>,
}

fn fail(path: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl Checkpoint {
    /// Opens a model directory and validates its index: every listed shard exists inside the
    /// directory and holds the tensors listed for it, and no tensor appears twice.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(fail(&dir, "is not a directory"));
        }
        let config_path = dir.join("config.json");
        let config = match std::fs::read(&config_path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(Value::Object(map)) => map,
                Ok(_) => return Err(fail(&config_path, "is not a JSON object")),
                Err(source) => {
                    return Err(Error::Json {
                        path: config_path,
                        source,
                    })
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(fail(
                    &dir,
                    "has no `config.json`: not a Hugging Face model directory (a PEFT adapter has `adapter_config.json`)",
                ))
            }
            Err(e) => return Err(Error::io(config_path, e)),
        };

        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        if index_path.is_file() {
            let bytes = std::fs::read(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let wire: Value = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
                path: index_path.clone(),
                source,
            })?;
            let map = wire
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| fail(&index_path, "has no `weight_map` object"))?;
            let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    fail(
                        &index_path,
                        format!("`weight_map.{tensor}` is not a file name"),
                    )
                })?;
                if file.contains('/') || file.contains('\\') || file == ".." || file == "." {
                    return Err(fail(
                        &index_path,
                        format!("`weight_map.{tensor}` names `{file}`, which is not a file in this directory"),
                    ));
                }
                by_file.entry(file).or_default().push(tensor);
            }
            for (i, (file, tensors)) in by_file.into_iter().enumerate() {
                let shard = SafetensorsFile::open(dir.join(file))?;
                for tensor in tensors {
                    if shard.info(tensor).is_none() {
                        return Err(Error::MissingTensor {
                            path: shard.path().to_path_buf(),
                            tensor: tensor.to_string(),
                        });
                    }
                    index.insert(tensor.to_string(), i);
                }
                shards.push(shard);
            }
        } else if single.is_file() {
            let shard = SafetensorsFile::open(&single)?;
            for name in shard.names() {
                index.insert(name.to_string(), 0);
            }
            shards.push(shard);
        } else {
            return Err(fail(
                &dir,
                "has neither `model.safetensors` nor `model.safetensors.index.json` (pickle `.bin` checkpoints are not read; convert them to safetensors)",
            ));
        }
        Ok(Checkpoint {
            dir,
            config,
            shards,
            index,
            stored: None,
        })
    }

    /// A model assembled from stored parts: `label` names it in messages (e.g.
    /// `registry:base:v1`), `origin` identifies its content (a manifest digest), `files` holds
    /// its small files by name (`config.json` among them) and `shards` its weights.
    pub fn from_parts(
        label: PathBuf,
        origin: String,
        files: BTreeMap<String, Vec<u8>>,
        shards: Vec<SafetensorsFile>,
    ) -> Result<Self> {
        let bytes = files
            .get("config.json")
            .ok_or_else(|| fail(&label, "has no `config.json`: not a Hugging Face model"))?;
        let config = match serde_json::from_slice(bytes) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(fail(&label, "`config.json` is not a JSON object")),
            Err(source) => {
                return Err(Error::Json {
                    path: label.join("config.json"),
                    source,
                })
            }
        };
        if shards.is_empty() {
            return Err(fail(&label, "has no safetensors weights"));
        }
        let mut index = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.names() {
                if index.insert(name.to_string(), i).is_some() {
                    return Err(fail(
                        &label,
                        format!("tensor `{name}` is in two weight files"),
                    ));
                }
            }
        }
        Ok(Checkpoint {
            dir: label,
            config,
            shards,
            index,
            stored: Some(Stored { origin, files }),
        })
    }

    /// For a model read from the registry, its manifest digest.
    pub fn origin(&self) -> Option<&str> {
        self.stored.as_ref().map(|s| s.origin.as_str())
    }

    /// A small file of the model (a tokenizer file, say), if it has one.
    pub fn extra_file(&self, name: &str) -> Result<Option<Vec<u8>>> {
        if let Some(stored) = &self.stored {
            return Ok(stored.files.get(name).cloned());
        }
        let path = self.dir.join(name);
        if !path.is_file() {
            return Ok(None);
        }
        std::fs::read(&path)
            .map(Some)
            .map_err(|e| Error::io(&path, e))
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `config.json` as read.
    pub fn config(&self) -> &serde_json::Map<String, Value> {
        &self.config
    }

    /// `architectures[0]` and `model_type` from the config, the pair that must agree between
    /// models merged together.
    pub fn architecture(&self) -> (Option<&str>, Option<&str>) {
        let arch = self
            .config
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str);
        let model_type = self.config.get("model_type").and_then(Value::as_str);
        (arch, model_type)
    }

    /// The number of transformer layers (`num_hidden_layers`, or GPT-2's `n_layer`).
    pub fn num_layers(&self) -> Option<usize> {
        ["num_hidden_layers", "n_layer"]
            .iter()
            .find_map(|k| self.config.get(*k).and_then(Value::as_u64))
            .map(|n| n as usize)
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.index.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// A tensor's header entry.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.shard(name).and_then(|s| s.info(name))
    }

    fn shard(&self, name: &str) -> Option<&SafetensorsFile> {
        self.index.get(name).map(|&i| &self.shards[i])
    }

    fn require(&self, name: &str) -> Result<&SafetensorsFile> {
        self.shard(name).ok_or_else(|| Error::MissingTensor {
            path: self.dir.clone(),
            tensor: name.to_string(),
        })
    }

    /// A tensor's raw bytes.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        self.require(name)?.bytes(name)
    }

    /// A float tensor as f32 (refusing non-finite values).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.require(name)?.read_f32(name)
    }

    /// Elements `[start, end)` of a float tensor as f32.
    pub fn read_f32_range(&self, name: &str, start: usize, end: usize) -> Result<Vec<f32>> {
        self.require(name)?.read_f32_range(name, start, end)
    }

    /// Drops this process's mapping of a tensor's pages (see [`SafetensorsFile::release`]).
    pub fn release(&self, name: &str) {
        if let Some(shard) = self.shard(name) {
            shard.release(name);
        }
    }

    /// [`release`](Self::release) for elements `start..end` of a tensor only.
    pub fn release_range(&self, name: &str, start: usize, end: usize) {
        if let Some(shard) = self.shard(name) {
            shard.release_range(name, start, end);
        }
    }

    /// The weight files, for digests.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path()).collect()
    }

    /// The open weight files.
    pub fn shards(&self) -> &[SafetensorsFile] {
        &self.shards
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{write_safetensors, Dtype, TensorSpec};

    fn write_model(dir: &Path, tensors: &[(&str, Vec<f32>)]) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","num_hidden_layers":2}"#,
        )
        .unwrap();
        let tensors: Vec<_> = tensors
            .iter()
            .map(|(n, v)| {
                (
                    TensorSpec {
                        name: n.to_string(),
                        dtype: Dtype::F32,
                        shape: vec![v.len()],
                    },
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            })
            .collect();
        write_safetensors(&dir.join("model.safetensors"), &tensors, &BTreeMap::new()).unwrap();
    }

    #[test]
    fn reads_a_single_file_model() {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &[("a", vec![1.0, 2.0]), ("b", vec![3.0])]);
        let c = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(c.names(), ["a", "b"]);
        assert_eq!(c.read_f32("a").unwrap(), [1.0, 2.0]);
        assert_eq!(c.architecture(), (Some("LlamaForCausalLM"), Some("llama")));
        assert_eq!(c.num_layers(), Some(2));
        let err = c.read_f32("zz").unwrap_err().to_string();
        assert!(err.contains("`zz`"), "{err}");
    }

    #[test]
    fn refuses_an_index_that_escapes_the_directory_or_lies() {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &[("a", vec![1.0])]);
        let index = dir.path().join("model.safetensors.index.json");
        std::fs::write(&index, r#"{"weight_map":{"a":"../model.safetensors"}}"#).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a file in this directory"), "{err}");
        std::fs::write(&index, r#"{"weight_map":{"nope":"model.safetensors"}}"#).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("`nope` is missing"), "{err}");
    }

    #[test]
    fn explains_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }
}
