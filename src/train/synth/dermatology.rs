//! Dermatology: a pigmented skin lesion, judged by the ABCDE features (asymmetry, border,
//! color, diameter, evolution).
//!
//! The guideline is a decision list, first match wins:
//! 1. a waxy surface on a stable lesion -> seborrheic keratosis;
//! 2. the features are asymmetry, irregular border, several colors, diameter above 6 mm and
//!    change; 3 or more of them -> melanoma;
//! 3. 1 or 2 features -> dysplastic nevus;
//! 4. no feature -> benign nevus.
//!
//! Age, sex and site are in every question and decide nothing.

use std::ops::RangeInclusive;

use super::picture::Picture;
use super::{around, compare, conclusion, Patient, Vignette, CLOSING};
use crate::rng::SplitMix;

/// The options, indexed by [`Diagnosis`].
pub(super) const DIAGNOSES: [&str; 4] = [
    "benign nevus",
    "dysplastic nevus",
    "melanoma",
    "seborrheic keratosis",
];

/// The rules, in the order they are applied.
pub(super) const RULES: [&str; 5] = [
    KERATOSIS_RULE,
    "ABCDE features are asymmetry, border, color, diameter above 6 mm and evolution",
    MELANOMA_RULE,
    DYSPLASTIC_RULE,
    BENIGN_RULE,
];

const KERATOSIS_RULE: &str = "waxy surface without change means seborrheic keratosis";
const MELANOMA_RULE: &str = "3 or more features means melanoma";
const DYSPLASTIC_RULE: &str = "1 or 2 features means dysplastic nevus";
const BENIGN_RULE: &str = "no feature means benign nevus";

/// How common each diagnosis is, relative to the others, indexed by [`Diagnosis`].
pub(super) const PRIORS: [u32; 4] = [4, 3, 1, 2];

/// Every word the questions and reasoning use besides numbers, separated by spaces.
pub(super) const WORDS: &str = "\
    has a pigmented lesion on the back chest abdomen arm leg face neck scalp It is symmetric \
    asymmetric with regular irregular border one color several colors and diameter of mm \
    stable changing its surface smooth waxy above at or below ABCDE features asymmetry \
    evolution none means more feature without change no benign dysplastic nevus melanoma \
    seborrheic keratosis";

/// Every number the text can hold (feature counts are within the diameter range).
pub(super) const NUMBERS: &[RangeInclusive<u32>] = &[AGES, 0..=5, DIAMETER_MIN..=DIAMETER_MAX];

const AGES: RangeInclusive<u32> = 18..=85;
const SITES: [&str; 8] = [
    "back", "chest", "abdomen", "arm", "leg", "face", "neck", "scalp",
];
/// mm: above counts as a feature.
const DIAMETER_LIMIT: u32 = 6;
const DIAMETER_MIN: u32 = 1;
const DIAMETER_MAX: u32 = 15;
/// Features present in at least this many means melanoma.
const MELANOMA_FEATURES: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Diagnosis {
    BenignNevus,
    DysplasticNevus,
    Melanoma,
    SeborrheicKeratosis,
}

#[derive(Debug, Clone, Copy)]
struct Findings {
    patient: Patient,
    site: &'static str,
    asymmetric: bool,
    irregular_border: bool,
    several_colors: bool,
    /// mm.
    diameter: u32,
    changing: bool,
    waxy: bool,
}

impl Findings {
    /// The ABCDE features present, by name, in ABCDE order.
    fn features(&self) -> Vec<&'static str> {
        [
            (self.asymmetric, "asymmetry"),
            (self.irregular_border, "border"),
            (self.several_colors, "color"),
            (self.diameter > DIAMETER_LIMIT, "diameter"),
            (self.changing, "evolution"),
        ]
        .into_iter()
        .filter_map(|(present, name)| present.then_some(name))
        .collect()
    }
}

/// The guideline.
fn diagnose(f: &Findings) -> Diagnosis {
    if f.waxy && !f.changing {
        return Diagnosis::SeborrheicKeratosis;
    }
    match f.features().len() {
        0 => Diagnosis::BenignNevus,
        n if n < MELANOMA_FEATURES => Diagnosis::DysplasticNevus,
        _ => Diagnosis::Melanoma,
    }
}

fn draw_findings(rng: &mut SplitMix) -> Findings {
    Findings {
        patient: Patient::draw(rng, AGES),
        site: rng.pick(&SITES),
        // One in three for each feature keeps every diagnosis common enough to draw.
        asymmetric: rng.one_in(3),
        irregular_border: rng.one_in(3),
        several_colors: rng.one_in(3),
        diameter: around(rng, DIAMETER_MIN, DIAMETER_LIMIT, DIAMETER_MAX),
        changing: rng.one_in(3),
        waxy: rng.one_in(3),
    }
}

fn question(f: &Findings) -> String {
    let pick = |yes: bool, a: &'static str, b: &'static str| if yes { a } else { b };
    format!(
        "{} has a pigmented lesion on the {}. It is {}, with {} border, {} and a diameter of {} mm. It is {} and its surface is {}. {CLOSING}",
        f.patient,
        f.site,
        pick(f.asymmetric, "asymmetric", "symmetric"),
        pick(f.irregular_border, "irregular", "regular"),
        pick(f.several_colors, "several colors", "one color"),
        f.diameter,
        pick(f.changing, "changing", "stable"),
        pick(f.waxy, "waxy", "smooth"),
    )
}

/// The question of an image case and its image: asymmetry, border and colours drawn, not
/// written.
fn picture(f: &Findings) -> (String, Picture) {
    let pick = |yes: bool, a: &'static str, b: &'static str| if yes { a } else { b };
    let question = format!(
        "{} has a pigmented lesion on the {}. It has a diameter of {} mm. It is {} and its surface is {}. {CLOSING}",
        f.patient,
        f.site,
        f.diameter,
        pick(f.changing, "changing", "stable"),
        pick(f.waxy, "waxy", "smooth"),
    );
    let picture = Picture::Lesion {
        asymmetric: f.asymmetric,
        jagged: f.irregular_border,
        several_colors: f.several_colors,
    };
    (question, picture)
}

fn reasoning(f: &Findings, diagnosis: Diagnosis) -> Vec<String> {
    let features = f.features();
    let listed = if features.is_empty() {
        "none".to_string()
    } else {
        features.join(", ")
    };
    let rule = match diagnosis {
        Diagnosis::SeborrheicKeratosis => KERATOSIS_RULE,
        Diagnosis::Melanoma => MELANOMA_RULE,
        Diagnosis::DysplasticNevus => DYSPLASTIC_RULE,
        Diagnosis::BenignNevus => BENIGN_RULE,
    };
    vec![
        format!(
            "diameter {} mm is {} {DIAMETER_LIMIT} mm",
            f.diameter,
            compare(f.diameter, DIAMETER_LIMIT)
        ),
        format!("ABCDE features: {listed} ({})", features.len()),
        format!(
            "surface is {} and the lesion is {}",
            if f.waxy { "waxy" } else { "smooth" },
            if f.changing { "changing" } else { "stable" }
        ),
        format!("rule: {rule}"),
        conclusion(DIAGNOSES[diagnosis as usize]),
    ]
}

/// The diagnosis a clinician weighs against `diagnosis`, and the reasoning step (diameter 0,
/// ABCDE features 1, surface 2) that excludes it.
fn runner_up(_: &Findings, diagnosis: Diagnosis) -> (usize, usize) {
    match diagnosis {
        Diagnosis::SeborrheicKeratosis => (Diagnosis::DysplasticNevus as usize, 2),
        Diagnosis::Melanoma | Diagnosis::BenignNevus => (Diagnosis::DysplasticNevus as usize, 1),
        Diagnosis::DysplasticNevus => (Diagnosis::Melanoma as usize, 1),
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

    /// A lesion with the features named in `features` (letters of "ABCE"), a diameter and a
    /// surface.
    fn findings(features: &str, diameter: u32, waxy: bool) -> Findings {
        Findings {
            patient: Patient {
                age: 40,
                woman: true,
            },
            site: "back",
            asymmetric: features.contains('A'),
            irregular_border: features.contains('B'),
            several_colors: features.contains('C'),
            diameter,
            changing: features.contains('E'),
            waxy,
        }
    }

    fn diagnosis(features: &str, diameter: u32, waxy: bool) -> &'static str {
        DIAGNOSES[diagnose(&findings(features, diameter, waxy)) as usize]
    }

    #[test]
    fn diameter_counts_only_above_6_mm() {
        assert_eq!(diagnosis("", 6, false), "benign nevus");
        assert_eq!(diagnosis("", 1, false), "benign nevus");
        assert_eq!(diagnosis("", 7, false), "dysplastic nevus");
        assert_eq!(diagnosis("AB", 6, false), "dysplastic nevus");
        assert_eq!(diagnosis("AB", 7, false), "melanoma");
    }

    #[test]
    fn three_or_more_features_is_melanoma() {
        assert_eq!(diagnosis("A", 5, false), "dysplastic nevus");
        assert_eq!(diagnosis("CE", 5, false), "dysplastic nevus");
        assert_eq!(diagnosis("ACE", 5, false), "melanoma");
        assert_eq!(diagnosis("ABCE", 15, false), "melanoma");
    }

    #[test]
    fn a_waxy_stable_lesion_is_keratosis_whatever_its_features() {
        assert_eq!(diagnosis("", 3, true), "seborrheic keratosis");
        assert_eq!(diagnosis("ABC", 12, true), "seborrheic keratosis");
        // A changing waxy lesion is counted like any other.
        assert_eq!(diagnosis("E", 3, true), "dysplastic nevus");
        assert_eq!(diagnosis("ABE", 3, true), "melanoma");
    }

    #[test]
    fn reasoning_lists_and_counts_the_features() {
        let f = findings("AE", 8, false);
        let steps = reasoning(&f, diagnose(&f));
        assert_eq!(
            steps,
            [
                "diameter 8 mm is above 6 mm",
                "ABCDE features: asymmetry, diameter, evolution (3)",
                "surface is smooth and the lesion is changing",
                "rule: 3 or more features means melanoma",
                "so: melanoma",
            ]
        );
        let f = findings("", 6, false);
        let steps = reasoning(&f, diagnose(&f));
        assert_eq!(steps[0], "diameter 6 mm is at or below 6 mm");
        assert_eq!(steps[1], "ABCDE features: none (0)");
        assert_eq!(steps.last().unwrap(), "so: benign nevus");
    }
}
