//! Data-aware merging (`regmean`, `fisher`) end to end: recipes whose experts name their
//! calibration statistics, merged through the library on a small planted problem, against an
//! independent dense least-squares solve, core space against full space, the fallback for
//! modules without statistics, and bad statistics refused with nothing written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use faer::linalg::solvers::SolveLstsq;
use faer::Mat;
use mmx::merge::calibration::{write_calibration, ModuleStats};
use mmx::merge::{merge, MergePlan, OutputOptions};
use mmx::recipe::{MergeRecord, Recipe};
use mmx::sweep::planted::{Planted, PlantedSpec};

mod common;

use common::copy_tiny_llava;

const DIM: usize = 8;

fn options() -> OutputOptions {
    OutputOptions {
        max_memory: 1 << 30,
        shard_bytes: 5 << 30,
        force: false,
        backend: mmx::backend::Backend::Cpu,
        threads: None,
    }
}

/// Two rank-4 experts on 8 × 8 modules whose input subspaces overlap by `overlap`, with
/// off-task leaks (`leak`).
fn planted(dir: &Path, overlap: f64, leak: f64) -> Planted {
    let planted = Planted::generate(PlantedSpec {
        experts: 2,
        layers: 1,
        dim: DIM,
        rank: 4,
        overlap,
        conflict: 0.5,
        leak,
        inputs: 16,
        seed: 3,
    })
    .unwrap();
    planted.write(dir).unwrap();
    planted
}

fn problem(dir: &Path) -> Planted {
    planted(dir, 0.5, 0.5)
}

/// Deterministic inputs for expert `t`: `tokens` rows of `DIM` values.
fn inputs(t: usize, tokens: usize) -> Vec<Vec<f64>> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(t as u64 + 1);
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    (0..tokens)
        .map(|_| {
            (0..DIM)
                .map(|j| next() * (1.0 + j as f64 * 0.1 * t as f64))
                .collect()
        })
        .collect()
}

/// Writes expert `t`'s statistics for `modules` from `x`: `Σ x·xᵀ`, its token count, and the
/// Fisher `fisher` if given (the same for every module).
fn write_stats(path: &Path, modules: &[&str], x: &[Vec<f64>], fisher: Option<&[f32]>) -> PathBuf {
    let mut gram = vec![0f32; DIM * DIM];
    for row in x {
        for i in 0..DIM {
            for j in 0..DIM {
                gram[i * DIM + j] += (row[i] * row[j]) as f32;
            }
        }
    }
    let stats: BTreeMap<String, ModuleStats> = modules
        .iter()
        .map(|m| {
            (
                m.trim_end_matches(".weight").to_string(),
                ModuleStats {
                    gram: Some((gram.clone(), DIM, x.len() as u64)),
                    fisher: fisher.map(|f| (f.to_vec(), vec![DIM, DIM])),
                },
            )
        })
        .collect();
    write_calibration(path, &stats).unwrap();
    path.to_path_buf()
}

fn write_recipe(dir: &Path, name: &str, head: &str, calibration: &[Option<&Path>]) -> PathBuf {
    let mut text = format!("[merge]\nbase = \"base\"\n{head}\n");
    for (t, stats) in calibration.iter().enumerate() {
        text.push_str(&format!(
            "\n[[merge.experts]]\nsource = \"experts/task{t}\"\n"
        ));
        if let Some(stats) = stats {
            text.push_str(&format!("calibration = \"{}\"\n", stats.display()));
        }
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn run(recipe: &Path, out: &Path) -> mmx::Result<MergePlan> {
    let plan = MergePlan::build(Recipe::load(recipe)?)?;
    merge(&plan, out, &options(), &|_| {})?;
    Ok(plan)
}

/// The least-squares merge solved independently: rows `X_t` (scaled by `sqrt(w_t / n_t)`)
/// stacked with targets `X_t·Δ_tᵀ`, solved by QR.
fn least_squares(deltas: &[&[f32]], xs: &[Vec<Vec<f64>>], weights: &[f64]) -> Vec<f64> {
    let rows: usize = xs.iter().map(Vec::len).sum();
    let mut a = Mat::<f64>::zeros(rows, DIM);
    let mut y = Mat::<f64>::zeros(rows, DIM);
    let mut r = 0;
    for ((delta, x), &w) in deltas.iter().zip(xs).zip(weights) {
        let scale = (w / x.len() as f64).sqrt();
        for row in x {
            for j in 0..DIM {
                a[(r, j)] = scale * row[j];
            }
            for o in 0..DIM {
                y[(r, o)] = scale
                    * (0..DIM)
                        .map(|j| f64::from(delta[o * DIM + j]) * row[j])
                        .sum::<f64>();
            }
            r += 1;
        }
    }
    // Solves a·Δᵀ = y: Δᵀ is DIM × DIM.
    let solution = a.qr().solve_lstsq(&y);
    (0..DIM * DIM)
        .map(|k| solution[(k % DIM, k / DIM)])
        .collect()
}

fn assert_close(actual: &[f32], expected: &[f64], tol: f64) {
    let scale = expected.iter().map(|v| v.abs()).fold(0.0, f64::max);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (f64::from(*a) - e).abs() <= tol * scale,
            "element {i}: {a} against {e}"
        );
    }
}

#[test]
fn regmean_is_the_least_squares_merge_in_full_and_in_core_space() {
    let dir = tempfile::tempdir().unwrap();
    let planted = problem(dir.path());
    let modules = planted.module_names();
    let xs = [inputs(0, 40), inputs(1, 25)];
    let stats: Vec<PathBuf> = (0..2)
        .map(|t| {
            write_stats(
                &dir.path().join(format!("s{t}.safetensors")),
                &modules,
                &xs[t],
                None,
            )
        })
        .collect();
    let calibration: Vec<Option<&Path>> = stats.iter().map(|p| Some(p.as_path())).collect();
    let head = "method = \"regmean\"\noutput = \"delta\"\n[merge.parameters]\nridge = 0.0";
    let recipe = write_recipe(dir.path(), "full.toml", head, &calibration);
    // Weights 2 and 1: the least squares weighs each expert's mean squared error by them.
    let text = std::fs::read_to_string(&recipe).unwrap().replacen(
        "source = \"experts/task0\"",
        "source = \"experts/task0\"\nweight = 2.0",
        1,
    );
    std::fs::write(&recipe, text).unwrap();
    let full_out = dir.path().join("full");
    let plan = run(&recipe, &full_out).unwrap();
    assert!(plan.warnings().is_empty(), "{:?}", plan.warnings());
    let full = planted.read_merged(&full_out).unwrap();
    let deltas = [planted.expert_deltas(0), planted.expert_deltas(1)];
    for m in &modules {
        let expected = least_squares(&[&deltas[0][*m], &deltas[1][*m]], &xs, &[2.0, 1.0]);
        assert_close(&full[*m], &expected, 1e-4);
    }

    // Core space: the experts' Bs side by side with solved As, the same update at rank Σ r_t.
    let core_recipe = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("output = \"delta\"", "output = \"lora\"");
    std::fs::write(dir.path().join("core.toml"), core_recipe).unwrap();
    let core_out = dir.path().join("core");
    run(&dir.path().join("core.toml"), &core_out).unwrap();
    let core = planted.read_merged(&core_out).unwrap();
    for m in &modules {
        let full: Vec<f64> = full[*m].iter().map(|&v| f64::from(v)).collect();
        assert_close(&core[*m], &full, 1e-5);
    }
    let record = MergeRecord::read(&core_out).unwrap();
    assert!(record
        .modules
        .iter()
        .all(|m| m.rank == 8 && m.fallback.is_none()));
    // The statistics are inputs of the merge: their digests are in the record.
    let record = MergeRecord::read(&full_out).unwrap();
    let roles: Vec<&str> = record.inputs.iter().map(|i| i.input.as_str()).collect();
    let calibrations = roles
        .iter()
        .filter(|r| r.starts_with("calibration:"))
        .count();
    assert_eq!(calibrations, 2, "{roles:?}");
}

/// With disjoint input subspaces RegMean keeps each expert's outputs on its own inputs
/// exactly (held-out inputs included), whatever the leaks, which no weight-only merge does:
/// task arithmetic at its best λ carries each expert's leak into the other's inputs.
#[test]
fn regmean_keeps_disjoint_tasks_that_weight_only_merges_mix() {
    let dir = tempfile::tempdir().unwrap();
    let planted = planted(dir.path(), 0.0, 1.0);
    let calibration: Vec<PathBuf> = (0..2)
        .map(|t| Planted::calibration_file(dir.path(), t))
        .collect();
    let calibration: Vec<Option<&Path>> = calibration.iter().map(|p| Some(p.as_path())).collect();
    let score = |method: &str, lambda: f64| {
        let head = format!(
            "method = \"{method}\"\noutput = \"delta\"\n[merge.parameters]\nlambda = {lambda}"
        );
        let recipe = write_recipe(dir.path(), "r.toml", &head, &calibration);
        let out = dir.path().join(format!("{method}-{lambda}"));
        run(&recipe, &out).unwrap();
        let merged = planted.read_merged(&out).unwrap();
        let scores = planted
            .score(&merged, mmx::sweep::planted::Split::Test)
            .unwrap();
        scores.iter().sum::<f64>() / scores.len() as f64
    };
    let regmean = score("regmean", 1.0);
    let best_task_arithmetic = [0.25, 0.5, 0.75, 1.0]
        .iter()
        .map(|&l| score("task_arithmetic", l))
        .fold(f64::NEG_INFINITY, f64::max);
    assert!(
        regmean > 0.999 && best_task_arithmetic < 0.9,
        "regmean {regmean} against task arithmetic {best_task_arithmetic}"
    );
}

#[test]
fn modules_without_statistics_merge_by_the_named_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let planted = problem(dir.path());
    let modules = planted.module_names();
    // Expert 1 has statistics for the first module only.
    let s0 = write_stats(
        &dir.path().join("s0.safetensors"),
        &modules,
        &inputs(0, 20),
        None,
    );
    let s1 = write_stats(
        &dir.path().join("s1.safetensors"),
        &modules[..1],
        &inputs(1, 20),
        None,
    );
    for (output, fallback, divisor) in [("delta", "linear", 2.0), ("lora", "task_arithmetic", 1.0)]
    {
        let head = format!(
            "method = \"regmean\"\noutput = \"{output}\"\n[merge.parameters]\nfallback = \"{fallback}\""
        );
        let recipe = write_recipe(dir.path(), "r.toml", &head, &[Some(&s0), Some(&s1)]);
        let out = dir.path().join(format!("fallback-{output}"));
        let plan = run(&recipe, &out).unwrap();
        let warning = plan.warnings().join("\n");
        assert!(
            warning.contains(&format!("fallback `{fallback}`")) && warning.contains(modules[1]),
            "{warning}"
        );
        let merged = planted.read_merged(&out).unwrap();
        let (d0, d1) = (planted.expert_deltas(0), planted.expert_deltas(1));
        let expected: Vec<f64> = d0[modules[1]]
            .iter()
            .zip(&d1[modules[1]])
            .map(|(a, b)| f64::from(a + b) / divisor)
            .collect();
        assert_close(&merged[modules[1]], &expected, 1e-5);
        let record = MergeRecord::read(&out).unwrap();
        let recorded: Vec<Option<String>> = match output {
            "delta" => record
                .tensors
                .iter()
                .filter(|t| modules.contains(&t.name.as_str()))
                .map(|t| t.fallback.clone())
                .collect(),
            _ => record.modules.iter().map(|m| m.fallback.clone()).collect(),
        };
        assert_eq!(recorded, [None, Some(fallback.to_string())]);
    }
}

#[test]
fn fisher_weighs_each_coordinate_by_the_experts_fisher() {
    let dir = tempfile::tempdir().unwrap();
    let planted = problem(dir.path());
    let modules = planted.module_names();
    let f0: Vec<f32> = (0..DIM * DIM).map(|k| 1.0 + (k % 3) as f32).collect();
    let f1: Vec<f32> = (0..DIM * DIM).map(|k| 0.5 + (k % 5) as f32).collect();
    let s0 = write_stats(
        &dir.path().join("s0.safetensors"),
        &modules,
        &inputs(0, 4),
        Some(&f0),
    );
    let s1 = write_stats(
        &dir.path().join("s1.safetensors"),
        &modules,
        &inputs(1, 4),
        Some(&f1),
    );
    let head = "method = \"fisher\"\noutput = \"delta\"\n[merge.parameters]\nfisher_floor = 1e-9";
    let recipe = write_recipe(dir.path(), "r.toml", head, &[Some(&s0), Some(&s1)]);
    let out = dir.path().join("fisher");
    run(&recipe, &out).unwrap();
    let merged = planted.read_merged(&out).unwrap();
    let (d0, d1) = (planted.expert_deltas(0), planted.expert_deltas(1));
    for m in &modules {
        let expected: Vec<f64> = (0..DIM * DIM)
            .map(|k| {
                let (a, b) = (f64::from(f0[k]), f64::from(f1[k]));
                (a * f64::from(d0[*m][k]) + b * f64::from(d1[*m][k])) / (a + b)
            })
            .collect();
        assert_close(&merged[*m], &expected, 1e-5);
    }
    // An adapter's factors have no shared coordinates to weigh: a LoRA output is refused.
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("output = \"delta\"", "output = \"lora\"");
    std::fs::write(&recipe, text).unwrap();
    let err = run(&recipe, &dir.path().join("fisher-lora"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`fisher` averages full weights"), "{err}");
    assert!(!dir.path().join("fisher-lora").exists());
}

#[test]
fn bad_statistics_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let planted = problem(dir.path());
    let modules = planted.module_names();
    let good = write_stats(
        &dir.path().join("good.safetensors"),
        &modules,
        &inputs(0, 8),
        None,
    );
    let head = "method = \"regmean\"\noutput = \"delta\"";
    let out = dir.path().join("out");

    // An expert without statistics.
    let recipe = write_recipe(dir.path(), "r.toml", head, &[Some(&good), None]);
    let err = run(&recipe, &out).unwrap_err().to_string();
    assert!(
        err.contains("expert 1 (") && err.contains("has no `calibration"),
        "{err}"
    );

    // A Gram of the wrong side for the module.
    let wrong = dir.path().join("wrong.safetensors");
    let stats: BTreeMap<String, ModuleStats> = BTreeMap::from([(
        modules[0].trim_end_matches(".weight").to_string(),
        ModuleStats {
            gram: Some((vec![1.0; 9], 3, 5)),
            fisher: None,
        },
    )]);
    write_calibration(&wrong, &stats).unwrap();
    let recipe = write_recipe(dir.path(), "r.toml", head, &[Some(&good), Some(&wrong)]);
    let err = run(&recipe, &out).unwrap_err().to_string();
    let module = modules[0].trim_end_matches(".weight");
    assert!(
        err.contains("wrong.safetensors")
            && err.contains(&format!("module `{module}`"))
            && err.contains("3×3")
            && err.contains("[8, 8]"),
        "{err}"
    );

    // An asymmetric Gram: found when the module is merged, and nothing is written.
    let mut gram = vec![0f32; DIM * DIM];
    (0..DIM).for_each(|i| gram[i * DIM + i] = 1.0);
    gram[1] = 0.5;
    let stats: BTreeMap<String, ModuleStats> = modules
        .iter()
        .map(|m| {
            (
                m.trim_end_matches(".weight").to_string(),
                ModuleStats {
                    gram: Some((gram.clone(), DIM, 2)),
                    fisher: None,
                },
            )
        })
        .collect();
    let asymmetric = dir.path().join("asymmetric.safetensors");
    write_calibration(&asymmetric, &stats).unwrap();
    let recipe = write_recipe(
        dir.path(),
        "r.toml",
        head,
        &[Some(&good), Some(&asymmetric)],
    );
    let err = run(&recipe, &out).unwrap_err().to_string();
    assert!(
        err.contains("not symmetric: [0, 1] is 0.5 but [1, 0] is 0"),
        "{err}"
    );
    assert!(!out.exists(), "a failed merge left {}", out.display());
}

/// Activation-aware CACI end to end. With inputs of RMS 1 on every feature (identity Grams) the
/// full-space merge is weight-only CACI (`confidence = "rms"`) byte for byte; an expert whose
/// inputs never reach a module (a zero Gram) has no say there, in full and in core space: the
/// merge at density 1 is the other expert's update.
#[test]
fn activation_caci_scores_by_the_experts_own_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let planted = problem(dir.path());
    let modules = planted.module_names();
    let identity: Vec<Vec<f64>> = (0..DIM)
        .map(|i| (0..DIM).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    // The rows are the unit vectors: Σ x·xᵀ = I over DIM tokens, so G / tokens = I / DIM; scaled
    // back by sqrt(DIM) below so that every feature's RMS is 1.
    let unit: Vec<Vec<f64>> = identity
        .iter()
        .map(|row| row.iter().map(|v| v * (DIM as f64).sqrt()).collect())
        .collect();
    let u0 = write_stats(&dir.path().join("u0.safetensors"), &modules, &unit, None);
    let u1 = write_stats(&dir.path().join("u1.safetensors"), &modules, &unit, None);
    let caci = |confidence: &str, output: &str, stats: [&Path; 2], density: f64| {
        let head = format!(
            "method = \"caci\"\noutput = \"{output}\"\n[merge.parameters]\nconfidence = \"{confidence}\"\ndensity = {density}"
        );
        let recipe = write_recipe(
            dir.path(),
            "r.toml",
            &head,
            &[Some(stats[0]), Some(stats[1])],
        );
        let out = dir.path().join(format!("{confidence}-{output}-{density}"));
        let plan = run(&recipe, &out).unwrap();
        (out, plan.warnings().to_vec())
    };
    let (by_activation, _) = caci("activation", "delta", [&u0, &u1], 0.5);
    let (by_rms, warnings) = caci("rms", "delta", [&u0, &u1], 0.5);
    assert!(warnings
        .iter()
        .any(|w| w.contains("read only by regmean, fisher and caci")));
    let bytes = |dir: &Path| std::fs::read(dir.join("delta.safetensors")).unwrap();
    assert_eq!(bytes(&by_activation), bytes(&by_rms));

    let silent = vec![vec![0.0; DIM]; 4];
    let z1 = write_stats(&dir.path().join("z1.safetensors"), &modules, &silent, None);
    let d0 = planted.expert_deltas(0);
    for output in ["delta", "lora"] {
        let (out, _) = caci("activation", output, [&u0, &z1], 1.0);
        let merged = planted.read_merged(&out).unwrap();
        for m in &modules {
            let expected: Vec<f64> = d0[*m].iter().map(|&v| f64::from(v)).collect();
            assert_close(&merged[*m], &expected, 1e-4);
        }
    }
    // Without statistics for an expert it is refused, naming the expert.
    let head =
        "method = \"caci\"\noutput = \"delta\"\n[merge.parameters]\nconfidence = \"activation\"";
    let recipe = write_recipe(dir.path(), "r.toml", head, &[Some(&u0), None]);
    let err = run(&recipe, &dir.path().join("none"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("expert 1 (") && err.contains("has no `calibration"),
        "{err}"
    );
}

/// `mmx ARGS` run in `work`, which must succeed; what it printed.
fn mmx_output(work: &Path, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmx"))
        .args(args)
        .current_dir(work)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mmx {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `mmx ARGS` run in `work`, which must succeed; its stderr.
fn mmx_in(work: &Path, args: &[&str]) -> String {
    String::from_utf8_lossy(&mmx_output(work, args).stderr).into_owned()
}

/// A recipe of `method` whose experts give their cases (`calibration = { data, n }`) calibrates
/// them first (beside the output, with the Fisher where the method reads it), and the merge is
/// the one made from `mmx calibrate`'s files (with `calibrate_args`), byte for byte.
fn merge_by_cases_is_merge_by_files(method: &str, output: &str, calibrate_args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let registry = Path::new(env!("CARGO_MANIFEST_DIR")).join("registry");
    let mmx = |args: &[&str]| mmx_in(work, args);
    mmx(&[
        "data",
        "generate",
        "-o",
        "data",
        "--seed",
        "0",
        "--train",
        "1",
        "--validation",
        "6",
        "--test",
        "1",
    ]);
    let experts = ["cardiology", "radiology"];
    let write = |name: &str, calibration: &dyn Fn(&str) -> String| {
        let mut text = format!(
            "[merge]\nregistry = \"{}\"\nmethod = \"{method}\"\nbase = \"registry:tiny-med-base:v2\"\noutput = \"{output}\"\n",
            registry.display()
        );
        for s in experts {
            text.push_str(&format!(
                "\n[[merge.experts]]\nsource = \"registry:{s}:v2\"\ncalibration = {}\n",
                calibration(s)
            ));
        }
        std::fs::write(work.join(name), text).unwrap();
    };
    write("cases.toml", &|s| {
        format!("{{ data = \"data/{s}/validation.jsonl\", n = 4 }}")
    });
    let stderr = mmx(&["merge", "cases.toml", "-o", "by-cases", "--device", "cpu"]);
    assert!(stderr.contains("calibrated expert 1"), "{stderr}");
    assert!(
        !stderr.contains("warning"),
        "no tensor falls back: {stderr}"
    );
    assert!(work
        .join("by-cases.calibration/expert0.safetensors")
        .is_file());

    for s in experts {
        let (adapter, data, stats) = (
            format!("registry:{s}:v2"),
            format!("data/{s}/validation.jsonl"),
            format!("{s}.safetensors"),
        );
        let mut args = vec![
            "calibrate",
            "registry:tiny-med-base:v2",
            "--registry",
            registry.to_str().unwrap(),
            "--adapter",
            &adapter,
            "--data",
            &data,
            "-n",
            "4",
            "-o",
            &stats,
            "--quiet",
        ];
        args.extend_from_slice(calibrate_args);
        mmx(&args);
    }
    write("files.toml", &|s| format!("\"{s}.safetensors\""));
    mmx(&["merge", "files.toml", "-o", "by-files", "--device", "cpu"]);
    let weights = |d: &str| {
        let file = ["adapter_model.safetensors", "model.safetensors"]
            .iter()
            .map(|f| work.join(d).join(f))
            .find(|p| p.is_file())
            .unwrap();
        std::fs::read(file).unwrap()
    };
    assert_eq!(weights("by-cases"), weights("by-files"));
}

#[test]
fn mmx_merge_calibrates_experts_given_their_cases() {
    merge_by_cases_is_merge_by_files("regmean", "lora", &[]);
}

/// The same for Fisher-weighted averaging: the recipe's calibration measures the Fisher too,
/// which every module then has (no fallback), as `mmx calibrate --fisher` does.
#[test]
fn a_fisher_merge_calibrates_its_experts_fisher() {
    merge_by_cases_is_merge_by_files("fisher", "full", &["--fisher"]);
}

/// `mmx calibrate` on a vision-language model with its adapter: each case's image rows pass
/// through the language model (the Grams count the image tokens and differ from those of the
/// same cases without images), every module is named as the base checkpoint names its
/// weight, and the Grams and Fishers fit the base's shapes.
#[test]
fn mmx_calibrate_reads_the_image_cases_of_a_vision_language_model() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vlm");
    std::fs::create_dir_all(work.join("train")).unwrap();
    copy_tiny_llava(&work.join("llava"), work);
    // The fixture's cases (four of six show an image), and the same cases with no image.
    let cases = std::fs::read_to_string(fixtures.join("train/cases.jsonl")).unwrap();
    std::fs::write(work.join("train/images.jsonl"), &cases).unwrap();
    let text: Vec<String> = cases
        .lines()
        .map(|line| {
            let mut case: serde_json::Value = serde_json::from_str(line).unwrap();
            case.as_object_mut().unwrap().remove("image");
            case.to_string()
        })
        .collect();
    std::fs::write(work.join("train/text.jsonl"), text.join("\n")).unwrap();
    let adapter = fixtures.join("tiny-llava-lora");
    let calibrate = |data: &str, out: &str| -> serde_json::Value {
        let args = [
            "calibrate",
            "llava",
            "--adapter",
            adapter.to_str().unwrap(),
            "--data",
            data,
            "--fisher",
            "-o",
            out,
            "--json",
        ];
        serde_json::from_slice(&mmx_output(work, &args).stdout).unwrap()
    };
    let with = calibrate("train/images.jsonl", "images.safetensors");
    let without = calibrate("train/text.jsonl", "text.safetensors");
    let image_tokens = 16; // the fixture's `image_seq_length`
    assert_eq!(
        with["tokens"].as_u64().unwrap(),
        without["tokens"].as_u64().unwrap() + 4 * image_tokens
    );
    let (images, text) = (
        mmx::merge::calibration::Calibration::open(&work.join("images.safetensors")).unwrap(),
        mmx::merge::calibration::Calibration::open(&work.join("text.safetensors")).unwrap(),
    );
    let base = mmx::checkpoint::Checkpoint::open(work.join("llava")).unwrap();
    let modules: Vec<&str> = base
        .names()
        .into_iter()
        .filter(|n| n.contains("language_model") && n.ends_with("_proj.weight"))
        .collect();
    assert_eq!(modules.len(), 2 * 7, "{modules:?}");
    assert_eq!(with["modules"], 14);
    for name in modules {
        let module = name.strip_suffix(".weight").unwrap();
        let shape = &base.info(name).unwrap().shape;
        images.check_shapes(module, shape).unwrap();
        assert!(
            images.has_gram(module) && images.has_fisher(module),
            "{module}"
        );
        let fisher = images.fisher(module).unwrap().unwrap();
        assert_eq!(fisher.len(), shape[0] * shape[1]);
        assert!(fisher.iter().any(|&v| v > 0.0), "{module}: a zero Fisher");
        let (a, b) = (
            images.gram(module).unwrap().unwrap(),
            text.gram(module).unwrap().unwrap(),
        );
        assert_eq!(a.dim, shape[1]);
        let gap = a
            .values
            .iter()
            .zip(&b.values)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(gap > 1e-3, "{module}: the images changed nothing ({gap})");
    }
}
