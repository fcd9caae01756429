//! What a sweep's trials add up to: `results.json`, `results.csv` (one row per trial, one column
//! per swept parameter) and `scores.svg` (validation score against each numeric parameter, one
//! series per method), rewritten from every recorded trial after each run and by `--gather`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::TrialResult;
use crate::error::Result;
use crate::sweep::file::Sweep;
use crate::tensor::write_atomic;

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

fn number(v: Option<f64>) -> String {
    v.map_or(String::new(), |x| format!("{x}"))
}

pub(super) fn json_text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The results as CSV: one row per trial, one column per swept parameter.
pub fn results_csv(results: &[TrialResult]) -> String {
    let params: BTreeSet<String> = results
        .iter()
        .filter_map(|r| r.settings["parameters"].as_object())
        .flat_map(|p| p.keys().cloned())
        .collect();
    let mut header = vec!["index", "id", "method", "output", "space", "rank"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    header.extend(params.iter().cloned());
    header.extend(
        [
            "sign_conflict",
            "retained_energy",
            "validation",
            "test",
            "seconds",
            "error",
        ]
        .map(String::from),
    );
    let mut out = header
        .iter()
        .map(|h| csv_field(h))
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    for r in results {
        let mut row = vec![
            r.index.to_string(),
            r.id.clone(),
            r.method.clone(),
            json_text(&r.settings["output"]),
            json_text(&r.settings["space"]),
            json_text(&r.settings["rank"]),
        ];
        row.extend(
            params
                .iter()
                .map(|p| json_text(&r.settings["parameters"][p])),
        );
        row.extend([
            number(r.sign_conflict),
            number(r.retained_mean()),
            number(r.validation),
            number(r.test),
            format!("{:.4}", r.seconds),
            r.error.clone().unwrap_or_default(),
        ]);
        out.push_str(
            &row.iter()
                .map(|f| csv_field(f))
                .collect::<Vec<_>>()
                .join(","),
        );
        out.push('\n');
    }
    out
}

pub(super) fn write_summaries(
    sweep: &Sweep,
    out: &Path,
    results: &[TrialResult],
) -> Result<Vec<PathBuf>> {
    let json_path = out.join("results.json");
    let document = json!({
        "sweep": sweep.path.display().to_string(),
        "tool": {"name": "mmx", "version": env!("CARGO_PKG_VERSION")},
        "trials": results,
    });
    write_atomic(
        &json_path,
        &serde_json::to_vec_pretty(&document).expect("JSON serialises"),
    )?;
    let csv_path = out.join("results.csv");
    write_atomic(&csv_path, results_csv(results).as_bytes())?;
    let mut files = vec![json_path, csv_path];
    if let Some(plot) = plot_scores(out, results)? {
        files.push(plot);
    }
    Ok(files)
}

/// `scores.svg`: validation score against each numeric swept parameter, one series per method.
fn plot_scores(out: &Path, results: &[TrialResult]) -> Result<Option<PathBuf>> {
    let scored: Vec<&TrialResult> = results.iter().filter(|r| r.validation.is_some()).collect();
    let names: BTreeSet<String> = scored
        .iter()
        .filter_map(|r| r.settings["parameters"].as_object())
        .flat_map(|p| {
            p.iter()
                .filter(|(_, v)| v.is_number())
                .map(|(k, _)| k.clone())
        })
        .collect();
    if scored.is_empty() || names.is_empty() {
        return Ok(None);
    }
    let panels: Vec<crate::plot::Panel> = names
        .iter()
        .map(|name| {
            let mut by_method: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
            for r in &scored {
                if let (Some(x), Some(y)) = (r.parameter(name), r.validation) {
                    by_method.entry(&r.method).or_default().push((x, y));
                }
            }
            crate::plot::Panel {
                x_label: name.clone(),
                y_label: "validation score".to_string(),
                series: by_method
                    .into_iter()
                    .map(|(method, mut points)| {
                        points.sort_by(|a, b| a.0.total_cmp(&b.0));
                        crate::plot::Series {
                            name: method.to_string(),
                            points,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let path = out.join("scores.svg");
    crate::plot::scatter_panels(&path, "sweep: score against each parameter", &panels)?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_it() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
