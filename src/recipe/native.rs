//! mmx's native TOML recipe (DESIGN.md §3). Relative paths are relative to the recipe file.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{
    parameters, source, CalibrationSpec, ExpertSpec, OutputKind, ParamValue, RankTarget, Recipe,
    RecipeFormat, Space,
};
use crate::error::{Error, Result};
use crate::tensor::Dtype;

const MERGE_KEYS: &[&str] = &[
    "registry",
    "method",
    "base",
    "output",
    "space",
    "rank",
    "dtype",
    "seed",
    "parameters",
    "experts",
];
const EXPERT_KEYS: &[&str] = &["source", "weight", "parameters", "calibration"];

/// Parses a native recipe.
pub fn parse(path: &Path, text: String) -> Result<Recipe> {
    let fail = |message: String| Error::Recipe {
        path: path.to_path_buf(),
        message,
    };
    let doc: toml::Table = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
    let doc = serde_json::to_value(doc).map_err(|e| fail(e.to_string()))?;
    if let Some(key) = doc
        .as_object()
        .and_then(|m| m.keys().find(|k| *k != "merge"))
    {
        return Err(fail(format!(
            "unknown top-level key `{key}` (expected `[merge]`)"
        )));
    }
    let merge = doc
        .get("merge")
        .and_then(Value::as_object)
        .ok_or_else(|| fail("no `[merge]` table".to_string()))?;
    if let Some(key) = merge.keys().find(|k| !MERGE_KEYS.contains(&k.as_str())) {
        return Err(fail(format!(
            "unknown key `merge.{key}` (expected one of {})",
            MERGE_KEYS.join(", ")
        )));
    }
    let string = |key: &str| -> Result<Option<&str>> {
        match merge.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(fail(format!(
                "`merge.{key}` must be a string, found {other}"
            ))),
        }
    };
    let root = path.parent().unwrap_or(Path::new("."));
    let method = string("method")?
        .ok_or_else(|| fail("`merge.method` is missing".to_string()))?
        .to_string();
    let base = string("base")?
        .map(|b| source(path, "merge.base", b, root))
        .transpose()?;
    let output = match string("output")?.unwrap_or("full") {
        "full" => OutputKind::Full,
        "delta" => OutputKind::Delta,
        "lora" => OutputKind::Lora,
        other => {
            return Err(fail(format!(
                "`merge.output` is `{other}`, expected `full`, `delta` or `lora`"
            )))
        }
    };
    // LoRA output merges in core space unless told otherwise; anything else on full weights.
    let space = match string("space")? {
        None if output == OutputKind::Lora => Space::Core,
        None | Some("full") => Space::Full,
        Some("core") => Space::Core,
        Some(other) => {
            return Err(fail(format!(
                "`merge.space` is `{other}`, expected `full` or `core`"
            )))
        }
    };
    if merge.contains_key("rank") && output != OutputKind::Lora {
        return Err(fail(
            "`merge.rank` applies to LoRA output only (`output = \"lora\"`)".to_string(),
        ));
    }
    let rank = match merge.get("rank") {
        None => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(r) if r > 0 => Some(RankTarget::Fixed(r as usize)),
            _ => {
                return Err(fail(format!(
                    "`merge.rank` must be a positive integer, found {n}"
                )))
            }
        },
        Some(Value::String(text)) => {
            let energy = text
                .strip_prefix("energy:")
                .and_then(|e| e.parse::<f64>().ok())
                .filter(|e| *e > 0.0 && *e <= 1.0);
            match energy {
                Some(e) => Some(RankTarget::Energy(e)),
                None => {
                    return Err(fail(format!(
                        "`merge.rank` is `{text}`: expected a positive integer or \"energy:F\" with 0 < F ≤ 1"
                    )))
                }
            }
        }
        Some(other) => {
            return Err(fail(format!(
                "`merge.rank` must be an integer or \"energy:F\", found {other}"
            )))
        }
    };
    let dtype = string("dtype")?
        .map(|d| {
            Dtype::from_user(d).ok_or_else(|| {
                fail(format!(
                    "`merge.dtype` is `{d}`, expected `float32`, `float16` or `bfloat16`"
                ))
            })
        })
        .transpose()?;
    let seed = match merge.get("seed") {
        None => 0,
        Some(v) => v.as_u64().ok_or_else(|| {
            fail(format!(
                "`merge.seed` must be a non-negative integer, found {v}"
            ))
        })?,
    };
    let parameters_table = parameters(path, "merge.parameters", merge.get("parameters"))?;

    let items = match merge.get("experts") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        _ => return Err(fail("no `[[merge.experts]]`".to_string())),
    };
    let mut experts = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("merge.experts[{i}]");
        let Value::Object(map) = item else {
            return Err(fail(format!("`{at}` must be a table")));
        };
        if let Some(key) = map.keys().find(|k| !EXPERT_KEYS.contains(&k.as_str())) {
            return Err(fail(format!(
                "unknown key `{at}.{key}` (expected one of {})",
                EXPERT_KEYS.join(", ")
            )));
        }
        let src = map
            .get("source")
            .and_then(Value::as_str)
            .ok_or_else(|| fail(format!("`{at}.source` is missing or not a string")))?;
        let mut params = parameters(path, &format!("{at}.parameters"), map.get("parameters"))?;
        if let Some(w) = map.get("weight") {
            let weight =
                ParamValue::from_json(w).map_err(|m| fail(format!("`{at}.weight`: {m}")))?;
            if params.insert("weight".to_string(), weight).is_some() {
                return Err(fail(format!(
                    "`{at}` sets `weight` twice (beside and inside `parameters`)"
                )));
            }
        }
        let calibration = match map.get("calibration") {
            None => None,
            Some(Value::String(file)) => Some(CalibrationSpec::File(root.join(file))),
            Some(Value::Object(table)) => Some(calibration_cases(table, root, &at).map_err(fail)?),
            Some(other) => {
                return Err(fail(format!(
                    "`{at}.calibration` must be the path of a statistics file (see `mmx calibrate`) or {{ data = \"cases.jsonl\", n = 256 }}, found {other}"
                )))
            }
        };
        experts.push(ExpertSpec {
            source: source(path, &format!("{at}.source"), src, root)?,
            parameters: params,
            calibration,
        });
    }
    Ok(Recipe {
        path: path.to_path_buf(),
        format: RecipeFormat::Native,
        text,
        method,
        base,
        experts,
        parameters: parameters_table,
        output,
        dtype,
        seed,
        space,
        rank,
        registry: string("registry")?.map(|r| super::registry_location(root, r)),
    })
}

/// `calibration = { data = "cases.jsonl" | ["a.jsonl", ...], n = 256 }` of expert `at`.
fn calibration_cases(
    table: &serde_json::Map<String, Value>,
    root: &Path,
    at: &str,
) -> std::result::Result<CalibrationSpec, String> {
    if let Some(key) = table.keys().find(|k| *k != "data" && *k != "n") {
        return Err(format!(
            "unknown key `{at}.calibration.{key}` (expected `data` and `n`)"
        ));
    }
    let data: Vec<PathBuf> = match table.get("data") {
        Some(Value::String(file)) => vec![root.join(file)],
        Some(Value::Array(files)) if !files.is_empty() => files
            .iter()
            .map(|f| f.as_str().map(|f| root.join(f)))
            .collect::<Option<_>>()
            .ok_or_else(|| format!("`{at}.calibration.data` must list case files"))?,
        _ => {
            return Err(format!(
                "`{at}.calibration` needs `data`: the case file(s) to calibrate on"
            ))
        }
    };
    let n =
        match table.get("n") {
            None => None,
            Some(v) => Some(v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                format!("`{at}.calibration.n` must be a positive integer, found {v}")
            })? as usize),
        };
    Ok(CalibrationSpec::Cases { data, n })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::{Scalar, Source};

    fn dirs() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for name in ["base", "a", "b"] {
            std::fs::create_dir(d.path().join(name)).unwrap();
        }
        d
    }

    #[test]
    fn reads_each_experts_calibration_as_a_file_or_cases() {
        let d = dirs();
        let path = d.path().join("r.toml");
        let head =
            "[merge]\nmethod = \"regmean\"\nbase = \"base\"\n[[merge.experts]]\nsource = \"a\"\n";
        let with = |calibration: &str| {
            parse(&path, format!("{head}calibration = {calibration}\n"))
                .map(|r| r.experts[0].calibration.clone())
        };
        assert_eq!(
            with("\"stats/a.safetensors\"").unwrap(),
            Some(CalibrationSpec::File(d.path().join("stats/a.safetensors")))
        );
        assert_eq!(
            with("{ data = [\"x.jsonl\", \"y.jsonl\"], n = 16 }").unwrap(),
            Some(CalibrationSpec::Cases {
                data: vec![d.path().join("x.jsonl"), d.path().join("y.jsonl")],
                n: Some(16)
            })
        );
        for (bad, expected) in [
            ("{ n = 3 }", "needs `data`"),
            (
                "{ data = \"x.jsonl\", n = 0 }",
                "`merge.experts[0].calibration.n` must be a positive integer",
            ),
            (
                "{ data = \"x.jsonl\", size = 2 }",
                "unknown key `merge.experts[0].calibration.size`",
            ),
            ("7", "must be the path of a statistics file"),
        ] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains(expected), "{bad}: {err}");
        }
    }

    #[test]
    fn reads_a_recipe_relative_to_its_file() {
        let d = dirs();
        let path = d.path().join("r.toml");
        let text = r#"
[merge]
method = "ties"
base = "base"
dtype = "bfloat16"
seed = 7
[merge.parameters]
density = 0.5
[[merge.experts]]
source = "a"
weight = 0.7
[[merge.experts]]
source = "base+b"
parameters = { density = [0.2, 0.8] }
"#;
        let r = parse(&path, text.to_string()).unwrap();
        assert_eq!(r.method, "ties");
        assert_eq!(r.base, Some(Source::Dir(d.path().join("base"))));
        assert_eq!(r.dtype, Some(Dtype::BF16));
        assert_eq!(r.seed, 7);
        assert_eq!(
            r.experts[0].parameters["weight"],
            ParamValue::Scalar(Scalar::Number(0.7))
        );
        assert_eq!(
            r.experts[1].source,
            Source::WithLora {
                model: d.path().join("base"),
                lora: d.path().join("b")
            }
        );
        assert!(matches!(
            r.experts[1].parameters["density"],
            ParamValue::Gradient(_)
        ));
    }

    #[test]
    fn names_the_key_that_is_wrong() {
        let d = dirs();
        let path = d.path().join("r.toml");
        for (text, needle) in [
            (
                "[merge]\nmethod='ties'\nbase='base'\nfoo=1\n[[merge.experts]]\nsource='a'",
                "merge.foo",
            ),
            (
                "[merge]\nmethod='ties'\n[[merge.experts]]\nsource='missing'",
                "merge.experts[0].source",
            ),
            (
                "[merge]\nmethod='ties'\n[[merge.experts]]\nsource='a'\nwieght=1",
                "merge.experts[0].wieght",
            ),
            (
                "[merge]\nmethod='ties'\ndtype='int8'\n[[merge.experts]]\nsource='a'",
                "merge.dtype",
            ),
            (
                "[merge]\nmethod='ties'\nspace='middle'\n[[merge.experts]]\nsource='a'",
                "merge.space",
            ),
            (
                "[merge]\nmethod='ties'\n[[merge.experts]]\nsource='registry:x'",
                "registry:NAME:TAG",
            ),
            (
                "[merge]\nmethod='ties'\n[[merge.experts]]\nsource='a+b+base'",
                "more than one",
            ),
            ("[merge]\nmethod = \n", "line 2"),
        ] {
            let err = parse(&path, text.to_string()).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(err.contains("r.toml"), "{err}");
        }
    }
}
