//! Backends for the hot kernels (DESIGN.md §6): the CPU (rayon, the reference, in
//! the merge code) and CUDA ([`cuda`]: kernels in `cuda/*.cu`, compiled at run time by NVRTC,
//! libcuda and NVRTC loaded at run time, so that the default build needs no CUDA toolkit).
//!
//! [`probe`] says what this machine offers; [`select`] turns `--device` into a backend, with
//! the reason when `auto` falls back to the CPU.

pub mod cuda;
pub mod cuda_libs;
pub mod device;
pub mod nvrtc;

use serde::Serialize;

use crate::error::{Error, Result};

/// What `--device` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// The GPU when one answers, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The GPU, or an error.
    Cuda,
}

/// The backend a command runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// rayon on the CPU.
    Cpu,
    /// A CUDA device, by ordinal.
    Cuda(usize),
}

/// One CUDA device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    /// Its ordinal.
    pub ordinal: usize,
    /// Its name (`NVIDIA H100 80GB HBM3`).
    pub name: String,
    /// Total memory, bytes.
    pub total_memory: u64,
    /// Free memory, bytes.
    pub free_memory: u64,
}

/// What the machine offers, for `mmx doctor`.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// The CUDA driver's version (`12.8`), if libcuda loads.
    pub driver: Option<String>,
    /// The version of the NVRTC the kernels are compiled with, if one loads.
    pub nvrtc: Option<String>,
    /// Where that NVRTC was loaded from.
    pub nvrtc_library: Option<String>,
    /// Every NVRTC found, `version (where)`, the one used first.
    pub nvrtc_found: Vec<String>,
    /// Why no NVRTC is used, if none is.
    pub nvrtc_problem: Option<String>,
    /// Where cuBLAS is, if it loads (only looked for where a driver is).
    pub cublas: Option<String>,
    /// Why cuBLAS cannot be used, if it cannot.
    pub cublas_problem: Option<String>,
    /// The devices that answer.
    pub devices: Vec<DeviceInfo>,
    /// Whether every kernel compiles (`None` where NVRTC is absent).
    pub kernels_compile: Option<bool>,
    /// Compilation errors by kernel file.
    pub kernel_errors: Vec<(String, String)>,
    /// Why there is no usable GPU, if there is none.
    pub no_gpu_reason: Option<String>,
}

/// Looks at libcuda, NVRTC, the devices and the kernels. Never panics.
pub fn probe() -> Probe {
    let driver = cuda::driver_version();
    let chosen = cuda::chosen_nvrtc();
    let nvrtc = chosen.as_ref().ok().map(|n| n.version());
    let nvrtc_library = chosen.as_ref().ok().map(|n| n.location().to_string());
    let nvrtc_problem = chosen.as_ref().err().cloned();
    let mut nvrtc_found: Vec<String> = nvrtc::every_nvrtc()
        .as_ref()
        .map(|all| {
            all.iter()
                .map(|n| format!("{} ({})", n.version(), n.location()))
                .collect()
        })
        .unwrap_or_default();
    if let Ok(n) = chosen {
        let first = format!("{} ({})", n.version(), n.location());
        nvrtc_found.retain(|f| *f != first);
        nvrtc_found.insert(0, first);
    }
    // cuBLAS matters only with a driver; without one it is not looked for.
    let (cublas, cublas_problem) = if driver.is_some() {
        match cuda_libs::preload_cublas() {
            Ok(at) => (Some(at.clone()), None),
            Err(e) => (None, Some(e.clone())),
        }
    } else {
        (None, None)
    };
    let (devices, device_error) = match cuda::devices() {
        Ok(d) => (d, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let (kernels_compile, kernel_errors) = if nvrtc.is_some() {
        let errors: Vec<(String, String)> = cuda::compile_all()
            .into_iter()
            .filter_map(|(name, r)| r.err().map(|e| (name.to_string(), e)))
            .collect();
        (Some(errors.is_empty()), errors)
    } else {
        (None, Vec::new())
    };
    let no_gpu_reason = if driver.is_none() {
        Some("libcuda is not installed (no NVIDIA driver)".to_string())
    } else if devices.is_empty() {
        Some(device_error.unwrap_or_else(|| "the driver reports no CUDA device".to_string()))
    } else if let Some(problem) = &nvrtc_problem {
        Some(format!("{problem}, so the kernels cannot be compiled"))
    } else if kernels_compile == Some(false) {
        Some("a kernel does not compile (see `mmx doctor`)".to_string())
    } else {
        None
    };
    Probe {
        driver,
        nvrtc,
        nvrtc_library,
        nvrtc_found,
        nvrtc_problem,
        cublas,
        cublas_problem,
        devices,
        kernels_compile,
        kernel_errors,
        no_gpu_reason,
    }
}

/// The backend for a request: `Auto` falls back to the CPU with the reason, `Cuda` without a
/// usable GPU is an error. Cheapest checks first: without a driver or a device, nothing is
/// compiled; with one, the kernels compile once per process.
pub fn select(request: DeviceRequest) -> Result<(Backend, Option<String>)> {
    if request == DeviceRequest::Cpu {
        return Ok((Backend::Cpu, None));
    }
    let reason = match cuda::devices() {
        Err(reason) => Some(reason),
        Ok(devices) if devices.is_empty() => Some("the driver reports no CUDA device".to_string()),
        Ok(_) => cuda::compiled().as_ref().err().cloned(),
    };
    match (request, reason) {
        (_, None) => Ok((Backend::Cuda(0), None)),
        (DeviceRequest::Cuda, Some(reason)) => Err(Error::Device { message: reason }),
        (_, Some(reason)) => Ok((Backend::Cpu, Some(reason))),
    }
}
