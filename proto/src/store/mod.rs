//! The blob store: data and outboard files, RocksDB index. I/O.
//!
//! Layout under the store's root directory:
//!
//! ```text
//! blobs/<first 2 hex>/<hash>.data   the blob's bytes (sparse while partial)
//! blobs/<first 2 hex>/<hash>.obao   its post-order outboard (verify::outboard_size bytes)
//! index/                            RocksDB: blob records, signed manifests, pins
//! ```
//!
//! Invariants:
//! - The index is never ahead of the disk: a group is recorded as verified only after its bytes
//!   and the tree entries above it were written and fsynced. After any crash, every group the
//!   index calls verified holds the right bytes.
//! - Only verified bytes are written into a blob: [`PartialBlob::accept`] takes items a
//!   [`Decoder`](crate::verify::Decoder) produced, and those exist only after they hashed right.
//! - Pinned blobs are never evicted. Unpinned blobs (complete or partial) are a cache, evicted
//!   least recently used first while the store's blobs together exceed
//!   [`StoreOptions::cache_limit_bytes`] (pinned blobs alone may exceed it: they stay, with a
//!   warning). Blobs with an open writer are never evicted. The index entry goes first, then the
//!   files, so a crash in between leaves only orphan files, removed at next open.
//! - Which bundles are pinned is decided by [`crate::retention`]: pins are replaced as a whole
//!   ([`Store::replace_pins`]), so a blob shared by a kept bundle keeps that bundle's pin.
//!
//! [`Store`] is a cheap handle (`Clone`, `Send`, `Sync`); servers share one across tasks and call
//! it from blocking threads.

mod cache;
mod error;
mod files;
mod index;
mod partial;

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::hash::BlobHash;
use crate::manifest::{BundleId, SignedManifest};
use crate::verify::{self, GroupRanges};

use cache::{Entry, State};
pub use error::StoreError;
use files::{io_error, BlobPaths, FileData, FileOutboard};
use index::{BlobRecord, Index, RecordState};
pub use partial::PartialBlob;

/// Default bound on the bytes of the store's blobs (10 GiB); pinned blobs may exceed it.
pub const DEFAULT_CACHE_LIMIT_BYTES: u64 = 10 * 1024 * 1024 * 1024;

/// Default amount of newly verified data after which a partial writer makes progress durable
/// (fsync data and outboard, then a synced index write), in bytes.
pub const DEFAULT_COMMIT_BATCH_BYTES: u64 = 1024 * 1024;

/// Default [`StoreOptions::sync_batch_bytes`]: 64 MiB. Three fsyncs per MiB written capped a
/// download at ~70 MB/s on a disk that writes 340 MB/s synced; one sync per 64 MiB leaves the
/// disk, not the syncs, as the limit.
pub const DEFAULT_SYNC_BATCH_BYTES: u64 = 64 * 1024 * 1024;

/// Largest blob the store accepts, in bytes (64 GiB): keeps a partial blob's record bounded.
pub const MAX_STORED_BLOB_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// Longest pin tag, in bytes.
pub const MAX_PIN_TAG_BYTES: usize = 256;

/// Directory of blob files under the store root.
const BLOBS_DIR: &str = "blobs";
/// Directory of the RocksDB index under the store root.
const INDEX_DIR: &str = "index";

/// How a [`Store`] behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// Bound on the total size of the store's blobs, in bytes: unpinned blobs are evicted while
    /// the store holds more. Pinned blobs are never evicted, even when they alone exceed it, and
    /// the most recently written blob is kept even if it alone is larger.
    pub cache_limit_bytes: u64,
    /// Newly verified bytes a [`PartialBlob`] gathers before it records them in the index
    /// (without waiting for the disk: a crashed process resumes from there, after re-verifying).
    pub commit_batch_bytes: u64,
    /// Newly verified bytes a [`PartialBlob`] gathers before it makes them durable: fsyncs its
    /// files and records the groups with a synced index write. What a power loss can cost.
    pub sync_batch_bytes: u64,
    /// How [`Store::encode_ranges`] checks groups read from disk before sending them: re-hash
    /// every group (the default: a disk that rotted is caught here, not by every client), or
    /// trust what verified when it was written (saves a BLAKE3 pass over every byte served).
    pub serve_check: verify::GroupCheck,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            cache_limit_bytes: DEFAULT_CACHE_LIMIT_BYTES,
            commit_batch_bytes: DEFAULT_COMMIT_BATCH_BYTES,
            sync_batch_bytes: DEFAULT_SYNC_BATCH_BYTES,
            serve_check: verify::GroupCheck::Rehash,
        }
    }
}

/// What the store holds of one blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobStatus {
    /// Nothing.
    Missing,
    /// Some groups, verified and on disk.
    Partial {
        /// Blob size in bytes.
        size: u64,
        /// The verified groups.
        verified: GroupRanges,
    },
    /// The whole blob.
    Complete {
        /// Blob size in bytes.
        size: u64,
    },
}

/// One blob in [`Store::list_blobs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// The blob.
    pub hash: BlobHash,
    /// Size in bytes.
    pub size: u64,
    /// True if every group is present.
    pub complete: bool,
    /// True if at least one tag pins it.
    pub pinned: bool,
}

/// Space the store uses, from its index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheUsage {
    /// Total size of unpinned blobs (the cache), in bytes.
    pub cached_bytes: u64,
    /// Total size of pinned blobs, in bytes.
    pub pinned_bytes: u64,
    /// The configured bound on the store's blobs (pinned and cached together).
    pub cache_limit_bytes: u64,
    /// Number of blobs with an index record.
    pub blobs: usize,
    /// Blobs evicted since the store opened.
    pub evicted_blobs: u64,
    /// Bytes of the blobs evicted since the store opened.
    pub evicted_bytes: u64,
}

impl CacheUsage {
    /// Total size of the store's blobs (pinned and cached), in bytes.
    pub fn stored_bytes(&self) -> u64 {
        self.cached_bytes + self.pinned_bytes
    }
}

/// What [`Store::replace_pins`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinChange {
    /// Pins (blob, tag) added.
    pub added: usize,
    /// Pins (blob, tag) removed.
    pub removed: usize,
}

/// A handle to an open blob store. Clones share the store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    blobs_dir: PathBuf,
    index: Index,
    options: StoreOptions,
    state: Mutex<State>,
}

impl Store {
    /// Opens the store in `dir`, creating it if needed. Removes files a crash left without an
    /// index entry, and evicts down to the cache limit.
    pub fn open(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Store, StoreError> {
        let root = dir.as_ref().to_path_buf();
        let blobs_dir = root.join(BLOBS_DIR);
        fs::create_dir_all(&blobs_dir).map_err(io_error("creating directory", &blobs_dir))?;
        files::sync_dir(&root)?;
        let index = Index::open(&root.join(INDEX_DIR))?;

        let mut state = State::default();
        for (hash, tag) in index.pins()? {
            state.pins.entry(hash).or_default().insert(tag);
        }
        for (hash, record) in index.blobs()? {
            state.clock = state.clock.max(record.last_access);
            let entry = Entry {
                size: record.size,
                complete: record.state == RecordState::Complete,
                last_access: record.last_access,
            };
            state.set_entry(hash, entry);
        }
        let store = Store {
            inner: Arc::new(Inner {
                root,
                blobs_dir,
                index,
                options,
                state: Mutex::new(state),
            }),
        };
        store.remove_orphans()?;
        {
            let mut state = store.lock();
            store.evict(&mut state, None)?;
        }
        tracing::debug!(root = %store.inner.root.display(), "blob store open");
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.inner.options
    }

    /// Stores a complete blob held in memory (computing its outboard) and returns its hash.
    /// Storing a blob that is already complete only marks it as recently used.
    pub fn put_blob(&self, data: &[u8]) -> Result<BlobHash, StoreError> {
        let outboard = verify::compute_outboard(data);
        let hash = outboard.hash;
        let size = outboard.size;
        if size > MAX_STORED_BLOB_BYTES {
            return Err(StoreError::TooLarge { hash, size });
        }
        if self.touch_complete(&hash)?.is_some() {
            return Ok(hash);
        }
        let paths = self.paths(&hash);
        paths.ensure_dir()?;
        let data_temp = BlobPaths::temp_for(&paths.data);
        let outboard_temp = BlobPaths::temp_for(&paths.outboard);
        let written = files::write_new_file(&data_temp, data)
            .and_then(|()| files::write_new_file(&outboard_temp, &outboard.data));
        if let Err(error) = written {
            let _ = files::remove_if_present(&data_temp);
            let _ = files::remove_if_present(&outboard_temp);
            return Err(error);
        }

        // Renames and the record change under the lock, so eviction of the same hash cannot
        // interleave and leave a record without files.
        let mut state = self.lock();
        let outcome =
            self.install_complete(&mut state, hash, size, &paths, &data_temp, &outboard_temp);
        if outcome.is_err() {
            let _ = files::remove_if_present(&data_temp);
            let _ = files::remove_if_present(&outboard_temp);
        }
        outcome?;
        self.evict(&mut state, Some(hash))?;
        tracing::debug!(blob = %hash, size, "stored complete blob");
        Ok(hash)
    }

    /// True if the whole blob is in the store.
    pub fn has_blob(&self, hash: &BlobHash) -> bool {
        self.lock()
            .blobs
            .get(hash)
            .is_some_and(|entry| entry.complete)
    }

    /// What the store holds of `hash`. For a blob being written, includes the groups verified so
    /// far.
    pub fn blob_status(&self, hash: &BlobHash) -> Result<BlobStatus, StoreError> {
        let state = self.lock();
        let Some(entry) = state.blobs.get(hash).copied() else {
            return Ok(BlobStatus::Missing);
        };
        if entry.complete {
            return Ok(BlobStatus::Complete { size: entry.size });
        }
        let verified = match state.live(hash) {
            Some(live) => live,
            None => self.recorded_groups(hash, entry.size)?,
        };
        Ok(BlobStatus::Partial {
            size: entry.size,
            verified,
        })
    }

    /// The whole blob, checked against its hash, or `None` if it is not complete here. Marks it
    /// as recently used.
    pub fn get_blob(&self, hash: &BlobHash) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(size) = self.touch_complete(hash)? else {
            return Ok(None);
        };
        let paths = self.paths(hash);
        let Some(file) = open_existing(&paths.data)? else {
            return Ok(None);
        };
        let len = usize::try_from(size).map_err(|_| StoreError::TooLarge { hash: *hash, size })?;
        let mut data = vec![0u8; len];
        file.read_exact_at(&mut data, 0)
            .map_err(io_error("reading", &paths.data))?;
        if BlobHash::of(&data) != *hash {
            return Err(StoreError::Corrupt {
                hash: *hash,
                path: paths.data,
            });
        }
        Ok(Some(data))
    }

    /// The bytes `range` of a blob, if every group they touch is present (complete blob, or
    /// verified groups of a partial one). Bytes are returned as stored: they were verified when
    /// written; use [`Store::get_blob`] or [`Store::encode_ranges`] to re-check them.
    pub fn read_range(
        &self,
        hash: &BlobHash,
        range: Range<u64>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let Some((size, present)) = self.present_groups(hash)? else {
            return Ok(None);
        };
        if range.start > range.end || range.end > size {
            return Ok(None);
        }
        let needed = GroupRanges::from_byte_range(range.clone());
        if !present.is_superset(&needed) {
            return Ok(None);
        }
        let paths = self.paths(hash);
        let Some(file) = open_existing(&paths.data)? else {
            return Ok(None);
        };
        let len = usize::try_from(range.end - range.start)
            .map_err(|_| StoreError::TooLarge { hash: *hash, size })?;
        let mut data = vec![0u8; len];
        file.read_exact_at(&mut data, range.start)
            .map_err(io_error("reading", &paths.data))?;
        Ok(Some(data))
    }

    /// Starts writing `hash` (of `size` bytes, from a trusted manifest), or resumes an earlier
    /// partial write. The returned writer says which groups are already verified; only one writer
    /// per blob may be open at a time.
    pub fn begin_or_resume(&self, hash: BlobHash, size: u64) -> Result<PartialBlob, StoreError> {
        if size > MAX_STORED_BLOB_BYTES {
            return Err(StoreError::TooLarge { hash, size });
        }
        let live = Arc::new(RwLock::new(GroupRanges::empty()));
        let (complete, recorded, unsynced_claims) = {
            let mut state = self.lock();
            if state.writers.contains_key(&hash) {
                return Err(StoreError::WriteInProgress { hash });
            }
            let outcome = self.prepare_writer(&mut state, hash, size)?;
            state.writers.insert(hash, Arc::clone(&live));
            outcome
        };
        // From here on the writer is registered; the guard unregisters it on every exit.
        let guard = partial::WriterGuard::new(self.clone(), hash);
        let paths = self.paths(&hash);
        paths.ensure_dir()?;
        let (data, data_created) = files::open_read_write(&paths.data)?;
        let (outboard, outboard_created) = files::open_read_write(&paths.outboard)?;
        // The new entries need a directory fsync before any synced record claims their data;
        // `PartialBlob` does it right after it fsyncs the files, when the journal commit for
        // them has made it almost free, instead of here, where it is a commit of its own.
        let dir_unsynced = data_created || outboard_created;
        let mut verified = recorded;
        let mut complete = complete;
        let mut unsynced = GroupRanges::empty();
        if (data_created || outboard_created)
            && (complete || !verified.is_empty() || !unsynced_claims.is_empty())
        {
            // The files vanished under a record that claims data: trust none of it.
            tracing::warn!(blob = %hash, "blob files missing; restarting its download");
            verified = GroupRanges::empty();
            complete = false;
            let now = self.lock().tick();
            self.write_partial_record(hash, size, &verified, now, Durability::Synced)?;
            let mut state = self.lock();
            if let Some(entry) = state.blobs.get(&hash).copied() {
                state.set_entry(
                    hash,
                    Entry {
                        complete: false,
                        ..entry
                    },
                );
            }
        }
        ensure_len(&data, &paths.data, size)?;
        ensure_len(&outboard, &paths.outboard, verify::outboard_size(size))?;
        if data_created {
            files::reserve(&data, &paths.data, size)?;
        } else if !complete && !unsynced_claims.is_empty() {
            unsynced = self.reverify(hash, size, &data, &outboard, &unsynced_claims);
        }
        *live.write().unwrap_or_else(|e| e.into_inner()) = verified.union(&unsynced);
        {
            let mut state = self.lock();
            self.evict(&mut state, Some(hash))?;
        }
        Ok(PartialBlob::new(partial::PartialParts {
            store: self.clone(),
            guard,
            hash,
            size,
            paths,
            data,
            outboard,
            complete,
            verified,
            unsynced,
            live,
            dir_unsynced,
        }))
    }

    /// What a server can send for a request: the blob size and the requested groups it holds
    /// (normalised, see [`verify::servable_ranges`]). `None` if the blob is not here at all.
    /// Send the ranges to the client before the stream from [`Store::encode_ranges`].
    pub fn servable_ranges(
        &self,
        hash: &BlobHash,
        requested: &GroupRanges,
    ) -> Result<Option<(u64, GroupRanges)>, StoreError> {
        Ok(self
            .present_groups(hash)?
            .map(|(size, present)| (size, verify::servable_ranges(requested, &present, size))))
    }

    /// Writes the response stream for the requested groups that are present (all of a complete
    /// blob, the verified ones of a partial blob, even while it is being written) and returns the
    /// groups it carried; the client must decode with exactly those. Every parent is checked
    /// against the hash before it is sent, and every group too unless
    /// [`StoreOptions::serve_check`] says to trust the data.
    pub fn encode_ranges<W: Write + ?Sized>(
        &self,
        hash: &BlobHash,
        requested: &GroupRanges,
        out: &mut W,
    ) -> Result<GroupRanges, StoreError> {
        let (size, ranges) = self
            .servable_ranges(hash, requested)?
            .ok_or(StoreError::NotFound { hash: *hash })?;
        let to_encode_error = |source| StoreError::Encode {
            hash: *hash,
            source,
        };
        if ranges.is_empty() {
            // Just the size header: no file needs to exist yet.
            let nothing: &[u8] = &[];
            verify::encode_ranges_from(nothing, nothing, *hash, size, &ranges, out)
                .map_err(to_encode_error)?;
            return Ok(ranges);
        }
        let paths = self.paths(hash);
        let not_found = || StoreError::NotFound { hash: *hash };
        let data = open_existing(&paths.data)?.ok_or_else(not_found)?;
        let outboard = open_existing(&paths.outboard)?.ok_or_else(not_found)?;
        verify::encode_ranges_checked(
            &FileData::new(&data),
            &FileOutboard::new(&outboard),
            *hash,
            size,
            &ranges,
            out,
            self.options().serve_check,
        )
        .map_err(to_encode_error)?;
        // Serving is use: a blob peers keep asking for stays cached.
        self.touch_complete(hash)?;
        Ok(ranges)
    }

    /// Removes a blob and its files. Refuses pinned blobs and blobs being written. Returns whether
    /// it was there.
    pub fn delete_blob(&self, hash: &BlobHash) -> Result<bool, StoreError> {
        let mut state = self.lock();
        if state.writers.contains_key(hash) {
            return Err(StoreError::WriteInProgress { hash: *hash });
        }
        if let Some(tags) = state.pins.get(hash).filter(|tags| !tags.is_empty()) {
            return Err(StoreError::Pinned {
                hash: *hash,
                tags: tags.iter().cloned().collect(),
            });
        }
        if !state.blobs.contains_key(hash) {
            return Ok(false);
        }
        self.remove_blobs(&mut state, &[*hash])?;
        Ok(true)
    }

    /// Stores a signed manifest under its bundle id (durably). Does not check the signature: the
    /// caller verifies against its trusted publishers first.
    pub fn put_manifest(&self, manifest: &SignedManifest) -> Result<BundleId, StoreError> {
        let mut batch = self.inner.index.batch();
        batch.put_manifest(manifest)?;
        batch.commit()?;
        Ok(manifest.id())
    }

    /// The signed manifest of bundle `id`, if stored.
    pub fn get_manifest(&self, id: &BundleId) -> Result<Option<SignedManifest>, StoreError> {
        self.inner.index.manifest(id)
    }

    /// Every stored signed manifest, in bundle id order.
    pub fn list_manifests(&self) -> Result<Vec<SignedManifest>, StoreError> {
        self.inner.index.manifests()
    }

    /// Removes the manifest of bundle `id` (its blobs stay).
    pub fn delete_manifest(&self, id: &BundleId) -> Result<(), StoreError> {
        let mut batch = self.inner.index.batch();
        batch.delete_manifest(id);
        batch.commit()
    }

    /// Pins `hash` under `tag` (e.g. `desired:<bundle id>`): a pinned blob is never evicted. A
    /// blob may be pinned before it arrives.
    pub fn pin(&self, hash: &BlobHash, tag: &str) -> Result<(), StoreError> {
        check_tag(tag)?;
        let mut state = self.lock();
        if state.pins.get(hash).is_some_and(|tags| tags.contains(tag)) {
            return Ok(());
        }
        let mut batch = self.inner.index.batch();
        batch.put_pin(hash, tag);
        batch.commit()?;
        state.untrack(*hash);
        state.pins.entry(*hash).or_default().insert(tag.to_owned());
        state.track(*hash);
        Ok(())
    }

    /// Removes the pin of `hash` by `tag`; once no tag pins it, the blob joins the cache (and may
    /// be evicted at once if the cache is over its limit).
    pub fn unpin(&self, hash: &BlobHash, tag: &str) -> Result<(), StoreError> {
        let mut state = self.lock();
        if !state.pins.get(hash).is_some_and(|tags| tags.contains(tag)) {
            return Ok(());
        }
        let mut batch = self.inner.index.batch();
        batch.delete_pin(hash, tag);
        batch.commit()?;
        state.untrack(*hash);
        if let Some(tags) = state.pins.get_mut(hash) {
            tags.remove(tag);
            if tags.is_empty() {
                state.pins.remove(hash);
            }
        }
        state.track(*hash);
        self.evict(&mut state, None)
    }

    /// Removes `tag` from every blob it pins; returns how many it pinned.
    pub fn unpin_tag(&self, tag: &str) -> Result<usize, StoreError> {
        let mut state = self.lock();
        let hashes: Vec<BlobHash> = state
            .pins
            .iter()
            .filter(|(_, tags)| tags.contains(tag))
            .map(|(hash, _)| *hash)
            .collect();
        if hashes.is_empty() {
            return Ok(0);
        }
        let mut batch = self.inner.index.batch();
        for hash in &hashes {
            batch.delete_pin(hash, tag);
        }
        batch.commit()?;
        for hash in &hashes {
            state.untrack(*hash);
            if let Some(tags) = state.pins.get_mut(hash) {
                tags.remove(tag);
                if tags.is_empty() {
                    state.pins.remove(hash);
                }
            }
            state.track(*hash);
        }
        self.evict(&mut state, None)?;
        Ok(hashes.len())
    }

    /// The tags pinning `hash`, sorted.
    pub fn pins(&self, hash: &BlobHash) -> Vec<String> {
        self.lock()
            .pins
            .get(hash)
            .map(|tags| tags.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every blob with an index record, in hash order.
    pub fn list_blobs(&self) -> Vec<BlobInfo> {
        let state = self.lock();
        let mut out: Vec<BlobInfo> = state
            .blobs
            .iter()
            .map(|(hash, entry)| BlobInfo {
                hash: *hash,
                size: entry.size,
                complete: entry.complete,
                pinned: state.is_pinned(hash),
            })
            .collect();
        out.sort_by_key(|info| info.hash);
        out
    }

    /// Space used by cached and pinned blobs.
    pub fn usage(&self) -> CacheUsage {
        let state = self.lock();
        CacheUsage {
            cached_bytes: state.cached_bytes,
            pinned_bytes: state.pinned_bytes(),
            cache_limit_bytes: self.inner.options.cache_limit_bytes,
            blobs: state.blobs.len(),
            evicted_blobs: state.evicted_blobs,
            evicted_bytes: state.evicted_bytes,
        }
    }

    /// Pins every blob of `hashes` under `tag` in one durable write (see [`Store::pin`]).
    pub fn pin_all(&self, hashes: &[BlobHash], tag: &str) -> Result<(), StoreError> {
        check_tag(tag)?;
        let mut state = self.lock();
        let new: Vec<BlobHash> = hashes
            .iter()
            .filter(|hash| !state.pins.get(*hash).is_some_and(|tags| tags.contains(tag)))
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let mut batch = self.inner.index.batch();
        for hash in &new {
            batch.put_pin(hash, tag);
        }
        batch.commit()?;
        for hash in new {
            state.untrack(hash);
            state.pins.entry(hash).or_default().insert(tag.to_owned());
            state.track(hash);
        }
        Ok(())
    }

    /// Makes the pins whose tag starts with `prefix` exactly `wanted` (blob → tags, each tag
    /// starting with `prefix`), in one durable write: pins with that prefix not in `wanted` are
    /// removed, missing ones added. Pins with other prefixes are untouched. With `remove` false,
    /// only adds. Then evicts down to the limit: a blob still pinned by any tag stays.
    pub fn replace_pins(
        &self,
        prefix: &str,
        wanted: &HashMap<BlobHash, BTreeSet<String>>,
        remove: bool,
    ) -> Result<PinChange, StoreError> {
        for tags in wanted.values() {
            for tag in tags {
                check_tag(tag)?;
                if !tag.starts_with(prefix) {
                    return Err(StoreError::TagPrefix {
                        tag: tag.clone(),
                        prefix: prefix.to_owned(),
                    });
                }
            }
        }
        let mut state = self.lock();
        let mut to_remove: Vec<(BlobHash, String)> = Vec::new();
        if remove {
            for (hash, tags) in &state.pins {
                for tag in tags {
                    let keep = wanted.get(hash).is_some_and(|w| w.contains(tag));
                    if tag.starts_with(prefix) && !keep {
                        to_remove.push((*hash, tag.clone()));
                    }
                }
            }
        }
        let mut to_add: Vec<(BlobHash, String)> = Vec::new();
        for (hash, tags) in wanted {
            for tag in tags {
                if !state.pins.get(hash).is_some_and(|t| t.contains(tag)) {
                    to_add.push((*hash, tag.clone()));
                }
            }
        }
        let change = PinChange {
            added: to_add.len(),
            removed: to_remove.len(),
        };
        if to_add.is_empty() && to_remove.is_empty() {
            self.evict(&mut state, None)?;
            return Ok(change);
        }
        let mut batch = self.inner.index.batch();
        for (hash, tag) in &to_remove {
            batch.delete_pin(hash, tag);
        }
        for (hash, tag) in &to_add {
            batch.put_pin(hash, tag);
        }
        batch.commit()?;
        for (hash, tag) in to_remove {
            state.untrack(hash);
            if let Some(tags) = state.pins.get_mut(&hash) {
                tags.remove(&tag);
                if tags.is_empty() {
                    state.pins.remove(&hash);
                }
            }
            state.track(hash);
        }
        for (hash, tag) in to_add {
            state.untrack(hash);
            state.pins.entry(hash).or_default().insert(tag);
            state.track(hash);
        }
        self.evict(&mut state, None)?;
        Ok(change)
    }

    /// Evicts least recently used unpinned blobs until the store fits its limit.
    pub fn enforce_limit(&self) -> Result<(), StoreError> {
        let mut state = self.lock();
        self.evict(&mut state, None)
    }

    // ---- internals shared with the partial writer ----

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the mirror half-updated in a way that matters more than
        // refusing service would, so keep going.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn paths(&self, hash: &BlobHash) -> BlobPaths {
        BlobPaths::new(&self.inner.blobs_dir, hash)
    }

    /// Marks a complete blob as used now; returns its size, or `None` if it is not complete.
    fn touch_complete(&self, hash: &BlobHash) -> Result<Option<u64>, StoreError> {
        let mut state = self.lock();
        let Some(entry) = state.blobs.get(hash).copied().filter(|e| e.complete) else {
            return Ok(None);
        };
        let now = state.tick();
        let mut batch = self.inner.index.batch();
        batch.put_blob(
            hash,
            &BlobRecord {
                size: entry.size,
                state: RecordState::Complete,
                last_access: now,
            },
        )?;
        // Losing an access time in a crash only makes eviction slightly less fair.
        batch.commit_lazy()?;
        state.set_entry(
            *hash,
            Entry {
                last_access: now,
                ..entry
            },
        );
        Ok(Some(entry.size))
    }

    /// Size and present groups of a blob (live ones for a blob being written).
    fn present_groups(&self, hash: &BlobHash) -> Result<Option<(u64, GroupRanges)>, StoreError> {
        let state = self.lock();
        let Some(entry) = state.blobs.get(hash).copied() else {
            return Ok(None);
        };
        let present = if entry.complete {
            GroupRanges::all()
        } else if let Some(live) = state.live(hash) {
            live
        } else {
            self.recorded_groups(hash, entry.size)?
        };
        Ok(Some((entry.size, present)))
    }

    fn recorded_groups(&self, hash: &BlobHash, size: u64) -> Result<GroupRanges, StoreError> {
        Ok(match self.inner.index.blob(hash)? {
            Some(BlobRecord {
                state:
                    RecordState::Partial { verified } | RecordState::PartialUnsynced { verified, .. },
                ..
            }) => verified,
            Some(BlobRecord {
                state: RecordState::Complete,
                ..
            }) => GroupRanges::all().clamped(size),
            None => GroupRanges::empty(),
        })
    }

    /// Groups a partial record claims without having synced them (see
    /// [`RecordState::PartialUnsynced`]): to be re-verified before they are trusted.
    fn unsynced_groups(&self, hash: &BlobHash) -> Result<GroupRanges, StoreError> {
        Ok(match self.inner.index.blob(hash)? {
            Some(BlobRecord {
                state: RecordState::PartialUnsynced { unsynced, .. },
                ..
            }) => unsynced,
            _ => GroupRanges::empty(),
        })
    }

    /// Of the `claimed` groups of a partial blob, the ones whose bytes on disk verify against
    /// the blob's hash (every tree node up to the root, as a client would check them).
    fn reverify(
        &self,
        hash: BlobHash,
        size: u64,
        data: &fs::File,
        outboard: &fs::File,
        claimed: &GroupRanges,
    ) -> GroupRanges {
        let mut good = GroupRanges::empty();
        let mut encoded = Vec::new();
        for group in claimed.iter_groups(size) {
            let one: GroupRanges = std::iter::once(group).collect();
            encoded.clear();
            let encoded_ok = verify::encode_ranges_checked(
                &FileData::new(data),
                &FileOutboard::new(outboard),
                hash,
                size,
                &one,
                &mut encoded,
                verify::GroupCheck::TrustData,
            )
            .is_ok();
            let decoded_ok = encoded_ok
                && verify::Decoder::with_size(hash, size, one)
                    .decode_reader(&encoded[..], |_| Ok::<(), verify::VerifyError>(()))
                    .is_ok();
            if decoded_ok {
                good.insert(group);
            }
        }
        let lost = claimed.count(size) - good.count(size);
        if lost > 0 {
            tracing::warn!(blob = %hash, lost_groups = lost, "groups recorded before a sync did not survive; fetching them again");
        }
        good
    }

    /// Under the lock: decides what an opening writer starts from, creating the record if new.
    fn prepare_writer(
        &self,
        state: &mut State,
        hash: BlobHash,
        size: u64,
    ) -> Result<(bool, GroupRanges, GroupRanges), StoreError> {
        let now = state.tick();
        match state.blobs.get(&hash).copied() {
            Some(entry) if entry.complete => {
                if entry.size != size {
                    return Err(StoreError::SizeMismatch {
                        hash,
                        recorded: entry.size,
                        requested: size,
                    });
                }
                Ok((true, GroupRanges::all().clamped(size), GroupRanges::empty()))
            }
            Some(entry) => {
                let verified = self.recorded_groups(&hash, entry.size)?;
                let unsynced = self.unsynced_groups(&hash)?;
                if entry.size == size {
                    return Ok((false, verified, unsynced));
                }
                if !verified.is_empty() || !unsynced.is_empty() {
                    return Err(StoreError::SizeMismatch {
                        hash,
                        recorded: entry.size,
                        requested: size,
                    });
                }
                // Nothing was verified under the old size, so nothing is lost by taking the new.
                self.start_fresh_partial(state, hash, size, now)
            }
            None => self.start_fresh_partial(state, hash, size, now),
        }
    }

    /// Under the lock: records a new, empty partial blob of `size` bytes.
    fn start_fresh_partial(
        &self,
        state: &mut State,
        hash: BlobHash,
        size: u64,
        now: u64,
    ) -> Result<(bool, GroupRanges, GroupRanges), StoreError> {
        self.write_partial_record(hash, size, &GroupRanges::empty(), now, Durability::Lazy)?;
        state.set_entry(
            hash,
            Entry {
                size,
                complete: false,
                last_access: now,
            },
        );
        Ok((false, GroupRanges::empty(), GroupRanges::empty()))
    }

    /// Records the verified groups of a partial blob. The caller has fsynced the files.
    /// [`Durability::Lazy`] is only for records that claim no groups: losing one in a crash
    /// loses nothing (its files become orphans, removed at the next open).
    fn write_partial_record(
        &self,
        hash: BlobHash,
        size: u64,
        verified: &GroupRanges,
        last_access: u64,
        durability: Durability,
    ) -> Result<(), StoreError> {
        let mut batch = self.inner.index.batch();
        batch.put_blob(
            &hash,
            &BlobRecord {
                size,
                state: RecordState::Partial {
                    verified: verified.clone(),
                },
                last_access,
            },
        )?;
        match durability {
            Durability::Synced => batch.commit(),
            Durability::Lazy => batch.commit_lazy(),
        }
    }

    /// Progress of a registered writer: its partial record (synced, or lazily for groups not yet
    /// fsynced; see [`RecordState::PartialUnsynced`]), then the mirror's access time.
    fn record_progress(
        &self,
        hash: BlobHash,
        size: u64,
        state: RecordState,
        durability: Durability,
    ) -> Result<(), StoreError> {
        let now = self.lock().tick();
        let mut batch = self.inner.index.batch();
        batch.put_blob(
            &hash,
            &BlobRecord {
                size,
                state,
                last_access: now,
            },
        )?;
        // While the writer is registered nobody else writes or deletes this record, so the
        // write can run without the lock.
        match durability {
            Durability::Synced => batch.commit()?,
            Durability::Lazy => batch.commit_lazy()?,
        }
        let mut state = self.lock();
        if let Some(entry) = state.blobs.get(&hash).copied() {
            state.set_entry(
                hash,
                Entry {
                    last_access: now,
                    ..entry
                },
            );
        }
        Ok(())
    }

    /// A registered writer verified every group: record the blob as complete.
    fn commit_complete(&self, hash: BlobHash, size: u64) -> Result<(), StoreError> {
        let mut state = self.lock();
        let now = state.tick();
        let mut batch = self.inner.index.batch();
        batch.put_blob(
            &hash,
            &BlobRecord {
                size,
                state: RecordState::Complete,
                last_access: now,
            },
        )?;
        batch.commit()?;
        state.set_entry(
            hash,
            Entry {
                size,
                complete: true,
                last_access: now,
            },
        );
        self.evict(&mut state, Some(hash))
    }

    fn release_writer(&self, hash: &BlobHash) {
        self.lock().writers.remove(hash);
    }

    /// Under the lock: moves fsynced temporary files into place and records the blob complete.
    fn install_complete(
        &self,
        state: &mut State,
        hash: BlobHash,
        size: u64,
        paths: &BlobPaths,
        data_temp: &Path,
        outboard_temp: &Path,
    ) -> Result<(), StoreError> {
        if state.writers.contains_key(&hash) {
            return Err(StoreError::WriteInProgress { hash });
        }
        fs::rename(data_temp, &paths.data).map_err(io_error("renaming into place", &paths.data))?;
        fs::rename(outboard_temp, &paths.outboard)
            .map_err(io_error("renaming into place", &paths.outboard))?;
        files::sync_dir(&paths.dir)?;
        let now = state.tick();
        let mut batch = self.inner.index.batch();
        batch.put_blob(
            &hash,
            &BlobRecord {
                size,
                state: RecordState::Complete,
                last_access: now,
            },
        )?;
        batch.commit()?;
        state.set_entry(
            hash,
            Entry {
                size,
                complete: true,
                last_access: now,
            },
        );
        Ok(())
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.inner.root)
            .field("options", &self.inner.options)
            .finish()
    }
}

/// Whether an index write waits for the disk.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Fsync the write-ahead log before returning.
    Synced,
    /// Return once RocksDB has the write; a crash may lose it.
    Lazy,
}

fn check_tag(tag: &str) -> Result<(), StoreError> {
    if tag.is_empty() || tag.len() > MAX_PIN_TAG_BYTES {
        return Err(StoreError::BadTag { len: tag.len() });
    }
    Ok(())
}

/// Opens a file for reading; `None` if it does not exist (evicted meanwhile).
fn open_existing(path: &Path) -> Result<Option<File>, StoreError> {
    match File::open(path) {
        Ok(file) => Ok(Some(file)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(io_error("opening", path)(error)),
    }
}

/// Sets a file's length if it differs (new sparse files, or a size that changed).
fn ensure_len(file: &File, path: &Path, len: u64) -> Result<(), StoreError> {
    let current = file
        .metadata()
        .map_err(io_error("reading metadata of", path))?
        .len();
    if current != len {
        file.set_len(len).map_err(io_error("sizing", path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_errors_say_so_and_name_the_path() {
        let path = Path::new("/var/lib/stagecoach/blobs/ab/x.data");
        let error = io_error("writing", path)(io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(error, StoreError::DiskFull { .. }));
        let message = error.to_string();
        assert!(message.contains("disk full"), "{message}");
        assert!(
            message.contains("/var/lib/stagecoach/blobs/ab/x.data"),
            "{message}"
        );
    }

    #[test]
    fn blob_file_names_parse() {
        let hash = BlobHash::of(b"x");
        assert_eq!(
            files::parse_blob_file_name(&format!("{hash}.data")),
            Some((hash, false))
        );
        assert_eq!(
            files::parse_blob_file_name(&format!("{hash}.obao.tmp.12.3")),
            Some((hash, true))
        );
        assert_eq!(files::parse_blob_file_name("LOCK"), None);
        assert_eq!(files::parse_blob_file_name(&format!("{hash}.txt")), None);
    }

    #[test]
    fn store_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Store>();
        fn assert_send<T: Send>() {}
        assert_send::<PartialBlob>();
    }
}
