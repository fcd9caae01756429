//! `NAME:TAG` references, validated so that a name or tag is always one safe path component.
//! Recipes name registry sources by them, so they live with the recipe.

use std::fmt;

/// The longest name or tag.
pub const MAX_COMPONENT: usize = 128;

/// A `NAME:TAG` reference.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reference {
    /// The name (`cardiology`).
    pub name: String,
    /// The tag (`v1`).
    pub tag: String,
}

/// Why a name or tag is refused, or `None` if it is fine: 1 to 128 of `A-Z a-z 0-9 . _ -`,
/// starting with a letter or digit (so never `.`, `..`, a hidden file, an option or a path).
pub fn component_problem(text: &str) -> Option<String> {
    if text.is_empty() {
        return Some("is empty".to_string());
    }
    if text.len() > MAX_COMPONENT {
        return Some(format!("is longer than {MAX_COMPONENT} characters"));
    }
    if !text.as_bytes()[0].is_ascii_alphanumeric() {
        return Some("must start with a letter or a digit".to_string());
    }
    if let Some(c) = text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Some(format!(
            "has `{c}`: only letters, digits, `.`, `_` and `-` are allowed"
        ));
    }
    None
}

/// Why a `NAME:TAG` reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// No `:` between name and tag.
    #[error("`{text}`: expected NAME:TAG, e.g. cardiology:v1")]
    NoTag {
        /// The text given.
        text: String,
    },
    /// The name or the tag is not one safe path component.
    #[error("`{text}`: the {part} `{value}` {problem}")]
    BadPart {
        /// The text given.
        text: String,
        /// `"name"` or `"tag"`.
        part: &'static str,
        /// The refused name or tag.
        value: String,
        /// What is wrong with it ([`component_problem`]).
        problem: String,
    },
}

impl Reference {
    /// Parses and validates `NAME:TAG`.
    pub fn parse(text: &str) -> Result<Reference, ReferenceError> {
        let (name, tag) = text.split_once(':').ok_or_else(|| ReferenceError::NoTag {
            text: text.to_string(),
        })?;
        for (part, value) in [("name", name), ("tag", tag)] {
            if let Some(problem) = component_problem(value) {
                return Err(ReferenceError::BadPart {
                    text: text.to_string(),
                    part,
                    value: value.to_string(),
                    problem,
                });
            }
        }
        Ok(Reference {
            name: name.to_string(),
            tag: tag.to_string(),
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_references() {
        let r = Reference::parse("tiny-med-base:v1.0_rc").unwrap();
        assert_eq!(
            (r.name.as_str(), r.tag.as_str()),
            ("tiny-med-base", "v1.0_rc")
        );
        assert_eq!(r.to_string(), "tiny-med-base:v1.0_rc");
    }

    #[test]
    fn refuses_traversal_absolute_paths_and_oversized_parts() {
        let long = "a".repeat(129);
        let bad = [
            "noTag",
            ":v1",
            "name:",
            "../etc:v1",
            "..:v1",
            "a/b:v1",
            "/abs:v1",
            "name:../../x",
            ".hidden:v1",
            "-rf:v1",
            "na me:v1",
            "name:v1:extra",
            "naïve:v1",
        ];
        for text in bad {
            assert!(Reference::parse(text).is_err(), "{text}");
        }
        assert!(Reference::parse(&format!("{long}:v1"))
            .unwrap_err()
            .to_string()
            .contains("longer than 128"));
        assert!(Reference::parse(&format!("{}:v1", &long[..128])).is_ok());
    }
}
