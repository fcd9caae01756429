//! RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models"):
//! per linear module, the merged update that keeps every expert's outputs on its own inputs
//! best in least squares,
//!
//! `Δ = argmin Σ_t w_t·‖X_t·(Δ − Δ_t)ᵀ‖² = (Σ_t w_t·Δ_t·G̃_t)·M⁻¹`, `M = Σ_t w_t·G̃_t + ρ·I`,
//!
//! with `G_t = X_tᵀX_t / tokens` each expert's mean input second moment, `G̃_t = α·G_t +
//! (1 − α)·diag(G_t)` (RegMean's shrinkage of the off-diagonal entries) and the ridge `ρ` relative
//! to `M`'s mean diagonal entry. With identical inputs it is the weighted mean of the updates;
//! with orthogonal inputs each expert's outputs on its own inputs are kept exactly.
//!
//! For LoRA experts (`Δ_t = B_t·A_t`, scaling folded into `A_t`) the solution is
//! `Σ_t B_t·(w_t·A_t·G̃_t·M⁻¹)`: the experts' `B`s side by side with new `A`s, exact at rank
//! `Σ r_t`, without forming any out × in matrix. The cost is one Cholesky factorisation of the
//! in × in matrix `M` (in³/3 multiply-adds) and `Σ r_t·in²` for the new `A`s; in full space the
//! products `Δ_t·G̃_t` add `experts·out·in²`.

use faer::linalg::solvers::{Llt, Solve};
use faer::{Mat, MatRef, Par, Side};

use super::calibration::Gram;
use crate::error::{Error, Result};

/// `α·G + (1 − α)·diag(G)`.
fn shrunk(gram: &Gram, alpha: f64) -> Mat<f64> {
    let g = gram.matrix();
    Mat::from_fn(gram.dim, gram.dim, |i, j| {
        if i == j {
            g[(i, j)]
        } else {
            alpha * g[(i, j)]
        }
    })
}

/// The Cholesky factor of `M = Σ w_t·G̃_t + ρ·mean(diag)·I`, and the shrunk Grams `G̃_t` where
/// `α < 1` (with `α = 1` they are the Grams themselves, not copied).
struct System {
    shrunk: Option<Vec<Mat<f64>>>,
    llt: Llt<f64>,
}

impl System {
    /// The experts' `G̃_t`.
    fn grams<'a>(&'a self, grams: &'a [&Gram]) -> Vec<MatRef<'a, f64>> {
        shrunk_views(&self.shrunk, grams)
    }
}

/// The shrunk Grams where there are copies, else the Grams.
fn shrunk_views<'a>(shrunk: &'a Option<Vec<Mat<f64>>>, grams: &'a [&Gram]) -> Vec<MatRef<'a, f64>> {
    match shrunk {
        Some(shrunk) => shrunk.iter().map(Mat::as_ref).collect(),
        None => grams.iter().map(|g| g.matrix()).collect(),
    }
}

/// The system of `grams`; `None` when no expert's inputs reach the module (every Gram zero),
/// where the merged update is zero.
fn system(
    tensor: &str,
    grams: &[&Gram],
    weights: &[f32],
    alpha: f32,
    ridge: f32,
) -> Result<Option<System>> {
    if let Some(w) = weights.iter().find(|w| w.is_nan() || **w < 0.0) {
        return Err(Error::Parameter {
            name: "weight".to_string(),
            tensor: tensor.to_string(),
            message: format!("RegMean needs weights ≥ 0, found {w}"),
        });
    }
    let n = grams[0].dim;
    let shrunk = (alpha != 1.0).then(|| {
        grams
            .iter()
            .map(|g| shrunk(g, f64::from(alpha)))
            .collect::<Vec<_>>()
    });
    let mut m = Mat::<f64>::zeros(n, n);
    for (g, &w) in shrunk_views(&shrunk, grams).iter().zip(weights) {
        let w = f64::from(w);
        for j in 0..n {
            for i in 0..n {
                m[(i, j)] += w * g[(i, j)];
            }
        }
    }
    let mean_diagonal = (0..n).map(|i| m[(i, i)]).sum::<f64>() / n as f64;
    if mean_diagonal <= 0.0 {
        return Ok(None);
    }
    for i in 0..n {
        m[(i, i)] += f64::from(ridge) * mean_diagonal;
    }
    let llt = m.llt(Side::Lower).map_err(|e| Error::Numerical {
        tensor: tensor.to_string(),
        message: format!("RegMean's summed Gram is not positive definite ({e:?}): raise `ridge`"),
    })?;
    Ok(Some(System { shrunk, llt }))
}

fn matrix(values: &[f32], rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| f64::from(values[i * cols + j]))
}

fn row_major(m: MatRef<'_, f64>) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        out.extend((0..m.ncols()).map(|j| m[(i, j)] as f32));
    }
    out
}

/// `N·M⁻¹` for `N` of shape rows × in, through `M`'s Cholesky factor (`M` is symmetric, so
/// this is `(M⁻¹·Nᵀ)ᵀ`).
fn right_solve(llt: &Llt<f64>, n: Mat<f64>) -> Mat<f64> {
    llt.solve(n.transpose()).transpose().to_owned()
}

/// The RegMean update of one module from the experts' full updates `deltas` (each
/// `rows × cols`, row-major), their Grams (`cols × cols`) and weights.
pub fn merge_updates(
    tensor: &str,
    (rows, cols): (usize, usize),
    deltas: &[&[f32]],
    grams: &[&Gram],
    weights: &[f32],
    alpha: f32,
    ridge: f32,
) -> Result<Vec<f32>> {
    check(tensor, cols, grams)?;
    let Some(system) = system(tensor, grams, weights, alpha, ridge)? else {
        return Ok(vec![0.0; rows * cols]);
    };
    let blocks: Vec<(&[f32], usize, usize)> = deltas.iter().map(|d| (*d, rows, 0)).collect();
    let n = weighted_products(&blocks, rows, cols, &system.grams(grams), weights);
    Ok(row_major(right_solve(&system.llt, n).as_ref()))
}

/// The new `A`s of a LoRA RegMean merge: given each expert's `A_t` (`rank_t × cols`, row-major,
/// with its scaling already folded in) returns `[w_t·A_t·G̃_t·M⁻¹]` stacked (`Σ rank_t × cols`),
/// so that `[B_1 … B_T]` times it is the RegMean update.
pub fn merge_factors(
    tensor: &str,
    cols: usize,
    a: &[(&[f32], usize)],
    grams: &[&Gram],
    weights: &[f32],
    alpha: f32,
    ridge: f32,
) -> Result<Vec<f32>> {
    check(tensor, cols, grams)?;
    let total: usize = a.iter().map(|(_, r)| r).sum();
    let Some(system) = system(tensor, grams, weights, alpha, ridge)? else {
        return Ok(vec![0.0; total * cols]);
    };
    let mut blocks = Vec::with_capacity(a.len());
    let mut row = 0;
    for &(values, rank) in a {
        blocks.push((values, rank, row));
        row += rank;
    }
    let n = weighted_products(&blocks, total, cols, &system.grams(grams), weights);
    Ok(row_major(right_solve(&system.llt, n).as_ref()))
}

/// `N` (`rows × cols`) with `w_t·X_t·G̃_t` added at each block's rows: every block
/// `(X_t, rows_t, first row)` is row-major `rows_t × cols`. Sequential, as all of mmx's dense
/// linear algebra: a parallel product sums in an order that depends on the thread count, and a
/// merge must not.
fn weighted_products(
    blocks: &[(&[f32], usize, usize)],
    rows: usize,
    cols: usize,
    shrunk: &[MatRef<'_, f64>],
    weights: &[f32],
) -> Mat<f64> {
    let mut n = Mat::<f64>::zeros(rows, cols);
    for ((&(values, block_rows, first), g), &w) in blocks.iter().zip(shrunk).zip(weights) {
        let x = matrix(values, block_rows, cols);
        faer::linalg::matmul::matmul(
            n.as_mut().subrows_mut(first, block_rows),
            faer::Accum::Add,
            x.as_ref(),
            *g,
            f64::from(w),
            Par::Seq,
        );
    }
    n
}

fn check(tensor: &str, cols: usize, grams: &[&Gram]) -> Result<()> {
    let message = match grams.iter().find(|g| g.dim != cols) {
        _ if grams.is_empty() => "RegMean needs at least one expert's Gram".to_string(),
        Some(g) => format!(
            "a Gram is {d}×{d} but the module has {cols} input features",
            d = g.dim
        ),
        None => return Ok(()),
    };
    Err(Error::Numerical {
        tensor: tensor.to_string(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gram_of(x: &[Vec<f64>]) -> Gram {
        let dim = x[0].len();
        let mut values = vec![0.0; dim * dim];
        for row in x {
            for i in 0..dim {
                for j in 0..dim {
                    values[i * dim + j] += row[i] * row[j] / x.len() as f64;
                }
            }
        }
        Gram { dim, values }
    }

    fn apply(delta: &[f32], (rows, cols): (usize, usize), x: &[f64]) -> Vec<f64> {
        (0..rows)
            .map(|i| {
                (0..cols)
                    .map(|j| f64::from(delta[i * cols + j]) * x[j])
                    .sum()
            })
            .collect()
    }

    fn close(a: &[f64], b: &[f64], tol: f64) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} against {b:?}");
        }
    }

    /// Two experts whose inputs live on disjoint coordinates: each expert's outputs on its own
    /// inputs are kept exactly, though their updates overlap everywhere.
    #[test]
    fn orthogonal_inputs_keep_each_experts_outputs() {
        let shape = (2, 4);
        let d1: Vec<f32> = vec![1.0, -2.0, 3.0, 0.5, 0.0, 1.0, -1.0, 2.0];
        let d2: Vec<f32> = vec![-1.0, 4.0, 0.5, 1.0, 2.0, 2.0, 1.0, -3.0];
        let x1 = vec![vec![1.0, 0.5, 0.0, 0.0], vec![-0.3, 2.0, 0.0, 0.0]];
        let x2 = vec![vec![0.0, 0.0, 1.0, 1.0], vec![0.0, 0.0, 0.7, -1.5]];
        let (g1, g2) = (gram_of(&x1), gram_of(&x2));
        let merged =
            merge_updates("t", shape, &[&d1, &d2], &[&g1, &g2], &[1.0, 1.0], 1.0, 0.0).unwrap();
        for x in &x1 {
            close(&apply(&merged, shape, x), &apply(&d1, shape, x), 1e-5);
        }
        for x in &x2 {
            close(&apply(&merged, shape, x), &apply(&d2, shape, x), 1e-5);
        }
        // Hand-computed: the inputs span all four coordinates, so the merge takes expert 1's
        // first two columns and expert 2's last two.
        let expected = [1.0, -2.0, 0.5, 1.0, 0.0, 1.0, 1.0, -3.0];
        close(
            &merged.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
            &expected,
            1e-5,
        );
    }

    #[test]
    fn identical_inputs_give_the_weighted_mean() {
        let shape = (2, 3);
        let d1: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let d2: Vec<f32> = vec![-2.0, 0.0, 1.0, 1.0, -1.0, 0.0];
        let x = vec![
            vec![1.0, 0.2, -0.5],
            vec![0.3, 1.0, 0.1],
            vec![0.0, -0.4, 2.0],
        ];
        let g = gram_of(&x);
        for alpha in [1.0, 0.5, 0.0] {
            let merged =
                merge_updates("t", shape, &[&d1, &d2], &[&g, &g], &[3.0, 1.0], alpha, 0.0).unwrap();
            let mean: Vec<f64> = d1
                .iter()
                .zip(&d2)
                .map(|(&a, &b)| (3.0 * f64::from(a) + f64::from(b)) / 4.0)
                .collect();
            close(
                &merged.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
                &mean,
                1e-5,
            );
        }
    }

    /// The factor form times the experts' `B`s side by side is the full-space update.
    #[test]
    fn factors_reproduce_the_full_space_merge() {
        let (rows, cols) = (3, 4);
        let b1 = [1.0f32, 0.0, 0.5, -1.0, 2.0, 1.0]; // 3 × 2
        let a1 = [0.2f32, -0.1, 0.4, 1.0, 0.3, 0.3, -0.2, 0.5]; // 2 × 4
        let b2 = [0.7f32, -0.3, 1.1]; // 3 × 1
        let a2 = [1.0f32, 0.5, -0.5, 0.25]; // 1 × 4
        let product = |b: &[f32], a: &[f32], r: usize| -> Vec<f32> {
            (0..rows * cols)
                .map(|k| {
                    (0..r)
                        .map(|l| b[k / cols * r + l] * a[l * cols + k % cols])
                        .sum()
                })
                .collect()
        };
        let (d1, d2) = (product(&b1, &a1, 2), product(&b2, &a2, 1));
        let g1 = gram_of(&[vec![1.0, 0.0, 0.3, 0.0], vec![0.2, 1.0, 0.0, 0.5]]);
        let g2 = gram_of(&[vec![0.0, 1.0, 1.0, 0.0], vec![0.5, 0.0, 0.2, 1.0]]);
        let weights = [1.0, 0.5];
        let full = merge_updates(
            "t",
            (rows, cols),
            &[&d1, &d2],
            &[&g1, &g2],
            &weights,
            0.8,
            1e-3,
        )
        .unwrap();
        let a = merge_factors(
            "t",
            cols,
            &[(&a1, 2), (&a2, 1)],
            &[&g1, &g2],
            &weights,
            0.8,
            1e-3,
        )
        .unwrap();
        let b: Vec<f32> = (0..rows)
            .flat_map(|i| [b1[i * 2], b1[i * 2 + 1], b2[i]])
            .collect();
        let from_factors = product(&b, &a, 3);
        close(
            &from_factors
                .iter()
                .map(|&v| f64::from(v))
                .collect::<Vec<_>>(),
            &full.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
            1e-5,
        );
    }

    #[test]
    fn without_inputs_the_update_is_zero_and_bad_grams_are_errors() {
        let zero = Gram {
            dim: 2,
            values: vec![0.0; 4],
        };
        let out = merge_updates("t", (1, 2), &[&[1.0, 2.0]], &[&zero], &[1.0], 1.0, 0.0).unwrap();
        assert_eq!(out, vec![0.0, 0.0]);
        let g = Gram {
            dim: 3,
            values: vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        };
        let err = merge_updates("t", (1, 2), &[&[1.0, 2.0]], &[&g], &[1.0], 1.0, 0.0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("3×3") && err.contains("2 input features"),
            "{err}"
        );
        let id2 = Gram {
            dim: 2,
            values: vec![1.0, 0.0, 0.0, 1.0],
        };
        let err = merge_updates(
            "t",
            (1, 2),
            &[&[1.0, 2.0], &[0.0, 1.0]],
            &[&id2, &id2],
            &[1.0, -3.0],
            1.0,
            0.0,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("weights ≥ 0, found -3"), "{err}");
    }
}
