//! Adapters read without their base model (`mmx conflicts` on adapters, LoRA-output merges
//! with no `base`): they must name the same base, and the base's shapes are the ones the
//! adapters agree on.

use std::collections::BTreeMap;

use super::Adapter;
use crate::error::{Error, Result};

/// The last part of the base an adapter names (`Qwen/Qwen2-0.5B` and `/models/Qwen2-0.5B/`
/// are the same base), `None` when its config names none.
fn base_name(adapter: &Adapter) -> Option<&str> {
    let base = adapter.config().base_model_name_or_path.as_deref()?;
    let trimmed = base.trim_end_matches('/');
    Some(trimmed.rsplit('/').next().unwrap_or(trimmed))
}

/// The shape of every weight some adapter updates, after checking that the adapters are for
/// one base: the same `base_model_name_or_path` (by its last part, where both name one) and
/// the same shape for every module they share. Refuses adapters that update nothing.
pub fn module_shapes(adapters: &[&Adapter]) -> Result<BTreeMap<String, [usize; 2]>> {
    let Some(first) = adapters.first() else {
        return Ok(BTreeMap::new());
    };
    let mismatch = |message: String| Error::Adapter {
        path: first.dir().to_path_buf(),
        message,
    };
    for a in &adapters[1..] {
        if let (Some(expected), Some(this)) = (base_name(first), base_name(a)) {
            if expected != this {
                return Err(mismatch(format!(
                    "is an adapter for base `{expected}` but `{}` is for `{this}`: adapters for different bases cannot be combined",
                    a.dir().display()
                )));
            }
        }
    }
    let mut shapes: BTreeMap<String, ([usize; 2], usize)> = BTreeMap::new();
    for (i, a) in adapters.iter().enumerate() {
        for (name, module) in a.modules() {
            let (shape, owner) = *shapes
                .entry(name.clone())
                .or_insert((module.target_shape, i));
            if shape != module.target_shape {
                return Err(mismatch(format!(
                    "module `{name}` updates a {shape:?} weight in `{}` but a {:?} weight in `{}`: the adapters are for different bases",
                    adapters[owner].dir().display(),
                    module.target_shape,
                    a.dir().display()
                )));
            }
        }
    }
    if shapes.is_empty() {
        return Err(mismatch("the adapters adapt no module".to_string()));
    }
    Ok(shapes
        .into_iter()
        .map(|(name, (shape, _))| (name, shape))
        .collect())
}
