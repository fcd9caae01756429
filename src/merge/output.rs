//! Writing a merge: everything goes into a temporary directory beside the target, which is
//! renamed into place only when complete, so a failed merge leaves no partial output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use super::executor::{execute, TensorRecord};
use super::plan::{input_files, Plan};
use crate::backend::device::Gpu;
use crate::backend::Backend;
use crate::checkpoint::COPIED_FILES;
use crate::error::{Error, Result};
use crate::recipe::{OutputKind, RecipeFormat};
use crate::tensor::{replace_dir_atomically, write_atomic, ShardedWriter, TensorSpec};

/// The record every merge leaves beside its output.
pub const MERGE_RECORD: &str = "mmx-merge.json";

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

/// Checks the target can be written before any work starts.
pub fn check_target(target: &Path, force: bool) -> Result<()> {
    if !target.exists() {
        return Ok(());
    }
    let fail = |message: &str| Error::Output {
        path: target.to_path_buf(),
        message: message.to_string(),
    };
    if !target.is_dir() {
        return Err(fail("exists and is not a directory"));
    }
    let empty = std::fs::read_dir(target)
        .map_err(|e| Error::io(target, e))?
        .next()
        .is_none();
    if !(empty || force || target.join(MERGE_RECORD).is_file()) {
        return Err(fail(
            "exists and is not an earlier mmx output (no mmx-merge.json); pass --force to replace it",
        ));
    }
    Ok(())
}

/// Blake3 of a file, read through a memory map and hashed on all cores.
pub fn file_digest(path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap_rayon(path)
        .map_err(|e| Error::io(path, e))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Writes a merge output directory atomically ([`replace_dir_atomically`]) once
/// [`check_target`] allows it; `fill` returns the names of the files it wrote.
pub(crate) fn write_dir_atomically(
    target: &Path,
    force: bool,
    fill: impl FnOnce(&Path) -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    check_target(target, force)?;
    replace_dir_atomically(target, fill)
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
    let gpu = match options.backend {
        Backend::Cuda(ordinal) => Some(Mutex::new(Gpu::open(ordinal)?)),
        Backend::Cpu => None,
    };
    let inputs = digests(plan)?;
    let mut records = Vec::new();
    let files = write_dir_atomically(target, options.force, |tmp| {
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
            let records = execute(plan, writer, options.max_memory, gpu.as_ref(), progress);
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
        let record = merge_record(plan, &inputs, &files, &records);
        let record_bytes = serde_json::to_vec_pretty(&record).expect("JSON serialises");
        write_atomic(&tmp.join(MERGE_RECORD), &record_bytes)?;
        files.push(MERGE_RECORD.to_string());
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

/// One input of `mmx-merge.json`: the files read from disk with their digests, and the
/// registry manifests read (each already a digest of everything in it).
pub(crate) fn input_record(role: String, files: Vec<Value>, manifests: Vec<String>) -> Value {
    let mut record = json!({"input": role, "files": files});
    if !manifests.is_empty() {
        record["manifests"] = json!(manifests);
    }
    record
}

fn digests(plan: &Plan) -> Result<Vec<Value>> {
    input_files(plan)
        .into_iter()
        .map(|(role, files, manifests)| {
            let files = files
                .iter()
                .map(|f| {
                    let bytes = std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
                    Ok(json!({"path": f.display().to_string(), "bytes": bytes, "blake3": file_digest(f)?}))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(input_record(role, files, manifests))
        })
        .collect()
}

fn merge_record(
    plan: &Plan,
    inputs: &[Value],
    files: &[String],
    records: &[TensorRecord],
) -> Value {
    let recipe = &plan.recipe;
    let tensors: Vec<Value> = records
        .iter()
        .map(|r| match &r.stats {
            None => json!({"name": r.name, "action": "copied"}),
            Some(s) => json!({
                "name": r.name,
                "action": "merged",
                "kept_fraction": s.kept_fraction,
                "sign_conflict": s.sign_conflict,
                "delta_l2": s.delta_l2,
                "device": if r.on_device { "cuda" } else { "cpu" },
            }),
        })
        .collect();
    json!({
        "tool": {"name": "mmx", "version": env!("CARGO_PKG_VERSION")},
        "recipe": {
            "path": recipe.path.display().to_string(),
            "format": match recipe.format { RecipeFormat::Native => "mmx", RecipeFormat::Mergekit => "mergekit" },
            "text": recipe.text,
        },
        "method": plan.method.name(),
        "output": match recipe.output { OutputKind::Full => "full", OutputKind::Delta => "delta", OutputKind::Lora => "lora" },
        "dtype": recipe.dtype.map(|d| d.name()),
        "seed": recipe.seed,
        "inputs": inputs,
        "files": files,
        "tensors": tensors,
    })
}
