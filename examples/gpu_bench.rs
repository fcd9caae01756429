//! The fused TIES/CACI kernel against the card's device-to-device copy bandwidth: 4 experts ×
//! 10^8 elements, f32 deltas and bf16 tensors with a bf16 base (issue 5's goal: at least 60%
//! of the copy's bandwidth for both). Without a GPU it says so and exits 0. Run by
//! scripts/gpu-check.sh.
//!
//!     cargo run --release --example gpu_bench -- [ELEMENTS]

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(100_000_000);
    let devices = mmx::backend::cuda::devices().unwrap_or_default();
    let Some(device) = devices.first() else {
        println!("no CUDA device answers here: nothing measured");
        return Ok(());
    };
    let gpu = mmx::backend::device::Gpu::open(0)?;
    println!("device: {} ({n} elements × 4 experts)", device.name);
    println!("| input | kernel ms | kernel GB/s | copy GB/s | kernel / copy |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (label, bf16) in [("f32 deltas", false), ("bf16 tensors + base", true)] {
        let t = gpu.time_consensus(4, n, bf16, 5)?;
        let rate = |s: f64| t.bytes as f64 / s / 1e9;
        println!(
            "| {label} | {:.2} | {:.0} | {:.0} | {:.0}% |",
            t.kernel_seconds * 1e3,
            rate(t.kernel_seconds),
            rate(t.copy_seconds),
            100.0 * t.copy_seconds / t.kernel_seconds
        );
    }
    Ok(())
}
