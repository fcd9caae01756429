//! A large 2-D tensor read in chunks of whole rows, the chunks in parallel, so that memory
//! stays a few chunks per worker whatever the tensor's size: the inputs of a chunk, the
//! magnitude cuts that need the whole tensor (radix-select histograms over every chunk, with
//! the tie counts of the last pass), each expert's trim applied to a chunk, and the merged
//! chunk written at its offset. Chunk boundaries depend on the shape only, never on the
//! thread count. The merges built on it: [`super::stream`] (the task-arithmetic family) and
//! [`super::caci_stream`].

use std::path::Path;

use rayon::prelude::*;

use super::job::{fraction, squared_distance, TensorStats};
use super::method::{ExpertParams, Trim};
use super::plan::{Plan, TensorPlan};
use super::rng::MaskRng;
use super::sparsify::{self, Cut, RadixSearch};
use crate::error::Result;
use crate::recipe::OutputKind;
use crate::tensor::{check_finite, from_f32, ShardedWriter};

/// What one expert's trim keeps, decided from the whole tensor before the last pass.
pub(super) enum Keep {
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
pub(super) struct Selection {
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
pub(super) struct ExpertTrim {
    pub keep: Keep,
    pub rescale: Rescale,
    pub rng: MaskRng,
    pub params: ExpertParams,
}

pub(super) enum Rescale {
    None,
    Factor(f32),
    Inverse(f32),
}

/// A tensor being streamed.
pub(super) struct Job<'a> {
    pub plan: &'a Plan,
    pub t: &'a TensorPlan,
    row_len: usize,
    chunks: Vec<(usize, usize)>,
    /// Whether each chunk's input pages are dropped once decoded.
    release_chunks: bool,
}

impl<'a> Job<'a> {
    /// Tensor `t` of `plan` in chunks of whole rows, about `chunk_elements` each;
    /// `release_chunks`: drop each chunk's input pages once decoded (see [`base`]).
    ///
    /// [`base`]: Self::base
    pub fn new(
        plan: &'a Plan,
        t: &'a TensorPlan,
        chunk_elements: usize,
        release_chunks: bool,
    ) -> Self {
        let (rows, row_len) = (t.shape[0], t.shape[1]);
        let rows_per_chunk = (chunk_elements / row_len).max(1);
        let chunks = (0..rows)
            .step_by(rows_per_chunk)
            .map(|r| (r * row_len, (r + rows_per_chunk).min(rows) * row_len))
            .collect();
        Job {
            plan,
            t,
            row_len,
            chunks,
            release_chunks,
        }
    }

    pub fn numel(&self) -> usize {
        self.t.shape.iter().product()
    }

    /// Runs `f` on every chunk (its element range) in parallel; results in chunk order.
    pub fn each_chunk<T: Send>(
        &self,
        f: impl Fn((usize, usize)) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        self.chunks.par_iter().map(|&range| f(range)).collect()
    }

    /// The base's values on a chunk. Here and in [`expert`](Self::expert), with
    /// `release_chunks`, the chunk's input pages are dropped once decoded: every pass faults
    /// them in again (system time), but resident memory stays a chunk per input and worker
    /// rather than the whole tensor.
    pub fn base(&self, (start, end): (usize, usize)) -> Result<Option<Vec<f32>>> {
        let Some(base) = &self.plan.base else {
            return Ok(None);
        };
        let values = base.read_f32_range(&self.t.name, start, end)?;
        if self.release_chunks {
            base.release_range(&self.t.name, start, end);
        }
        Ok(Some(values))
    }

    /// The expert's full values on a chunk (checked finite as they are read).
    pub fn expert(
        &self,
        e: usize,
        base: Option<&[f32]>,
        range: (usize, usize),
    ) -> Result<Vec<f32>> {
        let expert = &self.plan.experts[e];
        let values = match base {
            Some(b) if !expert.touches(&self.t.name) => b.to_vec(),
            _ => expert.tensor_range(&self.t.name, self.plan.base.as_ref(), range, self.row_len)?,
        };
        if self.release_chunks {
            expert.release_range(&self.t.name, range.0, range.1);
            if expert.model().is_none() {
                // An adapter's full values are the base's plus its update: the base was read.
                if let Some(base) = &self.plan.base {
                    base.release_range(&self.t.name, range.0, range.1);
                }
            }
        }
        Ok(values)
    }

    /// The expert's delta (values − base) on a chunk.
    pub fn delta(&self, e: usize, base: &[f32], range: (usize, usize)) -> Result<Vec<f32>> {
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

    /// Every expert's trim, decided from the whole tensor ([`keeps`](Self::keeps)), with no
    /// rescale yet and each expert's random mask keyed by `seed`, the tensor and its index.
    pub fn trims(&self, trim: Trim, params: &[ExpertParams], seed: u64) -> Result<Vec<ExpertTrim>> {
        let keeps = self.keeps(trim, params)?;
        Ok(params
            .iter()
            .zip(keeps)
            .enumerate()
            .map(|(e, (p, keep))| ExpertTrim {
                keep,
                rescale: Rescale::None,
                rng: MaskRng::new(seed, &self.t.name, self.plan.experts[e].index),
                params: *p,
            })
            .collect())
    }

    /// Applies expert `e`'s trim (without rescale) to its delta on a chunk.
    pub fn apply_keep(
        &self,
        trim: &ExpertTrim,
        d: &mut [f32],
        (start, end): (usize, usize),
        order: &mut Vec<u64>,
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

    /// The tensor's statistics from its chunks' `(kept per expert, conflicts, squared
    /// distance from the base)`; `consensus`: whether the method elects signs.
    pub fn stats(
        &self,
        experts: usize,
        chunks: &[(Vec<usize>, usize, f64)],
        consensus: bool,
    ) -> TensorStats {
        let n = self.numel();
        let mut kept = vec![0usize; experts];
        let (mut conflicts, mut squares) = (0usize, 0f64);
        for (chunk_kept, c, s) in chunks {
            kept.iter_mut().zip(chunk_kept).for_each(|(t, k)| *t += k);
            conflicts += c;
            squares += s;
        }
        TensorStats {
            kept_fraction: kept.iter().map(|&k| fraction(k, n)).collect(),
            sign_conflict: consensus.then(|| fraction(conflicts, n)),
            delta_l2: squares.sqrt(),
        }
    }

    /// Checks a merged chunk (the base added back), writes it at element `start` (as a delta
    /// when the recipe asks for one) and returns its squared distance from the base.
    pub fn write(
        &self,
        writer: &ShardedWriter,
        values: &mut [f32],
        base: Option<&[f32]>,
        start: usize,
    ) -> Result<f64> {
        check_finite(Path::new("merged output"), &self.t.name, values)?;
        let squares = squared_distance(values, base);
        if self.plan.recipe.output == OutputKind::Delta {
            let base = base.expect("delta output is planned with a base");
            values.iter_mut().zip(base).for_each(|(v, b)| *v -= b);
        }
        let bytes = from_f32(self.t.dtype, values).expect("output dtype");
        writer.write_at(&self.t.name, start * self.t.dtype.size(), &bytes)?;
        Ok(squares)
    }
}
