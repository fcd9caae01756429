//! Clinical reasoning guidelines (DESIGN.md §7, GBA): four ways of reaching a diagnosis, each
//! written as reasoning steps a program can check.
//!
//! - **differential**: list at least two candidate diagnoses, then exclude each one but the
//!   conclusion with a finding (`differential: X or Y`, `exclude Y: <finding>`);
//! - **analytical**: check each threshold of the decision list in order (`check: <finding>`),
//!   then the rule that fires;
//! - **Bayesian**: state the specialty's prior for the leading candidates (`prior: X high, Y
//!   low`), then update on each finding (`update: <finding>`, `... against Y` where it rules
//!   one out);
//! - **intuitive**: name the pattern (`pattern: X`), then confirm it with one finding
//!   (`confirm: <finding>`).
//!
//! Every style ends with `so: <diagnosis>`. [`render`] writes a case's reasoning under a style
//! from its [`Facts`]; [`check`] scores a written reasoning against a style; [`config`] reads
//! `recipes/guidelines.toml` (the prompt line, the format check and the prior of each).

pub mod check;
pub mod config;

use std::fmt;

/// The cue of a reasoning's rule step.
pub const RULE: &str = "rule:";
/// The cue of a reasoning's conclusion.
pub const CONCLUSION: &str = "so:";
/// The cue that introduces a guideline in a prompt.
pub const PROMPT_CUE: &str = "Guideline:";

/// A way of reasoning to a diagnosis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Style {
    /// Candidates, each but one excluded by a finding.
    Differential,
    /// Each threshold of the decision list, in order.
    Analytical,
    /// A prior on the leading candidates, updated on each finding.
    Bayesian,
    /// A recognised pattern, confirmed by one finding.
    Intuitive,
}

impl Style {
    /// Every style, in the order the generator cycles through them.
    pub const ALL: [Style; 4] = [
        Style::Differential,
        Style::Analytical,
        Style::Bayesian,
        Style::Intuitive,
    ];

    /// The lower-case name, as in `guidelines.toml` and prompts.
    pub fn name(self) -> &'static str {
        match self {
            Style::Differential => "differential",
            Style::Analytical => "analytical",
            Style::Bayesian => "bayesian",
            Style::Intuitive => "intuitive",
        }
    }

    /// The style called `name`.
    pub fn from_name(name: &str) -> Option<Style> {
        Style::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The prompt line that asks for this style (`Guideline: differential`).
    pub fn default_prompt(self) -> String {
        format!("{PROMPT_CUE} {}", self.name())
    }
}

impl fmt::Display for Style {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a case's reasoning rests on, whatever the style: the restated findings, the rule that
/// fires, the diagnosis, the closest competitor and the finding that rules it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The findings restated, in the order the decision list reads them.
    pub findings: Vec<String>,
    /// The rule that decides (without its `rule:` cue).
    pub rule: String,
    /// The diagnosis reached.
    pub diagnosis: String,
    /// The competing diagnosis a clinician would weigh against it.
    pub runner_up: String,
    /// The index in `findings` of the finding that excludes `runner_up`.
    pub exclusion: usize,
    /// Whether `diagnosis` is the more common of the two in the specialty.
    pub diagnosis_more_common: bool,
    /// The two candidates in the specialty's own order of its diagnoses (so that listing them
    /// does not give the answer away).
    pub candidates: [String; 2],
}

/// The reasoning steps of `facts` under `style`, ending with `so: <diagnosis>`.
pub fn render(style: Style, facts: &Facts) -> Vec<String> {
    let excluding = &facts.findings[facts.exclusion];
    let rule = format!("{RULE} {}", facts.rule);
    let conclusion = format!("{CONCLUSION} {}", facts.diagnosis);
    let mut steps = Vec::with_capacity(facts.findings.len() + 4);
    match style {
        Style::Differential => {
            let [a, b] = &facts.candidates;
            steps.push(format!("differential: {a} or {b}"));
            steps.extend(facts.findings.iter().cloned());
            steps.push(format!("exclude {}: {excluding}", facts.runner_up));
            steps.push(rule);
        }
        Style::Analytical => {
            steps.extend(facts.findings.iter().map(|f| format!("check: {f}")));
            steps.push(rule);
        }
        Style::Bayesian => {
            let (high, low) = if facts.diagnosis_more_common {
                (&facts.diagnosis, &facts.runner_up)
            } else {
                (&facts.runner_up, &facts.diagnosis)
            };
            steps.push(format!("prior: {high} high, {low} low"));
            for (i, f) in facts.findings.iter().enumerate() {
                if i == facts.exclusion {
                    steps.push(format!("update: {f} against {}", facts.runner_up));
                } else {
                    steps.push(format!("update: {f}"));
                }
            }
            steps.push(rule);
        }
        Style::Intuitive => {
            steps.push(format!("pattern: {}", facts.diagnosis));
            steps.push(format!("confirm: {excluding}"));
        }
    }
    steps.push(conclusion);
    steps
}

/// The words the styles add to a case's own (cues, the prompt line, the prior's levels).
pub const WORDS: &str = "differential or exclude check prior high low update against pattern \
    confirm Guideline analytical bayesian intuitive";

/// Text as the cases write it: a word-level tokenizer decodes `ng/L:` as `ng / L :`, so the
/// spaces it puts before `, . : ; )`, after `(` and around `/` are taken out again, and runs of
/// spaces become one.
pub fn canonical(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let joined = line.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut fixed = String::with_capacity(joined.len());
        let chars: Vec<char> = joined.chars().collect();
        for (i, &c) in chars.iter().enumerate() {
            let next = chars.get(i + 1).copied();
            let prev = i.checked_sub(1).map(|j| chars[j]);
            if c == ' ' {
                let before_symbol = next.is_some_and(|n| ",.:;)/".contains(n));
                let after_symbol = prev.is_some_and(|p| "(/".contains(p));
                if before_symbol || after_symbol {
                    continue;
                }
            }
            fixed.push(c);
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&fixed);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn facts() -> Facts {
        Facts {
            findings: vec![
                "troponin 38 ng/L is above 14 ng/L".into(),
                "ECG shows no ST change".into(),
                "chest pain at rest".into(),
            ],
            rule: "troponin above 14 ng/L without ST elevation means NSTEMI".into(),
            diagnosis: "NSTEMI".into(),
            runner_up: "unstable angina".into(),
            exclusion: 0,
            diagnosis_more_common: false,
            candidates: ["NSTEMI".into(), "unstable angina".into()],
        }
    }

    #[test]
    fn each_style_writes_its_own_steps() {
        let f = facts();
        assert_eq!(
            render(Style::Differential, &f),
            [
                "differential: NSTEMI or unstable angina",
                "troponin 38 ng/L is above 14 ng/L",
                "ECG shows no ST change",
                "chest pain at rest",
                "exclude unstable angina: troponin 38 ng/L is above 14 ng/L",
                "rule: troponin above 14 ng/L without ST elevation means NSTEMI",
                "so: NSTEMI",
            ]
        );
        assert_eq!(
            render(Style::Analytical, &f)[..3],
            [
                "check: troponin 38 ng/L is above 14 ng/L",
                "check: ECG shows no ST change",
                "check: chest pain at rest",
            ]
        );
        let bayes = render(Style::Bayesian, &f);
        assert_eq!(bayes[0], "prior: unstable angina high, NSTEMI low");
        assert_eq!(
            bayes[1],
            "update: troponin 38 ng/L is above 14 ng/L against unstable angina"
        );
        assert_eq!(bayes[2], "update: ECG shows no ST change");
        assert_eq!(
            render(Style::Intuitive, &f),
            [
                "pattern: NSTEMI",
                "confirm: troponin 38 ng/L is above 14 ng/L",
                "so: NSTEMI",
            ]
        );
    }

    #[test]
    fn canonical_undoes_a_word_level_decode() {
        assert_eq!(
            canonical("exclude  STEMI : troponin 38 ng / L is above 14 ng / L\nfeatures ( 2 ) , x"),
            "exclude STEMI: troponin 38 ng/L is above 14 ng/L\nfeatures (2), x"
        );
        let text = "differential: NSTEMI or unstable angina";
        assert_eq!(canonical(text), text);
    }
}
