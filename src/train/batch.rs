//! Supervised examples as token ids and their batches: `<bos> prompt completion <eos>`, with
//! the loss on the completion and the end-of-sequence token only (labels elsewhere are
//! masked out), right-padded into `[batch, seq]` tensors. An example of a vision-language
//! model carries its image's rows ([`ImageRows`]), which its image tokens take in order.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::model::candle;
use crate::error::Result;

/// An image as a vision-language model's prompt holds it: one row per image token, `[tokens,
/// width]` row-major f32 (the projected features, in the language model's embedding space, or
/// the vision tower's features where the projector is trained). Shared, not copied, between
/// the examples of one case (a group's rollouts), which is how they are known to show the same
/// image.
#[derive(Debug, Clone)]
pub struct ImageRows {
    /// `tokens × width` values.
    pub values: Arc<[f32]>,
    /// The width of a row.
    pub width: usize,
}

impl ImageRows {
    /// Rows of `width` values.
    pub fn new(values: Vec<f32>, width: usize) -> ImageRows {
        ImageRows {
            values: values.into(),
            width,
        }
    }

    /// The number of rows (image tokens).
    pub fn rows(&self) -> usize {
        self.values.len() / self.width.max(1)
    }

    /// Whether both are the one image (the same rows, not a copy).
    pub fn same(a: Option<&ImageRows>, b: Option<&ImageRows>) -> bool {
        match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(&a.values, &b.values),
            _ => false,
        }
    }
}

impl PartialEq for ImageRows {
    fn eq(&self, other: &Self) -> bool {
        self.width == other.width
            && self.values.len() == other.values.len()
            && self
                .values
                .iter()
                .zip(other.values.iter())
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

impl Eq for ImageRows {}

/// One example: its tokens and how many of them are prompt (`<bos>` included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// `<bos> prompt completion <eos>`.
    pub tokens: Vec<u32>,
    /// The prompt's length in tokens; the loss covers the tokens after it.
    pub prompt_len: usize,
    /// The image its image tokens show, for a vision-language model.
    pub image: Option<ImageRows>,
}

impl Example {
    /// An example from prompt and completion ids.
    pub fn new(bos: Option<u32>, prompt: &[u32], completion: &[u32], eos: u32) -> Example {
        let mut tokens: Vec<u32> = bos.into_iter().collect();
        tokens.extend_from_slice(prompt);
        let prompt_len = tokens.len();
        tokens.extend_from_slice(completion);
        tokens.push(eos);
        Example {
            tokens,
            prompt_len,
            image: None,
        }
    }

    /// The same example showing `image`.
    pub fn with_image(self, image: Option<ImageRows>) -> Example {
        Example { image, ..self }
    }

    /// Tokens the loss is taken on.
    pub fn target_tokens(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// A right-padded batch: the model reads `inputs` (all but each row's last token), predicts
/// `targets` (the next token), and `weights` is 1 where that target is a completion token.
#[derive(Debug)]
pub struct Batch {
    /// `[b, s]` u32 input ids.
    pub inputs: Tensor,
    /// `[b, s]` 1 for real tokens, 0 for padding.
    pub attention: Tensor,
    /// `[b, s]` u32 next-token ids (padding: 0).
    pub targets: Tensor,
    /// `[b, s]` f32: 1 where the target counts in the loss.
    pub weights: Tensor,
    /// Real (unpadded) input tokens.
    pub tokens: usize,
    /// Targets in the loss.
    pub target_tokens: usize,
}

impl Batch {
    /// Collates `examples` (each at least two tokens) with padding id `pad`.
    pub fn new(examples: &[&Example], pad: u32, device: &Device) -> Result<Batch> {
        let s = examples
            .iter()
            .map(|e| e.tokens.len() - 1)
            .max()
            .unwrap_or(1);
        let b = examples.len();
        let (mut inputs, mut attention) = (vec![pad; b * s], vec![0u32; b * s]);
        let (mut targets, mut weights) = (vec![0u32; b * s], vec![0f32; b * s]);
        let (mut tokens, mut target_tokens) = (0, 0);
        for (row, e) in examples.iter().enumerate() {
            let n = e.tokens.len() - 1;
            for i in 0..n {
                inputs[row * s + i] = e.tokens[i];
                attention[row * s + i] = 1;
                targets[row * s + i] = e.tokens[i + 1];
                // Position i predicts token i + 1: in the loss when that token is past the prompt.
                if i + 1 >= e.prompt_len {
                    weights[row * s + i] = 1.0;
                    target_tokens += 1;
                }
            }
            tokens += n;
        }
        let tensor = |v: Vec<u32>| Tensor::from_vec(v, (b, s), device);
        Ok(Batch {
            inputs: tensor(inputs).map_err(candle("batch inputs"))?,
            attention: tensor(attention).map_err(candle("batch mask"))?,
            targets: tensor(targets).map_err(candle("batch targets"))?,
            weights: Tensor::from_vec(weights, (b, s), device).map_err(candle("batch weights"))?,
            tokens,
            target_tokens,
        })
    }
}

/// Σ over the weighted positions of −log p(target), from logits `[b, s, vocab]`: the
/// completion's summed negative log-likelihood (divide by the step's target count for the
/// mean). Differentiable.
pub fn summed_nll(logits: &Tensor, batch: &Batch) -> Result<Tensor> {
    let ctx = || candle("loss");
    let logits = logits.to_dtype(candle_core::DType::F32).map_err(ctx())?;
    let log_p = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).map_err(ctx())?;
    let picked = log_p
        .gather(&batch.targets.unsqueeze(2).map_err(ctx())?, 2)
        .and_then(|t| t.squeeze(2))
        .map_err(ctx())?;
    (picked * &batch.weights)
        .and_then(|t| t.sum_all())
        .and_then(|t| t.neg())
        .map_err(ctx())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_covers_the_completion_and_eos_only() {
        // bos 1, prompt [5, 6], completion [7], eos 2: tokens [1, 5, 6, 7, 2], prompt_len 3.
        let a = Example::new(Some(1), &[5, 6], &[7], 2);
        let b = Example::new(Some(1), &[5], &[8, 9], 2);
        assert_eq!(a.tokens, [1, 5, 6, 7, 2]);
        assert_eq!(a.target_tokens(), 2);
        let batch = Batch::new(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            batch.inputs.to_vec2::<u32>().unwrap(),
            [[1, 5, 6, 7], [1, 5, 8, 9]]
        );
        assert_eq!(
            batch.targets.to_vec2::<u32>().unwrap(),
            [[5, 6, 7, 2], [5, 8, 9, 2]]
        );
        // a: targets 7 and 2 (positions 2, 3); b: 8, 9, 2 (positions 1, 2, 3).
        assert_eq!(
            batch.weights.to_vec2::<f32>().unwrap(),
            [[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]]
        );
        assert_eq!((batch.tokens, batch.target_tokens), (8, 5));
        let short = Example::new(Some(1), &[5], &[], 2);
        let padded = Batch::new(&[&a, &short], 0, &Device::Cpu).unwrap();
        assert_eq!(
            padded.attention.to_vec2::<u32>().unwrap(),
            [[1, 1, 1, 1], [1, 1, 0, 0]]
        );
    }

    #[test]
    fn nll_by_hand() {
        // Two tokens of vocabulary 2, uniform logits: −log p = ln 2 per weighted target.
        let a = Example::new(None, &[0], &[1, 0], 1);
        let batch = Batch::new(&[&a], 0, &Device::Cpu).unwrap();
        let logits = Tensor::zeros((1, 3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let nll = summed_nll(&logits, &batch)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((nll - 3.0 * std::f32::consts::LN_2).abs() < 1e-6, "{nll}");
    }
}
