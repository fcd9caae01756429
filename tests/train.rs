//! `mmx train base|dsa` and `mmx eval` end to end on a model small enough for CI: a base drawn
//! from a seed and trained on the cases' format, a specialty LoRA on it, resume from a
//! checkpoint giving the same adapter as an uninterrupted run, and bad inputs refused before
//! any training.

use std::path::Path;

mod common;

use common::{assert_ok, mmx};

const BASE: &str = r#"[train]
method = "base"
seed = 3
epochs = 1
batch_size = 8
max_steps = 6

[train.init]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
intermediate_size = 64
max_position_embeddings = 256

[train.data]
synthetic = { seed = 0, train = 12 }
completion = "format"

[train.optim]
lr = 3e-3
"#;

fn dsa(target: &str) -> String {
    format!(
        r#"[train]
method = "dsa"
base = "base"
specialty = "cardiology"
seed = 5
epochs = 2
batch_size = 4
checkpoint_every = 2

[train.data]
synthetic = {{ seed = 0, train = 8, test = 4 }}
specialties = ["cardiology"]

[train.lora]
r = 4
alpha = 8
target_modules = ["{target}", "v_proj"]

[train.optim]
lr = 5e-3
warmup_steps = 1
"#
    )
}

/// The metrics log: one JSON object per optimizer step.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn base_then_dsa_then_resume_then_eval() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::write(dir.join("base.toml"), BASE).unwrap();
    assert_ok(&mmx(
        &["train", "base", "base.toml", "-o", "base", "--quiet"],
        dir,
    ));
    let steps = metrics(&dir.join("base"));
    assert_eq!(steps.len(), 6);
    let loss = |m: &serde_json::Value| m["loss"].as_f64().unwrap();
    assert!(loss(&steps[5]) < loss(&steps[0]), "the base's loss falls");
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(dir.join("base").join(file).is_file(), "{file}");
    }
    // The same recipe draws the same base.
    assert_ok(&mmx(
        &["train", "base", "base.toml", "-o", "base-again", "--quiet"],
        dir,
    ));
    let weights = |d: &str| std::fs::read(dir.join(d).join("model.safetensors")).unwrap();
    assert_eq!(weights("base"), weights("base-again"));

    std::fs::write(dir.join("dsa.toml"), dsa("q_proj")).unwrap();
    assert_ok(&mmx(
        &["train", "dsa", "dsa.toml", "-o", "card", "--quiet"],
        dir,
    ));
    let steps = metrics(&dir.join("card"));
    assert_eq!(steps.len(), 4, "2 epochs of 2 batches");
    assert!(
        loss(&steps[3]) < loss(&steps[0]),
        "the adapter's loss falls"
    );
    let adapter = mmx::adapter::Adapter::open(dir.join("card")).unwrap();
    assert_eq!(adapter.modules().len(), 4, "q and v of two layers");
    assert!(dir.join("card/checkpoints/step-000002").is_dir());

    // Resume: from the step-2 checkpoint the last two steps give the same adapter.
    let resumed = dir.join("resumed");
    std::fs::create_dir_all(resumed.join("checkpoints")).unwrap();
    copy_dir(
        &dir.join("card/checkpoints/step-000002"),
        &resumed.join("checkpoints/step-000002"),
    );
    let out = mmx(
        &["train", "dsa", "dsa.toml", "-o", "resumed", "--resume"],
        dir,
    );
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("resumed from step 2"));
    let factors = |d: &str| std::fs::read(dir.join(d).join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        factors("card"),
        factors("resumed"),
        "resume gives the same adapter"
    );
    // A changed recipe does not resume another's checkpoint.
    std::fs::write(
        dir.join("dsa.toml"),
        dsa("q_proj").replace("lr = 5e-3", "lr = 4e-3"),
    )
    .unwrap();
    let out = mmx(
        &["train", "dsa", "dsa.toml", "-o", "resumed", "--resume"],
        dir,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another recipe"));

    // Eval: JSON with accuracy and counts per specialty.
    let test = dir.join("test.jsonl");
    let cases = mmx::train::synth::generate(&mmx::train::synth::SynthSpec {
        seed: 0,
        per_specialty: 8,
        validation: 0,
        test: 4,
        shuffle_options: false,
        guidelines: false,
        answer_only: 0,
    })
    .unwrap()
    .test;
    mmx::train::write_cases(&test, &cases).unwrap();
    let out = mmx(
        &[
            "eval",
            "base",
            "--adapter",
            "card",
            "--data",
            "test.jsonl",
            "--json",
            "--samples",
            "samples.jsonl",
        ],
        dir,
    );
    assert_ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Every case's answer, in the cases' order, each right where its letter is the case's.
    let samples: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = samples.iter().map(|s| s["id"].as_str().unwrap()).collect();
    let case_ids: Vec<&str> = cases.iter().map(|c| c.id()).collect();
    assert_eq!(ids, case_ids);
    for s in &samples {
        let expected = cases
            .iter()
            .find(|c| c.id() == s["id"])
            .unwrap()
            .answer_letter();
        assert_eq!(s["expected"], expected.to_string());
        let read = mmx::train::parse_answer(s["output"].as_str().unwrap());
        assert_eq!(s["answer"], serde_json::json!(read.map(String::from)));
        assert_eq!(s["correct"], read == Some(expected), "{s}");
    }
    for specialty in ["cardiology", "dermatology", "pathology", "radiology"] {
        assert_eq!(report["n"][specialty], 4);
        let a = report["accuracy"][specialty].as_f64().unwrap();
        let right = samples
            .iter()
            .filter(|s| s["specialty"] == specialty && s["correct"] == true)
            .count();
        assert_eq!(a, right as f64 / 4.0, "{specialty}");
    }

    // A sweep scored by task accuracy: each merge of the adapter with itself is evaluated on
    // the base, and its validation score is the mean accuracy `mmx eval` gives.
    std::fs::write(
        dir.join("template.toml"),
        "[merge]\nmethod = \"ties\"\nbase = \"base\"\noutput = \"lora\"\nrank = 4\n[[merge.experts]]\nsource = \"card\"\n[[merge.experts]]\nsource = \"resumed\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("sweep.toml"),
        "[sweep]\nrecipe = \"template.toml\"\nkeep_outputs = true\n[[sweep.methods]]\nmethod = \"ties\"\nparameters = { density = [0.5, 1.0] }\n[sweep.eval]\nbase = \"base\"\nvalidation = [\"test.jsonl\"]\ntest = [\"test.jsonl\"]\n",
    )
    .unwrap();
    assert_ok(&mmx(&["sweep", "sweep.toml", "-o", "sweep"], dir));
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("sweep/results.json")).unwrap()).unwrap();
    let trials = results["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 2);
    for t in trials {
        let merged = dir.join("sweep/outputs").join(t["id"].as_str().unwrap());
        let out = mmx(
            &[
                "eval",
                "base",
                "--adapter",
                merged.to_str().unwrap(),
                "--data",
                "test.jsonl",
                "--json",
            ],
            dir,
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let accuracy = report["accuracy"].as_object().unwrap();
        let mean = accuracy.values().map(|v| v.as_f64().unwrap()).sum::<f64>() / 4.0;
        assert!(
            (t["validation"].as_f64().unwrap() - mean).abs() < 1e-12,
            "{t}"
        );
        assert_eq!(t["validation"], t["test"]);
    }
}

#[test]
fn bad_inputs_are_refused_before_training() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::write(
        dir.join("base.toml"),
        BASE.replace("max_steps = 6", "max_steps = 1"),
    )
    .unwrap();
    assert_ok(&mmx(
        &["train", "base", "base.toml", "-o", "base", "--quiet"],
        dir,
    ));
    let refused = |recipe: &str, out: &str, expected: &str| {
        std::fs::write(dir.join("r.toml"), recipe).unwrap();
        let o = mmx(&["train", "dsa", "r.toml", "-o", out, "--quiet"], dir);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(expected), "{expected}: {err}");
        assert!(!dir.join(out).join("adapter_model.safetensors").exists());
    };
    refused(&dsa("nonexistent_proj"), "a", "nonexistent_proj");
    // A malformed case file: the error names the line.
    std::fs::write(dir.join("cases.jsonl"), "{\"id\": 1}\n").unwrap();
    let files = dsa("q_proj").replace(
        "synthetic = { seed = 0, train = 8, test = 4 }",
        "files = [\"cases.jsonl\"]",
    );
    refused(&files, "b", "line 1");
    // An unsupported architecture.
    let config = dir.join("base/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"llama\"", "\"gpt2\"")).unwrap();
    refused(&dsa("q_proj"), "c", "gpt2");
    std::fs::write(&config, &text).unwrap();
    // A tokenizer with more tokens than the model's vocabulary.
    std::fs::write(
        &config,
        text.replace(
            &format!("\"vocab_size\": {}", vocab(&text)),
            "\"vocab_size\": 8",
        ),
    )
    .unwrap();
    refused(&dsa("q_proj"), "d", "vocab");
    // A base recipe run as dsa.
    let o = mmx(&["train", "dsa", "base.toml", "--quiet"], dir);
    assert!(String::from_utf8_lossy(&o.stderr).contains("mmx train base"));
    // A GPU asked of a build without candle's CUDA backend: the error says how to get one.
    if !cfg!(feature = "cuda") {
        std::fs::write(dir.join("r.toml"), dsa("q_proj")).unwrap();
        let o = mmx(
            &[
                "train", "dsa", "r.toml", "-o", "e", "--quiet", "--device", "cuda",
            ],
            dir,
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains("--device cuda") && err.contains("--features cuda"),
            "{err}"
        );
        assert!(!dir.join("e").exists(), "nothing written");
    }
}

fn vocab(config: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(config).unwrap();
    v["vocab_size"].as_u64().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}
