//! `mmx data embed`: each case's image through a LLaVA model's vision tower, once, offline,
//! into an `image_embeds` file beside a copy of the case file that points at it, so that
//! training and evaluation read features instead of running the tower again. The copy names
//! each image by its absolute path, as it no longer sits beside it.

use std::path::Path;

use candle_core::Tensor;

use super::case::{read_cases, write_cases, Case};
use super::model::vision::ImageProcessor;
use super::model::Llava;
use crate::error::{Error, Result};

/// What [`embed_cases`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedSummary {
    /// Cases read.
    pub cases: usize,
    /// Cases with an image, now with `image_embeds`.
    pub embedded: usize,
}

/// A file name for a case's features: its id where that is a plain name, else its index.
fn file_name(case: &Case, index: usize) -> String {
    let id = case.id();
    let plain = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.');
    if plain {
        format!("{id}.safetensors")
    } else {
        format!("case-{index}.safetensors")
    }
}

/// Runs the tower on the image of every case of `data` that has one (the path relative to
/// `data`) and writes `out_dir/<file name of data>` (every case, those with an image pointing at
/// their `image_embeds`) and one `<id>.safetensors` per image. Every image is checked before
/// anything is written; `on_case` is called after each case.
pub fn embed_cases(
    model: &Llava,
    processor: &ImageProcessor,
    data: &Path,
    out_dir: &Path,
    on_case: &mut dyn FnMut(usize),
) -> Result<EmbedSummary> {
    let cases = read_cases(data)?;
    let missing: Vec<String> = cases
        .iter()
        .filter_map(|c| c.image_file().map(|p| (c, p)))
        .filter(|(_, p)| !p.is_file())
        .map(|(c, p)| format!("case `{}`: image `{}` does not exist", c.id(), p.display()))
        .collect();
    if let Some(first) = missing.first() {
        return Err(Error::ModelInput {
            message: format!("{first} ({} such case(s))", missing.len()),
        });
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut out = Vec::with_capacity(cases.len());
    let mut embedded = 0;
    for (i, case) in cases.iter().enumerate() {
        match case.image_file() {
            None => out.push(case.clone()),
            Some(path) => {
                let pixels = processor
                    .pixel_values(&[path.as_path()], model.language_model().device())
                    .map_err(|e| Error::ModelInput {
                        message: format!("case `{}`: {e}", case.id()),
                    })?;
                let features: Tensor = model.vision_features(&pixels)?;
                let name = file_name(case, i);
                Llava::write_image_embeds(&out_dir.join(&name), &features)?;
                // The copy lives elsewhere: its image is named by where it is.
                let image = std::fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
                let moved = case.with_image(&image.display().to_string());
                out.push(moved.with_image_embeds(&name));
                embedded += 1;
            }
        }
        on_case(i + 1);
    }
    let file = data.file_name().ok_or_else(|| Error::ModelInput {
        message: format!("`{}` names no file", data.display()),
    })?;
    write_cases(&out_dir.join(file), &out)?;
    Ok(EmbedSummary {
        cases: cases.len(),
        embedded,
    })
}
