//! Running the kernels on a CUDA device: the context, the kernels loaded once, and the host
//! side of each computation. Every computation here has a CPU twin in merge/ or
//! conflict/ that it must match (masks and thresholds bit for bit, sums within 1e-6
//! relative); `tests/cuda.rs` holds them to it on a GPU.
//!
//! Data stays on the device between steps: the experts' updates ([`Updates`]) are uploaded or
//! formed there (LoRA products through cuBLAS), trimmed ([`Gpu::cut`]), merged
//! ([`Gpu::merge`]), and only the merged tensor comes back.

mod blas;
mod conflict;
mod consensus;
mod masks;
mod select;
mod timing;
mod updates;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchArgs, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};

pub use conflict::ConflictSums;
pub use consensus::{
    ConsensusExpert, ConsensusRule, DeviceMerge, DeviceValues, MergeExpert, MAX_EXPERTS,
};
pub use timing::ConsensusTiming;
pub use updates::{LoraFactors, Updates};

use crate::error::{Error, Result};

/// Threads per block of every kernel (a multiple of 32: the block reductions rely on it).
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
    blas: OnceLock<std::result::Result<CudaBlas, String>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("kernels", &self.functions.len())
            .finish()
    }
}

impl Gpu {
    /// Opens device `ordinal`, compiling (once per process) and loading every kernel. Without
    /// a driver or a device, the error says so as `--device cuda` does.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        let count = super::cuda::device_count().map_err(|message| Error::Device { message })?;
        if ordinal >= count {
            let message = match count {
                0 => "the driver reports no CUDA device".to_string(),
                n => format!("no CUDA device {ordinal}: the driver reports {n}"),
            };
            return Err(Error::Device { message });
        }
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
            blas: OnceLock::new(),
        })
    }

    fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| Error::Device {
            message: format!("kernel `{name}` is not loaded"),
        })
    }

    /// Copies `host` to a new device buffer (at least one element, so that an empty input
    /// still has an address).
    fn upload<T: DeviceRepr + Clone + Default>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.upload(&[T::default()]);
        }
        self.stream
            .clone_htod(host)
            .map_err(|e| device_error("copy to the device", e))
    }

    /// A zeroed device buffer of `n` elements (at least one).
    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| device_error("device allocation", e))
    }

    /// Copies a device buffer back, cut to its first `n` elements.
    fn download<T: DeviceRepr + Clone + Default>(
        &self,
        device: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>> {
        let mut host = self
            .stream
            .clone_dtoh(device)
            .map_err(|e| device_error("copy from the device", e))?;
        host.truncate(n);
        Ok(host)
    }

    /// Starts a launch of `kernel` (the f32 variant, or `<kernel>_bf16`) with the updates as
    /// its first arguments: `(deltas, i, n)` or `(tensors, base, i, n)`, where `i` is an
    /// expert index or the expert count, as the kernel takes it.
    fn launch_on<'a>(
        &'a self,
        kernel: &str,
        updates: &'a Updates,
        t: &'a i32,
        n: &'a u64,
    ) -> Result<LaunchArgs<'a>> {
        Ok(match updates {
            Updates::F32 { deltas, .. } => {
                let mut launch = self.stream.launch_builder(self.function(kernel)?);
                launch.arg(deltas).arg(t).arg(n);
                launch
            }
            Updates::Bf16 { tensors, base, .. } => {
                let name = format!("{kernel}_bf16");
                let mut launch = self.stream.launch_builder(self.function(&name)?);
                launch.arg(tensors).arg(base).arg(t).arg(n);
                launch
            }
        })
    }

    /// cuBLAS on this device's stream, created on first use; an error (not a panic) when
    /// libcublas cannot be loaded.
    fn blas(&self) -> Result<&CudaBlas> {
        self.blas
            .get_or_init(|| {
                if !super::cuda::library_present(super::cuda::Library::Cublas) {
                    return Err("cuBLAS (libcublas) is not installed".to_string());
                }
                CudaBlas::new(self.stream.clone()).map_err(|e| format!("cuBLAS: {e:?}"))
            })
            .as_ref()
            .map_err(|message| Error::Device {
                message: message.clone(),
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
        let select = super::super::cuda::KERNELS
            .iter()
            .find(|(n, _)| *n == "select.cu")
            .unwrap();
        assert_eq!(
            kernel_names(select.1),
            [
                "magnitude_histogram",
                "magnitude_histogram_bf16",
                "count_equal",
                "count_equal_bf16",
                "sum_squares",
                "sum_squares_bf16"
            ]
        );
    }
}
