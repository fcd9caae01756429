//! Counter-based random masks for the stochastic merge methods (DARE, DELLA).
//!
//! [`MaskRng`] maps an element index to a random number with no state: the value for
//! element `i` depends only on `(seed, tensor name, expert index, i)`. Masks therefore do
//! not depend on thread count, chunking, visiting order or device, and a GPU kernel can
//! reproduce them bit for bit: the whole path is 64-bit integer arithmetic plus one exact
//! integer-to-float conversion.
//!
//! The mix, fixed here because masks are part of a merge's reproducible output:
//! - `fnv` = FNV-1a 64 over the tensor name's UTF-8 bytes (offset basis
//!   `0xCBF29CE484222325`, prime `0x100000001B3`);
//! - `key` = `mix64(mix64(mix64(seed) ^ fnv) ^ expert)`;
//! - `bits(i)` = `mix64(key + (i + 1) * 0x9E3779B97F4A7C15)` (wrapping), which is element
//!   `i` of a SplitMix64 stream seeded with `key`;
//! - `uniform(i)` = `(bits(i) >> 40) / 2^24`, in `[0, 1)`.
//!
//! `mix64` is the SplitMix64 output finaliser (Stafford's variant 13). It is a bijection,
//! so distinct inputs at each step give distinct keys.

use crate::rng::{fnv1a, mix64, GOLDEN};

/// 2^-24: scales a 24-bit integer into `[0, 1)` exactly.
const INV_2_POW_24: f32 = 1.0 / 16_777_216.0;

/// A stateless generator of per-element random numbers for one (seed, tensor, expert).
///
/// `MaskRng::new(seed, name, expert).uniform(i)` is the same number on every call, thread
/// and device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskRng {
    key: u64,
}

impl MaskRng {
    /// Derives the generator for `expert` (its index in the recipe) on tensor `tensor`.
    pub fn new(seed: u64, tensor: &str, expert: usize) -> MaskRng {
        let name = fnv1a(tensor.as_bytes());
        // usize -> u64 never truncates on the 32- and 64-bit targets Rust supports.
        let key = mix64(mix64(mix64(seed) ^ name) ^ expert as u64);
        MaskRng { key }
    }

    /// The key of the stream (what a GPU kernel needs to draw the same numbers).
    pub fn key(&self) -> u64 {
        self.key
    }

    /// 64 random bits for element `index`.
    #[inline]
    pub fn bits(&self, index: u64) -> u64 {
        mix64(
            self.key
                .wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN)),
        )
    }

    /// A uniform number in `[0, 1)` for element `index`: the top 24 bits of
    /// [`bits`](Self::bits), so every value is exactly representable in `f32`.
    #[inline]
    pub fn uniform(&self, index: u64) -> f32 {
        (self.bits(index) >> 40) as f32 * INV_2_POW_24
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bits_is_the_splitmix64_stream_of_the_key() {
        // Published SplitMix64 outputs: seed 0 starts with 0xE220A8397B1DCDAF; seed
        // 1234567 starts 6457827717110365317, 3203168211198807973, 9817491932198370423.
        assert_eq!(MaskRng { key: 0 }.bits(0), 0xE220_A839_7B1D_CDAF);
        let rng = MaskRng { key: 1_234_567 };
        assert_eq!(
            [rng.bits(0), rng.bits(1), rng.bits(2)],
            [
                6_457_827_717_110_365_317,
                3_203_168_211_198_807_973,
                9_817_491_932_198_370_423
            ]
        );
    }

    #[test]
    fn key_follows_the_documented_mix() {
        let expected = mix64(mix64(mix64(7) ^ fnv1a(b"w")) ^ 3);
        assert_eq!(MaskRng::new(7, "w", 3).key, expected);
    }

    #[test]
    fn uniform_takes_the_top_24_bits() {
        // 0xE220A8397B1DCDAF >> 40 = 0xE220A8 = 14819496; / 2^24 = 0.883310318...
        assert_eq!(MaskRng { key: 0 }.uniform(0), 14_819_496.0 / 16_777_216.0);
    }

    #[test]
    fn every_input_changes_the_stream() {
        let base = MaskRng::new(1, "a.weight", 0);
        let others = [
            MaskRng::new(2, "a.weight", 0),
            MaskRng::new(1, "b.weight", 0),
            MaskRng::new(1, "a.weight", 1),
        ];
        for other in others {
            assert_ne!(base, other);
            let same = (0..64).filter(|&i| base.bits(i) == other.bits(i)).count();
            assert_eq!(same, 0);
        }
    }

    #[test]
    fn uniform_is_roughly_uniform() {
        // 10 buckets of 100k draws: each holds 10k ± 5 sigma (sigma ~ 95).
        let rng = MaskRng::new(9, "t", 0);
        let mut buckets = [0u32; 10];
        for i in 0..100_000 {
            let u = rng.uniform(i);
            assert!((0.0..1.0).contains(&u));
            buckets[(u * 10.0) as usize] += 1;
        }
        for count in buckets {
            assert!((9_525..=10_475).contains(&count), "{buckets:?}");
        }
    }

    proptest! {
        #[test]
        fn value_depends_only_on_its_inputs(seed: u64, name in "[a-z.0-9]{0,24}", expert in 0usize..64, index: u64) {
            let a = MaskRng::new(seed, &name, expert);
            let b = MaskRng::new(seed, &name, expert);
            prop_assert_eq!(a.bits(index), b.bits(index));
            prop_assert!(a.uniform(index) < 1.0);
        }
    }
}
