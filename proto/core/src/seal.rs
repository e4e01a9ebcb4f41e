//! Sealing the chunks and the payload metadata of encrypted bundles. Pure: no I/O.
//!
//! An encrypted bundle's chunks are zstd-compressed as usual, then each one is sealed with
//! XChaCha20-Poly1305 under a key and nonce derived from the generation's content key and the
//! BLAKE3 hash of the compressed chunk (its *plaintext hash*). Sealing is therefore convergent
//! within one key: an unchanged chunk of a new version seals to the same ciphertext, gets the
//! same content address and crosses no WAN. The associated data binds the key generation and
//! the plaintext hash, so a chunk sealed under another generation or for another chunk does not
//! open. Content addresses, the 16 KiB bao verification and the manifest signature all cover
//! the ciphertext: stagers and peers need no key.
//!
//! The payload metadata that would reveal content (the layout with an image's file name, each
//! chunk's plaintext hash, compressed and raw size) is a [`SealedMeta`], sealed with a key
//! derived from the content key under a nonce derived from its own bytes (deterministic, so the
//! same tree packs to the same bundle id) and bound to the generation and the ciphertext chunk
//! list. See `ARCHITECTURE.md` for why XChaCha20-Poly1305.

use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::codec::{self, CodecError};
use crate::hash::BlobHash;
use crate::keys::{ContentKey, KeyGeneration};
use crate::manifest::{ChunkRef, PayloadLayout, MAX_MANIFEST_BYTES};

/// Bytes the AEAD adds to each sealed chunk (the Poly1305 tag).
pub const TAG_BYTES: usize = 16;

/// Bytes of an XChaCha20 nonce; stored in front of the sealed metadata only (a chunk's nonce is
/// derived again from its plaintext hash when it is opened).
pub const NONCE_BYTES: usize = 24;

/// BLAKE3 key-derivation contexts, one per derived secret.
const CHUNK_KEY_CONTEXT: &str = "stagecoach 2026-12 sealed chunk key v1";
const CHUNK_NONCE_CONTEXT: &str = "stagecoach 2026-12 sealed chunk nonce v1";
const META_KEY_CONTEXT: &str = "stagecoach 2026-12 sealed manifest metadata key v1";
const META_NONCE_CONTEXT: &str = "stagecoach 2026-12 sealed manifest metadata nonce v1";

/// Domain strings in front of the associated data.
const CHUNK_AAD_DOMAIN: &[u8] = b"stagecoach sealed chunk v1";
const META_AAD_DOMAIN: &[u8] = b"stagecoach sealed manifest metadata v1";

/// The payload metadata of an encrypted bundle, sealed inside its manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedMeta {
    /// How to read the payload (never [`PayloadLayout::Sealed`]).
    pub layout: PayloadLayout,
    /// The plaintext chunks, in the order of the manifest's (ciphertext) chunk list: `hash` is
    /// the BLAKE3 hash of the compressed chunk, `stored_bytes` its size, `raw_bytes` its size
    /// once decompressed.
    pub chunks: Vec<ChunkRef>,
}

impl SealedMeta {
    /// Sum of the plaintext chunks' raw sizes.
    pub fn total_raw_bytes(&self) -> u64 {
        self.chunks
            .iter()
            .fold(0u64, |acc, c| acc.saturating_add(c.raw_bytes))
    }
}

/// Why sealed bytes did not open.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The sealed metadata does not open with the key of its generation.
    #[error("the bundle's sealed metadata does not open with {generation}: this node's key of that generation is not the publisher's, or the manifest was altered")]
    MetaDoesNotOpen {
        /// The generation the manifest names.
        generation: KeyGeneration,
    },
    /// The sealed metadata opened but is not valid.
    #[error("the bundle's sealed metadata (under {generation}) is malformed: {detail}")]
    MalformedMeta {
        /// The generation the manifest names.
        generation: KeyGeneration,
        /// What is wrong.
        detail: String,
    },
    /// A chunk's ciphertext does not open under its key: sealed under another generation or
    /// key, for another chunk, or altered.
    #[error("chunk {index} ({hash}) does not open with {generation}: it was sealed with another key or generation, or for another chunk (key confusion or tampering); nothing from it was written")]
    ChunkDoesNotOpen {
        /// Position in the chunk list.
        index: usize,
        /// The chunk's (ciphertext) hash.
        hash: BlobHash,
        /// The generation the manifest names.
        generation: KeyGeneration,
    },
    /// A chunk opened but its plaintext is not the one the sealed metadata names.
    #[error("chunk {index} opened with {generation} but its plaintext hashes to {actual} ({actual_bytes} bytes), not {expected} ({expected_bytes} bytes); nothing from it was written")]
    PlaintextMismatch {
        /// Position in the chunk list.
        index: usize,
        /// The generation the manifest names.
        generation: KeyGeneration,
        /// The plaintext hash the sealed metadata gives.
        expected: BlobHash,
        /// The plaintext size it gives.
        expected_bytes: u64,
        /// The hash of what opened.
        actual: BlobHash,
        /// The size of what opened.
        actual_bytes: u64,
    },
}

/// A 32-byte secret derived from the content key, the generation and `item`.
fn derive(
    context: &str,
    key: &ContentKey,
    generation: KeyGeneration,
    item: &[u8; 32],
) -> Zeroizing<[u8; 32]> {
    let mut hasher = blake3::Hasher::new_derive_key(context);
    hasher.update(key.expose_secret());
    hasher.update(&generation.0.to_le_bytes());
    hasher.update(item);
    Zeroizing::new(*hasher.finalize().as_bytes())
}

fn cipher(secret: &[u8; 32]) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(Key::from_slice(secret))
}

fn chunk_aad(generation: KeyGeneration, plain_hash: &BlobHash) -> Vec<u8> {
    let mut aad = Vec::with_capacity(CHUNK_AAD_DOMAIN.len() + 4 + 32);
    aad.extend_from_slice(CHUNK_AAD_DOMAIN);
    aad.extend_from_slice(&generation.0.to_le_bytes());
    aad.extend_from_slice(plain_hash.as_bytes());
    aad
}

fn chunk_cipher_and_nonce(
    key: &ContentKey,
    generation: KeyGeneration,
    plain_hash: &BlobHash,
) -> (XChaCha20Poly1305, [u8; NONCE_BYTES]) {
    let chunk_key = derive(CHUNK_KEY_CONTEXT, key, generation, plain_hash.as_bytes());
    let nonce_material = derive(CHUNK_NONCE_CONTEXT, key, generation, plain_hash.as_bytes());
    let mut nonce = [0u8; NONCE_BYTES];
    nonce.copy_from_slice(&nonce_material[..NONCE_BYTES]);
    (cipher(&chunk_key), nonce)
}

/// Seals one compressed chunk, whose BLAKE3 hash is `plain_hash`. The result is
/// [`TAG_BYTES`] longer and depends only on the key, the generation and the plaintext.
pub fn seal_chunk(
    key: &ContentKey,
    generation: KeyGeneration,
    plain_hash: &BlobHash,
    plain: &[u8],
) -> Vec<u8> {
    let (cipher, nonce) = chunk_cipher_and_nonce(key, generation, plain_hash);
    let aad = chunk_aad(generation, plain_hash);
    // Encryption fails only for messages beyond the cipher's 256 GiB limit; chunks are a few
    // MiB at most (bounded by the chunker), so an empty result cannot be produced in practice
    // and would fail to open anyway.
    cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plain,
                aad: &aad,
            },
        )
        .unwrap_or_default()
}

/// Opens chunk `index` (ciphertext hash `hash`) whose plaintext the sealed metadata describes
/// as `plain`, and checks the plaintext's hash and size.
pub fn open_chunk(
    key: &ContentKey,
    generation: KeyGeneration,
    index: usize,
    hash: BlobHash,
    plain: &ChunkRef,
    sealed: &[u8],
) -> Result<Vec<u8>, SealError> {
    open_chunk_in_place(key, generation, index, hash, plain, sealed.to_vec())
}

/// Like [`open_chunk`], decrypting `sealed` in its own buffer (no copy): returns it shortened
/// to the plaintext. The tag is checked before any byte is decrypted, and the plaintext's hash
/// and size after; on error the buffer is dropped.
pub fn open_chunk_in_place(
    key: &ContentKey,
    generation: KeyGeneration,
    index: usize,
    hash: BlobHash,
    plain: &ChunkRef,
    mut sealed: Vec<u8>,
) -> Result<Vec<u8>, SealError> {
    let does_not_open = || SealError::ChunkDoesNotOpen {
        index,
        hash,
        generation,
    };
    let Some(plain_len) = sealed.len().checked_sub(TAG_BYTES) else {
        return Err(does_not_open());
    };
    let (cipher, nonce) = chunk_cipher_and_nonce(key, generation, &plain.hash);
    let aad = chunk_aad(generation, &plain.hash);
    let (body, tag) = sealed.split_at_mut(plain_len);
    let tag = Tag::clone_from_slice(tag);
    cipher
        .decrypt_in_place_detached(XNonce::from_slice(&nonce), &aad, body, &tag)
        .map_err(|_| does_not_open())?;
    sealed.truncate(plain_len);
    let opened = sealed;
    let actual = BlobHash::of(&opened);
    if actual != plain.hash || opened.len() as u64 != plain.stored_bytes {
        return Err(SealError::PlaintextMismatch {
            index,
            generation,
            expected: plain.hash,
            expected_bytes: plain.stored_bytes,
            actual,
            actual_bytes: opened.len() as u64,
        });
    }
    Ok(opened)
}

fn meta_aad(generation: KeyGeneration, clear_chunks: &[ChunkRef]) -> Vec<u8> {
    let list = codec::encode(&clear_chunks).unwrap_or_default();
    let mut aad = Vec::with_capacity(META_AAD_DOMAIN.len() + 4 + 32);
    aad.extend_from_slice(META_AAD_DOMAIN);
    aad.extend_from_slice(&generation.0.to_le_bytes());
    aad.extend_from_slice(BlobHash::of(&list).as_bytes());
    aad
}

/// Seals `meta` for a manifest whose ciphertext chunk list is `clear_chunks`: the nonce, then
/// the ciphertext and tag.
pub fn seal_meta(
    key: &ContentKey,
    generation: KeyGeneration,
    meta: &SealedMeta,
    clear_chunks: &[ChunkRef],
) -> Result<Vec<u8>, CodecError> {
    let bytes = Zeroizing::new(codec::encode(meta)?);
    let meta_key = derive(META_KEY_CONTEXT, key, generation, &[0; 32]);
    let nonce_material = derive(
        META_NONCE_CONTEXT,
        key,
        generation,
        BlobHash::of(&bytes).as_bytes(),
    );
    let nonce = XNonce::from_slice(&nonce_material[..NONCE_BYTES]);
    let aad = meta_aad(generation, clear_chunks);
    let sealed = cipher(&meta_key)
        .encrypt(
            nonce,
            Payload {
                msg: &bytes,
                aad: &aad,
            },
        )
        .map_err(|_| CodecError::Encode("the sealed metadata is too large".into()))?;
    let mut out = Vec::with_capacity(NONCE_BYTES + sealed.len());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens the sealed metadata of a manifest whose ciphertext chunk list is `clear_chunks`, and
/// checks that it describes exactly those chunks. Decoding is bounded by
/// [`MAX_MANIFEST_BYTES`] and never panics.
pub fn open_meta(
    key: &ContentKey,
    generation: KeyGeneration,
    sealed: &[u8],
    clear_chunks: &[ChunkRef],
) -> Result<SealedMeta, SealError> {
    let malformed = |detail: String| SealError::MalformedMeta { generation, detail };
    if sealed.len() < NONCE_BYTES + TAG_BYTES {
        return Err(malformed(format!(
            "{} bytes, fewer than a nonce and a tag",
            sealed.len()
        )));
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
    let meta_key = derive(META_KEY_CONTEXT, key, generation, &[0; 32]);
    let aad = meta_aad(generation, clear_chunks);
    let bytes = Zeroizing::new(
        cipher(&meta_key)
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::MetaDoesNotOpen { generation })?,
    );
    let meta: SealedMeta =
        codec::decode(&bytes, MAX_MANIFEST_BYTES).map_err(|e| malformed(e.to_string()))?;
    if matches!(meta.layout, PayloadLayout::Sealed { .. }) {
        return Err(malformed("it names a sealed layout".into()));
    }
    if meta.chunks.len() != clear_chunks.len() {
        return Err(malformed(format!(
            "it describes {} chunks, the manifest lists {}",
            meta.chunks.len(),
            clear_chunks.len()
        )));
    }
    for (index, (plain, clear)) in meta.chunks.iter().zip(clear_chunks).enumerate() {
        if plain.stored_bytes.checked_add(TAG_BYTES as u64) != Some(clear.stored_bytes) {
            return Err(malformed(format!(
                "chunk {index} is {} bytes sealed, but its plaintext is said to be {} bytes",
                clear.stored_bytes, plain.stored_bytes
            )));
        }
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(byte: u8) -> ContentKey {
        ContentKey::from_bytes([byte; 32])
    }

    fn sealed_chunk(
        k: &ContentKey,
        generation: KeyGeneration,
        plain: &[u8],
    ) -> (ChunkRef, Vec<u8>) {
        let plain_hash = BlobHash::of(plain);
        let sealed = seal_chunk(k, generation, &plain_hash, plain);
        (
            ChunkRef {
                hash: plain_hash,
                stored_bytes: plain.len() as u64,
                raw_bytes: 100,
            },
            sealed,
        )
    }

    #[test]
    fn sealing_is_convergent_within_a_key_and_differs_across_keys_and_generations() {
        let g1 = KeyGeneration(1);
        let (_, a) = sealed_chunk(&key(1), g1, b"the same chunk");
        let (_, b) = sealed_chunk(&key(1), g1, b"the same chunk");
        let (_, c) = sealed_chunk(&key(1), KeyGeneration(2), b"the same chunk");
        let (_, d) = sealed_chunk(&key(2), g1, b"the same chunk");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_eq!(a.len(), b"the same chunk".len() + TAG_BYTES);
        assert!(!a.windows(5).any(|w| w == b"chunk"));
    }

    #[test]
    fn a_chunk_opens_only_with_its_key_generation_and_plaintext_hash() {
        let g1 = KeyGeneration(1);
        let (plain, sealed) = sealed_chunk(&key(1), g1, b"chunk one");
        let hash = BlobHash::of(&sealed);
        let opened = open_chunk(&key(1), g1, 0, hash, &plain, &sealed).expect("opens");
        assert_eq!(opened, b"chunk one");

        // Same plaintext sealed under generation 2 (same key bytes, another generation).
        let (_, other_gen) = sealed_chunk(&key(1), KeyGeneration(2), b"chunk one");
        let error = open_chunk(&key(1), g1, 3, hash, &plain, &other_gen).expect_err("confused");
        assert!(matches!(
            error,
            SealError::ChunkDoesNotOpen { index: 3, .. }
        ));
        assert!(error.to_string().contains("key generation 1"), "{error}");

        // Another chunk's ciphertext under the same key.
        let (_, another) = sealed_chunk(&key(1), g1, b"chunk two");
        assert!(open_chunk(&key(1), g1, 0, hash, &plain, &another).is_err());

        // Wrong key of the right generation.
        assert!(open_chunk(&key(9), g1, 0, hash, &plain, &sealed).is_err());
    }

    fn sample_meta() -> (SealedMeta, Vec<ChunkRef>) {
        let plain = vec![
            ChunkRef {
                hash: BlobHash::of(b"a"),
                stored_bytes: 10,
                raw_bytes: 30,
            },
            ChunkRef {
                hash: BlobHash::of(b"b"),
                stored_bytes: 20,
                raw_bytes: 40,
            },
        ];
        let clear = plain
            .iter()
            .map(|c| ChunkRef {
                hash: BlobHash::of(c.hash.as_bytes()),
                stored_bytes: c.stored_bytes + TAG_BYTES as u64,
                raw_bytes: 0,
            })
            .collect();
        (
            SealedMeta {
                layout: PayloadLayout::Image {
                    file_name: "secret-disk.img".into(),
                },
                chunks: plain,
            },
            clear,
        )
    }

    #[test]
    fn metadata_round_trips_is_deterministic_and_binds_the_chunk_list() {
        let g = KeyGeneration(4);
        let (meta, clear) = sample_meta();
        let sealed = seal_meta(&key(1), g, &meta, &clear).expect("seal");
        assert_eq!(sealed, seal_meta(&key(1), g, &meta, &clear).expect("seal"));
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(open_meta(&key(1), g, &sealed, &clear).expect("open"), meta);
        let error = open_meta(&key(2), g, &sealed, &clear).expect_err("wrong key");
        assert!(error.to_string().contains("key generation 4"), "{error}");
        assert!(open_meta(&key(1), KeyGeneration(5), &sealed, &clear).is_err());
        let mut swapped = clear.clone();
        swapped.swap(0, 1);
        assert!(open_meta(&key(1), g, &sealed, &swapped).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        #[test]
        fn truncated_or_flipped_sealed_metadata_is_refused_never_panics(
            cut in 0usize..400, flip in any::<(usize, u8)>(),
        ) {
            let g = KeyGeneration(1);
            let (meta, clear) = sample_meta();
            let sealed = seal_meta(&key(1), g, &meta, &clear).expect("seal");
            let truncated = &sealed[..cut.min(sealed.len().saturating_sub(1))];
            prop_assert!(open_meta(&key(1), g, truncated, &clear).is_err());
            let mut flipped = sealed.clone();
            let at = flip.0 % flipped.len();
            flipped[at] ^= flip.1.max(1);
            prop_assert!(open_meta(&key(1), g, &flipped, &clear).is_err());
        }

        #[test]
        fn truncated_or_flipped_chunks_are_refused_never_panic(
            plain in proptest::collection::vec(any::<u8>(), 0..2048),
            cut in any::<usize>(), flip in any::<(usize, u8)>(),
        ) {
            let g = KeyGeneration(1);
            let (plain_ref, sealed) = sealed_chunk(&key(1), g, &plain);
            let hash = BlobHash::of(&sealed);
            let truncated = &sealed[..cut % sealed.len()];
            prop_assert!(open_chunk(&key(1), g, 0, hash, &plain_ref, truncated).is_err());
            let mut flipped = sealed.clone();
            let at = flip.0 % flipped.len();
            flipped[at] ^= flip.1.max(1);
            prop_assert!(open_chunk(&key(1), g, 0, hash, &plain_ref, &flipped).is_err());
        }

        #[test]
        fn arbitrary_bytes_as_sealed_metadata_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let (_, clear) = sample_meta();
            prop_assert!(open_meta(&key(1), KeyGeneration(1), &bytes, &clear).is_err());
        }
    }
}
