//! `mmx sweep --slurm` on a real single-node Slurm cluster (Debian's slurm-wlm and munge,
//! started on loopback by scripts/slurm-cluster.sh, which installs them on first use as root):
//! a 4-task array plus its gather job gives the one-process results, and a task killed mid-way
//! is resumed by resubmitting only its shard.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

mod common;

use common::assert_ok;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The cluster's slurm.conf; started once per test process, stopped by the script when the
/// process exits.
fn slurm_conf() -> &'static Path {
    static CONF: OnceLock<PathBuf> = OnceLock::new();
    CONF.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mmx-slurm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("start.log")).unwrap();
        // Waited on by status only: the daemons it starts keep their own output.
        let status = Command::new("bash")
            .arg(root().join("scripts/slurm-cluster.sh"))
            .arg("start")
            .arg(&dir)
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "scripts/slurm-cluster.sh start failed: {}",
            std::fs::read_to_string(dir.join("start.log")).unwrap_or_default()
        );
        dir.join("slurm.conf")
    })
}

/// One test at a time on the one node, so that the wall times mean something.
fn node() -> std::sync::MutexGuard<'static, ()> {
    static NODE: Mutex<()> = Mutex::new(());
    NODE.lock().unwrap_or_else(|e| e.into_inner())
}

fn slurm(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("SLURM_CONF", slurm_conf())
        .output()
        .unwrap()
}

fn mmx(args: &[&str], cwd: &Path) -> Output {
    let conf = slurm_conf().to_str().unwrap();
    common::mmx_with_env(args, cwd, &[("SLURM_CONF", Some(conf))])
}

/// The job ids `mmx sweep --slurm` printed: array, then gather.
fn job_ids(out: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{stdout}"))
            .to_string()
    };
    (id("submitted array job "), id("submitted gather job "))
}

/// The state of a job (or array task, `ID_I`), e.g. PENDING, RUNNING, COMPLETED, FAILED.
fn state(job: &str) -> String {
    let out = slurm("scontrol", &["show", "job", "-o", job]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("JobState="))
        .unwrap_or("UNKNOWN")
        .to_string()
}

/// Waits for `job` to end and returns its final state.
fn wait(job: &str, dir: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let s = state(job);
        if !matches!(
            s.as_str(),
            "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "UNKNOWN"
        ) {
            return s;
        }
        if Instant::now() > deadline {
            let logs = std::fs::read_dir(dir.join("slurm"))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default();
            panic!("job {job} still {s} after 10 minutes; logs:\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A planted sweep of `lambdas` × 2 methods; at `dim` 768 a trial takes about 0.3 s on one core.
fn write_sweep(dir: &Path, lambdas: &str, dim: usize) {
    let text = format!(
        r#"
[sweep]
[sweep.planted]
experts = 3
dim = {dim}
rank = 8
overlap = 0.5
seed = 11

[[sweep.methods]]
method = "task_arithmetic"
output = "delta"
parameters = {{ lambda = [{lambdas}] }}

[[sweep.methods]]
method = "ties"
output = "delta"
parameters = {{ density = [0.5], lambda = [{lambdas}] }}
"#
    );
    std::fs::write(dir.join("sweep.toml"), text).unwrap();
}

/// (id, validation, test) of every trial in `dir`'s results.json.
fn scores(dir: &Path) -> Vec<(String, f64, f64)> {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    json["trials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert!(t["error"].is_null(), "{t}");
            (
                t["id"].as_str().unwrap().to_string(),
                t["validation"].as_f64().unwrap(),
                t["test"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The sweep into `split` as a 4-task array.
const SUBMIT: [&str; 7] = [
    "sweep",
    "sweep.toml",
    "-o",
    "split",
    "--slurm",
    "--shards",
    "4",
];

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[test]
fn a_four_task_array_and_its_gather_job_give_the_one_process_results() {
    let _node = node();
    let work = tempfile::tempdir().unwrap();
    write_sweep(work.path(), "0.25, 0.5, 0.75, 1.0", 256);

    let start = Instant::now();
    assert_ok(&mmx(&["sweep", "sweep.toml", "-o", "whole"], work.path()));
    let one_process = start.elapsed();

    let start = Instant::now();
    let out = mmx(&SUBMIT, work.path());
    assert_ok(&out);
    let (array, gather) = job_ids(&out);
    let dir = work.path().join("split");
    assert_eq!(wait(&gather, &dir), "COMPLETED");
    let on_slurm = start.elapsed();
    for task in 0..4 {
        assert_eq!(state(&format!("{array}_{task}")), "COMPLETED");
        assert_eq!(lines(&dir.join(format!("trials-{task}-of-4.jsonl"))), 2);
    }
    assert_eq!(scores(&dir), scores(&work.path().join("whole")));
    let gather_log = std::fs::read_to_string(dir.join("slurm/gather.log")).unwrap();
    assert!(gather_log.contains("8 trials recorded"), "{gather_log}");
    assert!(dir.join("results.csv").is_file() && dir.join("scores.svg").is_file());
    eprintln!(
        "8 trials: one process {:.2} s, Slurm 4-task array + gather {:.2} s ({} CPUs)",
        one_process.as_secs_f64(),
        on_slurm.as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
}

#[test]
fn a_task_killed_mid_way_is_resumed_by_resubmitting_only_its_shard() {
    let _node = node();
    let work = tempfile::tempdir().unwrap();
    write_sweep(work.path(), "0.2, 0.4, 0.6, 0.8, 1.0, 1.2", 768);
    assert_ok(&mmx(&["sweep", "sweep.toml", "-o", "whole"], work.path()));

    // Task 0 runs alone (`%1`).
    let submit = [&SUBMIT[..], &["--array-parallel", "1"]].concat();
    let out = mmx(&submit, work.path());
    assert_ok(&out);
    let (array, gather) = job_ids(&out);
    let dir = work.path().join("split");
    // It is killed once it has recorded the first of its three trials.
    let first = dir.join("trials-0-of-4.jsonl");
    let deadline = Instant::now() + Duration::from_secs(300);
    while lines(&first) == 0 {
        assert!(Instant::now() < deadline, "task 0 recorded nothing");
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = slurm("scancel", &["--signal=KILL", &format!("{array}_0")]);
    assert_ok(&killed);

    // The gather job runs after the array whatever its tasks did, and fails naming what is missing.
    assert_eq!(wait(&gather, &dir), "FAILED");
    let recorded = lines(&first);
    assert!(recorded < 3, "task 0 finished before it could be killed");
    assert_ne!(state(&format!("{array}_0")), "COMPLETED");
    let log = std::fs::read_to_string(dir.join("slurm/gather.log")).unwrap();
    assert!(log.contains(&format!("{} missing", 3 - recorded)), "{log}");
    // Shard 0 of 4 holds trials 0, 4 and 8, run in that order.
    for trial in [0, 4, 8].into_iter().skip(recorded) {
        assert!(log.contains(&format!("missing: trial {trial} (")), "{log}");
    }

    let resume = [&submit[..], &["--resume"]].concat();
    let out = mmx(&resume, work.path());
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("1 tasks: shards 0 of 4"),
        "only the killed shard runs again: {stdout}"
    );
    let (_, gather) = job_ids(&out);
    assert_eq!(wait(&gather, &dir), "COMPLETED");
    assert_eq!(
        lines(&first),
        3,
        "the rerun skipped what task 0 had recorded"
    );
    assert_eq!(scores(&dir), scores(&work.path().join("whole")));
}
