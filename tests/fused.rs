//! The fused training engine (`mmx::train::fused`) against candle's autograd, the reference:
//! the loss and every gradient on tiny random Llama and Qwen2 models (tied and untied heads,
//! biases, grouped-query attention, LoRA on all or some projections, rsLoRA, examples of
//! different lengths and prompts), training LoRA factors (`dsa`) or every weight (`base`); and
//! `mmx train` giving the same result with either engine.
//!
//! Run with `--nocapture` to see the measured errors.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use mmx::tensor::SafetensorsFile;
use mmx::train::batch::{summed_nll, Batch, Example};
use mmx::train::fused::Engine;
use mmx::train::model::{CausalLm, GenerateOptions, LoraSpec, Sampling};

mod common;

use common::tiny::{self, Part, Tiny};
use common::{assert_ok, max_relative_error, mmx_with_env, Rng};

const VOCAB: usize = 48;

/// Writes a random model of shape `t` into `dir`: weights uniform in ±2/√fan-in, large enough
/// that attention is far from uniform and RoPE matters.
fn write_tiny(dir: &Path, t: &Tiny, seed: u64) {
    tiny::write_tiny(dir, t, seed, |part, rng| match part {
        Part::Embedding => rng.uniform(1.0),
        Part::LmHead | Part::Bias => rng.uniform(0.5),
        Part::Norm => 1.0 + rng.uniform(0.3),
        Part::Weight { fan_in } => rng.uniform(2.0 / (fan_in as f64).sqrt()),
    });
}

/// Random values for every B (PEFT starts them at zero, which zeroes A's gradient).
fn randomise_b(model: &CausalLm, seed: u64) {
    let mut rng = Rng(seed | 1);
    for (key, var) in model.lora_vars() {
        if key.contains("lora_B") {
            let values: Vec<f32> = (0..var.elem_count()).map(|_| rng.uniform(0.2)).collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

/// Examples of different lengths and prompt lengths (one is all prompt but its last token, one
/// longer than an attention block).
fn examples(seed: u64) -> Vec<Example> {
    let mut rng = Rng(seed | 1);
    let mut words = |n: usize| -> Vec<u32> { (0..n).map(|_| 3 + rng.below(VOCAB - 3)).collect() };
    [
        (9, 6),
        (30, 12),
        (1, 1),
        (17, 25),
        (4, 0),
        (40, 20),
        (70, 25),
    ]
    .iter()
    .map(|&(prompt, completion)| Example::new(Some(1), &words(prompt), &words(completion), 2))
    .collect()
}

/// Summed NLL and gradients (in `vars` order) from candle's autograd, the loss divided by
/// `targets` as the trainer divides it.
fn candle_grads(
    model: &CausalLm,
    vars: &[(String, Var)],
    ex: &[&Example],
    targets: usize,
) -> (f64, Vec<Vec<f32>>) {
    let batch = Batch::new(ex, 0, &Device::Cpu).unwrap();
    let logits = model
        .forward(&batch.inputs, Some(&batch.attention), None)
        .unwrap();
    let summed = summed_nll(&logits, &batch).unwrap();
    let nll = f64::from(summed.to_scalar::<f32>().unwrap());
    let store = (summed / targets as f64).unwrap().backward().unwrap();
    let grads = vars
        .iter()
        .map(|(name, v)| {
            let g = store
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
        .collect();
    (nll, grads)
}

/// Runs both engines on one micro-batch and returns the worst relative gradient error; fails
/// past the bars (loss 1e-5, gradients 1e-4, relative to the reference's largest magnitude).
fn parity(model: &CausalLm, vars: &[(String, Var)], label: &str) -> f64 {
    parity_on(model, vars, examples(7), label)
}

/// Rollouts as GRPO draws them: several completions of one prompt (a prompt longer than an
/// attention block among them), not all adjacent, one whose prompt ends differently, beside
/// examples of their own.
fn shared_examples(seed: u64) -> Vec<Example> {
    let mut rng = Rng(seed | 1);
    let mut words = |n: usize| -> Vec<u32> { (0..n).map(|_| 3 + rng.below(VOCAB - 3)).collect() };
    let (short, long) = (words(9), words(70));
    // The same case under another guideline: only the end of the prompt differs.
    let mut variant = long[..66].to_vec();
    variant.extend(words(5));
    let mut out = Vec::new();
    for (prompt, completion) in [(&short, 5), (&long, 12), (&variant, 4), (&long, 3)] {
        out.push(Example::new(Some(1), prompt, &words(completion), 2));
    }
    for (prompt, completion) in [(&short, 1), (&words(9), 6), (&short, 30)] {
        out.push(Example::new(Some(1), prompt, &words(completion), 2));
    }
    out
}

fn parity_on(model: &CausalLm, vars: &[(String, Var)], examples: Vec<Example>, label: &str) -> f64 {
    let refs: Vec<&Example> = examples.iter().collect();
    let targets: usize = examples.iter().map(|e| e.target_tokens()).sum();
    let (nll, expected) = candle_grads(model, vars, &refs, targets);
    let mut engine = Engine::new(model, vars).unwrap();
    // Shards of 4: two threads, summed in order.
    let (fused_nll, tokens) = engine.micro_batch(&refs, 4, targets).unwrap();
    assert_eq!(
        tokens,
        examples.iter().map(|e| e.tokens.len() - 1).sum::<usize>()
    );
    let loss_err = (fused_nll - nll).abs() / nll.abs();
    assert!(loss_err < 1e-5, "{label}: loss {fused_nll} vs {nll}");
    let got = engine.take_gradients().unwrap();
    assert_eq!(got.len(), vars.len());
    let mut worst = 0f64;
    for ((name, var), (g, e)) in vars.iter().zip(got.iter().zip(&expected)) {
        assert_eq!(g.dims(), var.dims(), "{name}");
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            e.iter().any(|v| v.abs() > 1e-7),
            "{label}: the reference gradient of {name} is zero, the test would prove nothing"
        );
        let err = max_relative_error(&g, e);
        assert!(err < 1e-4, "{label}: {name} off by {err:e}");
        worst = worst.max(err);
    }
    println!("{label}: loss error {loss_err:.1e}, worst gradient error {worst:.1e}");
    worst
}

/// The LLAMA shape (seed 5) in `dir`, loaded with a rank-4 LoRA on every projection.
fn llama_with_lora(dir: &Path) -> CausalLm {
    write_tiny(dir, &LLAMA, 5);
    let spec = lora(4, 8.0, &["all-linear"], false);
    CausalLm::load(dir, Some(&spec), DType::F32, &Device::Cpu).unwrap()
}

fn lora(r: usize, alpha: f64, targets: &[&str], rslora: bool) -> LoraSpec {
    let mut spec = LoraSpec::new(r, alpha, targets.iter().map(|s| s.to_string()).collect());
    spec.use_rslora = rslora;
    spec.seed = 11;
    spec
}

fn dsa_parity(t: &Tiny, spec: &LoraSpec, label: &str) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), t, 5);
    let model = CausalLm::load(dir.path(), Some(spec), DType::F32, &Device::Cpu).unwrap();
    randomise_b(&model, 3);
    parity(&model, &model.lora_vars(), label);
}

fn base_parity(t: &Tiny, label: &str) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), t, 9);
    let model = CausalLm::load_trainable(dir.path(), DType::F32, &Device::Cpu).unwrap();
    parity(&model, model.weight_vars(), label);
}

const LLAMA: Tiny = Tiny {
    arch: "llama",
    layers: 2,
    hidden: 32,
    intermediate: 40,
    heads: 4,
    kv_heads: 2,
    vocab: VOCAB,
    tied: false,
    max_positions: 128,
};

#[test]
fn lora_gradients_match_candle_on_llama() {
    dsa_parity(
        &LLAMA,
        &lora(4, 8.0, &["all-linear"], false),
        "llama untied, all-linear",
    );
    let tied = Tiny {
        tied: true,
        ..LLAMA
    };
    let subset = lora(3, 6.0, &["q_proj", "v_proj", "down_proj"], true);
    dsa_parity(&tied, &subset, "llama tied, q/v/down, rsLoRA");
    // One key/value head for all four query heads, and none shared.
    let mqa = Tiny {
        kv_heads: 1,
        ..LLAMA
    };
    dsa_parity(
        &mqa,
        &lora(2, 4.0, &["all-linear"], false),
        "llama 4 heads / 1 kv head",
    );
    let mha = Tiny {
        kv_heads: 4,
        ..LLAMA
    };
    dsa_parity(
        &mha,
        &lora(2, 4.0, &["k_proj", "o_proj", "up_proj", "gate_proj"], false),
        "llama without GQA",
    );
}

#[test]
fn lora_gradients_match_candle_on_qwen2() {
    let qwen = Tiny {
        arch: "qwen2",
        ..LLAMA
    };
    dsa_parity(
        &qwen,
        &lora(4, 16.0, &["all-linear"], false),
        "qwen2, all-linear",
    );
}

#[test]
fn lora_gradients_match_candle_on_the_transformers_fixtures() {
    for name in ["llama", "qwen2"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/model")
            .join(name);
        let spec = lora(4, 8.0, &["all-linear"], false);
        let model = CausalLm::load(&dir, Some(&spec), DType::F32, &Device::Cpu).unwrap();
        randomise_b(&model, 4);
        parity(&model, &model.lora_vars(), name);
    }
}

#[test]
fn every_weight_gradient_matches_candle() {
    base_parity(&LLAMA, "base llama untied");
    base_parity(
        &Tiny {
            tied: true,
            ..LLAMA
        },
        "base llama tied",
    );
    base_parity(
        &Tiny {
            arch: "qwen2",
            ..LLAMA
        },
        "base qwen2",
    );
}

#[test]
fn refreshed_weights_follow_the_variables() {
    let dir = tempfile::tempdir().unwrap();
    let model = llama_with_lora(dir.path());
    let vars = model.lora_vars();
    let mut engine = Engine::new(&model, &vars).unwrap();
    // Changed factors after the engine was made: stale until refreshed.
    randomise_b(&model, 8);
    let ex = examples(2);
    let refs: Vec<&Example> = ex.iter().collect();
    let (nll, _) = candle_grads(&model, &vars, &refs, 1);
    let (stale, _) = engine.micro_batch(&refs, 8, 1).unwrap();
    assert!((stale - nll).abs() / nll > 1e-3, "B changed the loss");
    engine.refresh(&model).unwrap();
    engine.take_gradients().unwrap();
    let (fresh, _) = engine.micro_batch(&refs, 8, 1).unwrap();
    assert!((fresh - nll).abs() / nll < 1e-5, "{fresh} vs {nll}");
}

#[test]
fn dropout_and_other_dtypes_are_left_to_candle() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), &LLAMA, 5);
    let mut spec = lora(4, 8.0, &["all-linear"], false);
    spec.dropout = 0.1;
    let model = CausalLm::load(dir.path(), Some(&spec), DType::F32, &Device::Cpu).unwrap();
    assert!(Engine::unsupported(&model).unwrap().contains("dropout"));
    assert!(Engine::new(&model, &model.lora_vars()).is_err());
    let half = CausalLm::load(dir.path(), None, DType::BF16, &Device::Cpu).unwrap();
    assert!(Engine::unsupported(&half).unwrap().contains("f32"));
}

/// Greedy and sampled continuations of prompts of different lengths, through candle's KV cache
/// and the engine's: the same tokens, each row stopping at its own end-of-sequence token.
fn generation_parity(t: &Tiny, spec: Option<&LoraSpec>, label: &str) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), t, 13);
    let model = CausalLm::load(dir.path(), spec, DType::F32, &Device::Cpu).unwrap();
    randomise_b(&model, 7);
    let engine = Engine::new(&model, &[]).unwrap();
    // A repeated prompt, and one that ends differently (as a group's rollouts repeat their
    // case's prompt under other guidelines): their common start is prefilled once.
    let prompts = vec![
        vec![1, 5, 9],
        (3..40).collect(),
        vec![7],
        vec![2, 30, 31, 32, 33],
        vec![1, 5, 9],
        (3..36).chain([44, 45]).collect(),
    ];
    let mut options = GenerateOptions::greedy(&model, 24);
    options.eos_token_ids = vec![];
    let candle = model
        .generate_sharded(&prompts, 3, |_| options.clone())
        .unwrap();
    let fused = engine
        .generate_sharded(&prompts, 3, |_| options.clone())
        .unwrap();
    assert_eq!(fused, candle, "{label}: greedy");
    assert!(candle.iter().all(|row| row.len() == 24));
    // Stop at a token some rows produce midway: those rows end there, the others go on.
    let row = &candle[1];
    let first_new = (1..row.len())
        .find(|&j| !row[..j].contains(&row[j]))
        .unwrap_or(0);
    options.eos_token_ids = vec![row[first_new]];
    let stopped = engine
        .generate_sharded(&prompts, 3, |_| options.clone())
        .unwrap();
    assert_eq!(stopped[1].len(), first_new + 1, "{label}: {stopped:?}");
    assert_eq!(
        stopped,
        model
            .generate_sharded(&prompts, 3, |_| options.clone())
            .unwrap(),
        "{label}: stopped"
    );
    options.eos_token_ids = vec![];
    options.sampling = Sampling::Sample {
        temperature: 1.3,
        top_p: 0.9,
    };
    let seeded = |shard: usize| GenerateOptions {
        seed: 40 + shard as u64,
        ..options.clone()
    };
    let candle = model.generate_sharded(&prompts, 2, seeded).unwrap();
    let fused = engine.generate_sharded(&prompts, 2, seeded).unwrap();
    assert_eq!(fused, candle, "{label}: sampled");
    assert_ne!(fused[0], fused[4], "{label}: rows of one prompt draw apart");
    println!("{label}: greedy and sampled generation equal");
}

#[test]
fn generation_matches_candle() {
    generation_parity(&LLAMA, None, "llama untied, no adapter");
    let tied = Tiny {
        tied: true,
        ..LLAMA
    };
    generation_parity(
        &tied,
        Some(&lora(4, 8.0, &["all-linear"], false)),
        "llama tied, LoRA",
    );
    let qwen = Tiny {
        arch: "qwen2",
        kv_heads: 1,
        ..LLAMA
    };
    let subset = lora(3, 6.0, &["q_proj", "v_proj", "down_proj"], true);
    generation_parity(&qwen, Some(&subset), "qwen2 (biases), one kv head, rsLoRA");
}

#[test]
fn generation_refuses_what_candle_refuses() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path(), &LLAMA, 5);
    let mut spec = lora(4, 8.0, &["all-linear"], false);
    spec.dropout = 0.1;
    // Dropout keeps the engine from training the model, not from running it.
    let model = CausalLm::load(dir.path(), Some(&spec), DType::F32, &Device::Cpu).unwrap();
    let engine = Engine::new(&model, &[]).unwrap();
    let options = GenerateOptions::greedy(&model, 8);
    let run = |prompts: Vec<Vec<u32>>| {
        engine
            .generate_sharded(&prompts, 4, |_| options.clone())
            .unwrap_err()
            .to_string()
    };
    assert!(run(vec![vec![1, VOCAB as u32]]).contains("outside the vocabulary"));
    assert!(run(vec![vec![1], vec![]]).contains("prompt 1 is empty"));
    let long = (0..125).map(|i| 3 + i % 40).collect();
    let err = run(vec![long]);
    assert!(err.contains("`max_position_embeddings` (128)"), "{err}");
    let err = model
        .generate(&[(0..125).map(|i| 3 + i % 40).collect()], &options)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`max_position_embeddings` (128)"), "{err}");
}

#[test]
fn shared_prompts_change_nothing_but_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let model = llama_with_lora(dir.path());
    randomise_b(&model, 3);
    parity_on(
        &model,
        &model.lora_vars(),
        shared_examples(3),
        "LoRA, shared prompts",
    );
    let full = CausalLm::load_trainable(dir.path(), DType::F32, &Device::Cpu).unwrap();
    parity_on(
        &full,
        full.weight_vars(),
        shared_examples(4),
        "every weight, shared prompts",
    );

    // The policy pass: one example per shard shares nothing; one shard shares every prompt.
    let examples = shared_examples(5);
    let refs: Vec<&Example> = examples.iter().collect();
    let mut engine = Engine::new(&model, &model.lora_vars()).unwrap();
    let coef = |e: usize, t: usize, logp: f64| (e as f64 - 2.5) * 0.1 + t as f64 * 0.01 - logp;
    let mut run = |shard: usize| {
        let stats = engine.policy_batch(&refs, shard, 0.7, &coef, true).unwrap();
        let grads = engine.take_gradients().unwrap();
        let flat: Vec<f32> = grads
            .iter()
            .flat_map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        (stats, flat)
    };
    let (alone, alone_grads) = run(1);
    let (shared, shared_grads) = run(8);
    for (e, (a, b)) in examples.iter().zip(alone.iter().zip(&shared)) {
        assert_eq!(a.len(), e.tokens.len() - e.prompt_len);
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x.logp - y.logp).abs() < 1e-5, "{} vs {}", x.logp, y.logp);
            assert!((x.entropy - y.entropy).abs() < 1e-5);
        }
    }
    let err = max_relative_error(&shared_grads, &alone_grads);
    assert!(err < 1e-4, "policy gradient off by {err:e}");
}

// ---------------------------------------------------------------------------------------------
// `mmx train` with either engine

fn mmx(dir: &Path, engine: &str, args: &[&str]) -> std::process::Output {
    mmx_with_env(args, dir, &[("MMX_TRAIN_ENGINE", Some(engine))])
}

// Both recipes raise AdamW's eps from 1e-8: its first update is lr·g/(|g| + eps), so a rounding
// difference δ in a gradient element near zero moves the weight by up to lr·δ/eps. With
// eps 1e-8 the engines' f32 rounding (δ ~ 1e-9, as candle's own) shows as 1e-3 relative
// differences in the LoRA factors; with 1e-4 the comparison sees the engines, not that
// amplification.
const BASE: &str = r#"[train]
method = "base"
seed = 3
epochs = 1
batch_size = 6
max_steps = 3

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
eps = 1e-4
"#;

const DSA: &str = r#"[train]
method = "dsa"
base = "base"
specialty = "cardiology"
seed = 5
epochs = 1
batch_size = 12
max_steps = 3

[train.data]
synthetic = { seed = 0, train = 40 }
specialties = ["cardiology"]

[train.lora]
r = 4
alpha = 8
target_modules = ["all-linear"]

[train.optim]
lr = 5e-3
eps = 1e-4
warmup_steps = 1
"#;

/// The largest relative difference between the tensors of two safetensors files.
fn file_error(a: &Path, b: &Path) -> f64 {
    let (a, b) = (
        SafetensorsFile::open(a).unwrap(),
        SafetensorsFile::open(b).unwrap(),
    );
    let mut names: Vec<&str> = a.names().collect();
    names.sort_unstable();
    let mut other: Vec<&str> = b.names().collect();
    other.sort_unstable();
    assert_eq!(names, other);
    names
        .iter()
        .map(|n| max_relative_error(&a.read_f32(n).unwrap(), &b.read_f32(n).unwrap()))
        .fold(0.0, f64::max)
}

#[test]
fn both_engines_train_the_same_model_and_adapter() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::write(dir.join("base.toml"), BASE).unwrap();
    std::fs::write(dir.join("dsa.toml"), DSA).unwrap();
    for (engine, out) in [("candle", "base"), ("fused", "base-fused")] {
        assert_ok(&mmx(
            dir,
            engine,
            &["train", "base", "base.toml", "-o", out, "--quiet"],
        ));
    }
    let base_err = file_error(
        &dir.join("base/model.safetensors"),
        &dir.join("base-fused/model.safetensors"),
    );
    for (engine, out) in [("candle", "card"), ("fused", "card-fused")] {
        assert_ok(&mmx(
            dir,
            engine,
            &["train", "dsa", "dsa.toml", "-o", out, "--quiet"],
        ));
    }
    let adapter_err = file_error(
        &dir.join("card/adapter_model.safetensors"),
        &dir.join("card-fused/adapter_model.safetensors"),
    );
    println!("after 3 steps: base weights {base_err:.1e}, adapter {adapter_err:.1e}");
    assert!(
        base_err < 1e-5 && adapter_err < 1e-5,
        "{base_err:e}, {adapter_err:e}"
    );
    // The adapter moved: the comparison is not of two untouched initialisations.
    let first = |d: &str| -> f64 {
        let lines = std::fs::read_to_string(dir.join(d).join("metrics.jsonl")).unwrap();
        let v: Vec<serde_json::Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(v.len(), 3);
        v[2]["loss"].as_f64().unwrap() - v[0]["loss"].as_f64().unwrap()
    };
    assert!(
        first("card") < 0.0 && first("card-fused") < 0.0,
        "the loss falls"
    );
}
