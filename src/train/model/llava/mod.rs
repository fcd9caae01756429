//! [`Llava`]: a vision-language model as transformers' `LlavaForConditionalGeneration`
//! defines it: a CLIP vision tower, the `multi_modal_projector`, and a Llama/Qwen2 language
//! model ([`CausalLm`]) whose prompt holds one image token per image feature. Loaded from a
//! Hugging Face directory in either key layout transformers writes (`language_model.model.…`,
//! `vision_tower.…` as saved; `model.language_model.…`, `model.vision_tower.…` as held in
//! memory; `vision_tower.vision_model.…` of older checkpoints).

use std::path::{Path, PathBuf};

mod config;
mod encoder;
mod layout;

use candle_core::{DType, Device, Tensor};

use super::causal_lm::CausalLm;
use super::generate::GenerateOptions;
use super::lora::LoraSpec;
use super::vision::{ClipVision, Projector};
use super::weights::{Naming, Weights};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
pub use config::{FeatureSelect, LlavaConfig};
pub use encoder::{ImageEncoder, IMAGE_EMBEDS, PROJECTOR_MODULE};
use layout::Layout;

/// A LLaVA model.
#[derive(Debug)]
pub struct Llava {
    dir: PathBuf,
    encoder: ImageEncoder,
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
            encoder: ImageEncoder {
                config,
                vision,
                projector,
            },
            language,
        })
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its configuration.
    pub fn config(&self) -> &LlavaConfig {
        &self.encoder.config
    }

    /// The language model (its LoRA, its KV cache, its generation).
    pub fn language_model(&self) -> &CausalLm {
        &self.language
    }

    /// The language model, to attach or load adapters.
    pub fn language_model_mut(&mut self) -> &mut CausalLm {
        &mut self.language
    }

    /// Loads the PEFT adapter in `dir`: its LoRA on the language model and, if it saves
    /// one (`modules_to_save = ["multi_modal_projector"]`), its projector.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        self.encoder.load_projector(dir)?;
        self.language.load_adapter_with(dir, &[PROJECTOR_MODULE])
    }

    /// The vision tower and the projector.
    pub fn encoder(&self) -> &ImageEncoder {
        &self.encoder
    }

    /// The image side and the language model, apart (a trainer trains the one beside the
    /// other).
    pub fn into_parts(self) -> (ImageEncoder, CausalLm) {
        (self.encoder, self.language)
    }

    /// [`ImageEncoder::vision_features`].
    pub fn vision_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.encoder.vision_features(pixel_values)
    }

    /// Each image's features in the language model's embedding space, `[images, tokens,
    /// hidden]`, from `pixel_values [images, channels, size, size]`.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.encoder.project(&self.vision_features(pixel_values)?)
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
        if options.pad_token_id == self.config().image_token_index {
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

    /// The vision features of an `image_embeds` file ([`ImageEncoder::read_image_embeds`]),
    /// in the language model's dtype and device.
    pub fn read_image_embeds(&self, path: &Path) -> Result<Tensor> {
        self.encoder
            .read_image_embeds(path, self.language.dtype(), self.language.device())
    }

    /// [`ImageEncoder::write_image_embeds`].
    pub fn write_image_embeds(path: &Path, features: &Tensor) -> Result<()> {
        ImageEncoder::write_image_embeds(path, features)
    }

    fn project(&self, features: &Tensor) -> Result<Tensor> {
        self.encoder.project(features)
    }

    fn merge(&self, input_ids: &Tensor, features: Option<&Tensor>) -> Result<Tensor> {
        self.encoder.merge(&self.language, input_ids, features)
    }
}
