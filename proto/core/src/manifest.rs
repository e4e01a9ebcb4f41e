//! Bundle manifests: what a bundle is, which chunks make it, and who signed it.
//!
//! A [`Manifest`] is encoded canonically with [`crate::codec`]; the [`BundleId`] is the BLAKE3
//! hash of those bytes. A [`SignedManifest`] carries the bytes and an ed25519 signature over
//! them. Pure: no I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::hash::BlobHash;
use crate::keys::KeyGeneration;

/// Version of the manifest format written by this build for a clear (unencrypted) bundle.
pub const MANIFEST_FORMAT: u32 = 1;

/// Version of the manifest format of an encrypted bundle: format 1 with the layout
/// [`PayloadLayout::Sealed`] (a variant appended to the enum, so format-1 manifests encode to
/// the same bytes and keep their ids), every chunk's `raw_bytes` and `total_raw_bytes` zero,
/// and the chunk list naming the ciphertext blobs. Builds that know only format 1 refuse it.
pub const SEALED_MANIFEST_FORMAT: u32 = 2;

/// Largest encoded manifest accepted, in bytes (about 300k chunks).
pub const MAX_MANIFEST_BYTES: usize = 16 * 1024 * 1024;

/// The id of a bundle: the BLAKE3 hash of its canonical manifest bytes.
pub type BundleId = BlobHash;

/// What a bundle is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BundleKind {
    /// A complete operating-system image for an A slot.
    OsImage,
    /// The base (rescue) operating system kept in the B slot.
    BaseOs,
    /// A software package installed on top of an OS.
    Package,
    /// A boot image (kernel, initrd).
    BootImage,
    /// A script run on the machine.
    Script,
}

impl BundleKind {
    /// Every kind, in a stable order.
    pub const ALL: [BundleKind; 5] = [
        BundleKind::OsImage,
        BundleKind::BaseOs,
        BundleKind::Package,
        BundleKind::BootImage,
        BundleKind::Script,
    ];

    /// The kebab-case name used on the command line (`os-image`, `base-os`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            BundleKind::OsImage => "os-image",
            BundleKind::BaseOs => "base-os",
            BundleKind::Package => "package",
            BundleKind::BootImage => "boot-image",
            BundleKind::Script => "script",
        }
    }
}

impl fmt::Display for BundleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BundleKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BundleKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| {
                format!("unknown bundle kind {s:?}: expected one of os-image, base-os, package, boot-image, script")
            })
    }
}

/// How the payload (the concatenated, uncompressed chunks) is to be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadLayout {
    /// A deterministic tar stream of a directory tree.
    Tree,
    /// One image file, stored as-is; `file_name` is its name when unpacked.
    Image {
        /// File name to restore the image under.
        file_name: String,
    },
    /// An encrypted bundle (manifest format [`SEALED_MANIFEST_FORMAT`]): the chunks are sealed
    /// with `generation`'s content key, and the real layout, with each chunk's plaintext hash
    /// and sizes, is the sealed [`crate::seal::SealedMeta`] in `meta`.
    Sealed {
        /// The content-key generation that sealed the chunks and `meta`.
        generation: KeyGeneration,
        /// Nonce, ciphertext and tag of the encoded [`crate::seal::SealedMeta`].
        meta: Vec<u8>,
    },
}

impl PayloadLayout {
    /// The generation an encrypted bundle was sealed with, or `None` for a clear one.
    pub fn sealed_generation(&self) -> Option<KeyGeneration> {
        match self {
            PayloadLayout::Sealed { generation, .. } => Some(*generation),
            _ => None,
        }
    }
}

/// A compatibility selector: the bundle suits machines whose fact `key` equals `value`
/// (for example `arch = x86_64` or `model = R640`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Selector {
    /// Inventory fact name.
    pub key: String,
    /// Required value.
    pub value: String,
}

/// Another bundle this one needs, by name and version (`*` for any).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dependency {
    /// Bundle name.
    pub name: String,
    /// Exact version, or `*`.
    pub version: String,
}

/// One chunk of the payload: a blob holding the zstd-compressed bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Hash of the stored (compressed) blob.
    pub hash: BlobHash,
    /// Size of the stored blob in bytes.
    pub stored_bytes: u64,
    /// Size of the chunk once decompressed, in bytes.
    pub raw_bytes: u64,
}

/// Everything that defines a bundle. Deterministic: no clocks, no hostnames.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`] at the time of writing.
    pub format: u32,
    /// Bundle name, e.g. `ubuntu-base`.
    pub name: String,
    /// Version string, e.g. `24.04.1`.
    pub version: String,
    /// What the bundle is for.
    pub kind: BundleKind,
    /// Machines it suits.
    pub selectors: Vec<Selector>,
    /// Bundles it needs.
    pub dependencies: Vec<Dependency>,
    /// How to read the payload.
    pub layout: PayloadLayout,
    /// The ordered chunks of the payload.
    pub chunks: Vec<ChunkRef>,
    /// Sum of `raw_bytes` over the chunks.
    pub total_raw_bytes: u64,
    /// Sum of `stored_bytes` over the chunks.
    pub total_stored_bytes: u64,
    /// Free-form metadata (for example a captured image's inventory).
    pub metadata: BTreeMap<String, String>,
    /// The publisher's ed25519 public key.
    pub publisher: [u8; 32],
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The bytes are not a manifest.
    #[error("malformed manifest: {0}")]
    Malformed(#[from] CodecError),
    /// The signature does not match the bytes and the publisher key.
    #[error("manifest signature does not verify against publisher key {publisher}: the bundle was altered or signed by another key")]
    BadSignature {
        /// Hex of the claimed publisher key.
        publisher: String,
    },
    /// The signature is valid but the key is not trusted to publish.
    #[error("manifest is signed by {publisher}, which is not a trusted publisher")]
    UntrustedPublisher {
        /// Hex of the signing key.
        publisher: String,
    },
    /// A format this build does not know.
    #[error(
        "manifest format {found} is not supported (this build reads formats {MANIFEST_FORMAT} (clear) and {SEALED_MANIFEST_FORMAT} (encrypted))"
    )]
    UnsupportedFormat {
        /// The format number found.
        found: u32,
    },
    /// Totals or chunk list disagree with each other.
    #[error("inconsistent manifest: {0}")]
    Inconsistent(String),
    /// The id asked for is not the hash of these bytes.
    #[error("manifest hashes to {actual}, expected bundle {expected}")]
    WrongId {
        /// The id that was asked for.
        expected: BundleId,
        /// The hash of the bytes received.
        actual: BundleId,
    },
}

impl Manifest {
    /// Canonical bytes of this manifest.
    pub fn to_bytes(&self) -> Vec<u8> {
        // A manifest holds only strings, integers and vectors: encoding cannot fail.
        codec::encode(self).unwrap_or_default()
    }

    /// The bundle id this manifest will have.
    pub fn id(&self) -> BundleId {
        BlobHash::of(&self.to_bytes())
    }

    /// Checks the internal consistency of the chunk list and totals.
    pub fn check(&self) -> Result<(), ManifestError> {
        let sealed = matches!(self.layout, PayloadLayout::Sealed { .. });
        match (self.format, sealed) {
            (MANIFEST_FORMAT, false) | (SEALED_MANIFEST_FORMAT, true) => {}
            (MANIFEST_FORMAT | SEALED_MANIFEST_FORMAT, _) => {
                return Err(ManifestError::Inconsistent(format!(
                    "format {} with a {} layout",
                    self.format,
                    if sealed { "sealed" } else { "clear" }
                )))
            }
            (found, _) => return Err(ManifestError::UnsupportedFormat { found }),
        }
        if sealed && (self.total_raw_bytes != 0 || self.chunks.iter().any(|c| c.raw_bytes != 0)) {
            return Err(ManifestError::Inconsistent(
                "an encrypted manifest must not give raw sizes in the clear".into(),
            ));
        }
        let raw: Option<u64> = self
            .chunks
            .iter()
            .try_fold(0u64, |acc, c| acc.checked_add(c.raw_bytes));
        let stored: Option<u64> = self
            .chunks
            .iter()
            .try_fold(0u64, |acc, c| acc.checked_add(c.stored_bytes));
        if raw != Some(self.total_raw_bytes) || stored != Some(self.total_stored_bytes) {
            return Err(ManifestError::Inconsistent(format!(
                "totals {}/{} do not match the {} chunks",
                self.total_raw_bytes,
                self.total_stored_bytes,
                self.chunks.len()
            )));
        }
        if self.name.is_empty() || self.version.is_empty() {
            return Err(ManifestError::Inconsistent(
                "name and version must not be empty".into(),
            ));
        }
        Ok(())
    }

    /// Signs the manifest; `key` must be the publisher's (its public half is recorded).
    pub fn sign(mut self, key: &SigningKey) -> SignedManifest {
        self.publisher = key.verifying_key().to_bytes();
        let bytes = self.to_bytes();
        let signature = key.sign(&bytes).to_bytes();
        SignedManifest {
            manifest_bytes: bytes,
            signature,
        }
    }
}

/// A manifest's canonical bytes and the publisher's signature over them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// Canonical [`Manifest`] bytes; their hash is the bundle id.
    pub manifest_bytes: Vec<u8>,
    /// ed25519 signature over `manifest_bytes`.
    #[serde(with = "signature_bytes")]
    pub signature: [u8; 64],
}

impl SignedManifest {
    /// The bundle id: the hash of the manifest bytes.
    pub fn id(&self) -> BundleId {
        BlobHash::of(&self.manifest_bytes)
    }

    /// Encodes for storage or the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        codec::encode(self).unwrap_or_default()
    }

    /// Decodes from storage or the wire. Never panics; does not check the signature.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ManifestError> {
        Ok(codec::decode(bytes, MAX_MANIFEST_BYTES + 128)?)
    }

    /// Decodes the manifest and checks its signature against the key it names, and that this key
    /// is among `trusted` publishers (an empty list trusts any key, for offline inspection).
    pub fn verify(&self, trusted: &[VerifyingKey]) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = codec::decode(&self.manifest_bytes, MAX_MANIFEST_BYTES)?;
        let publisher = hex::encode(manifest.publisher);
        let key = VerifyingKey::from_bytes(&manifest.publisher).map_err(|_| {
            ManifestError::BadSignature {
                publisher: publisher.clone(),
            }
        })?;
        let signature = Signature::from_bytes(&self.signature);
        key.verify(&self.manifest_bytes, &signature)
            .map_err(|_| ManifestError::BadSignature {
                publisher: publisher.clone(),
            })?;
        if !trusted.is_empty() && !trusted.contains(&key) {
            return Err(ManifestError::UntrustedPublisher { publisher });
        }
        manifest.check()?;
        Ok(manifest)
    }

    /// Like [`SignedManifest::verify`], and also checks that these are the bytes of `expected`.
    pub fn verify_as(
        &self,
        expected: BundleId,
        trusted: &[VerifyingKey],
    ) -> Result<Manifest, ManifestError> {
        let actual = self.id();
        if actual != expected {
            return Err(ManifestError::WrongId { expected, actual });
        }
        self.verify(trusted)
    }
}

/// serde has no impl for `[u8; 64]`; encode it as a byte vector of checked length.
mod signature_bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(sig)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let bytes: Vec<u8> = serde_bytes_vec(d)?;
        bytes.try_into().map_err(|v: Vec<u8>| {
            D::Error::custom(format!("signature is {} bytes, not 64", v.len()))
        })
    }

    fn serde_bytes_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Vec::<u8>::deserialize(d)
    }
}

/// Generates a fresh ed25519 signing key from the OS's random source.
pub fn generate_signing_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample_manifest() -> Manifest {
        let chunks = vec![
            ChunkRef {
                hash: BlobHash::of(b"one"),
                stored_bytes: 10,
                raw_bytes: 30,
            },
            ChunkRef {
                hash: BlobHash::of(b"two"),
                stored_bytes: 5,
                raw_bytes: 7,
            },
        ];
        Manifest {
            format: MANIFEST_FORMAT,
            name: "base".into(),
            version: "1.0".into(),
            kind: BundleKind::BaseOs,
            selectors: vec![Selector {
                key: "arch".into(),
                value: "x86_64".into(),
            }],
            dependencies: vec![],
            layout: PayloadLayout::Tree,
            chunks,
            total_raw_bytes: 37,
            total_stored_bytes: 15,
            metadata: BTreeMap::new(),
            publisher: [0; 32],
        }
    }

    #[test]
    fn sign_verify_round_trip_and_id_is_hash_of_bytes() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let signed = sample_manifest().sign(&key);
        let back = SignedManifest::from_bytes(&signed.to_bytes()).expect("decode");
        let manifest = back.verify(&[key.verifying_key()]).expect("verify");
        assert_eq!(manifest.name, "base");
        assert_eq!(back.id(), manifest.id());
        assert_eq!(back.id(), BlobHash::of(&back.manifest_bytes));
    }

    #[test]
    fn wrong_signature_is_rejected_with_a_clear_error() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut signed = sample_manifest().sign(&key);
        signed.signature[3] ^= 1;
        let err = signed.verify(&[]).expect_err("must reject");
        assert!(matches!(err, ManifestError::BadSignature { .. }));
        assert!(err.to_string().contains("signature does not verify"));

        // Altered bytes with the original signature.
        let mut signed = sample_manifest().sign(&key);
        let last = signed.manifest_bytes.len() - 40;
        signed.manifest_bytes[last] ^= 1;
        assert!(signed.verify(&[]).is_err());
    }

    #[test]
    fn untrusted_publisher_is_rejected() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let signed = sample_manifest().sign(&key);
        let err = signed
            .verify(&[other.verifying_key()])
            .expect_err("untrusted");
        assert!(matches!(err, ManifestError::UntrustedPublisher { .. }));
    }

    #[test]
    fn kind_parses_from_cli_names() {
        for kind in BundleKind::ALL {
            assert_eq!(kind.as_str().parse::<BundleKind>(), Ok(kind));
        }
        assert!("iso".parse::<BundleKind>().is_err());
    }

    fn sealed_sample() -> (SignedManifest, SigningKey) {
        use crate::keys::{ContentKey, KeyGeneration};
        use crate::seal::{seal_meta, SealedMeta};
        let plain = sample_manifest();
        let mut manifest = plain.clone();
        manifest.format = SEALED_MANIFEST_FORMAT;
        for chunk in &mut manifest.chunks {
            chunk.stored_bytes += crate::seal::TAG_BYTES as u64;
            chunk.raw_bytes = 0;
        }
        manifest.total_raw_bytes = 0;
        manifest.total_stored_bytes = manifest.chunks.iter().map(|c| c.stored_bytes).sum();
        let meta = SealedMeta {
            layout: PayloadLayout::Tree,
            chunks: plain.chunks,
        };
        let generation = KeyGeneration(1);
        manifest.layout = PayloadLayout::Sealed {
            generation,
            meta: seal_meta(
                &ContentKey::from_bytes([3; 32]),
                generation,
                &meta,
                &manifest.chunks,
            )
            .expect("seal"),
        };
        let key = SigningKey::from_bytes(&[7; 32]);
        (manifest.sign(&key), key)
    }

    #[test]
    fn a_sealed_manifest_verifies_and_a_clear_one_keeps_format_1() {
        let (signed, key) = sealed_sample();
        let manifest = signed.verify(&[key.verifying_key()]).expect("verify");
        assert_eq!(manifest.format, SEALED_MANIFEST_FORMAT);
        assert_eq!(
            manifest.layout.sealed_generation(),
            Some(crate::keys::KeyGeneration(1))
        );
        // A sealed layout under format 1, or raw sizes in the clear, are refused.
        let mut wrong = manifest.clone();
        wrong.format = MANIFEST_FORMAT;
        assert!(matches!(wrong.check(), Err(ManifestError::Inconsistent(_))));
        let mut wrong = manifest;
        wrong.chunks[0].raw_bytes = 5;
        wrong.total_raw_bytes = 5;
        assert!(wrong.check().is_err());
        assert_eq!(sample_manifest().format, MANIFEST_FORMAT);
        assert!(sample_manifest().layout.sealed_generation().is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]
        #[test]
        fn truncated_or_flipped_sealed_manifests_are_refused_never_panic(
            cut in any::<usize>(), flip in any::<(usize, u8)>(),
        ) {
            let (signed, key) = sealed_sample();
            let trusted = [key.verifying_key()];
            let bytes = signed.to_bytes();
            let truncated = &bytes[..cut % bytes.len()];
            if let Ok(decoded) = SignedManifest::from_bytes(truncated) {
                prop_assert!(decoded.verify(&trusted).is_err());
            }
            let mut flipped = bytes.clone();
            let at = flip.0 % flipped.len();
            flipped[at] ^= flip.1.max(1);
            if let Ok(decoded) = SignedManifest::from_bytes(&flipped) {
                prop_assert!(decoded.verify(&trusted).is_err());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(100_000))]
        #[test]
        fn manifest_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(signed) = SignedManifest::from_bytes(&bytes) {
                let _ = signed.verify(&[]);
            }
            let _ = codec::decode::<Manifest>(&bytes, MAX_MANIFEST_BYTES);
        }
    }
}
