//! The origin's content keys (issue 16): one key per generation, in
//! `<origin home>/content-keys.bin` (mode 0600, written atomically by [`proto::keyring`]).
//! The newest generation is the *current* one, which new encrypted publishes use
//! (`origin publish --encrypt` reads the file). Only `origin serve` changes the ring, through
//! the control commands `origin keys rotate|retire` (each change audited by the caller);
//! `origin keys list` shows generations and fingerprints, never key bytes.
//!
//! Keys leave the origin only in [`proto::wire::Response::ContentKeys`], over mutual TLS, to an
//! edge certificate of a node that reported, is not revoked and whose class may read (see
//! `server`). A stager never receives one.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use proto::keyring::{self, KeyringError, KEYRING_FILE};
use proto::keys::{ContentKey, KeyError, KeyGeneration, KeyRing};
use proto::manifest::Manifest;

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
    ring: Mutex<KeyRing>,
}

impl OriginKeys {
    /// The ring of the origin whose home is `home` (empty when no file exists yet).
    pub fn open(home: &Path) -> Result<Self, KeysError> {
        let path = home.join(KEYRING_FILE);
        let ring = keyring::load(&path)?;
        Ok(Self {
            path,
            ring: Mutex::new(ring),
        })
    }

    /// An origin without keys on disk (tests of the control plane).
    pub fn in_memory(path: PathBuf) -> Self {
        Self {
            path,
            ring: Mutex::new(KeyRing::new()),
        }
    }

    fn ring(&self) -> MutexGuard<'_, KeyRing> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates generation 1 when the ring is empty; returns it and its fingerprint when it did.
    pub fn ensure_first(&self) -> Result<Option<(KeyGeneration, String)>, KeysError> {
        if !self.ring().is_empty() {
            return Ok(None);
        }
        self.rotate().map(Some)
    }

    /// Starts a new generation (one more than the newest): new publishes use it. Returns it
    /// and its fingerprint.
    pub fn rotate(&self) -> Result<(KeyGeneration, String), KeysError> {
        let mut ring = self.ring();
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
        keyring::save(&self.path, &next_ring)?;
        *ring = next_ring;
        Ok((next, fingerprint))
    }

    /// Removes `generation` (never the current one). Returns its fingerprint.
    pub fn retire(&self, generation: KeyGeneration) -> Result<String, KeysError> {
        let mut ring = self.ring();
        let fingerprint = match ring.get(generation) {
            Ok(key) => key.fingerprint(),
            Err(_) => return Err(KeysError::Unknown(generation)),
        };
        if ring.newest().map(|(g, _)| g) == Some(generation) {
            return Err(KeysError::Current(generation));
        }
        let mut next_ring = ring.clone();
        next_ring.remove(generation);
        keyring::save(&self.path, &next_ring)?;
        *ring = next_ring;
        Ok(fingerprint)
    }

    /// Every generation, oldest first, with its fingerprint and whether it is current.
    pub fn list(&self) -> Vec<GenerationRow> {
        let ring = self.ring();
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
        let ring = self.ring();
        ring.generations()
            .filter_map(|generation| ring.get(generation).ok().map(|k| (generation, k.clone())))
            .collect()
    }

    /// The payload bytes of `manifest`: for an encrypted bundle, from its sealed metadata,
    /// opened with the origin's key (the clear manifest carries 0). `None` when the generation
    /// is gone or its key does not open the metadata.
    pub fn raw_bytes(&self, manifest: &Manifest) -> Option<u64> {
        let ring = self.ring();
        match proto::pack::unseal(manifest, &ring) {
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
