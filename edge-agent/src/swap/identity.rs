//! The machine's identity (network configuration, host keys, ACLs): preserved from the running OS
//! into the storage area, and copied into a freshly installed slot.
//!
//! Storage layout: `swap/identity/<generation>/<paths>` holds the copies, and
//! `swap/identity.json` names the complete generation. A new copy goes to a new generation and
//! the pointer is replaced atomically after a filesystem sync, so a power cut leaves either the
//! old copy or the new one, never half of one.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::fault;
use super::fsutil::{self, FsError};
use super::plan::is_safe_relative;

/// Directory under the storage area holding the swap's journal and identity copy.
pub const SWAP_DIR: &str = "swap";

/// The pointer to the complete identity copy, under [`SWAP_DIR`].
const POINTER_FILE: &str = "identity.json";

/// Directory of identity generations, under [`SWAP_DIR`].
const GENERATIONS_DIR: &str = "identity";

/// A preserved identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedIdentity {
    /// Generation directory holding the copy.
    pub generation: u64,
    /// Identity paths that existed on the source OS and were copied.
    pub present: Vec<String>,
    /// Identity paths that did not exist there (skipped).
    pub absent: Vec<String>,
}

/// Why the identity could not be preserved or restored.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A filesystem operation failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// A path would leave the slot through a symlink.
    #[error("identity path {path:?} passes through the symlink {link}: refusing to read or write outside the slot; make it a real directory in the OS image")]
    ThroughSymlink {
        /// The identity path.
        path: String,
        /// The symlink found on the way.
        link: PathBuf,
    },
    /// A path is not relative to the slot root.
    #[error("identity path {0:?} must be relative to the slot root, without `..`")]
    BadPath(String),
    /// The pointer file is unreadable.
    #[error("identity record {path} is corrupt ({detail}); preserve the identity again by restarting the swap from the old OS")]
    Corrupt {
        /// The pointer file.
        path: PathBuf,
        /// The parse error.
        detail: String,
    },
    /// Nothing was preserved, yet a restore was asked for.
    #[error("no preserved identity in {0}: the swap must preserve it before installing a slot")]
    NothingSaved(PathBuf),
}

/// The preserved identity in `storage`, if any.
pub fn load(storage: &Path) -> Result<Option<SavedIdentity>, IdentityError> {
    let pointer = storage.join(SWAP_DIR).join(POINTER_FILE);
    let Some(bytes) = fsutil::read_optional(&pointer)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| IdentityError::Corrupt {
            path: pointer,
            detail: e.to_string(),
        })
}

/// Copies `paths` (relative to `slot_root`) into a new generation in `storage`, then makes it
/// the current one. Paths missing under `slot_root` are recorded as absent.
pub fn preserve(
    slot_root: &Path,
    paths: &[String],
    storage: &Path,
) -> Result<SavedIdentity, IdentityError> {
    let swap_dir = storage.join(SWAP_DIR);
    let generations = swap_dir.join(GENERATIONS_DIR);
    let previous = load(storage)?;
    let generation = previous.as_ref().map_or(1, |p| p.generation + 1);
    let dest_root = generations.join(generation.to_string());
    // A crash may have left this generation half-written: start it afresh.
    fsutil::remove_any(&dest_root)?;
    fsutil::create_dirs(&dest_root)?;
    let mut present = Vec::new();
    let mut absent = Vec::new();
    for path in paths {
        let source = inside(slot_root, path)?;
        if fs::symlink_metadata(&source).is_err() {
            absent.push(path.clone());
            continue;
        }
        let dest = dest_root.join(path);
        if let Some(parent) = dest.parent() {
            fsutil::create_dirs(parent)?;
        }
        fsutil::copy_tree(&source, &dest, &mut || fault::op_point("preserve identity"))?;
        present.push(path.clone());
    }
    fsutil::sync_filesystem(&dest_root)?;
    let saved = SavedIdentity {
        generation,
        present,
        absent,
    };
    write_pointer(&swap_dir, &saved)?;
    fault::op_point("identity pointer");
    // Older generations are no longer referenced.
    for entry in fs::read_dir(&generations).map_err(|source| FsError {
        action: "list",
        path: generations.clone(),
        source,
    })? {
        let Ok(entry) = entry else { continue };
        if entry.file_name() != generation.to_string().as_str() {
            fsutil::remove_any(&entry.path())?;
        }
    }
    tracing::info!(
        generation,
        present = saved.present.len(),
        absent = saved.absent.len(),
        "identity preserved"
    );
    Ok(saved)
}

/// Copies the preserved identity into `slot_root`, replacing whatever the new OS has at those
/// paths, then syncs the slot's filesystem. Idempotent.
pub fn restore(storage: &Path, slot_root: &Path) -> Result<SavedIdentity, IdentityError> {
    let saved = load(storage)?.ok_or_else(|| IdentityError::NothingSaved(storage.to_path_buf()))?;
    let source_root = storage
        .join(SWAP_DIR)
        .join(GENERATIONS_DIR)
        .join(saved.generation.to_string());
    for path in &saved.present {
        let dest = inside(slot_root, path)?;
        if let Some(parent) = dest.parent() {
            fsutil::create_dirs(parent)?;
            // create_dirs follows symlinks; check again now that the parents exist.
            inside(slot_root, path)?;
        }
        fsutil::remove_any(&dest)?;
        fsutil::copy_tree(&source_root.join(path), &dest, &mut || {
            fault::op_point("restore identity")
        })?;
    }
    fsutil::sync_filesystem(slot_root)?;
    tracing::info!(slot_root = %slot_root.display(), files = saved.present.len(), "identity restored");
    Ok(saved)
}

fn write_pointer(swap_dir: &Path, saved: &SavedIdentity) -> Result<(), IdentityError> {
    // Serializing plain strings and integers cannot fail.
    let bytes = serde_json::to_vec_pretty(saved).unwrap_or_default();
    fsutil::write_atomic(&swap_dir.join(POINTER_FILE), &bytes, 0o600)?;
    Ok(())
}

/// `root/path`, refusing paths that climb out or pass through a symlinked directory.
fn inside(root: &Path, path: &str) -> Result<PathBuf, IdentityError> {
    if !is_safe_relative(path) {
        return Err(IdentityError::BadPath(path.to_owned()));
    }
    let full = root.join(path);
    let mut walked = root.to_path_buf();
    let components: Vec<_> = Path::new(path).components().collect();
    // Every ancestor must be a real directory (or absent); the last component may be a symlink,
    // which is copied as a symlink.
    for component in &components[..components.len().saturating_sub(1)] {
        walked.push(component);
        match fs::symlink_metadata(&walked) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(IdentityError::ThroughSymlink {
                    path: path.to_owned(),
                    link: walked,
                })
            }
            _ => {}
        }
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preserve_then_restore_is_byte_identical_and_skips_absent_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = dir.path().join("old");
        let new = dir.path().join("new");
        let storage = dir.path().join("storage");
        fs::create_dir_all(old.join("etc/ssh")).expect("mkdir");
        fs::create_dir_all(new.join("etc/ssh")).expect("mkdir");
        fs::write(old.join("etc/ssh/host_key"), b"old key").expect("write");
        fs::write(new.join("etc/ssh/host_key"), b"image default key").expect("write");
        fs::write(old.join("etc/hostname"), b"edge-17\n").expect("write");
        let paths = vec![
            "etc/ssh".to_string(),
            "etc/hostname".to_string(),
            "etc/missing".to_string(),
        ];
        let saved = preserve(&old, &paths, &storage).expect("preserve");
        assert_eq!(saved.absent, vec!["etc/missing".to_string()]);
        // Preserving twice moves to a new generation and drops the old one.
        let saved = preserve(&old, &paths, &storage).expect("preserve again");
        assert_eq!(saved.generation, 2);
        restore(&storage, &new).expect("restore");
        restore(&storage, &new).expect("restore is idempotent");
        assert_eq!(
            fs::read(new.join("etc/ssh/host_key")).expect("read"),
            b"old key"
        );
        assert_eq!(
            fs::read(new.join("etc/hostname")).expect("read"),
            b"edge-17\n"
        );
        assert!(!new.join("etc/missing").exists());
    }

    #[test]
    fn refuses_to_write_through_a_symlinked_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = dir.path().join("old");
        let new = dir.path().join("new");
        let outside = dir.path().join("outside");
        let storage = dir.path().join("storage");
        fs::create_dir_all(old.join("etc")).expect("mkdir");
        fs::create_dir_all(&new).expect("mkdir");
        fs::create_dir_all(&outside).expect("mkdir");
        fs::write(old.join("etc/hostname"), b"edge").expect("write");
        std::os::unix::fs::symlink(&outside, new.join("etc")).expect("symlink");
        preserve(&old, &["etc/hostname".into()], &storage).expect("preserve");
        let err = restore(&storage, &new).expect_err("must refuse");
        assert!(matches!(err, IdentityError::ThroughSymlink { .. }), "{err}");
        assert!(!outside.join("hostname").exists());
    }
}
