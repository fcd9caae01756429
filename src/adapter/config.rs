//! `adapter_config.json`: parsed from untrusted JSON, checked for features mmx cannot apply
//! faithfully, and resolved per module (rank and alpha patterns, rsLoRA).

use std::path::Path;

use regex::Regex;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A validated PEFT LoRA configuration. The raw JSON is kept so that saving writes back every
/// field PEFT wrote, including ones mmx does not read.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    /// The default rank `r`.
    pub r: usize,
    /// The default `lora_alpha` (PEFT allows a float here).
    pub lora_alpha: f64,
    /// Scaling by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Whether the base weights are stored `[in, out]` (GPT-2 `Conv1D`).
    pub fan_in_fan_out: bool,
    /// Per-module rank overrides, in file order (first match wins).
    pub rank_pattern: Vec<(String, Regex, usize)>,
    /// Per-module alpha overrides, in file order (first match wins).
    pub alpha_pattern: Vec<(String, Regex, f64)>,
    /// Modules stored whole in the adapter.
    pub modules_to_save: Vec<String>,
    /// The base model the adapter was trained on, as PEFT recorded it.
    pub base_model_name_or_path: Option<String>,
    /// The JSON as read.
    pub raw: Map<String, Value>,
}

fn fail(path: &Path, message: impl Into<String>) -> Error {
    Error::Adapter {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// PEFT's pattern rule: a key matches a module path when the path ends with it at a `.` boundary.
fn pattern(path: &Path, field: &str, key: &str) -> Result<Regex> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
        fail(
            path,
            format!("`{field}` key `{key}` is not a valid regex: {e}"),
        )
    })
}

impl LoraConfig {
    /// Parses and validates `adapter_config.json` at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let Value::Object(raw) = value else {
            return Err(fail(path, "adapter config is not a JSON object"));
        };
        Self::from_map(path, raw)
    }

    /// Validates an already parsed configuration.
    pub fn from_map(path: &Path, raw: Map<String, Value>) -> Result<Self> {
        let peft_type = raw.get("peft_type").and_then(Value::as_str);
        if peft_type != Some("LORA") {
            return Err(fail(
                path,
                format!(
                    "`peft_type` is {}, mmx reads LoRA adapters only (\"LORA\")",
                    raw.get("peft_type")
                        .map_or("missing".into(), Value::to_string)
                ),
            ));
        }
        let flag = |key: &str| raw.get(key).and_then(Value::as_bool).unwrap_or(false);
        let unsupported = |what: &str| {
            fail(
                path,
                format!("{what} is not supported by mmx; merge it with PEFT first (merge_and_unload) or retrain without it"),
            )
        };
        if flag("use_dora") {
            return Err(unsupported("DoRA (`use_dora: true`)"));
        }
        if flag("lora_bias") {
            return Err(unsupported("a LoRA bias (`lora_bias: true`)"));
        }
        match raw.get("bias").and_then(Value::as_str).unwrap_or("none") {
            "none" => {}
            other => {
                return Err(unsupported(&format!(
                    "trained biases (`bias: \"{other}\"`)"
                )))
            }
        }
        let non_empty = |key: &str| match raw.get(key) {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(Value::Bool(b)) => *b,
            Some(_) => true,
        };
        for (key, what) in [
            (
                "target_parameters",
                "LoRA on raw parameters (`target_parameters`)",
            ),
            (
                "layer_replication",
                "layer replication (`layer_replication`)",
            ),
            (
                "trainable_token_indices",
                "trainable tokens (`trainable_token_indices`)",
            ),
            ("use_qalora", "QA-LoRA (`use_qalora`)"),
            ("use_bdlora", "BD-LoRA (`use_bdlora`)"),
        ] {
            if non_empty(key) {
                return Err(unsupported(what));
            }
        }
        if let Some(init) = raw.get("init_lora_weights").and_then(Value::as_str) {
            let lower = init.to_ascii_lowercase();
            if ["pissa", "olora", "corda"]
                .iter()
                .any(|p| lower.starts_with(p))
            {
                return Err(fail(
                    path,
                    format!("`init_lora_weights: \"{init}\"` changes the base weights; save the adapter with PEFT's `path_initial_model_for_weight_conversion` so that it applies to the original base"),
                ));
            }
        }

        let r = match raw.get("r").map(Value::as_u64) {
            None => 8,
            Some(Some(r)) if r > 0 => r as usize,
            Some(_) => return Err(fail(path, "`r` must be a positive integer")),
        };
        let lora_alpha = match raw.get("lora_alpha").map(Value::as_f64) {
            None => 8.0,
            Some(Some(a)) if a.is_finite() => a,
            Some(_) => return Err(fail(path, "`lora_alpha` must be a finite number")),
        };
        let mut rank_pattern = Vec::new();
        if let Some(Value::Object(map)) = raw.get("rank_pattern") {
            for (key, v) in map {
                let rank = v.as_u64().filter(|r| *r > 0).ok_or_else(|| {
                    fail(
                        path,
                        format!("`rank_pattern.{key}` must be a positive integer"),
                    )
                })?;
                rank_pattern.push((
                    key.clone(),
                    pattern(path, "rank_pattern", key)?,
                    rank as usize,
                ));
            }
        }
        let mut alpha_pattern = Vec::new();
        if let Some(Value::Object(map)) = raw.get("alpha_pattern") {
            for (key, v) in map {
                let alpha = v.as_f64().filter(|a| a.is_finite()).ok_or_else(|| {
                    fail(
                        path,
                        format!("`alpha_pattern.{key}` must be a finite number"),
                    )
                })?;
                alpha_pattern.push((key.clone(), pattern(path, "alpha_pattern", key)?, alpha));
            }
        }
        let modules_to_save = match raw.get("modules_to_save") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| fail(path, "`modules_to_save` must list strings"))
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(fail(path, "`modules_to_save` must be a list")),
        };
        Ok(LoraConfig {
            r,
            lora_alpha,
            use_rslora: flag("use_rslora"),
            fan_in_fan_out: flag("fan_in_fan_out"),
            rank_pattern,
            alpha_pattern,
            modules_to_save,
            base_model_name_or_path: raw
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
            raw,
        })
    }

    /// The configured rank of a module (path inside the base model, e.g.
    /// `model.layers.0.self_attn.q_proj`).
    pub fn rank_for(&self, module: &str) -> usize {
        self.rank_pattern
            .iter()
            .find(|(_, re, _)| re.is_match(module))
            .map_or(self.r, |(_, _, r)| *r)
    }

    /// The alpha of a module.
    pub fn alpha_for(&self, module: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .find(|(_, re, _)| re.is_match(module))
            .map_or(self.lora_alpha, |(_, _, a)| *a)
    }

    /// The scaling `s` of a module of rank `rank`: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scaling_for(&self, module: &str, rank: usize) -> f64 {
        let alpha = self.alpha_for(module);
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<LoraConfig> {
        let Value::Object(map) = serde_json::from_str(json).unwrap() else {
            panic!("test JSON is an object")
        };
        LoraConfig::from_map(Path::new("adapter_config.json"), map)
    }

    #[test]
    fn patterns_match_at_dot_boundaries_first_key_wins() {
        let c = config(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,
                "rank_pattern":{"q_proj":4,"layers.0.self_attn.q_proj":2},
                "alpha_pattern":{"down_proj":32}}"#,
        )
        .unwrap();
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 4);
        assert_eq!(c.rank_for("model.layers.0.self_attn.xq_proj"), 8);
        assert_eq!(c.rank_for("model.layers.0.self_attn.k_proj"), 8);
        assert_eq!(c.alpha_for("model.layers.1.mlp.down_proj"), 32.0);
        assert_eq!(c.scaling_for("model.layers.1.mlp.down_proj", 8), 4.0);
        assert_eq!(c.scaling_for("model.layers.1.mlp.up_proj", 8), 2.0);
    }

    #[test]
    fn rslora_scales_by_the_square_root_of_the_rank() {
        let c = config(r#"{"peft_type":"LORA","r":16,"lora_alpha":3,"use_rslora":true}"#).unwrap();
        assert_eq!(c.scaling_for("q_proj", 16), 0.75);
    }

    #[test]
    fn refuses_features_it_cannot_apply() {
        for (json, needle) in [
            (r#"{"peft_type":"LORA","use_dora":true}"#, "DoRA"),
            (r#"{"peft_type":"LORA","lora_bias":true}"#, "bias"),
            (r#"{"peft_type":"LORA","bias":"all"}"#, "biases"),
            (r#"{"peft_type":"IA3"}"#, "LoRA adapters only"),
            (
                r#"{"peft_type":"LORA","target_parameters":["w"]}"#,
                "target_parameters",
            ),
            (
                r#"{"peft_type":"LORA","init_lora_weights":"pissa_niter_4"}"#,
                "base weights",
            ),
            (r#"{"peft_type":"LORA","r":0}"#, "`r`"),
        ] {
            let err = config(json).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }
}
