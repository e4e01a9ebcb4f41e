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

use std::fmt;
use std::io::{self, Read, Write};
use std::ops::Range;

use bao_tree::io::sync::truncate_ranges;
use bao_tree::iter::{BaoChunk, ResponseIter};
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges, TreeNode};
use serde::{Deserialize, Serialize};

use crate::hash::BlobHash;

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

/// Size in bytes of the post-order outboard of a blob of `size` bytes.
pub fn outboard_size(size: u64) -> u64 {
    BaoTree::new(size, block_size()).outboard_size()
}

/// Byte offset of `node`'s parent entry in the post-order outboard of a blob of `size` bytes, or
/// `None` for nodes the outboard does not store.
pub fn outboard_offset(size: u64, node: TreeNode) -> Option<u64> {
    BaoTree::new(size, block_size())
        .post_order_offset(node)
        .map(|offset| offset.value() * PARENT_BYTES as u64)
}

/// A blob's root hash and its post-order outboard.
#[derive(Clone, PartialEq, Eq)]
pub struct Outboard {
    /// The blob's BLAKE3 hash (the root of the tree).
    pub hash: BlobHash,
    /// The blob's size in bytes.
    pub size: u64,
    /// Parent entries in post order, exactly [`outboard_size`] bytes.
    pub data: Vec<u8>,
}

impl fmt::Debug for Outboard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outboard")
            .field("hash", &self.hash)
            .field("size", &self.size)
            .field("outboard_bytes", &self.data.len())
            .finish()
    }
}

/// Hashes `data` and builds its post-order outboard in one pass, into a buffer sized up front.
pub fn compute_outboard(data: &[u8]) -> Outboard {
    let size = data.len() as u64;
    let tree = BaoTree::new(size, block_size());
    // The outboard of anything that fits in memory fits in memory: it is 0.4 % of it.
    let mut outboard = Vec::with_capacity(tree.outboard_size() as usize);
    let mut stack: Vec<blake3::Hash> = Vec::with_capacity(STACK_CAPACITY);
    for item in tree.post_order_chunks_iter() {
        match item {
            BaoChunk::Parent { is_root, .. } => {
                // Post order yields both children before their parent, so two hashes are there.
                let right = stack.pop().expect("post order: right child before parent");
                let left = stack.pop().expect("post order: left child before parent");
                outboard.extend_from_slice(left.as_bytes());
                outboard.extend_from_slice(right.as_bytes());
                stack.push(parent_cv(&left, &right, is_root));
            }
            BaoChunk::Leaf {
                start_chunk,
                size,
                is_root,
                ..
            } => {
                let start = start_chunk.to_bytes() as usize;
                stack.push(hash_subtree(
                    start_chunk,
                    &data[start..start + size],
                    is_root,
                ));
            }
        }
    }
    let root = stack.pop().expect("post order ends with the root");
    Outboard {
        hash: BlobHash::from(root),
        size,
        data: outboard,
    }
}

/// A set of 16 KiB groups of a blob: what a request asks for, what a store has verified.
///
/// Always aligned to whole groups. May be open-ended (`5..` means group 5 to the end), so the
/// same set works before the blob size is known; methods that count or list groups take the size.
/// Serialises as its boundaries in group units.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct GroupRanges(ChunkRanges);

impl GroupRanges {
    /// No groups.
    pub fn empty() -> Self {
        Self(ChunkRanges::empty())
    }

    /// Every group of the blob, whatever its size.
    pub fn all() -> Self {
        Self(ChunkRanges::all())
    }

    /// The groups `range.start .. range.end`.
    pub fn groups(range: Range<u64>) -> Self {
        if range.start >= range.end {
            return Self::empty();
        }
        let start = ChunkNum(range.start.saturating_mul(CHUNKS_PER_GROUP));
        match range.end.checked_mul(CHUNKS_PER_GROUP) {
            Some(end) => Self(ChunkRanges::from(start..ChunkNum(end))),
            None => Self(ChunkRanges::from(start..)),
        }
    }

    /// Group `index` and every later group.
    pub fn from_group(index: u64) -> Self {
        Self(ChunkRanges::from(
            ChunkNum(index.saturating_mul(CHUNKS_PER_GROUP))..,
        ))
    }

    /// The single group `index`.
    pub fn group(index: u64) -> Self {
        Self::groups(index..index.saturating_add(1))
    }

    /// The groups that hold any byte of `bytes` (rounded out to whole groups).
    pub fn from_byte_range(bytes: Range<u64>) -> Self {
        if bytes.start >= bytes.end {
            return Self::empty();
        }
        Self::groups(bytes.start / GROUP_BYTES..bytes.end.div_ceil(GROUP_BYTES))
    }

    /// Rounds bao-tree chunk ranges out to whole groups.
    pub fn from_chunk_ranges(ranges: ChunkRanges) -> Self {
        Self(bao_tree::io::round_up_to_chunks_groups(
            ranges,
            block_size(),
        ))
    }

    /// Builds the set from boundaries in group units (`[a, b, c]` is `a..b` and `c..`), as
    /// produced by [`GroupRanges::boundaries`]. `None` unless strictly increasing.
    pub fn from_boundaries(boundaries: &[u64]) -> Option<Self> {
        let mut chunks = Vec::with_capacity(boundaries.len());
        for &group in boundaries {
            chunks.push(ChunkNum(group.checked_mul(CHUNKS_PER_GROUP)?));
        }
        ChunkRanges::new(chunks.into()).map(Self)
    }

    /// Boundaries in group units: even positions start a run, odd positions end it; an odd count
    /// means the last run is open-ended.
    pub fn boundaries(&self) -> Vec<u64> {
        self.0
            .boundaries()
            .iter()
            .map(|chunk| chunk.0 / CHUNKS_PER_GROUP)
            .collect()
    }

    /// The same set as bao-tree chunk ranges.
    pub fn as_chunk_ranges(&self) -> &ChunkRanges {
        &self.0
    }

    /// True if the set holds no group.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True if the set holds every group of any blob.
    pub fn is_all(&self) -> bool {
        self.0.is_all()
    }

    /// True if group `index` is in the set.
    pub fn contains(&self, index: u64) -> bool {
        self.0
            .contains(&ChunkNum(index.saturating_mul(CHUNKS_PER_GROUP)))
    }

    /// True if every group of `other` is in `self`.
    pub fn is_superset(&self, other: &GroupRanges) -> bool {
        self.0.is_superset(&other.0)
    }

    /// Groups in `self` or in `other`.
    pub fn union(&self, other: &GroupRanges) -> GroupRanges {
        Self(&self.0 | &other.0)
    }

    /// Groups in both `self` and `other`.
    pub fn intersection(&self, other: &GroupRanges) -> GroupRanges {
        Self(&self.0 & &other.0)
    }

    /// Groups in `self` but not in `other`.
    pub fn difference(&self, other: &GroupRanges) -> GroupRanges {
        Self(&self.0 - &other.0)
    }

    /// Adds group `index`.
    pub fn insert(&mut self, index: u64) {
        self.0 |= Self::group(index).0;
    }

    /// The part of the set inside a blob of `size` bytes.
    pub fn clamped(&self, size: u64) -> GroupRanges {
        self.intersection(&Self::groups(0..group_count(size)))
    }

    /// What a response for this request actually carries for a blob of `size` bytes: groups past
    /// the end stand for the last group (the bao convention, so asking past the end yields a proof
    /// of the size), and nothing lies beyond the blob. Encoder and decoder both apply this.
    pub fn normalized(&self, size: u64) -> GroupRanges {
        let last = group_count(size) - 1;
        let inside = self.clamped(size);
        if self.intersection(&Self::from_group(last)).is_empty() {
            inside
        } else {
            inside.union(&Self::group(last))
        }
    }

    /// The runs of the set inside a blob of `size` bytes, in group units.
    pub fn runs(&self, size: u64) -> Vec<Range<u64>> {
        let clamped = self.clamped(size);
        clamped
            .boundaries()
            .chunks(2)
            .filter_map(|pair| match *pair {
                [start, end] => Some(start..end),
                // clamped() is bounded, so every run has an end.
                _ => None,
            })
            .collect()
    }

    /// The group indices of the set inside a blob of `size` bytes, in ascending order.
    pub fn iter_groups(&self, size: u64) -> impl Iterator<Item = u64> {
        self.runs(size).into_iter().flatten()
    }

    /// Number of groups of the set inside a blob of `size` bytes.
    pub fn count(&self, size: u64) -> u64 {
        self.runs(size).iter().map(|run| run.end - run.start).sum()
    }

    /// Number of bytes the set covers in a blob of `size` bytes.
    pub fn byte_count(&self, size: u64) -> u64 {
        self.runs(size)
            .iter()
            .map(|run| (run.end * GROUP_BYTES).min(size) - (run.start * GROUP_BYTES).min(size))
            .sum()
    }
}

impl FromIterator<u64> for GroupRanges {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> Self {
        let mut set = GroupRanges::empty();
        for index in iter {
            set.insert(index);
        }
        set
    }
}

impl fmt::Debug for GroupRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupRanges({self})")
    }
}

impl fmt::Display for GroupRanges {
    /// Runs in group units, e.g. `0..4, 9..`; `{}` when empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let boundaries = self.boundaries();
        if boundaries.is_empty() {
            return f.write_str("{}");
        }
        for (i, pair) in boundaries.chunks(2).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match pair {
                [start, end] => write!(f, "{start}..{end}")?,
                [start] => write!(f, "{start}..")?,
                _ => {}
            }
        }
        Ok(())
    }
}

impl Serialize for GroupRanges {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.boundaries().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for GroupRanges {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let boundaries = Vec::<u64>::deserialize(deserializer)?;
        GroupRanges::from_boundaries(&boundaries).ok_or_else(|| {
            serde::de::Error::custom("group range boundaries must be strictly increasing")
        })
    }
}

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
    let mut stack: Vec<blake3::Hash> = Vec::with_capacity(STACK_CAPACITY);
    stack.push(hash.into());
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
                let (left_hash, right_hash) = split_pair(&pair);
                let expected = stack.pop().ok_or(EncodeError::OutboardCorrupt { group })?;
                if parent_cv(&left_hash, &right_hash, is_root) != expected {
                    return Err(EncodeError::OutboardCorrupt { group });
                }
                if right {
                    stack.push(right_hash);
                }
                if left {
                    stack.push(left_hash);
                }
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
                let expected = stack
                    .pop()
                    .ok_or(EncodeError::DataCorrupt { group, offset })?;
                let corrupt = bytes.len() != len
                    || (check == GroupCheck::Rehash
                        && hash_subtree(start_chunk, bytes, is_root) != expected);
                if corrupt {
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

/// Why a response stream was refused. Every variant that concerns the data names the group, so
/// the caller can tell the user where and drop the source.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The stream ended inside the 8-byte size header.
    #[error("stream ended before its 8-byte size header: the source closed early")]
    TruncatedHeader,
    /// The size header names a blob larger than [`MAX_BLOB_BYTES`].
    #[error("stream claims a blob of {claimed} bytes, more than the limit of {MAX_BLOB_BYTES}: the source is broken or hostile")]
    SizeTooLarge {
        /// The size in the header.
        claimed: u64,
    },
    /// The size header disagrees with the size the caller trusts (from a signed manifest).
    #[error("stream claims a blob of {claimed} bytes, but the blob is {expected} bytes: the source serves another blob")]
    SizeMismatch {
        /// The trusted size.
        expected: u64,
        /// The size in the header.
        claimed: u64,
    },
    /// A group's bytes do not hash to the expected value. None of its bytes were handed out.
    #[error("group {group} (bytes from {offset}) does not match the blob hash: the source sent corrupt or foreign data; drop it")]
    GroupMismatch {
        /// Group index.
        group: u64,
        /// Byte offset of the group.
        offset: u64,
    },
    /// A parent entry does not hash to the expected value: the tree above `group` is wrong.
    #[error("tree entry above group {group} (bytes from {offset}) does not match the blob hash: the source sent corrupt or foreign data; drop it")]
    ParentMismatch {
        /// First group under the bad parent.
        group: u64,
        /// Byte offset of that group.
        offset: u64,
    },
    /// The stream ended before the item for `group` was complete.
    #[error("stream ended before group {group} (bytes from {offset}) arrived: the source closed early; resume from it")]
    Truncated {
        /// The group whose data (or tree entry) was still due.
        group: u64,
        /// Byte offset of that group.
        offset: u64,
    },
    /// More bytes arrived after the last item.
    #[error("{extra} bytes arrived after the end of the response stream")]
    TrailingBytes {
        /// Number of extra bytes.
        extra: usize,
    },
    /// [`Decoder::push`] got a slice of the wrong length (a caller bug).
    #[error("pushed {got} bytes, but the decoder needs exactly {needed}")]
    WrongLength {
        /// What [`Decoder::needed`] said.
        needed: usize,
        /// What was pushed.
        got: usize,
    },
    /// The decoder already failed; it accepts nothing more.
    #[error("the decoder already rejected this stream; start a new request")]
    AlreadyFailed,
    /// The stream could not be read.
    #[error("cannot read the response stream: {0}")]
    Read(#[source] io::Error),
}

impl VerifyError {
    /// The group the error is about, if it concerns one.
    pub fn group(&self) -> Option<u64> {
        match self {
            VerifyError::GroupMismatch { group, .. }
            | VerifyError::ParentMismatch { group, .. }
            | VerifyError::Truncated { group, .. } => Some(*group),
            _ => None,
        }
    }

    /// True if the source sent bytes that are provably wrong (as opposed to stopping early or a
    /// local problem): the caller should drop and ban it.
    pub fn is_corrupt_data(&self) -> bool {
        matches!(
            self,
            VerifyError::GroupMismatch { .. }
                | VerifyError::ParentMismatch { .. }
                | VerifyError::SizeMismatch { .. }
                | VerifyError::SizeTooLarge { .. }
                | VerifyError::TrailingBytes { .. }
        )
    }
}

/// One verified item of a response stream, as returned by [`Decoder::push`].
#[derive(Debug)]
pub enum DecodeItem<'a> {
    /// The size header: the blob size the source claims. Proven once the last group verified
    /// ([`Decoder::size_verified`]) or when it matched [`Decoder::with_size`].
    Size(u64),
    /// A parent entry that hashed to the expected value; store it to serve the blob later.
    Parent(VerifiedParent),
    /// A group whose bytes hashed to the expected value.
    Group(VerifiedGroup<'a>),
}

/// A parent entry (pair of child hashes) that verified against a blob hash.
///
/// Only a [`Decoder`] makes these, so holding one proves the entry was checked.
#[derive(Clone)]
pub struct VerifiedParent {
    node: TreeNode,
    pair: [u8; PARENT_BYTES],
    hash: BlobHash,
    blob_size: u64,
}

impl VerifiedParent {
    /// The tree node (in bao-tree's chunk numbering).
    pub fn node(&self) -> TreeNode {
        self.node
    }

    /// Left and right child hash, as stored in an outboard.
    pub fn pair(&self) -> &[u8; PARENT_BYTES] {
        &self.pair
    }

    /// The blob hash it verified against.
    pub fn hash(&self) -> BlobHash {
        self.hash
    }

    /// The blob size whose tree it belongs to.
    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }

    /// Byte offset of this entry in the blob's post-order outboard, or `None` if such an outboard
    /// does not store it.
    pub fn outboard_offset(&self) -> Option<u64> {
        outboard_offset(self.blob_size, self.node)
    }

    /// The first group under this parent.
    pub fn first_group(&self) -> u64 {
        first_group(self.node)
    }
}

impl fmt::Debug for VerifiedParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedParent")
            .field("node", &self.node)
            .field("first_group", &self.first_group())
            .finish()
    }
}

/// A group's bytes that verified against a blob hash, borrowed from the pushed input.
///
/// Only a [`Decoder`] makes these, so holding one proves the bytes were checked.
#[derive(Clone, Copy)]
pub struct VerifiedGroup<'a> {
    index: u64,
    data: &'a [u8],
    hash: BlobHash,
    blob_size: u64,
}

impl<'a> VerifiedGroup<'a> {
    /// Group index.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Byte offset of the group in the blob.
    pub fn offset(&self) -> u64 {
        self.index * GROUP_BYTES
    }

    /// The verified bytes.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// The blob hash they verified against.
    pub fn hash(&self) -> BlobHash {
        self.hash
    }

    /// The blob size whose tree they belong to.
    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }
}

impl fmt::Debug for VerifiedGroup<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedGroup")
            .field("index", &self.index)
            .field("offset", &self.offset())
            .field("len", &self.data.len())
            .finish()
    }
}

/// Sans-IO verifier for one response stream.
///
/// Ask [`needed`](Decoder::needed) how many bytes the next item has, read exactly that many,
/// [`push`](Decoder::push) them, act on the returned item; repeat until `needed` is `None`, then
/// call [`finish`](Decoder::finish). Nothing unverified is ever returned: a group's bytes come
/// back only after they hashed to the expected value, and after the first error the decoder
/// refuses everything.
pub struct Decoder {
    hash: BlobHash,
    requested: GroupRanges,
    expected_size: Option<u64>,
    state: State,
}

enum State {
    Header,
    Body(Box<Body>),
    Done { size: u64, size_verified: bool },
    Failed,
}

struct Body {
    size: u64,
    iter: ResponseIter,
    next: BaoChunk,
    /// Hashes still to be matched, the next expected one on top.
    stack: Vec<blake3::Hash>,
    last_group: u64,
    size_verified: bool,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("hash", &self.hash)
            .field("requested", &self.requested)
            .field("needed", &self.needed())
            .finish()
    }
}

impl Decoder {
    /// A decoder for the response to `ranges` of the blob named `hash`.
    pub fn new(hash: BlobHash, ranges: GroupRanges) -> Self {
        Self {
            hash,
            requested: ranges,
            expected_size: None,
            state: State::Header,
        }
    }

    /// Like [`Decoder::new`] for a blob whose size is already trusted (from a signed manifest):
    /// a stream claiming another size is refused at once.
    pub fn with_size(hash: BlobHash, size: u64, ranges: GroupRanges) -> Self {
        Self {
            expected_size: Some(size),
            ..Self::new(hash, ranges)
        }
    }

    /// The blob hash every item is checked against.
    pub fn hash(&self) -> BlobHash {
        self.hash
    }

    /// Exact length in bytes of the next item, or `None` once the stream is complete or failed.
    pub fn needed(&self) -> Option<usize> {
        match &self.state {
            State::Header => Some(SIZE_HEADER_BYTES),
            State::Body(body) => Some(body.next.size()),
            State::Done { .. } | State::Failed => None,
        }
    }

    /// True once every requested item verified.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done { .. })
    }

    /// The size the stream claims, once the header arrived.
    pub fn size(&self) -> Option<u64> {
        match &self.state {
            State::Body(body) => Some(body.size),
            State::Done { size, .. } => Some(*size),
            State::Header | State::Failed => None,
        }
    }

    /// True once the claimed size is proven: it matched [`Decoder::with_size`], or the blob's last
    /// group verified.
    pub fn size_verified(&self) -> bool {
        match &self.state {
            State::Body(body) => body.size_verified,
            State::Done { size_verified, .. } => *size_verified,
            State::Header | State::Failed => false,
        }
    }

    /// The groups this stream carries, once the size is known (the request, normalised).
    pub fn ranges(&self) -> Option<GroupRanges> {
        self.size().map(|size| self.requested.normalized(size))
    }

    /// Verifies the next item; `bytes` must be exactly [`Decoder::needed`] long.
    ///
    /// On error the decoder is spent: nothing of the failing item was returned, and every later
    /// push fails with [`VerifyError::AlreadyFailed`].
    pub fn push<'a>(&mut self, bytes: &'a [u8]) -> Result<DecodeItem<'a>, VerifyError> {
        let result = self.push_inner(bytes);
        if let Err(error) = &result {
            // A wrong length is a caller bug that leaves the stream intact; all else ends it.
            if !matches!(error, VerifyError::WrongLength { .. }) {
                self.state = State::Failed;
            }
        }
        result
    }

    /// Checks that the stream is complete; returns the blob size it carried.
    pub fn finish(&self) -> Result<u64, VerifyError> {
        match &self.state {
            State::Done { size, .. } => Ok(*size),
            State::Header => Err(VerifyError::TruncatedHeader),
            State::Body(body) => {
                let group = chunk_first_group(&body.next);
                Err(VerifyError::Truncated {
                    group,
                    offset: group * GROUP_BYTES,
                })
            }
            State::Failed => Err(VerifyError::AlreadyFailed),
        }
    }

    /// Reads and verifies the whole stream from `reader`, handing each item to `on_item`, and
    /// returns the blob size. Reads exactly the stream's bytes, never past its end.
    pub fn decode_reader<R, E, F>(mut self, mut reader: R, mut on_item: F) -> Result<u64, E>
    where
        R: Read,
        E: From<VerifyError>,
        F: FnMut(DecodeItem<'_>) -> Result<(), E>,
    {
        let mut buffer = vec![0u8; GROUP_BYTES as usize];
        while let Some(needed) = self.needed() {
            let bytes = &mut buffer[..needed];
            if let Err(error) = reader.read_exact(bytes) {
                return Err(if error.kind() == io::ErrorKind::UnexpectedEof {
                    self.finish().err().unwrap_or(VerifyError::Read(error))
                } else {
                    VerifyError::Read(error)
                }
                .into());
            }
            let item = self.push(bytes)?;
            on_item(item)?;
        }
        Ok(self.finish()?)
    }

    fn push_inner<'a>(&mut self, bytes: &'a [u8]) -> Result<DecodeItem<'a>, VerifyError> {
        let Some(needed) = self.needed() else {
            return Err(match self.state {
                State::Failed => VerifyError::AlreadyFailed,
                _ => VerifyError::TrailingBytes { extra: bytes.len() },
            });
        };
        if bytes.len() != needed {
            return Err(VerifyError::WrongLength {
                needed,
                got: bytes.len(),
            });
        }
        match &mut self.state {
            State::Header => self.accept_header(bytes),
            State::Body(body) => {
                let item = body.accept(self.hash, bytes)?;
                if let Some(next) = body.iter.next() {
                    body.next = next;
                } else {
                    self.state = State::Done {
                        size: body.size,
                        size_verified: body.size_verified,
                    };
                }
                Ok(item)
            }
            State::Done { .. } | State::Failed => Err(VerifyError::AlreadyFailed),
        }
    }

    fn accept_header<'a>(&mut self, bytes: &[u8]) -> Result<DecodeItem<'a>, VerifyError> {
        let mut header = [0u8; SIZE_HEADER_BYTES];
        header.copy_from_slice(bytes);
        let size = u64::from_le_bytes(header);
        if size > MAX_BLOB_BYTES {
            return Err(VerifyError::SizeTooLarge { claimed: size });
        }
        if let Some(expected) = self.expected_size {
            if expected != size {
                return Err(VerifyError::SizeMismatch {
                    expected,
                    claimed: size,
                });
            }
        }
        let tree = BaoTree::new(size, block_size());
        let ranges = self.requested.normalized(size);
        let truncated = truncate_ranges(ranges.as_chunk_ranges(), size);
        let owned = ChunkRanges::new(truncated.boundaries().to_vec().into()).unwrap_or_default();
        let mut iter = ResponseIter::new(tree, owned);
        let size_verified = self.expected_size.is_some();
        self.state = match iter.next() {
            Some(next) => {
                let mut stack = Vec::with_capacity(STACK_CAPACITY);
                stack.push(self.hash.into());
                State::Body(Box::new(Body {
                    size,
                    iter,
                    next,
                    stack,
                    last_group: group_count(size) - 1,
                    size_verified,
                }))
            }
            None => State::Done {
                size,
                size_verified,
            },
        };
        Ok(DecodeItem::Size(size))
    }
}

impl Body {
    fn accept<'a>(
        &mut self,
        hash: BlobHash,
        bytes: &'a [u8],
    ) -> Result<DecodeItem<'a>, VerifyError> {
        match self.next {
            BaoChunk::Parent {
                node,
                is_root,
                left,
                right,
                ..
            } => {
                let group = first_group(node);
                let mismatch = VerifyError::ParentMismatch {
                    group,
                    offset: group * GROUP_BYTES,
                };
                let pair: [u8; PARENT_BYTES] =
                    bytes.try_into().map_err(|_| VerifyError::WrongLength {
                        needed: PARENT_BYTES,
                        got: bytes.len(),
                    })?;
                let (left_hash, right_hash) = split_pair(&pair);
                let expected = self.stack.pop().ok_or(mismatch)?;
                if parent_cv(&left_hash, &right_hash, is_root) != expected {
                    return Err(VerifyError::ParentMismatch {
                        group,
                        offset: group * GROUP_BYTES,
                    });
                }
                if right {
                    self.stack.push(right_hash);
                }
                if left {
                    self.stack.push(left_hash);
                }
                Ok(DecodeItem::Parent(VerifiedParent {
                    node,
                    pair,
                    hash,
                    blob_size: self.size,
                }))
            }
            BaoChunk::Leaf {
                start_chunk,
                is_root,
                ..
            } => {
                let group = start_chunk.0 / CHUNKS_PER_GROUP;
                let mismatch = VerifyError::GroupMismatch {
                    group,
                    offset: group * GROUP_BYTES,
                };
                // Requests are whole groups, so every leaf starts a group; a leaf inside a group
                // would carry no usable proof here.
                if start_chunk.0 % CHUNKS_PER_GROUP != 0 {
                    return Err(mismatch);
                }
                let expected = self.stack.pop().ok_or(mismatch)?;
                if hash_subtree(start_chunk, bytes, is_root) != expected {
                    return Err(VerifyError::GroupMismatch {
                        group,
                        offset: group * GROUP_BYTES,
                    });
                }
                if group == self.last_group {
                    // The last group's length and position follow from the size: it is proven.
                    self.size_verified = true;
                }
                Ok(DecodeItem::Group(VerifiedGroup {
                    index: group,
                    data: bytes,
                    hash,
                    blob_size: self.size,
                }))
            }
        }
    }
}

/// Verifies the response to `ranges` of `hash` read from `reader`, handing each verified item to
/// `on_item`; returns the blob size. A convenience over [`Decoder`] for synchronous callers.
pub fn decode_from_reader<R: Read>(
    reader: R,
    hash: BlobHash,
    ranges: GroupRanges,
    mut on_item: impl FnMut(DecodeItem<'_>),
) -> Result<u64, VerifyError> {
    Decoder::new(hash, ranges).decode_reader(reader, |item| {
        on_item(item);
        Ok::<(), VerifyError>(())
    })
}

/// The first group under `node`.
fn first_group(node: TreeNode) -> u64 {
    node.chunk_range().start.0 / CHUNKS_PER_GROUP
}

fn chunk_first_group(chunk: &BaoChunk) -> u64 {
    match chunk {
        BaoChunk::Parent { node, .. } => first_group(*node),
        BaoChunk::Leaf { start_chunk, .. } => start_chunk.0 / CHUNKS_PER_GROUP,
    }
}

fn split_pair(pair: &[u8; PARENT_BYTES]) -> (blake3::Hash, blake3::Hash) {
    let mut left = [0u8; 32];
    let mut right = [0u8; 32];
    left.copy_from_slice(&pair[..32]);
    right.copy_from_slice(&pair[32..]);
    (blake3::Hash::from(left), blake3::Hash::from(right))
}

/// Chaining value (or, for the root, the hash) of the subtree of `data` starting at `start_chunk`.
/// The same computation as bao-tree's, through blake3's public `hazmat` API.
fn hash_subtree(start_chunk: ChunkNum, data: &[u8], is_root: bool) -> blake3::Hash {
    use blake3::hazmat::HasherExt;
    if is_root {
        blake3::hash(data)
    } else {
        let mut hasher = blake3::Hasher::new();
        hasher.set_input_offset(start_chunk.to_bytes());
        hasher.update(data);
        blake3::Hash::from(hasher.finalize_non_root())
    }
}

/// Hash of a parent node from its children's chaining values.
fn parent_cv(left: &blake3::Hash, right: &blake3::Hash, is_root: bool) -> blake3::Hash {
    use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, Mode};
    if is_root {
        merge_subtrees_root(left.as_bytes(), right.as_bytes(), Mode::Hash)
    } else {
        blake3::Hash::from(merge_subtrees_non_root(
            left.as_bytes(),
            right.as_bytes(),
            Mode::Hash,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i.wrapping_mul(31) >> 3) as u8).collect()
    }

    /// Verified groups as (index, bytes).
    type Groups = Vec<(u64, Vec<u8>)>;

    fn decode_all(
        stream: &[u8],
        hash: BlobHash,
        ranges: GroupRanges,
    ) -> (Result<u64, VerifyError>, Groups) {
        let mut groups = Vec::new();
        let result = decode_from_reader(stream, hash, ranges, |item| {
            if let DecodeItem::Group(group) = item {
                groups.push((group.index(), group.data().to_vec()));
            }
        });
        (result, groups)
    }

    #[test]
    fn outboard_matches_bao_tree_and_hash() {
        for len in [0usize, 1, 1024, 16383, 16384, 16385, 100_000, 1 << 20] {
            let blob = data(len);
            let ours = compute_outboard(&blob);
            let theirs = bao_tree::io::outboard::PostOrderMemOutboard::create(&blob, block_size());
            assert_eq!(ours.hash, BlobHash::of(&blob), "len {len}");
            assert_eq!(ours.data, theirs.data, "len {len}");
            assert_eq!(ours.data.len() as u64, outboard_size(len as u64));
        }
    }

    #[test]
    fn stream_matches_bao_tree_encoder() {
        let blob = data(300_000);
        let outboard = compute_outboard(&blob);
        for ranges in [
            GroupRanges::all(),
            GroupRanges::groups(1..3),
            GroupRanges::group(18),
            GroupRanges::from_group(40),
            GroupRanges::groups(17..60),
            GroupRanges::groups(0..1).union(&GroupRanges::from_group(10)),
        ] {
            let mut ours = Vec::new();
            encode_ranges(&blob, &outboard.data, outboard.hash, &ranges, &mut ours).unwrap();
            let mem = bao_tree::io::outboard::PostOrderMemOutboard {
                root: outboard.hash.into(),
                tree: BaoTree::new(blob.len() as u64, block_size()),
                data: outboard.data.clone(),
            };
            let mut theirs = (blob.len() as u64).to_le_bytes().to_vec();
            bao_tree::io::sync::encode_ranges_validated(
                &blob[..],
                &mem,
                // Past the end, bao-tree sends only the last chunk; this format sends the whole
                // last group, so compare on the normalised request.
                ranges.normalized(blob.len() as u64).as_chunk_ranges(),
                &mut theirs,
            )
            .unwrap();
            assert_eq!(ours, theirs, "ranges {ranges}");
            assert_eq!(ours.len() as u64, encoded_len(blob.len() as u64, &ranges));
        }
    }

    #[test]
    fn round_trip_edge_sizes() {
        for len in [0usize, 1, 16383, 16384, 16385, 3 * 1024 * 1024 + 7] {
            let blob = data(len);
            let outboard = compute_outboard(&blob);
            let mut stream = Vec::new();
            encode_ranges(
                &blob,
                &outboard.data,
                outboard.hash,
                &GroupRanges::all(),
                &mut stream,
            )
            .unwrap();
            let (result, groups) = decode_all(&stream, outboard.hash, GroupRanges::all());
            assert_eq!(result.unwrap(), len as u64);
            let joined: Vec<u8> = groups.iter().flat_map(|(_, d)| d.clone()).collect();
            assert_eq!(joined, blob, "len {len}");
            assert_eq!(groups.len() as u64, group_count(len as u64));
        }
    }

    #[test]
    fn size_is_verified_only_with_the_last_group() {
        let blob = data(5 * GROUP_BYTES as usize + 10);
        let outboard = compute_outboard(&blob);
        let mut stream = Vec::new();
        let first = GroupRanges::group(0);
        encode_ranges(&blob, &outboard.data, outboard.hash, &first, &mut stream).unwrap();
        let mut decoder = Decoder::new(outboard.hash, first);
        let mut at = 0;
        while let Some(n) = decoder.needed() {
            decoder.push(&stream[at..at + n]).unwrap();
            at += n;
        }
        assert!(decoder.is_done());
        assert!(!decoder.size_verified());

        let mut stream = Vec::new();
        let last = GroupRanges::group(5);
        encode_ranges(&blob, &outboard.data, outboard.hash, &last, &mut stream).unwrap();
        let mut decoder = Decoder::new(outboard.hash, last);
        let mut at = 0;
        while let Some(n) = decoder.needed() {
            decoder.push(&stream[at..at + n]).unwrap();
            at += n;
        }
        assert!(decoder.size_verified());
    }

    #[test]
    fn wrong_size_claim_is_refused_when_size_is_known() {
        let blob = data(40_000);
        let outboard = compute_outboard(&blob);
        let mut stream = Vec::new();
        encode_ranges(
            &blob,
            &outboard.data,
            outboard.hash,
            &GroupRanges::all(),
            &mut stream,
        )
        .unwrap();
        let mut decoder = Decoder::with_size(outboard.hash, 40_001, GroupRanges::all());
        let error = decoder.push(&stream[..8]).unwrap_err();
        assert!(matches!(
            error,
            VerifyError::SizeMismatch {
                expected: 40_001,
                claimed: 40_000
            }
        ));
        assert!(matches!(
            decoder.push(&stream[8..72]),
            Err(VerifyError::AlreadyFailed)
        ));
    }

    #[test]
    fn huge_size_claim_is_refused() {
        let mut decoder = Decoder::new(BlobHash::of(b"x"), GroupRanges::all());
        let error = decoder.push(&u64::MAX.to_le_bytes()).unwrap_err();
        assert!(matches!(error, VerifyError::SizeTooLarge { .. }));
    }

    #[test]
    fn wrong_push_length_is_an_error_not_a_panic() {
        let mut decoder = Decoder::new(BlobHash::of(b"x"), GroupRanges::all());
        assert!(matches!(
            decoder.push(&[0u8; 3]),
            Err(VerifyError::WrongLength { needed: 8, got: 3 })
        ));
        // The stream is still usable after a caller's length mistake.
        assert_eq!(decoder.needed(), Some(8));
    }

    #[test]
    fn group_ranges_round_bytes_out_and_count() {
        let ranges = GroupRanges::from_byte_range(100..GROUP_BYTES + 1);
        assert_eq!(ranges.boundaries(), vec![0, 2]);
        assert_eq!(ranges.count(10 * GROUP_BYTES), 2);
        assert_eq!(GroupRanges::all().count(0), 1);
        assert_eq!(GroupRanges::all().count(3 * GROUP_BYTES + 1), 4);
        assert_eq!(
            GroupRanges::all().byte_count(3 * GROUP_BYTES + 1),
            3 * GROUP_BYTES + 1
        );
        assert_eq!(
            GroupRanges::from_group(7)
                .normalized(2 * GROUP_BYTES)
                .boundaries(),
            vec![1, 2]
        );
        let collected: GroupRanges = [1u64, 2, 3, 7].into_iter().collect();
        assert_eq!(collected.to_string(), "1..4, 7..8");
        assert_eq!(
            collected.iter_groups(100 * GROUP_BYTES).collect::<Vec<_>>(),
            vec![1, 2, 3, 7]
        );
        let bytes = crate::codec::encode(&collected).unwrap();
        let back: GroupRanges = crate::codec::decode(&bytes, 1024).unwrap();
        assert_eq!(back, collected);
        let unsorted = crate::codec::encode(&vec![5u64, 2]).unwrap();
        assert!(crate::codec::decode::<GroupRanges>(&unsorted, 1024).is_err());
    }

    #[test]
    fn outboard_is_about_four_tenths_of_a_percent() {
        for size in [16u64 << 20, 1 << 30] {
            let fraction = outboard_size(size) as f64 / size as f64;
            println!("outboard for {size} bytes: {:.4} %", fraction * 100.0);
            assert!((0.0038..0.0040).contains(&fraction), "{fraction}");
        }
    }

    #[test]
    fn decoder_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Decoder>();
        assert_send::<GroupRanges>();
    }
}
