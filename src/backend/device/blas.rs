//! Dense f64 products on the device through cuBLAS (DGEMM): the Gram matrices and the output
//! products of a core-space merge, whose sizes are the module's own dimensions. Matrices are
//! column-major, as cuBLAS and faer keep them.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};

use super::{device_error, Gpu};
use crate::error::{Error, Result};

impl Gpu {
    /// `Xᵀ·X` of a column-major `rows × cols` matrix: `cols × cols`, column-major.
    pub fn gram_f64(&self, x: &[f64], rows: usize, cols: usize) -> Result<Vec<f64>> {
        check_len("X", x.len(), rows * cols)?;
        let config = gram_config(rows, cols)?;
        let device_x = self.upload(x)?;
        let mut out = self.zeros::<f64>(cols * cols)?;
        // SAFETY: `gram_config` sizes the product for X (rows × cols, ld rows) on both sides
        // and an output of cols × cols; the buffers hold that many values.
        unsafe { self.blas()?.gemm(config, &device_x, &device_x, &mut out) }
            .map_err(|e| device_error("cuBLAS DGEMM", e))?;
        self.download(&out, cols * cols)
    }

    /// `X·Y` of column-major `m × k` and `k × n` matrices: `m × n`, column-major.
    pub fn matmul_f64(
        &self,
        x: &[f64],
        y: &[f64],
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<Vec<f64>> {
        check_len("X", x.len(), m * k)?;
        check_len("Y", y.len(), k * n)?;
        let config = matmul_config(m, k, n)?;
        let (device_x, device_y) = (self.upload(x)?, self.upload(y)?);
        let mut out = self.zeros::<f64>(m * n)?;
        // SAFETY: `matmul_config` sizes the product for X (m × k), Y (k × n) and an m × n
        // output; the buffers hold that many values.
        unsafe { self.blas()?.gemm(config, &device_x, &device_y, &mut out) }
            .map_err(|e| device_error("cuBLAS DGEMM", e))?;
        self.download(&out, m * n)
    }
}

fn check_len(what: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::Device {
            message: format!("{what} has {len} values, expected {expected}"),
        })
    }
}

fn int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Device {
        message: format!("a dimension of {v} is beyond cuBLAS's 32-bit sizes"),
    })
}

/// C (cols × cols) = Xᵀ·X: op(A) = Xᵀ with A = X (rows × cols, lda = rows), B = X.
fn gram_config(rows: usize, cols: usize) -> Result<GemmConfig<f64>> {
    let (c, r) = (int(cols)?, int(rows.max(1))?);
    Ok(GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: c,
        n: c,
        k: int(rows)?,
        alpha: 1.0,
        lda: r,
        ldb: r,
        beta: 0.0,
        ldc: c.max(1),
    })
}

/// C (m × n) = X·Y, nothing transposed.
fn matmul_config(m: usize, k: usize, n: usize) -> Result<GemmConfig<f64>> {
    Ok(GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: int(m)?,
        n: int(n)?,
        k: int(k)?,
        alpha: 1.0,
        lda: int(m.max(1))?,
        ldb: int(k.max(1))?,
        beta: 0.0,
        ldc: int(m.max(1))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What cuBLAS computes: C = α·op(A)·op(B) + β·C, all column-major.
    fn column_major_gemm(config: &GemmConfig<f64>, a: &[f64], b: &[f64]) -> Vec<f64> {
        let (m, n, k) = (config.m as usize, config.n as usize, config.k as usize);
        let (lda, ldb, ldc) = (
            config.lda as usize,
            config.ldb as usize,
            config.ldc as usize,
        );
        let t = |op: cublasOperation_t| op == cublasOperation_t::CUBLAS_OP_T;
        let mut c = vec![0.0; ldc * n];
        for j in 0..n {
            for i in 0..m {
                let sum: f64 = (0..k)
                    .map(|p| {
                        let x = if t(config.transa) {
                            a[p + i * lda]
                        } else {
                            a[i + p * lda]
                        };
                        let y = if t(config.transb) {
                            b[j + p * ldb]
                        } else {
                            b[p + j * ldb]
                        };
                        x * y
                    })
                    .sum();
                c[i + j * ldc] = config.alpha * sum;
            }
        }
        c
    }

    #[test]
    fn gram_and_matmul_configs_compute_the_products() {
        // X is 3 × 2 column-major: columns (1, 2, 3) and (4, 5, 6).
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let gram = column_major_gemm(&gram_config(3, 2).unwrap(), &x, &x);
        assert_eq!(gram, [14.0, 32.0, 32.0, 77.0]);
        // X (3 × 2) · Y (2 × 1), Y = (1, −1): (1 − 4, 2 − 5, 3 − 6).
        let y = [1.0, -1.0];
        let product = column_major_gemm(&matmul_config(3, 2, 1).unwrap(), &x, &y);
        assert_eq!(product, [-3.0, -3.0, -3.0]);
    }
}
