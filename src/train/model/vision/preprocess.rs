//! [`ImageProcessor`]: images to `pixel_values` as a Hugging Face `preprocessor_config.json`
//! (a `CLIPImageProcessor`) says: RGB, the shortest edge resized (bicubic), a centre crop, a
//! rescale to [0, 1] and a per-channel normalisation, channels first.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::train::model::candle;
use crate::train::model::config::read_json;

/// A `{"height": H, "width": W}` or `{"shortest_edge": S}` size.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
enum Size {
    Box { height: u32, width: u32 },
    Shortest { shortest_edge: u32 },
}

#[derive(Deserialize)]
struct Wire {
    #[serde(default = "yes")]
    do_resize: bool,
    size: Option<Size>,
    #[serde(default)]
    do_center_crop: bool,
    crop_size: Option<Size>,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "unit")]
    rescale_factor: f64,
    #[serde(default = "yes")]
    do_normalize: bool,
    image_mean: Option<Vec<f64>>,
    image_std: Option<Vec<f64>>,
    resample: Option<u32>,
}

fn yes() -> bool {
    true
}

fn unit() -> f64 {
    1.0 / 255.0
}

/// The bicubic kernel (a = −0.5) that PIL and torchvision resize with.
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point bits of the 8-bit resampling weights.
const PRECISION: u32 = 22;

/// For each output position along an axis of `size_in` → `size_out`: the first input index and
/// the fixed-point weights of the inputs from there. Downscaling widens the kernel by the
/// scale (antialiasing), as PIL does.
fn weights(size_in: u32, size_out: u32) -> Vec<(usize, Vec<i64>)> {
    let scale = f64::from(size_in) / f64::from(size_out);
    let stretch = scale.max(1.0);
    let support = 2.0 * stretch;
    (0..size_out)
        .map(|o| {
            let centre = (f64::from(o) + 0.5) * scale;
            let first = ((centre - support + 0.5) as i64).max(0) as usize;
            let last = ((centre + support + 0.5) as i64).min(i64::from(size_in)) as usize;
            let w: Vec<f64> = (first..last)
                .map(|i| cubic((i as f64 - centre + 0.5) / stretch))
                .collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let scaled = v * f64::from(1u32 << PRECISION);
                    (if scaled < 0.0 {
                        scaled - 0.5
                    } else {
                        scaled + 0.5
                    }) as i64
                })
                .collect();
            (first, fixed)
        })
        .collect()
}

/// One 8-bit value from a fixed-point sum (rounded, clamped).
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION).clamp(0, 255) as u8
}

/// Bicubic resize of an RGB image with the algorithm PIL uses (separable, horizontal pass
/// first, 8-bit between the passes, antialiased when shrinking), which torchvision's
/// antialiased bicubic follows to within one level.
fn resize_bicubic(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w_in, h_in) = image.dimensions();
    let round = 1i64 << (PRECISION - 1);
    let across = weights(w_in, width);
    let mut wide = RgbImage::new(width, h_in);
    for y in 0..h_in {
        for (x, (first, k)) in across.iter().enumerate() {
            let mut sums = [round; 3];
            for (i, &k) in k.iter().enumerate() {
                let p = image.get_pixel((first + i) as u32, y);
                for c in 0..3 {
                    sums[c] += i64::from(p[c]) * k;
                }
            }
            wide.put_pixel(x as u32, y, image::Rgb(sums.map(clip8)));
        }
    }
    let down = weights(h_in, height);
    let mut out = RgbImage::new(width, height);
    for (y, (first, k)) in down.iter().enumerate() {
        for x in 0..width {
            let mut sums = [round; 3];
            for (i, &k) in k.iter().enumerate() {
                let p = wide.get_pixel(x, (first + i) as u32);
                for c in 0..3 {
                    sums[c] += i64::from(p[c]) * k;
                }
            }
            out.put_pixel(x, y as u32, image::Rgb(sums.map(clip8)));
        }
    }
    out
}

/// How images become pixel values.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Resize the shortest edge to this (`None`: no resize), or to an exact box.
    resize: Option<Size>,
    /// Centre-crop to `(height, width)`.
    crop: Option<(u32, u32)>,
    rescale: Option<f64>,
    normalize: Option<([f64; 3], [f64; 3])>,
}

impl ImageProcessor {
    /// Reads and checks `preprocessor_config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let w: Wire = read_json(path)?;
        let fail = |message: String| Error::Model {
            path: path.to_path_buf(),
            message,
        };
        if let Some(r) = w.resample.filter(|&r| r != 3) {
            return Err(fail(format!(
                "`resample` {r}: only bicubic (3) resizing is implemented"
            )));
        }
        let resize = match (w.do_resize, w.size) {
            (false, _) => None,
            (true, Some(size)) => Some(size),
            (true, None) => return Err(fail("`do_resize` without a `size`".into())),
        };
        let crop = match (w.do_center_crop, w.crop_size) {
            (false, _) => None,
            (true, Some(Size::Box { height, width })) => Some((height, width)),
            (true, Some(Size::Shortest { shortest_edge })) => Some((shortest_edge, shortest_edge)),
            (true, None) => return Err(fail("`do_center_crop` without a `crop_size`".into())),
        };
        let channels = |v: Option<Vec<f64>>, what: &str| -> Result<[f64; 3]> {
            let v = v.ok_or_else(|| fail(format!("`do_normalize` without `{what}`")))?;
            <[f64; 3]>::try_from(v.as_slice())
                .map_err(|_| fail(format!("`{what}` has {} values, not 3", v.len())))
        };
        let normalize = if w.do_normalize {
            let (mean, std) = (
                channels(w.image_mean, "image_mean")?,
                channels(w.image_std, "image_std")?,
            );
            if std.iter().any(|&s| s <= 0.0 || !s.is_finite()) {
                return Err(fail(format!("`image_std` {std:?} must be above 0")));
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(ImageProcessor {
            resize,
            crop,
            rescale: w.do_rescale.then_some(w.rescale_factor),
            normalize,
        })
    }

    /// One RGB image resized and cropped as configured.
    fn shape(&self, image: RgbImage) -> RgbImage {
        let (w, h) = image.dimensions();
        let image = match self.resize {
            None => image,
            Some(Size::Box { height, width }) => resize_bicubic(&image, width, height),
            Some(Size::Shortest { shortest_edge: s }) => {
                // transformers keeps the aspect ratio, the long side rounded down.
                let (short, long) = (w.min(h), w.max(h));
                let long = (u64::from(s) * u64::from(long) / u64::from(short)) as u32;
                let (nw, nh) = if w <= h { (s, long) } else { (long, s) };
                if (nw, nh) == (w, h) {
                    image
                } else {
                    resize_bicubic(&image, nw, nh)
                }
            }
        };
        match self.crop {
            None => image,
            Some((ch, cw)) => {
                let (w, h) = image.dimensions();
                // Offsets rounded down, as transformers crops (measured: a 19-wide image
                // cropped to 16 starts at column 1).
                let offset = |full: u32, part: u32| -> u32 { full.saturating_sub(part) / 2 };
                let (top, left) = (offset(h, ch), offset(w, cw));
                image::imageops::crop_imm(&image, left, top, cw.min(w), ch.min(h)).to_image()
            }
        }
    }

    /// `pixel_values [images, 3, height, width]` (f32) of the image files at `paths`; every
    /// image must come out the same size (set a crop or a box size).
    pub fn pixel_values(&self, paths: &[&Path], device: &Device) -> Result<Tensor> {
        let mut values = Vec::new();
        let mut size = None;
        for path in paths {
            let decoded = image::open(path).map_err(|e| Error::ModelInput {
                message: format!("image `{}`: {e}", path.display()),
            })?;
            let image = self.shape(decoded.to_rgb8());
            let (w, h) = image.dimensions();
            if *size.get_or_insert((w, h)) != (w, h) {
                return Err(Error::ModelInput {
                    message: format!(
                        "image `{}` comes out {w}x{h}, the first {:?}: the processor needs a crop or a fixed size",
                        path.display(),
                        size
                    ),
                });
            }
            for c in 0..3 {
                for y in 0..h {
                    for x in 0..w {
                        let mut v = f64::from(image.get_pixel(x, y)[c]);
                        if let Some(f) = self.rescale {
                            v *= f;
                        }
                        if let Some((mean, std)) = &self.normalize {
                            v = (v - mean[c]) / std[c];
                        }
                        values.push(v as f32);
                    }
                }
            }
        }
        let (w, h) = size.ok_or_else(|| Error::ModelInput {
            message: "no image to process".into(),
        })?;
        Tensor::from_vec(values, (paths.len(), 3, h as usize, w as usize), device)
            .map_err(candle("pixel_values"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: u32, h: u32, values: &[u8]) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let v = values[(y * w + x) as usize];
            image::Rgb([v, v / 2, 255 - v])
        })
    }

    #[test]
    fn bicubic_keeps_a_same_size_image_and_averages_a_halved_pair() {
        let original = image(3, 2, &[0, 50, 100, 150, 200, 250]);
        assert_eq!(resize_bicubic(&original, 3, 2), original);
        // Two pixels into one: the kernel, widened by 2, weighs both alike.
        let pair = image(2, 1, &[10, 20]);
        assert_eq!(resize_bicubic(&pair, 1, 1).get_pixel(0, 0).0, [15, 8, 240]);
        // A constant image stays constant whatever the scale (the weights sum to one).
        let flat = image(5, 7, &[77; 35]);
        let out = resize_bicubic(&flat, 3, 4);
        assert!(out.pixels().all(|p| p.0 == [77, 38, 178]));
    }
}
