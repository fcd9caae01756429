//! In-place sparsification of one expert's delta (the "trim" step of TIES, DARE,
//! breadcrumbs and DELLA), with mergekit 0.1.5's arithmetic (`mergekit/sparsify.py`).
//!
//! Every function works on a flat `&mut [f32]` and zeroes what it drops. Where mergekit's
//! order among equal magnitudes is left to an unstable sort, ours is fixed: a larger
//! `|v|` ranks first, then a lower flat index. Selections are a radix select over the
//! bits of the magnitudes (a few linear passes, no copy), never a sort; only DELLA
//! sorts, one row at a time, because it needs every rank.
//!
//! Counts such as `floor(density · numel)` are computed from the decimal value of the
//! `f32` parameter (see [`keep_count`]) so that they agree with mergekit, whose
//! parameters are Python floats: `0.7_f32` is `0.69999998…`, which would keep 6 of 10
//! elements where mergekit keeps 7.

use crate::error::{Error, Result};
use crate::merge::rng::MaskRng;

/// `floor(fraction · numel)`, with `fraction` read as the shortest decimal that rounds to
/// it (what the user wrote in the recipe) and the product taken in `f64` like Python's
/// `int(fraction * numel)`. Negative or NaN fractions give 0.
pub fn keep_count(fraction: f32, numel: usize) -> usize {
    // `as` saturates: negative and NaN products become 0.
    (decimal(fraction) * numel as f64).floor() as usize
}

/// The `f64` nearest to the shortest decimal representation of `x`.
fn decimal(x: f32) -> f64 {
    // `Display` for f32 prints the shortest string that round-trips, so this recovers
    // `0.7` from `0.7_f32`; the fallback never triggers for a value Display printed.
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// The top-`r` set under the order (larger `|v|` first, then lower index): every element
/// with `|v|` above `threshold`, plus the first `ties` elements (by index) equal to it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cut {
    threshold: f32,
    /// How many elements equal to the threshold are in the set (the first ones by index).
    pub(crate) ties: usize,
    /// How many elements equal the threshold in all; when every one of them is kept, the
    /// cut needs no running count and is a plain comparison.
    pub(crate) equal: usize,
}

/// A radix select in progress: the digits already fixed and the rank still sought. Several
/// searches can advance in step over the same pass of the data.
pub(crate) struct RadixSearch {
    prefix: u32,
    prefix_mask: u32,
    remaining: usize,
    above: usize,
    equal: usize,
    r: usize,
    step: usize,
}

/// (shift, width) of the three digits, most significant first; 31 bits in all, the sign is
/// cleared.
const DIGITS: [(u32, u32); 3] = [(21, 10), (10, 11), (0, 10)];

impl RadixSearch {
    /// Starts a search for the `r`-th largest magnitude (1 ≤ r ≤ n).
    pub(crate) fn new(r: usize) -> RadixSearch {
        RadixSearch {
            prefix: 0,
            prefix_mask: 0,
            remaining: r,
            above: 0,
            equal: 0,
            r,
            step: 0,
        }
    }

    /// The digit to histogram next, or `None` when the search is done.
    pub(crate) fn digit(&self) -> Option<Digit> {
        let &(shift, width) = DIGITS.get(self.step)?;
        Some(Digit {
            prefix: self.prefix,
            prefix_mask: self.prefix_mask,
            shift,
            digit_mask: (1u32 << width) - 1,
        })
    }

    /// Fixes the next digit from its histogram over all elements.
    pub(crate) fn advance(&mut self, counts: &[usize]) {
        let digit = self.digit().expect("advance only while a digit is left");
        for (d, &count) in counts.iter().enumerate().rev() {
            if count >= self.remaining {
                self.prefix |= (d as u32) << digit.shift;
                self.prefix_mask |= digit.digit_mask << digit.shift;
                self.equal = count;
                break;
            }
            self.remaining -= count;
            self.above += count;
        }
        self.step += 1;
    }

    /// The cut found.
    pub(crate) fn finish(self) -> Cut {
        Cut {
            threshold: f32::from_bits(self.prefix),
            ties: self.r - self.above,
            equal: self.equal,
        }
    }
}

/// One digit of the radix select: which elements it looks at and which bucket each goes in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Digit {
    prefix: u32,
    prefix_mask: u32,
    shift: u32,
    digit_mask: u32,
}

impl Digit {
    /// Number of buckets.
    pub(crate) fn buckets(&self) -> usize {
        self.digit_mask as usize + 1
    }

    /// The bucket of `v`, or `None` when `v` lies outside the range still searched.
    #[inline]
    pub(crate) fn bucket(&self, v: f32) -> Option<usize> {
        let key = magnitude_bits(v);
        (key & self.prefix_mask == self.prefix)
            .then_some(((key >> self.shift) & self.digit_mask) as usize)
    }

    /// Adds the buckets of `values` to `histogram`.
    pub(crate) fn count(&self, values: &[f32], histogram: &mut [usize]) {
        for v in values {
            if let Some(b) = self.bucket(*v) {
                histogram[b] += 1;
            }
        }
    }
}

impl Cut {
    /// Finds the cut for `1 <= r <= values.len()` by the magnitudes of `values`, in three
    /// linear passes: a radix select over the bits of `|v|`, whose order as integers is the
    /// order of the magnitudes for finite values. Nothing is copied or reordered.
    fn new(values: &[f32], r: usize) -> Cut {
        let selected: std::result::Result<Cut, std::convert::Infallible> =
            Cut::select(r, |digit| {
                let mut histogram = vec![0usize; digit.buckets()];
                digit.count(values, &mut histogram);
                Ok(histogram)
            });
        match selected {
            Ok(cut) => cut,
            Err(never) => match never {},
        }
    }

    /// The radix select itself, for the `r`-th largest magnitude: `histogram` returns, for a
    /// digit, the bucket counts over all elements (however they are stored).
    pub(crate) fn select<E>(
        r: usize,
        mut histogram: impl FnMut(Digit) -> std::result::Result<Vec<usize>, E>,
    ) -> std::result::Result<Cut, E> {
        let mut search = RadixSearch::new(r);
        while let Some(digit) = search.digit() {
            search.advance(&histogram(digit)?);
        }
        Ok(search.finish())
    }
    /// The magnitude at the cut.
    pub(crate) fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Whether `v`'s magnitude equals the threshold.
    #[inline]
    pub(crate) fn is_tie(&self, v: f32) -> bool {
        magnitude_bits(v) == self.threshold.to_bits()
    }

    /// The index just past the last tied element the cut keeps: ties at or before it are in
    /// the set, ties after it are not. Found by counting ties a block at a time.
    fn split(&self, values: &[f32]) -> usize {
        if self.ties == self.equal {
            return values.len();
        }
        self.split_after(values, self.ties).unwrap_or(values.len())
    }

    /// The index just past the `n`-th tie in `values` (n ≥ 1), if there are that many.
    pub(crate) fn split_after(&self, values: &[f32], n: usize) -> Option<usize> {
        let mut seen = 0;
        for (b, block) in values.chunks(4096).enumerate() {
            let count = block.iter().filter(|v| self.is_tie(**v)).count();
            if seen + count >= n {
                for (j, v) in block.iter().enumerate() {
                    seen += usize::from(self.is_tie(*v));
                    if seen == n {
                        return Some(b * 4096 + j + 1);
                    }
                }
            }
            seen += count;
        }
        None
    }

    /// Whether the element at `index` with value `v` is in the set, given the split.
    #[inline]
    pub(crate) fn contains(&self, v: f32, index: usize, split: usize) -> bool {
        let (bits, threshold) = (magnitude_bits(v), self.threshold.to_bits());
        bits > threshold || (bits == threshold && index < split)
    }
}

/// The bits of `|v|`: for finite values their integer order is the order of magnitudes.
#[inline]
fn magnitude_bits(v: f32) -> u32 {
    v.to_bits() & 0x7fff_ffff
}

/// Keeps exactly the `k` largest entries by `|v|` (ties to the lower index) and zeroes
/// the rest; returns the number of positions kept, `min(k, numel)`.
pub fn top_k(delta: &mut [f32], k: usize) -> usize {
    let n = delta.len();
    if k >= n {
        return n;
    }
    if k == 0 {
        delta.fill(0.0);
        return 0;
    }
    let cut = Cut::new(delta, k);
    let split = cut.split(delta);
    for (i, v) in delta.iter_mut().enumerate() {
        *v = if cut.contains(*v, i, split) { *v } else { 0.0 };
    }
    k
}

/// TIES trim (mergekit `magnitude`): keeps the top `max(1, floor(density · numel))`
/// entries by `|v|` over the whole flattened tensor. `density >= 1` changes nothing;
/// `density <= 0` zeroes everything. Returns the number of positions kept.
///
/// mergekit 0.1.5 keeps at least one element for any positive density (older versions
/// asserted `k > 0` instead). PEFT's `magnitude_prune` keeps exactly
/// `floor(density · numel)`, possibly none: use [`top_k`] with [`keep_count`] for that.
pub fn magnitude(delta: &mut [f32], density: f32) -> usize {
    top_k(delta, magnitude_keep(density, delta.len()))
}

/// How many entries [`magnitude`] keeps of `numel`: all at `density >= 1`, none at
/// `density <= 0`, else `max(1, floor(density · numel))`. The device trims by this count too.
pub fn magnitude_keep(density: f32, numel: usize) -> usize {
    if density >= 1.0 {
        numel
    } else if density <= 0.0 || numel == 0 {
        0
    } else {
        keep_count(density, numel).max(1)
    }
}

/// DARE drop (mergekit `random`): keeps element `i` iff `rng.uniform(i) < density`, with
/// no rescale. `density >= 1` changes nothing. Returns the number of positions kept.
pub fn random(delta: &mut [f32], density: f32, rng: &MaskRng) -> usize {
    random_at(delta, 0, density, rng)
}

/// [`random`] on the part of a tensor that starts at flat element `first`: the mask of
/// element `first + j` is the one the whole tensor would get, so a tensor can be
/// processed in chunks, in any order, on any thread.
pub fn random_at(delta: &mut [f32], first: u64, density: f32, rng: &MaskRng) -> usize {
    if density >= 1.0 {
        return delta.len();
    }
    // The generator's 64-bit multiplies vectorise only with wide registers: use them where the
    // CPU has them. Integer arithmetic, so every path gives the same mask.
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { random_mask_avx512(delta, first, density, rng) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { random_mask_avx2(delta, first, density, rng) };
        }
    }
    random_mask(delta, first, density, rng)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn random_mask_avx512(delta: &mut [f32], first: u64, density: f32, rng: &MaskRng) -> usize {
    random_mask(delta, first, density, rng)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn random_mask_avx2(delta: &mut [f32], first: u64, density: f32, rng: &MaskRng) -> usize {
    random_mask(delta, first, density, rng)
}

#[inline(always)]
fn random_mask(delta: &mut [f32], first: u64, density: f32, rng: &MaskRng) -> usize {
    let mut kept = 0;
    for (index, v) in (first..).zip(delta.iter_mut()) {
        // Branch-free so that the generator vectorises.
        let keep = rng.uniform(index) < density;
        kept += usize::from(keep);
        *v = if keep { *v } else { 0.0 };
    }
    kept
}

/// Model breadcrumbs (mergekit `magnitude_outliers`): drops the `n_top = floor(gamma ·
/// numel)` largest entries by `|v|` and then the smallest, so that
/// `target = floor(density · numel)` remain. When `n_top + target > numel` the outlier
/// cut shrinks to `numel − target`. `density >= 1` changes nothing (and drops no
/// outliers). Returns the number of positions kept.
///
/// Older mergekit (0.1.4 and before) sliced `sorted[n_bot:-n_top]`, which is empty when
/// `n_top == 0` (gamma 0, or any tensor under 1/gamma elements) and so zeroed the whole
/// delta; 0.1.5 slices `[n_bot : n_bot + target]` and keeps the top `target` there, as
/// this function does. mergekit ranks by an ascending unstable sort, so among equal
/// magnitudes its choice is arbitrary (on small tensors, where torch's sort happens to be
/// stable, it drops the higher index as the outlier; we drop the lower).
pub fn outliers(delta: &mut [f32], density: f32, gamma: f32) -> usize {
    let n = delta.len();
    if density >= 1.0 {
        return n;
    }
    let target = keep_count(density, n).min(n);
    if target == 0 {
        delta.fill(0.0);
        return 0;
    }
    let n_top = keep_count(gamma, n).min(n - target);
    // Kept: ranks [n_top, n_top + target) in the descending order, i.e. inside the top
    // `n_top + target` but outside the top `n_top`.
    let within = Cut::new(delta, n_top + target);
    let within_split = within.split(delta);
    let outlier = (n_top > 0).then(|| {
        let cut = Cut::new(delta, n_top);
        let split = cut.split(delta);
        (cut, split)
    });
    for (i, v) in delta.iter_mut().enumerate() {
        let inside = within.contains(*v, i, within_split);
        let top = outlier
            .as_ref()
            .is_some_and(|(cut, split)| cut.contains(*v, i, *split));
        if !inside || top {
            *v = 0.0;
        }
    }
    target
}

/// Checks DELLA's bounds as mergekit does: for `0 < density < 1` it needs
/// `density − epsilon > 0` and `density + epsilon < 1` (in decimal arithmetic, like
/// Python). Densities outside `(0, 1)` need no epsilon and pass.
pub fn check_della(density: f32, epsilon: f32, tensor: &str) -> Result<()> {
    if density >= 1.0 || density <= 0.0 {
        return Ok(());
    }
    let (d, e) = (decimal(density), decimal(epsilon));
    // Written so that NaN fails too.
    if d - e > 0.0 && d + e < 1.0 {
        Ok(())
    } else {
        Err(Error::Parameter {
            name: "epsilon".into(),
            tensor: tensor.into(),
            message: format!(
                "density ± epsilon must lie strictly between 0 and 1 (density {density}, \
                 epsilon {epsilon})"
            ),
        })
    }
}

/// DELLA's MagPrune (mergekit `della_magprune`), with no rescale (mergekit rescales
/// afterwards only when `rescale` is on, and then by the L1 norm of the whole tensor:
/// there is no per-element `1/p`).
///
/// Ranks `|v|` ascending within each row, the fibres along axis 1 as in mergekit
/// (`argsort(dim=1)`: for 2-D tensors the last axis; tensors with fewer than 2 axes are
/// one row). With `rank_norm = rank / (len − 1)`, element `i` is kept iff
/// `rng.uniform(i) < density − epsilon + rank_norm · 2 · epsilon`, `i` being the flat
/// index. Among equal magnitudes the lower index gets the lower rank.
///
/// `density >= 1` changes nothing, `density <= 0` zeroes everything, in that order and
/// before the epsilon check, as in mergekit. Rows of length 1 keep with probability
/// `density` (mergekit divides 0 by 0 there and `bernoulli` rejects the NaN).
/// `order` is reusable scratch. Returns the number of positions kept.
///
/// # Errors
/// [`Error::Parameter`] when `density ± epsilon` leaves `(0, 1)` (see [`check_della`]) or
/// when `shape` does not describe `delta.len()` elements.
pub fn della(
    delta: &mut [f32],
    shape: &[usize],
    density: f32,
    epsilon: f32,
    rng: &MaskRng,
    order: &mut Vec<u64>,
    tensor: &str,
) -> Result<usize> {
    della_at(delta, 0, shape, density, epsilon, rng, order, tensor)
}

/// [`della`] on whole rows of a larger tensor that start at flat element `first`: `shape`
/// describes the part, and each element draws the mask value the whole tensor would give it.
#[allow(clippy::too_many_arguments)]
pub fn della_at(
    delta: &mut [f32],
    first: u64,
    shape: &[usize],
    density: f32,
    epsilon: f32,
    rng: &MaskRng,
    order: &mut Vec<u64>,
    tensor: &str,
) -> Result<usize> {
    let n = delta.len();
    if density >= 1.0 {
        return Ok(n);
    }
    if density <= 0.0 {
        delta.fill(0.0);
        return Ok(0);
    }
    check_della(density, epsilon, tensor)?;
    if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(n) {
        return Err(Error::Parameter {
            name: "shape".into(),
            tensor: tensor.into(),
            message: format!("shape {shape:?} does not hold {n} elements"),
        });
    }
    if n == 0 {
        return Ok(0);
    }
    // Fibre (o, ·, k) holds the flat indices (o · len + j) · inner + k for j < len.
    let (len, inner) = match shape {
        [_, len, rest @ ..] => (*len, rest.iter().product::<usize>()),
        _ => (n, 1),
    };
    let outer = n / (len * inner);
    if i32::try_from(len).is_err() {
        return Err(Error::Parameter {
            name: "shape".into(),
            tensor: tensor.into(),
            message: format!("DELLA ranks rows of fewer than 2^31 entries, not {len}"),
        });
    }
    // mergekit computes `(density − epsilon) + rank_norm · 2 · epsilon` on f32 tensors
    // with the first term from Python floats.
    let low = (decimal(density) - decimal(epsilon)) as f32;
    let mut kept = 0;
    for o in 0..outer {
        for k in 0..inner {
            let at = |j: usize| (o * len + j) * inner + k;
            // Ascending |v|, ties by position: one integer per entry, the magnitude's bits
            // (ordered as the magnitudes are, the values being finite) above the position,
            // sorted as integers, several times faster than comparing through the tensor.
            order.clear();
            order.extend(
                (0..len).map(|j| (u64::from(magnitude_bits(delta[at(j)])) << 32) | j as u64),
            );
            order.sort_unstable();
            // Each entry's rank, by position (after the sorted keys), so that the mask is
            // drawn in order without branches: a kept entry stays, a dropped one becomes +0.
            order.resize(2 * len, 0);
            let (sorted, ranks) = order.split_at_mut(len);
            for (rank, &key) in sorted.iter().enumerate() {
                ranks[(key & u64::from(u32::MAX)) as usize] = rank as u64;
            }
            if inner == 1 {
                let row = &mut delta[o * len..(o + 1) * len];
                let draw = RowDraw {
                    first: first + (o * len) as u64,
                    low,
                    epsilon,
                    rng,
                };
                kept += della_row_mask(row, ranks, draw);
                continue;
            }
            for (j, &rank) in ranks.iter().enumerate() {
                let i = at(j);
                let keep =
                    rng.uniform(first + i as u64) < della_keep_probability(rank, len, low, epsilon);
                kept += usize::from(keep);
                delta[i] = if keep { delta[i] } else { 0.0 };
            }
        }
    }
    Ok(kept)
}

/// DELLA's keep probability for the entry of rank `rank` (ascending `|v|`) of `len`:
/// `low + rank / (len − 1) · 2ε`, with rank 0.5 of one for a row of one.
#[inline(always)]
fn della_keep_probability(rank: u64, len: usize, low: f32, epsilon: f32) -> f32 {
    // Through i32 (rows are shorter than 2^31): the same value as from usize, and a
    // conversion that vectorises.
    let rank_norm = if len > 1 {
        rank as i32 as f32 / (len - 1) as f32
    } else {
        0.5
    };
    low + rank_norm * 2.0 * epsilon
}

/// What DELLA's mask on a row needs besides the row and its ranks: the flat index of the
/// row's first entry, the lowest keep probability, the spread and the generator.
#[derive(Clone, Copy)]
struct RowDraw<'a> {
    first: u64,
    low: f32,
    epsilon: f32,
    rng: &'a MaskRng,
}

/// DELLA's mask on one contiguous row, given each entry's rank; returns how many entries it
/// keeps. Dispatched to wide registers as [`random_at`] is; every path gives the same mask.
fn della_row_mask(row: &mut [f32], ranks: &[u64], draw: RowDraw) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { della_row_mask_avx512(row, ranks, draw) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { della_row_mask_avx2(row, ranks, draw) };
        }
    }
    della_row_mask_portable(row, ranks, draw)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn della_row_mask_avx512(row: &mut [f32], ranks: &[u64], draw: RowDraw) -> usize {
    della_row_mask_portable(row, ranks, draw)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn della_row_mask_avx2(row: &mut [f32], ranks: &[u64], draw: RowDraw) -> usize {
    della_row_mask_portable(row, ranks, draw)
}

#[inline(always)]
fn della_row_mask_portable(row: &mut [f32], ranks: &[u64], draw: RowDraw) -> usize {
    let RowDraw {
        first,
        low,
        epsilon,
        rng,
    } = draw;
    let len = row.len();
    let mut kept = 0;
    for ((index, v), &rank) in (first..).zip(row.iter_mut()).zip(ranks) {
        // Branch-free, so that the generator vectorises; a dropped entry becomes +0.
        let keep = rng.uniform(index) < della_keep_probability(rank, len, low, epsilon);
        kept += usize::from(keep);
        *v = f32::from_bits(v.to_bits() & 0u32.wrapping_sub(u32::from(keep)));
    }
    kept
}

/// `Σ |v|`, accumulated in `f64`.
pub fn l1_norm(values: &[f32]) -> f64 {
    lane_sum(values, |v| f64::from(v.abs()))
}

/// Σ term(v) in f64 over eight interleaved partial sums, so the loop vectorises instead of
/// waiting on one accumulator; the order is fixed, so the result is too.
pub fn lane_sum(values: &[f32], term: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = values.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| term(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += term(v);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// mergekit's `rescale` (`RescaleNorm.l1`): multiplies `masked` by
/// `original_l1 / ‖masked‖₁` so the trimmed delta keeps the L1 norm of the delta it came
/// from (`original_l1`, from [`l1_norm`] before sparsifying). Skipped when either norm is
/// below 1e-7, as in mergekit. Norms are `f64`; the factor is applied in `f32`.
///
/// This matches `1/density` only in expectation; see [`rescale_inverse`] for the DARE
/// paper's rule.
pub fn rescale_l1(masked: &mut [f32], original_l1: f64) {
    if let Some(factor) = l1_factor(original_l1, l1_norm(masked)) {
        for v in masked.iter_mut() {
            *v *= factor;
        }
    }
}

/// The factor of [`rescale_l1`] from the two norms; `None` when either is below 1e-7.
pub(crate) fn l1_factor(original_l1: f64, masked_l1: f64) -> Option<f32> {
    const EPS: f64 = 1e-7;
    (original_l1 >= EPS && masked_l1 >= EPS).then(|| (original_l1 / masked_l1) as f32)
}

/// The DARE paper's (and PEFT's) rescale: divides every entry by `density`, which makes
/// a Bernoulli(`density`) drop unbiased. Skipped for `density` outside `(0, 1)` (PEFT
/// never rescales at `density >= 1` and would produce NaN at 0).
pub fn rescale_inverse(masked: &mut [f32], density: f32) {
    if !(density > 0.0 && density < 1.0) {
        return;
    }
    for v in masked.iter_mut() {
        *v /= density;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rng() -> MaskRng {
        MaskRng::new(1234, "layers.0.weight", 0)
    }

    #[test]
    fn keep_count_reads_the_decimal_value() {
        assert_eq!(keep_count(0.7, 10), 7); // 0.7_f32 · 10 = 6.9999998 in f32 or f64
        assert_eq!(keep_count(0.3, 10), 3);
        assert_eq!(keep_count(0.5, 5), 2);
        assert_eq!(keep_count(0.01, 99), 0);
        assert_eq!(keep_count(-0.5, 10), 0);
        assert_eq!(keep_count(f32::NAN, 10), 0);
    }

    #[test]
    fn top_k_keeps_the_largest_magnitudes() {
        let mut d = [3.0, -1.0, 4.0, -1.0, 5.0, -9.0, 2.0, 6.0];
        assert_eq!(top_k(&mut d, 3), 3);
        assert_eq!(d, [0.0, 0.0, 0.0, 0.0, 5.0, -9.0, 0.0, 6.0]);
    }

    #[test]
    fn top_k_breaks_ties_towards_the_lower_index() {
        let mut d = [1.0, -2.0, 2.0, -2.0, 1.0];
        top_k(&mut d, 2);
        assert_eq!(d, [0.0, -2.0, 2.0, 0.0, 0.0]);
        let mut d = [0.5, 0.5, 0.5, 0.5];
        top_k(&mut d, 3);
        assert_eq!(d, [0.5, 0.5, 0.5, 0.0]);
    }

    #[test]
    fn top_k_edges() {
        let mut d = [1.0, -2.0];
        assert_eq!(top_k(&mut d, 0), 0);
        assert_eq!(d, [0.0, 0.0]);
        let mut d = [1.0, -2.0];
        assert_eq!(top_k(&mut d, 5), 2);
        assert_eq!(d, [1.0, -2.0]);
    }

    #[test]
    fn magnitude_follows_mergekit() {
        // floor(0.5 · 5) = 2.
        let mut d = [1.0, -2.0, 3.0, -4.0, 0.5];
        assert_eq!(magnitude(&mut d, 0.5), 2);
        assert_eq!(d, [0.0, 0.0, 3.0, -4.0, 0.0]);
        // floor(0.1 · 5) = 0, but a positive density keeps at least one.
        let mut d = [1.0, -2.0, 3.0, -4.0, 0.5];
        assert_eq!(magnitude(&mut d, 0.1), 1);
        assert_eq!(d, [0.0, 0.0, 0.0, -4.0, 0.0]);
        // 0.7 of 10 is 7, not 6.
        let mut d: Vec<f32> = (1..=10).map(|v| v as f32).collect();
        assert_eq!(magnitude(&mut d, 0.7), 7);
        assert_eq!(d, [0.0, 0.0, 0.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]);
        let mut d = [1.0, -2.0];
        assert_eq!(magnitude(&mut d, 1.0), 2);
        assert_eq!(d, [1.0, -2.0]);
        assert_eq!(magnitude(&mut d, 0.0), 0);
        assert_eq!(d, [0.0, 0.0]);
    }

    #[test]
    fn outliers_drop_the_top_gamma_and_the_bottom() {
        let signed = |d: &mut [f32]| {
            for (i, v) in d.iter_mut().enumerate() {
                if i % 2 == 1 {
                    *v = -*v;
                }
            }
        };
        // n = 10, target 5, n_top 1, n_bot 4: keep magnitudes 5..=9.
        let mut d: Vec<f32> = (1..=10).map(|v| v as f32).collect();
        signed(&mut d);
        assert_eq!(outliers(&mut d, 0.5, 0.1), 5);
        assert_eq!(
            d,
            [0.0, 0.0, 0.0, 0.0, 5.0, -6.0, 7.0, -8.0, 9.0, 0.0],
            "{d:?}"
        );
        // target 9, n_top 2 > 10 − 9: the outlier cut shrinks to 1.
        let mut d: Vec<f32> = (1..=10).map(|v| v as f32).collect();
        assert_eq!(outliers(&mut d, 0.9, 0.2), 9);
        assert_eq!(d, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 0.0]);
        // gamma 0.01 on 10 elements: n_top 0, keep the top 3 (0.1.4 zeroed everything).
        let mut d: Vec<f32> = (1..=10).rev().map(|v| v as f32).collect();
        assert_eq!(outliers(&mut d, 0.3, 0.01), 3);
        assert_eq!(d, [10.0, 9.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        // Density 1 drops no outliers; density 0 drops everything.
        let mut d = [1.0, 100.0];
        assert_eq!(outliers(&mut d, 1.0, 0.5), 2);
        assert_eq!(d, [1.0, 100.0]);
        assert_eq!(outliers(&mut d, 0.0, 0.5), 0);
        assert_eq!(d, [0.0, 0.0]);
    }

    #[test]
    fn outliers_break_ties_like_top_k() {
        // All equal: ranks follow the index; drop rank 0 (n_top 1), keep ranks 1 and 2.
        let mut d = [2.0, -2.0, 2.0, -2.0, 2.0];
        outliers(&mut d, 0.4, 0.2);
        assert_eq!(d, [0.0, -2.0, 2.0, 0.0, 0.0]);
    }

    #[test]
    fn random_keeps_exactly_where_uniform_is_below_density() {
        let r = rng();
        let mut d = vec![1.5f32; 64];
        let kept = random(&mut d, 0.4, &r);
        for (i, v) in d.iter().enumerate() {
            let expect = if r.uniform(i as u64) < 0.4 { 1.5 } else { 0.0 };
            assert_eq!(*v, expect);
        }
        assert_eq!(kept, d.iter().filter(|v| **v != 0.0).count());
        let mut d = vec![1.5f32; 8];
        assert_eq!(random(&mut d, 1.0, &r), 8);
        assert!(d.iter().all(|v| *v == 1.5));
    }

    #[test]
    fn random_keeps_density_on_a_million_elements() {
        let n = 1_000_000;
        for density in [0.1f32, 0.3, 0.9] {
            let mut d = vec![1.0f32; n];
            let kept = random(&mut d, density, &rng());
            let fraction = kept as f64 / n as f64;
            assert!((fraction - f64::from(density)).abs() < 0.002, "{fraction}");
        }
    }

    #[test]
    fn random_with_inverse_rescale_is_unbiased() {
        let n = 1_000_000;
        let original: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32).collect();
        let mean = |v: &[f32]| v.iter().map(|x| f64::from(*x)).sum::<f64>() / n as f64;
        for density in [0.2f32, 0.5] {
            let mut d = original.clone();
            random(&mut d, density, &MaskRng::new(5, "unbiased", 2));
            rescale_inverse(&mut d, density);
            let ratio = mean(&d) / mean(&original);
            assert!((ratio - 1.0).abs() < 0.01, "{ratio}");
        }
    }

    #[test]
    fn rescale_l1_restores_the_norm() {
        let original: Vec<f32> = (0..10_000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let before = l1_norm(&original);
        let mut d = original.clone();
        random(&mut d, 0.3, &rng());
        assert!(l1_norm(&d) < 0.5 * before);
        rescale_l1(&mut d, before);
        assert!(((l1_norm(&d) - before) / before).abs() < 1e-6);
    }

    #[test]
    fn rescale_l1_skips_tiny_norms() {
        let mut d = [0.0, 2.0];
        rescale_l1(&mut d, 1e-8);
        assert_eq!(d, [0.0, 2.0]);
        let mut d = [0.0, 1e-9];
        rescale_l1(&mut d, 4.0);
        assert_eq!(d, [0.0, 1e-9]);
        let mut d = [0.0, 2.0];
        rescale_l1(&mut d, 4.0);
        assert_eq!(d, [0.0, 4.0]);
    }

    #[test]
    fn rescale_inverse_divides_by_density() {
        let mut d = [0.0, 1.0, -3.0];
        rescale_inverse(&mut d, 0.25);
        assert_eq!(d, [0.0, 4.0, -12.0]);
        rescale_inverse(&mut d, 1.0);
        assert_eq!(d, [0.0, 4.0, -12.0]);
    }

    /// The mask DELLA must produce, given the keep probability of each flat index.
    fn expected_della(values: &[f32], p_keep: &[f32], r: &MaskRng) -> Vec<f32> {
        values
            .iter()
            .zip(p_keep)
            .enumerate()
            .map(|(i, (&v, &p))| if r.uniform(i as u64) < p { v } else { 0.0 })
            .collect()
    }

    #[test]
    fn della_keep_probability_follows_the_row_rank() {
        // density 0.5, epsilon 0.2: p = 0.3 + 0.4 · rank / 3 along the row.
        // |v| ranks: 0.1 → 0, 0.4 → 3, 0.3 → 2, 0.2 → 1.
        let values = [0.1, -0.4, 0.3, -0.2];
        let p = [0.3, 0.7, 0.3 + 0.8 / 3.0, 0.3 + 0.4 / 3.0];
        for seed in 0..20 {
            let r = MaskRng::new(seed, "della", 0);
            let mut d = values;
            let kept = della(&mut d, &[4], 0.5, 0.2, &r, &mut Vec::new(), "t").unwrap();
            assert_eq!(d.to_vec(), expected_della(&values, &p, &r));
            assert_eq!(kept, d.iter().filter(|v| **v != 0.0).count());
        }
    }

    #[test]
    fn della_ranks_along_axis_1() {
        // Shape [2, 2, 2] with epsilon 0.4 at density 0.5: the smaller of each fibre
        // (o, ·, k) keeps with p = 0.1, the larger with p = 0.9. Fibres pair flat
        // indices {0, 2}, {1, 3}, {4, 6}, {5, 7}.
        let values = [1.0, -8.0, 2.0, -7.0, 4.0, 5.0, 3.0, 6.0];
        let p = [0.1, 0.9, 0.9, 0.1, 0.9, 0.1, 0.1, 0.9];
        for seed in 0..20 {
            let r = MaskRng::new(seed, "della3d", 1);
            let mut d = values;
            della(&mut d, &[2, 2, 2], 0.5, 0.4, &r, &mut Vec::new(), "t").unwrap();
            assert_eq!(d.to_vec(), expected_della(&values, &p, &r), "seed {seed}");
        }
    }

    #[test]
    fn della_rows_are_independent_and_ties_rank_by_index() {
        // Shape [2, 3]; row 1 is all ties, so its ranks follow the index.
        let values = [3.0, 1.0, 2.0, 5.0, -5.0, 5.0];
        let p = [0.8, 0.2, 0.5, 0.2, 0.5, 0.8];
        for seed in 0..20 {
            let r = MaskRng::new(seed, "rows", 0);
            let mut d = values;
            della(&mut d, &[2, 3], 0.5, 0.3, &r, &mut Vec::new(), "t").unwrap();
            assert_eq!(d.to_vec(), expected_della(&values, &p, &r), "seed {seed}");
        }
    }

    #[test]
    fn della_single_element_rows_keep_with_density() {
        let values = [1.0f32; 6];
        let p = [0.4f32; 6];
        let r = rng();
        let mut d = values;
        della(&mut d, &[6, 1], 0.4, 0.1, &r, &mut Vec::new(), "t").unwrap();
        assert_eq!(d.to_vec(), expected_della(&values, &p, &r));
    }

    #[test]
    fn della_kept_fraction_is_density() {
        let (rows, cols) = (1000, 1000);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1013) as f32 - 506.0)
            .collect();
        for (density, epsilon) in [(0.4f32, 0.1f32), (0.7, 0.25)] {
            let mut d = values.clone();
            let kept = della(
                &mut d,
                &[rows, cols],
                density,
                epsilon,
                &rng(),
                &mut Vec::new(),
                "t",
            )
            .unwrap();
            let fraction = kept as f64 / (rows * cols) as f64;
            assert!((fraction - f64::from(density)).abs() < 0.003, "{fraction}");
        }
    }

    #[test]
    fn della_checks_epsilon_after_the_density_shortcuts() {
        let r = rng();
        let mut d = [1.0, 2.0, 3.0];
        let err = della(&mut d, &[3], 0.1, 0.15, &r, &mut Vec::new(), "w").unwrap_err();
        assert!(matches!(err, Error::Parameter { ref name, ref tensor, .. }
            if name == "epsilon" && tensor == "w"));
        assert!(della(&mut d, &[3], 0.9, 0.15, &r, &mut Vec::new(), "w").is_err());
        // density + epsilon == 1 is rejected too (0.7 + 0.3 is exactly 1 in decimal).
        assert!(della(&mut d, &[3], 0.7, 0.3, &r, &mut Vec::new(), "w").is_err());
        assert_eq!(d, [1.0, 2.0, 3.0]);
        assert_eq!(
            della(&mut d, &[3], 1.0, 0.9, &r, &mut Vec::new(), "w").unwrap(),
            3
        );
        assert_eq!(d, [1.0, 2.0, 3.0]);
        assert_eq!(
            della(&mut d, &[3], 0.0, 0.9, &r, &mut Vec::new(), "w").unwrap(),
            0
        );
        assert_eq!(d, [0.0, 0.0, 0.0]);
    }

    #[test]
    fn della_rejects_a_wrong_shape() {
        let mut d = [1.0, 2.0, 3.0];
        let err = della(&mut d, &[2, 2], 0.5, 0.1, &rng(), &mut Vec::new(), "w");
        assert!(matches!(err, Err(Error::Parameter { ref name, .. }) if name == "shape"));
    }

    proptest! {
        /// The radix select keeps exactly what a stable sort by (|v| descending, index)
        /// keeps, over values spanning many exponents, with ties, zeros of both signs and
        /// subnormals.
        #[test]
        fn top_k_equals_a_stable_sort(
            values in prop::collection::vec(
                prop_oneof![
                    Just(0.0f32), Just(-0.0f32), Just(1.0e-40f32), Just(-3.0f32), Just(3.0f32),
                    -1.0e6f32..1.0e6, -1.0e-3f32..1.0e-3,
                ],
                1..400,
            ),
            k_seed: usize,
        ) {
            let k = k_seed % (values.len() + 1);
            let mut order: Vec<usize> = (0..values.len()).collect();
            order.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
            let mut expected = vec![0.0f32; values.len()];
            for &i in &order[..k] {
                expected[i] = values[i];
            }
            let mut d = values.clone();
            top_k(&mut d, k);
            prop_assert_eq!(
                d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }

        #[test]
        fn top_k_keeps_exactly_k_of_the_largest(
            values in prop::collection::vec(-100i32..100, 1..200),
            k_seed: usize,
        ) {
            // Distinct-enough nonzero values so that "kept" means "nonzero".
            let original: Vec<f32> = values.iter().map(|&v| v as f32 + 0.5).collect();
            let k = k_seed % (original.len() + 1);
            let mut d = original.clone();
            prop_assert_eq!(top_k(&mut d, k), k);
            prop_assert_eq!(d.iter().filter(|v| **v != 0.0).count(), k);
            let smallest_kept = d.iter().filter(|v| **v != 0.0).map(|v| v.abs()).fold(f32::INFINITY, f32::min);
            for (o, v) in original.iter().zip(&d) {
                prop_assert!(*v == 0.0 || v == o);
                if *v == 0.0 {
                    prop_assert!(o.abs() <= smallest_kept);
                }
            }
        }

        #[test]
        fn magnitude_keeps_floor_density_n(
            values in prop::collection::vec(0.5f32..100.0, 1..300),
            density in 0.0f32..1.0,
        ) {
            let mut d = values.clone();
            let kept = magnitude(&mut d, density);
            let expected = if density <= 0.0 { 0 } else { keep_count(density, values.len()).max(1) };
            prop_assert_eq!(kept, expected);
            prop_assert_eq!(d.iter().filter(|v| **v != 0.0).count(), expected);
        }

        #[test]
        fn random_masks_do_not_depend_on_chunking(
            n in 1usize..2000,
            cut_a in 0usize..2000,
            cut_b in 0usize..2000,
            density in 0.0f32..1.0,
            seed: u64,
        ) {
            let r = MaskRng::new(seed, "chunked", 3);
            let mut whole = vec![1.0f32; n];
            random(&mut whole, density, &r);
            let (a, b) = (cut_a.min(cut_b) % (n + 1), cut_a.max(cut_b).min(n));
            let mut parts = vec![1.0f32; n];
            // Visit the pieces out of order.
            for (lo, hi) in [(b, n), (0, a), (a, b)] {
                random_at(&mut parts[lo..hi], lo as u64, density, &r);
            }
            prop_assert_eq!(whole, parts);
        }

        #[test]
        fn outliers_keep_a_contiguous_rank_band(
            values in prop::collection::vec(1u16..1000, 1..300),
            density in 0.0f32..1.0,
            gamma in 0.0f32..0.5,
        ) {
            let original: Vec<f32> = values.iter().map(|&v| f32::from(v)).collect();
            let n = original.len();
            let mut d = original.clone();
            let kept = outliers(&mut d, density, gamma);
            let target = keep_count(density, n);
            prop_assert_eq!(kept, target);
            prop_assert_eq!(d.iter().filter(|v| **v != 0.0).count(), target);
            // Ranks by (|v| desc, index asc); kept ones form [n_top, n_top + target).
            let mut ranked: Vec<usize> = (0..n).collect();
            ranked.sort_by(|&a, &b| original[b].total_cmp(&original[a]).then(a.cmp(&b)));
            let n_top = keep_count(gamma, n).min(n - target);
            for (rank, &i) in ranked.iter().enumerate() {
                let inside = rank >= n_top && rank < n_top + target;
                prop_assert_eq!(d[i] != 0.0, inside);
            }
        }
    }
}
