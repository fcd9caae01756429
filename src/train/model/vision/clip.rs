//! [`ClipVision`]: CLIP's vision transformer as transformers' `CLIPVisionTransformer` runs it:
//! non-overlapping patches embedded by one product, a class token, learned positions, a
//! pre-norm, then pre-norm encoder layers. A LLaVA model reads the hidden states of one
//! layer (`vision_feature_layer`), so the tower runs only that far.

use candle_core::{Tensor, D};

use super::{Activation, Affine, LayerNorm, VisionConfig};
use crate::error::{Error, Result};
use crate::train::model::candle;
use crate::train::model::lora::matmul_t;
use crate::train::model::weights::Weights;

/// One encoder layer.
#[derive(Debug, Clone)]
struct Layer {
    norm1: LayerNorm,
    q: Affine,
    k: Affine,
    v: Affine,
    out: Affine,
    norm2: LayerNorm,
    fc1: Affine,
    fc2: Affine,
}

/// The vision tower.
#[derive(Debug, Clone)]
pub struct ClipVision {
    config: VisionConfig,
    act: Activation,
    /// The patch embedding as a matrix `[hidden, channels·patch·patch]` (no bias, as CLIP's).
    patch: Tensor,
    class: Tensor,
    /// `[patches + 1, hidden]`.
    position: Tensor,
    pre_norm: LayerNorm,
    layers: Vec<Layer>,
}

impl ClipVision {
    /// The tower whose tensors are named `{prefix}embeddings.…`, `{prefix}encoder.layers.…`.
    pub(crate) fn load(config: &VisionConfig, weights: &Weights<'_>, prefix: &str) -> Result<Self> {
        if let Some(problem) = config.problem() {
            return Err(Error::ModelInput {
                message: format!("`vision_config`: {problem}"),
            });
        }
        let act = Activation::parse(&config.hidden_act)
            .map_err(|message| Error::ModelInput { message })?;
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let (c, p) = (config.num_channels, config.patch_size);
        let n = config.grid() * config.grid();
        let get = |name: &str, shape: &[usize]| weights.get(&format!("{prefix}{name}"), shape);
        let affine = |name: &str, out: usize, inp: usize| -> Result<Affine> {
            Ok(Affine {
                w: get(&format!("{name}.weight"), &[out, inp])?,
                b: Some(get(&format!("{name}.bias"), &[out])?),
            })
        };
        let norm = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                w: get(&format!("{name}.weight"), &[h])?,
                b: get(&format!("{name}.bias"), &[h])?,
                eps: config.layer_norm_eps,
            })
        };
        let patch = get("embeddings.patch_embedding.weight", &[h, c, p, p])?
            .reshape((h, c * p * p))
            .map_err(candle("patch embedding"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let at = format!("encoder.layers.{l}");
                Ok(Layer {
                    norm1: norm(&format!("{at}.layer_norm1"))?,
                    q: affine(&format!("{at}.self_attn.q_proj"), h, h)?,
                    k: affine(&format!("{at}.self_attn.k_proj"), h, h)?,
                    v: affine(&format!("{at}.self_attn.v_proj"), h, h)?,
                    out: affine(&format!("{at}.self_attn.out_proj"), h, h)?,
                    norm2: norm(&format!("{at}.layer_norm2"))?,
                    fc1: affine(&format!("{at}.mlp.fc1"), i, h)?,
                    fc2: affine(&format!("{at}.mlp.fc2"), h, i)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipVision {
            config: config.clone(),
            act,
            patch,
            class: get("embeddings.class_embedding", &[h])?,
            position: get("embeddings.position_embedding.weight", &[n + 1, h])?,
            pre_norm: norm("pre_layrnorm")?,
            layers,
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// The hidden states `[b, patches + 1, hidden]` (the class token first) after `layers`
    /// encoder layers (0: the embeddings after the pre-norm), as transformers'
    /// `hidden_states[layers]`, for `pixel_values [b, channels, size, size]`.
    pub fn hidden_states(&self, pixel_values: &Tensor, layers: usize) -> Result<Tensor> {
        let c = &self.config;
        let (s, g, p) = (c.image_size, c.grid(), c.patch_size);
        let b = match pixel_values.dims() {
            &[b, ch, hh, ww] if ch == c.num_channels && hh == s && ww == s => b,
            other => {
                return Err(Error::ModelInput {
                    message: format!(
                        "`pixel_values` must be [images, {}, {s}, {s}], not {other:?}",
                        c.num_channels
                    ),
                })
            }
        };
        if layers > self.layers.len() {
            return Err(Error::ModelInput {
                message: format!(
                    "hidden states of layer {layers} asked of a tower of {} layers",
                    self.layers.len()
                ),
            });
        }
        let x = (|| -> candle_core::Result<Tensor> {
            // [b, c, g, p, g, p] -> [b, g, g, c, p, p]: each patch's pixels in the order of the
            // convolution's kernel.
            let patches = pixel_values
                .reshape((b, c.num_channels, g, p, g, p))?
                .permute((0, 2, 4, 1, 3, 5))?
                .reshape((b, g * g, c.num_channels * p * p))?;
            let embedded = matmul_t(&patches, &self.patch)?;
            let class =
                self.class
                    .reshape((1, 1, c.hidden_size))?
                    .broadcast_as((b, 1, c.hidden_size))?;
            let x = Tensor::cat(&[&class, &embedded], 1)?.broadcast_add(&self.position)?;
            self.pre_norm.forward(&x)
        })()
        .map_err(candle("vision embeddings"))?;
        let mut x = x;
        for (l, layer) in self.layers.iter().take(layers).enumerate() {
            x = self
                .layer(layer, &x)
                .map_err(candle(format!("vision layer {l}")))?;
        }
        Ok(x)
    }

    fn layer(&self, l: &Layer, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, h) = x.dims3()?;
        let heads = self.config.num_attention_heads;
        let d = h / heads;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()
        };
        let y = l.norm1.forward(x)?;
        let q = split(l.q.forward(&y)?)?;
        let k = split(l.k.forward(&y)?)?;
        let v = split(l.v.forward(&y)?)?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, h))?;
        let x = (x + l.out.forward(&ctx)?)?;
        let y = l.norm2.forward(&x)?;
        let y = l.fc2.forward(&self.act.apply(&l.fc1.forward(&y)?)?)?;
        x + y
    }
}
