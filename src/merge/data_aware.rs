//! One tensor merged by a data-aware method (`regmean`, `fisher`, activation-aware `caci`), from
//! the experts' full tensors and their calibration statistics for its module.

use super::calibration::module_of;
use super::job::{distance, MergedTensor, TensorStats};
use super::method::Method;
use super::plan::{MergeParams, Plan, TensorPlan};
use super::{caci, fisher, regmean};
use crate::error::Result;

/// Merges tensor `t` (planned with statistics for every expert that changes it) from the base
/// and the experts' full tensors. An expert that leaves the tensor alone still counts where it
/// has statistics: its update there is zero, and RegMean keeps its outputs on its own inputs.
pub(crate) fn merge_with_statistics(
    plan: &Plan,
    t: &TensorPlan,
    params: &MergeParams,
    base: &[f32],
    experts: Vec<Vec<f32>>,
) -> Result<MergedTensor> {
    let module = module_of(&t.name, &t.shape).expect("planned for 2-D weights only");
    if params.method == Method::Caci {
        // Each input feature's RMS over the expert's tokens; an expert without statistics here
        // leaves the tensor alone (its update is zero, whatever it is scored by).
        let mut scales = Vec::with_capacity(experts.len());
        for stats in &plan.calibration {
            let gram = stats
                .as_ref()
                .map(|s| s.gram(&module))
                .transpose()?
                .flatten();
            scales.push(match gram {
                Some(g) => (0..g.dim)
                    .map(|j| g.values[j * g.dim + j].max(0.0).sqrt() as f32)
                    .collect(),
                None => vec![1.0; t.shape[1]],
            });
        }
        return caci::merge(
            &t.name,
            base,
            experts,
            &params.experts,
            &params.globals,
            Some(&scales),
        );
    }
    let deltas: Vec<Vec<f32>> = experts
        .into_iter()
        .map(|mut x| {
            x.iter_mut().zip(base).for_each(|(v, b)| *v -= b);
            x
        })
        .collect();
    let mut chosen: Vec<&[f32]> = Vec::new();
    let mut weights = Vec::new();
    let merged = match params.method {
        Method::RegMean => {
            let mut grams = Vec::new();
            for (i, stats) in plan.calibration.iter().enumerate() {
                if let Some(gram) = stats
                    .as_ref()
                    .map(|s| s.gram(&module))
                    .transpose()?
                    .flatten()
                {
                    grams.push(gram);
                    chosen.push(&deltas[i]);
                    weights.push(params.experts[i].weight);
                }
            }
            let grams: Vec<_> = grams.iter().collect();
            regmean::merge_updates(
                &t.name,
                (t.shape[0], t.shape[1]),
                &chosen,
                &grams,
                &weights,
                params.globals.alpha,
                params.globals.ridge,
            )?
        }
        _ => {
            let mut fishers = Vec::new();
            for (i, stats) in plan.calibration.iter().enumerate() {
                if let Some(f) = stats
                    .as_ref()
                    .map(|s| s.fisher(&module))
                    .transpose()?
                    .flatten()
                {
                    fishers.push(f);
                    chosen.push(&deltas[i]);
                    weights.push(params.experts[i].weight);
                }
            }
            let fishers: Vec<&[f32]> = fishers.iter().map(Vec::as_slice).collect();
            fisher::merge_updates(
                &t.name,
                &chosen,
                &fishers,
                &weights,
                params.globals.fisher_floor,
            )?
        }
    };
    let lambda = params.globals.lambda;
    let values: Vec<f32> = merged
        .iter()
        .zip(base)
        .map(|(d, b)| b + lambda * d)
        .collect();
    let stats = TensorStats {
        kept_fraction: vec![1.0; plan.experts.len()],
        sign_conflict: None,
        delta_l2: distance(&values, Some(base)),
    };
    Ok(MergedTensor { values, stats })
}
