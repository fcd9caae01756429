//! Every parser of untrusted input, fed arbitrary bytes: the entry points of the cargo-fuzz
//! targets in `fuzz/` and of `tests/fuzz_corpus.rs`, which replays their corpus on stable. A
//! parser may refuse its input; it must never panic, hang or allocate without bound.

use std::path::Path;

use crate::adapter::LoraConfig;
use crate::recipe::{Recipe, RecipeFormat};
use crate::registry::manifest::Manifest;
use crate::sweep::file::Sweep;
use crate::tensor::parse_header;
use crate::train::case::parse_cases;

/// A parser under fuzzing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A safetensors header: 8 bytes of claimed file length, then the file's first bytes.
    SafetensorsHeader,
    /// `adapter_config.json`, with its rank and alpha patterns applied to module names.
    AdapterConfig,
    /// A native TOML recipe.
    RecipeToml,
    /// A mergekit YAML recipe.
    RecipeYaml,
    /// A sweep file.
    Sweep,
    /// A registry manifest.
    Manifest,
    /// A case file (JSON lines).
    Cases,
}

/// Every target with its name (the folder of its corpus, the cargo-fuzz target's name).
pub const TARGETS: [(&str, Target); 7] = [
    ("safetensors_header", Target::SafetensorsHeader),
    ("adapter_config", Target::AdapterConfig),
    ("recipe_toml", Target::RecipeToml),
    ("recipe_yaml", Target::RecipeYaml),
    ("sweep", Target::Sweep),
    ("manifest", Target::Manifest),
    ("cases", Target::Cases),
];

/// Module names the adapter config's patterns are tried on.
const MODULES: [&str; 3] = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.11.mlp.down_proj",
    "lm_head",
];

/// Feeds `bytes` to `target`'s parser; whatever it answers is dropped.
pub fn feed(target: Target, bytes: &[u8]) {
    // Paths that name no real file: errors name them, nothing is read beside them.
    let path = Path::new("/nonexistent/fuzz/input");
    let text = || String::from_utf8_lossy(bytes).into_owned();
    match target {
        Target::SafetensorsHeader => {
            if bytes.len() >= 8 {
                let claimed = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
                let _ = parse_header(&bytes[8..], claimed);
            }
        }
        Target::AdapterConfig => {
            if let Ok(serde_json::Value::Object(raw)) = serde_json::from_slice(bytes) {
                if let Ok(config) = LoraConfig::from_map(path, raw) {
                    for module in MODULES {
                        let rank = config.rank_for(module);
                        let _ = config.scaling_for(module, rank.max(1));
                    }
                }
            }
        }
        Target::RecipeToml => {
            let _ = Recipe::parse(&path.with_extension("toml"), RecipeFormat::Native, text());
        }
        Target::RecipeYaml => {
            let _ = Recipe::parse(&path.with_extension("yml"), RecipeFormat::Mergekit, text());
        }
        Target::Sweep => {
            let _ = Sweep::parse(&path.with_extension("toml"), &text());
        }
        Target::Manifest => {
            let _ = Manifest::decode(bytes);
        }
        Target::Cases => {
            let _ = parse_cases(&path.with_extension("jsonl"), bytes);
        }
    }
}
