//! Hostile inputs, end to end: each is refused by `mmx` with exit code 2 and a message naming
//! the file (and the tensor, module or path at fault), and nothing is written.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use mmx::merge::calibration::{write_calibration, ModuleStats};
use mmx::merge::Method;
use serde_json::Value;

use common::{assert_ok, mmx, reference};

/// Copies the files of directory `from` into `dir/name`.
fn copy_dir(dir: &Path, name: &str, from: &Path) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
    to
}

/// A safetensors file's header (as JSON) and the bytes after it.
fn split(file: &Path) -> (serde_json::Map<String, Value>, Vec<u8>) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header.as_object().unwrap().clone(), bytes[8 + n..].to_vec())
}

/// Writes a safetensors file from a header and data, the header padded with spaces to 8 bytes.
fn join(file: &Path, header: &serde_json::Map<String, Value>, data: &[u8]) {
    let mut json = serde_json::to_vec(header).unwrap();
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(data);
    std::fs::write(file, bytes).unwrap();
}

/// Sets element `index` of f32 tensor `tensor` in `file` to `value`.
fn poison(file: &Path, tensor: &str, index: usize, value: f32) {
    let (header, mut data) = split(file);
    let start = header[tensor]["data_offsets"][0].as_u64().unwrap() as usize + 4 * index;
    data[start..start + 4].copy_from_slice(&value.to_le_bytes());
    join(file, &header, &data);
}

/// Runs `mmx merge` on a recipe of `text` written into `dir`, into `dir/out`.
fn merge(dir: &Path, text: &str) -> Output {
    let recipe = dir.join("recipe.toml");
    std::fs::write(&recipe, text).unwrap();
    let out = dir.join("out");
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

/// Asserts that `out` is a refusal (exit code 2) naming every needle, and that `dir/out` was
/// not written.
fn refused(out: &Output, dir: &Path, case: &str, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{case}: {stderr}");
    assert!(!stderr.contains("panicked"), "{case}: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{case}: no `{needle}` in {stderr}");
    }
    assert!(!dir.join("out").exists(), "{case}: an output was written");
}

/// A full-model merge of `base` with two fine-tuned copies.
fn full_recipe(method: &str, base: &Path, experts: &[PathBuf], extra: &str) -> String {
    let mut text = format!(
        "[merge]\nmethod = '{method}'\nbase = '{}'\noutput = 'full'\n{extra}\n",
        base.display()
    );
    for e in experts {
        text.push_str(&format!("[[merge.experts]]\nsource = '{}'\n", e.display()));
    }
    text
}

/// Rewrites a safetensors file in place.
type Corruption = dyn Fn(&Path);

#[test]
fn safetensors_headers_that_lie_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let experts = [reference("ft_a"), reference("ft_b")];
    let cases: [(&str, &Corruption, &str); 4] = [
        (
            "a header length of a terabyte",
            &|file| {
                let mut bytes = std::fs::read(file).unwrap();
                bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                std::fs::write(file, bytes).unwrap();
            },
            "header",
        ),
        (
            "data past the end of the file",
            &|file| {
                let (mut header, data) = split(file);
                // The last tensor in the data section ends far past it.
                let (last, start) = header
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v["data_offsets"][0].as_u64()?)))
                    .max_by_key(|(_, start)| *start)
                    .unwrap();
                let end = data.len() as u64 * 1000;
                header[&last]["data_offsets"] = serde_json::json!([start, end]);
                header[&last]["shape"] = serde_json::json!([(end - start) / 4]);
                join(file, &header, &data);
            },
            "truncated file",
        ),
        (
            "two tensors on the same bytes",
            &|file| {
                let (mut header, data) = split(file);
                let first = header["lm_head.weight"]["data_offsets"].clone();
                header["model.embed_tokens.weight"]["data_offsets"] = first;
                join(file, &header, &data);
            },
            "overlap",
        ),
        (
            "a shape of a terabyte of elements",
            &|file| {
                let (mut header, data) = split(file);
                header["lm_head.weight"]["shape"] = serde_json::json!([1u64 << 20, 1u64 << 20]);
                join(file, &header, &data);
            },
            "lm_head.weight",
        ),
    ];
    for (case, corrupt, needle) in cases {
        let base = copy_dir(dir.path(), "base", &reference("base"));
        corrupt(&base.join("model.safetensors"));
        let out = merge(
            dir.path(),
            &full_recipe("task_arithmetic", &base, &experts, ""),
        );
        refused(&out, dir.path(), case, &["model.safetensors", needle]);
        std::fs::remove_dir_all(&base).unwrap();
    }
}

#[test]
fn shard_indexes_cannot_name_files_outside_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let experts = [reference("ft_a"), reference("ft_b")];
    // A real safetensors file beside the model, and one at an absolute path.
    let outside = dir.path().join("outside.safetensors");
    std::fs::copy(reference("base").join("model.safetensors"), &outside).unwrap();
    for target in ["../outside.safetensors", outside.to_str().unwrap()] {
        let base = copy_dir(dir.path(), "base", &reference("base"));
        std::fs::remove_file(base.join("model.safetensors")).unwrap();
        let (header, _) = split(&outside);
        let weight_map: serde_json::Map<String, Value> = header
            .keys()
            .filter(|k| *k != "__metadata__")
            .map(|k| (k.clone(), Value::from(target)))
            .collect();
        std::fs::write(
            base.join("model.safetensors.index.json"),
            serde_json::to_vec(&serde_json::json!({ "weight_map": weight_map })).unwrap(),
        )
        .unwrap();
        let out = merge(
            dir.path(),
            &full_recipe("task_arithmetic", &base, &experts, ""),
        );
        refused(
            &out,
            dir.path(),
            target,
            &[
                "model.safetensors.index.json",
                "not a file in this directory",
            ],
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}

/// Calibration statistics for `module` of a `[rows, cols]` weight: an identity Gram and a
/// Fisher of ones.
fn statistics(path: &Path, module: &str, rows: usize, cols: usize) -> PathBuf {
    let mut gram = vec![0f32; cols * cols];
    (0..cols).for_each(|i| gram[i * cols + i] = 1.0);
    let stats = BTreeMap::from([(
        module.to_string(),
        ModuleStats {
            gram: Some((gram, cols, 16)),
            fisher: Some((vec![1.0; rows * cols], vec![rows, cols])),
        },
    )]);
    write_calibration(path, &stats).unwrap();
    path.to_path_buf()
}

/// The weight the NaN tests poison: a [32, 64] down_proj.
const POISONED: &str = "model.layers.1.mlp.down_proj.weight";

/// Statistics for [`POISONED`]'s module, in `dir`.
fn poisoned_module_statistics(dir: &Path) -> PathBuf {
    statistics(
        &dir.join("stats.safetensors"),
        POISONED.trim_end_matches(".weight"),
        32,
        64,
    )
}

#[test]
fn nan_and_infinity_are_refused_by_every_method() {
    let dir = tempfile::tempdir().unwrap();
    let stats = poisoned_module_statistics(dir.path());
    let full = Method::all().iter().filter(|m| !m.adapters_only());
    for &method in full {
        for (case, in_base, value) in [
            ("NaN in an expert", false, f32::NAN),
            ("infinity in the base", true, f32::INFINITY),
        ] {
            if in_base && !method.needs_base() {
                continue;
            }
            let base = copy_dir(dir.path(), "base", &reference("base"));
            let expert = copy_dir(dir.path(), "expert", &reference("ft_b"));
            let poisoned = if in_base { &base } else { &expert };
            poison(&poisoned.join("model.safetensors"), POISONED, 37, value);
            let mut text = format!(
                "[merge]\nmethod = '{}'\nbase = '{}'\noutput = 'full'\n",
                method.name(),
                base.display()
            );
            for e in [reference("ft_a"), expert.clone()] {
                text.push_str(&format!("[[merge.experts]]\nsource = '{}'\n", e.display()));
                if method.data_aware() {
                    text.push_str(&format!("calibration = '{}'\n", stats.display()));
                }
            }
            let out = merge(dir.path(), &text);
            refused(
                &out,
                dir.path(),
                &format!("{}: {case}", method.name()),
                &[
                    POISONED,
                    "non-finite",
                    &poisoned.join("model.safetensors").display().to_string(),
                ],
            );
            std::fs::remove_dir_all(&base).unwrap();
            std::fs::remove_dir_all(&expert).unwrap();
        }
    }
}

#[test]
fn nan_in_a_lora_factor_is_refused_by_every_lora_output_merge() {
    let dir = tempfile::tempdir().unwrap();
    let stats = poisoned_module_statistics(dir.path());
    let factor = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight";
    for (method, head) in [
        ("cat", "method = 'cat'"),
        ("svd", "method = 'svd'\nrank = 4"),
        (
            "task_arithmetic",
            "method = 'task_arithmetic'\nspace = 'core'",
        ),
        (
            "ties",
            "method = 'ties'\nspace = 'core'\n[merge.parameters]\ndensity = 0.5",
        ),
        (
            "caci",
            "method = 'caci'\nspace = 'core'\n[merge.parameters]\ndensity = 0.5",
        ),
        ("regmean", "method = 'regmean'\nspace = 'core'"),
    ] {
        let poisoned = copy_dir(dir.path(), "lora", &reference("lora_b"));
        poison(
            &poisoned.join("adapter_model.safetensors"),
            factor,
            3,
            f32::NAN,
        );
        let mut text = format!(
            "[merge]\nbase = '{}'\noutput = 'lora'\n{head}\n",
            reference("base").display()
        );
        for e in [reference("lora_a"), poisoned.clone()] {
            text.push_str(&format!("[[merge.experts]]\nsource = '{}'\n", e.display()));
            if method == "regmean" {
                text.push_str(&format!("calibration = '{}'\n", stats.display()));
            }
        }
        let out = merge(dir.path(), &text);
        refused(
            &out,
            dir.path(),
            method,
            &[factor, "non-finite", "adapter_model.safetensors"],
        );
        std::fs::remove_dir_all(&poisoned).unwrap();
    }
}

#[test]
fn adapters_whose_ranks_disagree_with_their_config_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lying = copy_dir(dir.path(), "lying", &reference("lora_a"));
    let path = lying.join("adapter_config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let r = config["r"].as_u64().unwrap();
    config["r"] = Value::from(r * 2);
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    for (output, method) in [("lora", "cat"), ("full", "task_arithmetic")] {
        let text = format!(
            "[merge]\nmethod = '{method}'\nbase = '{}'\noutput = '{output}'\n[[merge.experts]]\nsource = '{}'\n",
            reference("base").display(),
            lying.display()
        );
        let out = merge(dir.path(), &text);
        refused(
            &out,
            dir.path(),
            method,
            &["lying", &format!("rank {r} in the weights but {}", r * 2)],
        );
    }
}

#[test]
fn recipe_paths_with_dots_resolve_against_the_recipe_and_registry_names_cannot_escape() {
    let dir = tempfile::tempdir().unwrap();
    // `..` in a recipe is relative to the recipe's folder, wherever mmx runs.
    let recipes = dir.path().join("recipes");
    std::fs::create_dir_all(&recipes).unwrap();
    copy_dir(dir.path(), "base", &reference("base"));
    copy_dir(dir.path(), "a", &reference("ft_a"));
    let recipe = recipes.join("up.toml");
    let write = |expert: &str| {
        std::fs::write(
            &recipe,
            format!("[merge]\nmethod = 'task_arithmetic'\nbase = '../base'\noutput = 'full'\n[[merge.experts]]\nsource = '{expert}'\n"),
        )
        .unwrap();
    };
    write("../a");
    let elsewhere = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = || {
        mmx(
            &[
                "merge",
                recipe.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ],
            elsewhere.path(),
        )
    };
    assert_ok(&run());
    std::fs::remove_dir_all(&out).unwrap();
    // A `..` that leads nowhere is named as the recipe resolved it.
    write("../../../nowhere");
    let got = run();
    refused(&got, dir.path(), "..", &["nowhere"]);
    // Registry names are single components: `..` cannot walk out of the registry.
    for reference in ["registry:../etc:v1", "registry:a:../../x"] {
        write(reference);
        let got = run();
        refused(
            &got,
            dir.path(),
            reference,
            &[reference.trim_start_matches("registry:")],
        );
    }
}
