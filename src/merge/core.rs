//! Core space (DESIGN.md §5): LoRA updates merged through small matrices, never forming an
//! out×in matrix, and truncated SVD of a low-rank product.
//!
//! With `F_B` spanning the experts' stacked `s_t·B_t` (columns) and `F_A` their stacked `A_t`
//! (rows), expert t's update is `F_B·M_t·F_Aᵀ` exactly, with `M_t = (F_Bᵀ·s_t·B_t)·(A_t·F_A)`
//! of size at most `R × R`, `R = Σ r_t`. Any method runs on the `M_t` as on any tensor (the
//! base is zero there), and the merged core is factored by SVD. `F_B` and `F_A` are Parseval
//! frames (see `Frame`): `F·Fᵀ` projects onto the experts' span, so `Fᵀ` keeps the norms of
//! their updates and `F` maps the core back exactly.
//!
//! Everything is computed from the `R × R` Gram matrices of the stacked factors: the only
//! products with the module's own dimensions are the two Gram matrices and the two output
//! factors.

use faer::linalg::triangular_solve::solve_upper_triangular_in_place;
use faer::{Mat, MatRef, Par};

use super::caci;
use super::calibration::Gram;
use super::job::TensorJob;
use super::linalg::{
    cholesky, gram, row_major, significant, transposed_row_major, Svd, NEGLIGIBLE,
};
use super::method::{Confidence, ExpertParams, GlobalParams, Method};
use super::tensor_merge::merge_tensor;
use crate::error::{Error, Result};
use crate::recipe::RankTarget;

/// One expert's LoRA factors for one module, row-major: `b` is `rows × rank`, `a` is
/// `rank × cols`, and the update is `scale·B·A`.
#[derive(Debug, Clone, Copy)]
pub struct Factors<'a> {
    /// `B`, `rows × rank`.
    pub b: &'a [f32],
    /// `A`, `rank × cols`.
    pub a: &'a [f32],
    /// The rank.
    pub rank: usize,
    /// The update's scaling (`alpha / r`, or with rsLoRA `alpha / √r`).
    pub scale: f32,
}

/// A module's merge in core space, factored to a LoRA.
#[derive(Debug, Clone)]
pub struct CoreMerged {
    /// The merged factors, the singular values in `b` as PEFT puts them (scaling 1).
    pub factored: Truncated,
    /// The share of each expert's update the merge's subspaces keep, `‖U_kᵀ·M_t·V_k‖ / ‖M_t‖`
    /// (1 for an expert with no update).
    pub retained: Vec<f64>,
    /// For methods that elect signs: the share of core coordinates where kept entries disagree.
    pub sign_conflict: Option<f32>,
}

/// Factors truncated by SVD, with the share of the squared norm they leave out.
#[derive(Debug, Clone)]
pub struct Truncated {
    /// `A`, `rank × cols`.
    pub a: Vec<f32>,
    /// `B`, `rows × rank`.
    pub b: Vec<f32>,
    /// The rank kept.
    pub rank: usize,
    /// The share of the squared Frobenius norm that truncation discarded.
    pub discarded: f64,
}

/// One side's core-space coordinates: a Parseval frame `F = X·T` of the span of the stacked
/// factors `X` (`n × R`), given by the `R × K` matrix `T`, and `P = Fᵀ·F`, the projector onto
/// the coordinates that map back to something.
///
/// `F` is the polar factor (the nearest matrix with orthonormal rows in its span) of
/// `[U_1 … U_T]`, `U_t` the singular directions of expert t's update alone (see
/// [`expert_directions`]): one coordinate per direction of each expert. Coordinate-wise
/// methods (trim, sign vote) see these coordinates, so they matter: each expert's update stays
/// on its own coordinates as far as the experts' subspaces allow (a direction they share is
/// shared by their coordinates), and the frame is the same whatever order the experts come in.
/// A QR basis of the stack would follow the first expert and make the merge depend on the
/// recipe's order; the principal directions of the whole stack would spread every expert over
/// every coordinate, so that trimming cuts into each of them.
struct Frame {
    t: Mat<f64>,
    projector: Mat<f64>,
}

impl Frame {
    /// From the Gram matrix `G = Xᵀ·X` of the stack and, per expert, the `r_t × k_t` matrix
    /// `C_t` whose `X_t·C_t` are that expert's directions (orthonormal): the polar factor of
    /// `W = [X_1·C_1 … X_T·C_T]` is `W·(WᵀW)^(-1/2)` on W's range.
    fn polar(gram: &Mat<f64>, directions: &[Mat<f64>], tensor: &str) -> Result<Frame> {
        let width: usize = directions.iter().map(Mat::ncols).sum();
        let mut c = Mat::<f64>::zeros(gram.nrows(), width);
        let (mut row, mut column) = (0, 0);
        for block in directions {
            c.get_mut(row..row + block.nrows(), column..column + block.ncols())
                .copy_from(block);
            row += block.nrows();
            column += block.ncols();
        }
        let w_gram = c.transpose() * gram * &c;
        let (q, omega) = significant(w_gram.as_ref(), NEGLIGIBLE, tensor)?;
        let scaled = Mat::from_fn(q.nrows(), q.ncols(), |i, j| q[(i, j)] / omega[j].sqrt());
        Ok(Frame {
            t: &c * scaled * q.transpose(),
            projector: &q * q.transpose(),
        })
    }

    fn width(&self) -> usize {
        self.t.ncols()
    }
}

/// Per expert, the left and the right `C_t` of [`expert_directions`].
type Directions = (Vec<Mat<f64>>, Vec<Mat<f64>>);

/// Each expert's singular directions, from the Gram matrices of the stacks: for expert t with
/// `X_B,t = s_t·B_t` and `X_A,t = A_tᵀ`, the matrices `C_B,t` and `C_A,t` such that
/// `s_t·B_t·A_t = (X_B,t·C_B,t)·Σ_t·(X_A,t·C_A,t)ᵀ` is the update's SVD.
///
/// Singular directions of the update itself, not of `B_t` and `A_t` apart, so that the
/// coordinates do not depend on how a LoRA splits its update between its factors (`B·R`,
/// `R⁻¹·A` give the same merge), and an expert alone in its subspace has a diagonal core.
fn expert_directions(
    gram_b: &Mat<f64>,
    gram_a: &Mat<f64>,
    ranks: &[usize],
    tensor: &str,
) -> Result<Directions> {
    let mut left = Vec::with_capacity(ranks.len());
    let mut right = Vec::with_capacity(ranks.len());
    let mut offset = 0;
    for &r in ranks {
        let block = offset..offset + r;
        let (g_b, g_a) = (
            gram_b.get(block.clone(), block.clone()),
            gram_a.get(block.clone(), block),
        );
        let (c_b, c_a) = match (cholesky(g_b), cholesky(g_a)) {
            (Some(l_b), Some(l_a)) => {
                // X_B = Q_B·L_Bᵀ and X_A = Q_A·L_Aᵀ, so B·A = Q_B·K·Q_Aᵀ with K = L_Bᵀ·L_A;
                // K = P·Σ·Qᵀ gives U = Q_B·P = X_B·L_B⁻ᵀ·P, and V likewise.
                let svd = Svd::of(&(l_b.transpose() * &l_a), RankTarget::Energy(1.0), tensor)?;
                let kept = svd.nonzero();
                let mut c_b = svd.u.get(.., ..kept).to_owned();
                let mut c_a = svd.v.get(.., ..kept).to_owned();
                solve_upper_triangular_in_place(l_b.transpose(), c_b.as_mut(), Par::Seq);
                solve_upper_triangular_in_place(l_a.transpose(), c_a.as_mut(), Par::Seq);
                (c_b, c_a)
            }
            // Linearly dependent columns (an untrained B is zero): through eigenvectors, which
            // drop the directions the factors do not have.
            _ => {
                let (v_b, l_b) = significant(g_b, NEGLIGIBLE, tensor)?;
                let (v_a, l_a) = significant(g_a, NEGLIGIBLE, tensor)?;
                let s_b: Vec<f64> = l_b.iter().map(|l| l.sqrt()).collect();
                let s_a: Vec<f64> = l_a.iter().map(|l| l.sqrt()).collect();
                // X_B = U_B·S_B·V_Bᵀ, X_A = U_A·S_A·V_Aᵀ: B·A = U_B·K·U_Aᵀ with
                // K = S_B·V_Bᵀ·V_A·S_A; K = P·Σ·Qᵀ gives U = X_B·V_B·S_B⁻¹·P.
                let inner = v_b.transpose() * &v_a;
                let k = Mat::from_fn(s_b.len(), s_a.len(), |i, j| s_b[i] * inner[(i, j)] * s_a[j]);
                let svd = Svd::of(&k, RankTarget::Energy(1.0), tensor)?;
                let kept = svd.nonzero();
                let scale = |v: &Mat<f64>, s: &[f64], w: MatRef<'_, f64>| {
                    Mat::from_fn(r, kept, |i, j| {
                        (0..s.len()).map(|m| v[(i, m)] / s[m] * w[(m, j)]).sum()
                    })
                };
                (
                    scale(&v_b, &s_b, svd.u.as_ref()),
                    scale(&v_a, &s_a, svd.v.as_ref()),
                )
            }
        };
        left.push(c_b);
        right.push(c_a);
        offset += r;
    }
    Ok((left, right))
}

/// The products of a core-space merge whose sizes are the module's own dimensions: the two
/// Gram matrices and the two output factors. The CPU computes them with faer; a GPU with
/// cuBLAS (`CudaKernels` in device.rs).
pub trait Products: Sync {
    /// `Xᵀ·X`.
    fn gram(&self, x: &Mat<f64>) -> Result<Mat<f64>>;
    /// `X·Y`.
    fn product(&self, x: &Mat<f64>, y: &Mat<f64>) -> Result<Mat<f64>>;
}

/// [`Products`] on the CPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuProducts;

impl Products for CpuProducts {
    fn gram(&self, x: &Mat<f64>) -> Result<Mat<f64>> {
        Ok(gram(x))
    }

    fn product(&self, x: &Mat<f64>, y: &Mat<f64>) -> Result<Mat<f64>> {
        Ok(x * y)
    }
}

/// Runs `method` on the core-space matrices of one module's experts and factors the result
/// at `target`. `name` keys the random masks and names errors; `params` and `expert_ids` are
/// one per expert, as for [`merge_tensor`].
#[allow(clippy::too_many_arguments)]
pub fn merge_in_core(
    name: &str,
    rows: usize,
    cols: usize,
    experts: &[Factors<'_>],
    method: Method,
    globals: &GlobalParams,
    params: Vec<ExpertParams>,
    expert_ids: Vec<usize>,
    target: RankTarget,
) -> Result<CoreMerged> {
    let shape = (rows, cols);
    merge_in_core_with(
        &CpuProducts,
        name,
        shape,
        experts,
        method,
        globals,
        params,
        expert_ids,
        target,
        None,
    )
}

/// [`merge_in_core`] with the module-sized products computed by `products`; `input_grams`, one
/// per expert, for activation-aware CACI.
#[allow(clippy::too_many_arguments)]
pub fn merge_in_core_with(
    products: &dyn Products,
    name: &str,
    (rows, cols): (usize, usize),
    experts: &[Factors<'_>],
    method: Method,
    globals: &GlobalParams,
    params: Vec<ExpertParams>,
    expert_ids: Vec<usize>,
    target: RankTarget,
    input_grams: Option<&[Gram]>,
) -> Result<CoreMerged> {
    for (t, f) in experts.iter().enumerate() {
        if f.b.len() != rows * f.rank || f.a.len() != f.rank * cols {
            return Err(Error::Parameter {
                name: "factors".to_string(),
                tensor: name.to_string(),
                message: format!(
                    "expert {t}: B has {} values and A {}, expected {rows}×{r} and {r}×{cols}",
                    f.b.len(),
                    f.a.len(),
                    r = f.rank
                ),
            });
        }
    }
    let ranks: Vec<usize> = experts.iter().map(|f| f.rank).collect();
    let r: usize = ranks.iter().sum();
    // The stacks, both `n × R`: the scaled B's side by side, and the A's transposed.
    let mut b_stack = Mat::<f64>::zeros(rows, r);
    let mut a_stack_t = Mat::<f64>::zeros(cols, r);
    let mut offset = 0;
    for f in experts {
        let s = f64::from(f.scale);
        for j in 0..f.rank {
            let column = b_stack.col_mut(offset + j);
            for (i, v) in column.iter_mut().enumerate() {
                *v = s * f64::from(f.b[i * f.rank + j]);
            }
            let column = a_stack_t.col_mut(offset + j);
            let row = &f.a[j * cols..(j + 1) * cols];
            for (v, a) in column.iter_mut().zip(row) {
                *v = f64::from(*a);
            }
        }
        offset += f.rank;
    }
    let gram_b = products.gram(&b_stack)?;
    let gram_a = products.gram(&a_stack_t)?;
    let (left, right) = expert_directions(&gram_b, &gram_a, &ranks, name)?;
    let frame_b = Frame::polar(&gram_b, &left, name)?;
    let frame_a = Frame::polar(&gram_a, &right, name)?;
    let (core_rows, core_cols) = (frame_b.width(), frame_a.width());
    if core_rows == 0 || core_cols == 0 {
        // Every update is zero (untrained adapters): a zero LoRA of rank 1.
        return Ok(CoreMerged {
            factored: Truncated {
                a: vec![0.0; cols],
                b: vec![0.0; rows],
                rank: 1,
                discarded: 0.0,
            },
            retained: vec![1.0; experts.len()],
            sign_conflict: None,
        });
    }

    // M_t = (F_Bᵀ·X_B,t)·(X_A,tᵀ·F_A) = (T_Bᵀ·G_B[:, t])·(G_A[t, :]·T_A).
    let mut cores = Vec::with_capacity(experts.len());
    let mut offset = 0;
    for f in experts {
        let block = offset..offset + f.rank;
        let left = frame_b.t.transpose() * gram_b.get(.., block.clone());
        let right = gram_a.get(block, ..) * &frame_a.t;
        let m = left * right;
        cores.push(
            (0..core_rows)
                .flat_map(|i| (0..core_cols).map(move |j| (i, j)))
                .map(|(i, j)| m[(i, j)] as f32)
                .collect::<Vec<f32>>(),
        );
        offset += f.rank;
    }

    let zeros = vec![0f32; core_rows * core_cols];
    let activation = method == Method::Caci && globals.confidence == Confidence::Activation;
    let merged = match input_grams.filter(|_| activation) {
        Some(grams) => {
            let scales = core_input_scales(&a_stack_t, &frame_a.t, grams);
            caci::merge(name, &zeros, cores.clone(), &params, globals, Some(&scales))?
        }
        None => merge_tensor(
            method,
            globals,
            TensorJob {
                name,
                shape: &[core_rows, core_cols],
                base: Some(&zeros),
                experts: cores.clone(),
                params,
                expert_ids,
            },
        )?,
    };
    let core = Mat::<f64>::from_fn(core_rows, core_cols, |i, j| {
        f64::from(merged.values[i * core_cols + j])
    });
    // What the frames cannot map back is dropped before factoring, so that the SVD of the
    // core is the SVD of the merged update.
    let core = &frame_b.projector * core * &frame_a.projector;
    let svd = Svd::of(&core, target, name)?;
    // B = F_B·U_k·S_k = X_B·(T_B·U_k·S_k); A = (F_A·V_k)ᵀ = (X_A·T_A·V_k)ᵀ.
    let k = svd.k;
    let b_out = products.product(&b_stack, &(&frame_b.t * svd.u.get(.., ..k) * svd.s_k()))?;
    let a_out = products.product(&a_stack_t, &(&frame_a.t * svd.v.get(.., ..k)))?;
    let retained = cores
        .iter()
        .map(|m| {
            let m =
                Mat::<f64>::from_fn(core_rows, core_cols, |i, j| f64::from(m[i * core_cols + j]));
            let projected = svd.u.get(.., ..k).transpose() * &m * svd.v.get(.., ..k);
            let (kept, all) = (projected.norm_l2(), m.norm_l2());
            if all > 0.0 {
                kept / all
            } else {
                1.0
            }
        })
        .collect();
    Ok(CoreMerged {
        factored: Truncated {
            a: transposed_row_major(&a_out),
            b: row_major(&b_out),
            rank: k,
            discarded: svd.discarded,
        },
        retained,
        sign_conflict: merged.stats.sign_conflict,
    })
}

/// Per expert, the RMS of its inputs along each core column's input direction: with the
/// frame's directions `F_A = X_A·T_A` (`X_A` the stacked `A`s transposed), `σ_t[l]² =
/// f_lᵀ·G_t·f_l`, the diagonal of `T_Aᵀ·(X_Aᵀ·G_t·X_A)·T_A` (never an in × in product beyond
/// `G_t·X_A`).
fn core_input_scales(a_stack_t: &Mat<f64>, t_a: &Mat<f64>, grams: &[Gram]) -> Vec<Vec<f32>> {
    grams
        .iter()
        .map(|g| {
            let projected = a_stack_t.transpose() * (g.matrix() * a_stack_t);
            let energies = t_a.transpose() * projected * t_a;
            (0..energies.nrows())
                .map(|l| energies[(l, l)].max(0.0).sqrt() as f32)
                .collect()
        })
        .collect()
}

/// Truncates the update `B·A` (`b` is `rows × r`, `a` is `r × cols`, row-major) to `target`
/// without forming the `rows × cols` matrix: with `B = Q_B·R_B` and `Aᵀ = Q_A·R_A`,
/// `B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ`, so the SVD of the small core `R_B·R_Aᵀ = U·S·Vᵀ` gives
/// `B·A = (Q_B·U)·S·(Q_A·V)ᵀ`. As PEFT does, the singular values go into `B`.
pub fn truncate(
    a: &[f32],
    b: &[f32],
    r: usize,
    cols: usize,
    rows: usize,
    target: RankTarget,
    tensor: &str,
) -> Result<Truncated> {
    let b_mat = Mat::<f64>::from_fn(rows, r, |i, j| f64::from(b[i * r + j]));
    let a_t = Mat::<f64>::from_fn(cols, r, |i, j| f64::from(a[j * cols + i]));
    let (qr_b, qr_a) = (b_mat.qr(), a_t.qr());
    let core = qr_b.thin_R() * qr_a.thin_R().transpose();
    let svd = Svd::of(&core, target, tensor)?;
    let k = svd.k;
    let b_out = qr_b.compute_thin_Q() * svd.u.get(.., ..k) * svd.s_k();
    let a_out = qr_a.compute_thin_Q() * svd.v.get(.., ..k);
    Ok(Truncated {
        a: transposed_row_major(&a_out),
        b: row_major(&b_out),
        rank: k,
        discarded: svd.discarded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `scale·B·A` as a dense row-major matrix.
    fn dense(f: &Factors<'_>, rows: usize, cols: usize) -> Vec<f64> {
        let mut out = vec![0f64; rows * cols];
        for i in 0..rows {
            for k in 0..f.rank {
                let b = f64::from(f.scale) * f64::from(f.b[i * f.rank + k]);
                for j in 0..cols {
                    out[i * cols + j] += b * f64::from(f.a[k * cols + j]);
                }
            }
        }
        out
    }

    fn product(t: &Truncated, rows: usize, cols: usize) -> Vec<f64> {
        dense(
            &Factors {
                b: &t.b,
                a: &t.a,
                rank: t.rank,
                scale: 1.0,
            },
            rows,
            cols,
        )
    }

    #[test]
    fn task_arithmetic_in_core_space_is_the_weighted_sum() {
        // Two experts of ranks 1 and 2 on a 3×4 module, hand-picked values.
        let (rows, cols) = (3, 4);
        let b1 = [1.0, -2.0, 0.5];
        let a1 = [0.5, 0.0, -1.0, 2.0];
        let b2 = [1.0, 0.0, 0.0, 1.0, 2.0, -1.0];
        let a2 = [0.0, 1.0, 1.0, 0.0, 3.0, 0.0, 0.0, -1.0];
        let experts = [
            Factors {
                b: &b1,
                a: &a1,
                rank: 1,
                scale: 2.0,
            },
            Factors {
                b: &b2,
                a: &a2,
                rank: 2,
                scale: 0.5,
            },
        ];
        let method = Method::TaskArithmetic;
        let mut globals = method.default_globals();
        globals.lambda = 0.5;
        let params = expert_params(&[0.75, -1.0], 1.0);
        let merged = merge_in_core(
            "m.weight",
            rows,
            cols,
            &experts,
            method,
            &globals,
            params,
            vec![0, 1],
            RankTarget::Fixed(3),
        )
        .unwrap();
        let (d1, d2) = (
            dense(&experts[0], rows, cols),
            dense(&experts[1], rows, cols),
        );
        let got = product(&merged.factored, rows, cols);
        for i in 0..rows * cols {
            let want = 0.5 * (0.75 * d1[i] - d2[i]);
            assert!((got[i] - want).abs() < 1e-5, "{i}: {} vs {want}", got[i]);
        }
        assert!(merged.factored.discarded < 1e-9);
        // Full rank keeps all of each update.
        for kept in &merged.retained {
            assert!((kept - 1.0).abs() < 1e-6, "{kept}");
        }
    }

    #[test]
    fn caci_restore_in_core_space_gives_each_expert_its_share_of_the_full_update() {
        // Restore solves for the shares in core coordinates; the frame keeps inner products,
        // so the factored merge's shares of each dense update ⟨Δ, Δ_t⟩ / ‖Δ_t‖² are τ·w_t.
        let (rows, cols, rank) = (12, 10, 3);
        let data = random_factors(3, (rows, cols, rank), 30);
        let experts: Vec<Factors<'_>> = data
            .iter()
            .map(|(b, a)| Factors {
                b,
                a,
                rank,
                scale: 1.5,
            })
            .collect();
        let method = Method::Caci;
        let mut globals = method.default_globals();
        globals.restore = Some(0.8);
        let weights = [1.0, 0.5, 1.25];
        let merged = merge_in_core(
            "m.weight",
            rows,
            cols,
            &experts,
            method,
            &globals,
            expert_params(&weights, 0.5),
            vec![0, 1, 2],
            RankTarget::Fixed(3 * rank),
        )
        .unwrap();
        let got = product(&merged.factored, rows, cols);
        for (f, w) in experts.iter().zip(weights) {
            let d = dense(f, rows, cols);
            let share = got.iter().zip(&d).map(|(g, d)| g * d).sum::<f64>()
                / d.iter().map(|d| d * d).sum::<f64>();
            assert!(
                (share - 0.8 * f64::from(w)).abs() < 1e-4,
                "{share} vs {}",
                0.8 * w
            );
        }
    }

    /// [`merge_in_core`] with the method's default globals, on a module named `m.weight`.
    fn merge_defaults(
        rows: usize,
        cols: usize,
        experts: &[Factors<'_>],
        method: Method,
        params: Vec<ExpertParams>,
        ids: Vec<usize>,
        target: RankTarget,
    ) -> Result<CoreMerged> {
        let globals = method.default_globals();
        merge_in_core(
            "m.weight", rows, cols, experts, method, &globals, params, ids, target,
        )
    }

    /// One parameter set per weight, all with `density`.
    fn expert_params(weights: &[f32], density: f32) -> Vec<ExpertParams> {
        weights
            .iter()
            .map(|&weight| ExpertParams {
                weight,
                density,
                gamma: 0.0,
                epsilon: 0.0,
            })
            .collect()
    }

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let rng = crate::merge::rng::MaskRng::new(seed, "core-test", 0);
        (0..n as u64).map(|i| 2.0 * rng.uniform(i) - 1.0).collect()
    }

    /// `count` experts' `(B, A)` of one `rows × cols` module at `rank`, drawn from `seed` on.
    fn random_factors(
        count: u64,
        (rows, cols, rank): (usize, usize, usize),
        seed: u64,
    ) -> Vec<(Vec<f32>, Vec<f32>)> {
        (0..count)
            .map(|t| {
                (
                    values(rows * rank, seed + t),
                    values(rank * cols, seed + 10 + t),
                )
            })
            .collect()
    }

    #[test]
    fn coordinate_wise_methods_do_not_depend_on_the_experts_order() {
        // TIES trims and votes per core coordinate: with principal bases the coordinates are
        // the same whatever order the experts come in.
        let (rows, cols, rank) = (12, 10, 3);
        let data = random_factors(3, (rows, cols, rank), 10);
        let merge = |order: &[usize]| {
            let experts: Vec<Factors<'_>> = order
                .iter()
                .map(|&t| Factors {
                    b: &data[t].0,
                    a: &data[t].1,
                    rank,
                    scale: 1.0 + t as f32,
                })
                .collect();
            let params = expert_params(&vec![1.0; order.len()], 0.4);
            let merged = merge_defaults(
                rows,
                cols,
                &experts,
                Method::Ties,
                params,
                order.to_vec(),
                RankTarget::Fixed(9),
            )
            .unwrap();
            product(&merged.factored, rows, cols)
        };
        let forward = merge(&[0, 1, 2]);
        let largest = forward.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(largest > 0.1);
        for order in [[2, 1, 0], [1, 2, 0]] {
            let other = merge(&order);
            for (a, b) in forward.iter().zip(&other) {
                assert!((a - b).abs() < 1e-5 * largest, "{order:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn coordinates_do_not_depend_on_how_a_lora_splits_its_update() {
        // B·R and R⁻¹·A give the same update, so they must give the same merge.
        let (rows, cols, rank) = (9, 8, 2);
        let b0 = values(rows * rank, 1);
        let a0 = values(rank * cols, 2);
        let b1 = values(rows * rank, 3);
        let a1 = values(rank * cols, 4);
        // R = [[2, 1], [0, 0.5]], R⁻¹ = [[0.5, -1], [0, 2]].
        let b1r: Vec<f32> = b1
            .chunks(2)
            .flat_map(|row| [2.0 * row[0], row[0] + 0.5 * row[1]])
            .collect();
        let a1r: Vec<f32> = (0..cols)
            .map(|j| 0.5 * a1[j] - a1[cols + j])
            .chain((0..cols).map(|j| 2.0 * a1[cols + j]))
            .collect();
        let merge = |b: &[f32], a: &[f32]| {
            let experts = [
                Factors {
                    b: &b0,
                    a: &a0,
                    rank,
                    scale: 1.0,
                },
                Factors {
                    b,
                    a,
                    rank,
                    scale: 1.0,
                },
            ];
            let params = expert_params(&[1.0; 2], 0.5);
            let merged = merge_defaults(
                rows,
                cols,
                &experts,
                Method::Ties,
                params,
                vec![0, 1],
                RankTarget::Fixed(4),
            )
            .unwrap();
            product(&merged.factored, rows, cols)
        };
        let (plain, split) = (merge(&b1, &a1), merge(&b1r, &a1r));
        let largest = plain.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (x, y) in plain.iter().zip(&split) {
            assert!((x - y).abs() < 1e-5 * largest, "{x} vs {y}");
        }
    }

    #[test]
    fn untrained_and_rank_deficient_experts_merge() {
        // An untrained LoRA (B = 0) and one whose two rank components are the same direction:
        // task arithmetic still gives the exact sum.
        let (rows, cols, rank) = (7, 6, 2);
        let zero_b = vec![0f32; rows * rank];
        let a0 = values(rank * cols, 5);
        let column = values(rows, 6);
        let twin_b: Vec<f32> = column.iter().flat_map(|&v| [v, 2.0 * v]).collect();
        let a1 = values(rank * cols, 7);
        let experts = [
            Factors {
                b: &zero_b,
                a: &a0,
                rank,
                scale: 1.0,
            },
            Factors {
                b: &twin_b,
                a: &a1,
                rank,
                scale: 0.5,
            },
        ];
        let params = expert_params(&[1.0; 2], 1.0);
        let method = Method::TaskArithmetic;
        let merged = merge_defaults(
            rows,
            cols,
            &experts,
            method,
            params,
            vec![0, 1],
            RankTarget::Fixed(4),
        )
        .unwrap();
        let want = dense(&experts[1], rows, cols);
        let got = product(&merged.factored, rows, cols);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        assert_eq!(merged.factored.rank, 1, "the sum has rank 1");
        assert!(merged.retained.iter().all(|r| (r - 1.0).abs() < 1e-9));

        // Nothing but untrained experts: a zero LoRA of rank 1.
        let zeros = [experts[0], experts[0]];
        let params = expert_params(&[1.0; 2], 1.0);
        let merged = merge_defaults(
            rows,
            cols,
            &zeros,
            method,
            params,
            vec![0, 1],
            RankTarget::Fixed(4),
        )
        .unwrap();
        assert_eq!(merged.factored.rank, 1);
        assert!(merged.factored.b.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn truncation_keeps_the_largest_singular_direction() {
        // diag(3, 1) as B·A with B = I, A = diag(3, 1): rank 1 keeps 9 of 10 of the energy.
        let b = [1.0, 0.0, 0.0, 1.0];
        let a = [3.0, 0.0, 0.0, 1.0];
        let t = truncate(&a, &b, 2, 2, 2, RankTarget::Fixed(1), "m").unwrap();
        assert_eq!(t.rank, 1);
        assert!((t.discarded - 0.1).abs() < 1e-9);
        let got = product(&t, 2, 2);
        let want = [3.0, 0.0, 0.0, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6);
        }
        let energy = truncate(&a, &b, 2, 2, 2, RankTarget::Energy(0.95), "m").unwrap();
        assert_eq!(energy.rank, 2);
    }

    #[test]
    fn mismatched_factors_are_an_error() {
        let b = [1.0, 2.0];
        let a = [1.0, 2.0, 3.0];
        let method = Method::TaskArithmetic;
        let err = merge_in_core(
            "layers.0.q_proj.weight",
            2,
            2,
            &[Factors {
                b: &b,
                a: &a,
                rank: 1,
                scale: 1.0,
            }],
            method,
            &method.default_globals(),
            vec![],
            vec![0],
            RankTarget::Fixed(1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("layers.0.q_proj.weight"), "{err}");
    }
}
