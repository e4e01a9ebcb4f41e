//! [`BlobHash`]: the BLAKE3 name of a blob.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of a [`BlobHash`] in bytes.
pub const HASH_BYTES: usize = 32;

/// The BLAKE3 hash of a blob's bytes; the blob's only name.
///
/// Displays and parses as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobHash([u8; HASH_BYTES]);

impl BlobHash {
    /// Hashes `data` with BLAKE3.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// Wraps 32 raw bytes that already are a BLAKE3 hash.
    pub const fn from_bytes(bytes: [u8; HASH_BYTES]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; HASH_BYTES] {
        &self.0
    }

    /// The first 8 hex digits, for logs and tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl From<blake3::Hash> for BlobHash {
    fn from(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }
}

impl From<BlobHash> for blake3::Hash {
    fn from(hash: BlobHash) -> Self {
        blake3::Hash::from_bytes(hash.0)
    }
}

/// Hex in human-readable formats (JSON), 32 raw bytes in binary ones.
impl Serialize for BlobHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_string())
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for BlobHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; HASH_BYTES]>::deserialize(deserializer).map(Self)
        }
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobHash({})", self)
    }
}

/// Why a string is not a [`BlobHash`].
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseHashError {
    /// The string is not 64 characters long.
    #[error("a blob hash is 64 hex digits, got {0} characters")]
    Length(usize),
    /// The string holds a character that is not a hex digit.
    #[error("a blob hash is 64 hex digits: {0}")]
    Hex(#[from] hex::FromHexError),
}

impl FromStr for BlobHash {
    type Err = ParseHashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != HASH_BYTES * 2 {
            return Err(ParseHashError::Length(s.len()));
        }
        let mut bytes = [0u8; HASH_BYTES];
        hex::decode_to_slice(s, &mut bytes)?;
        Ok(Self(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let hash = BlobHash::of(b"stagecoach");
        let text = hash.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text, blake3::hash(b"stagecoach").to_hex().as_str());
        assert_eq!(text.parse::<BlobHash>(), Ok(hash));
    }

    #[test]
    fn json_is_hex_and_binary_is_raw() {
        let hash = BlobHash::of(b"json");
        let json = serde_json::to_string(&hash).expect("json");
        assert_eq!(json, format!("\"{hash}\""));
        assert_eq!(
            serde_json::from_str::<BlobHash>(&json).expect("parse"),
            hash
        );
        let bytes = crate::codec::encode(&hash).expect("encode");
        assert_eq!(bytes.len(), HASH_BYTES);
        assert_eq!(
            crate::codec::decode::<BlobHash>(&bytes, 64).expect("decode"),
            hash
        );
    }

    #[test]
    fn parse_rejects_bad_input() {
        assert_eq!("abc".parse::<BlobHash>(), Err(ParseHashError::Length(3)));
        let not_hex = "z".repeat(64);
        assert!(matches!(
            not_hex.parse::<BlobHash>(),
            Err(ParseHashError::Hex(_))
        ));
    }
}
