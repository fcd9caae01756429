//! The images of a vision-language base as the trainers and evaluation feed them: each
//! case's image (its `image_embeds` file if it has one, else its image file through the image
//! processor and the tower) as the rows its image tokens take, and where those tokens go in
//! the prompt: right after `<bos>`, one per image feature, before the text (LLaVA's
//! `<image>\n` first).

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use super::batch::ImageRows;
use super::case::Case;
use super::model::vision::ImageProcessor;
use super::model::{
    candle, f32_entry, f32_values, CausalLm, ImageEncoder, Llava, LlavaConfig, LoraSpec,
    ModelConfig, PROJECTOR_MODULE,
};
use crate::error::{Error, Result};

/// The language model's configuration of the model in `dir` (a LLaVA model's `text_config`).
pub fn language_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    if LlavaConfig::is_llava(&path)? {
        Ok(LlavaConfig::read(&path)?.text)
    } else {
        ModelConfig::read(&path)
    }
}

/// Whether the model in `dir` is a vision-language model (`model_type` `llava`).
pub fn is_vision_language(dir: &Path) -> Result<bool> {
    LlavaConfig::is_llava(&dir.join("config.json"))
}

/// The image side of a vision-language model: its encoder, and its image processor where the
/// model directory has one.
#[derive(Debug)]
pub struct Images {
    encoder: ImageEncoder,
    processor: Option<ImageProcessor>,
    dir: std::path::PathBuf,
    /// Whether the projector is trained ([`Images::train_projector`]).
    projector_trained: bool,
}

impl Images {
    /// Loads the model in `dir`: for a LLaVA model, its image side and its language model
    /// (with fresh LoRA updates where `lora` says); for a text model, `None` and the model.
    pub fn load(
        dir: &Path,
        lora: Option<&LoraSpec>,
        dtype: DType,
        device: &Device,
    ) -> Result<(Option<Images>, CausalLm)> {
        if !is_vision_language(dir)? {
            return Ok((None, CausalLm::load(dir, lora, dtype, device)?));
        }
        let (encoder, language) = Llava::load(dir, lora, dtype, device)?.into_parts();
        let processor_path = dir.join("preprocessor_config.json");
        let processor = processor_path
            .is_file()
            .then(|| ImageProcessor::read(&processor_path))
            .transpose()?;
        let images = Images {
            encoder,
            processor,
            dir: dir.to_path_buf(),
            projector_trained: false,
        };
        Ok((Some(images), language))
    }

    /// The encoder.
    pub fn encoder(&self) -> &ImageEncoder {
        &self.encoder
    }

    /// Loads the PEFT adapter in `dir` into `language` and, if it saves one, its projector
    /// (`modules_to_save = ["multi_modal_projector"]`) into the encoder.
    pub fn load_adapter(&mut self, language: &mut CausalLm, dir: &Path) -> Result<()> {
        self.encoder.load_projector(dir)?;
        language.load_adapter_with(dir, &[PROJECTOR_MODULE])
    }

    /// Makes the projector trainable (its variables under their adapter keys): training
    /// examples then carry vision features, which the projector turns into rows at every
    /// step ([`Images::training_rows`]).
    pub fn train_projector(&mut self) -> Result<Vec<(String, Var)>> {
        self.projector_trained = true;
        self.encoder.train_projector()
    }

    /// Whether the projector is trained.
    pub fn projector_trained(&self) -> bool {
        self.projector_trained
    }

    /// Writes `language`'s LoRA as a PEFT adapter in `dir`, with the projector as
    /// `modules_to_save` if it is trained.
    pub fn save_adapter(&self, language: &CausalLm, dir: &Path, base_name: &str) -> Result<()> {
        if !self.projector_trained {
            return language.save_adapter(dir, base_name);
        }
        let saved = self.encoder.projector_tensors();
        language.save_adapter_with(dir, base_name, &saved, &[PROJECTOR_MODULE])
    }

    /// Writes the whole LLaVA model into `dir` as it was loaded, but for the projector, which
    /// is written as it stands (trained): the loaded directory's configuration, processor
    /// and tokenizer files copied, every tensor of its checkpoint under its own name.
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        for file in std::iter::once(&"config.json").chain(crate::checkpoint::COPIED_FILES) {
            let from = self.dir.join(file);
            if from.is_file() {
                let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
                crate::tensor::write_atomic(&dir.join(file), &bytes)?;
            }
        }
        let checkpoint = crate::checkpoint::Checkpoint::open(&self.dir)?;
        let projector: std::collections::BTreeMap<String, Tensor> = self
            .encoder
            .projector_tensors()
            .into_iter()
            .filter_map(|(key, t)| {
                let name = key.strip_prefix(crate::adapter::PEFT_PREFIX)?;
                Some((name.strip_prefix("model.")?.to_string(), t))
            })
            .collect();
        let mut tensors = Vec::new();
        let mut replaced = 0;
        for name in checkpoint.names() {
            let info = checkpoint.info(name).expect("a listed tensor");
            // `multi_modal_projector.…` as saved, `model.multi_modal_projector.…` as in memory.
            let own = projector
                .get(name)
                .or_else(|| projector.get(name.strip_prefix("model.").unwrap_or(name)));
            replaced += usize::from(own.is_some());
            match own {
                Some(t) => tensors.push(f32_entry(name.to_string(), t)?),
                None => {
                    let bytes = checkpoint.read_f32(name)?;
                    let spec = crate::tensor::TensorSpec {
                        name: name.to_string(),
                        dtype: crate::tensor::Dtype::F32,
                        shape: info.shape.clone(),
                    };
                    tensors.push((spec, bytes.iter().flat_map(|v| v.to_le_bytes()).collect()));
                }
            }
        }
        if replaced != projector.len() {
            return Err(Error::Model {
                path: self.dir.clone(),
                message: format!(
                    "found {replaced} of the projector's {} tensors in the checkpoint",
                    projector.len()
                ),
            });
        }
        let metadata = std::collections::BTreeMap::from([("format".to_string(), "pt".to_string())]);
        crate::tensor::write_safetensors(&dir.join("model.safetensors"), &tensors, &metadata)
    }

    /// What a training example of `case` carries: its image's rows in the language model's
    /// space ([`Images::rows`]), or its vision features where the projector is trained.
    pub fn training_rows(&self, case: &Case, device: &Device) -> Result<Option<ImageRows>> {
        if !self.projector_trained {
            return self.rows(case, device);
        }
        self.vision_features(case, device)?
            .map(|f| image_rows(&f, "vision features"))
            .transpose()
    }

    /// The token that stands for one image feature.
    pub fn image_token(&self) -> u32 {
        self.encoder.config().image_token_index
    }

    /// Image tokens per image.
    pub fn tokens_per_image(&self) -> usize {
        self.encoder.config().image_tokens()
    }

    /// The vision features `[1, tokens, vision hidden]` of `case`'s image, `None` for a case
    /// without one; an unreadable image or features of the wrong shape are errors naming the
    /// case and the file.
    pub fn vision_features(&self, case: &Case, device: &Device) -> Result<Option<Tensor>> {
        let in_case = |e: Error| Error::ModelInput {
            message: format!("case `{}`: {e}", case.id()),
        };
        if let Some(path) = case.image_embeds_file() {
            return self
                .encoder
                .read_image_embeds(&path, DType::F32, device)
                .map(Some)
                .map_err(in_case);
        }
        let Some(path) = case.image_file() else {
            return Ok(None);
        };
        if !path.is_file() {
            return Err(in_case(Error::ModelInput {
                message: format!("image `{}` does not exist", path.display()),
            }));
        }
        let processor = self.processor.as_ref().ok_or_else(|| {
            in_case(Error::ModelInput {
                message: format!(
                    "image `{}` needs the model's `preprocessor_config.json`, which `{}` lacks (or give the case `image_embeds` from `mmx data embed`)",
                    path.display(),
                    self.dir.display()
                ),
            })
        })?;
        let pixels = processor
            .pixel_values(&[path.as_path()], device)
            .map_err(in_case)?;
        self.encoder.vision_features(&pixels).map(Some)
    }

    /// `case`'s image through the tower (or its `image_embeds`) and the projector: one row per
    /// image token, in the language model's embedding space; `None` without an image.
    pub fn rows(&self, case: &Case, device: &Device) -> Result<Option<ImageRows>> {
        self.vision_features(case, device)?
            .map(|features| self.project_rows(&features))
            .transpose()
    }

    /// A blank image (every pixel the processor's mean, so zeros after normalisation)
    /// through the tower and the projector: what a case shows when its image is blanked.
    pub fn blank_rows(&self, device: &Device) -> Result<ImageRows> {
        let v = &self.encoder.config().vision;
        let pixels = Tensor::zeros(
            (1, v.num_channels, v.image_size, v.image_size),
            DType::F32,
            device,
        )
        .map_err(candle("blank image"))?;
        let features = self.encoder.vision_features(&pixels)?;
        self.project_rows(&features)
    }

    fn project_rows(&self, features: &Tensor) -> Result<ImageRows> {
        image_rows(&self.encoder.project(features)?, "image features")
    }

    /// The prompt ids with the image's tokens first (after `<bos>` if there is one).
    pub fn prompt_with_image(&self, bos: Option<u32>, text: &[u32], image: bool) -> Vec<u32> {
        let mut ids: Vec<u32> = bos.into_iter().collect();
        if image {
            ids.extend(std::iter::repeat_n(
                self.image_token(),
                self.tokens_per_image(),
            ));
        }
        ids.extend_from_slice(text);
        ids
    }
}

/// One image's `[1, tokens, width]` as rows.
fn image_rows(t: &Tensor, what: &str) -> Result<ImageRows> {
    let width = t.dim(2).map_err(candle(what))?;
    Ok(ImageRows::new(f32_values(t, what)?, width))
}

/// Refuses a case with an image for a text-only model (it would be trained or scored without
/// what its image shows).
pub fn refuse_images_without_tower(cases: &[&Case], model_dir: &Path) -> Result<()> {
    match cases.iter().find(|c| c.has_image()) {
        Some(case) => Err(Error::ModelInput {
            message: format!(
                "case `{}` has an image, but `{}` is a text-only model (a LLaVA model reads images)",
                case.id(),
                model_dir.display()
            ),
        }),
        None => Ok(()),
    }
}
