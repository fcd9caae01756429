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

/// Conflict statistics of one module on the device (cuda/conflict.cu), as
/// `crate::conflict::module_conflicts` computes them.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceConflicts {
    /// Coordinates some expert keeps.
    pub active: f64,
    /// Coordinates where kept entries disagree.
    pub conflicted: f64,
    /// Σ κ over the active coordinates.
    pub kappa_sum: f64,
    /// Σ min(P, N).
    pub minority: f64,
    /// Σ (P + N).
    pub total: f64,
    /// `dots[a][b]` = Σ x_a·x_b over the untrimmed updates (upper triangle filled).
    pub dots: Vec<Vec<f64>>,
}

impl Gpu {
    /// Sign-conflict counts, κ, minority mass and pairwise dot products of `deltas` (untrimmed)
    /// and `kept` (trimmed, same layout), weighted by `weights`. At most 16 experts.
    pub fn conflict_stats(
        &self,
        deltas: &[Vec<f32>],
        kept: &[Vec<f32>],
        weights: &[f32],
    ) -> Result<DeviceConflicts> {
        let t = deltas.len();
        let n = deltas.first().map_or(0, Vec::len);
        if t == 0 || t > 16 || kept.len() != t || weights.len() != t {
            return Err(Error::Device {
                message: format!("conflict statistics take 1 to 16 experts, got {t}"),
            });
        }
        let copy = |e: cudarc::driver::DriverError| device_error("copy", e);
        let flat = |rows: &[Vec<f32>]| rows.iter().flatten().copied().collect::<Vec<f32>>();
        let deltas_device = self.stream.clone_htod(&flat(deltas)).map_err(copy)?;
        let kept_device = self.stream.clone_htod(&flat(kept)).map_err(copy)?;
        let weights_device = self.stream.clone_htod(weights).map_err(copy)?;
        let mut stats = self
            .stream
            .alloc_zeros::<f64>(5)
            .map_err(|e| device_error("alloc", e))?;
        let mut dots = self
            .stream
            .alloc_zeros::<f64>(t * t)
            .map_err(|e| device_error("alloc", e))?;
        let (experts, count) = (t as i32, n as u64);
        let mut launch = self.stream.launch_builder(self.function("conflict_stats")?);
        launch
            .arg(&deltas_device)
            .arg(&kept_device)
            .arg(&experts)
            .arg(&count)
            .arg(&weights_device)
            .arg(&mut stats)
            .arg(&mut dots);
        // SAFETY: arguments as in cuda/conflict.cu; at most 16 experts (its shared arrays).
        unsafe { launch.launch(grid(count)) }.map_err(|e| device_error("conflict_stats", e))?;
        let s = self.stream.clone_dtoh(&stats).map_err(copy)?;
        let d = self.stream.clone_dtoh(&dots).map_err(copy)?;
        Ok(DeviceConflicts {
            active: s[0],
            conflicted: s[1],
            kappa_sum: s[2],
            minority: s[3],
            total: s[4],
            dots: d.chunks(t).map(<[f64]>::to_vec).collect(),
        })
    }
}

/// Device timings of the fused consensus kernel against a device-to-device copy.
#[derive(Debug, Clone, Copy)]
pub struct ConsensusTiming {
    /// Bytes the kernel reads and writes (T inputs, the base and the output, f32).
    pub bytes: u64,
    /// Best kernel time, seconds.
    pub kernel_seconds: f64,
    /// Best time to copy the same number of bytes device to device (read + write), seconds.
    pub copy_seconds: f64,
}

impl Gpu {
    /// Times the fused TIES kernel on `experts` × `n` f32 values already on the device, and a
    /// device-to-device copy moving as many bytes; best of `repeat`.
    pub fn time_consensus(
        &self,
        experts: usize,
        n: usize,
        repeat: usize,
    ) -> Result<ConsensusTiming> {
        use std::time::Instant;
        let alloc = |e: cudarc::driver::DriverError| device_error("alloc", e);
        let pattern: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) / 64.0).collect();
        let mut stacked = self.stream.alloc_zeros::<f32>(experts * n).map_err(alloc)?;
        for t in 0..experts {
            let mut view = stacked.slice_mut(t * n..(t + 1) * n);
            self.stream
                .memcpy_htod(&pattern, &mut view)
                .map_err(|e| device_error("copy", e))?;
        }
        let base = self
            .stream
            .clone_htod(&pattern)
            .map_err(|e| device_error("copy", e))?;
        let mut out = self.stream.alloc_zeros::<f32>(n).map_err(alloc)?;
        let mut conflicts = self.stream.alloc_zeros::<u64>(1).map_err(alloc)?;
        let thresholds = self
            .stream
            .clone_htod(&vec![0x3E80_0000u32; experts])
            .map_err(alloc)?;
        let limits = self
            .stream
            .clone_htod(&vec![0u64; experts])
            .map_err(alloc)?;
        let ones = self
            .stream
            .clone_htod(&vec![1.0f32; experts])
            .map_err(alloc)?;
        let (t, count, zero, one) = (experts as i32, n as u64, 0i32, 1i32);
        let (gamma, lambda) = (0.0f32, 1.0f32);
        let sync = |s: &CudaStream| s.synchronize().map_err(|e| device_error("synchronize", e));
        let mut kernel_seconds = f64::INFINITY;
        for _ in 0..repeat.max(1) {
            let mut launch = self
                .stream
                .launch_builder(self.function("consensus_merge")?);
            launch
                .arg(&stacked)
                .arg(&t)
                .arg(&count)
                .arg(&thresholds)
                .arg(&limits)
                .arg(&ones)
                .arg(&ones)
                .arg(&zero)
                .arg(&one)
                .arg(&gamma)
                .arg(&lambda)
                .arg(&base)
                .arg(&mut out)
                .arg(&mut conflicts);
            sync(&self.stream)?;
            let start = Instant::now();
            // SAFETY: arguments as in cuda/consensus.cu; buffers sized for `experts` × `n`.
            unsafe { launch.launch(grid(count)) }.map_err(|e| device_error("consensus", e))?;
            sync(&self.stream)?;
            kernel_seconds = kernel_seconds.min(start.elapsed().as_secs_f64());
        }
        // The copy moves (T + 1) · n values once each way: the kernel's traffic, less one read.
        let mut copy = self.stream.alloc_zeros::<f32>(experts * n).map_err(alloc)?;
        let mut copy_seconds = f64::INFINITY;
        for _ in 0..repeat.max(1) {
            sync(&self.stream)?;
            let start = Instant::now();
            self.stream
                .memcpy_dtod(&stacked, &mut copy)
                .map_err(|e| device_error("copy", e))?;
            sync(&self.stream)?;
            copy_seconds = copy_seconds.min(start.elapsed().as_secs_f64());
        }
        Ok(ConsensusTiming {
            bytes: ((experts + 2) * n * 4) as u64,
            kernel_seconds,
            // Scale the copy to the same byte count (reads + writes of the copy: 2 · T · n · 4).
            copy_seconds: copy_seconds * (experts + 2) as f64 / (2 * experts) as f64,
        })
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
