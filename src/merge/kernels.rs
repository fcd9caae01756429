//! The seam between merge/ and conflict/ and the device they run on: both ask their
//! [`Kernels`] and do not know the device. The CPU reference ([`CpuKernels`]) has no device path
//! for whole tensors (the executor runs `merge_tensor` or the streaming merge), computes
//! core-space products with faer and conflict sums with [`conflict_sums`]; CUDA (`CudaKernels`
//! in device.rs) merges the TIES and CACI tensors it has kernels for, and computes the products
//! with cuBLAS and the conflict sums with cuda/conflict.cu.

use super::core::{CpuProducts, Products};
use super::job::TensorStats;
use super::plan::{MergeParams, Plan, TensorPlan};
use super::sparsify;
use crate::adapter::Adapter;
use crate::backend::device::ConflictSums;
use crate::error::Result;

/// What a device does for a merge.
pub trait Kernels: Sync {
    /// Where they run, as records name it: `"cpu"` or `"cuda"`.
    fn device(&self) -> &'static str;

    /// Merges tensor `t` of `plan` here, returning its bytes in the output dtype and its
    /// statistics, or `None` where this device has no path for it (the CPU reference then
    /// merges it).
    fn merge_tensor(
        &self,
        plan: &Plan,
        t: &TensorPlan,
        params: &MergeParams,
    ) -> Result<Option<(Vec<u8>, TensorStats)>>;

    /// The module-sized products of core-space merges.
    fn products(&self) -> &dyn Products;

    /// The sums behind one module's conflict metrics from the experts' updates (one per
    /// expert, all of one length), each trimmed to its density and weighted by `|weight|`.
    fn conflict_sums(
        &self,
        deltas: &[Vec<f32>],
        weights: &[f32],
        densities: &[f32],
    ) -> Result<ConflictSums>;

    /// [`Kernels::conflict_sums`] of the updates `s·B·A` of module `name` (`rows × cols`) of
    /// each adapter, formed where the kernels run; an adapter without the module adds zeros.
    #[allow(clippy::too_many_arguments)]
    fn adapter_conflict_sums(
        &self,
        adapters: &[&Adapter],
        name: &str,
        rows: usize,
        cols: usize,
        weights: &[f32],
        densities: &[f32],
    ) -> Result<ConflictSums>;
}

/// The CPU reference.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuKernels;

impl Kernels for CpuKernels {
    fn device(&self) -> &'static str {
        "cpu"
    }

    fn merge_tensor(
        &self,
        _plan: &Plan,
        _t: &TensorPlan,
        _params: &MergeParams,
    ) -> Result<Option<(Vec<u8>, TensorStats)>> {
        Ok(None)
    }

    fn products(&self) -> &dyn Products {
        &CpuProducts
    }

    fn conflict_sums(
        &self,
        deltas: &[Vec<f32>],
        weights: &[f32],
        densities: &[f32],
    ) -> Result<ConflictSums> {
        Ok(conflict_sums(deltas, weights, densities))
    }

    fn adapter_conflict_sums(
        &self,
        adapters: &[&Adapter],
        name: &str,
        rows: usize,
        cols: usize,
        weights: &[f32],
        densities: &[f32],
    ) -> Result<ConflictSums> {
        let deltas = adapters
            .iter()
            .map(|a| Ok(a.delta(name)?.unwrap_or_else(|| vec![0.0; rows * cols])))
            .collect::<Result<Vec<_>>>()?;
        Ok(conflict_sums(&deltas, weights, densities))
    }
}

/// The sums behind one module's conflict metrics (`module_conflicts` in conflict/), on the
/// CPU: the reference the device matches. Each expert keeps its top `density` by magnitude;
/// votes are weighted by `|weight|`.
pub fn conflict_sums(deltas: &[Vec<f32>], weights: &[f32], densities: &[f32]) -> ConflictSums {
    let t = deltas.len();
    let n = deltas.first().map_or(0, Vec::len);
    let mut dots = vec![vec![0.0; t]; t];
    for i in 0..t {
        dots[i][i] = sparsify::lane_sum(&deltas[i], |v| f64::from(v) * f64::from(v));
        for j in i + 1..t {
            dots[i][j] = deltas[i]
                .iter()
                .zip(&deltas[j])
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
        }
    }

    let kept: Vec<Vec<f32>> = deltas
        .iter()
        .zip(densities)
        .map(|(d, &density)| {
            let mut k = d.clone();
            if density < 1.0 {
                sparsify::magnitude(&mut k, density);
            }
            k
        })
        .collect();
    let mut both = vec![vec![0u64; t]; t];
    let mut either = vec![vec![0u64; t]; t];
    for i in 0..t {
        for j in i + 1..t {
            for (a, b) in kept[i].iter().zip(&kept[j]) {
                both[i][j] += u64::from(*a != 0.0 && *b != 0.0);
                either[i][j] += u64::from(*a != 0.0 || *b != 0.0);
            }
        }
    }

    let (mut active, mut conflicted) = (0usize, 0usize);
    let (mut kappa_sum, mut minority, mut total) = (0f64, 0f64, 0f64);
    for c in 0..n {
        let (mut p, mut q) = (0f64, 0f64);
        for (k, &w) in kept.iter().zip(weights) {
            let x = f64::from(k[c]) * f64::from(w.abs());
            if x > 0.0 {
                p += x;
            } else {
                q -= x;
            }
        }
        if p + q == 0.0 {
            continue;
        }
        active += 1;
        conflicted += usize::from(p > 0.0 && q > 0.0);
        kappa_sum += p.min(q) / p.max(q);
        minority += p.min(q);
        total += p + q;
    }
    ConflictSums {
        active: active as f64,
        conflicted: conflicted as f64,
        kappa_sum,
        minority,
        total,
        dots,
        both,
        either,
    }
}
