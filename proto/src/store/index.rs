//! The RocksDB index: key layout, record types, and synced writes.
//!
//! Every value goes through [`crate::codec`]. Keys are a one-byte kind, then the 32-byte hash:
//!
//! | key                          | value                                   |
//! | ---------------------------- | --------------------------------------- |
//! | `F` `format`                 | [`INDEX_FORMAT`] (u32)                  |
//! | `b` hash                     | [`BlobRecord`]                          |
//! | `m` bundle id                | [`SignedManifest`] bytes                |
//! | `p` hash tag                 | empty: blob `hash` is pinned by `tag`   |

use std::path::{Path, PathBuf};

use rocksdb::{DBCompressionType, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::codec;
use crate::hash::{BlobHash, HASH_BYTES};
use crate::manifest::{BundleId, SignedManifest, MAX_MANIFEST_BYTES};
use crate::verify::GroupRanges;

/// Version of the index layout written by this build.
pub const INDEX_FORMAT: u32 = 1;

/// Largest encoded blob record accepted, in bytes. A record is a size, a clock and the verified
/// groups as runs; even a 64 GiB blob fragmented into every other group stays below this.
pub const MAX_RECORD_BYTES: usize = codec::MAX_ENCODED_BYTES;

/// Bytes of a RocksDB info log file before it rotates.
const MAX_LOG_FILE_BYTES: usize = 1024 * 1024;

/// Rotated RocksDB info log files kept.
const KEPT_LOG_FILES: usize = 2;

/// A raw key and value from a scan.
type KeyValue = (Box<[u8]>, Box<[u8]>);

const FORMAT_KEY: &[u8] = b"Fformat";
const BLOB_PREFIX: u8 = b'b';
const MANIFEST_PREFIX: u8 = b'm';
const PIN_PREFIX: u8 = b'p';

/// What the index knows about one blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    /// Blob size in bytes.
    pub size: u64,
    /// Complete, or which groups are verified and on disk.
    pub state: RecordState,
    /// Logical clock of the last use, for LRU eviction (larger is more recent).
    pub last_access: u64,
}

/// Whether a blob is whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordState {
    /// Every group is verified and on disk.
    Complete,
    /// Only these groups are verified and on disk (fsynced before this record was written).
    Partial {
        /// The verified groups.
        verified: GroupRanges,
    },
    /// Like [`RecordState::Partial`], plus groups that verified when they were written but were
    /// recorded before their bytes were fsynced (cheap progress records between syncs). A
    /// process crash keeps them (the bytes are in the page cache); a power loss may not, so they
    /// are trusted only after the store re-verifies them against the blob's hash.
    PartialUnsynced {
        /// The verified groups, durable.
        verified: GroupRanges,
        /// Groups written and recorded but not known to be durable.
        unsynced: GroupRanges,
    },
}

/// The open index.
pub struct Index {
    db: DB,
    path: PathBuf,
}

impl Index {
    /// Opens (or creates) the index at `path` and checks its format.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        // Built without compression libraries; say so rather than rely on a fallback.
        options.set_compression_type(DBCompressionType::None);
        options.set_max_log_file_size(MAX_LOG_FILE_BYTES);
        options.set_keep_log_file_num(KEPT_LOG_FILES);
        let db = DB::open(&options, path).map_err(|e| StoreError::Index {
            path: path.to_path_buf(),
            message: format!("{} (is another process using this store?)", e.into_string()),
        })?;
        let index = Self {
            db,
            path: path.to_path_buf(),
        };
        match index.get(FORMAT_KEY)? {
            None => {
                let mut batch = WriteBatch::default();
                batch.put(FORMAT_KEY, index.encode(&INDEX_FORMAT)?);
                index.write_synced(batch)?;
            }
            Some(bytes) => {
                let found: u32 = index.decode(FORMAT_KEY, &bytes, 16)?;
                if found != INDEX_FORMAT {
                    return Err(StoreError::UnsupportedFormat {
                        path: path.to_path_buf(),
                        found,
                    });
                }
            }
        }
        Ok(index)
    }

    /// The blob record of `hash`, if any.
    pub fn blob(&self, hash: &BlobHash) -> Result<Option<BlobRecord>, StoreError> {
        let key = blob_key(hash);
        match self.get(&key)? {
            None => Ok(None),
            Some(bytes) => self.decode(&key, &bytes, MAX_RECORD_BYTES).map(Some),
        }
    }

    /// Every blob record.
    pub fn blobs(&self) -> Result<Vec<(BlobHash, BlobRecord)>, StoreError> {
        let mut out = Vec::new();
        for (key, value) in self.scan(BLOB_PREFIX)? {
            let hash = hash_from_key(&key[1..]).ok_or_else(|| self.bad_key(&key))?;
            out.push((hash, self.decode(&key, &value, MAX_RECORD_BYTES)?));
        }
        Ok(out)
    }

    /// Every pin as (blob, tag).
    pub fn pins(&self) -> Result<Vec<(BlobHash, String)>, StoreError> {
        let mut out = Vec::new();
        for (key, _) in self.scan(PIN_PREFIX)? {
            let hash = key
                .get(1..1 + HASH_BYTES)
                .and_then(hash_from_key)
                .ok_or_else(|| self.bad_key(&key))?;
            let tag = String::from_utf8(key[1 + HASH_BYTES..].to_vec())
                .map_err(|_| self.bad_key(&key))?;
            out.push((hash, tag));
        }
        Ok(out)
    }

    /// The signed manifest of bundle `id`, if stored.
    pub fn manifest(&self, id: &BundleId) -> Result<Option<SignedManifest>, StoreError> {
        let key = manifest_key(id);
        match self.get(&key)? {
            None => Ok(None),
            Some(bytes) => self.decode_manifest(&key, &bytes).map(Some),
        }
    }

    /// Every stored signed manifest, in bundle id order.
    pub fn manifests(&self) -> Result<Vec<SignedManifest>, StoreError> {
        self.scan(MANIFEST_PREFIX)?
            .into_iter()
            .map(|(key, value)| self.decode_manifest(&key, &value))
            .collect()
    }

    /// Starts a batch of changes, applied atomically by [`Index::commit`].
    pub fn batch(&self) -> IndexBatch<'_> {
        IndexBatch {
            index: self,
            batch: WriteBatch::default(),
        }
    }

    /// Writes `batch` and waits until it is durable (the WAL is fsynced).
    fn write_synced(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .write_opt(batch, &options)
            .map_err(|e| self.db_error("write", e))
    }

    /// Writes `batch` without waiting for the disk: for LRU clock updates, which may be lost.
    fn write_lazy(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.db.write(batch).map_err(|e| self.db_error("write", e))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get(key).map_err(|e| self.db_error("read", e))
    }

    fn scan(&self, prefix: u8) -> Result<Vec<KeyValue>, StoreError> {
        let start = [prefix];
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(&start, Direction::Forward))
        {
            let (key, value) = item.map_err(|e| self.db_error("scan", e))?;
            if key.first() != Some(&prefix) {
                break;
            }
            out.push((key, value));
        }
        Ok(out)
    }

    fn encode<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, StoreError> {
        codec::encode(value).map_err(|e| StoreError::Index {
            path: self.path.clone(),
            message: format!("cannot encode a record: {e}"),
        })
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        bytes: &[u8],
        limit: usize,
    ) -> Result<T, StoreError> {
        codec::decode(bytes, limit).map_err(|e| StoreError::CorruptRecord {
            path: self.path.clone(),
            key: printable_key(key),
            reason: e.to_string(),
        })
    }

    fn decode_manifest(&self, key: &[u8], bytes: &[u8]) -> Result<SignedManifest, StoreError> {
        codec::decode(bytes, MAX_MANIFEST_BYTES + 128).map_err(|e| StoreError::CorruptRecord {
            path: self.path.clone(),
            key: printable_key(key),
            reason: e.to_string(),
        })
    }

    fn bad_key(&self, key: &[u8]) -> StoreError {
        StoreError::CorruptRecord {
            path: self.path.clone(),
            key: printable_key(key),
            reason: "malformed key".into(),
        }
    }

    fn db_error(&self, op: &str, error: rocksdb::Error) -> StoreError {
        StoreError::Index {
            path: self.path.clone(),
            message: format!("{op} failed: {}", error.into_string()),
        }
    }
}

/// An atomic group of index changes.
pub struct IndexBatch<'a> {
    index: &'a Index,
    batch: WriteBatch,
}

impl IndexBatch<'_> {
    /// Sets the record of `hash`.
    pub fn put_blob(&mut self, hash: &BlobHash, record: &BlobRecord) -> Result<(), StoreError> {
        let value = self.index.encode(record)?;
        self.batch.put(blob_key(hash), value);
        Ok(())
    }

    /// Removes the record of `hash`.
    pub fn delete_blob(&mut self, hash: &BlobHash) {
        self.batch.delete(blob_key(hash));
    }

    /// Stores a signed manifest under its bundle id.
    pub fn put_manifest(&mut self, manifest: &SignedManifest) -> Result<(), StoreError> {
        let value = self.index.encode(manifest)?;
        self.batch.put(manifest_key(&manifest.id()), value);
        Ok(())
    }

    /// Removes the manifest of bundle `id`.
    pub fn delete_manifest(&mut self, id: &BundleId) {
        self.batch.delete(manifest_key(id));
    }

    /// Records that `tag` pins `hash`.
    pub fn put_pin(&mut self, hash: &BlobHash, tag: &str) {
        self.batch.put(pin_key(hash, tag), b"");
    }

    /// Removes the pin of `hash` by `tag`.
    pub fn delete_pin(&mut self, hash: &BlobHash, tag: &str) {
        self.batch.delete(pin_key(hash, tag));
    }

    /// Applies the batch atomically and durably (fsynced WAL) before returning.
    pub fn commit(self) -> Result<(), StoreError> {
        self.index.write_synced(self.batch)
    }

    /// Applies the batch atomically without waiting for the disk (a crash may lose it).
    pub fn commit_lazy(self) -> Result<(), StoreError> {
        self.index.write_lazy(self.batch)
    }
}

fn blob_key(hash: &BlobHash) -> [u8; 1 + HASH_BYTES] {
    let mut key = [0u8; 1 + HASH_BYTES];
    key[0] = BLOB_PREFIX;
    key[1..].copy_from_slice(hash.as_bytes());
    key
}

fn manifest_key(id: &BundleId) -> [u8; 1 + HASH_BYTES] {
    let mut key = [0u8; 1 + HASH_BYTES];
    key[0] = MANIFEST_PREFIX;
    key[1..].copy_from_slice(id.as_bytes());
    key
}

fn pin_key(hash: &BlobHash, tag: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + HASH_BYTES + tag.len());
    key.push(PIN_PREFIX);
    key.extend_from_slice(hash.as_bytes());
    key.extend_from_slice(tag.as_bytes());
    key
}

fn hash_from_key(bytes: &[u8]) -> Option<BlobHash> {
    <[u8; HASH_BYTES]>::try_from(bytes)
        .ok()
        .map(BlobHash::from_bytes)
}

/// A key for error messages: its kind letter, then hex.
fn printable_key(key: &[u8]) -> String {
    match key.split_first() {
        Some((kind, rest)) => format!("{}:{}", *kind as char, hex::encode(rest)),
        None => String::from("(empty key)"),
    }
}
