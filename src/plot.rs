//! Figures written as PNG or SVG, the format chosen by the file name's extension ([`Format`]):
//! heatmaps side by side ([`heatmaps`], one panel each a [`Heatmap`]) and scatter panels in a
//! grid ([`scatter_panels`], one [`Panel`] per swept parameter, one [`Series`] per method).
//!
//! Nothing here needs a system library: text is drawn with DejaVu Sans, bundled in
//! `assets/fonts` and registered with plotters on first use. Figures are rendered in memory and
//! written atomically, so a failed plot leaves no file behind.
//!
//! ```
//! use mmx::plot::{heatmap, ColorMap, Heatmap};
//!
//! let dir = tempfile::tempdir()?;
//! let panel = Heatmap {
//!     title: "agreement".to_string(),
//!     rows: vec!["a".to_string(), "b".to_string()],
//!     columns: vec!["x".to_string(), "y".to_string()],
//!     values: vec![vec![Some(0.25), Some(0.5)], vec![None, Some(1.0)]],
//!     range: (0.0, 1.0),
//!     colors: ColorMap::Sequential,
//! };
//! heatmap(&dir.path().join("agreement.png"), &panel)?;
//! assert!(dir.path().join("agreement.png").exists());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::drawing::DrawingAreaErrorKind;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontFamily, FontStyle, FontTransform};

use crate::error::{Error, Result};
use crate::tensor::write_atomic;

/// The family name the bundled font is registered under; SVG viewers fall back to their own
/// sans-serif font, PNGs are drawn with the bundled one.
const FAMILY: &str = "sans-serif";
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// The colour of cells without a value.
pub const EMPTY: Rgb = Rgb(0xC8, 0xC8, 0xC8);

/// An image format, chosen from a file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A PNG image.
    Png,
    /// An SVG drawing.
    Svg,
}

impl Format {
    /// The format a file name asks for: `.png` or `.svg`, in any case.
    pub fn from_path(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("png") => Ok(Format::Png),
            Some("svg") => Ok(Format::Svg),
            other => Err(plot_error(
                path,
                format!(
                    "cannot plot to a {} file: the name must end in `.png` or `.svg`",
                    other.map_or("extension-less".to_string(), |e| format!("`.{e}`"))
                ),
            )),
        }
    }
}

/// A colour, as 8-bit red, green and blue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rgb(pub u8, pub u8, pub u8);

impl Rgb {
    /// `#RRGGBB`, as SVG files spell it.
    pub fn hex(self) -> String {
        format!("#{:02X}{:02X}{:02X}", self.0, self.1, self.2)
    }

    /// Relative luminance as WCAG defines it, 0 (black) to 1 (white).
    pub fn luminance(self) -> f64 {
        let linear = |c: u8| {
            let c = f64::from(c) / 255.0;
            if c <= 0.04045 {
                c / 12.92
            } else {
                ((c + 0.055) / 1.055).powf(2.4)
            }
        };
        0.2126 * linear(self.0) + 0.7152 * linear(self.1) + 0.0722 * linear(self.2)
    }

    /// Black or white, whichever contrasts more with this colour: the ink for text on it.
    fn ink(self) -> RGBColor {
        let l = self.luminance();
        if (l + 0.05) / 0.05 >= 1.05 / (l + 0.05) {
            BLACK
        } else {
            WHITE
        }
    }

    fn plotters(self) -> RGBColor {
        RGBColor(self.0, self.1, self.2)
    }
}

/// How values map onto colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorMap {
    /// Dark blue (low) through teal and green to yellow (high), brighter as values grow
    /// (viridis).
    Sequential,
    /// Blue (low) through near-white (the middle of the range) to red (high).
    Diverging,
}

impl ColorMap {
    /// Colours at evenly spaced points from the low end to the high end.
    fn anchors(self) -> &'static [Rgb] {
        match self {
            ColorMap::Sequential => &[
                Rgb(0x44, 0x01, 0x54),
                Rgb(0x3B, 0x52, 0x8B),
                Rgb(0x21, 0x91, 0x8C),
                Rgb(0x5E, 0xC9, 0x62),
                Rgb(0xFD, 0xE7, 0x25),
            ],
            ColorMap::Diverging => &[
                Rgb(0x05, 0x71, 0xB0),
                Rgb(0x92, 0xC5, 0xDE),
                Rgb(0xF7, 0xF7, 0xF7),
                Rgb(0xF4, 0xA5, 0x82),
                Rgb(0xCA, 0x00, 0x20),
            ],
        }
    }

    /// The colour of `value` on the range `(lo, hi)`; values outside it get the colour of the
    /// nearer end, NaN gets [`EMPTY`].
    pub fn color(self, value: f64, (lo, hi): (f64, f64)) -> Rgb {
        if value.is_nan() {
            return EMPTY;
        }
        let t = if hi > lo {
            ((value - lo) / (hi - lo)).clamp(0.0, 1.0)
        } else {
            0.5
        };
        let anchors = self.anchors();
        let pos = t * (anchors.len() - 1) as f64;
        let i = (pos.floor() as usize).min(anchors.len() - 2);
        let f = pos - i as f64;
        let (a, b) = (anchors[i], anchors[i + 1]);
        let mix = |x: u8, y: u8| (f64::from(x) + (f64::from(y) - f64::from(x)) * f).round() as u8;
        Rgb(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
    }
}

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

fn plot_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Plot {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Checks the format and registers the font, which layout needs to measure text.
fn prepare(path: &Path) -> Result<Format> {
    let format = Format::from_path(path)?;
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let registered = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if !registered {
        return Err(plot_error(path, "the bundled font could not be loaded"));
    }
    Ok(format)
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// A laid-out figure, drawable on any plotters backend.
trait Figure {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB>;
}

fn render(path: &Path, format: Format, figure: &impl Figure) -> Result<()> {
    let (w, h) = figure.size();
    let failed = |e: String| plot_error(path, format!("drawing failed: {e}"));
    let bytes = match format {
        Format::Svg => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
                figure.draw(&root).map_err(|e| failed(e.to_string()))?;
                root.present().map_err(|e| failed(e.to_string()))?;
            }
            svg.into_bytes()
        }
        Format::Png => {
            let mut rgb = vec![0u8; w as usize * h as usize * 3];
            {
                let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
                figure.draw(&root).map_err(|e| failed(e.to_string()))?;
                root.present().map_err(|e| failed(e.to_string()))?;
            }
            encode_png(&rgb, (w, h)).map_err(|e| failed(e.to_string()))?
        }
    };
    // `write_atomic` syncs the parent directory, which a bare file name gives as "".
    match path.parent() {
        Some(dir) if dir.as_os_str().is_empty() => write_atomic(&Path::new(".").join(path), &bytes),
        _ => write_atomic(path, &bytes),
    }
}

fn encode_png(rgb: &[u8], (w, h): (u32, u32)) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

// Text sizes, in pixels as plotters measures them.
const FIGURE_TITLE: f64 = 22.0;
const PANEL_TITLE: f64 = 18.0;
const LABEL: f64 = 14.0;
const VALUE: f64 = 12.0;

const PAD: i32 = 16;
const FIGURE_TITLE_H: i32 = 40;
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

fn font(size: f64) -> FontDesc<'static> {
    FontDesc::new(FontFamily::Name(FAMILY), size, FontStyle::Normal)
}

fn text_width(text: &str, size: f64) -> i32 {
    font(size).box_size(text).map_or(
        (text.chars().count() as f64 * size * 0.6) as i32,
        |(w, _)| w as i32,
    )
}

fn text_height(size: f64) -> i32 {
    font(size)
        .box_size("Xg")
        .map_or(size as i32, |(_, h)| h as i32)
}

fn text(size: f64, color: RGBColor, h: HPos, v: VPos) -> TextStyle<'static> {
    font(size).color(&color).pos(Pos::new(h, v))
}

/// Two decimals, without a minus sign on zero.
fn cell_text(value: f64) -> String {
    let s = format!("{value:.2}");
    if s.trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        s.trim_start_matches('-').to_string()
    } else {
        s
    }
}

/// A tick label with `decimals` decimals at most, trailing zeros dropped.
fn tick_text(value: f64, decimals: usize) -> String {
    let s = format!("{value:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    if s == "-0" {
        "0".to_string()
    } else {
        s
    }
}

/// Enough decimals to tell apart ticks about a tenth of `span` apart.
fn decimals_for(span: f64) -> usize {
    if span > 0.0 && span.is_finite() {
        (2.0 - span.log10().floor()).clamp(0.0, 8.0) as usize
    } else {
        2
    }
}

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

    /// Decodes a PNG into (width, height, RGB bytes).
    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    #[test]
    fn format_follows_the_extension_in_any_case() {
        assert_eq!(Format::from_path("a/b.PNG".as_ref()).unwrap(), Format::Png);
        assert_eq!(Format::from_path("b.Svg".as_ref()).unwrap(), Format::Svg);
        let err = Format::from_path("plots/b.jpg".as_ref()).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("plots/b.jpg") && message.contains(".jpg"),
            "{message}"
        );
        assert!(Format::from_path("b".as_ref()).is_err());
    }

    #[test]
    fn colour_maps_hit_their_anchors_and_clamp() {
        let seq = ColorMap::Sequential;
        assert_eq!(seq.color(0.0, (0.0, 1.0)), Rgb(0x44, 0x01, 0x54));
        assert_eq!(seq.color(1.0, (0.0, 1.0)), Rgb(0xFD, 0xE7, 0x25));
        assert_eq!(seq.color(0.5, (0.0, 1.0)), Rgb(0x21, 0x91, 0x8C));
        // Halfway between the first two anchors.
        assert_eq!(seq.color(0.125, (0.0, 1.0)), Rgb(0x40, 0x2A, 0x70));
        assert_eq!(seq.color(-3.0, (0.0, 1.0)), seq.color(0.0, (0.0, 1.0)));
        assert_eq!(seq.color(7.0, (0.0, 1.0)), seq.color(1.0, (0.0, 1.0)));
        assert_eq!(seq.color(f64::NAN, (0.0, 1.0)), EMPTY);
        // The range is honoured, not assumed to be 0..1.
        assert_eq!(seq.color(15.0, (10.0, 20.0)), seq.color(0.5, (0.0, 1.0)));
        let div = ColorMap::Diverging;
        assert_eq!(div.color(0.0, (-1.0, 1.0)), Rgb(0xF7, 0xF7, 0xF7));
        let (neg, pos) = (div.color(-1.0, (-1.0, 1.0)), div.color(1.0, (-1.0, 1.0)));
        assert!(neg.2 > neg.0 && pos.0 > pos.2, "blue below, red above");
        assert_eq!(Rgb(0x0A, 0xFF, 0x00).hex(), "#0AFF00");
        assert_eq!(Rgb(0x44, 0x01, 0x54).ink(), WHITE);
        assert_eq!(Rgb(0xFD, 0xE7, 0x25).ink(), BLACK);
    }

    #[test]
    fn sequential_map_brightens_with_the_value() {
        let lumas: Vec<f64> = (0..=20)
            .map(|i| {
                ColorMap::Sequential
                    .color(i as f64 / 20.0, (0.0, 1.0))
                    .luminance()
            })
            .collect();
        assert!(lumas.windows(2).all(|w| w[0] < w[1]), "{lumas:?}");
    }

    #[test]
    fn tick_and_cell_texts() {
        assert_eq!(cell_text(0.526), "0.53");
        assert_eq!(cell_text(-0.001), "0.00");
        assert_eq!(cell_text(-0.25), "-0.25");
        assert_eq!(tick_text(0.5, 2), "0.5");
        assert_eq!(tick_text(1.0, 2), "1");
        assert_eq!(tick_text(-0.0001, 2), "0");
        assert_eq!(tick_text(120.0, 0), "120");
        assert_eq!(decimals_for(2.0), 2);
        assert_eq!(decimals_for(0.002), 5);
    }

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
