//! Element types as safetensors names them, and conversion to and from f32.

use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};

/// A safetensors element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs, non_camel_case_types)]
pub enum Dtype {
    BOOL,
    U8,
    I8,
    U16,
    I16,
    F16,
    BF16,
    U32,
    I32,
    F32,
    U64,
    I64,
    F64,
    F8_E4M3,
    F8_E5M2,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::BOOL | Dtype::U8 | Dtype::I8 | Dtype::F8_E4M3 | Dtype::F8_E5M2 => 1,
            Dtype::U16 | Dtype::I16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 4,
            Dtype::U64 | Dtype::I64 | Dtype::F64 => 8,
        }
    }

    /// The name used in safetensors headers (`F32`, `BF16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::BOOL => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::U16 => "U16",
            Dtype::I16 => "I16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::U32 => "U32",
            Dtype::I32 => "I32",
            Dtype::F32 => "F32",
            Dtype::U64 => "U64",
            Dtype::I64 => "I64",
            Dtype::F64 => "F64",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::F8_E5M2 => "F8_E5M2",
        }
    }

    /// Whether mmx can do arithmetic on it (it converts to f32 exactly enough).
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
    }

    /// Whether mmx can write it as a merge output.
    pub fn is_output(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32)
    }

    /// Parses the spellings users write in recipes: `float32`, `float16`, `bfloat16`, `f32`, ...
    pub fn from_user(name: &str) -> Option<Dtype> {
        match name.to_ascii_lowercase().as_str() {
            "float32" | "f32" | "fp32" => Some(Dtype::F32),
            "float16" | "f16" | "fp16" | "half" => Some(Dtype::F16),
            "bfloat16" | "bf16" => Some(Dtype::BF16),
            _ => None,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Converts little-endian bytes of a float dtype into f32 values; `None` for non-float dtypes.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let out = match dtype {
        Dtype::F32 => decode(bytes, |c: &[u8; 4]| f32::from_le_bytes(*c)),
        // bf16 is the upper half of an f32: widening is a shift, exact for every value.
        Dtype::BF16 => decode(bytes, |c: &[u8; 2]| {
            f32::from_bits(u32::from(u16::from_le_bytes(*c)) << 16)
        }),
        Dtype::F16 => {
            let halves: Vec<half::f16> = bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect();
            let mut out = vec![0f32; halves.len()];
            // Uses the CPU's conversion instructions where it has them.
            halves.convert_to_f32_slice(&mut out);
            out
        }
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_le_bytes(b) as f32
            })
            .collect(),
        _ => return None,
    };
    Some(out)
}

/// Decodes fixed-size little-endian elements (`N` bytes each) without zeroing the buffer first.
fn decode<const N: usize>(bytes: &[u8], element: impl Fn(&[u8; N]) -> f32) -> Vec<f32> {
    let (chunks, _) = bytes.as_chunks::<N>();
    let n = chunks.len();
    let mut out = Vec::with_capacity(n);
    for (o, c) in out.spare_capacity_mut().iter_mut().zip(chunks) {
        o.write(element(c));
    }
    // SAFETY: the loop wrote all `n` elements: `bytes` holds `n` chunks of `N` bytes and the
    // spare capacity is at least `n`.
    unsafe { out.set_len(n) };
    out
}

/// Rounds a finite f32 to bf16 bits, to nearest with ties to even (as PyTorch does); NaN stays
/// NaN.
#[inline]
fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// Encodes f32 values as little-endian bytes of an output dtype (round to nearest even, as
/// PyTorch's casts do); `None` for a dtype mmx does not write.
pub fn from_f32(dtype: Dtype, values: &[f32]) -> Option<Vec<u8>> {
    // Arrays collected from exact-size iterators, then flattened: one pass, no zeroing.
    let out = match dtype {
        Dtype::F32 => values
            .iter()
            .map(|v| v.to_le_bytes())
            .collect::<Vec<[u8; 4]>>()
            .into_flattened(),
        Dtype::F16 => {
            let mut halves = vec![half::f16::ZERO; values.len()];
            halves.convert_from_f32_slice(values);
            halves
                .iter()
                .map(|h| h.to_le_bytes())
                .collect::<Vec<[u8; 2]>>()
                .into_flattened()
        }
        Dtype::BF16 => values
            .iter()
            .map(|v| bf16_bits(*v).to_le_bytes())
            .collect::<Vec<[u8; 2]>>()
            .into_flattened(),
        _ => return None,
    };
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_exactly_representable_values() {
        let values = [0.0f32, -1.5, 2.0, 0.25, -1024.0];
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let bytes = from_f32(dtype, &values).unwrap();
            assert_eq!(bytes.len(), values.len() * dtype.size());
            assert_eq!(to_f32(dtype, &bytes).unwrap(), values, "{dtype}");
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to even (1).
        let halfway = 1.0 + 2f32.powi(-8);
        let bytes = from_f32(Dtype::BF16, &[halfway]).unwrap();
        assert_eq!(to_f32(Dtype::BF16, &bytes).unwrap(), [1.0]);
        let above = 1.0 + 2f32.powi(-8) + 2f32.powi(-12);
        let bytes = from_f32(Dtype::BF16, &[above]).unwrap();
        assert_eq!(to_f32(Dtype::BF16, &bytes).unwrap(), [1.0 + 2f32.powi(-7)]);
    }

    proptest::proptest! {
        /// The fast bf16 paths agree bit for bit with the `half` crate's conversions.
        #[test]
        fn bf16_conversions_match_half(bits in proptest::num::u32::ANY) {
            let v = f32::from_bits(bits);
            let ours = from_f32(Dtype::BF16, &[v]).unwrap();
            let theirs = half::bf16::from_f32(v);
            if v.is_nan() {
                proptest::prop_assert!(to_f32(Dtype::BF16, &ours).unwrap()[0].is_nan());
            } else {
                proptest::prop_assert_eq!(ours, theirs.to_le_bytes().to_vec());
            }
            let back = to_f32(Dtype::BF16, &theirs.to_le_bytes()).unwrap()[0];
            proptest::prop_assert_eq!(back.to_bits(), theirs.to_f32().to_bits());
        }

        /// The f16 paths agree with `half`'s scalar conversions.
        #[test]
        fn f16_conversions_match_half(v in proptest::num::f32::ANY) {
            let ours = from_f32(Dtype::F16, &[v]).unwrap();
            let theirs = half::f16::from_f32(v);
            if !v.is_nan() {
                proptest::prop_assert_eq!(&ours, &theirs.to_le_bytes().to_vec());
                let back = to_f32(Dtype::F16, &ours).unwrap()[0];
                proptest::prop_assert_eq!(back.to_bits(), theirs.to_f32().to_bits());
            }
        }
    }

    #[test]
    fn reads_f64_and_refuses_integers() {
        let bytes: Vec<u8> = [1.25f64, -3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(to_f32(Dtype::F64, &bytes).unwrap(), [1.25, -3.0]);
        assert!(to_f32(Dtype::I64, &bytes).is_none());
        assert!(from_f32(Dtype::F64, &[1.0]).is_none());
    }

    #[test]
    fn parses_user_spellings() {
        assert_eq!(Dtype::from_user("bfloat16"), Some(Dtype::BF16));
        assert_eq!(Dtype::from_user("Float16"), Some(Dtype::F16));
        assert_eq!(Dtype::from_user("float32"), Some(Dtype::F32));
        assert_eq!(Dtype::from_user("int8"), None);
    }
}
