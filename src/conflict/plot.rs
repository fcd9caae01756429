//! The conflict report as a figure ([`plot_report`]): where the experts' signs clash, by layer
//! and module type, and how alike their updates are.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::{place, short_labels, Report};
use crate::error::Result;
use crate::plot::{heatmaps, ColorMap, Heatmap};

/// Writes two heatmaps side by side to `path` (`.png` or `.svg`): the sign-conflict rate per
/// layer (rows, in numeric order, then `other`) and module type (columns), averaged over the
/// modules of each cell, on 0..1; and the experts' mean cosine matrix on -1..1.
pub fn plot_report(report: &Report, path: &Path) -> Result<()> {
    let title = format!(
        "expert conflicts ({} experts, {} modules)",
        report.experts.len(),
        report.modules.len()
    );
    heatmaps(path, &title, &[sign_conflicts(report), cosines(report)])
}

/// Sign-conflict rate per (layer, module type); a cell without modules stays empty.
fn sign_conflicts(report: &Report) -> Heatmap {
    let mut cells: BTreeMap<(usize, String), BTreeMap<String, (f64, usize)>> = BTreeMap::new();
    let mut kinds = BTreeSet::new();
    for m in &report.modules {
        let (layer, kind) = place(&m.module);
        // Numbered layers in numeric order, `other` last.
        let order = layer.parse::<usize>().unwrap_or(usize::MAX);
        let cell = cells
            .entry((order, layer))
            .or_default()
            .entry(kind.clone())
            .or_default();
        cell.0 += m.sign_conflict;
        cell.1 += 1;
        kinds.insert(kind);
    }
    let values = cells
        .values()
        .map(|row| {
            kinds
                .iter()
                .map(|k| row.get(k).map(|(sum, n)| sum / *n as f64))
                .collect()
        })
        .collect();
    Heatmap {
        title: "sign-conflict rate".to_string(),
        rows: cells
            .keys()
            .map(|(order, name)| {
                if *order == usize::MAX {
                    name.clone()
                } else {
                    format!("layer {name}")
                }
            })
            .collect(),
        columns: kinds.into_iter().collect(),
        values,
        range: (0.0, 1.0),
        colors: ColorMap::Sequential,
    }
}

fn cosines(report: &Report) -> Heatmap {
    let names = short_labels(&report.experts);
    Heatmap {
        title: "cosine of the experts' updates".to_string(),
        rows: names.clone(),
        columns: names,
        values: report
            .cosine
            .iter()
            .map(|row| row.iter().map(|c| Some(*c)).collect())
            .collect(),
        range: (-1.0, 1.0),
        colors: ColorMap::Diverging,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conflict::ModuleConflicts;

    fn module(name: &str, sign_conflict: f64) -> ModuleConflicts {
        ModuleConflicts {
            module: name.to_string(),
            sign_conflict,
            mean_kappa: 0.0,
            minority_mass: 0.0,
            cosine: vec![vec![1.0, -0.5], vec![-0.5, 1.0]],
            topk_overlap: vec![vec![1.0, 0.0], vec![0.0, 1.0]],
            norms: vec![1.0, 1.0],
            retained_energy: None,
        }
    }

    fn report(modules: Vec<ModuleConflicts>) -> Report {
        Report {
            experts: vec!["a".to_string(), "b".to_string()],
            modules,
            by_layer: vec![],
            by_type: vec![],
            cosine: vec![vec![1.0, -0.5], vec![-0.5, 1.0]],
            retained_energy: None,
        }
    }

    #[test]
    fn layers_in_numeric_order_types_as_columns_cells_averaged() {
        let r = report(vec![
            module("model.layers.10.self_attn.q_proj.weight", 0.2),
            module("model.layers.2.self_attn.q_proj.weight", 0.4),
            module("model.layers.2.mlp.experts.0.down_proj.weight", 0.1),
            module("model.layers.2.mlp.experts.1.down_proj.weight", 0.3),
            module("lm_head.weight", 0.9),
        ]);
        let h = sign_conflicts(&r);
        assert_eq!(h.rows, ["layer 2", "layer 10", "other"]);
        assert_eq!(h.columns, ["down_proj", "lm_head", "q_proj"]);
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-12);
        assert!(close(h.values[0][0], 0.2), "mean of 0.1 and 0.3");
        assert_eq!(h.values[0][1], None);
        assert!(close(h.values[0][2], 0.4));
        assert_eq!(h.values[1], [None, None, Some(0.2)]);
        assert_eq!(h.values[2], [None, Some(0.9), None]);
        assert_eq!(h.range, (0.0, 1.0));
        let c = cosines(&r);
        assert_eq!(c.rows, ["a", "b"]);
        assert_eq!(c.columns, ["a", "b"]);
        assert_eq!(c.values[0][1], Some(-0.5));
        assert_eq!(c.range, (-1.0, 1.0));
    }

    #[test]
    fn a_report_without_modules_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let err = plot_report(&report(vec![]), &path).unwrap_err();
        assert!(err.to_string().contains("nothing to plot"), "{err}");
        assert!(!path.exists());
    }
}
