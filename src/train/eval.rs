//! Task accuracy (`mmx eval`): each case's prompt is continued greedily, the answer letter is
//! read from the text (`parse_answer`), and accuracy is counted per specialty. A completion
//! with no readable answer counts as wrong.

use std::collections::BTreeMap;

use serde::Serialize;

use super::fused::generate_sharded;
use super::model::{CausalLm, GenerateOptions};
use super::parse_answer;
use super::tokenizer::Tokenizer;
use super::Case;
use crate::error::Result;

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

/// Answers every case greedily (`batch` prompts at a time, at most `max_new_tokens` each).
pub fn evaluate(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    cases: &[Case],
    batch: usize,
    max_new_tokens: usize,
) -> Result<EvalReport> {
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
        let prompts = chunk
            .iter()
            .map(|c| {
                let mut ids: Vec<u32> = bos.into_iter().collect();
                ids.extend(tokenizer.encode(&c.prompt(), false)?);
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = generate_sharded(model, &prompts, batch, |_| options.clone())?;
        for (case, output) in chunk.iter().zip(&outputs) {
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
