//! `mmx train gba` end to end on a model small enough for CI: a base drawn from a seed, a DSA
//! adapter trained on guideline-styled cases, then GRPO-family steps from it on answer-only
//! cases: the adapter loads, the metrics carry TRL's names and the guidelines' figures, resume
//! gives the same adapter as an uninterrupted run, `--publish` records the lineage back to the
//! base, and the policy pass's gradient equals supervised fine-tuning's where they must agree.

use std::path::Path;

mod common;

use common::{assert_ok, mmx};

const BASE: &str = r#"[train]
method = "base"
seed = 3
epochs = 1
batch_size = 8
max_steps = 4

[train.init]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
intermediate_size = 64
max_position_embeddings = 256

[train.data]
synthetic = { seed = 0, train = 8, guidelines = true }
completion = "full"

[train.optim]
lr = 3e-3
"#;

const DSA: &str = r#"[train]
method = "dsa"
base = "base"
specialty = "cardiology"
seed = 5
epochs = 1
batch_size = 4

[train.data]
synthetic = { seed = 0, train = 8, guidelines = true }
specialties = ["cardiology"]

[train.lora]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj"]

[train.optim]
lr = 5e-3
"#;

fn gba(extra: &str) -> String {
    format!(
        r#"[gba]
base = "base"
adapter = "dsa"
guidelines = "{guidelines}"
specialty = "cardiology"
seed = 9
steps = 3
cases_per_step = 2
num_generations = 4
max_completion_length = 24
temperature = 1.0
micro_batch = 3
checkpoint_every = 1
{extra}

[gba.data]
synthetic = {{ seed = 0, train = 8, answer_only = 6, guidelines = true }}
specialties = ["cardiology"]

[gba.optim]
lr = 1e-2
"#,
        guidelines = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("recipes/guidelines.toml")
            .display()
    )
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn factors(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

/// A base and a DSA adapter in `dir`.
fn base_and_dsa(dir: &Path) {
    std::fs::write(dir.join("base.toml"), BASE).unwrap();
    assert_ok(&mmx(
        &["train", "base", "base.toml", "-o", "base", "--quiet"],
        dir,
    ));
    std::fs::write(dir.join("dsa.toml"), DSA).unwrap();
    assert_ok(&mmx(
        &["train", "dsa", "dsa.toml", "-o", "dsa", "--quiet"],
        dir,
    ));
}

#[test]
fn gba_trains_logs_resumes_and_publishes_its_lineage() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    base_and_dsa(dir);
    std::fs::write(
        dir.join("gba.toml"),
        gba("beta = 0.04\nepsilon_high = 0.28"),
    )
    .unwrap();
    assert_ok(&mmx(
        &["train", "gba", "gba.toml", "-o", "gba", "--quiet"],
        dir,
    ));
    let steps = metrics(&dir.join("gba"));
    assert_eq!(steps.len(), 3);
    for key in [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "entropy",
        "completions/mean_length",
        "completions/max_length",
        "completions/clipped_ratio",
        "generation_tokens_per_second",
    ] {
        assert!(steps[0][key].is_number(), "`{key}` in {}", steps[0]);
    }
    let kl = steps[2]["kl"].as_f64().unwrap();
    assert!(kl >= 0.0, "k3 is never negative: {kl}");
    for reward in ["accuracy", "format", "adherence"] {
        let r = &steps[0]["rewards"][reward];
        assert!(
            (0.0..=1.0).contains(&r["mean"].as_f64().unwrap()),
            "{reward}: {r}"
        );
    }
    // Eight rollouts per step (two cases of four) split by cardiology's priors.
    let guidelines = steps[0]["guidelines"].as_object().unwrap();
    assert_eq!(guidelines.len(), 4);
    let rollouts: u64 = guidelines
        .values()
        .map(|g| g["rollouts"].as_u64().unwrap())
        .sum();
    assert_eq!(rollouts, 8);
    for phase in ["generation", "scoring", "forward_backward", "optimizer"] {
        assert!(steps[0]["time"][phase].as_f64().unwrap() >= 0.0, "{phase}");
    }
    // The adapter is a PEFT adapter of the DSA's modules, and training moved it.
    let adapter = mmx::adapter::Adapter::open(dir.join("gba")).unwrap();
    assert_eq!(adapter.modules().len(), 4);
    assert_ne!(factors(&dir.join("gba")), factors(&dir.join("dsa")));

    // Resume from the step-1 checkpoint: the same adapter as the uninterrupted run.
    let resumed = dir.join("resumed");
    std::fs::create_dir_all(resumed.join("checkpoints")).unwrap();
    let from = dir.join("gba/checkpoints/step-000001");
    let to = resumed.join("checkpoints/step-000001");
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    let out = mmx(
        &[
            "train", "gba", "gba.toml", "-o", "resumed", "--resume", "--quiet",
        ],
        dir,
    );
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("resumed from step 1"));
    assert_eq!(
        factors(&dir.join("gba")),
        factors(&resumed),
        "resume repeats the run"
    );

    // Published with its parent and its recipe; `mmx log` walks back to the base.
    let registry = dir.join("registry");
    let reg = registry.to_str().unwrap();
    assert_ok(&mmx(
        &["publish", "base", "tiny:v1", "--registry", reg],
        dir,
    ));
    assert_ok(&mmx(
        &[
            "publish",
            "dsa",
            "card:dsa",
            "--base",
            "tiny:v1",
            "--registry",
            reg,
        ],
        dir,
    ));
    let published = gba("")
        .replace("base = \"base\"", "base = \"registry:tiny:v1\"")
        .replace("adapter = \"dsa\"", "adapter = \"registry:card:dsa\"")
        .replace("steps = 3", "steps = 1");
    std::fs::write(dir.join("gba-reg.toml"), published).unwrap();
    assert_ok(&mmx(
        &[
            "train",
            "gba",
            "gba-reg.toml",
            "-o",
            "gba-reg",
            "--quiet",
            "--publish",
            "card:gba",
            "--registry",
            reg,
        ],
        dir,
    ));
    let log = mmx(&["log", "card:gba", "--registry", reg], dir);
    assert_ok(&log);
    let text = String::from_utf8_lossy(&log.stdout);
    assert!(
        text.contains("card:dsa") || text.contains("blake3:"),
        "{text}"
    );
    let show = mmx(&["show", "card:gba", "--json", "--registry", reg], dir);
    assert_ok(&show);
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(shown.contains("cardiology"), "{shown}");
    // The result only: the adapter, not the run's metrics beside it.
    assert!(shown.contains("adapter_model.safetensors"), "{shown}");
    assert!(!shown.contains("metrics.jsonl"), "{shown}");
}

#[test]
fn dynamic_sampling_and_masking_run_and_bad_recipes_are_named() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    base_and_dsa(dir);
    let extra = "dynamic_sampling = true\nmax_generation_batches = 2\nmask_truncated_completions = true\nestimator = \"rloo\"\nloss_type = \"grpo\"\nnum_iterations = 2";
    std::fs::write(dir.join("ds.toml"), gba(extra)).unwrap();
    assert_ok(&mmx(
        &["train", "gba", "ds.toml", "-o", "ds", "--quiet"],
        dir,
    ));
    for step in metrics(&dir.join("ds")) {
        let generated = step["groups_generated"].as_u64().unwrap();
        assert!(
            (2..=4).contains(&generated),
            "capped at two batches: {generated}"
        );
        assert!(step["kl"].is_null(), "no KL without beta");
    }
    std::fs::write(dir.join("bad.toml"), gba("estimator = \"ppo\"")).unwrap();
    let out = mmx(&["train", "gba", "bad.toml", "-o", "bad"], dir);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("ppo"), "{err}");
    std::fs::write(dir.join("bad.toml"), gba("[gba.rewards]\nlength = 1.0")).unwrap();
    let out = mmx(&["train", "gba", "bad.toml", "-o", "bad"], dir);
    assert!(String::from_utf8_lossy(&out.stderr).contains("`length`"));
    assert!(!dir.join("bad").join("adapter_model.safetensors").exists());
}

#[test]
fn the_policy_pass_with_unit_weights_is_the_supervised_gradient() {
    use candle_core::{DType, Device};
    use mmx::train::batch::Example;
    use mmx::train::fused::Engine;
    use mmx::train::model::{CausalLm, LoraSpec};

    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::write(dir.join("base.toml"), BASE).unwrap();
    assert_ok(&mmx(
        &["train", "base", "base.toml", "-o", "base", "--quiet"],
        dir,
    ));
    let spec = LoraSpec::new(4, 8.0, vec!["all-linear".into()]);
    let model = CausalLm::load(&dir.join("base"), Some(&spec), DType::F32, &Device::Cpu).unwrap();
    // B starts at zero: give it values so that every factor has a gradient.
    for (name, var) in model.lora_vars() {
        if name.contains("lora_B") {
            let t = (var.as_tensor().ones_like().unwrap() * 0.01).unwrap();
            var.set(&t).unwrap();
        }
    }
    let mut engine = Engine::new(&model, &model.lora_vars()).unwrap();
    let examples = [
        Example::new(Some(1), &[5, 6, 7], &[8, 9], 2),
        Example::new(Some(1), &[10, 11], &[12, 13, 14, 15], 2),
    ];
    let refs: Vec<&Example> = examples.iter().collect();
    let targets: usize = examples.iter().map(|e| e.target_tokens()).sum();
    engine.micro_batch(&refs, 8, targets).unwrap();
    let sft = engine.take_gradients().unwrap();
    // −logp per token over the targets at temperature 1: coef −1/targets.
    let w = -1.0 / targets as f64;
    let stats = engine
        .policy_batch(&refs, 1, 1.0, &|_, _, _| w, true)
        .unwrap();
    let pg = engine.take_gradients().unwrap();
    assert_eq!(
        stats[0].len(),
        3,
        "two completion tokens and the end of sequence"
    );
    assert_eq!(stats[1].len(), 5);
    for (a, b) in sft.iter().zip(&pg) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let norm = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
        assert!(norm > 0.0);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * norm.max(1.0), "{x} vs {y}");
        }
    }
}
