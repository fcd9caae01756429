//! How closely a written reasoning follows a guideline ([`adherence`]): the share of the
//! style's checks it passes, each a property of the text and the case a program can decide.
//!
//! A finding the reasoning cites is *grounded* when it is one of the case's own findings (for a
//! case with written reasoning) or, for an answer-only case, when every number it holds is in
//! the question or the cited comparison and each `N ... is above M` / `is at or below M` it
//! states is true.

use super::{canonical, Style, CONCLUSION, RULE};
use crate::train::Case;

/// The cues of every style's steps; a known finding is a step with its cue taken off.
const CUES: [&str; 6] = [
    "check:",
    "update:",
    "confirm:",
    "pattern:",
    "prior:",
    "differential:",
];

/// The share (0 to 1) of `style`'s checks that `text` (a model's completion, decoded) passes
/// for `case`.
pub fn adherence(style: Style, case: &Case, text: &str) -> f64 {
    let text = canonical(text);
    let steps: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Answer"))
        .filter(|l| !l.is_empty())
        .collect();
    let known = known_findings(case);
    let grounded = |e: &str| grounded(e, case, &known);
    let concluded = steps
        .iter()
        .rev()
        .find_map(|s| s.strip_prefix(CONCLUSION))
        .map(str::trim);
    let is_option = |x: &str| case.options().iter().any(|o| o == x);
    let checks: Vec<bool> = match style {
        // Each arm lists the style's checks; the score is the share passed.
        Style::Differential => {
            let candidates: Vec<&str> = steps
                .iter()
                .find_map(|s| s.strip_prefix("differential:"))
                .map(|c| c.split(" or ").map(str::trim).collect())
                .unwrap_or_default();
            let excluded: Vec<(&str, &str)> = steps
                .iter()
                .filter_map(|s| s.strip_prefix("exclude "))
                .filter_map(|s| s.split_once(": "))
                .collect();
            let others: Vec<&&str> = candidates
                .iter()
                .filter(|c| Some(**c) != concluded)
                .collect();
            vec![
                candidates.len() >= 2 && candidates.iter().all(|c| is_option(c)),
                concluded.is_some_and(|c| candidates.contains(&c)),
                !others.is_empty()
                    && others
                        .iter()
                        .all(|c| excluded.iter().any(|(x, _)| x.trim() == **c)),
                !excluded.is_empty() && excluded.iter().all(|(_, e)| grounded(e)),
            ]
        }
        Style::Analytical => {
            let checked: Vec<&str> = steps
                .iter()
                .filter_map(|s| s.strip_prefix("check:"))
                .map(str::trim)
                .collect();
            let last_check = steps.iter().rposition(|s| s.starts_with("check:"));
            let rule_after = steps
                .iter()
                .rposition(|s| s.starts_with(RULE))
                .is_some_and(|r| last_check.is_some_and(|c| r > c));
            let complete = match &known {
                Some(known) => checked == known.iter().map(String::as_str).collect::<Vec<_>>(),
                // Unknown findings: at least each check made once.
                None => checked
                    .iter()
                    .enumerate()
                    .all(|(i, c)| !checked[..i].contains(c)),
            };
            vec![
                !checked.is_empty(),
                !checked.is_empty() && checked.iter().all(|c| grounded(c)),
                complete,
                rule_after,
            ]
        }
        Style::Bayesian => {
            let prior = steps
                .iter()
                .find_map(|s| s.strip_prefix("prior:"))
                .and_then(|p| p.split_once(','))
                .and_then(|(h, l)| {
                    Some((
                        h.trim().strip_suffix(" high")?.trim(),
                        l.trim().strip_suffix(" low")?.trim(),
                    ))
                });
            let updates: Vec<&str> = steps
                .iter()
                .filter_map(|s| s.strip_prefix("update:"))
                .map(str::trim)
                .collect();
            let other = prior.and_then(|(h, l)| match concluded {
                Some(c) if c == h => Some(l),
                Some(c) if c == l => Some(h),
                _ => None,
            });
            vec![
                prior.is_some_and(|(h, l)| h != l && is_option(h) && is_option(l)),
                other.is_some(),
                !updates.is_empty() && updates.iter().all(|u| grounded(evidence(u))),
                other.is_some_and(|o| {
                    updates.iter().any(|u| {
                        u.split_once(" against ")
                            .is_some_and(|(_, x)| x.trim() == o)
                    })
                }),
            ]
        }
        Style::Intuitive => {
            let pattern = steps
                .iter()
                .find_map(|s| s.strip_prefix("pattern:"))
                .map(str::trim);
            let confirms: Vec<&str> = steps
                .iter()
                .filter_map(|s| s.strip_prefix("confirm:"))
                .map(str::trim)
                .collect();
            vec![
                pattern.is_some_and(is_option),
                pattern.is_some() && pattern == concluded,
                confirms.len() == 1 && grounded(confirms[0]),
                steps.len() <= 4,
            ]
        }
    };
    checks.iter().filter(|&&c| c).count() as f64 / checks.len() as f64
}

/// The findings of a case with written reasoning: its steps with any style's cue taken off,
/// less its rule, its conclusion, its candidates and its prior. `None` for an answer-only case.
pub(crate) fn known_findings(case: &Case) -> Option<Vec<String>> {
    if case.reasoning().is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for step in case.reasoning() {
        let step = canonical(step);
        if step.starts_with(RULE)
            || step.starts_with(CONCLUSION)
            || step.starts_with("differential:")
            || step.starts_with("prior:")
            || step.starts_with("pattern:")
        {
            continue;
        }
        let mut body = step.as_str();
        if let Some(rest) = body.strip_prefix("exclude ") {
            body = rest.split_once(": ").map_or(rest, |(_, e)| e);
        }
        for cue in CUES {
            if let Some(rest) = body.strip_prefix(cue) {
                body = rest.trim();
            }
        }
        let body = body.split_once(" against ").map_or(body, |(e, _)| e);
        if !out.iter().any(|o: &String| o == body) {
            out.push(body.to_string());
        }
    }
    Some(out)
}

/// Whether a cited finding is one of the case's own (see the module's documentation).
fn grounded(cited: &str, case: &Case, known: &Option<Vec<String>>) -> bool {
    let cited = cited.trim();
    if cited.is_empty() {
        return false;
    }
    if let Some(known) = known {
        return known.iter().any(|k| k == cited);
    }
    let question_numbers = numbers(case.question());
    let words: Vec<&str> = cited.split_whitespace().collect();
    // Each comparison `N <unit words> is above M` or `... is at or below M`: N from the
    // question, the comparison true.
    for (i, w) in words.iter().enumerate() {
        if *w != "is" {
            continue;
        }
        let (above, at) = match words.get(i + 1..i + 4) {
            Some(["above", m, ..]) => (true, *m),
            Some(["at", "or", "below"]) => (false, words.get(i + 4).copied().unwrap_or("")),
            _ => continue,
        };
        let value = words[..i].iter().rev().find_map(|w| w.parse::<u32>().ok());
        let (Some(value), Ok(limit)) = (value, at.parse::<u32>()) else {
            return false;
        };
        if !question_numbers.contains(&value) || (value > limit) != above {
            return false;
        }
    }
    // Any other number must come from the question (thresholds are compared, never cited).
    let compared: Vec<u32> = words
        .windows(2)
        .filter(|w| w[0] == "above" || w[0] == "below")
        .filter_map(|w| w[1].parse().ok())
        .collect();
    numbers(cited)
        .iter()
        .all(|n| question_numbers.contains(n) || compared.contains(n))
}

/// The finding an `update:` step cites: what comes before ` against `, if anything.
fn evidence(update: &str) -> &str {
    update
        .split_once(" against ")
        .map_or(update, |(e, _)| e)
        .trim()
}

/// The whole numbers written in `text`.
fn numbers(text: &str) -> Vec<u32> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::{render, tests::facts};
    use super::*;
    use crate::train::case::CaseLine;

    fn case(reasoning: Vec<String>) -> Case {
        Case::from_line(CaseLine {
            id: "c".into(),
            specialty: "cardiology".into(),
            question: "A 60 year old man has chest pain at rest and a heart rate of 80 per minute. \
                       ECG shows no ST change. Troponin is 38 ng/L. Choose the most likely diagnosis."
                .into(),
            options: vec![
                "STEMI".into(),
                "NSTEMI".into(),
                "unstable angina".into(),
                "stable angina".into(),
            ],
            answer: "B".into(),
            reasoning,
            image: None,
            image_embeds: None,
            synthetic: true,
            guideline: None,
        })
        .unwrap()
    }

    fn text(steps: &[String]) -> String {
        let mut t = steps.join("\n");
        t.push_str("\nAnswer: B");
        t
    }

    #[test]
    fn a_rendered_reasoning_fully_adheres_to_its_own_style() {
        let f = facts();
        for style in Style::ALL {
            let steps = render(style, &f);
            // With the case's own findings known and without (answer-only).
            for c in [case(render(Style::Analytical, &f)), case(vec![])] {
                assert_eq!(
                    adherence(style, &c, &text(&steps)),
                    1.0,
                    "{style} {steps:?}"
                );
            }
        }
    }

    #[test]
    fn another_style_or_a_wrong_step_loses_adherence() {
        let f = facts();
        let answer_only = case(vec![]);
        for style in Style::ALL {
            for other in Style::ALL.into_iter().filter(|&o| o != style) {
                let score = adherence(style, &answer_only, &text(&render(other, &f)));
                assert!(score < 1.0, "{other} read as {style}: {score}");
            }
        }
        // A false comparison, a number not in the question, a candidate left standing.
        let mut wrong = render(Style::Intuitive, &f);
        wrong[1] = "confirm: troponin 38 ng/L is at or below 14 ng/L".into();
        assert_eq!(
            adherence(Style::Intuitive, &answer_only, &text(&wrong)),
            0.75
        );
        wrong[1] = "confirm: troponin 39 ng/L is above 14 ng/L".into();
        assert_eq!(
            adherence(Style::Intuitive, &answer_only, &text(&wrong)),
            0.75
        );
        let mut standing = render(Style::Differential, &f);
        standing.retain(|s| !s.starts_with("exclude"));
        assert_eq!(
            adherence(Style::Differential, &answer_only, &text(&standing)),
            0.5
        );
        // With the case's findings known, a finding it does not have is not grounded.
        let known = case(render(Style::Analytical, &f));
        let mut missing = render(Style::Analytical, &f);
        missing.remove(1);
        assert_eq!(adherence(Style::Analytical, &known, &text(&missing)), 0.75);
    }

    #[test]
    fn a_decoded_completion_is_read_as_written() {
        let f = facts();
        let decoded = text(&render(Style::Differential, &f))
            .replace(':', " :")
            .replace('/', " / ");
        assert_eq!(adherence(Style::Differential, &case(vec![]), &decoded), 1.0);
    }
}
