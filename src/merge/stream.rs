//! Large 2-D tensors merged chunk by chunk: whole rows at a time, the chunks of one tensor in
//! parallel, so that memory stays a few chunks per worker whatever the tensor's size.
//!
//! The trims that look at the whole tensor (top-k, breadcrumbs' band, the L1 rescale) get
//! what they need from earlier passes over the chunks (radix-select histograms, tie counts,
//! norms); the last pass then applies exactly the elementwise steps of [`merge_tensor`]
//! (trim, rescale, sign election, disjoint mean, lambda) to each chunk and writes it at its
//! offset. Chunk boundaries depend on the shape only, never on the thread count.
//!
//! [`merge_tensor`]: super::tensor_merge::merge_tensor

use std::path::Path;

use rayon::prelude::*;

use super::chunking::CHUNK_ELEMENTS;
use super::consensus;
use super::job::{fraction, squared_distance, TensorStats};
use super::method::{ExpertParams, Method, RescaleMode, Trim};
use super::parameters::check_params;
use super::plan::{MergeParams, Plan, TensorPlan};
use super::rng::MaskRng;
use super::sparsify::{self, Cut, RadixSearch};
use super::tensor_merge::{linear, weighted_sum};
use crate::error::Result;
use crate::recipe::OutputKind;
use crate::tensor::{check_finite, from_f32, ShardedWriter};

/// What one expert's trim keeps, decided from the whole tensor before the last pass.
enum Keep {
    /// Everything (no trim, or density ≥ 1).
    All,
    /// Nothing.
    Nothing,
    /// The top of a magnitude cut.
    Top(Selection),
    /// Inside one cut but outside another (breadcrumbs).
    Band(Selection, Option<Selection>),
    /// A random mask (DARE).
    Random,
    /// DELLA's per-row mask.
    Della,
}

/// What one expert's trim needs found before it can be applied; indices point into the list
/// of cuts searched together.
enum Need {
    All,
    Nothing,
    Top(usize),
    Band(usize, Option<usize>),
    Random,
    Della,
}

/// A magnitude cut with the index past its last kept tie.
struct Selection {
    cut: Cut,
    split: usize,
}

impl Selection {
    #[inline]
    fn contains(&self, v: f32, index: usize) -> bool {
        self.cut.contains(v, index, self.split)
    }
}

/// Everything the last pass needs about one expert.
struct ExpertTrim {
    keep: Keep,
    rescale: Rescale,
    rng: MaskRng,
    params: ExpertParams,
}

enum Rescale {
    None,
    Factor(f32),
    Inverse(f32),
}

/// A tensor being streamed.
struct Job<'a> {
    plan: &'a Plan,
    t: &'a TensorPlan,
    row_len: usize,
    chunks: Vec<(usize, usize)>,
}

impl Job<'_> {
    fn numel(&self) -> usize {
        self.t.shape.iter().product()
    }

    /// Runs `f` on every chunk (its element range) in parallel; results in chunk order.
    fn each_chunk<T: Send>(
        &self,
        f: impl Fn((usize, usize)) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        self.chunks.par_iter().map(|&range| f(range)).collect()
    }

    fn base(&self, (start, end): (usize, usize)) -> Result<Option<Vec<f32>>> {
        self.plan
            .base
            .as_ref()
            .map(|b| b.read_f32_range(&self.t.name, start, end))
            .transpose()
    }

    /// The expert's full values on a chunk (checked finite as they are read).
    fn expert(&self, e: usize, base: Option<&[f32]>, range: (usize, usize)) -> Result<Vec<f32>> {
        let expert = &self.plan.experts[e];
        let values = match base {
            Some(b) if !expert.touches(&self.t.name) => b.to_vec(),
            _ => expert.tensor_range(&self.t.name, self.plan.base.as_ref(), range, self.row_len)?,
        };
        Ok(values)
    }

    /// The expert's delta (values − base) on a chunk.
    fn delta(&self, e: usize, base: &[f32], range: (usize, usize)) -> Result<Vec<f32>> {
        if !self.plan.experts[e].touches(&self.t.name) {
            return Ok(vec![0.0; base.len()]);
        }
        let mut d = self.expert(e, Some(base), range)?;
        for (d, b) in d.iter_mut().zip(base) {
            *d -= b;
        }
        Ok(d)
    }

    /// Finds several magnitude cuts at once, `wanted[i] = (expert, r)` for the `r`-th largest
    /// magnitude of that expert's delta, with the index past each one's last kept tie. Every
    /// pass over the chunks reads the base and each expert once for all the cuts.
    fn select_all(&self, wanted: &[(usize, usize)]) -> Result<Vec<Selection>> {
        let mut experts: Vec<usize> = wanted.iter().map(|&(e, _)| e).collect();
        experts.dedup();
        let mut searches: Vec<RadixSearch> =
            wanted.iter().map(|&(_, r)| RadixSearch::new(r)).collect();
        // The last pass's per-chunk histograms: their bucket of the threshold counts its ties.
        let mut last = None;
        while let Some(digits) = searches
            .iter()
            .map(RadixSearch::digit)
            .collect::<Option<Vec<_>>>()
        {
            let partial = self.each_chunk(|range| {
                let base = self.base(range)?.expect("streamed GTA merges have a base");
                let mut histograms: Vec<Vec<usize>> =
                    digits.iter().map(|d| vec![0; d.buckets()]).collect();
                for &e in &experts {
                    let d = self.delta(e, &base, range)?;
                    for ((&(we, _), digit), h) in wanted.iter().zip(&digits).zip(&mut histograms) {
                        if we == e {
                            digit.count(&d, h);
                        }
                    }
                }
                Ok(histograms)
            })?;
            for (i, search) in searches.iter_mut().enumerate() {
                let mut total = vec![0usize; digits[i].buckets()];
                for histograms in &partial {
                    total
                        .iter_mut()
                        .zip(&histograms[i])
                        .for_each(|(t, c)| *t += c);
                }
                search.advance(&total);
            }
            last = Some((digits, partial));
        }
        let cuts: Vec<Cut> = searches.into_iter().map(RadixSearch::finish).collect();
        let (digits, partial) = last.expect("a radix search has digits");

        // Ties: where only some elements equal to a threshold are kept, the first ones by
        // index are; the chunk holding the last kept one is found from the tie counts.
        let tied: Vec<usize> = (0..cuts.len())
            .filter(|&i| cuts[i].ties < cuts[i].equal)
            .collect();
        let mut splits = vec![self.numel(); cuts.len()];
        if !tied.is_empty() {
            let counts: Vec<Vec<usize>> = partial
                .iter()
                .map(|histograms| {
                    tied.iter()
                        .map(|&i| {
                            let bucket = digits[i]
                                .bucket(cuts[i].threshold())
                                .expect("the threshold matches its own prefix");
                            histograms[i][bucket]
                        })
                        .collect()
                })
                .collect();
            for (k, &i) in tied.iter().enumerate() {
                let mut seen = 0;
                for (&(start, end), chunk_counts) in self.chunks.iter().zip(&counts) {
                    let count = chunk_counts[k];
                    if seen + count >= cuts[i].ties {
                        let base = self
                            .base((start, end))?
                            .expect("streamed GTA merges have a base");
                        let d = self.delta(wanted[i].0, &base, (start, end))?;
                        let within = cuts[i]
                            .split_after(&d, cuts[i].ties - seen)
                            .expect("the chunk holds the remaining ties");
                        splits[i] = start + within;
                        break;
                    }
                    seen += count;
                }
            }
        }
        Ok(cuts
            .into_iter()
            .zip(splits)
            .map(|(cut, split)| Selection { cut, split })
            .collect())
    }

    /// Decides what every expert keeps, mirroring the trims of `sparsify` on a whole tensor;
    /// the magnitude cuts of all experts are found together.
    fn keeps(&self, trim: Trim, params: &[ExpertParams]) -> Result<Vec<Keep>> {
        let n = self.numel();
        let mut wanted = Vec::new();
        let mut plans = Vec::with_capacity(params.len());
        for (e, p) in params.iter().enumerate() {
            let plan = if trim == Trim::None || p.density >= 1.0 {
                Need::All
            } else {
                match trim {
                    Trim::None => Need::All,
                    Trim::Magnitude | Trim::TopK => {
                        let k = sparsify::keep_count(p.density, n);
                        let k = if trim == Trim::Magnitude && p.density > 0.0 {
                            k.max(1)
                        } else {
                            k
                        };
                        match k {
                            0 => Need::Nothing,
                            k if k >= n => Need::All,
                            k => {
                                wanted.push((e, k));
                                Need::Top(wanted.len() - 1)
                            }
                        }
                    }
                    Trim::Outliers => {
                        let target = sparsify::keep_count(p.density, n).min(n);
                        if target == 0 {
                            Need::Nothing
                        } else {
                            let n_top = sparsify::keep_count(p.gamma, n).min(n - target);
                            wanted.push((e, n_top + target));
                            let within = wanted.len() - 1;
                            let top = (n_top > 0).then(|| {
                                wanted.push((e, n_top));
                                wanted.len() - 1
                            });
                            Need::Band(within, top)
                        }
                    }
                    Trim::Random => Need::Random,
                    Trim::Della if p.density <= 0.0 => Need::Nothing,
                    Trim::Della => Need::Della,
                }
            };
            plans.push(plan);
        }
        let mut selections: Vec<Option<Selection>> = if wanted.is_empty() {
            Vec::new()
        } else {
            self.select_all(&wanted)?.into_iter().map(Some).collect()
        };
        let mut take = |i: usize| selections[i].take().expect("each selection is used once");
        Ok(plans
            .into_iter()
            .map(|plan| match plan {
                Need::All => Keep::All,
                Need::Nothing => Keep::Nothing,
                Need::Top(i) => Keep::Top(take(i)),
                Need::Band(within, top) => Keep::Band(take(within), top.map(&mut take)),
                Need::Random => Keep::Random,
                Need::Della => Keep::Della,
            })
            .collect())
    }

    /// Applies expert `e`'s trim (without rescale) to its delta on a chunk.
    fn apply_keep(
        &self,
        trim: &ExpertTrim,
        d: &mut [f32],
        (start, end): (usize, usize),
        order: &mut Vec<usize>,
    ) -> Result<()> {
        match &trim.keep {
            Keep::All => {}
            Keep::Nothing => d.fill(0.0),
            Keep::Top(sel) => {
                for (i, v) in d.iter_mut().enumerate() {
                    *v = if sel.contains(*v, start + i) { *v } else { 0.0 };
                }
            }
            Keep::Band(within, top) => {
                for (i, v) in d.iter_mut().enumerate() {
                    let inside = within.contains(*v, start + i);
                    let outlier = top.as_ref().is_some_and(|s| s.contains(*v, start + i));
                    if !inside || outlier {
                        *v = 0.0;
                    }
                }
            }
            Keep::Random => {
                sparsify::random_at(d, start as u64, trim.params.density, &trim.rng);
            }
            Keep::Della => {
                let rows = (end - start) / self.row_len;
                sparsify::della_at(
                    d,
                    start as u64,
                    &[rows, self.row_len],
                    trim.params.density,
                    trim.params.epsilon,
                    &trim.rng,
                    order,
                    &self.t.name,
                )?;
            }
        }
        Ok(())
    }
}

/// Merges a streamed tensor and writes it; returns its statistics.
pub(crate) fn merge_streamed(
    plan: &Plan,
    t: &TensorPlan,
    params: &MergeParams,
    writer: &ShardedWriter,
) -> Result<TensorStats> {
    merge_in_chunks(plan, t, params, writer, CHUNK_ELEMENTS)
}

fn merge_in_chunks(
    plan: &Plan,
    t: &TensorPlan,
    params: &MergeParams,
    writer: &ShardedWriter,
    chunk_elements: usize,
) -> Result<TensorStats> {
    let (rows, row_len) = (t.shape[0], t.shape[1]);
    let rows_per_chunk = (chunk_elements / row_len).max(1);
    let chunks = (0..rows)
        .step_by(rows_per_chunk)
        .map(|r| (r * row_len, (r + rows_per_chunk).min(rows) * row_len))
        .collect();
    let job = Job {
        plan,
        t,
        row_len,
        chunks,
    };
    let method = params.method;
    let globals = &params.globals;
    check_params(method, globals, &t.name, &params.experts)?;
    let n = job.numel();
    let weights: Vec<f32> = params.experts.iter().map(|p| p.weight).collect();
    let delta_output = plan.recipe.output == OutputKind::Delta;
    let out_size = t.dtype.size();

    let write = |values: &mut Vec<f32>, base: Option<&[f32]>, start: usize| -> Result<f64> {
        check_finite(Path::new("merged output"), &t.name, values)?;
        let squares = squared_distance(values, base);
        if delta_output {
            let base = base.expect("delta output is planned with a base");
            values.iter_mut().zip(base).for_each(|(v, b)| *v -= b);
        }
        let bytes = from_f32(t.dtype, values).expect("output dtype");
        writer.write_at(&t.name, start * out_size, &bytes)?;
        Ok(squares)
    };

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
            write(&mut values, base.as_deref(), range.0)
        })?;
        return Ok(TensorStats {
            kept_fraction: vec![1.0; plan.experts.len()],
            sign_conflict: None,
            delta_l2: squares.iter().sum::<f64>().sqrt(),
        });
    }

    let trim = method.trim();
    let keeps = job.keeps(trim, &params.experts)?;
    let mut trims: Vec<ExpertTrim> = params
        .experts
        .iter()
        .zip(keeps)
        .enumerate()
        .map(|(e, (p, keep))| ExpertTrim {
            keep,
            rescale: Rescale::None,
            rng: MaskRng::new(globals.seed, &t.name, plan.experts[e].index),
            params: *p,
        })
        .collect();
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
        let squares = write(&mut values, Some(&base), range.0)?;
        Ok((kept, conflicts, squares))
    })?;

    let mut kept_total = vec![0usize; trims.len()];
    let (mut conflicts, mut squares) = (0usize, 0f64);
    for (kept, c, s) in results {
        kept_total.iter_mut().zip(kept).for_each(|(t, k)| *t += k);
        conflicts += c;
        squares += s;
    }
    Ok(TensorStats {
        kept_fraction: kept_total.iter().map(|&k| fraction(k, n)).collect(),
        sign_conflict: consensus.then(|| fraction(conflicts, n)),
        delta_l2: squares.sqrt(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;
    use crate::merge::executor::compute;
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
        merge_in_chunks(&plan, t, t.merge.as_ref().unwrap(), &writer, chunk).unwrap();
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
        ];
        for (method, params) in cases {
            // One row per chunk, rows split unevenly, and one chunk for everything.
            for chunk in [53, 300, 1 << 20] {
                let (whole, streamed) = both(dir.path(), method, params, chunk);
                // The L1 rescale sums its norms per chunk: the factor may differ in the last bit.
                let l1 = matches!(method, "dare_ties" | "della");
                for (i, (w, s)) in whole.iter().zip(&streamed).enumerate() {
                    if l1 {
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
