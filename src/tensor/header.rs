//! The safetensors header: parsed from untrusted bytes into a wire form, then validated into a
//! [`Header`] whose tensors tile the data section exactly.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Dtype;
pub use crate::error::HeaderError;

/// The largest header mmx accepts (the reference implementation uses the same cap).
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// One tensor's entry in a validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Byte range in the data section.
    pub start: usize,
    /// End of the byte range (exclusive).
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A validated safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// Free-form string metadata (`__metadata__`).
    pub metadata: BTreeMap<String, String>,
    /// Where the data section starts in the file (8 + header length).
    pub data_start: usize,
}

#[derive(Deserialize)]
struct WireTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Parses and validates the header of a safetensors file given its first bytes (at least the
/// header) and its total length.
pub fn parse_header(bytes: &[u8], file_len: u64) -> Result<Header, HeaderError> {
    if file_len < 8 || bytes.len() < 8 {
        return Err(HeaderError::TooShort { len: file_len });
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[..8]);
    let len = u64::from_le_bytes(len_bytes);
    if len > MAX_HEADER_BYTES {
        return Err(HeaderError::HeaderTooLarge {
            len,
            cap: MAX_HEADER_BYTES,
        });
    }
    // len <= 100 MiB, so these additions cannot overflow.
    if 8 + len > file_len || 8 + len > bytes.len() as u64 {
        return Err(HeaderError::HeaderOutOfBounds { len, file_len });
    }
    let json = &bytes[8..8 + len as usize];
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| HeaderError::Json(e.to_string()))?;

    let mut metadata = BTreeMap::new();
    let mut entries = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            metadata = serde_json::from_value(value)
                .map_err(|e| HeaderError::Json(format!("`__metadata__`: {e}")))?;
            continue;
        }
        let wire: WireTensor = serde_json::from_value(value)
            .map_err(|e| HeaderError::Json(format!("tensor `{name}`: {e}")))?;
        entries.push((name, wire));
    }

    let mut tensors = BTreeMap::new();
    let mut spans = Vec::with_capacity(entries.len());
    for (name, wire) in entries {
        let dtype: Dtype = serde_json::from_value(serde_json::Value::String(wire.dtype.clone()))
            .map_err(|_| HeaderError::UnknownDtype {
                tensor: name.clone(),
                dtype: wire.dtype.clone(),
            })?;
        let (start, end) = wire.data_offsets;
        if end < start {
            return Err(HeaderError::ReversedOffsets {
                tensor: name,
                start,
                end,
            });
        }
        let expected = wire
            .shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| HeaderError::Overflow {
                tensor: name.clone(),
            })?;
        if expected != end - start {
            return Err(HeaderError::SizeMismatch {
                tensor: name,
                expected,
                actual: end - start,
            });
        }
        let shape = wire
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| HeaderError::Overflow {
                tensor: name.clone(),
            })?;
        spans.push((start, end, name.clone()));
        tensors.insert(
            name,
            TensorInfo {
                dtype,
                shape,
                // Both fit in usize once checked against the file length below.
                start: start as usize,
                end: end as usize,
            },
        );
    }

    spans.sort();
    let mut cursor = 0u64;
    for (start, end, name) in &spans {
        if *start != cursor {
            return Err(HeaderError::NotContiguous {
                tensor: name.clone(),
                start: *start,
                expected: cursor,
            });
        }
        cursor = *end;
    }
    let data_len = file_len - 8 - len;
    if cursor != data_len {
        return Err(HeaderError::DataLength {
            expected: cursor,
            actual: data_len,
        });
    }
    Ok(Header {
        tensors,
        metadata,
        data_start: 8 + len as usize,
    })
}

/// Serialises a header for tensors laid out in the given order, padded with spaces to a multiple
/// of 8 bytes as the reference writer does. Returns the full prefix (length + JSON).
pub fn encode_header(
    tensors: &[(&str, Dtype, &[usize], usize, usize)],
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert(
            "__metadata__".to_string(),
            serde_json::to_value(metadata).expect("string map serialises"),
        );
    }
    for (name, dtype, shape, start, end) in tensors {
        map.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [start, end]}),
        );
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map)).expect("JSON serialises");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend(std::iter::repeat_n(0u8, data_len));
        out
    }

    fn check(header: &str, data_len: usize) -> Result<Header, HeaderError> {
        let bytes = file(header, data_len);
        parse_header(&bytes, bytes.len() as u64)
    }

    #[test]
    fn accepts_a_valid_header() {
        let h = check(
            r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}}"#,
            22,
        )
        .unwrap();
        assert_eq!(h.tensors["b"].shape, vec![3]);
        assert_eq!(h.tensors["b"].start, 16);
        assert_eq!(h.metadata["format"], "pt");
    }

    #[test]
    fn refuses_each_malformation_with_its_own_error() {
        let t = |s: &str| format!(r#"{{"a":{s}}}"#);
        assert!(matches!(
            check(&t(r#"{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#), 7),
            Err(HeaderError::DataLength {
                expected: 8,
                actual: 7
            })
        ));
        assert!(matches!(
            check(&t(r#"{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#), 9),
            Err(HeaderError::DataLength { .. })
        ));
        assert!(matches!(
            check(&t(r#"{"dtype":"F32","shape":[3],"data_offsets":[0,8]}"#), 8),
            Err(HeaderError::SizeMismatch { .. })
        ));
        assert!(matches!(
            check(&t(r#"{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}"#), 8),
            Err(HeaderError::UnknownDtype { .. })
        ));
        assert!(matches!(
            check(&t(r#"{"dtype":"F32","shape":[2],"data_offsets":[8,0]}"#), 8),
            Err(HeaderError::ReversedOffsets { .. })
        ));
        assert!(matches!(
            check(
                &t(r#"{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}"#),
                8
            ),
            Err(HeaderError::Overflow { .. })
        ));
        assert!(matches!(check("not json", 0), Err(HeaderError::Json(_))));
    }

    #[test]
    fn refuses_overlap_and_gaps() {
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        assert!(matches!(
            check(overlap, 12),
            Err(HeaderError::NotContiguous {
                start: 4,
                expected: 8,
                ..
            })
        ));
        let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        assert!(matches!(
            check(gap, 12),
            Err(HeaderError::NotContiguous { .. })
        ));
    }

    #[test]
    fn refuses_bad_lengths() {
        assert!(matches!(
            parse_header(&[1, 2, 3], 3),
            Err(HeaderError::TooShort { .. })
        ));
        let mut huge = (MAX_HEADER_BYTES + 1).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(
            parse_header(&huge, huge.len() as u64),
            Err(HeaderError::HeaderTooLarge { .. })
        ));
        let mut short = 100u64.to_le_bytes().to_vec();
        short.extend_from_slice(b"{}");
        assert!(matches!(
            parse_header(&short, short.len() as u64),
            Err(HeaderError::HeaderOutOfBounds { .. })
        ));
    }

    #[test]
    fn encoded_headers_parse_back() {
        let shape_a = [2usize, 3];
        let shape_b = [5usize];
        let bytes = encode_header(
            &[
                ("a", Dtype::F32, &shape_a, 0, 24),
                ("b", Dtype::F16, &shape_b, 24, 34),
            ],
            &BTreeMap::from([("format".to_string(), "pt".to_string())]),
        );
        assert_eq!((bytes.len() - 8) % 8, 0);
        let mut file = bytes.clone();
        file.extend(std::iter::repeat_n(0u8, 34));
        let h = parse_header(&file, file.len() as u64).unwrap();
        assert_eq!(h.tensors["a"].shape, shape_a);
        assert_eq!(h.tensors["b"].end, 34);
        assert_eq!(h.data_start, bytes.len());
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the parser.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse_header(&bytes, bytes.len() as u64);
        }

        /// Arbitrary text in place of the header JSON never panics the parser.
        #[test]
        fn arbitrary_json_after_valid_length_never_panics(s in "\\PC{0,200}") {
            let bytes = file(&s, 0);
            let _ = parse_header(&bytes, bytes.len() as u64);
        }
    }
}
