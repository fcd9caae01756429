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
    let merge = |device: &str| {
        Command::new(env!("CARGO_BIN_EXE_mmx"))
            .current_dir(work.path())
            .args([
                "merge",
                recipe.to_str().unwrap(),
                "-o",
                "out",
                "--device",
                device,
            ])
            .output()
            .unwrap()
    };
    let out = merge("cuda");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--device cuda") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!work.path().join("out").exists());
    // auto falls back with one line saying why.
    let out = merge("auto");
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.matches("--device auto: running on the CPU").count(),
        1,
        "{err}"
    );
}

/// The first GPU, or `None` with a visible message.
fn gpu() -> Option<mmx::backend::device::Gpu> {
    match cuda::devices() {
        Ok(d) if !d.is_empty() => Some(mmx::backend::device::Gpu::open(0).expect("open the GPU")),
        _ => {
            eprintln!(
                "SKIPPED: no CUDA device answers here; scripts/gpu-check.sh runs this on a GPU"
            );
            None
        }
    }
}

/// Awkward sizes: not multiples of the block size, one element, and (with MMX_GPU_LARGE) 10^8.
fn sizes() -> Vec<usize> {
    let mut sizes = vec![1, 255, 256, 257, 65_537, 1_000_003];
    if std::env::var_os("MMX_GPU_LARGE").is_some() {
        sizes.push(100_000_000);
    }
    sizes
}

#[test]
fn gpu_masks_match_the_cpu_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    for n in sizes() {
        for (expert, density, first) in [(0usize, 0.1f32, 0u64), (3, 0.5, 12_345), (1, 0.9, 7)] {
            let rng =
                mmx::merge::rng::MaskRng::new(42, "model.layers.3.mlp.up_proj.weight", expert);
            let got = gpu.dare_mask(rng.key(), first, density, n).unwrap();
            let differing = (0..n)
                .filter(|&i| (got[i] == 1) != (rng.uniform(first + i as u64) < density))
                .count();
            assert_eq!(differing, 0, "n {n}, expert {expert}, density {density}");
        }
    }
}

#[test]
fn gpu_thresholds_keep_what_the_cpu_keeps() {
    let Some(gpu) = gpu() else { return };
    for n in sizes() {
        // Values on a coarse grid, so that many magnitudes tie at any cut.
        let rng = mmx::merge::rng::MaskRng::new(7, "x", n);
        let x: Vec<f32> = (0..n as u64)
            .map(|i| ((rng.uniform(i) * 64.0).floor() - 31.5) / 8.0)
            .collect();
        for k in [1, n / 3, n / 2, n.saturating_sub(1)] {
            let mut cpu = x.clone();
            mmx::merge::sparsify::top_k(&mut cpu, k);
            let (threshold, tie_limit) = gpu.magnitude_cut(&x, k).unwrap();
            let differing = (0..n)
                .filter(|&i| {
                    let bits = x[i].to_bits() & 0x7FFF_FFFF;
                    let kept = bits > threshold || (bits == threshold && (i as u64) < tie_limit);
                    kept != (cpu[i] != 0.0)
                })
                .count();
            assert_eq!(differing, 0, "n {n}, k {k}");
        }
    }
}

#[test]
fn gpu_ties_and_caci_match_the_cpu() {
    use mmx::backend::device::{ConsensusExpert, ConsensusRule};
    use mmx::merge::method::{merge_tensor, ExpertParams, Method, TensorJob};
    let Some(gpu) = gpu() else { return };
    for n in sizes().into_iter().filter(|&n| n <= 1_000_003) {
        let draw = |seed: usize| {
            let rng = mmx::merge::rng::MaskRng::new(11, "consensus", seed);
            (0..n as u64).map(move |i| rng.uniform(i) - 0.5)
        };
        let base: Vec<f32> = draw(9).collect();
        let deltas: Vec<Vec<f32>> = (0..3).map(|t| draw(t).collect()).collect();
        let weights = [1.0f32, 0.5, 2.0];
        let density = 0.3f32;
        let k = mmx::merge::sparsify::keep_count(density, n).max(1);
        for method in [Method::Ties, Method::Caci] {
            let globals = method.default_globals();
            let cpu = merge_tensor(
                method,
                &globals,
                TensorJob {
                    name: "t",
                    shape: &[n],
                    base: Some(&base),
                    experts: deltas
                        .iter()
                        .map(|d| d.iter().zip(&base).map(|(d, b)| d + b).collect())
                        .collect(),
                    params: weights
                        .iter()
                        .map(|&weight| ExpertParams {
                            weight,
                            density,
                            gamma: 0.0,
                            epsilon: 0.0,
                        })
                        .collect(),
                    expert_ids: vec![0, 1, 2],
                },
            )
            .unwrap();
            // The CPU subtracts the base from each expert's tensor: use the same deltas.
            let exact: Vec<Vec<f32>> = deltas
                .iter()
                .map(|d| d.iter().zip(&base).map(|(d, b)| (d + b) - b).collect())
                .collect();
            let experts: Vec<ConsensusExpert<'_>> = exact
                .iter()
                .zip(weights)
                .map(|(d, w)| {
                    let vote_factor = if method == Method::Caci {
                        // The CPU's own reduction, so that the confidence is the same f32.
                        let squares =
                            mmx::merge::sparsify::lane_sum(d, |v| f64::from(v) * f64::from(v));
                        let rms = (squares / n as f64).sqrt();
                        (f64::from(w) / rms) as f32
                    } else {
                        w
                    };
                    ConsensusExpert {
                        delta: d,
                        cut: gpu.magnitude_cut(d, k).unwrap(),
                        vote_factor,
                        weight: w,
                    }
                })
                .collect();
            let rule = ConsensusRule {
                divide_by_count: false,
                normalize: true,
                gamma: if method == Method::Caci {
                    globals.attenuation
                } else {
                    0.0
                },
                lambda: globals.lambda,
            };
            let (gpu_values, _) = gpu.consensus(&experts, rule, &base).unwrap();
            let worst = cpu
                .values
                .iter()
                .zip(&gpu_values)
                .map(|(a, b)| ((a - b).abs() / a.abs().max(1e-3)) as f64)
                .fold(0.0, f64::max);
            assert!(
                worst <= 1e-6,
                "{method:?} n {n}: worst relative difference {worst}"
            );
        }
    }
}

#[test]
fn gpu_conflict_statistics_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    for n in sizes().into_iter().filter(|&n| n <= 1_000_003) {
        let deltas: Vec<Vec<f32>> = (0..4)
            .map(|t| {
                let rng = mmx::merge::rng::MaskRng::new(5, "conflict", t);
                (0..n as u64).map(|i| rng.uniform(i) - 0.5).collect()
            })
            .collect();
        let (weights, densities) = ([1.0f32, 1.0, 0.5, 2.0], [0.5f32; 4]);
        let cpu = mmx::conflict::module_conflicts("m", &deltas, &weights, &densities);
        let kept: Vec<Vec<f32>> = deltas
            .iter()
            .map(|d| {
                let mut k = d.clone();
                mmx::merge::sparsify::magnitude(&mut k, 0.5);
                k
            })
            .collect();
        let g = gpu.conflict_stats(&deltas, &kept, &weights).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1e-12);
        assert!(close(cpu.sign_conflict, g.conflicted / g.active), "n {n}");
        assert!(close(cpu.mean_kappa, g.kappa_sum / g.active), "n {n}");
        assert!(close(cpu.minority_mass, g.minority / g.total), "n {n}");
        for a in 0..4 {
            assert!(close(cpu.norms[a], g.dots[a][a].sqrt()), "n {n}");
            for b in a + 1..4 {
                let cosine = g.dots[a][b] / (g.dots[a][a].sqrt() * g.dots[b][b].sqrt());
                assert!(close(cpu.cosine[a][b], cosine), "n {n}");
            }
        }
    }
}
