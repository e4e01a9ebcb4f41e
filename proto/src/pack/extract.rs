//! Restoring a tree from its tar stream without ever writing outside the destination.
//!
//! The tar crate is used in raw mode, so every extension entry passes through here: GNU long
//! names and pax headers are read with a size bound, pax keys this packer does not write are
//! refused, and so are sparse files and global headers. The order in which an entry's
//! attributes are restored is described in the parent module.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use super::pax::{self, PaxAttributes, Timestamp, Xattr, MAX_PAX_HEADER_BYTES};
use super::{new_file_options, private_dir_builder, UnpackError, UnpackStats};

/// Longest path or symlink target accepted from a GNU long-name entry, in bytes (Linux's
/// `PATH_MAX`). Bounds the memory a crafted entry can make us allocate.
const MAX_LONG_NAME_BYTES: u64 = 4096;

/// Buffer for copying file content from the payload to disk, in bytes.
const COPY_BUFFER_BYTES: usize = 256 * 1024;

/// Mode for parent directories a stream names without listing them (never the case for streams
/// this packer writes).
const IMPLICIT_DIR_MODE: u32 = 0o755;

/// The default ACL of a directory, which new entries in it inherit.
const DEFAULT_ACL_XATTR: &str = "system.posix_acl_default";

/// The SELinux label, which the kernel gives every new inode and which is left alone when the
/// bundle records none.
const SELINUX_XATTR: &[u8] = b"security.selinux";

/// Unpacks the tar stream `payload` into `dest`, which exists.
pub(super) fn extract_tree<R: Read>(payload: R, dest: &Path) -> Result<UnpackStats, UnpackError> {
    let mut archive = tar::Archive::new(payload);
    let entries = archive.entries().map_err(malformed)?.raw(true);
    let mut extractor = Extractor::new(dest);
    let mut pending = Extensions::default();
    for entry in entries {
        let mut entry = entry.map_err(malformed)?;
        let entry_type = entry.header().entry_type();
        match entry_type {
            EntryType::GNULongName => {
                pending.long_path = Some(read_long_name(&mut entry, pending.long_path.is_some())?);
                continue;
            }
            EntryType::GNULongLink => {
                pending.long_link = Some(read_long_name(&mut entry, pending.long_link.is_some())?);
                continue;
            }
            EntryType::XHeader => {
                pending.pax = Some(read_pax(&mut entry, pending.pax.is_some())?);
                continue;
            }
            _ => {}
        }
        let extensions = std::mem::take(&mut pending);
        let path = match extensions.long_path {
            Some(path) => path,
            None => entry.header().path_bytes().into_owned(),
        };
        let link = match extensions.long_link {
            Some(link) => Some(link),
            None => entry.header().link_name_bytes().map(|l| l.into_owned()),
        };
        let pax = extensions.pax.unwrap_or_default();
        extractor.entry(&mut entry, entry_type, &path, link.as_deref(), pax)?;
    }
    if pending != Extensions::default() {
        return Err(UnpackError::Malformed(
            "the stream ends with an extension entry that describes no entry".into(),
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

/// Extension entries seen since the last real entry; they describe the next one.
#[derive(Debug, Default, PartialEq, Eq)]
struct Extensions {
    long_path: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<PaxAttributes>,
}

/// What is restored on an entry besides its content.
struct Attributes {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timestamp,
    xattrs: Vec<Xattr>,
}

impl Attributes {
    fn read(header: &tar::Header, pax: PaxAttributes) -> Result<Self, UnpackError> {
        let id = |value: u64, what: &str| {
            u32::try_from(value).map_err(|_| {
                UnpackError::Malformed(format!("{what} {value} does not fit a 32-bit id"))
            })
        };
        let mtime = match pax.mtime {
            Some(mtime) => mtime,
            None => Timestamp {
                secs: i64::try_from(header.mtime().map_err(malformed)?).map_err(|_| {
                    UnpackError::Malformed("an mtime is beyond any representable time".into())
                })?,
                nanos: 0,
            },
        };
        Ok(Attributes {
            mode: header.mode().map_err(malformed)? & 0o7777,
            uid: id(header.uid().map_err(malformed)?, "uid")?,
            gid: id(header.gid().map_err(malformed)?, "gid")?,
            mtime,
            xattrs: pax.xattrs,
        })
    }
}

struct Extractor<'d> {
    dest: &'d Path,
    /// Directories under `dest` known to be real directories whose ancestors are too.
    verified_dirs: HashSet<PathBuf>,
    /// Directories whose owner, xattrs, mode and mtime are set after their contents, in creation
    /// order.
    deferred_dirs: Vec<DeferredDir>,
    /// Device and inode of every non-directory this run created: the only things a hard link
    /// may point to.
    created: HashSet<(u64, u64)>,
    /// Device nodes skipped because the process is not root; hard links to them are skipped too.
    skipped_devices: HashSet<PathBuf>,
    stats: UnpackStats,
    /// Whether the process is root, so ownership, device nodes and every xattr namespace must
    /// be restored.
    privileged: bool,
    euid: u32,
    egid: u32,
    buffer: Vec<u8>,
}

struct DeferredDir {
    path: PathBuf,
    attributes: Attributes,
    /// Whether the directory was there before, and may carry xattrs the bundle does not record.
    existed: bool,
}

impl<'d> Extractor<'d> {
    fn new(dest: &'d Path) -> Self {
        // SAFETY: geteuid and getegid have no preconditions and cannot fail.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Extractor {
            dest,
            verified_dirs: HashSet::new(),
            deferred_dirs: Vec::new(),
            created: HashSet::new(),
            skipped_devices: HashSet::new(),
            stats: UnpackStats::default(),
            privileged: euid == 0,
            euid,
            egid,
            buffer: vec![0u8; COPY_BUFFER_BYTES],
        }
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        entry_type: EntryType,
        path: &[u8],
        link: Option<&[u8]>,
        pax: PaxAttributes,
    ) -> Result<(), UnpackError> {
        let shown = || String::from_utf8_lossy(path).into_owned();
        // The path is checked first: an unsafe entry is refused as such, whatever else it holds.
        let rel = safe_relative(path)?;
        let attributes = Attributes::read(entry.header(), pax)?;
        let Some(rel) = rel else {
            if entry_type != EntryType::Directory {
                return Err(UnpackError::UnsafePath {
                    path: shown(),
                    reason: "only a directory may stand for the destination itself",
                });
            }
            strip_default_acl(self.dest)?;
            self.deferred_dirs.push(DeferredDir {
                path: self.dest.to_path_buf(),
                attributes,
                existed: true,
            });
            self.stats.dirs += 1;
            return Ok(());
        };
        self.check_parents(&rel, &shown)?;
        let target = self.dest.join(&rel);
        match entry_type {
            EntryType::Directory => {
                let existed = clear_slot(&target, true)?;
                if existed {
                    strip_default_acl(&target)?;
                } else {
                    private_dir_builder()
                        .create(&target)
                        .map_err(|source| io_error("create directory", &target, source))?;
                }
                self.verified_dirs.insert(target.clone());
                self.deferred_dirs.push(DeferredDir {
                    path: target,
                    attributes,
                    existed,
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
                let metadata = file
                    .metadata()
                    .map_err(|source| io_error("inspect", &target, source))?;
                drop(file);
                self.created.insert((metadata.dev(), metadata.ino()));
                self.restore(&target, &attributes, false)?;
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
                self.record_created(&target)?;
                self.restore(&target, &attributes, true)?;
                self.stats.symlinks += 1;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                self.special(entry.header(), entry_type, &target, &attributes)?;
            }
            EntryType::Link => {
                if !attributes.xattrs.is_empty() {
                    return Err(UnpackError::Malformed(format!(
                        "hard link {:?} carries extended attributes of its own",
                        shown()
                    )));
                }
                self.hard_link(&rel, &target, link, &shown)?;
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
        attributes: &Attributes,
    ) -> Result<(), UnpackError> {
        let is_device = entry_type != EntryType::Fifo;
        if is_device && !self.privileged {
            tracing::warn!(path = %target.display(), "skipping device node: only root can create it");
            self.skipped_devices.insert(target.to_path_buf());
            self.stats.specials_skipped += 1;
            return Ok(());
        }
        clear_slot(target, false)?;
        let c_path = c_path(target)?;
        // Created owner-only; the recorded mode is applied after owner and xattrs.
        let result = if is_device {
            let major = header.device_major().map_err(malformed)?.unwrap_or(0);
            let minor = header.device_minor().map_err(malformed)?.unwrap_or(0);
            let kind = if entry_type == EntryType::Char {
                libc::S_IFCHR
            } else {
                libc::S_IFBLK
            };
            // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
            unsafe { libc::mknod(c_path.as_ptr(), kind | 0o600, libc::makedev(major, minor)) }
        } else {
            // SAFETY: as above.
            unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }
        };
        if result != 0 {
            return Err(io_error(
                "create special file",
                target,
                io::Error::last_os_error(),
            ));
        }
        self.record_created(target)?;
        self.restore(target, attributes, false)?;
        self.stats.specials += 1;
        Ok(())
    }

    /// Creates `target` as another name of the file an earlier entry unpacked at `link`.
    fn hard_link(
        &mut self,
        rel: &Path,
        target: &Path,
        link: Option<&[u8]>,
        shown: &dyn Fn() -> String,
    ) -> Result<(), UnpackError> {
        let refuse = |reason| UnpackError::UnsafePath {
            path: shown(),
            reason,
        };
        let Some(link) = link else {
            return Err(UnpackError::Malformed(format!(
                "hard link {:?} names no file",
                shown()
            )));
        };
        let Some(source_rel) = safe_relative(link)? else {
            return Err(refuse("a hard link cannot point to the destination itself"));
        };
        if source_rel == rel {
            return Err(refuse("a hard link cannot point to itself"));
        }
        let source = self.dest.join(&source_rel);
        if self.skipped_devices.contains(&source) {
            tracing::warn!(path = %target.display(), "skipping hard link to a device node that only root can create");
            self.stats.specials_skipped += 1;
            return Ok(());
        }
        // The source's parents were checked when it was unpacked, and a checked directory is
        // never replaced; its inode says it is a file this run created.
        let parent_checked = source
            .parent()
            .is_some_and(|p| p == self.dest || self.verified_dirs.contains(p));
        let created_here = parent_checked
            && fs::symlink_metadata(&source)
                .is_ok_and(|m| !m.is_dir() && self.created.contains(&(m.dev(), m.ino())));
        if !created_here {
            return Err(refuse(
                "a hard link must point to a file unpacked earlier from the same bundle",
            ));
        }
        clear_slot(target, false)?;
        let c_source = c_path(&source)?;
        let c_target = c_path(target)?;
        // SAFETY: both paths are NUL-terminated strings that outlive the call. Flags 0: a
        // symlink source is linked itself, never followed.
        let result = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                c_source.as_ptr(),
                libc::AT_FDCWD,
                c_target.as_ptr(),
                0,
            )
        };
        if result != 0 {
            return Err(io_error(
                "create hard link",
                target,
                io::Error::last_os_error(),
            ));
        }
        self.stats.hard_links += 1;
        Ok(())
    }

    fn record_created(&mut self, path: &Path) -> Result<(), UnpackError> {
        let metadata =
            fs::symlink_metadata(path).map_err(|source| io_error("inspect", path, source))?;
        self.created.insert((metadata.dev(), metadata.ino()));
        Ok(())
    }

    /// Gives a just-created entry its owner, xattrs, mode and mtime, in that order: chown
    /// clears setuid and setgid bits and `security.capability`, so it comes first; xattrs come
    /// before the mode because writing `user.*` needs write permission, which a read-only mode
    /// would take from a process that is not root (chmod keeps xattrs, and keeps an ACL's mask
    /// equal to the group bits, which is what the source had).
    fn restore(
        &mut self,
        path: &Path,
        attributes: &Attributes,
        is_symlink: bool,
    ) -> Result<(), UnpackError> {
        self.restore_owner(path, attributes)?;
        self.restore_xattrs(path, &attributes.xattrs)?;
        // Linux has no symlink modes.
        if !is_symlink {
            set_mode(path, attributes.mode)?;
        }
        set_path_mtime(path, attributes.mtime)
            .map_err(|source| io_error("set mtime of", path, source))
    }

    fn restore_owner(&mut self, path: &Path, attributes: &Attributes) -> Result<(), UnpackError> {
        let (uid, gid) = (attributes.uid, attributes.gid);
        if self.privileged {
            let c_path = c_path(path)?;
            // SAFETY: c_path is NUL-terminated and outlives the call.
            let result = unsafe {
                libc::fchownat(
                    libc::AT_FDCWD,
                    c_path.as_ptr(),
                    uid,
                    gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if result != 0 {
                return Err(io_error("set owner of", path, io::Error::last_os_error()));
            }
        } else if (uid, gid) != (self.euid, self.egid) {
            tracing::debug!(path = %path.display(), uid, gid, "not root: owner not restored");
            self.stats.owners_skipped += 1;
        }
        Ok(())
    }

    fn restore_xattrs(&mut self, path: &Path, xattrs: &[Xattr]) -> Result<(), UnpackError> {
        for xattr in xattrs {
            let name = OsStr::from_bytes(&xattr.name);
            match xattr::set(path, name, &xattr.value) {
                Ok(()) => self.stats.xattrs += 1,
                Err(e) if self.may_skip_xattr(&xattr.name, &e) => {
                    tracing::debug!(path = %path.display(), name = %name.to_string_lossy(), "not root: extended attribute not restored");
                    self.stats.xattrs_skipped += 1;
                }
                Err(source) => return Err(xattr_error(path, &xattr.name, source)),
            }
        }
        Ok(())
    }

    /// Removes from a directory that was already there the xattrs the bundle does not record
    /// (the SELinux label aside, which belongs to the system unpacking).
    fn remove_unrecorded_xattrs(
        &mut self,
        path: &Path,
        recorded: &[Xattr],
    ) -> Result<(), UnpackError> {
        let names = match xattr::list(path) {
            Ok(names) => names,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
            Err(source) => return Err(io_error("list extended attributes of", path, source)),
        };
        for name in names {
            let bytes = name.as_bytes();
            if bytes == SELINUX_XATTR || recorded.iter().any(|x| x.name == bytes) {
                continue;
            }
            match xattr::remove(path, &name) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                Err(e) if self.may_skip_xattr(bytes, &e) => self.stats.xattrs_skipped += 1,
                Err(source) => return Err(xattr_error(path, bytes, source)),
            }
        }
        Ok(())
    }

    /// Whether failing to write the xattr `name` is expected rather than an error: only when
    /// the process is not root and the kernel refused a namespace it reserves to privilege.
    fn may_skip_xattr(&self, name: &[u8], error: &io::Error) -> bool {
        !self.privileged
            && (name.starts_with(b"trusted.") || name.starts_with(b"security."))
            && matches!(error.raw_os_error(), Some(libc::EPERM | libc::EACCES))
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

    /// Gives directories their recorded owner, xattrs, mode and mtime, deepest first, after all
    /// contents are in place (writing into a directory changes its mtime; a read-only mode
    /// would block it; a default ACL would be inherited by what is created in it).
    fn finish(mut self) -> Result<UnpackStats, UnpackError> {
        let deferred = std::mem::take(&mut self.deferred_dirs);
        for dir in deferred.iter().rev() {
            if dir.existed {
                self.remove_unrecorded_xattrs(&dir.path, &dir.attributes.xattrs)?;
            }
            self.restore(&dir.path, &dir.attributes, false)?;
        }
        if self.stats.owners_skipped > 0 {
            tracing::warn!(
                entries = self.stats.owners_skipped,
                "not root: recorded owners and groups were not restored"
            );
        }
        if self.stats.xattrs_skipped > 0 {
            tracing::warn!(
                xattrs = self.stats.xattrs_skipped,
                "not root: trusted.* and security.* extended attributes were not restored"
            );
        }
        Ok(self.stats)
    }
}

/// Removes the default ACL of a directory that was already there, so entries unpacked into it
/// do not inherit an ACL the bundle does not record. Its recorded xattrs come back at the end.
fn strip_default_acl(dir: &Path) -> Result<(), UnpackError> {
    match xattr::get(dir, DEFAULT_ACL_XATTR) {
        Ok(None) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        Err(source) => Err(io_error("read the default ACL of", dir, source)),
        Ok(Some(_)) => xattr::remove(dir, DEFAULT_ACL_XATTR)
            .map_err(|source| xattr_error(dir, DEFAULT_ACL_XATTR.as_bytes(), source)),
    }
}

/// Reads a pax extended header, refusing more than [`MAX_PAX_HEADER_BYTES`] and keys this packer
/// does not write.
fn read_pax<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    duplicate: bool,
) -> Result<PaxAttributes, UnpackError> {
    if duplicate {
        return Err(UnpackError::Malformed(
            "two pax headers describe the same entry".into(),
        ));
    }
    let size = entry.header().entry_size().map_err(malformed)?;
    if size > MAX_PAX_HEADER_BYTES {
        return Err(UnpackError::Malformed(format!(
            "a pax header of {size} bytes exceeds the limit of {MAX_PAX_HEADER_BYTES}"
        )));
    }
    let mut records = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut records).map_err(malformed)?;
    pax::parse_records(&records).map_err(UnpackError::Malformed)
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

/// Sets the mtime of `path` itself, not of what a symlink points to. The access time is set to
/// the mtime, as tar does, so the tree does not depend on when it was unpacked.
fn set_path_mtime(path: &Path, mtime: Timestamp) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let time = libc::timespec {
        tv_sec: libc::time_t::try_from(mtime.secs).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(mtime.nanos),
    };
    let times = [time, time];
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

/// Sets the mode of `path`, which is not a symlink, exactly (no umask).
fn set_mode(path: &Path, mode: u32) -> Result<(), UnpackError> {
    let c_path = c_path(path)?;
    // SAFETY: c_path is NUL-terminated and outlives the call.
    if unsafe { libc::fchmodat(libc::AT_FDCWD, c_path.as_ptr(), mode, 0) } != 0 {
        return Err(io_error("set mode of", path, io::Error::last_os_error()));
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

fn xattr_error(path: &Path, name: &[u8], source: io::Error) -> UnpackError {
    UnpackError::Xattr {
        path: path.to_path_buf(),
        name: String::from_utf8_lossy(name).into_owned(),
        source,
    }
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> UnpackError {
    UnpackError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}
