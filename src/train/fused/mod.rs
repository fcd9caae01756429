//! The fused training engine: a hand-written CPU forward and backward pass of [`CausalLm`] in
//! f32 for supervised fine-tuning, the same mathematics as the candle model (and checked
//! against its autograd in `tests/fused.rs`) without candle's per-operation overhead, which
//! dominates on small models.
//!
//! [`Engine`] copies the model's weights into plain vectors ([`Engine::new`], and
//! [`Engine::refresh`] after each optimizer step; LoRA updates are merged into their weights),
//! runs each example as its own unpadded sequence (training batches are right-padded, so no
//! example ever sees padding) and adds the gradients of the tensors being trained into one flat
//! buffer. Each shard of a micro-batch runs on its own thread with its own buffer, its examples
//! stacked so that each projection is one large product (`matrixmultiply`'s `sgemm`, one thread
//! per call). The shards are fixed by the recipe and summed in order, so a run repeats bit for
//! bit whatever the threads' timing (on CPUs of one kind: `sgemm`, like candle's own kernels,
//! picks its kernel by the CPU's features).
//!
//! It applies to f32 models on the CPU without LoRA dropout ([`Engine::unsupported`] says why
//! not otherwise), training LoRA factors or every weight.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use mmx::train::batch::Example;
//! use mmx::train::fused::Engine;
//! use mmx::train::model::{CausalLm, LoraSpec};
//!
//! let spec = LoraSpec::new(8, 16.0, vec!["all-linear".into()]);
//! let model = CausalLm::load("models/tiny".as_ref(), Some(&spec), DType::F32, &Device::Cpu)?;
//! let mut engine = Engine::new(&model, &model.lora_vars())?;
//! let example = Example::new(Some(1), &[5, 6], &[7], 2);
//! let (nll, tokens) = engine.micro_batch(&[&example], 8, example.target_tokens())?;
//! let grads = engine.take_gradients()?; // one per LoRA factor, in `lora_vars` order
//! # Ok::<(), mmx::Error>(())
//! ```

mod attention;
mod decode;
mod linear;
mod loss;
mod matmul;
mod norm;
mod share;
mod step;
mod weights;

use candle_core::{DType, Device, Tensor, Var};

use super::batch::{Example, ImageRows};
use super::model::{candle, sharded, CausalLm, GenerateOptions, Projection};
use crate::error::{Error, Result};
use attention::RopeTable;
pub use loss::TokenStat;
use step::{Head, Scratch};
use weights::{Slots, Weights};

/// The model's sizes, as the pass needs them.
#[derive(Debug, Clone)]
pub(crate) struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub eps: f32,
    /// The token whose embedding an example's image rows replace (a vision-language model's).
    pub image_token: Option<u32>,
}

/// The fused forward and backward pass of one model, with its gradient buffers.
#[derive(Debug)]
pub struct Engine {
    dims: Dims,
    rope: RopeTable,
    slots: Slots,
    weights: Weights,
    /// Per shard: its scratch and its gradient buffer, kept from step to step.
    shards: Vec<(Scratch, Vec<f32>)>,
    /// The gradients summed since the last [`Engine::take_gradients`].
    sum: Vec<f32>,
}

impl Engine {
    /// Why the engine cannot train `model`, or `None` if it can: it runs f32 on the CPU, and
    /// has no LoRA dropout (its forward pass is the inference one).
    pub fn unsupported(model: &CausalLm) -> Option<String> {
        if let Some(reason) = Self::unsupported_for_inference(model) {
            return Some(reason);
        }
        let dropout = model
            .layers()
            .iter()
            .flat_map(|b| Projection::ALL.map(|p| b.projection(p).dropout()))
            .any(|d| d.is_some_and(|d| d > 0.0));
        if dropout && model.adapter_enabled() {
            return Some("the fused engine has no LoRA dropout".into());
        }
        None
    }

    /// Why the engine cannot run `model` without training it (generation, log-probabilities
    /// under a frozen model), or `None` if it can: it runs f32 on the CPU. Dropout does not
    /// matter there, as inference applies none.
    pub fn unsupported_for_inference(model: &CausalLm) -> Option<String> {
        if !model.device().is_cpu() {
            return Some("the fused engine runs on the CPU only".into());
        }
        if model.dtype() != DType::F32 {
            return Some(format!(
                "the fused engine runs f32 models, not {}",
                model.dtype().as_str()
            ));
        }
        None
    }

    /// An engine for `model` that computes the gradients of `trained` (the model's own
    /// variables, from [`CausalLm::lora_vars`] or [`CausalLm::weight_vars`]), in that order.
    pub fn new(model: &CausalLm, trained: &[(String, Var)]) -> Result<Engine> {
        let unsupported = if trained.is_empty() {
            Self::unsupported_for_inference(model)
        } else {
            Self::unsupported(model)
        };
        if let Some(reason) = unsupported {
            return Err(Error::ModelInput { message: reason });
        }
        let c = model.config();
        let named: Vec<(String, Vec<usize>)> = trained
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect();
        let slots = Slots::new(&named);
        let weights = Weights::read(model, &slots)?;
        Ok(Engine {
            dims: Dims {
                hidden: c.hidden_size,
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                intermediate: c.intermediate_size,
                vocab: c.vocab_size,
                eps: c.rms_norm_eps as f32,
                image_token: None,
            },
            rope: RopeTable::new(c.head_dim, c.max_position_embeddings, c.rope_theta),
            sum: vec![0.0; slots.len],
            slots,
            weights,
            shards: Vec::new(),
        })
    }

    /// The engine for the language model of a vision-language model whose prompts show images
    /// as runs of `image_token`: each takes the next row of its example's
    /// [`Example::image`] (projected features, the projector frozen).
    pub fn with_image_token(mut self, image_token: u32) -> Engine {
        self.dims.image_token = Some(image_token);
        self
    }

    /// Copies the model's weights again (after an optimizer step changed them).
    pub fn refresh(&mut self, model: &CausalLm) -> Result<()> {
        self.weights = Weights::read(model, &self.slots)?;
        Ok(())
    }

    /// Forward and backward of a micro-batch, `shard` examples per thread, the loss divided by
    /// `step_targets`: adds its gradients to those kept for [`Engine::take_gradients`] and
    /// returns its summed NLL and its input tokens.
    pub fn micro_batch(
        &mut self,
        examples: &[&Example],
        shard: usize,
        step_targets: usize,
    ) -> Result<(f64, usize)> {
        for e in examples {
            self.check(e)?;
        }
        let chunks: Vec<&[&Example]> = examples.chunks(shard.max(1)).collect();
        if self.shards.len() < chunks.len() {
            self.shards.resize_with(chunks.len(), Default::default);
        }
        let scale = (1.0 / step_targets.max(1) as f64) as f32;
        let Engine {
            dims,
            rope,
            slots,
            weights,
            shards,
            sum,
        } = self;
        let (dims, rope, weights, slots) = (&*dims, &*rope, &*weights, &*slots);
        let nlls: Vec<f64> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunks
                .iter()
                .zip(shards.iter_mut())
                .map(|(chunk, (scratch, grads))| {
                    scope.spawn(move || {
                        grads.clear();
                        grads.resize(slots.len, 0.0);
                        let head = Head::CrossEntropy { scale };
                        run(weights, dims, rope, chunk, head, scratch, grads)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a training shard does not panic"))
                .collect()
        });
        add_shards(sum, &shards[..chunks.len()]);
        let tokens = examples.iter().map(|e| e.tokens.len() - 1).sum();
        Ok((nlls.iter().sum(), tokens))
    }

    /// A policy-gradient pass over completions (`examples`: prompt then completion, no
    /// end-of-sequence token added beyond what was sampled), `shard` per thread, at
    /// `temperature`: returns each example's completion tokens' [`TokenStat`]s and, with
    /// `backward`, adds the gradient of `Σ coef(example, token, logp) · logp` to the sums kept
    /// for [`Engine::take_gradients`].
    pub fn policy_batch(
        &mut self,
        examples: &[&Example],
        shard: usize,
        temperature: f32,
        coef: &(dyn Fn(usize, usize, f64) -> f64 + Sync),
        backward: bool,
    ) -> Result<Vec<Vec<TokenStat>>> {
        for e in examples {
            self.check(e)?;
        }
        let shard = shard.max(1);
        let chunks: Vec<&[&Example]> = examples.chunks(shard).collect();
        if self.shards.len() < chunks.len() {
            self.shards.resize_with(chunks.len(), Default::default);
        }
        let Engine {
            dims,
            rope,
            slots,
            weights,
            shards,
            sum,
        } = self;
        let (dims, rope, weights, slots) = (&*dims, &*rope, &*weights, &*slots);
        let stats: Vec<Vec<Vec<TokenStat>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunks
                .iter()
                .enumerate()
                .zip(shards.iter_mut())
                .map(|((c, chunk), (scratch, grads))| {
                    scope.spawn(move || {
                        grads.clear();
                        grads.resize(slots.len, 0.0);
                        // Row r of the shard's head is token `rows[r].1` of example `rows[r].0`.
                        let mut rows = Vec::new();
                        for (i, e) in chunk.iter().enumerate() {
                            let n = e.tokens.len() - e.prompt_len.max(1).min(e.tokens.len());
                            rows.extend((0..n).map(|t| (c * shard + i, t)));
                        }
                        let local = |r: usize, logp: f64| {
                            let (e, t) = rows[r];
                            coef(e, t, logp)
                        };
                        let mut flat = Vec::with_capacity(rows.len());
                        let head = Head::Policy {
                            temperature,
                            coef: &local,
                            stats: &mut flat,
                            backward,
                        };
                        run(weights, dims, rope, chunk, head, scratch, grads);
                        let mut out = Vec::with_capacity(chunk.len());
                        let mut at = 0;
                        for e in chunk.iter() {
                            let n = e.tokens.len() - e.prompt_len.max(1).min(e.tokens.len());
                            out.push(flat[at..at + n].to_vec());
                            at += n;
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a training shard does not panic"))
                .collect()
        });
        if backward {
            add_shards(sum, &shards[..chunks.len()]);
        }
        Ok(stats.into_iter().flatten().collect())
    }

    /// Continues every prompt as [`CausalLm::generate_sharded`] does (the same samplers, seeds
    /// and stopping rule, `shard_rows` prompts per thread, shard `i` with `options(i)`), through
    /// the engine's weights as they stand. The tokens equal candle's up to rounding: a near tie
    /// between two tokens can go the other way.
    pub fn generate_sharded(
        &self,
        prompts: &[Vec<u32>],
        shard_rows: usize,
        options: impl Fn(usize) -> GenerateOptions + Sync,
    ) -> Result<Vec<Vec<u32>>> {
        self.generate_with_images(prompts, &[], shard_rows, options)
    }

    /// [`Engine::generate_sharded`] of prompts that show images (one per prompt, or none for
    /// all): each prompt's image tokens take its image's rows in order, as in training
    /// ([`Engine::with_image_token`]).
    pub fn generate_with_images(
        &self,
        prompts: &[Vec<u32>],
        images: &[Option<ImageRows>],
        shard_rows: usize,
        options: impl Fn(usize) -> GenerateOptions + Sync,
    ) -> Result<Vec<Vec<u32>>> {
        if !images.is_empty() && images.len() != prompts.len() {
            return Err(Error::ModelInput {
                message: format!("{} prompts but {} images", prompts.len(), images.len()),
            });
        }
        for (row, p) in prompts.iter().enumerate() {
            self.check_tokens(p)?;
            self.check_image(p, images.get(row).and_then(Option::as_ref))?;
        }
        let images: Vec<Option<&ImageRows>> = images.iter().map(Option::as_ref).collect();
        let (weights, dims, rope) = (&self.weights, &self.dims, &self.rope);
        let shard_rows = shard_rows.max(1);
        sharded(prompts, shard_rows, |i, rows| {
            let from = (i * shard_rows).min(images.len());
            let shown = &images[from..(from + rows.len()).min(images.len())];
            decode::generate(weights, dims, rope, rows, shown, &options(i))
        })
    }

    /// The gradients summed since the last call, one tensor per trained variable in the order
    /// given to [`Engine::new`]; the sums start again from zero.
    pub fn take_gradients(&mut self) -> Result<Vec<Tensor>> {
        let grads = self
            .slots
            .params
            .iter()
            .map(|p| {
                let n: usize = p.shape.iter().product();
                Tensor::from_vec(
                    self.sum[p.offset..p.offset + n].to_vec(),
                    p.shape.as_slice(),
                    &Device::Cpu,
                )
                .map_err(candle(format!("gradient of `{}`", p.name)))
            })
            .collect::<Result<Vec<_>>>()?;
        self.sum.fill(0.0);
        Ok(grads)
    }

    /// Refuses image rows that do not fit the image tokens of `tokens`.
    fn check_image(&self, tokens: &[u32], image: Option<&ImageRows>) -> Result<()> {
        let count = self
            .dims
            .image_token
            .map_or(0, |id| tokens.iter().filter(|&&t| t == id).count());
        let (rows, width) = image.map_or((0, self.dims.hidden), |i| (i.rows(), i.width));
        if count != rows || width != self.dims.hidden {
            return Err(Error::ModelInput {
                message: format!(
                    "a sequence holds {count} image tokens but its image has {rows} rows of {width} (the model's width is {})",
                    self.dims.hidden
                ),
            });
        }
        Ok(())
    }

    /// Refuses a token outside the vocabulary.
    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.dims.vocab;
        match tokens.iter().find(|&&id| id as usize >= vocab) {
            Some(id) => Err(Error::ModelInput {
                message: format!("token {id} is outside the vocabulary (`vocab_size` {vocab})"),
            }),
            None => Ok(()),
        }
    }

    /// Refuses an example candle's forward pass would refuse: a token outside the vocabulary,
    /// a position beyond the rotary table, or image rows that do not fit its image tokens.
    fn check(&self, e: &Example) -> Result<()> {
        self.check_tokens(&e.tokens)?;
        let tokens = self
            .dims
            .image_token
            .map_or(0, |id| e.tokens.iter().filter(|&&t| t == id).count());
        let (rows, width) = e
            .image
            .as_ref()
            .map_or((0, self.dims.hidden), |i| (i.rows(), i.width));
        if tokens != rows || width != self.dims.hidden {
            return Err(Error::ModelInput {
                message: format!(
                    "an example holds {tokens} image tokens but its image has {rows} rows of {width} (the model's width is {})",
                    self.dims.hidden
                ),
            });
        }
        let max = self.rope.positions();
        if e.tokens.len() > max + 1 {
            return Err(Error::ModelInput {
                message: format!(
                    "an example reaches position {}, beyond `max_position_embeddings` ({max})",
                    e.tokens.len() - 2
                ),
            });
        }
        Ok(())
    }
}

/// Generation through the fused engine where it runs `model` (f32 on the CPU), else through
/// candle ([`CausalLm::generate_sharded`]): the same tokens up to rounding.
pub fn generate_sharded(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    shard_rows: usize,
    options: impl Fn(usize) -> GenerateOptions + Sync,
) -> Result<Vec<Vec<u32>>> {
    if Engine::unsupported_for_inference(model).is_some() {
        return model.generate_sharded(prompts, shard_rows, options);
    }
    Engine::new(model, &[])?.generate_sharded(prompts, shard_rows, options)
}

/// Adds the shards' gradients into `sum`, in shard order whatever order the threads finished
/// in (so that a run repeats bit for bit).
fn add_shards(sum: &mut [f32], shards: &[(Scratch, Vec<f32>)]) {
    for (_, grads) in shards {
        for (s, g) in sum.iter_mut().zip(grads) {
            *s += g;
        }
    }
}

/// A shard's checked examples through [`step::pass`], a shared prompt start run once
/// ([`share::sequences`]); their summed NLL.
fn run(
    weights: &Weights,
    dims: &Dims,
    rope: &RopeTable,
    examples: &[&Example],
    head: Head<'_>,
    scratch: &mut Scratch,
    grads: &mut [f32],
) -> f64 {
    let seqs = share::sequences(examples, dims.image_token);
    if seqs.is_empty() {
        return 0.0;
    }
    step::pass(weights, dims, rope, &seqs, head, scratch, grads)
}
