//! The origin's content keys (issue 16): one key per generation, in
//! `<origin home>/content-keys.bin` (mode 0600, written atomically by [`proto::keyring`]).
//! The newest generation is the *current* one, which new encrypted publishes use
//! (`origin publish --encrypt` reads the file). Only `origin serve` changes the ring, through
//! the control commands `origin keys rotate|retire` (each change audited by the caller);
//! `origin keys list` shows generations and fingerprints, never key bytes.
//!
//! The origins sharing a control-plane store share one ring (issue 14): the store keeps it as
//! a [`SealedRing`], encrypted (XChaCha20-Poly1305) under a key derived from the publisher's
//! signing key, which every origin of the mesh holds and the store never sees. A rotation or
//! retirement commits the new ring to the store with its audit record, then writes the file;
//! every origin reads the store's ring every [`RING_REFRESH`] and adopts a newer one.
//!
//! Keys leave the origin only in [`proto::wire::Response::ContentKeys`], over mutual TLS, to an
//! edge certificate of a node that reported, is not revoked and whose class may read (see
//! `server`). A stager never receives one.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use proto::keyring::{self, KeyringError, KEYRING_FILE};
use proto::keys::{ContentKey, KeyError, KeyGeneration, KeyRing};
use proto::manifest::Manifest;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Why a key command failed.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The ring file cannot be read or written.
    #[error(transparent)]
    Ring(#[from] KeyringError),
    /// The ring is full.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// `retire` of a generation the origin does not hold.
    #[error("the origin holds no {0}; `origin keys list` shows the generations")]
    Unknown(KeyGeneration),
    /// `retire` of the current generation.
    #[error("{0} is the current generation, which new publishes use: run `origin keys rotate` first, then retire it")]
    Current(KeyGeneration),
    /// A rotation past the last generation number.
    #[error("no generation number is left after {0}")]
    Exhausted(KeyGeneration),
    /// The store's ring does not open with this origin's key.
    #[error("the content-key ring in the store does not open with this origin's publisher key: it belongs to another mesh, or it was changed")]
    Sealed,
    /// The store's ring opens but does not decode.
    #[error("the content-key ring in the store is unreadable: {0}")]
    Corrupt(String),
}

/// How often an origin reads the ring the store holds (another origin may have changed it).
pub const RING_REFRESH: Duration = Duration::from_secs(2);

/// The content-key ring as the control-plane store keeps it: sealed, so the store never holds
/// a key in plain form.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedRing {
    /// One more with every change: an origin adopts a ring newer than the one it holds.
    pub version: u64,
    /// Generations retired, which an origin's own file never brings back.
    pub retired: Vec<u32>,
    /// The XChaCha20-Poly1305 nonce.
    pub nonce: [u8; 24],
    /// The encoded [`KeyRing`], sealed; the version is the associated data.
    pub sealed: Vec<u8>,
}

impl std::fmt::Debug for SealedRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedRing")
            .field("version", &self.version)
            .field("retired", &self.retired)
            .field("sealed_bytes", &self.sealed.len())
            .finish_non_exhaustive()
    }
}

/// The key that seals the ring in the store: derived from the publisher's signing key, which
/// every origin of the mesh holds (`origin init --join` copies it) and the store never does.
pub fn ring_seal_key(publisher: &ed25519_dalek::SigningKey) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(blake3::derive_key(
        "stagecoach 2026-12 content-key ring in the control-plane store",
        &Zeroizing::new(publisher.to_bytes())[..],
    ))
}

impl SealedRing {
    /// `ring` sealed under `key` as `version`, with the generations `retired`.
    pub fn seal(
        ring: &KeyRing,
        version: u64,
        retired: Vec<u32>,
        key: &[u8; 32],
    ) -> Result<Self, KeysError> {
        let plain = Zeroizing::new(
            proto::codec::encode(ring).map_err(|e| KeysError::Corrupt(e.to_string()))?,
        );
        let mut nonce = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = XChaCha20Poly1305::new(Key::from_slice(key))
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &version.to_be_bytes(),
                },
            )
            .map_err(|_| KeysError::Corrupt("cannot seal the ring".to_owned()))?;
        Ok(SealedRing {
            version,
            retired,
            nonce,
            sealed,
        })
    }

    /// The ring, opened with `key`.
    pub fn open(&self, key: &[u8; 32]) -> Result<KeyRing, KeysError> {
        let plain = Zeroizing::new(
            XChaCha20Poly1305::new(Key::from_slice(key))
                .decrypt(
                    XNonce::from_slice(&self.nonce),
                    Payload {
                        msg: &self.sealed,
                        aad: &self.version.to_be_bytes(),
                    },
                )
                .map_err(|_| KeysError::Sealed)?,
        );
        proto::codec::decode(&plain, MAX_SEALED_RING_BYTES)
            .map_err(|e| KeysError::Corrupt(e.to_string()))
    }
}

/// Largest ring accepted from the store, in bytes (a full ring is a few KiB).
const MAX_SEALED_RING_BYTES: usize = 1 << 20;

/// `ring` with a new generation, one more than its newest: the ring, the generation and its
/// fingerprint.
pub fn rotated(ring: &KeyRing) -> Result<(KeyRing, KeyGeneration, String), KeysError> {
    let next = match ring.newest() {
        None => KeyGeneration(1),
        Some((newest, _)) => KeyGeneration(
            newest
                .0
                .checked_add(1)
                .ok_or(KeysError::Exhausted(newest))?,
        ),
    };
    let key = ContentKey::generate();
    let fingerprint = key.fingerprint();
    let mut next_ring = ring.clone();
    next_ring.insert(next, key)?;
    Ok((next_ring, next, fingerprint))
}

/// `ring` without `generation` (never the current one), and that generation's fingerprint.
pub fn retired(ring: &KeyRing, generation: KeyGeneration) -> Result<(KeyRing, String), KeysError> {
    let fingerprint = match ring.get(generation) {
        Ok(key) => key.fingerprint(),
        Err(_) => return Err(KeysError::Unknown(generation)),
    };
    if ring.newest().map(|(g, _)| g) == Some(generation) {
        return Err(KeysError::Current(generation));
    }
    let mut next_ring = ring.clone();
    next_ring.remove(generation);
    Ok((next_ring, fingerprint))
}

/// One generation as `origin keys list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GenerationRow {
    /// The generation number.
    pub generation: u32,
    /// The key's public fingerprint (never the key).
    pub fingerprint: String,
    /// Whether new publishes use it.
    pub current: bool,
}

/// The origin's key ring, loaded once by `origin serve` and saved after every change.
pub struct OriginKeys {
    path: PathBuf,
    ring: Mutex<Held>,
}

/// The ring held, and the store version it came from (0: not from the store yet).
struct Held {
    ring: KeyRing,
    version: u64,
}

impl OriginKeys {
    /// The ring of the origin whose home is `home` (empty when no file exists yet).
    pub fn open(home: &Path) -> Result<Self, KeysError> {
        let path = home.join(KEYRING_FILE);
        let ring = keyring::load(&path)?;
        Ok(Self {
            path,
            ring: Mutex::new(Held { ring, version: 0 }),
        })
    }

    /// An origin without keys on disk (tests of the control plane).
    pub fn in_memory(path: PathBuf) -> Self {
        Self {
            path,
            ring: Mutex::new(Held {
                ring: KeyRing::new(),
                version: 0,
            }),
        }
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the ring held.
    pub fn snapshot(&self) -> KeyRing {
        self.held().ring.clone()
    }

    /// The store version of the ring held (0 before it came from the store).
    pub fn version(&self) -> u64 {
        self.held().version
    }

    /// Takes `ring`, the store's `version`, and saves it to the file, unless the ring held is
    /// already of that version or newer (a slower reader never undoes a newer change). Returns
    /// whether the keys changed.
    pub fn adopt(&self, ring: KeyRing, version: u64) -> Result<bool, KeysError> {
        let mut held = self.held();
        if held.version >= version && version != 0 {
            return Ok(false);
        }
        let changed = held.ring != ring;
        if changed {
            keyring::save(&self.path, &ring)?;
            held.ring = ring;
        }
        held.version = version;
        Ok(changed)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates generation 1 when the ring is empty; returns it and its fingerprint when it did.
    pub fn ensure_first(&self) -> Result<Option<(KeyGeneration, String)>, KeysError> {
        if !self.held().ring.is_empty() {
            return Ok(None);
        }
        self.rotate().map(Some)
    }

    /// Starts a new generation (one more than the newest): new publishes use it. Returns it
    /// and its fingerprint. (An origin on a shared store rotates the store's ring instead.)
    pub fn rotate(&self) -> Result<(KeyGeneration, String), KeysError> {
        let mut held = self.held();
        let (next_ring, next, fingerprint) = rotated(&held.ring)?;
        keyring::save(&self.path, &next_ring)?;
        held.ring = next_ring;
        Ok((next, fingerprint))
    }

    /// Removes `generation` (never the current one). Returns its fingerprint.
    pub fn retire(&self, generation: KeyGeneration) -> Result<String, KeysError> {
        let mut held = self.held();
        let (next_ring, fingerprint) = retired(&held.ring, generation)?;
        keyring::save(&self.path, &next_ring)?;
        held.ring = next_ring;
        Ok(fingerprint)
    }

    /// Every generation, oldest first, with its fingerprint and whether it is current.
    pub fn list(&self) -> Vec<GenerationRow> {
        let held = self.held();
        let ring = &held.ring;
        let current = ring.newest().map(|(g, _)| g);
        ring.generations()
            .filter_map(|generation| {
                ring.get(generation).ok().map(|key| GenerationRow {
                    generation: generation.0,
                    fingerprint: key.fingerprint(),
                    current: Some(generation) == current,
                })
            })
            .collect()
    }

    /// Every generation and its key, oldest first: what an edge of a class that may read gets.
    pub fn readable(&self) -> Vec<(KeyGeneration, ContentKey)> {
        let held = self.held();
        let ring = &held.ring;
        ring.generations()
            .filter_map(|generation| ring.get(generation).ok().map(|k| (generation, k.clone())))
            .collect()
    }

    /// The payload bytes of `manifest`: for an encrypted bundle, from its sealed metadata,
    /// opened with the origin's key (the clear manifest carries 0). `None` when the generation
    /// is gone or its key does not open the metadata.
    pub fn raw_bytes(&self, manifest: &Manifest) -> Option<u64> {
        let held = self.held();
        match proto::pack::unseal(manifest, &held.ring) {
            Ok(unsealed) => Some(proto::pack::raw_bytes_total(manifest, unsealed.as_ref())),
            Err(error) => {
                tracing::warn!(bundle = %manifest.name, %error, "cannot open the sealed metadata");
                None
            }
        }
    }
}

/// Whether a bundle's chunks are encrypted.
pub fn is_encrypted(manifest: &Manifest) -> bool {
    key_generation(manifest).is_some()
}

/// The content-key generation a bundle was sealed with, when it is encrypted.
pub fn key_generation(manifest: &Manifest) -> Option<KeyGeneration> {
    manifest.layout.sealed_generation()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn rotate_retire_and_list_keep_the_file_in_step() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = OriginKeys::open(dir.path()).expect("open");
        let (first, _) = keys.ensure_first().expect("first").expect("created");
        assert_eq!(first, KeyGeneration(1));
        assert!(keys.ensure_first().expect("again").is_none());
        let (second, fingerprint) = keys.rotate().expect("rotate");
        assert_eq!(second, KeyGeneration(2));
        let rows = keys.list();
        assert_eq!(rows.len(), 2);
        assert!(rows[1].current && !rows[0].current);
        assert_eq!(rows[1].fingerprint, fingerprint);
        let error = keys.retire(second).expect_err("current");
        assert!(error.to_string().contains("current generation"), "{error}");
        let error = keys.retire(KeyGeneration(9)).expect_err("unknown");
        assert!(error.to_string().contains("key generation 9"), "{error}");
        keys.retire(first).expect("retire 1");
        let on_disk = keyring::load(keys.path()).expect("load");
        assert_eq!(on_disk.generations().collect::<Vec<_>>(), [second]);
        let mode = std::fs::metadata(keys.path())
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A reopened origin reads the same ring; a rotation after a retirement never reuses
        // a number.
        let reopened = OriginKeys::open(dir.path()).expect("reopen");
        assert_eq!(reopened.readable().len(), 1);
        assert_eq!(reopened.rotate().expect("rotate").0, KeyGeneration(3));
    }
}
