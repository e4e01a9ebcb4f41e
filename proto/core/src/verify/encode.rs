//! Writing a response stream: the size header, then in pre order the parents on the path to
//! each requested group and the groups, every item checked against the blob's hash first.

use std::io::{self, Write};

use bao_tree::io::sync::truncate_ranges;
use bao_tree::iter::BaoChunk;
use bao_tree::BaoTree;

use super::walk::{first_group, HashStack};
use super::{
    block_size, GroupRanges, CHUNKS_PER_GROUP, GROUP_BYTES, MAX_BLOB_BYTES, PARENT_BYTES,
    SIZE_HEADER_BYTES,
};
use crate::hash::BlobHash;

/// Random access to a blob's bytes, for encoding. Implemented for byte slices here and for files
/// by the store.
pub trait DataSource {
    /// Returns `len` bytes at `offset`, either borrowed from `self` or read into `scratch` (which
    /// is at least `len` bytes long). Fails with `UnexpectedEof` past the end.
    fn read_at<'a>(
        &'a self,
        offset: u64,
        len: usize,
        scratch: &'a mut [u8],
    ) -> io::Result<&'a [u8]>;
}

impl DataSource for [u8] {
    fn read_at<'a>(
        &'a self,
        offset: u64,
        len: usize,
        _scratch: &'a mut [u8],
    ) -> io::Result<&'a [u8]> {
        usize::try_from(offset)
            .ok()
            .and_then(|start| self.get(start..start.checked_add(len)?))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{len} bytes at {offset} lie beyond the {} bytes held",
                        self.len()
                    ),
                )
            })
    }
}

/// Random access to a post-order outboard, for encoding. Implemented for byte slices here and for
/// files by the store.
pub trait OutboardSource {
    /// Returns the 64-byte parent entry at byte `offset`.
    fn read_pair(&self, offset: u64) -> io::Result<[u8; PARENT_BYTES]>;
}

impl OutboardSource for [u8] {
    fn read_pair(&self, offset: u64) -> io::Result<[u8; PARENT_BYTES]> {
        usize::try_from(offset)
            .ok()
            .and_then(|start| self.get(start..start.checked_add(PARENT_BYTES)?))
            .and_then(|bytes| <[u8; PARENT_BYTES]>::try_from(bytes).ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "outboard entry at {offset} lies beyond the {} bytes held",
                        self.len()
                    ),
                )
            })
    }
}

/// Why a response stream could not be written.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The outboard does not have the size the data needs.
    #[error("outboard is {actual} bytes but a {size}-byte blob needs {expected}: it belongs to another blob")]
    OutboardSize {
        /// Blob size in bytes.
        size: u64,
        /// Outboard size the blob needs.
        expected: u64,
        /// Outboard size given.
        actual: u64,
    },
    /// The blob is larger than [`MAX_BLOB_BYTES`].
    #[error("blob of {size} bytes is larger than the limit of {MAX_BLOB_BYTES} bytes")]
    TooLarge {
        /// Blob size in bytes.
        size: u64,
    },
    /// Reading a group's bytes failed.
    #[error("cannot read group {group} (bytes from {offset}) of the blob: {source}")]
    ReadData {
        /// Group index.
        group: u64,
        /// Byte offset of the group.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Reading a parent entry failed.
    #[error("cannot read the outboard entry above group {group}: {source}")]
    ReadOutboard {
        /// First group under the parent.
        group: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The local bytes of a group do not hash to the tree: the stored copy is damaged.
    #[error("stored bytes of group {group} (bytes from {offset}) do not match the blob hash: the local copy is corrupt; delete and refetch it")]
    DataCorrupt {
        /// Group index.
        group: u64,
        /// Byte offset of the group.
        offset: u64,
    },
    /// A stored parent entry does not hash to the tree: the stored outboard is damaged or was
    /// never written for this part of the blob.
    #[error("stored outboard entry above group {group} does not match the blob hash: the local copy is corrupt or incomplete there")]
    OutboardCorrupt {
        /// First group under the parent.
        group: u64,
    },
    /// The traversal reached part of a group (a bug: requests are always whole groups).
    #[error("internal error: the response would split group {group}; please report this")]
    Unaligned {
        /// The group.
        group: u64,
    },
    /// Writing the stream failed (peer gone, disk full, ...).
    #[error("cannot write the response stream: {0}")]
    Write(#[source] io::Error),
}

/// Writes the response stream for `ranges` of a complete blob held in memory.
///
/// `outboard` must be the blob's post-order outboard ([`compute_outboard`]). Every group and
/// parent is checked against `hash` before it is written, so a corrupted copy is reported
/// ([`EncodeError::DataCorrupt`]) instead of being sent. Returns the bytes written.
pub fn encode_ranges<W: Write + ?Sized>(
    data: &[u8],
    outboard: &[u8],
    hash: BlobHash,
    ranges: &GroupRanges,
    out: &mut W,
) -> Result<u64, EncodeError> {
    let size = data.len() as u64;
    encode_ranges_from(data, outboard, hash, size, ranges, out)
}

/// Writes the response stream for `ranges` of a blob of `size` bytes from any random-access
/// source, such as a partially downloaded blob on disk.
///
/// For a partial blob, pass only groups it holds (see [`servable_ranges`]); the outboard must
/// hold the parents on the path to them, which is what a decoder's parent items give. Every
/// group and parent is checked against `hash` before it is written. Returns the bytes written.
pub fn encode_ranges_from<D, O, W>(
    data: &D,
    outboard: &O,
    hash: BlobHash,
    size: u64,
    ranges: &GroupRanges,
    out: &mut W,
) -> Result<u64, EncodeError>
where
    D: DataSource + ?Sized,
    O: OutboardSource + ?Sized,
    W: Write + ?Sized,
{
    encode_ranges_checked(data, outboard, hash, size, ranges, out, GroupCheck::Rehash)
}

/// How an encoder checks the groups it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupCheck {
    /// Hash every group and compare it with the outboard before sending it: a corrupted copy is
    /// refused instead of sent. Costs one BLAKE3 pass over every byte served.
    Rehash,
    /// Send groups as read; only the parents are checked. For data that verified when it was
    /// stored; the receiver still verifies every group, so a corrupt byte is caught there.
    TrustData,
}

/// [`encode_ranges_from`] with a choice of how groups are checked before they are sent.
pub fn encode_ranges_checked<D, O, W>(
    data: &D,
    outboard: &O,
    hash: BlobHash,
    size: u64,
    ranges: &GroupRanges,
    out: &mut W,
    check: GroupCheck,
) -> Result<u64, EncodeError>
where
    D: DataSource + ?Sized,
    O: OutboardSource + ?Sized,
    W: Write + ?Sized,
{
    if size > MAX_BLOB_BYTES {
        return Err(EncodeError::TooLarge { size });
    }
    let tree = BaoTree::new(size, block_size());
    let ranges = ranges.normalized(size);
    let truncated = truncate_ranges(ranges.as_chunk_ranges(), size);
    out.write_all(&size.to_le_bytes())
        .map_err(EncodeError::Write)?;
    let mut written = SIZE_HEADER_BYTES as u64;
    let mut walk = HashStack::new(hash);
    let mut scratch = vec![0u8; GROUP_BYTES as usize];
    for item in tree.ranges_pre_order_chunks_iter_ref(truncated, 0) {
        match item {
            BaoChunk::Parent {
                node,
                is_root,
                left,
                right,
                ..
            } => {
                let group = first_group(node);
                let offset = tree
                    .post_order_offset(node)
                    .map(|offset| offset.value() * PARENT_BYTES as u64)
                    .ok_or(EncodeError::OutboardCorrupt { group })?;
                let pair = outboard
                    .read_pair(offset)
                    .map_err(|source| EncodeError::ReadOutboard { group, source })?;
                walk.parent(&pair, is_root, left, right)
                    .map_err(|_| EncodeError::OutboardCorrupt { group })?;
                out.write_all(&pair).map_err(EncodeError::Write)?;
                written += PARENT_BYTES as u64;
            }
            BaoChunk::Leaf {
                start_chunk,
                size: len,
                is_root,
                ranges,
            } => {
                let group = start_chunk.0 / CHUNKS_PER_GROUP;
                let offset = start_chunk.to_bytes();
                // Group-aligned requests only ever reach whole groups; anything else would need
                // proofs inside a group, which this format does not carry.
                if !ranges.is_all() || start_chunk.0 % CHUNKS_PER_GROUP != 0 {
                    return Err(EncodeError::Unaligned { group });
                }
                let bytes = data.read_at(offset, len, &mut scratch).map_err(|source| {
                    EncodeError::ReadData {
                        group,
                        offset,
                        source,
                    }
                })?;
                let matched = match check {
                    GroupCheck::Rehash if bytes.len() == len => {
                        walk.group(start_chunk, bytes, is_root)
                    }
                    _ => walk.skip_group(),
                };
                if matched.is_err() || bytes.len() != len {
                    return Err(EncodeError::DataCorrupt { group, offset });
                }
                out.write_all(bytes).map_err(EncodeError::Write)?;
                written += len as u64;
            }
        }
    }
    Ok(written)
}

/// The groups a holder of `present` can send for a request of `requested`, for a blob of `size`
/// bytes: the request normalised ([`GroupRanges::normalized`]) and cut to what is present.
///
/// A server sends this set to the client before the stream; the client decodes with exactly it.
pub fn servable_ranges(requested: &GroupRanges, present: &GroupRanges, size: u64) -> GroupRanges {
    requested.normalized(size).intersection(present)
}

/// Exact length in bytes of the response stream for `ranges` of a blob of `size` bytes, so
/// buffers can be sized once.
pub fn encoded_len(size: u64, ranges: &GroupRanges) -> u64 {
    let tree = BaoTree::new(size.min(MAX_BLOB_BYTES), block_size());
    let ranges = ranges.normalized(size);
    let truncated = truncate_ranges(ranges.as_chunk_ranges(), size);
    let body: u64 = tree
        .ranges_pre_order_chunks_iter_ref(truncated, 0)
        .map(|item| match item {
            BaoChunk::Parent { .. } => PARENT_BYTES as u64,
            BaoChunk::Leaf { size, .. } => size as u64,
        })
        .sum();
    SIZE_HEADER_BYTES as u64 + body
}
