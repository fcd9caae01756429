//! The images of the synthetic image cases: one finding of each case drawn instead of written,
//! on a small RGB canvas ([`SIDE`] pixels a side), seeded. They are cartoons, not medical
//! images: what matters is that the finding is in the pixels and nowhere in the text.
//!
//! - cardiology, an ECG of three strips (leads II/III/aVF, V1 to V4, V4 to V6), the ST
//!   segment after each beat raised, lowered or level with the baseline;
//! - radiology, a bright mass on a dark field, its margin smooth, wavy or spiculated;
//! - dermatology, a brown lesion on skin, round or lobed, its border smooth or jagged, one
//!   colour or three;
//! - pathology, nine nuclei on pink stroma, alike in size or not.

use image::{Rgb, RgbImage};

use crate::rng::SplitMix;

/// The canvas's side, in pixels.
pub const SIDE: u32 = 32;

/// The ST segment of one ECG strip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum St {
    Level,
    Raised,
    Lowered,
}

/// A mass's margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outline {
    Smooth,
    Wavy,
    Spiculated,
}

/// What an image shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Picture {
    /// The ST segment of each strip, top to bottom.
    Ecg([St; 3]),
    Mass(Outline),
    Lesion {
        asymmetric: bool,
        jagged: bool,
        several_colors: bool,
    },
    /// How much the nuclei's sizes vary: 0 (alike), 1 or 2 (very unlike).
    Nuclei(u8),
}

fn noisy(rng: &mut SplitMix, base: [u8; 3], spread: u32) -> Rgb<u8> {
    let mut jitter = |c: u8| {
        let d = rng.range(0, 2 * spread) as i32 - spread as i32;
        (i32::from(c) + d).clamp(0, 255) as u8
    };
    Rgb([jitter(base[0]), jitter(base[1]), jitter(base[2])])
}

/// A canvas of `base` with per-pixel noise of ±`spread`.
fn field(rng: &mut SplitMix, base: [u8; 3], spread: u32) -> RgbImage {
    let mut img = RgbImage::new(SIDE, SIDE);
    for p in img.pixels_mut() {
        *p = noisy(rng, base, spread);
    }
    img
}

fn put(img: &mut RgbImage, x: i32, y: i32, color: [u8; 3]) {
    if (0..SIDE as i32).contains(&x) && (0..SIDE as i32).contains(&y) {
        img.put_pixel(x as u32, y as u32, Rgb(color));
    }
}

/// Fills the pixels within `radius(angle)` of `(cx, cy)`.
fn blob(img: &mut RgbImage, cx: f64, cy: f64, color: [u8; 3], radius: impl Fn(f64) -> f64) {
    for y in 0..SIDE as i32 {
        for x in 0..SIDE as i32 {
            let (dx, dy) = (f64::from(x) - cx, f64::from(y) - cy);
            if (dx * dx + dy * dy).sqrt() <= radius(dy.atan2(dx)) {
                put(img, x, y, color);
            }
        }
    }
}

/// A value in `[lo, hi)` from the stream.
fn uniform(rng: &mut SplitMix, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Renders `picture`, its jitter (positions, noise) drawn from `rng`.
pub(crate) fn render(picture: Picture, rng: &mut SplitMix) -> RgbImage {
    match picture {
        Picture::Ecg(strips) => ecg(strips, rng),
        Picture::Mass(outline) => mass(outline, rng),
        Picture::Lesion {
            asymmetric,
            jagged,
            several_colors,
        } => lesion(asymmetric, jagged, several_colors, rng),
        Picture::Nuclei(variation) => nuclei(variation, rng),
    }
}

fn ecg(strips: [St; 3], rng: &mut SplitMix) -> RgbImage {
    let mut img = field(rng, [250, 235, 235], 4);
    let ink = [20, 20, 20];
    let phase = rng.range(0, 5) as i32;
    for (row, st) in strips.iter().enumerate() {
        let base = 5 + 11 * row as i32 + rng.range(0, 1) as i32;
        let shift = match st {
            St::Level => 0,
            St::Raised => -3,
            St::Lowered => 3,
        };
        // One beat every 16 pixels: a QRS spike, then the ST segment, then the T wave.
        let mut last = base;
        for x in 0..SIDE as i32 {
            let t = (x + phase) % 16;
            let y = match t {
                3 => base - 4,
                4 => base + 2,
                5..=8 => base + shift,
                9 | 10 => base + shift / 2 - 1,
                _ => base,
            };
            for between in last.min(y)..=last.max(y) {
                put(&mut img, x, between, ink);
            }
            last = y;
        }
    }
    img
}

fn mass(outline: Outline, rng: &mut SplitMix) -> RgbImage {
    let mut img = field(rng, [45, 45, 45], 12);
    let (cx, cy) = (uniform(rng, 13.0, 19.0), uniform(rng, 13.0, 19.0));
    let r = uniform(rng, 5.5, 7.0);
    let phase = uniform(rng, 0.0, std::f64::consts::TAU);
    let bright = [215, 215, 215];
    match outline {
        Outline::Smooth => blob(&mut img, cx, cy, bright, |_| r),
        Outline::Wavy => blob(&mut img, cx, cy, bright, |a| {
            r + 2.2 * (5.0 * a + phase).sin()
        }),
        Outline::Spiculated => {
            blob(&mut img, cx, cy, bright, |_| r - 1.0);
            for k in 0..8 {
                let a = phase + f64::from(k) * std::f64::consts::TAU / 8.0;
                for step in 0..12 {
                    let d = r - 1.0 + 0.5 * f64::from(step);
                    put(
                        &mut img,
                        (cx + d * a.cos()).round() as i32,
                        (cy + d * a.sin()).round() as i32,
                        bright,
                    );
                }
            }
        }
    }
    img
}

fn lesion(asymmetric: bool, jagged: bool, several_colors: bool, rng: &mut SplitMix) -> RgbImage {
    let mut img = field(rng, [225, 185, 155], 6);
    let (cx, cy) = (uniform(rng, 14.0, 18.0), uniform(rng, 14.0, 18.0));
    let r = uniform(rng, 6.0, 7.0);
    let bumps: Vec<f64> = (0..16).map(|_| uniform(rng, -2.2, 2.2)).collect();
    let lobe = uniform(rng, 0.0, std::f64::consts::TAU);
    let brown = [110, 65, 35];
    let radius = |a: f64| {
        let mut rr = r;
        if jagged {
            let i = ((a + std::f64::consts::PI) / std::f64::consts::TAU * 16.0) as usize % 16;
            rr += bumps[i];
        }
        if asymmetric {
            // A lobe on one side: the outline reaches further towards `lobe`.
            rr += 3.5 * (a - lobe).cos().max(0.0).powi(2);
        }
        rr
    };
    blob(&mut img, cx, cy, brown, radius);
    if several_colors {
        blob(&mut img, cx - 1.5, cy - 1.0, [45, 25, 20], |_| r * 0.45);
        blob(&mut img, cx + 2.0, cy + 2.0, [170, 60, 60], |_| r * 0.3);
    }
    img
}

fn nuclei(variation: u8, rng: &mut SplitMix) -> RgbImage {
    let mut img = field(rng, [240, 195, 215], 6);
    let purple = [85, 35, 115];
    for i in 0..3 {
        for j in 0..3 {
            let cx = 5.5 + 10.5 * f64::from(i) + uniform(rng, -1.0, 1.0);
            let cy = 5.5 + 10.5 * f64::from(j) + uniform(rng, -1.0, 1.0);
            let r = match variation {
                0 => 2.0,
                1 => uniform(rng, 1.5, 3.2),
                _ => uniform(rng, 1.0, 4.6),
            };
            let stretch = if variation >= 2 {
                uniform(rng, 0.5, 1.0)
            } else {
                1.0
            };
            blob(&mut img, cx, cy, purple, |a| {
                r / (a.cos().powi(2) + (a.sin() / stretch).powi(2)).sqrt()
            });
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixels(p: Picture, seed: u64) -> Vec<u8> {
        render(p, &mut SplitMix::new(seed)).into_raw()
    }

    /// The share of pixels whose red channel is below `dark`.
    fn dark_share(img: &[u8], dark: u8) -> f64 {
        let n = img.len() / 3;
        img.chunks(3).filter(|p| p[0] < dark).count() as f64 / n as f64
    }

    #[test]
    fn the_same_seed_draws_the_same_image_and_the_finding_changes_it() {
        let p = Picture::Mass(Outline::Spiculated);
        assert_eq!(pixels(p, 3), pixels(p, 3));
        assert_ne!(pixels(p, 3), pixels(p, 4));
        assert_ne!(pixels(p, 3), pixels(Picture::Mass(Outline::Smooth), 3));
    }

    #[test]
    fn the_st_segment_moves_the_trace() {
        // The ink of the top strip sits higher when its ST segment is raised.
        let mean_ink_row = |st: St| {
            let img = render(
                Picture::Ecg([st, St::Level, St::Level]),
                &mut SplitMix::new(1),
            );
            let rows: Vec<u32> = img
                .enumerate_pixels()
                .filter(|(_, y, p)| *y < 11 && p.0[0] < 100)
                .map(|(_, y, _)| y)
                .collect();
            rows.iter().sum::<u32>() as f64 / rows.len() as f64
        };
        assert!(mean_ink_row(St::Raised) < mean_ink_row(St::Level));
        assert!(mean_ink_row(St::Lowered) > mean_ink_row(St::Level));
    }

    #[test]
    fn several_colors_and_a_lobe_change_the_lesion() {
        let lesion = |asymmetric, several_colors| {
            pixels(
                Picture::Lesion {
                    asymmetric,
                    jagged: false,
                    several_colors,
                },
                7,
            )
        };
        // Almost-black centre only with several colours; a larger lesion with a lobe.
        assert!(dark_share(&lesion(false, true), 60) > 0.02);
        assert_eq!(dark_share(&lesion(false, false), 60), 0.0);
        assert!(dark_share(&lesion(true, false), 150) > dark_share(&lesion(false, false), 150));
    }
}
