//! `--json` output: one pretty-printed JSON document on stdout, the same way for every command
//! (progress and warnings go to stderr, so stdout stays one document a script can parse).

use serde::Serialize;

/// Prints `value` as the command's JSON result.
pub fn json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
