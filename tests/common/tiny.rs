//! Tiny random Llama and Qwen2 models for the model and trainer tests.

use std::collections::BTreeMap;
use std::path::Path;

use mmx::tensor::{write_safetensors, Dtype, TensorSpec};

use super::Rng;

/// The shape of a tiny model.
pub struct Tiny {
    /// `llama` or `qwen2` (which adds q/k/v biases).
    pub arch: &'static str,
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub tied: bool,
    pub max_positions: usize,
}

/// What a value belongs to, for the caller's draw.
#[derive(Debug, Clone, Copy)]
pub enum Part {
    Embedding,
    LmHead,
    /// An RMSNorm weight.
    Norm,
    /// A projection's weight, with its fan-in.
    Weight {
        fan_in: usize,
    },
    Bias,
}

/// Writes `config.json` and `model.safetensors` of a model of shape `t` into `dir`, every
/// value drawn by `draw` from one stream seeded by `seed`, tensor by tensor in a fixed order.
pub fn write_tiny(dir: &Path, t: &Tiny, seed: u64, mut draw: impl FnMut(Part, &mut Rng) -> f32) {
    let head_dim = t.hidden / t.heads;
    let config = serde_json::json!({
        "model_type": t.arch,
        "vocab_size": t.vocab,
        "hidden_size": t.hidden,
        "intermediate_size": t.intermediate,
        "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads,
        "num_key_value_heads": t.kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": t.max_positions,
        "tie_word_embeddings": t.tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    });
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut tensors: Vec<(TensorSpec, Vec<u8>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, part: Part| {
        let n: usize = shape.iter().product();
        let bytes = (0..n)
            .flat_map(|_| draw(part, &mut rng).to_le_bytes())
            .collect();
        let spec = TensorSpec {
            name,
            dtype: Dtype::F32,
            shape,
        };
        tensors.push((spec, bytes));
    };
    let (q, kv) = (t.heads * head_dim, t.kv_heads * head_dim);
    let (hidden, vocab) = (t.hidden, t.vocab);
    add(
        "model.embed_tokens.weight".into(),
        vec![vocab, hidden],
        Part::Embedding,
    );
    if !t.tied {
        add("lm_head.weight".into(), vec![vocab, hidden], Part::LmHead);
    }
    add("model.norm.weight".into(), vec![hidden], Part::Norm);
    for i in 0..t.layers {
        let p = format!("model.layers.{i}");
        for (name, rows, cols) in [
            ("self_attn.q_proj", q, hidden),
            ("self_attn.k_proj", kv, hidden),
            ("self_attn.v_proj", kv, hidden),
            ("self_attn.o_proj", hidden, q),
            ("mlp.gate_proj", t.intermediate, hidden),
            ("mlp.up_proj", t.intermediate, hidden),
            ("mlp.down_proj", hidden, t.intermediate),
        ] {
            let weight = Part::Weight { fan_in: cols };
            add(format!("{p}.{name}.weight"), vec![rows, cols], weight);
            let has_bias =
                t.arch == "qwen2" && name.starts_with("self_attn") && name != "self_attn.o_proj";
            if has_bias {
                add(format!("{p}.{name}.bias"), vec![rows], Part::Bias);
            }
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            add(format!("{p}.{norm}.weight"), vec![hidden], Part::Norm);
        }
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors, &BTreeMap::new()).unwrap();
}
