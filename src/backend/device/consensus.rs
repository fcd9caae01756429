//! The fused TIES/CACI consensus on the device (cuda/consensus.cu): trim, sign election,
//! disjoint mean and attenuation in one pass over the experts' updates.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{device_error, grid, Gpu, Updates};
use crate::error::{Error, Result};

/// How one expert takes part in a fused consensus merge.
#[derive(Debug, Clone, Copy)]
pub struct MergeExpert {
    /// Its trim, from [`Gpu::cut`].
    pub cut: (u32, u64),
    /// What its vote is scaled by: its weight (TIES, weighted election), 1 (unweighted), or
    /// weight / rms (CACI).
    pub vote_factor: f32,
    /// Its weight in the disjoint mean.
    pub weight: f32,
}

/// How a fused consensus merge combines the experts.
#[derive(Debug, Clone, Copy)]
pub struct ConsensusRule {
    /// Divide by the number of agreeing experts instead of their weights.
    pub divide_by_count: bool,
    /// Divide at all (off: mergekit's un-normalised sum).
    pub normalize: bool,
    /// CACI's attenuation exponent (0: TIES).
    pub gamma: f32,
    /// Scales the merged update.
    pub lambda: f32,
}

/// The merged tensor, as the kernel wrote it.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceValues {
    /// f32 values.
    F32(Vec<f32>),
    /// bf16 values, as bits (rounded to nearest even, as `half::bf16::from_f32`).
    Bf16(Vec<u16>),
}

impl DeviceValues {
    /// The values as f32 (bf16 widened exactly).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            DeviceValues::F32(v) => v.clone(),
            DeviceValues::Bf16(bits) => bits
                .iter()
                .map(|&b| f32::from_bits(u32::from(b) << 16))
                .collect(),
        }
    }
}

/// The output buffer of one launch.
pub(super) enum Output {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// What one launch writes, still on the device.
pub(super) struct Launched {
    out: Output,
    conflicts: CudaSlice<u64>,
    kept: CudaSlice<u64>,
    delta_sq: CudaSlice<f64>,
}

/// A merged tensor and what the merge counted on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMerge {
    /// `base + λ·merged`, or the merged update alone when there is no base.
    pub values: DeviceValues,
    /// Coordinates where a kept entry opposes the elected sign.
    pub conflicts: u64,
    /// Per expert, the nonzero entries its trim keeps.
    pub kept: Vec<u64>,
    /// Σ (value − base)² in f64, before rounding to the output type.
    pub delta_sq: f64,
}

/// The most experts one fused launch takes (the kernel's per-thread arrays).
pub const MAX_EXPERTS: usize = 16;

impl Gpu {
    /// Merges `updates` coordinate by coordinate. `base` is added back for f32 updates when
    /// given (the bf16 form always has its base); `bf16_out` rounds the result to bf16.
    pub fn merge(
        &self,
        updates: &Updates,
        experts: &[MergeExpert],
        rule: ConsensusRule,
        base: Option<&[f32]>,
        bf16_out: bool,
    ) -> Result<DeviceMerge> {
        let (t, n) = (updates.experts(), updates.len());
        let launched = self.launch_merge(updates, experts, rule, base, bf16_out)?;
        let values = match launched.out {
            Output::F32(o) => DeviceValues::F32(self.download(&o, n)?),
            Output::Bf16(o) => DeviceValues::Bf16(self.download(&o, n)?),
        };
        Ok(DeviceMerge {
            values,
            conflicts: self.download(&launched.conflicts, 1)?[0],
            kept: self.download(&launched.kept, t)?,
            delta_sq: self.download(&launched.delta_sq, 1)?[0],
        })
    }

    /// Launches the fused kernel; the results stay on the device.
    pub(super) fn launch_merge(
        &self,
        updates: &Updates,
        experts: &[MergeExpert],
        rule: ConsensusRule,
        base: Option<&[f32]>,
        bf16_out: bool,
    ) -> Result<Launched> {
        let (t, n) = (updates.experts(), updates.len());
        if experts.len() != t || t == 0 || t > MAX_EXPERTS {
            return Err(Error::Device {
                message: format!(
                    "a fused merge takes 1 to {MAX_EXPERTS} experts with one rule each, got {t} updates and {} rules",
                    experts.len()
                ),
            });
        }
        if base.is_some_and(|b| b.len() != n) {
            return Err(Error::Device {
                message: "the base needs one value per element of the updates".into(),
            });
        }
        let thresholds: Vec<u32> = experts.iter().map(|e| e.cut.0).collect();
        let limits: Vec<u64> = experts.iter().map(|e| e.cut.1).collect();
        let votes: Vec<f32> = experts.iter().map(|e| e.vote_factor).collect();
        let weights: Vec<f32> = experts.iter().map(|e| e.weight).collect();
        let (thresholds, limits) = (self.upload(&thresholds)?, self.upload(&limits)?);
        let (votes, weights) = (self.upload(&votes)?, self.upload(&weights)?);
        let mut conflicts = self.zeros::<u64>(1)?;
        let mut kept = self.zeros::<u64>(t)?;
        let mut delta_sq = self.zeros::<f64>(1)?;
        let (count, experts_arg) = (n as u64, t as i32);
        let (by_count, normalize) = (i32::from(rule.divide_by_count), i32::from(rule.normalize));
        let f32_base = match (updates, base) {
            (Updates::F32 { .. }, Some(b)) => Some(self.upload(b)?),
            _ => None,
        };
        let bf16 = bf16_out || matches!(updates, Updates::Bf16 { .. });
        let mut out = if bf16 {
            Output::Bf16(self.zeros::<u16>(n)?)
        } else {
            Output::F32(self.zeros::<f32>(n)?)
        };
        let kernel = match (updates, bf16_out) {
            (Updates::F32 { .. }, false) => "consensus_merge",
            (Updates::F32 { .. }, true) => "consensus_merge_to_bf16",
            (Updates::Bf16 { .. }, _) => "consensus_merge_bf16",
        };
        let mut launch = self.stream.launch_builder(self.function(kernel)?);
        match updates {
            Updates::F32 { deltas, .. } => launch.arg(deltas),
            Updates::Bf16 { tensors, .. } => launch.arg(tensors),
        };
        launch
            .arg(&experts_arg)
            .arg(&count)
            .arg(&thresholds)
            .arg(&limits)
            .arg(&votes)
            .arg(&weights)
            .arg(&by_count)
            .arg(&normalize)
            .arg(&rule.gamma)
            .arg(&rule.lambda);
        let null: u64 = 0;
        match (updates, &f32_base) {
            (Updates::Bf16 { base, .. }, _) => launch.arg(base),
            (Updates::F32 { .. }, Some(b)) => launch.arg(b),
            // A null base pointer: the kernel writes the merged update alone.
            (Updates::F32 { .. }, None) => launch.arg(&null),
        };
        match &mut out {
            Output::F32(o) => launch.arg(o),
            Output::Bf16(o) => launch.arg(o),
        };
        launch.arg(&mut conflicts).arg(&mut kept).arg(&mut delta_sq);
        // SAFETY: arguments as in cuda/consensus.cu for this kernel; the updates hold t × n
        // values, the base and the output n, the rule arrays t, and t ≤ MAX_EXPERTS.
        unsafe { launch.launch(grid(count)) }.map_err(|e| device_error(kernel, e))?;
        Ok(Launched {
            out,
            conflicts,
            kept,
            delta_sq,
        })
    }
}

/// One expert of [`Gpu::consensus`], on the host.
#[derive(Debug, Clone, Copy)]
pub struct ConsensusExpert<'a> {
    /// The expert's update (its tensor minus the base).
    pub delta: &'a [f32],
    /// Its trim, from [`Gpu::magnitude_cut`].
    pub cut: (u32, u64),
    /// What its vote is scaled by.
    pub vote_factor: f32,
    /// Its weight in the disjoint mean.
    pub weight: f32,
}

impl Gpu {
    /// [`Gpu::merge`] of host deltas onto a host base, in f32: `base + λ·merged`, and the
    /// number of coordinates where a kept entry opposed the vote.
    pub fn consensus(
        &self,
        experts: &[ConsensusExpert<'_>],
        rule: ConsensusRule,
        base: &[f32],
    ) -> Result<(Vec<f32>, u64)> {
        let deltas: Vec<&[f32]> = experts.iter().map(|e| e.delta).collect();
        let updates = self.upload_deltas(&deltas)?;
        let rules: Vec<MergeExpert> = experts
            .iter()
            .map(|e| MergeExpert {
                cut: e.cut,
                vote_factor: e.vote_factor,
                weight: e.weight,
            })
            .collect();
        let merged = self.merge(&updates, &rules, rule, Some(base), false)?;
        Ok((merged.values.to_f32(), merged.conflicts))
    }
}
