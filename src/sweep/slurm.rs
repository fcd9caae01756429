//! A sweep as a Slurm array job: one task per shard, each running `mmx sweep --shard I/N
//! --resume` into the shared output directory, and a gather job, dependent on the array, that
//! runs `mmx sweep --gather` to write the summaries and name any trial no task recorded.
//!
//! The scripts go to `OUT/slurm/` (`sweep.sbatch`, `gather.sbatch`) and are submitted with
//! `sbatch --parsable`. The shard count is written into the array script rather than read from
//! `$SLURM_ARRAY_TASK_COUNT`: that counts the tasks of one submission, and a resubmission of
//! the unfinished shards alone must still split the trials the same N ways. Nothing from the
//! environment (credentials included) is written into a script: Slurm hands the submitting
//! environment to the tasks.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{fail, missing_trials, pending_shards, shard_files, Missing};
use crate::error::{Error, Result};
use crate::sweep::file::Sweep;
use crate::tensor::write_atomic;

/// How to submit a sweep to Slurm.
#[derive(Debug, Clone)]
pub struct SlurmOptions {
    /// Shards, one array task each.
    pub shards: usize,
    /// At most this many tasks at once (`--array=...%K`).
    pub array_parallel: Option<usize>,
    /// The partition (else the cluster's default).
    pub partition: Option<String>,
    /// CPUs of each task; the merges use as many threads.
    pub cpus_per_task: usize,
    /// More `#SBATCH` options, as written (`--time=02:00:00`, `--account=lab`).
    pub sbatch_options: Vec<String>,
    /// Memory budget of each merge, passed on to the tasks (else theirs by default).
    pub max_memory: Option<u64>,
    /// Submit only the shards that hold trials no task has recorded.
    pub resume: bool,
    /// The mmx binary the tasks run (by absolute path: it must be visible from the nodes).
    pub mmx: PathBuf,
}

/// The scripts of a sweep, written.
#[derive(Debug, Clone)]
pub struct Scripts {
    /// The array job's script.
    pub array: PathBuf,
    /// The gather job's script.
    pub gather: PathBuf,
    /// The shards the array runs (with `resume`, those with missing trials; may be empty).
    pub shards: Vec<usize>,
    /// Trials no shard has recorded yet.
    pub missing: Vec<Missing>,
}

/// A submitted sweep.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The array job's id.
    pub array_job: String,
    /// The gather job's id.
    pub gather_job: String,
}

/// `text` as one word for bash.
fn quote(text: &str) -> String {
    if !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-=:+,@%".contains(&b))
    {
        return text.to_string();
    }
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| Error::io(path, e))
}

/// `0-3` for a run of shards, else `0,2,5`; with `%K` if a limit is set.
fn array_spec(shards: &[usize], parallel: Option<usize>) -> String {
    let contiguous = shards.windows(2).all(|w| w[1] == w[0] + 1);
    let mut spec = match shards {
        [] => String::new(),
        [one] => one.to_string(),
        [first, .., last] if contiguous => format!("{first}-{last}"),
        _ => shards
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(","),
    };
    if let Some(k) = parallel {
        spec.push_str(&format!("%{k}"));
    }
    spec
}

fn header(name: &str, log: &Path, options: &SlurmOptions) -> String {
    let mut text = format!(
        "#SBATCH --job-name={}\n#SBATCH --output={}\n#SBATCH --open-mode=append\n",
        quote(name),
        quote(&log.display().to_string())
    );
    if let Some(p) = &options.partition {
        text.push_str(&format!("#SBATCH --partition={}\n", quote(p)));
    }
    for option in &options.sbatch_options {
        text.push_str(&format!("#SBATCH {option}\n"));
    }
    text
}

/// Writes `OUT/slurm/sweep.sbatch` and `OUT/slurm/gather.sbatch` for `sweep`.
pub fn write_scripts(sweep: &Sweep, out: &Path, options: &SlurmOptions) -> Result<Scripts> {
    if options.shards == 0 {
        return Err(fail(
            out,
            "a Slurm sweep needs at least one shard".to_string(),
        ));
    }
    if options.array_parallel == Some(0) {
        return Err(fail(
            out,
            "`--array-parallel` must be at least 1".to_string(),
        ));
    }
    if let Some(bad) = options
        .sbatch_options
        .iter()
        .find(|o| !o.starts_with('-') || o.contains('\n'))
    {
        return Err(fail(
            out,
            format!("sbatch option {bad:?} is not one option line such as `--time=02:00:00`"),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let out = absolute(out)?;
    if !options.resume {
        if let Some(file) = shard_files(&out)?.first() {
            return Err(fail(
                file,
                "already holds results of this sweep: pass `--resume` to submit only the shards with unfinished trials, or use another output directory".to_string(),
            ));
        }
    }
    // Prepared here, once, rather than by every task at the same moment.
    let (template, _, missing) = missing_trials(sweep, &out)?;
    super::publish_target(sweep, &template)?;
    let shards: Vec<usize> = if options.resume {
        pending_shards(&missing, options.shards)
    } else {
        (0..options.shards.min(sweep.trials().len().max(1))).collect()
    };
    let dir = out.join("slurm");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let stem = sweep
        .path
        .file_stem()
        .map_or("sweep".into(), |s| s.to_string_lossy());
    let cwd = std::env::current_dir().map_err(|e| Error::io(".", e))?;
    let mmx = quote(&options.mmx.display().to_string());
    let sweep_path = quote(&absolute(&sweep.path)?.display().to_string());
    let out_text = quote(&out.display().to_string());
    let max_memory = options
        .max_memory
        .map_or(String::new(), |m| format!(" --max-memory {m}"));

    let mut array = format!(
        "#!/bin/bash\n# Written by `mmx sweep --slurm`: one task per shard of {n} of {sweep}.\n# Each task resumes its shard, so a requeued or resubmitted task goes on where it stopped.\n# The shard count is written out: $SLURM_ARRAY_TASK_COUNT counts this submission's tasks.\n",
        n = options.shards,
        sweep = sweep.path.display()
    );
    array.push_str(&header(
        &format!("mmx-sweep-{stem}"),
        &dir.join("shard-%a.log"),
        options,
    ));
    array.push_str(&format!(
        "#SBATCH --array={}\n#SBATCH --cpus-per-task={}\nset -euo pipefail\ncd {}\n# The merges use the CPUs Slurm gives the task, no more.\nexport RAYON_NUM_THREADS=\"${{SLURM_CPUS_PER_TASK:-1}}\"\nexec {mmx} sweep {sweep_path} -o {out_text} --shard \"$SLURM_ARRAY_TASK_ID/{}\" --resume{max_memory}\n",
        array_spec(&shards, options.array_parallel),
        options.cpus_per_task,
        quote(&cwd.display().to_string()),
        options.shards,
    ));
    let mut gather = format!(
        "#!/bin/bash\n# Written by `mmx sweep --slurm`: gathers the shards of {} once the array has ended,\n# whatever its tasks' states, and names the trials none recorded.\n",
        sweep.path.display()
    );
    gather.push_str(&header(
        &format!("mmx-gather-{stem}"),
        &dir.join("gather.log"),
        options,
    ));
    gather.push_str(&format!(
        "set -euo pipefail\ncd {}\nexec {mmx} sweep {sweep_path} -o {out_text} --gather\n",
        quote(&cwd.display().to_string()),
    ));
    let array_path = dir.join("sweep.sbatch");
    let gather_path = dir.join("gather.sbatch");
    write_atomic(&array_path, array.as_bytes())?;
    write_atomic(&gather_path, gather.as_bytes())?;
    Ok(Scripts {
        array: array_path,
        gather: gather_path,
        shards,
        missing,
    })
}

/// Runs `sbatch --parsable ARGS SCRIPT` and returns the job id it prints.
fn sbatch(script: &Path, args: &[String]) -> Result<String> {
    let output = Command::new("sbatch")
        .arg("--parsable")
        .args(args)
        .arg(script)
        .output()
        .map_err(|e| Error::Scheduler {
            path: script.to_path_buf(),
            message: format!(
                "cannot run `sbatch` ({e}): is this a Slurm login node? `--print-script` writes the scripts without submitting them"
            ),
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    // `--parsable` prints `ID` or `ID;CLUSTER`.
    let id = stdout.trim().split(';').next().unwrap_or("").to_string();
    if !output.status.success() || id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::Scheduler {
            path: script.to_path_buf(),
            message: format!(
                "sbatch failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(id)
}

/// Submits the array, then the gather job to run after it whatever its tasks' states.
pub fn submit(scripts: &Scripts) -> Result<Submission> {
    let array_job = sbatch(&scripts.array, &[])?;
    let gather_job = sbatch(
        &scripts.gather,
        &[format!("--dependency=afterany:{array_job}")],
    )?;
    Ok(Submission {
        array_job,
        gather_job,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_name_runs_lists_and_limits() {
        assert_eq!(array_spec(&[0, 1, 2, 3], None), "0-3");
        assert_eq!(array_spec(&[0, 1, 2, 3], Some(2)), "0-3%2");
        assert_eq!(array_spec(&[2], None), "2");
        assert_eq!(array_spec(&[0, 2, 5], Some(1)), "0,2,5%1");
    }

    #[test]
    fn quotes_only_what_bash_would_split() {
        assert_eq!(quote("/data/out-1"), "/data/out-1");
        assert_eq!(quote("my sweeps/out"), "'my sweeps/out'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote("$HOME"), "'$HOME'");
        assert_eq!(quote(""), "''");
    }
}
