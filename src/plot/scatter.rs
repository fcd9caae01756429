//! Scatter plots: [`Panel`]s in a grid, one [`Series`] per method, with one legend for all.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

use super::color::Rgb;
use super::text::{
    decimals_for, font, text, text_width, tick_text, FIGURE_TITLE, FIGURE_TITLE_H, LABEL, PAD,
};
use super::{plot_error, prepare, render, DrawResult, Figure};
use crate::error::Result;

/// One method's points in a scatter panel.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The legend entry; series of the same name have the same colour in every panel.
    pub name: String,
    /// `(x, y)` points; points with a NaN or infinite coordinate are skipped.
    pub points: Vec<(f64, f64)>,
}

/// One scatter panel: typically x a swept parameter's value, y a score.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// The x axis' label.
    pub x_label: String,
    /// The y axis' label.
    pub y_label: String,
    /// The series, each drawn as points joined by a line through the mean y at each x.
    pub series: Vec<Series>,
}

/// Writes scatter panels in a grid (up to three to a row, four as two by two) under `title`, with one legend for
/// all panels, to `path` (`.png` or `.svg`).
pub fn scatter_panels(path: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    let format = prepare(path)?;
    let figure = ScatterFigure::new(path, title, panels)?;
    render(path, format, &figure)
}

/// Colours of scatter series, by first appearance: Okabe and Ito's colour-blind-safe set
/// (without its yellow, faint on white), then three more; an eleventh series repeats the first.
const SERIES_COLORS: [Rgb; 10] = [
    Rgb(0x00, 0x72, 0xB2),
    Rgb(0xD5, 0x5E, 0x00),
    Rgb(0x00, 0x9E, 0x73),
    Rgb(0xCC, 0x79, 0xA7),
    Rgb(0xE6, 0x9F, 0x00),
    Rgb(0x56, 0xB4, 0xE9),
    Rgb(0x00, 0x00, 0x00),
    Rgb(0x88, 0x22, 0x55),
    Rgb(0x99, 0x99, 0x99),
    Rgb(0x33, 0x22, 0x88),
];

const SCATTER_W: i32 = 460;
const SCATTER_H: i32 = 340;
const SCATTER_COLUMNS: usize = 3;
const LEGEND_LINE_H: i32 = 24;
const LEGEND_SWATCH: i32 = 22;

struct ScatterFigure<'a> {
    title: &'a str,
    panels: &'a [Panel],
    /// Series names in order of first appearance, each with its colour.
    names: Vec<(&'a str, Rgb)>,
    /// Legend entries' top left corners.
    legend: Vec<(i32, i32)>,
    legend_h: i32,
}

impl<'a> ScatterFigure<'a> {
    fn new(path: &Path, title: &'a str, panels: &'a [Panel]) -> Result<ScatterFigure<'a>> {
        if panels.is_empty() {
            return Err(plot_error(path, "no scatter panel to plot"));
        }
        let mut names: Vec<(&str, Rgb)> = Vec::new();
        for s in panels.iter().flat_map(|p| &p.series) {
            if !names.iter().any(|(n, _)| *n == s.name) {
                let color = SERIES_COLORS[names.len() % SERIES_COLORS.len()];
                names.push((&s.name, color));
            }
        }
        let mut figure = ScatterFigure {
            title,
            panels,
            names,
            legend: Vec::new(),
            legend_h: 0,
        };
        // Legend entries flow left to right, wrapping at the figure's width.
        let width = figure.grid().1 as i32 * SCATTER_W;
        let (mut x, mut y) = (PAD, 0);
        for (name, _) in &figure.names {
            let w = LEGEND_SWATCH + 6 + text_width(name, LABEL) + 20;
            if x > PAD && x + w > width - PAD {
                x = PAD;
                y += LEGEND_LINE_H;
            }
            figure.legend.push((x, y));
            x += w;
        }
        figure.legend_h = if figure.names.is_empty() {
            0
        } else {
            y + LEGEND_LINE_H + 8
        };
        Ok(figure)
    }

    /// Rows and columns of panels: up to three to a row, but four as two by two.
    fn grid(&self) -> (usize, usize) {
        let n = self.panels.len();
        let cols = if n == 4 { 2 } else { n.min(SCATTER_COLUMNS) };
        (n.div_ceil(cols), cols)
    }

    fn title_h(&self) -> i32 {
        if self.title.is_empty() {
            PAD
        } else {
            FIGURE_TITLE_H
        }
    }

    fn color(&self, name: &str) -> Rgb {
        self.names
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(SERIES_COLORS[0], |(_, c)| *c)
    }
}

impl Figure for ScatterFigure<'_> {
    fn size(&self) -> (u32, u32) {
        let (rows, cols) = self.grid();
        let w = (cols as i32 * SCATTER_W).max(text_width(self.title, FIGURE_TITLE) + 2 * PAD);
        let h = self.title_h() + self.legend_h + rows as i32 * SCATTER_H;
        (w as u32, h as u32)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let (w, _) = self.size();
        if !self.title.is_empty() {
            root.draw(&Text::new(
                self.title.to_string(),
                (w as i32 / 2, FIGURE_TITLE_H / 2 + 4),
                text(FIGURE_TITLE, BLACK, HPos::Center, VPos::Center),
            ))?;
        }
        let top = self.title_h();
        for ((name, color), (x, y)) in self.names.iter().zip(&self.legend) {
            let cy = top + y + LEGEND_LINE_H / 2;
            let style = color.plotters().stroke_width(2);
            root.draw(&PathElement::new(
                vec![(*x, cy), (x + LEGEND_SWATCH, cy)],
                style,
            ))?;
            root.draw(&Circle::new(
                (x + LEGEND_SWATCH / 2, cy),
                4,
                color.plotters().filled(),
            ))?;
            root.draw(&Text::new(
                name.to_string(),
                (x + LEGEND_SWATCH + 6, cy),
                text(LABEL, BLACK, HPos::Left, VPos::Center),
            ))?;
        }
        let (_, cols) = self.grid();
        let top = top + self.legend_h;
        for (i, panel) in self.panels.iter().enumerate() {
            let (x, y) = (
                (i % cols) as i32 * SCATTER_W,
                top + (i / cols) as i32 * SCATTER_H,
            );
            let area = root
                .clone()
                .shrink((x, y), (SCATTER_W as u32, SCATTER_H as u32));
            self.draw_panel(&area, panel)?;
        }
        Ok(())
    }
}

/// The finite points of a series.
fn finite(points: &[(f64, f64)]) -> impl Iterator<Item = (f64, f64)> + '_ {
    points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
}

/// The axis range covering `values`, padded; a single value gets a unit-wide window.
fn axis_range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values.fold(None, |acc: Option<(f64, f64)>, v| {
        Some(acc.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))))
    })?;
    let pad = if hi > lo {
        (hi - lo) * 0.06
    } else {
        (lo.abs() * 0.1).max(0.5)
    };
    Some((lo - pad, hi + pad))
}

/// Mean y at each distinct x, in x order: the line drawn through a series.
fn mean_line(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut at: BTreeMap<u64, (f64, f64, usize)> = BTreeMap::new();
    for (x, y) in finite(points) {
        // Order-preserving key for finite floats (adding 0.0 folds -0 into +0).
        let bits = (x + 0.0).to_bits();
        let key = if x < 0.0 { !bits } else { bits | (1 << 63) };
        let e = at.entry(key).or_insert((x, 0.0, 0));
        e.1 += y;
        e.2 += 1;
    }
    at.into_values()
        .map(|(x, s, n)| (x, s / n as f64))
        .collect()
}

impl ScatterFigure<'_> {
    fn draw_panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        panel: &Panel,
    ) -> DrawResult<DB> {
        let all = || panel.series.iter().flat_map(|s| finite(&s.points));
        let x = axis_range(all().map(|p| p.0));
        let y = axis_range(all().map(|p| p.1));
        let ((x0, x1), (y0, y1)) = (x.unwrap_or((0.0, 1.0)), y.unwrap_or((0.0, 1.0)));
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .margin_right(20)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        let (xd, yd) = (decimals_for(x1 - x0), decimals_for(y1 - y0));
        let x_ticks = |v: &f64| tick_text(*v, xd);
        let y_ticks = |v: &f64| tick_text(*v, yd);
        chart
            .configure_mesh()
            .x_desc(panel.x_label.as_str())
            .y_desc(panel.y_label.as_str())
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&x_ticks)
            .y_label_formatter(&y_ticks)
            .label_style(font(13.0))
            .axis_desc_style(font(LABEL + 1.0))
            .bold_line_style(RGBColor(0xDD, 0xDD, 0xDD))
            .light_line_style(RGBColor(0xF2, 0xF2, 0xF2))
            .draw()?;
        if x.is_none() {
            chart.plotting_area().draw(&Text::new(
                "no data".to_string(),
                ((x0 + x1) / 2.0, (y0 + y1) / 2.0),
                text(LABEL, BLACK, HPos::Center, VPos::Center),
            ))?;
        }
        for s in &panel.series {
            let color = self.color(&s.name).plotters();
            let line = mean_line(&s.points);
            if line.len() > 1 {
                chart.draw_series(LineSeries::new(line, color.stroke_width(2)))?;
            }
            chart.draw_series(finite(&s.points).map(|p| Circle::new(p, 4, color.filled())))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::tests::decode;

    #[test]
    fn axis_ranges_cover_the_values_and_survive_degenerate_input() {
        let (lo, hi) = axis_range([1.0, 3.0].into_iter()).unwrap();
        assert!(lo < 1.0 && hi > 3.0);
        let (lo, hi) = axis_range([2.0, 2.0].into_iter()).unwrap();
        assert!(lo < 2.0 && hi > 2.0);
        let (lo, hi) = axis_range([0.0].into_iter()).unwrap();
        assert!(lo < 0.0 && hi > 0.0);
        assert_eq!(axis_range(std::iter::empty()), None);
    }

    #[test]
    fn mean_line_averages_each_x_in_order_and_skips_non_finite_points() {
        let points = [
            (0.5, 1.0),
            (-1.0, 4.0),
            (0.5, 3.0),
            (f64::NAN, 9.0),
            (0.1, f64::INFINITY),
            (0.0, 2.0),
            (-0.0, 4.0),
        ];
        assert_eq!(
            mean_line(&points),
            vec![(-1.0, 4.0), (0.0, 3.0), (0.5, 2.0)]
        );
    }

    #[test]
    fn png_size_matches_the_layout_and_text_is_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.png");
        let panels = [
            Panel {
                x_label: "density".to_string(),
                y_label: "score".to_string(),
                series: vec![Series {
                    name: "ties".to_string(),
                    points: vec![(0.2, 0.5), (0.4, 0.7)],
                }],
            },
            Panel {
                x_label: "lambda".to_string(),
                y_label: "score".to_string(),
                series: vec![],
            },
        ];
        scatter_panels(&path, "sweep", &panels).unwrap();
        let (w, h, rgb) = decode(&path);
        let figure = ScatterFigure::new(&path, "sweep", &panels).unwrap();
        assert_eq!((w, h), figure.size());
        // Two panels side by side under a title and a one-line legend.
        assert_eq!(
            (w, h),
            (
                2 * SCATTER_W as u32,
                (FIGURE_TITLE_H + LEGEND_LINE_H + 8 + SCATTER_H) as u32
            )
        );
        // The title band holds dark (text) pixels: the font was found and drawn.
        let dark = rgb[..3 * w as usize * FIGURE_TITLE_H as usize]
            .chunks(3)
            .filter(|p| p.iter().all(|c| *c < 100))
            .count();
        assert!(dark > 20, "{dark} dark pixels in the title band");
    }
}
