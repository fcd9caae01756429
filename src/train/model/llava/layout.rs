//! Where a LLaVA checkpoint keeps its parts: the key prefixes of the vision tower, the
//! projector and the language model, in any layout transformers writes.

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::train::model::weights::Naming;

/// The key prefixes of one checkpoint's parts.
pub(super) struct Layout {
    pub vision: String,
    pub projector: String,
    pub text: Naming,
}

/// The first of `candidates` under which the checkpoint holds `probe`.
fn find_prefix<'c>(
    checkpoint: &Checkpoint,
    candidates: &[&'c str],
    probe: &str,
) -> Option<&'c str> {
    candidates
        .iter()
        .copied()
        .find(|p| checkpoint.info(&format!("{p}{probe}")).is_some())
}

impl Layout {
    /// The layout of the checkpoint in `dir`.
    pub(super) fn of(dir: &Path, checkpoint: &Checkpoint) -> Result<Self> {
        let missing = |part: &str| Error::Model {
            path: dir.to_path_buf(),
            message: format!(
                "holds no {part} under any key layout of a LLaVA checkpoint transformers writes"
            ),
        };
        let vision = find_prefix(
            checkpoint,
            &[
                "vision_tower.vision_model.",
                "vision_tower.",
                "model.vision_tower.",
            ],
            "embeddings.patch_embedding.weight",
        )
        .ok_or_else(|| missing("vision tower"))?;
        let projector = find_prefix(
            checkpoint,
            &["multi_modal_projector.", "model.multi_modal_projector."],
            "linear_1.weight",
        )
        .ok_or_else(|| missing("`multi_modal_projector`"))?;
        let model = find_prefix(
            checkpoint,
            &["language_model.model.", "model.language_model."],
            "embed_tokens.weight",
        )
        .ok_or_else(|| missing("language model"))?;
        let head = if model == "language_model.model." {
            "language_model.lm_head."
        } else {
            "lm_head."
        };
        Ok(Layout {
            vision: vision.into(),
            projector: projector.into(),
            text: Naming {
                model: model.into(),
                head: head.into(),
            },
        })
    }
}
