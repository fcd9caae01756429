//! The dense linear algebra of core space (see core.rs), on matrices no larger than the
//! experts' stacked ranks: eigenvectors of Gram matrices, Cholesky factors, SVDs of small cores,
//! and the row-major conversions at the edges.

use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::solvers::SelfAdjointEigen;
use faer::{Accum, Mat, MatRef, Par, Side};

use crate::error::{Error, Result};
use crate::recipe::RankTarget;

/// Eigenvalues below this share of the largest count as zero (singular values below 1e-8 of
/// the largest: directions the factors do not really have).
pub(super) const NEGLIGIBLE: f64 = 1e-16;

fn eigen(m: MatRef<'_, f64>, tensor: &str) -> Result<SelfAdjointEigen<f64>> {
    m.self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::Numerical {
            tensor: tensor.to_string(),
            message: format!(
                "the eigendecomposition of a Gram matrix of the experts' updates did not converge: {e:?}"
            ),
        })
}

/// The eigenvectors of a symmetric positive semi-definite matrix whose eigenvalues are above
/// `negligible` times the largest, largest first, with those eigenvalues.
pub(super) fn significant(
    m: MatRef<'_, f64>,
    negligible: f64,
    tensor: &str,
) -> Result<(Mat<f64>, Vec<f64>)> {
    let e = eigen(m, tensor)?;
    let values = e.S().column_vector();
    let n = values.nrows();
    let largest = (0..n).map(|i| values[i]).fold(0.0, f64::max);
    // faer sorts eigenvalues in ascending order.
    let keep: Vec<usize> = (0..n)
        .rev()
        .filter(|&i| values[i] > largest * negligible && values[i] > 0.0)
        .collect();
    let vectors = Mat::from_fn(n, keep.len(), |r, c| e.U()[(r, keep[c])]);
    Ok((vectors, keep.iter().map(|&i| values[i]).collect()))
}

/// The lower Cholesky factor of a Gram block, unless the block is (numerically) singular.
pub(super) fn cholesky(gram: MatRef<'_, f64>) -> Option<Mat<f64>> {
    let l = gram.llt(Side::Lower).ok()?.L().to_owned();
    let diagonal: Vec<f64> = (0..l.nrows()).map(|i| l[(i, i)]).collect();
    let largest = diagonal.iter().copied().fold(0.0, f64::max);
    // Pivots below 1e-6 of the largest: too close to dependent columns to invert safely.
    (largest > 0.0 && diagonal.iter().all(|&d| d > largest * 1e-6)).then_some(l)
}

/// `Xᵀ·X`, computing one triangle (half the work of a general product) and mirroring it.
pub(super) fn gram(x: &Mat<f64>) -> Mat<f64> {
    let n = x.ncols();
    let mut g = Mat::<f64>::zeros(n, n);
    triangular::matmul(
        g.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        x.transpose(),
        BlockStructure::Rectangular,
        x.as_ref(),
        BlockStructure::Rectangular,
        1.0,
        Par::Seq,
    );
    for j in 0..n {
        for i in 0..j {
            g[(i, j)] = g[(j, i)];
        }
    }
    g
}

pub(super) fn row_major(m: &Mat<f64>) -> Vec<f32> {
    (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)] as f32))
        .collect()
}

pub(super) fn transposed_row_major(m: &Mat<f64>) -> Vec<f32> {
    (0..m.ncols())
        .flat_map(|j| (0..m.nrows()).map(move |i| m[(i, j)] as f32))
        .collect()
}

/// The SVD of a small core and the rank a target keeps.
pub(super) struct Svd {
    pub(super) u: Mat<f64>,
    pub(super) s: Vec<f64>,
    pub(super) v: Mat<f64>,
    pub(super) k: usize,
    pub(super) discarded: f64,
}

impl Svd {
    pub(super) fn of(core: &Mat<f64>, target: RankTarget, tensor: &str) -> Result<Svd> {
        let svd = core.thin_svd().map_err(|e| Error::Numerical {
            tensor: tensor.to_string(),
            message: format!("the SVD of the merged update did not converge: {e:?}"),
        })?;
        let values = svd.S().column_vector();
        let s: Vec<f64> = (0..values.nrows()).map(|i| values[i]).collect();
        let energies: Vec<f64> = s.iter().map(|v| v * v).collect();
        let total: f64 = energies.iter().sum();
        let k = match target {
            RankTarget::Fixed(k) => k.min(energies.len()),
            RankTarget::Energy(fraction) => {
                let mut kept = 0.0;
                let mut k = 0;
                while k < energies.len() && kept < fraction * total {
                    kept += energies[k];
                    k += 1;
                }
                k.max(1).min(energies.len())
            }
        };
        let kept: f64 = energies[..k].iter().sum();
        Ok(Svd {
            u: svd.U().to_owned(),
            s,
            v: svd.V().to_owned(),
            k,
            discarded: if total > 0.0 { 1.0 - kept / total } else { 0.0 },
        })
    }

    /// How many singular values are not negligible next to the largest (0 for a zero
    /// matrix).
    pub(super) fn nonzero(&self) -> usize {
        let largest = self.s.first().copied().unwrap_or(0.0);
        self.s
            .iter()
            .take_while(|&&x| x > 0.0 && x > largest * 1e-8)
            .count()
    }

    /// The kept singular values as a diagonal matrix.
    pub(super) fn s_k(&self) -> Mat<f64> {
        Mat::from_fn(self.k, self.k, |i, j| if i == j { self.s[i] } else { 0.0 })
    }
}
