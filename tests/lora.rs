//! LoRA-native merging: `cat` writes one adapter whose update is exactly the weighted sum of
//! the experts' updates, in PEFT's format.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use mmx::adapter::Adapter;
use mmx::tensor::SafetensorsFile;

use common::{assert_ok, max_relative_error, reference, write_two_lora_recipe};

/// Writes a `cat` recipe over lora_a (weight 0.8) and lora_b (0.5) and runs it.
fn cat(dir: &Path, output: &str, extra: &str) -> Output {
    lora_native(dir, "cat", output, extra)
}

/// Writes a recipe of a LoRA-native `method` over lora_a (0.8) and lora_b (0.5), runs it
/// into `dir/out`.
fn lora_native(dir: &Path, method: &str, output: &str, extra: &str) -> Output {
    let recipe = dir.join(format!("{method}.toml"));
    write_two_lora_recipe(&recipe, method, output, extra);
    Command::new(env!("CARGO_BIN_EXE_mmx"))
        .args(["merge", recipe.to_str().unwrap(), "-o"])
        .arg(dir.join("out"))
        .output()
        .unwrap()
}

#[test]
fn cat_is_the_exact_weighted_sum_of_the_updates() {
    let dir = tempfile::tempdir().unwrap();
    let out = cat(dir.path(), "lora", "");
    assert_ok(&out);
    let merged = Adapter::open(dir.path().join("out")).unwrap();
    let (a, b) = (
        Adapter::open(reference("lora_a")).unwrap(),
        Adapter::open(reference("lora_b")).unwrap(),
    );
    assert_eq!(merged.modules().len(), a.modules().len());
    let mut worst = 0f64;
    for (name, module) in merged.modules() {
        // Ranks add up: 4 + 4, and 4 + 2 where lora_b's rank_pattern gives q_proj rank 2.
        let expected_rank = a.modules()[name].rank + b.modules()[name].rank;
        assert_eq!(module.rank, expected_rank, "{name}");
        assert_eq!(module.scaling, 1.0, "{name}");
        let da = a.delta(name).unwrap().unwrap();
        let db = b.delta(name).unwrap().unwrap();
        let expected: Vec<f32> = da.iter().zip(&db).map(|(x, y)| 0.8 * x + 0.5 * y).collect();
        let err = max_relative_error(&merged.delta(name).unwrap().unwrap(), &expected);
        assert!(err <= 1e-5, "{name}: {err:e}");
        worst = worst.max(err);
    }
    eprintln!("cat vs the weighted sum of deltas: worst relative error {worst:.2e}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/mmx-merge.json")).unwrap())
            .unwrap();
    assert_eq!(record["method"], "cat");
}

#[test]
fn cat_matches_peft_add_weighted_adapter() {
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference("cases.json")).unwrap()).unwrap();
    let case = &cases["lora_native"][0];
    assert_eq!(case["method"], "cat");
    let dir = tempfile::tempdir().unwrap();
    let out = cat(dir.path(), "lora", "");
    assert_ok(&out);
    let ours = Adapter::open(dir.path().join("out")).unwrap();
    let theirs = SafetensorsFile::open(reference(case["deltas"].as_str().unwrap())).unwrap();
    let mut worst = 0f64;
    let mut checked = 0;
    for name in theirs.names().filter(|n| !n.starts_with("expected.")) {
        let err = max_relative_error(
            &ours.delta(name).unwrap().unwrap(),
            &theirs.read_f32(name).unwrap(),
        );
        assert!(err <= 1e-5, "{name}: {err:e}");
        worst = worst.max(err);
        checked += 1;
    }
    assert_eq!(checked, ours.modules().len());
    eprintln!("cat vs PEFT add_weighted_adapter(cat): worst relative error {worst:.2e}");
}

#[test]
fn cat_refuses_what_it_cannot_merge() {
    let dir = tempfile::tempdir().unwrap();
    let out = cat(dir.path(), "full", "");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("output = \"lora\""));
    let out = cat(dir.path(), "lora", "[merge.parameters]\ndensity = 0.5");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown parameter `density`"));
    assert!(!dir.path().join("out").exists());

    // An adapter of another base model, and an adapter with a whole module saved.
    for (adapter, needle) in [
        ("lora_gpt2", "different base model"),
        ("lora_embed", "cannot hold both"),
    ] {
        let recipe = dir.path().join("bad.toml");
        std::fs::write(
            &recipe,
            format!(
                "[merge]\nmethod = 'cat'\nbase = '{}'\noutput = 'lora'\n[[merge.experts]]\nsource = '{}'\n",
                reference("base").display(),
                reference(adapter).display()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_mmx"))
            .args(["merge", recipe.to_str().unwrap(), "-o"])
            .arg(dir.path().join("out"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(needle) && stderr.contains(adapter),
            "{stderr}"
        );
        assert!(!dir.path().join("out").exists());
    }
}

/// The delta each module of the adapter in `dir` applies, by base tensor name.
fn deltas(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let adapter = Adapter::open(dir).unwrap();
    adapter
        .modules()
        .keys()
        .map(|name| (name.clone(), adapter.delta(name).unwrap().unwrap()))
        .collect()
}

#[test]
fn svd_matches_peft_add_weighted_adapter() {
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference("cases.json")).unwrap()).unwrap();
    let case = cases["lora_native"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["method"] == "svd")
        .unwrap();
    assert_eq!(case["rank"], 4);
    let dir = tempfile::tempdir().unwrap();
    // No `rank`: PEFT's default, the largest rank among the experts (4).
    let out = lora_native(dir.path(), "svd", "lora", "");
    assert_ok(&out);
    let theirs = SafetensorsFile::open(reference(case["deltas"].as_str().unwrap())).unwrap();
    let merged = Adapter::open(dir.path().join("out")).unwrap();
    let mut worst = 0f64;
    for (name, ours) in deltas(&dir.path().join("out")) {
        assert_eq!(merged.modules()[&name].rank, 4, "{name}");
        let err = max_relative_error(&ours, &theirs.read_f32(&name).unwrap());
        assert!(err <= 1e-4, "{name}: {err:e}");
        worst = worst.max(err);
    }
    eprintln!("svd (rank 4) vs PEFT add_weighted_adapter(svd): worst relative error {worst:.2e}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/mmx-merge.json")).unwrap())
            .unwrap();
    let discarded = record["modules"][0]["discarded_energy"].as_f64().unwrap();
    assert!(discarded > 0.0 && discarded < 1.0, "{discarded}");
}

#[test]
fn svd_at_full_rank_is_cat_and_energy_targets_pick_ranks() {
    let full = tempfile::tempdir().unwrap();
    let out = lora_native(full.path(), "svd", "lora", "rank = 8");
    assert_ok(&out);
    let exact = tempfile::tempdir().unwrap();
    assert!(cat(exact.path(), "lora", "").status.success());
    for ((name, ours), (_, theirs)) in deltas(&full.path().join("out"))
        .into_iter()
        .zip(deltas(&exact.path().join("out")))
    {
        let err = max_relative_error(&ours, &theirs);
        assert!(
            err <= 1e-5,
            "{name}: svd at the full rank differs from cat by {err:e}"
        );
    }

    // Energy 1.0 keeps every direction; a low target keeps fewer, and the record says how much
    // each module lost, never more than the target allows.
    for (target, check) in [("1.0", 0.0), ("0.6", 0.4)] {
        let dir = tempfile::tempdir().unwrap();
        let out = lora_native(
            dir.path(),
            "svd",
            "lora",
            &format!("rank = 'energy:{target}'"),
        );
        assert_ok(&out);
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("out/mmx-merge.json")).unwrap())
                .unwrap();
        let merged = Adapter::open(dir.path().join("out")).unwrap();
        for module in record["modules"].as_array().unwrap() {
            let discarded = module["discarded_energy"].as_f64().unwrap();
            assert!(discarded <= check + 1e-9, "{target}: {module}");
            let name = format!("{}.weight", module["module"].as_str().unwrap());
            assert_eq!(
                merged.modules()[&name].rank as u64,
                module["rank"].as_u64().unwrap()
            );
        }
        if target == "0.6" {
            assert!(
                merged.modules().values().any(|m| m.rank < 6),
                "a 60% target truncates"
            );
        }
    }
    let bad = tempfile::tempdir().unwrap();
    let out = lora_native(bad.path(), "svd", "lora", "rank = 'energy:1.5'");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("merge.rank"));
    let out = lora_native(bad.path(), "cat", "lora", "rank = 4");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("drop `rank`"));
}

/// Core space is lossless: task arithmetic there, factored at the full rank, is the exact
/// weighted sum of the updates (what `cat` writes), and full-space task arithmetic's delta.
#[test]
fn core_space_task_arithmetic_is_the_exact_sum() {
    let core = tempfile::tempdir().unwrap();
    let out = lora_native(core.path(), "task_arithmetic", "lora", "rank = 8");
    assert_ok(&out);
    let full = tempfile::tempdir().unwrap();
    let out = lora_native(full.path(), "task_arithmetic", "delta", "");
    assert_ok(&out);
    let full_delta = SafetensorsFile::open(full.path().join("out/delta.safetensors")).unwrap();
    let mut worst = 0f64;
    for (name, ours) in deltas(&core.path().join("out")) {
        let err = max_relative_error(&ours, &full_delta.read_f32(&name).unwrap());
        assert!(err <= 1e-5, "{name}: {err:e}");
        worst = worst.max(err);
    }
    eprintln!("core-space vs full-space task arithmetic: worst relative error {worst:.2e}");
}

/// TIES in core space trims and elects signs on the small core matrices: it differs from the
/// exact sum, keeps its rank target, and records what the factoring discarded.
#[test]
fn core_space_ties_writes_a_lora_at_its_rank() {
    let dir = tempfile::tempdir().unwrap();
    let out = lora_native(
        dir.path(),
        "ties",
        "lora",
        "rank = 4\n[merge.parameters]\ndensity = 0.5",
    );
    assert_ok(&out);
    let merged = Adapter::open(dir.path().join("out")).unwrap();
    assert!(merged.modules().values().all(|m| m.rank == 4));
    let exact = tempfile::tempdir().unwrap();
    assert!(cat(exact.path(), "lora", "").status.success());
    let differs = deltas(&dir.path().join("out"))
        .into_iter()
        .zip(deltas(&exact.path().join("out")))
        .any(|((_, a), (_, b))| max_relative_error(&a, &b) > 1e-3);
    assert!(
        differs,
        "TIES at density 0.5 should not equal the plain sum"
    );
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/mmx-merge.json")).unwrap())
            .unwrap();
    assert_eq!(record["space"], "core");
    // A recipe that asks for full space with LoRA output is refused, as is core space with a
    // full output.
    let bad = tempfile::tempdir().unwrap();
    let out = lora_native(bad.path(), "ties", "lora", "space = 'full'");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("space = \"core\""));
    let out = lora_native(bad.path(), "ties", "full", "space = 'core'");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("output = \"lora\""));
}

/// Writes and runs a recipe over the four bundled specialty adapters.
fn bundled(dir: &Path, name: &str, header: &str, parameters: &str) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut text = format!(
        "[merge]\n{header}\nbase = '{}'\n[merge.parameters]\n{parameters}\n",
        root.join("tiny-med-base").display()
    );
    for (specialty, weight) in [
        ("cardiology", 1.0),
        ("radiology", 0.8),
        ("pathology", 1.2),
        ("dermatology", 0.6),
    ] {
        text.push_str(&format!(
            "[[merge.experts]]\nsource = '{}'\nweight = {weight}\n",
            root.join("adapters").join(specialty).display()
        ));
    }
    let recipe = dir.join(format!("{name}.toml"));
    std::fs::write(&recipe, text).unwrap();
    Command::new(env!("CARGO_BIN_EXE_mmx"))
        .args(["merge", recipe.to_str().unwrap(), "-o"])
        .arg(dir.join(name))
        .output()
        .unwrap()
}

/// CACI with attenuation 0, confidence "none", in full space, is TIES: the same bytes.
#[test]
fn caci_reduces_to_ties_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let caci = bundled(
        dir.path(),
        "caci",
        "method = 'caci'\noutput = 'full'",
        "density = 0.4\nattenuation = 0.0\nconfidence = 'none'",
    );
    assert_ok(&caci);
    let ties = bundled(
        dir.path(),
        "ties",
        "method = 'ties'\noutput = 'full'",
        "density = 0.4",
    );
    assert_ok(&ties);
    let read = |name: &str| std::fs::read(dir.path().join(name).join("model.safetensors")).unwrap();
    assert!(
        read("caci") == read("ties"),
        "CACI(γ=0, confidence none) differs from TIES"
    );

    // With its defaults (γ 1, rms confidence) it attenuates, so it differs from TIES, and in
    // core space it writes a LoRA adapter at the requested rank.
    let attenuated = bundled(
        dir.path(),
        "caci_default",
        "method = 'caci'\noutput = 'full'",
        "",
    );
    assert!(attenuated.status.success());
    assert!(read("caci_default") != read("ties"));
    let lora = bundled(
        dir.path(),
        "caci_lora",
        "method = 'caci'\noutput = 'lora'\nrank = 16",
        "",
    );
    assert_ok(&lora);
    let adapter = Adapter::open(dir.path().join("caci_lora")).unwrap();
    assert!(adapter.modules().values().all(|m| m.rank <= 16));
    assert!(adapter.modules().values().any(|m| m.rank == 16));
}

/// CACI's `restore` changes the merge (on top of the same vote), and a target that is not a
/// positive number is refused before anything is written, naming the parameter.
#[test]
fn caci_restore_is_checked_and_applied() {
    let dir = tempfile::tempdir().unwrap();
    let header = "method = 'caci'\noutput = 'lora'\nrank = 16";
    assert_ok(&bundled(dir.path(), "plain", header, ""));
    assert_ok(&bundled(dir.path(), "restored", header, "restore = 0.8"));
    let read = |name: &str| {
        std::fs::read(dir.path().join(name).join("adapter_model.safetensors")).unwrap()
    };
    assert!(read("plain") != read("restored"));
    for bad in ["restore = -0.5", "restore = 0.0", "restore = 'yes'"] {
        let out = bundled(dir.path(), "bad", header, bad);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("restore"), "{bad}: {stderr}");
        assert!(!dir.path().join("bad").exists(), "{bad}: partial output");
    }
}

/// CACI with `restore = 0.8` in full space, written as a delta: in every module, each expert's
/// share of the merged update, ⟨Δ, Δ_t⟩ / ‖Δ_t‖² with Δ_t = s·B·A from its adapter, is 0.8
/// times its weight (the bundled recipe's 1, 0.8, 1.2, 0.6).
#[test]
fn caci_restore_gives_each_expert_its_share_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = bundled(
        dir.path(),
        "restored",
        "method = 'caci'\noutput = 'delta'",
        "restore = 0.8",
    );
    assert_ok(&out);
    let merged = SafetensorsFile::open(dir.path().join("restored/delta.safetensors")).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/adapters");
    let experts: Vec<(Adapter, f64)> = [
        ("cardiology", 1.0),
        ("radiology", 0.8),
        ("pathology", 1.2),
        ("dermatology", 0.6),
    ]
    .iter()
    .map(|(s, w)| (Adapter::open(root.join(s)).unwrap(), *w))
    .collect();
    let mut checked = 0;
    for module in experts[0].0.modules().keys() {
        let delta = merged.read_f32(module).unwrap();
        for (adapter, weight) in &experts {
            let m = &adapter.modules()[module];
            let (b, a) = (
                adapter.file().read_f32(&m.b_key).unwrap(),
                adapter.file().read_f32(&m.a_key).unwrap(),
            );
            let cols = a.len() / m.rank;
            let (mut inner, mut norm) = (0f64, 0f64);
            for (i, row) in delta.chunks(cols).enumerate() {
                for (j, d) in row.iter().enumerate() {
                    let u: f64 = (0..m.rank)
                        .map(|k| f64::from(b[i * m.rank + k]) * f64::from(a[k * cols + j]))
                        .sum::<f64>()
                        * f64::from(m.scaling);
                    inner += f64::from(*d) * u;
                    norm += u * u;
                }
            }
            let share = inner / norm;
            assert!(
                (share - 0.8 * weight).abs() < 1e-3,
                "{module}: share {share}, expected {}",
                0.8 * weight
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 4 * experts[0].0.modules().len());
}

/// The energy of each expert the merge keeps: all of it when the merge spans the whole core
/// space (task arithmetic at full rank), less under a rank cut; reported per module and per
/// expert.
#[test]
fn core_merges_report_the_energy_kept_per_expert() {
    let run = |rank: usize| {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("ta.toml");
        std::fs::write(
            &recipe,
            format!(
                "[merge]\nmethod = 'task_arithmetic'\nbase = '{}'\noutput = 'lora'\nrank = {rank}\n\
                 [[merge.experts]]\nsource = '{}'\n[[merge.experts]]\nsource = '{}'\n",
                reference("base").display(),
                reference("lora_a").display(),
                reference("lora_b").display(),
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_mmx"))
            .args(["merge", recipe.to_str().unwrap(), "--json", "-o"])
            .arg(dir.path().join("out"))
            .output()
            .unwrap();
        assert_ok(&out);
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let kept: Vec<f64> = summary["retained_energy"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(kept.len(), 2);
        kept
    };
    for share in run(8) {
        assert!(
            (share - 1.0).abs() < 1e-6,
            "full rank keeps everything: {share}"
        );
    }
    for share in run(2) {
        assert!(
            share > 0.0 && share < 0.999,
            "rank 2 of 8 keeps part: {share}"
        );
    }
}

/// RegMean's LoRA output (the experts' `B`s side by side with solved `A`s) as PEFT loads it:
/// tests/fixtures/make_peft_regmean.py ran this recipe's merge, loaded the adapter with
/// `PeftModel.from_pretrained` and saved the update each module applies, with RegMean computed
/// in numpy from the sources. mmx's adapter now applies the same updates.
#[test]
fn regmean_lora_output_loads_in_peft_as_the_least_squares_merge() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mmx"))
        .args([
            "merge",
            reference("peft_regmean/recipe.toml").to_str().unwrap(),
        ])
        .args(["--device", "cpu", "-o"])
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert_ok(&out);
    let merged = Adapter::open(dir.path().join("out")).unwrap();
    let peft = SafetensorsFile::open(reference("peft_regmean/deltas.safetensors")).unwrap();
    let (mut worst_peft, mut worst_numpy) = (0f64, 0f64);
    for (name, ours) in deltas(&dir.path().join("out")) {
        // Exact at rank Σ r_t: 4 + 4, and 4 + 2 where lora_b has rank 2 (q_proj).
        let rank = if name.contains("q_proj") { 6 } else { 8 };
        assert_eq!(merged.modules()[&name].rank, rank, "{name}");
        let loaded = max_relative_error(&ours, &peft.read_f32(&name).unwrap());
        let solved =
            max_relative_error(&ours, &peft.read_f32(&format!("expected.{name}")).unwrap());
        assert!(
            loaded <= 1e-5 && solved <= 1e-4,
            "{name}: {loaded:e} {solved:e}"
        );
        worst_peft = worst_peft.max(loaded);
        worst_numpy = worst_numpy.max(solved);
    }
    assert_eq!(merged.modules().len(), 14);
    eprintln!("regmean LoRA: vs PEFT's load {worst_peft:.2e}, vs numpy RegMean {worst_numpy:.2e}");
}
