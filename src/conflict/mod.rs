//! How the experts of a recipe, or a set of adapters, conflict, per module and aggregated by
//! layer and module type ([`Report`], built by [`analyze`] or [`analyze_adapters`]; the metrics
//! of one module in [`ModuleConflicts`]).
//!
//! Metrics are taken on the full updates (a LoRA's `s·B·A`), with each expert trimmed to its
//! recipe density (0.5 where the recipe sets none) and weighted by its recipe weight. For a
//! recipe merged in core space, the report also gives the energy of each expert the merge keeps.

mod metrics;
mod plot;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use metrics::from_sums;
pub use metrics::{module_conflicts, ModuleConflicts};
pub use plot::plot_report;

use crate::adapter::Adapter;
use crate::error::Result;
use crate::merge::kernels::Kernels;
use crate::merge::lora_native::{merges_adapters, LoraMerge};
use crate::merge::{Method, Plan};
use crate::recipe::{OutputKind, Recipe, Space};

/// Metrics averaged over a group of modules (a layer, or a module type).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Group {
    /// The layer index or module type.
    pub name: String,
    /// Modules in the group.
    pub modules: usize,
    /// Mean sign-conflict rate.
    pub sign_conflict: f64,
    /// Mean κ.
    pub mean_kappa: f64,
    /// Mean minority mass.
    pub minority_mass: f64,
}

/// The conflict report of a recipe.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The experts, as the recipe names them.
    pub experts: Vec<String>,
    /// Per module.
    pub modules: Vec<ModuleConflicts>,
    /// Per layer (modules outside numbered layers are grouped as `other`).
    pub by_layer: Vec<Group>,
    /// Per module type (`q_proj`, `down_proj`, ...).
    pub by_type: Vec<Group>,
    /// Expert × expert cosine of the updates, averaged over modules.
    pub cosine: Vec<Vec<f64>>,
    /// For a recipe merged in core space: each expert's share of its update the merge keeps,
    /// averaged over the modules it adapts.
    pub retained_energy: Option<Vec<Option<f64>>>,
}

/// Where a module sits: its layer (if numbered) and its type (the last path part before
/// `.weight`).
fn place(module: &str) -> (String, String) {
    let parts: Vec<&str> = module.split('.').collect();
    let layer = parts
        .windows(2)
        .find(|w| {
            matches!(w[0], "layers" | "h" | "layer" | "blocks") && w[1].parse::<usize>().is_ok()
        })
        .map_or("other".to_string(), |w| w[1].to_string());
    let kind = parts
        .iter()
        .rev()
        .find(|p| **p != "weight")
        .map_or(module.to_string(), |p| p.to_string());
    (layer, kind)
}

fn group(name: String, members: &[&ModuleConflicts]) -> Group {
    let mean = |f: fn(&ModuleConflicts) -> f64| {
        members.iter().map(|m| f(m)).sum::<f64>() / members.len().max(1) as f64
    };
    Group {
        name,
        modules: members.len(),
        sign_conflict: mean(|m| m.sign_conflict),
        mean_kappa: mean(|m| m.mean_kappa),
        minority_mass: mean(|m| m.minority_mass),
    }
}

/// Opens the recipe's base and experts (checked as for a merge) and measures every module that
/// some expert changes.
pub fn analyze(recipe: Recipe, kernels: &dyn Kernels) -> Result<Report> {
    // What the recipe's own merge keeps of each expert, where it merges in core space.
    // (Only an adapter merge is built for it: a model plan of the recipe would open and
    // resolve everything again, and refuse what the measurement below accepts.)
    let retained = if merges_adapters(&recipe) {
        LoraMerge::build(recipe.clone())?.retained_energy()?
    } else {
        None
    };
    // The measurement is the same whatever the recipe writes: plan it as a full-space TIES-like
    // merge to open and check the inputs and resolve weights and densities per tensor.
    let mut planned = recipe;
    planned.output = OutputKind::Delta;
    planned.space = Space::Full;
    planned.rank = None;
    if Method::from_name(&planned.method).is_some_and(Method::adapters_only) {
        planned.method = "ties".to_string();
    }
    if !planned.parameters.contains_key("density")
        && planned
            .experts
            .iter()
            .all(|e| !e.parameters.contains_key("density"))
        && Method::from_name(&planned.method)
            .is_some_and(|m| m.expert_parameters().contains(&"density"))
    {
        planned.parameters.insert(
            "density".to_string(),
            crate::recipe::ParamValue::Scalar(crate::recipe::Scalar::Number(0.5)),
        );
    }
    let plan = Plan::build(planned)?;
    let base = plan.base.as_ref();
    let mut modules = Vec::new();
    for t in &plan.tensors {
        let Some(params) = &t.merge else { continue };
        if t.shape.len() != 2 || !plan.experts.iter().any(|e| e.touches(&t.name)) {
            continue;
        }
        let base_values = base.map(|b| b.read_f32(&t.name)).transpose()?;
        let mut deltas = Vec::with_capacity(plan.experts.len());
        for e in &plan.experts {
            let mut values = match &base_values {
                Some(b) if !e.touches(&t.name) => b.clone(),
                _ => e.tensor(&t.name, base)?,
            };
            if let Some(b) = &base_values {
                values.iter_mut().zip(b).for_each(|(v, b)| *v -= b);
            }
            deltas.push(values);
        }
        let weights: Vec<f32> = params.experts.iter().map(|p| p.weight).collect();
        let densities: Vec<f32> = params.experts.iter().map(|p| p.density).collect();
        let sums = kernels.conflict_sums(&deltas, &weights, &densities)?;
        modules.push(from_sums(&t.name, &sums));
    }

    let experts: Vec<String> = plan.experts.iter().map(|e| e.label.clone()).collect();
    if let Some(kept) = retained {
        let index: BTreeMap<&str, &Vec<(usize, f64)>> =
            kept.iter().map(|(k, v)| (k.as_str(), v)).collect();
        for m in &mut modules {
            let mut shares = vec![None; experts.len()];
            for &(e, share) in index.get(m.module.as_str()).copied().into_iter().flatten() {
                shares[e] = Some(share);
            }
            m.retained_energy = Some(shares);
        }
    }
    Ok(assemble(experts, modules))
}

/// Measures PEFT adapters against each other, without a base or a recipe: each update is
/// `s·B·A`, weighted 1 and trimmed to `density`. The adapters must be for the same base (by the
/// last part of `base_model_name_or_path`) and agree on the shape of every module they share;
/// a module some adapter leaves alone counts as a zero update for it.
pub fn analyze_adapters(dirs: &[PathBuf], density: f32, kernels: &dyn Kernels) -> Result<Report> {
    let adapters = dirs.iter().map(Adapter::open).collect::<Result<Vec<_>>>()?;
    let all: Vec<&Adapter> = adapters.iter().collect();
    let shapes = crate::adapter::module_shapes(&all)?;
    let weights = vec![1.0; adapters.len()];
    let densities = vec![density; adapters.len()];
    let mut modules = Vec::with_capacity(shapes.len());
    for (name, [rows, cols]) in &shapes {
        let sums = kernels.adapter_conflict_sums(&all, name, *rows, *cols, &weights, &densities)?;
        modules.push(from_sums(name, &sums));
    }
    let labels: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Ok(assemble(short_labels(&labels), modules))
}

/// Short names for experts: the name of a `registry:NAME:TAG`, the last part of a path;
/// the full names where two would then be the same.
pub(crate) fn short_labels(experts: &[String]) -> Vec<String> {
    let short: Vec<String> = experts
        .iter()
        .map(|e| match e.strip_prefix("registry:") {
            // `registry:NAME:TAG`: the name.
            Some(reference) => reference.split(':').next().unwrap_or(reference).to_string(),
            None => Path::new(e)
                .file_name()
                .map_or(e.clone(), |n| n.to_string_lossy().into_owned()),
        })
        .collect();
    if short.iter().collect::<BTreeSet<_>>().len() == short.len() {
        short
    } else {
        experts.to_vec()
    }
}

/// Aggregates per-module metrics by layer and module type, and the mean cosine matrix and
/// retained energies over modules.
fn assemble(experts: Vec<String>, modules: Vec<ModuleConflicts>) -> Report {
    let mut layers: BTreeMap<(usize, String), Vec<&ModuleConflicts>> = BTreeMap::new();
    let mut kinds: BTreeMap<String, Vec<&ModuleConflicts>> = BTreeMap::new();
    for m in &modules {
        let (layer, kind) = place(&m.module);
        let order = layer.parse::<usize>().unwrap_or(usize::MAX);
        layers.entry((order, layer)).or_default().push(m);
        kinds.entry(kind).or_default().push(m);
    }
    let by_layer = layers
        .into_iter()
        .map(|((_, name), members)| group(name, &members))
        .collect();
    let by_type = kinds
        .into_iter()
        .map(|(name, members)| group(name, &members))
        .collect();
    let t = experts.len();
    let mut cosine = vec![vec![0.0; t]; t];
    for m in &modules {
        for (i, row) in cosine.iter_mut().enumerate() {
            for (j, c) in row.iter_mut().enumerate() {
                *c += m.cosine[i][j] / modules.len() as f64;
            }
        }
    }
    let retained_energy = modules
        .iter()
        .any(|m| m.retained_energy.is_some())
        .then(|| {
            (0..t)
                .map(|e| {
                    let shares: Vec<f64> = modules
                        .iter()
                        .filter_map(|m| m.retained_energy.as_ref()?[e])
                        .collect();
                    (!shares.is_empty()).then(|| shares.iter().sum::<f64>() / shares.len() as f64)
                })
                .collect()
        });
    Report {
        experts,
        modules,
        by_layer,
        by_type,
        cosine,
        retained_energy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_experts_are_named_by_their_name() {
        let names = short_labels(&[
            "registry:cardiology:v1".into(),
            "registry:radiology:v2".into(),
        ]);
        assert_eq!(names, ["cardiology", "radiology"]);
    }

    #[test]
    fn experts_are_named_by_their_last_path_part_unless_that_is_ambiguous() {
        let paths = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            short_labels(&paths(&["../adapters/cardiology", "org/radiology-lora"])),
            ["cardiology", "radiology-lora"]
        );
        let clash = paths(&["a/lora", "b/lora"]);
        assert_eq!(short_labels(&clash), clash);
    }

    #[test]
    fn places_modules_by_layer_and_type() {
        assert_eq!(
            place("model.layers.12.self_attn.q_proj.weight"),
            ("12".to_string(), "q_proj".to_string())
        );
        assert_eq!(
            place("model.embed_tokens.weight"),
            ("other".to_string(), "embed_tokens".to_string())
        );
    }
}
