//! An expert's input: a full model, a PEFT adapter on the base, or a model with an adapter
//! applied in memory (mergekit's `model+lora`), read one tensor at a time.

use std::path::{Path, PathBuf};

use crate::adapter::Adapter;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::recipe::{Parameters, Source};
use crate::tensor::check_finite_from;

/// What an expert is made of.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per expert: boxing saves nothing that matters
pub enum ExpertInput {
    /// A complete model.
    Model(Checkpoint),
    /// A LoRA adapter applied to the recipe's base.
    Adapter(Adapter),
    /// A LoRA adapter applied to another model.
    ModelWithLora(Checkpoint, Adapter),
}

/// One expert of a merge.
#[derive(Debug)]
pub struct Expert {
    /// How the recipe names it.
    pub label: String,
    /// Its position in the recipe (keys its random masks).
    pub index: usize,
    /// Its data.
    pub input: ExpertInput,
    /// Its own parameters.
    pub parameters: Parameters,
}

impl Expert {
    /// Opens an expert's source (`registry`: where `registry:` sources come from, see
    /// [`crate::recipe::Recipe::registry`]).
    pub fn open(
        index: usize,
        source: &Source,
        parameters: Parameters,
        registry: Option<&Path>,
    ) -> Result<Expert> {
        let input = match source {
            Source::Registry(reference) => match super::stored::open(registry, reference)? {
                crate::registry::Opened::Model(m) => ExpertInput::Model(m),
                crate::registry::Opened::Adapter(a) => ExpertInput::Adapter(a),
            },
            Source::Dir(dir) if Adapter::is_adapter_dir(dir) => {
                ExpertInput::Adapter(Adapter::open(dir)?)
            }
            Source::Dir(dir) => ExpertInput::Model(Checkpoint::open(dir)?),
            Source::WithLora { model, lora } => {
                ExpertInput::ModelWithLora(Checkpoint::open(model)?, Adapter::open(lora)?)
            }
        };
        Ok(Expert {
            label: source.to_string(),
            index,
            input,
            parameters,
        })
    }

    /// The adapter, if the expert has one.
    pub fn adapter(&self) -> Option<&Adapter> {
        match &self.input {
            ExpertInput::Adapter(a) | ExpertInput::ModelWithLora(_, a) => Some(a),
            ExpertInput::Model(_) => None,
        }
    }

    /// The adapter, if the expert has one, to rename its tensors
    /// ([`Adapter::name_tensors_as`]).
    pub fn adapter_mut(&mut self) -> Option<&mut Adapter> {
        match &mut self.input {
            ExpertInput::Adapter(a) | ExpertInput::ModelWithLora(_, a) => Some(a),
            ExpertInput::Model(_) => None,
        }
    }

    /// The model, if the expert has its own.
    pub fn model(&self) -> Option<&Checkpoint> {
        match &self.input {
            ExpertInput::Model(m) | ExpertInput::ModelWithLora(m, _) => Some(m),
            ExpertInput::Adapter(_) => None,
        }
    }

    /// Whether the expert's tensor `name` can differ from the base's.
    pub fn touches(&self, name: &str) -> bool {
        self.model().is_some()
            || self.adapter().is_some_and(|a| {
                a.modules().contains_key(name) || a.saved_tensors().contains_key(name)
            })
    }

    /// The expert's full tensor `name`. `base` supplies the tensor an adapter applies to when
    /// the expert has no model of its own.
    pub fn tensor(&self, name: &str, base: Option<&Checkpoint>) -> Result<Vec<f32>> {
        let source = self.model().or(base);
        let shape = match self.adapter().and_then(|a| a.replacement_shape(name)) {
            Some(shape) => shape.to_vec(),
            None => match source {
                Some(c) => c
                    .info(name)
                    .ok_or_else(|| Error::MissingTensor {
                        path: c.dir().to_path_buf(),
                        tensor: name.to_string(),
                    })?
                    .shape
                    .clone(),
                None => return Err(self.needs_base()),
            },
        };
        let row_len = shape.last().copied().unwrap_or(1).max(1);
        self.tensor_range(name, base, (0, shape.iter().product()), row_len)
    }

    fn needs_base(&self) -> Error {
        Error::Checkpoint {
            path: PathBuf::from(&self.label),
            message: "a LoRA adapter expert needs a base model".to_string(),
        }
    }

    /// Elements `[start, end)` of [`tensor`](Self::tensor), whole rows of length `row_len`.
    pub fn tensor_range(
        &self,
        name: &str,
        base: Option<&Checkpoint>,
        (start, end): (usize, usize),
        row_len: usize,
    ) -> Result<Vec<f32>> {
        let replacement = self
            .adapter()
            .map(|a| a.replacement_range(name, start, end))
            .transpose()?
            .flatten();
        let mut values = match (replacement, self.model(), base) {
            (Some(r), _, _) => r,
            (None, Some(model), _) => model.read_f32_range(name, start, end)?,
            (None, None, Some(base)) => base.read_f32_range(name, start, end)?,
            (None, None, None) => return Err(self.needs_base()),
        };
        let delta = self
            .adapter()
            .map(|a| a.delta_rows(name, start / row_len, end / row_len))
            .transpose()?
            .flatten();
        if let Some(delta) = delta {
            for (v, d) in values.iter_mut().zip(&delta) {
                *v += d;
            }
            check_finite_from(Path::new(&self.label), name, &values, start)?;
        }
        Ok(values)
    }

    /// Drops the mapped pages of tensor `name` in this expert's files.
    pub fn release(&self, name: &str) {
        if let Some(m) = self.model() {
            m.release(name);
        }
    }

    /// Drops the mapped pages of elements `start..end` of tensor `name`.
    pub fn release_range(&self, name: &str, start: usize, end: usize) {
        if let Some(m) = self.model() {
            m.release_range(name, start, end);
        }
    }

    /// The files this expert reads from disk, for digests (registry inputs have none).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some(m) = self.model().filter(|m| m.origin().is_none()) {
            files.push(m.dir().join("config.json"));
            files.extend(m.files().into_iter().map(PathBuf::from));
        }
        if let Some(a) = self.adapter().filter(|a| a.origin().is_none()) {
            files.push(a.dir().join("adapter_config.json"));
            files.push(a.file().path().to_path_buf());
        }
        files
    }

    /// The registry manifests this expert reads.
    pub fn manifests(&self) -> Vec<String> {
        let model = self.model().and_then(Checkpoint::origin);
        let adapter = self.adapter().and_then(Adapter::origin);
        model.into_iter().chain(adapter).map(String::from).collect()
    }
}

/// Checks that `adapter` was made for `model`: every module it adapts and every tensor it
/// stores whole (`modules_to_save`) is one of the model's, with the model's shape.
pub(super) fn check_fits(adapter: &Adapter, model: &Checkpoint) -> Result<()> {
    let names: std::collections::BTreeSet<&String> = adapter
        .modules()
        .keys()
        .chain(adapter.saved_tensors().keys())
        .collect();
    for name in names {
        let Some(info) = model.info(name) else {
            return Err(Error::Adapter {
                path: adapter.dir().to_path_buf(),
                message: format!(
                    "adapts `{name}`, which `{}` does not have: the adapter was trained on a different base model",
                    model.dir().display()
                ),
            });
        };
        let expected = match adapter.modules().get(name.as_str()) {
            Some(m) => m.target_shape.to_vec(),
            None => adapter
                .replacement_shape(name)
                .expect("name came from the saved tensors")
                .to_vec(),
        };
        if info.shape != expected {
            return Err(Error::ShapeMismatch {
                path: adapter.dir().to_path_buf(),
                tensor: name.to_string(),
                expected: info.shape.clone(),
                actual: expected,
            });
        }
    }
    Ok(())
}
