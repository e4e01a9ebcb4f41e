//! Where the swap gets its bundles, and the checks it makes on them.
//!
//! The swap needs little from a store: manifests and chunks by name, and a way to copy and pin
//! them. [`BundleStore`] is that much; [`verify_bundle`] checks a bundle completely (signature,
//! publisher, every chunk's hash and size) before anything is touched, [`stage_bundle`] copies a
//! bundle into the machine's storage area, and [`unpack_bundle`] restores it into a slot.

use std::path::Path;

use ed25519_dalek::VerifyingKey;
use proto::keys::KeyRing;
use proto::manifest::ManifestError;
use proto::pack::{self, ChunkSource, UnpackError, UnpackProgress, UnpackStats};
use proto::{BlobHash, BundleId, Manifest, SignedManifest};

/// A boxed error from a store implementation.
pub type StoreFailure = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The bundle store operations the swap needs.
pub trait BundleStore {
    /// The signed manifest of bundle `id`, if held. Not verified.
    fn signed_manifest(&self, id: &BundleId) -> Result<Option<SignedManifest>, StoreFailure>;
    /// The stored (compressed) bytes of chunk `hash`, if held. Not verified.
    fn chunk(&self, hash: &BlobHash) -> Result<Option<Vec<u8>>, StoreFailure>;
    /// Whether chunk `hash` is held completely.
    fn has_chunk(&self, hash: &BlobHash) -> Result<bool, StoreFailure>;
    /// Stores a signed manifest.
    fn put_manifest(&self, signed: &SignedManifest) -> Result<(), StoreFailure>;
    /// Stores a chunk whose bytes the caller has checked against `hash`.
    fn put_chunk(&self, hash: &BlobHash, bytes: &[u8]) -> Result<(), StoreFailure>;
    /// Keeps bundle `id` (manifest and chunks) from eviction, under `tag`.
    fn pin(&self, id: &BundleId, tag: &str) -> Result<(), StoreFailure>;
}

/// Why a bundle cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The store does not hold the manifest.
    #[error("bundle {0} is not in the store: fetch it first")]
    MissingManifest(BundleId),
    /// The manifest is refused: bad signature, untrusted publisher, wrong id, malformed.
    #[error("bundle {id} is refused: {source}")]
    Manifest {
        /// The bundle.
        id: BundleId,
        /// Why.
        #[source]
        source: ManifestError,
    },
    /// A trusted publisher key is not a valid ed25519 key.
    #[error("trusted publisher key {0:?} is not 64 hex digits of an ed25519 public key")]
    BadTrustedKey(String),
    /// The store does not hold a chunk.
    #[error("bundle {id} is incomplete: chunk {index} ({hash}) is not in the store; fetch the bundle again")]
    MissingChunk {
        /// The bundle.
        id: BundleId,
        /// Position in the chunk list.
        index: usize,
        /// The chunk.
        hash: BlobHash,
    },
    /// A chunk's bytes do not match the manifest.
    #[error("bundle {id} is corrupt: chunk {index} should hash to {hash} ({expected_bytes} bytes) but the store holds {actual_bytes} bytes hashing to {actual_hash}; delete it and fetch again")]
    CorruptChunk {
        /// The bundle.
        id: BundleId,
        /// Position in the chunk list.
        index: usize,
        /// Expected hash.
        hash: BlobHash,
        /// Expected size.
        expected_bytes: u64,
        /// Hash of the bytes held.
        actual_hash: BlobHash,
        /// Size of the bytes held.
        actual_bytes: u64,
    },
    /// The store holds a chunk but cannot return it intact (corrupt on disk, unreadable).
    #[error("bundle {id} is unusable: chunk {index} ({hash}) cannot be read from the store: {source}; delete it and fetch the bundle again")]
    UnreadableChunk {
        /// The bundle.
        id: BundleId,
        /// Position in the chunk list.
        index: usize,
        /// The chunk.
        hash: BlobHash,
        /// The store's error.
        #[source]
        source: StoreFailure,
    },
    /// The store failed.
    #[error("bundle store failed while {action}: {source}")]
    Store {
        /// What was being done.
        action: &'static str,
        /// The store's error.
        #[source]
        source: StoreFailure,
    },
    /// Unpacking failed.
    #[error("cannot unpack bundle {id}: {source}")]
    Unpack {
        /// The bundle.
        id: BundleId,
        /// Why (boxed: it is large, and errors are rare).
        #[source]
        source: Box<UnpackError>,
    },
}

/// Parses hex publisher keys.
pub fn parse_trusted_keys(keys: &[String]) -> Result<Vec<VerifyingKey>, BundleError> {
    keys.iter()
        .map(|text| {
            let mut bytes = [0u8; 32];
            hex::decode_to_slice(text, &mut bytes)
                .ok()
                .and_then(|()| VerifyingKey::from_bytes(&bytes).ok())
                .ok_or_else(|| BundleError::BadTrustedKey(text.clone()))
        })
        .collect()
}

/// Loads bundle `id` and checks its manifest: the bytes hash to `id`, the signature verifies,
/// and the publisher is trusted. Reads no chunk.
pub fn verified_manifest(
    store: &dyn BundleStore,
    id: &BundleId,
    trusted: &[VerifyingKey],
) -> Result<Manifest, BundleError> {
    let signed = store
        .signed_manifest(id)
        .map_err(|source| BundleError::Store {
            action: "reading a manifest",
            source,
        })?
        .ok_or(BundleError::MissingManifest(*id))?;
    signed
        .verify_as(*id, trusted)
        .map_err(|source| BundleError::Manifest { id: *id, source })
}

/// Checks bundle `id` completely: its manifest (see [`verified_manifest`]) and every chunk's
/// size and hash. Calls `each_chunk` after each checked chunk. Returns the manifest.
pub fn verify_bundle(
    store: &dyn BundleStore,
    id: &BundleId,
    trusted: &[VerifyingKey],
    each_chunk: &mut dyn FnMut(),
) -> Result<Manifest, BundleError> {
    let manifest = verified_manifest(store, id, trusted)?;
    for (index, chunk) in manifest.chunks.iter().enumerate() {
        let bytes = read_chunk(store, id, index, &chunk.hash)?;
        check_chunk(id, index, chunk, &bytes)?;
        each_chunk();
    }
    tracing::info!(bundle = %id, name = %manifest.name, version = %manifest.version, chunks = manifest.chunks.len(), "bundle verified");
    Ok(manifest)
}

/// Copies bundle `id` from `from` into `to` (chunks `to` lacks, then the manifest, which makes
/// the bundle visible), checking every chunk on the way, and pins it under `tag`.
pub fn stage_bundle(
    from: &dyn BundleStore,
    to: &dyn BundleStore,
    id: &BundleId,
    trusted: &[VerifyingKey],
    tag: &str,
    each_chunk: &mut dyn FnMut(),
) -> Result<Manifest, BundleError> {
    let signed = from
        .signed_manifest(id)
        .map_err(|source| BundleError::Store {
            action: "reading a manifest",
            source,
        })?
        .ok_or(BundleError::MissingManifest(*id))?;
    let manifest = signed
        .verify_as(*id, trusted)
        .map_err(|source| BundleError::Manifest { id: *id, source })?;
    for (index, chunk) in manifest.chunks.iter().enumerate() {
        let held = to
            .has_chunk(&chunk.hash)
            .map_err(|source| BundleError::Store {
                action: "looking up a chunk",
                source,
            })?;
        if !held {
            let bytes = read_chunk(from, id, index, &chunk.hash)?;
            check_chunk(id, index, chunk, &bytes)?;
            to.put_chunk(&chunk.hash, &bytes)
                .map_err(|source| BundleError::Store {
                    action: "storing a chunk",
                    source,
                })?;
        }
        each_chunk();
    }
    to.put_manifest(&signed)
        .map_err(|source| BundleError::Store {
            action: "storing a manifest",
            source,
        })?;
    to.pin(id, tag).map_err(|source| BundleError::Store {
        action: "pinning a bundle",
        source,
    })?;
    Ok(manifest)
}

/// Checks that an encrypted bundle opens with `keys` (the key of its generation is held and
/// opens its sealed metadata); a clear bundle always passes. Reads no chunk, writes nothing:
/// called before any slot is touched.
pub fn check_keys(id: &BundleId, manifest: &Manifest, keys: &KeyRing) -> Result<(), BundleError> {
    pack::unseal(manifest, keys)
        .map(|_| ())
        .map_err(|source| BundleError::Unpack {
            id: *id,
            source: Box::new(source),
        })
}

/// Restores bundle `id` (its `manifest` already verified) into `dest`, checking every chunk
/// before use and opening an encrypted bundle with `keys`. Does not sync: the caller syncs the
/// filesystem once.
pub fn unpack_bundle(
    store: &dyn BundleStore,
    id: &BundleId,
    manifest: &Manifest,
    keys: &KeyRing,
    dest: &Path,
    progress: &mut dyn FnMut(UnpackProgress),
) -> Result<UnpackStats, BundleError> {
    pack::unpack_with(manifest, keys, &StoreChunks(store), dest, progress).map_err(|source| {
        BundleError::Unpack {
            id: *id,
            source: Box::new(source),
        }
    })
}

fn read_chunk(
    store: &dyn BundleStore,
    id: &BundleId,
    index: usize,
    hash: &BlobHash,
) -> Result<Vec<u8>, BundleError> {
    store
        .chunk(hash)
        .map_err(|source| BundleError::UnreadableChunk {
            id: *id,
            index,
            hash: *hash,
            source,
        })?
        .ok_or(BundleError::MissingChunk {
            id: *id,
            index,
            hash: *hash,
        })
}

fn check_chunk(
    id: &BundleId,
    index: usize,
    chunk: &proto::manifest::ChunkRef,
    bytes: &[u8],
) -> Result<(), BundleError> {
    let actual_hash = BlobHash::of(bytes);
    if actual_hash != chunk.hash || bytes.len() as u64 != chunk.stored_bytes {
        return Err(BundleError::CorruptChunk {
            id: *id,
            index,
            hash: chunk.hash,
            expected_bytes: chunk.stored_bytes,
            actual_hash,
            actual_bytes: bytes.len() as u64,
        });
    }
    Ok(())
}

/// A [`BundleStore`] seen as the chunk source [`pack::unpack`] reads from.
struct StoreChunks<'a>(&'a dyn BundleStore);

/// A chunk the store could not provide.
#[derive(Debug, thiserror::Error)]
enum ChunkFetchError {
    #[error("not in the store")]
    Missing,
    #[error(transparent)]
    Store(StoreFailure),
}

impl ChunkSource for StoreChunks<'_> {
    type Error = ChunkFetchError;

    fn get_chunk(&self, hash: BlobHash) -> Result<Vec<u8>, ChunkFetchError> {
        self.0
            .chunk(&hash)
            .map_err(ChunkFetchError::Store)?
            .ok_or(ChunkFetchError::Missing)
    }
}
