//! Calibration statistics of an expert (`mmx calibrate`): the Gram of every projection's
//! inputs over the expert's own cases, as the data-aware merge methods read them (see
//! `merge::calibration` for the file format).
//!
//! Each case is run as the trainer sees it, `<bos> prompt completion <eos>`, one case at a
//! time (no padding enters a Gram), with the model's adapter applied; every token counts.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::Tensor;

use super::case::Case;
use super::model::{candle, CausalLm, InputGram, Projection};
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// One module's input Gram: `Σ x·xᵀ` over the tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleGram {
    /// `side × side` values, row-major.
    pub values: Vec<f32>,
    /// The module's input features.
    pub side: usize,
    /// The tokens summed.
    pub tokens: u64,
}

/// What a calibration measured.
#[derive(Debug, Clone)]
pub struct Calibrated {
    /// Per module (`model.layers.0.mlp.down_proj`), its input Gram.
    pub grams: BTreeMap<String, ModuleGram>,
    /// Cases run.
    pub cases: usize,
    /// Tokens run (each module's Gram sums over all of them).
    pub tokens: u64,
}

/// Runs `cases` through `model` and sums every projection's input Gram; `progress` is called
/// with each case's token count. The taps are removed again, whatever happens.
pub fn calibrate(
    model: &mut CausalLm,
    tokenizer: &Tokenizer,
    cases: &[Case],
    progress: &dyn Fn(u64),
) -> Result<Calibrated> {
    if let Some(case) = cases.iter().find(|c| c.has_image()) {
        return Err(Error::ModelInput {
            message: format!(
                "case `{}` shows an image: calibration of vision-language models is not supported yet (give text cases)",
                case.id()
            ),
        });
    }
    let config = model.config();
    let bos = config.bos_token_id;
    let eos = *config.eos_token_ids.first().ok_or_else(|| Error::Model {
        path: model.dir().join("config.json"),
        message: "no `eos_token_id`: every calibration sequence ends with it, as in training"
            .into(),
    })?;
    let mut taps = Vec::new();
    for (layer, block) in model.layers_mut().iter_mut().enumerate() {
        for p in Projection::ALL {
            let tap = Arc::new(InputGram::default());
            block.projection_mut(p).set_input_gram(Some(tap.clone()));
            taps.push((p.path(layer), tap));
        }
    }
    let run = run_cases(model, tokenizer, cases, bos, eos, progress);
    for block in model.layers_mut() {
        for p in Projection::ALL {
            block.projection_mut(p).set_input_gram(None);
        }
    }
    let tokens = run?;
    let mut grams = BTreeMap::new();
    for (module, tap) in taps {
        let taken = tap
            .take()
            .map_err(candle(format!("the Gram of `{module}`")))?;
        if let Some((values, side, tokens)) = taken {
            grams.insert(
                module,
                ModuleGram {
                    values,
                    side,
                    tokens,
                },
            );
        }
    }
    Ok(Calibrated {
        grams,
        cases: cases.len(),
        tokens,
    })
}

fn run_cases(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    cases: &[Case],
    bos: Option<u32>,
    eos: u32,
    progress: &dyn Fn(u64),
) -> Result<u64> {
    let mut tokens = 0u64;
    for case in cases {
        let mut ids: Vec<u32> = bos.into_iter().collect();
        ids.extend(tokenizer.encode(&case.prompt(), false)?);
        ids.extend(tokenizer.encode(&case.completion(), false)?);
        ids.push(eos);
        let n = ids.len();
        let input = Tensor::from_vec(ids, (1, n), model.device())
            .map_err(candle(format!("case `{}`", case.id())))?;
        model.forward(&input, None, None)?;
        tokens += n as u64;
        progress(n as u64);
    }
    Ok(tokens)
}
