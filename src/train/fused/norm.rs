//! RMSNorm over rows, forward and backward: `y = x · r · w` with `r = (mean(x²) + eps)^-½`.

/// Normalises each row of `x` (`n` wide) into `y`, keeping each row's `r` in `rstd`.
pub(crate) fn forward(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    let n = w.len();
    for ((xr, yr), r) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)).zip(rstd) {
        let ss: f64 = xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let inv = (1.0 / ((ss / n as f64) as f32 + eps).sqrt() as f64) as f32;
        *r = inv;
        for ((y, &x), &w) in yr.iter_mut().zip(xr).zip(w) {
            *y = x * inv * w;
        }
    }
}

/// Adds the input gradient of [`forward`] for output gradient `dy` to `dx`, and the scale's
/// gradient to `dw` if given.
pub(crate) fn backward(
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    mut dw: Option<&mut [f32]>,
) {
    let n = w.len();
    for (((xr, dyr), dxr), &r) in x
        .chunks_exact(n)
        .zip(dy.chunks_exact(n))
        .zip(dx.chunks_exact_mut(n))
        .zip(rstd)
    {
        // dx = r·(dy·w) − x·r³·Σ(dy·w·x)/n.
        let dot: f32 = xr
            .iter()
            .zip(dyr)
            .zip(w)
            .map(|((&x, &g), &w)| g * w * x)
            .sum();
        let c = dot * r * r * r / n as f32;
        for (((dx, &x), &g), &w) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
            *dx += r * g * w - x * c;
        }
        if let Some(dw) = dw.as_deref_mut() {
            for ((dw, &x), &g) in dw.iter_mut().zip(xr).zip(dyr) {
                *dw += g * x * r;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_hand_computed_row_and_its_derivative() {
        // x = (3, 4), w = (1, 2), eps 0: r = 1/√12.5, y = (3r, 8r).
        let (x, w) = ([3f32, 4.0], [1f32, 2.0]);
        let (mut y, mut r) = ([0f32; 2], [0f32; 1]);
        forward(&x, &w, 0.0, &mut y, &mut r);
        let rms = 12.5f32.sqrt();
        assert!((y[0] - 3.0 / rms).abs() < 1e-6 && (y[1] - 8.0 / rms).abs() < 1e-6);
        // d(y0 + y1)/dx0 = 1/rms − 33/(2·rms³); d/dw = x·r.
        let (mut dx, mut dw) = ([0f32; 2], [0f32; 2]);
        backward(&x, &w, &r, &[1.0, 1.0], &mut dx, Some(&mut dw));
        let expected = 1.0 / rms - 33.0 / (2.0 * rms.powi(3));
        assert!((dx[0] - expected).abs() < 1e-6, "{} vs {expected}", dx[0]);
        assert!((dw[1] - 4.0 / rms).abs() < 1e-6);
    }
}
