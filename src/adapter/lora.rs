//! A PEFT LoRA adapter directory: its modules, their scaling, and the dense update each makes to
//! a base weight.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::config::LoraConfig;
use crate::error::{Error, Result};
use crate::tensor::{write_atomic, write_safetensors, SafetensorsFile, TensorSpec};

/// The prefix PEFT puts before every module path on disk.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// How a LoRA module's factors combine into an update of the base weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraKind {
    /// `nn.Linear`: ΔW = s·B·A, `[out, in]` (transposed when `fan_in_fan_out`).
    Linear,
    /// `nn.Embedding`: ΔW = s·(B·A)ᵀ, `[num_embeddings, dim]`.
    Embedding,
}

/// One adapted module.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// The module path inside the base model (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// Linear or embedding.
    pub kind: LoraKind,
    /// Key of the down factor A, `[r, in]` (`[r, num_embeddings]` for embeddings).
    pub a_key: String,
    /// Key of the up factor B, `[out, r]` (`[dim, r]` for embeddings).
    pub b_key: String,
    /// The rank.
    pub rank: usize,
    /// The scaling s.
    pub scaling: f32,
    /// Transpose the product to match a `[in, out]` base weight.
    pub fan_in_fan_out: bool,
    /// The shape of the base weight this module updates.
    pub target_shape: [usize; 2],
}

/// An open PEFT LoRA adapter.
#[derive(Debug)]
pub struct Adapter {
    dir: PathBuf,
    config: LoraConfig,
    file: SafetensorsFile,
    /// Adapted modules by the base tensor they update (`<module>.weight`).
    modules: BTreeMap<String, LoraModule>,
    /// `modules_to_save` tensors by base tensor name, with their adapter key.
    saved: BTreeMap<String, String>,
    /// For an adapter read from the registry, its manifest digest.
    origin: Option<String>,
}

/// The name a LLaVA checkpoint saves tensor `name` under, where PEFT names it as transformers
/// holds the model in memory (`model.language_model.…` saved as `language_model.model.…`,
/// `model.vision_tower.…` and `model.multi_modal_projector.…` without the `model.`,
/// `lm_head.…` as `language_model.lm_head.…`).
fn saved_llava_name(name: &str) -> Option<String> {
    if let Some(rest) = name.strip_prefix("model.language_model.") {
        return Some(format!("language_model.model.{rest}"));
    }
    for part in ["vision_tower.", "multi_modal_projector."] {
        if let Some(rest) = name.strip_prefix(&format!("model.{part}")) {
            return Some(format!("{part}{rest}"));
        }
    }
    name.strip_prefix("lm_head.")
        .map(|rest| format!("language_model.lm_head.{rest}"))
}

impl Adapter {
    /// Renames the base tensors this adapter updates or replaces to the names a base
    /// checkpoint has (`has`), where they differ only by its key layout: a LLaVA adapter's
    /// in-memory names against a checkpoint in the saved layout. A name the checkpoint has
    /// already, or whose other spelling it lacks, is left as it is (and so still refused,
    /// naming it, by the caller's check).
    pub fn name_tensors_as(&mut self, has: impl Fn(&str) -> bool) {
        let rename = |name: &String| -> String {
            match saved_llava_name(name) {
                Some(saved) if !has(name) && has(&saved) => saved,
                _ => name.clone(),
            }
        };
        self.modules = std::mem::take(&mut self.modules)
            .into_iter()
            .map(|(name, module)| (rename(&name), module))
            .collect();
        self.saved = std::mem::take(&mut self.saved)
            .into_iter()
            .map(|(name, key)| (rename(&name), key))
            .collect();
    }

    /// Whether `dir` looks like a PEFT adapter directory.
    pub fn is_adapter_dir(dir: &Path) -> bool {
        dir.join("adapter_config.json").is_file()
    }

    /// Opens and validates an adapter directory: the config, every key of the weights file, the
    /// factor shapes and the ranks the config declares.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config = LoraConfig::read(&dir.join("adapter_config.json"))?;
        let weights = dir.join("adapter_model.safetensors");
        if !weights.is_file() {
            let message = if dir.join("adapter_model.bin").is_file() {
                "holds `adapter_model.bin` (a pickle); mmx reads safetensors only: re-save it with PEFT's `save_pretrained(safe_serialization=True)`"
            } else {
                "has no `adapter_model.safetensors`"
            };
            return Err(Error::Adapter {
                path: dir,
                message: message.to_string(),
            });
        }
        let file = SafetensorsFile::open(&weights)?;
        let (modules, saved) = index_modules(&file, &config)?;
        Ok(Adapter {
            dir,
            config,
            file,
            modules,
            saved,
            origin: None,
        })
    }

    /// An adapter assembled from stored parts: `label` names it in messages, `origin`
    /// identifies its content (a manifest digest), `config` is its `adapter_config.json`.
    /// Validated as [`Adapter::open`] validates a directory.
    pub fn from_parts(
        label: PathBuf,
        origin: String,
        config: &[u8],
        file: SafetensorsFile,
    ) -> Result<Self> {
        let config_path = label.join("adapter_config.json");
        let raw = match serde_json::from_slice(config) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(_) => {
                return Err(Error::Adapter {
                    path: config_path,
                    message: "adapter config is not a JSON object".into(),
                })
            }
            Err(source) => {
                return Err(Error::Json {
                    path: config_path,
                    source,
                })
            }
        };
        let config = LoraConfig::from_map(&config_path, raw)?;
        let (modules, saved) = index_modules(&file, &config)?;
        Ok(Adapter {
            dir: label,
            config,
            file,
            modules,
            saved,
            origin: Some(origin),
        })
    }

    /// For an adapter read from the registry, its manifest digest.
    pub fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    /// The adapter directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The validated configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The weights file.
    pub fn file(&self) -> &SafetensorsFile {
        &self.file
    }

    /// Adapted modules keyed by the base tensor they update.
    pub fn modules(&self) -> &BTreeMap<String, LoraModule> {
        &self.modules
    }

    /// `modules_to_save` tensors keyed by the base tensor they replace.
    pub fn saved_tensors(&self) -> &BTreeMap<String, String> {
        &self.saved
    }

    /// The dense update s·B·A this adapter makes to base tensor `name`, laid out like the base
    /// weight; `None` if the adapter does not touch it.
    pub fn delta(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let Some(m) = self.modules.get(name) else {
            return Ok(None);
        };
        let a = self.file.read_f32(&m.a_key)?;
        let b = self.file.read_f32(&m.b_key)?;
        Ok(Some(lora_delta(m, &a, &b)))
    }

    /// Rows `[first, end)` of [`delta`](Self::delta), without computing the others.
    pub fn delta_rows(&self, name: &str, first: usize, end: usize) -> Result<Option<Vec<f32>>> {
        let Some(m) = self.modules.get(name) else {
            return Ok(None);
        };
        let a = self.file.read_f32(&m.a_key)?;
        let b = self.file.read_f32(&m.b_key)?;
        Ok(Some(lora_delta_rows(m, &a, &b, first, end)))
    }

    /// Elements `[start, end)` of the `modules_to_save` tensor for base tensor `name`, if any.
    pub fn replacement_range(
        &self,
        name: &str,
        start: usize,
        end: usize,
    ) -> Result<Option<Vec<f32>>> {
        match self.saved.get(name) {
            Some(key) => self.file.read_f32_range(key, start, end).map(Some),
            None => Ok(None),
        }
    }

    /// The full tensor this adapter stores for base tensor `name` (`modules_to_save`), if any.
    pub fn replacement(&self, name: &str) -> Result<Option<Vec<f32>>> {
        match self.saved.get(name) {
            Some(key) => self.file.read_f32(key).map(Some),
            None => Ok(None),
        }
    }

    /// The shape of a `modules_to_save` tensor.
    pub fn replacement_shape(&self, name: &str) -> Option<&[usize]> {
        let key = self.saved.get(name)?;
        self.file.info(key).map(|i| i.shape.as_slice())
    }

    /// Saves an adapter the way PEFT's `save_pretrained` does: `adapter_config.json` with sorted
    /// keys and two-space indent, and `adapter_model.safetensors` with `{"format": "pt"}` metadata.
    /// Tensors are `(key, spec, bytes)` with PEFT's on-disk keys.
    pub fn save(
        dir: &Path,
        config: &serde_json::Map<String, serde_json::Value>,
        tensors: &[(TensorSpec, Vec<u8>)],
    ) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let sorted: BTreeMap<&String, &serde_json::Value> = config.iter().collect();
        let json = serde_json::to_string_pretty(&sorted).expect("JSON serialises");
        write_atomic(&dir.join("adapter_config.json"), json.as_bytes())?;
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&dir.join("adapter_model.safetensors"), tensors, &metadata)
    }
}

/// Computes s·B·A (or its transpose) for one module from row-major A `[r, k]` and B `[m, r]`.
pub fn lora_delta(m: &LoraModule, a: &[f32], b: &[f32]) -> Vec<f32> {
    lora_delta_rows(m, a, b, 0, m.target_shape[0])
}

/// Rows `[first, end)` of [`lora_delta`]'s result, computed without the rest. Every element
/// is the same dot product over the rank as in the whole product.
pub fn lora_delta_rows(m: &LoraModule, a: &[f32], b: &[f32], first: usize, end: usize) -> Vec<f32> {
    let r = m.rank;
    let (rows, cols) = (m.target_shape[0], m.target_shape[1]);
    assert!(first <= end && end <= rows, "row range within the target");
    let mut out = vec![0f32; (end - first) * cols];
    // A is [r, k], B is [m, r]. Linear: out[m, k] = B·A. Linear with fan_in_fan_out and
    // Embedding: out[k, m] = (B·A)ᵀ = Aᵀ·Bᵀ, read through swapped strides, never copied.
    let transposed = match m.kind {
        LoraKind::Linear => m.fan_in_fan_out,
        LoraKind::Embedding => true,
    };
    // SAFETY: the slices hold exactly the elements the dimensions and strides address: a is
    // r×k, b is m×r (checked when the module was indexed), out is (end − first)×cols, and the
    // left operand starts at row `first` of a matrix with `rows` rows.
    unsafe {
        if transposed {
            // lhs = Aᵀ (k×r, element (i,j) at j*k + i), rhs = Bᵀ (r×m, (i,j) at j*r + i).
            matrixmultiply::sgemm(
                end - first,
                r,
                cols,
                m.scaling,
                a.as_ptr().add(first),
                1,
                rows as isize,
                b.as_ptr(),
                1,
                r as isize,
                0.0,
                out.as_mut_ptr(),
                cols as isize,
                1,
            );
        } else {
            matrixmultiply::sgemm(
                end - first,
                r,
                cols,
                m.scaling,
                b.as_ptr().add(first * r),
                r as isize,
                1,
                a.as_ptr(),
                cols as isize,
                1,
                0.0,
                out.as_mut_ptr(),
                cols as isize,
                1,
            );
        }
    }
    out
}

type ModuleIndex = (BTreeMap<String, LoraModule>, BTreeMap<String, String>);

/// Sorts every key of an adapter file into LoRA factors or `modules_to_save` copies, refusing
/// anything else, and checks factor shapes against each other and the config.
fn index_modules(file: &SafetensorsFile, config: &LoraConfig) -> Result<ModuleIndex> {
    let path = file.path();
    let fail = |message: String| Error::Adapter {
        path: path.to_path_buf(),
        message,
    };
    let mut pairs: BTreeMap<String, (LoraKind, Option<String>, Option<String>)> = BTreeMap::new();
    let mut saved = BTreeMap::new();
    for key in file.names() {
        let Some(inner) = key.strip_prefix(PEFT_PREFIX) else {
            return Err(fail(format!(
                "tensor `{key}` lacks PEFT's `{PEFT_PREFIX}` prefix"
            )));
        };
        let factor = [
            (".lora_A.weight", LoraKind::Linear, true),
            (".lora_B.weight", LoraKind::Linear, false),
            (".lora_embedding_A", LoraKind::Embedding, true),
            (".lora_embedding_B", LoraKind::Embedding, false),
        ]
        .into_iter()
        .find_map(|(suffix, kind, is_a)| inner.strip_suffix(suffix).map(|m| (m, kind, is_a)));
        if let Some((module, kind, is_a)) = factor {
            let entry = pairs
                .entry(module.to_string())
                .or_insert((kind, None, None));
            if entry.0 != kind {
                return Err(fail(format!(
                    "module `{module}` mixes linear and embedding LoRA factors"
                )));
            }
            let slot = if is_a { &mut entry.1 } else { &mut entry.2 };
            *slot = Some(key.to_string());
            continue;
        }
        for (suffix, what) in [
            (".lora_magnitude_vector", "DoRA magnitude"),
            (".lora_B.bias", "LoRA bias"),
        ] {
            if inner.ends_with(suffix) {
                return Err(fail(format!(
                    "tensor `{key}` is a {what}, which mmx does not support"
                )));
            }
        }
        // PEFT saves the whole base embedding beside an embedding LoRA (`save_embedding_layers`),
        // e.g. after a vocabulary resize: it replaces the base tensor before the update applies.
        if let Some(module) = inner.strip_suffix(".base_layer.weight") {
            saved.insert(format!("{module}.weight"), key.to_string());
            continue;
        }
        // A tensor anywhere inside a module whose path ends with a listed name (PEFT matches
        // module names by their last components): `model.multi_modal_projector.linear_1.bias`
        // belongs to `multi_modal_projector`.
        let saved_module = config
            .modules_to_save
            .iter()
            .any(|m| format!(".{inner}").contains(&format!(".{m}.")));
        if saved_module {
            saved.insert(inner.to_string(), key.to_string());
            continue;
        }
        return Err(fail(format!(
            "tensor `{key}` is neither a LoRA factor nor part of `modules_to_save`"
        )));
    }

    let mut modules = BTreeMap::new();
    for (module, (kind, a_key, b_key)) in pairs {
        let (Some(a_key), Some(b_key)) = (a_key, b_key) else {
            return Err(fail(format!(
                "module `{module}` has only one of its two LoRA factors"
            )));
        };
        let a = file.info(&a_key).expect("key came from the file");
        let b = file.info(&b_key).expect("key came from the file");
        if a.shape.len() != 2 || b.shape.len() != 2 {
            return Err(fail(format!(
                "module `{module}`: factors of shapes {:?} and {:?} are not matrices (convolution LoRAs are not supported)",
                a.shape, b.shape
            )));
        }
        let rank = a.shape[0];
        if b.shape[1] != rank {
            return Err(Error::ShapeMismatch {
                path: path.to_path_buf(),
                tensor: b_key,
                expected: vec![b.shape[0], rank],
                actual: b.shape.clone(),
            });
        }
        let declared = config.rank_for(&module);
        if declared != rank {
            return Err(fail(format!(
                "module `{module}` has rank {rank} in the weights but {declared} in the config (`r` / `rank_pattern`)"
            )));
        }
        let (out_dim, in_dim) = (b.shape[0], a.shape[1]);
        let fan_in_fan_out = kind == LoraKind::Linear && config.fan_in_fan_out;
        let target_shape = if kind == LoraKind::Embedding || fan_in_fan_out {
            [in_dim, out_dim]
        } else {
            [out_dim, in_dim]
        };
        modules.insert(
            format!("{module}.weight"),
            LoraModule {
                scaling: config.scaling_for(&module, rank) as f32,
                module,
                kind,
                a_key,
                b_key,
                rank,
                fan_in_fan_out,
                target_shape,
            },
        );
    }
    Ok((modules, saved))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(kind: LoraKind, fan_in_fan_out: bool, shape: [usize; 2]) -> LoraModule {
        LoraModule {
            module: "m".into(),
            kind,
            a_key: String::new(),
            b_key: String::new(),
            rank: 2,
            scaling: 0.5,
            fan_in_fan_out,
            target_shape: shape,
        }
    }

    // A = [[1, 2, 3], [4, 5, 6]] (r=2, in=3); B = [[1, 0], [0, 1], [1, 1], [2, -1]] (out=4).
    // B·A = [[1,2,3],[4,5,6],[5,7,9],[-2,-1,0]]; times s = 0.5.
    const A: [f32; 6] = [1., 2., 3., 4., 5., 6.];
    const B: [f32; 8] = [1., 0., 0., 1., 1., 1., 2., -1.];

    #[test]
    fn linear_delta_is_scaled_b_times_a() {
        let d = lora_delta(&module(LoraKind::Linear, false, [4, 3]), &A, &B);
        assert_eq!(d, [0.5, 1., 1.5, 2., 2.5, 3., 2.5, 3.5, 4.5, -1., -0.5, 0.]);
    }

    #[test]
    fn row_ranges_equal_the_rows_of_the_whole_product() {
        for (kind, fifo, shape) in [
            (LoraKind::Linear, false, [4, 3]),
            (LoraKind::Linear, true, [3, 4]),
            (LoraKind::Embedding, false, [3, 4]),
        ] {
            let m = module(kind, fifo, shape);
            let whole = lora_delta(&m, &A, &B);
            for (first, end) in [(0, 1), (1, 3), (2, shape[0]), (0, shape[0])] {
                let rows = lora_delta_rows(&m, &A, &B, first, end);
                assert_eq!(
                    rows,
                    whole[first * shape[1]..end * shape[1]],
                    "{kind:?} {first}..{end}"
                );
            }
        }
    }

    #[test]
    fn fan_in_fan_out_and_embedding_deltas_are_transposed() {
        let expected = [0.5, 2., 2.5, -1., 1., 2.5, 3.5, -0.5, 1.5, 3., 4.5, 0.];
        for (kind, fifo) in [(LoraKind::Linear, true), (LoraKind::Embedding, false)] {
            let d = lora_delta(&module(kind, fifo, [3, 4]), &A, &B);
            assert_eq!(d, expected, "{kind:?}");
        }
    }
}
