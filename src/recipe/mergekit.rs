//! mergekit YAML configs: `models`, `base_model`, `merge_method`, `parameters` (scalars,
//! per-tensor filter lists, layer gradients), `dtype`, `out_dtype` and `model+lora` sources.
//! Paths resolve against the working directory as mergekit does, falling back to the config's
//! directory.

use std::path::Path;

use serde_json::Value;

use super::{parameters, source, ExpertSpec, OutputKind, Recipe, RecipeFormat, Space};
use crate::error::{Error, Result};
use crate::tensor::Dtype;

const TOP_KEYS: &[&str] = &[
    "models",
    "base_model",
    "merge_method",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "name",
];

/// Parses a mergekit YAML config.
pub fn parse(path: &Path, text: String) -> Result<Recipe> {
    let fail = |message: String| Error::Recipe {
        path: path.to_path_buf(),
        message,
    };
    let doc: Value = serde_yaml::from_str(&text).map_err(|e| fail(e.to_string()))?;
    let Value::Object(top) = &doc else {
        return Err(fail("a mergekit config is a YAML mapping".to_string()));
    };
    for key in top.keys() {
        match key.as_str() {
            "slices" | "modules" => {
                return Err(fail(format!(
                    "`{key}` (layer slicing and multi-module merges) is not supported; list whole models under `models`"
                )))
            }
            "chat_template" => {
                return Err(fail(
                    "`chat_template` is not supported; the base's tokenizer files are copied as they are"
                        .to_string(),
                ))
            }
            k if !TOP_KEYS.contains(&k) => {
                return Err(fail(format!("unknown key `{k}`")));
            }
            _ => {}
        }
    }
    let tokenizer_source = top
        .get("tokenizer_source")
        .or_else(|| top.get("tokenizer").and_then(|t| t.get("source")));
    match tokenizer_source {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "base" => {}
        Some(other) => {
            return Err(fail(format!(
                "tokenizer source {other} is not supported: mmx copies the base's tokenizer (`base`) and does not build union vocabularies"
            )))
        }
    }
    if let Some(t) = top.get("tokenizer").and_then(Value::as_object) {
        if let Some(k) = t.keys().find(|k| *k != "source") {
            return Err(fail(format!("`tokenizer.{k}` is not supported")));
        }
    }

    let string = |key: &str| -> Result<Option<&str>> {
        match top.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(fail(format!("`{key}` must be a string, found {other}"))),
        }
    };
    let recipe_dir = path.parent().unwrap_or(Path::new("."));
    let resolve = |at: &str, text: &str| {
        let first = text.split(['+', '@']).next().unwrap_or(text);
        let root = if Path::new(first).exists() {
            Path::new("")
        } else {
            recipe_dir
        };
        source(path, at, text, root)
    };

    let method = string("merge_method")?
        .ok_or_else(|| fail("`merge_method` is missing".to_string()))?
        .to_string();
    let base = string("base_model")?
        .map(|b| resolve("base_model", b))
        .transpose()?;
    let dtype_of = |key: &str| -> Result<Option<Dtype>> {
        string(key)?
            .map(|d| {
                Dtype::from_user(d).ok_or_else(|| {
                    fail(format!(
                        "`{key}` is `{d}`, expected float32, float16 or bfloat16"
                    ))
                })
            })
            .transpose()
    };
    // mergekit computes in `dtype` and saves in `out_dtype` (else `dtype`); mmx always computes
    // in f32, so only the saved dtype matters.
    let dtype = match dtype_of("out_dtype")? {
        Some(d) => Some(d),
        None => dtype_of("dtype")?,
    };
    let global = parameters(path, "parameters", top.get("parameters"))?;

    let items = match top.get("models") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        _ => return Err(fail("`models` is missing or empty".to_string())),
    };
    let mut experts = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("models[{i}]");
        let (model, params) = match item {
            Value::String(s) => (s.as_str(), None),
            Value::Object(map) => {
                if let Some(k) = map.keys().find(|k| *k != "model" && *k != "parameters") {
                    return Err(fail(format!("unknown key `{at}.{k}`")));
                }
                let model = map
                    .get("model")
                    .and_then(Value::as_str)
                    .ok_or_else(|| fail(format!("`{at}.model` is missing or not a string")))?;
                (model, map.get("parameters"))
            }
            other => return Err(fail(format!("`{at}` must be a mapping, found {other}"))),
        };
        let src = resolve(&format!("{at}.model"), model)?;
        // mergekit lists the base among the models by habit; for methods on task vectors the
        // base contributes nothing, so it is not an expert. `linear` averages it like any model.
        if method != "linear" && Some(&src) == base.as_ref() {
            continue;
        }
        experts.push(ExpertSpec {
            source: src,
            parameters: parameters(path, &format!("{at}.parameters"), params)?,
            calibration: None,
        });
    }
    if experts.is_empty() {
        return Err(fail("`models` lists no model besides the base".to_string()));
    }
    Ok(Recipe {
        path: path.to_path_buf(),
        format: RecipeFormat::Mergekit,
        text,
        method,
        base,
        experts,
        parameters: global,
        output: OutputKind::Full,
        dtype,
        seed: 0,
        space: Space::Full,
        rank: None,
        registry: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::{ParamValue, Scalar, Source};

    #[test]
    fn reads_a_ties_config_and_drops_the_listed_base() {
        let d = tempfile::tempdir().unwrap();
        for name in ["base", "ft", "lora"] {
            std::fs::create_dir(d.path().join(name)).unwrap();
        }
        let path = d.path().join("ties.yml");
        let text = r#"
merge_method: ties
base_model: base
models:
  - model: base
  - model: ft
    parameters:
      weight: 0.5
      density: [{filter: mlp, value: 0.3}, {value: 0.7}]
  - model: base+lora
    parameters: {weight: 0.5}
parameters:
  normalize: true
dtype: bfloat16
"#;
        let r = parse(&path, text.to_string()).unwrap();
        assert_eq!(r.experts.len(), 2);
        assert_eq!(r.dtype, Some(Dtype::BF16));
        assert_eq!(
            r.parameters["normalize"],
            ParamValue::Scalar(Scalar::Bool(true))
        );
        assert!(matches!(r.experts[1].source, Source::WithLora { .. }));
        let density = &r.experts[0].parameters["density"];
        assert_eq!(
            density.resolve("model.layers.0.mlp.up_proj.weight", 0.0),
            Some(Scalar::Number(0.3))
        );
    }

    #[test]
    fn reads_registry_sources() {
        let path = Path::new("c.yml");
        let digest = format!("blake3:{}", "ab".repeat(32));
        let text = format!(
            "merge_method: ties\nbase_model: registry:base:v1\nmodels:\n  - model: registry:cardiology:v1\n  - model: {digest}\n"
        );
        let r = parse(path, text).unwrap();
        assert_eq!(r.base, Some(Source::Registry("base:v1".into())));
        assert_eq!(
            r.experts[0].source,
            Source::Registry("cardiology:v1".into())
        );
        assert_eq!(r.experts[1].source, Source::Registry(digest));
        assert_eq!(r.registry, None, "$MMX_REGISTRY, else ./registry");
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("m")).unwrap();
        let path = d.path().join("c.yaml");
        for (text, needle) in [
            ("merge_method: ties\nslices: []\n", "slices"),
            (
                "merge_method: ties\nmodels: [{model: m}]\ntokenizer_source: union\n",
                "union",
            ),
            (
                "merge_method: ties\nmodels: [{model: m}]\nfoo: 1\n",
                "`foo`",
            ),
            (
                "merge_method: ties\nmodels: [{model: org/hub-model}]\n",
                "never downloads",
            ),
            (
                "merge_method: ties\nmodels: [{model: m, parameters: {density: {a: 1}}}]\n",
                "models[0].parameters.density",
            ),
            (
                "merge_method: ties\nmodels:\n  - model: m\n bad indent\n",
                "line",
            ),
        ] {
            let err = parse(&path, text.to_string()).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
