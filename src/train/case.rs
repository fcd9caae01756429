//! [`Case`], one multiple-choice clinical case with its step-by-step reasoning, and the case
//! files that hold them (DESIGN.md §7): JSON Lines, one case per line.
//!
//! ```text
//! {"id":"cardiology-train-000007","specialty":"cardiology","question":"A 64 year old man ...",
//!  "options":["NSTEMI","stable angina","STEMI","unstable angina"],"answer":"C",
//!  "reasoning":["troponin 38 ng/L is above 14 ng/L","...","so: STEMI"],"synthetic":true}
//! ```
//!
//! Each line is parsed into a wire struct that refuses unknown fields, then validated into a
//! [`Case`]: the answer is a letter that indexes the options, nothing is empty, ids are unique
//! within a file. Every error names the file and the 1-based line ([`Error::Data`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tensor::write_atomic;

/// The letters that name options, in order; a case has at most this many options.
const LETTERS: [char; 8] = ['A', 'B', 'C', 'D', 'E', 'F', 'G', 'H'];
/// The fewest options a case may have.
const MIN_OPTIONS: usize = 2;

/// The letter of the option at `index` (`0` is `A`), or `None` past the last letter (`H`).
pub fn option_letter(index: usize) -> Option<char> {
    LETTERS.get(index).copied()
}

/// One line of a case file, as written.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CaseLine {
    pub(crate) id: String,
    pub(crate) specialty: String,
    pub(crate) question: String,
    pub(crate) options: Vec<String>,
    pub(crate) answer: String,
    /// Empty (or absent) for an answer-only case.
    #[serde(default)]
    pub(crate) reasoning: Vec<String>,
    /// An image file (PNG, JPEG), relative to the case file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) image_embeds: Option<String>,
    #[serde(default)]
    pub(crate) synthetic: bool,
    /// The guideline the reasoning is written under (its prompt carries `Guideline: <name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) guideline: Option<String>,
}

/// A validated case: a question, 2 to 8 options, the letter of the right one, and the
/// reasoning that leads to it (none for an answer-only case), optionally written under a
/// named guideline. Two cases are equal when their contents are, wherever they were read
/// from.
#[derive(Debug, Clone)]
pub struct Case {
    id: String,
    specialty: String,
    question: String,
    options: Vec<String>,
    answer: usize,
    reasoning: Vec<String>,
    image: Option<String>,
    image_embeds: Option<String>,
    synthetic: bool,
    guideline: Option<String>,
    /// The directory of the file the case was read from: its image paths are relative to it.
    dir: Option<PathBuf>,
}

impl PartialEq for Case {
    fn eq(&self, other: &Self) -> bool {
        // Every field but `dir`, which says where the case was read, not what it is (written
        // out, so that a new field cannot be left out unnoticed).
        let Case {
            id,
            specialty,
            question,
            options,
            answer,
            reasoning,
            image,
            image_embeds,
            synthetic,
            guideline,
            dir: _,
        } = self;
        (id, specialty, question, options, answer, reasoning)
            == (
                &other.id,
                &other.specialty,
                &other.question,
                &other.options,
                &other.answer,
                &other.reasoning,
            )
            && (image, image_embeds, synthetic, guideline)
                == (
                    &other.image,
                    &other.image_embeds,
                    &other.synthetic,
                    &other.guideline,
                )
    }
}

impl Eq for Case {}

impl Case {
    /// Validates a wire line; the error becomes the message of an [`Error::Data`].
    pub(crate) fn from_line(line: CaseLine) -> std::result::Result<Case, CaseError> {
        non_empty("`id`", &line.id)?;
        one_line("`id`", &line.id)?;
        non_empty("`specialty`", &line.specialty)?;
        one_line("`specialty`", &line.specialty)?;
        non_empty("`question`", &line.question)?;
        let count = line.options.len();
        if !(MIN_OPTIONS..=LETTERS.len()).contains(&count) {
            return Err(CaseError::OptionCount(count));
        }
        for (i, option) in line.options.iter().enumerate() {
            let name = format!("`options` entry {}", i + 1);
            non_empty(&name, option)?;
            one_line(&name, option)?;
            if let Some(j) = line.options[..i].iter().position(|o| o == option) {
                return Err(CaseError::RepeatedOption {
                    entry: i + 1,
                    first: j + 1,
                    option: option.clone(),
                });
            }
        }
        let last = LETTERS[count - 1];
        let answer = match line.answer.chars().collect::<Vec<_>>()[..] {
            [letter] => LETTERS[..count].iter().position(|&l| l == letter),
            _ => None,
        }
        .ok_or_else(|| CaseError::Answer {
            answer: line.answer.clone(),
            last,
            count,
        })?;
        for (i, step) in line.reasoning.iter().enumerate() {
            let name = format!("`reasoning` step {}", i + 1);
            non_empty(&name, step)?;
            one_line(&name, step)?;
        }
        if let Some(path) = &line.image {
            non_empty("`image`", path)?;
        }
        if let Some(path) = &line.image_embeds {
            non_empty("`image_embeds`", path)?;
        }
        if let Some(name) = &line.guideline {
            non_empty("`guideline`", name)?;
            one_line("`guideline`", name)?;
        }
        Ok(Case {
            id: line.id,
            specialty: line.specialty,
            question: line.question,
            options: line.options,
            answer,
            reasoning: line.reasoning,
            image: line.image,
            image_embeds: line.image_embeds,
            synthetic: line.synthetic,
            guideline: line.guideline,
            dir: None,
        })
    }

    /// The wire form of this case.
    fn to_line(&self) -> CaseLine {
        CaseLine {
            id: self.id.clone(),
            specialty: self.specialty.clone(),
            question: self.question.clone(),
            options: self.options.clone(),
            answer: self.answer_letter().to_string(),
            reasoning: self.reasoning.clone(),
            image: self.image.clone(),
            image_embeds: self.image_embeds.clone(),
            synthetic: self.synthetic,
            guideline: self.guideline.clone(),
        }
    }

    /// The case's id, unique within its file.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The specialty (`cardiology`, `radiology`, ...).
    pub fn specialty(&self) -> &str {
        &self.specialty
    }

    /// The question text.
    pub fn question(&self) -> &str {
        &self.question
    }

    /// The options, in the order their letters name them.
    pub fn options(&self) -> &[String] {
        &self.options
    }

    /// The index of the right option.
    pub fn answer(&self) -> usize {
        self.answer
    }

    /// The letter of the right option.
    pub fn answer_letter(&self) -> char {
        LETTERS[self.answer]
    }

    /// The text of the right option.
    pub fn answer_text(&self) -> &str {
        &self.options[self.answer]
    }

    /// The reasoning steps, in order; each is one line.
    pub fn reasoning(&self) -> &[String] {
        &self.reasoning
    }

    /// Whether the case shows an image (a file, or its vision features).
    pub fn has_image(&self) -> bool {
        self.image.is_some() || self.image_embeds.is_some()
    }

    /// The case's image file (relative to its case file), if it has one.
    pub fn image(&self) -> Option<&Path> {
        self.image.as_deref().map(Path::new)
    }

    /// The safetensors file of precomputed vision features, if the case has an image.
    pub fn image_embeds(&self) -> Option<&Path> {
        self.image_embeds.as_deref().map(Path::new)
    }

    /// The case's image file as the process can open it (resolved against the directory of
    /// the case file it was read from).
    pub fn image_file(&self) -> Option<PathBuf> {
        self.image().map(|p| self.resolve(p))
    }

    /// The case's `image_embeds` file as the process can open it.
    pub fn image_embeds_file(&self) -> Option<PathBuf> {
        self.image_embeds().map(|p| self.resolve(p))
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        match &self.dir {
            Some(dir) => dir.join(path),
            None => path.to_path_buf(),
        }
    }

    /// The same case with its vision features in `path` (relative to its case file).
    pub fn with_image_embeds(&self, path: &str) -> Case {
        Case {
            image_embeds: Some(path.to_string()),
            ..self.clone()
        }
    }

    /// The same case with its image at `path` (relative to the case file it will be in).
    pub fn with_image(&self, path: &str) -> Case {
        Case {
            image: Some(path.to_string()),
            ..self.clone()
        }
    }

    /// Whether the case was generated rather than taken from real records.
    pub fn is_synthetic(&self) -> bool {
        self.synthetic
    }

    /// The guideline its reasoning is written under, if any.
    pub fn guideline(&self) -> Option<&str> {
        self.guideline.as_deref()
    }

    /// The same case with its reasoning dropped: an answer-only case.
    pub fn answer_only(&self) -> Case {
        Case {
            reasoning: Vec::new(),
            guideline: None,
            ..self.clone()
        }
    }
}

/// Why a case line was refused; fields are named as messages name them: "`id`",
/// "`options` entry 2".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaseError {
    /// A field that must hold text is empty.
    #[error("{0} is empty")]
    Empty(String),
    /// A field rendered on one line holds a line break.
    #[error("{0} has a line break")]
    LineBreak(String),
    /// Too few or too many options.
    #[error("`options` has {0} entries, expected {MIN_OPTIONS} to {max}", max = LETTERS.len())]
    OptionCount(usize),
    /// The same option twice.
    #[error("`options` entry {entry} repeats entry {first} (`{option}`)")]
    RepeatedOption {
        /// The later entry (from 1).
        entry: usize,
        /// The earlier one.
        first: usize,
        /// The option.
        option: String,
    },
    /// An answer that is not one of the options' letters.
    #[error("`answer` is `{answer}`, expected a letter from `A` to `{last}` ({count} options)")]
    Answer {
        /// The answer given.
        answer: String,
        /// The last option's letter.
        last: char,
        /// How many options there are.
        count: usize,
    },
}

/// `what` names the field as messages do: "`id`", "`options` entry 2".
fn non_empty(what: &str, text: &str) -> std::result::Result<(), CaseError> {
    if text.trim().is_empty() {
        return Err(CaseError::Empty(what.to_string()));
    }
    Ok(())
}

/// Options and steps are rendered one per line, so a line break inside one would split it.
fn one_line(what: &str, text: &str) -> std::result::Result<(), CaseError> {
    if text.contains(['\n', '\r']) {
        return Err(CaseError::LineBreak(what.to_string()));
    }
    Ok(())
}

/// Reads and validates a case file. Case `i` of the result is on line `i + 1`.
pub fn read_cases(path: &Path) -> Result<Vec<Case>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_cases(path, &bytes)
}

/// Parses a case file's bytes; `path` is for the messages and roots image paths.
pub fn parse_cases(path: &Path, bytes: &[u8]) -> Result<Vec<Case>> {
    let fail = |line: usize, message: String| Error::Data {
        path: path.to_path_buf(),
        line,
        message,
    };
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    // One newline may end the file; any other empty line is an error.
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut cases = Vec::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (index, raw) in body.split(|&b| b == b'\n').enumerate() {
        let number = index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = std::str::from_utf8(raw).map_err(|e| {
            fail(
                number,
                format!("not valid UTF-8 (byte {})", e.valid_up_to()),
            )
        })?;
        if text.trim().is_empty() {
            return Err(fail(
                number,
                "empty line (a case file has one case on every line, and no blank lines)"
                    .to_string(),
            ));
        }
        let line: CaseLine =
            serde_json::from_str(text).map_err(|e| fail(number, json_message(&e)))?;
        let mut case =
            Case::from_line(line).map_err(|message| fail(number, message.to_string()))?;
        case.dir = path.parent().map(Path::to_path_buf);
        if let Some(first) = first_line.insert(case.id.clone(), number) {
            return Err(fail(
                number,
                format!("duplicate `id` `{}` (first on line {first})", case.id),
            ));
        }
        cases.push(case);
    }
    Ok(cases)
}

/// serde_json's message with the column, without its "line 1" (every case is on line 1 of
/// its own JSON text, which would contradict the file line the error names).
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    let message = text.strip_suffix(&position).unwrap_or(&text);
    format!("invalid case: {message} (column {})", e.column())
}

/// Every case of `files`, in their order.
pub fn read_case_files(files: &[PathBuf]) -> Result<Vec<Case>> {
    let mut all = Vec::new();
    for file in files {
        all.extend(read_cases(file)?);
    }
    Ok(all)
}

/// Writes cases to a file atomically, one per line in the given order, each line ending in a
/// newline. Ids must be unique; the file's directory must exist.
pub fn write_cases(path: &Path, cases: &[Case]) -> Result<()> {
    let mut text = String::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (index, case) in cases.iter().enumerate() {
        if let Some(first) = seen.insert(&case.id, index + 1) {
            return Err(Error::Data {
                path: PathBuf::from(path),
                line: index + 1,
                message: format!("duplicate `id` `{}` (first on line {first})", case.id),
            });
        }
        // A struct of strings, lists of strings and a bool always serialises.
        let line = serde_json::to_string(&case.to_line()).map_err(|e| Error::Data {
            path: PathBuf::from(path),
            line: index + 1,
            message: e.to_string(),
        })?;
        text.push_str(&line);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"id":"c1","specialty":"cardiology","question":"Chest pain?","options":["STEMI","NSTEMI","stable angina"],"answer":"B","reasoning":["troponin high","no ST elevation","so: NSTEMI"]}"#;

    /// The error message for a file made of `lines`, each followed by a newline.
    fn error(lines: &[&str]) -> String {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let err = parse_cases(Path::new("cases.jsonl"), text.as_bytes()).unwrap_err();
        assert!(matches!(err, Error::Data { .. }), "{err:?}");
        err.to_string()
    }

    /// `GOOD` with one field's JSON replaced (or removed, with `None`).
    fn with(field: &str, value: Option<&str>) -> String {
        let mut map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(GOOD).unwrap();
        match value {
            Some(v) => map.insert(field.to_string(), serde_json::from_str(v).unwrap()),
            None => map.remove(field),
        };
        serde_json::to_string(&map).unwrap()
    }

    fn assert_names(message: &str, needles: &[&str]) {
        for needle in needles {
            assert!(message.contains(needle), "`{needle}` not in: {message}");
        }
    }

    #[test]
    fn reads_a_good_file() {
        let id2 = with("id", Some(r#""c2""#));
        let text = format!("{GOOD}\n{id2}");
        let cases = parse_cases(Path::new("x.jsonl"), text.as_bytes()).unwrap();
        assert_eq!(cases.len(), 2);
        let case = &cases[0];
        assert_eq!(case.answer(), 1);
        assert_eq!(case.answer_letter(), 'B');
        assert_eq!(case.answer_text(), "NSTEMI");
        assert_eq!(case.reasoning().len(), 3);
        assert!(!case.is_synthetic(), "`synthetic` defaults to false");
        assert_eq!(case.image_embeds(), None);
        assert_eq!(cases[1].id(), "c2");
    }

    #[test]
    fn bad_json_names_its_line() {
        let message = error(&[GOOD, r#"{"id": "c2", "specialty": "#]);
        assert_names(&message, &["`cases.jsonl` line 2:", "column"]);
        assert!(!message.contains("line 1"), "{message}");
    }

    #[test]
    fn unknown_field_names_its_line_and_field() {
        let extra = with("diagnosis", Some(r#""STEMI""#));
        assert_names(&error(&[&extra]), &["line 1:", "unknown field `diagnosis`"]);
    }

    #[test]
    fn answer_out_of_range_names_its_line_and_field() {
        let second = with("id", Some(r#""c2""#));
        let bad = with("answer", Some(r#""D""#)).replace("\"c1\"", "\"c3\"");
        let message = error(&[GOOD, &second, &bad]);
        assert_names(&message, &["line 3:", "`answer` is `D`", "`A` to `C`"]);
        for answer in [r#""a""#, r#""AB""#, r#""""#, r#""1""#] {
            let message = error(&[&with("answer", Some(answer))]);
            assert_names(&message, &["line 1:", "`answer`"]);
        }
    }

    #[test]
    fn duplicate_id_names_both_lines() {
        let second = with("question", Some(r#""Another question""#));
        let message = error(&[GOOD, &with("id", Some(r#""c2""#)), &second]);
        assert_names(&message, &["line 3:", "duplicate `id` `c1`", "line 1"]);
    }

    #[test]
    fn answer_only_cases_and_guidelines_read_and_write_back() {
        let text = format!(
            "{}\n{}\n",
            with("reasoning", None),
            with("guideline", Some(r#""bayesian""#)).replace("c1", "c2")
        );
        let cases = parse_cases(Path::new("cases.jsonl"), text.as_bytes()).unwrap();
        assert!(cases[0].reasoning().is_empty() && cases[0].guideline().is_none());
        assert_eq!(cases[1].guideline(), Some("bayesian"));
        assert_eq!(cases[1].answer_only().reasoning().len(), 0);
        let line = serde_json::to_string(&cases[1].to_line()).unwrap();
        assert!(line.contains(r#""guideline":"bayesian""#), "{line}");
        let blank = error(&[&with("guideline", Some(r#""  ""#))]);
        assert_names(&blank, &["line 1:", "`guideline` is empty"]);
    }

    #[test]
    fn bad_reasoning_steps_name_their_line_and_field() {
        let blank_step = error(&[&with("reasoning", Some(r#"["a", " "]"#))]);
        assert_names(&blank_step, &["line 1:", "`reasoning` step 2 is empty"]);
        let split_step = error(&[&with("reasoning", Some(r#"["a\nb"]"#))]);
        assert_names(&split_step, &["`reasoning` step 1 has a line break"]);
    }

    #[test]
    fn options_are_checked() {
        let one = error(&[&with("options", Some(r#"["STEMI"]"#))]);
        assert_names(
            &one,
            &["line 1:", "`options` has 1 entries, expected 2 to 8"],
        );
        let nine = r#"["a","b","c","d","e","f","g","h","i"]"#;
        assert_names(
            &error(&[&with("options", Some(nine))]),
            &["`options` has 9"],
        );
        let repeated = error(&[&with("options", Some(r#"["a","b","a"]"#))]);
        assert_names(&repeated, &["`options` entry 3 repeats entry 1"]);
        let blank = error(&[&with("options", Some(r#"["a",""]"#))]);
        assert_names(&blank, &["`options` entry 2 is empty"]);
    }

    #[test]
    fn empty_question_and_wrong_types_are_refused() {
        assert_names(
            &error(&[&with("question", Some(r#""  ""#))]),
            &["`question` is empty"],
        );
        assert_names(
            &error(&[&with("synthetic", Some(r#""yes""#))]),
            &["line 1:", "invalid type"],
        );
    }

    #[test]
    fn only_a_final_newline_may_be_empty() {
        let no_final_newline = parse_cases(Path::new("x"), GOOD.as_bytes()).unwrap();
        assert_eq!(no_final_newline.len(), 1);
        assert!(parse_cases(Path::new("x"), b"").unwrap().is_empty());
        let second = with("id", Some(r#""c2""#));
        let message = error(&[GOOD, "", &second]);
        assert_names(&message, &["line 2:", "empty line"]);
        assert_names(&error(&[GOOD, ""]), &["line 2:", "empty line"]);
        assert_names(&error(&[""]), &["line 1:", "empty line"]);
    }

    #[test]
    fn invalid_utf8_names_its_line() {
        let mut bytes = format!("{GOOD}\n").into_bytes();
        bytes.extend_from_slice(b"{\"id\": \"\xff\"}\n");
        let err = parse_cases(Path::new("x"), &bytes).unwrap_err().to_string();
        assert_names(&err, &["line 2:", "not valid UTF-8"]);
    }

    #[test]
    fn written_files_read_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cases.jsonl");
        let image = with("image_embeds", Some(r#""img/c2.safetensors""#)).replace("c1", "c2");
        let synthetic = with("synthetic", Some("true")).replace("c1", "c3");
        let text = format!("{GOOD}\n{image}\n{synthetic}\n");
        let cases = parse_cases(&path, text.as_bytes()).unwrap();
        write_cases(&path, &cases).unwrap();
        let back = read_cases(&path).unwrap();
        assert_eq!(back, cases);
        assert_eq!(
            back[1].image_embeds(),
            Some(Path::new("img/c2.safetensors"))
        );
        assert!(back[2].is_synthetic());
        let written = std::fs::read_to_string(&path).unwrap();
        assert_eq!(written.lines().count(), 3);
        assert!(written.ends_with("}\n"));
    }

    #[test]
    fn writing_refuses_duplicate_ids_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cases.jsonl");
        let case = parse_cases(&path, GOOD.as_bytes()).unwrap().remove(0);
        let err = write_cases(&path, &[case.clone(), case]).unwrap_err();
        assert_names(&err.to_string(), &["line 2:", "duplicate `id` `c1`"]);
        assert!(!path.exists());
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_it() {
        let err = read_cases(Path::new("/nonexistent/cases.jsonl")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/cases.jsonl"));
    }

    #[test]
    fn image_paths_resolve_against_the_case_file_and_equality_ignores_where_it_was() {
        let line = with("image", Some(r#""img/c1.png""#));
        let cases = parse_cases(Path::new("data/cardiology/train.jsonl"), line.as_bytes()).unwrap();
        assert_eq!(
            cases[0].image_file(),
            Some(PathBuf::from("data/cardiology/img/c1.png"))
        );
        assert_eq!(cases[0].image(), Some(Path::new("img/c1.png")));
        let elsewhere = parse_cases(Path::new("other.jsonl"), line.as_bytes()).unwrap();
        assert_eq!(elsewhere[0].image_file(), Some(PathBuf::from("img/c1.png")));
        assert_eq!(cases, elsewhere);
    }
}
