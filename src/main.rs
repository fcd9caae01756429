//! The `mmx` binary: parse arguments, run the command, map errors to exit codes.

use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            cli::print_error(&e);
            ExitCode::from(2)
        }
    }
}
