//! CACI on a large 2-D tensor, chunk by chunk (see [`super::chunked`]): the steps of
//! [`super::caci::merge`], with what they need of the whole tensor found by earlier passes
//! over the chunks. Each expert's magnitude cut comes from the radix select TIES uses; one
//! pass sums each expert's squares (its rms confidence) and, with `restore`, the experts'
//! Gram matrix; with `restore` a second pass merges every chunk once to measure each expert's
//! share of the merge, and the last pass merges again, adds the restoring combination of the
//! experts' updates and writes. Memory stays a few chunks per worker; the time is one or two
//! passes more than TIES's.
//!
//! With one chunk for the whole tensor the result is the in-memory one to the bit; with more,
//! the sums behind the confidences and the restore coefficients are added chunk by chunk, so
//! they may differ in their last bits.

use super::caci::{activation_needs_statistics, combine, confidence, squares};
use super::chunked::Job;
use super::job::TensorStats;
use super::method::{Confidence, Method, Trim};
use super::parameters::check_params;
use super::plan::MergeParams;
use super::restore::{self, add_along, coefficients, dot};
use crate::error::Result;
use crate::tensor::ShardedWriter;

/// One chunk merged up to (not including) restore: the base, the experts' untrimmed updates
/// (kept only when restoring), the merged update, what each expert kept and the conflicts.
struct MergedChunk {
    base: Vec<f32>,
    updates: Vec<Vec<f32>>,
    values: Vec<f32>,
    kept: Vec<usize>,
    conflicts: usize,
}

/// Merges a streamed tensor with CACI and writes it; returns its statistics.
pub(crate) fn merge(
    job: &Job,
    params: &MergeParams,
    writer: &ShardedWriter,
) -> Result<TensorStats> {
    let name = &job.t.name;
    let globals = &params.globals;
    let experts = &params.experts;
    check_params(Method::Caci, globals, name, experts)?;
    if globals.confidence == Confidence::Activation {
        // The plan merges activation-aware CACI in memory, with the statistics.
        return Err(activation_needs_statistics(name));
    }
    let n = job.numel();
    let count = experts.len();
    let trims = job.trims(Trim::Magnitude, experts, globals.seed)?;

    // Each expert's sum of squares (for rms confidence) and, to restore, the Gram matrix of
    // the untrimmed updates, in one pass.
    let by_rms = globals.confidence == Confidence::Rms;
    let restoring = globals.restore.is_some();
    let (mut sums, mut gram) = (vec![0f64; count], vec![0f64; count * count]);
    if by_rms || restoring {
        let partial = job.each_chunk(|range| {
            let base = job.base(range)?.expect("streamed CACI merges have a base");
            let updates = (0..count)
                .map(|e| job.delta(e, &base, range))
                .collect::<Result<Vec<_>>>()?;
            let sums: Vec<f64> = if by_rms {
                updates.iter().map(|u| squares(u)).collect()
            } else {
                Vec::new()
            };
            let gram = if restoring {
                restore::gram(&updates)
            } else {
                Vec::new()
            };
            Ok((sums, gram))
        })?;
        for (chunk_sums, chunk_gram) in &partial {
            sums.iter_mut().zip(chunk_sums).for_each(|(s, c)| *s += c);
            gram.iter_mut().zip(chunk_gram).for_each(|(g, c)| *g += c);
        }
    }
    let confidences: Vec<f32> = experts
        .iter()
        .zip(&sums)
        .map(|(p, &s)| confidence(p.weight, globals.confidence, s, n))
        .collect();

    let merged = |range: (usize, usize)| -> Result<MergedChunk> {
        let base = job.base(range)?.expect("streamed CACI merges have a base");
        let mut order = Vec::new();
        let (mut trimmed, mut updates, mut kept) = (Vec::new(), Vec::new(), Vec::new());
        for (e, trim) in trims.iter().enumerate() {
            let mut d = job.delta(e, &base, range)?;
            if restoring {
                updates.push(d.clone());
            }
            job.apply_keep(trim, &mut d, range, &mut order)?;
            kept.push(d.iter().filter(|v| **v != 0.0).count());
            trimmed.push(d);
        }
        let mut values = vec![0f32; base.len()];
        let conflicts = combine(
            &trimmed,
            &trimmed,
            &confidences,
            experts,
            globals,
            &mut values,
        );
        Ok(MergedChunk {
            base,
            updates,
            values,
            kept,
            conflicts,
        })
    };

    // Restore: each expert's share of the merge, from a first merge of every chunk.
    let beta = match globals.restore {
        None => None,
        Some(target) => {
            let partial = job.each_chunk(|range| {
                let chunk = merged(range)?;
                Ok(chunk
                    .updates
                    .iter()
                    .map(|u| dot(&chunk.values, u))
                    .collect::<Vec<f64>>())
            })?;
            let mut shares = vec![0f64; count];
            for chunk in &partial {
                shares.iter_mut().zip(chunk).for_each(|(s, c)| *s += c);
            }
            let weights: Vec<f32> = experts.iter().map(|p| p.weight).collect();
            Some(coefficients(&gram, &shares, &weights, target, name)?)
        }
    };

    let results = job.each_chunk(|range| {
        let MergedChunk {
            base,
            updates,
            mut values,
            kept,
            conflicts,
        } = merged(range)?;
        if let Some(beta) = &beta {
            add_along(&mut values, &updates, beta);
        }
        values.iter_mut().zip(&base).for_each(|(v, b)| *v += b);
        let squares = job.write(writer, &mut values, Some(&base), range.0)?;
        Ok((kept, conflicts, squares))
    })?;
    Ok(job.stats(count, &results, true))
}
