//! Merging: one entry point for every recipe ([`MergePlan::build`], then [`merge`]), the
//! methods and their parameters ([`method`], [`parameters`]), one tensor's merge
//! ([`merge_tensor`]), the [`Plan`] of a model output, the LoRA-to-LoRA merge
//! ([`lora_native`]), the streaming executor and the output writer.
//!
//! ```no_run
//! use mmx::backend::Backend;
//! use mmx::merge::{merge, MergePlan, OutputOptions};
//! use mmx::recipe::Recipe;
//!
//! let plan = MergePlan::build(Recipe::load("recipes/quickstart.toml".as_ref())?)?;
//! let options = OutputOptions {
//!     max_memory: 4 << 30,
//!     shard_bytes: 5 << 30,
//!     force: false,
//!     backend: Backend::Cpu,
//!     threads: None,
//! };
//! merge(&plan, "out/quickstart".as_ref(), &options, &|_| {})?;
//! # Ok::<(), mmx::Error>(())
//! ```

mod caci;
mod caci_stream;
pub mod calibration;
mod chunked;
mod chunking;
pub mod consensus;
pub mod core;
mod data_aware;
mod device;
mod executor;
mod expert;
pub mod fisher;
mod job;
pub mod kernels;
mod linalg;
pub mod lora_native;
pub mod method;
mod output;
pub mod parameters;
mod plan;
pub mod regmean;
mod restore;
pub mod rng;
mod run;
mod saved_tensors;
pub mod sparsify;
mod stored;
mod stream;
mod tensor_merge;

pub use device::kernels_for;
pub use executor::{execute, TensorRecord};
pub use expert::{Expert, ExpertInput};
pub use job::{MergedTensor, TensorJob, TensorStats};
pub use method::{Confidence, ExpertParams, Fallback, GlobalParams, Method, RescaleMode};
pub use output::{write_merge, MergeSummary, OutputOptions};
pub use plan::{input_files, MergeParams, Plan, TensorPlan};
pub use run::{merge, MergePlan, Merged};
pub use tensor_merge::merge_tensor;
