//! The CUDA backend's host side: the kernels of `cuda/*.cu`, embedded in the binary and
//! compiled once per process by NVRTC (CUDA 12's or 13's, found by [`super::nvrtc`]); libcuda
//! and cuBLAS are loaded at run time (cudarc's dynamic loading), and their absence is an
//! answer, never a panic.

use std::sync::OnceLock;

use cudarc::nvrtc::Ptx;

use super::nvrtc::{self, Nvrtc};
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

/// The PTX target: Turing and newer (f64 atomics; NVRTC 12.9 deprecates older, 13 drops
/// them); newer GPUs JIT it. No fused multiply-add, so that sums and products round as the
/// CPU's do.
const OPTIONS: [&str; 2] = ["--gpu-architecture=compute_75", "--fmad=false"];

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

/// Whether `library` can be used. The default build loads libcuda and cuBLAS at run time
/// (cudarc's dynamic loading; cuBLAS also from pip's wheels, see
/// [`super::cuda_libs::preload_cublas`]), so this asks whether they can be opened. With the
/// `cuda` feature, candle's CUDA backend makes cudarc link them at build time: a binary that
/// starts has them. NVRTC is mmx's own loading in both builds.
pub fn library_present(library: Library) -> bool {
    if library == Library::Nvrtc {
        return nvrtc::every_nvrtc().is_ok();
    }
    #[cfg(not(feature = "cuda"))]
    // SAFETY: each call only tries to open the library by its usual names.
    unsafe {
        match library {
            Library::Driver => cudarc::driver::sys::is_culib_present(),
            Library::Cublas => {
                super::cuda_libs::preload_cublas().is_ok()
                    && cudarc::cublas::sys::is_culib_present()
            }
            Library::Nvrtc => unreachable!("answered above"),
        }
    }
    #[cfg(feature = "cuda")]
    {
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

/// The driver's CUDA major version.
fn driver_major() -> Option<i32> {
    driver_version()?.split('.').next()?.parse().ok()
}

/// The NVRTC the kernels are compiled with: the newest whose PTX the driver can load.
pub fn chosen_nvrtc() -> Result<&'static Nvrtc, String> {
    nvrtc::for_driver(driver_major())
}

/// NVRTC's version, `major.minor`.
pub fn nvrtc_version() -> Option<String> {
    chosen_nvrtc().ok().map(Nvrtc::version)
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

/// Compiles every kernel file with the chosen NVRTC (see [`nvrtc_present`]).
pub fn compile_all() -> Vec<(&'static str, Result<Ptx, String>)> {
    match chosen_nvrtc() {
        Ok(nvrtc) => compile_all_with(nvrtc),
        Err(e) => KERNELS
            .iter()
            .map(|(name, _)| (*name, Err(e.clone())))
            .collect(),
    }
}

/// Compiles every kernel file with `nvrtc`.
pub fn compile_all_with(nvrtc: &Nvrtc) -> Vec<(&'static str, Result<Ptx, String>)> {
    KERNELS
        .iter()
        .map(|(name, source)| {
            let full = format!("{COMMON}\n{source}");
            (
                *name,
                nvrtc.compile(&full, name, &OPTIONS).map(Ptx::from_src),
            )
        })
        .collect()
}

/// The kernels compiled once per process, for the device code.
pub fn compiled() -> &'static Result<Vec<(&'static str, Ptx)>, String> {
    static PTX: OnceLock<Result<Vec<(&'static str, Ptx)>, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        chosen_nvrtc()?;
        compile_all()
            .into_iter()
            .map(|(name, r)| r.map(|ptx| (name, ptx)).map_err(|e| format!("{name}: {e}")))
            .collect()
    })
}
