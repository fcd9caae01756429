//! The registry through the `mmx` binary: byte-identical round trips, immutable tags, and the
//! fault tests of issue 4 (concurrent publishers, publishers killed at random points, a flipped
//! byte).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

use common::{assert_ok, mmx_with_env};

/// `mmx` without a registry from the environment: each test names its own.
fn mmx(args: &[&str], cwd: &Path) -> Output {
    mmx_with_env(args, cwd, &[("MMX_REGISTRY", None)])
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn adapter(name: &str) -> String {
    examples().join("adapters").join(name).display().to_string()
}

fn base() -> String {
    examples().join("tiny-med-base").display().to_string()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every file of `a` is in `b` with the same bytes, and nothing else is.
fn assert_same_dir(a: &Path, b: &Path) {
    let names = |d: &Path| {
        let mut n: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(a), names(b));
    for n in names(a) {
        assert!(
            std::fs::read(a.join(&n)).unwrap() == std::fs::read(b.join(&n)).unwrap(),
            "{n} differs"
        );
    }
}

/// All tensor blobs of a manifest (from `mmx show --json`).
fn tensor_blobs(work: &Path, tag: &str) -> Vec<String> {
    let out = mmx(&["show", tag, "--json"], work);
    assert_ok(&out);
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["tensors"].as_array())
        .flatten()
        .map(|t| t["blob"].as_str().unwrap().to_string())
        .collect()
}

/// Flips `mask` in byte `at` of a (read-only) blob, as a disk or a stray write might.
fn flip_bit(path: &Path, at: usize, mask: u8) {
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(path, perms).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= mask;
    std::fs::write(path, &bytes).unwrap();
}

fn blob_path(registry: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("blake3:").unwrap();
    registry
        .join("blobs/blake3")
        .join(&hex[..2])
        .join(&hex[2..])
}

#[test]
fn publish_and_pull_round_trip_byte_for_byte_and_republishing_writes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    assert_ok(&mmx(&["publish", &base(), "tiny-med-base:v1"], w));
    let first = mmx(
        &[
            "publish",
            &adapter("cardiology"),
            "cardiology:v1",
            "--specialty",
            "cardiology",
            "--base",
            "tiny-med-base:v1",
        ],
        w,
    );
    assert_ok(&first);
    assert!(stdout(&first).contains("(adapter)"));
    let again = mmx(
        &[
            "publish",
            &adapter("cardiology"),
            "cardiology:v1",
            "--specialty",
            "cardiology",
            "--base",
            "tiny-med-base:v1",
        ],
        w,
    );
    assert_ok(&again);
    assert!(
        stdout(&again).contains(", 0 written (0 B of"),
        "{}",
        stdout(&again)
    );

    assert_ok(&mmx(&["pull", "cardiology:v1", "-o", "card"], w));
    assert_same_dir(&examples().join("adapters/cardiology"), &w.join("card"));
    assert_ok(&mmx(&["pull", "tiny-med-base:v1", "-o", "base"], w));
    assert_same_dir(&examples().join("tiny-med-base"), &w.join("base"));

    let ls = mmx(&["ls", "--json"], w);
    assert_ok(&ls);
    let listing: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(listing[0]["reference"], "cardiology:v1");
    assert_eq!(listing[0]["specialty"], "cardiology");
    assert_eq!(listing[1]["kind"], "base");

    // A merged expert shares nothing it did not change... and records its lineage.
    let merged = mmx(
        &[
            "merge",
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("recipes/ties.toml")
                .display()
                .to_string(),
            "-o",
            "merged",
            "--publish",
            "quick:v1",
        ],
        w,
    );
    assert_ok(&merged);
    let log = mmx(&["log", "quick:v1"], w);
    assert_ok(&log);
    assert!(
        stdout(&log).contains("merged, made by mmx"),
        "{}",
        stdout(&log)
    );
    let verify = mmx(&["verify", "--read-data"], w);
    assert_ok(&verify);
    assert!(stdout(&verify).contains("ok"));
}

#[test]
fn tags_are_immutable_unless_forced_and_names_are_checked() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    assert_ok(&mmx(&["publish", &adapter("cardiology"), "expert:v1"], w));
    let moved = mmx(&["publish", &adapter("radiology"), "expert:v1"], w);
    assert_eq!(moved.status.code(), Some(2));
    assert!(stderr(&moved).contains("immutable"), "{}", stderr(&moved));
    assert_ok(&mmx(
        &["publish", &adapter("radiology"), "expert:v1", "--force"],
        w,
    ));
    assert_ok(&mmx(&["pull", "expert:v1", "-o", "now"], w));
    assert_same_dir(&examples().join("adapters/radiology"), &w.join("now"));

    assert_ok(&mmx(&["tag", "expert:v1", "expert:latest"], w));
    let refused = mmx(&["tag", "expert:v1", "expert:latest"], w);
    assert_ok(&refused); // same target: a no-op
    assert_ok(&mmx(&["rm", "expert:v1"], w));
    assert_eq!(
        mmx(&["pull", "expert:v1", "-o", "gone"], w).status.code(),
        Some(2)
    );
    assert_ok(&mmx(&["pull", "expert:latest", "-o", "still"], w));

    for bad in ["../x:v1", "x:../../etc", "/abs:v1", "x:", ".hidden:v1"] {
        let out = mmx(&["publish", &adapter("cardiology"), bad], w);
        assert_eq!(out.status.code(), Some(2), "{bad}");
    }
    // Nothing outside the registry was created by the refused names.
    assert!(!w.join("x").exists() && !w.join("etc").exists());
}

#[test]
fn refuses_invalid_content_before_storing_anything() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let broken = w.join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::copy(
        examples().join("adapters/cardiology/adapter_config.json"),
        broken.join("adapter_config.json"),
    )
    .unwrap();
    refuse_broken_file(w, &broken, "adapter_model.safetensors");

    // A model whose second weights file is broken: refused before its first is stored.
    let model = w.join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(examples().join("tiny-med-base")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    refuse_broken_file(w, &model, "zz-extra.safetensors");
}

/// A training output holds its result beside the run's record (metrics, checkpoints): with
/// `result_only` only the result is published; without, the folder is refused, naming it.
#[test]
fn a_training_output_publishes_its_result_only() {
    use mmx::registry::{Kind, PublishOptions, Reference, Registry};
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("trained");
    std::fs::create_dir(&out).unwrap();
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            examples().join("adapters/cardiology").join(name),
            out.join(name),
        )
        .unwrap();
    }
    std::fs::write(out.join("metrics.jsonl"), "{\"step\": 1}\n").unwrap();
    std::fs::create_dir(out.join("checkpoint-1")).unwrap();
    std::fs::write(out.join("checkpoint-1/optimizer.safetensors"), b"x").unwrap();
    let registry = Registry::create(&work.path().join("reg")).unwrap();
    let reference = Reference::parse("card:trained").unwrap();
    let mut options = PublishOptions {
        kind: Some(Kind::Adapter),
        ..PublishOptions::default()
    };
    let err = registry
        .publish(&out, &reference, &options)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("checkpoint-1") && err.contains("is a folder"),
        "{err}"
    );
    options.result_only = true;
    registry.publish(&out, &reference, &options).unwrap();
    let pulled = work.path().join("pulled");
    assert_ok(&mmx(
        &[
            "pull",
            "card:trained",
            "-o",
            pulled.to_str().unwrap(),
            "--registry",
            work.path().join("reg").to_str().unwrap(),
        ],
        work.path(),
    ));
    let mut names: Vec<String> = std::fs::read_dir(&pulled)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors"]);
}

/// Writes a safetensors file with a broken header as `name` in `dir`: publishing `dir` is
/// refused naming that file, and no blob is stored.
fn refuse_broken_file(w: &Path, dir: &Path, name: &str) {
    std::fs::write(
        dir.join(name),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ",
    )
    .unwrap();
    let out = mmx(&["publish", dir.to_str().unwrap(), "broken:v1"], w);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains(name), "{}", stderr(&out));
    assert_eq!(walk_files(&w.join("registry/blobs")), 0, "nothing stored");
}

fn walk_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk_files(&p)
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn a_flipped_byte_is_caught_by_verify_and_by_the_next_read() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    assert_ok(&mmx(&["publish", &adapter("pathology"), "pathology:v1"], w));
    let blob = tensor_blobs(w, "pathology:v1")[3].clone();
    let path = blob_path(&w.join("registry"), &blob);
    flip_bit(&path, 5, 0x01);

    let verify = mmx(&["verify", "--read-data"], w);
    assert_eq!(verify.status.code(), Some(1));
    assert!(
        stdout(&verify).contains(&format!("corrupt blob {blob}")),
        "{}",
        stdout(&verify)
    );
    let pull = mmx(&["pull", "pathology:v1", "-o", "out"], w);
    assert_eq!(pull.status.code(), Some(2));
    let err = stderr(&pull);
    assert!(
        err.contains(&blob) && err.contains("corrupt") && err.contains("used by manifest"),
        "{err}"
    );
    assert!(!w.join("out").exists(), "a failed pull leaves nothing");

    // A missing blob: verify (even without --read-data) exits 1 naming it and its manifest.
    std::fs::remove_file(&path).unwrap();
    let verify = mmx(&["verify"], w);
    assert_eq!(verify.status.code(), Some(1));
    assert!(stdout(&verify).contains(&format!("missing blob {blob}")));
}

/// Publishes (adapter, tag) from 8 processes at once.
fn publish_concurrently(w: &Path, jobs: &[(&str, &str)]) -> Vec<Output> {
    let children: Vec<_> = jobs
        .iter()
        .map(|(source, tag)| {
            Command::new(env!("CARGO_BIN_EXE_mmx"))
                .current_dir(w)
                .env_remove("MMX_REGISTRY")
                .args(["publish", &adapter(source), tag])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

#[test]
fn eight_concurrent_publishers_succeed_or_fail_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // No registry yet: the racers create it together.
    assert_eq!(
        mmx(&["ls"], w).status.code(),
        Some(2),
        "reading never creates one"
    );
    assert!(!w.join("registry").exists());
    for round in 0..3 {
        let same_tag = format!("shared:r{round}");
        let jobs: Vec<(&str, String)> = vec![
            ("cardiology", same_tag.clone()), // same content, same tag
            ("cardiology", same_tag.clone()),
            ("radiology", same_tag.clone()), // other content, same tag: one of them wins
            ("pathology", format!("p:r{round}")), // same content, different tags
            ("pathology", format!("q:r{round}")),
            ("dermatology", format!("d:r{round}")), // different content, different tags
            ("radiology", format!("r:r{round}")),
            ("cardiology", format!("c:r{round}")),
        ];
        let borrowed: Vec<(&str, &str)> = jobs.iter().map(|(s, t)| (*s, t.as_str())).collect();
        let outs = publish_concurrently(w, &borrowed);
        for ((source, tag), out) in jobs.iter().zip(&outs) {
            let code = out.status.code();
            if tag != &same_tag {
                assert_eq!(code, Some(0), "{source} {tag}: {}", stderr(out));
            } else {
                assert!(
                    code == Some(0) || code == Some(2),
                    "{source} {tag}: {code:?}"
                );
                if code == Some(2) {
                    let err = stderr(out);
                    assert!(err.contains("immutable") || err.contains("moved"), "{err}");
                }
            }
        }
        // The shared tag holds whichever content won, whole.
        let pulled = w.join(format!("pulled{round}"));
        assert_ok(&mmx(
            &["pull", &same_tag, "-o", pulled.to_str().unwrap()],
            w,
        ));
        let winner = ["cardiology", "radiology"]
            .into_iter()
            .find(|s| {
                std::fs::read(pulled.join("adapter_model.safetensors")).unwrap()
                    == std::fs::read(
                        examples()
                            .join("adapters")
                            .join(s)
                            .join("adapter_model.safetensors"),
                    )
                    .unwrap()
            })
            .expect("the tag holds one of the published adapters");
        let winners = jobs
            .iter()
            .zip(&outs)
            .filter(|((s, t), o)| t == &same_tag && *s == winner && o.status.success())
            .count();
        assert!(winners >= 1);
    }
    let verify = mmx(&["verify", "--read-data", "--grace", "0s"], w);
    // Refused publishes leave their blobs unreferenced: orphans once past a zero grace...
    assert!(verify.status.code() == Some(0) || stdout(&verify).contains("orphaned"));
    // ...and nothing else is wrong.
    let text = stdout(&verify);
    assert!(
        !text.contains("missing") && !text.contains("corrupt") && !text.contains("broken"),
        "{text}"
    );
    assert_ok(&mmx(&["gc", "--grace", "0s"], w));
    let clean = mmx(&["verify", "--read-data", "--grace", "0s"], w);
    assert_ok(&clean);
}

/// A copy of the tiny base whose tensors all differ from the original's (so that publishing it
/// writes new blobs), different for every `seed`.
fn base_variant(dir: &Path, seed: u8) -> PathBuf {
    let out = dir.join(format!("variant{seed}"));
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(examples().join("tiny-med-base")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), out.join(entry.file_name())).unwrap();
    }
    let weights = out.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for i in (header..bytes.len()).step_by(64) {
        bytes[i] ^= seed.wrapping_mul(2).wrapping_add(1);
    }
    std::fs::write(&weights, bytes).unwrap();
    out
}

#[test]
fn publishers_killed_at_random_points_never_break_the_registry() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // How long one publish of new content takes here: kills land uniformly within it.
    let calibration = base_variant(w, 255);
    let start = std::time::Instant::now();
    assert_ok(&mmx(
        &["publish", calibration.to_str().unwrap(), "calibration:v1"],
        w,
    ));
    let span = start.elapsed().as_micros() as u64;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    let trials = 60u8;
    let mut finished = 0;
    for trial in 0..trials {
        let source = base_variant(w, trial);
        let tag = format!("base:t{trial}");
        let mut child = Command::new(env!("CARGO_BIN_EXE_mmx"))
            .current_dir(w)
            .env_remove("MMX_REGISTRY")
            .args(["publish", source.to_str().unwrap(), &tag])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_micros(next() % span.max(1)));
        let _ = child.kill(); // SIGKILL
        finished += usize::from(child.wait().unwrap().success());
        let verify = mmx(&["verify"], w);
        assert_eq!(
            verify.status.code(),
            Some(0),
            "trial {trial}: {}",
            stdout(&verify)
        );
        // The tag is absent or whole.
        let pulled = w.join(format!("p{trial}"));
        let pull = mmx(&["pull", &tag, "-o", pulled.to_str().unwrap()], w);
        if pull.status.success() {
            assert_same_dir(&source, &pulled);
        } else {
            assert!(
                stderr(&pull).contains("no tag"),
                "trial {trial}: {}",
                stderr(&pull)
            );
        }
    }
    eprintln!(
        "{trials} publishers killed at random points within {span} µs: {finished} had finished, {} were cut short",
        usize::from(trials) - finished
    );
    assert!(
        usize::from(trials) - finished >= 5,
        "publishers were killed mid-way"
    );
    assert_ok(&mmx(&["verify", "--read-data"], w));
    assert_ok(&mmx(&["gc", "--grace", "0s"], w));
    let clean = mmx(&["verify", "--read-data", "--grace", "0s", "--json"], w);
    assert_ok(&clean);
    let report: serde_json::Value = serde_json::from_slice(&clean.stdout).unwrap();
    assert_eq!(report["temporary"], 0);
    assert_eq!(report["unreferenced_recent"].as_array().unwrap().len(), 0);
    assert_eq!(report["orphaned"].as_array().unwrap().len(), 0);
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// A recipe in `dir` merging with `method` from `sources` (the base first), into `output`.
fn recipe(
    dir: &Path,
    name: &str,
    method: &str,
    output: &str,
    sources: &[String],
    extra: &str,
) -> PathBuf {
    let mut text = format!(
        "[merge]\nregistry = \"registry\"\nmethod = \"{method}\"\nbase = \"{}\"\noutput = \"{output}\"\n{extra}\n[merge.parameters]\ndensity = 0.5\n",
        sources[0]
    );
    for s in &sources[1..] {
        text.push_str(&format!("[[merge.experts]]\nsource = \"{s}\"\n"));
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn merges_read_the_registry_in_place_and_give_the_same_bytes() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    assert_ok(&mmx(&["publish", &base(), "base:v1"], w));
    let names = ["cardiology", "radiology", "pathology"];
    for n in names {
        assert_ok(&mmx(&["publish", &adapter(n), &format!("{n}:v1")], w));
    }
    let from_dirs: Vec<String> = std::iter::once(base())
        .chain(names.iter().map(|n| adapter(n)))
        .collect();
    let from_registry: Vec<String> = std::iter::once("registry:base:v1".to_string())
        .chain(names.iter().map(|n| format!("registry:{n}:v1")))
        .collect();
    for (method, output, extra) in [("ties", "full", ""), ("caci", "lora", "rank = 8")] {
        let a = recipe(
            w,
            &format!("{method}-dirs.toml"),
            method,
            output,
            &from_dirs,
            extra,
        );
        let b = recipe(
            w,
            &format!("{method}-reg.toml"),
            method,
            output,
            &from_registry,
            extra,
        );
        assert_ok(&mmx(
            &[
                "merge",
                a.to_str().unwrap(),
                "-o",
                &format!("{method}-dirs"),
            ],
            w,
        ));
        assert_ok(&mmx(
            &[
                "merge",
                b.to_str().unwrap(),
                "-o",
                &format!("{method}-reg"),
                "--publish",
                &format!("{method}-merged:v1"),
            ],
            w,
        ));
        for entry in std::fs::read_dir(w.join(format!("{method}-dirs"))).unwrap() {
            let name = entry.unwrap().file_name();
            if name == "mmx-merge.json" {
                continue;
            }
            assert!(
                std::fs::read(w.join(format!("{method}-dirs")).join(&name)).unwrap()
                    == std::fs::read(w.join(format!("{method}-reg")).join(&name)).unwrap(),
                "{method}: {name:?} differs"
            );
        }
        // The record names the manifests read; the published expert's lineage lists them.
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(w.join(format!("{method}-reg/mmx-merge.json"))).unwrap(),
        )
        .unwrap();
        assert!(record["inputs"][0]["manifests"][0]
            .as_str()
            .unwrap()
            .starts_with("blake3:"));
        let log = stdout(&mmx(&["log", &format!("{method}-merged:v1")], w));
        assert_eq!(log.lines().count(), 5, "{log}");
        assert!(
            log.lines().nth(1).unwrap().starts_with("  blake3:") && log.contains(" base"),
            "{log}"
        );
    }
    // A full model from the registry keeps the base's tokenizer files.
    assert!(w.join("ties-reg/tokenizer.json").is_file());
}

#[test]
fn a_corrupt_blob_fails_a_merge_naming_it_and_its_manifest() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    assert_ok(&mmx(&["publish", &base(), "base:v1"], w));
    assert_ok(&mmx(
        &["publish", &adapter("cardiology"), "cardiology:v1"],
        w,
    ));
    let blob = tensor_blobs(w, "cardiology:v1")[0].clone();
    let path = blob_path(&w.join("registry"), &blob);
    flip_bit(&path, 0, 0x80);
    let r = recipe(
        w,
        "r.toml",
        "ties",
        "full",
        &["registry:base:v1".into(), "registry:cardiology:v1".into()],
        "",
    );
    let out = mmx(&["merge", r.to_str().unwrap(), "-o", "merged"], w);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(&blob) && err.contains("corrupt") && err.contains("used by manifest"),
        "{err}"
    );
    assert!(!w.join("merged").exists());
    // A registry source that does not exist.
    let r = recipe(
        w,
        "missing.toml",
        "ties",
        "full",
        &["registry:base:v1".into(), "registry:nope:v1".into()],
        "",
    );
    let out = mmx(&["merge", r.to_str().unwrap(), "-o", "merged"], w);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no tag nope:v1"), "{}", stderr(&out));
}

#[test]
fn the_bundled_registry_is_intact_and_holds_the_examples() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let bundled = root().join("registry");
    let verify = mmx(
        &[
            "verify",
            "--read-data",
            "--registry",
            bundled.to_str().unwrap(),
        ],
        w,
    );
    assert_ok(&verify);
    for (tag, dir) in [
        ("tiny-med-base:v1", examples().join("tiny-med-base")),
        ("cardiology:v1", examples().join("adapters/cardiology")),
        ("dermatology:v1", examples().join("adapters/dermatology")),
    ] {
        let target = w.join(tag.replace(':', "-"));
        assert_ok(&mmx(
            &[
                "pull",
                tag,
                "-o",
                target.to_str().unwrap(),
                "--registry",
                bundled.to_str().unwrap(),
            ],
            w,
        ));
        assert_same_dir(&dir, &target);
    }
}

/// A registry follows no symbolic link out of itself: a blob, a tag folder or one of its own
/// folders replaced by a link is refused by name, for reading and for writing, and nothing is
/// written through the link.
#[test]
fn links_out_of_the_registry_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    assert_ok(&mmx(&["publish", &adapter("cardiology"), "expert:v1"], w));
    let registry = w.join("registry");
    let outside = w.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let refused = |out: &Output, link: &Path| {
        assert!(!out.status.success(), "{}", stderr(out));
        let text = stderr(out);
        // The registry is `./registry`: named relative to the working directory.
        let named = link.strip_prefix(w).unwrap().display().to_string();
        assert!(
            text.contains("symbolic link") && text.contains(&named),
            "{text}"
        );
    };

    // A blob moved elsewhere and linked back, with the right content.
    let blob = blob_path(&registry, &tensor_blobs(w, "expert:v1")[0]);
    let moved = outside.join("blob");
    std::fs::rename(&blob, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &blob).unwrap();
    refused(&mmx(&["pull", "expert:v1", "-o", "pulled"], w), &blob);
    assert!(!w.join("pulled").exists());
    std::fs::remove_file(&blob).unwrap();
    std::fs::rename(&moved, &blob).unwrap();
    assert_ok(&mmx(&["pull", "expert:v1", "-o", "pulled"], w));

    // A tag folder that is a link: neither read nor written through.
    let tags = registry.join("refs/expert");
    std::fs::rename(&tags, outside.join("tags")).unwrap();
    std::os::unix::fs::symlink(outside.join("tags"), &tags).unwrap();
    refused(&mmx(&["pull", "expert:v1", "-o", "again"], w), &tags);
    refused(
        &mmx(&["publish", &adapter("radiology"), "expert:v2"], w),
        &tags,
    );
    assert!(!outside.join("tags/v2").exists());

    // The registry's own folders.
    std::fs::remove_file(&tags).unwrap();
    std::fs::rename(outside.join("tags"), &tags).unwrap();
    let tmp = registry.join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::create_dir_all(outside.join("tmp")).unwrap();
    std::os::unix::fs::symlink(outside.join("tmp"), &tmp).unwrap();
    refused(
        &mmx(&["publish", &adapter("radiology"), "other:v1"], w),
        &tmp,
    );
    assert_eq!(std::fs::read_dir(outside.join("tmp")).unwrap().count(), 0);
}
