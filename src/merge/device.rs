//! One tensor merged on a CUDA device (DESIGN.md §6): TIES and CACI in full space, each
//! expert's update formed on the device (LoRA products through cuBLAS, or the uploaded
//! difference to the base, or bf16 tensors read as they are stored), trimmed by radix select
//! and merged by the fused kernel; only the merged tensor comes back. Every other method,
//! TIES with a rescale and CACI with `restore`, runs on the CPU. Core-space merges (LoRA
//! output) take their module-sized products from cuBLAS. [`CudaKernels`] is the seam merge/
//! calls.

use std::path::Path;
use std::sync::Mutex;

use faer::Mat;

use super::core::Products;
use super::expert::ExpertInput;
use super::job::{fraction, TensorStats};
use super::kernels::{CpuKernels, Kernels};
use super::method::{Confidence, DisjointMean, Method, SignElection};
use super::parameters::check_params;
use super::plan::{MergeParams, Plan, TensorPlan};
use super::sparsify::magnitude_keep;
use crate::adapter::{Adapter, LoraKind};
use crate::backend::device::{
    ConflictSums, ConsensusRule, DeviceValues, Gpu, LoraFactors, MergeExpert, Updates, MAX_EXPERTS,
};
use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::recipe::OutputKind;
use crate::tensor::{check_finite_from, from_f32, Dtype};

/// Whether this tensor's merge runs on the device.
fn runs_on_device(plan: &Plan, params: &MergeParams) -> bool {
    let method_fits = match params.method {
        Method::Ties => !params.globals.rescale,
        // Restore needs the experts' untrimmed updates next to the merge: on the CPU.
        // So does the activation-aware vote, which reads the calibration statistics.
        Method::Caci => {
            params.globals.restore.is_none() && params.globals.confidence != Confidence::Activation
        }
        _ => false,
    };
    method_fits && plan.base.is_some() && (1..=MAX_EXPERTS).contains(&plan.experts.len())
}

/// Merges tensor `t` on `gpu`: its bytes in the output dtype and the merge statistics.
fn compute_on_device(
    gpu: &Gpu,
    plan: &Plan,
    t: &TensorPlan,
    params: &MergeParams,
) -> Result<(Vec<u8>, TensorStats)> {
    let name = t.name.as_str();
    check_params(params.method, &params.globals, name, &params.experts)?;
    let base_model = plan.base.as_ref().ok_or_else(|| Error::Parameter {
        name: "base_model".into(),
        tensor: name.into(),
        message: format!("method `{}` needs a base model", params.method.name()),
    })?;
    let delta_output = plan.recipe.output == OutputKind::Delta;
    let n: usize = t.shape.iter().product();

    // The experts' updates, on the device; the host base where the kernel adds it back (the
    // bf16 form holds its own base, which its kernel always adds back: not for a delta).
    let bf16 = if delta_output {
        None
    } else {
        bf16_updates(gpu, plan, base_model, name)?
    };
    let (updates, host_base) = match bf16 {
        Some(updates) => (updates, None),
        None => match lora_updates(gpu, plan, name, &t.shape)? {
            Some(updates) => {
                let base = (!delta_output)
                    .then(|| base_model.read_f32(name))
                    .transpose()?;
                (updates, base)
            }
            None => {
                let (updates, base) = host_updates(gpu, plan, base_model, name)?;
                (updates, (!delta_output).then_some(base))
            }
        },
    };

    let mut rules = Vec::with_capacity(plan.experts.len());
    for (i, p) in params.experts.iter().enumerate() {
        let k = magnitude_keep(p.density, n);
        let vote_factor = match params.method {
            Method::Caci => match params.globals.confidence {
                Confidence::None => p.weight,
                Confidence::Rms | Confidence::Activation => {
                    let rms = (gpu.sum_squares(&updates, i)? / n.max(1) as f64).sqrt();
                    if rms > 0.0 {
                        (f64::from(p.weight) / rms) as f32
                    } else {
                        0.0
                    }
                }
            },
            _ => match params.globals.sign_election {
                SignElection::Weighted => p.weight,
                SignElection::Unweighted => 1.0,
            },
        };
        rules.push(MergeExpert {
            cut: gpu.cut(&updates, i, k)?,
            vote_factor,
            weight: p.weight,
        });
    }
    let globals = &params.globals;
    let rule = match params.method {
        Method::Caci => ConsensusRule {
            divide_by_count: false,
            normalize: globals.normalize,
            gamma: globals.attenuation,
            lambda: globals.lambda,
        },
        _ => ConsensusRule {
            divide_by_count: globals.disjoint_mean == DisjointMean::Counts,
            normalize: globals.normalize,
            gamma: 0.0,
            lambda: globals.lambda,
        },
    };
    let merged = gpu.merge(
        &updates,
        &rules,
        rule,
        host_base.as_deref(),
        t.dtype == Dtype::BF16,
    )?;
    let stats = TensorStats {
        kept_fraction: merged
            .kept
            .iter()
            .map(|&k| fraction(k as usize, n))
            .collect(),
        sign_conflict: Some(fraction(merged.conflicts as usize, n)),
        delta_l2: merged.delta_sq.sqrt(),
    };
    let output = Path::new("merged output");
    let bytes = match merged.values {
        DeviceValues::F32(values) => {
            check_finite_from(output, name, &values, 0)?;
            from_f32(t.dtype, &values).expect("output dtype")
        }
        DeviceValues::Bf16(bits) => {
            if let Some(i) = bits.iter().position(|b| b & 0x7F80 == 0x7F80) {
                let value = f32::from_bits(u32::from(bits[i]) << 16);
                check_finite_from(output, name, &[value], i)?;
            }
            bits.iter().flat_map(|b| b.to_le_bytes()).collect()
        }
    };
    Ok((bytes, stats))
}

/// bf16 expert tensors read as stored, when the base and every expert are bf16 models.
fn bf16_updates(gpu: &Gpu, plan: &Plan, base: &Checkpoint, name: &str) -> Result<Option<Updates>> {
    let is_bf16 = |c: &Checkpoint| c.info(name).is_some_and(|i| i.dtype == Dtype::BF16);
    let models: Option<Vec<&Checkpoint>> = plan
        .experts
        .iter()
        .map(|e| match &e.input {
            ExpertInput::Model(m) if is_bf16(m) => Some(m),
            _ => None,
        })
        .collect();
    let Some(models) = models.filter(|_| is_bf16(base)) else {
        return Ok(None);
    };
    let bits = |bytes: &[u8]| -> Vec<u16> {
        bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect()
    };
    let base_bits = bits(base.bytes(name)?);
    let mut tensors = Vec::with_capacity(models.len());
    for model in models {
        tensors.push(bits(model.bytes(name)?));
    }
    let rows: Vec<&[u16]> = tensors.iter().map(Vec::as_slice).collect();
    gpu.upload_bf16(&rows, &base_bits).map(Some)
}

/// LoRA products on the device, when every expert is a plain adapter on the recipe's base
/// whose update of this tensor (if any) is a LoRA module.
fn lora_updates(gpu: &Gpu, plan: &Plan, name: &str, shape: &[usize]) -> Result<Option<Updates>> {
    let [rows, cols] = shape else {
        return Ok(None);
    };
    let mut adapters = Vec::with_capacity(plan.experts.len());
    for e in &plan.experts {
        match &e.input {
            ExpertInput::Adapter(a) if !a.saved_tensors().contains_key(name) => adapters.push(a),
            _ => return Ok(None),
        }
    }
    lora_products(gpu, &adapters, name, *rows, *cols).map(Some)
}

/// Each adapter's update s·B·A of tensor `name` (`rows × cols`), formed on the device by
/// cuBLAS; an adapter without that module contributes zeros.
fn lora_products(
    gpu: &Gpu,
    adapters: &[&Adapter],
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Updates> {
    let mut factors = Vec::with_capacity(adapters.len());
    for adapter in adapters {
        factors.push(match adapter.modules().get(name) {
            Some(m) => Some((
                m,
                adapter.file().read_f32(&m.a_key)?,
                adapter.file().read_f32(&m.b_key)?,
            )),
            None => None,
        });
    }
    let borrowed: Vec<Option<LoraFactors<'_>>> = factors
        .iter()
        .map(|f| {
            f.as_ref().map(|(m, a, b)| LoraFactors {
                a,
                b,
                rank: m.rank,
                scaling: m.scaling,
                transposed: m.kind == LoraKind::Embedding || m.fan_in_fan_out,
            })
        })
        .collect();
    gpu.lora_deltas(&borrowed, rows, cols)
}

/// Each expert's full tensor minus the base, formed on the host and uploaded; returns the
/// base too.
fn host_updates(
    gpu: &Gpu,
    plan: &Plan,
    base_model: &Checkpoint,
    name: &str,
) -> Result<(Updates, Vec<f32>)> {
    let base = base_model.read_f32(name)?;
    let mut deltas = Vec::with_capacity(plan.experts.len());
    for e in &plan.experts {
        let mut values = if e.touches(name) {
            e.tensor(name, Some(base_model))?
        } else {
            base.clone()
        };
        for (v, b) in values.iter_mut().zip(&base) {
            *v -= b;
        }
        deltas.push(values);
    }
    let rows: Vec<&[f32]> = deltas.iter().map(Vec::as_slice).collect();
    Ok((gpu.upload_deltas(&rows)?, base))
}

/// [`Kernels`] on a CUDA device: the TIES and CACI tensors `runs_on_device` admits, one at
/// a time on the device (its memory holds one tensor's experts), and the module-sized products
/// of core-space merges (cuBLAS DGEMM).
#[derive(Debug)]
pub struct CudaKernels(Mutex<Gpu>);

impl CudaKernels {
    fn gpu(&self) -> std::sync::MutexGuard<'_, Gpu> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The kernels of a backend: the CPU reference, or the CUDA device it names (opened here, so a
/// machine without one fails before any work, naming why).
pub fn kernels_for(backend: Backend) -> Result<Box<dyn Kernels>> {
    Ok(match backend {
        Backend::Cpu => Box::new(CpuKernels),
        Backend::Cuda(ordinal) => Box::new(CudaKernels(Mutex::new(Gpu::open(ordinal)?))),
    })
}

impl Kernels for CudaKernels {
    fn device(&self) -> &'static str {
        "cuda"
    }

    fn merge_tensor(
        &self,
        plan: &Plan,
        t: &TensorPlan,
        params: &MergeParams,
    ) -> Result<Option<(Vec<u8>, TensorStats)>> {
        if !runs_on_device(plan, params) {
            return Ok(None);
        }
        compute_on_device(&self.gpu(), plan, t, params).map(Some)
    }

    fn products(&self) -> &dyn Products {
        self
    }

    fn conflict_sums(
        &self,
        deltas: &[Vec<f32>],
        weights: &[f32],
        densities: &[f32],
    ) -> Result<ConflictSums> {
        let gpu = self.gpu();
        let rows: Vec<&[f32]> = deltas.iter().map(Vec::as_slice).collect();
        device_conflict_sums(&gpu, &gpu.upload_deltas(&rows)?, weights, densities)
    }

    fn adapter_conflict_sums(
        &self,
        adapters: &[&Adapter],
        name: &str,
        rows: usize,
        cols: usize,
        weights: &[f32],
        densities: &[f32],
    ) -> Result<ConflictSums> {
        let gpu = self.gpu();
        let updates = lora_products(&gpu, adapters, name, rows, cols)?;
        device_conflict_sums(&gpu, &updates, weights, densities)
    }
}

/// The conflict sums of the experts' `updates`, already on `gpu`: each trimmed by its exact
/// top-k cut (radix select), then cuda/conflict.cu.
fn device_conflict_sums(
    gpu: &Gpu,
    updates: &Updates,
    weights: &[f32],
    densities: &[f32],
) -> Result<ConflictSums> {
    let n = updates.len();
    let cuts = densities
        .iter()
        .enumerate()
        .map(|(i, &d)| gpu.cut(updates, i, magnitude_keep(d, n)))
        .collect::<Result<Vec<_>>>()?;
    gpu.conflicts(updates, &cuts, weights)
}

/// The values of a faer matrix, column after column.
fn columns(x: &Mat<f64>) -> Vec<f64> {
    (0..x.ncols())
        .flat_map(|j| x.col(j).iter().copied().collect::<Vec<f64>>())
        .collect()
}

fn from_columns(values: &[f64], rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| values[i + j * rows])
}

impl Products for CudaKernels {
    fn gram(&self, x: &Mat<f64>) -> Result<Mat<f64>> {
        let (rows, cols) = (x.nrows(), x.ncols());
        let g = self.gpu().gram_f64(&columns(x), rows, cols)?;
        Ok(from_columns(&g, cols, cols))
    }

    fn product(&self, x: &Mat<f64>, y: &Mat<f64>) -> Result<Mat<f64>> {
        let (m, k, n) = (x.nrows(), x.ncols(), y.ncols());
        let p = self.gpu().matmul_f64(&columns(x), &columns(y), m, k, n)?;
        Ok(from_columns(&p, m, n))
    }
}
