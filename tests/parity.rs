//! Reference parity: mmx against outputs that mergekit 0.1.5 and PEFT 0.21 wrote for the same
//! inputs (tests/fixtures/reference, made by tests/fixtures/make_reference.py).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use mmx::adapter::Adapter;
use mmx::checkpoint::Checkpoint;
use mmx::tensor::SafetensorsFile;
use serde_json::Value;

use common::max_relative_error;

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

fn cases() -> Value {
    let text = std::fs::read_to_string(reference_dir().join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Runs `mmx merge RECIPE -o OUT EXTRA...` in `cwd`, asserting it succeeds.
fn run_merge(cwd: &Path, recipe: &Path, out: &Path, extra: &[&str]) {
    let status = Command::new(env!("CARGO_BIN_EXE_mmx"))
        .current_dir(cwd)
        .arg("merge")
        .arg(recipe)
        .arg("-o")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}: {}",
        recipe.display(),
        String::from_utf8_lossy(&status.stderr)
    );
}

/// Runs `mmx merge` on a mergekit config from the fixtures directory, as mergekit was run.
fn merge(config: &str, out: &Path) {
    run_merge(&reference_dir(), Path::new(config), out, &["--seed", "0"]);
}

#[test]
fn deterministic_methods_match_mergekit() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for case in cases()["cases"].as_array().unwrap() {
        if case["kind"] != "exact" {
            continue;
        }
        let name = case["case"].as_str().unwrap();
        let out = dir.path().join(name);
        merge(case["config"].as_str().unwrap(), &out);
        let ours = SafetensorsFile::open(out.join("model.safetensors")).unwrap();
        let theirs =
            SafetensorsFile::open(reference_dir().join(case["output"].as_str().unwrap())).unwrap();
        let mut worst = 0f64;
        let names: Vec<&str> = theirs.names().collect();
        assert_eq!(
            ours.names().collect::<Vec<_>>(),
            names,
            "{name}: tensor set"
        );
        for tensor in names {
            let err = max_relative_error(
                &ours.read_f32(tensor).unwrap(),
                &theirs.read_f32(tensor).unwrap(),
            );
            assert!(
                err <= 1e-5,
                "{name}: `{tensor}` differs by {err:e} relative"
            );
            worst = worst.max(err);
        }
        eprintln!("parity {name:<22} worst relative error {worst:.2e}");
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} exact cases found");
}

/// Fraction of changed entries and L1 norm of (output − base) over all tensors.
fn delta_stats(model: &SafetensorsFile, base: &Checkpoint) -> (f64, f64) {
    let (mut changed, mut total, mut l1) = (0usize, 0usize, 0f64);
    for tensor in model.names() {
        let out = model.read_f32(tensor).unwrap();
        let b = base.read_f32(tensor).unwrap();
        for (o, b) in out.iter().zip(&b) {
            let d = (*o as f64) - (*b as f64);
            changed += usize::from(d != 0.0);
            l1 += d.abs();
        }
        total += out.len();
    }
    (changed as f64 / total as f64, l1)
}

#[test]
fn random_methods_match_mergekit_statistically() {
    let dir = tempfile::tempdir().unwrap();
    let base = Checkpoint::open(reference_dir().join("base")).unwrap();
    let mut checked = 0;
    for case in cases()["cases"].as_array().unwrap() {
        if case["kind"] != "statistical" {
            continue;
        }
        let name = case["case"].as_str().unwrap();
        let out = dir.path().join(name);
        merge(case["config"].as_str().unwrap(), &out);
        let ours = SafetensorsFile::open(out.join("model.safetensors")).unwrap();
        let theirs =
            SafetensorsFile::open(reference_dir().join(case["output"].as_str().unwrap())).unwrap();
        let (frac_ours, l1_ours) = delta_stats(&ours, &base);
        let (frac_theirs, l1_theirs) = delta_stats(&theirs, &base);
        eprintln!(
            "parity {name:<14} changed {frac_ours:.4} vs {frac_theirs:.4}, L1 ratio {:.4}",
            l1_ours / l1_theirs
        );
        assert!(
            (frac_ours - frac_theirs).abs() < 0.01,
            "{name}: changed fraction"
        );
        assert!(
            (l1_ours / l1_theirs - 1.0).abs() < 0.03,
            "{name}: L1 norm of the merged delta"
        );
        checked += 1;
    }
    assert_eq!(checked, 4, "dare_ties, dare_linear, della, della_linear");
}

#[test]
fn adapters_apply_like_peft_merge_and_unload() {
    let mut checked = 0;
    for entry in cases()["adapters"].as_array().unwrap() {
        let root = reference_dir();
        let adapter = Adapter::open(root.join(entry["adapter"].as_str().unwrap())).unwrap();
        let base = Checkpoint::open(root.join(entry["base"].as_str().unwrap())).unwrap();
        let merged = SafetensorsFile::open(root.join(entry["merged"].as_str().unwrap())).unwrap();
        let mut worst = 0f64;
        let mut changed = 0;
        for tensor in merged.names() {
            let expected = merged.read_f32(tensor).unwrap();
            let mut ours = match adapter.replacement(tensor).unwrap() {
                Some(r) => r,
                None => base.read_f32(tensor).unwrap(),
            };
            if let Some(delta) = adapter.delta(tensor).unwrap() {
                ours.iter_mut().zip(&delta).for_each(|(v, d)| *v += d);
                changed += 1;
            }
            let err = max_relative_error(&ours, &expected);
            assert!(
                err <= 1e-5,
                "{}: `{tensor}` differs by {err:e}",
                entry["adapter"]
            );
            worst = worst.max(err);
        }
        assert!(
            changed > 0,
            "{}: the adapter changed nothing",
            entry["adapter"]
        );
        eprintln!(
            "parity {:<12} (PEFT merge_and_unload) worst relative error {worst:.2e}",
            entry["adapter"].as_str().unwrap()
        );
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} adapters checked");
}

#[test]
fn adapters_save_byte_for_byte_as_peft_does() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["lora_a", "lora_b", "lora_embed", "lora_gpt2"] {
        let src = reference_dir().join(name);
        let adapter = Adapter::open(&src).unwrap();
        let file = adapter.file();
        let tensors: Vec<_> = file
            .names()
            .map(|n| {
                let info = file.info(n).unwrap();
                let spec = mmx::tensor::TensorSpec {
                    name: n.to_string(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                };
                (spec, file.bytes(n).unwrap().to_vec())
            })
            .collect();
        let out = dir.path().join(name);
        Adapter::save(&out, &adapter.config().raw, &tensors).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
            std::fs::read_to_string(src.join("adapter_config.json")).unwrap(),
            "{name}: adapter_config.json"
        );
        let again = Adapter::open(&out).unwrap();
        assert_eq!(again.modules().len(), adapter.modules().len());
        for tensor in file.names() {
            assert_eq!(
                again.file().bytes(tensor).unwrap(),
                file.bytes(tensor).unwrap()
            );
        }
        assert_eq!(
            again
                .file()
                .header()
                .metadata
                .get("format")
                .map(String::as_str),
            Some("pt")
        );
    }
}

/// The same TIES merge written as a delta (native recipe) and in bf16 (mergekit `out_dtype`),
/// under a memory budget too small for two tensors at once: the delta plus the base is
/// mergekit's output, and the bf16 output is mergekit's rounded to nearest even.
#[test]
fn delta_and_bf16_outputs_hold_the_same_merge() {
    let dir = tempfile::tempdir().unwrap();
    let root = reference_dir();
    let recipe = dir.path().join("ties.toml");
    std::fs::write(
        &recipe,
        format!(
            "[merge]\nmethod = 'ties'\nbase = '{base}'\noutput = 'delta'\n\
             [merge.parameters]\ndensity = 0.5\n\
             [[merge.experts]]\nsource = '{a}'\nweight = 1.0\n\
             [[merge.experts]]\nsource = '{b}'\nweight = 0.7\n\
             [[merge.experts]]\nsource = '{c}'\nweight = 0.4\nparameters = {{ density = 0.3 }}\n",
            base = root.join("base").display(),
            a = root.join("ft_a").display(),
            b = root.join("ft_b").display(),
            c = root.join("ft_c").display(),
        ),
    )
    .unwrap();
    let out = dir.path().join("delta");
    run_merge(dir.path(), &recipe, &out, &["--max-memory", "1K"]);
    let delta = SafetensorsFile::open(out.join("delta.safetensors")).unwrap();
    let base = Checkpoint::open(root.join("base")).unwrap();
    let theirs = SafetensorsFile::open(root.join("out/ties/model.safetensors")).unwrap();
    for tensor in theirs.names() {
        let mut ours = delta.read_f32(tensor).unwrap();
        ours.iter_mut()
            .zip(base.read_f32(tensor).unwrap())
            .for_each(|(d, b)| *d += b);
        let err = max_relative_error(&ours, &theirs.read_f32(tensor).unwrap());
        assert!(err <= 1e-6, "delta + base: `{tensor}` differs by {err:e}");
    }

    let config = std::fs::read_to_string(root.join("configs/ties.yml")).unwrap();
    let bf16_config = dir.path().join("ties_bf16.yml");
    let config = config.replace("model: ", &format!("model: {}/", root.display()));
    let config = config.replace(
        "base_model: base",
        &format!("base_model: {}/base", root.display()),
    );
    std::fs::write(&bf16_config, format!("{config}out_dtype: bfloat16\n")).unwrap();
    let out = dir.path().join("bf16");
    run_merge(dir.path(), &bf16_config, &out, &[]);
    let ours = SafetensorsFile::open(out.join("model.safetensors")).unwrap();
    for tensor in theirs.names() {
        assert_eq!(ours.info(tensor).unwrap().dtype, mmx::tensor::Dtype::BF16);
        let expected =
            mmx::tensor::from_f32(mmx::tensor::Dtype::BF16, &theirs.read_f32(tensor).unwrap())
                .unwrap();
        assert_eq!(ours.bytes(tensor).unwrap(), expected, "`{tensor}` in bf16");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let dtype_key = if config.get("dtype").is_some() {
        "dtype"
    } else {
        "torch_dtype"
    };
    assert_eq!(config[dtype_key], "bfloat16");
}
