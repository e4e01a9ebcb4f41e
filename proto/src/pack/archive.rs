//! Writing a tree as a deterministic tar stream, and an image as its raw bytes, into the
//! [`ChunkPipeline`]. The format is described in the parent module.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use super::pax::{self, Timestamp, Xattr};
use super::payload::ChunkPipeline;
use super::{ChunkSink, PackError, PackStats, READ_BUFFER_BYTES};

/// Size of a tar block, in bytes; headers are one block and data is padded to whole blocks.
pub(super) const BLOCK_BYTES: usize = 512;

/// Size of the `name` and `linkname` header fields, in bytes. Longer values (and values that
/// fill the field exactly, which leave no room for a terminator) go into GNU long-name entries.
pub(super) const NAME_FIELD_BYTES: usize = 100;

/// The name GNU tar gives its long-name and long-link pseudo entries.
const GNU_LONG_NAME_MARKER: &[u8] = b"././@LongLink";

/// Name of the pax extended header entries, as GNU tar and Go write it when no per-file name is
/// wanted: a fixed name keeps the stream independent of where it was made.
const PAX_HEADER_NAME: &[u8] = b"././@PaxHeader";

/// Path of the root directory's entry.
const ROOT_ENTRY_PATH: &[u8] = b"./";

/// Sum of the sizes of the regular files under `root`, in bytes (for progress); a file with
/// several names counts once, as it is packed once.
pub(super) fn walk_totals(root: &Path) -> Result<u64, PackError> {
    let mut walk = TreeWalk::new(root);
    let mut total_bytes = 0u64;
    let mut linked = HashSet::new();
    while let Some(entry) = walk.next_entry()? {
        let metadata = &entry.metadata;
        if metadata.file_type().is_file()
            && (metadata.nlink() < 2 || linked.insert((metadata.dev(), metadata.ino())))
        {
            total_bytes += metadata.len();
        }
    }
    Ok(total_bytes)
}

/// Writes the tar stream of the tree at `root`, ending with the two zero blocks of a tar end
/// marker.
pub(super) fn write_tree<S: ChunkSink>(
    root: &Path,
    pipeline: &mut ChunkPipeline<'_, S>,
) -> Result<PackStats, PackError> {
    let mut stats = PackStats::default();
    let mut walk = TreeWalk::new(root);
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    // The first archive path of every inode with several names under `root`; later names become
    // hard-link entries pointing to it. Only multiply-linked inodes are held.
    let mut first_names: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    while let Some(entry) = walk.next_entry()? {
        let file_type = entry.metadata.file_type();
        let rel = entry.rel.as_slice();
        if !file_type.is_dir() && !file_type.is_socket() && entry.metadata.nlink() > 1 {
            let inode = (entry.metadata.dev(), entry.metadata.ino());
            if let Some(first) = first_names.get(&inode) {
                let mut header = EntryHeader::new(EntryType::Link, rel, &entry.metadata);
                header.link = Some(first.as_slice());
                header.write(pipeline, &entry.abs)?;
                stats.hard_links += 1;
                continue;
            }
            first_names.insert(inode, rel.to_vec());
        }
        if file_type.is_dir() {
            let path = if rel.is_empty() {
                ROOT_ENTRY_PATH.to_vec()
            } else {
                [rel, b"/"].concat()
            };
            let mut header = EntryHeader::new(EntryType::Directory, &path, &entry.metadata);
            header.xattrs = read_xattrs(&entry.abs)?;
            stats.xattrs += header.xattrs.len() as u64;
            header.write(pipeline, &entry.abs)?;
            stats.dirs += 1;
        } else if file_type.is_file() {
            stats.xattrs += write_file(rel, &entry.abs, pipeline, &mut buffer)?;
            stats.files += 1;
        } else if file_type.is_symlink() {
            let target = fs::read_link(&entry.abs).map_err(|source| PackError::Io {
                action: "read symlink",
                path: entry.abs.clone(),
                source,
            })?;
            let mut header = EntryHeader::new(EntryType::Symlink, rel, &entry.metadata);
            header.link = Some(target.as_os_str().as_bytes());
            header.xattrs = read_xattrs(&entry.abs)?;
            stats.xattrs += header.xattrs.len() as u64;
            header.write(pipeline, &entry.abs)?;
            stats.symlinks += 1;
        } else if file_type.is_char_device() || file_type.is_block_device() || file_type.is_fifo() {
            let entry_type = if file_type.is_char_device() {
                EntryType::Char
            } else if file_type.is_block_device() {
                EntryType::Block
            } else {
                EntryType::Fifo
            };
            let mut header = EntryHeader::new(entry_type, rel, &entry.metadata);
            if entry_type != EntryType::Fifo {
                let rdev = entry.metadata.rdev();
                header.device = Some((libc::major(rdev), libc::minor(rdev)));
            }
            header.xattrs = read_xattrs(&entry.abs)?;
            stats.xattrs += header.xattrs.len() as u64;
            header.write(pipeline, &entry.abs)?;
            stats.specials += 1;
        } else {
            tracing::warn!(path = %entry.abs.display(), "skipping socket: it cannot be packed");
            stats.skipped.push(entry.abs);
        }
    }
    pipeline.write(&[0u8; 2 * BLOCK_BYTES])?;
    Ok(stats)
}

/// Writes the bytes of the image file at `path`, nothing else.
pub(super) fn write_image<S: ChunkSink>(
    path: &Path,
    pipeline: &mut ChunkPipeline<'_, S>,
) -> Result<(), PackError> {
    let (mut file, metadata) = open_regular(path)?;
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    copy_exactly(&mut file, metadata.len(), path, pipeline, &mut buffer)
}

/// Writes one regular file: header, content, padding. Size, owner, mode and mtime come from the
/// open file, so they describe exactly the bytes read. Returns the number of xattrs recorded.
fn write_file<S: ChunkSink>(
    rel: &[u8],
    abs: &Path,
    pipeline: &mut ChunkPipeline<'_, S>,
    buffer: &mut [u8],
) -> Result<u64, PackError> {
    let (mut file, metadata) = open_regular(abs)?;
    let mut header = EntryHeader::new(EntryType::Regular, rel, &metadata);
    header.size = metadata.len();
    header.xattrs = read_xattrs(abs)?;
    header.write(pipeline, abs)?;
    copy_exactly(&mut file, metadata.len(), abs, pipeline, buffer)?;
    pad_to_block(pipeline)?;
    Ok(header.xattrs.len() as u64)
}

/// Every extended attribute of `path` itself (never a symlink's target), sorted by name bytes so
/// the stream does not depend on the order the filesystem lists them in. A filesystem without
/// xattr support has none. Which names are visible depends on the packer's privileges: only
/// root sees `trusted.*`.
fn read_xattrs(path: &Path) -> Result<Vec<Xattr>, PackError> {
    let read_error = |source| PackError::Io {
        action: "read extended attributes of",
        path: path.to_path_buf(),
        source,
    };
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(read_error(e)),
    };
    let mut xattrs = Vec::new();
    for name in names {
        // An attribute removed between the listing and the read is simply not packed.
        let Some(value) = xattr::get(path, &name).map_err(read_error)? else {
            continue;
        };
        let name = name.as_bytes().to_vec();
        if let Err(detail) = pax::check_xattr(&name, &value) {
            return Err(PackError::Unrecordable {
                path: path.to_path_buf(),
                detail,
            });
        }
        xattrs.push(Xattr { name, value });
    }
    xattrs.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    Ok(xattrs)
}

/// Opens a file for reading without following a symlink, and checks it is a regular file.
fn open_regular(path: &Path) -> Result<(File, Metadata), PackError> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| PackError::Io {
            action: "open",
            path: path.to_path_buf(),
            source,
        })?;
    let metadata = file.metadata().map_err(|source| PackError::Io {
        action: "read metadata of",
        path: path.to_path_buf(),
        source,
    })?;
    if !metadata.file_type().is_file() {
        return Err(PackError::Changed {
            path: path.to_path_buf(),
            expected_bytes: 0,
        });
    }
    Ok((file, metadata))
}

/// Copies exactly `size` bytes of `file` into the pipeline as content; a file that ends early or
/// runs past `size` has changed since its header was written.
fn copy_exactly<S: ChunkSink>(
    file: &mut File,
    size: u64,
    path: &Path,
    pipeline: &mut ChunkPipeline<'_, S>,
    buffer: &mut [u8],
) -> Result<(), PackError> {
    let read_error = |source| PackError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    };
    let changed = || PackError::Changed {
        path: path.to_path_buf(),
        expected_bytes: size,
    };
    let mut remaining = size;
    while remaining > 0 {
        let want = buffer
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let n = read_retrying(file, &mut buffer[..want]).map_err(read_error)?;
        if n == 0 {
            return Err(changed());
        }
        pipeline.write_content(&buffer[..n])?;
        remaining -= n as u64;
    }
    let mut probe = [0u8; 1];
    if read_retrying(file, &mut probe).map_err(read_error)? != 0 {
        return Err(changed());
    }
    Ok(())
}

fn read_retrying(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match file.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Writes zeros up to the next block boundary.
fn pad_to_block<S: ChunkSink>(pipeline: &mut ChunkPipeline<'_, S>) -> Result<(), PackError> {
    let used = (pipeline.position() % BLOCK_BYTES as u64) as usize;
    if used != 0 {
        pipeline.write(&[0u8; BLOCK_BYTES][used..])?;
    }
    Ok(())
}

/// The fields of one tar entry: what the inode says, nothing about the machine that packed it
/// (no user or group names, no access or change times).
struct EntryHeader<'a> {
    entry_type: EntryType,
    path: &'a [u8],
    link: Option<&'a [u8]>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: Timestamp,
    size: u64,
    device: Option<(u32, u32)>,
    /// Sorted by name.
    xattrs: Vec<Xattr>,
}

impl<'a> EntryHeader<'a> {
    fn new(entry_type: EntryType, path: &'a [u8], metadata: &Metadata) -> Self {
        EntryHeader {
            entry_type,
            path,
            link: None,
            mode: metadata.mode() & 0o7777,
            uid: u64::from(metadata.uid()),
            gid: u64::from(metadata.gid()),
            mtime: Timestamp::from_stat(metadata.mtime(), metadata.mtime_nsec()),
            size: 0,
            device: None,
            xattrs: Vec::new(),
        }
    }

    /// Writes the pax and long-name entries this entry needs, then its header.
    fn write<S: ChunkSink>(
        &self,
        pipeline: &mut ChunkPipeline<'_, S>,
        abs: &Path,
    ) -> Result<(), PackError> {
        let records = pax::encode_records(self.mtime, &self.xattrs);
        if !records.is_empty() {
            write_pax_header(pipeline, &records)?;
        }
        let mut header = Header::new_gnu();
        if self.path.len() >= NAME_FIELD_BYTES {
            write_long_name(pipeline, EntryType::GNULongName, self.path)?;
        }
        copy_truncated(&mut header.as_old_mut().name, self.path);
        if let Some(link) = self.link {
            if link.len() >= NAME_FIELD_BYTES {
                write_long_name(pipeline, EntryType::GNULongLink, link)?;
            }
            copy_truncated(&mut header.as_old_mut().linkname, link);
        }
        header.set_entry_type(self.entry_type);
        header.set_mode(self.mode);
        // GNU headers store ids and times too large for their octal fields in base-256.
        header.set_uid(self.uid);
        header.set_gid(self.gid);
        header.set_mtime(self.mtime.header_secs());
        header.set_size(self.size);
        if let Some((major, minor)) = self.device {
            let unrecordable = |e: std::io::Error| PackError::Unrecordable {
                path: abs.to_path_buf(),
                detail: e.to_string(),
            };
            header.set_device_major(major).map_err(unrecordable)?;
            header.set_device_minor(minor).map_err(unrecordable)?;
        }
        header.set_cksum();
        pipeline.write(header.as_bytes())
    }
}

/// Writes a GNU long-name (`L`) or long-link (`K`) entry holding `value`, laid out as GNU tar
/// and the `tar` crate do: a NUL-terminated value padded to whole blocks.
fn write_long_name<S: ChunkSink>(
    pipeline: &mut ChunkPipeline<'_, S>,
    entry_type: EntryType,
    value: &[u8],
) -> Result<(), PackError> {
    let mut header = Header::new_gnu();
    header.as_old_mut().name[..GNU_LONG_NAME_MARKER.len()].copy_from_slice(GNU_LONG_NAME_MARKER);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(value.len() as u64 + 1);
    header.set_entry_type(entry_type);
    header.set_cksum();
    pipeline.write(header.as_bytes())?;
    pipeline.write(value)?;
    pipeline.write(&[0])?;
    pad_to_block(pipeline)
}

/// Writes a pax extended header (`x`) entry holding `records`, which describe the next entry.
fn write_pax_header<S: ChunkSink>(
    pipeline: &mut ChunkPipeline<'_, S>,
    records: &[u8],
) -> Result<(), PackError> {
    let mut header = Header::new_ustar();
    header.as_old_mut().name[..PAX_HEADER_NAME.len()].copy_from_slice(PAX_HEADER_NAME);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(records.len() as u64);
    header.set_entry_type(EntryType::XHeader);
    header.set_cksum();
    pipeline.write(header.as_bytes())?;
    pipeline.write(records)?;
    pad_to_block(pipeline)
}

/// Copies as much of `value` as fits into a NUL-padded header field, leaving a terminator.
fn copy_truncated(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len() - 1);
    field[..n].copy_from_slice(&value[..n]);
}

/// One entry of the walk: its path on disk, its path in the archive (empty for the root), and
/// its `lstat` metadata.
struct WalkEntry {
    abs: PathBuf,
    rel: Vec<u8>,
    metadata: Metadata,
}

/// Depth-first walk in archive order: a directory, then its children sorted by name bytes.
/// Holds one sorted name list per directory on the current path, never the whole tree.
struct TreeWalk {
    root: Option<PathBuf>,
    stack: Vec<DirLevel>,
}

struct DirLevel {
    abs: PathBuf,
    rel: Vec<u8>,
    names: std::vec::IntoIter<OsString>,
}

impl TreeWalk {
    fn new(root: &Path) -> Self {
        TreeWalk {
            root: Some(root.to_path_buf()),
            stack: Vec::new(),
        }
    }

    fn next_entry(&mut self) -> Result<Option<WalkEntry>, PackError> {
        if let Some(root) = self.root.take() {
            // The root itself is followed if it is a symlink, like the path given to pack.
            let metadata = fs::metadata(&root).map_err(|source| PackError::Io {
                action: "read metadata of",
                path: root.clone(),
                source,
            })?;
            self.descend(&root, Vec::new())?;
            return Ok(Some(WalkEntry {
                abs: root,
                rel: Vec::new(),
                metadata,
            }));
        }
        loop {
            let Some(level) = self.stack.last_mut() else {
                return Ok(None);
            };
            let Some(name) = level.names.next() else {
                self.stack.pop();
                continue;
            };
            let abs = level.abs.join(&name);
            let mut rel = level.rel.clone();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name.as_bytes());
            let metadata = fs::symlink_metadata(&abs).map_err(|source| PackError::Io {
                action: "read metadata of",
                path: abs.clone(),
                source,
            })?;
            if metadata.is_dir() {
                self.descend(&abs, rel.clone())?;
            }
            return Ok(Some(WalkEntry { abs, rel, metadata }));
        }
    }

    fn descend(&mut self, abs: &Path, rel: Vec<u8>) -> Result<(), PackError> {
        let read_error = |source| PackError::Io {
            action: "list directory",
            path: abs.to_path_buf(),
            source,
        };
        let mut names = Vec::new();
        for entry in fs::read_dir(abs).map_err(read_error)? {
            names.push(entry.map_err(read_error)?.file_name());
        }
        names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        self.stack.push(DirLevel {
            abs: abs.to_path_buf(),
            rel,
            names: names.into_iter(),
        });
        Ok(())
    }
}
