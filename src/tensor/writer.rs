//! Writing safetensors: whole small files atomically, and large outputs as size-capped shards
//! whose layout is fixed before any tensor is computed, so that workers write each tensor at its
//! offset in any order and the bytes do not depend on the thread count.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::header::encode_header;
use super::Dtype;
use crate::error::{Error, Result};

/// The name, dtype and shape of a tensor to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Element type on disk.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Bytes the tensor takes on disk.
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh name for a temporary sibling of `path`, unique within this machine's processes.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Flushes a directory's entries to disk, so that a rename inside it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_parts(path, &[bytes])
}

/// [`write_atomic`] of the concatenation of `parts`, without forming it.
pub fn write_atomic_parts(path: &Path, parts: &[&[u8]]) -> Result<()> {
    write_atomic_via(&temp_sibling(path), path, parts, false)
}

/// Writes the concatenation of `parts` to the temporary file `tmp`, syncs it, makes it
/// read-only if asked, renames it to `path` and syncs `path`'s directory. On error `tmp` is
/// removed and `path` is left as it was.
pub fn write_atomic_via(tmp: &Path, path: &Path, parts: &[&[u8]], read_only: bool) -> Result<()> {
    let result = (|| {
        let mut f = File::create(tmp)?;
        for part in parts {
            f.write_all(part)?;
        }
        f.sync_all()?;
        if read_only {
            let mut perms = f.metadata()?.permissions();
            perms.set_readonly(true);
            std::fs::set_permissions(tmp, perms)?;
        }
        std::fs::rename(tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(tmp);
        return Err(Error::io(path, e));
    }
    // A bare file name has the empty path as its parent: that is the working directory.
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    sync_dir(parent)
}

/// Writes a whole safetensors file atomically; tensors keep the given order in the data section.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(TensorSpec, Vec<u8>)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut entries = Vec::with_capacity(tensors.len());
    let mut offset = 0;
    for (spec, bytes) in tensors {
        if bytes.len() != spec.byte_len() {
            return Err(Error::Output {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{}` has {} bytes, its shape {:?} and dtype {} need {}",
                    spec.name,
                    bytes.len(),
                    spec.shape,
                    spec.dtype,
                    spec.byte_len()
                ),
            });
        }
        entries.push((
            spec.name.as_str(),
            spec.dtype,
            spec.shape.as_slice(),
            offset,
            offset + bytes.len(),
        ));
        offset += bytes.len();
    }
    let header = encode_header(&entries, metadata);
    let mut parts: Vec<&[u8]> = vec![&header];
    parts.extend(tensors.iter().map(|(_, bytes)| bytes.as_slice()));
    write_atomic_parts(path, &parts)
}

struct Slot {
    shard: usize,
    offset: u64,
    len: usize,
}

/// A set of output shards laid out in advance; tensors are written at their offsets from any
/// thread, and [`ShardedWriter::finish`] checks that every one was written.
pub struct ShardedWriter {
    dir: PathBuf,
    files: Vec<(String, File)>,
    slots: HashMap<String, Slot>,
    /// Bytes written so far per tensor.
    written: Mutex<HashMap<String, usize>>,
    weight_map: BTreeMap<String, String>,
    total_size: u64,
}

impl ShardedWriter {
    /// Creates the shard files in `dir` (which must exist), splitting `specs` in order into shards
    /// of at most `max_shard_bytes` of tensor data (a tensor larger than that gets its own shard).
    /// One shard is named `<stem>.safetensors`; several are `<stem>-0000i-of-0000n.safetensors`
    /// with `<stem>.safetensors.index.json` beside them.
    pub fn create(
        dir: &Path,
        stem: &str,
        specs: &[TensorSpec],
        max_shard_bytes: u64,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut groups: Vec<Vec<&TensorSpec>> = vec![Vec::new()];
        let mut current = 0u64;
        for spec in specs {
            let len = spec.byte_len() as u64;
            let last = groups.last_mut().expect("at least one group");
            if !last.is_empty() && current + len > max_shard_bytes {
                groups.push(Vec::new());
                current = 0;
            }
            groups.last_mut().expect("at least one group").push(spec);
            current += len;
        }
        let n = groups.len();
        let mut files = Vec::with_capacity(n);
        let mut slots = HashMap::new();
        let mut weight_map = BTreeMap::new();
        let mut total_size = 0u64;
        for (i, group) in groups.iter().enumerate() {
            let file_name = if n == 1 {
                format!("{stem}.safetensors")
            } else {
                format!("{stem}-{:05}-of-{n:05}.safetensors", i + 1)
            };
            let mut entries = Vec::with_capacity(group.len());
            let mut offset = 0usize;
            for spec in group {
                entries.push((
                    spec.name.as_str(),
                    spec.dtype,
                    spec.shape.as_slice(),
                    offset,
                    offset + spec.byte_len(),
                ));
                offset += spec.byte_len();
            }
            let header = encode_header(&entries, metadata);
            let path = dir.join(&file_name);
            let file = OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            file.write_all_at(&header, 0)
                .and_then(|_| file.set_len((header.len() + offset) as u64))
                .map_err(|e| Error::io(&path, e))?;
            for (name, _, _, start, end) in entries {
                slots.insert(
                    name.to_string(),
                    Slot {
                        shard: i,
                        offset: (header.len() + start) as u64,
                        len: end - start,
                    },
                );
                weight_map.insert(name.to_string(), file_name.clone());
            }
            total_size += offset as u64;
            files.push((file_name, file));
        }
        Ok(ShardedWriter {
            dir: dir.to_path_buf(),
            files,
            slots,
            written: Mutex::new(HashMap::new()),
            weight_map,
            total_size,
        })
    }

    /// Writes one tensor's bytes at its planned place.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let len = self.slot(name)?.len;
        if bytes.len() != len {
            return Err(self.overflow(
                name,
                format!(
                    "tensor `{name}` has {} bytes, the plan reserved {len}",
                    bytes.len()
                ),
            ));
        }
        self.write_at(name, 0, bytes)
    }

    /// Writes part of a tensor, `offset` bytes into it. The parts of one tensor must not
    /// overlap; [`finish`](Self::finish) checks that they add up to the whole.
    pub fn write_at(&self, name: &str, offset: usize, bytes: &[u8]) -> Result<()> {
        let slot = self.slot(name)?;
        if offset + bytes.len() > slot.len {
            return Err(self.overflow(
                name,
                format!(
                    "{} bytes at offset {offset} run past the {} bytes planned for tensor `{name}`",
                    bytes.len(),
                    slot.len
                ),
            ));
        }
        let (file_name, file) = &self.files[slot.shard];
        file.write_all_at(bytes, slot.offset + offset as u64)
            .map_err(|e| Error::io(self.dir.join(file_name), e))?;
        *self
            .written
            .lock()
            .expect("writer lock is never poisoned by a panic while held")
            .entry(name.to_string())
            .or_default() += bytes.len();
        Ok(())
    }

    /// Starts writing what is written so far to disk (errors are left for
    /// [`finish`](Self::finish)'s fsync to report).
    pub fn flush_to_disk(&self) {
        for (_, file) in &self.files {
            let _ = file.sync_data();
        }
    }

    fn slot(&self, name: &str) -> Result<&Slot> {
        self.slots.get(name).ok_or_else(|| Error::Output {
            path: self.dir.clone(),
            message: format!("tensor `{name}` is not part of the planned output"),
        })
    }

    fn overflow(&self, name: &str, message: String) -> Error {
        let shard = self.slots.get(name).map_or(0, |s| s.shard);
        Error::Output {
            path: self.dir.join(&self.files[shard].0),
            message,
        }
    }

    /// Checks every planned tensor was written, fsyncs the shards and writes the index when there
    /// are several. Returns the files written.
    pub fn finish(self, stem: &str) -> Result<Vec<String>> {
        let written = self
            .written
            .into_inner()
            .expect("writer lock is never poisoned by a panic while held");
        let incomplete = self
            .weight_map
            .keys()
            .find(|k| written.get(*k).copied().unwrap_or(0) != self.slots[*k].len);
        if let Some(missing) = incomplete {
            return Err(Error::Output {
                path: self.dir.clone(),
                message: format!("tensor `{missing}` was planned but never written in full"),
            });
        }
        let mut names = Vec::with_capacity(self.files.len() + 1);
        for (name, file) in &self.files {
            file.sync_all()
                .map_err(|e| Error::io(self.dir.join(name), e))?;
            names.push(name.clone());
        }
        if self.files.len() > 1 {
            let index = serde_json::json!({
                "metadata": {"total_size": self.total_size},
                "weight_map": self.weight_map,
            });
            let index_name = format!("{stem}.safetensors.index.json");
            let bytes = serde_json::to_vec_pretty(&index).expect("JSON serialises");
            write_atomic(&self.dir.join(&index_name), &bytes)?;
            names.push(index_name);
        }
        sync_dir(&self.dir)?;
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::SafetensorsFile;

    fn spec(name: &str, shape: &[usize]) -> TensorSpec {
        TensorSpec {
            name: name.to_string(),
            dtype: Dtype::F32,
            shape: shape.to_vec(),
        }
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn whole_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let tensors = vec![
            (spec("b", &[2]), f32_bytes(&[1.0, 2.0])),
            (spec("a", &[1, 3]), f32_bytes(&[3.0, 4.0, 5.0])),
        ];
        write_safetensors(&path, &tensors, &BTreeMap::new()).unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.read_f32("a").unwrap(), [3.0, 4.0, 5.0]);
        assert_eq!(f.read_f32("b").unwrap(), [1.0, 2.0]);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn shards_by_size_in_any_write_order() {
        let dir = tempfile::tempdir().unwrap();
        let specs = [spec("t0", &[4]), spec("t1", &[4]), spec("t2", &[4])];
        // 16 bytes each, cap 40: [t0, t1] and [t2].
        let writer =
            ShardedWriter::create(dir.path(), "model", &specs, 40, &BTreeMap::new()).unwrap();
        for (i, s) in specs.iter().enumerate().rev() {
            writer.write(&s.name, &f32_bytes(&[i as f32; 4])).unwrap();
        }
        let files = writer.finish("model").unwrap();
        assert_eq!(
            files,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json"
            ]
        );
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(index["metadata"]["total_size"], 48);
        assert_eq!(
            index["weight_map"]["t2"],
            "model-00002-of-00002.safetensors"
        );
        let second = SafetensorsFile::open(dir.path().join(&files[1])).unwrap();
        assert_eq!(second.read_f32("t2").unwrap(), [2.0; 4]);
    }

    #[test]
    fn finish_refuses_an_unwritten_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let specs = [spec("t0", &[1]), spec("t1", &[1])];
        let writer =
            ShardedWriter::create(dir.path(), "model", &specs, 1 << 20, &BTreeMap::new()).unwrap();
        writer.write("t0", &f32_bytes(&[1.0])).unwrap();
        assert!(writer.write("t1", &f32_bytes(&[1.0, 2.0])).is_err());
        let err = writer.finish("model").unwrap_err().to_string();
        assert!(err.contains("`t1`"), "{err}");
    }
}
