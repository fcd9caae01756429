//! Row-major matrix products over slices, through `matrixmultiply`'s single-threaded `sgemm`
//! (threads go across examples, not inside a product). Transposes are strides, never copies.

/// A matrix read from a slice: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// Rows of `data` `ld` apart, columns adjacent.
    pub(crate) fn rows(data: &'a [f32], ld: usize) -> Self {
        View {
            data,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose of [`View::rows`]`(data, ld)`.
    pub(crate) fn cols(data: &'a [f32], ld: usize) -> Self {
        View {
            data,
            rs: 1,
            cs: ld,
        }
    }

    /// Whether an `m × n` matrix fits in the slice.
    fn fits(&self, m: usize, n: usize) -> bool {
        m == 0 || n == 0 || (m - 1) * self.rs + (n - 1) * self.cs < self.data.len()
    }
}

/// `c ← alpha · a · b + beta · c` for `a` `m × k`, `b` `k × n` and `c` `m × n` with rows `ldc`
/// apart. With `beta` 0, `c` is overwritten (its old values, even NaN, are not read).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: View<'_>,
    b: View<'_>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Out-of-bounds strides would make `sgemm` read or write outside the slices.
    assert!(a.fits(m, k) && b.fits(k, n), "gemm operands too short");
    assert!(
        ldc >= n && (m - 1) * ldc + n <= c.len(),
        "gemm output too short"
    );
    // SAFETY: the asserts above keep every element `sgemm` touches inside the three slices;
    // `c` is borrowed mutably, so it aliases neither `a` nor `b`, and `ldc ≥ n` keeps its
    // elements distinct.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_with_transposes_and_strides() {
        // a = [[1, 2], [3, 4]], b = [[5, 6], [7, 8]].
        let a = [1f32, 2.0, 3.0, 4.0];
        let b = [5f32, 6.0, 7.0, 8.0];
        let mut c = [f32::NAN; 4];
        gemm(
            2,
            2,
            2,
            1.0,
            View::rows(&a, 2),
            View::rows(&b, 2),
            0.0,
            &mut c,
            2,
        );
        assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
        // aᵀ·bᵀ = (b·a)ᵀ: b·a = [[23, 34], [31, 46]].
        gemm(
            2,
            2,
            2,
            1.0,
            View::cols(&a, 2),
            View::cols(&b, 2),
            0.0,
            &mut c,
            2,
        );
        assert_eq!(c, [23.0, 31.0, 34.0, 46.0]);
        // Accumulate 2·a·b into the right column of a 2 × 3 output.
        let mut wide = [1f32; 6];
        gemm(
            2,
            2,
            1,
            2.0,
            View::rows(&a, 2),
            View::rows(&b[1..], 2),
            1.0,
            &mut wide[2..],
            3,
        );
        assert_eq!(wide, [1.0, 1.0, 45.0, 1.0, 1.0, 101.0]);
    }
}
