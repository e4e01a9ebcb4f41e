//! Reading a response stream: [`Decoder`], a sans-IO verifier that hands out a group's bytes
//! only after they hashed to the expected value, and the errors that name the failing group.

use std::fmt;
use std::io::{self, Read};

use bao_tree::io::sync::truncate_ranges;
use bao_tree::iter::{BaoChunk, ResponseIter};
use bao_tree::{BaoTree, ChunkRanges, TreeNode};

use super::outboard::outboard_offset;
use super::walk::{chunk_first_group, first_group, HashStack};
use super::{
    block_size, group_count, GroupRanges, CHUNKS_PER_GROUP, GROUP_BYTES, MAX_BLOB_BYTES,
    PARENT_BYTES, SIZE_HEADER_BYTES,
};
use crate::hash::BlobHash;

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
    /// The hashes still to be matched.
    walk: HashStack,
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
            Some(next) => State::Body(Box::new(Body {
                size,
                iter,
                next,
                walk: HashStack::new(self.hash),
                last_group: group_count(size) - 1,
                size_verified,
            })),
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
                self.walk
                    .parent(&pair, is_root, left, right)
                    .map_err(|_| mismatch)?;
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
                self.walk
                    .group(start_chunk, bytes, is_root)
                    .map_err(|_| mismatch)?;
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
