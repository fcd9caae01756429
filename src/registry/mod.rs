//! The content-addressed registry (DESIGN.md §3): adapters, base models and merged experts
//! stored tensor by tensor under their blake3 digests, described by manifests (themselves
//! blobs) and named by tags.
//!
//! - [`store`]: the [`Store`] trait and the local directory store, with atomic writes, locks
//!   and compare-and-swap tags;
//! - [`manifest`]: what a published directory is made of;
//! - [`publish`](publish::publish) and [`pull`](export::pull): directories in and out, byte for
//!   byte, every read checked against its digest;
//! - [`verify`](check::verify) and [`gc`](check::gc).
//!
//! ```no_run
//! use mmx::registry::{PublishOptions, Reference, Registry};
//!
//! let registry = Registry::create("registry".as_ref())?;
//! let tag = Reference::parse("cardiology:v1").unwrap();
//! let published = registry.publish("adapters/cardiology".as_ref(), &tag, &PublishOptions::default())?;
//! registry.pull(&published.manifest, "out/cardiology".as_ref(), false)?;
//! # Ok::<(), mmx::Error>(())
//! ```

pub mod check;
pub mod export;
pub mod manifest;
pub use crate::recipe::reference as name;
pub mod open;
pub mod publish;
pub mod remote;
pub mod store;
pub mod transfer;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::tensor::Digest;
pub use check::{GcReport, VerifyReport};
pub use manifest::{FileEntry, Kind, Lineage, Manifest};
pub use name::Reference;
pub use open::Opened;
pub use publish::{PublishOptions, Published};
pub use remote::{RemoteSpec, RemoteStore};
pub use store::{LocalStore, Store};
pub use transfer::{Transfer, TransferOptions};

use crate::error::{Error, Result};

/// The environment variable naming the registry when `--registry` does not.
pub const REGISTRY_ENV: &str = "MMX_REGISTRY";

/// Where the registry is: `--registry`, else `$MMX_REGISTRY`, else `./registry`; a directory
/// or `s3://bucket/prefix`.
pub fn registry_path(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os(REGISTRY_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("registry"))
}

/// One tag, as `ls` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listing {
    /// `NAME:TAG`.
    pub reference: String,
    /// The manifest.
    pub manifest: Digest,
    /// Base, adapter or merged.
    pub kind: Kind,
    /// The specialty, if any.
    pub specialty: Option<String>,
    /// Bytes of the directory.
    pub bytes: u64,
}

/// A registry: a [`Store`] and the operations on it.
pub struct Registry {
    store: Box<dyn Store>,
}

impl Registry {
    /// Opens the registry at `path`, a directory or `s3://bucket/prefix` (an error if there is
    /// none).
    pub fn open(path: &Path) -> Result<Registry> {
        Registry::at(path, false)
    }

    /// Opens the registry at `path`, creating it if absent (for writers: `publish`).
    pub fn create(path: &Path) -> Result<Registry> {
        Registry::at(path, true)
    }

    fn at(path: &Path, create: bool) -> Result<Registry> {
        if remote::is_remote(path) {
            let url = path.to_string_lossy();
            let spec = RemoteSpec::parse(&url).map_err(|message| Error::Registry {
                path: path.to_path_buf(),
                message: message.to_string(),
            })?;
            return Registry::remote(&spec, create);
        }
        Ok(Registry {
            store: Box::new(LocalStore::open(path, create)?),
        })
    }

    /// Opens a remote registry; with `create`, makes it if absent (for `push`).
    pub fn remote(spec: &RemoteSpec, create: bool) -> Result<Registry> {
        Ok(Registry {
            store: Box::new(RemoteStore::open(spec, create)?),
        })
    }

    /// The remote `text` names: `s3://bucket/prefix`, or a `[remotes.NAME]` entry of this
    /// registry's `mmx-registry.toml` (`url`, and optionally `endpoint` and `region`).
    pub fn remote_spec(&self, text: &str) -> Result<RemoteSpec> {
        if text.contains("://") {
            return RemoteSpec::parse(text).map_err(|m| self.fail(m.to_string()));
        }
        let marker = self.store.location().join("mmx-registry.toml");
        let table: toml::Table = std::fs::read_to_string(&marker)
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or_default();
        let entry = table
            .get("remotes")
            .and_then(|r| r.get(text))
            .ok_or_else(|| {
                self.fail(format!(
                    "no remote `{text}`: give `s3://bucket/prefix` or add `[remotes.{text}]` with a `url` to {}",
                    marker.display()
                ))
            })?;
        let field = |key: &str| entry.get(key).and_then(|v| v.as_str()).map(String::from);
        let url =
            field("url").ok_or_else(|| self.fail(format!("`[remotes.{text}]` has no `url`")))?;
        let mut spec = RemoteSpec::parse(&url).map_err(|m| self.fail(m.to_string()))?;
        spec.endpoint = field("endpoint");
        spec.region = field("region");
        Ok(spec)
    }

    /// Copies what `reference` names from this registry into `to` (see [`transfer::copy`]).
    pub fn copy_to(
        &self,
        to: &Registry,
        reference: &str,
        options: &TransferOptions,
    ) -> Result<Transfer> {
        let digest = self.resolve(reference)?;
        let tag = if reference.starts_with("blake3:") {
            None
        } else {
            Some(Reference::parse(reference).map_err(|m| self.fail(m.to_string()))?)
        };
        transfer::copy(self, to, &digest, tag.as_ref(), options)
    }

    /// The store underneath.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    fn fail(&self, message: String) -> Error {
        Error::Registry {
            path: self.store.location().to_path_buf(),
            message,
        }
    }

    /// The manifest that `NAME:TAG` or `blake3:<hex>` names.
    pub fn resolve(&self, text: &str) -> Result<Digest> {
        if text.starts_with("blake3:") {
            let digest = Digest::parse(text)
                .ok_or_else(|| self.fail(format!("`{text}` is not a blake3:<64 hex> digest")))?;
            if !self.store.contains(&digest)? {
                return Err(self.fail(format!("no manifest {digest}")));
            }
            return Ok(digest);
        }
        let reference = Reference::parse(text).map_err(|m| self.fail(m.to_string()))?;
        self.store
            .read_tag(&reference)?
            .ok_or_else(|| self.fail(format!("no tag {reference}")))
    }

    /// Reads a manifest.
    pub fn manifest(&self, digest: &Digest) -> Result<Manifest> {
        export::load_manifest(self.store(), digest)
    }

    /// Publishes a directory (see [`publish::publish`]).
    pub fn publish(
        &self,
        dir: &Path,
        reference: &Reference,
        options: &PublishOptions,
    ) -> Result<Published> {
        publish::publish(self.store(), dir, reference, options)
    }

    /// Writes a manifest's directory (see [`export::pull`]).
    pub fn pull(&self, manifest: &Digest, target: &Path, force: bool) -> Result<Vec<String>> {
        export::pull(self.store(), manifest, target, force)
    }

    /// Every tag with its manifest's summary.
    pub fn list(&self) -> Result<Vec<Listing>> {
        let mut out = Vec::new();
        for (reference, digest) in self.store.tags()? {
            let digest = digest.map_err(|why| self.fail(format!("tag {reference}: {why}")))?;
            let manifest = self.manifest(&digest)?;
            out.push(Listing {
                reference: reference.to_string(),
                manifest: digest,
                kind: manifest.kind,
                specialty: manifest.specialty.clone(),
                bytes: manifest.bytes(),
            });
        }
        Ok(out)
    }

    /// Points `target` at what `source` names (`NAME:TAG` or a digest). An existing `target`
    /// elsewhere is refused unless `force`; the move is compare-and-swap.
    pub fn tag(&self, source: &str, target: &Reference, force: bool) -> Result<Digest> {
        let digest = self.resolve(source)?;
        self.manifest(&digest)?;
        let _guard = self.store.lock_shared()?;
        match self.store.read_tag(target)? {
            Some(current) if current == digest => Ok(digest),
            Some(current) if !force => Err(self.fail(format!(
                "tag {target} already points at {current}; pass --force to move it"
            ))),
            current => {
                self.store.swap_tag(target, current, Some(digest))?;
                Ok(digest)
            }
        }
    }

    /// Removes a tag (its blobs stay until `gc`).
    pub fn remove(&self, reference: &Reference) -> Result<Digest> {
        let _guard = self.store.lock_shared()?;
        let current = self
            .store
            .read_tag(reference)?
            .ok_or_else(|| self.fail(format!("no tag {reference}")))?;
        self.store.swap_tag(reference, Some(current), None)?;
        Ok(current)
    }

    /// The lineage of a manifest: it, then the inputs it was made from and the base it applies
    /// to, depth first (each once); inputs no longer in the registry are listed with `None`.
    pub fn log(&self, digest: &Digest) -> Result<Vec<(usize, Digest, Option<Manifest>)>> {
        let mut out = Vec::new();
        let mut stack = vec![(0usize, *digest)];
        let mut seen = std::collections::BTreeSet::new();
        while let Some((depth, d)) = stack.pop() {
            if !seen.insert(d) {
                continue;
            }
            let manifest = if self.store.contains(&d)? {
                Some(self.manifest(&d)?)
            } else {
                None
            };
            if let Some(base) = manifest.as_ref().and_then(|m| m.base) {
                stack.push((depth + 1, base));
            }
            if let Some(lineage) = manifest.as_ref().and_then(|m| m.lineage.as_ref()) {
                for input in lineage.inputs.iter().rev() {
                    stack.push((depth + 1, *input));
                }
            }
            out.push((depth, d, manifest));
        }
        Ok(out)
    }

    /// See [`check::verify`].
    pub fn verify(&self, read_data: bool, grace: Duration) -> Result<VerifyReport> {
        check::verify(self.store(), read_data, grace)
    }

    /// See [`check::gc`].
    pub fn gc(&self, grace: Duration, dry_run: bool) -> Result<GcReport> {
        check::gc(self.store(), grace, dry_run)
    }
}

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// No number before the unit.
    #[error("`{0}`: expected a number and a unit, e.g. 1h, 30m, 2w")]
    NoNumber(String),
    /// A unit other than s, m, h, d, w.
    #[error("`{text}`: unknown unit `{unit}` (s, m, h, d, w)")]
    UnknownUnit {
        /// The text given.
        text: String,
        /// The unit.
        unit: String,
    },
}

/// Parses a duration: `90` or `90s`, `15m`, `2h`, `7d`, `2w`.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, DurationError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| DurationError::NoNumber(text.to_string()))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        other => {
            return Err(DurationError::UnknownUnit {
                text: text.to_string(),
                unit: other.to_string(),
            })
        }
    };
    Ok(Duration::from_secs(n * seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(1_209_600)));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
    }
}
