//! `mmx doctor`: what hardware, backends and kernels this machine can use.

use std::process::ExitCode;

use clap::Args;

use super::human_bytes;
use mmx::backend::probe;

/// Arguments of `mmx doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print JSON (`"kernels_compile": true | false | null`).
    #[arg(long)]
    json: bool,
}

/// Runs `mmx doctor`.
pub fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let p = probe();
    if args.json {
        super::print::json(&p)?;
        return Ok(ExitCode::SUCCESS);
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("cpu       {cpus} threads (rayon backend, always available)");
    println!(
        "driver    {}",
        p.driver.as_deref().unwrap_or("none (libcuda not found)")
    );
    println!(
        "nvrtc     {}",
        p.nvrtc.as_deref().unwrap_or("none (libnvrtc not found)")
    );
    for d in &p.devices {
        println!(
            "device {}  {} ({} free of {})",
            d.ordinal,
            d.name,
            human_bytes(d.free_memory),
            human_bytes(d.total_memory)
        );
    }
    match p.kernels_compile {
        Some(true) => println!(
            "kernels   all {} compile",
            mmx::backend::cuda::KERNELS.len()
        ),
        Some(false) => {
            for (name, error) in &p.kernel_errors {
                println!("kernels   {name} does not compile: {error}");
            }
        }
        None => println!("kernels   not checked (no NVRTC)"),
    }
    match &p.no_gpu_reason {
        None => println!("--device auto uses the GPU"),
        Some(reason) => println!("--device auto uses the CPU: {reason}"),
    }
    Ok(ExitCode::SUCCESS)
}
