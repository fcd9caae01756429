//! [`Llava`]: a vision-language model as transformers' `LlavaForConditionalGeneration`
//! defines it: a CLIP vision tower, the `multi_modal_projector`, and a Llama/Qwen2 language
//! model ([`CausalLm`]) whose prompt holds one image token per image feature. Loaded from a
//! Hugging Face directory in either key layout transformers writes (`language_model.model.…`,
//! `vision_tower.…` as saved; `model.language_model.…`, `model.vision_tower.…` as held in
//! memory; `vision_tower.vision_model.…` of older checkpoints).

use std::path::{Path, PathBuf};

mod config;
mod layout;

use candle_core::{DType, Device, Tensor};

use super::candle;
use super::causal_lm::CausalLm;
use super::generate::GenerateOptions;
use super::lora::LoraSpec;
use super::vision::{ClipVision, Projector};
use super::weights::{Naming, Weights};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
pub use config::{FeatureSelect, LlavaConfig};
use layout::Layout;

/// The tensor an `image_embeds` file holds.
pub const IMAGE_EMBEDS: &str = "image_embeds";

/// A LLaVA model.
#[derive(Debug)]
pub struct Llava {
    dir: PathBuf,
    config: LlavaConfig,
    vision: ClipVision,
    projector: Projector,
    language: CausalLm,
}

impl Llava {
    /// Loads the LLaVA checkpoint in `dir` (its `config.json` and safetensors) in `dtype` on
    /// `device`, with fresh LoRA updates on the language model where `lora` says.
    pub fn load(
        dir: &Path,
        lora: Option<&LoraSpec>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let config = LlavaConfig::read(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        let layout = Layout::of(dir, &checkpoint)?;
        let weights = Weights::new(&checkpoint, dtype, device, false);
        let vision = ClipVision::load(&config.vision, &weights, &layout.vision)?;
        let projector = Projector::load(
            &weights,
            &layout.projector,
            config.vision.hidden_size,
            config.text.hidden_size,
            config.projector_act,
            config.projector_bias,
        )?;
        // PEFT names the language model's modules as transformers nests them in memory.
        let modules = Naming {
            model: "model.language_model.".into(),
            head: "lm_head.".into(),
        };
        let language = CausalLm::load_nested(
            dir,
            &checkpoint,
            config.text.clone(),
            layout.text,
            modules,
            lora,
            dtype,
            device,
        )?;
        Ok(Llava {
            dir: dir.to_path_buf(),
            config,
            vision,
            projector,
            language,
        })
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its configuration.
    pub fn config(&self) -> &LlavaConfig {
        &self.config
    }

    /// The language model (its LoRA, its KV cache, its generation).
    pub fn language_model(&self) -> &CausalLm {
        &self.language
    }

    /// The language model, to attach or load adapters.
    pub fn language_model_mut(&mut self) -> &mut CausalLm {
        &mut self.language
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

    /// Each image's features in the language model's embedding space, `[images, tokens,
    /// hidden]`, from `pixel_values [images, channels, size, size]`.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.projector.forward(&self.vision_features(pixel_values)?)
    }

    /// Logits `[b, s, vocab]` for `input_ids [b, s]` whose image tokens, in order, take the
    /// features of `pixel_values` (image i's tokens the i-th image's), or of none for a
    /// text-only prompt.
    pub fn forward(&self, input_ids: &Tensor, pixel_values: Option<&Tensor>) -> Result<Tensor> {
        let features = pixel_values.map(|p| self.vision_features(p)).transpose()?;
        self.forward_features(input_ids, features.as_ref())
    }

    /// [`Llava::forward`] from precomputed vision features `[images, tokens, vision hidden]`
    /// ([`Llava::vision_features`], or `image_embeds` files): the projector runs, the tower
    /// does not.
    pub fn forward_features(
        &self,
        input_ids: &Tensor,
        features: Option<&Tensor>,
    ) -> Result<Tensor> {
        let projected = features.map(|f| self.project(f)).transpose()?;
        let embeds = self.merge(input_ids, projected.as_ref())?;
        self.language.forward_embeds(&embeds, None, None)
    }

    /// Continues every prompt as [`CausalLm::generate`] does, the image tokens of the prompts
    /// (in order, row by row) taking the vision features `[images, tokens, vision hidden]`.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        features: Option<&Tensor>,
        options: &GenerateOptions,
    ) -> Result<Vec<Vec<u32>>> {
        if options.pad_token_id == self.config.image_token_index {
            return Err(Error::ModelInput {
                message: format!(
                    "the pad token {} is the image token: padding would take image features",
                    options.pad_token_id
                ),
            });
        }
        let projected = features.map(|f| self.project(f)).transpose()?;
        self.language
            .generate_with(prompts, options, &|ids, mask, cache| {
                let embeds = self.merge(ids, projected.as_ref())?;
                self.language
                    .forward_embeds(&embeds, Some(mask), Some(cache))
            })
    }

    /// Vision features `[images, tokens, vision hidden]`, shape-checked, through the projector.
    fn project(&self, features: &Tensor) -> Result<Tensor> {
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
    /// leading 1; refused unless it has this model's shape.
    pub fn read_image_embeds(&self, path: &Path) -> Result<Tensor> {
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
        Tensor::from_vec(values, shape, self.language.device())
            .and_then(|t| t.to_dtype(self.language.dtype()))
            .map_err(candle(format!("`{}`: `{IMAGE_EMBEDS}`", path.display())))
    }

    /// Writes one image's vision features (`[1, tokens, vision hidden]` or `[tokens, vision
    /// hidden]`) as an `image_embeds` file, f32.
    pub fn write_image_embeds(path: &Path, features: &Tensor) -> Result<()> {
        let values = features
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(candle("image features"))?;
        let dims = features.dims();
        let shape = dims[dims.len().saturating_sub(2)..].to_vec();
        let spec = crate::tensor::TensorSpec {
            name: IMAGE_EMBEDS.into(),
            dtype: crate::tensor::Dtype::F32,
            shape,
        };
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        crate::tensor::write_safetensors(path, &[(spec, bytes)], &Default::default())
    }

    /// The prompt's embeddings with each image token's replaced by the next projected image
    /// feature (`[images, tokens, hidden]`, in the language model's space); refused unless
    /// there are exactly as many image tokens as features.
    fn merge(&self, input_ids: &Tensor, features: Option<&Tensor>) -> Result<Tensor> {
        let embeds = self.language.embed_tokens(input_ids)?;
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
