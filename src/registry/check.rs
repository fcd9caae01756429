//! `verify` (is everything a tag reaches present and intact?) and `gc` (sweep what no tag
//! reaches, once older than a grace period).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::export::load_manifest;
use super::store::Store;
use crate::error::Result;
use crate::tensor::Digest;

/// What `verify` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Tags checked.
    pub tags: usize,
    /// Manifests reached from the tags.
    pub manifests: usize,
    /// Blobs in the store, and their bytes.
    pub blobs: usize,
    /// Bytes.
    pub bytes: u64,
    /// Blobs re-hashed (with `--read-data`).
    pub rehashed: usize,
    /// Tags that are unreadable or point at a missing or broken manifest: (tag, why).
    pub broken_tags: Vec<(String, String)>,
    /// Blobs a manifest names that are not in the store: (blob, manifest).
    pub missing: Vec<(String, String)>,
    /// Blobs whose content does not hash to their name, or whose size differs from the
    /// manifest's: (blob, why).
    pub corrupt: Vec<(String, String)>,
    /// Blobs no tag reaches, modified within the grace period (a publish in flight or
    /// interrupted: gc reclaims them once older).
    pub unreferenced_recent: Vec<String>,
    /// Blobs no tag reaches, older than the grace period (gc would have swept them).
    pub orphaned: Vec<String>,
    /// Files left in tmp/ by interrupted writes.
    pub temporary: usize,
}

impl VerifyReport {
    /// Whether verify found a problem (exit code 1).
    pub fn has_problems(&self) -> bool {
        !(self.broken_tags.is_empty()
            && self.missing.is_empty()
            && self.corrupt.is_empty()
            && self.orphaned.is_empty())
    }
}

/// What the tags reach: how many tags, each reachable manifest with the blobs it needs, and
/// the tags that cannot be followed (tag, why).
struct Reach {
    tags: usize,
    manifests: BTreeMap<Digest, Vec<(Digest, Option<u64>)>>,
    broken: Vec<(String, String)>,
}

/// Follows every tag to its manifest.
fn reachable(store: &dyn Store) -> Result<Reach> {
    let mut manifests = BTreeMap::new();
    let mut broken = Vec::new();
    let tags = store.tags()?;
    for (reference, digest) in &tags {
        let digest = match digest {
            Ok(d) => *d,
            Err(why) => {
                broken.push((reference.to_string(), why.clone()));
                continue;
            }
        };
        if manifests.contains_key(&digest) {
            continue;
        }
        match load_manifest(store, &digest) {
            Ok(m) => {
                manifests.insert(digest, m.blobs());
            }
            Err(e) => broken.push((reference.to_string(), e.to_string())),
        }
    }
    Ok(Reach {
        tags: tags.len(),
        manifests,
        broken,
    })
}

/// Checks the registry: every tag reaches a readable manifest whose blobs are all present
/// (and, with `read_data`, intact); blobs no tag reaches are counted, and reported as orphans
/// once older than `grace`.
pub fn verify(store: &dyn Store, read_data: bool, grace: Duration) -> Result<VerifyReport> {
    let Reach {
        tags,
        manifests,
        broken: broken_tags,
    } = reachable(store)?;
    let blobs = store.blobs()?;
    let present: BTreeMap<Digest, u64> = blobs.iter().map(|b| (b.digest, b.bytes)).collect();
    let mut report = VerifyReport {
        tags,
        manifests: manifests.len(),
        blobs: blobs.len(),
        bytes: blobs.iter().map(|b| b.bytes).sum(),
        broken_tags,
        temporary: store.temporary()?.len(),
        ..VerifyReport::default()
    };
    let mut referenced: BTreeSet<Digest> = manifests.keys().copied().collect();
    for (manifest, needed) in &manifests {
        for (blob, size) in needed {
            referenced.insert(*blob);
            match present.get(blob) {
                None => report
                    .missing
                    .push((blob.to_string(), manifest.to_string())),
                Some(actual) if size.is_some_and(|s| s != *actual) => report.corrupt.push((
                    blob.to_string(),
                    format!(
                        "{actual} bytes, manifest {manifest} says {}",
                        size.unwrap_or(0)
                    ),
                )),
                Some(_) => {}
            }
        }
    }
    if read_data {
        use rayon::prelude::*;
        // Blobs in parallel: most are far smaller than what one hash spreads over the cores.
        let corrupt: Vec<(String, String)> = blobs
            .par_iter()
            .filter_map(|b| {
                store
                    .get(&b.digest)
                    .err()
                    .map(|e| (b.digest.to_string(), e.to_string()))
            })
            .collect();
        report.rehashed = blobs.len();
        report.corrupt.extend(corrupt);
    }
    let now = SystemTime::now();
    for b in &blobs {
        if referenced.contains(&b.digest) {
            continue;
        }
        let age = now.duration_since(b.modified).unwrap_or_default();
        if age > grace {
            report.orphaned.push(b.digest.to_string());
        } else {
            report.unreferenced_recent.push(b.digest.to_string());
        }
    }
    report.missing.sort();
    report.missing.dedup();
    Ok(report)
}

/// What `gc` did (or, dry, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Blobs kept (reached from a tag, or younger than the grace period).
    pub kept: usize,
    /// Blobs swept, and their bytes.
    pub swept: usize,
    /// Bytes swept.
    pub swept_bytes: u64,
    /// Temporary files swept.
    pub temporary: usize,
}

/// Mark and sweep under the exclusive lock: blobs no tag reaches and leftovers in tmp/, once
/// older than `grace`. Refuses to sweep anything if a tag cannot be followed (its blobs would
/// look unreferenced).
pub fn gc(store: &dyn Store, grace: Duration, dry_run: bool) -> Result<GcReport> {
    let _guard = store.lock_exclusive()?;
    let Reach {
        manifests, broken, ..
    } = reachable(store)?;
    if let Some((tag, why)) = broken.first() {
        return Err(crate::error::Error::Registry {
            path: store.location().to_path_buf(),
            message: format!(
                "gc refuses to run while tag {tag} cannot be followed ({why}): its blobs would look unreferenced; run `mmx verify` and fix or remove the tag"
            ),
        });
    }
    let mut marked: BTreeSet<Digest> = manifests.keys().copied().collect();
    marked.extend(manifests.values().flatten().map(|(d, _)| *d));
    let now = SystemTime::now();
    let old = |t: SystemTime| now.duration_since(t).unwrap_or_default() > grace;
    let mut report = GcReport::default();
    for b in store.blobs()? {
        if marked.contains(&b.digest) || !old(b.modified) {
            report.kept += 1;
            continue;
        }
        if !dry_run {
            store.remove_blob(&b.digest)?;
        }
        report.swept += 1;
        report.swept_bytes += b.bytes;
    }
    for (path, modified) in store.temporary()? {
        if old(modified) {
            if !dry_run {
                store.remove_temporary(&path)?;
            }
            report.temporary += 1;
        }
    }
    Ok(report)
}
