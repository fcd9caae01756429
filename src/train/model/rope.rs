//! [`Rope`]: rotary position embeddings in Hugging Face Llama's convention (the two halves of a
//! head rotate together: `x·cos + rotate_half(x)·sin`), from precomputed tables and
//! differentiable operations. candle's fused `rope` records no gradient.

use candle_core::{DType, Device, Tensor, D};

/// Cosine and sine tables `[max_positions, head_dim]`.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The tables for positions `0..max_positions` with base `theta`, computed in f64 and
    /// stored in `dtype`. Frequency i (of head_dim / 2) is `theta^(-2i / head_dim)`; each
    /// appears twice, once per half of the head.
    pub fn new(
        head_dim: usize,
        max_positions: usize,
        theta: f64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for pos in 0..max_positions {
            for _ in 0..2 {
                for f in &inv_freq {
                    let angle = pos as f64 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let table =
            |v: Vec<f64>| Tensor::from_vec(v, (max_positions, head_dim), device)?.to_dtype(dtype);
        Ok(Rope {
            cos: table(cos)?,
            sin: table(sin)?,
        })
    }

    /// The rows of both tables for `positions [b, s]` (u32), shaped `[b, 1, s, head_dim]` to
    /// broadcast over heads. Positions must be below the table's length.
    pub fn select(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, s) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let d = self.cos.dim(1)?;
        let pick = |t: &Tensor| t.index_select(&flat, 0)?.reshape((b, 1, s, d));
        Ok((pick(&self.cos)?, pick(&self.sin)?))
    }

    /// Rotates `x [b, heads, s, head_dim]` by tables from [`Rope::select`].
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_each_pair_of_halves_by_position_times_frequency() {
        // head_dim 4, theta 100: frequencies 1 and 0.1. x = (1, 0, 0, 1) at position 2
        // pairs (x0, x2) = (1, 0) rotated by 2 rad and (x1, x3) = (0, 1) by 0.2 rad.
        let rope = Rope::new(4, 3, 100.0, DType::F64, &Device::Cpu).unwrap();
        let pos = Tensor::new(&[[2u32]], &Device::Cpu).unwrap();
        let (cos, sin) = rope.select(&pos).unwrap();
        let x = Tensor::new(&[[[[1f64, 0.0, 0.0, 1.0]]]], &Device::Cpu).unwrap();
        let y: Vec<f64> = Rope::apply(&x, &cos, &sin)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let expected = [2f64.cos(), -(0.2f64.sin()), 2f64.sin(), 0.2f64.cos()];
        for (g, e) in y.iter().zip(expected) {
            assert!((g - e).abs() < 1e-12, "{y:?} vs {expected:?}");
        }
    }
}
