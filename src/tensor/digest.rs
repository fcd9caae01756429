//! Content digests: blake3, written `blake3:<64 lower-case hex>`.

use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};

/// A blake3 digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        let mut hasher = blake3::Hasher::new();
        // Large inputs hash on every core (tensor blobs reach gigabytes).
        if bytes.len() >= 1 << 20 {
            hasher.update_rayon(bytes);
        } else {
            hasher.update(bytes);
        }
        Digest(*hasher.finalize().as_bytes())
    }

    /// The digest of a file, read through a memory map and hashed on every core.
    pub fn of_file(path: &Path) -> Result<Digest> {
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_mmap_rayon(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Digest(*hasher.finalize().as_bytes()))
    }

    /// Parses `blake3:<hex>` (or bare hex), lower-case only so that one content has one name.
    pub fn parse(text: &str) -> Option<Digest> {
        let hex = text.strip_prefix("blake3:").unwrap_or(text);
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Digest(out))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 12 hex digits, for tables.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}", self.hex())
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Digest, D::Error> {
        let text = String::deserialize(d)?;
        Digest::parse(&text)
            .filter(|_| text.starts_with("blake3:"))
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{text}` is not a blake3:<64 lower-case hex> digest"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_blake3_vector_and_round_trips() {
        // blake3("") from the BLAKE3 test vectors.
        let empty = Digest::of(b"");
        assert_eq!(
            empty.hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(Digest::parse(&empty.to_string()), Some(empty));
        assert_eq!(Digest::parse(&empty.hex()), Some(empty));
        // Large inputs take the parallel path and agree with the serial one.
        let big = vec![7u8; 3 << 20];
        assert_eq!(Digest::of(&big).0, *blake3::hash(&big).as_bytes());
    }

    #[test]
    fn refuses_malformed_digests() {
        let upper = Digest::of(b"x").hex().to_uppercase();
        for bad in [
            "",
            "blake3:",
            "blake3:12",
            &upper,
            &format!("sha256:{}", Digest::of(b"x").hex()),
        ] {
            assert_eq!(Digest::parse(bad), None, "{bad}");
        }
    }
}
