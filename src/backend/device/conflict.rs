//! Conflict statistics of one module on the device (cuda/conflict.cu) as block reductions.

use cudarc::driver::PushKernelArg;

use super::{device_error, grid, Gpu, Updates, MAX_EXPERTS};
use crate::error::{Error, Result};

/// The sums behind one module's conflict metrics: what the device (cuda/conflict.cu) and the
/// CPU reference (`conflict_sums` in conflict/metrics.rs) both compute, and the one function
/// that turns them into the metrics reads.
#[derive(Debug, Clone, PartialEq)]
pub struct ConflictSums {
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
    /// `dots[a][b]` = Σ x_a·x_b over the untrimmed updates (a ≤ b filled).
    pub dots: Vec<Vec<f64>>,
    /// `both[a][b]`: coordinates both a and b keep (a < b filled).
    pub both: Vec<Vec<u64>>,
    /// `either[a][b]`: coordinates a or b keeps (a < b filled).
    pub either: Vec<Vec<u64>>,
}

impl Gpu {
    /// Sign-conflict counts, κ, minority mass, pairwise dot products and top-k overlaps of the
    /// experts' `updates`, each trimmed by its cut (from [`Gpu::cut`]) and weighted by
    /// `|weight|`. At most 16 experts.
    pub fn conflicts(
        &self,
        updates: &Updates,
        cuts: &[(u32, u64)],
        weights: &[f32],
    ) -> Result<ConflictSums> {
        let (t, n) = (updates.experts(), updates.len());
        if t == 0 || t > MAX_EXPERTS || cuts.len() != t || weights.len() != t {
            return Err(Error::Device {
                message: format!(
                    "conflict statistics take 1 to {MAX_EXPERTS} experts with a cut and a weight each, got {t}"
                ),
            });
        }
        let thresholds: Vec<u32> = cuts.iter().map(|c| c.0).collect();
        let limits: Vec<u64> = cuts.iter().map(|c| c.1).collect();
        let (thresholds, limits) = (self.upload(&thresholds)?, self.upload(&limits)?);
        let weights = self.upload(weights)?;
        let mut stats = self.zeros::<f64>(5)?;
        let mut dots = self.zeros::<f64>(t * t)?;
        let mut both = self.zeros::<u64>(t * t)?;
        let mut either = self.zeros::<u64>(t * t)?;
        let (experts, count) = (t as i32, n as u64);
        let mut launch = self.launch_on("conflict_stats", updates, &experts, &count)?;
        launch
            .arg(&thresholds)
            .arg(&limits)
            .arg(&weights)
            .arg(&mut stats)
            .arg(&mut dots)
            .arg(&mut both)
            .arg(&mut either);
        // SAFETY: arguments as in cuda/conflict.cu; at most MAX_EXPERTS experts (its shared
        // arrays), every per-expert array holds t values and every pair array t · t.
        unsafe { launch.launch(grid(count)) }.map_err(|e| device_error("conflict_stats", e))?;
        let s = self.download(&stats, 5)?;
        let square = |v: Vec<f64>| v.chunks(t).map(<[f64]>::to_vec).collect();
        let pairs = |v: Vec<u64>| v.chunks(t).map(<[u64]>::to_vec).collect();
        Ok(ConflictSums {
            active: s[0],
            conflicted: s[1],
            kappa_sum: s[2],
            minority: s[3],
            total: s[4],
            dots: square(self.download(&dots, t * t)?),
            both: pairs(self.download(&both, t * t)?),
            either: pairs(self.download(&either, t * t)?),
        })
    }
}
