//! Planted-conflict tasks: a merge benchmark that needs no training.
//!
//! Every module of a small Llama-shaped base gets one linear task per expert,
//! `y = (W0 + B_t·A_t)·x`, with `x` drawn from the task's own input subspace `U_t`. Expert t's
//! LoRA *is* its task, so it solves it exactly. Two knobs plant the conflict:
//!
//! - `overlap`: the share of each task's input subspace (and output subspace) common to all
//!   tasks; the rest is private to the task. Where tasks share inputs, what one expert does
//!   there is an error for the others.
//! - `conflict`: in the shared block of the core `C_t` (with `B_t = V_t·C_t`), each task takes a
//!   common matrix with each entry's sign flipped with this probability.
//!
//! Besides its task, each expert carries a `leak`: components of `A_t` in directions its own
//! inputs never excite (orthogonal to `U_t`, so the expert stays exact on its task), as training
//! leaves parameters its data does not constrain. Merged naively they land in the other tasks'
//! inputs.
//!
//! A merge is scored per task by normalised performance on held-out inputs:
//! `1 − Σ‖(Δ − Δ_t)·x‖² / Σ‖Δ_t·x‖²`, summed over the modules and inputs: 1 is as good as the
//! expert, 0 no better than the base (and below 0 worse than the base).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use faer::Mat;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::adapter::{Adapter, PEFT_PREFIX};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::merge::calibration::{write_calibration, ModuleStats};
use crate::recipe::{MergeRecord, OutputKind};
use crate::rng::{fnv1a, mix64, SplitMix};
use crate::tensor::{
    from_f32, write_atomic, write_safetensors, Dtype, SafetensorsFile, TensorSpec,
};

/// The file in a planted problem's directory that describes it.
pub const SPEC_FILE: &str = "planted.json";

/// The module types that carry tasks in every layer.
const MODULE_TYPES: [&str; 2] = ["q_proj", "v_proj"];

/// What to plant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlantedSpec {
    /// Tasks, one expert each.
    pub experts: usize,
    /// Layers of the base (each with a `q_proj` and a `v_proj` task module).
    pub layers: usize,
    /// Width of every module (square, `dim × dim`).
    pub dim: usize,
    /// Rank of every expert's LoRA, and the dimension of each task's input subspace.
    pub rank: usize,
    /// Share of each task's input and output subspaces common to all tasks, in [0, 1].
    pub overlap: f64,
    /// Probability that an entry of a task's shared core block has its sign flipped, in [0, 1].
    pub conflict: f64,
    /// Size of the off-task components of each `A_t`, relative to the on-task ones.
    pub leak: f64,
    /// Held-out inputs per task, module and split.
    pub inputs: usize,
    /// Seeds everything.
    pub seed: u64,
}

impl Default for PlantedSpec {
    fn default() -> Self {
        PlantedSpec {
            experts: 4,
            layers: 2,
            dim: 64,
            rank: 8,
            overlap: 0.5,
            conflict: 0.5,
            leak: 0.5,
            inputs: 64,
            seed: 0,
        }
    }
}

/// Which held-out inputs score a merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// For choosing parameters (λ, density, ...).
    Validation,
    /// For reporting.
    Test,
}

/// One task module: its experts' factors and each task's input basis.
#[derive(Debug, Clone)]
struct Module {
    name: String,
    base: Vec<f32>,
    /// Per expert: `B` (`dim × rank`) and `A` (`rank × dim`), row-major.
    factors: Vec<(Vec<f32>, Vec<f32>)>,
    /// Per task: its input basis `U_t`, `dim × rank`.
    inputs: Vec<Mat<f64>>,
}

/// A generated planted-conflict problem.
#[derive(Debug, Clone)]
pub struct Planted {
    spec: PlantedSpec,
    modules: Vec<Module>,
}

/// A sequential SplitMix64 stream with normal deviates (Box–Muller).
struct Stream(SplitMix);

impl Stream {
    fn new(seed: u64, purpose: &str) -> Stream {
        Stream(SplitMix::new(mix64(seed ^ fnv1a(purpose.as_bytes()))))
    }

    /// Uniform in (0, 1] (the logarithm below needs it above 0).
    fn uniform(&mut self) -> f64 {
        self.0.unit() + 1.0 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    fn matrix(&mut self, rows: usize, cols: usize, scale: f64) -> Mat<f64> {
        Mat::from_fn(rows, cols, |_, _| scale * self.normal())
    }
}

fn spec_error(message: String) -> Error {
    Error::Parameter {
        name: "planted".to_string(),
        tensor: "(problem)".to_string(),
        message,
    }
}

impl PlantedSpec {
    fn check(&self) -> Result<()> {
        let shared = self.shared_rank();
        let private = self.rank - shared;
        if self.experts < 2 || self.layers == 0 || self.rank == 0 || self.inputs == 0 {
            return Err(spec_error(format!(
                "needs at least 2 experts, 1 layer, rank 1 and 1 input (got {} experts, {} layers, rank {}, {} inputs)",
                self.experts, self.layers, self.rank, self.inputs
            )));
        }
        for (name, v) in [("overlap", self.overlap), ("conflict", self.conflict)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(spec_error(format!("`{name}` must be in [0, 1], got {v}")));
            }
        }
        if !(self.leak.is_finite() && self.leak >= 0.0) {
            return Err(spec_error(format!(
                "`leak` must be a finite number ≥ 0, got {}",
                self.leak
            )));
        }
        if shared + self.experts * private > self.dim {
            return Err(spec_error(format!(
                "the tasks' subspaces do not fit: {shared} shared + {} × {private} private dimensions > dim {}",
                self.experts, self.dim
            )));
        }
        Ok(())
    }

    /// Dimensions of the subspace every task shares.
    pub fn shared_rank(&self) -> usize {
        ((self.overlap * self.rank as f64).round() as usize).min(self.rank)
    }
}

/// `dim` orthonormal columns from the QR of a Gaussian matrix.
fn orthonormal(stream: &mut Stream, dim: usize) -> Mat<f64> {
    stream.matrix(dim, dim, 1.0).qr().compute_thin_Q()
}

/// Columns `0..shared` and the task's private block of `basis`.
fn task_columns(basis: &Mat<f64>, shared: usize, private: usize, task: usize) -> Mat<f64> {
    let start = shared + task * private;
    Mat::from_fn(basis.nrows(), shared + private, |i, j| {
        if j < shared {
            basis[(i, j)]
        } else {
            basis[(i, start + j - shared)]
        }
    })
}

fn row_major(m: &Mat<f64>) -> Vec<f32> {
    (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)] as f32))
        .collect()
}

impl Planted {
    /// Generates the problem `spec` describes (the same spec always gives the same problem).
    pub fn generate(spec: PlantedSpec) -> Result<Planted> {
        spec.check()?;
        let (d, r, t_count) = (spec.dim, spec.rank, spec.experts);
        let shared = spec.shared_rank();
        let private = r - shared;
        let mut modules = Vec::new();
        for layer in 0..spec.layers {
            for kind in MODULE_TYPES {
                let name = format!("model.layers.{layer}.self_attn.{kind}.weight");
                let mut stream = Stream::new(spec.seed, &name);
                let base = row_major(&stream.matrix(d, d, 1.0 / (d as f64).sqrt()));
                let q_in = orthonormal(&mut stream, d);
                let q_out = orthonormal(&mut stream, d);
                let common = stream.matrix(shared, shared, 1.0 / (r as f64).sqrt());
                let mut factors = Vec::with_capacity(t_count);
                let mut inputs = Vec::with_capacity(t_count);
                for task in 0..t_count {
                    let u = task_columns(&q_in, shared, private, task);
                    let v = task_columns(&q_out, shared, private, task);
                    let mut core = stream.matrix(r, r, 1.0 / (r as f64).sqrt());
                    for i in 0..shared {
                        for j in 0..shared {
                            let flip = stream.uniform() <= spec.conflict;
                            core[(i, j)] = if flip {
                                -common[(i, j)]
                            } else {
                                common[(i, j)]
                            };
                        }
                    }
                    // Off-task rows of A: random, with the task's own input directions removed.
                    let noise = stream.matrix(r, d, 1.0 / (d as f64).sqrt());
                    let off_task = &noise - (&noise * &u) * u.transpose();
                    let a = u.transpose() + off_task * faer::Scale(spec.leak);
                    let b = &v * &core;
                    factors.push((row_major(&b), row_major(&a)));
                    inputs.push(u);
                }
                modules.push(Module {
                    name,
                    base,
                    factors,
                    inputs,
                });
            }
        }
        Ok(Planted { spec, modules })
    }

    /// What was planted.
    pub fn spec(&self) -> &PlantedSpec {
        &self.spec
    }

    /// Reads `planted.json` in `dir` and regenerates the problem.
    pub fn open(dir: &Path) -> Result<Planted> {
        let path = dir.join(SPEC_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let spec: PlantedSpec = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        Planted::generate(spec)
    }

    /// The base model's directory inside a written problem.
    pub fn base_dir(dir: &Path) -> PathBuf {
        dir.join("base")
    }

    /// Expert `t`'s adapter directory inside a written problem.
    pub fn expert_dir(dir: &Path, t: usize) -> PathBuf {
        dir.join("experts").join(format!("task{t}"))
    }

    /// Writes the base (`base/`, a Hugging Face checkpoint), one PEFT adapter per expert
    /// (`experts/taskN/`), their calibration statistics (`calibration/taskN.safetensors`, from
    /// the validation inputs) and `planted.json`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let d = self.spec.dim;
        let base = Self::base_dir(dir);
        std::fs::create_dir_all(&base).map_err(|e| Error::io(&base, e))?;
        let config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": d,
            "num_hidden_layers": self.spec.layers,
            "torch_dtype": "float32",
            "mmx_planted": "synthetic planted-conflict tasks, see planted.json",
        });
        write_atomic(
            &base.join("config.json"),
            serde_json::to_string_pretty(&config)
                .expect("JSON serialises")
                .as_bytes(),
        )?;
        let tensor = |name: String, shape: Vec<usize>, values: &[f32]| {
            (
                TensorSpec {
                    name,
                    dtype: Dtype::F32,
                    shape,
                },
                from_f32(Dtype::F32, values).expect("f32 encodes"),
            )
        };
        let weights: Vec<_> = self
            .modules
            .iter()
            .map(|m| tensor(m.name.clone(), vec![d, d], &m.base))
            .collect();
        write_safetensors(&base.join("model.safetensors"), &weights, &BTreeMap::new())?;

        let r = self.spec.rank;
        for t in 0..self.spec.experts {
            let mut config = Map::new();
            for (key, value) in [
                ("peft_type", json!("LORA")),
                ("task_type", json!("CAUSAL_LM")),
                ("base_model_name_or_path", json!("../../base")),
                ("r", json!(r)),
                ("lora_alpha", json!(r)),
                ("lora_dropout", json!(0.0)),
                ("target_modules", json!(MODULE_TYPES)),
                ("bias", json!("none")),
                ("fan_in_fan_out", json!(false)),
                ("use_rslora", json!(false)),
                ("rank_pattern", json!({})),
                ("alpha_pattern", json!({})),
                ("modules_to_save", Value::Null),
                ("init_lora_weights", json!(true)),
                ("inference_mode", json!(true)),
            ] {
                config.insert(key.to_string(), value);
            }
            let mut tensors = Vec::new();
            for m in &self.modules {
                let path = m.name.strip_suffix(".weight").expect("named .weight");
                let (b, a) = &m.factors[t];
                tensors.push(tensor(
                    format!("{PEFT_PREFIX}{path}.lora_A.weight"),
                    vec![r, d],
                    a,
                ));
                tensors.push(tensor(
                    format!("{PEFT_PREFIX}{path}.lora_B.weight"),
                    vec![d, r],
                    b,
                ));
            }
            Adapter::save(&Self::expert_dir(dir, t), &config, &tensors)?;
        }
        let spec = serde_json::to_vec_pretty(&self.spec).expect("JSON serialises");
        self.write_calibration(dir)?;
        write_atomic(&dir.join(SPEC_FILE), &spec)
    }

    /// Task `t`'s inputs to module `m` in `split`, one per column: `x = U_t·z` with `z`
    /// standard normal, a stream per split and task.
    fn inputs(&self, m: &Module, t: usize, split: Split) -> Mat<f64> {
        let mut stream = Stream::new(self.spec.seed, &format!("{}/{split:?}/task{t}", m.name));
        let z = stream.matrix(self.spec.rank, self.spec.inputs, 1.0);
        &m.inputs[t] * z
    }

    /// Expert `t`'s calibration statistics file inside a written problem.
    pub fn calibration_file(dir: &Path, t: usize) -> PathBuf {
        dir.join("calibration").join(format!("task{t}.safetensors"))
    }

    /// Writes each expert's calibration statistics (the Grams of its task's validation inputs
    /// to every task module, and the diagonal Fisher they give) to
    /// `calibration/taskN.safetensors`.
    pub fn write_calibration(&self, dir: &Path) -> Result<()> {
        let folder = dir.join("calibration");
        std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
        for t in 0..self.spec.experts {
            let modules = self
                .modules
                .iter()
                .map(|m| {
                    let (d, n) = (self.spec.dim, self.spec.inputs);
                    let x = self.inputs(m, t, Split::Validation);
                    let gram = &x * x.transpose();
                    // The task is a regression with Gaussian noise: the Fisher of weight (i, j)
                    // is E[x_j²] (times the noise variance, which only scales it).
                    let fisher = (0..d * d)
                        .map(|k| (gram[(k % d, k % d)] / n as f64) as f32)
                        .collect();
                    let stats = ModuleStats {
                        gram: Some((row_major(&gram), d, n as u64)),
                        fisher: Some((fisher, vec![d, d])),
                    };
                    let module = m.name.strip_suffix(".weight").unwrap_or(&m.name);
                    (module.to_string(), stats)
                })
                .collect();
            write_calibration(&Self::calibration_file(dir, t), &modules)?;
        }
        Ok(())
    }

    /// The names of the task modules.
    pub fn module_names(&self) -> Vec<&str> {
        self.modules.iter().map(|m| m.name.as_str()).collect()
    }

    /// Expert `t`'s full update of every module, `B_t·A_t` row-major.
    pub fn expert_deltas(&self, t: usize) -> BTreeMap<String, Vec<f32>> {
        let (d, r) = (self.spec.dim, self.spec.rank);
        self.modules
            .iter()
            .map(|m| {
                let (b, a) = &m.factors[t];
                let b = Mat::<f64>::from_fn(d, r, |i, j| f64::from(b[i * r + j]));
                let a = Mat::<f64>::from_fn(r, d, |i, j| f64::from(a[i * d + j]));
                (m.name.clone(), row_major(&(b * a)))
            })
            .collect()
    }

    /// Normalised performance of a merged update on each task (see the module docs). `merged`
    /// holds the merged update `Δ` of every task module, row-major `dim × dim`.
    pub fn score(&self, merged: &BTreeMap<String, Vec<f32>>, split: Split) -> Result<Vec<f64>> {
        let d = self.spec.dim;
        let mut error = vec![0f64; self.spec.experts];
        let mut signal = vec![0f64; self.spec.experts];
        for t in 0..self.spec.experts {
            let experts = self.expert_deltas(t);
            for m in &self.modules {
                let delta = merged.get(&m.name).ok_or_else(|| {
                    spec_error(format!("the merge has no update for `{}`", m.name))
                })?;
                if delta.len() != d * d {
                    return Err(spec_error(format!(
                        "the merged update of `{}` has {} values, expected {d}×{d}",
                        m.name,
                        delta.len()
                    )));
                }
                let want = &experts[&m.name];
                let diff = Mat::<f64>::from_fn(d, d, |i, j| {
                    f64::from(delta[i * d + j]) - f64::from(want[i * d + j])
                });
                let target = Mat::<f64>::from_fn(d, d, |i, j| f64::from(want[i * d + j]));
                let x = self.inputs(m, t, split);
                error[t] += (diff * &x).squared_norm_l2();
                signal[t] += (target * &x).squared_norm_l2();
            }
        }
        Ok(error
            .iter()
            .zip(&signal)
            .map(|(e, s)| 1.0 - e / s)
            .collect())
    }

    /// Reads the merged update of every task module from a merge's output directory: a LoRA
    /// adapter (`s·B·A`), a delta output, or a full model (minus this problem's base).
    pub fn read_merged(&self, output: &Path) -> Result<BTreeMap<String, Vec<f32>>> {
        if Adapter::is_adapter_dir(output) {
            let adapter = Adapter::open(output)?;
            return self
                .modules
                .iter()
                .map(|m| {
                    let delta = adapter
                        .delta(&m.name)?
                        .unwrap_or_else(|| vec![0.0; m.base.len()]);
                    Ok((m.name.clone(), delta))
                })
                .collect();
        }
        let is_delta = MergeRecord::read(output).is_ok_and(|r| r.output == OutputKind::Delta);
        if is_delta {
            // `delta.safetensors`, or its shards `delta-0000N-of-0000M.safetensors`.
            let entries = std::fs::read_dir(output).map_err(|e| Error::io(output, e))?;
            let mut found = BTreeMap::new();
            for entry in entries {
                let path = entry.map_err(|e| Error::io(output, e))?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if !(name.starts_with("delta") && name.ends_with(".safetensors")) {
                    continue;
                }
                let file = SafetensorsFile::open(&path)?;
                for m in &self.modules {
                    if file.info(&m.name).is_some() {
                        found.insert(m.name.clone(), file.read_f32(&m.name)?);
                    }
                }
            }
            return self
                .modules
                .iter()
                .map(|m| {
                    let values = found
                        .remove(&m.name)
                        .unwrap_or_else(|| vec![0.0; m.base.len()]);
                    Ok((m.name.clone(), values))
                })
                .collect();
        }
        let checkpoint = Checkpoint::open(output)?;
        self.modules
            .iter()
            .map(|m| {
                let mut values = checkpoint.read_f32(&m.name)?;
                for (v, b) in values.iter_mut().zip(&m.base) {
                    *v -= b;
                }
                Ok((m.name.clone(), values))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(overlap: f64, conflict: f64, leak: f64) -> Planted {
        Planted::generate(PlantedSpec {
            experts: 3,
            layers: 1,
            dim: 24,
            rank: 4,
            overlap,
            conflict,
            leak,
            inputs: 32,
            seed: 11,
        })
        .unwrap()
    }

    fn sum(deltas: &[BTreeMap<String, Vec<f32>>], weight: f32) -> BTreeMap<String, Vec<f32>> {
        let mut out = deltas[0].clone();
        for (name, values) in out.iter_mut() {
            for (i, v) in values.iter_mut().enumerate() {
                *v = weight * deltas.iter().map(|d| d[name][i]).sum::<f32>();
            }
        }
        out
    }

    #[test]
    fn each_expert_solves_its_task_and_the_base_scores_zero() {
        let p = small(0.5, 0.5, 0.5);
        for t in 0..3 {
            let scores = p.score(&p.expert_deltas(t), Split::Test).unwrap();
            assert!((scores[t] - 1.0).abs() < 1e-9, "{scores:?}");
        }
        let zero: BTreeMap<String, Vec<f32>> = p
            .module_names()
            .into_iter()
            .map(|n| (n.to_string(), vec![0.0; 24 * 24]))
            .collect();
        for s in p.score(&zero, Split::Validation).unwrap() {
            assert!(s.abs() < 1e-12, "{s}");
        }
    }

    #[test]
    fn disjoint_tasks_without_leak_merge_exactly_by_summing() {
        // No overlap and no leak: each task's inputs see only its own expert.
        let p = small(0.0, 0.5, 0.0);
        let deltas: Vec<_> = (0..3).map(|t| p.expert_deltas(t)).collect();
        for s in p.score(&sum(&deltas, 1.0), Split::Test).unwrap() {
            assert!((s - 1.0).abs() < 1e-6, "{s}");
        }
        // With a leak, the sum pays for the other experts' off-task components.
        let leaky = small(0.0, 0.5, 1.0);
        let deltas: Vec<_> = (0..3).map(|t| leaky.expert_deltas(t)).collect();
        let scores = leaky.score(&sum(&deltas, 1.0), Split::Test).unwrap();
        assert!(scores.iter().all(|&s| s < 0.95), "{scores:?}");
    }

    #[test]
    fn full_overlap_and_conflict_make_the_mean_a_compromise() {
        // Fully shared subspaces with random signs: the mean of 3 independent-ish tasks keeps
        // roughly a third of each.
        let p = small(1.0, 0.5, 0.0);
        let deltas: Vec<_> = (0..3).map(|t| p.expert_deltas(t)).collect();
        let scores = p.score(&sum(&deltas, 1.0 / 3.0), Split::Test).unwrap();
        let mean = scores.iter().sum::<f64>() / 3.0;
        assert!((0.1..0.6).contains(&mean), "{scores:?}");
        // No conflict: the shared block agrees, so the mean does better.
        let agreeing = small(1.0, 0.0, 0.0);
        let deltas: Vec<_> = (0..3).map(|t| agreeing.expert_deltas(t)).collect();
        let better = agreeing
            .score(&sum(&deltas, 1.0 / 3.0), Split::Test)
            .unwrap();
        assert!(better.iter().sum::<f64>() / 3.0 > mean, "{better:?}");
    }

    #[test]
    fn splits_use_different_inputs_and_generation_is_deterministic() {
        let p = small(0.5, 0.5, 0.5);
        let half = sum(&[p.expert_deltas(0)], 0.5);
        let v = p.score(&half, Split::Validation).unwrap();
        let t = p.score(&half, Split::Test).unwrap();
        assert_ne!(v, t);
        assert_eq!(small(0.5, 0.5, 0.5).expert_deltas(1), p.expert_deltas(1));
    }

    #[test]
    fn rejects_subspaces_that_do_not_fit() {
        let err = Planted::generate(PlantedSpec {
            dim: 8,
            rank: 4,
            overlap: 0.0,
            ..PlantedSpec::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
    }

    #[test]
    fn written_problem_reads_back_and_scores_its_adapters() {
        let dir = tempfile::tempdir().unwrap();
        let p = small(0.5, 0.5, 0.5);
        p.write(dir.path()).unwrap();
        let again = Planted::open(dir.path()).unwrap();
        assert_eq!(again.spec(), p.spec());
        let read = again
            .read_merged(&Planted::expert_dir(dir.path(), 2))
            .unwrap();
        let scores = again.score(&read, Split::Test).unwrap();
        assert!((scores[2] - 1.0).abs() < 1e-5, "{scores:?}");
        let base = again.read_merged(&Planted::base_dir(dir.path())).unwrap();
        assert!(base.values().all(|v| v.iter().all(|x| *x == 0.0)));
    }
}
