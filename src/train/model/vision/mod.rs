//! The vision side of a LLaVA-style model, as transformers defines it: the CLIP vision tower
//! ([`ClipVision`]) that turns an image into patch features, and the projector
//! ([`Projector`]) that maps them into the language model's embedding space.

mod clip;
mod preprocess;
mod projector;

use candle_core::Tensor;
use serde::Deserialize;

use super::lora::matmul_t;
pub use clip::ClipVision;
pub use preprocess::ImageProcessor;
pub use projector::Projector;

/// The `vision_config` of a LLaVA checkpoint: a CLIP vision tower.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VisionConfig {
    /// Width of the tower.
    pub hidden_size: usize,
    /// Width of its MLPs.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Side of the (square) input image, in pixels.
    pub image_size: usize,
    /// Side of a patch, in pixels.
    pub patch_size: usize,
    /// Colour channels (3).
    #[serde(default = "three")]
    pub num_channels: usize,
    /// LayerNorm epsilon.
    #[serde(default = "clip_eps")]
    pub layer_norm_eps: f64,
    /// The MLPs' activation, by its transformers name.
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
}

fn three() -> usize {
    3
}

fn clip_eps() -> f64 {
    1e-5
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}

impl VisionConfig {
    /// Patches along one side of the image.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Why the sizes cannot make a tower, if they cannot.
    pub(crate) fn problem(&self) -> Option<String> {
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Some(format!(
                "`image_size` {} is not a multiple of `patch_size` {}",
                self.image_size, self.patch_size
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Some(format!(
                "`hidden_size` {} does not split into {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Activation::parse(&self.hidden_act).err()
    }
}

/// The activations the vision tower and the projector use, by their transformers names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `gelu`: the exact (erf) GELU.
    Gelu,
    /// `quick_gelu`: `x·σ(1.702·x)`.
    QuickGelu,
    /// `gelu_pytorch_tanh`, `gelu_new`: the tanh approximation.
    GeluTanh,
}

impl Activation {
    pub(crate) fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "gelu" => Ok(Activation::Gelu),
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu_pytorch_tanh" | "gelu_new" => Ok(Activation::GeluTanh),
            other => Err(format!(
                "activation `{other}` is not one of gelu, quick_gelu, gelu_pytorch_tanh"
            )),
        }
    }

    pub(crate) fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

/// `x·Wᵀ + b` over the last dimension.
#[derive(Debug, Clone)]
pub(crate) struct Affine {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

impl Affine {
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = matmul_t(x, &self.w)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// LayerNorm over the last dimension, in the tensor's dtype.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    pub w: Tensor,
    pub b: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let last = x.rank() - 1;
        let mean = x.mean_keepdim(last)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(last)?;
        centred
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.w)?
            .broadcast_add(&self.b)
    }
}
