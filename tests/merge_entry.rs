//! The one merge entry point (`MergePlan::build` + `merge`) and the record it leaves: a
//! LoRA-output merge re-made from its `mmx-merge.json` alone is the same merge byte for byte
//! (the seed included), and the backend option reaches LoRA outputs as it reaches model
//! outputs.

mod common;

use std::path::Path;

use mmx::backend::{select, Backend, DeviceRequest};
use mmx::merge::{merge, MergePlan, OutputOptions};
use mmx::recipe::{MergeRecord, OutputKind, Recipe};

use common::{assert_ok, mmx, write_two_lora_recipe};

/// A recipe over lora_a (0.8) and lora_b (0.5) with a random method, the seed in its text 1.
fn write_recipe(dir: &Path, method: &str, output: &str, extra: &str) -> std::path::PathBuf {
    let recipe = dir.join(format!("{method}-{output}.toml"));
    let extra = format!("seed = 1\n{extra}\n[merge.parameters]\ndensity = 0.5");
    write_two_lora_recipe(&recipe, method, output, &extra);
    recipe
}

fn options(backend: Backend) -> OutputOptions {
    OutputOptions {
        max_memory: 1 << 30,
        shard_bytes: 5 << 30,
        force: false,
        backend,
        threads: None,
    }
}

fn bytes_of(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap()
}

/// `mmx merge --seed 7` of a core-space DARE merge, then the same merge made again from the
/// output's record alone: the adapter is the same byte for byte. Before the record held the
/// seed, a LoRA output's record re-made the merge with the text's seed 1, which keeps other
/// coordinates (checked: that merge differs). The same holds for a delta output.
#[test]
fn a_merge_is_remade_from_its_record_alone_byte_for_byte() {
    let work = tempfile::tempdir().unwrap();
    for (output, file, extra) in [
        (
            "lora",
            "adapter_model.safetensors",
            "space = 'core'\nrank = 6",
        ),
        ("delta", "delta.safetensors", ""),
    ] {
        let recipe = write_recipe(work.path(), "dare_ties", output, extra);
        let first = work.path().join(format!("{output}-first"));
        let out = mmx(
            &[
                "merge",
                recipe.to_str().unwrap(),
                "--seed",
                "7",
                "--device",
                "cpu",
                "-o",
                first.to_str().unwrap(),
            ],
            work.path(),
        );
        assert_ok(&out);
        let record = MergeRecord::read(&first).unwrap();
        assert_eq!(record.seed, Some(7), "{output}");
        assert_eq!(record.recipe.format.as_deref(), Some("mmx"), "{output}");

        // The recipe file goes away: only the record is left to re-make the merge from.
        std::fs::remove_file(&recipe).unwrap();
        let again = work.path().join(format!("{output}-again"));
        let plan = MergePlan::build(record.recipe().unwrap()).unwrap();
        merge(&plan, &again, &options(Backend::Cpu), &|_| {}).unwrap();
        assert_eq!(
            bytes_of(&first, file),
            bytes_of(&again, file),
            "{output}: re-made from the record"
        );

        // The text's own seed gives another merge, so the record's seed is what made it equal.
        let mut text_seed = record.recipe().unwrap();
        text_seed.seed = 1;
        let other = work.path().join(format!("{output}-seed1"));
        merge(
            &MergePlan::build(text_seed).unwrap(),
            &other,
            &options(Backend::Cpu),
            &|_| {},
        )
        .unwrap();
        assert_ne!(
            bytes_of(&first, file),
            bytes_of(&other, file),
            "{output}: seed 1 keeps the same coordinates as seed 7"
        );
    }
}

/// Through the library, a LoRA-output merge on the CPU says so for every module; asked for the
/// GPU, it runs there and says so, or, on a machine without one, fails with the same reason the
/// CLI gives for `--device cuda`, writing nothing.
#[test]
fn the_backend_reaches_lora_output_merges() {
    let work = tempfile::tempdir().unwrap();
    let recipe = write_recipe(work.path(), "ties", "lora", "space = 'core'\nrank = 6");
    let plan = MergePlan::build(Recipe::load(&recipe).unwrap()).unwrap();
    assert_eq!(plan.output(), OutputKind::Lora);

    let on_cpu = work.path().join("cpu");
    let merged = merge(&plan, &on_cpu, &options(Backend::Cpu), &|_| {}).unwrap();
    assert_eq!(merged.on_device(), 0);
    let record = MergeRecord::read(&on_cpu).unwrap();
    assert!(!record.modules.is_empty());
    for module in &record.modules {
        assert_eq!(module.device.as_deref(), Some("cpu"), "{}", module.module);
    }

    let on_gpu = work.path().join("gpu");
    let result = merge(&plan, &on_gpu, &options(Backend::Cuda(0)), &|_| {});
    match select(DeviceRequest::Cuda) {
        Ok(_) => {
            let merged = result.unwrap();
            assert_eq!(merged.on_device(), record.modules.len());
            for module in &MergeRecord::read(&on_gpu).unwrap().modules {
                assert_eq!(module.device.as_deref(), Some("cuda"), "{}", module.module);
            }
        }
        Err(cli_reason) => {
            let ours = result.unwrap_err().to_string();
            assert_eq!(ours, cli_reason.to_string());
            let out = mmx(
                &[
                    "merge",
                    recipe.to_str().unwrap(),
                    "--device",
                    "cuda",
                    "-o",
                    on_gpu.to_str().unwrap(),
                ],
                work.path(),
            );
            assert!(!out.status.success());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains(&ours),
                "the CLI says: {stderr}\nthe library: {ours}"
            );
            assert!(stderr.contains("\nhint: `mmx doctor`"), "{stderr}");
            assert!(
                !on_gpu.exists(),
                "a failed merge wrote {}",
                on_gpu.display()
            );
        }
    }
}
