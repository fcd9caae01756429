//! Reading a published model or adapter straight from the store: every tensor is the mapped
//! blob itself, checked against its digest when opened, never exported first.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use super::export::in_manifest;
use super::manifest::FileEntry;
use super::Registry;
use crate::adapter::Adapter;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::tensor::Digest;
use crate::tensor::SafetensorsFile;

/// A published directory, opened.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per input: boxing saves nothing that matters
pub enum Opened {
    /// A model (base, or a merged full model).
    Model(Checkpoint),
    /// A PEFT adapter.
    Adapter(Adapter),
}

impl Registry {
    /// Opens what `reference` (`NAME:TAG` or `blake3:<hex>`) names. Corrupt blobs are errors
    /// naming the blob and the manifest.
    pub fn open_input(&self, reference: &str) -> Result<Opened> {
        let digest = self.resolve(reference)?;
        self.open_manifest(&digest, reference)
    }

    fn open_manifest(&self, digest: &Digest, reference: &str) -> Result<Opened> {
        let manifest = self.manifest(digest)?;
        let label = PathBuf::from(if reference.starts_with("blake3:") {
            reference.to_string()
        } else {
            format!("registry:{reference}")
        });
        let store = self.store();
        let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut weights: Vec<(String, SafetensorsFile)> = Vec::new();
        for entry in &manifest.files {
            match entry {
                FileEntry::Blob { path, blob, .. } => {
                    let bytes = store.get(blob).map_err(|e| in_manifest(digest, e))?;
                    files.insert(path.clone(), bytes.to_vec());
                }
                FileEntry::Safetensors {
                    path,
                    header,
                    tensors,
                    ..
                } => {
                    let header = store
                        .get(header)
                        .map_err(|e| in_manifest(digest, e))?
                        .to_vec();
                    let mut maps = HashMap::with_capacity(tensors.len());
                    for t in tensors {
                        let blob = store.get(&t.blob).map_err(|e| in_manifest(digest, e))?;
                        if let Some(map) = blob.into_map() {
                            maps.insert(t.name.clone(), map);
                        }
                    }
                    let file = SafetensorsFile::from_parts(label.join(path), header, maps)?;
                    // Hashing touched every page: let them go until the merge reads them.
                    let names: Vec<String> = file.names().map(String::from).collect();
                    for name in &names {
                        file.release(name);
                    }
                    weights.push((path.clone(), file));
                }
            }
        }
        let origin = digest.to_string();
        if let Some(config) = files.get("adapter_config.json") {
            let position = weights
                .iter()
                .position(|(p, _)| p == "adapter_model.safetensors")
                .ok_or_else(|| Error::Adapter {
                    path: label.clone(),
                    message: "has no `adapter_model.safetensors`".into(),
                })?;
            let (_, file) = weights.swap_remove(position);
            return Ok(Opened::Adapter(Adapter::from_parts(
                label, origin, config, file,
            )?));
        }
        let shards = weights.into_iter().map(|(_, f)| f).collect();
        Ok(Opened::Model(Checkpoint::from_parts(
            label, origin, files, shards,
        )?))
    }
}
