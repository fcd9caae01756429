//! The trainers' model (DESIGN.md §7): a Llama/Qwen2-family causal LM in candle with LoRA on
//! chosen linear layers.
//!
//! - [`ModelConfig`] reads and validates a Hugging Face `config.json`.
//! - [`CausalLm`] loads the weights, runs the forward pass for every position
//!   ([`CausalLm::forward`]), lists its trainable LoRA factors ([`CausalLm::lora_vars`]), and
//!   reads and writes PEFT adapters ([`CausalLm::save_adapter`], [`CausalLm::load_adapter`]).
//! - [`LoraSpec`] says which projections get a LoRA and how; [`LoraLinear`] is one adapted
//!   linear layer with PEFT's semantics.
//! - [`KvCache`] and [`CausalLm::generate`] give batched, left-padded generation (greedy or
//!   sampled with a seeded [`Sampler`]).
//!
//! Every operation on the training path records a gradient: candle's fused softmax, RMSNorm
//! and rotary kernels do not, so the blocks here are written from differentiable primitives
//! ([`RmsNorm`], [`Rope`], [`Attention`]).
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use mmx::train::model::{CausalLm, LoraSpec};
//!
//! let spec = LoraSpec::new(8, 16.0, vec!["all-linear".into()]);
//! let model = CausalLm::load("models/tiny".as_ref(), Some(&spec), DType::F32, &Device::Cpu)?;
//! let ids = Tensor::new(&[[1u32, 5, 9]], &Device::Cpu).map_err(mmx::train::model::candle("ids"))?;
//! let logits = model.forward(&ids, None, None)?; // [1, 3, vocab]
//! assert_eq!(logits.dims()[1], 3);
//! model.save_adapter("out/adapter".as_ref(), "models/tiny")?;
//! # Ok::<(), mmx::Error>(())
//! ```

mod adapter;
mod attention;
mod block;
mod cache;
mod causal_lm;
mod config;
mod generate;
mod input_gram;
mod llava;
mod lora;
mod mask;
mod mlp;
mod norm;
mod projection;
mod rope;
mod sampler;
pub mod vision;
mod weights;

pub use attention::Attention;
pub use block::Block;
pub use cache::KvCache;
pub use causal_lm::CausalLm;
pub use config::{Architecture, ModelConfig};
pub(crate) use generate::sharded;
pub use generate::GenerateOptions;
pub use input_gram::InputGram;
pub use llava::{FeatureSelect, ImageEncoder, Llava, LlavaConfig, IMAGE_EMBEDS, PROJECTOR_MODULE};
pub use lora::{LoraLinear, LoraSpec, ALL_LINEAR};
pub use mlp::Mlp;
pub use norm::RmsNorm;
pub use projection::Projection;
pub use rope::Rope;
pub use sampler::{Sampler, Sampling};

use crate::error::Error;

/// A tensor's values as f32, row-major; `what` names it in the error.
pub(crate) fn f32_values(t: &candle_core::Tensor, what: &str) -> crate::error::Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(candle(format!("tensor `{what}`")))
}

/// A tensor as a safetensors entry named `name`: f32 little-endian bytes, its shape.
pub(crate) fn f32_entry(
    name: String,
    t: &candle_core::Tensor,
) -> crate::error::Result<(crate::tensor::TensorSpec, Vec<u8>)> {
    let bytes = f32_values(t, &name)?
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let spec = crate::tensor::TensorSpec {
        name,
        dtype: crate::tensor::Dtype::F32,
        shape: t.dims().to_vec(),
    };
    Ok((spec, bytes))
}

/// Wraps a candle error with what was being computed, for `map_err`.
pub fn candle(context: impl Into<String>) -> impl FnOnce(candle_core::Error) -> Error {
    let context = context.into();
    move |source| Error::Candle {
        context,
        source: Box::new(source),
    }
}
