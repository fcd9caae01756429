//! `mmx pipeline` end to end at a scale for CI: two specialties, a tiny base, DSA and GBA
//! experts, conflicts, a one-trial merge sweep of each set and the table; a rerun skips every
//! stage, and a changed GBA recipe reruns the GBA stages and what reads them, nothing before.

use std::path::Path;

mod common;

use common::{assert_ok, mmx};

const BASE: &str = r#"[train]
method = "base"
seed = 3
epochs = 1
batch_size = 8
max_steps = 3
[train.init]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
intermediate_size = 64
max_position_embeddings = 256
[train.data]
synthetic = { seed = 0, train = 4, guidelines = true }
completion = "format"
"#;

fn dsa(s: &str) -> String {
    format!(
        "[train]\nmethod = \"dsa\"\nbase = \"registry:tiny:v1\"\nspecialty = \"{s}\"\nseed = 5\nepochs = 1\nbatch_size = 4\n\
         [train.data]\nsynthetic = {{ seed = 0, train = 4, guidelines = true }}\nspecialties = [\"{s}\"]\n\
         [train.lora]\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\n"
    )
}

fn gba(s: &str, lr: &str) -> String {
    format!(
        "[gba]\nbase = \"registry:tiny:v1\"\nadapter = \"registry:{s}:v1\"\nguidelines = \"{g}\"\nspecialty = \"{s}\"\n\
         steps = 1\ncases_per_step = 2\nnum_generations = 4\nmax_completion_length = 16\n\
         [gba.data]\nsynthetic = {{ seed = 0, train = 4, answer_only = 4, guidelines = true }}\nspecialties = [\"{s}\"]\n\
         [gba.optim]\nlr = {lr}\n",
        g = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("recipes/guidelines.toml")
            .display()
    )
}

const MERGE: &str = r#"[merge]
registry = "out/registry"
method = "ties"
base = "registry:tiny:v1"
output = "lora"
space = "core"
rank = 8
[merge.parameters]
density = 0.5
[[merge.experts]]
source = "registry:cardiology{suffix}:v1"
[[merge.experts]]
source = "registry:radiology{suffix}:v1"
"#;

const SWEEP: &str = r#"[sweep]
recipe = "merge{suffix}.toml"
keep_outputs = true
[[sweep.methods]]
method = "ties"
parameters = { density = [0.5] }
[sweep.eval]
base = "registry:tiny:v1"
validation = ["out/data/radiology/validation.jsonl", "out/data/cardiology/validation.jsonl"]
test = ["out/data/radiology/test.jsonl", "out/data/cardiology/test.jsonl"]
"#;

const PIPELINE: &str = r#"[pipeline]
output = "out"
registry = "out/registry"
specialties = ["radiology", "cardiology"]
data = { seed = 0, train = 4, validation = 2, test = 8, answer_only = 4 }
base = { recipe = "base.toml", publish = "tiny:v1" }
dsa = { recipe = "dsa-{specialty}.toml", publish = "{specialty}:v1" }
gba = { recipe = "gba-{specialty}.toml", publish = "{specialty}-gba:v1" }
merges = [
    { name = "dsa", experts = "dsa", sweep = "sweep.toml" },
    { name = "gba", experts = "gba", sweep = "sweep-gba.toml", publish = "expert:v1" },
]
"#;

fn skipped(stderr: &[u8]) -> usize {
    String::from_utf8_lossy(stderr)
        .matches("unchanged, skipped")
        .count()
}

#[test]
fn the_pipeline_runs_every_stage_then_skips_what_did_not_change() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    write("base.toml", BASE);
    for s in ["cardiology", "radiology"] {
        write(&format!("dsa-{s}.toml"), &dsa(s));
        write(&format!("gba-{s}.toml"), &gba(s, "1e-3"));
    }
    write("merge.toml", &MERGE.replace("{suffix}", ""));
    write("merge-gba.toml", &MERGE.replace("{suffix}", "-gba"));
    write("sweep.toml", &SWEEP.replace("{suffix}", ""));
    write("sweep-gba.toml", &SWEEP.replace("{suffix}", "-gba"));
    write("pipeline.toml", PIPELINE);

    let first = mmx(&["pipeline", "pipeline.toml"], dir);
    assert_ok(&first);
    assert_eq!(skipped(&first.stderr), 0);
    let table = std::fs::read_to_string(dir.join("out/table.md")).unwrap();
    for row in [
        "| base |",
        "cardiology DSA expert",
        "radiology GBA expert",
        "merge of the gba experts",
    ] {
        assert!(table.contains(row), "`{row}` in\n{table}");
    }
    // The merge's row, specialty by specialty (not in alphabetical order), is what `mmx eval`
    // gives the published merge (the sweep's only setting).
    let row = table
        .lines()
        .find(|l| l.contains("merge of the gba experts"))
        .unwrap();
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    for (column, specialty) in [(2, "radiology"), (3, "cardiology")] {
        let test = format!("out/data/{specialty}/test.jsonl");
        let eval = mmx(
            &[
                "eval",
                "registry:tiny:v1",
                "--adapter",
                "registry:expert:v1",
                "--data",
                &test,
                "--json",
                "--registry",
                "out/registry",
            ],
            dir,
        );
        assert_ok(&eval);
        let report: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
        let accuracy = report["accuracy"][specialty].as_f64().unwrap();
        assert_eq!(
            cells[column],
            format!("{:.1}%", accuracy * 100.0),
            "{specialty}: {row}"
        );
    }
    assert!(dir.join("out/table.png").is_file());
    assert!(dir.join("out/conflicts-gba.json").is_file());
    // The GBA expert's lineage names its DSA parent, whose base is the pipeline's base.
    let log = mmx(
        &["log", "cardiology-gba:v1", "--registry", "out/registry"],
        dir,
    );
    assert_ok(&log);
    let chain = String::from_utf8_lossy(&log.stdout);
    assert!(chain.lines().count() >= 3, "{chain}");
    // The merged expert's: the merge, the GBA experts, their DSA parents, the base.
    let log = mmx(&["log", "expert:v1", "--registry", "out/registry"], dir);
    assert_ok(&log);
    let chain = String::from_utf8_lossy(&log.stdout);
    assert!(chain.lines().next().unwrap().contains("merged"), "{chain}");
    assert_eq!(chain.matches("adapter (").count(), 4, "{chain}");
    assert!(chain.contains(" base"), "{chain}");

    let again = mmx(&["pipeline", "pipeline.toml"], dir);
    assert_ok(&again);
    // base, two DSA, two GBA, two conflicts, two merges.
    assert_eq!(
        skipped(&again.stderr),
        9,
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    write("gba-radiology.toml", &gba("radiology", "2e-3"));
    let changed = mmx(&["pipeline", "pipeline.toml"], dir);
    assert_ok(&changed);
    let stderr = String::from_utf8_lossy(&changed.stderr);
    // Only radiology's GBA expert and the GBA set's conflicts and merges run again.
    assert_eq!(skipped(&changed.stderr), 6, "{stderr}");
    assert!(stderr.contains("gba-radiology: done"), "{stderr}");
    assert!(stderr.contains("dsa-radiology: unchanged"), "{stderr}");

    // A forced run remakes everything and publishes its best merge again, even where the tag
    // already points elsewhere (here: moved by hand to the base).
    let show = |tag: &str| {
        let out = mmx(&["show", tag, "--registry", "out/registry"], dir);
        assert_ok(&out);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let published = show("expert:v1");
    let moved = mmx(
        &[
            "tag",
            "tiny:v1",
            "expert:v1",
            "--force",
            "--registry",
            "out/registry",
        ],
        dir,
    );
    assert_ok(&moved);
    assert_ne!(show("expert:v1"), published);
    let forced = mmx(&["pipeline", "pipeline.toml", "--force"], dir);
    assert_ok(&forced);
    assert_eq!(skipped(&forced.stderr), 0);
    assert_eq!(
        show("expert:v1"),
        published,
        "the same inputs make the same merge"
    );
}
