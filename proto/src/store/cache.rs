//! The cache side of the store: the in-memory mirror of the index used for accounting, and LRU
//! eviction.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::sync::{Arc, RwLock};

use super::files::{self, io_error};
use super::{Store, StoreError};
use crate::hash::BlobHash;
use crate::verify::GroupRanges;

/// The in-memory mirror of the index that eviction and accounting need. Every change to a blob
/// record or pin happens with this lock held, so mirror and index agree.
#[derive(Default)]
pub(super) struct State {
    /// Logical clock for LRU; larger is more recent.
    pub(super) clock: u64,
    pub(super) blobs: HashMap<BlobHash, Entry>,
    pub(super) pins: HashMap<BlobHash, BTreeSet<String>>,
    /// Unpinned blobs by last access: the eviction order.
    pub(super) lru: BTreeSet<(u64, BlobHash)>,
    /// Total size of unpinned blobs.
    pub(super) cached_bytes: u64,
    /// Total size of every blob with a record (pinned, cached, partial).
    pub(super) stored_bytes: u64,
    /// Blobs evicted since the store opened.
    pub(super) evicted_blobs: u64,
    /// Bytes of the blobs evicted since the store opened.
    pub(super) evicted_bytes: u64,
    /// The pinned blobs alone exceed the limit (warned once until they fit again).
    pub(super) kept_over_limit: bool,
    /// Blobs with an open [`PartialBlob`], with the groups it verified and wrote so far (readers
    /// serve from this before it is durable; it only ever grows).
    pub(super) writers: HashMap<BlobHash, Arc<RwLock<GroupRanges>>>,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Entry {
    pub(super) size: u64,
    pub(super) complete: bool,
    pub(super) last_access: u64,
}

impl State {
    pub(super) fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    pub(super) fn is_pinned(&self, hash: &BlobHash) -> bool {
        self.pins.get(hash).is_some_and(|tags| !tags.is_empty())
    }

    /// Adds the blob to the cache accounting if it is unpinned.
    pub(super) fn track(&mut self, hash: BlobHash) {
        if self.is_pinned(&hash) {
            return;
        }
        if let Some(entry) = self.blobs.get(&hash) {
            self.lru.insert((entry.last_access, hash));
            self.cached_bytes += entry.size;
        }
    }

    /// Removes the blob from the cache accounting if it is unpinned.
    pub(super) fn untrack(&mut self, hash: BlobHash) {
        if self.is_pinned(&hash) {
            return;
        }
        if let Some(entry) = self.blobs.get(&hash) {
            self.lru.remove(&(entry.last_access, hash));
            self.cached_bytes = self.cached_bytes.saturating_sub(entry.size);
        }
    }

    pub(super) fn set_entry(&mut self, hash: BlobHash, entry: Entry) {
        self.untrack(hash);
        if let Some(old) = self.blobs.insert(hash, entry) {
            self.stored_bytes = self.stored_bytes.saturating_sub(old.size);
        }
        self.stored_bytes += entry.size;
        self.track(hash);
    }

    pub(super) fn remove_entry(&mut self, hash: &BlobHash) -> Option<Entry> {
        self.untrack(*hash);
        let removed = self.blobs.remove(hash);
        if let Some(old) = &removed {
            self.stored_bytes = self.stored_bytes.saturating_sub(old.size);
        }
        removed
    }

    /// Bytes of pinned blobs (the kept set).
    pub(super) fn pinned_bytes(&self) -> u64 {
        self.stored_bytes.saturating_sub(self.cached_bytes)
    }

    pub(super) fn live(&self, hash: &BlobHash) -> Option<GroupRanges> {
        self.writers
            .get(hash)
            .map(|live| live.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

impl Store {
    /// Under the lock: evicts least recently used unpinned blobs until the store (pinned and
    /// unpinned blobs together) fits its limit. Never touches `protect`, pinned blobs or blobs
    /// with an open writer; when the pinned blobs alone exceed the limit they all stay, with a
    /// warning.
    pub(super) fn evict(
        &self,
        state: &mut State,
        protect: Option<BlobHash>,
    ) -> Result<(), StoreError> {
        let limit = self.inner.options.cache_limit_bytes;
        if state.stored_bytes > limit {
            let mut remaining = state.stored_bytes;
            let mut victims = Vec::new();
            let mut victim_bytes = 0u64;
            for (_, hash) in state.lru.iter() {
                if remaining <= limit {
                    break;
                }
                if Some(*hash) == protect || state.writers.contains_key(hash) {
                    continue;
                }
                if let Some(entry) = state.blobs.get(hash) {
                    remaining -= entry.size;
                    victim_bytes += entry.size;
                    victims.push(*hash);
                }
            }
            if !victims.is_empty() {
                tracing::info!(
                    evicted_blobs = victims.len(),
                    evicted_bytes = victim_bytes,
                    stored_bytes = state.stored_bytes,
                    limit_bytes = limit,
                    reason = "store over its limit; least recently used blobs no kept bundle pins",
                    "evicting"
                );
                for hash in &victims {
                    tracing::debug!(blob = %hash, "evicted: unpinned and least recently used");
                }
                self.remove_blobs(state, &victims)?;
                state.evicted_blobs += victims.len() as u64;
                state.evicted_bytes += victim_bytes;
            }
        }
        let pinned = state.pinned_bytes();
        if pinned > limit && !state.kept_over_limit {
            tracing::warn!(
                pinned_bytes = pinned,
                limit_bytes = limit,
                "the kept bundles alone exceed the store's limit; keeping them all (raise --cache-gib)"
            );
        }
        state.kept_over_limit = pinned > limit;
        Ok(())
    }

    /// Under the lock: deletes index entries durably, then the files.
    pub(super) fn remove_blobs(
        &self,
        state: &mut State,
        hashes: &[BlobHash],
    ) -> Result<(), StoreError> {
        let mut batch = self.inner.index.batch();
        for hash in hashes {
            batch.delete_blob(hash);
        }
        batch.commit()?;
        for hash in hashes {
            state.remove_entry(hash);
            let paths = self.paths(hash);
            // The index no longer names these files; if removal fails they are orphans that the
            // next open removes, so report and go on.
            for path in [&paths.data, &paths.outboard] {
                if let Err(error) = files::remove_if_present(path) {
                    tracing::warn!(blob = %hash, %error, "cannot remove evicted blob file");
                }
            }
        }
        Ok(())
    }

    /// Removes blob files that have no index record, and temporary files a crash left behind.
    pub(super) fn remove_orphans(&self) -> Result<(), StoreError> {
        let blobs_dir = &self.inner.blobs_dir;
        let entries = fs::read_dir(blobs_dir).map_err(io_error("listing", blobs_dir))?;
        let state = self.lock();
        let mut removed = 0usize;
        for entry in entries {
            let entry = entry.map_err(io_error("listing", blobs_dir))?;
            let dir = entry.path();
            if !dir.is_dir() {
                continue;
            }
            let dir_entries = fs::read_dir(&dir).map_err(io_error("listing", &dir))?;
            for file in dir_entries {
                let file = file.map_err(io_error("listing", &dir))?;
                let name = file.file_name();
                let Some((hash, temporary)) = name.to_str().and_then(files::parse_blob_file_name)
                else {
                    continue;
                };
                if temporary || !state.blobs.contains_key(&hash) {
                    files::remove_if_present(&file.path())?;
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed blob files without an index entry");
        }
        Ok(())
    }
}
