//! SplitMix64, the one random generator of mmx, fixed here so that what a seed makes (masks,
//! synthetic data, planted problems, LoRA initialisations, sampled trials) depends on the seed
//! and nothing else (not the platform, not a dependency's version): [`SplitMix`], a sequential
//! stream, and its parts for counter-based draws ([`mix64`], [`GOLDEN`], and [`fnv1a`] to key
//! streams by name; `merge::rng::MaskRng` draws masks with them).

/// The golden-ratio increment of SplitMix64.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01B3;

/// A SplitMix64 stream.
#[derive(Debug, Clone)]
pub struct SplitMix {
    state: u64,
}

impl SplitMix {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> SplitMix {
        SplitMix { state: seed }
    }

    /// The stream for one use of a seed: `parts` (a specialty, a split) select independent
    /// streams, so that drawing more cases for one never shifts another's.
    pub fn derive(seed: u64, parts: &[u64]) -> SplitMix {
        let key = parts
            .iter()
            .fold(mix64(seed), |key, &part| mix64(key ^ mix64(part)));
        SplitMix::new(key)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix64(self.state)
    }

    /// The next number in `[0, 1)`, from the top 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A uniform integer in `0..n`, without modulo bias; `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
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
    pub fn range(&mut self, lo: u32, hi: u32) -> u32 {
        debug_assert!(lo <= hi, "empty range {lo}..={hi}");
        // The draw is below hi - lo + 1 <= 2^32, so it fits in u32 after adding lo.
        lo + self.below(u64::from(hi - lo) + 1) as u32
    }

    /// True with probability `1 / n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// A uniformly chosen element of a non-empty slice.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        // usize -> u64 -> usize round-trips: the index is below items.len().
        items[self.below(items.len() as u64) as usize]
    }

    /// Shuffles `items` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// The SplitMix64 output function (Stafford's mix 13), a bijection on `u64`.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, 64-bit.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
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

    #[test]
    fn fnv1a_matches_published_vectors() {
        // Test vectors from the FNV reference (isthe.com/chongo/tech/comp/fnv).
        assert_eq!(fnv1a(b""), 0xCBF2_9CE4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xAF63_DC4C_8601_EC8C);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_F739_67E8);
    }

    #[test]
    fn unit_takes_the_top_53_bits() {
        // 6457827717110365317 >> 11, over 2^53.
        let mut rng = SplitMix::new(1_234_567);
        assert_eq!(
            rng.unit(),
            (6_457_827_717_110_365_317u64 >> 11) as f64 / (1u64 << 53) as f64
        );
    }
}
