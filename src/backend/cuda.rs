//! The CUDA backend's host side: the kernels of `cuda/*.cu`, embedded in the binary and
//! compiled once per process by NVRTC; libcuda and NVRTC are loaded at run time (cudarc's
//! dynamic loading), and their absence is an answer, never a panic.

use std::sync::OnceLock;

use cudarc::nvrtc::{CompileOptions, Ptx};

use super::DeviceInfo;

/// What every kernel file starts with (types, bf16 conversion, block reductions): prepended
/// before compiling, so that the embedded sources need no include path.
pub const COMMON: &str = include_str!("../../cuda/common.cuh");

/// The kernel sources, by file name.
pub const KERNELS: &[(&str, &str)] = &[
    ("masks.cu", include_str!("../../cuda/masks.cu")),
    ("select.cu", include_str!("../../cuda/select.cu")),
    ("consensus.cu", include_str!("../../cuda/consensus.cu")),
    ("conflict.cu", include_str!("../../cuda/conflict.cu")),
];

/// The PTX target: Turing and newer (f64 atomics; NVRTC 12.9 deprecates older); newer GPUs JIT it.
const ARCH: &str = "compute_75";

/// A CUDA library the backend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Library {
    /// libcuda, the driver.
    Driver,
    /// libnvrtc, the run-time compiler.
    Nvrtc,
    /// libcublas.
    Cublas,
}

/// Whether `library` can be used. The default build loads it at run time (cudarc's dynamic
/// loading), so this asks whether it can be opened. With the `cuda` feature, candle's CUDA
/// backend makes cudarc link the libraries at build time: a binary that starts has them.
/// The one place that depends on the feature.
pub fn library_present(library: Library) -> bool {
    #[cfg(not(feature = "cuda"))]
    // SAFETY: each call only tries to open the library by its usual names.
    unsafe {
        match library {
            Library::Driver => cudarc::driver::sys::is_culib_present(),
            Library::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
            Library::Cublas => cudarc::cublas::sys::is_culib_present(),
        }
    }
    #[cfg(feature = "cuda")]
    {
        let _ = library;
        true
    }
}

/// Whether libcuda can be loaded.
pub fn driver_present() -> bool {
    library_present(Library::Driver)
}

/// Whether NVRTC can be loaded.
pub fn nvrtc_present() -> bool {
    library_present(Library::Nvrtc)
}

/// The driver's CUDA version, `major.minor`.
pub fn driver_version() -> Option<String> {
    if !driver_present() {
        return None;
    }
    let mut version = 0i32;
    // SAFETY: the library is present (checked above); the call writes one int.
    let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    (status == cudarc::driver::sys::CUresult::CUDA_SUCCESS)
        .then(|| format!("{}.{}", version / 1000, (version % 1000) / 10))
}

/// NVRTC's version, `major.minor`.
pub fn nvrtc_version() -> Option<String> {
    if !nvrtc_present() {
        return None;
    }
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: the library is present (checked above); the call writes two ints.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (status == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then(|| format!("{major}.{minor}"))
}

/// How many CUDA devices the driver reports, or why it cannot say (the same reasons
/// [`devices`] and `mmx doctor` give).
pub fn device_count() -> Result<usize, String> {
    if !driver_present() {
        return Err("libcuda is not installed (no NVIDIA driver)".to_string());
    }
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| format!("the CUDA driver does not answer: {e}"))?;
    Ok(count.max(0) as usize)
}

/// The devices that answer, or why none can be asked.
pub fn devices() -> Result<Vec<DeviceInfo>, String> {
    (0..device_count()?)
        .map(|ordinal| {
            let context = cudarc::driver::CudaContext::new(ordinal)
                .map_err(|e| format!("device {ordinal}: {e}"))?;
            let name = context
                .name()
                .map_err(|e| format!("device {ordinal}: {e}"))?;
            let (free, total) = context
                .mem_get_info()
                .map_err(|e| format!("device {ordinal}: {e}"))?;
            Ok(DeviceInfo {
                ordinal,
                name,
                total_memory: total as u64,
                free_memory: free as u64,
            })
        })
        .collect()
}

/// Options every kernel is compiled with: no fused multiply-add, so that sums and products
/// round as the CPU's do.
fn options(name: &str) -> CompileOptions {
    CompileOptions {
        fmad: Some(false),
        arch: Some(ARCH),
        name: Some(name.to_string()),
        ..CompileOptions::default()
    }
}

/// Compiles every kernel file (needs NVRTC; see [`nvrtc_present`]).
pub fn compile_all() -> Vec<(&'static str, Result<Ptx, String>)> {
    KERNELS
        .iter()
        .map(|(name, source)| {
            let full = format!("{COMMON}\n{source}");
            let compiled = cudarc::nvrtc::compile_ptx_with_opts(full, options(name))
                .map_err(|e| format!("{e:?}"));
            (*name, compiled)
        })
        .collect()
}

/// The kernels compiled once per process, for the device code.
pub fn compiled() -> &'static Result<Vec<(&'static str, Ptx)>, String> {
    static PTX: OnceLock<Result<Vec<(&'static str, Ptx)>, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        if !nvrtc_present() {
            return Err("NVRTC (libnvrtc) is not installed".to_string());
        }
        compile_all()
            .into_iter()
            .map(|(name, r)| r.map(|ptx| (name, ptx)).map_err(|e| format!("{name}: {e}")))
            .collect()
    })
}
