//! Manifests: what a published directory is made of. A manifest is itself a blob (compact JSON,
//! fields in a fixed order, no timestamps), so the same content always has the same digest.

use serde::{Deserialize, Serialize};

use crate::tensor::Digest;

/// The manifest format this build writes.
pub const VERSION: u32 = 1;

/// The largest manifest accepted (a 7B model's few hundred tensors need well under 1 MiB).
pub const MAX_BYTES: usize = 16 << 20;

/// What a manifest describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A Hugging Face model directory.
    Base,
    /// A PEFT LoRA adapter.
    Adapter,
    /// The output of `mmx merge` (a model, a delta or an adapter, with `mmx-merge.json`).
    Merged,
}

impl Kind {
    /// The name used in manifests and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Base => "base",
            Kind::Adapter => "adapter",
            Kind::Merged => "merged",
        }
    }
}

/// Where a merged expert came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// The recipe text, as a blob.
    pub recipe: Digest,
    /// The manifests of the registry inputs (base first, then the experts).
    pub inputs: Vec<Digest>,
    /// The tool and version that made it (`mmx 0.1.0`).
    pub tool: String,
}

/// One tensor of a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    /// Its name.
    pub name: String,
    /// Its dtype, as safetensors writes it (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its bytes, as a blob.
    pub blob: Digest,
    /// Their length.
    pub bytes: u64,
}

/// One file of the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum FileEntry {
    /// A file stored whole.
    Blob {
        /// Its name in the directory.
        path: String,
        /// Its length.
        bytes: u64,
        /// Its content.
        blob: Digest,
    },
    /// A safetensors file stored tensor by tensor: its header (length prefix and JSON, as
    /// written) and then each tensor in data order, which together rebuild it byte for byte.
    Safetensors {
        /// Its name in the directory.
        path: String,
        /// Its length.
        bytes: u64,
        /// The first 8 + N bytes.
        header: Digest,
        /// Tensors in the order of their data.
        tensors: Vec<TensorEntry>,
    },
}

impl FileEntry {
    /// The file's name.
    pub fn path(&self) -> &str {
        match self {
            FileEntry::Blob { path, .. } | FileEntry::Safetensors { path, .. } => path,
        }
    }

    /// The file's length.
    pub fn bytes(&self) -> u64 {
        match self {
            FileEntry::Blob { bytes, .. } | FileEntry::Safetensors { bytes, .. } => *bytes,
        }
    }

    /// Every blob the file is made of.
    pub fn blobs(&self) -> Vec<(Digest, u64)> {
        match self {
            FileEntry::Blob { blob, bytes, .. } => vec![(*blob, *bytes)],
            FileEntry::Safetensors {
                header,
                tensors,
                bytes,
                ..
            } => {
                let data: u64 = tensors.iter().map(|t| t.bytes).sum();
                let mut out = vec![(*header, bytes - data)];
                out.extend(tensors.iter().map(|t| (t.blob, t.bytes)));
                out
            }
        }
    }
}

/// A published directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The manifest format.
    pub mmx_manifest: u32,
    /// What it is.
    pub kind: Kind,
    /// The specialty of an adapter or expert (`cardiology`).
    pub specialty: Option<String>,
    /// For adapters and merged experts: the manifest of the base they apply to, when known.
    pub base: Option<Digest>,
    /// For merged experts: how they were made.
    pub lineage: Option<Lineage>,
    /// The files, sorted by name.
    pub files: Vec<FileEntry>,
}

/// Why manifest bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Over the size cap.
    #[error("manifest of {0} bytes is over the {MAX_BYTES}-byte cap")]
    TooLarge(usize),
    /// Not JSON of the manifest's form (the parser's message).
    #[error("not an mmx manifest: {0}")]
    NotAManifest(String),
    /// Another manifest format version.
    #[error("manifest format {0}; this mmx reads {VERSION}")]
    Format(u32),
}

impl Manifest {
    /// The manifest's bytes: compact JSON, fields in declaration order.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifests serialise")
    }

    /// Parses manifest bytes, refusing oversized or unknown content.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| ManifestError::NotAManifest(e.to_string()))?;
        if manifest.mmx_manifest != VERSION {
            return Err(ManifestError::Format(manifest.mmx_manifest));
        }
        Ok(manifest)
    }

    /// Every blob the manifest names (files and the lineage's recipe), with sizes where known.
    pub fn blobs(&self) -> Vec<(Digest, Option<u64>)> {
        let mut out: Vec<(Digest, Option<u64>)> = self
            .files
            .iter()
            .flat_map(FileEntry::blobs)
            .map(|(d, n)| (d, Some(n)))
            .collect();
        if let Some(lineage) = &self.lineage {
            out.push((lineage.recipe, None));
        }
        out
    }

    /// Total bytes of the directory.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(FileEntry::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            mmx_manifest: VERSION,
            kind: Kind::Adapter,
            specialty: Some("cardiology".into()),
            base: None,
            lineage: None,
            files: vec![
                FileEntry::Blob {
                    path: "adapter_config.json".into(),
                    bytes: 3,
                    blob: Digest::of(b"{}\n"),
                },
                FileEntry::Safetensors {
                    path: "adapter_model.safetensors".into(),
                    bytes: 24,
                    header: Digest::of(b"h"),
                    tensors: vec![TensorEntry {
                        name: "a".into(),
                        dtype: "F32".into(),
                        shape: vec![2],
                        blob: Digest::of(b"t"),
                        bytes: 8,
                    }],
                },
            ],
        }
    }

    #[test]
    fn encoding_is_stable_and_round_trips() {
        let m = sample();
        assert_eq!(m.encode(), sample().encode());
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.starts_with(r#"{"mmx_manifest":1,"kind":"adapter","specialty":"cardiology""#));
        assert_eq!(m.bytes(), 27);
        // The header blob covers what the tensors do not.
        assert_eq!(m.files[1].blobs()[0].1, 16);
    }

    #[test]
    fn refuses_unknown_fields_versions_and_oversized_manifests() {
        let text = String::from_utf8(sample().encode()).unwrap();
        let extra = text.replacen("\"kind\"", "\"extra\":1,\"kind\"", 1);
        assert!(Manifest::decode(extra.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("unknown field"));
        let newer = text.replacen("\"mmx_manifest\":1", "\"mmx_manifest\":2", 1);
        assert!(Manifest::decode(newer.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("format 2"));
        let big = vec![b' '; MAX_BYTES + 1];
        assert!(Manifest::decode(&big)
            .unwrap_err()
            .to_string()
            .contains("cap"));
    }
}
