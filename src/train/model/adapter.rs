//! PEFT adapter files for a [`CausalLm`]: [`CausalLm::save_adapter`] writes what PEFT's
//! `save_pretrained` writes, [`CausalLm::load_adapter`] reads what it writes, through
//! [`crate::adapter::Adapter`] in both directions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::Tensor;
use regex::Regex;
use serde_json::{json, Map, Value};

use super::causal_lm::CausalLm;
use super::lora::{lora_dtype, LoraSpec, ALL_LINEAR};
use super::projection::Projection;
use super::weights::load_file_tensor;
use super::{candle, f32_entry};
use crate::adapter::{Adapter, LoraKind, PEFT_PREFIX};
use crate::error::{Error, Result};

/// One module's factors read from an adapter, before they replace the model's.
struct Loaded {
    layer: usize,
    projection: Projection,
    a: Tensor,
    b: Tensor,
    alpha: f64,
    scaling: f64,
}

/// The module paths a PEFT `target_modules` value selects among `paths`: a list matches at a
/// `.` boundary, a string is a regex that must match the whole path, `all-linear` selects
/// every projection. `None` when the config does not say.
fn selected(
    path: &Path,
    value: Option<&Value>,
    field: &str,
    paths: &[String],
) -> Result<Option<BTreeSet<String>>> {
    let fail = |message: String| Error::Adapter {
        path: path.to_path_buf(),
        message,
    };
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == ALL_LINEAR => Ok(Some(paths.iter().cloned().collect())),
        Some(Value::String(s)) => {
            let re = Regex::new(&format!("^(?:{s})$"))
                .map_err(|e| fail(format!("`{field}` `{s}` is not a valid regex: {e}")))?;
            Ok(Some(
                paths.iter().filter(|p| re.is_match(p)).cloned().collect(),
            ))
        }
        Some(Value::Array(items)) => {
            let names = items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| fail(format!("`{field}` must list strings")))
                })
                .collect::<Result<Vec<&str>>>()?;
            Ok(Some(
                paths
                    .iter()
                    .filter(|p| names.iter().any(|n| LoraSpec::target_matches(n, p)))
                    .cloned()
                    .collect(),
            ))
        }
        Some(_) => Err(fail(format!("`{field}` must be a string or a list"))),
    }
}

/// The layers `layers_to_transform` keeps, `None` for all.
fn layers_kept(path: &Path, value: Option<&Value>) -> Result<Option<BTreeSet<usize>>> {
    let bad = || Error::Adapter {
        path: path.to_path_buf(),
        message: "`layers_to_transform` must be a layer index or a list of them".into(),
    };
    let index = |v: &Value| v.as_u64().map(|i| i as usize).ok_or_else(bad);
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items.iter().map(index).collect::<Result<_>>().map(Some),
        Some(v) => Ok(Some(BTreeSet::from([index(v)?]))),
    }
}

impl CausalLm {
    /// Writes the LoRA factors as a PEFT adapter in `dir`: `adapter_config.json` (base model
    /// `base_name`, targets, rank and alpha, with `rank_pattern` / `alpha_pattern` for modules
    /// that differ) and `adapter_model.safetensors` (f32 factors under PEFT's keys).
    pub fn save_adapter(&self, dir: &Path, base_name: &str) -> Result<()> {
        self.save_adapter_with(dir, base_name, &[], &[])
    }

    /// [`CausalLm::save_adapter`] with whole modules beside the factors: `saved` tensors
    /// under their PEFT keys, the modules they belong to listed as `modules_to_save` (a
    /// LLaVA model's trained projector).
    pub fn save_adapter_with(
        &self,
        dir: &Path,
        base_name: &str,
        saved: &[(String, Tensor)],
        modules_to_save: &[&str],
    ) -> Result<()> {
        let spec = match (&self.lora_spec(), self.lora_vars().is_empty()) {
            (Some(spec), false) => (*spec).clone(),
            _ => {
                return Err(Error::Output {
                    path: dir.to_path_buf(),
                    message: "the model has no LoRA adapter to save".into(),
                })
            }
        };
        let num_layers = self.layers().len();
        let mut tensors = Vec::new();
        let mut by_projection: BTreeMap<Projection, Vec<usize>> = BTreeMap::new();
        let mut rank_pattern = Map::new();
        let mut alpha_pattern = Map::new();
        for (i, layer) in self.layers().iter().enumerate() {
            for p in Projection::ALL {
                let linear = layer.projection(p);
                let (Some(a), Some(b)) = (linear.lora_a(), linear.lora_b()) else {
                    continue;
                };
                let path = self.module_path(i, p);
                by_projection.entry(p).or_default().push(i);
                let rank = linear.rank().unwrap_or(spec.r);
                if rank != spec.r {
                    rank_pattern.insert(path.clone(), json!(rank));
                }
                let alpha = linear.alpha().unwrap_or(spec.alpha);
                if alpha != spec.alpha {
                    alpha_pattern.insert(path.clone(), json!(alpha));
                }
                tensors.push(f32_entry(
                    format!("{PEFT_PREFIX}{path}.lora_A.weight"),
                    a.as_tensor(),
                )?);
                tensors.push(f32_entry(
                    format!("{PEFT_PREFIX}{path}.lora_B.weight"),
                    b.as_tensor(),
                )?);
            }
        }
        // A name adapted in every layer is written as PEFT writes it (`q_proj`); one adapted
        // in some layers only as full paths, so that PEFT adapts exactly those.
        let mut targets = Vec::new();
        for (p, layers) in &by_projection {
            if layers.len() == num_layers {
                targets.push(p.name().to_string());
            } else {
                targets.extend(layers.iter().map(|&i| self.module_path(i, *p)));
            }
        }
        targets.sort();
        // In a model nested in a larger one (LLaVA's language model) a name would also select
        // the other parts' modules of that name (the vision tower's `q_proj`): PEFT is given a
        // regex that selects this model's modules only.
        let nested = self.module_path(0, Projection::ALL[0]) != Projection::ALL[0].path(0);
        let targets = if nested {
            let full_layers = |p: Projection| {
                regex::escape(&self.module_path(0, p)).replacen(r"layers\.0\.", r"layers\.\d+\.", 1)
            };
            let mut alternatives = Vec::new();
            for (p, layers) in &by_projection {
                if layers.len() == num_layers {
                    alternatives.push(full_layers(*p));
                } else {
                    alternatives.extend(
                        layers
                            .iter()
                            .map(|&i| regex::escape(&self.module_path(i, *p))),
                    );
                }
            }
            json!(alternatives.join("|"))
        } else {
            json!(targets)
        };
        let alpha = if spec.alpha.fract() == 0.0 && spec.alpha.abs() < 1e15 {
            json!(spec.alpha as i64)
        } else {
            json!(spec.alpha)
        };
        let mut config = Map::new();
        for (key, value) in [
            ("alpha_pattern", Value::Object(alpha_pattern)),
            ("auto_mapping", Value::Null),
            ("base_model_name_or_path", json!(base_name)),
            ("bias", json!("none")),
            ("exclude_modules", Value::Null),
            ("fan_in_fan_out", json!(false)),
            ("inference_mode", json!(true)),
            ("init_lora_weights", json!(true)),
            ("layer_replication", Value::Null),
            ("layers_pattern", Value::Null),
            ("layers_to_transform", Value::Null),
            ("lora_alpha", alpha),
            ("lora_bias", json!(false)),
            ("lora_dropout", json!(spec.dropout)),
            (
                "modules_to_save",
                if modules_to_save.is_empty() {
                    Value::Null
                } else {
                    json!(modules_to_save)
                },
            ),
            ("peft_type", json!("LORA")),
            ("r", json!(spec.r)),
            ("rank_pattern", Value::Object(rank_pattern)),
            ("revision", Value::Null),
            ("target_modules", targets),
            ("task_type", json!("CAUSAL_LM")),
            ("use_dora", json!(false)),
            ("use_rslora", json!(spec.use_rslora)),
        ] {
            config.insert(key.to_string(), value);
        }
        for (key, t) in saved {
            tensors.push(f32_entry(key.clone(), t)?);
        }
        Adapter::save(dir, &config, &tensors)
    }

    /// Replaces the model's LoRA updates by those of the PEFT adapter in `dir`: every module it
    /// adapts (rank, alpha, rsLoRA and dropout from its config), none other. A module the
    /// config targets without factors in the file, a factor of the wrong shape, or a module
    /// that is not one of this model's projections is an error naming it.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        self.load_adapter_with(dir, &[])
    }

    /// [`CausalLm::load_adapter`] of an adapter that may save the whole modules `handled`
    /// (`modules_to_save`), which the caller loads (a LLaVA model's projector).
    pub fn load_adapter_with(&mut self, dir: &Path, handled: &[&str]) -> Result<()> {
        let adapter = Adapter::open(dir)?;
        let config = adapter.config();
        let config_path = dir.join("adapter_config.json");
        let fail = |message: String| Error::Adapter {
            path: config_path.clone(),
            message,
        };
        let unhandled = config
            .modules_to_save
            .iter()
            .find(|m| !handled.contains(&m.as_str()));
        if let Some(module) = unhandled {
            return Err(fail(format!(
                "`modules_to_save` module `{module}` is not supported by the trainers' model"
            )));
        }
        if config.modules_to_save.is_empty() && !adapter.saved_tensors().is_empty() {
            return Err(fail(
                "the adapter saves whole base tensors, which the trainers' model does not read"
                    .into(),
            ));
        }
        if config.fan_in_fan_out {
            return Err(fail(
                "`fan_in_fan_out: true` does not apply to Llama/Qwen2 linear layers".into(),
            ));
        }
        let dropout = match config.raw.get("lora_dropout") {
            None | Some(Value::Null) => 0.0,
            Some(v) => v
                .as_f64()
                .filter(|d| (0.0..1.0).contains(d))
                .ok_or_else(|| fail(format!("`lora_dropout` {v} is outside [0, 1)")))?,
        };

        let num_layers = self.layers().len();
        let mut loaded = Vec::new();
        for m in adapter.modules().values() {
            let file_path = adapter.file().path();
            let Some((layer, projection)) = self
                .canonical_module(&m.module)
                .and_then(|module| Projection::parse_path(&module))
                .filter(|&(layer, _)| layer < num_layers)
                .filter(|_| m.kind == LoraKind::Linear)
            else {
                return Err(Error::Adapter {
                    path: file_path.to_path_buf(),
                    message: format!(
                        "module `{}` is not a linear projection of this {num_layers}-layer model",
                        m.module
                    ),
                });
            };
            let (out_f, in_f) = self.config().projection_shape(projection);
            let dtype = lora_dtype(self.dtype());
            let a = load_file_tensor(
                adapter.file(),
                &m.a_key,
                &[m.rank, in_f],
                dtype,
                self.device(),
            )?;
            let b = load_file_tensor(
                adapter.file(),
                &m.b_key,
                &[out_f, m.rank],
                dtype,
                self.device(),
            )?;
            loaded.push(Loaded {
                layer,
                projection,
                a,
                b,
                alpha: config.alpha_for(&m.module),
                scaling: config.scaling_for(&m.module, m.rank),
            });
        }

        // Every module the config targets must have its factors in the file.
        let paths: Vec<String> = (0..num_layers)
            .flat_map(|i| Projection::ALL.map(move |p| (i, p)))
            .map(|(i, p)| self.module_path(i, p))
            .collect();
        let targets = selected(
            &config_path,
            config.raw.get("target_modules"),
            "target_modules",
            &paths,
        )?;
        if let Some(mut targets) = targets {
            if let Some(excluded) = selected(
                &config_path,
                config.raw.get("exclude_modules"),
                "exclude_modules",
                &paths,
            )? {
                targets.retain(|p| !excluded.contains(p));
            }
            if let Some(kept) = layers_kept(&config_path, config.raw.get("layers_to_transform"))? {
                targets.retain(|p| {
                    self.canonical_module(p)
                        .and_then(|m| Projection::parse_path(&m))
                        .is_some_and(|(i, _)| kept.contains(&i))
                });
            }
            if targets.is_empty() {
                return Err(fail(
                    "`target_modules` matches no projection of this model".into(),
                ));
            }
            for path in targets {
                if !adapter.modules().contains_key(&format!("{path}.weight")) {
                    return Err(Error::MissingTensor {
                        path: adapter.file().path().to_path_buf(),
                        tensor: format!("{PEFT_PREFIX}{path}.lora_A.weight"),
                    });
                }
            }
        }

        let target_modules = match config.raw.get("target_modules") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => {
                let names: BTreeSet<&str> = loaded.iter().map(|l| l.projection.name()).collect();
                names.into_iter().map(str::to_string).collect()
            }
        };
        let spec = LoraSpec {
            r: config.r,
            alpha: config.lora_alpha,
            dropout,
            use_rslora: config.use_rslora,
            target_modules,
            seed: self.lora_spec().map_or(0, |s| s.seed),
        };
        self.remove_lora();
        for l in loaded {
            let path = l.projection.path(l.layer);
            self.layers_mut()[l.layer]
                .projection_mut(l.projection)
                .set_lora(l.a, l.b, l.alpha, l.scaling, dropout)
                .map_err(candle(format!("LoRA of `{path}`")))?;
        }
        self.set_lora_spec(Some(spec));
        Ok(())
    }
}
