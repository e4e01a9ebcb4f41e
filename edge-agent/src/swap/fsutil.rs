//! Crash-safe file operations: atomic replace, directory sync, whole-filesystem sync, tree copy.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// An I/O error with the action and path that produced it.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}: {source}")]
pub struct FsError {
    /// What was being done.
    pub action: &'static str,
    /// The path involved.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// Attaches an action and a path to an I/O result.
pub(crate) trait IoContext<T> {
    fn at(self, action: &'static str, path: &Path) -> Result<T, FsError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, action: &'static str, path: &Path) -> Result<T, FsError> {
        self.map_err(|source| FsError {
            action,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Replaces `path` with `bytes` atomically and durably, with permissions `mode`: see
/// [`proto::durable::write_atomic`].
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FsError> {
    proto::durable::write_atomic(path, bytes, mode).map_err(FsError::from)
}

/// fsyncs a directory, making the creations, renames and removals in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    proto::durable::sync_dir(dir).map_err(FsError::from)
}

impl From<proto::durable::DurableError> for FsError {
    fn from(error: proto::durable::DurableError) -> Self {
        match error {
            proto::durable::DurableError::Io {
                action,
                path,
                source,
            } => FsError {
                action,
                path,
                source,
            },
            proto::durable::DurableError::Json { path, source } => FsError {
                action: "encode as JSON",
                path,
                source: io::Error::other(source),
            },
        }
    }
}

/// Flushes every file of the filesystem holding `path` to disk (`syncfs(2)`): one call after
/// unpacking a tree instead of one fsync per file.
pub fn sync_filesystem(path: &Path) -> Result<(), FsError> {
    let dir = File::open(path).at("open for syncfs", path)?;
    // SAFETY: syncfs only reads the descriptor, which stays open for the duration of the call.
    let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
    if rc != 0 {
        return Err(FsError {
            action: "syncfs",
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Removes everything inside `dir`, keeping `dir` itself (it may be a mount point). Symlinks are
/// removed, never followed. Calls `each` after every removed entry (the fault-injection hook).
pub fn empty_dir(dir: &Path, each: &mut dyn FnMut()) -> Result<(), FsError> {
    for entry in fs::read_dir(dir).at("list", dir)? {
        let entry = entry.at("list", dir)?;
        let path = entry.path();
        let file_type = entry.file_type().at("inspect", &path)?;
        if file_type.is_dir() {
            fs::remove_dir_all(&path).at("remove directory", &path)?;
        } else {
            fs::remove_file(&path).at("remove", &path)?;
        }
        each();
    }
    Ok(())
}

/// Removes `path` whatever it is (file, symlink or directory tree); absent is fine.
pub fn remove_any(path: &Path) -> Result<(), FsError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError {
            action: "inspect",
            path: path.to_path_buf(),
            source: e,
        }),
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path).at("remove directory", path),
        Ok(_) => fs::remove_file(path).at("remove", path),
    }
}

/// Copies `from` (file, symlink or directory tree) to `to`, which must not exist, keeping
/// permission bits, symlink targets and, when running as root, owners. Calls `each` after every
/// copied entry.
pub fn copy_tree(from: &Path, to: &Path, each: &mut dyn FnMut()) -> Result<(), FsError> {
    let meta = fs::symlink_metadata(from).at("inspect", from)?;
    let file_type = meta.file_type();
    if file_type.is_symlink() {
        let target = fs::read_link(from).at("read symlink", from)?;
        std::os::unix::fs::symlink(&target, to).at("create symlink", to)?;
    } else if file_type.is_dir() {
        fs::create_dir(to).at("create directory", to)?;
        let mut names: Vec<_> = fs::read_dir(from)
            .at("list", from)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .at("list", from)?;
        names.sort();
        for name in names {
            copy_tree(&from.join(&name), &to.join(&name), each)?;
        }
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .at("set permissions of", to)?;
    } else if file_type.is_file() {
        fs::copy(from, to).at("copy to", to)?;
    } else {
        // Devices, fifos and sockets are no part of an identity.
        tracing::warn!(path = %from.display(), "skipping special file in identity");
        return Ok(());
    }
    copy_owner(&meta, to)?;
    each();
    Ok(())
}

/// Keeps the owner when we may (root); otherwise files end up ours, which is all we can do.
fn copy_owner(meta: &fs::Metadata, to: &Path) -> Result<(), FsError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid())).at("set owner of", to)
}

/// Creates `dir` and its parents.
pub fn create_dirs(dir: &Path) -> Result<(), FsError> {
    fs::create_dir_all(dir).at("create directory", dir)
}

/// Reads a whole file; `None` when it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, FsError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FsError {
            action: "read",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Removes a file and makes the removal durable; absent is fine.
pub fn remove_file_durably(path: &Path) -> Result<(), FsError> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(&parent_of(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError {
            action: "remove",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grubenv");
        write_atomic(&path, b"one", 0o644).expect("write");
        write_atomic(&path, b"two", 0o644).expect("rewrite");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("grubenv")]);
    }

    #[test]
    fn copy_tree_keeps_bytes_modes_and_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("ssh")).expect("mkdir");
        fs::write(src.join("ssh/key"), b"secret").expect("write");
        fs::set_permissions(src.join("ssh/key"), fs::Permissions::from_mode(0o600)).expect("chmod");
        std::os::unix::fs::symlink("key", src.join("ssh/link")).expect("symlink");
        let dst = dir.path().join("dst");
        let mut count = 0;
        copy_tree(&src, &dst, &mut || count += 1).expect("copy");
        assert_eq!(count, 4);
        assert_eq!(fs::read(dst.join("ssh/key")).expect("read"), b"secret");
        let mode = fs::metadata(dst.join("ssh/key")).expect("meta").mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::read_link(dst.join("ssh/link")).expect("link"),
            Path::new("key")
        );
        empty_dir(&dst, &mut || {}).expect("empty");
        assert_eq!(fs::read_dir(&dst).expect("list").count(), 0);
    }
}
