//! `mmx doctor`: what hardware, backends and kernels this machine can use.

use std::process::ExitCode;

use clap::Args;

use super::human_bytes;
use super::print::{say, Printer};
use mmx::backend::{probe, Probe};

/// Arguments of `mmx doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print JSON (`"kernels_compile": true | false | null`).
    #[arg(long)]
    json: bool,
}

/// Runs `mmx doctor`.
pub fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let found = probe();
    Printer::new(args.json).result(&found, |p| print_text(p, &found))?;
    Ok(ExitCode::SUCCESS)
}

fn print_text(p: &Printer, found: &Probe) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    say!(
        p,
        "cpu       {cpus} threads (rayon backend, always available)"
    );
    say!(
        p,
        "driver    {}",
        found
            .driver
            .as_deref()
            .unwrap_or("none (libcuda not found)")
    );
    match (&found.nvrtc_library, &found.nvrtc_problem) {
        (Some(_), _) => {
            say!(p, "nvrtc     {}", found.nvrtc_found[0]);
            for other in &found.nvrtc_found[1..] {
                say!(p, "          also {other}");
            }
        }
        (None, problem) => say!(
            p,
            "nvrtc     none: {}",
            problem.as_deref().unwrap_or("not found")
        ),
    }
    if let Some(at) = &found.cublas {
        say!(p, "cublas    {at}");
    } else if let Some(problem) = &found.cublas_problem {
        say!(p, "cublas    none: {problem}");
    }
    for d in &found.devices {
        say!(
            p,
            "device {}  {} ({} free of {})",
            d.ordinal,
            d.name,
            human_bytes(d.free_memory),
            human_bytes(d.total_memory)
        );
    }
    match found.kernels_compile {
        Some(true) => say!(
            p,
            "kernels   all {} compile",
            mmx::backend::cuda::KERNELS.len()
        ),
        Some(false) => {
            for (name, error) in &found.kernel_errors {
                say!(p, "kernels   {name} does not compile: {error}");
            }
        }
        None => say!(p, "kernels   not checked (no NVRTC)"),
    }
    match &found.no_gpu_reason {
        None => say!(p, "--device auto uses the GPU"),
        Some(reason) => say!(p, "--device auto uses the CPU: {reason}"),
    }
}
