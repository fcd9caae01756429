//! A LLaVA model from a text model: its language model is the text model's (weights and
//! tokenizer unchanged but for `<image>`, a spare row of its vocabulary becoming the image
//! token), and a CLIP
//! vision tower and the projector are drawn from a seed with Hugging Face's initialisation.
//! Written as transformers saves `LlavaForConditionalGeneration` (`config.json`,
//! `model.safetensors` in its saved key layout, `preprocessor_config.json`, the tokenizer with
//! an `<image>` token), so transformers and PEFT load it as they load any LLaVA checkpoint.
//! Its tower is random and stays frozen; the projector is what training teaches to read it
//! (LLaVA's first stage), with the language model's LoRA.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

use super::init::normal;
use super::tokenizer::Tokenizer;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::rng::SplitMix;
use crate::tensor::{write_atomic, write_safetensors, Dtype, TensorSpec};

/// The image token's text in the tokenizer.
pub const IMAGE_TOKEN: &str = "<image>";

/// The shape of a new vision tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionInit {
    /// The side of the (square) images it reads, in pixels.
    pub image_size: usize,
    /// The side of a patch; `image_size / patch_size` squared patches are its image tokens.
    pub patch_size: usize,
    /// Width of the tower.
    pub hidden_size: usize,
    /// Encoder layers (the features are read at the last but one, LLaVA's default).
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Width of its MLP.
    pub intermediate_size: usize,
}

/// How a drawn tensor starts.
#[derive(Clone, Copy)]
enum Draw {
    Normal(f32),
    Ones,
    Zeros,
}

/// Writes into `out` the LLaVA model of the text model in `text_dir` with a tower shaped as
/// `vision` says, drawn from `seed`. The image token is the first row of the text vocabulary
/// past its tokenizer's ids (models pad their vocabularies; one without a spare row is refused).
pub fn init_llava(text_dir: &Path, out: &Path, vision: &VisionInit, seed: u64) -> Result<()> {
    let fail = |message: String| Error::Model {
        path: text_dir.to_path_buf(),
        message,
    };
    let v = vision;
    if v.patch_size == 0
        || !v.image_size.is_multiple_of(v.patch_size)
        || v.num_attention_heads == 0
        || !v.hidden_size.is_multiple_of(v.num_attention_heads)
        || v.num_hidden_layers < 2
    {
        return Err(fail(format!(
            "the vision tower needs `image_size` a multiple of `patch_size`, `hidden_size` a multiple of `num_attention_heads` and at least 2 layers: {vision:?}"
        )));
    }
    let text_path = text_dir.join("config.json");
    let text: Value =
        serde_json::from_slice(&std::fs::read(&text_path).map_err(|e| Error::io(&text_path, e))?)
            .map_err(|e| fail(format!("`config.json` is not JSON: {e}")))?;
    let (Some(vocab), Some(hidden)) = (
        text["vocab_size"].as_u64().map(|n| n as usize),
        text["hidden_size"].as_u64().map(|n| n as usize),
    ) else {
        return Err(fail(
            "`config.json` lacks `vocab_size` or `hidden_size`".into(),
        ));
    };
    let tokenizer = Tokenizer::load(text_dir)?;
    if tokenizer.vocab_size() >= vocab {
        return Err(fail(format!(
            "the tokenizer uses every one of the {vocab} rows: no row is left for the image token"
        )));
    }
    // The first id past the tokenizer's (a tokenizer numbers its added tokens on from there).
    let image_token = tokenizer.vocab_size();
    let grid = v.image_size / v.patch_size;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let pretty = |value: &Value| serde_json::to_vec_pretty(value).expect("JSON serialises");

    let config = json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": image_token,
        "image_seq_length": grid * grid,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": true,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": text["tie_word_embeddings"],
        "text_config": text,
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "num_channels": 3,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 1.0,
            "projection_dim": v.hidden_size,
        },
        "torch_dtype": "float32",
    });
    write_atomic(&out.join("config.json"), &pretty(&config))?;
    let preprocessor = json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true,
        "size": {"shortest_edge": v.image_size},
        "resample": 3,
        "do_center_crop": true,
        "crop_size": {"height": v.image_size, "width": v.image_size},
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": true,
    });
    write_atomic(
        &out.join("preprocessor_config.json"),
        &pretty(&preprocessor),
    )?;
    write_tokenizer(text_dir, out, image_token)?;

    // The language model's tensors under the saved layout's names, then the drawn ones.
    let checkpoint = Checkpoint::open(text_dir)?;
    let mut tensors: Vec<(TensorSpec, Vec<u8>)> = Vec::new();
    for name in checkpoint.names() {
        let info = checkpoint.info(name).expect("a listed tensor");
        let saved = match name.strip_prefix("model.") {
            Some(rest) => format!("language_model.model.{rest}"),
            None => format!("language_model.{name}"),
        };
        let values = checkpoint.read_f32(name)?;
        tensors.push((
            TensorSpec {
                name: saved,
                dtype: Dtype::F32,
                shape: info.shape.clone(),
            },
            values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let (h, m) = (v.hidden_size, v.intermediate_size);
    let mut drawn: Vec<(String, Vec<usize>, Draw)> = vec![
        (
            "vision_tower.embeddings.class_embedding".into(),
            vec![h],
            Draw::Normal((h as f32).powf(-0.5)),
        ),
        (
            "vision_tower.embeddings.patch_embedding.weight".into(),
            vec![h, 3, v.patch_size, v.patch_size],
            Draw::Normal(0.02),
        ),
        (
            "vision_tower.embeddings.position_embedding.weight".into(),
            vec![grid * grid + 1, h],
            Draw::Normal(0.02),
        ),
        (
            "vision_tower.pre_layrnorm.weight".into(),
            vec![h],
            Draw::Ones,
        ),
        (
            "vision_tower.pre_layrnorm.bias".into(),
            vec![h],
            Draw::Zeros,
        ),
    ];
    for i in 0..v.num_hidden_layers {
        let p = format!("vision_tower.encoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            drawn.push((
                format!("{p}.self_attn.{proj}.weight"),
                vec![h, h],
                Draw::Normal(0.02),
            ));
            drawn.push((format!("{p}.self_attn.{proj}.bias"), vec![h], Draw::Zeros));
        }
        for norm in ["layer_norm1", "layer_norm2"] {
            drawn.push((format!("{p}.{norm}.weight"), vec![h], Draw::Ones));
            drawn.push((format!("{p}.{norm}.bias"), vec![h], Draw::Zeros));
        }
        drawn.push((
            format!("{p}.mlp.fc1.weight"),
            vec![m, h],
            Draw::Normal(0.02),
        ));
        drawn.push((format!("{p}.mlp.fc1.bias"), vec![m], Draw::Zeros));
        drawn.push((
            format!("{p}.mlp.fc2.weight"),
            vec![h, m],
            Draw::Normal(0.02),
        ));
        drawn.push((format!("{p}.mlp.fc2.bias"), vec![h], Draw::Zeros));
    }
    drawn.push((
        "vision_tower.post_layernorm.weight".into(),
        vec![h],
        Draw::Ones,
    ));
    drawn.push((
        "vision_tower.post_layernorm.bias".into(),
        vec![h],
        Draw::Zeros,
    ));
    drawn.push((
        "multi_modal_projector.linear_1.weight".into(),
        vec![hidden, h],
        Draw::Normal(0.02),
    ));
    drawn.push((
        "multi_modal_projector.linear_1.bias".into(),
        vec![hidden],
        Draw::Zeros,
    ));
    drawn.push((
        "multi_modal_projector.linear_2.weight".into(),
        vec![hidden, hidden],
        Draw::Normal(0.02),
    ));
    drawn.push((
        "multi_modal_projector.linear_2.bias".into(),
        vec![hidden],
        Draw::Zeros,
    ));
    for (index, (name, shape, draw)) in drawn.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut rng = SplitMix::derive(seed, &[0x7669_7369_6f6e, index as u64]);
        let values: Vec<f32> = match draw {
            Draw::Normal(std) => (0..n).map(|_| std * normal(&mut rng)).collect(),
            Draw::Ones => vec![1.0; n],
            Draw::Zeros => vec![0.0; n],
        };
        tensors.push((
            TensorSpec {
                name,
                dtype: Dtype::F32,
                shape,
            },
            values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&out.join("model.safetensors"), &tensors, &metadata)
}

/// The text model's `tokenizer.json` (and `tokenizer_config.json`) with `<image>` added as a
/// special token of id `image_token`.
fn write_tokenizer(text_dir: &Path, out: &Path, image_token: usize) -> Result<()> {
    let path = text_dir.join("tokenizer.json");
    let mut tokenizer: Value = serde_json::from_slice(
        &std::fs::read(&path).map_err(|e| Error::io(&path, e))?,
    )
    .map_err(|e| Error::Tokenizer {
        path: path.clone(),
        message: format!("not JSON: {e}"),
    })?;
    let added = tokenizer["added_tokens"]
        .as_array_mut()
        .ok_or_else(|| Error::Tokenizer {
            path: path.clone(),
            message: "no `added_tokens` list".into(),
        })?;
    added.push(
        json!({"id": image_token, "content": IMAGE_TOKEN, "single_word": false,
        "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
    );
    let pretty = |value: &Value| serde_json::to_vec_pretty(value).expect("JSON serialises");
    write_atomic(&out.join("tokenizer.json"), &pretty(&tokenizer))?;
    let config_path = text_dir.join("tokenizer_config.json");
    if config_path.is_file() {
        let bytes = std::fs::read(&config_path).map_err(|e| Error::io(&config_path, e))?;
        write_atomic(&out.join("tokenizer_config.json"), &bytes)?;
    }
    Ok(())
}
