//! Merges one tensor by any [`Method`]: the job and the parameters are checked, then the
//! task-arithmetic family runs trim, consensus and sum (see method.rs for the table), `linear`
//! its weighted mean, and `caci` its own path (caci.rs).

use super::caci;
use super::consensus;
use super::job::{distance, fraction, MergedTensor, TensorJob, TensorStats};
use super::method::{ExpertParams, GlobalParams, Method, RescaleMode, Trim};
use super::parameters::{check_params, parameter_error};
use super::rng::MaskRng;
use super::sparsify;
use crate::error::Result;

/// Merges one tensor.
///
/// # Errors
/// [`Error::Parameter`](crate::Error::Parameter) when the job is inconsistent (counts or lengths that do not
/// match `shape`), when a method other than [`Method::Linear`] has no base, when a
/// parameter is outside its domain (a non-finite value, a negative density, gamma
/// outside `[0, 1]`, DELLA's `density ± epsilon` outside `(0, 1)`), or when a normalised
/// linear merge's weights sum to zero (mergekit divides by zero there). All checks run
/// before any arithmetic.
pub fn merge_tensor(
    method: Method,
    globals: &GlobalParams,
    job: TensorJob<'_>,
) -> Result<MergedTensor> {
    let TensorJob {
        name,
        shape,
        base,
        mut experts,
        params,
        expert_ids,
    } = job;
    if method.adapters_only() {
        return Err(parameter_error(
            "method",
            name,
            format!(
                "`{}` merges LoRA adapters into a LoRA adapter and has no tensor-wise form (`task_arithmetic` is the exact weighted sum)",
                method.name()
            ),
        ));
    }
    if method.data_aware() {
        return Err(parameter_error(
            "method",
            name,
            format!(
                "`{}` reads the experts' calibration statistics: merge through a recipe whose experts name their `calibration`",
                method.name()
            ),
        ));
    }
    let numel = check_job(name, shape, base, &experts, &params, &expert_ids)?;
    check_params(method, globals, name, &params)?;

    if method == Method::Linear {
        return linear(name, base, experts, &params, globals.normalize);
    }
    let base = base.ok_or_else(|| {
        parameter_error(
            "base_model",
            name,
            format!("method `{}` needs a base model", method.name()),
        )
    })?;
    if experts.is_empty() {
        return Ok(MergedTensor {
            values: base.to_vec(),
            stats: TensorStats {
                kept_fraction: Vec::new(),
                sign_conflict: method.has_consensus().then_some(0.0),
                delta_l2: 0.0,
            },
        });
    }

    if method == Method::Caci {
        return caci::merge(name, base, experts, &params, globals, None);
    }
    let mut trimmer = Trimmer {
        trim: method.trim(),
        globals,
        name,
        shape,
        order: Vec::new(),
    };
    let mut kept_fraction = Vec::with_capacity(experts.len());
    for ((delta, p), &id) in experts.iter_mut().zip(&params).zip(&expert_ids) {
        for (d, &b) in delta.iter_mut().zip(base) {
            *d -= b;
        }
        trimmer.apply(delta, p, id)?;
        kept_fraction.push(fraction(delta.iter().filter(|v| **v != 0.0).count(), numel));
    }

    let weights: Vec<f32> = params.iter().map(|p| p.weight).collect();
    let sign_conflict = if method.has_consensus() {
        let conflicts = consensus::disjoint_merge(
            &mut experts,
            &weights,
            globals.sign_election,
            globals.disjoint_mean,
            globals.normalize,
        );
        Some(fraction(conflicts, numel))
    } else {
        weighted_sum(&mut experts, &weights, globals.normalize);
        None
    };

    let mut values = experts.swap_remove(0);
    if globals.lambda != 1.0 {
        for v in values.iter_mut() {
            *v *= globals.lambda;
        }
    }
    for (v, &b) in values.iter_mut().zip(base) {
        *v += b;
    }
    let delta_l2 = distance(&values, Some(base));
    Ok(MergedTensor {
        values,
        stats: TensorStats {
            kept_fraction,
            sign_conflict,
            delta_l2,
        },
    })
}

/// Checks that the job is self-consistent; returns the element count.
fn check_job(
    name: &str,
    shape: &[usize],
    base: Option<&[f32]>,
    experts: &[Vec<f32>],
    params: &[ExpertParams],
    expert_ids: &[usize],
) -> Result<usize> {
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| parameter_error("shape", name, format!("shape {shape:?} overflows")))?;
    if params.len() != experts.len() || expert_ids.len() != experts.len() {
        return Err(parameter_error(
            "experts",
            name,
            format!(
                "{} experts but {} parameter sets and {} ids",
                experts.len(),
                params.len(),
                expert_ids.len()
            ),
        ));
    }
    let lengths = base.map(<[f32]>::len).into_iter();
    if let Some(len) = lengths
        .chain(experts.iter().map(Vec::len))
        .find(|&len| len != numel)
    {
        return Err(parameter_error(
            "shape",
            name,
            format!("an input holds {len} elements, shape {shape:?} needs {numel}"),
        ));
    }
    Ok(numel)
}

/// The trim step for one tensor, with the scratch buffer (DELLA's row order) its experts share.
struct Trimmer<'a> {
    trim: Trim,
    globals: &'a GlobalParams,
    name: &'a str,
    shape: &'a [usize],
    order: Vec<u64>,
}

impl Trimmer<'_> {
    /// Trims (and rescales) the delta of the expert with recipe index `expert_id`.
    fn apply(&mut self, delta: &mut [f32], p: &ExpertParams, expert_id: usize) -> Result<()> {
        // As in mergekit, nothing happens at density >= 1, not even the rescale.
        if self.trim == Trim::None || p.density >= 1.0 {
            return Ok(());
        }
        let globals = self.globals;
        let original_l1 = (globals.rescale && globals.rescale_mode == RescaleMode::L1)
            .then(|| sparsify::l1_norm(delta));
        let rng = MaskRng::new(globals.seed, self.name, expert_id);
        match self.trim {
            Trim::None => {}
            Trim::Magnitude => {
                sparsify::magnitude(delta, p.density);
            }
            Trim::Random => {
                sparsify::random(delta, p.density, &rng);
            }
            Trim::Outliers => {
                sparsify::outliers(delta, p.density, p.gamma);
            }
            Trim::Della => {
                let (shape, name) = (self.shape, self.name);
                sparsify::della(
                    delta,
                    shape,
                    p.density,
                    p.epsilon,
                    &rng,
                    &mut self.order,
                    name,
                )?;
            }
            Trim::TopK => {
                let k = sparsify::keep_count(p.density, delta.len());
                sparsify::top_k(delta, k);
            }
        }
        if globals.rescale {
            match original_l1 {
                Some(l1) => sparsify::rescale_l1(delta, l1),
                None => sparsify::rescale_inverse(delta, p.density),
            }
        }
        Ok(())
    }
}

/// `Σ w_m·δ_m` into `deltas[0]`, divided by `Σ w_m` when normalising (a sum under 1e-8
/// in magnitude counts as 1, as in mergekit).
pub(crate) fn weighted_sum(deltas: &mut [Vec<f32>], weights: &[f32], normalize: bool) {
    let Some(((first, rest), (&w0, w_rest))) = deltas.split_first_mut().zip(weights.split_first())
    else {
        return;
    };
    for v in first.iter_mut() {
        *v *= w0;
    }
    for (delta, &w) in rest.iter().zip(w_rest) {
        for (acc, &x) in first.iter_mut().zip(delta) {
            *acc += w * x;
        }
    }
    if normalize {
        let sum: f32 = weights.iter().sum();
        let divisor = if sum.abs() < 1e-8 { 1.0 } else { sum };
        for v in first.iter_mut() {
            *v /= divisor;
        }
    }
}

/// mergekit `linear`: `Σ w·X`, divided by `Σ w` when normalising. The base, if any, is
/// not an input (see [`Method::needs_base`]); it only anchors `delta_l2`.
pub(crate) fn linear(
    name: &str,
    base: Option<&[f32]>,
    mut experts: Vec<Vec<f32>>,
    params: &[ExpertParams],
    normalize: bool,
) -> Result<MergedTensor> {
    let weights: Vec<f32> = params.iter().map(|p| p.weight).collect();
    let sum: f32 = weights.iter().sum();
    if experts.is_empty() {
        let base = base
            .ok_or_else(|| parameter_error("experts", name, "no tensors to merge".to_string()))?;
        return Ok(MergedTensor {
            values: base.to_vec(),
            stats: TensorStats {
                kept_fraction: Vec::new(),
                sign_conflict: None,
                delta_l2: 0.0,
            },
        });
    }
    if normalize && sum == 0.0 {
        return Err(parameter_error(
            "weight",
            name,
            format!("the weights {weights:?} sum to zero and linear divides by their sum"),
        ));
    }
    // mergekit divides by the exact f32 sum (no 1e-8 guard, unlike task arithmetic).
    weighted_sum(&mut experts, &weights, false);
    let mut values = experts.swap_remove(0);
    if normalize {
        for v in values.iter_mut() {
            *v /= sum;
        }
    }
    let delta_l2 = distance(&values, base);
    Ok(MergedTensor {
        values,
        stats: TensorStats {
            kept_fraction: vec![1.0; weights.len()],
            sign_conflict: None,
            delta_l2,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::merge::consensus::{DisjointMean, SignElection};
    use proptest::prelude::*;

    const NAME: &str = "model.layers.0.mlp.down_proj.weight";

    fn expert(weight: f32, density: f32) -> ExpertParams {
        ExpertParams {
            weight,
            density,
            ..Method::Ties.default_expert()
        }
    }

    fn run(
        method: Method,
        globals: &GlobalParams,
        shape: &[usize],
        base: Option<&[f32]>,
        experts: &[&[f32]],
        params: &[ExpertParams],
    ) -> Result<MergedTensor> {
        merge_tensor(
            method,
            globals,
            TensorJob {
                name: NAME,
                shape,
                base,
                experts: experts.iter().map(|e| e.to_vec()).collect(),
                params: params.to_vec(),
                expert_ids: (0..experts.len()).collect(),
            },
        )
    }

    fn close(actual: &[f32], expected: &[f32]) {
        assert_eq!(actual.len(), expected.len());
        for (a, e) in actual.iter().zip(expected) {
            assert!(
                (a - e).abs() <= 1e-6 * (1.0 + e.abs()),
                "{actual:?} != {expected:?}"
            );
        }
    }

    /// Whether `expert`'s element `i` survives a Bernoulli(`p`) drop.
    fn kept(seed: u64, expert: usize, i: usize, p: f32) -> bool {
        MaskRng::new(seed, NAME, expert).uniform(i as u64) < p
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(Method::all().len(), 15);
        for &m in Method::all() {
            assert_eq!(Method::from_name(m.name()), Some(m));
            assert_eq!(
                serde_json::to_string(&m).unwrap(),
                format!("\"{}\"", m.name())
            );
        }
        assert_eq!(Method::from_name("dare_ties"), Some(Method::DareTies));
        assert_eq!(
            Method::from_name("breadcrumbs_ties"),
            Some(Method::BreadcrumbsTies)
        );
        assert_eq!(Method::from_name("slerp"), None);
        assert_eq!(Method::from_name("TIES"), None);
    }

    #[test]
    fn defaults_are_mergekits() {
        // (method, normalize, rescale) from mergekit 0.1.5 `registry.py` and `linear.py`;
        // CACI (ours) normalises like TIES.
        let table = [
            (Method::Linear, true, false),
            (Method::TaskArithmetic, false, false),
            (Method::Ties, true, false),
            (Method::DareLinear, false, true),
            (Method::DareTies, false, true),
            (Method::Breadcrumbs, false, false),
            (Method::BreadcrumbsTies, false, false),
            (Method::Della, true, true),
            (Method::DellaLinear, false, true),
            (Method::MagnitudePrune, false, false),
            (Method::Caci, true, false),
            (Method::Cat, false, false),
            (Method::Svd, false, false),
        ];
        for (m, normalize, rescale) in table {
            let g = m.default_globals();
            assert_eq!((g.normalize, g.rescale), (normalize, rescale), "{m:?}");
            assert_eq!(g.lambda, 1.0);
            assert_eq!(g.rescale_mode, RescaleMode::L1);
            assert_eq!(g.sign_election, SignElection::Weighted);
            assert_eq!(g.disjoint_mean, DisjointMean::Weights);
            let e = m.default_expert();
            // CACI keeps half by default (DESIGN.md §5); mergekit's methods keep everything.
            let density = if m == Method::Caci { 0.5 } else { 1.0 };
            assert_eq!(
                (e.weight, e.density, e.gamma, e.epsilon),
                (1.0, density, 0.01, 0.15)
            );
        }
    }

    #[test]
    fn roles_and_parameter_names() {
        let random: Vec<Method> = Method::all()
            .iter()
            .copied()
            .filter(|m| m.is_random())
            .collect();
        assert_eq!(
            random,
            [
                Method::DareLinear,
                Method::DareTies,
                Method::Della,
                Method::DellaLinear
            ]
        );
        for &m in Method::all() {
            assert_eq!(m.needs_base(), m != Method::Linear);
            assert_eq!(m.adapters_only(), matches!(m.name(), "cat" | "svd"));
            assert!(m.expert_parameters().contains(&"weight"));
            assert_eq!(
                m.expert_parameters().contains(&"gamma"),
                m.name().starts_with("breadcrumbs")
            );
            assert_eq!(
                m.expert_parameters().contains(&"epsilon"),
                m.name().starts_with("della")
            );
            assert_eq!(
                m.global_parameters().contains(&"sign_election"),
                m.has_consensus()
            );
        }
        assert_eq!(Method::Linear.global_parameters(), ["normalize"]);
        assert!(Method::Ties.global_parameters().contains(&"int8_mask"));
        assert!(!Method::Linear.expert_parameters().contains(&"density"));
    }

    #[test]
    fn linear_is_the_weighted_mean() {
        // (1·[1, 2, 3, 4] + 3·[3, 2, 1, 0]) = [10, 8, 6, 4]; / 4.
        let experts: [&[f32]; 2] = [&[1.0, 2.0, 3.0, 4.0], &[3.0, 2.0, 1.0, 0.0]];
        let params = [expert(1.0, 1.0), expert(3.0, 1.0)];
        let mut g = Method::Linear.default_globals();
        let out = run(Method::Linear, &g, &[4], None, &experts, &params).unwrap();
        assert_eq!(out.values, [2.5, 2.0, 1.5, 1.0]);
        assert_eq!(out.stats.kept_fraction, [1.0, 1.0]);
        assert_eq!(out.stats.sign_conflict, None);
        // ‖[2.5, 2, 1.5, 1]‖ = √13.5 without a base; ‖[1.5, 1, 0.5, 0]‖ = √3.5 from 1s.
        assert!((out.stats.delta_l2 - 13.5f64.sqrt()).abs() < 1e-12);
        let base = [1.0; 4];
        let out = run(Method::Linear, &g, &[4], Some(&base), &experts, &params).unwrap();
        assert_eq!(out.values, [2.5, 2.0, 1.5, 1.0]);
        assert!((out.stats.delta_l2 - 3.5f64.sqrt()).abs() < 1e-12);
        g.normalize = false;
        let out = run(Method::Linear, &g, &[4], None, &experts, &params).unwrap();
        assert_eq!(out.values, [10.0, 8.0, 6.0, 4.0]);
    }

    #[test]
    fn linear_with_zero_weight_sum_is_an_error() {
        let experts: [&[f32]; 2] = [&[1.0], &[3.0]];
        let params = [expert(1.0, 1.0), expert(-1.0, 1.0)];
        let mut g = Method::Linear.default_globals();
        let err = run(Method::Linear, &g, &[1], None, &experts, &params).unwrap_err();
        assert!(matches!(err, Error::Parameter { ref name, ref tensor, .. }
            if name == "weight" && tensor == NAME));
        g.normalize = false;
        let out = run(Method::Linear, &g, &[1], None, &experts, &params).unwrap();
        assert_eq!(out.values, [-2.0]);
    }

    #[test]
    fn task_arithmetic_adds_the_scaled_deltas() {
        // δ1 = [1, −1, 0, 2], δ2 = [0, 2, −1, 0]; 0.5·δ1 + δ2 = [0.5, 1.5, −1, 1];
        // λ = 2 → [1, 3, −2, 2]; + 1.
        let base = [1.0; 4];
        let experts: [&[f32]; 2] = [&[2.0, 0.0, 1.0, 3.0], &[1.0, 3.0, 0.0, 1.0]];
        // density is accepted and ignored.
        let params = [expert(0.5, 0.1), expert(1.0, 0.1)];
        let mut g = Method::TaskArithmetic.default_globals();
        g.lambda = 2.0;
        let out = run(
            Method::TaskArithmetic,
            &g,
            &[4],
            Some(&base),
            &experts,
            &params,
        )
        .unwrap();
        assert_eq!(out.values, [2.0, 4.0, -1.0, 3.0]);
        assert_eq!(out.stats.kept_fraction, [0.75, 0.5]);
        assert_eq!(out.stats.sign_conflict, None);
        assert!((out.stats.delta_l2 - 18f64.sqrt()).abs() < 1e-12);
        // normalize divides by Σw = 1.5 before λ.
        g.normalize = true;
        let out = run(
            Method::TaskArithmetic,
            &g,
            &[4],
            Some(&base),
            &experts,
            &params,
        )
        .unwrap();
        close(
            &out.values,
            &[1.0 + 2.0 / 3.0, 3.0, 1.0 - 4.0 / 3.0, 1.0 + 4.0 / 3.0],
        );
    }

    #[test]
    fn ties_trims_elects_and_averages() {
        // δ1 = [4, −3, 2, −1, 0.5] → top 3: [4, −3, 2, 0, 0];
        // δ2 = [−2, 1, 3, −4, 0.25] → top 3: [−2, 0, 3, −4, 0].
        // Sums [2, −3, 5, −4, 0] elect [+, −, +, −, +]; coordinate 0 drops δ2 (a conflict).
        // Disjoint mean: [4, −3, (2 + 3)/2, −4, 0]; + 1.
        let base = [1.0; 5];
        let experts: [&[f32]; 2] = [&[5.0, -2.0, 3.0, 0.0, 1.5], &[-1.0, 2.0, 4.0, -3.0, 1.25]];
        let params = [expert(1.0, 0.6), expert(1.0, 0.6)];
        let g = Method::Ties.default_globals();
        let out = run(Method::Ties, &g, &[5], Some(&base), &experts, &params).unwrap();
        assert_eq!(out.values, [5.0, -2.0, 3.5, -3.0, 1.0]);
        assert_eq!(out.stats.kept_fraction, [0.6, 0.6]);
        assert_eq!(out.stats.sign_conflict, Some(0.2));
    }

    #[test]
    fn ties_variants_follow_the_options() {
        // One coordinate, δ = (2, −1), weights (1, 3), density 1.
        // Weighted: 2 − 3 < 0 elects −; δ2 agrees: 3·(−1) / 3 = −1.
        // Unweighted: 2 − 1 > 0 elects +; δ1 agrees: 2 / 1 (weights) or / 1 (counts).
        let base = [0.0];
        let experts: [&[f32]; 2] = [&[2.0], &[-1.0]];
        let params = [expert(1.0, 1.0), expert(3.0, 1.0)];
        let mut g = Method::Ties.default_globals();
        let out = run(Method::Ties, &g, &[1], Some(&base), &experts, &params).unwrap();
        assert_eq!(out.values, [-1.0]);
        g.sign_election = SignElection::Unweighted;
        let out = run(Method::Ties, &g, &[1], Some(&base), &experts, &params).unwrap();
        assert_eq!(out.values, [2.0]);
        // Both agree at density 1 with δ = (2, 1): weights divide 2 + 3 by 4, counts by 2.
        let experts: [&[f32]; 2] = [&[2.0], &[1.0]];
        g.disjoint_mean = DisjointMean::Counts;
        let out = run(Method::Ties, &g, &[1], Some(&base), &experts, &params).unwrap();
        assert_eq!(out.values, [2.5]);
        g.disjoint_mean = DisjointMean::Weights;
        let out = run(Method::Ties, &g, &[1], Some(&base), &experts, &params).unwrap();
        assert_eq!(out.values, [1.25]);
    }

    #[test]
    fn dare_linear_drops_and_rescales_by_the_l1_norm() {
        // δ = ±2 everywhere: if K of 8 survive, the L1 rescale multiplies them by 16/(2K).
        let base = [1.0; 8];
        let x: Vec<f32> = (0..8)
            .map(|i| if i % 2 == 0 { 3.0 } else { -1.0 })
            .collect();
        let mut g = Method::DareLinear.default_globals();
        for seed in 0..10 {
            g.seed = seed;
            let out = run(
                Method::DareLinear,
                &g,
                &[8],
                Some(&base),
                &[&x],
                &[expert(0.5, 0.5)],
            )
            .unwrap();
            let survivors = (0..8).filter(|&i| kept(seed, 0, i, 0.5)).count();
            let expected: Vec<f32> = (0..8)
                .map(|i| {
                    if !kept(seed, 0, i, 0.5) {
                        1.0
                    } else {
                        // 1 + 0.5 · (±2) · 8/K
                        let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                        1.0 + sign * 8.0 / survivors as f32
                    }
                })
                .collect();
            close(&out.values, &expected);
            assert_eq!(out.stats.kept_fraction, [survivors as f32 / 8.0]);
        }
        // The paper's rescale: kept entries become ±2 / 0.5 = ±4, times 0.5.
        g.rescale_mode = RescaleMode::InverseDensity;
        let out = run(
            Method::DareLinear,
            &g,
            &[8],
            Some(&base),
            &[&x],
            &[expert(0.5, 0.5)],
        )
        .unwrap();
        for (i, v) in out.values.iter().enumerate() {
            let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
            let expect = if kept(g.seed, 0, i, 0.5) {
                1.0 + 2.0 * sign
            } else {
                1.0
            };
            assert_eq!(*v, expect);
        }
    }

    #[test]
    fn masks_are_keyed_by_the_recipe_index() {
        let base = [0.0; 64];
        let a = vec![1.0f32; 64];
        let b: Vec<f32> = (0..64).map(|i| i as f32 + 1.0).collect();
        let g = GlobalParams {
            rescale: false,
            seed: 77,
            ..Method::DareLinear.default_globals()
        };
        let job = |experts: Vec<Vec<f32>>, params: Vec<ExpertParams>, ids: Vec<usize>| TensorJob {
            name: NAME,
            shape: &[64],
            base: Some(&base),
            experts,
            params,
            expert_ids: ids,
        };
        // Expert `a` at weight 0 adds nothing, so both merges are b's masked delta.
        let both = merge_tensor(
            Method::DareLinear,
            &g,
            job(
                vec![a, b.clone()],
                vec![expert(0.0, 0.5), expert(1.0, 0.5)],
                vec![0, 1],
            ),
        )
        .unwrap();
        let alone = merge_tensor(
            Method::DareLinear,
            &g,
            job(vec![b.clone()], vec![expert(1.0, 0.5)], vec![1]),
        )
        .unwrap();
        assert_eq!(both.values, alone.values);
        for (i, v) in alone.values.iter().enumerate() {
            assert_eq!(*v, if kept(77, 1, i, 0.5) { b[i] } else { 0.0 });
        }
        // Under id 0 the mask differs.
        let renumbered = merge_tensor(
            Method::DareLinear,
            &g,
            job(vec![b], vec![expert(1.0, 0.5)], vec![0]),
        )
        .unwrap();
        assert_ne!(renumbered.values, alone.values);
    }

    #[test]
    fn dare_ties_elects_over_the_surviving_entries() {
        // δ1 = +3, δ2 = −1 everywhere, density 0.5, no rescale, no normalize (default):
        // both kept → + wins, 3 (a conflict); only δ1 → 3; only δ2 → −1; none → 0.
        let base = [0.5; 16];
        let x1 = [3.5f32; 16];
        let x2 = [-0.5f32; 16];
        let g = GlobalParams {
            rescale: false,
            seed: 3,
            ..Method::DareTies.default_globals()
        };
        let params = [expert(1.0, 0.5), expert(1.0, 0.5)];
        let out = run(
            Method::DareTies,
            &g,
            &[16],
            Some(&base),
            &[&x1, &x2],
            &params,
        )
        .unwrap();
        let mut conflicts = 0;
        for (i, v) in out.values.iter().enumerate() {
            let delta = match (kept(3, 0, i, 0.5), kept(3, 1, i, 0.5)) {
                (true, true) => {
                    conflicts += 1;
                    3.0
                }
                (true, false) => 3.0,
                (false, true) => -1.0,
                (false, false) => 0.0,
            };
            assert_eq!(*v, 0.5 + delta, "element {i}");
        }
        assert_eq!(out.stats.sign_conflict, Some(conflicts as f32 / 16.0));
    }

    #[test]
    fn breadcrumbs_and_breadcrumbs_ties() {
        // density 0.5, gamma 0.1 on 10 elements: drop the largest, keep the next 5.
        // δ1 = [1, −2, …, −10] keeps [0, 0, 0, 0, 5, −6, 7, −8, 9, 0];
        // δ2 = [5, 4.5, 4, 3.5, −3, −2.5, 2, 1.5, 1, 0.5] keeps [0, 4.5, 4, 3.5, −3, −2.5, 0, …].
        // Weights (2, 1): Σ = [0, 4.5, 4, 3.5, 7, −14.5, 14, −16, 18, 0]; + 10.
        let base = [10.0; 10];
        let x1: Vec<f32> = (1..=10)
            .map(|v| 10.0 + if v % 2 == 0 { -(v as f32) } else { v as f32 })
            .collect();
        let x2 = [15.0, 14.5, 14.0, 13.5, 7.0, 7.5, 12.0, 11.5, 11.0, 10.5];
        let p = ExpertParams {
            gamma: 0.1,
            ..expert(2.0, 0.5)
        };
        let params = [p, ExpertParams { weight: 1.0, ..p }];
        let g = Method::Breadcrumbs.default_globals();
        let out = run(
            Method::Breadcrumbs,
            &g,
            &[10],
            Some(&base),
            &[&x1, &x2],
            &params,
        )
        .unwrap();
        assert_eq!(
            out.values,
            [10.0, 14.5, 14.0, 13.5, 17.0, -4.5, 24.0, -6.0, 28.0, 10.0]
        );
        assert_eq!(out.stats.kept_fraction, [0.5, 0.5]);
        assert_eq!(out.stats.sign_conflict, None);
        // With the election, coordinate 4 (+10 against −3) keeps only δ1's 10; normalize
        // is off by default, so nothing is divided.
        let g = Method::BreadcrumbsTies.default_globals();
        let out = run(
            Method::BreadcrumbsTies,
            &g,
            &[10],
            Some(&base),
            &[&x1, &x2],
            &params,
        )
        .unwrap();
        assert_eq!(
            out.values,
            [10.0, 14.5, 14.0, 13.5, 20.0, -4.5, 24.0, -6.0, 28.0, 10.0]
        );
        assert_eq!(out.stats.sign_conflict, Some(0.1));
    }

    #[test]
    fn della_and_della_linear() {
        // δ = [[1, −2], [3, −4]], density 0.5, epsilon 0.2: in each row the smaller keeps
        // with p = 0.3, the larger with p = 0.7. The L1 rescale multiplies survivors by
        // 10 / (their L1 norm); an empty mask is left at zero.
        let base = [1.0; 4];
        let x = [2.0, -1.0, 4.0, -3.0];
        let delta = [1.0f32, -2.0, 3.0, -4.0];
        let p_keep = [0.3, 0.7, 0.3, 0.7];
        let params = [ExpertParams {
            epsilon: 0.2,
            ..expert(2.0, 0.5)
        }];
        for seed in 0..10 {
            let survives: Vec<bool> = (0..4).map(|i| kept(seed, 0, i, p_keep[i])).collect();
            let l1: f32 = (0..4)
                .filter(|&i| survives[i])
                .map(|i| delta[i].abs())
                .sum();
            let rescaled = |i: usize| {
                if survives[i] {
                    delta[i] * 10.0 / l1
                } else {
                    0.0
                }
            };
            // della normalises by the agreeing weight: 2·r / 2 = r.
            let g = GlobalParams {
                seed,
                ..Method::Della.default_globals()
            };
            let out = run(Method::Della, &g, &[2, 2], Some(&base), &[&x], &params).unwrap();
            let expected: Vec<f32> = (0..4).map(|i| 1.0 + rescaled(i)).collect();
            close(&out.values, &expected);
            // della_linear does not normalise: 2·r.
            let g = GlobalParams {
                seed,
                ..Method::DellaLinear.default_globals()
            };
            let out = run(
                Method::DellaLinear,
                &g,
                &[2, 2],
                Some(&base),
                &[&x],
                &params,
            )
            .unwrap();
            let expected: Vec<f32> = (0..4).map(|i| 1.0 + 2.0 * rescaled(i)).collect();
            close(&out.values, &expected);
        }
    }

    #[test]
    fn magnitude_prune_is_peft_s() {
        // δ1 at density 0.5 keeps floor(2.5) = 2: [0, 0, 3, −4, 0]. δ2 at density 0.1 keeps
        // floor(0.5) = 0 entries (TIES would keep 1). Weights (2, 1), no normalisation.
        let base = [0.0; 5];
        let experts: [&[f32]; 2] = [&[1.0, -2.0, 3.0, -4.0, 0.5], &[0.1, 0.2, 0.3, 0.4, 0.5]];
        let params = [expert(2.0, 0.5), expert(1.0, 0.1)];
        let g = Method::MagnitudePrune.default_globals();
        let out = run(
            Method::MagnitudePrune,
            &g,
            &[5],
            Some(&base),
            &experts,
            &params,
        )
        .unwrap();
        assert_eq!(out.values, [0.0, 0.0, 6.0, -8.0, 0.0]);
        assert_eq!(out.stats.kept_fraction, [0.4, 0.0]);
    }

    #[test]
    fn no_experts_gives_the_base() {
        let base = [1.0, -2.0];
        for &m in Method::all()
            .iter()
            .filter(|m| !m.adapters_only() && !m.data_aware())
        {
            let out = run(m, &m.default_globals(), &[2], Some(&base), &[], &[]).unwrap();
            assert_eq!(out.values, base);
            assert_eq!(out.stats.delta_l2, 0.0);
        }
        let err = run(
            Method::Linear,
            &Method::Linear.default_globals(),
            &[2],
            None,
            &[],
            &[],
        );
        assert!(err.is_err());
    }

    /// `cat` and `svd` work on LoRA factors, the data-aware methods on statistics: neither has
    /// a form on full tensors alone.
    #[test]
    fn some_methods_have_no_tensor_wise_form() {
        let base = [0.0; 2];
        for (m, why) in [
            (Method::Cat, "LoRA adapter"),
            (Method::Svd, "LoRA adapter"),
            (Method::RegMean, "calibration"),
            (Method::Fisher, "calibration"),
        ] {
            let err = run(
                m,
                &m.default_globals(),
                &[1, 2],
                Some(&base),
                &[&[1.0, 2.0]],
                &[expert(1.0, 1.0)],
            )
            .unwrap_err();
            assert!(
                matches!(err, Error::Parameter { ref name, ref message, .. }
                    if name == "method" && message.contains(why)),
                "{err}"
            );
        }
    }

    #[test]
    fn missing_base_is_an_error() {
        for &m in Method::all()
            .iter()
            .filter(|m| m.needs_base() && !m.adapters_only() && !m.data_aware())
        {
            let err = run(
                m,
                &m.default_globals(),
                &[1],
                None,
                &[&[1.0]],
                &[expert(1.0, 1.0)],
            )
            .unwrap_err();
            assert!(matches!(err, Error::Parameter { ref name, .. } if name == "base_model"));
        }
    }

    #[test]
    fn bad_parameters_are_errors_before_any_work() {
        let base = [0.0; 4];
        let x: [&[f32]; 1] = [&[1.0, 2.0, 3.0, 4.0]];
        let check = |m: Method, g: &GlobalParams, p: ExpertParams, param: &str| {
            let err = run(m, g, &[4], Some(&base), &x, &[p]).unwrap_err();
            assert!(
                matches!(err, Error::Parameter { ref name, ref tensor, .. }
                    if name == param && tensor == NAME),
                "{m:?} {param}: {err}"
            );
        };
        let della = Method::Della.default_globals();
        check(
            Method::Della,
            &della,
            ExpertParams {
                epsilon: 0.5,
                ..expert(1.0, 0.5)
            },
            "epsilon",
        );
        check(
            Method::DellaLinear,
            &della,
            ExpertParams {
                epsilon: 0.15,
                ..expert(1.0, 0.1)
            },
            "epsilon",
        );
        let ties = Method::Ties.default_globals();
        check(Method::Ties, &ties, expert(1.0, -0.5), "density");
        check(Method::DareTies, &ties, expert(1.0, f32::NAN), "density");
        check(Method::Ties, &ties, expert(f32::INFINITY, 0.5), "weight");
        let crumbs = Method::Breadcrumbs.default_globals();
        check(
            Method::Breadcrumbs,
            &crumbs,
            ExpertParams {
                gamma: 1.5,
                ..expert(1.0, 0.5)
            },
            "gamma",
        );
        let bad_lambda = GlobalParams {
            lambda: f32::NAN,
            ..ties.clone()
        };
        check(Method::Ties, &bad_lambda, expert(1.0, 0.5), "lambda");
        // Wrong lengths.
        let err = run(
            Method::Ties,
            &ties,
            &[3],
            Some(&base[..3]),
            &x,
            &[expert(1.0, 1.0)],
        );
        assert!(matches!(err, Err(Error::Parameter { ref name, .. }) if name == "shape"));
        let err = run(Method::Ties, &ties, &[4], Some(&base), &x, &[]);
        assert!(matches!(err, Err(Error::Parameter { ref name, .. }) if name == "experts"));
        // Epsilon is not checked where density makes it irrelevant, as in mergekit.
        let p = ExpertParams {
            epsilon: 0.9,
            ..expert(1.0, 1.0)
        };
        assert!(run(Method::Della, &della, &[4], Some(&base), &x, &[p]).is_ok());
        // Density 0 keeps nothing: refused here as in recipes (one validator for both).
        let p = ExpertParams { density: 0.0, ..p };
        let err = run(Method::Della, &della, &[4], Some(&base), &x, &[p]);
        assert!(matches!(err, Err(Error::Parameter { ref name, .. }) if name == "density"));
    }

    proptest! {
        #[test]
        fn one_expert_through_task_arithmetic_is_the_identity(
            pairs in prop::collection::vec((-1e3f32..1e3, -1e3f32..1e3), 1..64),
        ) {
            let (base, x): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            let g = Method::TaskArithmetic.default_globals();
            let out = run(Method::TaskArithmetic, &g, &[x.len()], Some(&base), &[&x], &[expert(1.0, 1.0)]).unwrap();
            for ((o, x), b) in out.values.iter().zip(&x).zip(&base) {
                // (x − b) + b is x up to the two roundings.
                prop_assert!((o - x).abs() <= f32::EPSILON * (x.abs() + b.abs()));
            }
        }

        #[test]
        fn ties_at_full_density_without_conflicts_is_the_weighted_mean(
            magnitudes in prop::collection::vec(prop::collection::vec(0.0f32..5.0, 12), 1..4),
            signs in prop::collection::vec(any::<bool>(), 12),
            weights in prop::collection::vec(0.1f32..2.0, 4),
        ) {
            let m = magnitudes.len();
            let base: Vec<f32> = (0..12).map(|i| i as f32 - 6.0).collect();
            let deltas: Vec<Vec<f32>> = magnitudes
                .iter()
                .map(|row| row.iter().zip(&signs).map(|(v, &s)| if s { *v } else { -*v }).collect())
                .collect();
            let experts: Vec<Vec<f32>> = deltas
                .iter()
                .map(|d| d.iter().zip(&base).map(|(d, b)| b + d).collect())
                .collect();
            let refs: Vec<&[f32]> = experts.iter().map(Vec::as_slice).collect();
            let params: Vec<ExpertParams> = weights[..m].iter().map(|&w| expert(w, 1.0)).collect();
            let g = Method::Ties.default_globals();
            let out = run(Method::Ties, &g, &[12], Some(&base), &refs, &params).unwrap();
            prop_assert_eq!(out.stats.sign_conflict, Some(0.0));
            for j in 0..12 {
                // Recompute the delta from the expert as the merge does.
                let d: Vec<f32> = (0..m).map(|e| experts[e][j] - base[j]).collect();
                let num: f32 = (0..m).map(|e| weights[e] * d[e]).sum();
                let den: f32 = (0..m).filter(|&e| d[e] != 0.0).map(|e| weights[e]).sum();
                let mean = if den == 0.0 { 0.0 } else { num / den };
                let expect = base[j] + mean;
                prop_assert!((out.values[j] - expect).abs() <= 1e-5 * (1.0 + expect.abs()));
            }
        }
    }
}
