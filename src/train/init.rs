//! A new model from a seed: the word-level tokenizer of the synthetic cases' closed vocabulary
//! and a Llama-architecture model with Hugging Face's initialisation (normal weights of
//! standard deviation 0.02, unit norms), written as a Hugging Face directory. The base recipe
//! starts here, so the bundled base is reproducible from its seed.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

use super::synth;
use crate::error::{Error, Result};
use crate::rng::SplitMix;
use crate::tensor::{write_atomic, write_safetensors, Dtype, TensorSpec};

/// The special tokens, with ids 0 to 3.
pub const SPECIAL_TOKENS: [&str; 4] = ["<pad>", "<s>", "</s>", "<unk>"];

/// The prompt's and completion's own words besides the cases' vocabulary.
const FRAME_WORDS: [&str; 5] = ["\n", "Question", "Options", "Reasoning", "Answer"];

/// The shape of a new model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Longest sequence.
    pub max_position_embeddings: usize,
}

/// The tokenizer's vocabulary: the special tokens, the frame words, then the cases' words.
pub fn vocabulary() -> Vec<String> {
    let mut words: Vec<String> = SPECIAL_TOKENS
        .iter()
        .chain(&FRAME_WORDS)
        .map(|s| s.to_string())
        .collect();
    for w in synth::vocabulary() {
        if !words.contains(&w) {
            words.push(w);
        }
    }
    for letter in 'A'..='H' {
        let l = letter.to_string();
        if !words.contains(&l) {
            words.push(l);
        }
    }
    words
}

/// A `tokenizer.json` (word level): spaces separate words and are dropped; newlines and the
/// punctuation `, . : ; ( ) /` are tokens of their own; an unknown word is `<unk>`.
pub fn tokenizer_json() -> Value {
    let vocab: serde_json::Map<String, Value> = vocabulary()
        .into_iter()
        .enumerate()
        .map(|(i, w)| (w, json!(i)))
        .collect();
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "[^\\S\\n]+"}, "behavior": "Removed", "invert": false},
            {"type": "Split", "pattern": {"Regex": "[,.:;()/\\n]"}, "behavior": "Isolated", "invert": false}
        ]},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// Writes a new model into `dir`: `config.json`, `tokenizer.json`, `tokenizer_config.json`
/// and `model.safetensors` (f32) drawn from `seed`.
pub fn init_model(dir: &Path, spec: &InitSpec, seed: u64) -> Result<()> {
    let fail = |message: String| Error::Model {
        path: dir.to_path_buf(),
        message,
    };
    if spec.num_attention_heads == 0
        || spec.num_key_value_heads == 0
        || !spec.hidden_size.is_multiple_of(spec.num_attention_heads)
        || !spec
            .num_attention_heads
            .is_multiple_of(spec.num_key_value_heads)
    {
        return Err(fail(format!(
            "`hidden_size` {} must divide into `num_attention_heads` {}, which must divide into `num_key_value_heads` {}",
            spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let words = vocabulary().len();
    // Rounded up to a multiple of 8, as vocabularies usually are.
    let vocab_size = words.div_ceil(8) * 8;
    let head_dim = spec.hidden_size / spec.num_attention_heads;
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": false,
        "mlp_bias": false,
        "tie_word_embeddings": true,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
    });
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON serialises");
    write_atomic(&dir.join("config.json"), &pretty(&config))?;
    write_atomic(&dir.join("tokenizer.json"), &pretty(&tokenizer_json()))?;
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "model_max_length": spec.max_position_embeddings,
    });
    write_atomic(
        &dir.join("tokenizer_config.json"),
        &pretty(&tokenizer_config),
    )?;

    let (h, m) = (spec.hidden_size, spec.intermediate_size);
    let kv = spec.num_key_value_heads * head_dim;
    let mut shapes: Vec<(String, Vec<usize>, bool)> = vec![(
        "model.embed_tokens.weight".into(),
        vec![vocab_size, h],
        false,
    )];
    for i in 0..spec.num_hidden_layers {
        let p = format!("model.layers.{i}");
        shapes.push((format!("{p}.input_layernorm.weight"), vec![h], true));
        shapes.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h], false));
        shapes.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h], false));
        shapes.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h], false));
        shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h], false));
        shapes.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            true,
        ));
        shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![m, h], false));
        shapes.push((format!("{p}.mlp.up_proj.weight"), vec![m, h], false));
        shapes.push((format!("{p}.mlp.down_proj.weight"), vec![h, m], false));
    }
    shapes.push(("model.norm.weight".into(), vec![h], true));
    let tensors: Vec<(TensorSpec, Vec<u8>)> = shapes
        .into_iter()
        .enumerate()
        .map(|(index, (name, shape, unit))| {
            let n: usize = shape.iter().product();
            let mut rng = SplitMix::derive(seed, &[0x696e_6974, index as u64]);
            let values: Vec<f32> = if unit {
                vec![1.0; n]
            } else {
                (0..n).map(|_| 0.02 * normal(&mut rng)).collect()
            };
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let spec = TensorSpec {
                name,
                dtype: Dtype::F32,
                shape,
            };
            (spec, bytes)
        })
        .collect();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join("model.safetensors"), &tensors, &metadata)
}

/// A standard normal draw (Box–Muller on two uniforms in (0, 1]).
pub(crate) fn normal(rng: &mut SplitMix) -> f32 {
    let uniform = |rng: &mut SplitMix| ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let (u, v) = (uniform(rng), uniform(rng));
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::tokenizer::Tokenizer;

    #[test]
    fn the_tokenizer_covers_prompts_and_completions_and_decodes_answers() {
        let dir = tempfile::tempdir().unwrap();
        let spec = InitSpec {
            hidden_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            intermediate_size: 24,
            max_position_embeddings: 256,
        };
        init_model(dir.path(), &spec, 5).unwrap();
        let tokenizer = Tokenizer::load(dir.path()).unwrap();
        let unk = tokenizer.token_to_id("<unk>").unwrap();
        let splits = synth::generate(&synth::SynthSpec {
            seed: 2,
            per_specialty: 20,
            validation: 0,
            test: 0,
            shuffle_options: true,
            guidelines: true,
            answer_only: 0,
        })
        .unwrap();
        for case in &splits.train {
            let text = format!("{}{}", case.prompt(), case.completion());
            let ids = tokenizer.encode(&text, false).unwrap();
            assert!(!ids.contains(&unk), "unknown word in {text}");
            let back = tokenizer.decode(&ids, true).unwrap();
            assert_eq!(
                crate::train::parse_answer(&back),
                Some(case.answer_letter()),
                "{back}"
            );
        }
        // The same seed gives the same weights; another seed others.
        let again = tempfile::tempdir().unwrap();
        init_model(again.path(), &spec, 5).unwrap();
        let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
        assert_eq!(read(dir.path()), read(again.path()));
        init_model(again.path(), &spec, 6).unwrap();
        assert_ne!(read(dir.path()), read(again.path()));
    }
}
