//! A registry in an S3-compatible bucket: [`RemoteStore`], the second implementation of
//! [`Store`], through the `object_store` crate.
//!
//! ```text
//! s3://bucket/prefix/
//!   mmx-registry.toml                 format version
//!   blobs/blake3/<2 hex>/<62 hex>     a blob, written once under its digest (multipart when large)
//!   refs/<name>/<tag>                 `blake3:<hex>` of a manifest; moved by conditional put
//!   locks/gc                          held by gc while it sweeps
//!   locks/writer-<id>                 one per writer (publish, push, tag) while it writes
//! ```
//!
//! An object store has no rename and no file locks, so the local store's guarantees come from
//! its primitives instead: every PUT is atomic (a reader sees the whole object or none) and a
//! blob's key is its digest, so a blob is never partly there and a repeated upload is a no-op;
//! tags move by compare-and-swap (`If-None-Match: *` to create, `If-Match: <etag>` to move);
//! writers and gc exclude each other by lock objects, each side writing its own and then
//! looking for the other's (S3 lists are strongly consistent, so one of them sees the other).
//! A lock object not refreshed for [`lock_lifetime`] (10 minutes, or
//! `$MMX_REMOTE_LOCK_LIFETIME`) belongs to a process that died and is ignored; a live holder
//! refreshes its own ten times as often.
//!
//! Credentials come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`) or from a
//! `[remotes.NAME]` entry's endpoint and region; they are never written anywhere.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, SystemTime};

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion, WriteMultipart,
};

use super::name::Reference;
use super::store::{Blob, BlobInfo, LockGuard, Store, FORMAT};
use crate::error::{Error, Result};
use crate::tensor::Digest;

/// Blobs above this size go up in parts.
pub const MULTIPART_THRESHOLD: usize = 16 << 20;
/// The size of one part (S3 wants at least 5 MiB for all but the last).
pub const PART_SIZE: usize = 8 << 20;
/// Parts of one blob in flight at once.
const PARTS_IN_FLIGHT: usize = 4;
/// The environment variable that overrides [`DEFAULT_LOCK_LIFETIME`] (`90s`, `30m`).
pub const LOCK_LIFETIME_ENV: &str = "MMX_REMOTE_LOCK_LIFETIME";
/// A lock object not refreshed for this long belongs to a process that died.
pub const DEFAULT_LOCK_LIFETIME: Duration = Duration::from_secs(600);

/// How long a lock object stays live without a refresh: every process sharing a remote must
/// agree, so set `$MMX_REMOTE_LOCK_LIFETIME` for all of them or none.
pub fn lock_lifetime() -> Duration {
    std::env::var(LOCK_LIFETIME_ENV)
        .ok()
        .and_then(|t| super::parse_duration(&t).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_LOCK_LIFETIME)
}

/// Where a remote registry is and how to reach it: `s3://bucket/prefix`, with an endpoint and
/// region that override the environment's (a `[remotes.NAME]` entry of `mmx-registry.toml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSpec {
    /// `s3://bucket/prefix`, as given.
    pub url: String,
    /// The bucket.
    pub bucket: String,
    /// The key prefix inside the bucket (may be empty).
    pub prefix: String,
    /// `http(s)://host:port` of an S3-compatible server, if not AWS or the environment's.
    pub endpoint: Option<String>,
    /// The region, if not the environment's.
    pub region: Option<String>,
}

/// Why a remote registry URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteUrlError {
    /// Not an `s3://` URL.
    #[error(
        "`{0}`: a remote registry is `s3://bucket/prefix` (GCS and Azure are not wired in yet)"
    )]
    NotS3(String),
    /// `s3://` with no bucket.
    #[error("`{0}`: no bucket")]
    NoBucket(String),
    /// A `.` or `..` component in the prefix.
    #[error("`{0}`: the prefix may not hold `.` or `..`")]
    DotInPrefix(String),
}

impl RemoteSpec {
    /// Parses `s3://bucket[/prefix]`.
    pub fn parse(url: &str) -> std::result::Result<RemoteSpec, RemoteUrlError> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| RemoteUrlError::NotS3(url.to_string()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        if bucket.is_empty() {
            return Err(RemoteUrlError::NoBucket(url.to_string()));
        }
        if prefix.split('/').any(|part| part == "." || part == "..") {
            return Err(RemoteUrlError::DotInPrefix(url.to_string()));
        }
        Ok(RemoteSpec {
            url: url.to_string(),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: None,
            region: None,
        })
    }
}

/// Whether a `--registry` value names a remote registry rather than a directory.
pub fn is_remote(location: &Path) -> bool {
    location.to_str().is_some_and(|s| s.starts_with("s3://"))
}

fn fail(location: &Path, message: impl Into<String>) -> Error {
    Error::Registry {
        path: location.to_path_buf(),
        message: message.into(),
    }
}

/// A registry in an S3-compatible bucket.
pub struct RemoteStore {
    location: PathBuf,
    store: Arc<AmazonS3>,
    prefix: String,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteStore({})", self.location.display())
    }
}

/// rustls needs one process-wide crypto provider. ring's needs no C toolchain beyond `cc`;
/// rustls 0.23.48 deprecates it for lacking post-quantum key exchange, which aws-lc-rs has at
/// the price of building aws-lc.
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl RemoteStore {
    /// Opens the registry at `spec`; with `create`, writes its marker first if there is none.
    /// Refuses a prefix with a newer format. An unreachable server is an error after a few
    /// bounded retries.
    pub fn open(spec: &RemoteSpec, create: bool) -> Result<RemoteStore> {
        install_crypto_provider();
        let location = PathBuf::from(&spec.url);
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&spec.bucket);
        let endpoint = spec
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT").ok());
        // A plain-HTTP endpoint is the user's explicit choice (a server on loopback).
        let allow_http = endpoint.as_ref().is_some_and(|e| e.starts_with("http://"));
        if let Some(endpoint) = &endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &spec.region {
            builder = builder.with_region(region);
        }
        let retry = RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(20),
            ..RetryConfig::default()
        };
        // Client options carry allow_http too: set here, not on the builder, which they replace.
        let client = ClientOptions::new()
            .with_allow_http(allow_http)
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(300));
        let store = builder
            .with_retry(retry)
            .with_client_options(client)
            .build()
            .map_err(|e| fail(&location, format!("cannot configure the S3 client: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| fail(&location, format!("cannot start the I/O runtime: {e}")))?;
        let remote = RemoteStore {
            location,
            store: Arc::new(store),
            prefix: spec.prefix.clone(),
            runtime: Arc::new(runtime),
        };
        remote.check_marker(create)?;
        Ok(remote)
    }

    fn key(&self, relative: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(relative)
        } else {
            Key::from(format!("{}/{relative}", self.prefix))
        }
    }

    fn blob_key(&self, digest: &Digest) -> Key {
        let hex = digest.hex();
        self.key(&format!("blobs/blake3/{}/{}", &hex[..2], &hex[2..]))
    }

    fn tag_key(&self, reference: &Reference) -> Key {
        self.key(&format!("refs/{}/{}", reference.name, reference.tag))
    }

    /// A message for a failed request on `key`.
    fn request_failed(&self, what: &str, key: &Key, e: object_store::Error) -> Error {
        fail(&self.location, format!("{what} `{key}`: {e}"))
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// An object's bytes and its etag, or `None` if absent.
    fn read(&self, key: &Key) -> Result<Option<(Vec<u8>, Option<String>)>> {
        self.block_on(async {
            match self.store.get(key).await {
                Ok(got) => {
                    let e_tag = got.meta.e_tag.clone();
                    let bytes = got
                        .bytes()
                        .await
                        .map_err(|e| self.request_failed("reading", key, e))?;
                    Ok(Some((bytes.to_vec(), e_tag)))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.request_failed("reading", key, e)),
            }
        })
    }

    fn put_object(&self, key: &Key, bytes: Vec<u8>, mode: PutMode) -> Result<bool> {
        let options = PutOptions {
            mode,
            ..PutOptions::default()
        };
        self.block_on(async {
            match self
                .store
                .put_opts(key, PutPayload::from(bytes), options)
                .await
            {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => Ok(false),
                Err(e) => Err(self.request_failed("writing", key, e)),
            }
        })
    }

    fn delete(&self, key: &Key) -> Result<()> {
        self.block_on(async {
            match self.store.delete(key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.request_failed("deleting", key, e)),
            }
        })
    }

    fn list(&self, relative: &str) -> Result<Vec<object_store::ObjectMeta>> {
        let prefix = self.key(relative);
        self.block_on(async {
            self.store
                .list(Some(&prefix))
                .try_collect::<Vec<_>>()
                .await
                .map_err(|e| self.request_failed("listing", &prefix, e))
        })
    }

    fn check_marker(&self, create: bool) -> Result<()> {
        let key = self.key("mmx-registry.toml");
        let text = match self.read(&key)? {
            Some((bytes, _)) => String::from_utf8_lossy(&bytes).into_owned(),
            None if create => {
                let marker = format!("format = {FORMAT}\n");
                // Create-only: two first publishers both end with the same marker.
                self.put_object(&key, marker.clone().into_bytes(), PutMode::Create)?;
                marker
            }
            None => {
                return Err(fail(
                    &self.location,
                    "no registry here (no mmx-registry.toml); `mmx push` creates one",
                ))
            }
        };
        match super::store::parse_marker(&text) {
            Some(FORMAT) => Ok(()),
            Some(other) => Err(fail(
                &self.location,
                format!("format {other}; this mmx reads format {FORMAT}"),
            )),
            None => Err(fail(
                &self.location,
                "mmx-registry.toml is not an mmx registry marker",
            )),
        }
    }

    /// Uploads a large blob in parts, a few at a time. Unconditional: the key is the content's
    /// digest, so a concurrent upload of the same blob writes the same bytes.
    fn put_multipart(&self, key: &Key, bytes: &[u8]) -> Result<()> {
        self.block_on(async {
            let upload = self
                .store
                .put_multipart(key)
                .await
                .map_err(|e| self.request_failed("starting the upload of", key, e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            for chunk in bytes.chunks(PART_SIZE) {
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| self.request_failed("uploading", key, e))?;
                writer.write(chunk);
            }
            writer
                .finish()
                .await
                .map_err(|e| self.request_failed("completing the upload of", key, e))?;
            Ok(())
        })
    }

    /// Live lock objects (refreshed within [`lock_lifetime`]) whose name starts with `start`.
    fn live_locks(&self, start: &str) -> Result<Vec<Key>> {
        let now = SystemTime::now();
        let lifetime = lock_lifetime();
        Ok(self
            .list("locks")?
            .into_iter()
            .filter(|m| m.location.filename().is_some_and(|n| n.starts_with(start)))
            .filter(|m| {
                now.duration_since(SystemTime::from(m.last_modified))
                    .unwrap_or_default()
                    < lifetime
            })
            .map(|m| m.location)
            .collect())
    }

    /// Writes this process's lock object, then looks for the other side's: a writer waits out
    /// no gc, and gc runs alone.
    fn lock(&self, exclusive: bool) -> Result<LockGuard> {
        let id = format!(
            "{}-{}-{:x}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
            rand_suffix()
        );
        let (own, other) = if exclusive {
            (self.key("locks/gc"), "writer-")
        } else {
            (self.key(&format!("locks/writer-{id}")), "gc")
        };
        let mode = if exclusive {
            PutMode::Create
        } else {
            PutMode::Overwrite
        };
        if !self.put_object(&own, id.clone().into_bytes(), mode)? {
            // A gc lock left by a gc that died is replaced once stale.
            if self.live_locks("gc")?.is_empty() {
                self.delete(&own)?;
                if !self.put_object(&own, id.clone().into_bytes(), PutMode::Create)? {
                    return Err(fail(
                        &self.location,
                        "another gc is running on this registry",
                    ));
                }
            } else {
                return Err(fail(
                    &self.location,
                    "another gc is running on this registry",
                ));
            }
        }
        let held = HeldLock::start(self, own.clone(), id);
        let others = self.live_locks(other)?;
        if !others.is_empty() {
            drop(held);
            return Err(fail(
                &self.location,
                if exclusive {
                    format!(
                        "{} writer(s) are publishing or pushing (lock objects under locks/); gc waits for them to finish",
                        others.len()
                    )
                } else {
                    "gc is running on this registry; retry when it has finished".to_string()
                },
            ));
        }
        Ok(LockGuard::new(held))
    }
}

/// A few random bits for lock ids (two processes with one pid on two machines).
fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// A lock object kept fresh by a thread until dropped, then deleted.
struct HeldLock {
    stop: Arc<AtomicBool>,
    refresher: Option<std::thread::JoinHandle<()>>,
    store: Arc<AmazonS3>,
    runtime: Arc<tokio::runtime::Runtime>,
    key: Key,
}

impl HeldLock {
    fn start(remote: &RemoteStore, key: Key, id: String) -> HeldLock {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, store, runtime, k) = (
            stop.clone(),
            remote.store.clone(),
            remote.runtime.clone(),
            key.clone(),
        );
        let refresh = lock_lifetime() / 10;
        let refresher = std::thread::spawn(move || {
            let mut since = std::time::Instant::now();
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if since.elapsed() >= refresh {
                    let payload = PutPayload::from(id.clone().into_bytes());
                    let _ = runtime.block_on(store.put(&k, payload));
                    since = std::time::Instant::now();
                }
            }
        });
        HeldLock {
            stop,
            refresher: Some(refresher),
            store: remote.store.clone(),
            runtime: remote.runtime.clone(),
            key,
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        let _ = self.runtime.block_on(self.store.delete(&self.key));
    }
}

/// The digest a blob key names (`.../blobs/blake3/ab/cdef...`), if it is one.
fn blob_digest(key: &Key) -> Option<Digest> {
    let parts: Vec<&str> = key.as_ref().rsplitn(3, '/').collect();
    Digest::parse(&format!("{}{}", parts.get(1)?, parts.first()?))
}

impl Store for RemoteStore {
    fn location(&self) -> &Path {
        &self.location
    }

    fn contains(&self, digest: &Digest) -> Result<bool> {
        let key = self.blob_key(digest);
        self.block_on(async {
            match self.store.head(&key).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(self.request_failed("looking up", &key, e)),
            }
        })
    }

    fn put(&self, digest: &Digest, bytes: &[u8]) -> Result<bool> {
        // Writers hold their lock object, so gc cannot sweep a present blob a writer reuses:
        // no need to mark it as used.
        if self.contains(digest)? {
            return Ok(false);
        }
        self.put_absent(digest, bytes)?;
        Ok(true)
    }

    fn put_absent(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        let key = self.blob_key(digest);
        if bytes.len() > MULTIPART_THRESHOLD {
            self.put_multipart(&key, bytes)
        } else {
            self.put_object(&key, bytes.to_vec(), PutMode::Overwrite)
                .map(|_| ())
        }
    }

    fn get(&self, digest: &Digest) -> Result<Blob> {
        let key = self.blob_key(digest);
        let (bytes, _) = self
            .read(&key)?
            .ok_or_else(|| fail(&self.location, format!("blob {digest} is missing")))?;
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(fail(
                &self.location,
                format!("blob {digest} is corrupt on the remote: its content hashes to {actual}"),
            ));
        }
        Blob::from_bytes(&bytes).map_err(|e| Error::io(&self.location, e))
    }

    fn holding(&self, wanted: &[Digest]) -> Result<Option<BTreeSet<Digest>>> {
        // A listing page names 1,000 blobs, a HEAD one: listing is cheaper while the bucket
        // holds fewer than 100 blobs per wanted one (a tenth of the HEADs at most); past
        // that, ask one by one.
        let budget = wanted.len().saturating_mul(100);
        let wanted: BTreeSet<Digest> = wanted.iter().copied().collect();
        let prefix = self.key("blobs/blake3");
        self.block_on(async {
            let mut listing = self.store.list(Some(&prefix));
            let (mut held, mut listed) = (BTreeSet::new(), 0usize);
            while let Some(meta) = listing
                .try_next()
                .await
                .map_err(|e| self.request_failed("listing", &prefix, e))?
            {
                listed += 1;
                if listed > budget {
                    return Ok(None);
                }
                if let Some(digest) = blob_digest(&meta.location).filter(|d| wanted.contains(d)) {
                    held.insert(digest);
                }
            }
            Ok(Some(held))
        })
    }

    fn blobs(&self) -> Result<Vec<BlobInfo>> {
        let mut out: Vec<BlobInfo> = self
            .list("blobs/blake3")?
            .into_iter()
            .filter_map(|m| {
                Some(BlobInfo {
                    digest: blob_digest(&m.location)?,
                    bytes: m.size,
                    modified: SystemTime::from(m.last_modified),
                })
            })
            .collect();
        out.sort_by_key(|b| b.digest);
        Ok(out)
    }

    fn remove_blob(&self, digest: &Digest) -> Result<()> {
        self.delete(&self.blob_key(digest))
    }

    fn read_tag(&self, reference: &Reference) -> Result<Option<Digest>> {
        Ok(self.read_tag_versioned(reference)?.map(|(d, _)| d))
    }

    fn swap_tag(
        &self,
        reference: &Reference,
        expected: Option<Digest>,
        new: Option<Digest>,
    ) -> Result<()> {
        let key = self.tag_key(reference);
        let current = self.read_tag_versioned(reference)?;
        let moved = |found: Option<Digest>| {
            let show = |d: Option<Digest>| d.map_or("absent".to_string(), |d| d.to_string());
            fail(
                &self.location,
                format!(
                    "tag {reference} moved: expected {}, found {}",
                    show(expected),
                    show(found)
                ),
            )
        };
        if current.as_ref().map(|(d, _)| *d) != expected {
            return Err(moved(current.map(|(d, _)| d)));
        }
        match new {
            Some(digest) => {
                let mode = match current {
                    None => PutMode::Create,
                    Some((_, e_tag)) => PutMode::Update(UpdateVersion {
                        e_tag,
                        version: None,
                    }),
                };
                if !self.put_object(&key, format!("{digest}\n").into_bytes(), mode)? {
                    return Err(moved(self.read_tag(reference)?));
                }
                Ok(())
            }
            // S3 has no conditional delete through object_store: removal re-reads just
            // before deleting (tags are removed by hand, not raced by tools).
            None => {
                if self.read_tag(reference)? != expected {
                    return Err(moved(self.read_tag(reference)?));
                }
                self.delete(&key)
            }
        }
    }

    fn tags(&self) -> Result<Vec<(Reference, std::result::Result<Digest, String>)>> {
        let mut out = Vec::new();
        for meta in self.list("refs")? {
            let parts: Vec<&str> = meta.location.as_ref().rsplitn(3, '/').collect();
            let (Some(tag), Some(name)) = (parts.first(), parts.get(1)) else {
                continue;
            };
            let Ok(reference) = Reference::parse(&format!("{name}:{tag}")) else {
                continue;
            };
            let digest = self
                .read_tag(&reference)
                .map_err(|e| e.to_string())
                .and_then(|d| d.ok_or_else(|| "vanished while listing".to_string()));
            out.push((reference, digest));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn temporary(&self) -> Result<Vec<(PathBuf, SystemTime)>> {
        // Nothing is staged under a temporary name: an interrupted multipart upload leaves
        // parts the bucket's lifecycle rule (AbortIncompleteMultipartUpload) reclaims.
        Ok(Vec::new())
    }

    fn remove_temporary(&self, _path: &Path) -> Result<()> {
        Ok(())
    }

    fn lock_shared(&self) -> Result<LockGuard> {
        self.lock(false)
    }

    fn lock_exclusive(&self) -> Result<LockGuard> {
        self.lock(true)
    }
}

impl RemoteStore {
    /// A tag's manifest and the etag of the object holding it.
    fn read_tag_versioned(
        &self,
        reference: &Reference,
    ) -> Result<Option<(Digest, Option<String>)>> {
        let key = self.tag_key(reference);
        let Some((bytes, e_tag)) = self.read(&key)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        Digest::parse(text.trim())
            .filter(|_| text.starts_with("blake3:"))
            .map(|d| Some((d, e_tag)))
            .ok_or_else(|| {
                fail(
                    &self.location,
                    format!("tag {reference} does not hold a digest"),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_bucket_and_prefix() {
        let spec = RemoteSpec::parse("s3://team-bucket/mmx/registry/").unwrap();
        assert_eq!(spec.bucket, "team-bucket");
        assert_eq!(spec.prefix, "mmx/registry");
        assert_eq!(RemoteSpec::parse("s3://b").unwrap().prefix, "");
        assert!(RemoteSpec::parse("gs://b/p")
            .unwrap_err()
            .to_string()
            .contains("s3://"));
        assert!(RemoteSpec::parse("s3:///p")
            .unwrap_err()
            .to_string()
            .contains("no bucket"));
        assert!(RemoteSpec::parse("s3://b/a/../c")
            .unwrap_err()
            .to_string()
            .contains(".."));
        assert!(is_remote(Path::new("s3://b/p")));
        assert!(!is_remote(Path::new("registry")));
    }
}
