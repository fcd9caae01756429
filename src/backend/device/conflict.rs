//! Conflict statistics of one module on the device (cuda/conflict.cu) as block reductions.

use cudarc::driver::PushKernelArg;

use super::{device_error, grid, Gpu};
use crate::error::{Error, Result};

/// Conflict statistics of one module on the device (cuda/conflict.cu), as
/// `crate::conflict::module_conflicts` computes them.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceConflicts {
    /// Coordinates some expert keeps.
    pub active: f64,
    /// Coordinates where kept entries disagree.
    pub conflicted: f64,
    /// Σ κ over the active coordinates.
    pub kappa_sum: f64,
    /// Σ min(P, N).
    pub minority: f64,
    /// Σ (P + N).
    pub total: f64,
    /// `dots[a][b]` = Σ x_a·x_b over the untrimmed updates (upper triangle filled).
    pub dots: Vec<Vec<f64>>,
}

impl Gpu {
    /// Sign-conflict counts, κ, minority mass and pairwise dot products of `deltas` (untrimmed)
    /// and `kept` (trimmed, same layout), weighted by `weights`. At most 16 experts.
    pub fn conflict_stats(
        &self,
        deltas: &[Vec<f32>],
        kept: &[Vec<f32>],
        weights: &[f32],
    ) -> Result<DeviceConflicts> {
        let t = deltas.len();
        let n = deltas.first().map_or(0, Vec::len);
        if t == 0 || t > 16 || kept.len() != t || weights.len() != t {
            return Err(Error::Device {
                message: format!("conflict statistics take 1 to 16 experts, got {t}"),
            });
        }
        let copy = |e: cudarc::driver::DriverError| device_error("copy", e);
        let flat = |rows: &[Vec<f32>]| rows.iter().flatten().copied().collect::<Vec<f32>>();
        let deltas_device = self.stream.clone_htod(&flat(deltas)).map_err(copy)?;
        let kept_device = self.stream.clone_htod(&flat(kept)).map_err(copy)?;
        let weights_device = self.stream.clone_htod(weights).map_err(copy)?;
        let mut stats = self
            .stream
            .alloc_zeros::<f64>(5)
            .map_err(|e| device_error("alloc", e))?;
        let mut dots = self
            .stream
            .alloc_zeros::<f64>(t * t)
            .map_err(|e| device_error("alloc", e))?;
        let (experts, count) = (t as i32, n as u64);
        let mut launch = self.stream.launch_builder(self.function("conflict_stats")?);
        launch
            .arg(&deltas_device)
            .arg(&kept_device)
            .arg(&experts)
            .arg(&count)
            .arg(&weights_device)
            .arg(&mut stats)
            .arg(&mut dots);
        // SAFETY: arguments as in cuda/conflict.cu; at most 16 experts (its shared arrays).
        unsafe { launch.launch(grid(count)) }.map_err(|e| device_error("conflict_stats", e))?;
        let s = self.stream.clone_dtoh(&stats).map_err(copy)?;
        let d = self.stream.clone_dtoh(&dots).map_err(copy)?;
        Ok(DeviceConflicts {
            active: s[0],
            conflicted: s[1],
            kappa_sum: s[2],
            minority: s[3],
            total: s[4],
            dots: d.chunks(t).map(<[f64]>::to_vec).collect(),
        })
    }
}
