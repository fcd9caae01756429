//! [`InputGram`]: a tap on a linear layer that sums `xᵀ·x` over the rows the layer is fed, for
//! calibration statistics (what each module sees on an expert's own data).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Tensor};

/// The running sum of `xᵀ·x` over the inputs `x [.., in]` of one layer, in f32, and how many
/// rows (tokens) it holds.
#[derive(Debug, Default)]
pub struct InputGram {
    sum: Mutex<Option<Tensor>>,
    tokens: AtomicU64,
}

impl InputGram {
    /// Adds the rows of `x [.., in]`.
    pub fn add(&self, x: &Tensor) -> candle_core::Result<()> {
        let dims = x.dims();
        let inner = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / inner.max(1);
        let flat = x.reshape((rows, inner))?.to_dtype(DType::F32)?;
        let gram = flat.t()?.matmul(&flat)?;
        let mut sum = self.sum.lock().expect("the tap's lock is never poisoned");
        *sum = Some(match sum.take() {
            Some(s) => (s + gram)?,
            None => gram,
        });
        self.tokens.fetch_add(rows as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The sum, row-major `in × in`, its side and the number of rows; `None` before any input.
    pub fn take(&self) -> candle_core::Result<Option<(Vec<f32>, usize, u64)>> {
        let sum = self
            .sum
            .lock()
            .expect("the tap's lock is never poisoned")
            .take();
        let Some(sum) = sum else {
            return Ok(None);
        };
        let side = sum.dim(0)?;
        let values = sum.flatten_all()?.to_vec1::<f32>()?;
        Ok(Some((values, side, self.tokens.swap(0, Ordering::Relaxed))))
    }
}
