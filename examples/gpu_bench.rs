//! The fused TIES/CACI kernel against the card's device-to-device copy bandwidth: 4 experts ×
//! 10^8 f32 elements (issue 5's goal: at least 60% of the copy's bandwidth). Without a GPU it
//! says so and exits 0. Run by scripts/gpu-check.sh.
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
    let t = gpu.time_consensus(4, n, 5)?;
    let rate = |s: f64| t.bytes as f64 / s / 1e9;
    println!("device: {} ({} elements × 4 experts, f32)", device.name, n);
    println!("| what | ms | GB/s |\n| --- | ---: | ---: |");
    println!(
        "| device-to-device copy, same bytes | {:.2} | {:.0} |",
        t.copy_seconds * 1e3,
        rate(t.copy_seconds)
    );
    println!(
        "| fused TIES kernel | {:.2} | {:.0} |",
        t.kernel_seconds * 1e3,
        rate(t.kernel_seconds)
    );
    println!(
        "kernel / copy bandwidth: {:.0}%",
        100.0 * t.copy_seconds / t.kernel_seconds
    );
    Ok(())
}
