//! Reading manifests back out: `pull` writes a published directory byte for byte, every blob
//! checked against its digest on the way.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use super::manifest::{FileEntry, Manifest};
use super::store::Store;
use crate::error::{Error, Result};
use crate::tensor::Digest;

/// Why a file name from a manifest cannot be written, or `None`: one path component, never
/// `.` or `..`, no separators or NUL.
pub fn file_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name == "." || name == ".." {
        return Some("is not a file name");
    }
    if name.contains(['/', '\\', '\0']) {
        return Some("is a path, not a file name");
    }
    if name.len() > 255 {
        return Some("is longer than 255 bytes");
    }
    None
}

pub(crate) fn in_manifest(manifest: &Digest, e: Error) -> Error {
    match e {
        Error::Registry { path, message } => Error::Registry {
            path,
            message: format!("{message} (used by manifest {manifest})"),
        },
        other => other,
    }
}

/// Reads and checks a manifest.
pub fn load_manifest(store: &dyn Store, digest: &Digest) -> Result<Manifest> {
    let blob = store.get(digest)?;
    let manifest = Manifest::decode(&blob).map_err(|message| Error::Registry {
        path: store.location().to_path_buf(),
        message: format!("manifest {digest}: {message}"),
    })?;
    for file in &manifest.files {
        if let Some(problem) = file_name_problem(file.path()) {
            return Err(Error::Registry {
                path: store.location().to_path_buf(),
                message: format!("manifest {digest}: file `{}` {problem}", file.path()),
            });
        }
    }
    Ok(manifest)
}

/// Writes one file of a manifest into `dir`.
fn write_file(store: &dyn Store, digest: &Digest, entry: &FileEntry, dir: &Path) -> Result<()> {
    let path = dir.join(entry.path());
    let mut out = File::create(&path).map_err(|e| Error::io(&path, e))?;
    let parts: Vec<Digest> = entry.blobs().into_iter().map(|(d, _)| d).collect();
    let mut written = 0u64;
    for part in parts {
        let blob = store.get(&part).map_err(|e| in_manifest(digest, e))?;
        out.write_all(&blob).map_err(|e| Error::io(&path, e))?;
        written += blob.len() as u64;
    }
    if written != entry.bytes() {
        return Err(Error::Registry {
            path: path.clone(),
            message: format!(
                "manifest {digest} says `{}` has {} bytes, its blobs hold {written}",
                entry.path(),
                entry.bytes()
            ),
        });
    }
    out.sync_all().map_err(|e| Error::io(&path, e))
}

/// Writes the directory of manifest `digest` to `target` (atomically: a failed pull leaves
/// nothing; an existing `target` is replaced only if empty, an mmx output, or with `force`).
pub fn pull(store: &dyn Store, digest: &Digest, target: &Path, force: bool) -> Result<Vec<String>> {
    let manifest = load_manifest(store, digest)?;
    crate::recipe::write_output_dir(target, force, |tmp| {
        for entry in &manifest.files {
            write_file(store, digest, entry, tmp)?;
        }
        Ok(manifest
            .files
            .iter()
            .map(|f| f.path().to_string())
            .collect())
    })
}
