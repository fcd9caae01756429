//! DARE's random keep masks on the device (cuda/masks.cu), keyed as `MaskRng`.

use cudarc::driver::PushKernelArg;

use super::{device_error, grid, Gpu};
use crate::error::Result;

impl Gpu {
    /// The DARE keep mask of elements `first..first + n` for a generator key
    /// (`MaskRng::key`), as `random_at` in merge/sparsify.rs draws it.
    pub fn dare_mask(&self, key: u64, first: u64, density: f32, n: usize) -> Result<Vec<u8>> {
        let mut keep = self.zeros::<u8>(n)?;
        let count = n as u64;
        let mut launch = self.stream.launch_builder(self.function("dare_mask")?);
        launch
            .arg(&mut keep)
            .arg(&key)
            .arg(&first)
            .arg(&density)
            .arg(&count);
        // SAFETY: the arguments match the kernel's signature in cuda/masks.cu, and `keep`
        // holds at least `n` bytes.
        unsafe { launch.launch(grid(count)) }.map_err(|e| device_error("dare_mask", e))?;
        self.download(&keep, n)
    }

    /// DELLA's keep mask of elements `first..first + n`, each with its own keep probability
    /// (ranked on the host), as `della_at` in merge/sparsify.rs draws it.
    pub fn della_mask(&self, key: u64, first: u64, probability: &[f32]) -> Result<Vec<u8>> {
        let n = probability.len();
        let mut keep = self.zeros::<u8>(n)?;
        let probability = self.upload(probability)?;
        let count = n as u64;
        let mut launch = self.stream.launch_builder(self.function("della_mask")?);
        launch
            .arg(&mut keep)
            .arg(&key)
            .arg(&first)
            .arg(&probability)
            .arg(&count);
        // SAFETY: arguments as in cuda/masks.cu; `keep` and `probability` hold `n` values.
        unsafe { launch.launch(grid(count)) }.map_err(|e| device_error("della_mask", e))?;
        self.download(&keep, n)
    }
}
