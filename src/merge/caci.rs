//! CACI, conflict-aware capability integration (DESIGN.md §5), on one tensor:
//!
//! 1. confidence `c_t = w_t / rms(Δ_t)` (or `w_t` with `confidence = "none"`);
//! 2. trim each `Δ_t` to its top `density` by magnitude (TIES's trim) → `Δ̂_t`;
//! 3. elect `σ = sign(Σ c_t·Δ̂_t)` (ties positive), i.e. `sign(P − N)` with
//!    `P = Σ c_t·max(Δ̂_t, 0)` and `N = Σ c_t·max(−Δ̂_t, 0)`;
//! 4. conflict `κ = min(P, N) / max(P, N)` (0 where nothing opposes);
//! 5. disjoint mean over the experts that agree with σ: `μ = Σ w_t·Δ̂_t / Σ w_t` (with
//!    `normalize = false`, mergekit's TIES option, the agreeing sum `Σ w_t·Δ̂_t`);
//! 6. `Δ = λ·μ·(1 − κ)^γ`;
//! 7. with `restore = τ`, each expert's share of `Δ` made `τ·w_t` along the experts' own
//!    untrimmed updates (see [`super::restore`]).
//!
//! The vote and the mean are computed in the same order and form as TIES's, so that with
//! `attenuation = 0`, `confidence = "none"` and no `restore` the result is TIES's to the bit.
//!
//! Activation-aware (`confidence = "activation"`): each coordinate is scored by what it does to
//! the expert's outputs on the expert's own inputs, `|Δ_t[i, j]|·σ_t[j]` with `σ_t[j]` the RMS of
//! input feature j over the expert's calibration tokens (`sqrt(G_t[j, j] / tokens)`; in core
//! space, of the input direction of core column j). The trim keeps each expert's top `density`
//! by that score, the vote sums the scored values `Δ_t·σ_t` with confidence `w_t / rms(Δ_t·σ_t)`,
//! and `κ` compares the scored masses; the mean is still of the updates themselves. With every
//! `σ_t = 1` it is CACI with `confidence = "rms"`, to the bit.

use super::job::{fraction, squared_distance, MergedTensor, TensorStats};
use super::method::{Confidence, ExpertParams, GlobalParams};
use super::restore::restore;
use super::sparsify;
use crate::error::{Error, Result};

/// Merges one tensor with CACI; `experts` are full tensors, `base` their common base, `name`
/// the tensor's (for errors). `scales`: per expert, the RMS of each input feature (one per
/// column of the row-major tensor), for `confidence = "activation"`.
pub(crate) fn merge(
    name: &str,
    base: &[f32],
    mut experts: Vec<Vec<f32>>,
    params: &[ExpertParams],
    globals: &GlobalParams,
    scales: Option<&[Vec<f32>]>,
) -> Result<MergedTensor> {
    let n = base.len();
    for delta in experts.iter_mut() {
        for (d, b) in delta.iter_mut().zip(base) {
            *d -= b;
        }
    }
    let scales = match (globals.confidence, scales) {
        (Confidence::Activation, Some(scales)) => Some(scales),
        (Confidence::Activation, None) => return Err(activation_needs_statistics(name)),
        _ => None,
    };
    // Restore reads the updates as the experts made them, before the trim.
    let untrimmed = globals.restore.map(|_| experts.clone());
    let mut confidence = Vec::with_capacity(experts.len());
    let mut kept_fraction = Vec::with_capacity(experts.len());
    // The values the vote and κ see: the updates, or under "activation" the scored updates.
    let mut voted: Vec<Vec<f32>> = Vec::new();
    for (t, (delta, p)) in experts.iter_mut().zip(params).enumerate() {
        let scored: Option<Vec<f32>> = scales.map(|s| scored(delta, &s[t]));
        let measured = scored.as_deref().unwrap_or(delta);
        let sum = match globals.confidence {
            Confidence::None => 0.0,
            Confidence::Rms | Confidence::Activation => squares(measured),
        };
        confidence.push(self::confidence(p.weight, globals.confidence, sum, n));
        match scored {
            Some(mut scored) => {
                if p.density < 1.0 {
                    sparsify::magnitude(&mut scored, p.density);
                    delta
                        .iter_mut()
                        .zip(&scored)
                        .for_each(|(d, s)| *d = if *s == 0.0 { 0.0 } else { *d });
                }
                voted.push(scored);
            }
            None => {
                if p.density < 1.0 {
                    sparsify::magnitude(delta, p.density);
                }
            }
        }
        kept_fraction.push(fraction(delta.iter().filter(|v| **v != 0.0).count(), n));
    }
    let voted: &[Vec<f32>] = if scales.is_some() { &voted } else { &experts };

    let mut values = vec![0f32; n];
    let conflicts = combine(&experts, voted, &confidence, params, globals, &mut values);
    if let (Some(target), Some(updates)) = (globals.restore, &untrimmed) {
        let weights: Vec<f32> = params.iter().map(|p| p.weight).collect();
        restore(&mut values, updates, &weights, target, name)?;
    }
    values.iter_mut().zip(base).for_each(|(v, b)| *v += b);
    let delta_l2 = squared_distance(&values, Some(base)).sqrt();
    Ok(MergedTensor {
        values,
        stats: TensorStats {
            kept_fraction,
            sign_conflict: Some(fraction(conflicts, n)),
            delta_l2,
        },
    })
}

/// The error for activation-aware CACI without the experts' statistics.
pub(crate) fn activation_needs_statistics(tensor: &str) -> Error {
    Error::Parameter {
        name: "confidence".to_string(),
        tensor: tensor.to_string(),
        message: "`activation` reads each expert's calibration statistics for this tensor's module"
            .to_string(),
    }
}

/// `Σ v²` in `f64`, in the lane order every CACI path uses.
pub(crate) fn squares(values: &[f32]) -> f64 {
    sparsify::lane_sum(values, |v| f64::from(v) * f64::from(v))
}

/// An expert's vote weight: `weight / rms`, the rms of its `n` (scored) update entries from
/// their sum of squares `squares`, or `weight` alone under `confidence = "none"`.
pub(crate) fn confidence(weight: f32, mode: Confidence, squares: f64, n: usize) -> f32 {
    match mode {
        Confidence::None => weight,
        Confidence::Rms | Confidence::Activation => {
            let rms = (squares / n.max(1) as f64).sqrt();
            if rms > 0.0 {
                (f64::from(weight) / rms) as f32
            } else {
                0.0
            }
        }
    }
}

/// Steps 3–6 on a run of coordinates: the vote on `voted` (the trimmed updates, or their
/// scored values) weighted by `confidence`, the disjoint mean of the agreeing `trimmed`
/// updates, its attenuation by the conflict and `lambda`; writes `out` (as long as each
/// update) and returns how many coordinates some expert opposes.
pub(crate) fn combine(
    trimmed: &[Vec<f32>],
    voted: &[Vec<f32>],
    confidence: &[f32],
    params: &[ExpertParams],
    globals: &GlobalParams,
    out: &mut [f32],
) -> usize {
    // The common powers 1 and 0 without `powf`, which would otherwise take most of the
    // merge's time (it gives the same values for them); chosen outside the loop, since the
    // compiler may evaluate `powf` on both sides of a branch inside it.
    let power = globals.attenuation;
    let votes = Votes {
        trimmed,
        voted,
        confidence,
        params,
        globals,
    };
    if power == 1.0 {
        votes.combine(out, |x| x)
    } else if power == 0.0 {
        votes.combine(out, |_| 1.0)
    } else {
        votes.combine(out, |x| x.powf(power))
    }
}

/// The inputs of [`combine`].
struct Votes<'a> {
    trimmed: &'a [Vec<f32>],
    voted: &'a [Vec<f32>],
    confidence: &'a [f32],
    params: &'a [ExpertParams],
    globals: &'a GlobalParams,
}

impl Votes<'_> {
    /// Blocks of coordinates, each step a loop over one expert's block, so that the loops
    /// vectorise; every coordinate still adds its experts' terms in expert order, the sums of
    /// the one-coordinate-at-a-time form to the bit.
    #[inline(always)]
    fn combine(&self, out: &mut [f32], attenuation: impl Fn(f32) -> f32) -> usize {
        const BLOCK: usize = 512;
        let mut conflicts = 0usize;
        for start in (0..out.len()).step_by(BLOCK) {
            let end = (start + BLOCK).min(out.len());
            let len = end - start;
            let (mut vote, mut positive, mut negative) =
                ([0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK]);
            for (x, &c) in self.voted.iter().zip(self.confidence) {
                let sums = vote[..len]
                    .iter_mut()
                    .zip(&mut positive[..len])
                    .zip(&mut negative[..len]);
                for (((v, p), n), &x) in sums.zip(&x[start..end]) {
                    *v += c * x;
                    *p += c * x.max(0.0);
                    *n += c * (-x).max(0.0);
                }
            }
            let (mut mixed, mut divisor, mut opposed) =
                ([0f32; BLOCK], [0f32; BLOCK], [0u32; BLOCK]);
            let experts = self.trimmed.iter().zip(self.voted);
            for (((delta, scored), &c), p) in experts.zip(self.confidence).zip(self.params) {
                let w = p.weight;
                let (m, q, o) = (&mut mixed[..len], &mut divisor[..len], &mut opposed[..len]);
                let (v, d, s) = (&vote[..len], &delta[start..end], &scored[start..end]);
                // Bit operations instead of branches, so that the loop vectorises: the sign
                // flip is the product by the elected sign −1, the masks pick a term or +0.
                // Adding +0 where the expert disagrees leaves the sums as they are (they start
                // at +0 and never become −0).
                for j in 0..len {
                    let flip = if v[j] >= 0.0 { 0 } else { 0x8000_0000u32 };
                    let oriented = f32::from_bits((c * s[j]).to_bits() ^ flip);
                    let agrees = 0u32.wrapping_sub(u32::from(oriented > 0.0));
                    m[j] += f32::from_bits((w * d[j]).to_bits() & agrees);
                    q[j] += f32::from_bits(w.to_bits() & agrees);
                    o[j] |= u32::from(oriented < 0.0);
                }
            }
            conflicts += opposed[..len].iter().map(|&o| o as usize).sum::<usize>();
            let sums = mixed[..len]
                .iter()
                .zip(&divisor[..len])
                .zip(positive[..len].iter().zip(&negative[..len]));
            for (o, ((&m, &q), (&p, &n))) in out[start..end].iter_mut().zip(sums) {
                let mean = if self.globals.normalize && q != 0.0 {
                    m / q
                } else {
                    m
                };
                let (low, high) = (p.min(n), p.max(n));
                let kappa = if high > 0.0 { low / high } else { 0.0 };
                // Multiplying by a lambda of 1 changes nothing, so it is not skipped.
                *o = mean * attenuation(1.0 - kappa) * self.globals.lambda;
            }
        }
        conflicts
    }
}

/// `Δ[i, j]·σ[j]` for a row-major tensor whose rows are `σ.len()` long.
fn scored(delta: &[f32], sigma: &[f32]) -> Vec<f32> {
    delta
        .chunks(sigma.len().max(1))
        .flat_map(|row| row.iter().zip(sigma).map(|(d, s)| d * s))
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::merge::method::{Confidence, GlobalParams, Method};
    use crate::merge::{merge_tensor, TensorJob};

    fn run(
        method: Method,
        globals: &GlobalParams,
        experts: &[Vec<f32>],
        weights: &[f32],
        density: f32,
    ) -> Vec<f32> {
        let base = vec![0.5f32; experts[0].len()];
        let params = weights
            .iter()
            .map(|&w| {
                let mut p = method.default_expert();
                p.weight = w;
                p.density = density;
                p
            })
            .collect();
        merge_tensor(
            method,
            globals,
            TensorJob {
                name: "t",
                shape: &[experts[0].len()],
                base: Some(&base),
                experts: experts
                    .iter()
                    .map(|e| e.iter().map(|v| v + 0.5).collect())
                    .collect(),
                params,
                expert_ids: (0..experts.len()).collect(),
            },
        )
        .unwrap()
        .values
        .iter()
        .map(|v| v - 0.5)
        .collect()
    }

    #[test]
    fn without_normalize_the_agreeing_sum_is_attenuated() {
        // Deltas a = [1, 2], b = [3, -2], c = [1, 1]; weights 1, no trim, confidence "none".
        // Coordinate 0: all agree, κ = 0: the sum 5 (the mean would be 5/3). Coordinate 1:
        // P = 3, N = 2, σ = +, κ = 2/3: (2 + 1)·(1 − 2/3) = 1.
        let globals = GlobalParams {
            normalize: false,
            confidence: Confidence::None,
            ..Method::Caci.default_globals()
        };
        let experts = [vec![1.0, 2.0], vec![3.0, -2.0], vec![1.0, 1.0]];
        let out = run(Method::Caci, &globals, &experts, &[1.0; 3], 1.0);
        assert!((out[0] - 5.0).abs() < 1e-6, "{out:?}");
        assert!((out[1] - 1.0).abs() < 1e-6, "{out:?}");
    }

    fn activation(
        experts: &[Vec<f32>],
        scales: &[Vec<f32>],
        density: f32,
        globals: &GlobalParams,
    ) -> Vec<f32> {
        let base = vec![0.0f32; experts[0].len()];
        let params: Vec<_> = experts
            .iter()
            .map(|_| {
                let mut p = Method::Caci.default_expert();
                p.density = density;
                p
            })
            .collect();
        super::merge("t", &base, experts.to_vec(), &params, globals, Some(scales))
            .unwrap()
            .values
    }

    #[test]
    fn activation_scores_coordinates_by_their_effect_on_the_outputs() {
        let g = GlobalParams {
            confidence: Confidence::Activation,
            ..Method::Caci.default_globals()
        };
        // One row of two inputs. Expert a: Δ = [1, 2] on inputs of RMS [10, 1]: scored
        // [10, 2], so its top half is coordinate 0 (by magnitude it would be coordinate 1).
        let out = activation(&[vec![1.0, 2.0]], &[vec![10.0, 1.0]], 0.5, &g);
        assert_eq!(out, [1.0, 0.0]);
        // Two experts disagree on coordinate 0: a's +1 on loud inputs (σ 10) outvotes b's −3 on
        // quiet ones (σ 0.1), though b's update is larger. Confidences are w / rms(scored):
        // a: 1/sqrt(50), scored vote 10/sqrt(50) = 1.414; b: scored [−0.3, 0.1], rms sqrt(0.05),
        // vote −0.3/sqrt(0.05) = −1.342. P = 1.414 > N = 1.342: σ = +, a's value, κ = 0.949.
        let out = activation(
            &[vec![1.0, 0.0], vec![-3.0, 1.0]],
            &[vec![10.0, 0.0], vec![0.1, 0.1]],
            1.0,
            &g,
        );
        let kappa = (0.3f64 / 0.05f64.sqrt()) / (10.0 / 50f64.sqrt());
        assert!(
            (f64::from(out[0]) - (1.0 - kappa)).abs() < 1e-5,
            "{out:?} κ {kappa}"
        );
        assert_eq!(out[1], 1.0);
        // Without statistics it is an error, not a silent weight-only merge.
        let base = [0.0f32; 2];
        let params = [Method::Caci.default_expert()];
        let err = super::merge("t", &base, vec![vec![1.0, 2.0]], &params, &g, None).unwrap_err();
        assert!(err.to_string().contains("calibration statistics"), "{err}");
    }

    #[test]
    fn attenuates_contested_coordinates() {
        // Deltas (base 0.5 removed): a = [1, 2, -1], b = [3, -2, -1]; weights 1, no trim,
        // confidence by weight, attenuation 1.
        // j=0: P = 4, N = 0, κ = 0, μ = (1+3)/2 = 2        → 2
        // j=1: P = 2, N = 2, vote 0 → +, κ = 1, μ = 2      → 0
        // j=2: P = 0, N = 2, κ = 0, μ = -1                 → -1
        let g = GlobalParams {
            confidence: Confidence::None,
            ..Method::Caci.default_globals()
        };
        let out = run(
            Method::Caci,
            &g,
            &[vec![1.0, 2.0, -1.0], vec![3.0, -2.0, -1.0]],
            &[1.0, 1.0],
            1.0,
        );
        assert_eq!(out, [2.0, 0.0, -1.0]);
        // Three experts at j: 2, 2, -1 → P = 4, N = 1, κ = 1/4, μ = 2, (1 − κ)^2 = 9/16 → 1.125.
        let g = GlobalParams {
            confidence: Confidence::None,
            attenuation: 2.0,
            ..Method::Caci.default_globals()
        };
        let out = run(
            Method::Caci,
            &g,
            &[vec![2.0], vec![2.0], vec![-1.0]],
            &[1.0; 3],
            1.0,
        );
        assert_eq!(out, [1.125]);
    }

    #[test]
    fn rms_confidence_stops_a_loud_expert_from_deciding_every_sign() {
        // a is 10× louder than b and c, which agree against it on element 0: with weights
        // alone a wins the vote (10 > 2), with rms confidence b and c do.
        let a = vec![10.0, 10.0, 10.0, 10.0];
        let b = vec![-1.0, 1.0, 1.0, 1.0];
        let c = vec![-1.0, 1.0, 1.0, 1.0];
        let experts = [a, b, c];
        let by_weight = GlobalParams {
            confidence: Confidence::None,
            attenuation: 0.0,
            ..Method::Caci.default_globals()
        };
        let by_rms = GlobalParams {
            attenuation: 0.0,
            ..Method::Caci.default_globals()
        };
        assert_eq!(
            run(Method::Caci, &by_weight, &experts, &[1.0; 3], 1.0)[0],
            10.0
        );
        assert_eq!(
            run(Method::Caci, &by_rms, &experts, &[1.0; 3], 1.0)[0],
            -1.0
        );
    }

    proptest! {
        /// The shortcut powers give what `powf` gives, to the bit.
        #[test]
        fn attenuation_powers_match_powf(x in 0.0f32..=1.0) {
            for (power, shortcut) in [(0.0f32, 1.0f32), (1.0, x)] {
                prop_assert_eq!(shortcut.to_bits(), x.powf(power).to_bits());
            }
        }

        /// With every input of RMS 1 the activation-aware vote is the weight-only one (rms
        /// confidence), to the bit.
        #[test]
        fn activation_with_unit_inputs_is_rms_caci(
            values in proptest::collection::vec(-4.0f32..4.0, 24),
            density in 0.2f32..1.0,
        ) {
            let experts: Vec<Vec<f32>> = values.chunks(8).map(<[f32]>::to_vec).collect();
            let rms = Method::Caci.default_globals();
            let by_activation = GlobalParams { confidence: Confidence::Activation, ..rms.clone() };
            let unit = vec![vec![1.0f32; 4]; 3];
            let expected = {
                let base = vec![0.0f32; 8];
                let params: Vec<_> = (0..3).map(|_| {
                    let mut p = Method::Caci.default_expert();
                    p.density = density;
                    p
                }).collect();
                super::merge("t", &base, experts.clone(), &params, &rms, None).unwrap().values
            };
            prop_assert_eq!(activation(&experts, &unit, density, &by_activation), expected);
        }

        /// With attenuation 0 and confidence "none", CACI is TIES, bit for bit, with `normalize` on
        /// (the disjoint mean) or off (the agreeing sum).
        #[test]
        fn reduces_to_ties(
            experts in prop::collection::vec(prop::collection::vec(-4.0f32..4.0, 24), 1..5),
            weights in prop::collection::vec(0.1f32..2.0, 5),
            density in 0.1f32..1.0,
            normalize in any::<bool>(),
        ) {
            let weights = &weights[..experts.len()];
            let caci = GlobalParams {
                attenuation: 0.0,
                confidence: Confidence::None,
                normalize,
                ..Method::Caci.default_globals()
            };
            let ours = run(Method::Caci, &caci, &experts, weights, density);
            let ties_globals = GlobalParams {
                normalize,
                ..Method::Ties.default_globals()
            };
            let ties = run(Method::Ties, &ties_globals, &experts, weights, density);
            prop_assert_eq!(
                ours.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                ties.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
