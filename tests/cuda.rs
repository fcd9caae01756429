//! The CUDA backend without a GPU: every kernel compiles with every NVRTC found (`.ci/run`
//! installs NVRTC 12 and 13 from PyPI and sets `MMX_REQUIRE_NVRTC=12,13`, so that a kernel
//! that does not compile with either fails CI), `mmx doctor` reports what it found, and
//! `--device cuda` without a GPU is a clear error.

use std::process::Command;

use mmx::backend::cuda;

mod common;

use common::assert_ok;

/// The NVRTC major versions `MMX_REQUIRE_NVRTC` asks for (`12,13`; any other value: one of
/// any version).
fn required_majors() -> Option<Vec<i32>> {
    let wanted = std::env::var("MMX_REQUIRE_NVRTC").ok()?;
    Some(
        wanted
            .split(',')
            .filter_map(|m| m.trim().parse().ok())
            .collect(),
    )
}

#[test]
fn every_kernel_compiles_with_every_nvrtc_found() {
    let found = match mmx::backend::nvrtc::every_nvrtc() {
        Ok(found) => found,
        Err(e) => {
            assert!(
                required_majors().is_none(),
                "MMX_REQUIRE_NVRTC is set but {e}"
            );
            eprintln!("SKIPPED: {e}; .ci/run installs NVRTC 12 and 13");
            return;
        }
    };
    if let Some(majors) = required_majors() {
        for major in majors {
            assert!(
                found.iter().any(|n| n.major() == major),
                "MMX_REQUIRE_NVRTC asks for NVRTC {major}; found {found:?}"
            );
        }
    }
    for nvrtc in found {
        eprintln!("compiling with {nvrtc:?}");
        for (name, compiled) in cuda::compile_all_with(nvrtc) {
            let ptx =
                compiled.unwrap_or_else(|e| panic!("{nvrtc:?}: {name} does not compile: {e}"));
            check_ptx(name, &ptx.to_src());
        }
    }
    // A kernel that does not compile is an error carrying NVRTC's log, not a panic.
    let broken = found[0].compile(
        "extern \"C\" __global__ void k() { undeclared(); }",
        "broken.cu",
        &[],
    );
    let message = broken.unwrap_err();
    assert!(
        message.contains("broken.cu") && message.contains("undeclared"),
        "{message}"
    );
}

/// Every extern "C" kernel of file `name` is an entry of its PTX `text`, for Turing and newer.
fn check_ptx(name: &str, text: &str) {
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

/// `MMX_NVRTC` picks the library (a file or its folder), and one that is not there is named.
#[test]
fn mmx_nvrtc_picks_the_library() {
    let doctor = |value: &str| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_mmx"))
            .args(["doctor", "--json"])
            .env("MMX_NVRTC", value)
            .output()
            .unwrap();
        assert_ok(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let missing = doctor("/nonexistent/libnvrtc.so.13");
    assert!(missing["nvrtc"].is_null());
    let problem = missing["nvrtc_problem"].as_str().unwrap();
    assert!(
        problem.contains("MMX_NVRTC") && problem.contains("/nonexistent/libnvrtc.so.13"),
        "{problem}"
    );
    let Ok(found) = mmx::backend::nvrtc::every_nvrtc() else {
        assert!(
            required_majors().is_none(),
            "MMX_REQUIRE_NVRTC is set but no NVRTC is found"
        );
        eprintln!("SKIPPED: no NVRTC to pick");
        return;
    };
    let mut checked = 0;
    for nvrtc in found.iter().filter(|n| n.location().contains('/')) {
        let file = std::path::Path::new(nvrtc.location());
        for given in [file, file.parent().unwrap()] {
            let report = doctor(given.to_str().unwrap());
            assert_eq!(
                report["nvrtc"].as_str(),
                Some(nvrtc.version().as_str()),
                "{given:?}"
            );
            assert_eq!(report["kernels_compile"], true, "{given:?}");
        }
        checked += 1;
    }
    if required_majors().is_some() {
        // CI's wheels are found in the virtual environment's site folder, by path.
        assert!(checked >= 2, "{found:?}");
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
        // The library it names is one it found.
        let library = report["nvrtc_library"].as_str().unwrap();
        assert!(report["nvrtc_found"][0].as_str().unwrap().contains(library));
        // And the text names the version and the library.
        let text = Command::new(env!("CARGO_BIN_EXE_mmx"))
            .arg("doctor")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains(&format!(
                "nvrtc     {} ({library})",
                report["nvrtc"].as_str().unwrap()
            )),
            "{text}"
        );
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
fn gpu_della_masks_match_the_cpu_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    for n in sizes() {
        let rng = mmx::merge::rng::MaskRng::new(9, "model.layers.0.mlp.down_proj.weight", 2);
        // Probabilities spread over (0, 1), as DELLA's ranks give them.
        let probability: Vec<f32> = (0..n)
            .map(|i| 0.1 + 0.8 * (i % 1000) as f32 / 999.0)
            .collect();
        let first = 777u64;
        let got = gpu.della_mask(rng.key(), first, &probability).unwrap();
        let differing = (0..n)
            .filter(|&i| (got[i] == 1) != (rng.uniform(first + i as u64) < probability[i]))
            .count();
        assert_eq!(differing, 0, "n {n}");
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
    use mmx::merge::{merge_tensor, ExpertParams, Method, TensorJob};
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
        let deltas: Vec<Vec<f32>> = (0..4).map(|t| grid_values(n, 40 + t)).collect();
        let (weights, densities) = ([1.0f32, 1.0, 0.5, 2.0], [0.5f32, 0.3, 1.0, 0.5]);
        let cpu = mmx::conflict::module_conflicts("m", &deltas, &weights, &densities);
        let rows: Vec<&[f32]> = deltas.iter().map(Vec::as_slice).collect();
        let updates = gpu.upload_deltas(&rows).unwrap();
        let cuts: Vec<(u32, u64)> = densities
            .iter()
            .enumerate()
            .map(|(t, &d)| {
                let k = mmx::merge::sparsify::magnitude_keep(d, n);
                gpu.cut(&updates, t, k).unwrap()
            })
            .collect();
        let g = gpu.conflicts(&updates, &cuts, &weights).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1e-12);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        assert!(
            close(cpu.sign_conflict, ratio(g.conflicted, g.active)),
            "n {n}"
        );
        assert!(close(cpu.mean_kappa, ratio(g.kappa_sum, g.active)), "n {n}");
        assert!(
            close(cpu.minority_mass, ratio(g.minority, g.total)),
            "n {n}"
        );
        for a in 0..4 {
            assert!(close(cpu.norms[a], g.dots[a][a].sqrt()), "n {n}");
            for b in a + 1..4 {
                let cosine = g.dots[a][b] / (g.dots[a][a].sqrt() * g.dots[b][b].sqrt());
                assert!(close(cpu.cosine[a][b], cosine), "n {n}");
                let overlap = ratio(g.both[a][b] as f64, g.either[a][b] as f64);
                assert_eq!(cpu.topk_overlap[a][b], overlap, "n {n}, pair {a} {b}");
            }
        }
    }
}

#[test]
fn gpu_conflicts_command_matches_the_cpu() {
    if gpu().is_none() {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let adapters: Vec<String> = ["cardiology", "radiology", "pathology", "dermatology"]
        .iter()
        .map(|s| root.join("examples/adapters").join(s).display().to_string())
        .collect();
    let work = tempfile::tempdir().unwrap();
    let report = |device: &str| -> serde_json::Value {
        let json = work.path().join(format!("{device}.json"));
        let out = Command::new(env!("CARGO_BIN_EXE_mmx"))
            .arg("conflicts")
            .args(&adapters)
            .args(["--device", device, "--json", json.to_str().unwrap()])
            .output()
            .unwrap();
        assert_ok(&out);
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
    };
    let (cpu, gpu) = (report("cpu"), report("cuda"));
    let cpu_modules = cpu["modules"].as_array().unwrap();
    let gpu_modules = gpu["modules"].as_array().unwrap();
    assert_eq!(cpu_modules.len(), gpu_modules.len());
    for (c, g) in cpu_modules.iter().zip(gpu_modules) {
        for key in ["sign_conflict", "mean_kappa", "minority_mass"] {
            let (a, b) = (c[key].as_f64().unwrap(), g[key].as_f64().unwrap());
            // The products come from cuBLAS: a cut may move by a tie.
            assert!((a - b).abs() <= 1e-3, "{} {key}: {a} vs {b}", c["module"]);
        }
    }
}

/// Values of a coarse grid in ±1, many of them equal (ties at every cut).
fn grid_values(n: usize, seed: usize) -> Vec<f32> {
    let rng = mmx::merge::rng::MaskRng::new(3, "grid", seed);
    (0..n as u64)
        .map(|i| ((rng.uniform(i) * 512.0).floor() - 255.5) / 256.0)
        .collect()
}

fn worst_relative(ours: &[f32], reference: &[f32]) -> f64 {
    common::max_relative_error(ours, reference)
}

#[test]
fn gpu_lora_products_match_the_cpu() {
    use mmx::adapter::{lora_delta, LoraKind, LoraModule};
    use mmx::backend::device::LoraFactors;
    let Some(gpu) = gpu() else { return };
    let mut shapes = vec![(1, 1, 1), (257, 3, 7), (1000, 1003, 16), (3, 65_537, 2)];
    if std::env::var_os("MMX_GPU_LARGE").is_some() {
        shapes.push((11_008, 4096, 64));
    }
    for (rows, cols, rank) in shapes {
        for (kind, fan_in_fan_out) in [
            (LoraKind::Linear, false),
            (LoraKind::Linear, true),
            (LoraKind::Embedding, false),
        ] {
            let transposed = kind == LoraKind::Embedding || fan_in_fan_out;
            let (out_dim, in_dim) = if transposed {
                (cols, rows)
            } else {
                (rows, cols)
            };
            let a = grid_values(rank * in_dim, 1);
            let b = grid_values(out_dim * rank, 2);
            let module = LoraModule {
                module: "m".into(),
                kind,
                a_key: "a".into(),
                b_key: "b".into(),
                rank,
                scaling: 0.5,
                fan_in_fan_out,
                target_shape: [rows, cols],
            };
            let cpu = lora_delta(&module, &a, &b);
            let factors = LoraFactors {
                a: &a,
                b: &b,
                rank,
                scaling: 0.5,
                transposed,
            };
            let updates = gpu.lora_deltas(&[None, Some(factors)], rows, cols).unwrap();
            let got = gpu.download_updates(&updates).unwrap();
            assert!(got[0].iter().all(|&v| v == 0.0), "an absent expert is zero");
            let worst = worst_relative(&got[1], &cpu);
            assert!(
                worst <= 1e-6,
                "{rows}×{cols} r{rank} {kind:?} {fan_in_fan_out}: {worst}"
            );
        }
    }
}

/// The CPU's TIES or CACI of `deltas` on a zero base, and its per-expert parameters.
fn cpu_merge(method: mmx::merge::method::Method, deltas: &[Vec<f32>], weights: &[f32]) -> Vec<f32> {
    use mmx::merge::{merge_tensor, ExpertParams, TensorJob};
    let n = deltas[0].len();
    let base = vec![0f32; n];
    merge_tensor(
        method,
        &method.default_globals(),
        TensorJob {
            name: "t",
            shape: &[n],
            base: Some(&base),
            experts: deltas.to_vec(),
            params: weights
                .iter()
                .map(|&weight| ExpertParams {
                    weight,
                    density: 0.3,
                    gamma: 0.0,
                    epsilon: 0.0,
                })
                .collect(),
            expert_ids: (0..deltas.len()).collect(),
        },
    )
    .unwrap()
    .values
}

/// The device's merge of `updates` with the same parameters as [`cpu_merge`].
fn gpu_merge(
    gpu: &mmx::backend::device::Gpu,
    method: mmx::merge::method::Method,
    updates: &mmx::backend::device::Updates,
    weights: &[f32],
    bf16_out: bool,
) -> mmx::backend::device::DeviceMerge {
    use mmx::backend::device::{ConsensusRule, MergeExpert};
    use mmx::merge::method::Method;
    let n = updates.len();
    let k = mmx::merge::sparsify::keep_count(0.3, n).max(1);
    let globals = method.default_globals();
    let rules: Vec<MergeExpert> = weights
        .iter()
        .enumerate()
        .map(|(t, &w)| {
            let vote_factor = if method == Method::Caci {
                let rms = (gpu.sum_squares(updates, t).unwrap() / n as f64).sqrt();
                (f64::from(w) / rms) as f32
            } else {
                w
            };
            MergeExpert {
                cut: gpu.cut(updates, t, k).unwrap(),
                vote_factor,
                weight: w,
            }
        })
        .collect();
    let rule = ConsensusRule {
        divide_by_count: false,
        normalize: method == Method::Caci || globals.normalize,
        gamma: if method == Method::Caci {
            globals.attenuation
        } else {
            0.0
        },
        lambda: globals.lambda,
    };
    let zeros = vec![0f32; n];
    let base = matches!(updates, mmx::backend::device::Updates::F32 { .. }).then_some(&zeros[..]);
    gpu.merge(updates, &rules, rule, base, bf16_out).unwrap()
}

#[test]
fn gpu_merges_of_device_updates_match_the_cpu() {
    use mmx::backend::device::DeviceValues;
    use mmx::merge::method::Method;
    let Some(gpu) = gpu() else { return };
    let weights = [1.0f32, 0.5, 2.0];
    for n in sizes() {
        let deltas: Vec<Vec<f32>> = (0..3).map(|t| grid_values(n, 10 + t)).collect();
        let rows: Vec<&[f32]> = deltas.iter().map(Vec::as_slice).collect();
        let updates = gpu.upload_deltas(&rows).unwrap();
        for method in [Method::Ties, Method::Caci] {
            let cpu = cpu_merge(method, &deltas, &weights);
            let f32_out = gpu_merge(&gpu, method, &updates, &weights, false);
            let bf16_out = gpu_merge(&gpu, method, &updates, &weights, true);
            let DeviceValues::Bf16(bits) = &bf16_out.values else {
                panic!("bf16 asked for")
            };
            let cpu_bits: Vec<u16> = cpu
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            if method == Method::Ties {
                assert_eq!(f32_out.values.to_f32(), cpu, "TIES f32, n {n}");
                assert_eq!(bits, &cpu_bits, "TIES bf16, n {n}");
            } else {
                // The confidence's rms is summed in another order: within 1e-6.
                let worst = worst_relative(&f32_out.values.to_f32(), &cpu);
                assert!(worst <= 1e-6, "CACI n {n}: {worst}");
            }
        }
    }
}

#[test]
fn gpu_bf16_merges_match_the_cpu_bit_for_bit() {
    use mmx::backend::device::DeviceValues;
    use mmx::merge::method::Method;
    let Some(gpu) = gpu() else { return };
    let weights = [1.0f32, 1.0, 0.5, 2.0];
    let to_bits = |v: &[f32]| -> Vec<u16> {
        v.iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect()
    };
    let widen = |b: &[u16]| -> Vec<f32> {
        b.iter()
            .map(|&x| f32::from_bits(u32::from(x) << 16))
            .collect()
    };
    for n in sizes() {
        let base_bits = to_bits(&grid_values(n, 99));
        let tensors: Vec<Vec<u16>> = (0..4)
            .map(|t| {
                let noise = grid_values(n, 20 + t);
                let base = widen(&base_bits);
                to_bits(
                    &base
                        .iter()
                        .zip(&noise)
                        .map(|(b, x)| b + x / 64.0)
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let rows: Vec<&[u16]> = tensors.iter().map(Vec::as_slice).collect();
        let updates = gpu.upload_bf16(&rows, &base_bits).unwrap();
        // The CPU: bf16 widened, minus the base in f32, merged, plus the base, rounded.
        let base = widen(&base_bits);
        let deltas: Vec<Vec<f32>> = tensors
            .iter()
            .map(|t| widen(t).iter().zip(&base).map(|(x, b)| x - b).collect())
            .collect();
        assert_eq!(gpu.download_updates(&updates).unwrap(), deltas, "n {n}");
        let merged = cpu_merge(Method::Ties, &deltas, &weights);
        let expected = to_bits(
            &merged
                .iter()
                .zip(&base)
                .map(|(m, b)| b + m)
                .collect::<Vec<_>>(),
        );
        let got = gpu_merge(&gpu, Method::Ties, &updates, &weights, true);
        let DeviceValues::Bf16(bits) = &got.values else {
            panic!("bf16 out")
        };
        assert_eq!(bits, &expected, "n {n}");
    }
}

#[test]
fn gpu_sums_of_squares_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    for n in sizes() {
        let x = grid_values(n, 5);
        let updates = gpu.upload_deltas(&[&x]).unwrap();
        let cpu = mmx::merge::sparsify::lane_sum(&x, |v| f64::from(v) * f64::from(v));
        let got = gpu.sum_squares(&updates, 0).unwrap();
        assert!(
            (got - cpu).abs() <= 1e-12 * cpu.max(1e-30),
            "n {n}: {got} vs {cpu}"
        );
    }
}

/// Runs `mmx merge RECIPE -o OUT --device DEVICE` in `dir`.
fn merge_with(dir: &std::path::Path, recipe: &str, out: &str, device: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_mmx"))
        .current_dir(dir)
        .args(["merge", recipe, "-o", out, "--device", device])
        .output()
        .unwrap();
    assert_ok(&output);
}

#[test]
fn gpu_merge_command_matches_the_cpu() {
    if gpu().is_none() {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let specialties = ["cardiology", "radiology", "pathology", "dermatology"];
    // Full f32 experts: each adapter applied to the base (a one-expert linear merge).
    for s in specialties {
        let recipe = format!(
            "[merge]\nmethod = \"linear\"\noutput = \"full\"\ndtype = \"float32\"\nbase = \"{base}\"\n[[merge.experts]]\nsource = \"{base}+{adapter}\"\n",
            base = root.join("examples/tiny-med-base").display(),
            adapter = root.join("examples/adapters").join(s).display()
        );
        std::fs::write(dir.join(format!("{s}.toml")), recipe).unwrap();
        merge_with(dir, &format!("{s}.toml"), s, "cpu");
    }
    let experts: String = specialties
        .iter()
        .map(|s| format!("[[merge.experts]]\nsource = \"{s}\"\nweight = 1.0\n"))
        .collect();
    for method in ["ties", "caci"] {
        let recipe = format!(
            "[merge]\nmethod = \"{method}\"\nspace = \"full\"\noutput = \"full\"\nbase = \"{}\"\n[merge.parameters]\ndensity = 0.5\n{experts}",
            root.join("examples/tiny-med-base").display()
        );
        std::fs::write(dir.join(format!("{method}.toml")), recipe).unwrap();
        merge_with(
            dir,
            &format!("{method}.toml"),
            &format!("{method}-cpu"),
            "cpu",
        );
        merge_with(
            dir,
            &format!("{method}.toml"),
            &format!("{method}-gpu"),
            "cuda",
        );
        let read = |out: &str| std::fs::read(dir.join(out).join("model.safetensors")).unwrap();
        if method == "ties" {
            // Same deltas, same cuts, same sums: the same bytes.
            assert_eq!(read("ties-cpu"), read("ties-gpu"), "TIES on the GPU");
        } else {
            let open = |out: &str| {
                mmx::tensor::SafetensorsFile::open(dir.join(out).join("model.safetensors")).unwrap()
            };
            let (cpu, gpu) = (open("caci-cpu"), open("caci-gpu"));
            for name in cpu.names() {
                let worst =
                    worst_relative(&gpu.read_f32(name).unwrap(), &cpu.read_f32(name).unwrap());
                assert!(worst <= 1e-6, "CACI {name}: {worst}");
            }
        }
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join(format!("{method}-gpu")).join("mmx-merge.json")).unwrap(),
        )
        .unwrap();
        let on_device = record["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["device"] == "cuda")
            .count();
        assert!(on_device > 0, "{method}: no tensor merged on the GPU");
    }
    // LoRA experts: the products come from cuBLAS (another summation order), so the cut can
    // move by a tie; the merged tensors agree to within the products' rounding almost
    // everywhere.
    let ties = root.join("recipes/ties.toml");
    merge_with(dir, ties.to_str().unwrap(), "lora-cpu", "cpu");
    merge_with(dir, ties.to_str().unwrap(), "lora-gpu", "cuda");
    let open = |out: &str| {
        mmx::tensor::SafetensorsFile::open(dir.join(out).join("model.safetensors")).unwrap()
    };
    let (cpu, gpu) = (open("lora-cpu"), open("lora-gpu"));
    for name in cpu.names() {
        let (c, g) = (cpu.read_f32(name).unwrap(), gpu.read_f32(name).unwrap());
        let scale = c.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let off = c
            .iter()
            .zip(&g)
            .filter(|(a, b)| (*a - *b).abs() > 1e-5 * scale)
            .count();
        assert!(off * 1000 <= c.len(), "{name}: {off} of {} differ", c.len());
    }
}

#[test]
fn gpu_dense_products_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    for (rows, cols) in [(1, 1), (257, 3), (4096, 64), (1000, 257)] {
        let x: Vec<f64> = grid_values(rows * cols, 60)
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let g = gpu.gram_f64(&x, rows, cols).unwrap();
        for i in 0..cols {
            for j in 0..cols {
                let cpu: f64 = (0..rows).map(|r| x[r + i * rows] * x[r + j * rows]).sum();
                assert!(
                    (g[i + j * cols] - cpu).abs() <= 1e-12 * cpu.abs().max(1.0),
                    "{rows}×{cols}"
                );
            }
        }
        let y: Vec<f64> = grid_values(cols * 5, 61)
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let p = gpu.matmul_f64(&x, &y, rows, cols, 5).unwrap();
        for i in 0..rows {
            for j in 0..5 {
                let cpu: f64 = (0..cols).map(|k| x[i + k * rows] * y[k + j * cols]).sum();
                assert!(
                    (p[i + j * rows] - cpu).abs() <= 1e-12 * cpu.abs().max(1.0),
                    "{rows}×{cols}"
                );
            }
        }
    }
}

#[test]
fn gpu_core_space_merge_matches_the_cpu() {
    if gpu().is_none() {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let recipe = root.join("recipes/quickstart.toml");
    let work = tempfile::tempdir().unwrap();
    merge_with(work.path(), recipe.to_str().unwrap(), "cpu", "cpu");
    merge_with(work.path(), recipe.to_str().unwrap(), "gpu", "cuda");
    let open = |out: &str| {
        mmx::tensor::SafetensorsFile::open(work.path().join(out).join("adapter_model.safetensors"))
            .unwrap()
    };
    let (cpu, gpu) = (open("cpu"), open("gpu"));
    for name in cpu.names() {
        let worst = worst_relative(&gpu.read_f32(name).unwrap(), &cpu.read_f32(name).unwrap());
        assert!(worst <= 1e-5, "{name}: {worst}");
    }
}
