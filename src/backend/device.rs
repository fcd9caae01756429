//! Running the kernels on a CUDA device: the context, the kernels loaded once, and the host
//! side of each computation (masks, top-k thresholds). Every function here has a CPU twin in
//! `crate::merge` that it must match bit for bit; `tests/cuda.rs` holds them to it on a GPU.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use crate::error::{Error, Result};

/// Threads per block of the element-wise kernels.
const THREADS: u32 = 256;

/// Blocks of a grid-stride launch over `n` elements (capped: each thread loops).
fn grid(n: u64) -> LaunchConfig {
    let blocks = n.div_ceil(u64::from(THREADS)).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn device_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device {
        message: format!("{what}: {e:?}"),
    }
}

/// A CUDA device with every kernel loaded.
pub struct Gpu {
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
}

impl Gpu {
    /// Opens device `ordinal`, compiling (once per process) and loading every kernel.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        let compiled = super::cuda::compiled()
            .as_ref()
            .map_err(|e| Error::Device { message: e.clone() })?;
        let context =
            CudaContext::new(ordinal).map_err(|e| device_error("opening the device", e))?;
        let mut functions = HashMap::new();
        for (file, ptx) in compiled {
            let module = context
                .load_module(ptx.clone())
                .map_err(|e| device_error(file, e))?;
            let source = super::cuda::KERNELS
                .iter()
                .find(|(n, _)| n == file)
                .map(|(_, s)| *s)
                .unwrap_or_default();
            for name in kernel_names(source) {
                let function = module
                    .load_function(name)
                    .map_err(|e| device_error(name, e))?;
                functions.insert(name, function);
            }
        }
        Ok(Gpu {
            stream: context.default_stream(),
            functions,
        })
    }

    fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| Error::Device {
            message: format!("kernel `{name}` is not loaded"),
        })
    }

    /// The DARE keep mask of elements `first..first + n` for a generator key
    /// (`MaskRng::key`), as `crate::merge::sparsify::random_at` draws it.
    pub fn dare_mask(&self, key: u64, first: u64, density: f32, n: usize) -> Result<Vec<u8>> {
        let mut keep = self
            .stream
            .alloc_zeros::<u8>(n.max(1))
            .map_err(|e| device_error("alloc", e))?;
        let count = n as u64;
        let mut launch = self.stream.launch_builder(self.function("dare_mask")?);
        launch
            .arg(&mut keep)
            .arg(&key)
            .arg(&first)
            .arg(&density)
            .arg(&count);
        // SAFETY: the arguments match the kernel's signature in cuda/masks.cu, and `keep`
        // holds at least `n` bytes.
        unsafe { launch.launch(grid(count)) }.map_err(|e| device_error("dare_mask", e))?;
        let mut host = self
            .stream
            .clone_dtoh(&keep)
            .map_err(|e| device_error("copy back", e))?;
        host.truncate(n);
        Ok(host)
    }

    /// The top-`k` cut by magnitude of `x`, as `crate::merge::sparsify::top_k` keeps it:
    /// `(threshold, tie_limit)` where element `i` is kept iff the bits of `|x[i]|` are above
    /// `threshold`, or equal to it with `i < tie_limit` (ties keep the lowest indices).
    pub fn magnitude_cut(&self, x: &[f32], k: usize) -> Result<(u32, u64)> {
        let n = x.len() as u64;
        if k == 0 {
            return Ok((u32::MAX, 0));
        }
        if k as u64 >= n {
            return Ok((0, n));
        }
        let data = self
            .stream
            .clone_htod(x)
            .map_err(|e| device_error("copy", e))?;
        // Radix select over the 31 magnitude bits, a byte at a time from the top.
        let (mut prefix, mut mask, mut rank) = (0u32, 0u32, k as u64);
        for shift in [24i32, 16, 8, 0] {
            let mut hist = self
                .stream
                .alloc_zeros::<u64>(256)
                .map_err(|e| device_error("alloc", e))?;
            let mut launch = self
                .stream
                .launch_builder(self.function("magnitude_histogram")?);
            launch
                .arg(&data)
                .arg(&n)
                .arg(&prefix)
                .arg(&mask)
                .arg(&shift)
                .arg(&mut hist);
            // SAFETY: arguments as in cuda/select.cu; `hist` has 256 bins.
            unsafe { launch.launch(grid(n)) }.map_err(|e| device_error("histogram", e))?;
            let counts = self
                .stream
                .clone_dtoh(&hist)
                .map_err(|e| device_error("copy back", e))?;
            // The bin holding the rank-th largest, from the top.
            let mut bin = 255usize;
            loop {
                if counts[bin] >= rank || bin == 0 {
                    break;
                }
                rank -= counts[bin];
                bin -= 1;
            }
            prefix |= (bin as u32) << shift;
            mask |= 0xFFu32 << shift;
        }
        // `rank` is now how many elements equal to the threshold are kept: find the index
        // where that many have been seen, from per-block counts.
        let span = 1u64 << 16;
        let blocks = n.div_ceil(span).max(1);
        let mut counts = self
            .stream
            .alloc_zeros::<u64>(blocks as usize)
            .map_err(|e| device_error("alloc", e))?;
        let mut launch = self.stream.launch_builder(self.function("count_equal")?);
        launch
            .arg(&data)
            .arg(&n)
            .arg(&prefix)
            .arg(&span)
            .arg(&mut counts);
        let config = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments as in cuda/select.cu; `counts` has one slot per block.
        unsafe { launch.launch(config) }.map_err(|e| device_error("count_equal", e))?;
        let counts = self
            .stream
            .clone_dtoh(&counts)
            .map_err(|e| device_error("copy back", e))?;
        let mut seen = 0u64;
        for (block, &c) in counts.iter().enumerate() {
            if seen + c >= rank {
                // The cut falls in this block: walk it on the host.
                let start = block as u64 * span;
                let mut needed = rank - seen;
                for (i, v) in x.iter().enumerate().skip(start as usize) {
                    if v.to_bits() & 0x7FFF_FFFF == prefix {
                        needed -= 1;
                        if needed == 0 {
                            return Ok((prefix, i as u64 + 1));
                        }
                    }
                }
            }
            seen += c;
        }
        Ok((prefix, n))
    }
}

/// One expert of a fused consensus merge on the device.
#[derive(Debug, Clone, Copy)]
pub struct ConsensusExpert<'a> {
    /// The expert's update (its tensor minus the base).
    pub delta: &'a [f32],
    /// Its trim, from [`Gpu::magnitude_cut`].
    pub cut: (u32, u64),
    /// What its vote is scaled by: its weight (TIES, weighted election), 1 (unweighted), or
    /// weight / rms (CACI).
    pub vote_factor: f32,
    /// Its weight in the disjoint mean.
    pub weight: f32,
}

/// How a fused consensus merge combines the experts.
#[derive(Debug, Clone, Copy)]
pub struct ConsensusRule {
    /// Divide by the number of agreeing experts instead of their weights.
    pub divide_by_count: bool,
    /// Divide at all (off: mergekit's un-normalised sum).
    pub normalize: bool,
    /// CACI's attenuation exponent (0: TIES).
    pub gamma: f32,
    /// Scales the merged update.
    pub lambda: f32,
}

impl Gpu {
    /// Trim, sign election, disjoint mean and attenuation in one pass (cuda/consensus.cu):
    /// `base + λ·merged`, and the number of coordinates where a kept entry opposed the vote.
    pub fn consensus(
        &self,
        experts: &[ConsensusExpert<'_>],
        rule: ConsensusRule,
        base: &[f32],
    ) -> Result<(Vec<f32>, u64)> {
        let n = base.len();
        if experts.iter().any(|e| e.delta.len() != n) || experts.is_empty() {
            return Err(Error::Device {
                message: "consensus: every expert needs one value per base element".into(),
            });
        }
        let copy = |e: cudarc::driver::DriverError| device_error("copy", e);
        let mut stacked = Vec::with_capacity(n * experts.len());
        for e in experts {
            stacked.extend_from_slice(e.delta);
        }
        let deltas = self.stream.clone_htod(&stacked).map_err(copy)?;
        let thresholds: Vec<u32> = experts.iter().map(|e| e.cut.0).collect();
        let limits: Vec<u64> = experts.iter().map(|e| e.cut.1).collect();
        let votes: Vec<f32> = experts.iter().map(|e| e.vote_factor).collect();
        let weights: Vec<f32> = experts.iter().map(|e| e.weight).collect();
        let thresholds = self.stream.clone_htod(&thresholds).map_err(copy)?;
        let limits = self.stream.clone_htod(&limits).map_err(copy)?;
        let votes = self.stream.clone_htod(&votes).map_err(copy)?;
        let weights = self.stream.clone_htod(&weights).map_err(copy)?;
        let base_device = self.stream.clone_htod(base).map_err(copy)?;
        let mut out = self
            .stream
            .alloc_zeros::<f32>(n.max(1))
            .map_err(|e| device_error("alloc", e))?;
        let mut conflicts = self
            .stream
            .alloc_zeros::<u64>(1)
            .map_err(|e| device_error("alloc", e))?;
        let (count, t) = (n as u64, experts.len() as i32);
        let (by_count, normalize) = (i32::from(rule.divide_by_count), i32::from(rule.normalize));
        let mut launch = self
            .stream
            .launch_builder(self.function("consensus_merge")?);
        launch
            .arg(&deltas)
            .arg(&t)
            .arg(&count)
            .arg(&thresholds)
            .arg(&limits)
            .arg(&votes)
            .arg(&weights)
            .arg(&by_count)
            .arg(&normalize)
            .arg(&rule.gamma)
            .arg(&rule.lambda)
            .arg(&base_device)
            .arg(&mut out)
            .arg(&mut conflicts);
        // SAFETY: arguments as in cuda/consensus.cu; every buffer holds what the kernel reads.
        unsafe { launch.launch(grid(count)) }.map_err(|e| device_error("consensus_merge", e))?;
        let mut values = self.stream.clone_dtoh(&out).map_err(copy)?;
        values.truncate(n);
        let conflicts = self.stream.clone_dtoh(&conflicts).map_err(copy)?[0];
        Ok((values, conflicts))
    }
}

/// The `extern "C" __global__` kernel names of a source file.
pub fn kernel_names(source: &str) -> Vec<&str> {
    const PREFIX: &str = "extern \"C\" __global__ void ";
    source
        .lines()
        .filter_map(|l| l.strip_prefix(PREFIX))
        .filter_map(|rest| rest.split('(').next())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_kernel_of_a_file() {
        let names = kernel_names(super::super::cuda::KERNELS[0].1);
        assert_eq!(names, ["dare_mask", "dare_apply", "della_mask"]);
    }
}
