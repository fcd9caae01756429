//! The whole tensors adapters store (PEFT's `modules_to_save`, such as a LLaVA expert's trained
//! `multi_modal_projector`) in an adapter-to-adapter merge: each is merged as a full tensor,
//! against the base's, by the recipe's method (`cat` and `svd`, exact sums of the factors, take
//! the exact weighted sum `B + Σ w_t·(X_t − B)`), and written whole into the merged adapter.
//! Only the experts that store a tensor take part in its merge, as only the experts that adapt
//! a module take part in that module's.

use std::path::Path;

use super::job::TensorJob;
use super::method::Method;
use super::plan::resolve;
use super::tensor_merge::merge_tensor;
use crate::adapter::Adapter;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::recipe::{layer_position, Recipe};
use crate::tensor::{check_finite, from_f32, Digest, Dtype, TensorSpec};

/// A base tensor that some experts store whole.
#[derive(Debug, Clone)]
pub(super) struct SavedTensor {
    /// The base tensor's name (as the base checkpoint saves it).
    pub name: String,
    /// The key the merged adapter stores it under: the first storing expert's.
    pub key: String,
    /// The experts that store it, in recipe order.
    pub experts: Vec<usize>,
}

/// One merged whole tensor, ready to write.
pub(super) struct SavedOutput {
    pub tensor: (TensorSpec, Vec<u8>),
    /// The digest of the base tensor's bytes the merge read (the merge record names it).
    pub base_blake3: String,
}

/// Finds every tensor the adapters store whole and checks it against the base: the base has it,
/// with the same shape, and no other adapter adapts it with LoRA factors instead.
pub(super) fn collect(
    base: &Checkpoint,
    adapters: &[(String, Adapter)],
) -> Result<Vec<SavedTensor>> {
    let mut found: Vec<SavedTensor> = Vec::new();
    for (e, (_, adapter)) in adapters.iter().enumerate() {
        for (name, key) in adapter.saved_tensors() {
            let shape = adapter
                .replacement_shape(name)
                .expect("an indexed saved tensor has a shape");
            let info = base.info(name).ok_or_else(|| Error::Adapter {
                path: adapter.dir().to_path_buf(),
                message: format!(
                    "stores `{name}` whole (`modules_to_save`), which `{}` does not have: the adapter was trained on a different base model",
                    base.dir().display()
                ),
            })?;
            if info.shape != shape {
                return Err(Error::ShapeMismatch {
                    path: adapter.dir().to_path_buf(),
                    tensor: name.clone(),
                    expected: info.shape.clone(),
                    actual: shape.to_vec(),
                });
            }
            if let Some((other, _)) = adapters
                .iter()
                .find(|(_, a)| a.modules().contains_key(name))
            {
                return Err(Error::Adapter {
                    path: adapter.dir().to_path_buf(),
                    message: format!(
                        "stores `{name}` whole (`modules_to_save`) while `{other}` adapts it with LoRA factors: one merged adapter cannot hold both"
                    ),
                });
            }
            match found.iter_mut().find(|s| &s.name == name) {
                Some(saved) => saved.experts.push(e),
                None => found.push(SavedTensor {
                    name: name.clone(),
                    key: key.clone(),
                    experts: vec![e],
                }),
            }
        }
    }
    Ok(found)
}

/// Merges one whole tensor with `method` (the recipe's parameters resolved for it as for any
/// tensor) and encodes it in `dtype`, or in the first storing expert's dtype.
pub(super) fn merge(
    recipe: &Recipe,
    method: Method,
    base: &Checkpoint,
    adapters: &[(String, Adapter)],
    saved: &SavedTensor,
    dtype: Option<Dtype>,
) -> Result<SavedOutput> {
    let info = base.info(&saved.name).expect("collected against the base");
    let base_values = base.read_f32(&saved.name)?;
    let base_blake3 = Digest::of(base.bytes(&saved.name)?).hex();
    let mut experts = Vec::with_capacity(saved.experts.len());
    for &e in &saved.experts {
        let values = adapters[e]
            .1
            .replacement(&saved.name)?
            .expect("collected from the adapter's saved tensors");
        experts.push(values);
    }
    let labelled: Vec<(&str, &crate::recipe::Parameters)> = saved
        .experts
        .iter()
        .map(|&e| (adapters[e].0.as_str(), &recipe.experts[e].parameters))
        .collect();
    let t = layer_position(&saved.name, base.num_layers());
    let params = resolve(recipe, method, &labelled, &saved.name, t)?;
    let merged = merge_tensor(
        method,
        &params.globals,
        TensorJob {
            name: &saved.name,
            shape: &info.shape,
            base: Some(&base_values),
            experts,
            params: params.experts,
            expert_ids: saved.experts.clone(),
        },
    )?;
    check_finite(Path::new("merged output"), &saved.name, &merged.values)?;
    let dtype = match dtype {
        Some(d) => d,
        None => adapters[saved.experts[0]].1.file().dtype(&saved.key)?,
    };
    let bytes = from_f32(dtype, &merged.values).expect("output dtype");
    Ok(SavedOutput {
        tensor: (
            TensorSpec {
                name: saved.key.clone(),
                dtype,
                shape: info.shape.clone(),
            },
            bytes,
        ),
        base_blake3,
    })
}
