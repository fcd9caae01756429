//! How the experts of a recipe conflict, per module and aggregated by layer and module type
//! ([`Report`], built by [`analyze`]; the metrics of one module in [`ModuleConflicts`]).
//!
//! Metrics are taken on the full updates (a LoRA's `s·B·A`), with each expert trimmed to its
//! recipe density (0.5 where the recipe sets none) and weighted by its recipe weight.

mod metrics;
mod plot;

use std::collections::BTreeMap;

use serde::Serialize;

pub use metrics::{module_conflicts, ModuleConflicts};
pub use plot::plot_report;

use crate::error::Result;
use crate::merge::lora_native::is_lora_native;
use crate::merge::Plan;
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
pub fn analyze(recipe: Recipe) -> Result<Report> {
    // The measurement is the same whatever the recipe writes: plan it as a full-space TIES-like
    // merge to open and check the inputs and resolve weights and densities per tensor.
    let mut planned = recipe;
    planned.output = OutputKind::Delta;
    planned.space = Space::Full;
    planned.rank = None;
    if is_lora_native(&planned.method) {
        planned.method = "ties".to_string();
    }
    if !planned.parameters.contains_key("density")
        && planned
            .experts
            .iter()
            .all(|e| !e.parameters.contains_key("density"))
        && crate::merge::Method::from_name(&planned.method)
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
        modules.push(module_conflicts(&t.name, &deltas, &weights, &densities));
    }

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
    let t = plan.experts.len();
    let mut cosine = vec![vec![0.0; t]; t];
    for m in &modules {
        for (i, row) in cosine.iter_mut().enumerate() {
            for (j, c) in row.iter_mut().enumerate() {
                *c += m.cosine[i][j] / modules.len() as f64;
            }
        }
    }
    Ok(Report {
        experts: plan.experts.iter().map(|e| e.label.clone()).collect(),
        modules,
        by_layer,
        by_type,
        cosine,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
