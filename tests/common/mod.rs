//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A directory under tests/fixtures/reference.
pub fn reference(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference")
        .join(name)
}

/// The largest elementwise error of `ours` against `theirs`, relative to the largest magnitude
/// of `theirs` (elementwise ratios are meaningless where merges leave zeros).
pub fn max_relative_error(ours: &[f32], theirs: &[f32]) -> f64 {
    assert_eq!(
        ours.len(),
        theirs.len(),
        "compared tensors differ in length"
    );
    let scale = theirs.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let worst = ours
        .iter()
        .zip(theirs)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    worst / scale.max(f64::MIN_POSITIVE)
}

/// Asserts that a command succeeded, showing its stderr if not.
pub fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
