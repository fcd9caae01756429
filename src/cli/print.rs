//! The one printer of the command line. Results go to stdout: text lines, or with `--json` one
//! pretty-printed JSON document and nothing else, so that a script can parse it. Notes and
//! warnings go to stderr (as do progress bars and errors), whichever form stdout takes.

use std::fmt::Display;

use serde::Serialize;

/// Where a command's output goes and in which form.
#[derive(Debug, Clone, Copy)]
pub struct Printer {
    json: bool,
}

impl Printer {
    /// A printer for a command that prints text only.
    pub fn text() -> Printer {
        Printer { json: false }
    }

    /// A printer for a command with `--json`.
    pub fn new(json: bool) -> Printer {
        Printer { json }
    }

    /// One line of the text result. Dropped under `--json`: stdout then holds the document only.
    pub fn line(&self, line: impl Display) {
        if !self.json {
            println!("{line}");
        }
    }

    /// The command's result: `value` as JSON under `--json`, else the lines `text` prints.
    pub fn result<T: Serialize + ?Sized>(
        &self,
        value: &T,
        text: impl FnOnce(&Printer),
    ) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            text(self);
        }
        Ok(())
    }

    /// What the command is doing or chose, on stderr (`--device auto: running on the CPU: ...`).
    pub fn note(&self, line: impl Display) {
        eprintln!("{line}");
    }

    /// Something the user should change, on stderr as `warning: ...`.
    pub fn warning(&self, line: impl Display) {
        eprintln!("warning: {line}");
    }

    /// A failed command's error and, where one is known, what to do about it.
    pub fn error(&self, error: &anyhow::Error) {
        eprintln!("error: {}", error_text(error));
        if let Some(hint) = super::hint(error) {
            eprintln!("hint: {hint}");
        }
    }
}

/// An error and its causes on one line. mmx's own errors already say their cause, so a cause
/// whose text the line holds is not repeated.
pub fn error_text(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

/// `say!(printer, "format", args...)`: one text line of the result through `printer`.
macro_rules! say {
    ($printer:expr) => {
        $printer.line("")
    };
    ($printer:expr, $($arg:tt)*) => {
        $printer.line(format_args!($($arg)*))
    };
}
pub(crate) use say;

/// `note!(printer, "format", args...)`: one line on stderr through `printer`.
macro_rules! note {
    ($printer:expr, $($arg:tt)*) => {
        $printer.note(format_args!($($arg)*))
    };
}
pub(crate) use note;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_form_prints_only_the_document() {
        let mut called = false;
        Printer::new(true)
            .result(&[1, 2], |_| called = true)
            .unwrap();
        assert!(!called, "the text form ran under --json");
        Printer::text().result(&[1, 2], |_| called = true).unwrap();
        assert!(called, "the text form did not run without --json");
    }
}
