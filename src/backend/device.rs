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
