//! [`ImageEncoder`]: the image side of a LLaVA model, the vision tower and the projector, and
//! how its output enters the language model: each image token's embedding replaced by the
//! next image feature. The trainers hold it beside the language model they train.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use super::config::{FeatureSelect, LlavaConfig};
use crate::adapter::{Adapter, PEFT_PREFIX};
use crate::error::{Error, Result};
use crate::train::model::causal_lm::CausalLm;
use crate::train::model::vision::{ClipVision, Projector};
use crate::train::model::weights::load_file_tensor;
use crate::train::model::{candle, f32_entry};

/// The tensor an `image_embeds` file holds.
pub const IMAGE_EMBEDS: &str = "image_embeds";

/// The projector's module name, as PEFT's `modules_to_save` names it.
pub const PROJECTOR_MODULE: &str = "multi_modal_projector";

/// Where PEFT's adapter keys put the projector (`base_model.model.` and this): the module's
/// path in transformers' LLaVA in memory.
const PROJECTOR_PATH: &str = "model.multi_modal_projector.";

/// The vision tower and the projector of a LLaVA model, with its configuration.
#[derive(Debug)]
pub struct ImageEncoder {
    pub(super) config: LlavaConfig,
    pub(super) vision: ClipVision,
    pub(super) projector: Projector,
}

impl ImageEncoder {
    /// The model's configuration.
    pub fn config(&self) -> &LlavaConfig {
        &self.config
    }

    /// Makes the projector trainable: its tensors become variables, returned under their keys
    /// in a PEFT adapter (`base_model.model.model.multi_modal_projector.linear_1.weight`, …).
    pub fn train_projector(&mut self) -> Result<Vec<(String, Var)>> {
        Ok(self
            .projector
            .make_trainable()?
            .into_iter()
            .map(|(name, var)| (format!("{PEFT_PREFIX}{PROJECTOR_PATH}{name}"), var))
            .collect())
    }

    /// The projector's tensors under their PEFT adapter keys, to save as `modules_to_save`.
    pub fn projector_tensors(&self) -> Vec<(String, Tensor)> {
        self.projector
            .tensors()
            .into_iter()
            .map(|(name, t)| (format!("{PEFT_PREFIX}{PROJECTOR_PATH}{name}"), t))
            .collect()
    }

    /// Replaces the projector by the one the PEFT adapter in `dir` saves (`modules_to_save =
    /// ["multi_modal_projector"]`), if it saves one: every projector tensor, of its shape.
    /// Returns whether it did.
    pub fn load_projector(&mut self, dir: &Path) -> Result<bool> {
        let adapter = Adapter::open(dir)?;
        let saved = adapter.saved_tensors();
        if !saved.keys().any(|k| k.starts_with(PROJECTOR_PATH)) {
            return Ok(false);
        }
        let file = adapter.file();
        for (name, current) in self.projector.tensors() {
            let base = format!("{PROJECTOR_PATH}{name}");
            let key = saved.get(&base).ok_or_else(|| Error::MissingTensor {
                path: file.path().to_path_buf(),
                tensor: format!("{PEFT_PREFIX}{base}"),
            })?;
            let value =
                load_file_tensor(file, key, current.dims(), current.dtype(), current.device())?;
            self.projector
                .set(&name, value)
                .map_err(|message| Error::Adapter {
                    path: file.path().to_path_buf(),
                    message,
                })?;
        }
        Ok(true)
    }

    /// Each image's vision features, `[images, tokens, vision hidden]`: the tower's hidden
    /// states at `vision_feature_layer`, selected as `vision_feature_select_strategy` says,
    /// before the projector. This is what an `image_embeds` file holds (the tower run once,
    /// offline), for `pixel_values [images, channels, size, size]`.
    pub fn vision_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let hidden = self
            .vision
            .hidden_states(pixel_values, self.config.feature_depth())?;
        match self.config.select {
            FeatureSelect::Full => Ok(hidden),
            FeatureSelect::Patches => {
                let n = hidden.dim(1).map_err(candle("vision features"))?;
                hidden
                    .narrow(1, 1, n - 1)
                    .map_err(candle("vision features"))
            }
        }
    }

    /// Vision features `[images, tokens, vision hidden]`, shape-checked, through the
    /// projector: the images in the language model's embedding space.
    pub fn project(&self, features: &Tensor) -> Result<Tensor> {
        let (tokens, width) = (self.config.image_tokens(), self.config.vision.hidden_size);
        match features.dims() {
            &[_, t, w] if t == tokens && w == width => self.projector.forward(features),
            other => Err(Error::ModelInput {
                message: format!(
                    "vision features must be [images, {tokens}, {width}], not {other:?}"
                ),
            }),
        }
    }

    /// The vision features `[1, tokens, vision hidden]` stored in an `image_embeds` file: one
    /// f32 (or f16/bf16) tensor named `image_embeds`, `[tokens, vision hidden]` or with a
    /// leading 1; refused unless it has this model's shape. In `dtype` on `device`.
    pub fn read_image_embeds(&self, path: &Path, dtype: DType, device: &Device) -> Result<Tensor> {
        let file = crate::tensor::SafetensorsFile::open(path)?;
        let info = file
            .info(IMAGE_EMBEDS)
            .ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                tensor: IMAGE_EMBEDS.into(),
            })?;
        let (tokens, width) = (self.config.image_tokens(), self.config.vision.hidden_size);
        let shape = match info.shape.as_slice() {
            [1, t, w] | [t, w] if *t == tokens && *w == width => vec![1, tokens, width],
            _ => {
                return Err(Error::ShapeMismatch {
                    path: path.to_path_buf(),
                    tensor: IMAGE_EMBEDS.into(),
                    expected: vec![tokens, width],
                    actual: info.shape.clone(),
                })
            }
        };
        let values = file.read_f32(IMAGE_EMBEDS)?;
        Tensor::from_vec(values, shape, device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(candle(format!("`{}`: `{IMAGE_EMBEDS}`", path.display())))
    }

    /// Writes one image's vision features (`[1, tokens, vision hidden]` or `[tokens, vision
    /// hidden]`) as an `image_embeds` file, f32.
    pub fn write_image_embeds(path: &Path, features: &Tensor) -> Result<()> {
        let dims = features.dims();
        let shape = &dims[dims.len().saturating_sub(2)..];
        let features = features.reshape(shape).map_err(candle("image features"))?;
        let entry = f32_entry(IMAGE_EMBEDS.into(), &features)?;
        crate::tensor::write_safetensors(path, &[entry], &Default::default())
    }

    /// The embeddings of `input_ids [b, s]` in `language`, each image token's replaced by the
    /// next projected image feature (`[images, tokens, hidden]`, in the language model's
    /// space); refused unless there are exactly as many image tokens as features.
    pub fn merge(
        &self,
        language: &CausalLm,
        input_ids: &Tensor,
        features: Option<&Tensor>,
    ) -> Result<Tensor> {
        let embeds = language.embed_tokens(input_ids)?;
        let (b, s, h) = embeds.dims3().map_err(candle("embeddings"))?;
        let ids = input_ids
            .to_dtype(DType::I64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<i64>())
            .map_err(candle("input_ids"))?;
        let image = i64::from(self.config.image_token_index);
        let tokens = ids.iter().filter(|&&id| id == image).count();
        let (images, per_image) = (
            features
                .map_or(Ok(0), |f| f.dim(0))
                .map_err(candle("image features"))?,
            self.config.image_tokens(),
        );
        if tokens != images * per_image {
            return Err(Error::ModelInput {
                message: format!(
                    "the prompt holds {tokens} image tokens (id {image}); {images} image(s) of {per_image} features each need {}",
                    images * per_image
                ),
            });
        }
        let Some(features) = features else {
            return Ok(embeds);
        };
        // Row i of the stacked table [text rows; feature rows] for each position.
        let mut next = b * s;
        let index: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                if id == image {
                    next += 1;
                    (next - 1) as u32
                } else {
                    i as u32
                }
            })
            .collect();
        (|| -> candle_core::Result<Tensor> {
            let table = Tensor::cat(
                &[
                    &embeds.reshape((b * s, h))?,
                    &features
                        .to_dtype(embeds.dtype())?
                        .reshape((images * per_image, h))?,
                ],
                0,
            )?;
            let index = Tensor::from_vec(index, b * s, embeds.device())?;
            table.index_select(&index, 0)?.reshape((b, s, h))
        })()
        .map_err(candle("merging image features"))
    }
}
