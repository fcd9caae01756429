//! Radiology: a breast lesion on MRI, classified by a BI-RADS-like rule on its size, margin and
//! enhancement.
//!
//! The guideline is a decision list, first match wins:
//! 1. spiculated margin -> malignant;
//! 2. irregular margin above 20 mm -> malignant;
//! 3. irregular margin or rim enhancement -> suspicious;
//! 4. (circumscribed) above 10 mm or with homogeneous enhancement -> probably benign;
//! 5. otherwise (circumscribed, at or below 10 mm, no enhancement) -> benign.
//!
//! Age, side and clock position are in every question and decide nothing.

use std::ops::RangeInclusive;

use super::picture::{Outline, Picture};
use super::{compare, conclusion, Patient, Vignette, CLOSING};
use crate::rng::SplitMix;

/// The options, indexed by [`Diagnosis`].
pub(super) const DIAGNOSES: [&str; 4] = ["benign", "probably benign", "suspicious", "malignant"];

/// The rules, indexed by [`Rule`].
pub(super) const RULES: [&str; 5] = [
    "spiculated margin means malignant",
    "irregular margin above 20 mm means malignant",
    "irregular margin or rim enhancement means suspicious",
    "circumscribed margin above 10 mm or with homogeneous enhancement means probably benign",
    "circumscribed margin at or below 10 mm with no enhancement means benign",
];

/// How common each diagnosis is, relative to the others, indexed by [`Diagnosis`].
pub(super) const PRIORS: [u32; 4] = [4, 3, 2, 1];

/// Every word the questions and reasoning use besides numbers, separated by spaces.
pub(super) const WORDS: &str = "\
    has a lesion in the left right breast at o'clock on MRI It measures mm with margin and \
    circumscribed irregular spiculated no homogeneous rim enhancement size is above or below \
    means benign probably suspicious malignant";

/// Every number the text can hold.
pub(super) const NUMBERS: &[RangeInclusive<u32>] = &[AGES, 1..=12, SIZE_MIN..=SIZE_MAX];

const AGES: RangeInclusive<u32> = 30..=80;
/// mm: at or below is small.
const SMALL: u32 = 10;
/// mm: above is large.
const LARGE: u32 = 20;
const SIZE_MIN: u32 = 3;
const SIZE_MAX: u32 = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Diagnosis {
    Benign,
    ProbablyBenign,
    Suspicious,
    Malignant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Spiculated,
    LargeIrregular,
    IrregularOrRim,
    LargeOrEnhancing,
    SmallQuiet,
}

impl Rule {
    fn diagnosis(self) -> Diagnosis {
        match self {
            Rule::Spiculated | Rule::LargeIrregular => Diagnosis::Malignant,
            Rule::IrregularOrRim => Diagnosis::Suspicious,
            Rule::LargeOrEnhancing => Diagnosis::ProbablyBenign,
            Rule::SmallQuiet => Diagnosis::Benign,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Margin {
    Circumscribed,
    Irregular,
    Spiculated,
}

impl Margin {
    fn text(self) -> &'static str {
        match self {
            Margin::Circumscribed => "circumscribed",
            Margin::Irregular => "irregular",
            Margin::Spiculated => "spiculated",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Enhancement {
    None,
    Homogeneous,
    Rim,
}

impl Enhancement {
    fn text(self) -> &'static str {
        match self {
            Enhancement::None => "no enhancement",
            Enhancement::Homogeneous => "homogeneous enhancement",
            Enhancement::Rim => "rim enhancement",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Findings {
    patient: Patient,
    left: bool,
    clock: u32,
    /// mm.
    size: u32,
    margin: Margin,
    enhancement: Enhancement,
}

/// The guideline: the first rule that applies.
fn rule(f: &Findings) -> Rule {
    match (f.margin, f.enhancement) {
        (Margin::Spiculated, _) => Rule::Spiculated,
        (Margin::Irregular, _) if f.size > LARGE => Rule::LargeIrregular,
        (Margin::Irregular, _) | (_, Enhancement::Rim) => Rule::IrregularOrRim,
        (_, Enhancement::Homogeneous) => Rule::LargeOrEnhancing,
        _ if f.size > SMALL => Rule::LargeOrEnhancing,
        _ => Rule::SmallQuiet,
    }
}

fn draw_findings(rng: &mut SplitMix) -> Findings {
    // One band in three: every threshold has as many cases on each side.
    let (lo, hi) = rng.pick(&[(SIZE_MIN, SMALL), (SMALL + 1, LARGE), (LARGE + 1, SIZE_MAX)]);
    Findings {
        patient: Patient::draw_woman(rng, AGES),
        left: rng.one_in(2),
        clock: rng.range(1, 12),
        size: rng.range(lo, hi),
        margin: rng.pick(&[Margin::Circumscribed, Margin::Irregular, Margin::Spiculated]),
        enhancement: rng.pick(&[
            Enhancement::None,
            Enhancement::Homogeneous,
            Enhancement::Rim,
        ]),
    }
}

fn question(f: &Findings) -> String {
    format!(
        "{} has a lesion in the {} breast at {} o'clock on MRI. It measures {} mm, with {} margin and {}. {CLOSING}",
        f.patient,
        if f.left { "left" } else { "right" },
        f.clock,
        f.size,
        f.margin.text(),
        f.enhancement.text()
    )
}

/// The question of an image case and its image: the margin drawn, not written.
fn picture(f: &Findings) -> (String, Picture) {
    let outline = match f.margin {
        Margin::Circumscribed => Outline::Smooth,
        Margin::Irregular => Outline::Wavy,
        Margin::Spiculated => Outline::Spiculated,
    };
    let question = format!(
        "{} has a lesion in the {} breast at {} o'clock on MRI. It measures {} mm, with {}. {CLOSING}",
        f.patient,
        if f.left { "left" } else { "right" },
        f.clock,
        f.size,
        f.enhancement.text()
    );
    (question, Picture::Mass(outline))
}

fn reasoning(f: &Findings, rule: Rule) -> Vec<String> {
    let size = if f.size > SMALL && f.size <= LARGE {
        format!(
            "size {} mm is above {SMALL} mm and at or below {LARGE} mm",
            f.size
        )
    } else {
        let limit = if f.size > LARGE { LARGE } else { SMALL };
        format!(
            "size {} mm is {} {limit} mm",
            f.size,
            compare(f.size, limit)
        )
    };
    vec![
        size,
        format!("margin is {}", f.margin.text()),
        f.enhancement.text().to_string(),
        format!("rule: {}", RULES[rule as usize]),
        conclusion(DIAGNOSES[rule.diagnosis() as usize]),
    ]
}

/// The diagnosis a clinician weighs against the one `rule` gives, and the reasoning step (size
/// 0, margin 1, enhancement 2) that excludes it.
fn runner_up(f: &Findings, rule: Rule) -> (usize, usize) {
    match rule {
        Rule::Spiculated => (Diagnosis::Suspicious as usize, 1),
        Rule::LargeIrregular => (Diagnosis::Suspicious as usize, 0),
        Rule::IrregularOrRim if f.margin == Margin::Irregular => (Diagnosis::Malignant as usize, 0),
        Rule::IrregularOrRim => (Diagnosis::Malignant as usize, 1),
        Rule::LargeOrEnhancing => (Diagnosis::Suspicious as usize, 1),
        Rule::SmallQuiet => (Diagnosis::ProbablyBenign as usize, 0),
    }
}

/// Draws one case.
pub(super) fn draw(rng: &mut SplitMix) -> Vignette {
    super::vignette(
        draw_findings(rng),
        rule,
        |d| d.diagnosis() as usize,
        question,
        reasoning,
        runner_up,
        picture,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn findings(size: u32, margin: Margin, enhancement: Enhancement) -> Findings {
        Findings {
            patient: Patient {
                age: 50,
                woman: true,
            },
            left: true,
            clock: 3,
            size,
            margin,
            enhancement,
        }
    }

    fn diagnosis(size: u32, margin: Margin, enhancement: Enhancement) -> &'static str {
        DIAGNOSES[rule(&findings(size, margin, enhancement)).diagnosis() as usize]
    }

    #[test]
    fn spiculated_is_malignant_at_any_size() {
        for size in [3, 10, 11, 20, 21] {
            for e in [
                Enhancement::None,
                Enhancement::Homogeneous,
                Enhancement::Rim,
            ] {
                assert_eq!(diagnosis(size, Margin::Spiculated, e), "malignant");
            }
        }
    }

    #[test]
    fn irregular_margin_turns_malignant_above_20_mm() {
        for e in [
            Enhancement::None,
            Enhancement::Homogeneous,
            Enhancement::Rim,
        ] {
            assert_eq!(diagnosis(19, Margin::Irregular, e), "suspicious");
            assert_eq!(diagnosis(20, Margin::Irregular, e), "suspicious");
            assert_eq!(diagnosis(21, Margin::Irregular, e), "malignant");
        }
    }

    #[test]
    fn circumscribed_lesions_by_size_and_enhancement() {
        use Enhancement::*;
        let m = Margin::Circumscribed;
        assert_eq!(diagnosis(10, m, None), "benign");
        assert_eq!(diagnosis(3, m, None), "benign");
        assert_eq!(diagnosis(11, m, None), "probably benign");
        assert_eq!(diagnosis(25, m, None), "probably benign");
        assert_eq!(diagnosis(10, m, Homogeneous), "probably benign");
        assert_eq!(diagnosis(10, m, Rim), "suspicious");
        assert_eq!(diagnosis(30, m, Rim), "suspicious");
    }

    #[test]
    fn reasoning_places_the_size_between_the_thresholds() {
        let steps = |size, margin, e| {
            let f = findings(size, margin, e);
            reasoning(&f, rule(&f))
        };
        let small = steps(10, Margin::Circumscribed, Enhancement::None);
        assert_eq!(small[0], "size 10 mm is at or below 10 mm");
        assert_eq!(small.last().unwrap(), "so: benign");
        let middle = steps(20, Margin::Irregular, Enhancement::None);
        assert_eq!(middle[0], "size 20 mm is above 10 mm and at or below 20 mm");
        assert_eq!(
            middle[3],
            "rule: irregular margin or rim enhancement means suspicious"
        );
        let large = steps(21, Margin::Irregular, Enhancement::Rim);
        assert_eq!(large[0], "size 21 mm is above 20 mm");
        assert_eq!(
            large[3],
            "rule: irregular margin above 20 mm means malignant"
        );
        assert_eq!(large.last().unwrap(), "so: malignant");
    }
}
