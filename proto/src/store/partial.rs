//! [`PartialBlob`]: writes verified items of a download into a blob's files and makes progress
//! durable in batches.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, RwLock};

use super::files::{io_error, sync_dir, BlobPaths};
use super::index::RecordState;
use super::{Durability, Store, StoreError};
use crate::hash::BlobHash;
use crate::verify::{self, DecodeItem, Decoder, GroupRanges, VerifiedGroup, VerifyError};

/// Unregisters a blob's writer when dropped, on every exit path.
pub(super) struct WriterGuard {
    store: Store,
    hash: BlobHash,
}

impl WriterGuard {
    pub(super) fn new(store: Store, hash: BlobHash) -> Self {
        Self { store, hash }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.store.release_writer(&self.hash);
    }
}

/// What [`Store::begin_or_resume`] hands to [`PartialBlob::new`].
pub(super) struct PartialParts {
    pub store: Store,
    pub guard: WriterGuard,
    pub hash: BlobHash,
    pub size: u64,
    pub paths: BlobPaths,
    pub data: File,
    pub outboard: File,
    pub complete: bool,
    pub verified: GroupRanges,
    pub unsynced: GroupRanges,
    pub live: Arc<RwLock<GroupRanges>>,
    pub dir_unsynced: bool,
}

/// A download in progress into the store, from [`Store::begin_or_resume`].
///
/// Feed it the items of a [`Decoder`] ([`PartialBlob::decoder`] makes one for this blob) with
/// [`accept`](PartialBlob::accept), or a whole stream with
/// [`write_stream`](PartialBlob::write_stream). Group bytes go to their offset in the data file
/// and tree entries to their post-order slot in the outboard. Every
/// [`StoreOptions::commit_batch_bytes`](super::StoreOptions) of new groups they are recorded in
/// the index as *unsynced* (no fsync: a killed process resumes from there); every
/// [`StoreOptions::sync_batch_bytes`](super::StoreOptions), on
/// [`commit`](PartialBlob::commit), on [`finish`](PartialBlob::finish) and when dropped, both
/// files are fsynced and only then are the groups recorded as verified (a synced index write).
/// So the index never claims as verified bytes the disk may not hold, and unsynced claims are
/// re-verified against the blob's hash when the blob is resumed. Groups are served to other
/// readers as soon as they are written.
pub struct PartialBlob {
    store: Store,
    hash: BlobHash,
    size: u64,
    paths: BlobPaths,
    data: File,
    outboard: File,
    /// The blob was already complete: nothing to write.
    complete: bool,
    /// Groups recorded as verified in the index (synced).
    committed: GroupRanges,
    /// Groups verified, written and recorded in the index, but not yet fsynced.
    unsynced: GroupRanges,
    unsynced_bytes: u64,
    /// Groups verified and written since the last record.
    pending: GroupRanges,
    pending_bytes: u64,
    /// `committed ∪ pending`, shared with readers of the store.
    live: Arc<RwLock<GroupRanges>>,
    /// The files were created and their directory not fsynced since: the next sync does it.
    dir_unsynced: bool,
    finished: bool,
    // Last field: dropped after `Drop::drop` committed, it lets another writer open the blob.
    _guard: WriterGuard,
}

impl PartialBlob {
    pub(super) fn new(parts: PartialParts) -> Self {
        Self {
            store: parts.store,
            hash: parts.hash,
            size: parts.size,
            paths: parts.paths,
            data: parts.data,
            outboard: parts.outboard,
            complete: parts.complete,
            committed: parts.verified,
            unsynced_bytes: parts.unsynced.count(parts.size) * verify::GROUP_BYTES,
            unsynced: parts.unsynced,
            pending: GroupRanges::empty(),
            pending_bytes: 0,
            live: parts.live,
            dir_unsynced: parts.dir_unsynced,
            finished: false,
            _guard: parts.guard,
        }
    }

    /// The blob being written.
    pub fn hash(&self) -> BlobHash {
        self.hash
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Groups verified and written so far (durable or about to be).
    pub fn verified(&self) -> GroupRanges {
        self.committed.union(&self.unsynced).union(&self.pending)
    }

    /// Groups recorded durably in the index.
    pub fn committed(&self) -> &GroupRanges {
        &self.committed
    }

    /// Groups still to fetch: request these from a source.
    pub fn missing(&self) -> GroupRanges {
        GroupRanges::all()
            .clamped(self.size)
            .difference(&self.verified())
    }

    /// True once every group is verified.
    pub fn is_complete(&self) -> bool {
        self.complete || self.missing().is_empty()
    }

    /// A decoder for a response carrying `ranges` of this blob; it refuses a stream that claims
    /// another size.
    pub fn decoder(&self, ranges: GroupRanges) -> Decoder {
        Decoder::with_size(self.hash, self.size, ranges)
    }

    /// Writes one verified item. Items verified against another blob are refused.
    pub fn accept(&mut self, item: DecodeItem<'_>) -> Result<(), StoreError> {
        match item {
            DecodeItem::Size(claimed) => {
                if claimed != self.size {
                    return Err(StoreError::SizeMismatch {
                        hash: self.hash,
                        recorded: self.size,
                        requested: claimed,
                    });
                }
            }
            DecodeItem::Parent(parent) => {
                self.check_origin(parent.hash(), parent.blob_size())?;
                if self.complete {
                    return Ok(());
                }
                if let Some(offset) = parent.outboard_offset() {
                    self.outboard
                        .write_all_at(parent.pair(), offset)
                        .map_err(io_error("writing", &self.paths.outboard))?;
                }
            }
            DecodeItem::Group(group) => {
                if !self.wants(&group)? {
                    return Ok(());
                }
                self.data
                    .write_all_at(group.data(), group.offset())
                    .map_err(io_error("writing", &self.paths.data))?;
                self.mark_written(&[group.index()], group.data().len() as u64)?;
            }
        }
        Ok(())
    }

    /// True when `group` belongs to this blob and is not held yet.
    fn wants(&self, group: &VerifiedGroup<'_>) -> Result<bool, StoreError> {
        self.check_origin(group.hash(), group.blob_size())?;
        let index = group.index();
        Ok(!(self.complete
            || self.committed.contains(index)
            || self.unsynced.contains(index)
            || self.pending.contains(index)))
    }

    /// Records groups whose bytes (`bytes` in all) are written: readers may serve them from now
    /// on, and every batch's worth is recorded in the index.
    fn mark_written(&mut self, groups: &[u64], bytes: u64) -> Result<(), StoreError> {
        {
            let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
            for &index in groups {
                self.pending.insert(index);
                live.insert(index);
            }
        }
        self.pending_bytes += bytes;
        // The batch that completes the blob is left for `finish`, which records it as complete
        // in one step (or for drop, which commits it).
        if self.pending_bytes >= self.store.options().commit_batch_bytes
            && !self.missing().is_empty()
        {
            if self.unsynced_bytes + self.pending_bytes >= self.store.options().sync_batch_bytes {
                self.commit()?;
            } else {
                self.record_unsynced()?;
            }
        }
        Ok(())
    }

    /// Verifies the response stream for `ranges` read from `reader` and writes it; returns the
    /// number of groups it carried. On a verification error, everything before the bad item is
    /// kept (and committed on the next commit); the error names the bad group.
    pub fn write_stream<R: Read>(
        &mut self,
        reader: R,
        ranges: GroupRanges,
    ) -> Result<u64, StoreError> {
        let decoder = self.decoder(ranges);
        let mut groups = 0u64;
        decoder.decode_reader(reader, |item| {
            if matches!(item, DecodeItem::Group(_)) {
                groups += 1;
            }
            self.accept(item)
        })?;
        Ok(groups)
    }

    /// Verifies the response stream for `ranges` held whole in `stream` and writes it, like
    /// [`write_stream`](Self::write_stream), without copying it: group bytes are written from
    /// `stream` itself, a run of adjacent groups in one `pwritev`, and the part's parents with
    /// as few writes as their outboard slots allow. A group is claimed (served to readers,
    /// recorded) only after its bytes and the parents above it are written. On a verification
    /// error the groups before the bad item are written and kept; the error names the bad group.
    pub fn write_part(&mut self, stream: &[u8], ranges: GroupRanges) -> Result<u64, StoreError> {
        let mut decoder = self.decoder(ranges);
        let mut batch = PartBatch::default();
        let mut position = 0usize;
        let mut decoded = Ok(());
        while let Some(needed) = decoder.needed() {
            let Some(bytes) = stream.get(position..position + needed) else {
                decoded = decoder.finish().map(drop).map_err(StoreError::from);
                break;
            };
            position += needed;
            let item = match decoder.push(bytes) {
                Ok(item) => item,
                Err(error) => {
                    decoded = Err(error.into());
                    break;
                }
            };
            let accepted = match item {
                DecodeItem::Group(group) => self.wants(&group).map(|wanted| {
                    batch.groups_in_stream += 1;
                    if wanted {
                        batch.add_group(group.index(), group.offset(), group.data());
                    }
                }),
                DecodeItem::Parent(parent) => self
                    .check_origin(parent.hash(), parent.blob_size())
                    .map(|()| {
                        if let (false, Some(offset)) = (self.complete, parent.outboard_offset()) {
                            batch.add_parent(offset, parent.pair());
                        }
                    }),
                size @ DecodeItem::Size(_) => self.accept(size),
            };
            if let Err(error) = accepted {
                decoded = Err(error);
                break;
            }
        }
        if decoded.is_ok() && position != stream.len() {
            decoded = Err(VerifyError::TrailingBytes {
                extra: stream.len() - position,
            }
            .into());
        }
        // What verified before a failure is kept, as `write_stream` keeps it.
        let groups = batch.groups_in_stream;
        self.write_batch(batch)?;
        decoded.map(|()| groups)
    }

    /// Writes a part's parents, then its groups, then claims the groups.
    fn write_batch(&mut self, mut batch: PartBatch<'_>) -> Result<(), StoreError> {
        batch.parents.sort_unstable_by_key(|(offset, _)| *offset);
        for run in runs(&batch.parents, |(offset, pair)| (*offset, &pair[..])) {
            write_all_vectored_at(&self.outboard, run.offset, &run.slices)
                .map_err(io_error("writing", &self.paths.outboard))?;
        }
        let mut bytes = 0u64;
        for run in runs(&batch.groups, |(_, offset, data)| (*offset, *data)) {
            write_all_vectored_at(&self.data, run.offset, &run.slices)
                .map_err(io_error("writing", &self.paths.data))?;
            bytes += run.len;
        }
        if batch.groups.is_empty() {
            return Ok(());
        }
        let indices: Vec<u64> = batch.groups.iter().map(|(index, _, _)| *index).collect();
        self.mark_written(&indices, bytes)
    }

    /// Makes every written group durable: fsyncs data and outboard, then records the groups as
    /// verified with a synced index write.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() && self.unsynced.is_empty() {
            return Ok(());
        }
        self.sync_files()?;
        let verified = self.verified();
        self.store.record_progress(
            self.hash,
            self.size,
            RecordState::Partial {
                verified: verified.clone(),
            },
            Durability::Synced,
        )?;
        tracing::debug!(
            blob = %self.hash,
            verified_groups = verified.count(self.size),
            total_groups = verify::group_count(self.size),
            "committed verified groups"
        );
        self.committed = verified;
        self.unsynced = GroupRanges::empty();
        self.unsynced_bytes = 0;
        self.pending = GroupRanges::empty();
        self.pending_bytes = 0;
        Ok(())
    }

    /// Records the pending groups in the index without syncing anything: a process that dies
    /// now resumes with them (re-verified); a power loss may cost them, never more.
    fn record_unsynced(&mut self) -> Result<(), StoreError> {
        let unsynced = self.unsynced.union(&self.pending);
        self.store.record_progress(
            self.hash,
            self.size,
            RecordState::PartialUnsynced {
                verified: self.committed.clone(),
                unsynced: unsynced.clone(),
            },
            Durability::Lazy,
        )?;
        self.unsynced = unsynced;
        self.unsynced_bytes += self.pending_bytes;
        self.pending = GroupRanges::empty();
        self.pending_bytes = 0;
        Ok(())
    }

    /// Fsyncs data and outboard, and their directory when they are new. On failure the pending groups are no longer claimed by anyone:
    /// not durable, so not verified.
    fn sync_files(&mut self) -> Result<(), StoreError> {
        let synced = self
            .data
            .sync_data()
            .map_err(io_error("syncing", &self.paths.data))
            .and_then(|()| {
                self.outboard
                    .sync_data()
                    .map_err(io_error("syncing", &self.paths.outboard))
            })
            .and_then(|()| {
                // New files' entries, after the files: their journal commit is done by now.
                if self.dir_unsynced {
                    sync_dir(&self.paths.dir)?;
                    self.dir_unsynced = false;
                }
                Ok(())
            });
        if synced.is_err() {
            *self.live.write().unwrap_or_else(|e| e.into_inner()) = self.committed.clone();
            self.unsynced = GroupRanges::empty();
            self.unsynced_bytes = 0;
            self.pending = GroupRanges::empty();
            self.pending_bytes = 0;
        }
        synced
    }

    /// Commits, and records the blob as complete if every group is verified; otherwise fails
    /// with [`StoreError::Incomplete`] (progress stays, resume with
    /// [`Store::begin_or_resume`]).
    pub fn finish(mut self) -> Result<(), StoreError> {
        if self.complete {
            self.finished = true;
            return Ok(());
        }
        let total = verify::group_count(self.size);
        let verified = self.verified().count(self.size);
        if verified < total {
            self.commit()?;
            return Err(StoreError::Incomplete {
                hash: self.hash,
                verified,
                total,
            });
        }
        // One durable step from here: files first, then the record that says complete (no
        // intermediate partial record needed).
        if !self.pending.is_empty() || !self.unsynced.is_empty() {
            self.sync_files()?;
        }
        self.store.commit_complete(self.hash, self.size)?;
        self.committed = self.verified();
        self.unsynced = GroupRanges::empty();
        self.unsynced_bytes = 0;
        self.pending = GroupRanges::empty();
        self.pending_bytes = 0;
        self.finished = true;
        tracing::debug!(blob = %self.hash, size = self.size, "blob complete");
        Ok(())
    }
}

impl PartialBlob {
    fn check_origin(&self, hash: BlobHash, size: u64) -> Result<(), StoreError> {
        if hash != self.hash || size != self.size {
            return Err(StoreError::ForeignItem {
                hash: self.hash,
                size: self.size,
                item_hash: hash,
                item_size: size,
            });
        }
        Ok(())
    }
}

/// The verified items of one part, written together by [`PartialBlob::write_batch`].
#[derive(Default)]
struct PartBatch<'a> {
    /// Groups not held yet: index, byte offset in the blob, bytes (borrowed from the stream).
    groups: Vec<(u64, u64, &'a [u8])>,
    /// Parents: byte offset in the outboard, the pair.
    parents: Vec<(u64, [u8; verify::PARENT_BYTES])>,
    /// Groups the stream carried, held or not.
    groups_in_stream: u64,
}

impl<'a> PartBatch<'a> {
    fn add_group(&mut self, index: u64, offset: u64, data: &'a [u8]) {
        self.groups.push((index, offset, data));
    }

    fn add_parent(&mut self, offset: u64, pair: &[u8; verify::PARENT_BYTES]) {
        self.parents.push((offset, *pair));
    }
}

/// Adjacent byte ranges of a file, to write with one `pwritev`.
struct Run<'a> {
    offset: u64,
    len: u64,
    slices: Vec<std::io::IoSlice<'a>>,
}

/// Groups `items` (in ascending offset order) into runs of adjacent ranges.
fn runs<'a, T>(items: &'a [T], range: impl Fn(&'a T) -> (u64, &'a [u8])) -> Vec<Run<'a>> {
    let mut runs: Vec<Run<'a>> = Vec::new();
    for item in items {
        let (offset, bytes) = range(item);
        match runs.last_mut() {
            Some(run) if run.offset + run.len == offset && run.slices.len() < MAX_IOVECS => {
                run.len += bytes.len() as u64;
                run.slices.push(std::io::IoSlice::new(bytes));
            }
            _ => runs.push(Run {
                offset,
                len: bytes.len() as u64,
                slices: vec![std::io::IoSlice::new(bytes)],
            }),
        }
    }
    runs
}

/// Most buffers one `pwritev` takes (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Writes `slices` to `file` at `offset`, one after the other, retrying short writes.
fn write_all_vectored_at(
    file: &File,
    mut offset: u64,
    slices: &[std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut slices: Vec<std::io::IoSlice<'_>> = slices.to_vec();
    let mut remaining: &mut [std::io::IoSlice<'_>] = &mut slices;
    while !remaining.is_empty() {
        let file_offset = libc::off_t::try_from(offset).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "offset out of range")
        })?;
        let count = remaining.len().min(MAX_IOVECS) as libc::c_int;
        // SAFETY: pwritev(2) on a file we hold open; `IoSlice` is ABI-compatible with `iovec`
        // and the `count` slices it points to live across the call and are only read.
        let written = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                remaining.as_ptr().cast(),
                count,
                file_offset,
            )
        };
        if written < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        offset += written as u64;
        std::io::IoSlice::advance_slices(&mut remaining, written as usize);
    }
    Ok(())
}

impl Drop for PartialBlob {
    fn drop(&mut self) {
        if self.finished || (self.pending.is_empty() && self.unsynced.is_empty()) {
            return;
        }
        // Keep what was downloaded; a failure here only costs a refetch of these groups.
        if let Err(error) = self.commit() {
            tracing::warn!(blob = %self.hash, %error, "cannot commit partial blob on drop");
        }
    }
}

impl std::fmt::Debug for PartialBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartialBlob")
            .field("hash", &self.hash)
            .field("size", &self.size)
            .field("committed", &self.committed)
            .field("pending", &self.pending)
            .finish()
    }
}
