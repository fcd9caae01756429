//! Progress bars, on stderr, in one style: `bytes` for data moved or merged, `steps` for
//! training, `items` for cases; hidden when the command is quiet or prints JSON.

use indicatif::{ProgressBar, ProgressStyle};

/// What a bar counts.
#[derive(Debug, Clone, Copy)]
pub enum Counting {
    /// Bytes, with the rate and the time left.
    Bytes,
    /// Optimizer steps, with a message (the loss).
    Steps,
    /// Items (cases).
    Items,
}

/// A bar labelled `what` counting to `total` (0: set later), hidden when `hidden`.
pub fn bar(what: &str, counting: Counting, total: u64, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let counts = match counting {
        Counting::Bytes => "{bytes}/{total_bytes} {bytes_per_sec}",
        Counting::Steps => "step {pos}/{len} {msg}",
        Counting::Items => "{pos}/{len}",
    };
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{bar:30}}] {counts} eta {{eta}}"
        ))
        .expect("the templates are valid")
        .progress_chars("=> "),
    );
    bar
}
