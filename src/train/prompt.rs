//! The text a model sees for a [`Case`] and the text it should write: [`Case::prompt`] (the
//! question, the lettered options and a cue to reason), [`Case::completion`] (one reasoning step
//! per line, then `Answer: X`), and [`parse_answer`], which reads the letter back out of what a
//! model generated.
//!
//! ```text
//! Question: A 64 year old man has chest pain at rest ... Choose the most likely diagnosis.
//! Options:
//! A. NSTEMI
//! B. STEMI
//! ...
//! Reasoning:
//! troponin 38 ng/L is above 14 ng/L
//! ...
//! so: STEMI
//! Answer: B
//! ```

use std::collections::BTreeMap;
use std::fmt::Write;

use super::case::{option_letter, Case};
use super::guideline::check::known_findings;
use super::guideline::{render, Facts, Style};

/// What introduces the final letter in a completion.
const ANSWER_CUE: &str = "Answer:";
/// What introduces the guideline rule a reasoning applies.
const RULE_CUE: &str = "rule:";
/// What introduces the diagnosis a reasoning concludes.
const CONCLUSION_CUE: &str = "so:";

/// The rule steps seen to lead to each option in a corpus, by specialty and option text: a
/// case's last `rule:` step and its answer. The base corpus draws from it (see
/// [`Case::format_completion`]).
#[derive(Debug, Clone, Default)]
pub struct RuleBook {
    rules: BTreeMap<(String, String), Vec<String>>,
}

impl RuleBook {
    /// The rule steps of `cases`, each kept once, in the order first seen.
    pub fn from_cases<'a>(cases: impl IntoIterator<Item = &'a Case>) -> RuleBook {
        let mut book = RuleBook::default();
        for case in cases {
            let Some(rule) = case
                .reasoning()
                .iter()
                .rev()
                .find(|s| s.starts_with(RULE_CUE))
            else {
                continue;
            };
            let key = (case.specialty().to_string(), case.answer_text().to_string());
            let known = book.rules.entry(key).or_default();
            if !known.contains(rule) {
                known.push(rule.clone());
            }
        }
        book
    }

    /// The rule steps that led to `option` in `specialty`.
    pub fn rules(&self, specialty: &str, option: &str) -> &[String] {
        self.rules
            .get(&(specialty.to_string(), option.to_string()))
            .map_or(&[], Vec::as_slice)
    }
}

impl Case {
    /// The prompt: `Question: ...`, `Options:` with one `X. text` line each, the case's
    /// guideline line (`Guideline: <name>`) if it has one, and `Reasoning:`, every line ending
    /// in a newline.
    pub fn prompt(&self) -> String {
        let line = self
            .guideline()
            .map(|g| format!("{} {g}", crate::train::guideline::PROMPT_CUE));
        self.prompt_under(line.as_deref())
    }

    /// The prompt with `line` (a guideline's prompt line) before `Reasoning:`, or none.
    pub fn prompt_under(&self, line: Option<&str>) -> String {
        let mut text = format!("Question: {}\nOptions:\n", self.question());
        for (index, option) in self.options().iter().enumerate() {
            // A validated case has at most as many options as there are letters.
            if let Some(letter) = option_letter(index) {
                let _ = writeln!(text, "{letter}. {option}");
            }
        }
        if let Some(line) = line {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("Reasoning:\n");
        text
    }

    /// The base corpus's completion: the steps that restate findings, then a rule step, `so:
    /// <option>` and `Answer: X` for an option drawn from `seed` and the case's id, the rule
    /// one that `rules` saw lead to that option (none when it knows none). It teaches the
    /// cases' language, the whole format (a rule step included, so that an expert trained
    /// from the base changes which rule it picks, not the shape of its answer) and the lookup
    /// of an option's letter, not which rule applies: a model trained on it answers at chance.
    ///
    /// A case written under a guideline gets the same under its guideline: its findings and a
    /// drawn option (with a second drawn option as the runner-up, a drawn finding excluding
    /// it) in the guideline's shape.
    pub fn format_completion(&self, seed: u64, rules: &RuleBook) -> String {
        if let Some(style) = self.guideline().and_then(Style::from_name) {
            return self.styled_format_completion(style, seed, rules);
        }
        let mut text = String::new();
        for step in self.reasoning() {
            if !(step.starts_with(RULE_CUE) || step.starts_with(CONCLUSION_CUE)) {
                text.push_str(step);
                text.push('\n');
            }
        }
        let id = blake3::hash(self.id().as_bytes());
        let key = u64::from_le_bytes(id.as_bytes()[..8].try_into().expect("8 bytes"));
        let mut rng = crate::rng::SplitMix::derive(seed, &[key]);
        let pick = rng.below(self.options().len() as u64) as usize;
        let option = &self.options()[pick];
        let known = rules.rules(self.specialty(), option);
        if !known.is_empty() {
            text.push_str(&known[rng.below(known.len() as u64) as usize]);
            text.push('\n');
        }
        let letter = option_letter(pick).unwrap_or('A');
        let _ = write!(text, "{CONCLUSION_CUE} {option}\n{ANSWER_CUE} {letter}");
        text
    }

    fn styled_format_completion(&self, style: Style, seed: u64, rules: &RuleBook) -> String {
        let findings = known_findings(self).unwrap_or_default();
        let id = blake3::hash(self.id().as_bytes());
        let key = u64::from_le_bytes(id.as_bytes()[..8].try_into().expect("8 bytes"));
        let mut rng = crate::rng::SplitMix::derive(seed, &[key]);
        let n = self.options().len() as u64;
        let pick = rng.below(n) as usize;
        let other = (pick + 1 + rng.below(n - 1) as usize) % n as usize;
        let known = rules.rules(self.specialty(), &self.options()[pick]);
        let rule = if known.is_empty() {
            String::new()
        } else {
            known[rng.below(known.len() as u64) as usize]
                .trim_start_matches(RULE_CUE)
                .trim_start()
                .to_string()
        };
        let (first, second) = (pick.min(other), pick.max(other));
        let facts = Facts {
            exclusion: rng.below(findings.len().max(1) as u64) as usize,
            findings: if findings.is_empty() {
                vec![String::new()]
            } else {
                findings
            },
            rule,
            diagnosis: self.options()[pick].clone(),
            runner_up: self.options()[other].clone(),
            diagnosis_more_common: rng.one_in(2),
            candidates: [
                self.options()[first].clone(),
                self.options()[second].clone(),
            ],
        };
        let mut text = String::new();
        for step in render(style, &facts) {
            if step.trim().is_empty() || step == RULE_CUE.to_string() + " " {
                continue;
            }
            text.push_str(&step);
            text.push('\n');
        }
        let letter = option_letter(pick).unwrap_or('A');
        let _ = write!(text, "{ANSWER_CUE} {letter}");
        text
    }

    /// The completion: the reasoning steps, one per line, then `Answer: X` (no final newline).
    pub fn completion(&self) -> String {
        let mut text = String::new();
        for step in self.reasoning() {
            text.push_str(step);
            text.push('\n');
        }
        let _ = write!(text, "{ANSWER_CUE} {}", self.answer_letter());
        text
    }
}

/// The letter after the last `Answer:` in a model's output: `A` to `H`, after optional spaces
/// and an optional `(`, and not followed by a letter or digit (`Answer: Because` is no answer).
/// Spaces before the colon are allowed: a word-level tokenizer decodes `Answer:` as `Answer :`.
pub fn parse_answer(generated: &str) -> Option<char> {
    let word = ANSWER_CUE.trim_end_matches(':');
    let start = generated.rfind(word)? + word.len();
    let rest = generated[start..].trim_start_matches([' ', '\t']);
    let rest = rest.strip_prefix(':')?;
    let rest = rest.trim_start_matches([' ', '\t']);
    let rest = rest.strip_prefix('(').unwrap_or(rest);
    let mut chars = rest.chars();
    let letter = chars.next().filter(|c| ('A'..='H').contains(c))?;
    match chars.next() {
        Some(next) if next.is_alphanumeric() => None,
        _ => Some(letter),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::case::CaseLine;

    fn case() -> Case {
        Case::from_line(CaseLine {
            id: "c1".into(),
            specialty: "cardiology".into(),
            question: "Chest pain at rest.".into(),
            options: vec!["NSTEMI".into(), "STEMI".into(), "stable angina".into()],
            answer: "B".into(),
            reasoning: vec!["ST elevation in V1 to V4".into(), "so: STEMI".into()],
            image: None,
            image_embeds: None,
            synthetic: true,
            guideline: None,
        })
        .unwrap()
    }

    #[test]
    fn prompt_lists_the_lettered_options_and_ends_with_the_cue() {
        assert_eq!(
            case().prompt(),
            "Question: Chest pain at rest.\nOptions:\nA. NSTEMI\nB. STEMI\nC. stable angina\nReasoning:\n"
        );
    }

    #[test]
    fn completion_is_the_steps_then_the_letter() {
        let completion = case().completion();
        assert_eq!(completion, "ST elevation in V1 to V4\nso: STEMI\nAnswer: B");
        assert_eq!(parse_answer(&completion), Some('B'));
        let whole = format!("{}{}", case().prompt(), completion);
        assert_eq!(parse_answer(&whole), Some('B'));
    }

    #[test]
    fn the_format_completion_keeps_findings_and_draws_the_answer() {
        let none = RuleBook::default();
        let text = case().format_completion(3, &none);
        assert!(text.starts_with("ST elevation in V1 to V4\nso: "), "{text}");
        // The drawn option and its letter agree.
        let letter = parse_answer(&text).unwrap();
        let drawn = case();
        let option = &drawn.options()[(letter as u8 - b'A') as usize];
        assert!(text.contains(&format!("so: {option}\n")), "{text}");
        assert_eq!(text, case().format_completion(3, &none));
        // Over many seeds every option is drawn.
        let letters: std::collections::BTreeSet<char> = (0..64)
            .filter_map(|s| parse_answer(&case().format_completion(s, &none)))
            .collect();
        assert_eq!(letters.into_iter().collect::<String>(), "ABC");
    }

    #[test]
    fn a_guideline_case_s_format_completion_has_its_shape_and_a_drawn_answer() {
        use crate::train::guideline::config::Guidelines;
        use crate::train::synth::{generate, SynthSpec};
        let guidelines = Guidelines::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/guidelines.toml"),
        )
        .unwrap();
        let cases = generate(&SynthSpec {
            guidelines: true,
            ..SynthSpec::new(2, 64, 0, 0)
        })
        .unwrap()
        .train;
        let book = RuleBook::from_cases(&cases);
        let mut right = 0;
        for case in &cases {
            let text = case.format_completion(4, &book);
            let g = guidelines
                .guidelines
                .iter()
                .find(|g| Some(g.name.as_str()) == case.guideline())
                .unwrap();
            assert!(g.format_ok(&text), "`{}`:\n{text}", case.id());
            right += usize::from(parse_answer(&text) == Some(case.answer_letter()));
        }
        // The drawn answer is right about one time in four.
        let share = right as f64 / cases.len() as f64;
        assert!((0.15..0.35).contains(&share), "{share}");
    }

    #[test]
    fn the_format_completion_states_a_rule_of_the_drawn_option() {
        let with_rule = |id: &str, answer: &str, rule: &str| {
            Case::from_line(CaseLine {
                id: id.into(),
                specialty: "cardiology".into(),
                question: "Chest pain at rest.".into(),
                options: vec!["NSTEMI".into(), "STEMI".into(), "stable angina".into()],
                answer: answer.into(),
                reasoning: vec![
                    "troponin 20 ng/L".into(),
                    format!("rule: {rule}"),
                    "so: x".into(),
                ],
                image: None,
                image_embeds: None,
                synthetic: true,
                guideline: None,
            })
            .unwrap()
        };
        let corpus = [
            with_rule("a", "A", "high troponin means NSTEMI"),
            with_rule("b", "B", "ST elevation means STEMI"),
            with_rule("c", "B", "ST elevation means STEMI"),
        ];
        let book = RuleBook::from_cases(&corpus);
        assert_eq!(
            book.rules("cardiology", "STEMI"),
            ["rule: ST elevation means STEMI"]
        );
        assert!(book.rules("cardiology", "stable angina").is_empty());
        assert!(book.rules("radiology", "STEMI").is_empty());
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let text = corpus[0].format_completion(seed, &book);
            let lines: Vec<&str> = text.lines().collect();
            // Findings, then a rule of the drawn option (if one is known), whatever the case's
            // own rule, then the drawn option and its letter.
            assert_eq!(lines[0], "troponin 20 ng/L", "{text}");
            let expected: &[&str] = match parse_answer(&text) {
                Some('A') => &["rule: high troponin means NSTEMI", "so: NSTEMI"],
                Some('B') => &["rule: ST elevation means STEMI", "so: STEMI"],
                Some('C') => &["so: stable angina"],
                other => panic!("{other:?}: {text}"),
            };
            assert_eq!(&lines[1..lines.len() - 1], expected, "{text}");
            seen.insert(lines.len());
        }
        assert_eq!(seen.len(), 2, "both rule and no-rule options drawn");
    }

    #[test]
    fn parse_answer_reads_the_last_cue() {
        assert_eq!(parse_answer("Answer: A\nwait\nAnswer: C"), Some('C'));
        assert_eq!(parse_answer("Answer:D"), Some('D'));
        assert_eq!(parse_answer("Answer : D"), Some('D'));
        assert_eq!(parse_answer("Answer D"), None);
        assert_eq!(parse_answer("Answer: (H)."), Some('H'));
        assert_eq!(parse_answer("Answer: B\n"), Some('B'));
        assert_eq!(parse_answer("Answer: Because"), None);
        assert_eq!(parse_answer("Answer: Z"), None);
        assert_eq!(parse_answer("Answer: b"), None);
        assert_eq!(parse_answer("Answer:"), None);
        assert_eq!(parse_answer("Answer:\nB"), None);
        assert_eq!(parse_answer("the answer is B"), None);
        assert_eq!(parse_answer(""), None);
    }
}
