//! The one entry point of every merge: [`MergePlan::build`] reads a recipe once into a plan
//! that knows what it writes (a model or a delta through [`Plan`], a LoRA adapter through
//! [`LoraMerge`]), and [`merge`] runs it with the same options (memory, shards, backend)
//! whichever it is. The CLI, sweeps, `mmx conflicts` and library users all go through here.

use std::path::Path;

use super::lora_native::{merges_adapters, LoraMerge, LoraSummary};
use super::output::{write_merge, MergeSummary, OutputOptions};
use super::plan::Plan;
use crate::error::{Error, Result};
use crate::recipe::{OutputKind, Recipe};

/// A checked merge, built once from a recipe.
#[derive(Debug)]
pub enum MergePlan {
    /// Into a full model or a delta, tensor by tensor.
    Model(Plan),
    /// Adapters into a LoRA adapter (`cat`, `svd`, or a method in core space).
    Adapter(LoraMerge),
}

impl MergePlan {
    /// Opens the recipe's inputs and checks them and its parameters.
    pub fn build(recipe: Recipe) -> Result<MergePlan> {
        Ok(if merges_adapters(&recipe) {
            MergePlan::Adapter(LoraMerge::build(recipe)?)
        } else {
            MergePlan::Model(Plan::build(recipe)?)
        })
    }

    /// What the merge writes.
    pub fn output(&self) -> OutputKind {
        self.recipe().output
    }

    /// The recipe it was built from.
    pub fn recipe(&self) -> &Recipe {
        match self {
            MergePlan::Model(plan) => &plan.recipe,
            MergePlan::Adapter(merge) => merge.recipe(),
        }
    }

    /// What the recipe should change, though it is read as it is (deprecated spellings).
    pub fn warnings(&self) -> &[String] {
        match self {
            MergePlan::Model(plan) => &plan.warnings,
            MergePlan::Adapter(merge) => merge.warnings(),
        }
    }
}

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

    /// Tensors (of a model) or modules (of an adapter) computed on the GPU.
    pub fn on_device(&self) -> usize {
        match self {
            Merged::Model(s) => s.device_tensors,
            Merged::Adapter(s) => s.device_modules,
        }
    }

    /// The files written.
    pub fn files(&self) -> &[String] {
        match self {
            Merged::Model(s) => &s.files,
            Merged::Adapter(s) => &s.files,
        }
    }
}

/// Runs `plan` into `target` (replaced if it is an earlier mmx output, or with
/// `options.force`). `progress` receives the bytes of each finished tensor of a model output.
pub fn merge(
    plan: &MergePlan,
    target: &Path,
    options: &OutputOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Merged> {
    let run = || -> Result<Merged> {
        Ok(match plan {
            MergePlan::Model(plan) => Merged::Model(write_merge(plan, target, options, progress)?),
            MergePlan::Adapter(merge) => Merged::Adapter(merge.write(target, options)?),
        })
    };
    match options.threads {
        None => run(),
        Some(threads) => rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::Io {
                path: target.to_path_buf(),
                source: std::io::Error::other(format!(
                    "cannot start {threads} worker threads: {e}"
                )),
            })?
            .install(run),
    }
}
