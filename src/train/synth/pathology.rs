//! Pathology: a tumor biopsy, graded by a score on mitotic count and nuclear pleomorphism (a
//! two-part cut of the Nottingham scheme).
//!
//! The guideline:
//! 1. no stromal invasion -> carcinoma in situ (nothing else is scored);
//! 2. mitoses per 10 HPF at or below 7 score 1, above 7 and at or below 14 score 2, above 14
//!    score 3;
//! 3. mild, moderate and marked nuclear pleomorphism score 1, 2 and 3;
//! 4. a total of 2 or 3 is grade 1, 4 is grade 2, 5 or 6 is grade 3.
//!
//! Age, sex and site are in every question and decide nothing.

use std::ops::RangeInclusive;

use super::picture::Picture;
use super::{compare, conclusion, Patient, Vignette, CLOSING};
use crate::rng::SplitMix;

/// The options, indexed by [`Diagnosis`].
pub(super) const DIAGNOSES: [&str; 4] = [
    "carcinoma in situ",
    "grade 1 carcinoma",
    "grade 2 carcinoma",
    "grade 3 carcinoma",
];

/// The rules, in the order they are applied.
pub(super) const RULES: [&str; 4] = [
    IN_SITU_RULE,
    "mitoses at or below 7 per 10 HPF score 1, above 7 and at or below 14 score 2, above 14 score 3",
    "mild, moderate and marked nuclear pleomorphism score 1, 2 and 3",
    "total 2 or 3 means grade 1, 4 means grade 2, 5 or 6 means grade 3",
];

const IN_SITU_RULE: &str = "no stromal invasion means carcinoma in situ";

/// How common each diagnosis is, relative to the others, indexed by [`Diagnosis`].
pub(super) const PRIORS: [u32; 4] = [1, 2, 4, 3];

/// Every word the questions and reasoning use besides numbers, separated by spaces.
pub(super) const WORDS: &str = "\
    has a breast colon lung stomach tumor biopsy It shows no stromal invasion present mitoses \
    per HPF and mild moderate marked nuclear pleomorphism is above at or below score total + = \
    means grade carcinoma in situ";

/// Every number the text can hold (scores and totals are within the mitosis range).
pub(super) const NUMBERS: &[RangeInclusive<u32>] = &[AGES, MITOSES_MIN..=MITOSES_MAX];

const AGES: RangeInclusive<u32> = 30..=85;
const SITES: [&str; 4] = ["breast", "colon", "lung", "stomach"];
/// Per 10 HPF: at or below scores 1.
const MITOSES_LOW: u32 = 7;
/// Per 10 HPF: above scores 3.
const MITOSES_HIGH: u32 = 14;
const MITOSES_MIN: u32 = 0;
const MITOSES_MAX: u32 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Diagnosis {
    InSitu,
    Grade1,
    Grade2,
    Grade3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pleomorphism {
    Mild,
    Moderate,
    Marked,
}

impl Pleomorphism {
    fn text(self) -> &'static str {
        match self {
            Pleomorphism::Mild => "mild",
            Pleomorphism::Moderate => "moderate",
            Pleomorphism::Marked => "marked",
        }
    }

    fn score(self) -> u32 {
        match self {
            Pleomorphism::Mild => 1,
            Pleomorphism::Moderate => 2,
            Pleomorphism::Marked => 3,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Findings {
    patient: Patient,
    site: &'static str,
    invasion: bool,
    /// Per 10 high-power fields.
    mitoses: u32,
    pleomorphism: Pleomorphism,
}

fn mitosis_score(mitoses: u32) -> u32 {
    if mitoses <= MITOSES_LOW {
        1
    } else if mitoses <= MITOSES_HIGH {
        2
    } else {
        3
    }
}

/// The guideline.
fn diagnose(f: &Findings) -> Diagnosis {
    if !f.invasion {
        return Diagnosis::InSitu;
    }
    let total = mitosis_score(f.mitoses) + f.pleomorphism.score();
    if total <= 3 {
        Diagnosis::Grade1
    } else if total == 4 {
        Diagnosis::Grade2
    } else {
        Diagnosis::Grade3
    }
}

fn draw_findings(rng: &mut SplitMix) -> Findings {
    // One band in three: every threshold has as many cases on each side.
    let (lo, hi) = rng.pick(&[
        (MITOSES_MIN, MITOSES_LOW),
        (MITOSES_LOW + 1, MITOSES_HIGH),
        (MITOSES_HIGH + 1, MITOSES_MAX),
    ]);
    Findings {
        patient: Patient::draw(rng, AGES),
        site: rng.pick(&SITES),
        // One in four is in situ, as often as each grade.
        invasion: !rng.one_in(4),
        mitoses: rng.range(lo, hi),
        pleomorphism: rng.pick(&[
            Pleomorphism::Mild,
            Pleomorphism::Moderate,
            Pleomorphism::Marked,
        ]),
    }
}

/// The biopsy's invasion, as the question states it.
fn invasion(f: &Findings) -> &'static str {
    if f.invasion {
        "stromal invasion"
    } else {
        "no stromal invasion"
    }
}

fn question(f: &Findings) -> String {
    format!(
        "{} has a {} tumor biopsy. It shows {}, {} mitoses per 10 HPF and {} nuclear pleomorphism. {CLOSING}",
        f.patient,
        f.site,
        invasion(f),
        f.mitoses,
        f.pleomorphism.text()
    )
}

/// The question of an image case and its image: the nuclear pleomorphism drawn, not written.
fn picture(f: &Findings) -> (String, Picture) {
    let question = format!(
        "{} has a {} tumor biopsy. It shows {} and {} mitoses per 10 HPF. {CLOSING}",
        f.patient,
        f.site,
        invasion(f),
        f.mitoses,
    );
    let variation = match f.pleomorphism {
        Pleomorphism::Mild => 0,
        Pleomorphism::Moderate => 1,
        Pleomorphism::Marked => 2,
    };
    (question, Picture::Nuclei(variation))
}

fn reasoning(f: &Findings, diagnosis: Diagnosis) -> Vec<String> {
    let answer = conclusion(DIAGNOSES[diagnosis as usize]);
    if !f.invasion {
        return vec![
            "no stromal invasion".to_string(),
            format!("rule: {IN_SITU_RULE}"),
            answer,
        ];
    }
    let band = if f.mitoses > MITOSES_LOW && f.mitoses <= MITOSES_HIGH {
        format!("above {MITOSES_LOW} and at or below {MITOSES_HIGH}")
    } else {
        let limit = if f.mitoses > MITOSES_HIGH {
            MITOSES_HIGH
        } else {
            MITOSES_LOW
        };
        format!("{} {limit}", compare(f.mitoses, limit))
    };
    let (m, p) = (mitosis_score(f.mitoses), f.pleomorphism.score());
    vec![
        "stromal invasion present".to_string(),
        format!("mitoses {} per 10 HPF is {band}, score {m}", f.mitoses),
        format!("{} nuclear pleomorphism, score {p}", f.pleomorphism.text()),
        // Grades 1 to 3 are the variants after `InSitu`, so the index is the grade.
        format!(
            "rule: total {m} + {p} = {} means grade {}",
            m + p,
            diagnosis as usize
        ),
        answer,
    ]
}

/// The diagnosis a clinician weighs against `diagnosis`, and the reasoning step that excludes
/// it: the invasion finding (step 0) separates carcinoma in situ from the graded carcinomas.
fn runner_up(_: &Findings, diagnosis: Diagnosis) -> (usize, usize) {
    match diagnosis {
        Diagnosis::InSitu => (Diagnosis::Grade1 as usize, 0),
        _ => (Diagnosis::InSitu as usize, 0),
    }
}

/// Draws one case.
pub(super) fn draw(rng: &mut SplitMix) -> Vignette {
    super::vignette(
        draw_findings(rng),
        diagnose,
        |d| d as usize,
        question,
        reasoning,
        runner_up,
        picture,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn findings(invasion: bool, mitoses: u32, pleomorphism: Pleomorphism) -> Findings {
        Findings {
            patient: Patient {
                age: 58,
                woman: true,
            },
            site: "breast",
            invasion,
            mitoses,
            pleomorphism,
        }
    }

    fn diagnosis(mitoses: u32, pleomorphism: Pleomorphism) -> &'static str {
        DIAGNOSES[diagnose(&findings(true, mitoses, pleomorphism)) as usize]
    }

    #[test]
    fn without_invasion_it_is_in_situ_whatever_the_scores() {
        for mitoses in [0, 7, 8, 14, 15, 30] {
            for p in [Pleomorphism::Mild, Pleomorphism::Marked] {
                assert_eq!(diagnose(&findings(false, mitoses, p)), Diagnosis::InSitu);
            }
        }
    }

    #[test]
    fn mitosis_scores_change_just_above_7_and_14() {
        assert_eq!(mitosis_score(0), 1);
        assert_eq!(mitosis_score(7), 1);
        assert_eq!(mitosis_score(8), 2);
        assert_eq!(mitosis_score(14), 2);
        assert_eq!(mitosis_score(15), 3);
    }

    #[test]
    fn grades_follow_the_total_score() {
        use Pleomorphism::*;
        assert_eq!(diagnosis(7, Mild), "grade 1 carcinoma");
        assert_eq!(diagnosis(8, Mild), "grade 1 carcinoma");
        assert_eq!(diagnosis(7, Moderate), "grade 1 carcinoma");
        assert_eq!(diagnosis(14, Moderate), "grade 2 carcinoma");
        assert_eq!(diagnosis(15, Mild), "grade 2 carcinoma");
        assert_eq!(diagnosis(7, Marked), "grade 2 carcinoma");
        assert_eq!(diagnosis(15, Moderate), "grade 3 carcinoma");
        assert_eq!(diagnosis(8, Marked), "grade 3 carcinoma");
        assert_eq!(diagnosis(30, Marked), "grade 3 carcinoma");
    }

    #[test]
    fn reasoning_adds_the_scores() {
        let f = findings(true, 12, Pleomorphism::Moderate);
        let steps = reasoning(&f, diagnose(&f));
        assert_eq!(
            steps,
            [
                "stromal invasion present",
                "mitoses 12 per 10 HPF is above 7 and at or below 14, score 2",
                "moderate nuclear pleomorphism, score 2",
                "rule: total 2 + 2 = 4 means grade 2",
                "so: grade 2 carcinoma",
            ]
        );
        let f = findings(true, 15, Pleomorphism::Marked);
        let steps = reasoning(&f, diagnose(&f));
        assert_eq!(steps[1], "mitoses 15 per 10 HPF is above 14, score 3");
        assert_eq!(steps[3], "rule: total 3 + 3 = 6 means grade 3");
        let f = findings(false, 3, Pleomorphism::Mild);
        let steps = reasoning(&f, diagnose(&f));
        assert_eq!(steps.len(), 3);
        assert_eq!(steps.last().unwrap(), "so: carcinoma in situ");
    }
}
