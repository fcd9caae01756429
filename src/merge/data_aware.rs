//! One tensor merged by a data-aware method (`regmean`, `fisher`, activation-aware `caci`), from
//! the experts' full tensors and their calibration statistics for its module.

use super::calibration::{module_of, Calibration};
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
            let rms = stats
                .as_ref()
                .map(|s| s.input_rms(&module))
                .transpose()?
                .flatten();
            scales.push(rms.unwrap_or_else(|| vec![1.0; t.shape[1]]));
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
    // The experts with statistics for the module (those that change the tensor have them),
    // with their updates and weights.
    let select = |has: &dyn Fn(&Calibration) -> bool| -> Vec<usize> {
        (0..plan.calibration.len())
            .filter(|&i| plan.calibration[i].as_ref().is_some_and(has))
            .collect()
    };
    let merged = match params.method {
        Method::RegMean => {
            let chosen = select(&|s| s.has_gram(&module));
            let mut grams = Vec::with_capacity(chosen.len());
            for &i in &chosen {
                let stats = plan.calibration[i].as_ref().expect("selected");
                grams.push(stats.gram(&module)?.expect("selected"));
            }
            regmean::merge_updates(
                &t.name,
                (t.shape[0], t.shape[1]),
                &chosen
                    .iter()
                    .map(|&i| deltas[i].as_slice())
                    .collect::<Vec<_>>(),
                &grams.iter().collect::<Vec<_>>(),
                &chosen
                    .iter()
                    .map(|&i| params.experts[i].weight)
                    .collect::<Vec<_>>(),
                params.globals.alpha,
                params.globals.ridge,
            )?
        }
        _ => {
            let chosen = select(&|s| s.has_fisher(&module));
            let mut fishers = Vec::with_capacity(chosen.len());
            for &i in &chosen {
                let stats = plan.calibration[i].as_ref().expect("selected");
                fishers.push(stats.fisher(&module)?.expect("selected"));
            }
            fisher::merge_updates(
                &t.name,
                &chosen
                    .iter()
                    .map(|&i| deltas[i].as_slice())
                    .collect::<Vec<_>>(),
                &fishers.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                &chosen
                    .iter()
                    .map(|&i| params.experts[i].weight)
                    .collect::<Vec<_>>(),
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
