//! The fuzzing corpus (`fuzz/corpus/TARGET/`, minimised by cargo-fuzz from runs of at least
//! ten minutes per target) replayed through the same entry points on stable: every input a
//! fuzzer kept, and every crash it found once fixed, stays a test.

use std::path::Path;

use mmx::fuzzing::{feed, TARGETS};

#[test]
fn every_corpus_input_is_parsed_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in TARGETS {
        let dir = root.join(name);
        let inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(
            inputs.len() >= 10,
            "{name}: only {} corpus inputs",
            inputs.len()
        );
        for input in inputs {
            let bytes = std::fs::read(&input).unwrap();
            let outcome = std::panic::catch_unwind(|| feed(target, &bytes));
            assert!(outcome.is_ok(), "{name}: {} panics", input.display());
        }
    }
}
