//! Blob files on disk: where they live, how they are made durable, how they are read for encoding.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::StoreError;
use crate::hash::BlobHash;
use crate::verify::{DataSource, OutboardSource, PARENT_BYTES};

/// File name suffix of a blob's bytes.
pub const DATA_SUFFIX: &str = "data";
/// File name suffix of a blob's post-order outboard.
pub const OUTBOARD_SUFFIX: &str = "obao";
/// Marker in the name of a file being written before it is renamed into place.
pub const TEMP_MARKER: &str = ".tmp.";

/// Makes temporary file names unique within the process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Paths of one blob's files under `<root>/blobs/<first 2 hex>/`.
#[derive(Clone, Debug)]
pub struct BlobPaths {
    /// The `<first 2 hex>` directory.
    pub dir: PathBuf,
    /// `<hash>.data`.
    pub data: PathBuf,
    /// `<hash>.obao`.
    pub outboard: PathBuf,
}

impl BlobPaths {
    /// The paths of `hash` under the `blobs` directory.
    pub fn new(blobs_dir: &Path, hash: &BlobHash) -> Self {
        let hex = hash.to_string();
        let dir = blobs_dir.join(&hex[..2]);
        Self {
            data: dir.join(format!("{hex}.{DATA_SUFFIX}")),
            outboard: dir.join(format!("{hex}.{OUTBOARD_SUFFIX}")),
            dir,
        }
    }

    /// A fresh temporary path beside `target`.
    pub fn temp_for(target: &Path) -> PathBuf {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut name = target.as_os_str().to_owned();
        name.push(format!("{TEMP_MARKER}{}.{n}", std::process::id()));
        PathBuf::from(name)
    }

    /// Creates the blob's directory if needed, fsyncing its parent so the new entry survives a
    /// crash.
    pub fn ensure_dir(&self) -> Result<(), StoreError> {
        if self.dir.is_dir() {
            return Ok(());
        }
        fs::create_dir_all(&self.dir).map_err(io_error("creating directory", &self.dir))?;
        if let Some(parent) = self.dir.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

/// Wraps an I/O error with what was being done and to which path. A full disk gets its own
/// variant so the message can say what to do.
pub fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| {
        let disk_full = source.kind() == io::ErrorKind::StorageFull
            || source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT);
        if disk_full {
            StoreError::DiskFull {
                op,
                path: path.to_path_buf(),
                source,
            }
        } else {
            StoreError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Fsyncs a directory so that entries created, renamed or removed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(io_error("syncing directory", dir))
}

/// Writes `bytes` to a new file at `path`, fsyncs it, and returns. The caller renames it.
pub fn write_new_file(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_error("creating", path))?;
    io::Write::write_all(&mut file, bytes).map_err(io_error("writing", path))?;
    file.sync_all().map_err(io_error("syncing", path))
}

/// Opens (creating if missing) a file for positioned reads and writes. Returns the file and
/// whether it was created.
pub fn open_read_write(path: &Path) -> Result<(File, bool), StoreError> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => Ok((file, false)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(io_error("creating", path))?;
            Ok((file, true))
        }
        Err(error) => Err(io_error("opening", path)(error)),
    }
}

/// Reserves `len` bytes of disk for `file`, so a full disk shows up now with a clear error
/// instead of halfway through a download. File systems without the call are left sparse.
pub fn reserve(file: &File, path: &Path, len: u64) -> Result<(), StoreError> {
    let Ok(len) = libc::off_t::try_from(len) else {
        return Ok(());
    };
    if len == 0 {
        return Ok(());
    }
    // SAFETY: the descriptor is owned by `file`, which outlives the call.
    let code = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    match code {
        0 | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS => Ok(()),
        errno => Err(io_error("reserving space for", path)(
            io::Error::from_raw_os_error(errno),
        )),
    }
}

/// Removes a file; a missing file is fine.
pub fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(io_error("removing", path)(error)),
    }
}

/// Bytes a [`FileData`] reads at once: 8 groups, so a part of 32 takes 4 system calls instead of
/// 32, while a node answering many requests at once holds little beside the parts themselves.
const DATA_READ_AHEAD_BYTES: usize = 128 * 1024;

/// Bytes a [`FileOutboard`] reads at once: the parents of a part lie together in the
/// post-order outboard (a 32-group subtree's 31 parents are 1,984 bytes), so one read serves
/// most of them instead of one 64-byte read each.
const OUTBOARD_READ_AHEAD_BYTES: usize = 16 * 1024;

/// Read-ahead buffers kept between answers for the whole process (not per thread: answers run
/// on whichever blocking thread is free, and a node may have a hundred), so every part does not
/// map and fault in fresh memory. At most this many, each at most [`DATA_READ_AHEAD_BYTES`].
const KEPT_READ_AHEAD_BUFFERS: usize = 8;

static READ_AHEAD_BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// A window of a file read ahead: `bytes[..valid]` holds the file from `start`.
struct ReadAhead {
    start: u64,
    valid: usize,
    /// Bytes read at once (at least what one read asks for).
    ahead: usize,
    bytes: Vec<u8>,
}

impl ReadAhead {
    fn new(ahead: usize) -> Self {
        let mut bytes = READ_AHEAD_BUFFERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default();
        // Zeroed once per buffer, not per read: `valid` says what holds file bytes.
        if bytes.len() < ahead {
            bytes.resize(ahead, 0);
        }
        Self {
            start: 0,
            valid: 0,
            ahead,
            bytes,
        }
    }

    /// Copies `out.len()` bytes of `file` at `offset` into `out`, reading `self.ahead` bytes
    /// ahead whenever the window does not hold them. Fails with `UnexpectedEof` past the
    /// end of the file.
    fn read(&mut self, file: &File, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let len = out.len();
        let held = offset >= self.start && offset + len as u64 <= self.start + self.valid as u64;
        if !held {
            let want = self.ahead.max(len);
            if self.bytes.len() < want {
                self.bytes.resize(want, 0);
            }
            self.start = offset;
            self.valid = 0;
            while self.valid < want {
                match file.read_at(
                    &mut self.bytes[self.valid..want],
                    offset + self.valid as u64,
                ) {
                    Ok(0) => break,
                    Ok(read) => self.valid += read,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(error) => {
                        self.valid = 0;
                        return Err(error);
                    }
                }
            }
            if self.valid < len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{len} bytes at {offset} lie beyond the end of the file"),
                ));
            }
        }
        let from = (offset - self.start) as usize;
        out.copy_from_slice(&self.bytes[from..from + len]);
        Ok(())
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Only buffers of the usual size are kept (a read larger than the window grew this one).
        if self.bytes.len() > DATA_READ_AHEAD_BYTES {
            return;
        }
        let mut kept = READ_AHEAD_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < KEPT_READ_AHEAD_BUFFERS {
            kept.push(std::mem::take(&mut self.bytes));
        }
    }
}

/// A blob's data file as a [`DataSource`], read ahead a part at a time. Every byte it returns
/// is read after the caller chose the groups to send, so a group written (and claimed) before
/// then is read whole; bytes read ahead beyond those groups are never returned.
pub struct FileData<'a> {
    file: &'a File,
    window: std::cell::RefCell<ReadAhead>,
}

impl<'a> FileData<'a> {
    /// Reads `file`.
    pub fn new(file: &'a File) -> Self {
        Self {
            file,
            window: std::cell::RefCell::new(ReadAhead::new(DATA_READ_AHEAD_BYTES)),
        }
    }
}

impl DataSource for FileData<'_> {
    fn read_at<'b>(
        &'b self,
        offset: u64,
        len: usize,
        scratch: &'b mut [u8],
    ) -> io::Result<&'b [u8]> {
        let buffer = scratch.get_mut(..len).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "read larger than the scratch buffer",
            )
        })?;
        self.window.borrow_mut().read(self.file, offset, buffer)?;
        Ok(buffer)
    }
}

/// A blob's outboard file as an [`OutboardSource`], read ahead
/// [`OUTBOARD_READ_AHEAD_BYTES`] at a time.
pub struct FileOutboard<'a> {
    file: &'a File,
    window: std::cell::RefCell<ReadAhead>,
}

impl<'a> FileOutboard<'a> {
    /// Reads `file`.
    pub fn new(file: &'a File) -> Self {
        Self {
            file,
            window: std::cell::RefCell::new(ReadAhead::new(OUTBOARD_READ_AHEAD_BYTES)),
        }
    }
}

impl OutboardSource for FileOutboard<'_> {
    fn read_pair(&self, offset: u64) -> io::Result<[u8; PARENT_BYTES]> {
        let mut pair = [0u8; PARENT_BYTES];
        self.window
            .borrow_mut()
            .read(self.file, offset, &mut pair)?;
        Ok(pair)
    }
}

/// Parses a file name in a blob directory: `Some((hash, is_temporary))` for files the store
/// made, `None` for anything else.
pub fn parse_blob_file_name(name: &str) -> Option<(BlobHash, bool)> {
    let (stem, temporary) = match name.find(TEMP_MARKER) {
        Some(at) => (&name[..at], true),
        None => (name, false),
    };
    let (hex, suffix) = stem.split_once('.')?;
    if suffix != DATA_SUFFIX && suffix != OUTBOARD_SUFFIX {
        return None;
    }
    let hash = hex.parse().ok()?;
    Some((hash, temporary))
}
