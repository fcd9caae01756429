//! [`RmsNorm`] from differentiable operations: `x · (mean(x²) + eps)^-½ · w`, computed in at
//! least f32 as Hugging Face computes it. candle's fused `rms_norm` records no gradient.

use candle_core::{DType, Tensor, D};

/// Root-mean-square normalisation over the last dimension with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

/// The dtype to normalise in: f32 for half-precision inputs, the input's own otherwise.
pub(crate) fn upcast(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

impl RmsNorm {
    /// A norm with scale `weight [hidden]`.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    /// The scale `[hidden]`.
    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Normalises `x [.., hidden]`; the result has `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(upcast(dtype))?;
        let mean_sq = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_rms = (mean_sq + self.eps)?.sqrt()?.recip()?;
        let normed = xf.broadcast_mul(&inv_rms)?.to_dtype(dtype)?;
        normed.broadcast_mul(&self.weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn normalises_by_the_root_mean_square_and_passes_gradients() {
        // x = (3, 4): mean(x²) = 12.5, rms = √12.5; with w = (1, 2) the output is
        // (3/√12.5, 8/√12.5).
        let x = Var::new(&[[3f64, 4.0]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f64, 2.0], &Device::Cpu).unwrap();
        let y = RmsNorm::new(w, 0.0).forward(x.as_tensor()).unwrap();
        let got: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
        let rms = 12.5f64.sqrt();
        assert!((got[0] - 3.0 / rms).abs() < 1e-12 && (got[1] - 8.0 / rms).abs() < 1e-12);
        // d(y0 + y1)/dx0 = 1/rms - (3 + 8)·x0 / (2·rms³) = 1/rms - 33/(2·rms³).
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g: Vec<f64> = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let expected = 1.0 / rms - 33.0 / (2.0 * rms.powi(3));
        assert!((g[0] - expected).abs() < 1e-12, "{} vs {expected}", g[0]);
    }
}
