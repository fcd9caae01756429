//! Writing a merge: everything goes into a temporary directory beside the target, which is
//! renamed into place only when complete, so a failed merge leaves no partial output, with
//! `mmx-merge.json` ([`MergeRecord`]) beside it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use serde_json::Value;

use super::device::kernels_for;
use super::executor::{execute, TensorRecord};
use super::plan::{input_files, Plan};
use crate::backend::Backend;
use crate::checkpoint::COPIED_FILES;
use crate::error::{Error, Result};
use crate::recipe::record::{
    FileRecord, InputRecord, MergeRecord, RecipeRecord, TensorEntry, ToolRecord,
};
use crate::recipe::{check_target, write_output_dir, OutputKind, MERGE_RECORD};
use crate::tensor::{write_atomic, Digest, ShardedWriter, TensorSpec};

/// How to write a merge.
#[derive(Debug, Clone)]
pub struct OutputOptions {
    /// The most memory tensors in flight may take together.
    pub max_memory: u64,
    /// The largest shard, in bytes of tensor data.
    pub shard_bytes: u64,
    /// Replace an existing directory that is not an earlier mmx output.
    pub force: bool,
    /// Where the merges run: the methods with a device path run on a CUDA device.
    pub backend: Backend,
    /// Worker threads for this merge (a pool of its own); `None` uses the process's pool.
    pub threads: Option<usize>,
}

/// What a merge wrote.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    /// The output directory.
    pub output: PathBuf,
    /// Files written into it.
    pub files: Vec<String>,
    /// Tensors merged.
    pub merged: usize,
    /// Tensors copied from the base unchanged.
    pub copied: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Tensors merged on the GPU.
    pub device_tensors: usize,
    /// Consensus methods: the mean over merged tensors of the share of coordinates where some
    /// kept entry opposes the elected sign.
    pub mean_sign_conflict: Option<f64>,
}

/// Runs the plan and writes its output to `target`. `progress` receives the bytes of each
/// finished tensor.
pub fn write_merge(
    plan: &Plan,
    target: &Path,
    options: &OutputOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<MergeSummary> {
    check_target(target, options.force)?;
    let kernels = kernels_for(options.backend)?;
    let inputs = digests(plan)?;
    let mut records = Vec::new();
    let files = write_output_dir(target, options.force, |tmp| {
        let stem = match plan.recipe.output {
            OutputKind::Delta => "delta",
            _ => "model",
        };
        let specs: Vec<TensorSpec> = plan
            .tensors
            .iter()
            .map(|t| TensorSpec {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            })
            .collect();
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let writer = ShardedWriter::create(tmp, stem, &specs, options.shard_bytes, &metadata)?;
        // Write back to disk while merging, so that the final fsync does not wait for all of it.
        let (done, finished) = mpsc::channel::<()>();
        records = std::thread::scope(|scope| {
            let writer = &writer;
            scope.spawn(move || {
                while let Err(RecvTimeoutError::Timeout) =
                    finished.recv_timeout(Duration::from_millis(200))
                {
                    writer.flush_to_disk();
                }
            });
            let records = execute(plan, writer, options.max_memory, kernels.as_ref(), progress);
            drop(done);
            records
        })?;
        let mut files = writer.finish(stem)?;

        let reference = plan.reference();
        let mut config = reference.config().clone();
        if let Some(dtype) = plan.recipe.dtype {
            let name = match dtype.name() {
                "BF16" => "bfloat16",
                "F16" => "float16",
                _ => "float32",
            };
            for key in ["torch_dtype", "dtype"] {
                if config.contains_key(key) {
                    config.insert(key.to_string(), Value::String(name.to_string()));
                }
            }
        }
        let config_bytes = serde_json::to_vec_pretty(&config).expect("JSON serialises");
        write_atomic(&tmp.join("config.json"), &config_bytes)?;
        files.push("config.json".to_string());
        if plan.recipe.output == OutputKind::Full {
            for name in COPIED_FILES {
                if let Some(bytes) = reference.extra_file(name)? {
                    write_atomic(&tmp.join(name), &bytes)?;
                    files.push(name.to_string());
                }
            }
        }
        files.push(MERGE_RECORD.to_string());
        merge_record(plan, inputs, &files, &records).write(tmp)?;
        Ok(files)
    })?;

    let merged = records.iter().filter(|r| r.stats.is_some()).count();
    let conflicts: Vec<f64> = records
        .iter()
        .filter_map(|r| r.stats.as_ref()?.sign_conflict.map(f64::from))
        .collect();
    Ok(MergeSummary {
        output: target.to_path_buf(),
        files,
        merged,
        copied: records.len() - merged,
        bytes: plan.output_bytes(),
        device_tensors: records.iter().filter(|r| r.on_device).count(),
        mean_sign_conflict: (!conflicts.is_empty())
            .then(|| conflicts.iter().sum::<f64>() / conflicts.len() as f64),
    })
}

/// One input of `mmx-merge.json`: the files read from disk, or the registry manifests read.
pub(crate) fn input_record(
    role: String,
    files: Vec<FileRecord>,
    manifests: Vec<String>,
) -> InputRecord {
    InputRecord {
        input: role,
        files,
        manifests,
    }
}

/// A file read whole, recorded with its size and blake3.
pub(crate) fn whole_file(path: &Path) -> Result<FileRecord> {
    let bytes = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    Ok(FileRecord {
        path: path.display().to_string(),
        bytes: Some(bytes),
        blake3: Some(Digest::of_file(path)?.hex()),
        header_blake3: None,
    })
}

fn digests(plan: &Plan) -> Result<Vec<InputRecord>> {
    input_files(plan)
        .into_iter()
        .map(|(role, files, manifests)| {
            let files = files
                .iter()
                .map(|f| whole_file(f))
                .collect::<Result<Vec<_>>>()?;
            Ok(input_record(role, files, manifests))
        })
        .collect()
}

fn merge_record(
    plan: &Plan,
    inputs: Vec<InputRecord>,
    files: &[String],
    records: &[TensorRecord],
) -> MergeRecord {
    let recipe = &plan.recipe;
    let fallbacks: std::collections::BTreeMap<&str, &str> = plan
        .tensors
        .iter()
        .filter_map(|t| {
            let fallback = t.merge.as_ref()?.fallback?;
            Some((t.name.as_str(), fallback.method_name()))
        })
        .collect();
    let tensors = records
        .iter()
        .map(|r| match &r.stats {
            None => TensorEntry {
                name: r.name.clone(),
                action: "copied".to_string(),
                kept_fraction: None,
                sign_conflict: None,
                delta_l2: None,
                device: None,
                fallback: None,
            },
            Some(s) => TensorEntry {
                name: r.name.clone(),
                action: "merged".to_string(),
                kept_fraction: Some(s.kept_fraction.clone()),
                sign_conflict: s.sign_conflict,
                delta_l2: Some(s.delta_l2),
                device: Some(if r.on_device { "cuda" } else { "cpu" }.to_string()),
                fallback: fallbacks.get(r.name.as_str()).map(|f| f.to_string()),
            },
        })
        .collect();
    MergeRecord {
        tool: ToolRecord::this(),
        recipe: RecipeRecord {
            path: recipe.path.clone(),
            format: Some(recipe.format.record_name().to_string()),
            text: recipe.text.clone(),
        },
        method: plan.method.name().to_string(),
        output: recipe.output,
        space: None,
        rank: None,
        dtype: recipe.dtype.map(|d| d.name().to_string()),
        seed: Some(recipe.seed),
        inputs,
        files: files.to_vec(),
        tensors,
        modules: Vec::new(),
        modules_to_save: None,
    }
}
