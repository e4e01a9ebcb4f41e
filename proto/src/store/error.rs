//! [`StoreError`]: what can go wrong in the blob store, with the path or blob it concerns.

use std::io;
use std::path::PathBuf;

use super::{index, MAX_PIN_TAG_BYTES, MAX_STORED_BLOB_BYTES};
use crate::hash::BlobHash;
use crate::verify::{EncodeError, VerifyError};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The disk (or quota) is full.
    #[error("disk full while {op} {path}: free space, or lower the store's cache limit so it evicts more ({source})")]
    DiskFull {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The RocksDB index failed.
    #[error("blob index {path}: {message}")]
    Index {
        /// Index directory.
        path: PathBuf,
        /// RocksDB's message.
        message: String,
    },
    /// An index record cannot be decoded.
    #[error("blob index {path}: record {key} is unreadable ({reason}); the index is damaged")]
    CorruptRecord {
        /// Index directory.
        path: PathBuf,
        /// The record's key, printable.
        key: String,
        /// Why it cannot be read.
        reason: String,
    },
    /// The index was written by an incompatible build.
    #[error("blob index {path} has format {found}, but this build reads format {}; use a matching build or a fresh store directory", index::INDEX_FORMAT)]
    UnsupportedFormat {
        /// Index directory.
        path: PathBuf,
        /// The format found.
        found: u32,
    },
    /// The blob is not in the store.
    #[error("blob {hash} is not in the store")]
    NotFound {
        /// The blob.
        hash: BlobHash,
    },
    /// Another writer has the blob open.
    #[error("blob {hash} is being written by another task; wait for it to finish")]
    WriteInProgress {
        /// The blob.
        hash: BlobHash,
    },
    /// The size given disagrees with the size the store recorded for the hash.
    #[error("blob {hash} is recorded as {recorded} bytes, not {requested}: one of the manifests naming it is wrong")]
    SizeMismatch {
        /// The blob.
        hash: BlobHash,
        /// Size in the index.
        recorded: u64,
        /// Size asked for.
        requested: u64,
    },
    /// The blob is larger than [`MAX_STORED_BLOB_BYTES`].
    #[error("blob {hash} is {size} bytes, more than the store's limit of {MAX_STORED_BLOB_BYTES}")]
    TooLarge {
        /// The blob.
        hash: BlobHash,
        /// Its size.
        size: u64,
    },
    /// An item verified against another blob was given to this blob's writer.
    #[error("an item verified for blob {item_hash} ({item_size} bytes) was given to the writer of blob {hash} ({size} bytes)")]
    ForeignItem {
        /// The writer's blob.
        hash: BlobHash,
        /// Its size.
        size: u64,
        /// The blob the item verified against.
        item_hash: BlobHash,
        /// The size the item's tree had.
        item_size: u64,
    },
    /// `finish` was called before every group was verified.
    #[error("blob {hash} has {verified} of {total} groups verified; fetch the missing groups, then finish")]
    Incomplete {
        /// The blob.
        hash: BlobHash,
        /// Groups verified.
        verified: u64,
        /// Groups in the blob.
        total: u64,
    },
    /// A stored blob does not match its hash.
    #[error("stored blob {hash} at {path} does not match its hash: the local copy is corrupt; delete it and fetch it again")]
    Corrupt {
        /// The blob.
        hash: BlobHash,
        /// Its data file.
        path: PathBuf,
    },
    /// A pinned blob cannot be deleted.
    #[error("blob {hash} is pinned by {tags:?}; unpin it first")]
    Pinned {
        /// The blob.
        hash: BlobHash,
        /// Its pin tags.
        tags: Vec<String>,
    },
    /// A pin tag is empty or too long.
    #[error("pin tag must be 1 to {MAX_PIN_TAG_BYTES} bytes, got {len}")]
    BadTag {
        /// The tag's length.
        len: usize,
    },
    /// [`Store::replace_pins`](super::Store::replace_pins) was given a tag outside its prefix.
    #[error("pin tag {tag:?} does not start with {prefix:?}")]
    TagPrefix {
        /// The tag.
        tag: String,
        /// The prefix being replaced.
        prefix: String,
    },
    /// Serving a blob failed.
    #[error("serving blob {hash}: {source}")]
    Encode {
        /// The blob.
        hash: BlobHash,
        /// What went wrong.
        #[source]
        source: EncodeError,
    },
    /// An incoming stream failed verification.
    #[error(transparent)]
    Verify(#[from] VerifyError),
}
