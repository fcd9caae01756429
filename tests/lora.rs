//! LoRA-native merging: `cat` writes one adapter whose update is exactly the weighted sum of
//! the experts' updates, in PEFT's format.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mmx::adapter::Adapter;
use mmx::tensor::SafetensorsFile;

fn reference(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference")
        .join(name)
}

/// Writes a `cat` recipe over lora_a (weight 0.8) and lora_b (0.5) and runs it.
fn cat(dir: &Path, output: &str, extra: &str) -> Output {
    let recipe = dir.join("cat.toml");
    std::fs::write(
        &recipe,
        format!(
            "[merge]\nmethod = 'cat'\nbase = '{}'\noutput = '{output}'\n{extra}\n\
             [[merge.experts]]\nsource = '{}'\nweight = 0.8\n\
             [[merge.experts]]\nsource = '{}'\nweight = 0.5\n",
            reference("base").display(),
            reference("lora_a").display(),
            reference("lora_b").display(),
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_mmx"))
        .args(["merge", recipe.to_str().unwrap(), "-o"])
        .arg(dir.join("out"))
        .output()
        .unwrap()
}

fn max_relative_error(ours: &[f32], theirs: &[f32]) -> f64 {
    let scale = theirs.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let worst = ours
        .iter()
        .zip(theirs)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    worst / scale.max(f64::MIN_POSITIVE)
}

#[test]
fn cat_is_the_exact_weighted_sum_of_the_updates() {
    let dir = tempfile::tempdir().unwrap();
    let out = cat(dir.path(), "lora", "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
        ("lora_embed", "cannot merge"),
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
