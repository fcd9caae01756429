//! The trainers' model (`mmx::train::model`) on tiny random models and on the transformers/PEFT
//! fixtures of `scripts/make_model_fixtures.py`: parity with transformers, the gradient audit
//! (every LoRA factor gets a gradient), a finite-difference check, KV-cache and batched
//! generation, PEFT adapter round trips, and the errors a user sees.
//!
//! Run with `--nocapture` to see the measured errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};
use mmx::adapter::Adapter;
use mmx::tensor::{Dtype, SafetensorsFile, TensorSpec};
use mmx::train::model::{CausalLm, GenerateOptions, LoraSpec, Sampling};
use mmx::train::tokenizer::Tokenizer;

mod common;

use common::tiny::{self, Part, Tiny};
use common::Rng;

// ---------------------------------------------------------------------------------------------
// Tiny random models

const LLAMA: Tiny = Tiny {
    arch: "llama",
    layers: 2,
    hidden: 32,
    intermediate: 48,
    heads: 4,
    kv_heads: 2,
    vocab: 64,
    tied: true,
    max_positions: 64,
};

const QWEN2: Tiny = Tiny {
    arch: "qwen2",
    tied: false,
    ..LLAMA
};

/// Writes `config.json` and `model.safetensors` of a random model into `dir`: weights normal
/// with standard deviation 1/√fan-in, norms near 1.
fn write_tiny(dir: &Path, t: &Tiny, seed: u64) {
    tiny::write_tiny(dir, t, seed, |part, rng| match part {
        Part::Embedding | Part::LmHead => rng.normal(0.5),
        Part::Norm => 1.0 + rng.normal(0.2),
        Part::Weight { fan_in } => rng.normal(1.0 / (fan_in as f64).sqrt()),
        Part::Bias => rng.normal(0.3),
    });
}

fn all_linear(r: usize, alpha: f64) -> LoraSpec {
    LoraSpec::new(r, alpha, vec!["all-linear".into()])
}

/// Gives every B of `model` random values (PEFT initialises B to zero, which makes A's
/// gradient exactly zero and the adapter a no-op).
/// A tiny Qwen2 (weights from `seed`) with a rank-2 LoRA on every projection whose B are
/// drawn from `b_seed`, so that the adapter changes the outputs.
fn adapted_qwen2(dir: &Path, seed: u64, b_seed: u64) -> CausalLm {
    write_tiny(dir, &QWEN2, seed);
    let model = CausalLm::load(dir, Some(&all_linear(2, 4.0)), DType::F32, &Device::Cpu).unwrap();
    randomise_b(&model, b_seed, 0.1);
    model
}

fn randomise_b(model: &CausalLm, seed: u64, std: f64) {
    let mut rng = Rng(seed | 1);
    for (key, var) in model.lora_vars() {
        if key.contains("lora_B") {
            let n = var.elem_count();
            let values: Vec<f32> = (0..n).map(|_| rng.normal(std)).collect();
            let t = Tensor::from_vec(values, var.shape(), var.device())
                .unwrap()
                .to_dtype(var.dtype())
                .unwrap();
            var.set(&t).unwrap();
        }
    }
}

fn ids_tensor(rows: &[&[u32]]) -> Tensor {
    Tensor::new(
        rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .unwrap()
}

/// A left-padded batch: rows of real tokens padded with 0 on the left to the longest.
fn left_padded(rows: &[Vec<u32>]) -> (Tensor, Tensor) {
    let width = rows.iter().map(Vec::len).max().unwrap();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for r in rows {
        let pad = width - r.len();
        ids.push([vec![0u32; pad], r.clone()].concat());
        mask.push([vec![0u32; pad], vec![1; r.len()]].concat());
    }
    (
        Tensor::new(ids, &Device::Cpu).unwrap(),
        Tensor::new(mask, &Device::Cpu).unwrap(),
    )
}

/// The mean next-token cross-entropy over positions whose token and target are both real.
fn next_token_loss(model: &CausalLm, ids: &Tensor, mask: &Tensor) -> Tensor {
    let logits = model.forward(ids, Some(mask), None).unwrap();
    let s = ids.dim(1).unwrap();
    let logp =
        candle_nn::ops::log_softmax(&logits.narrow(1, 0, s - 1).unwrap(), D::Minus1).unwrap();
    let targets = ids
        .narrow(1, 1, s - 1)
        .unwrap()
        .unsqueeze(2)
        .unwrap()
        .contiguous()
        .unwrap();
    let picked = logp.gather(&targets, 2).unwrap().squeeze(2).unwrap();
    let prev = mask.narrow(1, 0, s - 1).unwrap();
    let next = mask.narrow(1, 1, s - 1).unwrap();
    let w = (prev * next).unwrap().to_dtype(picked.dtype()).unwrap();
    let total = (picked * &w).unwrap().sum_all().unwrap();
    let count = w.sum_all().unwrap();
    total.neg().unwrap().div(&count).unwrap()
}

fn sum_sq(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn flat_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a − b| / max |b| over the positions where `keep` is set, with `[b, s, v]` logits.
fn relative_error(ours: &Tensor, theirs: &Tensor, keep: &[Vec<bool>]) -> f64 {
    let a = ours.to_dtype(DType::F64).unwrap().to_vec3::<f64>().unwrap();
    let b = theirs
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec3::<f64>()
        .unwrap();
    let (mut worst, mut scale) = (0f64, 0f64);
    for (r, row) in keep.iter().enumerate() {
        for (i, &k) in row.iter().enumerate() {
            if !k {
                continue;
            }
            for (x, y) in a[r][i].iter().zip(&b[r][i]) {
                worst = worst.max((x - y).abs());
                scale = scale.max(y.abs());
            }
        }
    }
    worst / scale
}

// ---------------------------------------------------------------------------------------------
// Parity with transformers and PEFT

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name)
}

/// A tensor of the fixture logits file, I64 or F32, as a candle tensor.
fn read_fixture(file: &SafetensorsFile, name: &str) -> Tensor {
    let info = file.info(name).unwrap();
    let bytes = file.bytes(name).unwrap();
    let dtype = match info.dtype {
        Dtype::I64 => DType::I64,
        Dtype::F32 => DType::F32,
        other => panic!("fixture tensor {name} has dtype {other}"),
    };
    Tensor::from_raw_buffer(bytes, dtype, &info.shape, &Device::Cpu).unwrap()
}

#[test]
fn logits_match_transformers_with_and_without_the_adapter() {
    for arch in ["llama", "qwen2"] {
        let file = SafetensorsFile::open(fixture(&format!("{arch}-logits.safetensors"))).unwrap();
        let ids = read_fixture(&file, "input_ids");
        let mask = read_fixture(&file, "attention_mask");
        let keep: Vec<Vec<bool>> = mask
            .to_vec2::<i64>()
            .unwrap()
            .iter()
            .map(|r| r.iter().map(|&m| m == 1).collect())
            .collect();
        assert!(
            keep[1].contains(&false),
            "the fixture has a left-padded row"
        );
        let reference = read_fixture(&file, "logits");
        let reference_lora = read_fixture(&file, "logits_lora");

        let mut model = CausalLm::load(&fixture(arch), None, DType::F32, &Device::Cpu).unwrap();
        let base = model.forward(&ids, Some(&mask), None).unwrap();
        assert_eq!(base.dims(), [2, 7, 256]);
        let err_base = relative_error(&base, &reference, &keep);

        model
            .load_adapter(&fixture(&format!("{arch}-lora")))
            .unwrap();
        assert_eq!(
            model.lora_vars().len(),
            2 * 4 * 2,
            "{arch}: 4 targets x 2 layers x A, B"
        );
        let adapted = model.forward(&ids, Some(&mask), None).unwrap();
        let err_lora = relative_error(&adapted, &reference_lora, &keep);
        // The adapter must matter, or the comparison above would prove nothing.
        let effect = relative_error(&reference, &reference_lora, &keep);

        model.set_adapter_enabled(false);
        let disabled = model.forward(&ids, Some(&mask), None).unwrap();
        let err_disabled = relative_error(&disabled, &reference, &keep);

        println!(
            "{arch}: max|diff|/max|ref| base {err_base:.2e}, adapter {err_lora:.2e}, adapter disabled {err_disabled:.2e} (adapter effect {effect:.2e})"
        );
        assert!(
            effect > 0.05,
            "{arch}: the adapter barely changes the logits ({effect})"
        );
        assert!(err_base < 1e-4, "{arch}: base logits off by {err_base}");
        assert!(err_lora < 1e-4, "{arch}: adapted logits off by {err_lora}");
        assert!(
            err_disabled < 1e-4,
            "{arch}: disabled-adapter logits off by {err_disabled}"
        );
    }
}

#[test]
fn fixture_adapter_deltas_equal_the_loaded_factors() {
    // The rsLoRA scaling of the Qwen2 adapter (alpha / √r = 4) and the plain one of Llama's
    // (alpha / r = 2) must both reach the model.
    for (arch, scaling) in [("llama", 2.0), ("qwen2", 4.0)] {
        let dir = fixture(&format!("{arch}-lora"));
        let mut model = CausalLm::load(&fixture(arch), None, DType::F32, &Device::Cpu).unwrap();
        model.load_adapter(&dir).unwrap();
        let q = model.layers()[1].projection(mmx::train::model::Projection::Q);
        assert_eq!(q.scaling(), Some(scaling), "{arch}");
        assert_eq!(model.lora_spec().unwrap().use_rslora, arch == "qwen2");
        assert!(model.layers()[0]
            .projection(mmx::train::model::Projection::K)
            .lora_a()
            .is_none());
    }
}

#[test]
fn half_precision_stays_close_to_f32_and_keeps_f32_factors() {
    let file = SafetensorsFile::open(fixture("qwen2-logits.safetensors")).unwrap();
    let ids = read_fixture(&file, "input_ids");
    let mask = read_fixture(&file, "attention_mask");
    let reference = read_fixture(&file, "logits_lora");
    let keep: Vec<Vec<bool>> = mask
        .to_vec2::<i64>()
        .unwrap()
        .iter()
        .map(|r| r.iter().map(|&m| m == 1).collect())
        .collect();
    for dtype in [DType::BF16, DType::F16] {
        let mut model = CausalLm::load(&fixture("qwen2"), None, dtype, &Device::Cpu).unwrap();
        model.load_adapter(&fixture("qwen2-lora")).unwrap();
        assert!(model
            .lora_vars()
            .iter()
            .all(|(_, v)| v.dtype() == DType::F32));
        let logits = model.forward(&ids, Some(&mask), None).unwrap();
        assert_eq!(logits.dtype(), dtype);
        let err = relative_error(&logits, &reference, &keep);
        println!("qwen2 {dtype:?} with adapter: max|diff|/max|ref| {err:.2e}");
        assert!(err < 0.05, "{dtype:?}: off by {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// Gradients

#[test]
fn every_lora_factor_gets_a_gradient() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), &QWEN2, 1);
    let spec = all_linear(4, 8.0);
    let model = CausalLm::load(dir.path(), Some(&spec), DType::F32, &Device::Cpu).unwrap();
    let vars = model.lora_vars();
    assert_eq!(
        vars.len(),
        2 * 7 * 2,
        "two layers, seven projections, A and B"
    );
    let (ids, mask) = left_padded(&[vec![1, 5, 9, 13, 40, 22, 7], vec![1, 30, 31, 2]]);

    // PEFT init: B = 0, so A's gradient is exactly zero and B's is not.
    let grads = next_token_loss(&model, &ids, &mask).backward().unwrap();
    for (key, var) in &vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        let norm = sum_sq(g).sqrt();
        if key.contains("lora_A") {
            assert_eq!(norm, 0.0, "{key}: A's gradient at init must be exactly 0");
        } else {
            assert!(norm > 0.0, "{key}: B's gradient at init is zero");
        }
    }

    randomise_b(&model, 3, 0.05);
    let grads = next_token_loss(&model, &ids, &mask).backward().unwrap();
    let mut smallest = f64::INFINITY;
    for (key, var) in &vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        let norm = sum_sq(g).sqrt();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{key}: gradient norm {norm}"
        );
        smallest = smallest.min(norm);
    }
    println!(
        "gradient audit: {} LoRA factors, all with a gradient; smallest norm {smallest:.3e}",
        vars.len()
    );
}

#[test]
fn backprop_agrees_with_finite_differences_in_f64() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), &LLAMA, 2);
    let mut spec = all_linear(3, 6.0);
    spec.seed = 11;
    let model = CausalLm::load(dir.path(), Some(&spec), DType::F64, &Device::Cpu).unwrap();
    randomise_b(&model, 5, 0.1);
    let (ids, mask) = left_padded(&[vec![1, 4, 8, 15, 16, 23, 42], vec![1, 9, 3, 60, 12]]);
    let loss = next_token_loss(&model, &ids, &mask);
    let grads = loss.backward().unwrap();
    let loss_at = || -> f64 {
        next_token_loss(&model, &ids, &mask)
            .to_scalar::<f64>()
            .unwrap()
    };

    let vars: BTreeMap<String, Var> = model.lora_vars().into_iter().collect();
    let key = |layer: usize, module: &str, factor: &str| {
        format!("base_model.model.model.layers.{layer}.{module}.lora_{factor}.weight")
    };
    let checked = [
        key(0, "self_attn.q_proj", "A"),
        key(0, "self_attn.k_proj", "B"),
        key(1, "self_attn.v_proj", "A"),
        key(1, "self_attn.o_proj", "B"),
        key(0, "mlp.gate_proj", "B"),
        key(1, "mlp.up_proj", "A"),
        key(1, "mlp.down_proj", "B"),
    ];
    let h = 1e-5;
    let mut worst = 0f64;
    let mut count = 0;
    for name in &checked {
        let var = &vars[name];
        let grad = flat_f64(grads.get(var).unwrap());
        let original = flat_f64(var.as_tensor());
        // The largest-gradient entry and a few spread ones.
        let largest = (0..grad.len())
            .max_by(|&i, &j| grad[i].abs().total_cmp(&grad[j].abs()))
            .unwrap();
        for index in [largest, 0, grad.len() / 2, grad.len() - 1] {
            let at = |delta: f64| {
                let mut v = original.clone();
                v[index] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_at()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let analytic = grad[index];
            let rel = (numeric - analytic).abs() / analytic.abs().max(numeric.abs()).max(1e-7);
            assert!(
                rel < 1e-4,
                "{name}[{index}]: finite difference {numeric:.10e}, backprop {analytic:.10e} (relative {rel:.2e})"
            );
            worst = worst.max(rel);
            count += 1;
        }
    }
    println!(
        "finite differences: {count} entries of {} factors, worst relative error {worst:.2e}",
        checked.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Generation

#[test]
fn the_kv_cache_gives_the_full_forward_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = adapted_qwen2(dir.path(), 4, 9);
    let (ids, mask) = left_padded(&[
        vec![1, 7, 3, 9, 11, 40, 2, 5, 63],
        vec![1, 20, 21, 22, 23, 24],
    ]);
    let full = model.forward(&ids, Some(&mask), None).unwrap();

    let mut cache = model.new_cache();
    let mut pieces = vec![model
        .forward(
            &ids.narrow(1, 0, 4).unwrap(),
            Some(&mask.narrow(1, 0, 4).unwrap()),
            Some(&mut cache),
        )
        .unwrap()];
    for i in 4..9 {
        let step_ids = ids.narrow(1, i, 1).unwrap();
        let step_mask = mask.narrow(1, i, 1).unwrap();
        pieces.push(
            model
                .forward(&step_ids, Some(&step_mask), Some(&mut cache))
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), 9);
    let cached = Tensor::cat(&pieces, 1).unwrap();
    let keep: Vec<Vec<bool>> = mask
        .to_vec2::<u32>()
        .unwrap()
        .iter()
        .map(|r| r.iter().map(|&m| m == 1).collect())
        .collect();
    let err = relative_error(&cached, &full, &keep);
    println!("kv cache vs full forward: max|diff|/max|ref| {err:.2e}");
    assert!(err < 1e-5, "cached logits off by {err}");
}

#[test]
fn batched_left_padded_generation_equals_one_row_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    // Untied: a tiny random model with tied embeddings mostly repeats its last token.
    let model = adapted_qwen2(dir.path(), 5, 1);
    let prompts = vec![vec![1, 5, 9], vec![1, 33, 34, 35, 36, 37], vec![7]];
    let mut options = GenerateOptions::greedy(&model, 8);
    options.eos_token_ids = vec![];
    let batched = model.generate(&prompts, &options).unwrap();
    for (p, got) in prompts.iter().zip(&batched) {
        let alone = model.generate(std::slice::from_ref(p), &options).unwrap();
        assert_eq!(&alone[0], got, "prompt {p:?}");
        assert_eq!(got.len(), 8);
    }
    // Each row stops at its own end-of-sequence token (included), the others go on.
    let stop = batched[0][0];
    options.eos_token_ids = vec![stop];
    let stopped = model.generate(&prompts, &options).unwrap();
    for (full, cut) in batched.iter().zip(&stopped) {
        let expected = match full.iter().position(|&t| t == stop) {
            Some(i) => &full[..=i],
            None => &full[..],
        };
        assert_eq!(cut, expected);
    }
    assert_eq!(stopped[0], [stop]);
    println!("generation: batched {batched:?}");
}

#[test]
fn sampled_generation_depends_on_the_seed_only() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), &QWEN2, 6);
    let model = CausalLm::load(dir.path(), None, DType::F32, &Device::Cpu).unwrap();
    let prompts = vec![vec![1, 5, 9], vec![1, 5, 9]];
    let mut options = GenerateOptions::greedy(&model, 10);
    options.eos_token_ids = vec![];
    options.sampling = Sampling::Sample {
        temperature: 1.5,
        top_p: 0.95,
    };
    options.seed = 3;
    let a = model.generate(&prompts, &options).unwrap();
    assert_eq!(a, model.generate(&prompts, &options).unwrap());
    assert_ne!(
        a[0], a[1],
        "rows of the same prompt draw from different streams"
    );
    options.seed = 4;
    assert_ne!(a, model.generate(&prompts, &options).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Adapters

#[test]
fn saved_adapters_round_trip_and_open_in_mmx() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("base");
    write_tiny(&model_dir, &QWEN2, 7);
    let mut spec = LoraSpec::new(
        4,
        8.0,
        vec!["q_proj".into(), "v_proj".into(), "mlp.down_proj".into()],
    );
    spec.use_rslora = true;
    let model = CausalLm::load(&model_dir, Some(&spec), DType::F32, &Device::Cpu).unwrap();
    randomise_b(&model, 2, 0.1);
    let (ids, mask) = left_padded(&[vec![1, 2, 3, 4, 5], vec![9, 8, 7]]);
    let before = model.forward(&ids, Some(&mask), None).unwrap();

    let out = dir.path().join("adapter");
    model.save_adapter(&out, "tiny-qwen2").unwrap();
    let adapter = Adapter::open(&out).unwrap();
    assert_eq!(
        adapter.config().base_model_name_or_path.as_deref(),
        Some("tiny-qwen2")
    );
    assert_eq!(adapter.modules().len(), 2 * 3);
    let s = 8.0 / 2.0; // rsLoRA: alpha / √r
    for (name, var_a) in model
        .lora_vars()
        .iter()
        .filter(|(k, _)| k.contains("lora_A"))
    {
        let module = name
            .strip_prefix("base_model.model.")
            .unwrap()
            .strip_suffix(".lora_A.weight")
            .unwrap();
        let b_key = name.replace("lora_A", "lora_B");
        let var_b = &model
            .lora_vars()
            .into_iter()
            .find(|(k, _)| *k == b_key)
            .unwrap()
            .1;
        let ours = (var_b.as_tensor().matmul(var_a.as_tensor()).unwrap() * s).unwrap();
        let theirs = adapter.delta(&format!("{module}.weight")).unwrap().unwrap();
        let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-6, "{module}: delta off by {worst}");
    }

    let mut fresh = CausalLm::load(&model_dir, None, DType::F32, &Device::Cpu).unwrap();
    fresh.load_adapter(&out).unwrap();
    let after = fresh.forward(&ids, Some(&mask), None).unwrap();
    let keep = vec![vec![true; 5], vec![false, false, true, true, true]];
    let err = relative_error(&after, &before, &keep);
    assert!(
        err < 1e-6,
        "round-tripped adapter changes the logits by {err}"
    );
    assert_eq!(fresh.lora_spec().unwrap().r, 4);
    assert!(fresh.lora_spec().unwrap().use_rslora);
}

#[test]
fn adapters_with_missing_or_misshaped_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("base");
    write_tiny(&model_dir, &LLAMA, 8);
    let model = CausalLm::load(
        &model_dir,
        Some(&LoraSpec::new(2, 4.0, vec!["q_proj".into()])),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let good = dir.path().join("good");
    model.save_adapter(&good, "tiny").unwrap();
    let adapter = Adapter::open(&good).unwrap();
    let config: serde_json::Map<String, serde_json::Value> = adapter.config().raw.clone();
    let tensors: Vec<(TensorSpec, Vec<u8>)> = adapter
        .file()
        .names()
        .map(|n| {
            let info = adapter.file().info(n).unwrap();
            (
                TensorSpec {
                    name: n.to_string(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                },
                adapter.file().bytes(n).unwrap().to_vec(),
            )
        })
        .collect();

    // Layer 1's q_proj dropped although the config targets every q_proj.
    let missing = dir.path().join("missing");
    let kept: Vec<_> = tensors
        .iter()
        .filter(|(s, _)| !s.name.contains("layers.1."))
        .cloned()
        .collect();
    Adapter::save(&missing, &config, &kept).unwrap();
    let mut m = CausalLm::load(&model_dir, None, DType::F32, &Device::Cpu).unwrap();
    let err = m.load_adapter(&missing).unwrap_err().to_string();
    assert!(
        err.contains("`base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight` is missing"),
        "{err}"
    );

    // A of rank 2 with one input feature too many (and B to match the rank).
    let misshaped = dir.path().join("misshaped");
    let bent: Vec<_> = tensors
        .iter()
        .map(|(s, b)| {
            if s.name.contains("layers.0.") && s.name.contains("lora_A") {
                let mut s = s.clone();
                s.shape[1] += 1;
                let mut b = b.clone();
                b.extend(vec![0u8; 4 * s.shape[0]]);
                (s, b)
            } else {
                (s.clone(), b.clone())
            }
        })
        .collect();
    Adapter::save(&misshaped, &config, &bent).unwrap();
    let err = m.load_adapter(&misshaped).unwrap_err().to_string();
    assert!(
        err.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
            && err.contains("[2, 33]")
            && err.contains("[2, 32]"),
        "{err}"
    );
    // A failed load leaves the model as it was.
    assert!(m.lora_vars().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Errors a user sees

#[test]
fn unsupported_architectures_are_named() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), &LLAMA, 9);
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"llama\"", "\"mistral\""),
    )
    .unwrap();
    let err = CausalLm::load(dir.path(), None, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("architecture `mistral`"), "{err}");
    assert!(err.contains("config.json"), "{err}");
    assert!(err.contains("`llama` and `qwen2`"), "{err}");
}

#[test]
fn a_tokenizer_larger_than_the_vocabulary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), &LLAMA, 10);
    let words: serde_json::Map<String, serde_json::Value> = (0..70)
        .map(|i| (format!("w{i}"), serde_json::json!(i)))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": words, "unk_token": "w0"}
    });
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let model = CausalLm::load(dir.path(), None, DType::F32, &Device::Cpu).unwrap();
    let t = Tokenizer::load(dir.path()).unwrap();
    let err = t.check_vocab(model.config()).unwrap_err().to_string();
    assert!(
        err.contains("70 token ids") && err.contains("`vocab_size` is 64"),
        "{err}"
    );
    assert_eq!(t.encode("w5 w69", false).unwrap(), [5, 69]);
}

#[test]
fn a_lora_target_that_matches_nothing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), &LLAMA, 11);
    let spec = LoraSpec::new(4, 8.0, vec!["q_proj".into(), "qkv_proj".into()]);
    let err = CausalLm::load(dir.path(), Some(&spec), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("LoRA target `qkv_proj` matches no module"),
        "{err}"
    );
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), &LLAMA, 12);
    let model = CausalLm::load(dir.path(), None, DType::F32, &Device::Cpu).unwrap();
    let err = model
        .forward(&ids_tensor(&[&[1, 64]]), None, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`input_ids` [0, 1] is 64") && err.contains("`vocab_size` 64"),
        "{err}"
    );
}
