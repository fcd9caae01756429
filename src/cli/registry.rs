//! The registry commands: `publish`, `pull`, `push`, `ls`, `show`, `tag`, `rm`, `log`, `verify`, `gc`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Args;

use super::human_bytes;
use super::print::{note, say, Printer};
use mmx::registry::{
    parse_duration, registry_path, Kind, PublishOptions, Reference, Registry, Transfer,
    TransferOptions,
};

/// Where the registry is.
#[derive(Debug, Args)]
pub struct RegistryArg {
    /// The registry: a directory or `s3://bucket/prefix` (default: $MMX_REGISTRY, else
    /// ./registry).
    #[arg(long, value_name = "DIR|URL", global = true)]
    registry: Option<PathBuf>,
}

impl RegistryArg {
    fn open(&self) -> anyhow::Result<Registry> {
        Ok(Registry::open(&registry_path(self.registry.as_deref()))?)
    }

    fn create(&self) -> anyhow::Result<Registry> {
        Ok(Registry::create(&registry_path(self.registry.as_deref()))?)
    }
}

fn kind(text: &str) -> Result<Kind, String> {
    match text {
        "base" => Ok(Kind::Base),
        "adapter" => Ok(Kind::Adapter),
        "merged" => Ok(Kind::Merged),
        other => Err(format!("`{other}`: expected base, adapter or merged")),
    }
}

/// Arguments of `mmx publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// A PEFT adapter, a Hugging Face model directory or an `mmx merge` output.
    dir: PathBuf,
    /// The tag to publish it as.
    #[arg(value_parser = Reference::parse)]
    reference: Reference,
    /// The specialty of an adapter or expert (e.g. cardiology).
    #[arg(long)]
    specialty: Option<String>,
    /// The kind, if not the one its files say (base, adapter, merged).
    #[arg(long, value_parser = kind)]
    kind: Option<Kind>,
    /// The base it applies to (`NAME:TAG` or `blake3:…` of a published base).
    #[arg(long)]
    base: Option<String>,
    /// Move the tag if it already points elsewhere.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    registry: RegistryArg,
}

/// Runs `mmx publish`.
pub fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let p = Printer::text();
    let registry = args.registry.create()?;
    let base = args
        .base
        .as_deref()
        .map(|b| registry.resolve(b))
        .transpose()?;
    let options = PublishOptions {
        kind: args.kind,
        specialty: args.specialty.clone(),
        base,
        force: args.force,
        ..PublishOptions::default()
    };
    let published = registry.publish(&args.dir, &args.reference, &options)?;
    say!(
        p,
        "published {} as {} ({}): {} blobs, {} written ({} of {})",
        args.dir.display(),
        args.reference,
        published.kind.name(),
        published.blobs,
        published.written,
        human_bytes(published.bytes_written),
        human_bytes(published.bytes)
    );
    say!(p, "manifest {}", published.manifest);
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `mmx pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// `NAME:TAG` or `blake3:…` of a manifest.
    source: String,
    /// Where to write it (with `--from`, optional: the registry then only caches it).
    #[arg(short, long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// Copy it from this remote into the registry first: `s3://bucket/prefix` or the name of
    /// a `[remotes.NAME]` entry in the registry's mmx-registry.toml.
    #[arg(long, value_name = "REMOTE")]
    from: Option<String>,
    /// Replace an existing directory that is not an earlier mmx output.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    transfer: TransferArgs,
    #[command(flatten)]
    registry: RegistryArg,
}

/// Runs `mmx pull`.
pub fn pull(args: PullArgs) -> anyhow::Result<ExitCode> {
    let p = Printer::text();
    let registry = match &args.from {
        Some(remote) => {
            let registry = args.registry.create()?;
            let spec = registry.remote_spec(remote)?;
            let source = Registry::remote(&spec, false)?;
            let copied = args.transfer.copy(&source, &registry, &args.source)?;
            args.transfer
                .report("pulled", &args.source, &spec.url, &copied)?;
            registry
        }
        None => args.registry.open()?,
    };
    let Some(output) = &args.output else {
        if args.from.is_none() {
            bail!("mmx pull needs -o DIR (or --from REMOTE to fill the registry from a remote)");
        }
        return Ok(ExitCode::SUCCESS);
    };
    let digest = registry.resolve(&args.source)?;
    let files = registry.pull(&digest, output, args.force)?;
    if !args.transfer.json {
        say!(
            p,
            "pulled {} ({digest}) into {}: {}",
            args.source,
            output.display(),
            files.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `mmx push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// `NAME:TAG` or `blake3:…` of a manifest in the registry.
    source: String,
    /// The remote: `s3://bucket/prefix` or the name of a `[remotes.NAME]` entry in the
    /// registry's mmx-registry.toml.
    #[arg(long, value_name = "REMOTE")]
    to: String,
    /// Move the remote's tag if it points elsewhere.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    transfer: TransferArgs,
    #[command(flatten)]
    registry: RegistryArg,
}

/// Runs `mmx push`.
pub fn push(args: PushArgs) -> anyhow::Result<ExitCode> {
    let registry = args.registry.open()?;
    let spec = registry.remote_spec(&args.to)?;
    let remote = Registry::remote(&spec, true)?;
    let transfer = TransferArgs {
        force: args.force,
        ..args.transfer
    };
    let copied = transfer.copy(&registry, &remote, &args.source)?;
    transfer.report("pushed", &args.source, &spec.url, &copied)?;
    Ok(ExitCode::SUCCESS)
}

/// How `push` and `pull --from` copy.
#[derive(Debug, Args)]
pub struct TransferArgs {
    /// Blobs in flight at once.
    #[arg(long, default_value_t = 8, value_name = "N")]
    parallel: usize,
    /// Print what was copied as JSON.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
    #[arg(skip)]
    force: bool,
}

impl TransferArgs {
    fn copy(&self, from: &Registry, to: &Registry, reference: &str) -> anyhow::Result<Transfer> {
        let bar = super::progress::bar(
            "copying",
            super::progress::Counting::Bytes,
            0,
            self.quiet || self.json,
        );
        let progress = |done: u64, total: u64| {
            bar.set_length(total);
            bar.set_position(done);
        };
        let options = TransferOptions {
            parallel: self.parallel,
            force: self.force,
            progress: Some(&progress),
        };
        let copied = from.copy_to(to, reference, &options);
        bar.finish_and_clear();
        Ok(copied?)
    }

    fn report(
        &self,
        verb: &str,
        reference: &str,
        remote: &str,
        t: &Transfer,
    ) -> anyhow::Result<()> {
        Printer::new(self.json).result(t, |p| {
            let direction = if verb == "pushed" { "to" } else { "from" };
            say!(
            p,
            "{verb} {reference} {direction} {remote}: {} manifests, {} blobs, {} sent ({} of {})",
            t.manifests,
            t.blobs,
            t.sent,
            human_bytes(t.bytes_sent),
            human_bytes(t.bytes)
        );
            if !t.tags.is_empty() {
                say!(p, "tagged {}", t.tags.join(", "));
            }
            say!(p, "manifest {}", t.manifest);
        })
    }
}

/// Arguments of `mmx ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    registry: RegistryArg,
}

/// Runs `mmx ls`.
pub fn ls(args: LsArgs) -> anyhow::Result<ExitCode> {
    let listing = args.registry.open()?.list()?;
    Printer::new(args.json).result(&listing, |p| {
        say!(
            p,
            "{:<32} {:<8} {:<14} {:>10}  manifest",
            "tag",
            "kind",
            "specialty",
            "size"
        );
        for l in &listing {
            say!(
                p,
                "{:<32} {:<8} {:<14} {:>10}  {}",
                l.reference,
                l.kind.name(),
                l.specialty.as_deref().unwrap_or("-"),
                human_bytes(l.bytes),
                l.manifest.short()
            );
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `mmx show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// `NAME:TAG` or `blake3:…` of a manifest.
    source: String,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    registry: RegistryArg,
}

/// Runs `mmx show`.
pub fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let registry = args.registry.open()?;
    let digest = registry.resolve(&args.source)?;
    let manifest = registry.manifest(&digest)?;
    Printer::new(args.json).result(&manifest, |p| {
        say!(p, "manifest  {digest}");
        say!(p, "kind      {}", manifest.kind.name());
        if let Some(s) = &manifest.specialty {
            say!(p, "specialty {s}");
        }
        if let Some(b) = &manifest.base {
            say!(p, "base      {b}");
        }
        if let Some(l) = &manifest.lineage {
            say!(
                p,
                "made by   {} from {} inputs (recipe {})",
                l.tool,
                l.inputs.len(),
                l.recipe
            );
        }
        for f in &manifest.files {
            let tensors = match f {
                mmx::registry::FileEntry::Safetensors { tensors, .. } => {
                    format!(" ({} tensors)", tensors.len())
                }
                mmx::registry::FileEntry::Blob { .. } => String::new(),
            };
            say!(
                p,
                "  {:<40} {:>10}{tensors}",
                f.path(),
                human_bytes(f.bytes())
            );
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `mmx tag`.
#[derive(Debug, Args)]
pub struct TagArgs {
    /// `NAME:TAG` or `blake3:…` of a manifest.
    source: String,
    /// The new tag.
    #[arg(value_parser = Reference::parse)]
    target: Reference,
    /// Move the tag if it already points elsewhere.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    registry: RegistryArg,
}

/// Runs `mmx tag`.
pub fn tag(args: TagArgs) -> anyhow::Result<ExitCode> {
    let p = Printer::text();
    let digest = args
        .registry
        .open()?
        .tag(&args.source, &args.target, args.force)?;
    say!(p, "{} -> {digest}", args.target);
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `mmx rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// The tag to remove (its blobs stay until `mmx gc`).
    #[arg(value_parser = Reference::parse)]
    reference: Reference,
    #[command(flatten)]
    registry: RegistryArg,
}

/// Runs `mmx rm`.
pub fn rm(args: RmArgs) -> anyhow::Result<ExitCode> {
    let p = Printer::text();
    let digest = args.registry.open()?.remove(&args.reference)?;
    say!(p, "removed {} (was {digest})", args.reference);
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `mmx log`.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// `NAME:TAG` or `blake3:…` of a manifest.
    source: String,
    #[command(flatten)]
    registry: RegistryArg,
}

/// Runs `mmx log`.
pub fn log(args: LogArgs) -> anyhow::Result<ExitCode> {
    let p = Printer::text();
    let registry = args.registry.open()?;
    let digest = registry.resolve(&args.source)?;
    for (depth, d, manifest) in registry.log(&digest)? {
        let indent = "  ".repeat(depth);
        match manifest {
            Some(m) => {
                let made = m
                    .lineage
                    .as_ref()
                    .map_or(String::new(), |l| format!(", made by {}", l.tool));
                say!(
                    p,
                    "{indent}{d} {}{}{made}",
                    m.kind.name(),
                    m.specialty.map_or(String::new(), |s| format!(" ({s})"))
                );
            }
            None => say!(p, "{indent}{d} (not in this registry)"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `mmx verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Re-hash every blob (else: check that every blob a tag needs is present, with its size).
    #[arg(long)]
    read_data: bool,
    /// Unreferenced blobs younger than this are a publish in flight, not orphans.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    grace: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    registry: RegistryArg,
}

/// Runs `mmx verify`: exit 1 when it finds a problem.
pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let report = args.registry.open()?.verify(args.read_data, args.grace)?;
    Printer::new(args.json).result(&report, |p| {
        say!(
            p,
            "{} tags, {} manifests, {} blobs ({}){}",
            report.tags,
            report.manifests,
            report.blobs,
            human_bytes(report.bytes),
            if args.read_data {
                format!(", {} re-hashed", report.rehashed)
            } else {
                String::new()
            }
        );
        for (tag, why) in &report.broken_tags {
            say!(p, "broken tag {tag}: {why}");
        }
        for (blob, manifest) in &report.missing {
            say!(p, "missing blob {blob} (used by manifest {manifest})");
        }
        for (blob, why) in &report.corrupt {
            say!(p, "corrupt blob {blob}: {why}");
        }
        for blob in &report.orphaned {
            say!(
                p,
                "orphaned blob {blob} (no tag reaches it; `mmx gc` removes it)"
            );
        }
        if !report.unreferenced_recent.is_empty() {
            say!(p,
                "{} recent unreferenced blobs (a publish in flight or interrupted; gc reclaims them after the grace period)",
                report.unreferenced_recent.len()
            );
        }
        if report.temporary > 0 {
            say!(
                p,
                "{} leftover files in tmp/ (gc reclaims them)",
                report.temporary
            );
        }
        say!(
            p,
            "{}",
            if report.has_problems() {
                "PROBLEMS FOUND"
            } else {
                "ok"
            }
        );
    })?;
    Ok(if report.has_problems() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Arguments of `mmx gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Say what would be removed, remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Keep anything modified more recently than this (e.g. 0s, 30m, 1h, 2w).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    grace: Duration,
    #[command(flatten)]
    registry: RegistryArg,
}

/// Runs `mmx gc`.
pub fn gc(args: GcArgs) -> anyhow::Result<ExitCode> {
    let p = Printer::text();
    let report = args.registry.open()?.gc(args.grace, args.dry_run)?;
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    say!(
        p,
        "{verb} {} blobs ({}) and {} temporary files; kept {} blobs",
        report.swept,
        human_bytes(report.swept_bytes),
        report.temporary,
        report.kept
    );
    Ok(ExitCode::SUCCESS)
}

/// Publishes a merge's output with its lineage (`mmx merge --publish`).
pub fn publish_merge(
    registry_flag: Option<&std::path::Path>,
    output: &std::path::Path,
    reference: &Reference,
    recipe_text: &str,
) -> anyhow::Result<()> {
    let p = Printer::text();
    let registry = Registry::create(&registry_path(registry_flag))?;
    let options = PublishOptions::merged(output, recipe_text)?;
    let published = registry.publish(output, reference, &options)?;
    note!(
        p,
        "published {} as {reference}: {} blobs, {} written ({} of {})",
        output.display(),
        published.blobs,
        published.written,
        human_bytes(published.bytes_written),
        human_bytes(published.bytes)
    );
    say!(p, "manifest {}", published.manifest);
    Ok(())
}

/// Parses `--publish NAME:TAG`.
pub fn publish_target(text: &str) -> anyhow::Result<Reference> {
    match Reference::parse(text) {
        Ok(r) => Ok(r),
        Err(m) => bail!("`--publish`: {m}"),
    }
}
