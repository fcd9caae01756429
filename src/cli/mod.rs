//! The command line: clap definitions and one file per command. The only module that prints.

mod calibrate;
mod conflicts;
mod data;
mod doctor;
mod eval;
mod hint;
mod merge;
mod pipeline;
mod print;
mod progress;
mod registry;
mod sweep;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use self::print::{note, Printer};
use hint::hint;
use mmx::backend::{select, Backend, DeviceRequest};

/// Merge specialty LoRA adapters and checkpoints into one expert model.
#[derive(Debug, Parser)]
#[command(name = "mmx", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Merge the experts of a recipe (mmx TOML or mergekit YAML).
    Merge(merge::MergeArgs),
    /// An expert's calibration statistics (its modules' input Grams over its cases), for
    /// data-aware merges (`regmean`).
    Calibrate(calibrate::CalibrateArgs),
    /// Measure how the experts of a recipe conflict, per module type and per layer.
    Conflicts(conflicts::ConflictsArgs),
    /// Run a merge sweep: grid or random search over methods and parameters, each trial scored.
    Sweep(sweep::SweepArgs),
    /// Publish an adapter, a model or a merge output to the registry as NAME:TAG.
    Publish(registry::PublishArgs),
    /// Write a published directory back out, byte for byte (`--from` a remote registry first).
    Pull(registry::PullArgs),
    /// Copy a published manifest and what it needs to a remote registry (S3), then tag it there.
    Push(registry::PushArgs),
    /// List the registry's tags.
    Ls(registry::LsArgs),
    /// Show a manifest.
    Show(registry::ShowArgs),
    /// Point a tag at a published manifest.
    Tag(registry::TagArgs),
    /// Remove a tag (blobs stay until gc).
    Rm(registry::RmArgs),
    /// Show what a merged expert was made from.
    Log(registry::LogArgs),
    /// Check the registry: missing, corrupt and orphaned blobs exit 1.
    Verify(registry::VerifyArgs),
    /// Remove blobs no tag reaches, after a grace period.
    Gc(registry::GcArgs),
    /// What hardware, backends and kernels this machine can use.
    Doctor(doctor::DoctorArgs),
    /// Case data for the trainers: generate synthetic cases, check case files.
    Data(data::DataArgs),
    /// Train a specialty LoRA (`dsa`) or a base model's own weights (`base`).
    Train(train::TrainArgs),
    /// Per-specialty accuracy of a model (with an adapter) on case files.
    Eval(eval::EvalArgs),
    /// The whole recipe in one command: data, base, DSA and GBA experts, conflicts, merges
    /// chosen on validation and an evaluation table; unchanged stages are skipped.
    Pipeline(pipeline::PipelineArgs),
}

/// Prints a failed command's error on stderr, with a `hint:` line where the fix is known.
pub fn print_error(error: &anyhow::Error) {
    Printer::text().error(error);
}

/// Parses the process arguments and runs the command. Errors exit with code 2.
pub fn run() -> anyhow::Result<ExitCode> {
    execute(Cli::parse())
}

/// Runs the command `args` (the program's name first) in this process.
fn dispatch<'a>(args: impl IntoIterator<Item = &'a str>) -> anyhow::Result<ExitCode> {
    execute(Cli::try_parse_from(args)?)
}

fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Merge(args) => merge::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Conflicts(args) => conflicts::run(args),
        Command::Sweep(args) => sweep::run(args),
        Command::Publish(args) => registry::publish(args),
        Command::Pull(args) => registry::pull(args),
        Command::Push(args) => registry::push(args),
        Command::Ls(args) => registry::ls(args),
        Command::Show(args) => registry::show(args),
        Command::Tag(args) => registry::tag(args),
        Command::Rm(args) => registry::rm(args),
        Command::Log(args) => registry::log(args),
        Command::Verify(args) => registry::verify(args),
        Command::Gc(args) => registry::gc(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Data(args) => data::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Pipeline(args) => pipeline::run(args),
    }
}

/// `-o OUT` if given, else `out/<the input file's stem>` (`out/<fallback>` without one).
fn output_dir(
    flag: Option<&std::path::Path>,
    input: &std::path::Path,
    fallback: &str,
) -> std::path::PathBuf {
    flag.map(std::path::Path::to_path_buf).unwrap_or_else(|| {
        let stem = input
            .file_stem()
            .map_or(fallback.into(), |s| s.to_string_lossy().into_owned());
        std::path::PathBuf::from("out").join(stem)
    })
}

/// Where the arithmetic runs (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// The GPU when one answers, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// A CUDA GPU (an error when none is usable).
    Cuda,
}

/// Turns `--device` into a backend: `cuda` without a usable GPU is an error; `auto` says in
/// one line why it runs on the CPU.
fn choose_device(device: Device) -> anyhow::Result<Backend> {
    let p = Printer::text();
    let request = match device {
        Device::Auto => DeviceRequest::Auto,
        Device::Cpu => return Ok(Backend::Cpu),
        Device::Cuda => DeviceRequest::Cuda,
    };
    let (backend, reason) = select(request)?;
    if let Some(reason) = reason {
        note!(p, "--device auto: running on the CPU: {reason}");
    }
    Ok(backend)
}

/// Parses a byte size: `1073741824`, `512M`, `8G`, `1.5GiB`, `500MB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (examples: 512M, 8G, 1073741824)"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` in `{text}`")),
    };
    let bytes = value * scale as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("`{text}` is not a positive size"));
    }
    Ok(bytes as u64)
}

/// Half of the memory the kernel reports available, the default budget for tensors in flight.
pub(crate) fn default_max_memory() -> u64 {
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    available.map_or(4 << 30, |a| a / 2)
}

/// Formats a byte count for people.
fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("big").is_err());
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
