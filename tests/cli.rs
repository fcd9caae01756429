//! The `mmx` binary on good and bad input: every bad input is a clear error naming the file and
//! the tensor, exit code 2, and no output (not even a partial or temporary one).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{assert_ok, mmx, reference};
use mmx::tensor::{from_f32, write_safetensors, SafetensorsFile, TensorSpec};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Copies a fixture model into `dir`, letting `edit` change, drop or reshape its tensors.
fn edited_model(
    from: &str,
    dir: &Path,
    edit: impl Fn(&str, &mut Vec<usize>, &mut Vec<f32>) -> bool,
) -> PathBuf {
    copy_dir(&reference(from), dir);
    let file = SafetensorsFile::open(reference(from).join("model.safetensors")).unwrap();
    let mut tensors = Vec::new();
    for name in file.names() {
        let mut shape = file.info(name).unwrap().shape.clone();
        let mut values = file.read_f32(name).unwrap();
        if edit(name, &mut shape, &mut values) {
            let spec = TensorSpec {
                name: name.to_string(),
                dtype: mmx::tensor::Dtype::F32,
                shape,
            };
            tensors.push((spec, from_f32(mmx::tensor::Dtype::F32, &values).unwrap()));
        }
    }
    let path = dir.join("model.safetensors");
    std::fs::remove_file(&path).unwrap();
    write_safetensors(&path, &tensors, &BTreeMap::new()).unwrap();
    dir.to_path_buf()
}

/// Writes a mergekit config merging `experts` onto the fixture base and returns its path.
fn config(dir: &Path, method: &str, experts: &[&Path], extra: &str) -> PathBuf {
    let mut text = format!(
        "merge_method: {method}\nbase_model: {}\ndtype: float32\nmodels:\n",
        reference("base").display()
    );
    for e in experts {
        text.push_str(&format!(
            "  - model: {}\n    parameters: {{weight: 1.0}}\n",
            e.display()
        ));
    }
    text.push_str(extra);
    let path = dir.join("merge.yml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Asserts a failed merge: exit code 2, every needle in the message, and nothing left in `work`
/// but the inputs (no output directory, no temporary directory).
fn assert_refused(work: &Path, cfg: &Path, needles: &[&str]) {
    let listing = || {
        let mut names: Vec<_> = std::fs::read_dir(work)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let before = listing();
    let out = mmx(&["merge", cfg.to_str().unwrap(), "-o", "merged"], work);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
    }
    let after = listing();
    assert_eq!(
        before, after,
        "the failed merge left files behind: {stderr}"
    );
}

const TENSOR: &str = "model.layers.1.mlp.up_proj.weight";

#[test]
fn refuses_a_shape_mismatch() {
    let work = tempfile::tempdir().unwrap();
    let bad = edited_model("ft_a", &work.path().join("bad"), |name, shape, _| {
        if name == TENSOR {
            shape.swap(0, 1);
        }
        true
    });
    let cfg = config(
        work.path(),
        "ties",
        &[&bad, &reference("ft_b")],
        "parameters: {density: 0.5}\n",
    );
    assert_refused(work.path(), &cfg, &["bad", TENSOR, "[32, 64]", "[64, 32]"]);
}

#[test]
fn refuses_a_missing_tensor() {
    let work = tempfile::tempdir().unwrap();
    let bad = edited_model("ft_a", &work.path().join("bad"), |name, _, _| {
        name != TENSOR
    });
    let cfg = config(work.path(), "task_arithmetic", &[&bad], "");
    assert_refused(work.path(), &cfg, &["bad", TENSOR, "missing"]);
}

#[test]
fn refuses_a_non_finite_value() {
    let work = tempfile::tempdir().unwrap();
    let bad = edited_model("ft_a", &work.path().join("bad"), |name, _, values| {
        if name == TENSOR {
            values[5] = f32::NAN;
        }
        true
    });
    let cfg = config(
        work.path(),
        "ties",
        &[&bad, &reference("ft_b")],
        "parameters: {density: 0.5}\n",
    );
    assert_refused(
        work.path(),
        &cfg,
        &["bad", TENSOR, "non-finite", "element 5"],
    );
}

#[test]
fn refuses_an_unknown_method_or_parameter() {
    let work = tempfile::tempdir().unwrap();
    let cfg = config(work.path(), "frankenmerge", &[&reference("ft_a")], "");
    assert_refused(
        work.path(),
        &cfg,
        &["merge.yml", "unknown merge method `frankenmerge`"],
    );
    let cfg = config(
        work.path(),
        "ties",
        &[&reference("ft_a")],
        "parameters: {densty: 0.5}\n",
    );
    assert_refused(
        work.path(),
        &cfg,
        &["merge.yml", "unknown parameter `densty`", "density"],
    );
    let cfg = config(
        work.path(),
        "ties",
        &[&reference("ft_a")],
        "parameters: {density: 1.5}\n",
    );
    assert_refused(work.path(), &cfg, &["density", "outside (0, 1]"]);
}

#[test]
fn refuses_a_checkpoint_of_another_architecture() {
    let work = tempfile::tempdir().unwrap();
    let cfg = config(work.path(), "ties", &[&reference("gpt2_base")], "");
    assert_refused(
        work.path(),
        &cfg,
        &[
            "gpt2_base",
            "GPT2LMHeadModel",
            "LlamaForCausalLM",
            "different architectures",
        ],
    );
    let cfg = config(work.path(), "ties", &[&reference("lora_gpt2")], "");
    assert_refused(work.path(), &cfg, &["lora_gpt2", "different base model"]);
}

#[test]
fn refuses_truncated_and_crafted_safetensors() {
    let work = tempfile::tempdir().unwrap();
    let truncated = work.path().join("truncated");
    copy_dir(&reference("ft_a"), &truncated);
    let weights = truncated.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    let cfg = config(work.path(), "ties", &[&truncated], "");
    assert_refused(
        work.path(),
        &cfg,
        &["truncated/model.safetensors", "truncated file"],
    );

    // A header whose second tensor overlaps the first.
    let crafted = work.path().join("crafted");
    copy_dir(&reference("ft_a"), &crafted);
    let header = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0u8; 24]);
    std::fs::write(crafted.join("model.safetensors"), file).unwrap();
    let cfg = config(work.path(), "ties", &[&crafted], "");
    assert_refused(
        work.path(),
        &cfg,
        &["crafted/model.safetensors", "tensor `b` starts at 8"],
    );
}

#[test]
fn refuses_an_adapter_it_cannot_apply() {
    let work = tempfile::tempdir().unwrap();
    let dora = work.path().join("dora");
    copy_dir(&reference("lora_a"), &dora);
    let cfg_path = dora.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        text.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    let cfg = config(work.path(), "ties", &[&dora], "");
    assert_refused(work.path(), &cfg, &["dora/adapter_config.json", "DoRA"]);
}

#[test]
fn keeps_an_existing_directory_it_did_not_write() {
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("merged")).unwrap();
    std::fs::write(work.path().join("merged/notes.txt"), "mine").unwrap();
    let cfg = config(work.path(), "task_arithmetic", &[&reference("ft_a")], "");
    assert_refused(work.path(), &cfg, &["merged", "--force"]);
    assert_eq!(
        std::fs::read_to_string(work.path().join("merged/notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn dry_run_writes_nothing_and_json_is_machine_readable() {
    let work = tempfile::tempdir().unwrap();
    let cfg = config(
        work.path(),
        "ties",
        &[&reference("ft_a"), &reference("ft_b")],
        "",
    );
    let cfg = cfg.to_str().unwrap();
    let out = mmx(
        &["merge", cfg, "-o", "merged", "--dry-run", "--json"],
        work.path(),
    );
    assert!(out.status.success());
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["tensors"]["merged"], 21);
    assert!(plan["memory_estimate_bytes"].as_u64().unwrap() > 0);
    assert!(!work.path().join("merged").exists());

    let out = mmx(&["merge", cfg, "-o", "merged", "--json"], work.path());
    assert_ok(&out);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["tensors"]["merged"], 21);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.path().join("merged/mmx-merge.json")).unwrap())
            .unwrap();
    assert_eq!(record["method"], "ties");
    assert_eq!(record["inputs"].as_array().unwrap().len(), 3);
    let digest = record["inputs"][1]["files"][1]["blake3"].as_str().unwrap();
    let bytes = std::fs::read(reference("ft_a/model.safetensors")).unwrap();
    assert_eq!(digest, blake3::hash(&bytes).to_hex().as_str());
    // Rerunning over an earlier mmx output replaces it.
    let again = mmx(&["merge", cfg, "-o", "merged"], work.path());
    assert!(again.status.success());
}

#[test]
fn random_merges_do_not_depend_on_the_thread_count() {
    let work = tempfile::tempdir().unwrap();
    let cfg = config(
        work.path(),
        "dare_ties",
        &[&reference("ft_a"), &reference("ft_b"), &reference("ft_c")],
        "parameters: {density: 0.4}\n",
    );
    let cfg = cfg.to_str().unwrap();
    for (threads, dir) in [("1", "one"), ("2", "two")] {
        let out = mmx(
            &["merge", cfg, "-o", dir, "--seed", "3", "--threads", threads],
            work.path(),
        );
        assert_ok(&out);
    }
    let one = std::fs::read(work.path().join("one/model.safetensors")).unwrap();
    let two = std::fs::read(work.path().join("two/model.safetensors")).unwrap();
    assert!(
        one == two,
        "same seed, different thread counts, different bytes"
    );
    let other = mmx(&["merge", cfg, "-o", "other", "--seed", "4"], work.path());
    assert!(other.status.success());
    let other = std::fs::read(work.path().join("other/model.safetensors")).unwrap();
    assert!(one != other, "a different seed gave the same masks");
}

#[test]
fn shards_large_outputs_and_copies_the_tokenizer() {
    let work = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = mmx(
        &[
            "merge",
            root.join("recipes/ties.toml").to_str().unwrap(),
            "-o",
            "merged",
            "--shard-size",
            "1M",
        ],
        work.path(),
    );
    assert_ok(&out);
    let merged = work.path().join("merged");
    assert!(merged.join("tokenizer.json").is_file());
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(merged.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() >= 3, "{shards:?}");
    let checkpoint = mmx::checkpoint::Checkpoint::open(&merged).unwrap();
    assert_eq!(
        checkpoint.names().len(),
        index["weight_map"].as_object().unwrap().len()
    );
}

/// Writes a model whose large tensors are merged in streamed chunks, and small ones.
fn large_model(dir: &Path, seed: u32) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures":["X"],"model_type":"x"}"#,
    )
    .unwrap();
    let values = |n: usize, salt: u32| -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let h = (i ^ salt).wrapping_mul(0x9E37_79B1).rotate_left(13) ^ seed;
                (h.wrapping_mul(0x85EB_CA6B) >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    let tensor = |name: &str, shape: Vec<usize>, salt: u32| {
        let n = shape.iter().product();
        let bytes = from_f32(mmx::tensor::Dtype::BF16, &values(n, salt)).unwrap();
        let spec = TensorSpec {
            name: name.to_string(),
            dtype: mmx::tensor::Dtype::BF16,
            shape,
        };
        (spec, bytes)
    };
    // Several large tensors and small ones, so that workers wait on the budget while others
    // merge in chunks.
    let mut tensors = vec![tensor("norm.weight", vec![1100], 2)];
    for (k, name) in ["big.weight", "big1.weight", "big2.weight", "big3.weight"]
        .iter()
        .enumerate()
    {
        tensors.push(tensor(name, vec![2048, 1100], 10 + k as u32));
        tensors.push(tensor(
            &format!("small{k}.weight"),
            vec![64, 64],
            20 + k as u32,
        ));
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors, &BTreeMap::new()).unwrap();
}

/// Tensors large enough to be merged in chunks, under a budget too small for anything, on four
/// workers: the merge completes, and gives what the whole-tensor method gives.
#[test]
fn streamed_tensors_merge_like_whole_ones_under_a_tight_budget() {
    use mmx::merge::{merge_tensor, Method, TensorJob};
    let work = tempfile::tempdir().unwrap();
    for (name, seed) in [("base", 0), ("a", 7), ("b", 9)] {
        large_model(&work.path().join(name), seed);
    }
    std::fs::write(
        work.path().join("ties.yml"),
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 1.0}\n  - model: b\n    parameters: {weight: 0.5}\nparameters: {density: 0.3}\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mmx"))
        .current_dir(work.path())
        .args([
            "merge",
            "ties.yml",
            "-o",
            "out",
            "--max-memory",
            "1K",
            "--threads",
            "4",
        ])
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > std::time::Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("the merge did not finish in 2 minutes");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success());

    let read =
        |dir: &str| SafetensorsFile::open(work.path().join(dir).join("model.safetensors")).unwrap();
    let (base, a, b, out) = (read("base"), read("a"), read("b"), read("out"));
    let name = "big.weight";
    let mut params = vec![Method::Ties.default_expert(); 2];
    params[0].weight = 1.0;
    params[1].weight = 0.5;
    params.iter_mut().for_each(|p| p.density = 0.3);
    let whole = merge_tensor(
        Method::Ties,
        &Method::Ties.default_globals(),
        TensorJob {
            name,
            shape: &[2048, 1100],
            base: Some(&base.read_f32(name).unwrap()),
            experts: vec![a.read_f32(name).unwrap(), b.read_f32(name).unwrap()],
            params,
            expert_ids: vec![0, 1],
        },
    )
    .unwrap();
    let expected = from_f32(mmx::tensor::Dtype::BF16, &whole.values).unwrap();
    assert!(
        out.bytes(name).unwrap() == expected,
        "streamed and whole merges differ"
    );
}

/// The quickstart recipe over the bundled registry's `v1` adapters (examples/adapters, built
/// with planted sign conflicts) instead of the trained `v2` ones (trimmed to density 0.5, as
/// the quickstart) and merged at rank 16 (below the experts' joint rank, so that the energy kept is below 1),
/// written into `dir`.
fn planted_quickstart(dir: &Path) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("recipes/quickstart.toml")).unwrap();
    let registry = format!("registry = \"{}\"", root.join("registry").display());
    assert!(text.contains("rank = 64") && text.contains("density = 0.5 "));
    let text = text
        .replace(":v2\"", ":v1\"")
        .replace("registry = \"../registry\"", &registry)
        .replace("rank = 64", "rank = 16");
    let path = dir.join("planted-quickstart.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `mmx conflicts` on the quickstart over the example adapters: they were built so that
/// cardiology and pathology share a direction that radiology and dermatology oppose.
#[test]
fn conflicts_report_the_bundled_experts_disagreements() {
    let work = tempfile::tempdir().unwrap();
    let recipe = planted_quickstart(work.path());
    let json = work.path().join("conflicts.json");
    // A bare file name: written into the working directory.
    let out = mmx(
        &[
            "conflicts",
            recipe.to_str().unwrap(),
            "--json",
            "conflicts.json",
        ],
        work.path(),
    );
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("q_proj"));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["modules"].as_array().unwrap().len(), 28);
    let cos = |i: usize, j: usize| report["cosine"][i][j].as_f64().unwrap();
    for i in 0..4 {
        assert!((cos(i, i) - 1.0).abs() < 1e-9);
        for j in 0..4 {
            assert!((cos(i, j) - cos(j, i)).abs() < 1e-12, "symmetric");
        }
    }
    // Experts 0..4: cardiology, radiology, pathology, dermatology.
    assert!(cos(0, 2) > 0.0 && cos(1, 3) > 0.0, "same-side pairs agree");
    assert!(
        cos(0, 1) < 0.0 && cos(2, 3) < 0.0,
        "opposite-side pairs disagree"
    );
    let first = &report["modules"][0];
    for key in ["sign_conflict", "mean_kappa", "minority_mass"] {
        let v = first[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
}

/// `mmx conflicts` on adapter directories measures what it measures on a recipe that merges
/// them with weight 1 and density 0.5; on the recipe it also reports the energy its merge keeps.
#[test]
fn conflicts_of_adapters_match_their_recipe_and_report_the_energy_kept() {
    let work = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let recipe = planted_quickstart(work.path());
    let adapters: Vec<String> = ["cardiology", "radiology", "pathology", "dermatology"]
        .iter()
        .map(|a| root.join("examples/adapters").join(a).display().to_string())
        .collect();
    let mut args = vec!["conflicts", "--json", "adapters.json"];
    args.extend(adapters.iter().map(String::as_str));
    assert_ok(&mmx(&args, work.path()));
    assert_ok(&mmx(
        &[
            "conflicts",
            recipe.to_str().unwrap(),
            "--json",
            "recipe.json",
        ],
        work.path(),
    ));
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(work.path().join(name)).unwrap()).unwrap()
    };
    let (from_adapters, from_recipe) = (read("adapters.json"), read("recipe.json"));
    assert_eq!(
        from_adapters["experts"],
        serde_json::json!(["cardiology", "radiology", "pathology", "dermatology"])
    );
    let modules = |r: &serde_json::Value| r["modules"].as_array().unwrap().clone();
    assert_eq!(modules(&from_adapters).len(), 28);
    for (a, r) in modules(&from_adapters).iter().zip(modules(&from_recipe)) {
        assert_eq!(a["module"], r["module"]);
        for key in ["sign_conflict", "mean_kappa", "minority_mass"] {
            // The recipe's deltas are (base + s·B·A) − base in f32, the adapters' s·B·A.
            let (x, y) = (a[key].as_f64().unwrap(), r[key].as_f64().unwrap());
            assert!((x - y).abs() < 1e-6, "{key}: {x} vs {y}");
        }
    }
    assert!(from_adapters["retained_energy"].is_null());

    // The energy kept is the merge's own: the same numbers `mmx merge --json` reports.
    let merged = mmx(
        &["merge", recipe.to_str().unwrap(), "-o", "merged", "--json"],
        work.path(),
    );
    assert_ok(&merged);
    let summary: serde_json::Value = serde_json::from_slice(&merged.stdout).unwrap();
    let kept = from_recipe["retained_energy"].as_array().unwrap();
    let labels = from_recipe["experts"].as_array().unwrap();
    for (label, share) in labels.iter().zip(kept) {
        let want = summary["retained_energy"][label.as_str().unwrap()]
            .as_f64()
            .unwrap();
        let got = share.as_f64().unwrap();
        assert!((got - want).abs() < 1e-9, "{label}: {got} vs {want}");
        assert!(got > 0.3 && got < 1.0, "{label}: {got}");
    }
}

/// Adapters for different bases, or with a module of another shape: refused before any
/// arithmetic, naming both adapters.
#[test]
fn conflicts_refuse_adapters_for_different_bases() {
    let work = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cardiology = root.join("examples/adapters/cardiology");
    // Planted adapters have modules of the same names but 64×64.
    let planted =
        mmx::sweep::planted::Planted::generate(mmx::sweep::planted::PlantedSpec::default())
            .unwrap();
    planted.write(&work.path().join("planted")).unwrap();
    let other = mmx::sweep::planted::Planted::expert_dir(&work.path().join("planted"), 0);
    let refused = || {
        let args = [
            "conflicts",
            cardiology.to_str().unwrap(),
            other.to_str().unwrap(),
        ];
        let out = mmx(&args, work.path());
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = refused();
    assert!(
        stderr.contains("tiny-med-base") && stderr.contains("different bases"),
        "{stderr}"
    );
    // Same base name, other shapes.
    let config = other.join("adapter_config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("../../base", "tiny-med-base");
    std::fs::write(&config, text).unwrap();
    let stderr = refused();
    assert!(
        stderr.contains("[64, 64]") && stderr.contains("[128, 128]") && stderr.contains("task0"),
        "{stderr}"
    );
}
