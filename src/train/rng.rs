//! [`SplitMix`], the sequential random generator of the synthetic data: SplitMix64, small,
//! self-contained and fixed here, so that a data set depends on its seed and nothing else (not
//! the platform, not a dependency's version).

/// The golden-ratio increment of SplitMix64.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A SplitMix64 stream.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix {
    state: u64,
}

impl SplitMix {
    /// The stream for `seed`.
    pub(crate) fn new(seed: u64) -> SplitMix {
        SplitMix { state: seed }
    }

    /// The stream for one use of a seed: `parts` (a specialty, a split) select independent
    /// streams, so that drawing more cases for one never shifts another's.
    pub(crate) fn derive(seed: u64, parts: &[u64]) -> SplitMix {
        let key = parts
            .iter()
            .fold(finalise(seed), |key, &part| finalise(key ^ finalise(part)));
        SplitMix::new(key)
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        finalise(self.state)
    }

    /// A uniform integer in `0..n`, without modulo bias; `n` must be positive.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0, "below(0)");
        // Reject the top partial block of the 64-bit range so that every residue is equally
        // likely; the loop runs more than once with probability below n / 2^64.
        let zone = u64::MAX - u64::MAX.wrapping_sub(n - 1) % n;
        loop {
            let x = self.next_u64();
            if x <= zone {
                return x % n;
            }
        }
    }

    /// A uniform integer in `lo..=hi` (`lo <= hi`).
    pub(crate) fn range(&mut self, lo: u32, hi: u32) -> u32 {
        debug_assert!(lo <= hi, "empty range {lo}..={hi}");
        // The draw is below hi - lo + 1 <= 2^32, so it fits in u32 after adding lo.
        lo + self.below(u64::from(hi - lo) + 1) as u32
    }

    /// True with probability `1 / n`.
    pub(crate) fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// A uniformly chosen element of a non-empty slice.
    pub(crate) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        // usize -> u64 -> usize round-trips: the index is below items.len().
        items[self.below(items.len() as u64) as usize]
    }

    /// Shuffles `items` in place (Fisher–Yates).
    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// The SplitMix64 output function (Stafford's mix 13), a bijection on `u64`.
fn finalise(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_splitmix64_stream() {
        // The first outputs of SplitMix64 seeded with 1234567, from Vigna's reference C code.
        let mut rng = SplitMix::new(1_234_567);
        assert_eq!(rng.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(rng.next_u64(), 3_203_168_211_198_807_973);
        assert_eq!(rng.next_u64(), 9_817_491_932_198_370_423);
    }

    #[test]
    fn ranges_are_inclusive_and_cover_every_value() {
        let mut rng = SplitMix::new(7);
        let mut seen = [0usize; 5];
        for _ in 0..1000 {
            let v = rng.range(3, 7);
            assert!((3..=7).contains(&v));
            seen[(v - 3) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
    }

    #[test]
    fn derived_streams_differ_by_part_and_order() {
        let first = |parts: &[u64]| SplitMix::derive(9, parts).next_u64();
        assert_ne!(first(&[0, 1]), first(&[1, 0]));
        assert_ne!(first(&[0, 1]), first(&[0, 2]));
        assert_ne!(first(&[0]), SplitMix::derive(10, &[0]).next_u64());
        assert_eq!(first(&[2, 3]), first(&[2, 3]));
    }

    #[test]
    fn shuffle_permutes() {
        let mut rng = SplitMix::new(1);
        let mut items: Vec<u32> = (0..20).collect();
        rng.shuffle(&mut items);
        assert_ne!(items, (0..20).collect::<Vec<_>>());
        items.sort_unstable();
        assert_eq!(items, (0..20).collect::<Vec<_>>());
    }
}
