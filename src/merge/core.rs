//! Core space (DESIGN.md §5): LoRA updates merged through small matrices, never forming an
//! out×in matrix, and truncated SVD of a low-rank product.
//!
//! With `Q_B` an orthonormal basis of the experts' stacked `s_t·B_t` (columns) and `Q_A` of
//! their stacked `A_t` (rows), expert t's update is `Q_B·M_t·Q_Aᵀ` exactly, with
//! `M_t = (Q_Bᵀ·s_t·B_t)·(A_t·Q_A)` of size at most `R × R`, `R = Σ r_t`. Any method runs on
//! the `M_t` as on any tensor (the base is zero there), and the merged core is factored by SVD.
//! The bases are the principal directions of the stacked factors (see [`principal_basis`]).
//! Both bases are orthonormal, so norms in core space are the norms of the full updates.

use faer::Mat;

use super::method::{merge_tensor, ExpertParams, GlobalParams, Method, TensorJob};
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
    /// The kept singular vectors of the core, left (`core rows × rank`) and right.
    left: Mat<f64>,
    right: Mat<f64>,
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
    let r: usize = experts.iter().map(|f| f.rank).sum();
    let mut b_stack = Mat::<f64>::zeros(rows, r);
    let mut a_stack_t = Mat::<f64>::zeros(cols, r);
    let mut offset = 0;
    for f in experts {
        let s = f64::from(f.scale);
        for i in 0..rows {
            for j in 0..f.rank {
                b_stack[(i, offset + j)] = s * f64::from(f.b[i * f.rank + j]);
            }
        }
        for j in 0..f.rank {
            for i in 0..cols {
                a_stack_t[(i, offset + j)] = f64::from(f.a[j * cols + i]);
            }
        }
        offset += f.rank;
    }
    let q_b = principal_basis(&b_stack, name)?;
    let q_a = principal_basis(&a_stack_t, name)?;
    let (core_rows, core_cols) = (q_b.ncols(), q_a.ncols());
    let mut cores = Vec::with_capacity(experts.len());
    let mut offset = 0;
    for f in experts {
        let p = q_b.transpose() * b_stack.get(.., offset..offset + f.rank);
        let n = a_stack_t.get(.., offset..offset + f.rank).transpose() * &q_a;
        let m = &p * &n;
        cores.push(
            (0..core_rows)
                .flat_map(|i| (0..core_cols).map(move |j| (i, j)))
                .map(|(i, j)| m[(i, j)] as f32)
                .collect::<Vec<f32>>(),
        );
        offset += f.rank;
    }

    let zeros = vec![0f32; core_rows * core_cols];
    let merged = merge_tensor(
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
    )?;
    let core = Mat::<f64>::from_fn(core_rows, core_cols, |i, j| {
        f64::from(merged.values[i * core_cols + j])
    });
    let factored = factor(&q_b, &core, &q_a, target, name)?;
    let retained = cores
        .iter()
        .map(|m| {
            let m =
                Mat::<f64>::from_fn(core_rows, core_cols, |i, j| f64::from(m[i * core_cols + j]));
            let projected = factored.left.transpose() * &m * &factored.right;
            let (kept, all) = (projected.norm_l2(), m.norm_l2());
            if all > 0.0 {
                kept / all
            } else {
                1.0
            }
        })
        .collect();
    Ok(CoreMerged {
        factored,
        retained,
        sign_conflict: merged.stats.sign_conflict,
    })
}

/// An orthonormal basis of the column span of `m`: its left singular vectors, largest first,
/// without the directions of (numerically) zero singular value.
///
/// Any orthonormal basis makes the core exact, but coordinate-wise methods (trim, sign vote)
/// see the coordinates: singular vectors are the same whatever the experts' order (up to a
/// sign per direction, which flips that coordinate for every expert at once), and a direction
/// several experts share is one coordinate where their updates meet. A QR basis would follow
/// the first expert's columns and make the merge depend on the recipe's order.
fn principal_basis(m: &Mat<f64>, tensor: &str) -> Result<Mat<f64>> {
    let svd = m.thin_svd().map_err(|e| Error::Parameter {
        name: "factors".to_string(),
        tensor: tensor.to_string(),
        message: format!("the SVD of the stacked LoRA factors did not converge: {e:?}"),
    })?;
    let s = svd.S().column_vector();
    let largest = if s.nrows() > 0 { s[0] } else { 0.0 };
    let keep = (0..s.nrows())
        .take_while(|&i| s[i] > largest * 1e-10)
        .count()
        .max(1);
    Ok(svd.U().get(.., ..keep).to_owned())
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
    factor(
        &qr_b.compute_thin_Q(),
        &core,
        &qr_a.compute_thin_Q(),
        target,
        tensor,
    )
}

/// Factors `Q_B·C·Q_Aᵀ` (orthonormal `Q_B`, `Q_A`; small core `C`) at a rank target through the
/// SVD `C = U·S·Vᵀ`: `B = Q_B·U_k·S_k` (the singular values in `B`, as PEFT does) and
/// `A = (Q_A·V_k)ᵀ`.
fn factor(
    q_b: &Mat<f64>,
    core: &Mat<f64>,
    q_a: &Mat<f64>,
    target: RankTarget,
    tensor: &str,
) -> Result<Truncated> {
    let svd = core.thin_svd().map_err(|e| Error::Parameter {
        name: "rank".to_string(),
        tensor: tensor.to_string(),
        message: format!("the SVD of the merged update did not converge: {e:?}"),
    })?;
    let s = svd.S().column_vector();
    let energies: Vec<f64> = (0..s.nrows()).map(|i| s[i] * s[i]).collect();
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
    let left = q_b * svd.U().get(.., ..k);
    let right = q_a * svd.V().get(.., ..k);
    let (rows, cols) = (left.nrows(), right.nrows());
    let b_out: Vec<f32> = (0..rows)
        .flat_map(|i| (0..k).map(move |j| (i, j)))
        .map(|(i, j)| (left[(i, j)] * s[j]) as f32)
        .collect();
    let a_out: Vec<f32> = (0..k)
        .flat_map(|i| (0..cols).map(move |j| (i, j)))
        .map(|(i, j)| right[(j, i)] as f32)
        .collect();
    Ok(Truncated {
        a: a_out,
        b: b_out,
        rank: k,
        discarded: if total > 0.0 { 1.0 - kept / total } else { 0.0 },
        left: svd.U().get(.., ..k).to_owned(),
        right: svd.V().get(.., ..k).to_owned(),
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
        let params = [0.75f32, -1.0]
            .iter()
            .map(|&weight| ExpertParams {
                weight,
                density: 1.0,
                gamma: 0.0,
                epsilon: 0.0,
            })
            .collect();
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

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let rng = crate::merge::rng::MaskRng::new(seed, "core-test", 0);
        (0..n as u64).map(|i| 2.0 * rng.uniform(i) - 1.0).collect()
    }

    #[test]
    fn coordinate_wise_methods_do_not_depend_on_the_experts_order() {
        // TIES trims and votes per core coordinate: with principal bases the coordinates are
        // the same whatever order the experts come in.
        let (rows, cols, rank) = (12, 10, 3);
        let data: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
            .map(|t| (values(rows * rank, 10 + t), values(rank * cols, 20 + t)))
            .collect();
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
            let params = order
                .iter()
                .map(|_| ExpertParams {
                    weight: 1.0,
                    density: 0.4,
                    gamma: 0.0,
                    epsilon: 0.0,
                })
                .collect();
            let merged = merge_in_core(
                "m.weight",
                rows,
                cols,
                &experts,
                Method::Ties,
                &Method::Ties.default_globals(),
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
