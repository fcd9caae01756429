//! Zero-copy reading of one safetensors file through a memory map, or of one stored in parts
//! (its header and each tensor in a mapped blob of its own, as the registry stores them).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};

use super::header::{parse_header, Header, TensorInfo};
use super::{dtype, Dtype};
use crate::error::{Error, Result};

/// An open, validated safetensors file. Tensor bytes are borrowed from the memory map(s).
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    data: Data,
    header: Header,
}

/// Where a file's bytes are.
#[derive(Debug)]
enum Data {
    /// The whole file, mapped.
    File(Mmap),
    /// The header's bytes, and each non-empty tensor's bytes mapped on their own.
    Parts {
        header: Vec<u8>,
        tensors: HashMap<String, Mmap>,
    },
}

impl SafetensorsFile {
    /// Opens and validates a safetensors file (see [`parse_header`] for the checks).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only; mmx never writes to files it reads, and a file truncated
        // by another process while mapped is outside what any mmap reader can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let header = parse_header(&mmap, mmap.len() as u64).map_err(|source| Error::Header {
            path: path.clone(),
            source,
        })?;
        Ok(SafetensorsFile {
            path,
            data: Data::File(mmap),
            header,
        })
    }

    /// A file stored in parts: `header` is its first 8 + N bytes, `tensors` the mapped bytes of
    /// each tensor (empty tensors may be left out). Validated as [`SafetensorsFile::open`]
    /// validates a file, and every part must have its tensor's length. `path` names it in
    /// messages.
    pub fn from_parts(
        path: PathBuf,
        header: Vec<u8>,
        tensors: HashMap<String, Mmap>,
    ) -> Result<Self> {
        let data: u64 = tensors.values().map(|m| m.len() as u64).sum();
        let parsed =
            parse_header(&header, header.len() as u64 + data).map_err(|source| Error::Header {
                path: path.clone(),
                source,
            })?;
        if parsed.data_start != header.len() {
            return Err(Error::Checkpoint {
                path,
                message: "the stored header's length does not match its length prefix".into(),
            });
        }
        for (name, info) in &parsed.tensors {
            let len = tensors.get(name).map_or(0, |m| m.len());
            if len != info.end - info.start {
                return Err(Error::Checkpoint {
                    path,
                    message: format!(
                        "tensor `{name}` is stored with {len} bytes, its header says {}",
                        info.end - info.start
                    ),
                });
            }
        }
        if tensors
            .keys()
            .any(|name| !parsed.tensors.contains_key(name))
        {
            return Err(Error::Checkpoint {
                path,
                message: "holds a tensor its header does not name".into(),
            });
        }
        Ok(SafetensorsFile {
            path,
            data: Data::Parts { header, tensors },
            header: parsed,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's first bytes up to its data section: the length prefix and the header JSON
    /// (with any padding), exactly as stored.
    pub fn header_bytes(&self) -> &[u8] {
        match &self.data {
            Data::File(mmap) => &mmap[..self.header.data_start],
            Data::Parts { header, .. } => header,
        }
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.header.tensors.keys().map(String::as_str)
    }

    /// The entry of a tensor, or `None`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensors.get(name)
    }

    fn require(&self, name: &str) -> Result<&TensorInfo> {
        self.info(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })
    }

    /// A tensor's raw little-endian bytes.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.require(name)?;
        match &self.data {
            Data::File(mmap) => {
                let start = self.header.data_start + info.start;
                Ok(&mmap[start..self.header.data_start + info.end])
            }
            Data::Parts { tensors, .. } => Ok(tensors.get(name).map_or(&[], |m| &m[..])),
        }
    }

    /// A float tensor converted to f32, refused if it holds NaN or infinity.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.require(name)?;
        let values = dtype::to_f32(info.dtype, self.bytes(name)?).ok_or_else(|| Error::Dtype {
            path: self.path.clone(),
            tensor: name.to_string(),
            dtype: info.dtype.to_string(),
            reason: "not a float type mmx can merge".to_string(),
        })?;
        check_finite(&self.path, name, &values)?;
        Ok(values)
    }

    /// Elements `[start, end)` of a float tensor (flat, row-major) as f32, refused if any is
    /// NaN or infinite; the index in the error is the tensor-wide one.
    pub fn read_f32_range(&self, name: &str, start: usize, end: usize) -> Result<Vec<f32>> {
        let info = self.require(name)?;
        let size = info.dtype.size();
        if start > end || end > info.numel() {
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                tensor: name.to_string(),
                expected: vec![info.numel()],
                actual: vec![end],
            });
        }
        let bytes = &self.bytes(name)?[start * size..end * size];
        let values = dtype::to_f32(info.dtype, bytes).ok_or_else(|| Error::Dtype {
            path: self.path.clone(),
            tensor: name.to_string(),
            dtype: info.dtype.to_string(),
            reason: "not a float type mmx can merge".to_string(),
        })?;
        check_finite_from(&self.path, name, &values, start)?;
        Ok(values)
    }

    /// Lets the kernel drop this process's mapping of a tensor's pages, so that a tensor
    /// already merged stops counting towards resident memory. The file is unchanged and a later
    /// read faults the pages back in.
    pub fn release(&self, name: &str) {
        if let Some(info) = self.info(name) {
            self.release_range(name, 0, info.numel());
        }
    }

    /// [`release`](Self::release) for elements `start..end` of a tensor only (with the rest
    /// of the pages they share), so that a tensor read in chunks stays resident a chunk at a
    /// time.
    pub fn release_range(&self, name: &str, start: usize, end: usize) {
        let Some(info) = self.info(name) else {
            return;
        };
        let size = info.dtype.size();
        let (first, last) = (start.min(end) * size, end * size);
        if last > info.end - info.start || first == last {
            return;
        }
        let (map, offset) = match &self.data {
            Data::File(mmap) => (mmap, self.header.data_start + info.start),
            Data::Parts { tensors, .. } => match tensors.get(name) {
                Some(m) => (m, 0),
                None => return,
            },
        };
        // SAFETY: the map is read-only and backed by a file mmx does not modify, so dropping
        // its pages cannot change what any borrowed slice reads: the next access maps the
        // same bytes back from the page cache. Errors only mean the advice was not taken.
        let _ = unsafe {
            map.unchecked_advise_range(UncheckedAdvice::DontNeed, offset + first, last - first)
        };
    }

    /// The dtype of a tensor.
    pub fn dtype(&self, name: &str) -> Result<Dtype> {
        Ok(self.require(name)?.dtype)
    }
}

/// Refuses NaN and infinity, naming the first offending element.
pub fn check_finite(path: &Path, tensor: &str, values: &[f32]) -> Result<()> {
    check_finite_from(path, tensor, values, 0)
}

/// [`check_finite`] for the part of a tensor that starts at flat element `first`: the error
/// names the element's index in the whole tensor.
pub fn check_finite_from(path: &Path, tensor: &str, values: &[f32], first: usize) -> Result<()> {
    // Exponent bits all set means NaN or infinity. Integer ops over blocks without an early
    // exit inside, so that the scan vectorises.
    const EXPONENT: u32 = 0x7f80_0000;
    let finite = values.chunks(4096).all(|c| {
        c.iter().fold(0u32, |bad, v| {
            bad | u32::from(v.to_bits() & EXPONENT == EXPONENT)
        }) == 0
    });
    if finite {
        return Ok(());
    }
    let index = values
        .iter()
        .position(|v| !v.is_finite())
        .expect("a non-finite value exists");
    Err(Error::NonFinite {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        index: first + index,
        value: values[index],
    })
}
