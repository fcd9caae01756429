//! [`CausalLm`]: a Llama/Qwen2 decoder with an output head, loaded from a Hugging Face model
//! directory, with LoRA on chosen projections. The forward pass gives logits for every
//! position (training needs all of them) and records gradients for every LoRA factor.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::attention::{Attention, Context};
use super::block::Block;
use super::cache::KvCache;
use super::candle;
use super::config::ModelConfig;
use super::lora::{matmul_t, LoraLinear, LoraSpec};
use super::mask::Mask;
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::projection::Projection;
use super::rope::Rope;
use super::weights::{Naming, Weights};
use crate::adapter::PEFT_PREFIX;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::rng::SplitMix;

/// A causal language model with optional LoRA adapters. Not `Clone`: a copy would share the
/// LoRA variables, and training one would silently train the other.
#[derive(Debug)]
pub struct CausalLm {
    dir: PathBuf,
    config: ModelConfig,
    embed: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    rope: Rope,
    lora: Option<LoraSpec>,
    /// How adapters name its modules: `model.layers.…` for a text model, the nesting of a
    /// vision-language model's language model otherwise.
    modules: Naming,
    /// Where its checkpoint keeps its tensors (`model.…`, or nested in a vision-language one).
    checkpoint_names: Naming,
    /// With [`CausalLm::load_trainable`]: every weight as a variable, by its name.
    weights: Vec<(String, Var)>,
    adapter_enabled: bool,
    training: bool,
    dtype: DType,
    device: Device,
}

/// A token-id or mask tensor `[b, s]` as host rows of i64.
fn host_rows(t: &Tensor, what: &str) -> Result<Vec<Vec<i64>>> {
    if t.rank() != 2 {
        return Err(Error::ModelInput {
            message: format!("`{what}` must be [batch, seq], not {:?}", t.dims()),
        });
    }
    t.to_dtype(DType::I64)
        .and_then(|t| t.to_vec2::<i64>())
        .map_err(candle(format!("`{what}`")))
}

impl CausalLm {
    /// Loads `config.json` and the weights (`model.safetensors`, or the shards that
    /// `model.safetensors.index.json` lists) of `dir` in `dtype` on `device`, and adds fresh
    /// LoRA updates where `lora` says.
    pub fn load(
        dir: &Path,
        lora: Option<&LoraSpec>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_weights(dir, lora, dtype, device, false)
    }

    /// Loads `dir` with every weight a variable, for training the model's own weights (the
    /// embedding is one variable however often it is used: tied heads train it once).
    pub fn load_trainable(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_weights(dir, None, dtype, device, true)
    }

    fn load_weights(
        dir: &Path,
        lora: Option<&LoraSpec>,
        dtype: DType,
        device: &Device,
        trainable: bool,
    ) -> Result<Self> {
        let config = ModelConfig::read(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        let weights = Weights::new(&checkpoint, dtype, device, trainable);
        Self::assemble(dir, config, weights, lora, dtype, device)
    }

    /// The language model of a vision-language checkpoint in `dir`: its `config` (the
    /// checkpoint's `text_config`) and its tensors where `naming` says.
    /// Adapters name its modules as `modules` says (PEFT's names of the nested modules).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load_nested(
        dir: &Path,
        checkpoint: &Checkpoint,
        config: ModelConfig,
        naming: Naming,
        modules: Naming,
        lora: Option<&LoraSpec>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let weights = Weights::new(checkpoint, dtype, device, false).named(naming);
        let mut model = Self::assemble(dir, config, weights, None, dtype, device)?;
        model.modules = modules;
        if let Some(spec) = lora {
            model.attach_lora(spec)?;
        }
        Ok(model)
    }

    /// The module path adapters use for projection `p` of layer `layer`.
    pub fn module_path(&self, layer: usize, p: Projection) -> String {
        self.modules.key(&p.path(layer))
    }

    /// The base checkpoint's name of projection `p` of layer `layer`, without `.weight`
    /// (`model.layers.0.mlp.down_proj`), as calibration statistics name modules.
    pub fn checkpoint_module(&self, layer: usize, p: Projection) -> String {
        self.checkpoint_names.key(&p.path(layer))
    }

    /// The text model's own path (`model.layers.…`) of an adapter's module path, if it names
    /// one of this model's modules.
    pub(crate) fn canonical_module(&self, module: &str) -> Option<String> {
        module
            .strip_prefix(self.modules.model.as_str())
            .map(|rest| format!("model.{rest}"))
    }

    fn assemble(
        dir: &Path,
        config: ModelConfig,
        weights: Weights<'_>,
        lora: Option<&LoraSpec>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            return Err(Error::ModelInput {
                message: format!(
                    "model dtype `{}` is not one of f32, f16, bf16, f64",
                    dtype.as_str()
                ),
            });
        }
        let (vocab, hidden) = (config.vocab_size, config.hidden_size);
        let embed = weights.get("model.embed_tokens.weight", &[vocab, hidden])?;
        let lm_head = if config.tie_word_embeddings {
            embed.clone()
        } else if weights.contains("lm_head.weight") {
            weights.get("lm_head.weight", &[vocab, hidden])?
        } else {
            return Err(Error::Model {
                path: dir.to_path_buf(),
                message: "has no `lm_head.weight` and `config.json` does not set `tie_word_embeddings: true`".into(),
            });
        };
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::new(
                weights.get(name, &[hidden])?,
                config.rms_norm_eps,
            ))
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let linear = |p: Projection| -> Result<LoraLinear> {
                let path = p.path(i);
                let (out_f, in_f) = config.projection_shape(p);
                let weight = weights.get(&format!("{path}.weight"), &[out_f, in_f])?;
                let bias = if config.projection_bias(p) {
                    Some(weights.get(&format!("{path}.bias"), &[out_f])?)
                } else {
                    None
                };
                Ok(LoraLinear::new(weight, bias))
            };
            let attention = Attention::new(
                [
                    linear(Projection::Q)?,
                    linear(Projection::K)?,
                    linear(Projection::V)?,
                    linear(Projection::O)?,
                ],
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim,
            );
            let mlp = Mlp::new([
                linear(Projection::Gate)?,
                linear(Projection::Up)?,
                linear(Projection::Down)?,
            ]);
            layers.push(Block::new(
                norm(&format!("model.layers.{i}.input_layernorm.weight"))?,
                attention,
                norm(&format!("model.layers.{i}.post_attention_layernorm.weight"))?,
                mlp,
            ));
        }
        let rope = Rope::new(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            dtype,
            device,
        )
        .map_err(candle("rotary tables"))?;
        let final_norm = norm("model.norm.weight")?;
        let mut model = CausalLm {
            dir: dir.to_path_buf(),
            norm: final_norm,
            config,
            embed,
            layers,
            lm_head,
            rope,
            lora: None,
            modules: Naming::default(),
            checkpoint_names: weights.naming().clone(),
            adapter_enabled: true,
            training: false,
            dtype,
            device: device.clone(),
            weights: weights.into_vars(),
        };
        if let Some(spec) = lora {
            model.attach_lora(spec)?;
        }
        Ok(model)
    }

    /// The model directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The validated configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The dtype of the base weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The decoder layers.
    pub fn layers(&self) -> &[Block] {
        &self.layers
    }

    /// The embedding `[vocab, hidden]`.
    pub(crate) fn embed(&self) -> &Tensor {
        &self.embed
    }

    /// The output head `[vocab, hidden]` (the embedding itself when tied).
    pub(crate) fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// The norm before the output head.
    pub(crate) fn final_norm(&self) -> &RmsNorm {
        &self.norm
    }

    /// The LoRA configuration in force, if any.
    pub fn lora_spec(&self) -> Option<&LoraSpec> {
        self.lora.as_ref()
    }

    pub(crate) fn set_lora_spec(&mut self, spec: Option<LoraSpec>) {
        self.lora = spec;
    }

    pub(crate) fn layers_mut(&mut self) -> &mut [Block] {
        &mut self.layers
    }

    /// Replaces any LoRA updates by fresh PEFT-initialised ones on the modules `spec`
    /// targets. Each target must match a module; A is drawn from `spec.seed`, per module.
    pub fn attach_lora(&mut self, spec: &LoraSpec) -> Result<()> {
        let fail = |message: String| Error::Model {
            path: self.dir.clone(),
            message,
        };
        spec.check().map_err(|e| fail(e.to_string()))?;
        let paths: Vec<String> = (0..self.layers.len())
            .flat_map(|i| Projection::ALL.map(move |p| (i, p)))
            .map(|(i, p)| self.module_path(i, p))
            .collect();
        for target in &spec.target_modules {
            if !paths.iter().any(|p| LoraSpec::target_matches(target, p)) {
                return Err(fail(format!(
                    "LoRA target `{target}` matches no module; the model's linear modules are `model.layers.N.self_attn.{{q,k,v,o}}_proj` and `model.layers.N.mlp.{{gate,up,down}}_proj` for N below {}, or `all-linear`",
                    self.layers.len()
                )));
            }
        }
        let scaling = spec.scaling();
        let modules = self.modules.clone();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (k, p) in Projection::ALL.into_iter().enumerate() {
                let linear = layer.projection_mut(p);
                if spec.selects(&modules.key(&p.path(i))) {
                    let seed = SplitMix::derive(spec.seed, &[i as u64, k as u64]).next_u64();
                    linear
                        .init_lora(spec.r, spec.alpha, scaling, spec.dropout, seed)
                        .map_err(candle(format!("LoRA of `{}`", p.path(i))))?;
                } else {
                    linear.remove_lora();
                }
            }
        }
        self.lora = Some(spec.clone());
        Ok(())
    }

    /// Removes every LoRA update.
    pub fn remove_lora(&mut self) {
        for layer in &mut self.layers {
            for p in Projection::ALL {
                layer.projection_mut(p).remove_lora();
            }
        }
        self.lora = None;
    }

    /// Turns the adapters on or off for later forward passes (off: the base model, as PEFT's
    /// `disable_adapter`; the factors are kept).
    pub fn set_adapter_enabled(&mut self, enabled: bool) {
        self.adapter_enabled = enabled;
    }

    /// Whether the adapters take part in the forward pass.
    pub fn adapter_enabled(&self) -> bool {
        self.adapter_enabled
    }

    /// Training mode (LoRA dropout on) or inference mode (off, the default).
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Whether it is in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// An empty cache for [`forward`](Self::forward).
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Every weight as `(name, variable)` when loaded with [`CausalLm::load_trainable`], in
    /// load order; empty otherwise.
    pub fn weight_vars(&self) -> &[(String, Var)] {
        &self.weights
    }

    /// Writes the model as a Hugging Face directory: `config.json` and the tokenizer files
    /// copied from where it was loaded, and `model.safetensors` with every weight variable's
    /// current values (f32). Only for a model loaded with [`CausalLm::load_trainable`].
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        if self.weights.is_empty() {
            return Err(Error::Output {
                path: dir.to_path_buf(),
                message: "only a model loaded with its weights trainable can be saved".into(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        for file in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
        ] {
            let from = self.dir.join(file);
            if from.is_file() && from != dir.join(file) {
                let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
                crate::tensor::write_atomic(&dir.join(file), &bytes)?;
            }
        }
        let mut tensors = Vec::with_capacity(self.weights.len());
        for (name, var) in &self.weights {
            tensors.push(super::f32_entry(name.clone(), var.as_tensor())?);
        }
        let metadata = std::collections::BTreeMap::from([("format".to_string(), "pt".to_string())]);
        crate::tensor::write_safetensors(&dir.join("model.safetensors"), &tensors, &metadata)
    }

    /// Every LoRA factor as `(PEFT key, variable)`, layer by layer in projection order, A
    /// before B: `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, ...
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut vars = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for p in Projection::ALL {
                let linear = layer.projection(p);
                if let (Some(a), Some(b)) = (linear.lora_a(), linear.lora_b()) {
                    let path = self.module_path(i, p);
                    vars.push((format!("{PEFT_PREFIX}{path}.lora_A.weight"), a.clone()));
                    vars.push((format!("{PEFT_PREFIX}{path}.lora_B.weight"), b.clone()));
                }
            }
        }
        vars
    }

    /// Logits `[b, s, vocab]` in the model's dtype for every position of `input_ids [b, s]`.
    ///
    /// `attention_mask [b, s]` marks real tokens with 1 and padding with 0 (left padding:
    /// positions count from each row's first real token); `None` means all real. With a
    /// `cache`, the tokens follow those already cached (the mask covers the new tokens only)
    /// and their keys and values are appended to it.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let x = self.embed_tokens(input_ids)?;
        self.forward_embeds(&x, attention_mask, cache)
    }

    /// The embeddings `[b, s, hidden]` of `input_ids [b, s]`, every id checked against the
    /// vocabulary.
    pub fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        let ids = host_rows(input_ids, "input_ids")?;
        let (b, s) = (ids.len(), ids.first().map_or(0, Vec::len));
        if b == 0 || s == 0 {
            return Err(Error::ModelInput {
                message: format!("`input_ids` is empty ({:?})", input_ids.dims()),
            });
        }
        let vocab = self.config.vocab_size;
        let mut flat = Vec::with_capacity(b * s);
        for (row, tokens) in ids.iter().enumerate() {
            for (i, &id) in tokens.iter().enumerate() {
                if id < 0 || id as u64 >= vocab as u64 {
                    return Err(Error::ModelInput {
                        message: format!(
                            "`input_ids` [{row}, {i}] is {id}, outside the vocabulary (`vocab_size` {vocab})"
                        ),
                    });
                }
                flat.push(id as u32);
            }
        }
        let ids = Tensor::from_vec(flat, b * s, &self.device).map_err(candle("input_ids"))?;
        self.embed
            .index_select(&ids, 0)
            .and_then(|e| e.reshape((b, s, self.config.hidden_size)))
            .map_err(candle("embedding"))
    }

    /// [`CausalLm::forward`] from input embeddings `[b, s, hidden]` (a vision-language model
    /// puts image features among the tokens' embeddings).
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.config.hidden_size;
        let (b, s) = match embeds.dims() {
            &[b, s, h] if h == hidden && b > 0 && s > 0 => (b, s),
            other => {
                return Err(Error::ModelInput {
                    message: format!(
                    "input embeddings must be [batch, seq, {hidden}] and not empty, not {other:?}"
                ),
                })
            }
        };
        let new_mask: Vec<Vec<bool>> = match attention_mask {
            None => vec![vec![true; s]; b],
            Some(m) => {
                if m.dims() != [b, s] {
                    return Err(Error::ModelInput {
                        message: format!(
                            "`attention_mask` has shape {:?}, `input_ids` {:?}",
                            m.dims(),
                            [b, s]
                        ),
                    });
                }
                let rows = host_rows(m, "attention_mask")?;
                rows.iter()
                    .map(|r| {
                        r.iter()
                            .map(|&v| match v {
                                0 => Ok(false),
                                1 => Ok(true),
                                other => Err(Error::ModelInput {
                                    message: format!(
                                        "`attention_mask` holds {other}; it must be 0 or 1"
                                    ),
                                }),
                            })
                            .collect::<Result<Vec<bool>>>()
                    })
                    .collect::<Result<_>>()?
            }
        };
        let mut cache = cache;
        let past = match cache.as_deref() {
            Some(c) if c.num_layers() != self.layers.len() => {
                return Err(Error::ModelInput {
                    message: format!(
                        "the KV cache has {} layers, the model {}",
                        c.num_layers(),
                        self.layers.len()
                    ),
                })
            }
            Some(c) if c.batch_size().is_some_and(|cb| cb != b) => {
                return Err(Error::ModelInput {
                    message: format!(
                        "the KV cache holds {} rows, `input_ids` {b}",
                        c.batch_size().unwrap_or(0)
                    ),
                })
            }
            Some(c) if !c.is_empty() => c.mask().to_vec(),
            _ => vec![Vec::new(); b],
        };
        let mask = Mask::build(
            &past,
            &new_mask,
            self.config.max_position_embeddings,
            self.dtype,
            &self.device,
        )?;
        let mut x = embeds.clone();
        let (cos, sin) = self
            .rope
            .select(&mask.positions)
            .map_err(candle("rotary tables"))?;
        let ctx = Context {
            cos: &cos,
            sin: &sin,
            bias: &mask.bias,
            lora: self.adapter_enabled,
            train: self.training,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer
                .forward(&x, &ctx, cache.as_deref_mut().map(|c| (c, i)))
                .map_err(candle(format!("layer {i}")))?;
        }
        if let Some(c) = cache {
            c.push_mask(&new_mask);
        }
        self.norm
            .forward(&x)
            .and_then(|h| matmul_t(&h, &self.lm_head))
            .map_err(candle("output head"))
    }
}
