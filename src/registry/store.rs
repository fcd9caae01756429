//! Where blobs and tags live: the [`Store`] trait, and [`LocalStore`], a directory.
//!
//! ```text
//! registry/
//!   mmx-registry.toml                 format version
//!   blobs/blake3/<2 hex>/<62 hex>     immutable, read-only: a tensor's bytes, a file, a manifest
//!   refs/<name>/<tag>                 `blake3:<hex>` of a manifest; moved by compare-and-swap
//!   tmp/                              files being written (a crash leaves them here only)
//!   locks/                            gc.lock (writers shared, gc exclusive), one lock per tag
//! ```
//!
//! Every write goes temp file → fsync → rename → fsync of the directory, so a reader sees a
//! whole file or none. Keys are digests, so storing a blob twice is a no-op: that also makes
//! publishing to a remote store (an S3-compatible bucket through `object_store`, a second
//! implementation of [`Store`]) idempotent.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use memmap2::Mmap;

use super::name::Reference;
use crate::error::{Error, Result};
use crate::tensor::Digest;
use crate::tensor::{sync_dir, write_atomic_via};

/// The registry format this build reads and writes.
pub const FORMAT: u32 = 1;

/// A blob as stored: its digest, size and last modification (publishing refreshes it when the
/// blob is reused, so that gc's grace period protects blobs a publish is about to reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    /// The digest.
    pub digest: Digest,
    /// Bytes.
    pub bytes: u64,
    /// Last modified.
    pub modified: SystemTime,
}

/// A verified blob's bytes (memory-mapped for a local store).
pub struct Blob(BlobBytes);

enum BlobBytes {
    Mapped(Mmap),
    Empty,
}

impl Blob {
    /// The mapping itself (`None` for an empty blob).
    pub fn into_map(self) -> Option<Mmap> {
        match self.0 {
            BlobBytes::Mapped(m) => Some(m),
            BlobBytes::Empty => None,
        }
    }
}

impl std::ops::Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            BlobBytes::Mapped(m) => m,
            BlobBytes::Empty => &[],
        }
    }
}

impl Blob {
    /// A blob held in memory (read from a remote store), in an anonymous mapping so that it
    /// serves wherever a mapped file does.
    pub fn from_bytes(bytes: &[u8]) -> std::io::Result<Blob> {
        if bytes.is_empty() {
            return Ok(Blob(BlobBytes::Empty));
        }
        let mut map = memmap2::MmapMut::map_anon(bytes.len())?;
        map.copy_from_slice(bytes);
        Ok(Blob(BlobBytes::Mapped(map.make_read_only()?)))
    }
}

/// Held while a writer (shared) or gc (exclusive) works; released on drop (a local store's
/// file lock also on process death, a remote's lock object once stale).
pub struct LockGuard(#[allow(dead_code)] Box<dyn Send>);

impl LockGuard {
    /// Holds `held` until the guard is dropped.
    pub fn new(held: impl Send + 'static) -> LockGuard {
        LockGuard(Box::new(held))
    }
}

/// The format a registry marker (`mmx-registry.toml`) states, if it is one. The marker may
/// also hold a `[remotes]` table.
pub fn parse_marker(text: &str) -> Option<u32> {
    let table: toml::Table = text.parse().ok()?;
    table
        .get("format")?
        .as_integer()
        .and_then(|f| u32::try_from(f).ok())
}

/// Blob and tag storage.
pub trait Store: Send + Sync {
    /// Where the store is, for messages.
    fn location(&self) -> &Path;
    /// Whether a blob is present.
    fn contains(&self, digest: &Digest) -> Result<bool>;
    /// Which of `wanted` are present, where the store can say that for all of them more
    /// cheaply than [`Store::contains`] for each (a bucket: one listing instead of a request
    /// per blob); `None`: ask one by one.
    fn holding(&self, wanted: &[Digest]) -> Result<Option<std::collections::BTreeSet<Digest>>> {
        let _ = wanted;
        Ok(None)
    }
    /// Stores `bytes` under `digest` (the caller's blake3 of them). Returns whether anything
    /// was written: a present blob is not rewritten, only marked as just used.
    fn put(&self, digest: &Digest, bytes: &[u8]) -> Result<bool>;
    /// [`Store::put`] of a blob the caller has just found absent: a store where looking costs
    /// a request (a bucket) need not look again. A blob that arrived meanwhile is rewritten
    /// with the same bytes.
    fn put_absent(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        self.put(digest, bytes).map(|_| ())
    }
    /// A blob's bytes, checked against its digest: corruption is an error, never wrong bytes.
    fn get(&self, digest: &Digest) -> Result<Blob>;
    /// Every blob.
    fn blobs(&self) -> Result<Vec<BlobInfo>>;
    /// Removes a blob (gc only).
    fn remove_blob(&self, digest: &Digest) -> Result<()>;
    /// The manifest a tag points at.
    fn read_tag(&self, reference: &Reference) -> Result<Option<Digest>>;
    /// Moves a tag from `expected` to `new` (`None`: absent), atomically: fails if the tag is
    /// not at `expected` when the swap happens.
    fn swap_tag(
        &self,
        reference: &Reference,
        expected: Option<Digest>,
        new: Option<Digest>,
    ) -> Result<()>;
    /// Every tag, sorted.
    fn tags(&self) -> Result<Vec<(Reference, std::result::Result<Digest, String>)>>;
    /// Leftovers of interrupted writes, with their last modification.
    fn temporary(&self) -> Result<Vec<(PathBuf, SystemTime)>>;
    /// Removes a leftover.
    fn remove_temporary(&self, path: &Path) -> Result<()>;
    /// Taken by writers: many at once, never during gc.
    fn lock_shared(&self) -> Result<LockGuard>;
    /// Taken by gc: alone.
    fn lock_exclusive(&self) -> Result<LockGuard>;
}

/// A registry in a local directory.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn fail(path: &Path, message: impl Into<String>) -> Error {
    Error::Registry {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Refuses a path in the registry at `root` that is, or passes through, a symbolic link:
/// everything a registry reads or writes is its own, so it follows no link out of itself,
/// neither to read a blob or tag nor to write one. (`root` itself may be a link.)
fn refuse_links(root: &Path, path: &Path) -> Result<()> {
    let relative = path.strip_prefix(root).expect("a path inside the registry");
    let mut at = root.to_path_buf();
    for part in relative.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(fail(
                    &at,
                    "is a symbolic link: a registry holds its own files and follows no link out of itself (replace the link with what it points to)",
                ))
            }
            Ok(_) => {}
            // Absent: nothing below it exists either.
            Err(_) => break,
        }
    }
    Ok(())
}

impl LocalStore {
    /// Opens the registry at `root`; with `create`, makes it first if it does not exist.
    /// Refuses a directory that holds something else, a newer format, or links out of it.
    pub fn open(root: &Path, create: bool) -> Result<LocalStore> {
        let marker = root.join("mmx-registry.toml");
        for own in ["mmx-registry.toml", "blobs/blake3", "refs", "tmp", "locks"] {
            refuse_links(root, &root.join(own))?;
        }
        if !marker.exists() {
            if !create {
                return Err(fail(
                    root,
                    "no registry here (no mmx-registry.toml); `mmx publish` creates one",
                ));
            }
            // Another process may be creating it too: its directories, its marker and the marker's
            // temporary file are expected; anything else means the folder is not ours.
            let ours = |name: &str| {
                ["blobs", "refs", "tmp", "locks", "mmx-registry.toml"].contains(&name)
                    || name.starts_with(".mmx-registry.toml")
            };
            if root.is_dir() {
                for entry in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
                    let name = entry.map_err(|e| Error::io(root, e))?.file_name();
                    if !ours(&name.to_string_lossy()) {
                        return Err(fail(
                            root,
                            "is not empty and has no mmx-registry.toml: not an mmx registry",
                        ));
                    }
                }
            }
            for dir in ["blobs/blake3", "refs", "tmp", "locks"] {
                std::fs::create_dir_all(root.join(dir))
                    .map_err(|e| Error::io(root.join(dir), e))?;
            }
            crate::tensor::write_atomic(&marker, format!("format = {FORMAT}\n").as_bytes())?;
        }
        let text = std::fs::read_to_string(&marker).map_err(|e| Error::io(&marker, e))?;
        match parse_marker(&text) {
            Some(FORMAT) => {}
            Some(other) => {
                return Err(fail(
                    &marker,
                    format!("format {other}; this mmx reads format {FORMAT}"),
                ))
            }
            None => return Err(fail(&marker, "not an mmx registry marker")),
        }
        // A cloned registry lacks the empty folders git does not keep.
        for dir in ["blobs/blake3", "refs", "tmp", "locks"] {
            std::fs::create_dir_all(root.join(dir)).map_err(|e| Error::io(root.join(dir), e))?;
        }
        Ok(LocalStore {
            root: root.to_path_buf(),
        })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("blobs/blake3")
            .join(&hex[..2])
            .join(&hex[2..])
    }

    fn tag_path(&self, reference: &Reference) -> PathBuf {
        self.root
            .join("refs")
            .join(&reference.name)
            .join(&reference.tag)
    }

    /// A fresh file name in `tmp/`.
    fn temp_path(&self, hint: &str) -> PathBuf {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{hint}.{}.{n}", std::process::id()))
    }

    /// Writes `bytes` to a temporary file, syncs it and renames it to `target`, then syncs
    /// `target`'s directory.
    fn install(&self, target: &Path, bytes: &[u8], hint: &str, read_only: bool) -> Result<()> {
        let parent = target.parent().expect("inside the registry");
        if !parent.exists() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            sync_dir(parent.parent().expect("inside the registry"))?;
        }
        // The temporary file lives in tmp/, where gc finds what a crash leaves.
        write_atomic_via(&self.temp_path(hint), target, &[bytes], read_only)
    }

    fn lock(&self, file: &str, exclusive: bool) -> Result<LockGuard> {
        let path = self.root.join("locks").join(file);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let locked = if exclusive { f.lock() } else { f.lock_shared() };
        locked.map_err(|e| Error::io(&path, e))?;
        Ok(LockGuard::new(f))
    }
}

impl Store for LocalStore {
    fn location(&self) -> &Path {
        &self.root
    }

    fn contains(&self, digest: &Digest) -> Result<bool> {
        let path = self.blob_path(digest);
        refuse_links(&self.root, &path)?;
        Ok(path.is_file())
    }

    fn put(&self, digest: &Digest, bytes: &[u8]) -> Result<bool> {
        let path = self.blob_path(digest);
        refuse_links(&self.root, &path)?;
        if path.is_file() {
            // Reused: mark it as just used so that a concurrent gc's grace period spares it.
            if let Ok(f) = File::open(&path) {
                let _ = f.set_modified(SystemTime::now());
            }
            return Ok(false);
        }
        self.install(&path, bytes, &digest.short(), true)?;
        Ok(true)
    }

    fn get(&self, digest: &Digest) -> Result<Blob> {
        let path = self.blob_path(digest);
        refuse_links(&self.root, &path)?;
        let file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => fail(&path, format!("blob {digest} is missing")),
            _ => Error::io(&path, e),
        })?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let bytes = if len == 0 {
            BlobBytes::Empty
        } else {
            // SAFETY: blobs are read-only and never rewritten; gc removes only unreferenced ones.
            BlobBytes::Mapped(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?)
        };
        let blob = Blob(bytes);
        let actual = Digest::of(&blob);
        if actual != *digest {
            return Err(fail(
                &path,
                format!("blob {digest} is corrupt: its content hashes to {actual}"),
            ));
        }
        Ok(blob)
    }

    fn blobs(&self) -> Result<Vec<BlobInfo>> {
        let top = self.root.join("blobs/blake3");
        let mut out = Vec::new();
        for prefix in std::fs::read_dir(&top).map_err(|e| Error::io(&top, e))? {
            let prefix = prefix.map_err(|e| Error::io(&top, e))?.path();
            let Some(head) = prefix
                .file_name()
                .and_then(|n| n.to_str())
                .map(String::from)
            else {
                continue;
            };
            for entry in std::fs::read_dir(&prefix).map_err(|e| Error::io(&prefix, e))? {
                let entry = entry.map_err(|e| Error::io(&prefix, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(digest) = Digest::parse(&format!("{head}{name}")) else {
                    continue;
                };
                let meta = entry.metadata().map_err(|e| Error::io(entry.path(), e))?;
                out.push(BlobInfo {
                    digest,
                    bytes: meta.len(),
                    modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        out.sort_by_key(|b| b.digest);
        Ok(out)
    }

    fn remove_blob(&self, digest: &Digest) -> Result<()> {
        let path = self.blob_path(digest);
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        sync_dir(path.parent().expect("inside the registry"))
    }

    fn read_tag(&self, reference: &Reference) -> Result<Option<Digest>> {
        let path = self.tag_path(reference);
        refuse_links(&self.root, &path)?;
        match std::fs::read_to_string(&path) {
            Ok(text) => Digest::parse(text.trim())
                .filter(|_| text.starts_with("blake3:"))
                .map(Some)
                .ok_or_else(|| fail(&path, format!("tag {reference} does not hold a digest"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn swap_tag(
        &self,
        reference: &Reference,
        expected: Option<Digest>,
        new: Option<Digest>,
    ) -> Result<()> {
        // One lock per tag serialises the read-compare-write; the OS drops it if we die.
        let _guard = self.lock(
            &format!("tag-{}@{}.lock", reference.name, reference.tag),
            true,
        )?;
        let current = self.read_tag(reference)?;
        let path = self.tag_path(reference);
        if current != expected {
            let show = |d: Option<Digest>| d.map_or("absent".to_string(), |d| d.to_string());
            return Err(fail(
                &path,
                format!(
                    "tag {reference} moved: expected {}, found {}",
                    show(expected),
                    show(current)
                ),
            ));
        }
        match new {
            Some(digest) => self.install(
                &path,
                format!("{digest}\n").as_bytes(),
                &format!("tag-{}", reference.tag),
                false,
            ),
            None => {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                sync_dir(path.parent().expect("inside the registry"))
            }
        }
    }

    fn tags(&self) -> Result<Vec<(Reference, std::result::Result<Digest, String>)>> {
        let refs = self.root.join("refs");
        let mut out = Vec::new();
        for name in std::fs::read_dir(&refs).map_err(|e| Error::io(&refs, e))? {
            let name = name.map_err(|e| Error::io(&refs, e))?.path();
            if !name.is_dir() {
                continue;
            }
            for tag in std::fs::read_dir(&name).map_err(|e| Error::io(&name, e))? {
                let tag = tag.map_err(|e| Error::io(&name, e))?.path();
                let (Some(n), Some(t)) = (
                    name.file_name().and_then(|n| n.to_str()),
                    tag.file_name().and_then(|n| n.to_str()),
                ) else {
                    continue;
                };
                let Ok(reference) = Reference::parse(&format!("{n}:{t}")) else {
                    continue;
                };
                let digest = self
                    .read_tag(&reference)
                    .map_err(|e| e.to_string())
                    .and_then(|d| d.ok_or_else(|| "vanished while listing".to_string()));
                out.push((reference, digest));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn temporary(&self) -> Result<Vec<(PathBuf, SystemTime)>> {
        let tmp = self.root.join("tmp");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))? {
            let entry = entry.map_err(|e| Error::io(&tmp, e))?;
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((entry.path(), modified));
        }
        Ok(out)
    }

    fn remove_temporary(&self, path: &Path) -> Result<()> {
        if path.is_dir() {
            std::fs::remove_dir_all(path).map_err(|e| Error::io(path, e))
        } else {
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))
        }
    }

    fn lock_shared(&self) -> Result<LockGuard> {
        self.lock("gc.lock", false)
    }

    fn lock_exclusive(&self) -> Result<LockGuard> {
        self.lock("gc.lock", true)
    }
}
