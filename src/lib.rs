//! mmx merges specialty LoRA adapters and fine-tuned checkpoints into one expert model, with
//! mergekit's semantics and PEFT's file formats.
//!
//! The pieces, from the bottom up: [`tensor`] (safetensors reading and writing), [`adapter`]
//! (PEFT LoRA adapters), [`checkpoint`] (Hugging Face model directories), [`recipe`] (mmx TOML
//! and mergekit YAML), [`merge`] (methods, plan, executor, output), [`plot`] (PNG and SVG
//! figures), [`train`] (clinical cases for the trainers, real or synthetic), [`sweep`] and
//! [`conflict`]. The command line is the `mmx` binary's own (src/cli/), on top of all of them.
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
//! let merged = merge(&plan, "out/quickstart".as_ref(), &options, &|_| {})?;
//! assert!(!merged.files().is_empty());
//! # Ok::<(), mmx::Error>(())
//! ```
#![warn(missing_docs)]

pub mod adapter;
pub mod backend;
pub mod checkpoint;
pub mod conflict;
pub mod error;
pub mod fuzzing;
pub mod merge;
pub mod plot;
pub mod recipe;
pub mod registry;
pub mod rng;
pub mod sweep;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
