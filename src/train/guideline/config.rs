//! `guidelines.toml`: the guidelines GBA draws rollouts under, each with the line its prompts
//! carry, its format check (line patterns that must appear in order), its adherence check (a
//! [`Style`]) and its prior per specialty (the share of a case's rollouts drawn under it).
//!
//! ```toml
//! [[guideline]]
//! name = "differential"
//! prompt = "Guideline: differential"       # the line the model is conditioned on
//! format = ['^differential: .+ or .+$', '^exclude .+: .+$', '^so: .+$']
//! adherence = "differential"               # differential | analytical | bayesian | intuitive
//! prior = { cardiology = 0.4, default = 0.25 }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;

use super::{canonical, Style};
use crate::error::{Error, Result};
use crate::train::parse_answer;

/// The specialty key of a prior that applies to every specialty not listed.
pub const DEFAULT_PRIOR: &str = "default";

/// One guideline.
#[derive(Debug, Clone)]
pub struct Guideline {
    /// Its name, as in the metrics (`reward/differential/mean`).
    pub name: String,
    /// The line inserted into the prompt before `Reasoning:`.
    pub prompt: String,
    /// Line patterns a well-formed reasoning under it has, in this order.
    pub format: Vec<Regex>,
    /// The style its adherence is checked against.
    pub adherence: Style,
    /// Its share of rollouts per specialty (and under [`DEFAULT_PRIOR`]).
    pub prior: BTreeMap<String, f64>,
}

impl Guideline {
    /// Whether `text` (a decoded completion) has every format line in order and ends with a
    /// readable answer.
    pub fn format_ok(&self, text: &str) -> bool {
        let text = canonical(text);
        let mut lines = text.lines().map(str::trim);
        let in_order = self
            .format
            .iter()
            .all(|pattern| lines.by_ref().any(|l| pattern.is_match(l)));
        in_order && parse_answer(&text).is_some()
    }

    /// Its prior for `specialty` (else the default, else 0).
    pub fn prior_for(&self, specialty: &str) -> f64 {
        self.prior
            .get(specialty)
            .or_else(|| self.prior.get(DEFAULT_PRIOR))
            .copied()
            .unwrap_or(0.0)
    }
}

/// The guidelines of a file, in its order.
#[derive(Debug, Clone)]
pub struct Guidelines {
    /// The file read.
    pub path: PathBuf,
    /// Its text (recorded in the lineage of what it trains).
    pub text: String,
    /// The guidelines.
    pub guidelines: Vec<Guideline>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    guideline: Vec<WireGuideline>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireGuideline {
    name: String,
    prompt: Option<String>,
    format: Vec<String>,
    adherence: String,
    prior: BTreeMap<String, f64>,
}

impl Guidelines {
    /// Reads and checks a guidelines file.
    pub fn load(path: &Path) -> Result<Guidelines> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, text)
    }

    /// Checks the text of a guidelines file read from `path`.
    pub fn parse(path: &Path, text: String) -> Result<Guidelines> {
        let fail = |message: String| Error::Recipe {
            path: path.to_path_buf(),
            message,
        };
        let wire: Wire = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
        let mut guidelines = Vec::with_capacity(wire.guideline.len());
        for g in wire.guideline {
            let at = format!("guideline `{}`", g.name);
            if g.name.is_empty() || g.name.contains(char::is_whitespace) || g.name.contains('/') {
                return Err(fail(format!(
                    "{at}: a name is one word without `/` (it names metrics)"
                )));
            }
            if guidelines.iter().any(|o: &Guideline| o.name == g.name) {
                return Err(fail(format!("{at} is defined twice")));
            }
            let adherence = Style::from_name(&g.adherence).ok_or_else(|| {
                fail(format!(
                    "{at}: `adherence = \"{}\"` is not one of differential, analytical, bayesian, intuitive",
                    g.adherence
                ))
            })?;
            let format = g
                .format
                .iter()
                .map(|p| {
                    Regex::new(p)
                        .map_err(|e| fail(format!("{at}: format pattern `{p}` is invalid: {e}")))
                })
                .collect::<Result<Vec<_>>>()?;
            if let Some((s, p)) = g.prior.iter().find(|(_, p)| !(p.is_finite() && **p >= 0.0)) {
                return Err(fail(format!(
                    "{at}: the prior for `{s}` is {p}, expected a share at or above 0"
                )));
            }
            let prompt = g.prompt.unwrap_or_else(|| adherence.default_prompt());
            if prompt.contains('\n') || prompt.trim().is_empty() {
                return Err(fail(format!("{at}: `prompt` is one non-empty line")));
            }
            guidelines.push(Guideline {
                name: g.name,
                prompt,
                format,
                adherence,
                prior: g.prior,
            });
        }
        if guidelines.is_empty() {
            return Err(fail("no `[[guideline]]`".into()));
        }
        Ok(Guidelines {
            path: path.to_path_buf(),
            text,
            guidelines,
        })
    }

    /// How many of a case's `k` rollouts each guideline draws for `specialty`: `k` split by the
    /// priors, largest remainders first (ties to the earlier guideline). Fails when every
    /// prior of the specialty is 0.
    pub fn split(&self, specialty: &str, k: usize) -> Result<Vec<usize>> {
        let priors: Vec<f64> = self
            .guidelines
            .iter()
            .map(|g| g.prior_for(specialty))
            .collect();
        let total: f64 = priors.iter().sum();
        if total <= 0.0 {
            return Err(Error::Recipe {
                path: self.path.clone(),
                message: format!("no guideline has a prior above 0 for `{specialty}`"),
            });
        }
        let exact: Vec<f64> = priors.iter().map(|p| p / total * k as f64).collect();
        let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
        let mut order: Vec<usize> = (0..counts.len()).collect();
        order.sort_by(|&a, &b| {
            let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
            rb.total_cmp(&ra).then(a.cmp(&b))
        });
        let missing = k - counts.iter().sum::<usize>();
        for &i in order.iter().take(missing) {
            counts[i] += 1;
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[guideline]]
name = "differential"
format = ['^differential: .+ or .+$', '^exclude .+: .+$', '^so: .+$']
adherence = "differential"
prior = { cardiology = 0.5, default = 0.25 }

[[guideline]]
name = "intuitive"
prompt = "Guideline: intuitive"
format = ['^pattern: .+$', '^confirm: .+$', '^so: .+$']
adherence = "intuitive"
prior = { cardiology = 0.25, default = 0.75 }
"#;

    fn parse(text: &str) -> Result<Guidelines> {
        Guidelines::parse(Path::new("g.toml"), text.to_string())
    }

    #[test]
    fn priors_split_the_rollouts_by_largest_remainder() {
        let g = parse(FILE).unwrap();
        assert_eq!(g.guidelines[0].prompt, "Guideline: differential");
        // cardiology 2:1 of 8 -> 5.33, 2.67 -> 5, 3; others 1:3 -> 2, 6.
        assert_eq!(g.split("cardiology", 8).unwrap(), [5, 3]);
        assert_eq!(g.split("radiology", 8).unwrap(), [2, 6]);
        assert_eq!(g.split("radiology", 1).unwrap(), [0, 1]);
        assert_eq!(g.split("radiology", 0).unwrap(), [0, 0]);
    }

    #[test]
    fn the_format_check_reads_lines_in_order() {
        let g = parse(FILE).unwrap();
        let d = &g.guidelines[0];
        let good = "differential : STEMI or NSTEMI\nECG shows no ST change\nexclude STEMI : ECG shows no ST change\nso : NSTEMI\nAnswer : B";
        assert!(d.format_ok(good));
        let reordered = "exclude STEMI: x\ndifferential: STEMI or NSTEMI\nso: NSTEMI\nAnswer: B";
        assert!(!d.format_ok(reordered));
        assert!(!d.format_ok(&good.replace("Answer : B", "")));
    }

    #[test]
    fn bad_files_name_the_guideline() {
        let bad = FILE.replace("adherence = \"intuitive\"", "adherence = \"gut\"");
        let err = parse(&bad).unwrap_err().to_string();
        assert!(
            err.contains("guideline `intuitive`") && err.contains("gut"),
            "{err}"
        );
        let bad = FILE.replace("'^pattern: .+$'", "'^pattern: (.+$'");
        assert!(parse(&bad).unwrap_err().to_string().contains("invalid"));
        let bad = FILE.replace("cardiology = 0.25", "cardiology = -1.0");
        assert!(parse(&bad).unwrap_err().to_string().contains("-1"));
        let zero = FILE
            .replace("cardiology = 0.5", "cardiology = 0.0")
            .replace("cardiology = 0.25", "cardiology = 0.0");
        assert!(parse(&zero).unwrap().split("cardiology", 4).is_err());
        let twice = format!(
            "{FILE}{}",
            &FILE[FILE.find("[[guideline]]\nname = \"intuitive\"").unwrap()..]
        );
        assert!(parse(&twice).unwrap_err().to_string().contains("twice"));
        assert!(parse("x = 1").is_err());
    }
}
