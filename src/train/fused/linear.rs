//! A projection `y = x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ` over `n` rows, forward and backward. The LoRA
//! update is merged into the weight ([`Linear::w`] is `W + s·B·A`), so each direction is one
//! product; the factors enter only where their own gradients need them.

use super::matmul::{gemm, View};
use super::weights::Linear;

/// `y ← beta·y + x·(W + s·B·A)ᵀ + bias`, keeping `z = x·Aᵀ` (`[n, r]`) when B is trained.
pub(crate) fn forward(l: &Linear, n: usize, x: &[f32], beta: f32, y: &mut [f32], z: &mut [f32]) {
    apply(l, n, x, beta, y);
    if let Some(lora) = l.lora.as_ref().filter(|f| f.grad_b.is_some()) {
        let r = lora.r;
        gemm(
            n,
            l.inp,
            r,
            1.0,
            View::rows(x, l.inp),
            View::cols(&lora.a, l.inp),
            0.0,
            z,
            r,
        );
    }
}

/// `y ← beta·y + x·(W + s·B·A)ᵀ + bias`: the projection alone, as inference needs it.
pub(crate) fn apply(l: &Linear, n: usize, x: &[f32], beta: f32, y: &mut [f32]) {
    let (inp, out) = (l.inp, l.out);
    gemm(
        n,
        inp,
        out,
        1.0,
        View::rows(x, inp),
        View::cols(&l.w, inp),
        beta,
        y,
        out,
    );
    if let Some(bias) = &l.bias {
        for row in y[..n * out].chunks_exact_mut(out) {
            for (y, b) in row.iter_mut().zip(bias) {
                *y += b;
            }
        }
    }
}

/// The backward pass of [`forward`] for output gradient `dy`: `dx ← beta·dx + ∂/∂x` (skipped
/// when `dx` is `None`), and the gradients of the trained tensors added into `grads`. `dz` is
/// scratch of `[n, r]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    l: &Linear,
    n: usize,
    x: &[f32],
    z: &[f32],
    dy: &[f32],
    dx: Option<(&mut [f32], f32)>,
    dz: &mut [f32],
    grads: &mut [f32],
) {
    let (inp, out) = (l.inp, l.out);
    if let Some((dx, beta)) = dx {
        gemm(
            n,
            out,
            inp,
            1.0,
            View::rows(dy, out),
            View::rows(&l.w, inp),
            beta,
            dx,
            inp,
        );
    }
    if let Some(lora) = &l.lora {
        let r = lora.r;
        if let Some(at) = lora.grad_a {
            // dA = (s·dy·B)ᵀ·x.
            gemm(
                n,
                out,
                r,
                lora.scaling,
                View::rows(dy, out),
                View::rows(&lora.b, r),
                0.0,
                dz,
                r,
            );
            gemm(
                r,
                n,
                inp,
                1.0,
                View::cols(dz, r),
                View::rows(x, inp),
                1.0,
                &mut grads[at..at + r * inp],
                inp,
            );
        }
        if let Some(at) = lora.grad_b {
            // dB = s·dyᵀ·(x·Aᵀ).
            gemm(
                out,
                n,
                r,
                lora.scaling,
                View::cols(dy, out),
                View::rows(z, r),
                1.0,
                &mut grads[at..at + out * r],
                r,
            );
        }
    }
    if let Some(at) = l.grad_w {
        gemm(
            out,
            n,
            inp,
            1.0,
            View::cols(dy, out),
            View::rows(x, inp),
            1.0,
            &mut grads[at..at + out * inp],
            inp,
        );
    }
    if let Some(at) = l.grad_bias {
        let db = &mut grads[at..at + out];
        for row in dy[..n * out].chunks_exact(out) {
            for (d, g) in db.iter_mut().zip(row) {
                *d += g;
            }
        }
    }
}
