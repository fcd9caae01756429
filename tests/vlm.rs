//! The LLaVA model against transformers: logits of image+text and text-only prompts on a tiny
//! random `LlavaForConditionalGeneration` (fixtures by scripts/make_vlm_fixtures.py), and the
//! refusals of prompts whose image tokens do not match the images.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mmx::tensor::{write_safetensors, SafetensorsFile, TensorSpec};
use mmx::train::model::Llava;

mod common;
use common::max_relative_error;

const FIXTURES: &str = "tests/fixtures/vlm";

fn fixture(file: &SafetensorsFile, name: &str) -> Tensor {
    let info = file.info(name).unwrap();
    let dtype = match info.dtype.to_string().as_str() {
        "I64" => DType::I64,
        _ => DType::F32,
    };
    Tensor::from_raw_buffer(file.bytes(name).unwrap(), dtype, &info.shape, &Device::Cpu).unwrap()
}

/// transformers' inputs and outputs (scripts/make_vlm_fixtures.py).
fn references() -> SafetensorsFile {
    SafetensorsFile::open(Path::new(FIXTURES).join("tiny-llava-logits.safetensors")).unwrap()
}

/// The rows of an I64 fixture of token ids.
fn token_rows(file: &SafetensorsFile, name: &str) -> Vec<Vec<u32>> {
    fixture(file, name)
        .to_vec2::<i64>()
        .unwrap()
        .iter()
        .map(|row| row.iter().map(|&t| t as u32).collect())
        .collect()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn model() -> Llava {
    Llava::load(
        &Path::new(FIXTURES).join("tiny-llava"),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn logits_match_transformers_with_and_without_images() {
    let file = references();
    let model = model();
    assert_eq!(model.config().image_tokens(), 16);
    assert_eq!(model.config().feature_depth(), 2);
    let ids = fixture(&file, "input_ids");
    let pixels = fixture(&file, "pixel_values");
    let logits = model.forward(&ids, Some(&pixels)).unwrap();
    let err = max_relative_error(&flat(&logits), &flat(&fixture(&file, "logits")));
    println!("image+text logits: max relative error {err:.1e}");
    assert!(err < 1e-4, "image+text logits off by {err:e}");
    let text = model.forward(&fixture(&file, "text_ids"), None).unwrap();
    let err = max_relative_error(&flat(&text), &flat(&fixture(&file, "text_logits")));
    println!("text-only logits: max relative error {err:.1e}");
    assert!(err < 1e-4, "text-only logits off by {err:e}");
    // The image changes the text after it: without it (its tokens' features zeroed) the
    // logits move, so the parity above is not the text's alone.
    let zeros = pixels.zeros_like().unwrap();
    let blank = model.forward(&ids, Some(&zeros)).unwrap();
    assert!(max_relative_error(&flat(&blank), &flat(&logits)) > 1e-2);
}

#[test]
fn a_peft_lora_on_the_language_model_matches_transformers() {
    let file = references();
    let mut model = model();
    model
        .language_model_mut()
        .load_adapter(&Path::new(FIXTURES).join("tiny-llava-lora"))
        .unwrap();
    let ids = fixture(&file, "input_ids");
    let pixels = fixture(&file, "pixel_values");
    let logits = model.forward(&ids, Some(&pixels)).unwrap();
    let expected = fixture(&file, "logits_lora");
    let err = max_relative_error(&flat(&logits), &flat(&expected));
    println!("image+text logits with LoRA: max relative error {err:.1e}");
    assert!(err < 1e-4, "image+text logits with LoRA off by {err:e}");
    // The adapter matters: the base's logits are far from these.
    let base = fixture(&file, "logits");
    assert!(max_relative_error(&flat(&base), &flat(&expected)) > 1e-2);
    let text = model.forward(&fixture(&file, "text_ids"), None).unwrap();
    let err = max_relative_error(&flat(&text), &flat(&fixture(&file, "text_logits_lora")));
    println!("text-only logits with LoRA: max relative error {err:.1e}");
    assert!(err < 1e-4, "text-only logits with LoRA off by {err:e}");
    // Its factors are named as PEFT names them on a LLaVA model.
    let vars = model.language_model().lora_vars();
    assert_eq!(vars.len(), 2 * 4 * 2);
    assert_eq!(
        vars[0].0,
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    );
}

#[test]
fn image_tokens_must_match_the_images() {
    let file = references();
    let model = model();
    let ids = fixture(&file, "input_ids");
    let pixels = fixture(&file, "pixel_values");
    // Two rows of 16 image tokens, one image.
    let one = pixels.narrow(0, 0, 1).unwrap();
    let err = model.forward(&ids, Some(&one)).unwrap_err().to_string();
    assert!(
        err.contains("32 image tokens") && err.contains("1 image(s) of 16"),
        "{err}"
    );
    // Image tokens and no image.
    let err = model.forward(&ids, None).unwrap_err().to_string();
    assert!(err.contains("32 image tokens"), "{err}");
    // Pixels of the wrong size.
    let small = Tensor::zeros((2, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let err = model.forward(&ids, Some(&small)).unwrap_err().to_string();
    assert!(err.contains("[images, 3, 16, 16]"), "{err}");
}

#[test]
fn bad_configs_and_checkpoints_are_refused_by_name() {
    let source = Path::new(FIXTURES).join("tiny-llava");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(source.join("config.json")).unwrap()).unwrap();
    let attempt = |edit: &dyn Fn(&mut serde_json::Value), drop_tensor: Option<&str>| -> String {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config.clone();
        edit(&mut c);
        std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        let weights = source.join("model.safetensors");
        match drop_tensor {
            None => {
                std::fs::copy(&weights, dir.path().join("model.safetensors")).unwrap();
            }
            Some(name) => {
                let file = SafetensorsFile::open(&weights).unwrap();
                let kept: Vec<(TensorSpec, Vec<u8>)> = file
                    .names()
                    .filter(|n| *n != name)
                    .map(|n| {
                        let info = file.info(n).unwrap();
                        let spec = TensorSpec {
                            name: n.to_string(),
                            dtype: info.dtype,
                            shape: info.shape.clone(),
                        };
                        (spec, file.bytes(n).unwrap().to_vec())
                    })
                    .collect();
                write_safetensors(
                    &dir.path().join("model.safetensors"),
                    &kept,
                    &BTreeMap::new(),
                )
                .unwrap();
            }
        }
        Llava::load(dir.path(), None, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string()
    };
    let err = attempt(&|c| c["model_type"] = "llama".into(), None);
    assert!(err.contains("`llava`"), "{err}");
    let err = attempt(&|c| c["vision_feature_layer"] = 7.into(), None);
    assert!(
        err.contains("`vision_feature_layer` 7 is outside a tower of 3 layers"),
        "{err}"
    );
    let err = attempt(&|c| c["image_token_index"] = 80.into(), None);
    assert!(
        err.contains("`image_token_index` 80 is outside the vocabulary (80)"),
        "{err}"
    );
    let err = attempt(
        &|c| c["vision_feature_select_strategy"] = "cls".into(),
        None,
    );
    assert!(err.contains("\"cls\""), "{err}");
    // A projector that does not fit the language model: the text model made wider.
    let err = attempt(&|c| c["text_config"]["hidden_size"] = 64.into(), None);
    assert!(
        err.contains("multi_modal_projector.linear_1.weight"),
        "{err}"
    );
    let err = attempt(&|_| {}, Some("multi_modal_projector.linear_2.bias"));
    assert!(err.contains("multi_modal_projector.linear_2.bias"), "{err}");
}

#[test]
fn image_files_become_the_processors_pixels() {
    let file = references();
    let dir = Path::new(FIXTURES);
    let processor = mmx::train::model::vision::ImageProcessor::read(
        &dir.join("tiny-llava/preprocessor_config.json"),
    )
    .unwrap();
    let (square, wide) = (dir.join("square.png"), dir.join("wide.png"));
    let pixels = processor
        .pixel_values(&[&square, &wide], &Device::Cpu)
        .unwrap();
    let expected = fixture(&file, "processed");
    assert_eq!(pixels.dims(), [2, 3, 16, 16]);
    let diff = |a: &Tensor, b: &Tensor| -> f32 {
        flat(a)
            .iter()
            .zip(flat(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    };
    // The square image needs no resize: rescale and normalisation alone, to rounding.
    let square_err = diff(&pixels.get(0).unwrap(), &expected.get(0).unwrap());
    // The wide one is resized (PIL's bicubic algorithm against torchvision's antialiased
    // bicubic, which follows it to within one level): at most one intensity level apart,
    // 1/255 before the normalisation (0.015 after it).
    let wide_err = diff(&pixels.get(1).unwrap(), &expected.get(1).unwrap());
    println!("pixel values: square max |diff| {square_err:.1e}, resized {wide_err:.2e}");
    assert!(square_err < 1e-5, "{square_err}");
    assert!(wide_err < 0.016, "{wide_err}");
    // From the files to the logits: the square image's row matches transformers'.
    let model = model();
    let logits = model
        .forward(&fixture(&file, "input_ids"), Some(&pixels))
        .unwrap();
    let row = |t: &Tensor| flat(&t.get(0).unwrap());
    let err = max_relative_error(&row(&logits), &row(&fixture(&file, "file_logits")));
    println!("logits from square.png: max relative error {err:.1e}");
    assert!(err < 1e-4, "{err}");
    // A file that is not an image is refused by name.
    let err = processor
        .pixel_values(&[&dir.join("tiny-llava/config.json")], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn precomputed_features_give_the_pixels_logits() {
    let file = references();
    let model = model();
    let ids = fixture(&file, "input_ids");
    let pixels = fixture(&file, "pixel_values");
    let from_pixels = model.forward(&ids, Some(&pixels)).unwrap();
    // Each image's features through an `image_embeds` file, as `mmx data embed` writes them.
    let dir = tempfile::tempdir().unwrap();
    let features = model.vision_features(&pixels).unwrap();
    assert_eq!(features.dims(), [2, 16, 32]);
    let mut read = Vec::new();
    for i in 0..2 {
        let path = dir.path().join(format!("case-{i}.safetensors"));
        Llava::write_image_embeds(&path, &features.get(i).unwrap()).unwrap();
        read.push(model.read_image_embeds(&path).unwrap());
    }
    let stacked = Tensor::cat(&read, 0).unwrap();
    let from_files = model.forward_features(&ids, Some(&stacked)).unwrap();
    assert_eq!(
        flat(&from_files),
        flat(&from_pixels),
        "the same logits, bit for bit"
    );
    // Features of the wrong shape are refused naming the file and the shapes.
    let bad = dir.path().join("bad.safetensors");
    Llava::write_image_embeds(&bad, &features.get(0).unwrap().narrow(0, 0, 15).unwrap()).unwrap();
    let err = model.read_image_embeds(&bad).unwrap_err().to_string();
    assert!(
        err.contains("bad.safetensors") && err.contains("[15, 32]"),
        "{err}"
    );
    let err = model
        .forward_features(&ids, Some(&stacked.narrow(2, 0, 30).unwrap()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("[images, 16, 32]"), "{err}");
}

#[test]
fn data_embed_writes_each_images_features_and_points_the_cases_at_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURES);
    std::fs::create_dir_all(dir.path().join("img")).unwrap();
    std::fs::copy(root.join("square.png"), dir.path().join("img/a.png")).unwrap();
    let case = |id: &str, image: Option<&str>| {
        let mut c = serde_json::json!({
            "id": id, "specialty": "cardiology", "question": "q", "options": ["x", "y"],
            "answer": "A", "reasoning": ["r"]
        });
        if let Some(i) = image {
            c["image"] = i.into();
        }
        c.to_string()
    };
    let lines = [case("c1", Some("img/a.png")), case("c2", None)].join("\n") + "\n";
    std::fs::write(dir.path().join("cases.jsonl"), lines).unwrap();
    let model_dir = root.join("tiny-llava");
    let model_arg = model_dir.to_str().unwrap();
    let out = common::mmx(
        &[
            "data",
            "embed",
            model_arg,
            "--data",
            "cases.jsonl",
            "-o",
            "out",
        ],
        dir.path(),
    );
    common::assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("embedded 1 of 2"));
    let written = std::fs::read_to_string(dir.path().join("out/cases.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = written
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows[0]["image_embeds"], "c1.safetensors");
    // The copy's image still names the image, wherever the copy is.
    let image = std::path::PathBuf::from(rows[0]["image"].as_str().unwrap());
    assert_eq!(
        std::fs::read(&image).unwrap(),
        std::fs::read(dir.path().join("img/a.png")).unwrap()
    );
    assert!(rows[1].get("image_embeds").is_none());
    // The file holds what the tower makes of the processed image.
    let model = model();
    let processor = mmx::train::model::vision::ImageProcessor::read(
        &model_dir.join("preprocessor_config.json"),
    )
    .unwrap();
    let pixels = processor
        .pixel_values(&[&root.join("square.png")], &Device::Cpu)
        .unwrap();
    let expected = model.vision_features(&pixels).unwrap();
    let read = model
        .read_image_embeds(&dir.path().join("out/c1.safetensors"))
        .unwrap();
    assert_eq!(flat(&read), flat(&expected));
    // A case whose image is missing is refused naming the case and the file; nothing written.
    let lines = case("c3", Some("img/missing.png")) + "\n";
    std::fs::write(dir.path().join("bad.jsonl"), lines).unwrap();
    let out = common::mmx(
        &[
            "data",
            "embed",
            model_arg,
            "--data",
            "bad.jsonl",
            "-o",
            "out2",
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("case `c3`") && err.contains("missing.png"),
        "{err}"
    );
    assert!(!dir.path().join("out2").exists());
}

#[test]
fn greedy_generation_matches_transformers() {
    let file = references();
    let model = model();
    let ids = token_rows(&file, "input_ids");
    let features = model
        .vision_features(&fixture(&file, "pixel_values"))
        .unwrap();
    let mut options = mmx::train::model::GenerateOptions::greedy(model.language_model(), 8);
    options.eos_token_ids = vec![];
    options.pad_token_id = 0;
    let got = model.generate(&ids, Some(&features), &options).unwrap();
    let expected = token_rows(&file, "generated");
    assert_eq!(got, expected);
    // Rows of different lengths are left-padded; each row's continuation stays its own.
    let short = vec![ids[1][..ids[1].len() - 2].to_vec(), ids[0].clone()];
    let both = model
        .generate(
            &short,
            Some(
                &Tensor::cat(
                    &[
                        features.get(1).unwrap().unsqueeze(0).unwrap(),
                        features.get(0).unwrap().unsqueeze(0).unwrap(),
                    ],
                    0,
                )
                .unwrap(),
            ),
            &options,
        )
        .unwrap();
    assert_eq!(both[1], expected[0]);
    let alone = model
        .generate(
            &short[..1],
            Some(&features.get(1).unwrap().unsqueeze(0).unwrap()),
            &options,
        )
        .unwrap();
    assert_eq!(both[0], alone[0]);
    options.pad_token_id = model.config().image_token_index;
    assert!(model.generate(&ids, Some(&features), &options).is_err());
}

#[test]
fn the_fused_engine_generates_from_images_as_transformers() {
    let file = references();
    let model = model();
    let ids = token_rows(&file, "input_ids");
    let projected = model
        .image_features(&fixture(&file, "pixel_values"))
        .unwrap();
    let rows = |i: usize| {
        let values = flat(&projected.get(i).unwrap());
        Some(mmx::train::batch::ImageRows::new(values, 48))
    };
    let engine = mmx::train::fused::Engine::new(model.language_model(), &[])
        .unwrap()
        .with_image_token(model.config().image_token_index);
    let mut options = mmx::train::model::GenerateOptions::greedy(model.language_model(), 8);
    options.eos_token_ids = vec![];
    let images = [rows(0), rows(1)];
    let got = engine
        .generate_with_images(&ids, &images, 1, |_| options.clone())
        .unwrap();
    let expected = token_rows(&file, "generated");
    assert_eq!(got, expected);
    // One prompt shown each image in one shard: their common start is the same tokens but
    // not the same image, so nothing is shared between them.
    let same_prompt = vec![ids[0].clone(), ids[0].clone()];
    let both = engine
        .generate_with_images(&same_prompt, &images, 2, |_| options.clone())
        .unwrap();
    assert_eq!(both[0], expected[0]);
    let alone = engine
        .generate_with_images(&same_prompt[1..], &images[1..], 1, |_| options.clone())
        .unwrap();
    assert_eq!(both[1], alone[0]);
    assert_ne!(both[0], both[1], "the image changes the answer");
    // An image's rows must fit its image tokens.
    let err = engine
        .generate_with_images(&ids[..1], &[None], 1, |_| options.clone())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("16 image tokens") && err.contains("0 rows"),
        "{err}"
    );
}
