//! `mmx train dsa` on image cases with a LLaVA base (the tiny random LLaVA of
//! scripts/make_vlm_fixtures.py): the fused engine and candle's autograd train alike, the
//! image tokens take the image (the loss moves with it) and never enter the loss, and the
//! adapter is PEFT's for a LLaVA model.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mmx::tensor::SafetensorsFile;
use mmx::train::model::Llava;

mod common;
use common::{assert_ok, copy_tiny_llava, max_relative_error, mmx_with_env};

const FIXTURES: &str = "tests/fixtures/vlm";

/// A copy of tests/fixtures/vlm/train (the recipe, its cases and tokenizer) in `train/`, the
/// fixture LLaVA with that tokenizer in `train/llava/`, and the cases' images beside `train/`.
fn work() -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    let (fixtures, train) = (Path::new(FIXTURES), work.path().join("train"));
    std::fs::create_dir_all(&train).unwrap();
    for file in ["dsa.toml", "cases.jsonl", "tokenizer.json"] {
        std::fs::copy(fixtures.join("train").join(file), train.join(file)).unwrap();
    }
    copy_tiny_llava(&train.join("llava"), work.path());
    work
}

/// Trains tests/fixtures/vlm/train/dsa.toml into `train/<out>` with `engine`.
fn train(dir: &Path, out: &str, engine: &str) {
    train_recipe(dir, "dsa.toml", out, engine, false);
}

/// Trains tests/fixtures/vlm/train/`recipe` into `train/<out>` with `engine`.
fn train_recipe(dir: &Path, recipe: &str, out: &str, engine: &str, resume: bool) {
    let mut args = vec!["train", "dsa", recipe, "-o", out, "--quiet"];
    if resume {
        args.push("--resume");
    }
    assert_ok(&mmx_with_env(
        &args,
        &dir.join("train"),
        &[("MMX_TRAIN_ENGINE", Some(engine))],
    ));
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn factors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let file = mmx::tensor::SafetensorsFile::open(dir.join("adapter_model.safetensors")).unwrap();
    let mut names: Vec<String> = file.names().map(str::to_string).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let v = file.read_f32(&n).unwrap();
            (n, v)
        })
        .collect()
}

#[test]
fn the_fused_engine_and_candle_train_image_cases_alike() {
    let work = work();
    let dir = work.path();
    let train_dir = dir.join("train");
    train(dir, "fused", "fused");
    train(dir, "candle", "candle");
    let (fused, candle) = (
        losses(&train_dir.join("fused")),
        losses(&train_dir.join("candle")),
    );
    assert_eq!(fused.len(), 4);
    for (f, c) in fused.iter().zip(&candle) {
        assert!(
            (f - c).abs() < 1e-4 * c.abs(),
            "loss {f} (fused) against {c} (candle)"
        );
    }
    assert!(fused[3] < fused[0], "the loss falls: {fused:?}");
    let (a, b) = (
        factors(&train_dir.join("fused")),
        factors(&train_dir.join("candle")),
    );
    // A and B of three modules in two layers.
    assert_eq!(a.len(), 12);
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let err = max_relative_error(x, y);
        assert!(err < 1e-3, "`{name}`: fused and candle differ by {err:e}");
    }
    // PEFT's names for LLaVA's language model, and a target regex that leaves the vision
    // tower's q_proj and v_proj alone.
    assert!(a
        .iter()
        .all(|(n, _)| n.starts_with("base_model.model.model.language_model.layers.")));
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(train_dir.join("fused/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let targets = config["target_modules"].as_str().unwrap();
    let re = regex::Regex::new(&format!("^(?:{targets})$")).unwrap();
    assert!(re.is_match("model.language_model.layers.1.self_attn.q_proj"));
    assert!(re.is_match("model.language_model.layers.0.mlp.down_proj"));
    assert!(!re.is_match("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"));
    assert!(!re.is_match("model.language_model.layers.0.self_attn.k_proj"));
}

#[test]
fn the_image_decides_the_loss() {
    let work = work();
    let dir = work.path();
    let train_dir = dir.join("train");
    train(dir, "seen", "auto");
    // The same cases with blank images: the first step's loss (before any update) moves.
    let blank = image::RgbImage::new(16, 16);
    blank.save(dir.join("square.png")).unwrap();
    blank.save(dir.join("wide.png")).unwrap();
    train(dir, "blank", "auto");
    let (seen, blank) = (
        losses(&train_dir.join("seen")),
        losses(&train_dir.join("blank")),
    );
    assert!(
        (seen[0] - blank[0]).abs() > 1e-4,
        "{seen:?} against {blank:?}"
    );
}

#[test]
fn peft_reads_the_adapters_as_mmx_does() {
    // The adapters these recipes train are the committed ones (up to the rounding of another
    // machine), and PEFT on transformers' LLaVA gives them mmx's logits
    // (scripts/make_vlm_trained_fixture.sh): a LoRA (the fused engine), and a LoRA with the
    // projector as `modules_to_save` (candle's autograd).
    let work = work();
    let train_dir = work.path().join("train");
    std::fs::copy(
        Path::new(FIXTURES).join("train/dsa-projector.toml"),
        train_dir.join("dsa-projector.toml"),
    )
    .unwrap();
    let inputs =
        SafetensorsFile::open(Path::new(FIXTURES).join("tiny-llava-logits.safetensors")).unwrap();
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
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (recipe, name) in [
        ("dsa.toml", "trained-lora"),
        ("dsa-projector.toml", "trained-projector"),
    ] {
        train_recipe(work.path(), recipe, name, "auto", false);
        let committed = Path::new(FIXTURES).join(name);
        let (ours, theirs) = (factors(&train_dir.join(name)), factors(&committed));
        assert_eq!(
            ours.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            theirs.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
        for ((tensor, ours), (_, theirs)) in ours.iter().zip(&theirs) {
            let err = max_relative_error(ours, theirs);
            assert!(
                err < 1e-4,
                "{name}: `{tensor}` differs from the committed one by {err:e}"
            );
        }
        let mut model = Llava::load(
            &Path::new(FIXTURES).join("tiny-llava"),
            None,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        model.load_adapter(&committed).unwrap();
        let peft =
            SafetensorsFile::open(Path::new(FIXTURES).join(format!("{name}-logits.safetensors")))
                .unwrap();
        let logits = model
            .forward(
                &tensor("input_ids", DType::I64),
                Some(&tensor("pixel_values", DType::F32)),
            )
            .unwrap();
        let err = max_relative_error(&flat(&logits), &peft.read_f32("logits").unwrap());
        println!("{name}: image+text logits against PEFT: {err:.1e}");
        assert!(
            err < 1e-4,
            "{name}: image+text logits differ from PEFT's by {err:e}"
        );
        let text = model
            .forward(&tensor("text_ids", DType::I64), None)
            .unwrap();
        let err = max_relative_error(&flat(&text), &peft.read_f32("text_logits").unwrap());
        println!("{name}: text-only logits against PEFT: {err:.1e}");
        assert!(
            err < 1e-4,
            "{name}: text-only logits differ from PEFT's by {err:e}"
        );
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(train_dir.join("trained-projector/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["modules_to_save"],
        serde_json::json!(["multi_modal_projector"])
    );
}

#[test]
fn a_trained_projector_is_candles_and_resumes() {
    let work = work();
    let dir = work.path();
    let train_dir = dir.join("train");
    std::fs::copy(
        Path::new(FIXTURES).join("train/dsa-projector.toml"),
        train_dir.join("dsa-projector.toml"),
    )
    .unwrap();
    let out = mmx_with_env(
        &[
            "train",
            "dsa",
            "dsa-projector.toml",
            "-o",
            "fused",
            "--quiet",
        ],
        &train_dir,
        &[("MMX_TRAIN_ENGINE", Some("fused"))],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not train the projector"));
    train_recipe(dir, "dsa-projector.toml", "out", "auto", false);
    let whole = factors(&train_dir.join("out"));
    let projector: Vec<&(String, Vec<f32>)> = whole
        .iter()
        .filter(|(n, _)| n.contains("multi_modal_projector"))
        .collect();
    assert_eq!(projector.len(), 4, "both layers' weights and biases");
    // Resumed from its step-2 checkpoint (projector and moments), the run ends where it did.
    assert!(train_dir.join("out/checkpoints/step-000002").is_dir());
    train_recipe(dir, "dsa-projector.toml", "out", "auto", true);
    for ((name, a), (_, b)) in whole.iter().zip(factors(&train_dir.join("out"))) {
        let err = max_relative_error(a, &b);
        assert!(err < 1e-6, "`{name}` after resuming differs by {err:e}");
    }
    // A text-only base has no projector to train.
    let recipe = std::fs::read_to_string(train_dir.join("dsa-projector.toml")).unwrap();
    std::fs::write(
        train_dir.join("text.toml"),
        recipe.replace("base = \"llava\"", "base = \"text\""),
    )
    .unwrap();
    std::fs::create_dir_all(train_dir.join("text")).unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(train_dir.join("llava/config.json")).unwrap(),
    )
    .unwrap();
    std::fs::write(
        train_dir.join("text/config.json"),
        config["text_config"].to_string(),
    )
    .unwrap();
    std::fs::copy(
        train_dir.join("tokenizer.json"),
        train_dir.join("text/tokenizer.json"),
    )
    .unwrap();
    let out = common::mmx(
        &["train", "dsa", "text.toml", "-o", "t", "--quiet"],
        &train_dir,
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert!(
        err.contains("trains a LLaVA model's projector") || err.contains("text"),
        "{err}"
    );
}

#[test]
fn bad_image_cases_are_refused_before_training() {
    let work = work();
    let train_dir = work.path().join("train");
    let cases = std::fs::read_to_string(train_dir.join("cases.jsonl")).unwrap();
    let refused = |cases: String, wanted: &[&str]| {
        std::fs::write(train_dir.join("cases.jsonl"), cases).unwrap();
        let out = common::mmx(
            &["train", "dsa", "dsa.toml", "-o", "out", "--quiet"],
            &train_dir,
        );
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success());
        for w in wanted {
            assert!(err.contains(w), "`{w}` not in: {err}");
        }
        assert!(!train_dir.join("out/adapter_model.safetensors").exists());
    };
    refused(
        cases.replace("../wide.png", "../gone.png"),
        &["case `c1`", "gone.png", "does not exist"],
    );
    // Features of 15 tokens where the model's images have 16.
    let features = Tensor::zeros((15, 32), DType::F32, &Device::Cpu).unwrap();
    Llava::write_image_embeds(&train_dir.join("c1.safetensors"), &features).unwrap();
    refused(
        cases.replace(
            r#""image": "../wide.png""#,
            r#""image": "../wide.png", "image_embeds": "c1.safetensors""#,
        ),
        &["case `c1`", "c1.safetensors", "[16, 32]", "[15, 32]"],
    );
}

#[test]
fn eval_scores_image_cases_and_records_what_was_shown() {
    let work = work();
    let train_dir = work.path().join("train");
    train(work.path(), "out", "auto");
    let samples = |blank: bool| -> Vec<serde_json::Value> {
        let mut args = vec![
            "eval",
            "llava",
            "--adapter",
            "out",
            "--data",
            "cases.jsonl",
            "--json",
            "--samples",
            "s.jsonl",
            "--max-new-tokens",
            "12",
        ];
        if blank {
            args.push("--blank-images");
        }
        let out = common::mmx(&args, &train_dir);
        assert_ok(&out);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["n"]["cardiology"], 6);
        std::fs::read_to_string(train_dir.join("s.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (seen, blank) = (samples(false), samples(true));
    let shown: Vec<Option<&str>> = seen.iter().map(|s| s["image"].as_str()).collect();
    assert_eq!(
        shown,
        [
            Some("../square.png"),
            Some("../wide.png"),
            None,
            Some("../wide.png"),
            Some("../square.png"),
            None
        ]
    );
    let shown: Vec<Option<&str>> = blank.iter().map(|s| s["image"].as_str()).collect();
    assert_eq!(
        shown,
        [
            Some("blank"),
            Some("blank"),
            None,
            Some("blank"),
            Some("blank"),
            None
        ]
    );
    // A text-only case is the same prompt either way, so the same answer.
    assert_eq!(seen[2]["output"], blank[2]["output"]);
}

const TEXT_BASE: &str = r#"[train]
method = "base"
seed = 3
max_steps = 4
batch_size = 8

[train.init]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
intermediate_size = 64
max_position_embeddings = 256

[train.data]
synthetic = { seed = 0, train = 8 }

[train.optim]
lr = 3e-3
"#;

const VISION_BASE: &str = r#"[train]
method = "base"
base = "text"
seed = 4
epochs = 2
batch_size = 8

[train.vision]
image_size = 32
patch_size = 8
hidden_size = 16
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 32

[train.data]
files = ["data/cardiology/train.jsonl", "data/radiology/train.jsonl"]

[train.optim]
lr = 1e-2
"#;

const IMAGE_EXPERT: &str = r#"[train]
method = "dsa"
base = "vlm"
seed = 5
epochs = 2
batch_size = 4

[train.data]
files = ["data/cardiology/train.jsonl"]

[train.lora]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj"]
modules_to_save = ["multi_modal_projector"]

[train.optim]
lr = 5e-3
"#;

#[test]
fn a_text_base_becomes_a_llava_whose_projector_learns_the_images() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let run = |args: &[&str]| assert_ok(&common::mmx(args, dir));
    std::fs::write(dir.join("text.toml"), TEXT_BASE).unwrap();
    run(&["train", "base", "text.toml", "-o", "text", "--quiet"]);
    run(&[
        "data",
        "generate",
        "-o",
        "data",
        "--images",
        "--train",
        "8",
        "--validation",
        "2",
        "--test",
        "4",
    ]);
    assert!(dir
        .join("data/cardiology/images/cardiology-train-000000.png")
        .is_file());
    let readme = std::fs::read_to_string(dir.join("data/README.md")).unwrap();
    assert!(readme.contains("synthetic cartoons"), "{readme}");
    std::fs::write(dir.join("vlm.toml"), VISION_BASE).unwrap();
    run(&["train", "base", "vlm.toml", "-o", "vlm", "--quiet"]);

    // A LLaVA model: the text model's weights under LLaVA's names, a tower drawn from the
    // seed (what the builder alone draws), a projector that training moved.
    let model = Llava::load(&dir.join("vlm"), None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.config().image_tokens(), 16);
    let tokenizer = mmx::train::tokenizer::Tokenizer::load(&dir.join("vlm")).unwrap();
    assert_eq!(
        tokenizer.encode("<image>", false).unwrap(),
        [model.config().image_token_index]
    );
    let open = |p: &str| SafetensorsFile::open(dir.join(p)).unwrap();
    let (text, vlm) = (
        open("text/model.safetensors"),
        open("vlm/model.safetensors"),
    );
    assert_eq!(
        text.read_f32("model.layers.1.mlp.down_proj.weight")
            .unwrap(),
        vlm.read_f32("language_model.model.layers.1.mlp.down_proj.weight")
            .unwrap()
    );
    let fresh = dir.join("fresh");
    let spec = mmx::train::vlm_init::VisionInit {
        image_size: 32,
        patch_size: 8,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 32,
    };
    mmx::train::vlm_init::init_llava(&dir.join("text"), &fresh, &spec, 4).unwrap();
    let fresh = SafetensorsFile::open(fresh.join("model.safetensors")).unwrap();
    let tower = "vision_tower.encoder.layers.0.self_attn.q_proj.weight";
    assert_eq!(fresh.read_f32(tower).unwrap(), vlm.read_f32(tower).unwrap());
    let projector = "multi_modal_projector.linear_1.weight";
    assert!(
        max_relative_error(
            &vlm.read_f32(projector).unwrap(),
            &fresh.read_f32(projector).unwrap()
        ) > 1e-3
    );
    let steps = std::fs::read_to_string(dir.join("vlm/metrics.jsonl")).unwrap();
    let loss = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line).unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    let lines: Vec<&str> = steps.lines().collect();
    assert!(loss(lines[lines.len() - 1]) < loss(lines[0]), "{steps}");

    // An image expert on it, evaluated with its images.
    std::fs::write(dir.join("card.toml"), IMAGE_EXPERT).unwrap();
    run(&["train", "dsa", "card.toml", "-o", "card", "--quiet"]);
    let out = common::mmx(
        &[
            "eval",
            "vlm",
            "--adapter",
            "card",
            "--data",
            "data/cardiology/test.jsonl",
            "--json",
            "--samples",
            "s.jsonl",
        ],
        dir,
    );
    assert_ok(&out);
    let samples = std::fs::read_to_string(dir.join("s.jsonl")).unwrap();
    assert!(
        samples.contains("\"image\":\"images/cardiology-test-000000.png\""),
        "{samples}"
    );

    // A vision tower needs a base to extend.
    std::fs::write(
        dir.join("bad.toml"),
        VISION_BASE.replace("base = \"text\"\n", ""),
    )
    .unwrap();
    let out = common::mmx(&["train", "base", "bad.toml", "-o", "bad", "--quiet"], dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("starts from either `base` or `[train.init]`"),
        "{err}"
    );
}
