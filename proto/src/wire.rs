//! Wire messages and their framing. Pure: works on byte buffers only.
//!
//! A frame is a 4-byte little-endian length `n` followed by `n` payload bytes. The payload is a
//! 2-byte little-endian protocol version followed by one [`codec`]-encoded message. Frames are
//! bounded by [`MAX_FRAME_BYTES`]; a longer length prefix is refused before anything is
//! allocated. Bulk blob data does not travel in frames: after a [`Response::BlobPart`] header the
//! sender writes the bao-encoded ranges raw, and the receiver's verifier knows their length.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::hash::BlobHash;
use crate::manifest::{BundleId, BundleKind, SignedManifest};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest frame payload accepted, in bytes. Manifests are the largest frames.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024 + 4096;

/// Most 16 KiB groups one [`Response::BlobPart`] may carry. A server never sends more, and a
/// client refuses a part that claims more: it bounds the memory either side spends on one part
/// (about 512 KiB of data plus its parents), whatever the blob size.
pub const MAX_PART_GROUPS: u64 = 32;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Bytes of the version field at the start of every payload.
pub const VERSION_BYTES: usize = 2;

/// Largest blob accepted in one [`Request::PutBlob`], in bytes (a chunk is at most a few MiB).
pub const MAX_PUT_BLOB_BYTES: usize = 8 * 1024 * 1024;

/// A half-open range of 16 KiB group indices, `start..end`.
pub type GroupSpan = (u64, u64);

/// What a client asks on a new bidirectional stream (one request per stream).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// List the bundles the server holds.
    ListBundles,
    /// Resolve `name` (and `version`, or the newest) to a bundle id.
    Resolve {
        /// Bundle name.
        name: String,
        /// Exact version, or `None` for the newest.
        version: Option<String>,
    },
    /// Send the signed manifest of a bundle.
    GetManifest {
        /// The bundle.
        id: BundleId,
    },
    /// Send these groups of a blob as verified streams.
    GetBlob {
        /// The blob.
        hash: BlobHash,
        /// Size of the blob in bytes, from the manifest (lets a cache start a fetch upstream).
        size: u64,
        /// Group ranges wanted, ascending and disjoint.
        groups: Vec<GroupSpan>,
    },
    /// Upload one complete blob (publishers only). The server checks its hash.
    PutBlob {
        /// The blob's hash.
        hash: BlobHash,
        /// The blob's bytes.
        data: Vec<u8>,
    },
    /// Publish a bundle whose blobs were uploaded (publishers only).
    Publish {
        /// The signed manifest.
        manifest: SignedManifest,
    },
    /// Open a subscription: the server sends [`Response::Announce`] for every bundle published
    /// after `after_seq`, then keeps the stream open and sends new ones as they come.
    Subscribe {
        /// Last announcement sequence number the client has seen (0 for none).
        after_seq: u64,
    },
    /// Ask an enrollment server for a certificate (on the enrollment endpoint only).
    Enroll {
        /// The one-time secret from the token.
        secret: [u8; 32],
        /// PEM certificate signing request for the node's key.
        csr_pem: String,
    },
    /// An edge joins its site's peer list on the stager and gets the others' addresses back
    /// (the bootstrap list for peer discovery where multicast is off).
    SitePeers {
        /// Where the edge serves blobs to its peers (QUIC).
        data_addr: String,
        /// The edge's peer-discovery (libp2p) addresses.
        p2p_addrs: Vec<String>,
        /// What the edge holds now (the stager is the site's tracker).
        have: Vec<Holding>,
    },
    /// Ask an edge agent to fetch a bundle (from its own node or the origin).
    Fetch {
        /// A bundle id, `NAME@VERSION` or `NAME`.
        bundle: String,
    },
    /// Ask an edge agent to swap its OS (origin only).
    StartSwap {
        /// The OS to install.
        target: BundleId,
        /// The rescue OS.
        rescue: BundleId,
    },
}

/// An edge of the site, as the stager knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SitePeer {
    /// The edge's node id (hex).
    pub node_id: String,
    /// Where it serves blobs (QUIC).
    pub data_addr: String,
    /// Its peer-discovery (libp2p) addresses.
    pub p2p_addrs: Vec<String>,
    /// What it held when it last reported.
    pub have: Vec<Holding>,
}

/// What a node holds of one bundle: ranges `[start, end)` of the bundle's pieces (its distinct
/// chunks in manifest order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    /// Bundle id (hex).
    pub bundle: String,
    /// Held piece ranges, ascending and disjoint.
    pub pieces: Vec<(u32, u32)>,
}

/// Most bundles one node reports holding at once (newest first).
pub const MAX_HOLDINGS: usize = 16;

/// Most piece ranges one holding may list.
pub const MAX_HOLDING_RANGES: usize = 4096;

/// What a finished fetch moved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchSummary {
    /// The bundle.
    pub id: BundleId,
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Bytes received from all sources.
    pub bytes_received: u64,
    /// Of those, bytes received from peers of the site.
    pub bytes_from_peers: u64,
    /// Chunks that were already held.
    pub chunks_present: u64,
    /// Chunks in the bundle.
    pub chunks: u64,
}

/// A bundle as listed by a server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleInfo {
    /// Bundle id.
    pub id: BundleId,
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Kind.
    pub kind: BundleKind,
    /// Number of chunks.
    pub chunk_count: u64,
    /// Stored (compressed) bytes of all chunks.
    pub stored_bytes: u64,
    /// Payload bytes once unpacked.
    pub raw_bytes: u64,
    /// Announcement sequence number.
    pub seq: u64,
}

/// Machine-readable reason of a [`Response::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The thing asked for does not exist here.
    NotFound,
    /// The peer's certificate does not allow this request.
    Forbidden,
    /// The request was malformed or inconsistent.
    BadRequest,
    /// The server failed; retrying elsewhere may work.
    Internal,
    /// The server is overloaded; retry later.
    Busy,
}

/// What a server answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::ListBundles`].
    Bundles(Vec<BundleInfo>),
    /// Answer to [`Request::Resolve`].
    Resolved(BundleInfo),
    /// Answer to [`Request::GetManifest`].
    Manifest(SignedManifest),
    /// Header of one part of a blob answer: the bao encoding of exactly `groups` follows,
    /// raw, right after this frame. A blob answer is one or more parts, then [`Response::BlobEnd`].
    BlobPart {
        /// Group ranges encoded in this part, ascending and disjoint.
        groups: Vec<GroupSpan>,
    },
    /// End of a blob answer.
    BlobEnd,
    /// Answer to `PutBlob` and `Publish`.
    Ok,
    /// A newly published bundle (on a subscription stream).
    Announce(BundleInfo),
    /// Answer to [`Request::Enroll`].
    Enrolled {
        /// The node's certificate, PEM.
        cert_pem: String,
        /// The mesh CA certificate, PEM.
        ca_pem: String,
        /// The publisher's ed25519 public key, to check manifests with.
        publisher_key: [u8; 32],
        /// Where the origin's mesh endpoint listens.
        origin_addr: String,
    },
    /// Answer to [`Request::SitePeers`]: the other edges of the site.
    SitePeers(Vec<SitePeer>),
    /// Progress of a [`Request::Fetch`]; zero or more precede [`Response::Fetched`].
    FetchProgress {
        /// Bytes of the bundle now held.
        done_bytes: u64,
        /// Bytes of the bundle in all.
        total_bytes: u64,
    },
    /// A [`Request::Fetch`] finished: the bundle is held and pinned.
    Fetched(FetchSummary),
    /// A [`Request::StartSwap`] ended.
    Swapped {
        /// The swap's final step (`done`, `rolled-back`, `aborted`).
        outcome: String,
        /// Why, when it did not end on the new OS.
        failure: Option<String>,
    },
    /// The request failed.
    Error {
        /// Why, for machines.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
}

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
