//! Glue between [`crate::pack`] and [`crate::store`]: the store as a chunk sink and source, and
//! pinning a bundle's chunks.

use crate::hash::BlobHash;
use crate::manifest::{BundleId, Manifest};
use crate::pack::{ChunkSink, ChunkSource};
use crate::store::{Store, StoreError};

/// Packs straight into a store.
pub struct StoreSink<'a>(pub &'a Store);

impl ChunkSink for StoreSink<'_> {
    type Error = StoreError;

    fn put_chunk(&mut self, hash: BlobHash, stored: &[u8]) -> Result<(), StoreError> {
        if self.0.has_blob(&hash) {
            return Ok(());
        }
        let put = self.0.put_blob(stored)?;
        debug_assert_eq!(put, hash);
        Ok(())
    }
}

/// A chunk the store does not hold completely.
#[derive(Debug, thiserror::Error)]
pub enum StoreChunkError {
    /// Not in the store.
    #[error("chunk {0} is not in the store; fetch the bundle first")]
    Missing(BlobHash),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ChunkSource for Store {
    type Error = StoreChunkError;

    fn get_chunk(&self, hash: BlobHash) -> Result<Vec<u8>, StoreChunkError> {
        self.get_blob(&hash)?.ok_or(StoreChunkError::Missing(hash))
    }
}

/// The pin tag that keeps the chunks of bundle `id`.
pub fn pin_tag(id: &BundleId) -> String {
    format!("bundle:{id}")
}

/// Pins every chunk of `manifest` (bundle `id`) so the cache never evicts them.
pub fn pin_bundle(store: &Store, id: &BundleId, manifest: &Manifest) -> Result<(), StoreError> {
    let tag = pin_tag(id);
    for chunk in &manifest.chunks {
        store.pin(&chunk.hash, &tag)?;
    }
    Ok(())
}

/// True if every chunk of `manifest` is complete in `store`.
pub fn has_all_chunks(store: &Store, manifest: &Manifest) -> bool {
    manifest.chunks.iter().all(|c| store.has_blob(&c.hash))
}
