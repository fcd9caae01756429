//! Batched generation ([`CausalLm::generate`]): prompts left-padded into one batch, a
//! prefill, then one token per step through the [`KvCache`](super::KvCache), each row stopping
//! at its first end-of-sequence token.

use candle_core::{DType, Tensor};

use super::cache::KvCache;
use super::candle;
use super::causal_lm::CausalLm;
use super::sampler::{Sampler, Sampling};
use crate::error::{Error, Result};
use crate::rng::SplitMix;

/// What [`CausalLm::generate`] does.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// At most this many new tokens per row.
    pub max_new_tokens: usize,
    /// Greedy or sampled.
    pub sampling: Sampling,
    /// Row r draws from the stream of (seed, r): rows differ, and a row's tokens do not
    /// depend on the other rows.
    pub seed: u64,
    /// A row stops after the first of these it produces.
    pub eos_token_ids: Vec<u32>,
    /// Fills the left of shorter prompts (masked out, so its value does not matter).
    pub pad_token_id: u32,
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_new_tokens`, stopping at the model's end-of-sequence
    /// tokens and padding with its pad token (else its first end-of-sequence token, else 0).
    pub fn greedy(model: &CausalLm, max_new_tokens: usize) -> Self {
        let config = model.config();
        GenerateOptions {
            max_new_tokens,
            sampling: Sampling::Greedy,
            seed: 0,
            eos_token_ids: config.eos_token_ids.clone(),
            pad_token_id: config
                .pad_token_id
                .or(config.eos_token_ids.first().copied())
                .unwrap_or(0),
        }
    }
}

impl GenerateOptions {
    /// One sampler per row, row r drawing from the stream of (seed, r).
    pub(crate) fn samplers(&self, rows: usize) -> Result<Vec<Sampler>> {
        (0..rows)
            .map(|r| {
                let seed = SplitMix::derive(self.seed, &[r as u64]).next_u64();
                Sampler::new(self.sampling, seed)
            })
            .collect()
    }

    /// Refuses an empty prompt, and prompts whose continuation would pass the rotary table's
    /// `max_positions`.
    pub(crate) fn check_prompts(&self, prompts: &[Vec<u32>], max_positions: usize) -> Result<()> {
        if let Some(row) = prompts.iter().position(Vec::is_empty) {
            return Err(Error::ModelInput {
                message: format!("prompt {row} is empty; generation needs at least one token"),
            });
        }
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        // The last token fed sits at position width + max_new_tokens - 2.
        if width + self.max_new_tokens.max(1) - 1 > max_positions {
            return Err(Error::ModelInput {
                message: format!(
                    "a prompt of {width} tokens plus {} new ones exceeds `max_position_embeddings` ({max_positions})",
                    self.max_new_tokens
                ),
            });
        }
        Ok(())
    }
}

/// Runs `generate` on shards of `shard_rows` prompts, shard `i` on its own thread: the outputs
/// in the prompts' order.
pub(crate) fn sharded<T: Send>(
    prompts: &[Vec<u32>],
    shard_rows: usize,
    generate: impl Fn(usize, &[Vec<u32>]) -> Result<Vec<T>> + Sync,
) -> Result<Vec<T>> {
    let generate = &generate;
    let shards: Vec<Result<Vec<T>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .chunks(shard_rows.max(1))
            .enumerate()
            .map(|(i, rows)| scope.spawn(move || generate(i, rows)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a generation shard does not panic"))
            .collect()
    });
    let mut out = Vec::with_capacity(prompts.len());
    for shard in shards {
        out.extend(shard?);
    }
    Ok(out)
}

/// The last position's logits of `[b, s, vocab]`, per row, as f32 on the host.
fn last_logits(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let s = logits.dim(1).map_err(candle("logits"))?;
    logits
        .narrow(1, s - 1, 1)
        .and_then(|t| t.squeeze(1))
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec2::<f32>())
        .map_err(candle("logits"))
}

impl CausalLm {
    /// Continues every prompt and returns each row's new tokens, its end-of-sequence token
    /// included when it produced one. Uses the model as it is set (adapter on or off; call
    /// it in inference mode so that no dropout applies).
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
    ) -> Result<Vec<Vec<u32>>> {
        self.generate_with(prompts, options, &|ids, mask, cache| {
            self.forward(ids, Some(mask), Some(cache))
        })
    }

    /// [`CausalLm::generate`] with the prefill (the left-padded prompts `[b, s]`, their mask,
    /// the empty cache) done by `prefill`: a vision-language model puts image features among
    /// the prompts' embeddings there.
    pub(crate) fn generate_with(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        prefill: &dyn Fn(&Tensor, &Tensor, &mut KvCache) -> Result<Tensor>,
    ) -> Result<Vec<Vec<u32>>> {
        let mut samplers = options.samplers(prompts.len())?;
        let mut out = vec![Vec::new(); prompts.len()];
        if prompts.is_empty() || options.max_new_tokens == 0 {
            return Ok(out);
        }
        options.check_prompts(prompts, self.config().max_position_embeddings)?;
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let (b, device) = (prompts.len(), self.device());
        let mut ids = Vec::with_capacity(b * width);
        let mut mask = Vec::with_capacity(b * width);
        for p in prompts {
            let pad = width - p.len();
            ids.extend(std::iter::repeat_n(options.pad_token_id, pad).chain(p.iter().copied()));
            mask.extend(std::iter::repeat_n(0u32, pad).chain(std::iter::repeat_n(1, p.len())));
        }
        let batch = |ids: Vec<u32>, mask: Vec<u32>, s: usize| -> Result<(Tensor, Tensor)> {
            Ok((
                Tensor::from_vec(ids, (b, s), device).map_err(candle("input_ids"))?,
                Tensor::from_vec(mask, (b, s), device).map_err(candle("attention_mask"))?,
            ))
        };
        let mut cache = self.new_cache();
        let (ids, mask) = batch(ids, mask, width)?;
        let mut logits = prefill(&ids, &mask, &mut cache)?;
        let mut done = vec![false; b];
        for step in 0..options.max_new_tokens {
            let rows = last_logits(&logits)?;
            for (r, row) in rows.iter().enumerate() {
                if done[r] {
                    continue;
                }
                let token = samplers[r].sample(row)?;
                out[r].push(token);
                done[r] = options.eos_token_ids.contains(&token);
            }
            if done.iter().all(|&d| d) || step + 1 == options.max_new_tokens {
                break;
            }
            // Finished rows are fed masked padding: they cost a little compute and change
            // nothing for the others.
            let next: Vec<u32> = (0..b)
                .map(|r| match (done[r], out[r].last()) {
                    (false, Some(&t)) => t,
                    _ => options.pad_token_id,
                })
                .collect();
            let live: Vec<u32> = done.iter().map(|&d| u32::from(!d)).collect();
            let (ids, mask) = batch(next, live, 1)?;
            logits = self.forward(&ids, Some(&mask), Some(&mut cache))?;
        }
        Ok(out)
    }

    /// [`CausalLm::generate`] in shards of `shard_rows` prompts, each shard a batch of its own
    /// (its own KV cache) on its own thread, shard `i` with `options(i)` (its own seed): the
    /// outputs in the prompts' order, and the same for any number of cores.
    pub fn generate_sharded(
        &self,
        prompts: &[Vec<u32>],
        shard_rows: usize,
        options: impl Fn(usize) -> GenerateOptions + Sync,
    ) -> Result<Vec<Vec<u32>>> {
        sharded(prompts, shard_rows, |i, rows| {
            self.generate(rows, &options(i))
        })
    }
}
