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

mod color;
mod heatmap;
mod scatter;
mod text;

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::drawing::DrawingAreaErrorKind;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Error, Result};
use crate::tensor::write_atomic;

pub use color::{ColorMap, Rgb, EMPTY};
pub use heatmap::{heatmap, heatmaps, Heatmap};
pub use scatter::{scatter_panels, Panel, Series};

/// The family name the bundled font is registered under; SVG viewers fall back to their own
/// sans-serif font, PNGs are drawn with the bundled one.
const FAMILY: &str = "sans-serif";
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a PNG into (width, height, RGB bytes); the figures' tests read pixels with it.
    pub(super) fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
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
}
