//! Publishing a directory: validated, stored tensor by tensor, then its manifest, then its tag.

use std::path::Path;

use rayon::prelude::*;

use super::manifest::{FileEntry, Kind, Lineage, Manifest, TensorEntry, VERSION};
use super::name::Reference;
use super::store::Store;
use crate::adapter::Adapter;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::recipe::{MergeRecord, MERGE_RECORD};
use crate::tensor::Digest;
use crate::tensor::SafetensorsFile;

/// How to publish.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// The kind, if the caller knows it (else detected from the directory's files).
    pub kind: Option<Kind>,
    /// The specialty of an adapter or expert.
    pub specialty: Option<String>,
    /// The manifest of the base it applies to.
    pub base: Option<Digest>,
    /// For a merged expert: the recipe's text, stored as a blob and named in the lineage
    /// with `inputs` and the tool's version.
    pub recipe: Option<String>,
    /// For a merged expert: the manifests of the registry inputs it was made from.
    pub inputs: Vec<Digest>,
    /// Move an existing tag that points elsewhere (tags are immutable without it).
    pub force: bool,
    /// A training output: only its result is published, not the run's record beside it
    /// (`metrics.jsonl` and the checkpoint folders, which are otherwise refused).
    pub result_only: bool,
}

/// What a training output holds beside its result, left out by
/// [`PublishOptions::result_only`] (folders are left out too).
pub const TRAINING_RECORD: [&str; 1] = ["metrics.jsonl"];

impl PublishOptions {
    /// The options of a merge output in `output` made from `recipe_text`: a merged expert whose
    /// lineage names the registry manifests its `mmx-merge.json` says the merge read.
    pub fn merged(output: &Path, recipe_text: &str) -> Result<PublishOptions> {
        let inputs = MergeRecord::read(output)?
            .manifests()
            .filter_map(Digest::parse)
            .collect();
        Ok(PublishOptions {
            kind: Some(Kind::Merged),
            recipe: Some(recipe_text.to_string()),
            inputs,
            ..PublishOptions::default()
        })
    }
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The manifest's digest.
    pub manifest: Digest,
    /// The kind.
    pub kind: Kind,
    /// Blobs the publish consists of, the manifest included.
    pub blobs: usize,
    /// Blobs written (0 when everything was already stored).
    pub written: usize,
    /// Bytes the directory holds.
    pub bytes: u64,
    /// Bytes written.
    pub bytes_written: u64,
}

fn refuse(dir: &Path, message: impl Into<String>) -> Error {
    Error::Registry {
        path: dir.to_path_buf(),
        message: message.into(),
    }
}

/// The kind a directory's files say it is.
pub fn detect_kind(dir: &Path) -> Option<Kind> {
    if dir.join(MERGE_RECORD).is_file() {
        Some(Kind::Merged)
    } else if dir.join("adapter_config.json").is_file() {
        Some(Kind::Adapter)
    } else if dir.join("config.json").is_file() {
        Some(Kind::Base)
    } else {
        None
    }
}

/// Checks a directory as mmx reads its kind, before anything is stored.
fn validate(dir: &Path, kind: Kind) -> Result<()> {
    match kind {
        Kind::Adapter => Adapter::open(dir).map(drop),
        Kind::Base => Checkpoint::open(dir).map(drop),
        Kind::Merged => {
            MergeRecord::read(dir)?;
            if dir.join("adapter_config.json").is_file() {
                Adapter::open(dir).map(drop)
            } else {
                Ok(())
            }
        }
    }
}

/// Stores `bytes` unless present; returns whether it wrote.
fn store(store: &dyn Store, bytes: &[u8]) -> Result<(Digest, bool)> {
    let digest = Digest::of(bytes);
    Ok((digest, store.put(&digest, bytes)?))
}

/// Publishes `dir` as `reference`.
pub fn publish(
    registry: &dyn Store,
    dir: &Path,
    reference: &Reference,
    options: &PublishOptions,
) -> Result<Published> {
    let detected = detect_kind(dir).ok_or_else(|| {
        refuse(
            dir,
            "is neither a PEFT adapter (adapter_config.json), a model (config.json) nor an mmx merge output (mmx-merge.json)",
        )
    })?;
    let kind = match options.kind {
        Some(k) if k != detected && !(k == Kind::Merged || detected == Kind::Merged) => {
            return Err(refuse(
                dir,
                format!(
                    "was given as {} but its files make it {}",
                    k.name(),
                    detected.name()
                ),
            ))
        }
        Some(k) => k,
        None => detected,
    };
    validate(dir, detected)?;

    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if options.result_only && (meta.is_dir() || TRAINING_RECORD.contains(&name.as_str())) {
            continue;
        }
        if meta.is_dir() {
            return Err(refuse(
                &path,
                "is a folder: mmx publishes the files at the top of a directory only",
            ));
        }
        if super::export::file_name_problem(&name).is_some() {
            return Err(refuse(&path, "has a file name mmx cannot store"));
        }
        names.push(name);
    }
    names.sort();
    if names.is_empty() {
        return Err(refuse(dir, "is empty"));
    }

    // Every safetensors file is opened (and so validated) before anything is stored.
    let weights = names
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .map(|n| Ok((n.clone(), SafetensorsFile::open(dir.join(n))?)))
        .collect::<Result<std::collections::BTreeMap<String, SafetensorsFile>>>()?;

    // Writers hold the shared lock: gc cannot sweep between a blob's write and its manifest.
    let _guard = registry.lock_shared()?;
    let mut files = Vec::with_capacity(names.len());
    let (mut blobs, mut written, mut bytes_written) = (0usize, 0usize, 0u64);
    for name in &names {
        let path = dir.join(name);
        if let Some(file) = weights.get(name) {
            let header_bytes = file.header_bytes();
            let (header, new_header) = store(registry, header_bytes)?;
            let mut order: Vec<(&str, &crate::tensor::TensorInfo)> = file
                .header()
                .tensors
                .iter()
                .map(|(n, i)| (n.as_str(), i))
                .collect();
            order.sort_by_key(|(_, i)| i.start);
            let stored = order
                .par_iter()
                .map(|(name, info)| {
                    let data = file.bytes(name)?;
                    let (digest, new) = store(registry, data)?;
                    Ok((
                        TensorEntry {
                            name: name.to_string(),
                            dtype: info.dtype.name().to_string(),
                            shape: info.shape.clone(),
                            blob: digest,
                            bytes: data.len() as u64,
                        },
                        new,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            blobs += 1 + stored.len();
            if new_header {
                written += 1;
                bytes_written += header_bytes.len() as u64;
            }
            let mut tensors = Vec::with_capacity(stored.len());
            for (entry, new) in stored {
                if new {
                    written += 1;
                    bytes_written += entry.bytes;
                }
                tensors.push(entry);
            }
            let len = std::fs::metadata(&path)
                .map_err(|e| Error::io(&path, e))?
                .len();
            files.push(FileEntry::Safetensors {
                path: name.clone(),
                bytes: len,
                header,
                tensors,
            });
        } else {
            let content = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let (blob, new) = store(registry, &content)?;
            blobs += 1;
            if new {
                written += 1;
                bytes_written += content.len() as u64;
            }
            files.push(FileEntry::Blob {
                path: name.clone(),
                bytes: content.len() as u64,
                blob,
            });
        }
    }
    let lineage = match &options.recipe {
        Some(text) => {
            let (recipe, new) = store(registry, text.as_bytes())?;
            blobs += 1;
            if new {
                written += 1;
                bytes_written += text.len() as u64;
            }
            Some(Lineage {
                recipe,
                inputs: options.inputs.clone(),
                tool: format!("mmx {}", env!("CARGO_PKG_VERSION")),
            })
        }
        None => None,
    };
    let manifest = Manifest {
        mmx_manifest: VERSION,
        kind,
        specialty: options.specialty.clone(),
        base: options.base,
        lineage,
        files,
    };
    let encoded = manifest.encode();
    let (digest, new) = store(registry, &encoded)?;
    blobs += 1;
    if new {
        written += 1;
        bytes_written += encoded.len() as u64;
    }
    // The tag last: it only ever points at a manifest whose blobs are all stored.
    match registry.read_tag(reference)? {
        Some(current) if current == digest => {}
        Some(current) if !options.force => {
            return Err(refuse(
                registry.location(),
                format!(
                    "tag {reference} already points at {current}; tags are immutable (pass --force to move it)"
                ),
            ))
        }
        current => registry.swap_tag(reference, current, Some(digest))?,
    }
    Ok(Published {
        manifest: digest,
        kind,
        blobs,
        written,
        bytes: manifest.bytes(),
        bytes_written,
    })
}
