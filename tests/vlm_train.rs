//! `mmx train dsa` on image cases with a LLaVA base (the tiny random LLaVA of
//! scripts/make_vlm_fixtures.py): the fused engine and candle's autograd train alike, the
//! image tokens take the image (the loss moves with it) and never enter the loss, and the
//! adapter is PEFT's for a LLaVA model.

use std::path::Path;

mod common;
use common::{assert_ok, max_relative_error, mmx_with_env};

const FIXTURES: &str = "tests/fixtures/vlm";

/// The fixture LLaVA with a word-level tokenizer of its 79 text ids (79 is the image token).
fn llava_base(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        std::fs::copy(
            Path::new(FIXTURES).join("tiny-llava").join(file),
            dir.join(file),
        )
        .unwrap();
    }
    let mut words: Vec<String> = ["<pad>", "<s>", "</s>", "<unk>"].map(String::from).to_vec();
    words.extend(
        [
            "Question",
            ":",
            "Options",
            "A",
            "B",
            ".",
            "Answer",
            "Reasoning",
            "is",
            "the",
            "ST",
            "segment",
            "raised",
            "?",
            "yes",
            "no",
            "so",
            "lesion",
            "border",
            "irregular",
        ]
        .map(String::from),
    );
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), serde_json::json!(i)))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
}

/// Six cases, four with an image (the two fixture images, each twice) and two text-only.
fn cases(dir: &Path) {
    for image in ["square.png", "wide.png"] {
        std::fs::copy(Path::new(FIXTURES).join(image), dir.join(image)).unwrap();
    }
    let case = |id: usize, image: Option<&str>, answer: &str| {
        let mut line = serde_json::json!({
            "id": format!("c{id}"), "specialty": "cardiology",
            "question": "is the ST segment raised ?", "options": ["yes", "no"],
            "answer": answer, "reasoning": ["the ST segment is raised", "so yes"],
        });
        if let Some(image) = image {
            line["image"] = serde_json::json!(image);
        }
        line.to_string()
    };
    let lines = [
        case(0, Some("square.png"), "A"),
        case(1, Some("wide.png"), "B"),
        case(2, None, "A"),
        case(3, Some("wide.png"), "B"),
        case(4, Some("square.png"), "A"),
        case(5, None, "B"),
    ];
    std::fs::write(dir.join("cases.jsonl"), lines.join("\n") + "\n").unwrap();
}

const RECIPE: &str = r#"[train]
method = "dsa"
base = "llava"
seed = 2
epochs = 2
batch_size = 3

[train.data]
files = ["cases.jsonl"]

[train.lora]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj", "down_proj"]

[train.optim]
lr = 1e-2
warmup_steps = 0
"#;

fn work() -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    llava_base(&work.path().join("llava"));
    cases(work.path());
    std::fs::write(work.path().join("dsa.toml"), RECIPE).unwrap();
    work
}

fn train(dir: &Path, out: &str, engine: &str) {
    assert_ok(&mmx_with_env(
        &["train", "dsa", "dsa.toml", "-o", out, "--quiet"],
        dir,
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
    train(dir, "fused", "fused");
    train(dir, "candle", "candle");
    let (fused, candle) = (losses(&dir.join("fused")), losses(&dir.join("candle")));
    assert_eq!(fused.len(), 4);
    for (f, c) in fused.iter().zip(&candle) {
        assert!(
            (f - c).abs() < 1e-4 * c.abs(),
            "loss {f} (fused) against {c} (candle)"
        );
    }
    assert!(fused[3] < fused[0], "the loss falls: {fused:?}");
    let (a, b) = (factors(&dir.join("fused")), factors(&dir.join("candle")));
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
        &std::fs::read_to_string(dir.join("fused/adapter_config.json")).unwrap(),
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
    train(dir, "seen", "auto");
    // The same cases with blank images: the first step's loss (before any update) moves.
    let blank = image::RgbImage::new(16, 16);
    blank.save(dir.join("square.png")).unwrap();
    blank.save(dir.join("wide.png")).unwrap();
    train(dir, "blank", "auto");
    let (seen, blank) = (losses(&dir.join("seen")), losses(&dir.join("blank")));
    assert!(
        (seen[0] - blank[0]).abs() > 1e-4,
        "{seen:?} against {blank:?}"
    );
}
