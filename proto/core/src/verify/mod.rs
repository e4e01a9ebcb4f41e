//! Verified streaming: BLAKE3 trees at 16 KiB groups (bao-tree). Pure: no I/O of its own.
//!
//! A blob of `size` bytes is cut into groups of [`GROUP_BYTES`] (the last one may be shorter; an
//! empty blob has one empty group). Its BLAKE3 hash is the root of a binary tree over those
//! groups; the *outboard* holds the tree's inner nodes (64 bytes per pair of children) in post
//! order, about 0.4 % of the data.
//!
//! A *response stream* for a set of groups ([`GroupRanges`]) is the bao format that bao-tree and
//! iroh use: an 8-byte little-endian size header, then in pre order every parent pair on the
//! path to a requested group, and each requested group's bytes. [`encode_ranges`] writes one;
//! [`Decoder`] reads one without doing I/O itself (you push exactly [`Decoder::needed`] bytes at a
//! time, in the style of `quinn-proto`), and hands out a group's bytes only after they hashed to
//! the expected value. Errors name the failing group so a caller can ban the source.
//!
//! The size header is a claim: it is only proven once the blob's last group verifies (or when it
//! matches a size the caller already trusts, see [`Decoder::with_size`]).
//!
//! The module's parts: [`ranges`] (which groups), [`outboard`] (the tree's inner nodes),
//! [`encode`] (writing a stream), [`decoder`] (reading one), and `walk`, the one walk of the
//! hash tree that the encoder and the decoder share.

use bao_tree::BlockSize;

pub mod decoder;
pub mod encode;
pub mod outboard;
pub mod ranges;
mod walk;

pub use decoder::{
    decode_from_reader, DecodeItem, Decoder, VerifiedGroup, VerifiedParent, VerifyError,
};
pub use encode::{
    encode_ranges, encode_ranges_checked, encode_ranges_from, encoded_len, servable_ranges,
    DataSource, EncodeError, GroupCheck, OutboardSource,
};
pub use outboard::{compute_outboard, outboard_offset, outboard_size, Outboard};
pub use ranges::GroupRanges;

/// Bytes in one verification group: the unit that is hashed, verified, stored and resumed.
pub const GROUP_BYTES: u64 = 16 * 1024;

/// Bytes in one BLAKE3 chunk.
const CHUNK_BYTES: u64 = 1024;

/// BLAKE3 chunks per group (16 KiB / 1 KiB).
const CHUNKS_PER_GROUP: u64 = GROUP_BYTES / CHUNK_BYTES;

/// log2 of [`CHUNKS_PER_GROUP`], the bao-tree block size.
const GROUP_CHUNK_LOG: u8 = 4;

/// Bytes of the little-endian size header that starts every response stream.
pub const SIZE_HEADER_BYTES: usize = 8;

/// Bytes of one parent entry (left and right child hash) in a stream or an outboard.
pub const PARENT_BYTES: usize = 64;

/// Largest blob size a stream may claim, in bytes (1 TiB). Larger claims are refused before any
/// tree is built for them.
pub const MAX_BLOB_BYTES: u64 = 1 << 40;

/// Depth bound of the verification stack: a tree over at most 2^26 groups has fewer levels.
const STACK_CAPACITY: usize = 64;

/// The bao-tree block size for 16 KiB groups (`BlockSize::from_chunk_log(4)`).
pub fn block_size() -> BlockSize {
    BlockSize::from_chunk_log(GROUP_CHUNK_LOG)
}

/// Number of groups in a blob of `size` bytes; an empty blob has one (empty) group.
pub fn group_count(size: u64) -> u64 {
    size.div_ceil(GROUP_BYTES).max(1)
}

/// Length in bytes of group `index` of a blob of `size` bytes, or `None` if there is no such group.
pub fn group_len(size: u64, index: u64) -> Option<usize> {
    if index >= group_count(size) {
        return None;
    }
    let start = index * GROUP_BYTES;
    // A group is at most 16 KiB, so the cast cannot truncate.
    Some((size - start).min(GROUP_BYTES) as usize)
}

#[cfg(test)]
mod tests;
