//! [`ModelConfig`]: a Hugging Face `config.json` for a Llama or Qwen2 model, parsed into a wire
//! struct and validated (sizes positive, heads divisible, only the features the trainers'
//! model implements).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::projection::Projection;
use crate::error::{Error, Result};

/// The model families the trainers' model implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `model_type: "llama"` (Llama 2/3, TinyLlama, SmolLM, ...).
    Llama,
    /// `model_type: "qwen2"` (Qwen2, Qwen2.5).
    Qwen2,
}

impl Architecture {
    /// The `model_type` string.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// A validated model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The model family.
    pub architecture: Architecture,
    /// Rows of the embedding and of the output head.
    pub vocab_size: usize,
    /// The residual stream width.
    pub hidden_size: usize,
    /// The MLP's inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (fewer than query heads: grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// The RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// The rotary base.
    pub rope_theta: f64,
    /// Whether the output head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections have a bias (always for Qwen2; `attention_bias` for Llama).
    pub attention_bias: bool,
    /// Whether the attention output projection has a bias (Llama's `attention_bias`).
    pub o_proj_bias: bool,
    /// Whether the MLP projections have a bias (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// The longest sequence the rotary table covers.
    pub max_position_embeddings: usize,
    /// The beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// The end-of-sequence tokens (a config may list several).
    pub eos_token_ids: Vec<u32>,
    /// The padding token.
    pub pad_token_id: Option<u32>,
}

/// `config.json` as written, before validation.
#[derive(Debug, Deserialize)]
struct Wire {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
}

/// A JSON file of a model directory (`config.json`, `preprocessor_config.json`) parsed as `T`;
/// errors name the file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

impl ModelConfig {
    /// Reads and validates `config.json` at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(path, &bytes)
    }

    /// Validates the bytes of a `config.json`; `path` names it in errors.
    pub fn from_json(path: &Path, bytes: &[u8]) -> Result<Self> {
        let wire: Wire = serde_json::from_slice(bytes).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::validate(path, wire)
    }

    fn validate(path: &Path, w: Wire) -> Result<Self> {
        let fail = |message: String| Error::Model {
            path: path.to_path_buf(),
            message,
        };
        let architecture = match w.model_type.as_deref() {
            Some("llama") => Architecture::Llama,
            Some("qwen2") => Architecture::Qwen2,
            Some(other) => {
                return Err(fail(format!(
                    "architecture `{other}` (`model_type`) is not supported: the trainers' model implements `llama` and `qwen2`"
                )))
            }
            None => return Err(fail("has no `model_type`".into())),
        };
        let required = |value: Option<usize>, field: &str| match value {
            Some(v) if v > 0 => Ok(v),
            Some(_) => Err(fail(format!("`{field}` must be positive"))),
            None => Err(fail(format!("`{field}` is missing"))),
        };
        let vocab_size = required(w.vocab_size, "vocab_size")?;
        let hidden_size = required(w.hidden_size, "hidden_size")?;
        let intermediate_size = required(w.intermediate_size, "intermediate_size")?;
        let num_hidden_layers = required(w.num_hidden_layers, "num_hidden_layers")?;
        let num_attention_heads = required(w.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = required(
            w.num_key_value_heads.or(Some(num_attention_heads)),
            "num_key_value_heads",
        )?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(fail(format!(
                "`num_attention_heads` ({num_attention_heads}) is not a multiple of `num_key_value_heads` ({num_key_value_heads})"
            )));
        }
        let head_dim = match w.head_dim {
            Some(d) => required(Some(d), "head_dim")?,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(fail(format!(
                    "`hidden_size` ({hidden_size}) is not a multiple of `num_attention_heads` ({num_attention_heads}) and `head_dim` is not given"
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(fail(format!(
                "`head_dim` ({head_dim}) must be even for rotary embeddings"
            )));
        }
        let positive = |value: f64, field: &str| {
            if value.is_finite() && value > 0.0 {
                Ok(value)
            } else {
                Err(fail(format!(
                    "`{field}` must be a positive number, not {value}"
                )))
            }
        };
        let rms_norm_eps = positive(w.rms_norm_eps.unwrap_or(1e-6), "rms_norm_eps")?;

        // transformers 5 moved `rope_theta` into `rope_parameters`; older files have it at the
        // top level and `rope_scaling` beside it.
        let mut rope_theta = w.rope_theta;
        for (field, params) in [
            ("rope_parameters", &w.rope_parameters),
            ("rope_scaling", &w.rope_scaling),
        ] {
            match params {
                None | Some(Value::Null) => {}
                Some(Value::Object(map)) => {
                    let kind = map
                        .get("rope_type")
                        .or_else(|| map.get("type"))
                        .and_then(Value::as_str)
                        .unwrap_or("default");
                    if kind != "default" {
                        return Err(fail(format!(
                            "`{field}.rope_type` `{kind}` is not supported: the trainers' model implements the default rotary embedding only"
                        )));
                    }
                    if let Some(theta) = map.get("rope_theta") {
                        let theta = theta
                            .as_f64()
                            .ok_or_else(|| fail(format!("`{field}.rope_theta` is not a number")))?;
                        rope_theta = Some(theta);
                    }
                }
                Some(_) => return Err(fail(format!("`{field}` is not an object"))),
            }
        }
        let rope_theta = positive(rope_theta.unwrap_or(10_000.0), "rope_theta")?;

        match w.hidden_act.as_deref() {
            None | Some("silu") => {}
            Some(other) => {
                return Err(fail(format!(
                    "`hidden_act` `{other}` is not supported: the trainers' model implements `silu`"
                )))
            }
        }
        if w.use_sliding_window == Some(true) {
            return Err(fail(
                "`use_sliding_window: true` is not supported: the trainers' model implements full attention only".into(),
            ));
        }
        if let Some(kind) = w
            .layer_types
            .iter()
            .flatten()
            .find(|t| t.as_str() != "full_attention")
        {
            return Err(fail(format!(
                "`layer_types` lists `{kind}`: the trainers' model implements `full_attention` only"
            )));
        }

        let (attention_bias, o_proj_bias, mlp_bias) = match architecture {
            Architecture::Qwen2 => (true, false, false),
            Architecture::Llama => {
                let a = w.attention_bias.unwrap_or(false);
                (a, a, w.mlp_bias.unwrap_or(false))
            }
        };
        let default_positions = match architecture {
            Architecture::Llama => 2048,
            Architecture::Qwen2 => 32768,
        };
        let max_position_embeddings = required(
            w.max_position_embeddings.or(Some(default_positions)),
            "max_position_embeddings",
        )?;

        let token = |value: &Option<Value>, field: &str| -> Result<Vec<u32>> {
            let ids = match value {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items.iter().collect(),
                Some(v) => vec![v],
            };
            ids.into_iter()
                .map(|v| {
                    v.as_u64()
                        .filter(|&id| id < vocab_size as u64)
                        .map(|id| id as u32)
                        .ok_or_else(|| {
                            fail(format!(
                                "`{field}` {v} is not a token id below `vocab_size` ({vocab_size})"
                            ))
                        })
                })
                .collect()
        };
        let single = |value: &Option<Value>, field: &str| -> Result<Option<u32>> {
            let ids = token(value, field)?;
            match ids.as_slice() {
                [] => Ok(None),
                [id] => Ok(Some(*id)),
                _ => Err(fail(format!("`{field}` must be one token id, not a list"))),
            }
        };

        Ok(ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings: w.tie_word_embeddings.unwrap_or(false),
            attention_bias,
            o_proj_bias,
            mlp_bias,
            max_position_embeddings,
            bos_token_id: single(&w.bos_token_id, "bos_token_id")?,
            eos_token_ids: token(&w.eos_token_id, "eos_token_id")?,
            pad_token_id: single(&w.pad_token_id, "pad_token_id")?,
        })
    }

    /// `(out_features, in_features)` of a projection's weight.
    pub fn projection_shape(&self, projection: Projection) -> (usize, usize) {
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        match projection {
            Projection::Q => (q, self.hidden_size),
            Projection::K | Projection::V => (kv, self.hidden_size),
            Projection::O => (self.hidden_size, q),
            Projection::Gate | Projection::Up => (self.intermediate_size, self.hidden_size),
            Projection::Down => (self.hidden_size, self.intermediate_size),
        }
    }

    /// Whether a projection has a bias.
    pub fn projection_bias(&self, projection: Projection) -> bool {
        match projection {
            Projection::Q | Projection::K | Projection::V => self.attention_bias,
            Projection::O => self.o_proj_bias,
            Projection::Gate | Projection::Up | Projection::Down => self.mlp_bias,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(Path::new("m/config.json"), json.as_bytes())
    }

    const LLAMA: &str = r#"{"model_type":"llama","vocab_size":256,"hidden_size":64,
        "intermediate_size":96,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"rope_parameters":{"rope_type":"default","rope_theta":500000.0},
        "tie_word_embeddings":true,"bos_token_id":1,"eos_token_id":[2,3]}"#;

    #[test]
    fn reads_llama_with_defaults_and_nested_rope_theta() {
        let c = parse(LLAMA).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 500_000.0);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.max_position_embeddings, 2048);
        assert_eq!(c.eos_token_ids, [2, 3]);
        assert_eq!(c.bos_token_id, Some(1));
        assert_eq!(c.pad_token_id, None);
        assert!(c.tie_word_embeddings && !c.attention_bias && !c.o_proj_bias);
        assert_eq!(c.projection_shape(Projection::K), (32, 64));
        assert_eq!(c.projection_shape(Projection::Down), (64, 96));
    }

    #[test]
    fn qwen2_has_qkv_biases_and_top_level_rope_theta() {
        let c = parse(
            r#"{"model_type":"qwen2","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"rope_theta":1000000.0}"#,
        )
        .unwrap();
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.rope_theta, 1e6);
        assert!(c.projection_bias(Projection::V) && !c.projection_bias(Projection::O));
        assert!(!c.projection_bias(Projection::Up));
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let base = r#""vocab_size":256,"hidden_size":64,"intermediate_size":96,
            "num_hidden_layers":2,"num_attention_heads":4"#;
        for (extra, needle) in [
            (r#""model_type":"mistral""#, "architecture `mistral`"),
            (
                r#""model_type":"llama","num_key_value_heads":3"#,
                "not a multiple of `num_key_value_heads` (3)",
            ),
            (r#""model_type":"llama","head_dim":15"#, "must be even"),
            (
                r#""model_type":"llama","rope_scaling":{"rope_type":"llama3"}"#,
                "`rope_scaling.rope_type` `llama3`",
            ),
            (
                r#""model_type":"llama","hidden_act":"gelu""#,
                "`hidden_act` `gelu`",
            ),
            (
                r#""model_type":"qwen2","use_sliding_window":true"#,
                "use_sliding_window",
            ),
            (
                r#""model_type":"llama","eos_token_id":300"#,
                "`eos_token_id` 300",
            ),
            (r#""model_type":"llama","rms_norm_eps":0"#, "`rms_norm_eps`"),
        ] {
            let err = parse(&format!("{{{extra},{base}}}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{extra}: {err}");
            assert!(err.contains("m/config.json"), "{err}");
        }
        let err = parse(r#"{"model_type":"llama","hidden_size":64}"#).unwrap_err();
        assert!(err.to_string().contains("`vocab_size` is missing"), "{err}");
        let err = parse(
            r#"{"model_type":"llama","vocab_size":256,"hidden_size":60,"intermediate_size":96,
            "num_hidden_layers":2,"num_attention_heads":8}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("`hidden_size` (60)"), "{err}");
    }
}
