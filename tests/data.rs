//! `mmx data generate` and `mmx data check`, run as the binary in a temporary directory.

use std::path::Path;
use std::process::Output;

mod common;

use common::{assert_ok, mmx};

const SPECIALTIES: [&str; 4] = ["cardiology", "radiology", "pathology", "dermatology"];
const SPLITS: [&str; 3] = ["train", "validation", "test"];

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `mmx data generate -o out` with `extra` arguments in `cwd`.
fn generate(cwd: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["data", "generate", "-o", "out"];
    args.extend_from_slice(extra);
    mmx(&args, cwd)
}

/// Every case file under `dir/out`, as paths relative to `dir`.
fn case_files() -> Vec<String> {
    SPECIALTIES
        .iter()
        .flat_map(|s| {
            SPLITS
                .iter()
                .map(move |split| format!("out/{s}/{split}.jsonl"))
        })
        .collect()
}

fn line_count(path: &Path) -> usize {
    std::fs::read_to_string(path).unwrap().lines().count()
}

#[test]
fn generates_every_split_of_every_specialty_and_a_readme() {
    let dir = tempfile::tempdir().unwrap();
    let out = generate(
        dir.path(),
        &[
            "--seed",
            "3",
            "--train",
            "20",
            "--validation",
            "4",
            "--test",
            "8",
        ],
    );
    assert_ok(&out);
    assert!(
        stdout(&out).contains("wrote 128 synthetic cases"),
        "{}",
        stdout(&out)
    );
    for specialty in SPECIALTIES {
        let base = dir.path().join("out").join(specialty);
        assert_eq!(line_count(&base.join("train.jsonl")), 20);
        assert_eq!(line_count(&base.join("validation.jsonl")), 4);
        assert_eq!(line_count(&base.join("test.jsonl")), 8);
    }
    let readme = std::fs::read_to_string(dir.path().join("out/README.md")).unwrap();
    assert!(readme.contains("**Every case in this directory is synthetic.**"));
    assert!(readme.contains("mmx data generate -o out --seed 3 --train 20 --validation 4 --test 8"));
    assert!(readme.contains("### dermatology"));
    let first = std::fs::read_to_string(dir.path().join("out/cardiology/test.jsonl")).unwrap();
    let case: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert_eq!(case["id"], "cardiology-test-000000");
    assert_eq!(case["synthetic"], true);
}

#[test]
fn generated_files_pass_check_with_counts_per_specialty() {
    let dir = tempfile::tempdir().unwrap();
    assert_ok(&generate(
        dir.path(),
        &["--train", "12", "--validation", "4", "--test", "4"],
    ));
    let files = case_files();
    let mut args = vec!["data", "check"];
    args.extend(files.iter().map(String::as_str));
    let out = mmx(&args, dir.path());
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.contains("out/radiology/train.jsonl: 12 cases (12 synthetic)"),
        "{text}"
    );
    for specialty in SPECIALTIES {
        let row = text
            .lines()
            .find(|l| l.starts_with(specialty))
            .unwrap_or_else(|| panic!("no row for {specialty}: {text}"));
        let numbers: Vec<&str> = row.split_whitespace().skip(1).collect();
        assert_eq!(numbers, ["20", "20"], "{row}");
    }
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().eq(["total", "80", "80"])),
        "{text}"
    );
    assert_eq!(text.lines().last(), Some("ok"));
}

#[test]
fn the_same_seed_writes_the_same_bytes_and_another_seed_other_cases() {
    let runs: Vec<_> = ["5", "5", "6"]
        .iter()
        .map(|seed| {
            let dir = tempfile::tempdir().unwrap();
            assert_ok(&generate(
                dir.path(),
                &[
                    "--seed",
                    seed,
                    "--train",
                    "16",
                    "--validation",
                    "4",
                    "--test",
                    "4",
                ],
            ));
            dir
        })
        .collect();
    let read = |dir: &tempfile::TempDir, file: &str| std::fs::read(dir.path().join(file)).unwrap();
    let mut differ = 0;
    for file in case_files()
        .iter()
        .map(String::as_str)
        .chain(["out/README.md"])
    {
        assert_eq!(read(&runs[0], file), read(&runs[1], file), "{file}");
        differ += usize::from(read(&runs[0], file) != read(&runs[2], file));
    }
    assert_eq!(
        differ,
        case_files().len() + 1,
        "seed 6 should change every file"
    );
}

#[test]
fn a_malformed_line_is_reported_with_its_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    assert_ok(&generate(
        dir.path(),
        &["--train", "8", "--validation", "0", "--test", "0"],
    ));
    let path = dir.path().join("out/pathology/train.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[4] = lines[4].replacen("\"answer\":\"", "\"answer\":\"Q", 1);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let out = mmx(
        &[
            "data",
            "check",
            "out/cardiology/train.jsonl",
            "out/pathology/train.jsonl",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("`out/pathology/train.jsonl` line 5:"), "{err}");
    assert!(err.contains("`answer`"), "{err}");

    lines[4] = "{\"id\": \"x\", \"question\": ".to_string();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let out = mmx(&["data", "check", "out/pathology/train.jsonl"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("line 5: invalid case"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_question_in_two_files_is_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    assert_ok(&generate(
        dir.path(),
        &["--train", "8", "--validation", "0", "--test", "4"],
    ));
    let train = dir.path().join("out/dermatology/train.jsonl");
    let test = dir.path().join("out/dermatology/test.jsonl");
    // A train case copied into the test file under a fresh id: a leak between splits.
    let leaked = std::fs::read_to_string(&train)
        .unwrap()
        .lines()
        .nth(2)
        .unwrap()
        .replace("dermatology-train-", "dermatology-leak-");
    let mut text = std::fs::read_to_string(&test).unwrap();
    text.push_str(&leaked);
    text.push('\n');
    std::fs::write(&test, text).unwrap();
    let out = mmx(
        &[
            "data",
            "check",
            "out/dermatology/train.jsonl",
            "out/dermatology/test.jsonl",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(
            "question of `out/dermatology/test.jsonl` line 5 is also in `out/dermatology/train.jsonl` line 3"
        ),
        "{text}"
    );
    assert!(text.contains("PROBLEMS FOUND: 1 questions"), "{text}");
}

#[test]
fn generate_replaces_nothing_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--train", "4", "--validation", "0", "--test", "0"];
    assert_ok(&generate(dir.path(), &args));
    let mine = dir.path().join("out/cardiology/train.jsonl");
    std::fs::write(&mine, "my own cases\n").unwrap();
    let out = generate(dir.path(), &args);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("exists"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&mine).unwrap(), "my own cases\n");
    let mut forced = args.to_vec();
    forced.push("--force");
    assert_ok(&generate(dir.path(), &forced));
    assert_eq!(line_count(&mine), 4);
}

#[test]
fn too_many_cases_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = generate(dir.path(), &["--train", "9000"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("synthetic data:"), "{}", stderr(&out));
    assert!(!dir.path().join("out").exists());
}

/// The questions of a case file.
fn questions(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["question"].to_string())
        .collect()
}

#[test]
fn a_test_split_held_out_from_another_corpus_drops_exactly_the_questions_it_saw() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    // Another corpus of the same seed: a few of its training questions come up again among
    // the test cases drawn below (36 of 2,400).
    assert_ok(&mmx(
        &[
            "data", "generate", "-o", "seen", "--train", "2000", "--test", "10",
        ],
        dir,
    ));
    assert_ok(&generate(dir, &["--train", "20", "--test", "600"]));
    let seen_files: Vec<String> = SPECIALTIES
        .iter()
        .map(|s| format!("seen/{s}/train.jsonl"))
        .collect();
    let seen: Vec<String> = seen_files
        .iter()
        .flat_map(|f| questions(&dir.join(f)))
        .collect();
    let mut args = vec![
        "data", "generate", "-o", "held", "--train", "20", "--test", "600",
    ];
    for f in &seen_files {
        args.extend(["--held-out-from", f]);
    }
    let out = mmx(&args, dir);
    assert_ok(&out);
    let mut overlap = 0;
    for s in SPECIALTIES {
        let drawn = questions(&dir.join(format!("out/{s}/test.jsonl")));
        let expected: Vec<&String> = drawn.iter().filter(|q| !seen.contains(q)).collect();
        overlap += drawn.len() - expected.len();
        let kept = questions(&dir.join(format!("held/{s}/test.jsonl")));
        assert_eq!(
            kept.iter().collect::<Vec<_>>(),
            expected,
            "{s}: the rest, in order"
        );
        // The other splits are as drawn.
        assert_eq!(
            std::fs::read(dir.join(format!("out/{s}/train.jsonl"))).unwrap(),
            std::fs::read(dir.join(format!("held/{s}/train.jsonl"))).unwrap()
        );
    }
    assert!(overlap > 0, "the test needs an overlap to drop");
    assert!(
        stdout(&out).contains(&format!("{overlap} test cases dropped")),
        "{}",
        stdout(&out)
    );
    let readme = std::fs::read_to_string(dir.join("held/README.md")).unwrap();
    assert!(
        readme.contains("--held-out-from seen/cardiology/train.jsonl")
            && readme.contains("## Held out")
    );

    // A file that is not there is an error naming it, and nothing is written.
    let missing = mmx(
        &[
            "data",
            "generate",
            "-o",
            "none",
            "--held-out-from",
            "seen/nope.jsonl",
        ],
        dir,
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("seen/nope.jsonl"),
        "{}",
        stderr(&missing)
    );
    assert!(!dir.join("none").exists());
}
