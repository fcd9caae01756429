//! Text shared by every figure: the font at each size, measuring text, number formatting, and
//! the margins every figure uses.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontFamily, FontStyle};

use super::FAMILY;

// Text sizes, in pixels as plotters measures them.
pub(super) const FIGURE_TITLE: f64 = 22.0;
pub(super) const PANEL_TITLE: f64 = 18.0;
pub(super) const LABEL: f64 = 14.0;
pub(super) const VALUE: f64 = 12.0;

pub(super) const PAD: i32 = 16;
pub(super) const FIGURE_TITLE_H: i32 = 40;

pub(super) fn font(size: f64) -> FontDesc<'static> {
    FontDesc::new(FontFamily::Name(FAMILY), size, FontStyle::Normal)
}

pub(super) fn text_width(text: &str, size: f64) -> i32 {
    font(size).box_size(text).map_or(
        (text.chars().count() as f64 * size * 0.6) as i32,
        |(w, _)| w as i32,
    )
}

pub(super) fn text_height(size: f64) -> i32 {
    font(size)
        .box_size("Xg")
        .map_or(size as i32, |(_, h)| h as i32)
}

pub(super) fn text(size: f64, color: RGBColor, h: HPos, v: VPos) -> TextStyle<'static> {
    font(size).color(&color).pos(Pos::new(h, v))
}

/// Two decimals, without a minus sign on zero.
pub(super) fn cell_text(value: f64) -> String {
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
pub(super) fn tick_text(value: f64, decimals: usize) -> String {
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
pub(super) fn decimals_for(span: f64) -> usize {
    if span > 0.0 && span.is_finite() {
        (2.0 - span.log10().floor()).clamp(0.0, 8.0) as usize
    } else {
        2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
