//! Large 2-D tensors of the task-arithmetic family merged chunk by chunk (see
//! [`super::chunked`]).
//!
//! The trims that look at the whole tensor (top-k, breadcrumbs' band, the L1 rescale) get
//! what they need from earlier passes over the chunks (radix-select histograms, tie counts,
//! norms); the last pass then applies exactly the elementwise steps of [`merge_tensor`]
//! (trim, rescale, sign election, disjoint mean, lambda) to each chunk and writes it at its
//! offset.
//!
//! [`merge_tensor`]: super::tensor_merge::merge_tensor

use super::chunked::{Job, Rescale};
use super::consensus;
use super::job::TensorStats;
use super::method::{Method, RescaleMode, Trim};
use super::parameters::check_params;
use super::plan::MergeParams;
use super::sparsify;
use super::tensor_merge::{linear, weighted_sum};
use crate::error::Result;
use crate::tensor::ShardedWriter;

/// Merges a streamed tensor of the task-arithmetic family (every method but CACI and the
/// data-aware ones) and writes it; returns its statistics.
pub(crate) fn merge(
    job: &Job,
    params: &MergeParams,
    writer: &ShardedWriter,
) -> Result<TensorStats> {
    let (plan, t) = (job.plan, job.t);
    let method = params.method;
    let globals = &params.globals;
    check_params(method, globals, &t.name, &params.experts)?;
    let weights: Vec<f32> = params.experts.iter().map(|p| p.weight).collect();

    if method == Method::Linear {
        let squares = job.each_chunk(|range| {
            let base = job.base(range)?;
            let experts = (0..plan.experts.len())
                .map(|e| job.expert(e, base.as_deref(), range))
                .collect::<Result<Vec<_>>>()?;
            let mut values = linear(
                &t.name,
                base.as_deref(),
                experts,
                &params.experts,
                globals.normalize,
            )?
            .values;
            job.write(writer, &mut values, base.as_deref(), range.0)
        })?;
        return Ok(TensorStats {
            kept_fraction: vec![1.0; plan.experts.len()],
            sign_conflict: None,
            delta_l2: squares.iter().sum::<f64>().sqrt(),
        });
    }

    let trim = method.trim();
    let mut trims = job.trims(trim, &params.experts, globals.seed)?;
    // As on a whole tensor: any trim below density 1 rescales when asked to.
    let rescaled: Vec<usize> = (0..trims.len())
        .filter(|&e| globals.rescale && trim != Trim::None && trims[e].params.density < 1.0)
        .collect();
    match globals.rescale_mode {
        RescaleMode::InverseDensity => {
            for &e in &rescaled {
                trims[e].rescale = Rescale::Inverse(trims[e].params.density);
            }
        }
        RescaleMode::L1 if !rescaled.is_empty() => {
            // Norms of every rescaled expert's delta before and after its trim, in one pass.
            let norms = job.each_chunk(|range| {
                let base = job.base(range)?.expect("streamed GTA merges have a base");
                let mut order = Vec::new();
                rescaled
                    .iter()
                    .map(|&e| {
                        let mut d = job.delta(e, &base, range)?;
                        let original = sparsify::l1_norm(&d);
                        job.apply_keep(&trims[e], &mut d, range, &mut order)?;
                        Ok((original, sparsify::l1_norm(&d)))
                    })
                    .collect::<Result<Vec<_>>>()
            })?;
            for (k, &e) in rescaled.iter().enumerate() {
                let (original, masked) = norms.iter().fold((0f64, 0f64), |(a, b), chunk| {
                    (a + chunk[k].0, b + chunk[k].1)
                });
                if let Some(f) = sparsify::l1_factor(original, masked) {
                    trims[e].rescale = Rescale::Factor(f);
                }
            }
        }
        RescaleMode::L1 => {}
    }

    let consensus = method.has_consensus();
    let results = job.each_chunk(|range| {
        let base = job.base(range)?.expect("streamed GTA merges have a base");
        let mut order = Vec::new();
        let mut kept = Vec::with_capacity(trims.len());
        let mut deltas = Vec::with_capacity(trims.len());
        for (e, trim) in trims.iter().enumerate() {
            let mut d = job.delta(e, &base, range)?;
            job.apply_keep(trim, &mut d, range, &mut order)?;
            match trim.rescale {
                Rescale::None => {}
                Rescale::Factor(f) => d.iter_mut().for_each(|v| *v *= f),
                Rescale::Inverse(density) => sparsify::rescale_inverse(&mut d, density),
            }
            kept.push(d.iter().filter(|v| **v != 0.0).count());
            deltas.push(d);
        }
        let conflicts = if consensus {
            consensus::disjoint_merge(
                &mut deltas,
                &weights,
                globals.sign_election,
                globals.disjoint_mean,
                globals.normalize,
            )
        } else {
            weighted_sum(&mut deltas, &weights, globals.normalize);
            0
        };
        let mut values = deltas.swap_remove(0);
        if globals.lambda != 1.0 {
            values.iter_mut().for_each(|v| *v *= globals.lambda);
        }
        values.iter_mut().zip(&base).for_each(|(v, b)| *v += b);
        let squares = job.write(writer, &mut values, Some(&base), range.0)?;
        Ok((kept, conflicts, squares))
    })?;

    Ok(job.stats(trims.len(), &results, consensus))
}
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;
    use crate::merge::chunked::Job;
    use crate::merge::executor::{compute, merge_streamed};
    use crate::merge::plan::Plan;
    use crate::merge::rng::MaskRng;
    use crate::recipe::Recipe;
    use crate::tensor::{write_safetensors, Dtype, SafetensorsFile, TensorSpec};

    const NAME: &str = "model.proj.weight";
    const SHAPE: [usize; 2] = [37, 53];

    fn bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Seeded values on a coarse grid, so that magnitudes tie often (as bf16 deltas do).
    fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let rng = MaskRng::new(seed, "test", 0);
        (0..n)
            .map(|i| ((rng.uniform(i as u64) * 64.0).floor() - 32.0) / 64.0 * scale)
            .collect()
    }

    fn model(dir: &Path, seed: u64) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"architectures":["X"],"model_type":"x"}"#,
        )
        .unwrap();
        let n = SHAPE[0] * SHAPE[1];
        let spec = TensorSpec {
            name: NAME.into(),
            dtype: Dtype::F32,
            shape: SHAPE.to_vec(),
        };
        let v = values(seed, n, 1.0 + seed as f32 / 4.0);
        write_safetensors(
            &dir.join("model.safetensors"),
            &[(spec, bytes(&v))],
            &BTreeMap::new(),
        )
        .unwrap();
    }

    fn adapter(dir: &Path) {
        let spec = |name: &str, shape: &[usize]| TensorSpec {
            name: format!("base_model.model.model.proj.{name}"),
            dtype: Dtype::F32,
            shape: shape.to_vec(),
        };
        let a = values(11, 4 * SHAPE[1], 1.0);
        let b = values(12, SHAPE[0] * 4, 1.0);
        let config: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"peft_type":"LORA","r":4,"lora_alpha":8}"#).unwrap();
        crate::adapter::Adapter::save(
            dir,
            &config,
            &[
                (spec("lora_A.weight", &[4, SHAPE[1]]), bytes(&a)),
                (spec("lora_B.weight", &[SHAPE[0], 4]), bytes(&b)),
            ],
        )
        .unwrap();
    }

    /// Merges the tensor whole and in chunks of `chunk` elements and returns both results.
    fn both(dir: &Path, method: &str, params: &str, chunk: usize) -> (Vec<f32>, Vec<f32>) {
        let recipe = dir.join(format!("{method}.toml"));
        std::fs::write(
            &recipe,
            format!(
                "[merge]\nmethod = '{method}'\nbase = 'base'\nseed = 5\n[merge.parameters]\n{params}\n\
                 [[merge.experts]]\nsource = 'a'\nweight = 1.0\n\
                 [[merge.experts]]\nsource = 'b'\nweight = 0.6\n\
                 [[merge.experts]]\nsource = 'lora'\nweight = 0.8\n"
            ),
        )
        .unwrap();
        let plan = Plan::build(Recipe::load(&recipe).unwrap()).unwrap();
        let t = plan.tensors.iter().find(|t| t.name == NAME).unwrap();
        let (whole, _) = compute(&plan, t).unwrap();
        let out = tempfile::tempdir().unwrap();
        let spec = TensorSpec {
            name: NAME.into(),
            dtype: Dtype::F32,
            shape: SHAPE.to_vec(),
        };
        let writer =
            ShardedWriter::create(out.path(), "model", &[spec], 1 << 30, &BTreeMap::new()).unwrap();
        // Dropping each chunk's input pages (as for a tensor large against the budget) reads
        // the same values.
        let job = Job::new(&plan, t, chunk, chunk == 300);
        merge_streamed(&job, t.merge.as_ref().unwrap(), &writer).unwrap();
        writer.finish("model").unwrap();
        let streamed = SafetensorsFile::open(out.path().join("model.safetensors"))
            .unwrap()
            .read_f32(NAME)
            .unwrap();
        (crate::tensor::to_f32(Dtype::F32, &whole).unwrap(), streamed)
    }

    #[test]
    fn chunks_give_what_the_whole_tensor_gives() {
        let dir = tempfile::tempdir().unwrap();
        for (name, seed) in [("base", 0), ("a", 1), ("b", 2)] {
            model(&dir.path().join(name), seed);
        }
        adapter(&dir.path().join("lora"));
        let cases = [
            ("linear", ""),
            ("task_arithmetic", "lambda = 0.8"),
            ("ties", "density = 0.3"),
            (
                "ties",
                "density = 0.5\nsign_election = 'unweighted'\ndisjoint_mean = 'counts'",
            ),
            ("magnitude_prune", "density = 0.4"),
            ("breadcrumbs", "density = 0.7\ngamma = 0.05"),
            ("breadcrumbs_ties", "density = 0.6\ngamma = 0.1"),
            (
                "dare_linear",
                "density = 0.5\nrescale_mode = 'inverse_density'",
            ),
            ("dare_ties", "density = 0.5"),
            ("della", "density = 0.6\nepsilon = 0.1"),
            (
                "della_linear",
                "density = 0.5\nepsilon = 0.2\nrescale = false",
            ),
            ("caci", "density = 0.4\nconfidence = 'none'"),
            ("caci", "density = 0.5"),
            (
                "caci",
                "density = 0.3\nattenuation = 2.0\nnormalize = false\nlambda = 0.9",
            ),
            ("caci", "density = 0.5\nrestore = 0.85"),
            (
                "caci",
                "density = 0.6\nconfidence = 'none'\nrestore = 1.2\nlambda = 0.8",
            ),
        ];
        for (method, params) in cases {
            // One row per chunk, rows split unevenly, and one chunk for everything.
            for chunk in [53, 300, 1 << 20] {
                let (whole, streamed) = both(dir.path(), method, params, chunk);
                // The L1 rescale, CACI's rms confidence and its restore sum over the tensor
                // chunk by chunk: with more than one chunk they may differ in the last bit.
                let caci_sums = (method == "caci" && !params.contains("confidence = 'none'"))
                    || params.contains("restore");
                let approximate = matches!(method, "dare_ties" | "della")
                    || (caci_sums && chunk < SHAPE[0] * SHAPE[1]);
                for (i, (w, s)) in whole.iter().zip(&streamed).enumerate() {
                    if approximate {
                        assert!(
                            (w - s).abs() <= 1e-6 * w.abs().max(1e-3),
                            "{method} {params} chunk {chunk}: element {i}: {w} vs {s}"
                        );
                    } else {
                        assert_eq!(
                            w.to_bits(),
                            s.to_bits(),
                            "{method} {params} chunk {chunk}: element {i}: {w} vs {s}"
                        );
                    }
                }
            }
        }
    }
}
