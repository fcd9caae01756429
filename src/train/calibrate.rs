//! Calibration statistics of an expert (`mmx calibrate`): per projection, the Gram of its
//! inputs over the expert's own cases and, if asked, the diagonal Fisher of its weight, as the
//! data-aware merge methods read them (see `merge::calibration` for the file format).
//!
//! Each case runs as training sees it: `<bos> prompt completion <eos>`, a vision-language
//! model's image rows in place of its image tokens, the model reading every token but the
//! last; one case at a time, so that no padding enters a Gram; with the model's adapter
//! applied. The Gram sums over every token read. The Fisher is the mean over cases of the
//! squared gradient of the case's completion log-likelihood with respect to the weight (the
//! empirical Fisher of Fisher merging, one sample per case).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use super::batch::{summed_nll, Batch};
use super::case::Case;
use super::images::{refuse_images_without_tower, Images};
use super::model::{candle, CausalLm, InputGram, Projection};
use super::sft::{batch_logits, example_of};
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

/// One module's diagonal Fisher: the mean squared gradient of each weight coordinate.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleFisher {
    /// `out × in` values, row-major, in the weight's layout.
    pub values: Vec<f32>,
    /// The weight's `[out, in]`.
    pub shape: [usize; 2],
}

/// What a calibration measured.
#[derive(Debug, Clone)]
pub struct Calibrated {
    /// Per module, named as in the base checkpoint without `.weight`
    /// (`model.layers.0.mlp.down_proj`), its input Gram.
    pub grams: BTreeMap<String, ModuleGram>,
    /// Per module, its diagonal Fisher (empty unless asked for).
    pub fishers: BTreeMap<String, ModuleFisher>,
    /// Cases run.
    pub cases: usize,
    /// Tokens read (each module's Gram sums over all of them).
    pub tokens: u64,
}

/// Runs `cases` through `model` (with `images`, its image side, for a vision-language model)
/// and sums every projection's input Gram, and with `fisher` its weight's squared gradients;
/// `progress` is called with each case's token count. The model is left as it was, whatever
/// happens.
pub fn calibrate(
    model: &mut CausalLm,
    images: Option<&Images>,
    tokenizer: &Tokenizer,
    cases: &[Case],
    fisher: bool,
    progress: &dyn Fn(u64),
) -> Result<Calibrated> {
    if images.is_none() {
        refuse_images_without_tower(&cases.iter().collect::<Vec<_>>(), model.dir())?;
    }
    let eos = *model
        .config()
        .eos_token_ids
        .first()
        .ok_or_else(|| Error::Model {
            path: model.dir().join("config.json"),
            message: "no `eos_token_id`: every calibration sequence ends with it, as in training"
                .into(),
        })?;
    let mut taps = Vec::new();
    let mut weights = Vec::new();
    let run = attach(model, fisher, &mut taps, &mut weights).and_then(|()| {
        let vars: Vec<&Var> = weights.iter().map(|(_, _, v)| v).collect();
        run_cases(model, images, tokenizer, cases, eos, &vars, progress)
    });
    for block in model.layers_mut() {
        for p in Projection::ALL {
            let projection = block.projection_mut(p);
            projection.set_input_gram(None);
            projection.freeze_weight();
        }
    }
    let (tokens, squared) = run?;
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
    let mut fishers = BTreeMap::new();
    for ((module, (out, inp), _), sum) in weights.into_iter().zip(squared) {
        let values = match sum {
            Some(sum) => (sum / cases.len() as f64)
                .and_then(|mean| mean.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
                .map_err(candle(format!("the Fisher of `{module}`")))?,
            None => vec![0.0; out * inp],
        };
        fishers.insert(
            module,
            ModuleFisher {
                values,
                shape: [out, inp],
            },
        );
    }
    Ok(Calibrated {
        grams,
        fishers,
        cases: cases.len(),
        tokens,
    })
}

/// Puts a Gram tap on every projection (into `taps`, by module) and, with `fisher`, makes
/// its weight a variable (into `weights`, with its shape).
fn attach(
    model: &mut CausalLm,
    fisher: bool,
    taps: &mut Vec<(String, Arc<InputGram>)>,
    weights: &mut Vec<(String, (usize, usize), Var)>,
) -> Result<()> {
    for layer in 0..model.layers().len() {
        for p in Projection::ALL {
            let module = model.checkpoint_module(layer, p);
            let projection = model.layers_mut()[layer].projection_mut(p);
            let tap = Arc::new(InputGram::default());
            projection.set_input_gram(Some(tap.clone()));
            if fisher {
                let var = projection
                    .track_weight()
                    .map_err(candle(format!("the weight of `{module}`")))?;
                weights.push((module.clone(), projection.shape(), var));
            }
            taps.push((module, tap));
        }
    }
    Ok(())
}

/// Runs each case forward (and, given weight variables, backward): the tokens read and, per
/// variable, the sum over cases of its squared gradient.
fn run_cases(
    model: &CausalLm,
    images: Option<&Images>,
    tokenizer: &Tokenizer,
    cases: &[Case],
    eos: u32,
    weights: &[&Var],
    progress: &dyn Fn(u64),
) -> Result<(u64, Vec<Option<Tensor>>)> {
    let mut tokens = 0u64;
    let mut squared: Vec<Option<Tensor>> = vec![None; weights.len()];
    for case in cases {
        let in_case = |what: &str| candle(format!("case `{}`: {what}", case.id()));
        let example = example_of(tokenizer, model, images, case, &case.completion(), eos)?;
        let batch = Batch::new(&[&example], 0, model.device())?;
        let logits = batch_logits(model, images, &batch, &[&example], model.device())?;
        tokens += batch.tokens as u64;
        if !weights.is_empty() {
            let nll = summed_nll(&logits, &batch)?;
            let grads = nll.backward().map_err(in_case("backward"))?;
            for (slot, var) in squared.iter_mut().zip(weights) {
                let Some(g) = grads.get(var.as_tensor()) else {
                    continue;
                };
                let g2 = g.sqr().map_err(in_case("squared gradient"))?;
                *slot = Some(match slot.take() {
                    Some(sum) => (sum + g2).map_err(in_case("squared gradient"))?,
                    None => g2,
                });
            }
        }
        progress(batch.tokens as u64);
    }
    Ok((tokens, squared))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::train::case::read_cases;
    use crate::train::model::LoraLinear;
    use crate::train::source::Materialized;
    use candle_core::Device;

    /// The bundled base in f64, its tokenizer, and three text cases.
    fn bundled() -> (Materialized, CausalLm, Tokenizer, Vec<Case>) {
        let registry = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("registry");
        let base = Materialized::open("registry:tiny-med-base:v2", &registry).unwrap();
        let model = CausalLm::load(base.dir(), None, DType::F64, &Device::Cpu).unwrap();
        let tokenizer = Tokenizer::load(base.dir()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cases.jsonl");
        let lines = [
            r#"{"id": "a", "specialty": "cardiology", "question": "is the ST segment raised ?", "options": ["yes", "no"], "answer": "A", "reasoning": ["the ST segment is raised"]}"#,
            r#"{"id": "b", "specialty": "cardiology", "question": "is the rhythm regular ?", "options": ["yes", "no"], "answer": "B", "reasoning": ["the rhythm is not regular", "so no"]}"#,
            r#"{"id": "c", "specialty": "dermatology", "question": "is the lesion raised ?", "options": ["yes", "no", "unclear"], "answer": "C", "reasoning": ["it is unclear"]}"#,
        ];
        std::fs::write(&file, lines.join("\n")).unwrap();
        let cases = read_cases(&file).unwrap();
        (base, model, tokenizer, cases)
    }

    /// The summed completion NLL of `case` under `model`, in f64 throughout.
    fn case_loss(model: &CausalLm, tokenizer: &Tokenizer, case: &Case) -> f64 {
        let eos = model.config().eos_token_ids[0];
        let example = example_of(tokenizer, model, None, case, &case.completion(), eos).unwrap();
        let batch = Batch::new(&[&example], 0, model.device()).unwrap();
        let logits = batch_logits(model, None, &batch, &[&example], model.device()).unwrap();
        let logits: Vec<Vec<f64>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
        let n = example.tokens.len() - 1;
        (0..n)
            .filter(|&i| i + 1 >= example.prompt_len)
            .map(|i| {
                let row = &logits[i];
                let top = row.iter().copied().fold(f64::MIN, f64::max);
                let log_z = top + row.iter().map(|v| (v - top).exp()).sum::<f64>().ln();
                log_z - row[example.tokens[i + 1] as usize]
            })
            .sum()
    }

    /// Sets coordinate `(i, j)` of the weight of projection `p` of layer `layer` to `value`.
    fn set_weight(
        model: &mut CausalLm,
        layer: usize,
        p: Projection,
        (i, j): (usize, usize),
        value: f64,
    ) {
        let projection = model.layers_mut()[layer].projection_mut(p);
        let mut w: Vec<Vec<f64>> = projection.weight().to_vec2().unwrap();
        w[i][j] = value;
        let (out, inp) = projection.shape();
        let flat: Vec<f64> = w.into_iter().flatten().collect();
        let weight = Tensor::from_vec(flat, (out, inp), &Device::Cpu).unwrap();
        *projection = LoraLinear::new(weight, projection.bias().cloned());
    }

    #[test]
    fn the_fisher_is_each_cases_squared_gradient_averaged() {
        let (_base, mut model, tokenizer, cases) = bundled();
        let got = calibrate(&mut model, None, &tokenizer, &cases, true, &|_| {}).unwrap();
        // Central differences of every case's loss at a few coordinates: the largest Fisher
        // entry of two modules and one fixed coordinate.
        let last = model.layers().len() - 1;
        for (layer, p) in [(0, Projection::Q), (last, Projection::Down)] {
            let module = model.checkpoint_module(layer, p);
            let fisher = &got.fishers[&module];
            let [out, inp] = fisher.shape;
            assert_eq!(
                [out, inp],
                <[usize; 2]>::from(model.layers()[layer].projection(p).shape())
            );
            let top = (0..out * inp)
                .max_by(|&a, &b| fisher.values[a].total_cmp(&fisher.values[b]))
                .unwrap();
            for k in [top, (out * inp) / 3 + 1] {
                let (i, j) = (k / inp, k % inp);
                let w: Vec<Vec<f64>> = model.layers()[layer]
                    .projection(p)
                    .weight()
                    .to_vec2()
                    .unwrap();
                let (w0, h) = (w[i][j], 1e-4);
                let mut squares = 0.0;
                for case in &cases {
                    set_weight(&mut model, layer, p, (i, j), w0 + h);
                    let up = case_loss(&model, &tokenizer, case);
                    set_weight(&mut model, layer, p, (i, j), w0 - h);
                    let down = case_loss(&model, &tokenizer, case);
                    set_weight(&mut model, layer, p, (i, j), w0);
                    squares += ((up - down) / (2.0 * h)).powi(2);
                }
                let expected = squares / cases.len() as f64;
                let value = f64::from(fisher.values[k]);
                assert!(
                    (value - expected).abs() <= 1e-4 * expected.abs() + 1e-9,
                    "`{module}` ({i}, {j}): {value} against finite differences {expected}"
                );
            }
        }
        // The weights are frozen again: no gradient reaches them.
        assert!(!model.layers()[0]
            .projection(Projection::Q)
            .weight()
            .is_variable());
    }

    #[test]
    fn the_first_grams_are_of_the_normalised_embeddings_of_every_token_read() {
        let (base, mut model, tokenizer, cases) = bundled();
        let got = calibrate(&mut model, None, &tokenizer, &cases, false, &|_| {}).unwrap();
        assert!(got.fishers.is_empty());
        // By hand: layer 0's attention reads input_layernorm(embed(token)) for every token but
        // each case's last.
        let checkpoint = Checkpoint::open(base.dir()).unwrap();
        let embed = checkpoint.read_f32("model.embed_tokens.weight").unwrap();
        let norm = checkpoint
            .read_f32("model.layers.0.input_layernorm.weight")
            .unwrap();
        let (hidden, eps) = (model.config().hidden_size, model.config().rms_norm_eps);
        let eos = model.config().eos_token_ids[0];
        let mut gram = vec![0f64; hidden * hidden];
        let mut tokens = 0u64;
        for case in &cases {
            let example =
                example_of(&tokenizer, &model, None, case, &case.completion(), eos).unwrap();
            for &id in &example.tokens[..example.tokens.len() - 1] {
                let row = &embed[id as usize * hidden..(id as usize + 1) * hidden];
                let ms = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / hidden as f64;
                let x: Vec<f64> = row
                    .iter()
                    .zip(&norm)
                    .map(|(&v, &w)| f64::from(v) / (ms + eps).sqrt() * f64::from(w))
                    .collect();
                for a in 0..hidden {
                    for b in 0..hidden {
                        gram[a * hidden + b] += x[a] * x[b];
                    }
                }
                tokens += 1;
            }
        }
        assert_eq!(got.tokens, tokens);
        for p in [Projection::Q, Projection::K, Projection::V] {
            let module = model.checkpoint_module(0, p);
            assert_eq!(module, format!("model.layers.0.self_attn.{}", p.name()));
            let g = &got.grams[&module];
            assert_eq!((g.side, g.tokens), (hidden, tokens));
            for (k, (&v, &e)) in g.values.iter().zip(&gram).enumerate() {
                assert!(
                    (f64::from(v) - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "`{module}` [{k}]: {v} vs {e}"
                );
            }
        }
        // Every projection of every layer has its Gram, square in its input width.
        assert_eq!(
            got.grams.len(),
            model.layers().len() * Projection::ALL.len()
        );
    }
}
