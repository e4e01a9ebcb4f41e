//! The one place that knows the binary encoding (bincode 2, serde).
//!
//! Every wire message, manifest and index record goes through [`encode`] and [`decode`], so the
//! encoding can be swapped in one file. Decoding is bounded and never panics.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Upper bound on any single encoded value, in bytes. Callers pass tighter bounds.
pub const MAX_ENCODED_BYTES: usize = 64 * 1024 * 1024;

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The value could not be encoded.
    #[error("cannot encode: {0}")]
    Encode(String),
    /// The input is not a valid encoding of the expected type.
    #[error("malformed input: {0}")]
    Decode(String),
    /// The input is longer than the caller's bound.
    #[error("input is {len} bytes, more than the limit of {limit}")]
    TooLong {
        /// Length of the input.
        len: usize,
        /// The bound it broke.
        limit: usize,
    },
    /// The value ended before the input did.
    #[error("{0} trailing bytes after the value")]
    TrailingBytes(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<MAX_ENCODED_BYTES>()
}

/// Encodes `value`.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes exactly one `T` from all of `bytes`, refusing inputs longer than `limit`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, CodecError> {
    let limit = limit.min(MAX_ENCODED_BYTES);
    if bytes.len() > limit {
        return Err(CodecError::TooLong {
            len: bytes.len(),
            limit,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes(bytes.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_trailing_bytes() {
        let value = (7u32, String::from("edge"), vec![1u8, 2, 3]);
        let mut bytes = encode(&value).expect("encode");
        let back: (u32, String, Vec<u8>) = decode(&bytes, 1024).expect("decode");
        assert_eq!(back, value);
        bytes.push(0);
        assert!(matches!(
            decode::<(u32, String, Vec<u8>)>(&bytes, 1024),
            Err(CodecError::TrailingBytes(1))
        ));
        assert!(matches!(
            decode::<(u32, String, Vec<u8>)>(&bytes, 4),
            Err(CodecError::TooLong { .. })
        ));
    }

    #[test]
    fn huge_length_prefix_is_an_error_not_an_allocation() {
        // A Vec<u8> claiming u64::MAX elements.
        let bytes = [0xffu8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(decode::<Vec<u8>>(&bytes, 1024).is_err());
    }
}
