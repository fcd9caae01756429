//! The directory a merge (or a registry pull) writes: replaced whole and atomically, and only
//! when it is absent, empty, an earlier mmx output (it holds `mmx-merge.json`), or forced, so
//! that a mistyped `-o` never deletes a user's files.

use std::path::Path;

use super::record::MERGE_RECORD;
use crate::error::{Error, Result};
use crate::tensor::replace_dir_atomically;

/// Checks that `target` may be written, before any work starts.
pub fn check_target(target: &Path, force: bool) -> Result<()> {
    if !target.exists() {
        return Ok(());
    }
    let fail = |message: &str| Error::Output {
        path: target.to_path_buf(),
        message: message.to_string(),
    };
    if !target.is_dir() {
        return Err(fail("exists and is not a directory"));
    }
    let empty = std::fs::read_dir(target)
        .map_err(|e| Error::io(target, e))?
        .next()
        .is_none();
    if !(empty || force || target.join(MERGE_RECORD).is_file()) {
        return Err(fail(
            "exists and is not an earlier mmx output (no mmx-merge.json); pass --force to replace it",
        ));
    }
    Ok(())
}

/// Writes `target` atomically ([`replace_dir_atomically`]) once [`check_target`] allows it;
/// `fill` returns the names of the files it wrote.
pub fn write_output_dir(
    target: &Path,
    force: bool,
    fill: impl FnOnce(&Path) -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    check_target(target, force)?;
    replace_dir_atomically(target, fill)
}
