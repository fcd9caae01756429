//! The exact top-k cut by magnitude on the device (cuda/select.cu), and the sums of squares
//! behind CACI's confidence.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{device_error, grid, Gpu, Updates, THREADS};
use crate::error::Result;

/// Elements per block of the tie count: the host walks at most one such span.
const TIE_SPAN: u64 = 1 << 16;

impl Gpu {
    /// The top-`k` cut by magnitude of expert `t`'s update, as
    /// `top_k` in merge/sparsify.rs keeps it: `(threshold, tie_limit)` where element `i` is
    /// kept iff the bits of `|x[i]|` are above `threshold`, or equal to it with
    /// `i < tie_limit` (ties keep the lowest indices).
    pub fn cut(&self, updates: &Updates, t: usize, k: usize) -> Result<(u32, u64)> {
        let n = updates.len() as u64;
        if k == 0 {
            return Ok((u32::MAX, 0));
        }
        if k as u64 >= n {
            return Ok((0, n));
        }
        let expert = t as i32;
        // Radix select over the 31 magnitude bits, a byte at a time from the top.
        let (mut prefix, mut mask, mut rank) = (0u32, 0u32, k as u64);
        for shift in [24i32, 16, 8, 0] {
            let mut hist = self.zeros::<u64>(256)?;
            let mut launch = self.launch_on("magnitude_histogram", updates, &expert, &n)?;
            launch.arg(&prefix).arg(&mask).arg(&shift).arg(&mut hist);
            // SAFETY: arguments as in cuda/select.cu; `hist` has 256 bins.
            unsafe { launch.launch(grid(n)) }.map_err(|e| device_error("histogram", e))?;
            let counts = self.download(&hist, 256)?;
            // The bin holding the rank-th largest, from the top.
            let mut bin = 255usize;
            while counts[bin] < rank && bin > 0 {
                rank -= counts[bin];
                bin -= 1;
            }
            prefix |= (bin as u32) << shift;
            mask |= 0xFFu32 << shift;
        }
        // `rank` elements equal to the threshold are kept: find the index where that many
        // have been seen, from per-block counts, then within the one block on the host.
        let blocks = n.div_ceil(TIE_SPAN).max(1);
        let mut counts = self.zeros::<u64>(blocks as usize)?;
        let mut launch = self.launch_on("count_equal", updates, &expert, &n)?;
        launch.arg(&prefix).arg(&TIE_SPAN).arg(&mut counts);
        let config = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments as in cuda/select.cu; `counts` has one slot per block.
        unsafe { launch.launch(config) }.map_err(|e| device_error("count_equal", e))?;
        let counts = self.download(&counts, blocks as usize)?;
        let mut seen = 0u64;
        for (block, &c) in counts.iter().enumerate() {
            if seen + c >= rank {
                let start = block as u64 * TIE_SPAN;
                let span = self.span(updates, t, start, (start + TIE_SPAN).min(n))?;
                let mut needed = rank - seen;
                for (i, v) in span.iter().enumerate() {
                    if v.to_bits() & 0x7FFF_FFFF == prefix {
                        needed -= 1;
                        if needed == 0 {
                            return Ok((prefix, start + i as u64 + 1));
                        }
                    }
                }
            }
            seen += c;
        }
        Ok((prefix, n))
    }

    /// Elements `[start, end)` of expert `t`'s update, on the host.
    pub(super) fn span(
        &self,
        updates: &Updates,
        t: usize,
        start: u64,
        end: u64,
    ) -> Result<Vec<f32>> {
        let n = updates.len() as u64;
        let copy = |e| device_error("copy from the device", e);
        let (from, to) = (
            (t as u64 * n + start) as usize,
            (t as u64 * n + end) as usize,
        );
        Ok(match updates {
            Updates::F32 { deltas, .. } => self
                .stream
                .clone_dtoh(&deltas.slice(from..to))
                .map_err(copy)?,
            Updates::Bf16 { tensors, base, .. } => {
                let x = self
                    .stream
                    .clone_dtoh(&tensors.slice(from..to))
                    .map_err(copy)?;
                let b = self
                    .stream
                    .clone_dtoh(&base.slice(start as usize..end as usize))
                    .map_err(copy)?;
                x.iter()
                    .zip(&b)
                    .map(|(&x, &b)| bf16_to_f32(x) - bf16_to_f32(b))
                    .collect()
            }
        })
    }

    /// Σ x² over expert `t`'s update, in f64 (the rms of CACI's confidence).
    pub fn sum_squares(&self, updates: &Updates, t: usize) -> Result<f64> {
        let n = updates.len() as u64;
        let expert = t as i32;
        let mut sum = self.zeros::<f64>(1)?;
        let mut launch = self.launch_on("sum_squares", updates, &expert, &n)?;
        launch.arg(&mut sum);
        // SAFETY: arguments as in cuda/select.cu; `sum` holds one value.
        unsafe { launch.launch(grid(n)) }.map_err(|e| device_error("sum_squares", e))?;
        Ok(self.download(&sum, 1)?[0])
    }

    /// The top-`k` cut of host values (uploaded as one expert's deltas).
    pub fn magnitude_cut(&self, x: &[f32], k: usize) -> Result<(u32, u64)> {
        let updates = self.upload_deltas(&[x])?;
        self.cut(&updates, 0, k)
    }
}

fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}
