//! Merging LLaVA experts (the tiny random LLaVA of scripts/make_vlm_fixtures.py and the two
//! adapters scripts/make_vlm_trained_fixture.sh trains on it: LoRA only, and LoRA with the
//! projector as `modules_to_save`): full-model merges, adapter-to-adapter merges that carry the
//! projector, mergekit-style merges of whole LLaVA checkpoints, conflicts over the projector,
//! and the registry storing the shared vision tower once.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mmx::tensor::SafetensorsFile;
use mmx::train::model::Llava;

mod common;
use common::{assert_ok, max_relative_error, mmx, mmx_with_env};

const FIXTURES: &str = "tests/fixtures/vlm";

fn fixture(name: &str) -> PathBuf {
    std::fs::canonicalize(FIXTURES).unwrap().join(name)
}

/// The logits of `model` on the fixture prompt (an image and text), flattened.
fn logits(model: &Llava) -> Vec<f32> {
    prompt_logits(model, true)
}

/// The logits of `model` on the fixture's image + text prompt (`image`) or its text-only one.
fn prompt_logits(model: &Llava, image: bool) -> Vec<f32> {
    let inputs = SafetensorsFile::open(fixture("tiny-llava-logits.safetensors")).unwrap();
    let tensor = |name: &str, dtype: DType| {
        let info = inputs.info(name).unwrap();
        Tensor::from_raw_buffer(
            inputs.bytes(name).unwrap(),
            dtype,
            &info.shape,
            &Device::Cpu,
        )
        .unwrap()
    };
    let out = if image {
        let pixels = tensor("pixel_values", DType::F32);
        model.forward(&tensor("input_ids", DType::I64), Some(&pixels))
    } else {
        model.forward(&tensor("text_ids", DType::I64), None)
    };
    out.unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// A committed f32 tensor, flattened.
fn committed(file: &str, name: &str) -> Vec<f32> {
    SafetensorsFile::open(fixture(file))
        .unwrap()
        .read_f32(name)
        .unwrap()
}

fn load(dir: &Path, adapter: Option<&Path>) -> Llava {
    let mut model = Llava::load(dir, None, DType::F32, &Device::Cpu).unwrap();
    if let Some(adapter) = adapter {
        model.load_adapter(adapter).unwrap();
    }
    model
}

/// A merge recipe of the fixture LLaVA and `experts` (source, weight), with `settings` lines.
fn recipe(method: &str, settings: &str, experts: &[(PathBuf, f64)]) -> String {
    let mut text = format!(
        "[merge]\nmethod = \"{method}\"\nbase = \"{}\"\n{settings}\n",
        fixture("tiny-llava").display()
    );
    for (source, weight) in experts {
        text.push_str(&format!(
            "\n[[merge.experts]]\nsource = \"{}\"\nweight = {weight}\n",
            source.display()
        ));
    }
    text
}

fn merge(work: &Path, name: &str, recipe: &str) -> PathBuf {
    std::fs::write(work.join(format!("{name}.toml")), recipe).unwrap();
    assert_ok(&mmx(&["merge", &format!("{name}.toml"), "-o", name], work));
    work.join(name)
}

fn assert_close(ours: &[f32], theirs: &[f32], tolerance: f64, what: &str) {
    let err = max_relative_error(ours, theirs);
    assert!(err < tolerance, "{what}: logits differ by {err:e}");
}

#[test]
fn a_llava_adapter_merges_into_the_checkpoint_it_was_trained_on() {
    // PEFT names LLaVA's tensors as transformers holds them (`model.language_model.…`,
    // `model.multi_modal_projector.…`); the checkpoint saves `language_model.model.…`. A
    // one-expert linear merge of the LoRA + projector adapter into the full model is the
    // adapter applied: the merged checkpoint's logits are those of the base with the adapter.
    let work = tempfile::tempdir().unwrap();
    let merged = merge(
        work.path(),
        "merged",
        &recipe(
            "linear",
            "output = \"full\"",
            &[(fixture("trained-projector"), 1.0)],
        ),
    );
    assert!(merged.join("preprocessor_config.json").is_file());
    let adapted = load(&fixture("tiny-llava"), Some(&fixture("trained-projector")));
    assert_close(
        &logits(&load(&merged, None)),
        &logits(&adapted),
        1e-5,
        "merged against applied",
    );
}

#[test]
fn adapter_to_adapter_merges_carry_the_projector_and_equal_the_full_merge() {
    // Two experts, one with a trained projector (`modules_to_save`) and one without, weighted
    // 0.7 and 0.5. `cat`, and task arithmetic in core space at the exact rank (4 + 4), give a
    // LoRA adapter whose factors make the weighted sum of the updates and whose projector is
    // B + 0.5·(P − B) (only the expert that stores it takes part); applied to the base, it is
    // the full-space task-arithmetic merge of the same experts.
    let work = tempfile::tempdir().unwrap();
    let experts = [
        (fixture("trained-lora"), 0.7),
        (fixture("trained-projector"), 0.5),
    ];
    let full = merge(
        work.path(),
        "full",
        &recipe("task_arithmetic", "output = \"full\"", &experts),
    );
    let expected = logits(&load(&full, None));
    let base_logits = logits(&load(&fixture("tiny-llava"), None));
    assert!(max_relative_error(&expected, &base_logits) > 1e-3);
    for (name, method, settings) in [
        ("cat", "cat", "output = \"lora\""),
        (
            "core",
            "task_arithmetic",
            "output = \"lora\"\nspace = \"core\"\nrank = 8",
        ),
    ] {
        let merged = merge(work.path(), name, &recipe(method, settings, &experts));
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(merged.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            config["modules_to_save"],
            serde_json::json!(["multi_modal_projector"])
        );
        // The experts' regex over the language model, so that PEFT leaves the CLIP tower's
        // `q_proj`/`v_proj` alone.
        let targets = config["target_modules"].as_str().unwrap();
        assert!(
            targets.starts_with("model\\.language_model\\."),
            "{targets}"
        );
        let file = SafetensorsFile::open(merged.join("adapter_model.safetensors")).unwrap();
        let key = "base_model.model.model.multi_modal_projector.linear_1.weight";
        let projector = file.read_f32(key).unwrap();
        let base = SafetensorsFile::open(fixture("tiny-llava/model.safetensors")).unwrap();
        let base_projector = base
            .read_f32("multi_modal_projector.linear_1.weight")
            .unwrap();
        let trained = SafetensorsFile::open(fixture("trained-projector/adapter_model.safetensors"))
            .unwrap()
            .read_f32(key)
            .unwrap();
        let by_hand: Vec<f32> = base_projector
            .iter()
            .zip(&trained)
            .map(|(b, p)| b + 0.5 * (p - b))
            .collect();
        assert!(max_relative_error(&projector, &by_hand) < 1e-6);
        assert!(file.names().any(|n| n
            == "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"));
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(merged.join("mmx-merge.json")).unwrap())
                .unwrap();
        assert_eq!(record["modules_to_save"].as_array().unwrap().len(), 4);
        let applied = load(&fixture("tiny-llava"), Some(&merged));
        assert_close(&logits(&applied), &expected, 1e-5, name);
        if name == "cat" {
            // The merge scripts/make_vlm_merged_fixture.sh made, read by PEFT on transformers'
            // LLaVA: the same tensors, and PEFT's logits are mmx's.
            let ours = SafetensorsFile::open(merged.join("adapter_model.safetensors")).unwrap();
            for key in ours.names() {
                let theirs = committed("merged-cat/adapter_model.safetensors", key);
                assert!(max_relative_error(&ours.read_f32(key).unwrap(), &theirs) < 1e-6);
            }
            for (image, key) in [(true, "logits"), (false, "text_logits")] {
                let peft = committed("merged-cat-logits.safetensors", key);
                assert_close(&prompt_logits(&applied, image), &peft, 1e-4, key);
            }
        }
    }
}

#[test]
fn a_projector_stored_whole_and_adapted_with_lora_cannot_share_one_adapter() {
    // An expert that adapts the projector's first layer with LoRA factors beside one that stores
    // it whole: refused, naming both.
    let work = tempfile::tempdir().unwrap();
    let lora_projector = work.path().join("lora-projector");
    std::fs::create_dir_all(&lora_projector).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("trained-lora/adapter_config.json")).unwrap(),
    )
    .unwrap();
    config["target_modules"] = serde_json::json!("model\\.multi_modal_projector\\.linear_1");
    std::fs::write(
        lora_projector.join("adapter_config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    let base = SafetensorsFile::open(fixture("tiny-llava/model.safetensors")).unwrap();
    let shape = base
        .info("multi_modal_projector.linear_1.weight")
        .unwrap()
        .shape
        .clone();
    let (rows, cols) = (shape[0], shape[1]);
    let f32_bytes = |n: usize| vec![0u8; 4 * n];
    let module = "base_model.model.model.multi_modal_projector.linear_1";
    mmx::tensor::write_safetensors(
        &lora_projector.join("adapter_model.safetensors"),
        &[
            (
                mmx::tensor::TensorSpec {
                    name: format!("{module}.lora_A.weight"),
                    dtype: mmx::tensor::Dtype::F32,
                    shape: vec![4, cols],
                },
                f32_bytes(4 * cols),
            ),
            (
                mmx::tensor::TensorSpec {
                    name: format!("{module}.lora_B.weight"),
                    dtype: mmx::tensor::Dtype::F32,
                    shape: vec![rows, 4],
                },
                f32_bytes(rows * 4),
            ),
        ],
        &Default::default(),
    )
    .unwrap();
    let text = recipe(
        "cat",
        "output = \"lora\"",
        &[(lora_projector, 1.0), (fixture("trained-projector"), 1.0)],
    );
    std::fs::write(work.path().join("bad.toml"), text).unwrap();
    let out = mmx(&["merge", "bad.toml", "-o", "out"], work.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("multi_modal_projector.linear_1.weight") && err.contains("lora-projector"),
        "{err}"
    );
    assert!(!work.path().join("out").exists());
}

#[test]
fn mergekit_style_merges_of_whole_llava_checkpoints() {
    // Two LLaVA checkpoints (the base and the base with the projector expert merged in) merged
    // by a mergekit YAML config, linear 0.25 / 0.75: every tensor is that mix of the two, the
    // tower (the same in both) unchanged, and the result a LLaVA that loads and runs.
    let work = tempfile::tempdir().unwrap();
    let tuned = merge(
        work.path(),
        "tuned",
        &recipe(
            "linear",
            "output = \"full\"",
            &[(fixture("trained-projector"), 1.0)],
        ),
    );
    let yaml = format!(
        "models:\n  - model: {}\n    parameters:\n      weight: 0.25\n  - model: {}\n    parameters:\n      weight: 0.75\nmerge_method: linear\ndtype: float32\n",
        fixture("tiny-llava").display(),
        tuned.display()
    );
    std::fs::write(work.path().join("mix.yaml"), yaml).unwrap();
    assert_ok(&mmx(&["merge", "mix.yaml", "-o", "mix"], work.path()));
    let open = |dir: &Path| SafetensorsFile::open(dir.join("model.safetensors")).unwrap();
    let (a, b, mix) = (
        open(&fixture("tiny-llava")),
        open(&tuned),
        open(&work.path().join("mix")),
    );
    let mut towers = 0;
    for name in a.names() {
        let (x, y, m) = (
            a.read_f32(name).unwrap(),
            b.read_f32(name).unwrap(),
            mix.read_f32(name).unwrap(),
        );
        let by_hand: Vec<f32> = x.iter().zip(&y).map(|(x, y)| 0.25 * x + 0.75 * y).collect();
        assert!(max_relative_error(&m, &by_hand) < 1e-6, "{name}");
        if name.starts_with("vision_tower.") {
            assert_eq!(m, x, "{name}");
            towers += 1;
        }
    }
    assert!(towers > 0);
    assert!(work.path().join("mix/preprocessor_config.json").is_file());
    let mixed = logits(&load(&work.path().join("mix"), None));
    assert!(mixed.iter().all(|v| v.is_finite()));
}

#[test]
fn conflicts_cover_the_projector_of_llava_experts() {
    // A LoRA-output recipe of two projector experts: the report measures the projector's two
    // weight matrices beside the language model's modules.
    let work = tempfile::tempdir().unwrap();
    let text = recipe(
        "ties",
        "output = \"lora\"\nspace = \"core\"\n\n[merge.parameters]\ndensity = 0.5",
        &[
            (fixture("trained-projector"), 1.0),
            (fixture("trained-lora"), 1.0),
        ],
    );
    std::fs::write(work.path().join("ties.toml"), text).unwrap();
    assert_ok(&mmx(
        &["conflicts", "ties.toml", "--json", "report.json"],
        work.path(),
    ));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.path().join("report.json")).unwrap())
            .unwrap();
    let modules: Vec<&str> = report["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["module"].as_str().unwrap())
        .collect();
    for name in [
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.weight",
        "language_model.model.layers.0.self_attn.q_proj.weight",
    ] {
        assert!(modules.contains(&name), "{name} not in {modules:?}");
    }
}

#[test]
fn the_registry_stores_the_shared_vision_tower_once() {
    // The base LLaVA published, then a full merge of an expert into it: the merged model's
    // unchanged tensors (the whole vision tower among them) are the base's blobs, not written
    // again; the LoRA expert itself stores no tower at all.
    let work = tempfile::tempdir().unwrap();
    let registry = work.path().join("registry");
    let registry_arg = registry.display().to_string();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--registry", &registry_arg]);
        let out = mmx_with_env(&all, work.path(), &[("MMX_REGISTRY", None)]);
        assert_ok(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let base_dir = fixture("tiny-llava").display().to_string();
    run(&["publish", &base_dir, "tiny-llava:v1", "--kind", "base"]);
    let merged = merge(
        work.path(),
        "merged",
        &recipe(
            "linear",
            "output = \"full\"",
            &[(fixture("trained-lora"), 1.0)],
        ),
    );
    let published = run(&[
        "publish",
        &merged.display().to_string(),
        "merged:v1",
        "--base",
        "tiny-llava:v1",
    ]);
    // "published … (merged): N blobs, M written (…)"
    let counts: Vec<usize> = published
        .split(": ")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(2)
        .map(|s| s.parse().unwrap())
        .collect();
    let (blobs, written) = (counts[0], counts[1]);
    let (base, ours) = (
        SafetensorsFile::open(fixture("tiny-llava/model.safetensors")).unwrap(),
        SafetensorsFile::open(merged.join("model.safetensors")).unwrap(),
    );
    let unchanged: Vec<&str> = ours
        .names()
        .filter(|n| base.bytes(n).unwrap() == ours.bytes(n).unwrap())
        .collect();
    assert!(
        unchanged
            .iter()
            .filter(|n| n.starts_with("vision_tower."))
            .count()
            == base
                .names()
                .filter(|n| n.starts_with("vision_tower."))
                .count()
    );
    assert!(
        written + unchanged.len() <= blobs,
        "{written} of {blobs} blobs written with {} tensors unchanged:\n{published}",
        unchanged.len()
    );
    run(&["verify"]);
}
