//! The CUDA backend without a GPU: every kernel compiles through NVRTC (wherever the library
//! can be found; `.ci/run` installs it from PyPI and sets `MMX_REQUIRE_NVRTC=1`, so that a
//! kernel that does not compile fails CI), `mmx doctor` reports it, and `--device cuda` without
//! a GPU is a clear error.

use std::process::Command;

use mmx::backend::cuda;

mod common;

use common::assert_ok;

fn require_nvrtc() -> bool {
    std::env::var_os("MMX_REQUIRE_NVRTC").is_some()
}

#[test]
fn every_kernel_compiles_with_nvrtc() {
    if !cuda::nvrtc_present() {
        assert!(
            !require_nvrtc(),
            "MMX_REQUIRE_NVRTC is set but libnvrtc cannot be loaded (LD_LIBRARY_PATH?)"
        );
        eprintln!("SKIPPED: NVRTC (libnvrtc) not found; .ci/run installs it");
        return;
    }
    for (name, compiled) in cuda::compile_all() {
        let ptx = compiled.unwrap_or_else(|e| panic!("{name} does not compile: {e}"));
        let text = ptx.to_src();
        // Every extern "C" kernel of the file is an entry of its PTX.
        let source = cuda::KERNELS.iter().find(|(n, _)| *n == name).unwrap().1;
        for line in source
            .lines()
            .filter(|l| l.starts_with("extern \"C\" __global__ void "))
        {
            let kernel = line["extern \"C\" __global__ void ".len()..]
                .split('(')
                .next()
                .unwrap();
            assert!(
                text.contains(&format!(".entry {kernel}(")),
                "{name}: no entry {kernel}"
            );
        }
        assert!(
            text.contains(".target sm_75"),
            "{name}: compiled for Turing and newer"
        );
    }
}

#[test]
fn doctor_reports_what_it_finds_and_never_fails_without_a_gpu() {
    let out = Command::new(env!("CARGO_BIN_EXE_mmx"))
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert_ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if cuda::nvrtc_present() {
        assert_eq!(report["kernels_compile"], true);
        assert!(report["nvrtc"].is_string());
    } else {
        assert!(report["kernels_compile"].is_null());
    }
    if !cuda::driver_present() {
        assert_eq!(report["devices"], serde_json::json!([]));
        assert!(report["no_gpu_reason"]
            .as_str()
            .unwrap()
            .contains("libcuda"));
    }
}

#[test]
fn device_cuda_without_a_gpu_is_a_clear_error() {
    if cuda::devices().is_ok_and(|d| !d.is_empty()) {
        eprintln!("SKIPPED: a GPU answers here");
        return;
    }
    let recipe = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart.toml");
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mmx"))
        .current_dir(work.path())
        .args([
            "merge",
            recipe.to_str().unwrap(),
            "-o",
            "out",
            "--device",
            "cuda",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--device cuda") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!work.path().join("out").exists());
    // auto falls back with one line saying why.
    let out = Command::new(env!("CARGO_BIN_EXE_mmx"))
        .current_dir(work.path())
        .args([
            "merge",
            recipe.to_str().unwrap(),
            "-o",
            "out",
            "--device",
            "auto",
        ])
        .output()
        .unwrap();
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.matches("--device auto: running on the CPU").count(),
        1,
        "{err}"
    );
}
