//! Content digests: blake3, written `blake3:<64 lower-case hex>`.

use std::fmt;
use std::fs::File;
use std::path::Path;

use memmap2::{Mmap, UncheckedAdvice};

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

    /// The digest of a file, read through a memory map and hashed on every core, a window at
    /// a time: each window's pages are dropped once hashed, so that hashing a file of
    /// gigabytes keeps resident memory at one window.
    pub fn of_file(path: &Path) -> Result<Digest> {
        Digest::of_file_in_windows(path, 64 << 20)
    }

    fn of_file_in_windows(path: &Path, window: usize) -> Result<Digest> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Ok(Digest::of(&[]));
        }
        // SAFETY: a read-only map; a file changed while it is hashed gives a digest of mixed
        // contents, which the registry's later checks of the bytes catch.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut hasher = blake3::Hasher::new();
        for (i, part) in map.chunks(window).enumerate() {
            hasher.update_rayon(part);
            // SAFETY: read-only and not borrowed past this point; dropping the pages only
            // means a later read faults them back in. Errors mean the advice was not taken.
            let _ = unsafe {
                map.unchecked_advise_range(UncheckedAdvice::DontNeed, i * window, part.len())
            };
        }
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
    fn files_hash_the_same_in_any_window() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..(3 << 20) + 12_345u32)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let path = dir.path().join("f");
        std::fs::write(&path, &bytes).unwrap();
        let whole = *blake3::hash(&bytes).as_bytes();
        for window in [4096, 1 << 20, 5 << 20] {
            assert_eq!(Digest::of_file_in_windows(&path, window).unwrap().0, whole);
        }
        std::fs::write(&path, b"").unwrap();
        assert_eq!(Digest::of_file(&path).unwrap(), Digest::of(b""));
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
