//! Content keys of encrypted bundles, by generation. Pure: no I/O.
//!
//! The origin keeps one 256-bit content key per *generation*; a new generation starts with
//! `origin keys rotate` and every encrypted bundle names the generation it was sealed with. An
//! edge holds the generations its class may read in a [`KeyRing`]; stagers never hold one.
//! Key material is wiped from memory when dropped and never printed: `Debug` shows only the
//! generation and a short fingerprint.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of a content key in bytes.
pub const CONTENT_KEY_BYTES: usize = 32;

/// Most generations a key ring may hold: a bound for decoding rings from disk or the wire.
pub const MAX_KEY_GENERATIONS: usize = 1024;

/// A content-key generation: 1 for the first key, one more at every rotation.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
pub struct KeyGeneration(pub u32);

impl fmt::Display for KeyGeneration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key generation {}", self.0)
    }
}

/// One generation's secret: 32 bytes, wiped on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct ContentKey([u8; CONTENT_KEY_BYTES]);

impl ContentKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; CONTENT_KEY_BYTES]) -> ContentKey {
        ContentKey(bytes)
    }

    /// A fresh key from the operating system's random generator.
    pub fn generate() -> ContentKey {
        let mut bytes = [0u8; CONTENT_KEY_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
        ContentKey(bytes)
    }

    /// The raw key bytes, for the AEAD and for sealed storage only.
    pub fn expose_secret(&self) -> &[u8; CONTENT_KEY_BYTES] {
        &self.0
    }

    /// A public fingerprint of the key (not the key): the first 8 hex digits of a BLAKE3
    /// derivation, safe to log and compare.
    pub fn fingerprint(&self) -> String {
        let digest = blake3::derive_key("stagecoach content key fingerprint v1", &self.0);
        hex::encode(&digest[..4])
    }
}

impl fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentKey({})", self.fingerprint())
    }
}

/// Why a key was not available.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The ring holds no key of that generation: the node's class may not read it, the node was
    /// revoked before it was issued, or it was retired.
    #[error("no content key of {0}: this node was not given it (class not allowed, node revoked, or generation retired)")]
    Missing(KeyGeneration),
    /// More generations than [`MAX_KEY_GENERATIONS`].
    #[error("a key ring may hold at most {MAX_KEY_GENERATIONS} generations")]
    TooMany,
}

/// The content keys a node holds, by generation.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRing {
    keys: BTreeMap<KeyGeneration, ContentKey>,
}

impl KeyRing {
    /// An empty ring.
    pub fn new() -> KeyRing {
        KeyRing::default()
    }

    /// The key of `generation`, or [`KeyError::Missing`] naming it.
    pub fn get(&self, generation: KeyGeneration) -> Result<&ContentKey, KeyError> {
        self.keys
            .get(&generation)
            .ok_or(KeyError::Missing(generation))
    }

    /// Adds or replaces the key of `generation`.
    pub fn insert(&mut self, generation: KeyGeneration, key: ContentKey) -> Result<(), KeyError> {
        if !self.keys.contains_key(&generation) && self.keys.len() >= MAX_KEY_GENERATIONS {
            return Err(KeyError::TooMany);
        }
        self.keys.insert(generation, key);
        Ok(())
    }

    /// Drops the key of `generation`, if held.
    pub fn remove(&mut self, generation: KeyGeneration) -> Option<ContentKey> {
        self.keys.remove(&generation)
    }

    /// The generations held, oldest first.
    pub fn generations(&self) -> impl Iterator<Item = KeyGeneration> + '_ {
        self.keys.keys().copied()
    }

    /// The newest generation held.
    pub fn newest(&self) -> Option<(KeyGeneration, &ContentKey)> {
        self.keys.iter().next_back().map(|(g, k)| (*g, k))
    }

    /// How many generations are held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no generation is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.keys.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_generation_is_named_in_the_error() {
        let mut ring = KeyRing::new();
        ring.insert(KeyGeneration(1), ContentKey::from_bytes([7; 32]))
            .expect("insert");
        assert!(ring.get(KeyGeneration(1)).is_ok());
        let error = ring
            .get(KeyGeneration(2))
            .expect_err("generation 2 is missing");
        assert!(error.to_string().contains("key generation 2"), "{error}");
        assert_eq!(ring.newest().map(|(g, _)| g), Some(KeyGeneration(1)));
    }

    #[test]
    fn debug_output_shows_no_key_bytes() {
        let key = ContentKey::from_bytes([0xAB; 32]);
        let mut ring = KeyRing::new();
        ring.insert(KeyGeneration(3), key.clone()).expect("insert");
        let shown = format!("{ring:?} {key:?}");
        assert!(!shown.contains("171"), "{shown}");
        assert!(!shown.to_lowercase().contains("abab"), "{shown}");
        assert!(shown.contains(&key.fingerprint()), "{shown}");
    }

    #[test]
    fn fresh_keys_differ() {
        assert_ne!(ContentKey::generate(), ContentKey::generate());
    }
}
