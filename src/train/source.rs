//! Where the trainers read a model or adapter from: a directory, or a registry reference
//! (`registry:NAME:TAG`, `blake3:<manifest>`) pulled into a temporary directory that is
//! removed when the [`Materialized`] is dropped.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::registry::{Digest, Registry};

/// A model or adapter directory, and the registry manifest it came from.
#[derive(Debug)]
pub struct Materialized {
    dir: PathBuf,
    temporary: bool,
    manifest: Option<Digest>,
}

impl Materialized {
    /// The directory to read.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The registry manifest, for a registry source.
    pub fn manifest(&self) -> Option<&Digest> {
        self.manifest.as_ref()
    }

    /// `source` as a directory: itself, or pulled from the registry at `registry`.
    pub fn open(source: &str, registry: &Path) -> Result<Materialized> {
        let reference = source.strip_prefix("registry:");
        if reference.is_none() && !source.starts_with("blake3:") {
            let dir = PathBuf::from(source);
            if !dir.is_dir() {
                return Err(Error::Io {
                    path: dir,
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
                });
            }
            return Ok(Materialized {
                dir,
                temporary: false,
                manifest: None,
            });
        }
        let store = Registry::open(registry)?;
        let manifest = store.resolve(reference.unwrap_or(source))?;
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mmx-pull-{}-{n}", std::process::id()));
        let materialized = Materialized {
            dir,
            temporary: true,
            manifest: Some(manifest),
        };
        store.pull(&manifest, &materialized.dir, true)?;
        Ok(materialized)
    }
}

impl Drop for Materialized {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
