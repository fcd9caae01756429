//! Copying a manifest and everything it needs from one registry to another: `mmx push` (local
//! to remote) and `mmx pull --from` (remote to local), the same code either way.
//!
//! What is copied is the manifest's closure: its blobs, the base it applies to and the inputs
//! its lineage names (each with their blobs, as far as the source holds them). Blobs are keyed
//! by digest, so only those the destination lacks are sent, and a copy cut off part way resumes
//! where it stopped when run again. Blobs go first (several at once), manifests after them
//! (bases before what applies to them), the tag last: a reader of the destination never sees a
//! tag before its manifest and blobs. The destination's writer lock is held throughout, so its
//! gc cannot sweep a blob a copy has just found present.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::export::load_manifest;
use super::name::Reference;
use super::store::Store;
use super::Registry;
use crate::error::{Error, Result};
use crate::tensor::Digest;

/// How a copy runs.
pub struct TransferOptions<'a> {
    /// Blobs in flight at once (at least 1).
    pub parallel: usize,
    /// Move the destination's tag if it points elsewhere.
    pub force: bool,
    /// Called after each blob with the bytes done (sent or found present) and in all.
    pub progress: Option<&'a (dyn Fn(u64, u64) + Send + Sync)>,
}

impl Default for TransferOptions<'_> {
    fn default() -> Self {
        TransferOptions {
            parallel: 8,
            force: false,
            progress: None,
        }
    }
}

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Transfer {
    /// The manifest copied.
    pub manifest: String,
    /// Manifests in its closure (it, its base, its lineage's inputs).
    pub manifests: usize,
    /// Blobs in the closure, manifests included.
    pub blobs: usize,
    /// Of those, the ones the destination lacked and was sent.
    pub sent: usize,
    /// Bytes of the closure.
    pub bytes: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Tags set on the destination (the one asked for, and the source's tags of the base
    /// and inputs where the destination had none).
    pub tags: Vec<String>,
}

/// A blob and its size, where a manifest states it.
type BlobSize = (Digest, Option<u64>);

/// The manifests `root` needs, dependents after what they depend on, with every blob they
/// name (each once).
fn closure(from: &dyn Store, root: &Digest) -> Result<(Vec<Digest>, Vec<BlobSize>)> {
    let mut order = Vec::new();
    let mut blobs = Vec::new();
    let mut seen_blobs = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut stack = vec![*root];
    while let Some(digest) = stack.pop() {
        if !seen.insert(digest) {
            continue;
        }
        let manifest = load_manifest(from, &digest)?;
        for (blob, size) in manifest.blobs() {
            if seen_blobs.insert(blob) {
                blobs.push((blob, size));
            }
        }
        // A base or input the source no longer holds stays a reference only, as in `log`.
        let related = manifest.base.into_iter().chain(
            manifest
                .lineage
                .iter()
                .flat_map(|l| l.inputs.iter().copied()),
        );
        for d in related {
            if from.contains(&d)? {
                stack.push(d);
            }
        }
        order.push(digest);
    }
    // Depth-first from the root lists dependents first: reverse, so bases land before.
    order.reverse();
    Ok((order, blobs))
}

/// Copies one blob unless the destination holds it (as `held` says, where the destination
/// answered for all blobs at once); returns the bytes sent (`None` if present). The bytes are
/// re-hashed on the way, so a corrupt source blob stops the copy.
fn copy_blob(
    from: &dyn Store,
    to: &dyn Store,
    held: Option<&BTreeSet<Digest>>,
    digest: &Digest,
) -> Result<Option<u64>> {
    let present = match held {
        Some(held) => held.contains(digest),
        None => to.contains(digest)?,
    };
    if present {
        return Ok(None);
    }
    let blob = from.get(digest)?;
    let actual = Digest::of(&blob);
    if actual != *digest {
        return Err(Error::Registry {
            path: from.location().to_path_buf(),
            message: format!("blob {digest} is corrupt: its content hashes to {actual}"),
        });
    }
    to.put_absent(digest, &blob)?;
    Ok(Some(blob.len() as u64))
}

/// Copies blobs with `parallel` workers; stops at the first error.
fn copy_blobs(
    from: &dyn Store,
    to: &dyn Store,
    held: Option<&BTreeSet<Digest>>,
    blobs: &[BlobSize],
    total: u64,
    options: &TransferOptions,
    transfer: &mut Transfer,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let sent = AtomicUsize::new(0);
    let bytes_sent = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None);
    let workers = options.parallel.clamp(1, blobs.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((digest, size)) = blobs.get(i) else {
                        break;
                    };
                    match copy_blob(from, to, held, digest) {
                        Ok(written) => {
                            if let Some(n) = written {
                                sent.fetch_add(1, Ordering::Relaxed);
                                bytes_sent.fetch_add(n, Ordering::Relaxed);
                            }
                            let n = written.or(*size).unwrap_or(0);
                            let so_far = done.fetch_add(n, Ordering::Relaxed) + n;
                            if let Some(progress) = options.progress {
                                progress(so_far.min(total), total);
                            }
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().unwrap().get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    transfer.sent += sent.into_inner();
    transfer.bytes_sent += bytes_sent.into_inner();
    Ok(())
}

/// Copies `manifest` and its closure from `from` into `to`, then points `tag` (if given) at it
/// there; the source's own tags of the closure's other manifests follow where `to` has none.
pub fn copy(
    from: &Registry,
    to: &Registry,
    manifest: &Digest,
    tag: Option<&Reference>,
    options: &TransferOptions,
) -> Result<Transfer> {
    let (source, destination) = (from.store(), to.store());
    let (manifests, mut blobs) = closure(source, manifest)?;
    let data: u64 = blobs.iter().filter_map(|(_, n)| *n).sum();
    let manifest_sizes: Vec<BlobSize> = manifests
        .iter()
        .map(|d| Ok((*d, Some(source.get(d)?.len() as u64))))
        .collect::<Result<_>>()?;
    let total = data + manifest_sizes.iter().filter_map(|(_, n)| *n).sum::<u64>();
    let mut transfer = Transfer {
        manifest: manifest.to_string(),
        manifests: manifests.len(),
        blobs: blobs.len() + manifests.len(),
        bytes: total,
        ..Transfer::default()
    };
    // A blob named in two places is copied once; manifests go in their own, later pass.
    let manifest_set: BTreeSet<Digest> = manifests.iter().copied().collect();
    blobs.retain(|(d, _)| !manifest_set.contains(d));

    let _guard = destination.lock_shared()?;
    let wanted: Vec<Digest> = blobs
        .iter()
        .chain(&manifest_sizes)
        .map(|(d, _)| *d)
        .collect();
    let held = destination.holding(&wanted)?;
    let held = held.as_ref();
    copy_blobs(
        source,
        destination,
        held,
        &blobs,
        total,
        options,
        &mut transfer,
    )?;
    // One at a time, in order: a manifest lands only after what it applies to.
    let sequential = TransferOptions {
        parallel: 1,
        force: options.force,
        progress: options.progress,
    };
    for m in &manifest_sizes {
        copy_blobs(
            source,
            destination,
            held,
            std::slice::from_ref(m),
            total,
            &sequential,
            &mut transfer,
        )?;
    }

    if let Some(tag) = tag {
        match destination.read_tag(tag)? {
            Some(current) if current == *manifest => {}
            Some(current) if !options.force => {
                return Err(Error::Registry {
                    path: destination.location().to_path_buf(),
                    message: format!(
                        "tag {tag} already points at {current} there; pass --force to move it to {manifest}"
                    ),
                })
            }
            current => {
                destination.swap_tag(tag, current, Some(*manifest))?;
                transfer.tags.push(tag.to_string());
            }
        }
    }
    for (reference, digest) in source.tags()? {
        let Ok(digest) = digest else { continue };
        if digest == *manifest || !manifest_set.contains(&digest) {
            continue;
        }
        if destination.read_tag(&reference)?.is_none() {
            // Another copy may set it first; then it already says what it should.
            if destination.swap_tag(&reference, None, Some(digest)).is_ok() {
                transfer.tags.push(reference.to_string());
            }
        }
    }
    Ok(transfer)
}
