//! The experts' updates of one tensor, resident on the device: uploaded f32 deltas, bf16
//! tensors with their bf16 base, or LoRA products s·B·A formed there by cuBLAS.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtrMut};

use super::{device_error, Gpu};
use crate::error::{Error, Result};

/// T experts' updates of one tensor of `n` elements, on the device.
pub enum Updates {
    /// f32 deltas, expert after expert.
    F32 {
        /// `experts × n` values.
        deltas: CudaSlice<f32>,
        /// How many experts.
        experts: usize,
        /// Elements per expert.
        n: usize,
    },
    /// bf16 expert tensors (expert after expert) and their bf16 base; expert t's update is
    /// `tensor − base` in f32, as the CPU computes it.
    Bf16 {
        /// `experts × n` bf16 bits.
        tensors: CudaSlice<u16>,
        /// `n` bf16 bits.
        base: CudaSlice<u16>,
        /// How many experts.
        experts: usize,
        /// Elements per expert.
        n: usize,
    },
}

impl Updates {
    /// How many experts.
    pub fn experts(&self) -> usize {
        match self {
            Updates::F32 { experts, .. } | Updates::Bf16 { experts, .. } => *experts,
        }
    }

    /// Elements per expert.
    pub fn len(&self) -> usize {
        match self {
            Updates::F32 { n, .. } | Updates::Bf16 { n, .. } => *n,
        }
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One expert's LoRA factors for a `rows × cols` target: ΔW = s·B·A, or its transpose
/// (`fan_in_fan_out` linear layers and embeddings), as `crate::adapter::lora_delta`.
#[derive(Debug, Clone, Copy)]
pub struct LoraFactors<'a> {
    /// A, row-major `[rank, in]` (`in` = cols, or rows when transposed).
    pub a: &'a [f32],
    /// B, row-major `[out, rank]` (`out` = rows, or cols when transposed).
    pub b: &'a [f32],
    /// The rank.
    pub rank: usize,
    /// The scaling s.
    pub scaling: f32,
    /// Whether the target holds (B·A)ᵀ.
    pub transposed: bool,
}

impl Gpu {
    /// Uploads f32 deltas, one slice per expert, all of one length.
    pub fn upload_deltas(&self, deltas: &[&[f32]]) -> Result<Updates> {
        let n = same_length(deltas.iter().map(|d| d.len()))?;
        let mut stacked = Vec::with_capacity(n * deltas.len());
        for d in deltas {
            stacked.extend_from_slice(d);
        }
        Ok(Updates::F32 {
            deltas: self.upload(&stacked)?,
            experts: deltas.len(),
            n,
        })
    }

    /// Uploads bf16 expert tensors and their base (as bits), all of one length.
    pub fn upload_bf16(&self, tensors: &[&[u16]], base: &[u16]) -> Result<Updates> {
        let n = same_length(tensors.iter().map(|d| d.len()).chain([base.len()]))?;
        let mut stacked = Vec::with_capacity(n * tensors.len());
        for t in tensors {
            stacked.extend_from_slice(t);
        }
        Ok(Updates::Bf16 {
            tensors: self.upload(&stacked)?,
            base: self.upload(base)?,
            experts: tensors.len(),
            n,
        })
    }

    /// Every expert's update, back on the host (for checks against the CPU).
    pub fn download_updates(&self, updates: &Updates) -> Result<Vec<Vec<f32>>> {
        (0..updates.experts())
            .map(|t| self.span(updates, t, 0, updates.len() as u64))
            .collect()
    }

    /// Forms each expert's LoRA update of a `rows × cols` target on the device (cuBLAS
    /// SGEMM, no TF32); `None` is an expert that leaves the tensor alone (zero update).
    pub fn lora_deltas(
        &self,
        factors: &[Option<LoraFactors<'_>>],
        rows: usize,
        cols: usize,
    ) -> Result<Updates> {
        let n = rows * cols;
        let mut deltas = self.zeros::<f32>(n * factors.len())?;
        for (t, f) in factors.iter().enumerate() {
            let Some(f) = f else { continue };
            let (out_dim, in_dim) = if f.transposed {
                (cols, rows)
            } else {
                (rows, cols)
            };
            if f.a.len() != f.rank * in_dim || f.b.len() != out_dim * f.rank {
                return Err(Error::Device {
                    message: format!(
                        "LoRA factors of expert {t}: A has {} values and B {}, expected {}×{in_dim} and {out_dim}×{}",
                        f.a.len(),
                        f.b.len(),
                        f.rank,
                        f.rank
                    ),
                });
            }
            if f.rank == 0 || n == 0 {
                continue;
            }
            let a = self.upload(f.a)?;
            let b = self.upload(f.b)?;
            let mut target = deltas.slice_mut(t * n..(t + 1) * n);
            self.gemm_lora(&a, &b, f, rows, cols, &mut target)?;
        }
        Ok(Updates::F32 {
            deltas,
            experts: factors.len(),
            n,
        })
    }

    /// `target` (row-major `rows × cols`) = s·B·A, or s·(B·A)ᵀ when transposed.
    fn gemm_lora(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        f: &LoraFactors<'_>,
        rows: usize,
        cols: usize,
        target: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let (config, b_first) = lora_gemm(f, rows, cols)?;
        let blas = self.blas()?;
        // SAFETY: `lora_gemm` sizes the product for A (r × in), B (out × r) and a target of
        // rows · cols values, which `lora_deltas` checked.
        let result = unsafe {
            if b_first {
                blas.gemm(config, b, a, target)
            } else {
                blas.gemm(config, a, b, target)
            }
        };
        result.map_err(|e| device_error("cuBLAS SGEMM", e))
    }
}

/// The cuBLAS SGEMM that writes a LoRA update into a row-major `rows × cols` target, and
/// whether B is its first operand. cuBLAS is column-major, and a row-major matrix is its
/// column-major transpose: B·A is computed as Aᵀ·Bᵀ (A first, no transposes), and (B·A)ᵀ
/// as op(B)·op(A) with both transposed.
fn lora_gemm(f: &LoraFactors<'_>, rows: usize, cols: usize) -> Result<(GemmConfig<f32>, bool)> {
    let int = |v: usize| {
        i32::try_from(v).map_err(|_| Error::Device {
            message: format!("a LoRA dimension of {v} is beyond cuBLAS's 32-bit sizes"),
        })
    };
    let (m, n, k) = (int(cols)?, int(rows)?, int(f.rank)?);
    let config = if f.transposed {
        GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_T,
            m,
            n,
            k,
            alpha: f.scaling,
            lda: k,
            ldb: n,
            beta: 0.0,
            ldc: m,
        }
    } else {
        GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m,
            n,
            k,
            alpha: f.scaling,
            lda: m,
            ldb: k,
            beta: 0.0,
            ldc: m,
        }
    };
    Ok((config, f.transposed))
}

/// The common length of the inputs, or an error.
fn same_length(mut lengths: impl Iterator<Item = usize>) -> Result<usize> {
    let first = lengths.next().ok_or_else(|| Error::Device {
        message: "no expert to upload".into(),
    })?;
    if lengths.any(|l| l != first) {
        return Err(Error::Device {
            message: "every expert needs one value per base element".into(),
        });
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{lora_delta, LoraKind, LoraModule};

    /// What cuBLAS computes: C = α·op(A)·op(B) + β·C, all column-major.
    fn column_major_gemm(config: &GemmConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (config.m as usize, config.n as usize, config.k as usize);
        let (lda, ldb, ldc) = (
            config.lda as usize,
            config.ldb as usize,
            config.ldc as usize,
        );
        let transposed = |op: cublasOperation_t| op == cublasOperation_t::CUBLAS_OP_T;
        let op_a = |i: usize, p: usize| {
            if transposed(config.transa) {
                a[p + i * lda]
            } else {
                a[i + p * lda]
            }
        };
        let op_b = |p: usize, j: usize| {
            if transposed(config.transb) {
                b[j + p * ldb]
            } else {
                b[p + j * ldb]
            }
        };
        for j in 0..n {
            for i in 0..m {
                let sum: f32 = (0..k).map(|p| op_a(i, p) * op_b(p, j)).sum();
                c[i + j * ldc] = config.alpha * sum + config.beta * c[i + j * ldc];
            }
        }
    }

    #[test]
    fn the_gemm_writes_what_the_cpu_computes() {
        let values = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 7 + seed * 13) % 23) as f32 - 11.0) / 8.0)
                .collect()
        };
        for (rows, cols, rank, kind, fan_in_fan_out) in [
            (5, 3, 2, LoraKind::Linear, false),
            (3, 7, 4, LoraKind::Linear, true),
            (6, 4, 3, LoraKind::Embedding, false),
            (1, 1, 1, LoraKind::Linear, false),
        ] {
            let transposed = kind == LoraKind::Embedding || fan_in_fan_out;
            let (out_dim, in_dim) = if transposed {
                (cols, rows)
            } else {
                (rows, cols)
            };
            let (a, b) = (values(rank * in_dim, 1), values(out_dim * rank, 2));
            let module = LoraModule {
                module: "m".into(),
                kind,
                a_key: "a".into(),
                b_key: "b".into(),
                rank,
                scaling: 0.75,
                fan_in_fan_out,
                target_shape: [rows, cols],
            };
            let expected = lora_delta(&module, &a, &b);
            let factors = LoraFactors {
                a: &a,
                b: &b,
                rank,
                scaling: 0.75,
                transposed,
            };
            let (config, b_first) = lora_gemm(&factors, rows, cols).unwrap();
            let mut got = vec![0f32; rows * cols];
            if b_first {
                column_major_gemm(&config, &b, &a, &mut got);
            } else {
                column_major_gemm(&config, &a, &b, &mut got);
            }
            for (g, e) in got.iter().zip(&expected) {
                assert!(
                    (g - e).abs() <= 1e-6,
                    "{rows}×{cols} {kind:?}: {got:?} vs {expected:?}"
                );
            }
        }
    }
}
