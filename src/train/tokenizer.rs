//! [`Tokenizer`]: a Hugging Face `tokenizer.json` read with the `tokenizers` crate, checked
//! against the model it feeds ([`Tokenizer::check_vocab`]), with encode and decode helpers.
//!
//! ```no_run
//! use mmx::train::model::ModelConfig;
//! use mmx::train::tokenizer::Tokenizer;
//!
//! let tokenizer = Tokenizer::load("models/tiny".as_ref())?;
//! tokenizer.check_vocab(&ModelConfig::read("models/tiny/config.json".as_ref())?)?;
//! let ids = tokenizer.encode("Question: chest pain", true)?;
//! let text = tokenizer.decode(&ids, true)?;
//! # Ok::<(), mmx::Error>(())
//! ```

use std::path::{Path, PathBuf};

use super::model::ModelConfig;
use crate::error::{Error, Result};

/// A loaded tokenizer and the file it came from.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// Reads `path`: a `tokenizer.json`, or a model directory that holds one.
    pub fn load(path: &Path) -> Result<Self> {
        let path = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::Tokenizer {
            message: format!("not a valid `tokenizer.json`: {e}"),
            path: path.clone(),
        })?;
        Ok(Tokenizer { inner, path })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One more than the largest token id, added tokens included: the rows an embedding needs.
    pub fn vocab_size(&self) -> usize {
        self.inner
            .get_vocab(true)
            .values()
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0)
    }

    /// Refuses a tokenizer that can produce ids the model has no embedding for. A smaller
    /// tokenizer is fine (models often pad `vocab_size` to a round number).
    pub fn check_vocab(&self, config: &ModelConfig) -> Result<()> {
        let size = self.vocab_size();
        if size > config.vocab_size {
            return Err(Error::Tokenizer {
                path: self.path.clone(),
                message: format!(
                    "the tokenizer has {size} token ids but the model's `vocab_size` is {}",
                    config.vocab_size
                ),
            });
        }
        Ok(())
    }

    /// The ids of `text`, with the tokenizer's special tokens (BOS, ...) when asked.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot encode text: {e}"),
            })
    }

    /// The text of `ids`, leaving special tokens out when asked.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot decode ids: {e}"),
            })
    }

    /// The id of a token (`<|endoftext|>`), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer over `words` (ids in order), `<unk>` first.
    fn word_level(words: &[&str]) -> String {
        let vocab: serde_json::Map<String, serde_json::Value> = std::iter::once("<unk>")
            .chain(words.iter().copied())
            .enumerate()
            .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
            .collect();
        serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        })
        .to_string()
    }

    fn config(vocab: usize) -> ModelConfig {
        let json = format!(
            r#"{{"model_type":"llama","vocab_size":{vocab},"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2}}"#
        );
        ModelConfig::from_json(Path::new("config.json"), json.as_bytes()).unwrap()
    }

    #[test]
    fn encodes_decodes_and_checks_the_vocabulary() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer.json"),
            word_level(&["chest", "pain", "rest"]),
        )
        .unwrap();
        let t = Tokenizer::load(dir.path()).unwrap();
        assert_eq!(t.vocab_size(), 4);
        assert_eq!(t.encode("chest pain at rest", false).unwrap(), [1, 2, 0, 3]);
        assert_eq!(t.decode(&[2, 3], false).unwrap(), "pain rest");
        assert_eq!(t.token_to_id("rest"), Some(3));
        t.check_vocab(&config(4)).unwrap();
        t.check_vocab(&config(64)).unwrap();
        let err = t.check_vocab(&config(3)).unwrap_err().to_string();
        assert!(
            err.contains("4 token ids") && err.contains("`vocab_size` is 3"),
            "{err}"
        );
    }

    #[test]
    fn a_broken_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{").unwrap();
        let err = Tokenizer::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("not a valid"),
            "{err}"
        );
    }
}
