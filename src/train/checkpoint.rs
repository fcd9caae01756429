//! Training checkpoints: `checkpoints/step-NNNNNN/` holds the adapter (PEFT files; the whole
//! model for a `base` run), the
//! optimizer's moments (`optimizer.safetensors`) and `trainer_state.json` (step, seed, the
//! recipe's digest). Written into a temporary directory and renamed into place, so a killed
//! run leaves whole checkpoints only; resume takes the latest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::model::candle;
use super::optim::AdamW;
use crate::error::{Error, Result};
use crate::tensor::{replace_dir_atomically, write_atomic};

/// What a checkpoint records besides the adapter and the moments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// All optimizer steps of the run.
    pub total_steps: usize,
    /// The recipe's seed (the data order derives from it and the step).
    pub seed: u64,
    /// blake3 of the recipe's text: a checkpoint resumes only the recipe that made it.
    pub recipe_digest: String,
    /// The loss of its last step.
    pub loss: f64,
}

const STATE: &str = "trainer_state.json";
const OPTIMIZER: &str = "optimizer.safetensors";

/// Saves a checkpoint under `dir` (`checkpoints/`), the trained weights written by
/// `write_weights` into the directory it is given (the adapter, or the whole model).
pub fn save_checkpoint(
    dir: &Path,
    write_weights: &dyn Fn(&Path) -> Result<()>,
    optimizer: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let target = dir.join(format!("step-{:06}", state.step));
    replace_dir_atomically(&target, |tmp| {
        write_weights(tmp)?;
        let moments: std::collections::HashMap<String, candle_core::Tensor> =
            optimizer.state().into_iter().collect();
        let path = tmp.join(OPTIMIZER);
        candle_core::safetensors::save(&moments, &path)
            .map_err(candle(path.display().to_string()))?;
        let json = serde_json::to_vec_pretty(state).expect("state serialises");
        write_atomic(&tmp.join(STATE), &json)
    })?;
    Ok(target)
}

/// The checkpoint with the highest step under `dir`, if any.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    if !dir.exists() {
        return Ok(None);
    }
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if entry.path().join(STATE).is_file() && best.as_ref().is_none_or(|(b, _)| step > *b) {
            best = Some((step, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Reads a checkpoint's state and the optimizer's moments (the adapter is loaded by
/// [`CausalLm::load_adapter`]).
pub fn load_checkpoint(
    dir: &Path,
    device: &Device,
) -> Result<(TrainerState, BTreeMap<String, candle_core::Tensor>)> {
    let path = dir.join(STATE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let state: TrainerState = serde_json::from_slice(&bytes).map_err(|e| Error::Output {
        path: path.clone(),
        message: format!("not a trainer state: {e}"),
    })?;
    let path = dir.join(OPTIMIZER);
    let moments = candle_core::safetensors::load(&path, device)
        .map_err(candle(path.display().to_string()))?
        .into_iter()
        .collect();
    Ok((state, moments))
}
