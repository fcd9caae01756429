//! Recipe sources that live in the registry (`registry:NAME:TAG`, `blake3:<hex>`), opened
//! straight from the store.

use std::path::Path;

use crate::adapter::Adapter;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::registry::{registry_path, Opened, Registry};

/// Opens a registry source: from the recipe's `registry`, else `$MMX_REGISTRY`, else
/// `./registry`.
pub(crate) fn open(registry: Option<&Path>, reference: &str) -> Result<Opened> {
    Registry::open(&registry_path(registry))?.open_input(reference)
}

/// A registry source that must be a model.
pub(crate) fn open_model(registry: Option<&Path>, reference: &str) -> Result<Checkpoint> {
    match open(registry, reference)? {
        Opened::Model(m) => Ok(m),
        Opened::Adapter(a) => Err(Error::Checkpoint {
            path: a.dir().to_path_buf(),
            message: "is a PEFT adapter, not a model".into(),
        }),
    }
}

/// A registry source that must be an adapter.
pub(crate) fn open_adapter(registry: Option<&Path>, reference: &str) -> Result<Adapter> {
    match open(registry, reference)? {
        Opened::Adapter(a) => Ok(a),
        Opened::Model(m) => Err(Error::Adapter {
            path: m.dir().to_path_buf(),
            message: "is a model, not a PEFT adapter".into(),
        }),
    }
}
