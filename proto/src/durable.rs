//! The one way a small file is replaced on disk: [`write_atomic`] (and [`write_json_atomic`]).
//!
//! A crash or power cut at any moment leaves either the old content or the new one at the path,
//! never a torn mix and never an empty file, and once the call returns the new content survives
//! a power cut: the bytes go to a new temporary file in the same directory (so the rename
//! cannot cross a filesystem), the file is fsynced, renamed over the path, and the directory is
//! fsynced so the rename itself is durable. The file gets exactly `mode`, whatever the umask.
//!
//! Bulk data (blobs, unpacked trees) has its own paths (`store`, `pack`); this is for records:
//! identities, keys, journals, state and address files.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Mode of a file only its owner may read: keys, secrets, journals.
pub const MODE_PRIVATE: u32 = 0o600;

/// Mode of a file anyone on the machine may read: addresses, state, certificates.
pub const MODE_READABLE: u32 = 0o644;

/// A durable write that failed; the old content (if any) is still in place.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    /// A filesystem operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The value could not be encoded as JSON.
    #[error("cannot encode the content of {path} as JSON: {source}")]
    Json {
        /// The file that was to be written.
        path: PathBuf,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
}

impl DurableError {
    fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| DurableError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Replaces `path` with `bytes` atomically and durably, with permissions `mode` (see the
/// [module documentation](self)). The directory must exist. On error nothing is left behind but
/// the old file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DurableError> {
    let dir = parent_dir(path);
    let temp = temp_path(path, &dir);
    let written = write_temp(&temp, bytes, mode).and_then(|()| {
        fs::rename(&temp, path).map_err(DurableError::io("rename into place", path))
    });
    if let Err(error) = written {
        // Best effort: the error that matters is the one above.
        let _ = fs::remove_file(&temp);
        return Err(error);
    }
    sync_dir(&dir)
}

/// [`write_atomic`] of `value` as pretty-printed JSON.
pub fn write_json_atomic<T: Serialize + ?Sized>(
    path: &Path,
    value: &T,
    mode: u32,
) -> Result<(), DurableError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| DurableError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, &bytes, mode)
}

/// fsyncs directory `dir`, making the creations, renames and removals in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    #[cfg(test)]
    tests::DIR_SYNCS.with(|count| count.set(count.get() + 1));
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(DurableError::io("fsync directory", dir))
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A temporary name beside `path`, unique within the machine's processes and this process's
/// threads, hidden (leading dot) and ending in `.tmp`.
fn temp_path(path: &Path, dir: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unique = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.{}.{unique}.tmp", std::process::id()))
}

fn write_temp(temp: &Path, bytes: &[u8], mode: u32) -> Result<(), DurableError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(temp)
        .map_err(DurableError::io("create", temp))?;
    // The mode given at creation is reduced by the umask; the caller asked for exactly `mode`.
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(DurableError::io("set the mode of", temp))?;
    file.write_all(bytes)
        .map_err(DurableError::io("write", temp))?;
    file.sync_all().map_err(DurableError::io("fsync", temp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// Directory syncs made by this thread (each test runs on its own thread).
        pub(super) static DIR_SYNCS: Cell<u64> = const { Cell::new(0) };
    }

    fn dir_syncs() -> u64 {
        DIR_SYNCS.with(Cell::get)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_then_replaces_leaving_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one", MODE_READABLE).expect("first write");
        assert_eq!(fs::read(&path).expect("read"), b"one");
        write_atomic(&path, b"two, longer", MODE_READABLE).expect("replace");
        assert_eq!(fs::read(&path).expect("read"), b"two, longer");
        write_atomic(&path, b"3", MODE_READABLE).expect("replace with shorter");
        assert_eq!(fs::read(&path).expect("read"), b"3");
        assert_eq!(names(dir.path()), ["state.json"]);
    }

    #[test]
    fn a_reader_sees_the_old_or_the_new_content_never_a_mix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("record");
        let old = vec![b'o'; 256 * 1024];
        let new = vec![b'n'; 256 * 1024];
        write_atomic(&path, &old, MODE_READABLE).expect("write");
        // A reader holding the old file keeps reading the old inode after the replace.
        let held = File::open(&path).expect("open");
        write_atomic(&path, &new, MODE_READABLE).expect("replace");
        let mut seen = Vec::new();
        std::io::Read::read_to_end(&mut &held, &mut seen).expect("read held");
        assert_eq!(seen, old);
        assert_eq!(fs::read(&path).expect("read"), new);
    }

    #[test]
    fn the_mode_is_applied_exactly_whatever_the_umask() {
        let dir = tempfile::tempdir().expect("tempdir");
        for mode in [MODE_PRIVATE, MODE_READABLE, 0o640, 0o666] {
            let path = dir.path().join(format!("file-{mode:o}"));
            write_atomic(&path, b"x", mode).expect("write");
            let actual = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
            assert_eq!(actual, mode, "{mode:o}");
        }
        // Replacing a file gives the new file the new mode.
        let path = dir.path().join("file-600");
        write_atomic(&path, b"y", MODE_READABLE).expect("rewrite");
        let actual = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(actual, MODE_READABLE);
    }

    #[test]
    fn the_directory_is_synced_after_the_rename() {
        let dir = tempfile::tempdir().expect("tempdir");
        let before = dir_syncs();
        write_atomic(&dir.path().join("a"), b"a", MODE_READABLE).expect("write");
        assert_eq!(dir_syncs(), before + 1);
        write_json_atomic(&dir.path().join("b.json"), &[1, 2, 3], MODE_PRIVATE).expect("json");
        assert_eq!(dir_syncs(), before + 2);
    }

    #[test]
    fn json_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("value.json");
        let value = serde_json::json!({"mesh": "127.0.0.1:7000", "seq": 12});
        write_json_atomic(&path, &value, MODE_READABLE).expect("write");
        let read: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).expect("read")).expect("json");
        assert_eq!(read, value);
    }

    #[test]
    fn a_failed_rename_keeps_the_target_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A non-empty directory cannot be replaced by a file.
        let path = dir.path().join("occupied");
        fs::create_dir(&path).expect("mkdir");
        fs::write(path.join("inside"), b"kept").expect("write");
        let error = write_atomic(&path, b"new", MODE_READABLE).expect_err("cannot replace a dir");
        assert!(error.to_string().contains("rename into place"), "{error}");
        assert_eq!(names(dir.path()), ["occupied"]);
        assert_eq!(fs::read(path.join("inside")).expect("read"), b"kept");
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent").join("file");
        let error = write_atomic(&path, b"x", MODE_READABLE).expect_err("no directory");
        assert!(error.to_string().contains("absent"), "{error}");
    }

    #[test]
    fn a_bare_file_name_is_written_in_the_current_directory() {
        assert_eq!(parent_dir(Path::new("name")), PathBuf::from("."));
        assert_eq!(parent_dir(Path::new("/a/b")), PathBuf::from("/a"));
    }
}
