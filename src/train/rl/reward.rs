//! Rewards of a rollout: pure functions of the case, the guideline it was drawn under and the
//! completion's text. The built-ins are accuracy (the letter `mmx eval` reads, against the
//! case's answer), format (the guideline's format check) and adherence (the share of the
//! guideline's checks passed, [`crate::train::guideline::check`]); a library user adds others
//! by implementing [`Reward`] (see `examples/custom_reward.rs`).

use crate::train::guideline::check::adherence;
use crate::train::guideline::config::Guideline;
use crate::train::{parse_answer, Case};

/// One completion as the rewards see it.
#[derive(Debug, Clone, Copy)]
pub struct Completion<'a> {
    /// The case it answers.
    pub case: &'a Case,
    /// The guideline its prompt asked for.
    pub guideline: &'a Guideline,
    /// The generated text, decoded.
    pub text: &'a str,
    /// Whether it stopped at the length limit rather than at its end-of-sequence token.
    pub truncated: bool,
}

/// A reward function. Its name keys its weight in the recipe and its metrics
/// (`rewards/<name>/mean`).
pub trait Reward: Send + Sync {
    /// The name (one word).
    fn name(&self) -> &str;
    /// The reward of one completion.
    fn score(&self, completion: &Completion<'_>) -> f64;
}

/// A reward and its weight in the summed reward.
pub struct WeightedReward {
    /// The reward.
    pub reward: Box<dyn Reward>,
    /// Its weight.
    pub weight: f64,
}

/// 1 when the letter read after the last `Answer:` is the case's answer, else 0.
pub fn accuracy(case: &Case, text: &str) -> f64 {
    f64::from(u8::from(parse_answer(text) == Some(case.answer_letter())))
}

/// The built-in accuracy reward.
#[derive(Debug, Clone, Copy, Default)]
pub struct Accuracy;

impl Reward for Accuracy {
    fn name(&self) -> &str {
        "accuracy"
    }
    fn score(&self, c: &Completion<'_>) -> f64 {
        accuracy(c.case, c.text)
    }
}

/// 1 when the completion passes its guideline's format check, else 0.
#[derive(Debug, Clone, Copy, Default)]
pub struct Format;

impl Reward for Format {
    fn name(&self) -> &str {
        "format"
    }
    fn score(&self, c: &Completion<'_>) -> f64 {
        f64::from(u8::from(c.guideline.format_ok(c.text)))
    }
}

/// The share of its guideline's adherence checks the completion passes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Adherence;

impl Reward for Adherence {
    fn name(&self) -> &str {
        "adherence"
    }
    fn score(&self, c: &Completion<'_>) -> f64 {
        adherence(c.guideline.adherence, c.case, c.text)
    }
}

/// The built-in rewards by name.
pub fn builtin(name: &str) -> Option<Box<dyn Reward>> {
    match name {
        "accuracy" => Some(Box::new(Accuracy)),
        "format" => Some(Box::new(Format)),
        "adherence" => Some(Box::new(Adherence)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::guideline::config::Guidelines;
    use crate::train::synth::{generate, SynthSpec};

    #[test]
    fn the_builtins_score_a_case_s_own_reasoning_fully_and_a_wrong_answer_not() {
        let guidelines = Guidelines::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/guidelines.toml"),
        )
        .unwrap();
        let spec = SynthSpec {
            guidelines: true,
            ..SynthSpec::new(3, 16, 0, 0)
        };
        for case in generate(&spec).unwrap().train {
            let g = guidelines
                .guidelines
                .iter()
                .find(|g| Some(g.name.as_str()) == case.guideline())
                .unwrap();
            let right = case.completion();
            let c = Completion {
                case: &case,
                guideline: g,
                text: &right,
                truncated: false,
            };
            for reward in ["accuracy", "format", "adherence"] {
                let score = builtin(reward).unwrap().score(&c);
                assert_eq!(score, 1.0, "{reward} of `{}`:\n{right}", case.id());
            }
            let wrong_letter = if case.answer_letter() == 'A' {
                "B"
            } else {
                "A"
            };
            let wrong = format!("{}{wrong_letter}", &right[..right.len() - 1]);
            assert_eq!(accuracy(&case, &wrong), 0.0);
            let empty = Completion { text: "", ..c };
            assert_eq!(Format.score(&empty), 0.0);
            assert!(Adherence.score(&empty) < 0.5);
        }
        assert!(builtin("length").is_none());
    }
}
