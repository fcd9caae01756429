//! [`LlavaConfig`]: what a LLaVA `config.json` says: the language model's and the vision
//! tower's configurations, the image token, which layer's features are read and how they are
//! selected, the projector's activation.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::train::model::config::{read_json, ModelConfig};
use crate::train::model::vision::{Activation, VisionConfig};

/// Which hidden states of the tower become image features.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FeatureSelect {
    /// `default`: every patch, the class token dropped.
    Patches,
    /// `full`: the class token and every patch.
    Full,
}

/// What a LLaVA `config.json` says beyond its text and vision configurations.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    /// The language model's (`text_config`).
    pub text: ModelConfig,
    /// The vision tower's (`vision_config`).
    pub vision: VisionConfig,
    /// The id of the token that stands for one image feature.
    pub image_token_index: u32,
    /// The tower's layer whose hidden states are the features (negative: from the end).
    pub vision_feature_layer: i64,
    /// `vision_feature_select_strategy`.
    pub select: FeatureSelect,
    /// `projector_hidden_act`.
    pub projector_act: Activation,
    /// `multimodal_projector_bias`.
    pub projector_bias: bool,
}

#[derive(Deserialize)]
struct Wire {
    model_type: Option<String>,
    text_config: serde_json::Value,
    vision_config: VisionConfig,
    #[serde(alias = "image_token_id")]
    image_token_index: Option<u32>,
    vision_feature_layer: Option<serde_json::Value>,
    vision_feature_select_strategy: Option<String>,
    projector_hidden_act: Option<String>,
    multimodal_projector_bias: Option<bool>,
}

impl LlavaConfig {
    /// Whether the `config.json` at `path` is a LLaVA model's (`model_type` `llava`).
    pub fn is_llava(path: &Path) -> Result<bool> {
        #[derive(Deserialize)]
        struct Kind {
            model_type: Option<String>,
        }
        let kind: Kind = read_json(path)?;
        Ok(kind.model_type.as_deref() == Some("llava"))
    }

    /// Reads and checks a LLaVA `config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let w: Wire = read_json(path)?;
        let fail = |message: String| Error::Model {
            path: path.to_path_buf(),
            message,
        };
        if w.model_type.as_deref() != Some("llava") {
            return Err(fail(format!(
                "`model_type` is {:?}; a vision-language model here is `llava`",
                w.model_type
            )));
        }
        let text = ModelConfig::from_json(path, w.text_config.to_string().as_bytes())?;
        if let Some(problem) = w.vision_config.problem() {
            return Err(fail(format!("`vision_config`: {problem}")));
        }
        let layer = match w.vision_feature_layer {
            None => -2,
            Some(serde_json::Value::Number(n)) if n.as_i64().is_some() => n.as_i64().unwrap_or(-2),
            Some(other) => {
                return Err(fail(format!(
                    "`vision_feature_layer` {other} is not one layer (lists of layers are not read yet)"
                )))
            }
        };
        let layers = w.vision_config.num_hidden_layers as i64;
        if !(-layers - 1..=layers).contains(&layer) {
            return Err(fail(format!(
                "`vision_feature_layer` {layer} is outside a tower of {layers} layers"
            )));
        }
        let select = match w.vision_feature_select_strategy.as_deref() {
            None | Some("default") => FeatureSelect::Patches,
            Some("full") => FeatureSelect::Full,
            Some(other) => {
                return Err(fail(format!(
                    "`vision_feature_select_strategy` {other:?} is not `default` or `full`"
                )))
            }
        };
        let projector_act = Activation::parse(w.projector_hidden_act.as_deref().unwrap_or("gelu"))
            .map_err(|m| fail(format!("`projector_hidden_act`: {m}")))?;
        let image_token_index = w
            .image_token_index
            .ok_or_else(|| fail("no `image_token_index`".into()))?;
        if image_token_index as usize >= text.vocab_size {
            return Err(fail(format!(
                "`image_token_index` {image_token_index} is outside the vocabulary ({})",
                text.vocab_size
            )));
        }
        Ok(LlavaConfig {
            text,
            vision: w.vision_config,
            image_token_index,
            vision_feature_layer: layer,
            select,
            projector_act,
            projector_bias: w.multimodal_projector_bias.unwrap_or(true),
        })
    }

    /// How many encoder layers run before the features are read.
    pub fn feature_depth(&self) -> usize {
        let layers = self.vision.num_hidden_layers as i64;
        let at = if self.vision_feature_layer < 0 {
            layers + 1 + self.vision_feature_layer
        } else {
            self.vision_feature_layer
        };
        at as usize
    }

    /// Image tokens per image.
    pub fn image_tokens(&self) -> usize {
        let patches = self.vision.grid() * self.vision.grid();
        match self.select {
            FeatureSelect::Patches => patches,
            FeatureSelect::Full => patches + 1,
        }
    }
}
