//! LoRA-output merges without a `base`: the arithmetic reads only the adapters' factors, so a
//! recipe that names no base writes the same adapter as one that does; what does need the base
//! (tensors stored whole, depth-dependent parameters the adapters cannot place) is refused with
//! the reason.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_ok, mmx, reference};

const SPECIALTIES: [&str; 3] = ["cardiology", "radiology", "pathology"];

fn adapters() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/adapters");
    SPECIALTIES.iter().map(|s| root.join(s)).collect()
}

/// The experts' weights in most recipes here.
const WEIGHTS: [&str; 3] = ["1.0", "0.8", "1.2"];

/// Writes a recipe over `experts` with `weights` (TOML values) and `base` if given, runs it
/// into `dir/NAME` and returns mmx's output.
fn merge(
    dir: &Path,
    name: &str,
    base: Option<&Path>,
    header: &str,
    experts: &[PathBuf],
    weights: &[&str],
) -> std::process::Output {
    let mut text = "[merge]\noutput = 'lora'\n".to_string();
    if let Some(base) = base {
        text.push_str(&format!("base = '{}'\n", base.display()));
    }
    text.push_str(&format!("{header}\n"));
    for (e, weight) in experts.iter().zip(weights) {
        text.push_str(&format!(
            "[[merge.experts]]\nsource = '{}'\nweight = {weight}\n",
            e.display()
        ));
    }
    let recipe = dir.join(format!("{name}.toml"));
    std::fs::write(&recipe, text).unwrap();
    let out = dir.join(name);
    mmx(
        &[
            "merge",
            recipe.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        dir,
    )
}

fn read(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
}

#[test]
fn lora_output_merges_without_a_base_write_what_they_write_with_one() {
    let dir = tempfile::tempdir().unwrap();
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny-med-base");
    let experts = adapters();
    // Weights that change with depth: the adapters adapt every layer, so they show the layer
    // count (4) that the base's config gives.
    let gradients = ["[1.0, 0.25]", "0.8", "[0.5, 1.0, 0.75]"];
    for (name, header, weights) in [
        ("cat", "method = 'cat'", WEIGHTS),
        ("svd", "method = 'svd'\nrank = 12", WEIGHTS),
        (
            "ties",
            "method = 'ties'\nspace = 'core'\nrank = 16\n[merge.parameters]\ndensity = 0.5",
            WEIGHTS,
        ),
        (
            "caci",
            "method = 'caci'\nspace = 'core'\nrank = 24\n[merge.parameters]\ndensity = 0.5\nrestore = 0.85",
            WEIGHTS,
        ),
        ("gradient", "method = 'cat'", gradients),
        (
            "ties-gradient",
            "method = 'ties'\nspace = 'core'\nrank = 16\n[merge.parameters]\ndensity = [0.3, 0.9]",
            WEIGHTS,
        ),
    ] {
        let with = merge(
            dir.path(),
            &format!("{name}-base"),
            Some(&base),
            header,
            &experts,
            &weights,
        );
        assert_ok(&with);
        let without = merge(dir.path(), name, None, header, &experts, &weights);
        assert_ok(&without);
        let (a, b) = (dir.path().join(format!("{name}-base")), dir.path().join(name));
        assert!(
            read(&a, "adapter_model.safetensors") == read(&b, "adapter_model.safetensors"),
            "{name}: the factors differ without the base"
        );
        assert_eq!(
            read(&a, "adapter_config.json"),
            read(&b, "adapter_config.json"),
            "{name}"
        );
        let record: serde_json::Value =
            serde_json::from_slice(&read(&b, "mmx-merge.json")).unwrap();
        let roles: Vec<&str> = record["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["input"].as_str().unwrap())
            .collect();
        assert_eq!(roles.len(), experts.len(), "{name}: {roles:?}");
        assert!(roles.iter().all(|r| r.starts_with("expert:")), "{roles:?}");
    }
    // The gradients did change the merges.
    for (flat, graded) in [("cat", "gradient"), ("ties", "ties-gradient")] {
        assert!(
            read(&dir.path().join(flat), "adapter_model.safetensors")
                != read(&dir.path().join(graded), "adapter_model.safetensors"),
            "{graded}"
        );
    }
}

/// Copies an adapter into `dir/name` and edits its config.
fn edited(dir: &Path, name: &str, from: &Path, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
    let path = to.join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    to
}

fn refused(out: &std::process::Output, dir: &Path, name: &str, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{name}: no `{needle}` in {stderr}");
    }
    assert!(!dir.join(name).exists(), "{name}: an output was written");
}

#[test]
fn merges_without_a_base_refuse_what_needs_one() {
    let dir = tempfile::tempdir().unwrap();
    let experts = adapters();
    let cat = "method = 'cat'";

    // Adapters that name different bases.
    let other = edited(dir.path(), "other-base", &experts[1], |c| {
        c["base_model_name_or_path"] = "Qwen/Qwen2-0.5B".into();
    });
    let out = merge(
        dir.path(),
        "named",
        None,
        cat,
        &[experts[0].clone(), other.clone()],
        &WEIGHTS,
    );
    refused(
        &out,
        dir.path(),
        "named",
        &["tiny-med-base", "Qwen2-0.5B", "different bases"],
    );

    // Adapters of one name whose modules have other shapes (the reference fixtures' base is
    // a different model, with the same module names).
    let renamed = edited(dir.path(), "renamed", &reference("lora_a"), |c| {
        c["base_model_name_or_path"] = "tiny-med-base".into();
    });
    let out = merge(
        dir.path(),
        "shapes",
        None,
        cat,
        &[experts[0].clone(), renamed],
        &WEIGHTS,
    );
    refused(&out, dir.path(), "shapes", &["different bases", "renamed"]);

    // A tensor stored whole is merged against the base's.
    let out = merge(
        dir.path(),
        "saved",
        None,
        cat,
        &[reference("lora_a"), reference("lora_embed")],
        &WEIGHTS,
    );
    refused(
        &out,
        dir.path(),
        "saved",
        &["lora_embed", "lm_head", "modules_to_save", "`base`"],
    );

    // An adapter limited to some layers does not show the layer count a gradient needs...
    let partial = edited(dir.path(), "partial", &experts[1], |c| {
        c["layers_to_transform"] = serde_json::json!([0, 1, 2, 3]);
    });
    let pair = [experts[0].clone(), partial];
    let out = merge(
        dir.path(),
        "depth",
        None,
        "method = 'cat'",
        &pair,
        &["[1.0, 0.25]", "1.0"],
    );
    refused(
        &out,
        dir.path(),
        "depth",
        &["`weight` changes with depth", "layers_to_transform"],
    );
    // ... but a merge whose parameters are the same at every depth does without it.
    assert_ok(&merge(dir.path(), "flat", None, cat, &pair, &WEIGHTS));
}
