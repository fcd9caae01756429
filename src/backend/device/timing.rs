//! Timing the fused consensus kernel against the card's device-to-device copy bandwidth.

use std::time::Instant;

use super::{device_error, ConsensusRule, Gpu, MergeExpert};
use crate::error::Result;

/// Device timings of the fused consensus kernel against a device-to-device copy.
#[derive(Debug, Clone, Copy)]
pub struct ConsensusTiming {
    /// Bytes the kernel reads and writes (T inputs, the base and the output).
    pub bytes: u64,
    /// Best kernel time (launch to synchronise, including the small result copies), seconds.
    pub kernel_seconds: f64,
    /// Best time to copy the same number of bytes device to device (reads + writes), seconds.
    pub copy_seconds: f64,
}

impl Gpu {
    /// Times the fused TIES kernel on `experts` × `n` values already on the device (f32, or
    /// bf16 tensors with a bf16 base) and a device-to-device copy moving as many bytes; best
    /// of `repeat`.
    pub fn time_consensus(
        &self,
        experts: usize,
        n: usize,
        bf16: bool,
        repeat: usize,
    ) -> Result<ConsensusTiming> {
        let pattern: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) / 64.0).collect();
        let updates = if bf16 {
            let bits: Vec<u16> = pattern.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            let rows: Vec<&[u16]> = (0..experts).map(|_| bits.as_slice()).collect();
            let base = vec![0u16; n];
            self.upload_bf16(&rows, &base)?
        } else {
            let rows: Vec<&[f32]> = (0..experts).map(|_| pattern.as_slice()).collect();
            self.upload_deltas(&rows)?
        };
        drop(pattern);
        // Half the values kept: a cut in the middle of the magnitudes.
        let rules = vec![
            MergeExpert {
                cut: (0x3E80_0000, 0),
                vote_factor: 1.0,
                weight: 1.0,
            };
            experts
        ];
        let rule = ConsensusRule {
            divide_by_count: false,
            normalize: true,
            gamma: 0.0,
            lambda: 1.0,
        };
        let f32_base = vec![0f32; n];
        let base = (!bf16).then_some(f32_base.as_slice());
        let sync = || {
            self.stream
                .synchronize()
                .map_err(|e| device_error("synchronize", e))
        };
        let mut kernel_seconds = f64::INFINITY;
        for _ in 0..repeat.max(1) {
            sync()?;
            let start = Instant::now();
            let merged = self.launch_merge(&updates, &rules, rule, base, bf16)?;
            sync()?;
            kernel_seconds = kernel_seconds.min(start.elapsed().as_secs_f64());
            drop(merged);
        }
        let element = if bf16 { 2 } else { 4 };
        let input_bytes = experts * n * element;
        let source = self.zeros::<u8>(input_bytes)?;
        let mut copy = self.zeros::<u8>(input_bytes)?;
        let mut copy_seconds = f64::INFINITY;
        for _ in 0..repeat.max(1) {
            sync()?;
            let start = Instant::now();
            self.stream
                .memcpy_dtod(&source, &mut copy)
                .map_err(|e| device_error("copy", e))?;
            sync()?;
            copy_seconds = copy_seconds.min(start.elapsed().as_secs_f64());
        }
        let bytes = ((experts + 2) * n * element) as u64;
        Ok(ConsensusTiming {
            bytes,
            kernel_seconds,
            // The copy reads and writes T·n values; scale it to the kernel's (T + 2)·n.
            copy_seconds: copy_seconds * (experts + 2) as f64 / (2 * experts) as f64,
        })
    }
}
