//! Frames: how one message travels as bytes. Pure: works on byte buffers only.
//!
//! A frame is a 4-byte little-endian length `n` followed by `n` payload bytes. The payload is a
//! 2-byte little-endian protocol version followed by one [`codec`]-encoded message. Frames are
//! bounded by [`MAX_FRAME_BYTES`]; a longer length prefix is refused before anything is
//! allocated.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{self, CodecError};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest frame payload accepted, in bytes. Manifests are the largest frames.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024 + 4096;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Bytes of the version field at the start of every payload.
pub const VERSION_BYTES: usize = 2;

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds the bound.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The frame is too short to hold a version.
    #[error("frame of {0} bytes is too short to hold a protocol version")]
    TooShort(usize),
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {found}, this node speaks {PROTOCOL_VERSION}")]
    Version {
        /// The version found.
        found: u16,
    },
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(#[from] CodecError),
}

/// Encodes `message` as one complete frame (length prefix, version, payload).
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let body = codec::encode(message)?;
    let len = body.len() + VERSION_BYTES;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_BYTES,
        });
    }
    let mut frame = Vec::with_capacity(LENGTH_PREFIX_BYTES + len);
    // `len` is at most MAX_FRAME_BYTES, which fits in u32.
    frame.extend_from_slice(&(len as u32).to_le_bytes());
    frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Reads a length prefix and checks it against `max` (at most [`MAX_FRAME_BYTES`]).
pub fn decode_length(prefix: [u8; LENGTH_PREFIX_BYTES], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as usize;
    let max = max.min(MAX_FRAME_BYTES);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if len < VERSION_BYTES {
        return Err(FrameError::TooShort(len));
    }
    Ok(len)
}

/// Decodes a frame payload (the bytes after the length prefix).
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.len() < VERSION_BYTES {
        return Err(FrameError::TooShort(payload.len()));
    }
    let found = u16::from_le_bytes([payload[0], payload[1]]);
    if found != PROTOCOL_VERSION {
        return Err(FrameError::Version { found });
    }
    Ok(codec::decode(&payload[VERSION_BYTES..], MAX_FRAME_BYTES)?)
}

/// Decodes the first complete frame in `buf`. Returns the message and the bytes consumed, or
/// `None` when `buf` does not yet hold a whole frame.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    let Some(prefix) = buf.get(..LENGTH_PREFIX_BYTES) else {
        return Ok(None);
    };
    let mut bytes = [0u8; LENGTH_PREFIX_BYTES];
    bytes.copy_from_slice(prefix);
    let len = decode_length(bytes, MAX_FRAME_BYTES)?;
    let end = LENGTH_PREFIX_BYTES + len;
    let Some(payload) = buf.get(LENGTH_PREFIX_BYTES..end) else {
        return Ok(None);
    };
    Ok(Some((decode_payload(payload)?, end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::BlobHash;
    use crate::wire::Request;
    use crate::wire::Response;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip() {
        let request = Request::GetBlob {
            hash: BlobHash::of(b"x"),
            size: 1 << 20,
            groups: vec![(0, 3), (7, 64)],
        };
        let frame = encode_frame(&request).expect("encode");
        let (back, used): (Request, usize) = decode_frame(&frame).expect("decode").expect("whole");
        assert_eq!(back, request);
        assert_eq!(used, frame.len());
        // Every strict prefix is "not yet".
        for cut in 0..frame.len() {
            assert!(decode_frame::<Request>(&frame[..cut])
                .expect("prefix")
                .is_none());
        }
    }

    #[test]
    fn oversized_length_prefix_is_refused() {
        let mut frame = vec![0xff, 0xff, 0xff, 0x7f];
        frame.extend_from_slice(&[1, 0, 0]);
        let err = decode_frame::<Request>(&frame).expect_err("too large");
        assert!(matches!(err, FrameError::TooLarge { .. }));
        assert!(err.to_string().contains("exceeds the maximum"));
    }

    #[test]
    fn other_protocol_version_is_named() {
        let mut frame = encode_frame(&Request::ListBundles).expect("encode");
        frame[4] = 9;
        let err = decode_frame::<Request>(&frame).expect_err("version");
        assert!(matches!(err, FrameError::Version { found: 9 }));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(100_000))]
        #[test]
        fn frame_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame::<Request>(&bytes);
            let _ = decode_frame::<Response>(&bytes);
            let _ = decode_payload::<Request>(&bytes);
        }

        #[test]
        fn valid_prefix_then_garbage_never_panics(
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut frame = ((body.len() + 2) as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            frame.extend_from_slice(&body);
            let _ = decode_frame::<Request>(&frame);
            let _ = decode_frame::<Response>(&frame);
        }
    }
}
