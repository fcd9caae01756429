//! DARE's random keep masks on the device (cuda/masks.cu), keyed as `MaskRng`.

use cudarc::driver::PushKernelArg;

use super::{device_error, grid, Gpu};
use crate::error::Result;

impl Gpu {
    /// The DARE keep mask of elements `first..first + n` for a generator key
    /// (`MaskRng::key`), as `crate::merge::sparsify::random_at` draws it.
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
}
