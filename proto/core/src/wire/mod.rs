//! The mesh protocol: messages, their framing, and who may send which to whom. Pure: works on
//! byte buffers and values only.
//!
//! - [`messages`]: [`Request`], [`Response`] and the types they carry.
//! - [`frame`]: a 4-byte little-endian length, a 2-byte protocol version, one
//!   [`crate::codec`]-encoded message; bounded by [`MAX_FRAME_BYTES`].
//! - [`authorize`]: the one table of which peer role may send which request to which server
//!   role, used by every server before it dispatches.
//! - [`bounds`] (a re-export of [`crate::bounds`]): the bounded deserializers of every
//!   variable-length field.
//!
//! Bulk blob data does not travel in frames: after a [`Response::BlobPart`] header the sender
//! writes the bao-encoded ranges raw, and the receiver's verifier knows their length.

pub mod authorize;
pub mod frame;
pub mod messages;

pub use crate::bounds;
pub use crate::bounds::{
    MAX_DOCUMENT_BYTES, MAX_FACTS, MAX_MESSAGE_BYTES, MAX_NAME_BYTES, MAX_NODE_BUNDLES,
};
pub use authorize::{authorize, Access, Refusal, RequestKind};
pub use frame::{
    decode_frame, decode_length, decode_payload, encode_frame, FrameError, LENGTH_PREFIX_BYTES,
    MAX_FRAME_BYTES, PROTOCOL_VERSION, VERSION_BYTES,
};
pub use messages::*;
