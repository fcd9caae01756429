//! Task accuracy (`mmx eval`): each case's prompt is continued greedily, the answer letter is
//! read from the text (`parse_answer`), and accuracy is counted per specialty. A completion
//! with no readable answer counts as wrong. A vision-language model sees each case's image
//! (or, to measure what it reads from the image, a blank one in its place).

use std::collections::BTreeMap;

use serde::Serialize;

use super::batch::ImageRows;
use super::fused::{generate_sharded, Engine};
use super::images::{refuse_images_without_tower, Images};
use super::model::{CausalLm, GenerateOptions};
use super::parse_answer;
use super::tokenizer::Tokenizer;
use super::Case;
use crate::error::{Error, Result};

/// What a vision-language model is shown of each case's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// The image.
    Image,
    /// A blank image in its place ([`Images::blank_rows`]): what is left is read from the
    /// text alone.
    Blank,
}

/// Accuracy per specialty.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// Share of correct answers, per specialty.
    pub accuracy: BTreeMap<String, f64>,
    /// Cases, per specialty.
    pub n: BTreeMap<String, usize>,
    /// Every case's answer, in the order of the cases.
    pub samples: Vec<Sample>,
}

/// One case's generated answer (a line of `mmx eval --samples`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// The case's id.
    pub id: String,
    /// The case's specialty.
    pub specialty: String,
    /// The right letter.
    pub expected: char,
    /// The letter read from the output, if any.
    pub answer: Option<char>,
    /// Whether `answer` is `expected`.
    pub correct: bool,
    /// What the model was shown of the case's image: its file (or `image_embeds` file), or
    /// `blank`; absent for a case without an image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The generated text.
    pub output: String,
}

impl EvalReport {
    /// The mean of the specialties' accuracies.
    pub fn mean_accuracy(&self) -> f64 {
        if self.accuracy.is_empty() {
            return 0.0;
        }
        self.accuracy.values().sum::<f64>() / self.accuracy.len() as f64
    }
}

/// Answers every case greedily (`batch` prompts at a time, at most `max_new_tokens` each), a
/// vision-language model's (`images`: its image side and what it is shown) with each case's
/// image tokens first in its prompt.
pub fn evaluate(
    model: &CausalLm,
    images: Option<(&Images, Shown)>,
    tokenizer: &Tokenizer,
    cases: &[Case],
    batch: usize,
    max_new_tokens: usize,
) -> Result<EvalReport> {
    if images.is_none() {
        refuse_images_without_tower(&cases.iter().collect::<Vec<_>>(), model.dir())?;
    }
    let engine = match images {
        None => None,
        Some((images, _)) => {
            if let Some(reason) = Engine::unsupported_for_inference(model) {
                return Err(Error::ModelInput {
                    message: format!("image cases are evaluated by the fused engine: {reason}"),
                });
            }
            Some(Engine::new(model, &[])?.with_image_token(images.image_token()))
        }
    };
    let blank = match images {
        Some((images, Shown::Blank)) => Some(images.blank_rows(model.device())?),
        _ => None,
    };
    let options = GenerateOptions::greedy(model, max_new_tokens);
    let bos = model.config().bos_token_id;
    let mut correct: BTreeMap<String, usize> = BTreeMap::new();
    let mut n: BTreeMap<String, usize> = BTreeMap::new();
    let mut samples = Vec::with_capacity(cases.len());
    // Batches of `batch` cases, as many at once as there are cores, each on its own thread:
    // the same batches as one after the other, so the same answers.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let batch = batch.max(1);
    for chunk in cases.chunks(batch * threads) {
        let shown: Vec<Option<ImageRows>> = match images {
            None => vec![None; chunk.len()],
            // A blanked image is not read: the one blank image stands in for every one.
            Some((images, _)) => chunk
                .iter()
                .map(|c| match &blank {
                    Some(blank) => Ok(c.has_image().then(|| blank.clone())),
                    None => images.rows(c, model.device()),
                })
                .collect::<Result<_>>()?,
        };
        let prompts = chunk
            .iter()
            .zip(&shown)
            .map(|(c, image)| {
                let text = tokenizer.encode(&c.prompt(), false)?;
                Ok(match images {
                    Some((images, _)) => images.prompt_with_image(bos, &text, image.is_some()),
                    None => bos.into_iter().chain(text).collect(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = match &engine {
            Some(engine) => {
                engine.generate_with_images(&prompts, &shown, batch, |_| options.clone())?
            }
            None => generate_sharded(model, &prompts, batch, |_| options.clone())?,
        };
        for ((case, output), image) in chunk.iter().zip(&outputs).zip(&shown) {
            let text = tokenizer.decode(output, true)?;
            let answer = parse_answer(&text);
            let right = answer == Some(case.answer_letter());
            *n.entry(case.specialty().to_string()).or_default() += 1;
            *correct.entry(case.specialty().to_string()).or_default() += usize::from(right);
            samples.push(Sample {
                id: case.id().to_string(),
                specialty: case.specialty().to_string(),
                expected: case.answer_letter(),
                answer,
                correct: right,
                output: text,
                image: image.as_ref().map(|_| match blank {
                    Some(_) => "blank".to_string(),
                    None => case
                        .image_embeds()
                        .or(case.image())
                        .map_or_else(String::new, |p| p.display().to_string()),
                }),
            });
        }
    }
    let accuracy = n
        .iter()
        .map(|(s, &count)| (s.clone(), correct[s] as f64 / count as f64))
        .collect();
    Ok(EvalReport {
        accuracy,
        n,
        samples,
    })
}
