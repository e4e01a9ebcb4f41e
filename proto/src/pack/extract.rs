//! Restoring a tree from its tar stream without ever writing outside the destination.
//!
//! The tar crate is used in raw mode, so every extension entry passes through here: GNU long
//! names are read with a size bound, and everything this packer does not write (pax headers,
//! hard links, sparse files) is refused.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use super::{new_file_options, private_dir_builder, UnpackError, UnpackStats};

/// Longest path or symlink target accepted from a GNU long-name entry, in bytes (Linux's
/// `PATH_MAX`). Bounds the memory a crafted entry can make us allocate.
const MAX_LONG_NAME_BYTES: u64 = 4096;

/// Buffer for copying file content from the payload to disk, in bytes.
const COPY_BUFFER_BYTES: usize = 256 * 1024;

/// Mode for parent directories a stream names without listing them (never the case for streams
/// this packer writes).
const IMPLICIT_DIR_MODE: u32 = 0o755;

/// Unpacks the tar stream `payload` into `dest`, which exists.
pub(super) fn extract_tree<R: Read>(payload: R, dest: &Path) -> Result<UnpackStats, UnpackError> {
    let mut archive = tar::Archive::new(payload);
    let entries = archive.entries().map_err(malformed)?.raw(true);
    let mut extractor = Extractor::new(dest);
    let mut long_path: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    for entry in entries {
        let mut entry = entry.map_err(malformed)?;
        let entry_type = entry.header().entry_type();
        match entry_type {
            EntryType::GNULongName => {
                long_path = Some(read_long_name(&mut entry, long_path.is_some())?);
                continue;
            }
            EntryType::GNULongLink => {
                long_link = Some(read_long_name(&mut entry, long_link.is_some())?);
                continue;
            }
            _ => {}
        }
        let path = match long_path.take() {
            Some(path) => path,
            None => entry.header().path_bytes().into_owned(),
        };
        let link = match long_link.take() {
            Some(link) => Some(link),
            None => entry.header().link_name_bytes().map(|l| l.into_owned()),
        };
        extractor.entry(&mut entry, entry_type, &path, link.as_deref())?;
    }
    if long_path.is_some() || long_link.is_some() {
        return Err(UnpackError::Malformed(
            "the stream ends with a long-name entry that describes no entry".into(),
        ));
    }
    extractor.finish()
}

/// Creates a new regular file at `path` with `mode`, first removing a non-directory that is in
/// the way. Never follows a symlink; the parent must already be checked.
pub(super) fn create_file_replacing(path: &Path, mode: u32) -> Result<File, UnpackError> {
    clear_slot(path, false)?;
    new_file_options(mode)
        .open(path)
        .map_err(|source| UnpackError::Io {
            action: "create file",
            path: path.to_path_buf(),
            source,
        })
}

struct Extractor<'d> {
    dest: &'d Path,
    /// Directories under `dest` known to be real directories whose ancestors are too.
    verified_dirs: HashSet<PathBuf>,
    /// Directories whose mode and mtime are set after their contents, in creation order.
    deferred_dirs: Vec<DeferredDir>,
    stats: UnpackStats,
    can_make_devices: bool,
    buffer: Vec<u8>,
}

struct DeferredDir {
    path: PathBuf,
    mode: u32,
    mtime_secs: u64,
}

impl<'d> Extractor<'d> {
    fn new(dest: &'d Path) -> Self {
        Extractor {
            dest,
            verified_dirs: HashSet::new(),
            deferred_dirs: Vec::new(),
            stats: UnpackStats::default(),
            // SAFETY: geteuid has no preconditions and cannot fail.
            can_make_devices: unsafe { libc::geteuid() } == 0,
            buffer: vec![0u8; COPY_BUFFER_BYTES],
        }
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        entry_type: EntryType,
        path: &[u8],
        link: Option<&[u8]>,
    ) -> Result<(), UnpackError> {
        let shown = || String::from_utf8_lossy(path).into_owned();
        let header = entry.header();
        let mode = header.mode().map_err(malformed)? & 0o7777;
        let mtime_secs = header.mtime().map_err(malformed)?;
        let Some(rel) = safe_relative(path)? else {
            if entry_type != EntryType::Directory {
                return Err(UnpackError::UnsafePath {
                    path: shown(),
                    reason: "only a directory may stand for the destination itself",
                });
            }
            self.deferred_dirs.push(DeferredDir {
                path: self.dest.to_path_buf(),
                mode,
                mtime_secs,
            });
            self.stats.dirs += 1;
            return Ok(());
        };
        self.check_parents(&rel, &shown)?;
        let target = self.dest.join(&rel);
        match entry_type {
            EntryType::Directory => {
                if !clear_slot(&target, true)? {
                    private_dir_builder()
                        .create(&target)
                        .map_err(|source| io_error("create directory", &target, source))?;
                }
                self.verified_dirs.insert(target.clone());
                self.deferred_dirs.push(DeferredDir {
                    path: target,
                    mode,
                    mtime_secs,
                });
                self.stats.dirs += 1;
            }
            EntryType::Regular | EntryType::Continuous => {
                let expected = entry.header().entry_size().map_err(malformed)?;
                let mut file = create_file_replacing(&target, 0o600)?;
                let written =
                    copy_entry(entry, &mut file, &mut self.buffer).map_err(|e| e.at(&target))?;
                if written != expected {
                    return Err(UnpackError::Malformed(format!(
                        "entry {:?} ends after {written} of its {expected} bytes",
                        shown()
                    )));
                }
                file.set_permissions(Permissions::from_mode(mode))
                    .map_err(|source| io_error("set mode of", &target, source))?;
                set_file_mtime(&file, mtime_secs)
                    .map_err(|source| io_error("set mtime of", &target, source))?;
                self.stats.files += 1;
            }
            EntryType::Symlink => {
                let Some(link) = link else {
                    return Err(UnpackError::Malformed(format!(
                        "symlink {:?} has no target",
                        shown()
                    )));
                };
                clear_slot(&target, false)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(link), &target)
                    .map_err(|source| io_error("create symlink", &target, source))?;
                set_path_mtime(&target, mtime_secs)
                    .map_err(|source| io_error("set mtime of", &target, source))?;
                self.stats.symlinks += 1;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                self.special(entry.header(), entry_type, &target, mode, mtime_secs)?;
            }
            other => {
                return Err(UnpackError::UnsupportedEntry {
                    path: shown(),
                    entry_type: char::from(other.as_byte()),
                })
            }
        }
        Ok(())
    }

    /// Creates a device node (as root only) or a fifo.
    fn special(
        &mut self,
        header: &tar::Header,
        entry_type: EntryType,
        target: &Path,
        mode: u32,
        mtime_secs: u64,
    ) -> Result<(), UnpackError> {
        let is_device = entry_type != EntryType::Fifo;
        if is_device && !self.can_make_devices {
            tracing::warn!(path = %target.display(), "skipping device node: only root can create it");
            self.stats.specials_skipped += 1;
            return Ok(());
        }
        clear_slot(target, false)?;
        let c_path = c_path(target)?;
        let result = if is_device {
            let major = header.device_major().map_err(malformed)?.unwrap_or(0);
            let minor = header.device_minor().map_err(malformed)?.unwrap_or(0);
            let kind = if entry_type == EntryType::Char {
                libc::S_IFCHR
            } else {
                libc::S_IFBLK
            };
            // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
            unsafe { libc::mknod(c_path.as_ptr(), kind | mode, libc::makedev(major, minor)) }
        } else {
            // SAFETY: as above.
            unsafe { libc::mkfifo(c_path.as_ptr(), mode) }
        };
        if result != 0 {
            return Err(io_error(
                "create special file",
                target,
                io::Error::last_os_error(),
            ));
        }
        // mknod and mkfifo apply the umask; the recorded mode is restored exactly.
        // SAFETY: as above.
        if unsafe { libc::fchmodat(libc::AT_FDCWD, c_path.as_ptr(), mode, 0) } != 0 {
            return Err(io_error("set mode of", target, io::Error::last_os_error()));
        }
        set_path_mtime(target, mtime_secs)
            .map_err(|source| io_error("set mtime of", target, source))?;
        self.stats.specials += 1;
        Ok(())
    }

    /// Makes sure every ancestor of `rel` under `dest` is a real directory (creating missing
    /// ones), so nothing is ever created through a symlink.
    fn check_parents(&mut self, rel: &Path, shown: &dyn Fn() -> String) -> Result<(), UnpackError> {
        let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) else {
            return Ok(());
        };
        if self.verified_dirs.contains(&self.dest.join(parent)) {
            return Ok(());
        }
        let mut current = self.dest.to_path_buf();
        for component in parent.components() {
            current.push(component);
            if self.verified_dirs.contains(&current) {
                continue;
            }
            match fs::symlink_metadata(&current) {
                Ok(metadata) if metadata.is_dir() => {}
                Ok(_) => {
                    return Err(UnpackError::UnsafePath {
                        path: shown(),
                        reason: "a parent directory is a symlink or not a directory",
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let mut builder = fs::DirBuilder::new();
                    std::os::unix::fs::DirBuilderExt::mode(&mut builder, IMPLICIT_DIR_MODE);
                    builder
                        .create(&current)
                        .map_err(|source| io_error("create directory", &current, source))?;
                }
                Err(source) => return Err(io_error("inspect", &current, source)),
            }
            self.verified_dirs.insert(current.clone());
        }
        Ok(())
    }

    /// Gives directories their recorded mode and mtime, deepest first, after all contents are
    /// in place (writing into a directory changes its mtime; a read-only mode would block it).
    fn finish(self) -> Result<UnpackStats, UnpackError> {
        for dir in self.deferred_dirs.iter().rev() {
            fs::set_permissions(&dir.path, Permissions::from_mode(dir.mode))
                .map_err(|source| io_error("set mode of", &dir.path, source))?;
            set_path_mtime(&dir.path, dir.mtime_secs)
                .map_err(|source| io_error("set mtime of", &dir.path, source))?;
        }
        Ok(self.stats)
    }
}

/// Turns an archive path into a path relative to the destination: `None` for the destination
/// itself, an error for absolute paths and `..`. Empty and `.` components are dropped.
fn safe_relative(path: &[u8]) -> Result<Option<PathBuf>, UnpackError> {
    let refuse = |reason| UnpackError::UnsafePath {
        path: String::from_utf8_lossy(path).into_owned(),
        reason,
    };
    if path.is_empty() {
        return Err(refuse("the path is empty"));
    }
    if path.starts_with(b"/") {
        return Err(refuse("absolute paths are not allowed"));
    }
    let mut rel = PathBuf::new();
    for component in path.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(refuse("`..` components are not allowed")),
            name => rel.push(OsStr::from_bytes(name)),
        }
    }
    debug_assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
    Ok(if rel.as_os_str().is_empty() {
        None
    } else {
        Some(rel)
    })
}

/// Reads a GNU long name or link target, refusing more than [`MAX_LONG_NAME_BYTES`].
fn read_long_name<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    duplicate: bool,
) -> Result<Vec<u8>, UnpackError> {
    if duplicate {
        return Err(UnpackError::Malformed(
            "two long-name entries describe the same entry".into(),
        ));
    }
    let size = entry.header().entry_size().map_err(malformed)?;
    if size > MAX_LONG_NAME_BYTES + 1 {
        return Err(UnpackError::Malformed(format!(
            "a long name of {size} bytes exceeds the limit of {MAX_LONG_NAME_BYTES}"
        )));
    }
    let mut value = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut value).map_err(malformed)?;
    while value.last() == Some(&0) {
        value.pop();
    }
    Ok(value)
}

/// Where copying an entry to a file failed.
enum CopyFailure {
    Read(io::Error),
    Write(io::Error),
}

impl CopyFailure {
    fn at(self, path: &Path) -> UnpackError {
        match self {
            CopyFailure::Read(e) => malformed(e),
            CopyFailure::Write(source) => io_error("write", path, source),
        }
    }
}

fn copy_entry<R: Read>(
    entry: &mut R,
    file: &mut File,
    buffer: &mut [u8],
) -> Result<u64, CopyFailure> {
    let mut written = 0u64;
    loop {
        let n = match entry.read(buffer) {
            Ok(0) => return Ok(written),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyFailure::Read(e)),
        };
        file.write_all(&buffer[..n]).map_err(CopyFailure::Write)?;
        written += n as u64;
    }
}

/// Removes a non-directory at `path` so a new entry can take its place. Returns whether a
/// directory is there (allowed only when `want_dir`; a directory is never removed).
fn clear_slot(path: &Path, want_dir: bool) -> Result<bool, UnpackError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(io_error("inspect", path, source)),
        Ok(metadata) if metadata.is_dir() => {
            if want_dir {
                Ok(true)
            } else {
                Err(UnpackError::Conflict {
                    path: path.to_path_buf(),
                    detail: "a directory is in the way of a file, symlink or special file".into(),
                })
            }
        }
        // unlink removes a symlink itself, never its target.
        Ok(_) => fs::remove_file(path)
            .map(|()| false)
            .map_err(|source| io_error("replace", path, source)),
    }
}

fn timespecs(mtime_secs: u64) -> [libc::timespec; 2] {
    let time = libc::timespec {
        tv_sec: libc::time_t::try_from(mtime_secs).unwrap_or(libc::time_t::MAX),
        tv_nsec: 0,
    };
    // Access time is set to the mtime, as tar does, so the tree does not depend on when it
    // was unpacked.
    [time, time]
}

fn set_file_mtime(file: &File, mtime_secs: u64) -> io::Result<()> {
    let times = timespecs(mtime_secs);
    // SAFETY: the fd is open for the duration of the call; times points to two timespecs.
    if unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the mtime of `path` itself, not of what a symlink points to.
fn set_path_mtime(path: &Path, mtime_secs: u64) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let times = timespecs(mtime_secs);
    // SAFETY: c_path is NUL-terminated and times points to two timespecs, both live for the
    // call.
    let result = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn c_path(path: &Path) -> Result<CString, UnpackError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| UnpackError::UnsafePath {
        path: path.display().to_string(),
        reason: "the path contains a NUL byte",
    })
}

fn malformed(error: io::Error) -> UnpackError {
    UnpackError::Malformed(error.to_string())
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> UnpackError {
    UnpackError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}
