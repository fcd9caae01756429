//! Parameter values as mergekit writes them: a scalar, a gradient (a list interpolated over the
//! layer index), or a list of `{filter, value}` where the first filter contained in the tensor
//! name wins.

use serde_json::Value;

/// A resolved scalar.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    /// A number.
    Number(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Text(String),
}

/// A parameter value before it is resolved for one tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// The same value for every tensor.
    Scalar(Scalar),
    /// Piecewise-linear over t = layer / (layers − 1) for numbers; a step for booleans and
    /// strings (mergekit's rule).
    Gradient(Vec<Scalar>),
    /// The first entry whose filter is a substring of the tensor name (or is absent or `*`).
    Filtered(Vec<(Option<String>, ParamValue)>),
}

fn scalar(v: &Value) -> Option<Scalar> {
    match v {
        Value::Number(n) => n.as_f64().map(Scalar::Number),
        Value::Bool(b) => Some(Scalar::Bool(*b)),
        Value::String(s) => Some(Scalar::Text(s.clone())),
        _ => None,
    }
}

/// Why a parameter value was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    /// Neither a scalar nor a list.
    #[error("expected a number, boolean, string, gradient list or filter list, found {0}")]
    NotAValue(Value),
    /// `[]`.
    #[error("an empty list is not a value")]
    EmptyList,
    /// A list mixing scalars and tables, or holding something else.
    #[error(
        "a list must hold only scalars (a gradient) or only {{filter, value}} tables, found {0}"
    )]
    MixedList(Value),
    /// A `{filter, value}` entry with another key.
    #[error("unknown key `{0}` in a {{filter, value}} entry")]
    UnknownKey(String),
    /// A `filter` that is not a string.
    #[error("`filter` must be a string, found {0}")]
    FilterNotText(Value),
    /// A `{filter, value}` entry without `value`.
    #[error("a {{filter, value}} entry has no `value`")]
    NoValue,
}

impl ParamValue {
    /// Reads a value from the JSON form that both TOML and YAML recipes are converted to.
    pub fn from_json(v: &Value) -> Result<ParamValue, ValueError> {
        if let Some(s) = scalar(v) {
            return Ok(ParamValue::Scalar(s));
        }
        let Value::Array(items) = v else {
            return Err(ValueError::NotAValue(v.clone()));
        };
        if items.is_empty() {
            return Err(ValueError::EmptyList);
        }
        if let Some(values) = items.iter().map(scalar).collect::<Option<Vec<_>>>() {
            return Ok(ParamValue::Gradient(values));
        }
        let mut entries = Vec::with_capacity(items.len());
        for item in items {
            let Value::Object(map) = item else {
                return Err(ValueError::MixedList(item.clone()));
            };
            if let Some(key) = map.keys().find(|k| *k != "filter" && *k != "value") {
                return Err(ValueError::UnknownKey(key.clone()));
            }
            let filter = match map.get("filter") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => return Err(ValueError::FilterNotText(other.clone())),
            };
            let value = map.get("value").ok_or(ValueError::NoValue)?;
            entries.push((filter, ParamValue::from_json(value)?));
        }
        Ok(ParamValue::Filtered(entries))
    }

    /// Whether the value changes with the layer's depth (a gradient of several values), so
    /// that resolving it needs the model's layer count.
    pub fn varies_with_depth(&self) -> bool {
        match self {
            ParamValue::Scalar(_) => false,
            ParamValue::Gradient(values) => values.len() > 1,
            ParamValue::Filtered(entries) => entries.iter().any(|(_, v)| v.varies_with_depth()),
        }
    }

    /// The value for tensor `name` at relative depth `t` in [0, 1]; `None` when no filter
    /// matches (the parameter then falls back to the next level or its default).
    pub fn resolve(&self, name: &str, t: f64) -> Option<Scalar> {
        match self {
            ParamValue::Scalar(s) => Some(s.clone()),
            ParamValue::Gradient(values) => {
                if values.len() == 1 {
                    return Some(values[0].clone());
                }
                let numbers: Option<Vec<f64>> = values
                    .iter()
                    .map(|v| match v {
                        Scalar::Number(n) => Some(*n),
                        _ => None,
                    })
                    .collect();
                let scaled = t * (values.len() - 1) as f64;
                let i0 = (scaled as usize).min(values.len() - 1);
                match numbers {
                    Some(n) => {
                        let i1 = (i0 + 1).min(values.len() - 1);
                        let frac = scaled - i0 as f64;
                        Some(Scalar::Number((1.0 - frac) * n[i0] + frac * n[i1]))
                    }
                    None => Some(values[i0].clone()),
                }
            }
            ParamValue::Filtered(entries) => entries
                .iter()
                .find(|(f, _)| match f.as_deref() {
                    None | Some("*") => true,
                    Some(f) => name.contains(f),
                })
                .and_then(|(_, v)| v.resolve(name, t)),
        }
    }
}

/// The relative depth mergekit evaluates gradients at: layer / (layers − 1) for tensors inside a
/// numbered layer (1 with a single layer), 0 for everything else (embeddings, final norm, head).
pub fn layer_position(name: &str, num_layers: Option<usize>) -> f64 {
    match (layer_index(name), num_layers) {
        (Some(_), Some(1)) => 1.0,
        (Some(i), Some(n)) if n > 1 => i as f64 / (n - 1) as f64,
        _ => 0.0,
    }
}

/// The index of the transformer layer a tensor belongs to (`model.layers.3.mlp...` is 3),
/// `None` outside the layers.
pub fn layer_index(name: &str) -> Option<usize> {
    name.split('.')
        .collect::<Vec<_>>()
        .windows(2)
        .find_map(|w| {
            matches!(w[0], "layers" | "h" | "layer" | "blocks")
                .then(|| w[1].parse::<usize>().ok())
                .flatten()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(json: &str) -> ParamValue {
        ParamValue::from_json(&serde_json::from_str(json).unwrap()).unwrap()
    }

    #[test]
    fn gradients_interpolate_piecewise_linearly() {
        let v = value("[0.0, 1.0, 0.5]");
        assert_eq!(v.resolve("x", 0.0), Some(Scalar::Number(0.0)));
        assert_eq!(v.resolve("x", 0.25), Some(Scalar::Number(0.5)));
        assert_eq!(v.resolve("x", 0.75), Some(Scalar::Number(0.75)));
        assert_eq!(v.resolve("x", 1.0), Some(Scalar::Number(0.5)));
        let steps = value("[true, false]");
        assert_eq!(steps.resolve("x", 0.9), Some(Scalar::Bool(true)));
        assert_eq!(steps.resolve("x", 1.0), Some(Scalar::Bool(false)));
    }

    #[test]
    fn first_matching_filter_wins() {
        let v = value(
            r#"[{"filter":"mlp","value":0.3},{"filter":"self_attn","value":[0.1,0.9]},{"value":0.7}]"#,
        );
        assert_eq!(
            v.resolve("model.layers.0.mlp.up_proj.weight", 0.0),
            Some(Scalar::Number(0.3))
        );
        assert_eq!(
            v.resolve("model.layers.1.self_attn.q_proj.weight", 1.0),
            Some(Scalar::Number(0.9))
        );
        assert_eq!(
            v.resolve("model.norm.weight", 0.0),
            Some(Scalar::Number(0.7))
        );
        let no_fallback = value(r#"[{"filter":"mlp","value":0.3}]"#);
        assert_eq!(no_fallback.resolve("lm_head.weight", 0.0), None);
    }

    #[test]
    fn refuses_malformed_values() {
        for json in [
            r#"{"a":1}"#,
            "[]",
            r#"[{"filter":"x"}]"#,
            r#"[{"filter":1,"value":2}]"#,
            r#"[1, {"value":2}]"#,
        ] {
            assert!(
                ParamValue::from_json(&serde_json::from_str(json).unwrap()).is_err(),
                "{json}"
            );
        }
    }

    #[test]
    fn layer_positions_follow_mergekit() {
        assert_eq!(
            layer_position("model.layers.0.mlp.up_proj.weight", Some(3)),
            0.0
        );
        assert_eq!(
            layer_position("model.layers.2.mlp.up_proj.weight", Some(3)),
            1.0
        );
        assert_eq!(
            layer_position("model.layers.1.mlp.up_proj.weight", Some(5)),
            0.25
        );
        assert_eq!(
            layer_position("transformer.h.1.attn.c_attn.weight", Some(2)),
            1.0
        );
        assert_eq!(layer_position("model.norm.weight", Some(4)), 0.0);
        assert_eq!(
            layer_position("model.layers.0.mlp.up_proj.weight", Some(1)),
            1.0
        );
    }
}
