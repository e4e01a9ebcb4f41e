//! Several origins of one mesh (issue 14): `origin keys export` seals the keys every origin of
//! a mesh shares, `origin init --join FILE` sets a new origin up from them.
//!
//! Shared: the mesh CA (`ca/`), the publisher's signing key and client identity
//! (`publisher/`) and the content-key ring (`content-keys.bin`, when there is one). Not
//! shared: the origin's own TLS identity (`identity/`), which the joining origin gets fresh
//! from the CA, so every origin has its own certificate and stagers and edges trust all of them
//! through the CA; and the blob store and catalog, which hold data, not keys.
//!
//! The export is one file: a header (magic, Argon2id cost, salt, nonce) and the files, sealed
//! with XChaCha20-Poly1305 under a key derived from the operator's passphrase with Argon2id.
//! The header is the AEAD's associated data, so a changed cost or salt fails like a wrong
//! passphrase. Private keys therefore never sit anywhere in plain form but in an origin's home
//! (mode 0600), and never in the shared store.

use std::path::{Component, Path, PathBuf};

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::home::OriginHome;

/// The first bytes of an export file.
pub const MAGIC: &[u8; 24] = b"stagecoach origin keys/1";

/// Fewest characters of a passphrase that seals keys.
pub const MIN_PASSPHRASE_CHARS: usize = 12;

/// Argon2id cost of a new export: 64 MiB, 3 passes (a second or so, once per export/join).
const MEMORY_KIB: u32 = 64 * 1024;
const PASSES: u32 = 3;
/// Largest cost an export may ask for (an attacker-made file must not exhaust memory).
const MAX_MEMORY_KIB: u32 = 1024 * 1024;
const MAX_PASSES: u32 = 16;

const SALT_BYTES: usize = 16;
const NONCE_BYTES: usize = 24;
const HEADER_BYTES: usize = MAGIC.len() + 4 + 4 + SALT_BYTES + NONCE_BYTES;

/// Largest export accepted (the keys are a few KiB).
pub const MAX_EXPORT_BYTES: usize = 1 << 20;

/// What is shared: relative paths in an origin's home. Directories are taken whole.
const SHARED: [&str; 3] = ["ca", "publisher", proto::keyring::KEYRING_FILE];

/// Why an export or a join failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The passphrase is too short to seal keys.
    #[error("the passphrase must have at least {MIN_PASSPHRASE_CHARS} characters")]
    ShortPassphrase,
    /// The file is no export.
    #[error("not an origin key export (it does not start with the export header)")]
    NotAnExport,
    /// The file asks for a key derivation this origin will not run.
    #[error("the export asks for an Argon2id cost of {memory_kib} KiB × {passes} passes, more than allowed ({MAX_MEMORY_KIB} KiB × {MAX_PASSES})")]
    Cost {
        /// Memory asked for.
        memory_kib: u32,
        /// Passes asked for.
        passes: u32,
    },
    /// The passphrase does not open it, or it was changed.
    #[error("wrong passphrase, or the export was changed or damaged: nothing was written")]
    Open,
    /// It opened, but its content is not what an export holds.
    #[error("the export opened but its content is malformed: {0}")]
    Content(String),
    /// The origin to export from is missing something.
    #[error("{0}")]
    Source(String),
    /// The home to join into already holds an origin.
    #[error("{0} already holds an origin; join into an empty --dir")]
    Exists(PathBuf),
    /// Reading or writing files.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// Deriving the key or sealing.
    #[error("cannot seal the keys: {0}")]
    Seal(String),
    /// Setting up the joined origin's own identity.
    #[error("cannot set up the joined origin: {0:#}")]
    Setup(anyhow::Error),
}

/// One shared file.
#[derive(Serialize, Deserialize)]
struct SharedFile {
    /// Relative to the home, `/`-separated.
    path: String,
    mode: u32,
    bytes: Vec<u8>,
}

impl Drop for SharedFile {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

/// What `init --join` set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    /// The shared files written.
    pub files: Vec<String>,
    /// The publisher's key fingerprint (the same on every origin of the mesh).
    pub publisher: String,
    /// The joined origin's own node id.
    pub node_id: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JoinError + '_ {
    move |error| JoinError::Io {
        path: path.to_owned(),
        error,
    }
}

/// Checks a passphrase that will seal keys.
pub fn check_passphrase(passphrase: &str) -> Result<(), JoinError> {
    if passphrase.chars().count() < MIN_PASSPHRASE_CHARS {
        return Err(JoinError::ShortPassphrase);
    }
    Ok(())
}

/// The shared keys of the origin at `home`, sealed with `passphrase`.
pub fn export(home: &OriginHome, passphrase: &str) -> Result<Vec<u8>, JoinError> {
    check_passphrase(passphrase)?;
    if !home.is_initialised() {
        return Err(JoinError::Source(format!(
            "{} holds no origin to export keys from",
            home.dir().display()
        )));
    }
    let mut files = Vec::new();
    for name in SHARED {
        collect(home.dir(), Path::new(name), &mut files)?;
    }
    let plain = Zeroizing::new(
        serde_json::to_vec(&files).map_err(|e| JoinError::Seal(format!("encode: {e}")))?,
    );
    let mut header = Vec::with_capacity(HEADER_BYTES);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&MEMORY_KIB.to_be_bytes());
    header.extend_from_slice(&PASSES.to_be_bytes());
    let mut salt = [0u8; SALT_BYTES];
    let mut nonce = [0u8; NONCE_BYTES];
    rand::thread_rng().fill_bytes(&mut salt);
    rand::thread_rng().fill_bytes(&mut nonce);
    header.extend_from_slice(&salt);
    header.extend_from_slice(&nonce);
    let key = derive(passphrase, &salt, MEMORY_KIB, PASSES)?;
    let sealed = XChaCha20Poly1305::new(Key::from_slice(&key[..]))
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &plain,
                aad: &header,
            },
        )
        .map_err(|_| JoinError::Seal("encryption failed".into()))?;
    let mut out = header;
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Reads `relative` (a file or a directory, taken whole) under `home` into `files`; a missing
/// content-key ring is fine, a missing CA or publisher is not.
fn collect(home: &Path, relative: &Path, files: &mut Vec<SharedFile>) -> Result<(), JoinError> {
    use std::os::unix::fs::PermissionsExt;
    let path = home.join(relative);
    let meta = match std::fs::metadata(&path) {
        Ok(meta) => meta,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && relative == Path::new(proto::keyring::KEYRING_FILE) =>
        {
            return Ok(());
        }
        Err(e) => return Err(io(&path)(e)),
    };
    if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(&path)
            .map_err(io(&path))?
            .collect::<Result<_, _>>()
            .map_err(io(&path))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            collect(home, &relative.join(entry.file_name()), files)?;
        }
    } else if meta.is_file() {
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        files.push(SharedFile {
            path: relative.to_string_lossy().into_owned(),
            mode: meta.permissions().mode() & 0o777,
            bytes,
        });
    }
    Ok(())
}

fn derive(
    passphrase: &str,
    salt: &[u8],
    memory_kib: u32,
    passes: u32,
) -> Result<Zeroizing<[u8; 32]>, JoinError> {
    let params = Params::new(memory_kib, passes, 1, Some(32))
        .map_err(|e| JoinError::Seal(format!("Argon2id parameters: {e}")))?;
    let mut key = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase.as_bytes(), salt, &mut key[..])
        .map_err(|e| JoinError::Seal(format!("Argon2id: {e}")))?;
    Ok(key)
}

/// Opens an export: the shared files, or why not.
fn open(sealed: &[u8], passphrase: &str) -> Result<Vec<SharedFile>, JoinError> {
    if sealed.len() < HEADER_BYTES || !sealed.starts_with(MAGIC) || sealed.len() > MAX_EXPORT_BYTES
    {
        return Err(JoinError::NotAnExport);
    }
    let (header, body) = sealed.split_at(HEADER_BYTES);
    let word = |at: usize| {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(&header[at..at + 4]);
        u32::from_be_bytes(bytes)
    };
    let memory_kib = word(MAGIC.len());
    let passes = word(MAGIC.len() + 4);
    if memory_kib > MAX_MEMORY_KIB || passes > MAX_PASSES {
        return Err(JoinError::Cost { memory_kib, passes });
    }
    let salt = &header[MAGIC.len() + 8..MAGIC.len() + 8 + SALT_BYTES];
    let nonce = &header[HEADER_BYTES - NONCE_BYTES..];
    let key = derive(passphrase, salt, memory_kib, passes).map_err(|_| JoinError::Open)?;
    let plain = Zeroizing::new(
        XChaCha20Poly1305::new(Key::from_slice(&key[..]))
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: header,
                },
            )
            .map_err(|_| JoinError::Open)?,
    );
    let files: Vec<SharedFile> =
        serde_json::from_slice(&plain).map_err(|e| JoinError::Content(e.to_string()))?;
    for file in &files {
        if !safe_relative(&file.path) {
            return Err(JoinError::Content(format!(
                "`{}` is not a path inside an origin's home",
                file.path
            )));
        }
    }
    for needed in ["ca", "publisher"] {
        if !files.iter().any(|f| Path::new(&f.path).starts_with(needed)) {
            return Err(JoinError::Content(format!("it holds no {needed}/")));
        }
    }
    Ok(files)
}

/// Only plain relative paths under one of the shared names.
fn safe_relative(path: &str) -> bool {
    let path = Path::new(path);
    path.components().all(|c| matches!(c, Component::Normal(_)))
        && SHARED.iter().any(|shared| path.starts_with(shared))
}

/// Sets up a new origin in `home` from an export: the shared files, and its own identity
/// issued by the shared CA. `home` must not hold an origin; on any error nothing is left
/// behind that would make it look like one.
pub fn join(home: &OriginHome, sealed: &[u8], passphrase: &str) -> Result<Joined, JoinError> {
    if home.is_initialised() {
        return Err(JoinError::Exists(home.dir().to_owned()));
    }
    let files = open(sealed, passphrase)?;
    let dir = home.dir();
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // The CA's files go last: `is_initialised` looks at them, so a join that stops half-way
    // leaves a home `init` and `init --join` still accept.
    let (ca, others): (Vec<&SharedFile>, Vec<&SharedFile>) = files
        .iter()
        .partition(|f| Path::new(&f.path).starts_with("ca"));
    let mut written = Vec::new();
    for file in others.into_iter().chain(ca) {
        let path = dir.join(&file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let mode = if file.mode & 0o077 == 0 {
            proto::durable::MODE_PRIVATE
        } else {
            proto::durable::MODE_READABLE
        };
        proto::durable::write_atomic(&path, &file.bytes, mode).map_err(|e| JoinError::Io {
            path: path.clone(),
            error: std::io::Error::other(e.to_string()),
        })?;
        written.push(file.path.clone());
    }
    let identity = home.issue_origin_identity().map_err(JoinError::Setup)?;
    let publisher = home.signing_key().map_err(JoinError::Setup)?;
    Ok(Joined {
        files: written,
        publisher: hex::encode(publisher.verifying_key().to_bytes()),
        node_id: identity,
    })
}

/// The file an export is read from or written to, with a clear error.
pub fn read_export(path: &Path) -> Result<Vec<u8>, JoinError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if meta.len() > MAX_EXPORT_BYTES as u64 {
        return Err(JoinError::NotAnExport);
    }
    std::fs::read(path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASS: &str = "correct horse battery";

    fn origin() -> (tempfile::TempDir, OriginHome) {
        let dir = tempfile::tempdir().expect("dir");
        let home = OriginHome::new(&dir.path().join("a"));
        home.init().expect("init");
        (dir, home)
    }

    #[test]
    fn a_joined_origin_shares_the_ca_and_publisher_and_has_its_own_identity() {
        let (dir, a) = origin();
        let sealed = export(&a, PASS).expect("export");
        let b = OriginHome::new(&dir.path().join("b"));
        let joined = join(&b, &sealed, PASS).expect("join");
        assert!(b.is_initialised());
        assert_eq!(
            a.signing_key().expect("a").to_bytes(),
            b.signing_key().expect("b").to_bytes()
        );
        assert_eq!(
            a.ca().expect("a").cert_pem(),
            b.ca().expect("b").cert_pem(),
            "one CA for the mesh"
        );
        let (ia, ib) = (
            a.origin_identity().expect("a"),
            b.origin_identity().expect("b"),
        );
        assert_ne!(
            ia.node_id(),
            ib.node_id(),
            "each origin has its own identity"
        );
        assert_eq!(joined.node_id, ib.node_id().to_string());
        assert!(joined.files.iter().any(|f| f.starts_with("ca")));
        assert!(!joined.files.iter().any(|f| f.starts_with("identity")));
        assert!(matches!(join(&b, &sealed, PASS), Err(JoinError::Exists(_))));
    }

    #[test]
    fn the_export_holds_no_key_in_plain_form() {
        let (_dir, a) = origin();
        let sealed = export(&a, PASS).expect("export");
        let key = hex::encode(a.signing_key().expect("key").to_bytes());
        let text = String::from_utf8_lossy(&sealed);
        assert!(!text.contains(&key), "the signing key is sealed");
        assert!(!text.contains("PRIVATE KEY"), "no PEM key in the clear");
    }

    #[test]
    fn a_wrong_passphrase_or_a_changed_byte_writes_nothing() {
        let (dir, a) = origin();
        let sealed = export(&a, PASS).expect("export");
        let b = OriginHome::new(&dir.path().join("b"));
        let wrong = join(&b, &sealed, "incorrect horse battery").expect_err("wrong passphrase");
        assert!(wrong.to_string().contains("wrong passphrase"), "{wrong}");
        for at in [MAGIC.len() + 2, MAGIC.len() + 9, sealed.len() - 1] {
            let mut changed = sealed.clone();
            changed[at] ^= 1;
            assert!(
                matches!(
                    join(&b, &changed, PASS),
                    Err(JoinError::Open | JoinError::Cost { .. })
                ),
                "byte {at} changed"
            );
        }
        assert!(matches!(
            join(&b, b"not an export at all, just some text", PASS),
            Err(JoinError::NotAnExport)
        ));
        assert!(!b.is_initialised(), "nothing looks like an origin");
        assert!(matches!(
            export(&a, "short"),
            Err(JoinError::ShortPassphrase)
        ));
    }

    #[test]
    fn paths_outside_the_shared_set_are_refused() {
        for bad in ["../ca/x", "/etc/passwd", "identity/key.pem", "ca/../../x"] {
            assert!(!safe_relative(bad), "{bad}");
        }
        for good in [
            "ca/ca.crt",
            "publisher/manifest-signing.key",
            "content-keys.bin",
        ] {
            assert!(safe_relative(good), "{good}");
        }
    }
}
