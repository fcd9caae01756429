//! The streaming executor: one tensor at a time per worker, rayon across tensors, and a memory
//! budget that bounds how many tensors are in flight at once.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use super::caci_stream;
use super::chunked::Job;
use super::chunking::CHUNK_ELEMENTS;
use super::data_aware::merge_with_statistics;
use super::job::{TensorJob, TensorStats};
use super::kernels::Kernels;
use super::method::Method;
use super::plan::{MergeParams, Plan, TensorPlan};
use super::stream;
use super::tensor_merge::merge_tensor;
use crate::error::{Error, Result};
use crate::recipe::OutputKind;
use crate::tensor::{check_finite, from_f32, to_f32, ShardedWriter};

/// What happened to one tensor, for `mmx-merge.json`.
#[derive(Debug, Clone)]
pub struct TensorRecord {
    /// The tensor name.
    pub name: String,
    /// Statistics of the merge; `None` when the tensor was copied from the base.
    pub stats: Option<TensorStats>,
    /// Whether it was merged on the GPU.
    pub on_device: bool,
}

/// Bytes of memory in use by tensors in flight, with waiting for room.
struct Budget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    /// Waits until `bytes` fit under the limit. A tensor larger than the whole budget runs
    /// alone rather than never.
    fn acquire(&self, bytes: u64) {
        let mut used = self.used.lock().expect("budget lock is never poisoned");
        while *used > 0 && *used + bytes > self.limit {
            used = self
                .freed
                .wait(used)
                .expect("budget lock is never poisoned");
        }
        *used += bytes;
    }

    fn release(&self, bytes: u64) {
        *self.used.lock().expect("budget lock is never poisoned") -= bytes;
        self.freed.notify_all();
    }
}

/// Computes every planned tensor and writes it through `writer`; the tensors `kernels` have a
/// device path for are merged there, one at a time, while the other workers
/// read inputs and write outputs. `progress` is called once per finished tensor with its
/// output bytes. On the first error the remaining tensors are skipped
/// and that error is returned.
///
/// Tensors are taken in turn by plain worker threads, which may wait for the memory budget;
/// the chunks of a streamed tensor run on rayon's pool, whose threads never wait on the budget
/// (a pool thread that did could be handed another tensor while its own still holds memory).
pub fn execute(
    plan: &Plan,
    writer: &ShardedWriter,
    max_memory: u64,
    kernels: &dyn Kernels,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<TensorRecord>> {
    let budget = Budget {
        limit: max_memory,
        used: Mutex::new(0),
        freed: Condvar::new(),
    };
    let failed = AtomicBool::new(false);
    // Largest first, so that the big tensors do not straggle at the end.
    let mut order: Vec<usize> = (0..plan.tensors.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(plan.tensors[i].working_bytes));
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
            if failed.load(Ordering::Relaxed) {
                break;
            }
            let t = &plan.tensors[i];
            budget.acquire(t.working_bytes);
            let result =
                run_tensor(plan, t, writer, kernels, max_memory).map(|(stats, on_device)| {
                    progress(t.shape.iter().product::<usize>() as u64 * t.dtype.size() as u64);
                    TensorRecord {
                        name: t.name.clone(),
                        stats,
                        on_device,
                    }
                });
            release(plan, &t.name);
            budget.release(t.working_bytes);
            if result.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            done.push((i, result));
        }
        done
    };
    let workers = rayon::current_num_threads().max(1);
    let results: Vec<(usize, Result<TensorRecord>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers).map(|_| scope.spawn(work)).collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("merge workers do not panic"))
            .collect()
    });
    let mut records: Vec<Option<TensorRecord>> = vec![None; plan.tensors.len()];
    let mut first_error: Option<(usize, Error)> = None;
    for (i, r) in results {
        match r {
            Ok(rec) => records[i] = Some(rec),
            Err(e) => {
                if first_error.as_ref().is_none_or(|(j, _)| i < *j) {
                    first_error = Some((i, e));
                }
            }
        }
    }
    if let Some((_, e)) = first_error {
        return Err(e);
    }
    Ok(records.into_iter().flatten().collect())
}

/// Computes one output tensor and writes it; returns the merge statistics (`None` for a
/// tensor copied from the base) and whether the GPU merged it.
fn run_tensor(
    plan: &Plan,
    t: &TensorPlan,
    writer: &ShardedWriter,
    kernels: &dyn Kernels,
    max_memory: u64,
) -> Result<(Option<TensorStats>, bool)> {
    if let Some(params) = &t.merge {
        if let Some((bytes, stats)) = kernels.merge_tensor(plan, t, params)? {
            writer.write(&t.name, &bytes)?;
            return Ok((Some(stats), true));
        }
    }
    let stats = match &t.merge {
        Some(params) if t.streamed => {
            let release_chunks = inputs_are_large(plan, t, max_memory);
            let job = Job::new(plan, t, CHUNK_ELEMENTS, release_chunks);
            merge_streamed(&job, params, writer).map(Some)
        }
        _ => {
            let (bytes, stats) = compute(plan, t)?;
            writer.write(&t.name, &bytes)?;
            Ok(stats)
        }
    }?;
    Ok((stats, false))
}

/// Whether a tensor's input bytes are more than an eighth of the budget: a streamed tensor's
/// input pages are then dropped a chunk at a time, so that the pages mapped for one large
/// tensor (an embedding) do not outgrow the budget. Smaller tensors keep theirs until they are
/// done, since dropping pages and faulting them back in on every pass costs system time.
fn inputs_are_large(plan: &Plan, t: &TensorPlan, max_memory: u64) -> bool {
    let numel = t.shape.iter().product::<usize>() as u64;
    let inputs = (plan.base.is_some() as u64) + plan.experts.len() as u64;
    let size = plan.reference().info(&t.name).map_or(4, |i| i.dtype.size()) as u64;
    numel * size * inputs > max_memory / 8
}

/// Merges a tensor chunk by chunk and writes it; returns its statistics.
pub(crate) fn merge_streamed(
    job: &Job,
    params: &MergeParams,
    writer: &ShardedWriter,
) -> Result<TensorStats> {
    if params.method == Method::Caci {
        caci_stream::merge(job, params, writer)
    } else {
        stream::merge(job, params, writer)
    }
}

/// Lets the kernel drop the input pages of a finished tensor, so that resident memory stays
/// near the working set instead of growing to the size of the inputs.
fn release(plan: &Plan, name: &str) {
    if let Some(b) = &plan.base {
        b.release(name);
    }
    for e in &plan.experts {
        e.release(name);
    }
}

/// Computes one output tensor in memory: its bytes in the output dtype and the merge statistics.
pub(crate) fn compute(plan: &Plan, t: &TensorPlan) -> Result<(Vec<u8>, Option<TensorStats>)> {
    let reference = plan.reference();
    let Some(params) = &t.merge else {
        let info = reference.info(&t.name).expect("planned from the reference");
        let bytes = reference.bytes(&t.name)?;
        if info.dtype == t.dtype {
            return Ok((bytes.to_vec(), None));
        }
        let values = to_f32(info.dtype, bytes).expect("only float tensors change dtype");
        return Ok((from_f32(t.dtype, &values).expect("output dtype"), None));
    };
    let base = plan
        .base
        .as_ref()
        .map(|b| b.read_f32(&t.name))
        .transpose()?;
    let mut experts = Vec::with_capacity(plan.experts.len());
    for e in &plan.experts {
        let values = match &base {
            Some(b) if !e.touches(&t.name) => b.clone(),
            _ => e.tensor(&t.name, plan.base.as_ref())?,
        };
        experts.push(values);
    }
    let merged = if params.reads_statistics() {
        let base = base
            .as_deref()
            .expect("data-aware methods are planned with a base");
        merge_with_statistics(plan, t, params, base, experts)?
    } else {
        merge_tensor(
            params.method,
            &params.globals,
            TensorJob {
                name: &t.name,
                shape: &t.shape,
                base: base.as_deref(),
                experts,
                params: params.experts.clone(),
                expert_ids: plan.experts.iter().map(|e| e.index).collect(),
            },
        )?
    };
    let mut values = merged.values;
    check_finite(&PathBuf::from("merged output"), &t.name, &values)?;
    if plan.recipe.output == OutputKind::Delta {
        let base = base.as_ref().expect("delta output is planned with a base");
        for (v, b) in values.iter_mut().zip(base) {
            *v -= b;
        }
    }
    let bytes = from_f32(t.dtype, &values).expect("output dtype");
    Ok((bytes, Some(merged.stats)))
}
