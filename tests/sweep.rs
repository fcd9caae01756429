//! `mmx sweep`: trials scored on planted-conflict tasks, resumed, sharded, and recorded as CSV
//! and JSON keyed by trial id.

use std::path::Path;

mod common;

use common::{assert_ok, mmx};

const PLANTED: &str = r#"
[sweep]
[sweep.planted]
experts = 3
dim = 32
rank = 4
overlap = 0.5
seed = 3

[[sweep.methods]]
method = "task_arithmetic"
output = "delta"
parameters = { lambda = [0.25, 0.5, 1.0] }

[[sweep.methods]]
method = "caci"
output = "lora"
rank = 8
parameters = { density = [0.5], lambda = [1.0, 2.0] }
"#;

fn results(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap()
}

fn write_sweep(dir: &Path, text: &str) {
    std::fs::write(dir.join("sweep.toml"), text).unwrap();
}

#[test]
fn a_planted_sweep_scores_every_trial_and_writes_csv_json_and_plot() {
    let work = tempfile::tempdir().unwrap();
    write_sweep(work.path(), PLANTED);
    let out = mmx(&["sweep", "sweep.toml", "-o", "out"], work.path());
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("5 trials run, 0 skipped"), "{stdout}");
    let dir = work.path().join("out");
    let trials = results(&dir)["trials"].as_array().unwrap().clone();
    assert_eq!(trials.len(), 5);
    let ids: std::collections::BTreeSet<&str> =
        trials.iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 5, "ids are distinct");
    for t in &trials {
        let (v, s) = (
            t["validation"].as_f64().unwrap(),
            t["test"].as_f64().unwrap(),
        );
        assert!(v > -10.0 && v < 1.0 && s < 1.0, "{t}");
    }
    // Task arithmetic with λ = 1/T is close to the best a single λ does; λ = 1 overshoots where
    // the tasks overlap.
    let score = |i: usize| trials[i]["test"].as_f64().unwrap();
    assert!(score(1) > score(2), "λ 0.5 beats λ 1 at overlap 0.5");
    // CACI merged into a LoRA in core space reports the energy it kept of each expert.
    let kept = trials[3]["retained_energy"].as_object().unwrap();
    assert_eq!(kept.len(), 3);
    assert!(trials[3]["sign_conflict"].as_f64().unwrap() > 0.0);

    let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 6);
    assert!(lines[0].starts_with("index,id,method,output,space,rank,density,lambda,"));
    assert!(lines[1].starts_with(&format!(
        "0,{},task_arithmetic,delta,",
        trials[0]["id"].as_str().unwrap()
    )));
    let svg = std::fs::read_to_string(dir.join("scores.svg")).unwrap();
    assert!(svg.contains("lambda") && svg.contains("caci") && svg.contains("task_arithmetic"));
    assert!(
        !dir.join("outputs").exists(),
        "merged outputs are not kept unless asked"
    );

    // Again without --resume: refused, nothing changed.
    let again = mmx(&["sweep", "sweep.toml", "-o", "out"], work.path());
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    // With --resume: every trial is skipped.
    let resumed = mmx(
        &["sweep", "sweep.toml", "-o", "out", "--resume"],
        work.path(),
    );
    assert_ok(&resumed);
    assert!(String::from_utf8_lossy(&resumed.stdout).contains("0 trials run, 5 skipped"));
    assert_eq!(results(&dir)["trials"].as_array().unwrap(), &trials);
}

#[test]
fn shards_split_the_trials_and_resume_reruns_a_trial_cut_short() {
    let work = tempfile::tempdir().unwrap();
    write_sweep(work.path(), PLANTED);
    assert_ok(&mmx(&["sweep", "sweep.toml", "-o", "whole"], work.path()));
    let whole = results(&work.path().join("whole"));
    for shard in ["0/2", "1/2"] {
        let out = mmx(
            &["sweep", "sweep.toml", "-o", "split", "--shard", shard],
            work.path(),
        );
        assert_ok(&out);
    }
    let split_dir = work.path().join("split");
    let first = std::fs::read_to_string(split_dir.join("trials-0-of-2.jsonl")).unwrap();
    let second = std::fs::read_to_string(split_dir.join("trials-1-of-2.jsonl")).unwrap();
    assert_eq!((first.lines().count(), second.lines().count()), (3, 2));
    let strip = |v: &serde_json::Value| -> Vec<(String, f64)> {
        v["trials"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["id"].as_str().unwrap().to_string(),
                    t["test"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(strip(&results(&split_dir)), strip(&whole));

    // A crash mid-write leaves a torn last line: resume reruns that trial and nothing else.
    let file = split_dir.join("trials-1-of-2.jsonl");
    let text = std::fs::read_to_string(&file).unwrap();
    let cut = text.trim_end().rfind('\n').unwrap() + 1 + 20;
    std::fs::write(&file, &text[..cut]).unwrap();
    let out = mmx(
        &[
            "sweep",
            "sweep.toml",
            "-o",
            "split",
            "--shard",
            "1/2",
            "--resume",
        ],
        work.path(),
    );
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 trials run, 1 skipped"));
    assert_eq!(strip(&results(&split_dir)), strip(&whole));
}

#[test]
fn a_failing_trial_is_recorded_and_exits_1() {
    let work = tempfile::tempdir().unwrap();
    // density 0 is out of range: that trial fails, the other runs.
    write_sweep(
        work.path(),
        &PLANTED.replace("density = [0.5]", "density = [0.0, 0.5]"),
    );
    let out = mmx(&["sweep", "sweep.toml", "-o", "out"], work.path());
    assert_eq!(out.status.code(), Some(1));
    let trials = results(&work.path().join("out"))["trials"]
        .as_array()
        .unwrap()
        .clone();
    let failed: Vec<_> = trials.iter().filter(|t| !t["error"].is_null()).collect();
    assert_eq!(failed.len(), 2, "both λ of density 0");
    assert!(failed[0]["error"].as_str().unwrap().contains("density"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FAILED"));
}

#[test]
fn a_recipe_template_sweeps_the_bundled_adapters() {
    let work = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        r#"
[sweep]
recipe = "{}"
search = "random"
trials = 3
seed = 5
keep_outputs = true

[[sweep.methods]]
method = "ties"
output = "delta"
parameters = {{ density = {{ min = 0.2, max = 0.8 }} }}
"#,
        root.join("recipes/quickstart.toml").display()
    );
    write_sweep(work.path(), &text);
    let out = mmx(&["sweep", "sweep.toml", "-o", "out"], work.path());
    assert_ok(&out);
    let trials = results(&work.path().join("out"))["trials"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(trials.len(), 3);
    for t in &trials {
        let density = t["settings"]["parameters"]["density"].as_f64().unwrap();
        assert!((0.2..=0.8).contains(&density));
        assert!(t["validation"].is_null(), "no evaluator, no score");
        // The kept output is a delta merge whose record holds the trial's own recipe.
        let dir = work
            .path()
            .join("out/outputs")
            .join(t["id"].as_str().unwrap());
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("mmx-merge.json")).unwrap()).unwrap();
        assert_eq!(record["method"], "ties");
        assert_eq!(record["output"], "delta");
        let recipe = record["recipe"]["text"].as_str().unwrap();
        assert!(recipe.contains(&format!("density = {density}")), "{recipe}");
        assert!(
            !recipe.contains("gamma"),
            "CACI-only parameters are dropped"
        );
    }
}

#[test]
fn gather_names_the_missing_trials_until_every_shard_has_run() {
    let work = tempfile::tempdir().unwrap();
    write_sweep(work.path(), PLANTED);
    let gather = |dir: &Path| mmx(&["sweep", "sweep.toml", "-o", "out", "--gather"], dir);
    let none = gather(work.path());
    assert_eq!(none.status.code(), Some(2), "nothing has run in `out`");
    assert!(String::from_utf8_lossy(&none.stderr).contains("no shard"));

    assert_ok(&mmx(
        &["sweep", "sweep.toml", "-o", "out", "--shard", "0/2"],
        work.path(),
    ));
    let partial = gather(work.path());
    assert_eq!(partial.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&partial.stdout);
    assert!(
        stdout.contains("3 trials recorded") && stdout.contains("2 missing"),
        "{stdout}"
    );
    // Shard 0 of 2 holds trials 0, 2 and 4: 1 and 3 are missing.
    assert!(stdout.contains("missing: trial 1 (") && stdout.contains("missing: trial 3 ("));
    assert!(String::from_utf8_lossy(&partial.stderr).contains("hint:"));
    assert_eq!(
        results(&work.path().join("out"))["trials"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    assert_ok(&mmx(
        &["sweep", "sweep.toml", "-o", "out", "--shard", "1/2"],
        work.path(),
    ));
    let whole = gather(work.path());
    assert_ok(&whole);
    assert!(String::from_utf8_lossy(&whole.stdout).contains("5 trials recorded"));
    assert!(work.path().join("out/scores.svg").is_file());
}

#[test]
fn slurm_print_script_writes_an_array_of_shards_and_a_gather_job() {
    let work = tempfile::tempdir().unwrap();
    write_sweep(work.path(), PLANTED);
    let args = [
        "sweep",
        "sweep.toml",
        "-o",
        "out",
        "--slurm",
        "--shards",
        "4",
        "--array-parallel",
        "2",
        "--partition",
        "gpu a",
        "--sbatch-option=--time=01:00:00",
        "--print-script",
    ];
    let out = mmx(&args, work.path());
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("sbatch --dependency=afterany:$array"),
        "{stdout}"
    );
    let dir = std::fs::canonicalize(work.path().join("out")).unwrap();
    let array = std::fs::read_to_string(dir.join("slurm/sweep.sbatch")).unwrap();
    for line in [
        "#SBATCH --array=0-3%2",
        "#SBATCH --partition='gpu a'",
        "#SBATCH --time=01:00:00",
        "#SBATCH --cpus-per-task=1",
        "export RAYON_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-1}\"",
    ] {
        assert!(array.lines().any(|l| l == line), "{line} in\n{array}");
    }
    assert!(
        array.contains(&format!(
            "-o {} --shard \"$SLURM_ARRAY_TASK_ID/4\" --resume",
            dir.display()
        )),
        "{array}"
    );
    assert!(array.contains(&format!("--output={}/slurm/shard-%a.log", dir.display())));
    let gather = std::fs::read_to_string(dir.join("slurm/gather.sbatch")).unwrap();
    assert!(gather.trim_end().ends_with("--gather"), "{gather}");
    assert!(!gather.contains("--array"));

    // Shard 2 runs by hand: resubmitting leaves it out; without --resume it is refused.
    assert_ok(&mmx(
        &["sweep", "sweep.toml", "-o", "out", "--shard", "2/4"],
        work.path(),
    ));
    let refused = mmx(&args, work.path());
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--resume"));
    let mut resume = args.to_vec();
    resume.push("--resume");
    assert_ok(&mmx(&resume, work.path()));
    let array = std::fs::read_to_string(dir.join("slurm/sweep.sbatch")).unwrap();
    assert!(
        array.lines().any(|l| l == "#SBATCH --array=0,1,3%2"),
        "{array}"
    );
}

#[test]
fn slurm_without_sbatch_is_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    write_sweep(work.path(), PLANTED);
    let out = common::mmx_with_env(
        &[
            "sweep",
            "sweep.toml",
            "-o",
            "out",
            "--slurm",
            "--shards",
            "2",
        ],
        work.path(),
        &[("PATH", Some("/nonexistent"))],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sbatch") && stderr.contains("--print-script"),
        "{stderr}"
    );
    assert!(
        !work.path().join("out/trials-0-of-2.jsonl").exists(),
        "nothing ran"
    );
}

#[test]
fn a_sweep_with_publish_publishes_each_trial_under_its_id() {
    let work = tempfile::tempdir().unwrap();
    let text = PLANTED.replace(
        "[sweep]\n",
        "[sweep]\npublish = \"planted-merges\"\nregistry = \"shared-registry\"\n",
    );
    write_sweep(work.path(), &text);
    let out = mmx(&["sweep", "sweep.toml", "-o", "out"], work.path());
    assert_ok(&out);
    let trials = results(&work.path().join("out"))["trials"]
        .as_array()
        .unwrap()
        .clone();
    let listed = mmx(
        &["ls", "--registry", "shared-registry", "--json"],
        work.path(),
    );
    assert_ok(&listed);
    let listing: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listing.len(), trials.len());
    for t in &trials {
        let id = t["id"].as_str().unwrap();
        let entry = listing
            .iter()
            .find(|e| e["reference"] == format!("planted-merges:{id}"))
            .unwrap_or_else(|| panic!("trial {id} is not published: {listing:?}"));
        assert_eq!(entry["manifest"], t["published"]);
        assert_eq!(entry["kind"], "merged");
        let shown = mmx(
            &[
                "show",
                &format!("planted-merges:{id}"),
                "--registry",
                "shared-registry",
                "--json",
            ],
            work.path(),
        );
        assert_ok(&shown);
        let manifest: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
        assert!(
            manifest["lineage"]["recipe"]
                .as_str()
                .is_some_and(|r| r.starts_with("blake3:")),
            "the trial's recipe is kept: {manifest}"
        );
    }
    assert_ok(&mmx(
        &["verify", "--registry", "shared-registry"],
        work.path(),
    ));

    // `registry` without `publish` is refused, naming the key.
    write_sweep(
        work.path(),
        &PLANTED.replace("[sweep]\n", "[sweep]\nregistry = \"shared-registry\"\n"),
    );
    let refused = mmx(&["sweep", "sweep.toml", "-o", "other"], work.path());
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("sweep.publish"));
    // A name the registry would refuse is refused before anything runs.
    write_sweep(
        work.path(),
        &PLANTED.replace("[sweep]\n", "[sweep]\npublish = \"Bad Name\"\n"),
    );
    let refused = mmx(&["sweep", "sweep.toml", "-o", "third"], work.path());
    assert_eq!(refused.status.code(), Some(2));
    assert!(!work.path().join("third/trials-0-of-1.jsonl").exists());
}
