//! One entry point for any recipe: a merge into a model or delta ([`Plan`]), or into a LoRA
//! adapter ([`LoraMerge`]).

use std::path::Path;

use super::lora_native::{merges_adapters, LoraMerge, LoraSummary};
use super::output::{write_merge, MergeSummary, OutputOptions};
use super::plan::Plan;
use crate::error::Result;
use crate::recipe::Recipe;

/// What a merge wrote.
#[derive(Debug, Clone)]
pub enum Merged {
    /// A full model or a delta.
    Model(MergeSummary),
    /// A LoRA adapter.
    Adapter(LoraSummary),
}

impl Merged {
    /// The mean share of coordinates in sign conflict, for methods that elect signs.
    pub fn mean_sign_conflict(&self) -> Option<f64> {
        match self {
            Merged::Model(s) => s.mean_sign_conflict,
            Merged::Adapter(s) => s.mean_sign_conflict,
        }
    }

    /// Core-space merges: each expert's share of its update the merge keeps.
    pub fn retained_by_expert(&self) -> &[(String, f64)] {
        match self {
            Merged::Model(_) => &[],
            Merged::Adapter(s) => &s.retained_by_expert,
        }
    }
}

/// Merges `recipe` into `target` (replaced if it is an earlier mmx output, or with
/// `options.force`).
pub fn merge_recipe(recipe: Recipe, target: &Path, options: &OutputOptions) -> Result<Merged> {
    if merges_adapters(&recipe) {
        let merge = LoraMerge::build(recipe)?;
        return Ok(Merged::Adapter(merge.write(target, options.force)?));
    }
    let plan = Plan::build(recipe)?;
    Ok(Merged::Model(write_merge(&plan, target, options, &|_| {})?))
}
