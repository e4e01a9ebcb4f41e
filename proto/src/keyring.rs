//! Key rings on disk: the origin's content keys and the ones an edge was given, in one file
//! format (the canonical encoding of a [`KeyRing`]), written atomically with mode 0600.

use std::io;
use std::path::Path;

use crate::codec::{self, CodecError};
use crate::durable::{self, DurableError};
use crate::keys::{KeyRing, CONTENT_KEY_BYTES, MAX_KEY_GENERATIONS};

/// The file a node keeps its key ring in, inside its identity (or origin home) directory.
pub const KEYRING_FILE: &str = "content-keys.bin";

/// Largest key-ring file read, in bytes.
const MAX_KEYRING_BYTES: usize = MAX_KEY_GENERATIONS * (CONTENT_KEY_BYTES + 16) + 64;

/// Why a key ring could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// Reading the file failed.
    #[error("reading key ring {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The file is not a key ring.
    #[error("key ring {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: String,
        /// The cause.
        source: CodecError,
    },
    /// Writing the file failed.
    #[error("writing key ring {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The cause.
        source: DurableError,
    },
}

/// Reads the key ring at `path`; a missing file is an empty ring.
pub fn load(path: &Path) -> Result<KeyRing, KeyringError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(KeyRing::new()),
        Err(source) => {
            return Err(KeyringError::Read {
                path: path.display().to_string(),
                source,
            })
        }
    };
    codec::decode(&bytes, MAX_KEYRING_BYTES).map_err(|source| KeyringError::Corrupt {
        path: path.display().to_string(),
        source,
    })
}

/// Replaces the key ring at `path` atomically, readable by its owner only.
pub fn save(path: &Path, ring: &KeyRing) -> Result<(), KeyringError> {
    let path_text = || path.display().to_string();
    let bytes = codec::encode(ring).map_err(|source| KeyringError::Corrupt {
        path: path_text(),
        source,
    })?;
    durable::write_atomic(path, &bytes, 0o600).map_err(|source| KeyringError::Write {
        path: path_text(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::keys::{ContentKey, KeyGeneration};

    #[test]
    fn a_saved_ring_loads_back_and_only_its_owner_reads_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(KEYRING_FILE);
        assert!(load(&path).expect("missing is empty").is_empty());
        let mut ring = KeyRing::new();
        ring.insert(KeyGeneration(1), ContentKey::generate())
            .expect("insert");
        ring.insert(KeyGeneration(2), ContentKey::generate())
            .expect("insert");
        save(&path, &ring).expect("save");
        assert_eq!(load(&path).expect("load"), ring);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, b"not a ring").expect("write");
        let error = load(&path).expect_err("corrupt");
        assert!(error.to_string().contains("corrupt"), "{error}");
    }
}
