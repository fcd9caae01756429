//! Cardiology: acute chest pain, told apart by the ECG and a high-sensitivity troponin.
//!
//! The guideline is a decision list, first match wins:
//! 1. ST elevation (in II, III, aVF or in V1 to V4) -> STEMI, whatever the troponin;
//! 2. troponin above 14 ng/L -> NSTEMI;
//! 3. pain at rest or ST depression -> unstable angina;
//! 4. otherwise (pain on exertion, no ST change, troponin at or below 14 ng/L) -> stable angina.
//!
//! Age, sex and heart rate are in every question and decide nothing.

use std::ops::RangeInclusive;

use super::picture::{Picture, St};
use super::{around, compare, conclusion, Patient, Vignette, CLOSING};
use crate::rng::SplitMix;

/// The options, indexed by [`Diagnosis`].
pub(super) const DIAGNOSES: [&str; 4] = ["STEMI", "NSTEMI", "unstable angina", "stable angina"];

/// The rules, indexed by [`Diagnosis`] (each diagnosis has one).
pub(super) const RULES: [&str; 4] = [
    "ST elevation whatever the troponin means STEMI",
    "troponin above 14 ng/L without ST elevation means NSTEMI",
    "troponin at or below 14 ng/L with pain at rest or ST depression means unstable angina",
    "troponin at or below 14 ng/L with pain on exertion and no ST change means stable angina",
];

/// How common each diagnosis is, relative to the others, indexed by [`Diagnosis`].
pub(super) const PRIORS: [u32; 4] = [1, 3, 2, 4];

/// Every word the questions and reasoning use besides numbers, separated by spaces.
pub(super) const WORDS: &str = "\
    has chest pain at rest on exertion and a heart rate of per minute ECG shows ST elevation \
    in II III aVF V1 to V4 depression V6 no change Troponin is ng L troponin above or below \
    means whatever the with without STEMI NSTEMI unstable angina stable";

/// Every number the text can hold.
pub(super) const NUMBERS: &[RangeInclusive<u32>] =
    &[AGES, HEART_RATES, TROPONIN_MIN..=TROPONIN_MAX];

const AGES: RangeInclusive<u32> = 35..=85;
const HEART_RATES: RangeInclusive<u32> = 50..=120;
/// ng/L; the upper reference limit of a high-sensitivity assay (its 99th percentile).
const TROPONIN_LIMIT: u32 = 14;
const TROPONIN_MIN: u32 = 3;
const TROPONIN_MAX: u32 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Diagnosis {
    Stemi,
    Nstemi,
    UnstableAngina,
    StableAngina,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pain {
    Rest,
    Exertion,
}

impl Pain {
    fn text(self) -> &'static str {
        match self {
            Pain::Rest => "at rest",
            Pain::Exertion => "on exertion",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ecg {
    InferiorElevation,
    AnteriorElevation,
    LateralDepression,
    NoChange,
}

impl Ecg {
    const ALL: [Ecg; 4] = [
        Ecg::InferiorElevation,
        Ecg::AnteriorElevation,
        Ecg::LateralDepression,
        Ecg::NoChange,
    ];

    fn text(self) -> &'static str {
        match self {
            Ecg::InferiorElevation => "ST elevation in II, III, aVF",
            Ecg::AnteriorElevation => "ST elevation in V1 to V4",
            Ecg::LateralDepression => "ST depression in V4 to V6",
            Ecg::NoChange => "no ST change",
        }
    }

    fn elevation(self) -> bool {
        matches!(self, Ecg::InferiorElevation | Ecg::AnteriorElevation)
    }
}

#[derive(Debug, Clone, Copy)]
struct Findings {
    patient: Patient,
    heart_rate: u32,
    pain: Pain,
    ecg: Ecg,
    /// ng/L.
    troponin: u32,
}

/// The guideline.
fn diagnose(f: &Findings) -> Diagnosis {
    if f.ecg.elevation() {
        Diagnosis::Stemi
    } else if f.troponin > TROPONIN_LIMIT {
        Diagnosis::Nstemi
    } else if f.pain == Pain::Rest || f.ecg == Ecg::LateralDepression {
        Diagnosis::UnstableAngina
    } else {
        Diagnosis::StableAngina
    }
}

fn draw_findings(rng: &mut SplitMix) -> Findings {
    Findings {
        patient: Patient::draw(rng, AGES),
        heart_rate: rng.range(*HEART_RATES.start(), *HEART_RATES.end()),
        pain: rng.pick(&[Pain::Rest, Pain::Exertion]),
        ecg: rng.pick(&Ecg::ALL),
        troponin: around(rng, TROPONIN_MIN, TROPONIN_LIMIT, TROPONIN_MAX),
    }
}

fn question(f: &Findings) -> String {
    format!(
        "{} has chest pain {} and a heart rate of {} per minute. ECG shows {}. Troponin is {} ng/L. {CLOSING}",
        f.patient,
        f.pain.text(),
        f.heart_rate,
        f.ecg.text(),
        f.troponin
    )
}

/// The question of an image case and its image: the ECG drawn, not written.
fn picture(f: &Findings) -> (String, Picture) {
    let strips = match f.ecg {
        Ecg::InferiorElevation => [St::Raised, St::Level, St::Level],
        Ecg::AnteriorElevation => [St::Level, St::Raised, St::Level],
        Ecg::LateralDepression => [St::Level, St::Level, St::Lowered],
        Ecg::NoChange => [St::Level; 3],
    };
    let question = format!(
        "{} has chest pain {} and a heart rate of {} per minute. Troponin is {} ng/L. {CLOSING}",
        f.patient,
        f.pain.text(),
        f.heart_rate,
        f.troponin
    );
    (question, Picture::Ecg(strips))
}

fn reasoning(f: &Findings, diagnosis: Diagnosis) -> Vec<String> {
    vec![
        format!(
            "troponin {} ng/L is {} {TROPONIN_LIMIT} ng/L",
            f.troponin,
            compare(f.troponin, TROPONIN_LIMIT)
        ),
        format!("ECG shows {}", f.ecg.text()),
        format!("chest pain {}", f.pain.text()),
        format!("rule: {}", RULES[diagnosis as usize]),
        conclusion(DIAGNOSES[diagnosis as usize]),
    ]
}

/// The diagnosis a clinician weighs against `diagnosis`, and the reasoning step (troponin 0,
/// ECG 1, pain 2) that excludes it.
fn runner_up(_: &Findings, diagnosis: Diagnosis) -> (usize, usize) {
    match diagnosis {
        Diagnosis::Stemi => (Diagnosis::Nstemi as usize, 1),
        Diagnosis::Nstemi => (Diagnosis::UnstableAngina as usize, 0),
        Diagnosis::UnstableAngina => (Diagnosis::Nstemi as usize, 0),
        Diagnosis::StableAngina => (Diagnosis::UnstableAngina as usize, 2),
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

    fn findings(pain: Pain, ecg: Ecg, troponin: u32) -> Findings {
        Findings {
            patient: Patient {
                age: 60,
                woman: false,
            },
            heart_rate: 80,
            pain,
            ecg,
            troponin,
        }
    }

    #[test]
    fn st_elevation_is_stemi_on_both_sides_of_the_troponin_limit() {
        for troponin in [13, 14, 15, 60] {
            for ecg in [Ecg::InferiorElevation, Ecg::AnteriorElevation] {
                let f = findings(Pain::Exertion, ecg, troponin);
                assert_eq!(diagnose(&f), Diagnosis::Stemi, "{f:?}");
            }
        }
    }

    #[test]
    fn troponin_above_the_limit_without_elevation_is_nstemi() {
        for ecg in [Ecg::LateralDepression, Ecg::NoChange] {
            for pain in [Pain::Rest, Pain::Exertion] {
                assert_eq!(diagnose(&findings(pain, ecg, 15)), Diagnosis::Nstemi);
                assert_eq!(diagnose(&findings(pain, ecg, 40)), Diagnosis::Nstemi);
            }
        }
    }

    #[test]
    fn troponin_at_or_below_the_limit_is_angina() {
        for troponin in [3, 13, 14] {
            let rest = findings(Pain::Rest, Ecg::NoChange, troponin);
            assert_eq!(diagnose(&rest), Diagnosis::UnstableAngina);
            let depression = findings(Pain::Exertion, Ecg::LateralDepression, troponin);
            assert_eq!(diagnose(&depression), Diagnosis::UnstableAngina);
            let exertion = findings(Pain::Exertion, Ecg::NoChange, troponin);
            assert_eq!(diagnose(&exertion), Diagnosis::StableAngina);
        }
    }

    #[test]
    fn reasoning_compares_with_the_limit_and_names_the_diagnosis() {
        let f = findings(Pain::Rest, Ecg::InferiorElevation, 38);
        let steps = reasoning(&f, diagnose(&f));
        assert_eq!(steps[0], "troponin 38 ng/L is above 14 ng/L");
        assert_eq!(steps[1], "ECG shows ST elevation in II, III, aVF");
        assert_eq!(steps.last().unwrap(), "so: STEMI");
        let f = findings(Pain::Exertion, Ecg::NoChange, 14);
        let steps = reasoning(&f, diagnose(&f));
        assert_eq!(steps[0], "troponin 14 ng/L is at or below 14 ng/L");
        assert!(steps[3].ends_with("means stable angina"), "{}", steps[3]);
        assert_eq!(steps.last().unwrap(), "so: stable angina");
    }

    #[test]
    fn question_lists_the_findings() {
        let f = findings(Pain::Exertion, Ecg::AnteriorElevation, 9);
        assert_eq!(
            question(&f),
            "A 60 year old man has chest pain on exertion and a heart rate of 80 per minute. \
             ECG shows ST elevation in V1 to V4. Troponin is 9 ng/L. Choose the most likely diagnosis."
        );
    }
}
