//! Fisher-weighted averaging (Matena & Raffel, "Merging Models with Fisher-Weighted
//! Averaging"): each coordinate of the merged update is the experts' updates averaged with
//! weights `w_t·F_t`, the diagonal Fisher of each expert's loss,
//!
//! `Δ = Σ_t w_t·F̃_t·Δ_t / Σ_t w_t·F̃_t`, `F̃_t = F_t + floor·mean(F_t)`.
//!
//! The floor keeps coordinates no expert's data reaches from dividing zero by zero (there the
//! merge is the weighted mean), relative to each Fisher's own scale.

use crate::error::{Error, Result};

/// The Fisher-weighted update of one tensor from the experts' updates, Fishers and weights
/// (all of one length).
pub fn merge_updates(
    tensor: &str,
    deltas: &[&[f32]],
    fishers: &[&[f32]],
    weights: &[f32],
    floor: f32,
) -> Result<Vec<f32>> {
    if let Some(w) = weights.iter().find(|w| w.is_nan() || **w < 0.0) {
        return Err(Error::Parameter {
            name: "weight".to_string(),
            tensor: tensor.to_string(),
            message: format!("Fisher-weighted averaging needs weights ≥ 0, found {w}"),
        });
    }
    if weights.iter().all(|&w| w == 0.0) {
        return Err(Error::Parameter {
            name: "weight".to_string(),
            tensor: tensor.to_string(),
            message: "every expert's weight is 0".to_string(),
        });
    }
    let numel = deltas.first().map_or(0, |d| d.len());
    let floors: Vec<f64> = fishers
        .iter()
        .map(|f| {
            let mean = f.iter().map(|&v| f64::from(v)).sum::<f64>() / f.len().max(1) as f64;
            f64::from(floor) * mean.max(f64::from(f32::MIN_POSITIVE))
        })
        .collect();
    let mut out = vec![0f32; numel];
    for (i, o) in out.iter_mut().enumerate() {
        let (mut sum, mut total) = (0f64, 0f64);
        for t in 0..deltas.len() {
            let weight = f64::from(weights[t]) * (f64::from(fishers[t][i]) + floors[t]);
            sum += weight * f64::from(deltas[t][i]);
            total += weight;
        }
        *o = (sum / total) as f32;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_coordinate_follows_the_experts_fisher() {
        let d1 = [1.0f32, 1.0, 4.0];
        let d2 = [-1.0f32, 3.0, 0.0];
        // Coordinate 0: only expert 1 matters; 1: only expert 2; 2: equal Fishers, weights 1:3.
        let f1 = [1.0f32, 0.0, 2.0];
        let f2 = [0.0f32, 1.0, 2.0];
        let out = merge_updates("t", &[&d1, &d2], &[&f1, &f2], &[1.0, 3.0], 1e-9).unwrap();
        assert!((out[0] - 1.0).abs() < 1e-6, "{out:?}");
        assert!((out[1] - 3.0).abs() < 1e-6, "{out:?}");
        assert!((out[2] - 1.0).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn where_no_fisher_reaches_it_is_the_weighted_mean() {
        let out =
            merge_updates("t", &[&[2.0], &[6.0]], &[&[0.0], &[0.0]], &[1.0, 1.0], 1e-6).unwrap();
        assert!((out[0] - 4.0).abs() < 1e-6, "{out:?}");
        let err = merge_updates("t", &[&[2.0]], &[&[1.0]], &[-1.0], 1e-6).unwrap_err();
        assert!(err.to_string().contains("weights ≥ 0"), "{err}");
    }
}
