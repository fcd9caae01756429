//! [`Weights`]: candle tensors read from safetensors through mmx's validated reader, checked
//! against the shape the model expects and converted to the model's dtype.

use std::cell::RefCell;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use super::candle;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::tensor::{Dtype, SafetensorsFile, TensorInfo};

/// Where a language model's tensors live in a checkpoint: under their own names (`model.…`,
/// `lm_head.…`), or under the prefixes a vision-language checkpoint nests them in.
#[derive(Debug, Clone)]
pub(crate) struct Naming {
    /// Replaces `model.`.
    pub model: String,
    /// Replaces `lm_head.`.
    pub head: String,
}

impl Default for Naming {
    fn default() -> Self {
        Naming {
            model: "model.".into(),
            head: "lm_head.".into(),
        }
    }
}

impl Naming {
    /// The checkpoint's name for the tensor the text model calls `name`.
    pub(crate) fn key(&self, name: &str) -> String {
        if let Some(rest) = name.strip_prefix("model.") {
            format!("{}{rest}", self.model)
        } else if let Some(rest) = name.strip_prefix("lm_head.") {
            format!("{}{rest}", self.head)
        } else {
            name.to_string()
        }
    }
}

/// The tensors of a model directory, loaded on request; with `trainable`, each one is a
/// variable (recorded under its name) so that training reaches every weight.
pub(crate) struct Weights<'a> {
    checkpoint: &'a Checkpoint,
    naming: Naming,
    dtype: DType,
    device: &'a Device,
    trainable: Option<RefCell<Vec<(String, Var)>>>,
}

/// candle's dtype for a float safetensors dtype.
fn candle_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

/// One tensor's bytes as a candle tensor of `dtype`, refused unless its shape is `shape`.
pub(crate) fn load_tensor(
    path: &Path,
    name: &str,
    info: &TensorInfo,
    bytes: &[u8],
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    if info.shape != shape {
        return Err(Error::ShapeMismatch {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            expected: shape.to_vec(),
            actual: info.shape.clone(),
        });
    }
    let stored = candle_dtype(info.dtype).ok_or_else(|| Error::Dtype {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        dtype: info.dtype.to_string(),
        reason: "the trainers' model reads F32, F16, BF16 and F64 weights".to_string(),
    })?;
    Tensor::from_raw_buffer(bytes, stored, shape, device)
        .and_then(|t| t.to_dtype(dtype))
        .map_err(candle(format!("`{}`: tensor `{name}`", path.display())))
}

/// A tensor of an adapter file, shape-checked, in `dtype`.
pub(crate) fn load_file_tensor(
    file: &SafetensorsFile,
    name: &str,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let info = file.info(name).ok_or_else(|| Error::MissingTensor {
        path: file.path().to_path_buf(),
        tensor: name.to_string(),
    })?;
    load_tensor(
        file.path(),
        name,
        info,
        file.bytes(name)?,
        shape,
        dtype,
        device,
    )
}

impl<'a> Weights<'a> {
    /// Tensors of `checkpoint`, to be converted to `dtype` on `device`.
    pub(crate) fn new(
        checkpoint: &'a Checkpoint,
        dtype: DType,
        device: &'a Device,
        trainable: bool,
    ) -> Self {
        Weights {
            checkpoint,
            naming: Naming::default(),
            dtype,
            device,
            trainable: trainable.then(|| RefCell::new(Vec::new())),
        }
    }

    /// Where the text model's tensors are found.
    pub(crate) fn naming(&self) -> &Naming {
        &self.naming
    }

    /// The same, the text model's tensors found where `naming` says.
    pub(crate) fn named(self, naming: Naming) -> Self {
        Weights { naming, ..self }
    }

    /// The variables made so far (empty unless trainable), in load order.
    pub(crate) fn into_vars(self) -> Vec<(String, Var)> {
        self.trainable.map(RefCell::into_inner).unwrap_or_default()
    }

    /// Whether the checkpoint holds `name`.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.checkpoint.info(&self.naming.key(name)).is_some()
    }

    /// Tensor `name`, which must have `shape`.
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let name = &self.naming.key(name);
        let info = self
            .checkpoint
            .info(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.checkpoint.dir().to_path_buf(),
                tensor: name.to_string(),
            })?;
        let tensor = load_tensor(
            self.checkpoint.dir(),
            name,
            info,
            self.checkpoint.bytes(name)?,
            shape,
            self.dtype,
            self.device,
        )?;
        match &self.trainable {
            None => Ok(tensor),
            Some(vars) => {
                let var = Var::from_tensor(&tensor).map_err(candle(name.to_string()))?;
                vars.borrow_mut().push((name.to_string(), var.clone()));
                // The model computes with the variable's tensor: updates reach it in place.
                Ok(var.as_tensor().clone())
            }
        }
    }
}
