//! Heatmaps: [`Heatmap`] panels, laid out side by side with a colour bar each.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};
use plotters::style::FontTransform;

use super::color::{ColorMap, EMPTY};
use super::text::{
    cell_text, decimals_for, text, text_height, text_width, tick_text, FIGURE_TITLE,
    FIGURE_TITLE_H, LABEL, PAD, PANEL_TITLE, VALUE,
};
use super::{plot_error, prepare, render, DrawResult, Figure};
use crate::error::Result;

/// One heatmap: a matrix of values with row and column labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Heatmap {
    /// Drawn above the panel.
    pub title: String,
    /// One label per row, top to bottom.
    pub rows: Vec<String>,
    /// One label per column, left to right.
    pub columns: Vec<String>,
    /// `values[row][column]`; `None` (or NaN) leaves the cell empty, drawn in [`EMPTY`].
    pub values: Vec<Vec<Option<f64>>>,
    /// The values mapped onto the ends of the colour map (`lo < hi`, both finite).
    pub range: (f64, f64),
    /// The colour map.
    pub colors: ColorMap,
}

/// Writes one heatmap to `path` (`.png` or `.svg`).
pub fn heatmap(path: &Path, panel: &Heatmap) -> Result<()> {
    heatmaps(path, "", std::slice::from_ref(panel))
}

/// Writes heatmaps side by side, under `title` (none if empty), to `path` (`.png` or `.svg`).
pub fn heatmaps(path: &Path, title: &str, panels: &[Heatmap]) -> Result<()> {
    let format = prepare(path)?;
    let figure = HeatmapFigure::new(path, title, panels)?;
    render(path, format, &figure)
}

const PANEL_TITLE_H: i32 = 32;
// A heatmap's grid grows to about this size before its cells shrink.
const MAX_GRID_W: i32 = 720;
const MAX_GRID_H: i32 = 600;
const MIN_CELL: i32 = 14;
const MAX_CELL_W: i32 = 120;
const MAX_CELL_H: i32 = 30;
const BAR_GAP: i32 = 18;
const BAR_W: i32 = 16;
const BAR_MIN_H: i32 = 120;
const BAR_STEPS: i32 = 64;
const NO_DATA_H: i32 = 26;

/// Where everything of one heatmap panel goes, relative to the panel's top left corner.
#[derive(Debug, Clone)]
struct HeatmapLayout {
    width: i32,
    height: i32,
    row_label_w: i32,
    cell_w: i32,
    cell_h: i32,
    rotate_columns: bool,
    column_label_h: i32,
    show_values: bool,
    bar_h: i32,
    ticks: [(f64, String); 3],
    no_data: bool,
}

impl HeatmapLayout {
    fn new(panel: &Heatmap) -> HeatmapLayout {
        let (rows, cols) = (panel.rows.len() as i32, panel.columns.len() as i32);
        let widest = |labels: &[String], size| {
            labels
                .iter()
                .map(|l| text_width(l, size))
                .max()
                .unwrap_or(0)
        };
        let row_label_w = widest(&panel.rows, LABEL) + 10;
        let column_w = widest(&panel.columns, LABEL);
        let cells: Vec<f64> = panel
            .values
            .iter()
            .flatten()
            .filter_map(|v| v.filter(|v| !v.is_nan()))
            .collect();
        let value_w = cells
            .iter()
            .map(|v| text_width(&cell_text(*v), VALUE))
            .max()
            .unwrap_or(0);
        let cell_h = (MAX_GRID_H / rows).clamp(MIN_CELL, MAX_CELL_H);
        let budget = (MAX_GRID_W / cols).max(MIN_CELL);
        let wanted = (column_w + 12).max(value_w + 12).max(40);
        let (cell_w, rotate_columns) = if wanted <= budget.min(MAX_CELL_W) {
            (wanted, false)
        } else {
            (budget.min((value_w + 12).max(30)).max(MIN_CELL), true)
        };
        let column_label_h = if rotate_columns {
            column_w + 12
        } else {
            text_height(LABEL) + 14
        };
        let show_values = value_w + 6 <= cell_w && cell_h >= VALUE as i32 + 4;
        let (lo, hi) = panel.range;
        let decimals = decimals_for(hi - lo);
        let ticks = [hi, (lo + hi) / 2.0, lo].map(|v| (v, tick_text(v, decimals)));
        let tick_w = ticks
            .iter()
            .map(|(_, t)| text_width(t, LABEL))
            .max()
            .unwrap_or(0);
        let no_data = panel
            .values
            .iter()
            .flatten()
            .any(|v| v.is_none_or(f64::is_nan));
        let grid_w = cols * cell_w;
        let grid_h = rows * cell_h;
        let bar_h = grid_h.max(BAR_MIN_H);
        let body_w = row_label_w + grid_w + BAR_GAP + BAR_W + 6 + tick_w;
        let title_w = text_width(&panel.title, PANEL_TITLE);
        let below = column_label_h + if no_data { NO_DATA_H } else { 0 };
        HeatmapLayout {
            width: 2 * PAD + body_w.max(title_w),
            height: 2 * PAD + PANEL_TITLE_H + (grid_h + below).max(bar_h),
            row_label_w,
            cell_w,
            cell_h,
            rotate_columns,
            column_label_h,
            show_values,
            bar_h,
            ticks,
            no_data,
        }
    }

    /// The grid's top left corner.
    fn grid(&self) -> (i32, i32) {
        (PAD + self.row_label_w, PAD + PANEL_TITLE_H)
    }

    /// A cell's top left and bottom right corners (a one-pixel gap separates cells).
    fn cell(&self, row: usize, col: usize) -> ((i32, i32), (i32, i32)) {
        let (gx, gy) = self.grid();
        let x = gx + col as i32 * self.cell_w;
        let y = gy + row as i32 * self.cell_h;
        ((x, y), (x + self.cell_w - 1, y + self.cell_h - 1))
    }
}

struct HeatmapFigure<'a> {
    title: &'a str,
    panels: &'a [Heatmap],
    layouts: Vec<HeatmapLayout>,
}

impl<'a> HeatmapFigure<'a> {
    fn new(path: &Path, title: &'a str, panels: &'a [Heatmap]) -> Result<HeatmapFigure<'a>> {
        if panels.is_empty() {
            return Err(plot_error(path, "no heatmap to plot"));
        }
        for p in panels {
            let (rows, cols) = (p.rows.len(), p.columns.len());
            if rows == 0 || cols == 0 {
                return Err(plot_error(
                    path,
                    format!(
                        "heatmap `{}` is empty ({rows} rows × {cols} columns): nothing to plot",
                        p.title
                    ),
                ));
            }
            if p.values.len() != rows {
                return Err(plot_error(
                    path,
                    format!(
                        "heatmap `{}` has {} rows of values for {rows} row labels",
                        p.title,
                        p.values.len()
                    ),
                ));
            }
            if let Some((i, row)) = p.values.iter().enumerate().find(|(_, r)| r.len() != cols) {
                return Err(plot_error(
                    path,
                    format!(
                        "heatmap `{}`: row {i} has {} values for {cols} column labels",
                        p.title,
                        row.len()
                    ),
                ));
            }
            let (lo, hi) = p.range;
            if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                return Err(plot_error(
                    path,
                    format!(
                        "heatmap `{}`: the value range {lo}..{hi} must be finite and not empty",
                        p.title
                    ),
                ));
            }
        }
        Ok(HeatmapFigure {
            title,
            panels,
            layouts: panels.iter().map(HeatmapLayout::new).collect(),
        })
    }

    fn title_h(&self) -> i32 {
        if self.title.is_empty() {
            0
        } else {
            FIGURE_TITLE_H
        }
    }

    /// Each panel's top left corner.
    fn origins(&self) -> Vec<(i32, i32)> {
        let mut x = 0;
        self.layouts
            .iter()
            .map(|l| {
                let origin = (x, self.title_h());
                x += l.width;
                origin
            })
            .collect()
    }
}

impl Figure for HeatmapFigure<'_> {
    fn size(&self) -> (u32, u32) {
        let w: i32 = self.layouts.iter().map(|l| l.width).sum();
        let w = w.max(text_width(self.title, FIGURE_TITLE) + 2 * PAD);
        let h = self.layouts.iter().map(|l| l.height).max().unwrap_or(0) + self.title_h();
        (w as u32, h as u32)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        if !self.title.is_empty() {
            let (w, _) = self.size();
            let style = text(FIGURE_TITLE, BLACK, HPos::Center, VPos::Center);
            root.draw(&Text::new(
                self.title.to_string(),
                (w as i32 / 2, FIGURE_TITLE_H / 2 + 4),
                style,
            ))?;
        }
        for ((panel, layout), origin) in self.panels.iter().zip(&self.layouts).zip(self.origins()) {
            draw_heatmap(root, panel, layout, origin)?;
        }
        Ok(())
    }
}

fn draw_heatmap<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panel: &Heatmap,
    layout: &HeatmapLayout,
    (ox, oy): (i32, i32),
) -> DrawResult<DB> {
    let at = |(x, y): (i32, i32)| (ox + x, oy + y);
    let (gx, gy) = at(layout.grid());
    let grid_w = layout.cell_w * panel.columns.len() as i32;
    let grid_h = layout.cell_h * panel.rows.len() as i32;

    root.draw(&Text::new(
        panel.title.clone(),
        (gx + grid_w / 2, oy + PAD + PANEL_TITLE_H / 2 - 4),
        text(PANEL_TITLE, BLACK, HPos::Center, VPos::Center),
    ))?;
    for (r, label) in panel.rows.iter().enumerate() {
        let ((_, y0), (_, y1)) = layout.cell(r, 0);
        root.draw(&Text::new(
            label.clone(),
            (gx - 8, oy + (y0 + y1) / 2),
            text(LABEL, BLACK, HPos::Right, VPos::Center),
        ))?;
    }
    for (c, label) in panel.columns.iter().enumerate() {
        let ((x0, _), (x1, _)) = layout.cell(0, c);
        let x = ox + (x0 + x1) / 2;
        let style = if layout.rotate_columns {
            // Read bottom to top, ending just below the grid.
            text(LABEL, BLACK, HPos::Right, VPos::Center).transform(FontTransform::Rotate270)
        } else {
            text(LABEL, BLACK, HPos::Center, VPos::Top)
        };
        root.draw(&Text::new(label.clone(), (x, gy + grid_h + 6), style))?;
    }
    for (r, row) in panel.values.iter().enumerate() {
        for (c, value) in row.iter().enumerate() {
            let value = value.filter(|v| !v.is_nan());
            let color = value.map_or(EMPTY, |v| panel.colors.color(v, panel.range));
            let (a, b) = layout.cell(r, c);
            root.draw(&Rectangle::new([at(a), at(b)], color.plotters().filled()))?;
            if let (Some(v), true) = (value, layout.show_values) {
                let ink = color.ink();
                root.draw(&Text::new(
                    cell_text(v),
                    at(((a.0 + b.0) / 2, (a.1 + b.1) / 2)),
                    text(VALUE, ink, HPos::Center, VPos::Center),
                ))?;
            }
        }
    }

    // The colour bar, high end at the top, with the range's ends and middle marked.
    let bx = gx + grid_w + BAR_GAP;
    let (lo, hi) = panel.range;
    for k in 0..BAR_STEPS {
        let y0 = gy + k * layout.bar_h / BAR_STEPS;
        let y1 = gy + (k + 1) * layout.bar_h / BAR_STEPS;
        let t = 1.0 - (f64::from(k) + 0.5) / f64::from(BAR_STEPS);
        let color = panel.colors.color(lo + t * (hi - lo), panel.range);
        root.draw(&Rectangle::new(
            [(bx, y0), (bx + BAR_W, y1)],
            color.plotters().filled(),
        ))?;
    }
    root.draw(&Rectangle::new(
        [(bx, gy), (bx + BAR_W, gy + layout.bar_h)],
        BLACK.stroke_width(1),
    ))?;
    for (i, (_, label)) in layout.ticks.iter().enumerate() {
        let y = gy + i as i32 * layout.bar_h / 2;
        root.draw(&PathElement::new(
            vec![(bx + BAR_W, y), (bx + BAR_W + 4, y)],
            BLACK.stroke_width(1),
        ))?;
        root.draw(&Text::new(
            label.clone(),
            (bx + BAR_W + 6, y),
            text(LABEL, BLACK, HPos::Left, VPos::Center),
        ))?;
    }

    if layout.no_data {
        let y = gy + grid_h + layout.column_label_h + 6;
        root.draw(&Rectangle::new(
            [(gx, y), (gx + 14, y + 14)],
            EMPTY.plotters().filled(),
        ))?;
        root.draw(&Text::new(
            "no data".to_string(),
            (gx + 20, y + 7),
            text(LABEL, BLACK, HPos::Left, VPos::Center),
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::tests::decode;
    use crate::plot::{scatter_panels, Rgb};

    fn grid(values: Vec<Vec<Option<f64>>>) -> Heatmap {
        Heatmap {
            title: "t".to_string(),
            rows: (0..values.len()).map(|i| format!("r{i}")).collect(),
            columns: (0..values[0].len()).map(|i| format!("c{i}")).collect(),
            values,
            range: (0.0, 1.0),
            colors: ColorMap::Sequential,
        }
    }

    #[test]
    fn png_cells_are_painted_in_the_colour_of_their_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.png");
        let panels = [grid(vec![
            vec![Some(0.1), Some(0.9), None],
            vec![Some(0.5), Some(-2.0), Some(0.3)],
        ])];
        heatmaps(&path, "figure", &panels).unwrap();
        let figure = HeatmapFigure::new(&path, "figure", &panels).unwrap();
        let (w, h, rgb) = decode(&path);
        assert_eq!((w, h), figure.size());
        let (ox, oy) = figure.origins()[0];
        let layout = &figure.layouts[0];
        assert!(layout.show_values);
        for (r, row) in panels[0].values.iter().enumerate() {
            for (c, value) in row.iter().enumerate() {
                // Near the corner, away from the printed value.
                let ((x, y), _) = layout.cell(r, c);
                let (x, y) = ((ox + x + 3) as usize, (oy + y + 3) as usize);
                let i = 3 * (y * w as usize + x);
                let expected = value.map_or(EMPTY, |v| ColorMap::Sequential.color(v, (0.0, 1.0)));
                assert_eq!(
                    Rgb(rgb[i], rgb[i + 1], rgb[i + 2]),
                    expected,
                    "cell ({r}, {c})"
                );
            }
        }
    }

    #[test]
    fn bad_heatmaps_are_errors_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.svg");
        let mut ragged = grid(vec![vec![Some(0.1), Some(0.2)], vec![Some(0.3), Some(0.4)]]);
        ragged.values[1].pop();
        let mut empty_range = grid(vec![vec![Some(0.1)]]);
        empty_range.range = (1.0, 1.0);
        let mut few_rows = grid(vec![vec![Some(0.1)], vec![Some(0.2)]]);
        few_rows.rows.pop();
        let no_columns = Heatmap {
            columns: vec![],
            values: vec![vec![]],
            ..grid(vec![vec![Some(0.0)]])
        };
        for (panel, needle) in [
            (ragged, "row 1 has 1 values for 2 column labels"),
            (empty_range, "range"),
            (few_rows, "2 rows of values for 1 row labels"),
            (no_columns, "empty"),
        ] {
            let err = heatmap(&path, &panel).unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains("h.svg"), "{err}");
        }
        assert!(heatmaps(&path, "x", &[]).is_err());
        assert!(scatter_panels(&path, "x", &[]).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn many_columns_rotate_their_labels_and_hide_values() {
        let values = vec![vec![Some(0.5); 40]; 3];
        let mut panel = grid(values);
        panel.columns = (0..40)
            .map(|i| format!("a long column label {i}"))
            .collect();
        let layout = HeatmapLayout::new(&panel);
        assert!(layout.rotate_columns && !layout.show_values);
        assert!(layout.column_label_h > text_width("a long column label 39", LABEL));
        let few = HeatmapLayout::new(&grid(vec![vec![Some(0.5); 3]]));
        assert!(!few.rotate_columns && few.show_values);
    }
}
