//! Synthetic calibration statistics for an adapter, to time data-aware merges at a real model's
//! shapes without running the model: for every module the adapter adapts, a positive definite
//! Gram `diag(1 + j mod 7) + 0.1·u·uᵀ` (`u` seeded per module and expert) over 512 "tokens".
//! The values are not a model's; the sizes and the arithmetic a merge does with them are.
//!
//!     cargo run --release --example synthetic_calibration -- ADAPTER_DIR OUT.safetensors [SEED]

use std::collections::BTreeMap;
use std::path::PathBuf;

use mmx::adapter::Adapter;
use mmx::merge::calibration::{write_calibration, ModuleStats};
use mmx::rng::SplitMix;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: synthetic_calibration ADAPTER_DIR OUT.safetensors [SEED]";
    let adapter = PathBuf::from(args.next().ok_or(usage)?);
    let out = PathBuf::from(args.next().ok_or(usage)?);
    let seed: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0);
    let adapter = Adapter::open(&adapter)?;
    let mut modules = BTreeMap::new();
    for (i, (name, module)) in adapter.modules().iter().enumerate() {
        let side = module.target_shape[1];
        let mut rng = SplitMix::derive(seed, &[i as u64]);
        let u: Vec<f32> = (0..side).map(|_| rng.unit() as f32 - 0.5).collect();
        let mut gram = vec![0f32; side * side];
        for (r, row) in gram.chunks_mut(side).enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = 0.1 * u[r] * u[c] + if r == c { 1.0 + (r % 7) as f32 } else { 0.0 };
            }
        }
        let module = name.strip_suffix(".weight").unwrap_or(name).to_string();
        let stats = ModuleStats {
            gram: Some((gram, side, 512)),
            fisher: None,
        };
        modules.insert(module, stats);
    }
    write_calibration(&out, &modules)?;
    println!("{} modules into {}", modules.len(), out.display());
    Ok(())
}
