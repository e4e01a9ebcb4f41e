//! [`BundleStore`] on the node's blob store ([`proto::store::Store`]).

use std::path::Path;

use proto::store::{Store, StoreError, StoreOptions};
use proto::{BlobHash, BundleId, SignedManifest};

use super::bundles::{BundleStore, StoreFailure};

/// Opens (creating if needed) the blob store in `dir`.
pub fn open_store(dir: &Path) -> Result<Store, StoreError> {
    Store::open(dir, StoreOptions::default())
}

impl BundleStore for Store {
    fn signed_manifest(&self, id: &BundleId) -> Result<Option<SignedManifest>, StoreFailure> {
        Ok(self.get_manifest(id)?)
    }

    fn chunk(&self, hash: &BlobHash) -> Result<Option<Vec<u8>>, StoreFailure> {
        Ok(self.get_blob(hash)?)
    }

    fn has_chunk(&self, hash: &BlobHash) -> Result<bool, StoreFailure> {
        Ok(self.has_blob(hash))
    }

    fn put_manifest(&self, signed: &SignedManifest) -> Result<(), StoreFailure> {
        Store::put_manifest(self, signed)?;
        Ok(())
    }

    fn put_chunk(&self, hash: &BlobHash, bytes: &[u8]) -> Result<(), StoreFailure> {
        let stored = self.put_blob(bytes)?;
        if stored != *hash {
            return Err(format!("chunk stored as {stored}, expected {hash}").into());
        }
        Ok(())
    }

    fn pin(&self, id: &BundleId, tag: &str) -> Result<(), StoreFailure> {
        let signed = self
            .get_manifest(id)?
            .ok_or_else(|| format!("bundle {id} is not in the store"))?;
        // Pinning is about keeping bytes, not trusting them: any key may have signed here.
        let manifest = signed.verify(&[])?;
        for chunk in &manifest.chunks {
            Store::pin(self, &chunk.hash, tag)?;
        }
        Ok(())
    }
}
