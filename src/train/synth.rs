//! A seeded generator of SYNTHETIC clinical cases ([`generate`]) for four specialties
//! ([`Specialty`]): cardiology, radiology, pathology and dermatology. None of it is patient data
//! or medical advice.
//!
//! Each specialty has a small guideline (its module documents it): a decision list that maps
//! drawn findings, numbers included, to one of four diagnoses. Numbers are drawn on both sides of
//! every threshold, and the answer is a function of the findings alone. A case's reasoning
//! applies the rule in 3 to 5 short steps and ends with `so: <diagnosis>`.
//!
//! The text is written for a tiny model: a closed vocabulary ([`vocabulary`]), numbers as
//! whole numbers in digits, and a fixed template per specialty. Output depends on the seed and
//! the counts only; the test split is drawn first, then validation, then train, so the held-out
//! splits do not change when more training cases are asked for. No question appears twice.
//!
//! ```
//! use mmx::train::synth::{generate, SynthSpec};
//!
//! let splits = generate(&SynthSpec::new(7, 8, 4, 4))?;
//! assert_eq!(splits.train.len(), 4 * 8);
//! let case = &splits.test[0];
//! assert!(case.is_synthetic());
//! assert_eq!(case.reasoning().last().unwrap(), &format!("so: {}", case.answer_text()));
//! # Ok::<(), mmx::Error>(())
//! ```

mod cardiology;
mod dermatology;
mod pathology;
pub mod picture;
mod radiology;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::ops::RangeInclusive;

use image::RgbImage;

use super::case::{option_letter, Case, CaseLine};
use super::guideline::{self, Facts, Style};
use crate::error::{Error, Result};
use crate::rng::SplitMix;
use picture::Picture;

/// The most cases of one specialty, all splits together. The smallest diagnosis (benign nevus)
/// has a few thousand distinct questions; staying well under that keeps every draw quick.
pub const MAX_PER_SPECIALTY: usize = 8000;
/// How many draws one case may take before generation gives up (a diagnosis whose distinct
/// questions are used up).
const MAX_DRAWS: usize = 100_000;
/// How every question ends.
const CLOSING: &str = "Choose the most likely diagnosis.";

/// The tag of the image jitter's random stream ("img").
const IMAGE_STREAM: u64 = 0x696d67;
/// Words of the question openings, the conclusions and the prompt around them, and the
/// symbols split from words, separated by spaces.
const COMMON_WORDS: &str = "\
    A An year old man woman Choose the most likely diagnosis rule so Question Options Reasoning \
    Answer B C D , . : ( ) /";
/// The options every case has.
const OPTIONS: usize = 4;

/// A specialty of the synthetic data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Specialty {
    /// Chest pain: STEMI, NSTEMI, unstable or stable angina.
    Cardiology,
    /// A breast lesion on MRI: benign to malignant.
    Radiology,
    /// A tumor biopsy: carcinoma in situ or grade 1 to 3.
    Pathology,
    /// A pigmented skin lesion: nevi, melanoma, seborrheic keratosis.
    Dermatology,
}

impl Specialty {
    /// Every specialty, in the order the generator writes them.
    pub const ALL: [Specialty; 4] = [
        Specialty::Cardiology,
        Specialty::Radiology,
        Specialty::Pathology,
        Specialty::Dermatology,
    ];

    /// The lower-case name, as in case ids and directory names.
    pub fn name(self) -> &'static str {
        match self {
            Specialty::Cardiology => "cardiology",
            Specialty::Radiology => "radiology",
            Specialty::Pathology => "pathology",
            Specialty::Dermatology => "dermatology",
        }
    }

    /// The four diagnoses its cases choose from.
    pub fn diagnoses(self) -> [&'static str; 4] {
        match self {
            Specialty::Cardiology => cardiology::DIAGNOSES,
            Specialty::Radiology => radiology::DIAGNOSES,
            Specialty::Pathology => pathology::DIAGNOSES,
            Specialty::Dermatology => dermatology::DIAGNOSES,
        }
    }

    /// Its guideline, one rule per line, in the order the rules apply.
    pub fn rules(self) -> &'static [&'static str] {
        match self {
            Specialty::Cardiology => &cardiology::RULES,
            Specialty::Radiology => &radiology::RULES,
            Specialty::Pathology => &pathology::RULES,
            Specialty::Dermatology => &dermatology::RULES,
        }
    }

    /// How common each of its diagnoses is, relative to the others (the Bayesian guideline's
    /// prior): distinct values, larger is more common.
    pub fn priors(self) -> [u32; 4] {
        match self {
            Specialty::Cardiology => cardiology::PRIORS,
            Specialty::Radiology => radiology::PRIORS,
            Specialty::Pathology => pathology::PRIORS,
            Specialty::Dermatology => dermatology::PRIORS,
        }
    }

    /// The specialty called `name`.
    pub fn from_name(name: &str) -> Option<Specialty> {
        Specialty::ALL.into_iter().find(|s| s.name() == name)
    }

    fn draw(self, rng: &mut SplitMix) -> Vignette {
        match self {
            Specialty::Cardiology => cardiology::draw(rng),
            Specialty::Radiology => radiology::draw(rng),
            Specialty::Pathology => pathology::draw(rng),
            Specialty::Dermatology => dermatology::draw(rng),
        }
    }

    /// The words of its text besides numbers, separated by spaces.
    fn words(self) -> &'static str {
        match self {
            Specialty::Cardiology => cardiology::WORDS,
            Specialty::Radiology => radiology::WORDS,
            Specialty::Pathology => pathology::WORDS,
            Specialty::Dermatology => dermatology::WORDS,
        }
    }

    fn numbers(self) -> &'static [RangeInclusive<u32>] {
        match self {
            Specialty::Cardiology => cardiology::NUMBERS,
            Specialty::Radiology => radiology::NUMBERS,
            Specialty::Pathology => pathology::NUMBERS,
            Specialty::Dermatology => dermatology::NUMBERS,
        }
    }
}

impl fmt::Display for Specialty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to generate: cases per specialty in each split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthSpec {
    /// The seed; the same spec always gives the same cases.
    pub seed: u64,
    /// Training cases per specialty.
    pub per_specialty: usize,
    /// Validation cases per specialty.
    pub validation: usize,
    /// Test cases per specialty.
    pub test: usize,
    /// Shuffle each case's options (else they are listed in the specialty's fixed order, so
    /// that an answer's letter follows from its diagnosis). The cases are the same either way.
    pub shuffle_options: bool,
    /// Write each case's reasoning under one of the four guidelines ([`Style`], in turn), with
    /// its name in the case (and so in its prompt); else in the plain form (findings, rule,
    /// conclusion).
    pub guidelines: bool,
    /// Answer-only training cases per specialty (no reasoning), drawn after every other split.
    pub answer_only: usize,
}

impl SynthSpec {
    /// `per_specialty` training, `validation` and `test` cases per specialty from `seed`, with
    /// shuffled options, plain reasoning and no answer-only cases.
    pub fn new(seed: u64, per_specialty: usize, validation: usize, test: usize) -> SynthSpec {
        SynthSpec {
            seed,
            per_specialty,
            validation,
            test,
            shuffle_options: true,
            guidelines: false,
            answer_only: 0,
        }
    }
}

/// Generated cases, each split holding every specialty in [`Specialty::ALL`] order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splits {
    /// Training cases.
    pub train: Vec<Case>,
    /// Validation cases.
    pub validation: Vec<Case>,
    /// Test cases.
    pub test: Vec<Case>,
    /// Answer-only training cases (no reasoning, no guideline).
    pub answer_only: Vec<Case>,
}

impl Splits {
    /// Makes the test split held out from other data: drops every test case whose question
    /// is among `seen`'s (another corpus's training or validation cases, say), and returns how
    /// many it dropped. The other splits are left as they are.
    pub fn hold_out_test(&mut self, seen: &[Case]) -> usize {
        let questions: std::collections::HashSet<&str> = seen.iter().map(Case::question).collect();
        let before = self.test.len();
        self.test.retain(|c| !questions.contains(c.question()));
        before - self.test.len()
    }
}

/// One split, in the order it is drawn.
#[derive(Debug, Clone, Copy)]
enum Split {
    Test,
    Validation,
    Train,
    AnswerOnly,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Test => "test",
            Split::Validation => "validation",
            Split::Train => "train",
            Split::AnswerOnly => "answers",
        }
    }
}

/// A drawn case before its options are shuffled.
struct Vignette {
    question: String,
    /// The question without the finding that [`Vignette::picture`] shows.
    image_question: String,
    /// One finding, drawn.
    picture: Picture,
    /// Index into the specialty's diagnoses.
    diagnosis: usize,
    /// The plain reasoning: the findings restated, the rule, the conclusion.
    reasoning: Vec<String>,
    /// The competing diagnosis (an index) and the finding (an index into the reasoning) that
    /// excludes it.
    runner_up: (usize, usize),
}

impl Vignette {
    /// What every guideline's reasoning rests on, for a specialty whose diagnoses are
    /// `diagnoses` with relative frequencies `priors`.
    fn facts(&self, diagnoses: [&str; 4], priors: [u32; 4]) -> Facts {
        let n = self.reasoning.len();
        let (other, exclusion) = self.runner_up;
        let (first, second) = if self.diagnosis < other {
            (self.diagnosis, other)
        } else {
            (other, self.diagnosis)
        };
        Facts {
            findings: self.reasoning[..n - 2].to_vec(),
            rule: self.reasoning[n - 2]
                .trim_start_matches(guideline::RULE)
                .trim_start()
                .to_string(),
            diagnosis: diagnoses[self.diagnosis].to_string(),
            runner_up: diagnoses[other].to_string(),
            exclusion,
            diagnosis_more_common: priors[self.diagnosis] > priors[other],
            candidates: [diagnoses[first].to_string(), diagnoses[second].to_string()],
        }
    }
}

/// A vignette from a specialty's drawn findings and its rules: what `decide` concludes (its
/// diagnosis at `index` in the specialty's list), the question, the reasoning and the runner-up
/// with the finding that excludes it.
fn vignette<F, D: Copy>(
    findings: F,
    decide: impl Fn(&F) -> D,
    index: impl Fn(D) -> usize,
    question: impl Fn(&F) -> String,
    reasoning: impl Fn(&F, D) -> Vec<String>,
    runner_up: impl Fn(&F, D) -> (usize, usize),
    picture: impl Fn(&F) -> (String, Picture),
) -> Vignette {
    let decided = decide(&findings);
    let (image_question, picture) = picture(&findings);
    Vignette {
        image_question,
        picture,
        question: question(&findings),
        diagnosis: index(decided),
        reasoning: reasoning(&findings, decided),
        runner_up: runner_up(&findings, decided),
    }
}

/// A patient's age and sex, which open every question and decide nothing. Displayed with its
/// article, capitalised: "A 64 year old man", "An 80 year old woman".
#[derive(Debug, Clone, Copy)]
struct Patient {
    age: u32,
    woman: bool,
}

impl Patient {
    fn draw(rng: &mut SplitMix, ages: RangeInclusive<u32>) -> Patient {
        Patient {
            age: rng.range(*ages.start(), *ages.end()),
            woman: rng.one_in(2),
        }
    }

    fn draw_woman(rng: &mut SplitMix, ages: RangeInclusive<u32>) -> Patient {
        Patient {
            age: rng.range(*ages.start(), *ages.end()),
            woman: true,
        }
    }
}

impl fmt::Display for Patient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sex = if self.woman { "woman" } else { "man" };
        // The article follows the sound of the number: eighty, eight, eleven, eighteen.
        let age = self.age.to_string();
        let article = if age.starts_with('8') || age == "11" || age == "18" {
            "An"
        } else {
            "A"
        };
        write!(f, "{article} {age} year old {sex}")
    }
}

/// A value in `lo..=hi`, on either side of `limit` (at or below, above) with equal chance, so a
/// rule's threshold is seen from both sides equally often.
fn around(rng: &mut SplitMix, lo: u32, limit: u32, hi: u32) -> u32 {
    if rng.one_in(2) {
        rng.range(lo, limit)
    } else {
        rng.range(limit + 1, hi)
    }
}

/// How a value compares with a threshold, in the words of the reasoning.
fn compare(value: u32, limit: u32) -> &'static str {
    if value > limit {
        "above"
    } else {
        "at or below"
    }
}

/// The last reasoning step.
fn conclusion(diagnosis: &str) -> String {
    format!("so: {diagnosis}")
}

/// Generates the cases of every specialty. Fails if a specialty would have more than
/// [`MAX_PER_SPECIALTY`] cases.
pub fn generate(spec: &SynthSpec) -> Result<Splits> {
    Ok(generate_cases(spec, false)?.0)
}

/// [`generate`] with one finding of each case drawn instead of written
/// ([`picture`]): each case's question leaves it out and its `image` is
/// `images/<id>.png`, relative to its case file; the images, by case id, come beside the
/// cases (to be written as PNG files there). The same seed gives the same cases as
/// [`generate`] but for that.
pub fn generate_with_images(spec: &SynthSpec) -> Result<(Splits, BTreeMap<String, RgbImage>)> {
    generate_cases(spec, true)
}

/// The image file of case `id`, relative to its case file.
pub fn image_path(id: &str) -> String {
    format!("images/{id}.png")
}

fn generate_cases(spec: &SynthSpec, images: bool) -> Result<(Splits, BTreeMap<String, RgbImage>)> {
    let total = spec
        .per_specialty
        .checked_add(spec.validation)
        .and_then(|n| n.checked_add(spec.test))
        .and_then(|n| n.checked_add(spec.answer_only))
        .filter(|&n| n <= MAX_PER_SPECIALTY)
        .ok_or_else(|| Error::Synth {
            message: format!(
                "{} train + {} validation + {} test + {} answer-only cases per specialty is more than {MAX_PER_SPECIALTY}",
                spec.per_specialty, spec.validation, spec.test, spec.answer_only
            ),
        })?;
    let mut splits = Splits {
        train: Vec::with_capacity(spec.per_specialty * Specialty::ALL.len()),
        validation: Vec::with_capacity(spec.validation * Specialty::ALL.len()),
        test: Vec::with_capacity(spec.test * Specialty::ALL.len()),
        answer_only: Vec::with_capacity(spec.answer_only * Specialty::ALL.len()),
    };
    let mut pictures = images.then(BTreeMap::new);
    for specialty in Specialty::ALL {
        let mut seen = HashSet::with_capacity(total);
        let mut draw =
            |split, count| draw_split(spec, specialty, split, count, &mut seen, pictures.as_mut());
        splits.test.extend(draw(Split::Test, spec.test)?);
        splits
            .validation
            .extend(draw(Split::Validation, spec.validation)?);
        splits.train.extend(draw(Split::Train, spec.per_specialty)?);
        splits
            .answer_only
            .extend(draw(Split::AnswerOnly, spec.answer_only)?);
    }
    Ok((splits, pictures.unwrap_or_default()))
}

/// Draws one split of one specialty: as many cases of each diagnosis (to within one), in an
/// order shuffled by the seed, none with a question in `seen`; with `pictures`, as image
/// cases, their images added to it.
fn draw_split(
    spec: &SynthSpec,
    specialty: Specialty,
    split: Split,
    count: usize,
    seen: &mut HashSet<String>,
    mut pictures: Option<&mut BTreeMap<String, RgbImage>>,
) -> Result<Vec<Case>> {
    let mut rng = SplitMix::derive(spec.seed, &[specialty as u64, split as u64]);
    let diagnoses = specialty.diagnoses();
    let mut targets: Vec<usize> = (0..count).map(|i| i % diagnoses.len()).collect();
    rng.shuffle(&mut targets);
    let mut cases = Vec::with_capacity(count);
    for (index, target) in targets.into_iter().enumerate() {
        let id = format!("{specialty}-{}-{index:06}", split.name());
        let vignette = (0..MAX_DRAWS)
            .map(|_| specialty.draw(&mut rng))
            .find(|v| v.diagnosis == target && !seen.contains(&v.question))
            .ok_or_else(|| Error::Synth {
                message: format!(
                    "no new `{}` case for `{id}` in {MAX_DRAWS} draws; ask for fewer cases",
                    diagnoses[target]
                ),
            })?;
        seen.insert(vignette.question.clone());
        let mut order: [usize; OPTIONS] = [0, 1, 2, 3];
        // Drawn either way, so that the flag changes the option order and nothing else.
        rng.shuffle(&mut order);
        if !spec.shuffle_options {
            order = [0, 1, 2, 3];
        }
        let answer_only = matches!(split, Split::AnswerOnly);
        let style = (spec.guidelines && !answer_only).then(|| Style::ALL[index % Style::ALL.len()]);
        let reasoning = match style {
            _ if answer_only => Vec::new(),
            Some(style) => guideline::render(style, &vignette.facts(diagnoses, specialty.priors())),
            None => vignette.reasoning,
        };
        let answer = order
            .iter()
            .position(|&d| d == target)
            .and_then(option_letter)
            .map(String::from);
        // The image's jitter has a stream of its own: the cases are those of `generate`.
        let (question, image) = match pictures.as_deref_mut() {
            None => (vignette.question, None),
            Some(pictures) => {
                let mut jitter = SplitMix::derive(
                    spec.seed,
                    &[specialty as u64, split as u64, index as u64, IMAGE_STREAM],
                );
                pictures.insert(id.clone(), picture::render(vignette.picture, &mut jitter));
                (vignette.image_question, Some(image_path(&id)))
            }
        };
        let line = CaseLine {
            id: id.clone(),
            specialty: specialty.name().to_string(),
            question,
            options: order.iter().map(|&d| diagnoses[d].to_string()).collect(),
            answer: answer.unwrap_or_default(),
            reasoning,
            image,
            image_embeds: None,
            synthetic: true,
            guideline: style.map(|s| s.name().to_string()),
        };
        // The same checks as a file's lines: a generator bug is an error, not a bad data set.
        let case = Case::from_line(line).map_err(|message| Error::Synth {
            message: format!("generated case `{id}` is invalid: {message}"),
        })?;
        cases.push(case);
    }
    Ok(cases)
}

/// Every word and symbol the generator can write, sorted: in questions, options, reasoning,
/// and [`Case::prompt`] and [`Case::completion`] of its cases, once the symbols
/// `, . : ; ( ) /` are split from the words around them and the text is split on whitespace.
pub fn vocabulary() -> Vec<String> {
    let mut words: BTreeSet<String> = COMMON_WORDS
        .split_whitespace()
        .chain(guideline::WORDS.split_whitespace())
        .map(String::from)
        .collect();
    for specialty in Specialty::ALL {
        words.extend(specialty.words().split_whitespace().map(String::from));
        for range in specialty.numbers() {
            words.extend(range.clone().map(|n| n.to_string()));
        }
    }
    words.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn spec(seed: u64, per_specialty: usize, validation: usize, test: usize) -> SynthSpec {
        SynthSpec::new(seed, per_specialty, validation, test)
    }

    fn all(splits: &Splits) -> impl Iterator<Item = &Case> {
        splits
            .train
            .iter()
            .chain(&splits.validation)
            .chain(&splits.test)
    }

    /// The words of a text: the symbols `, . : ; ( ) /` split off, then split on whitespace.
    fn words(text: &str) -> Vec<String> {
        let mut spaced = String::with_capacity(text.len() * 2);
        for c in text.chars() {
            if ",.:;()/".contains(c) {
                spaced.push(' ');
                spaced.push(c);
                spaced.push(' ');
            } else {
                spaced.push(c);
            }
        }
        spaced.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn every_emitted_word_is_in_the_vocabulary_and_every_word_is_emitted() {
        let vocabulary: BTreeSet<String> = vocabulary().into_iter().collect();
        let mut emitted = BTreeSet::new();
        for (seed, guidelines) in [(1, false), (2, true)] {
            let splits = generate(&SynthSpec {
                guidelines,
                ..spec(seed, 600, 50, 50)
            })
            .unwrap();
            for case in all(&splits) {
                let text = format!("{}{}", case.prompt(), case.completion());
                for word in words(&text) {
                    assert!(
                        vocabulary.contains(&word),
                        "`{word}` is not in the vocabulary (case `{}`)",
                        case.id()
                    );
                    emitted.insert(word);
                }
            }
        }
        // A vocabulary padded with words the generator never writes wastes a tiny model's
        // embedding rows.
        let unused: Vec<_> = vocabulary.difference(&emitted).collect();
        assert!(unused.is_empty(), "never emitted: {unused:?}");
        assert!(vocabulary.len() < 400, "{} words", vocabulary.len());
    }

    #[test]
    fn the_same_seed_gives_the_same_cases_and_another_seed_others() {
        let a = generate(&spec(11, 40, 8, 8)).unwrap();
        let b = generate(&spec(11, 40, 8, 8)).unwrap();
        assert_eq!(a, b);
        let c = generate(&spec(12, 40, 8, 8)).unwrap();
        let questions = |s: &Splits| all(s).map(|c| c.question().to_string()).collect::<Vec<_>>();
        let (qa, qc) = (questions(&a), questions(&c));
        let same = qa.iter().zip(&qc).filter(|(x, y)| x == y).count();
        assert!(
            same < qa.len() / 10,
            "{same} of {} questions equal",
            qa.len()
        );
    }

    #[test]
    fn patients_take_the_article_their_age_is_read_with() {
        let patient = |age, woman| Patient { age, woman }.to_string();
        assert_eq!(patient(64, false), "A 64 year old man");
        assert_eq!(patient(8, true), "An 8 year old woman");
        assert_eq!(patient(18, false), "An 18 year old man");
        assert_eq!(patient(85, true), "An 85 year old woman");
        assert_eq!(patient(28, true), "A 28 year old woman");
    }

    #[test]
    fn held_out_splits_do_not_depend_on_the_train_size() {
        let small = generate(&spec(5, 10, 12, 12)).unwrap();
        let large = generate(&spec(5, 200, 12, 12)).unwrap();
        assert_eq!(small.test, large.test);
        assert_eq!(small.validation, large.validation);
    }

    #[test]
    fn no_question_is_in_two_splits_or_twice_in_one() {
        let splits = generate(&spec(3, 500, 100, 100)).unwrap();
        let mut questions = HashSet::new();
        for case in all(&splits) {
            assert!(
                questions.insert(case.question()),
                "`{}` repeats a question",
                case.id()
            );
        }
    }

    #[test]
    fn cases_are_labelled_counted_and_balanced() {
        let splits = generate(&spec(4, 40, 8, 12)).unwrap();
        assert_eq!(splits.train.len(), 4 * 40);
        assert_eq!(splits.validation.len(), 4 * 8);
        assert_eq!(splits.test.len(), 4 * 12);
        assert_eq!(splits.train[0].id(), "cardiology-train-000000");
        assert_eq!(splits.test[12].id(), "radiology-test-000000");
        assert_eq!(splits.validation[31].id(), "dermatology-validation-000007");
        for specialty in Specialty::ALL {
            let cases: Vec<_> = splits
                .train
                .iter()
                .filter(|c| c.specialty() == specialty.name())
                .collect();
            assert_eq!(cases.len(), 40);
            for diagnosis in specialty.diagnoses() {
                let n = cases
                    .iter()
                    .filter(|c| c.answer_text() == diagnosis)
                    .count();
                assert_eq!(n, 10, "{specialty} `{diagnosis}`");
            }
        }
        assert!(all(&splits).all(|c| c.is_synthetic() && c.image_embeds().is_none()));
    }

    #[test]
    fn the_answer_letter_indexes_the_diagnosis_the_reasoning_reaches() {
        let splits = generate(&spec(9, 200, 0, 0)).unwrap();
        let mut letters = BTreeSet::new();
        for case in &splits.train {
            let steps = case.reasoning();
            assert!((3..=5).contains(&steps.len()), "{steps:?}");
            let answer = case.answer_text();
            assert_eq!(steps.last().unwrap(), &format!("so: {answer}"));
            let rule = &steps[steps.len() - 2];
            assert!(rule.starts_with("rule: "), "{rule}");
            // The rule that fired names the same diagnosis (pathology's grade rule names the
            // grade, which its option spells out as `grade N carcinoma`).
            let named = rule.rsplit(" means ").next().unwrap();
            assert!(answer.starts_with(named), "`{rule}` vs `{answer}`");
            let letter = case.answer_letter();
            letters.insert(letter);
            assert_eq!(case.options()[(letter as u8 - b'A') as usize], answer);
            let mut options = case.options().to_vec();
            options.sort();
            let mut expected: Vec<_> = Specialty::ALL
                .iter()
                .find(|s| s.name() == case.specialty())
                .unwrap()
                .diagnoses()
                .map(String::from)
                .to_vec();
            expected.sort();
            assert_eq!(options, expected);
        }
        assert_eq!(letters.len(), 4, "the right option is at every letter");
    }

    #[test]
    fn fixed_option_order_changes_nothing_else() {
        let shuffled = generate(&spec(4, 12, 2, 2)).unwrap();
        let fixed = generate(&SynthSpec {
            shuffle_options: false,
            ..spec(4, 12, 2, 2)
        })
        .unwrap();
        for (a, b) in shuffled.train.iter().zip(&fixed.train) {
            assert_eq!(a.question(), b.question());
            assert_eq!(a.answer_text(), b.answer_text());
            let specialty = Specialty::ALL
                .into_iter()
                .find(|s| s.name() == b.specialty())
                .unwrap();
            assert_eq!(b.options(), specialty.diagnoses());
        }
    }

    #[test]
    fn options_are_shuffled_per_case() {
        let splits = generate(&spec(2, 40, 0, 0)).unwrap();
        let orders: HashSet<Vec<String>> = splits
            .train
            .iter()
            .filter(|c| c.specialty() == "cardiology")
            .map(|c| c.options().to_vec())
            .collect();
        assert!(orders.len() > 5, "{} option orders", orders.len());
    }

    #[test]
    fn guideline_cases_cycle_the_styles_and_answer_only_cases_are_new_questions() {
        let plain = generate(&spec(6, 40, 8, 8)).unwrap();
        let styled = generate(&SynthSpec {
            guidelines: true,
            answer_only: 20,
            ..spec(6, 40, 8, 8)
        })
        .unwrap();
        // The same questions and answers; only the reasoning's form differs.
        for (a, b) in plain.train.iter().zip(&styled.train) {
            assert_eq!((a.question(), a.answer()), (b.question(), b.answer()));
            assert_eq!(a.reasoning().last(), b.reasoning().last());
        }
        let questions = |cases: &[Case]| {
            cases
                .iter()
                .map(|c| c.question().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(questions(&plain.test), questions(&styled.test));
        for style in Style::ALL {
            let n = styled
                .train
                .iter()
                .filter(|c| c.guideline() == Some(style.name()))
                .count();
            assert_eq!(n, 40, "{style}");
        }
        assert!(styled.test.iter().all(|c| c.guideline().is_some()));
        assert_eq!(styled.answer_only.len(), 4 * 20);
        let seen: HashSet<&str> = styled
            .train
            .iter()
            .chain(&styled.validation)
            .chain(&styled.test)
            .map(|c| c.question())
            .collect();
        for case in &styled.answer_only {
            assert!(case.reasoning().is_empty() && case.guideline().is_none());
            assert!(!seen.contains(case.question()), "{}", case.id());
        }
        assert_eq!(styled.answer_only[0].id(), "cardiology-answers-000000");
    }

    #[test]
    fn image_cases_draw_one_finding_and_write_the_rest() {
        let spec = spec(4, 12, 4, 4);
        let (splits, images) = generate_with_images(&spec).unwrap();
        let plain = generate(&spec).unwrap();
        let vocabulary: BTreeSet<String> = vocabulary().into_iter().collect();
        // What each specialty's image shows, absent from every image question.
        let drawn = [
            ("cardiology", &["ECG", "ST"][..]),
            (
                "radiology",
                &["margin", "circumscribed", "spiculated", "irregular"][..],
            ),
            (
                "dermatology",
                &["asymmetric", "symmetric", "border", "color", "colors"][..],
            ),
            ("pathology", &["pleomorphism"][..]),
        ];
        for (case, text) in all(&splits).zip(all(&plain)) {
            // The same cases (answer, options, reasoning), the question shorter.
            assert_eq!(case.answer(), text.answer());
            assert_eq!(case.options(), text.options());
            assert_eq!(case.reasoning(), text.reasoning());
            assert!(case.question().len() < text.question().len());
            let shown = drawn
                .iter()
                .find(|(s, _)| *s == case.specialty())
                .unwrap()
                .1;
            let question = words(case.question());
            for w in shown {
                assert!(
                    !question.contains(&w.to_string()),
                    "`{w}` in {}",
                    case.question()
                );
            }
            for w in &question {
                assert!(vocabulary.contains(w), "`{w}` is not in the vocabulary");
            }
            assert_eq!(case.image(), Some(Path::new(&image_path(case.id()))));
            let image = &images[case.id()];
            assert_eq!(image.dimensions(), (picture::SIDE, picture::SIDE));
        }
        assert_eq!(images.len(), all(&splits).count());
        // The same seed draws the same cases and images.
        let (again, again_images) = generate_with_images(&spec).unwrap();
        assert_eq!(again, splits);
        assert_eq!(again_images, images);
    }

    #[test]
    fn too_many_cases_is_an_error() {
        let err = generate(&spec(0, MAX_PER_SPECIALTY, 1, 0)).unwrap_err();
        assert!(matches!(err, Error::Synth { .. }));
        assert!(err.to_string().contains("more than 8000"), "{err}");
        assert!(generate(&spec(0, usize::MAX, 1, 1)).is_err());
        let empty = generate(&spec(0, 0, 0, 0)).unwrap();
        assert!(empty.train.is_empty() && empty.test.is_empty());
    }

    #[test]
    fn the_largest_allowed_set_can_be_drawn() {
        let splits = generate(&spec(1, MAX_PER_SPECIALTY - 400, 200, 200)).unwrap();
        assert_eq!(splits.train.len(), 4 * (MAX_PER_SPECIALTY - 400));
    }
}
