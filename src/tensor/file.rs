//! Zero-copy reading of one safetensors file through a memory map.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::header::{parse_header, Header, TensorInfo};
use super::{dtype, Dtype};
use crate::error::{Error, Result};

/// An open, validated safetensors file. Tensor bytes are borrowed from the memory map.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    header: Header,
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
        Ok(SafetensorsFile { path, mmap, header })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
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
        let start = self.header.data_start + info.start;
        Ok(&self.mmap[start..self.header.data_start + info.end])
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

    /// The dtype of a tensor.
    pub fn dtype(&self, name: &str) -> Result<Dtype> {
        Ok(self.require(name)?.dtype)
    }
}

/// Refuses NaN and infinity, naming the first offending element.
pub fn check_finite(path: &Path, tensor: &str, values: &[f32]) -> Result<()> {
    // Blocks without early exit inside, so that the scan vectorises.
    let finite = values
        .chunks(4096)
        .all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite()));
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
        index,
        value: values[index],
    })
}
