//! Colours: [`Rgb`], the value-to-colour maps ([`ColorMap`]) and the colour of empty cells.

use plotters::prelude::{RGBColor, BLACK, WHITE};

/// The colour of cells without a value.
pub const EMPTY: Rgb = Rgb(0xC8, 0xC8, 0xC8);

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
    pub(super) fn ink(self) -> RGBColor {
        let l = self.luminance();
        if (l + 0.05) / 0.05 >= 1.05 / (l + 0.05) {
            BLACK
        } else {
            WHITE
        }
    }

    pub(super) fn plotters(self) -> RGBColor {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
