//! Packing trees and images into bundles, and unpacking them. I/O.
//!
//! [`pack_path`] turns a directory into a deterministic tar stream (or takes one image file as
//! it is), cuts it with [`crate::chunking`], compresses each chunk with zstd, hands every chunk to a
//! [`ChunkSink`] as one blob named by the BLAKE3 hash of its compressed bytes, and signs the
//! [`Manifest`] that lists them. [`unpack`] fetches the chunks from a [`ChunkSource`], verifies
//! each one completely before any of its bytes is used, and restores the tree.
//!
//! # The tar stream
//!
//! Entries in depth-first order, each directory's children sorted by the bytes of their names,
//! so every parent comes before its children and the order does not depend on the filesystem.
//! The root directory is the entry `./`. Every header is GNU format with the numeric uid and gid
//! (base-256 when too large for octal), empty user and group names, `mode & 0o7777` (setuid,
//! setgid and sticky bits included) and the mtime in whole seconds. Names and symlink targets of
//! 100 bytes or more use GNU long-name entries and are stored byte for byte, not normalised.
//!
//! An entry that has more to say is preceded by a pax extended header (`x`, named
//! `././@PaxHeader`) with, in this order: `mtime` as `[-]seconds.nanoseconds` when the time has
//! a fraction or is before 1970, and every extended attribute as `SCHILY.xattr.<name>` with its
//! raw value, sorted by name (the keys GNU tar and bsdtar use: `security.capability`,
//! `security.selinux`, POSIX ACLs as `system.posix_acl_access` and `system.posix_acl_default`,
//! `user.*`, and `trusted.*` when the packer is root). A file with several names under the root
//! is stored once, at its first name in archive order; every later name is a hard-link entry
//! (`1`) naming the first. Character and block devices and fifos are recorded; sockets are
//! skipped with a warning, since a socket means nothing without the process that listens on it.
//!
//! Packing the same tree with the same [`PackOptions`] and signing key gives the same bundle id;
//! access and change times, inode numbers and the order the filesystem lists names in do not
//! count. The compressed bytes come from zstd, so a different zstd release may change the stored
//! chunks and therefore the id; it never changes what unpacks.
//!
//! # What unpacking restores
//!
//! As root, everything recorded: owner and group, mode, mtime to the nanosecond, extended
//! attributes, hard links, device nodes. Each entry is created and written, then given its owner
//! (chown clears setuid bits and file capabilities, so it comes first), its extended attributes,
//! its mode and its mtime; directories get theirs after their contents, deepest first, so a
//! default ACL is not inherited by the entries unpacked into it and a read-only directory can
//! still be filled. A failure to restore any of it is an error naming the path. Not as root, what
//! the kernel reserves to root is counted in [`UnpackStats`] and logged as a warning instead:
//! ownership, device nodes, and `trusted.*` and `security.*` attributes.
//!
//! # Safety of unpacking
//!
//! A bundle's signature says who published it, not that it is harmless. Unpacking refuses
//! absolute paths, `..` components, hard links to anything but a file it unpacked earlier in the
//! same stream, pax keys and tar extensions it does not write, never
//! creates anything through a symlink (each parent directory is checked with `lstat`), and
//! creates files with `O_NOFOLLOW | O_EXCL`. It assumes no other process changes `dest` while it
//! runs.

mod archive;
mod extract;
mod pax;
mod payload;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use crate::chunking::{ChunkerParams, ChunkerParamsError, MAX_BYTES_HIGHEST};
use crate::hash::BlobHash;
use crate::keys::{ContentKey, KeyError, KeyGeneration, KeyRing};
use crate::manifest::{
    BundleId, BundleKind, Dependency, Manifest, ManifestError, PayloadLayout, Selector,
    SignedManifest, MANIFEST_FORMAT, SEALED_MANIFEST_FORMAT,
};
use crate::seal::{self, SealError, SealedMeta};

use payload::{pack_payload, Opener, PipelineConfig, VerifiedPayload};

pub use payload::MAX_COMPRESS_THREADS;

/// zstd level used unless told otherwise (zstd's own default).
///
/// Measured with the `bundle` benchmark (64 MiB tree, half text-like, half incompressible;
/// 2 cores, shared with other builds): level 1 packs at 319 MiB/s and stores 72% of the input,
/// level 3 at 219 MiB/s and 69%, level 9 at 62 MiB/s and 69%. On the compressible half, level 3
/// stores 11% less than level 1; level 9 gains under 1% more for a third of the speed. A bundle
/// is packed once and fetched by every site, so level 3.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Largest chunk any bundle may hold once decompressed, in bytes: FastCDC's largest maximum.
/// Unpacking refuses a manifest that claims more, before allocating anything.
pub const MAX_CHUNK_RAW_BYTES: u64 = MAX_BYTES_HIGHEST as u64;

/// Size of the buffer files are read through when packing, in bytes.
const READ_BUFFER_BYTES: usize = 1024 * 1024;

/// A boxed error from a [`ChunkSink`] or [`ChunkSource`] implementation.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Where packing puts the compressed chunks (the blob store, or [`MemChunks`] in tests).
pub trait ChunkSink {
    /// Why a chunk could not be stored.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Stores `stored` (zstd-compressed chunk bytes) under `hash`, the BLAKE3 hash of `stored`.
    /// Called once per chunk in payload order; the same chunk may come more than once.
    fn put_chunk(&mut self, hash: BlobHash, stored: &[u8]) -> Result<(), Self::Error>;
}

/// Where unpacking fetches compressed chunks from. It need not be trusted: every chunk is
/// checked against its hash before use.
pub trait ChunkSource {
    /// Why a chunk could not be fetched.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Returns the stored (compressed) bytes of the chunk named `hash`.
    fn get_chunk(&self, hash: BlobHash) -> Result<Vec<u8>, Self::Error>;
}

/// Chunks held in memory, for tests, benchmarks and tools. Stores whatever it is given without
/// checking it.
#[derive(Clone, Debug, Default)]
pub struct MemChunks {
    chunks: HashMap<BlobHash, Vec<u8>>,
}

/// [`MemChunks`] does not hold the chunk asked for.
#[derive(Debug, thiserror::Error)]
#[error("chunk {0} is not in this in-memory chunk set")]
pub struct MissingChunk(pub BlobHash);

impl MemChunks {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of distinct chunks held.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// Whether no chunk is held.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Whether the chunk named `hash` is held.
    pub fn contains(&self, hash: &BlobHash) -> bool {
        self.chunks.contains_key(hash)
    }

    /// The stored bytes of a chunk, if held.
    pub fn get(&self, hash: &BlobHash) -> Option<&[u8]> {
        self.chunks.get(hash).map(Vec::as_slice)
    }

    /// Stores `stored` under `hash` without checking that it hashes to it (tests use this to
    /// plant corrupt chunks). Returns the bytes it replaced.
    pub fn insert(&mut self, hash: BlobHash, stored: Vec<u8>) -> Option<Vec<u8>> {
        self.chunks.insert(hash, stored)
    }

    /// Sum of the sizes of the distinct chunks held, in bytes.
    pub fn stored_bytes(&self) -> u64 {
        self.chunks.values().map(|c| c.len() as u64).sum()
    }

    /// The hashes of the chunks held, in no particular order.
    pub fn hashes(&self) -> impl Iterator<Item = &BlobHash> {
        self.chunks.keys()
    }
}

impl ChunkSink for MemChunks {
    type Error = std::convert::Infallible;

    fn put_chunk(&mut self, hash: BlobHash, stored: &[u8]) -> Result<(), Self::Error> {
        self.chunks.entry(hash).or_insert_with(|| stored.to_vec());
        Ok(())
    }
}

impl ChunkSource for MemChunks {
    type Error = MissingChunk;

    fn get_chunk(&self, hash: BlobHash) -> Result<Vec<u8>, MissingChunk> {
        self.chunks.get(&hash).cloned().ok_or(MissingChunk(hash))
    }
}

/// What to record in the manifest, and how to cut and compress the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackOptions {
    /// Bundle name; must not be empty.
    pub name: String,
    /// Bundle version; must not be empty.
    pub version: String,
    /// What the bundle is for.
    pub kind: BundleKind,
    /// Machines it suits, recorded in the given order.
    pub selectors: Vec<Selector>,
    /// Bundles it needs, recorded in the given order.
    pub dependencies: Vec<Dependency>,
    /// Free-form metadata.
    pub metadata: BTreeMap<String, String>,
    /// Chunk sizes; the same tree packed with other sizes shares few chunks.
    pub chunker: ChunkerParams,
    /// zstd compression level (see `zstd::compression_level_range`).
    pub zstd_level: i32,
    /// Threads compressing chunks beside the one reading the input; 0 means one per core (at
    /// most [`MAX_COMPRESS_THREADS`]). The output does not depend on it.
    pub compress_threads: usize,
    /// Encrypt the bundle with this content-key generation (see [`crate::seal`]): `None` packs
    /// a clear bundle, exactly as before encryption existed.
    pub encrypt: Option<(KeyGeneration, ContentKey)>,
}

impl PackOptions {
    /// Options with no selectors, dependencies or metadata, [`ChunkerParams::DEFAULT`],
    /// [`DEFAULT_ZSTD_LEVEL`], and one compression thread per core.
    pub fn new(name: impl Into<String>, version: impl Into<String>, kind: BundleKind) -> Self {
        PackOptions {
            name: name.into(),
            version: version.into(),
            kind,
            selectors: Vec::new(),
            dependencies: Vec::new(),
            metadata: BTreeMap::new(),
            chunker: ChunkerParams::DEFAULT,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            compress_threads: 0,
            encrypt: None,
        }
    }
}

/// How far packing has got; passed to the progress callback after every chunk and at the end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackProgress {
    /// File content read so far, in bytes.
    pub bytes_read: u64,
    /// File content to read in all, in bytes (from a walk before packing).
    pub total_bytes: u64,
    /// Chunks stored so far.
    pub chunks: u64,
    /// Compressed bytes handed to the sink so far.
    pub stored_bytes: u64,
}

/// What was packed and skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackStats {
    /// Regular files stored with their content (a file with several names counts once).
    pub files: u64,
    /// Names recorded as hard links to an earlier entry.
    pub hard_links: u64,
    /// Extended attributes recorded, over all entries.
    pub xattrs: u64,
    /// Directories, the root included.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Character and block devices and fifos.
    pub specials: u64,
    /// Sockets, which are not packed.
    pub skipped: Vec<PathBuf>,
}

/// A packed and signed bundle.
#[derive(Clone, Debug)]
pub struct PackedBundle {
    /// The manifest bytes and signature, ready to store and announce.
    pub signed: SignedManifest,
    /// The manifest as signed (publisher filled in).
    pub manifest: Manifest,
    /// The bundle id (hash of the manifest bytes).
    pub id: BundleId,
    /// What was packed.
    pub stats: PackStats,
}

/// Why packing failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// The chunk sizes are unusable.
    #[error("invalid chunker settings: {0}")]
    Chunker(#[from] ChunkerParamsError),
    /// Name, version or zstd level are unusable.
    #[error("invalid pack options: {0}")]
    Options(String),
    /// The path to pack is neither a directory nor a regular file.
    #[error("cannot pack {path}: it is a {found}; pack a directory or a regular (image) file")]
    NotPackable {
        /// The path given.
        path: PathBuf,
        /// What it is instead.
        found: &'static str,
    },
    /// Reading the input failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file changed size while it was read; the bundle would not match the tree.
    #[error("{path} changed while it was packed (expected {expected_bytes} bytes): pack from a snapshot or stop what writes to it")]
    Changed {
        /// The file.
        path: PathBuf,
        /// Size when its header was written.
        expected_bytes: u64,
    },
    /// A name or symlink target does not fit the tar format.
    #[error("cannot record {path} in the tar stream: {detail}")]
    Unrecordable {
        /// The path.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// zstd failed.
    #[error("zstd compression failed: {0}")]
    Compress(io::Error),
    /// The sink refused a chunk.
    #[error("cannot store chunk {hash}: {source}")]
    Sink {
        /// The chunk.
        hash: BlobHash,
        /// The sink's error.
        source: BoxError,
    },
    /// The finished manifest is inconsistent (a bug, or too many chunks).
    #[error("the packed manifest is invalid: {0}")]
    Manifest(#[from] ManifestError),
}

/// Packs `path` (a directory, or a regular file taken as an image) into chunks stored in `sink`
/// and returns the signed manifest.
///
/// Memory stays bounded whatever the size of the files: two maximum chunk sizes of chunker
/// buffer, a 1 MiB read buffer, and per compression thread two chunks in flight (raw and
/// compressed); beyond that, only the first name of each file with several names is held.
/// `progress` is called after each stored chunk and once at the end.
pub fn pack_path<S: ChunkSink>(
    path: &Path,
    options: &PackOptions,
    key: &SigningKey,
    sink: &mut S,
    progress: &mut dyn FnMut(PackProgress),
) -> Result<PackedBundle, PackError> {
    check_options(options)?;
    // The top-level path is followed, so a symlink to the tree or image can be packed.
    let metadata = fs::metadata(path).map_err(|source| PackError::Io {
        action: "read metadata of",
        path: path.to_path_buf(),
        source,
    })?;
    let file_type = metadata.file_type();
    let config = PipelineConfig {
        chunker: options.chunker,
        zstd_level: options.zstd_level,
        threads: options.compress_threads,
        seal: options.encrypt.clone(),
    };
    let (layout, (stats, chunks)) = if file_type.is_dir() {
        let total_bytes = archive::walk_totals(path)?;
        let packed = pack_payload(config.clone(), sink, total_bytes, progress, |pipeline| {
            archive::write_tree(path, pipeline)
        })?;
        (PayloadLayout::Tree, packed)
    } else if file_type.is_file() {
        let file_name = image_file_name(path)?;
        let packed = pack_payload(config, sink, metadata.len(), progress, |pipeline| {
            archive::write_image(path, pipeline)?;
            Ok(PackStats {
                files: 1,
                ..PackStats::default()
            })
        })?;
        (PayloadLayout::Image { file_name }, packed)
    } else {
        return Err(PackError::NotPackable {
            path: path.to_path_buf(),
            found: describe_file_type(&file_type),
        });
    };
    let (format, layout, chunks) = match &options.encrypt {
        None => (MANIFEST_FORMAT, layout, chunks.stored),
        Some((generation, content_key)) => {
            let meta = SealedMeta {
                layout,
                chunks: chunks.plain,
            };
            let sealed = seal::seal_meta(content_key, *generation, &meta, &chunks.stored)
                .map_err(ManifestError::Malformed)?;
            let layout = PayloadLayout::Sealed {
                generation: *generation,
                meta: sealed,
            };
            (SEALED_MANIFEST_FORMAT, layout, chunks.stored)
        }
    };
    let manifest = Manifest {
        format,
        name: options.name.clone(),
        version: options.version.clone(),
        kind: options.kind,
        selectors: options.selectors.clone(),
        dependencies: options.dependencies.clone(),
        layout,
        total_raw_bytes: chunks.iter().map(|c| c.raw_bytes).sum(),
        total_stored_bytes: chunks.iter().map(|c| c.stored_bytes).sum(),
        chunks,
        metadata: options.metadata.clone(),
        publisher: key.verifying_key().to_bytes(),
    };
    manifest.check()?;
    let signed = manifest.clone().sign(key);
    let id = signed.id();
    tracing::info!(
        bundle = %id,
        name = %manifest.name,
        version = %manifest.version,
        chunks = manifest.chunks.len(),
        raw_bytes = manifest.total_raw_bytes,
        stored_bytes = manifest.total_stored_bytes,
        encrypted_with = manifest.layout.sealed_generation().map(|g| g.0),
        "packed bundle"
    );
    Ok(PackedBundle {
        signed,
        manifest,
        id,
        stats,
    })
}

/// How far unpacking has got; passed to the progress callback after every verified chunk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnpackProgress {
    /// Chunks fetched and verified so far.
    pub chunks_done: u64,
    /// Chunks in the bundle.
    pub chunks_total: u64,
    /// Payload bytes verified so far.
    pub raw_bytes_done: u64,
    /// Payload bytes in all.
    pub raw_bytes_total: u64,
}

/// What unpacking created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Regular files written (1 for an image).
    pub files: u64,
    /// Directories restored, the root included.
    pub dirs: u64,
    /// Symbolic links created.
    pub symlinks: u64,
    /// Device nodes and fifos created.
    pub specials: u64,
    /// Device nodes skipped because the process is not root (and hard links to them).
    pub specials_skipped: u64,
    /// Hard links created.
    pub hard_links: u64,
    /// Extended attributes restored.
    pub xattrs: u64,
    /// Entries whose recorded owner or group was not restored because the process is not root.
    pub owners_skipped: u64,
    /// `trusted.*` and `security.*` attributes not restored because the process is not root
    /// and the kernel refused them.
    pub xattrs_skipped: u64,
    /// Payload bytes verified.
    pub raw_bytes: u64,
    /// Chunks verified.
    pub chunks: u64,
}

/// Why unpacking failed. Chunk errors name the chunk by position and hash; none of a failing
/// chunk's bytes reach the destination.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The manifest's totals or format are wrong.
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// The manifest claims a chunk larger than any packer makes.
    #[error("chunk {index} ({hash}) claims {raw_bytes} bytes, more than the limit of {limit}: the manifest is not from a Stagecoach packer")]
    ChunkTooLarge {
        /// Position in the chunk list.
        index: usize,
        /// Chunk hash.
        hash: BlobHash,
        /// Claimed size.
        raw_bytes: u64,
        /// [`MAX_CHUNK_RAW_BYTES`].
        limit: u64,
    },
    /// The source could not provide a chunk.
    #[error("cannot fetch chunk {index} ({hash}): {source}")]
    Fetch {
        /// Position in the chunk list.
        index: usize,
        /// Chunk hash.
        hash: BlobHash,
        /// The source's error.
        source: BoxError,
    },
    /// The stored bytes are not the chunk: a corrupt store or a lying source.
    #[error("chunk {index} is corrupt: expected hash {hash} and {expected_bytes} bytes, got hash {actual_hash} and {actual_bytes} bytes; nothing from it was written, fetch it again from another source")]
    Corrupt {
        /// Position in the chunk list.
        index: usize,
        /// Expected hash.
        hash: BlobHash,
        /// Expected stored size.
        expected_bytes: u64,
        /// Hash of what was received.
        actual_hash: BlobHash,
        /// Size of what was received.
        actual_bytes: u64,
    },
    /// The chunk's hash matches but it does not decompress to the size the manifest gives.
    #[error("chunk {index} ({hash}) does not decompress to the {raw_bytes} bytes the manifest gives: {detail}")]
    BadCompression {
        /// Position in the chunk list.
        index: usize,
        /// Chunk hash.
        hash: BlobHash,
        /// Expected size.
        raw_bytes: u64,
        /// What went wrong.
        detail: String,
    },
    /// The payload is not a tar stream this packer writes.
    #[error("malformed tree payload: {0}")]
    Malformed(String),
    /// An entry would land outside the destination or pass through a symlink.
    #[error("refusing to unpack entry {path:?}: {reason}")]
    UnsafePath {
        /// The entry's path as recorded.
        path: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A tar entry type this packer never writes.
    #[error("refusing to unpack entry {path:?}: unsupported tar entry type {entry_type:?}")]
    UnsupportedEntry {
        /// The entry's path as recorded.
        path: String,
        /// The raw type byte, as a character.
        entry_type: char,
    },
    /// Something already in the destination is in the way.
    #[error("cannot unpack {path}: {detail}")]
    Conflict {
        /// The path in the destination.
        path: PathBuf,
        /// What is in the way.
        detail: String,
    },
    /// The bundle is encrypted with a generation this node does not hold.
    #[error("this bundle is encrypted and cannot be unpacked here, nothing was written: {0}")]
    Key(#[from] KeyError),
    /// The bundle's sealed metadata or a sealed chunk does not open, or opens to the wrong
    /// plaintext.
    #[error(transparent)]
    Sealed(#[from] SealError),
    /// The manifest's layout does not suit the call.
    #[error("this bundle's payload is {found}, but {wanted} was asked for")]
    WrongLayout {
        /// What the call needs.
        wanted: &'static str,
        /// What the manifest says.
        found: String,
    },
    /// An extended attribute could not be restored.
    #[error("cannot set extended attribute {name} on {path}: {source}")]
    Xattr {
        /// The path in the destination.
        path: PathBuf,
        /// The attribute's name.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// Writing the destination failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// The key and the plaintext metadata of an encrypted bundle, opened.
pub struct Unsealed<'k> {
    /// The generation that sealed it.
    pub generation: KeyGeneration,
    /// That generation's key.
    pub key: &'k ContentKey,
    /// The layout and plaintext chunks.
    pub meta: SealedMeta,
}

/// Opens the sealed metadata of an encrypted bundle with the key `keys` holds of its generation;
/// `None` for a clear bundle. A missing generation ([`UnpackError::Key`]) or a key that does not
/// open it ([`UnpackError::Sealed`]) is an error naming the generation. Writes nothing: callers
/// check this before they touch a destination.
pub fn unseal<'k>(
    manifest: &Manifest,
    keys: &'k KeyRing,
) -> Result<Option<Unsealed<'k>>, UnpackError> {
    let PayloadLayout::Sealed { generation, meta } = &manifest.layout else {
        return Ok(None);
    };
    let key = keys.get(*generation)?;
    let meta = seal::open_meta(key, *generation, meta, &manifest.chunks)?;
    Ok(Some(Unsealed {
        generation: *generation,
        key,
        meta,
    }))
}

/// The payload's total raw size: from the sealed metadata when encrypted.
pub fn raw_bytes_total(manifest: &Manifest, unsealed: Option<&Unsealed<'_>>) -> u64 {
    unsealed.map_or(manifest.total_raw_bytes, |u| u.meta.total_raw_bytes())
}

/// Restores the bundle described by `manifest` under `dest` (created if missing): a tree's
/// entries, or an image as `dest/<file_name>`. A clear bundle only: an encrypted one fails with
/// [`UnpackError::Key`] before anything is written (see [`unpack_with`]).
pub fn unpack<S: ChunkSource>(
    manifest: &Manifest,
    source: &S,
    dest: &Path,
    progress: &mut dyn FnMut(UnpackProgress),
) -> Result<UnpackStats, UnpackError> {
    unpack_with(manifest, &KeyRing::new(), source, dest, progress)
}

/// Restores the bundle described by `manifest` under `dest` (created if missing): a tree's
/// entries, or an image as `dest/<file_name>`, opening an encrypted bundle with the key of its
/// generation from `keys`.
///
/// The caller verifies the manifest's signature first ([`SignedManifest::verify`]). Every chunk
/// is fetched from `source` and checked (hash, size; when encrypted, that it opens under the
/// bundle's generation and that the plaintext has the hash and size the sealed metadata gives;
/// decompressed size) before any of its bytes is used. A missing or wrong key is found before
/// `dest` is created or written. On another error, what was written before the failing chunk
/// stays in `dest`, except that when a chunk of an encrypted bundle does not open (key
/// confusion), what this call wrote is removed if `dest` was absent or empty. Nothing is
/// synced to disk: call `syncfs` (or `sync_all` on an image) once at the end, which is far
/// cheaper than a sync per file. Unpacking a tree holds, besides its buffers, the device and
/// inode of every non-directory it creates (to check hard links) and the path and attributes
/// of every directory (restored at the end): tens of bytes per entry.
pub fn unpack_with<S: ChunkSource>(
    manifest: &Manifest,
    keys: &KeyRing,
    source: &S,
    dest: &Path,
    progress: &mut dyn FnMut(UnpackProgress),
) -> Result<UnpackStats, UnpackError> {
    manifest.check()?;
    let unsealed = unseal(manifest, keys)?;
    let fresh = unsealed.is_some() && dir_absent_or_empty(dest);
    fs::DirBuilder::new()
        .recursive(true)
        .create(dest)
        .map_err(|source| UnpackError::Io {
            action: "create destination directory",
            path: dest.to_path_buf(),
            source,
        })?;
    let (layout, opener) = match &unsealed {
        Some(u) => (
            &u.meta.layout,
            Some(Opener {
                generation: u.generation,
                key: u.key,
                meta: &u.meta,
            }),
        ),
        None => (&manifest.layout, None),
    };
    let mut payload = VerifiedPayload::new(&manifest.chunks, opener, source, progress);
    let result = unpack_payload(layout, &mut payload, dest);
    if let Err(UnpackError::Sealed(error)) = &result {
        if fresh {
            tracing::warn!(dest = %dest.display(), %error, "removing what was unpacked before a sealed chunk was refused");
            if let Err(cleanup) = clear_dir(dest) {
                tracing::warn!(dest = %dest.display(), error = %cleanup, "cannot remove what was unpacked");
            }
        }
    }
    let mut stats = result?;
    stats.raw_bytes = payload.raw_bytes_done();
    stats.chunks = payload.chunks_done();
    Ok(stats)
}

fn unpack_payload<S: ChunkSource>(
    layout: &PayloadLayout,
    payload: &mut VerifiedPayload<'_, S>,
    dest: &Path,
) -> Result<UnpackStats, UnpackError> {
    match layout {
        PayloadLayout::Tree => {
            let result = extract::extract_tree(&mut *payload, dest);
            // A chunk failure surfaces inside tar as an I/O error; report the chunk instead.
            if let Some(failure) = payload.take_failure() {
                return Err(failure);
            }
            let stats = result?;
            // Verify the rest (the tar end marker's padding) so a success means the whole
            // bundle checked out.
            payload.drain()?;
            Ok(stats)
        }
        PayloadLayout::Image { file_name } => {
            let name = image_name_in_dest(file_name)?;
            let path = dest.join(name);
            let mut file = extract::create_file_replacing(&path, 0o644)?;
            payload.copy_to(&mut file).map_err(|e| e.at_path(&path))?;
            Ok(UnpackStats {
                files: 1,
                ..UnpackStats::default()
            })
        }
        PayloadLayout::Sealed { generation, .. } => Err(UnpackError::WrongLayout {
            wanted: "a tree or an image",
            found: format!("sealed again inside its sealed metadata ({generation})"),
        }),
    }
}

/// Whether `dir` does not exist or holds nothing.
fn dir_absent_or_empty(dir: &Path) -> bool {
    match fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(error) => error.kind() == io::ErrorKind::NotFound,
    }
}

/// Removes everything inside `dir`, keeping `dir`.
fn clear_dir(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(entry.path())?;
        } else {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Streams the verified payload of `manifest` into `writer` (an image to a block device, or a
/// tree's tar stream to a file); returns the bytes written. A clear bundle only (see
/// [`unpack_to_writer_with`]).
///
/// Each chunk is verified before any of it is written. `writer` is not flushed or synced.
pub fn unpack_to_writer<S: ChunkSource, W: Write + ?Sized>(
    manifest: &Manifest,
    source: &S,
    writer: &mut W,
    progress: &mut dyn FnMut(UnpackProgress),
) -> Result<u64, UnpackError> {
    unpack_to_writer_with(manifest, &KeyRing::new(), source, writer, progress)
}

/// Like [`unpack_to_writer`], opening an encrypted bundle with the key of its generation from
/// `keys` (checked before anything is written).
pub fn unpack_to_writer_with<S: ChunkSource, W: Write + ?Sized>(
    manifest: &Manifest,
    keys: &KeyRing,
    source: &S,
    writer: &mut W,
    progress: &mut dyn FnMut(UnpackProgress),
) -> Result<u64, UnpackError> {
    manifest.check()?;
    let unsealed = unseal(manifest, keys)?;
    let opener = unsealed.as_ref().map(|u| Opener {
        generation: u.generation,
        key: u.key,
        meta: &u.meta,
    });
    let mut payload = VerifiedPayload::new(&manifest.chunks, opener, source, progress);
    payload
        .copy_to(writer)
        .map_err(|e| e.at_path(Path::new("<writer>")))?;
    Ok(payload.raw_bytes_done())
}

fn check_options(options: &PackOptions) -> Result<(), PackError> {
    options.chunker.validate()?;
    if options.name.is_empty() || options.version.is_empty() {
        return Err(PackError::Options(
            "bundle name and version must not be empty".into(),
        ));
    }
    let levels = zstd::compression_level_range();
    if !levels.contains(&options.zstd_level) {
        return Err(PackError::Options(format!(
            "zstd level {} is outside {}..={}",
            options.zstd_level,
            levels.start(),
            levels.end()
        )));
    }
    Ok(())
}

/// The image's file name, which must be valid UTF-8 to go into the manifest.
fn image_file_name(path: &Path) -> Result<String, PackError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| PackError::Unrecordable {
            path: path.to_path_buf(),
            detail: "an image's file name must be valid UTF-8".into(),
        })
}

/// Checks that a manifest's image file name is one plain path component.
fn image_name_in_dest(file_name: &str) -> Result<&Path, UnpackError> {
    let plain = !file_name.is_empty()
        && file_name != "."
        && file_name != ".."
        && !file_name.contains('/')
        && !file_name.contains('\0');
    if plain {
        Ok(Path::new(file_name))
    } else {
        Err(UnpackError::UnsafePath {
            path: file_name.to_owned(),
            reason: "an image file name must be one plain path component",
        })
    }
}

fn describe_file_type(file_type: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_symlink() {
        "symbolic link"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_fifo() {
        "fifo"
    } else if file_type.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// Creates a directory with owner-only access, to be given its recorded mode after its contents.
fn private_dir_builder() -> fs::DirBuilder {
    let mut builder = fs::DirBuilder::new();
    builder.mode(0o700);
    builder
}

/// Options for creating a new file that never follows a symlink and never reuses a file.
fn new_file_options(mode: u32) -> fs::OpenOptions {
    let mut options = fs::OpenOptions::new();
    options
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    options
}
