//! Training data for the trainers (DESIGN.md §7): [`Case`] and its JSON Lines files
//! ([`read_cases`], [`write_cases`]), the prompt and completion a model sees for a case
//! ([`Case::prompt`], [`Case::completion`], [`parse_answer`]), and a seeded generator of
//! synthetic cases ([`synth`]).
//!
//! ```
//! use mmx::train::{parse_answer, read_cases, synth, write_cases};
//!
//! let splits = synth::generate(&synth::SynthSpec::new(1, 4, 0, 0))?;
//! let dir = std::env::temp_dir().join(format!("mmx-train-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).map_err(|e| mmx::Error::io(&dir, e))?;
//! let path = dir.join("train.jsonl");
//! write_cases(&path, &splits.train)?;
//! let cases = read_cases(&path)?;
//! assert_eq!(cases, splits.train);
//! assert_eq!(parse_answer(&cases[0].completion()), Some(cases[0].answer_letter()));
//! # std::fs::remove_dir_all(&dir).map_err(|e| mmx::Error::io(&dir, e))?;
//! # Ok::<(), mmx::Error>(())
//! ```

pub mod batch;
pub mod calibrate;
pub mod case;
pub mod checkpoint;
pub mod embed;
pub mod eval;
pub mod fused;
pub mod guideline;
pub mod images;
pub mod init;
pub mod model;
pub mod optim;
pub mod prompt;
pub mod recipe;
pub mod rl;
pub mod schedule;
pub mod sft;
pub mod source;
pub mod synth;
pub mod tokenizer;
pub mod vlm_init;

pub use case::{option_letter, read_case_files, read_cases, write_cases, Case};
pub use prompt::parse_answer;
