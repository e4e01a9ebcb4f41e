//! Helpers shared by the `bundle_*` tests: tree snapshots for comparison, tree generators, and
//! packing into memory.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use proto::chunking::ChunkerParams;
use proto::manifest::BundleKind;
use proto::pack::{pack_path, MemChunks, PackOptions, PackedBundle};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// The publisher key every test signs with.
pub fn test_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// Options for a test bundle with the given chunk sizes.
pub fn options(chunker: ChunkerParams) -> PackOptions {
    let mut options = PackOptions::new("test-tree", "1.0", BundleKind::Package);
    options.chunker = chunker;
    options
}

/// Packs `path` into a fresh [`MemChunks`].
pub fn pack_mem(path: &Path, options: &PackOptions) -> (PackedBundle, MemChunks) {
    let mut chunks = MemChunks::new();
    let packed = pack_path(path, options, &test_key(), &mut chunks, &mut |_| {}).expect("pack");
    (packed, chunks)
}

/// What a user sees of one entry's type and content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File { len: u64, blake3: String },
    Symlink(Vec<u8>),
    Fifo,
    CharDevice(u64),
    BlockDevice(u64),
    Socket,
}

/// One entry of a [`snapshot`]: every attribute unpacking restores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntrySnapshot {
    pub kind: EntryKind,
    /// `mode & 0o7777`; 0 for symlinks, whose mode Linux does not let anyone set.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_secs: i64,
    pub mtime_nsec: i64,
    /// Every extended attribute (ACLs included), by name.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// For a non-directory with other names in the tree, the first of them (in path order):
    /// entries with the same value are one inode.
    pub hard_link_group: Option<Vec<u8>>,
}

/// Every entry under `root` (the root itself under the empty path), keyed by relative path bytes.
pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, EntrySnapshot> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
    snapshot_into(root, Vec::new(), &mut out, &mut inodes);
    for names in inodes.values().filter(|names| names.len() > 1) {
        let first = names.iter().min().expect("non-empty").clone();
        for name in names {
            out.get_mut(name).expect("listed").hard_link_group = Some(first.clone());
        }
    }
    out
}

fn snapshot_into(
    path: &Path,
    rel: Vec<u8>,
    out: &mut BTreeMap<Vec<u8>, EntrySnapshot>,
    inodes: &mut BTreeMap<(u64, u64), Vec<Vec<u8>>>,
) {
    let metadata = fs::symlink_metadata(path).expect("lstat");
    let file_type = metadata.file_type();
    let kind = if file_type.is_dir() {
        EntryKind::Dir
    } else if file_type.is_file() {
        let bytes = fs::read(path).expect("read file");
        EntryKind::File {
            len: bytes.len() as u64,
            blake3: blake3::hash(&bytes).to_hex().to_string(),
        }
    } else if file_type.is_symlink() {
        EntryKind::Symlink(
            fs::read_link(path)
                .expect("readlink")
                .as_os_str()
                .as_bytes()
                .to_vec(),
        )
    } else if file_type.is_fifo() {
        EntryKind::Fifo
    } else if file_type.is_char_device() {
        EntryKind::CharDevice(metadata.rdev())
    } else if file_type.is_block_device() {
        EntryKind::BlockDevice(metadata.rdev())
    } else {
        EntryKind::Socket
    };
    let mode = if file_type.is_symlink() {
        0
    } else {
        metadata.mode() & 0o7777
    };
    if !file_type.is_dir() {
        inodes
            .entry((metadata.dev(), metadata.ino()))
            .or_default()
            .push(rel.clone());
    }
    out.insert(
        rel.clone(),
        EntrySnapshot {
            kind,
            mode,
            uid: metadata.uid(),
            gid: metadata.gid(),
            mtime_secs: metadata.mtime(),
            mtime_nsec: metadata.mtime_nsec(),
            xattrs: read_xattrs(path),
            hard_link_group: None,
        },
    );
    if file_type.is_dir() {
        for entry in fs::read_dir(path).expect("read_dir") {
            let entry = entry.expect("dir entry");
            let mut child = rel.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(entry.file_name().as_bytes());
            snapshot_into(&entry.path(), child, out, inodes);
        }
    }
}

/// Every xattr of `path` itself.
pub fn read_xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    for name in xattr::list(path).expect("list xattrs") {
        if let Some(value) = xattr::get(path, &name).expect("read xattr") {
            out.insert(name.as_bytes().to_vec(), value);
        }
    }
    out
}

/// Compares two snapshots entry by entry and panics at the first difference, naming the path
/// and the attribute; returns the number of entries compared.
pub fn assert_same_entries(
    expected: &BTreeMap<Vec<u8>, EntrySnapshot>,
    actual: &BTreeMap<Vec<u8>, EntrySnapshot>,
) -> usize {
    for (path, want) in expected {
        let shown = String::from_utf8_lossy(path);
        let Some(got) = actual.get(path) else {
            panic!("{shown:?} was not unpacked");
        };
        assert_eq!(got.kind, want.kind, "{shown:?}: type or content");
        assert_eq!(
            got.mode, want.mode,
            "{shown:?}: mode {:o} vs {:o}",
            got.mode, want.mode
        );
        assert_eq!((got.uid, got.gid), (want.uid, want.gid), "{shown:?}: owner");
        assert_eq!(
            (got.mtime_secs, got.mtime_nsec),
            (want.mtime_secs, want.mtime_nsec),
            "{shown:?}: mtime"
        );
        assert_eq!(got.xattrs, want.xattrs, "{shown:?}: extended attributes");
        assert_eq!(
            got.hard_link_group, want.hard_link_group,
            "{shown:?}: hard links"
        );
    }
    let extra: Vec<_> = actual
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert!(extra.is_empty(), "unexpected entries unpacked: {extra:?}");
    expected.len()
}

/// Reports that `test` cannot run here: with `STAGECOACH_REQUIRE_ALL=1` it panics with the
/// reason; otherwise it prints `skipped: <test>: <reason>` to stderr and the test returns.
#[track_caller]
pub fn skip_or_fail(test: &str, reason: &str) {
    let line = format!("skipped: {test}: {reason}");
    if std::env::var("STAGECOACH_REQUIRE_ALL").is_ok_and(|v| v.trim() == "1") {
        panic!("{line} (STAGECOACH_REQUIRE_ALL=1: every test must run on this machine)");
    }
    eprintln!("{line}");
}

/// Sets atime and mtime of `path` itself (not a symlink's target), in whole seconds.
pub fn set_times(path: &Path, atime_secs: i64, mtime_secs: i64) {
    set_times_ns(path, atime_secs, mtime_secs, 0);
}

/// Sets atime (whole seconds) and mtime (seconds and nanoseconds) of `path` itself.
pub fn set_times_ns(path: &Path, atime_secs: i64, mtime_secs: i64, mtime_nsec: i64) {
    let c_path = CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    let times = [
        libc::timespec {
            tv_sec: atime_secs,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: mtime_secs,
            tv_nsec: mtime_nsec,
        },
    ];
    // SAFETY: valid C string and two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        rc,
        0,
        "utimensat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

pub fn mkfifo(path: &Path, mode: u32) {
    let c_path = CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), mode) }, 0);
}

pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn mknod_char(path: &Path, major: u32, minor: u32) {
    mknod(path, libc::S_IFCHR | 0o640, major, minor);
}

/// Creates a device node; `mode` holds the type (`S_IFCHR`, `S_IFBLK`) and permissions.
pub fn mknod(path: &Path, mode: u32, major: u32, minor: u32) {
    let c_path = CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: valid C string.
    let rc = unsafe { libc::mknod(c_path.as_ptr(), mode, libc::makedev(major, minor)) };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
}

/// Sets owner and group of `path` itself (not a symlink's target).
pub fn lchown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).expect("lchown");
}

pub fn path_from_bytes(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

/// How a generated file's bytes look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// Words from a fixed vocabulary: compresses about 3:1, like source code or configuration.
    Text,
    /// Random bytes: does not compress, like packed binaries and media.
    Random,
    /// Alternating 64 KiB stretches of both, like an executable with data sections.
    Mixed,
}

/// A file of a generated tree; its bytes are a function of the fields.
#[derive(Clone, Debug)]
pub struct FileSpec {
    pub rel: String,
    pub len: usize,
    pub seed: u64,
    pub content: Content,
    pub mtime_secs: i64,
    /// Small edits applied after generation: (offset, bytes replacing or inserted there, insert?).
    pub edits: Vec<(usize, Vec<u8>, bool)>,
}

impl FileSpec {
    pub fn bytes(&self) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut out = match self.content {
            Content::Text => text_bytes(&mut rng, self.len),
            Content::Random => random_bytes(&mut rng, self.len),
            Content::Mixed => {
                let mut out = Vec::with_capacity(self.len);
                let mut text = true;
                while out.len() < self.len {
                    let n = (64 * 1024).min(self.len - out.len());
                    if text {
                        out.extend(text_bytes(&mut rng, n));
                    } else {
                        out.extend(random_bytes(&mut rng, n));
                    }
                    text = !text;
                }
                out
            }
        };
        for (offset, bytes, insert) in &self.edits {
            let at = (*offset).min(out.len());
            if *insert {
                out.splice(at..at, bytes.iter().copied());
            } else {
                let end = (at + bytes.len()).min(out.len());
                out.splice(at..end, bytes.iter().copied());
            }
        }
        out
    }
}

const VOCABULARY_WORDS: usize = 4096;

fn vocabulary() -> &'static [Vec<u8>] {
    use std::sync::OnceLock;
    static WORDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    WORDS.get_or_init(|| {
        let mut rng = StdRng::seed_from_u64(0x5747);
        (0..VOCABULARY_WORDS)
            .map(|_| {
                let len = rng.gen_range(2..12);
                (0..len).map(|_| rng.gen_range(b'a'..=b'z')).collect()
            })
            .collect()
    })
}

/// Text-like bytes: words picked with a skew towards common ones, spaces and newlines.
pub fn text_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let words = vocabulary();
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let r: u32 = rng.gen();
        // Squaring a uniform index skews towards the start, roughly like word frequencies.
        let u = (r >> 16) as usize;
        let index = (u * u) >> 20;
        out.extend_from_slice(&words[index % VOCABULARY_WORDS]);
        out.push(if r & 0xf == 0 { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

pub fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    rng.fill_bytes(&mut out);
    out
}

/// Fixed mtime for generated directories and unchanged files.
pub const BASE_MTIME_SECS: i64 = 1_700_000_000;

/// Writes `files` under `root` (created), then gives every directory [`BASE_MTIME_SECS`].
pub fn write_files(root: &Path, files: &[FileSpec]) {
    fs::create_dir_all(root).expect("create root");
    let mut dirs = std::collections::BTreeSet::new();
    for spec in files {
        let path = root.join(&spec.rel);
        let parent = path.parent().expect("parent").to_path_buf();
        fs::create_dir_all(&parent).expect("create dirs");
        let mut dir = parent.as_path();
        while dir.starts_with(root) {
            dirs.insert(dir.to_path_buf());
            match dir.parent() {
                Some(p) => dir = p,
                None => break,
            }
        }
        fs::write(&path, spec.bytes()).expect("write file");
        set_times(&path, spec.mtime_secs, spec.mtime_secs);
    }
    for dir in dirs.iter().rev() {
        set_times(dir, BASE_MTIME_SECS, BASE_MTIME_SECS);
    }
}

/// About `count` files totalling about `target_bytes`: mostly small (log-uniform from 200 B to
/// 256 KiB, half text, half random), plus a few large mixed files that make up the rest.
pub fn mixed_tree(
    seed: u64,
    count: usize,
    target_bytes: usize,
    large_files: usize,
) -> Vec<FileSpec> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut files = Vec::with_capacity(count);
    let small = count - large_files;
    let mut small_bytes = 0usize;
    for i in 0..small {
        let len = (200f64 * (256.0 * 1024.0 / 200.0f64).powf(rng.gen::<f64>())) as usize;
        small_bytes += len;
        files.push(FileSpec {
            rel: format!("d{:02}/s{}/f{i:05}.dat", i % 50, i % 7),
            len,
            seed: rng.gen(),
            content: if rng.gen_bool(0.5) {
                Content::Text
            } else {
                Content::Random
            },
            mtime_secs: BASE_MTIME_SECS - rng.gen_range(0..10_000_000),
            edits: Vec::new(),
        });
    }
    let large_total = target_bytes.saturating_sub(small_bytes);
    for i in 0..large_files {
        let share = large_total / large_files.max(1);
        let len = rng.gen_range(share / 2..share * 3 / 2).max(1);
        files.push(FileSpec {
            rel: format!("big/large{i:02}.img"),
            len,
            seed: rng.gen(),
            content: Content::Mixed,
            mtime_secs: BASE_MTIME_SECS,
            edits: Vec::new(),
        });
    }
    files
}

/// v2 of a [`mixed_tree`]: `changed_fraction` of the files get two small edits (16 bytes
/// replaced, 8 inserted) and a new mtime, and `added` new small files appear.
pub fn next_version(
    v1: &[FileSpec],
    seed: u64,
    changed_fraction: f64,
    added: usize,
) -> Vec<FileSpec> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v2 = v1.to_vec();
    let changes = ((v1.len() as f64) * changed_fraction).round() as usize;
    for _ in 0..changes {
        let index = rng.gen_range(0..v2.len());
        let spec = &mut v2[index];
        let at = rng.gen_range(0..spec.len.max(1));
        let replace: Vec<u8> = (0..16).map(|_| rng.gen()).collect();
        spec.edits.push((at, replace, false));
        let at = rng.gen_range(0..spec.len.max(1));
        let insert: Vec<u8> = (0..8).map(|_| rng.gen()).collect();
        spec.edits.push((at, insert, true));
        spec.mtime_secs = BASE_MTIME_SECS + 1000;
    }
    for i in 0..added {
        v2.push(FileSpec {
            rel: format!("d{:02}/new/added{i:03}.dat", i % 50),
            len: rng.gen_range(1_000..200_000),
            seed: rng.gen(),
            content: Content::Text,
            mtime_secs: BASE_MTIME_SECS + 1000,
            edits: Vec::new(),
        });
    }
    v2
}

/// `CAP_NET_RAW`, the capability `ping` carries.
pub const CAP_NET_RAW: u32 = 13;

/// The value of a `security.capability` xattr granting `caps` (bit numbers) permitted and
/// effective: `struct vfs_cap_data`, revision 2, little-endian, as `setcap cap_x+ep` writes it.
pub fn capability_xattr(caps: &[u32]) -> Vec<u8> {
    const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
    const VFS_CAP_FLAGS_EFFECTIVE: u32 = 0x0000_0001;
    let mut permitted = [0u32; 2];
    for cap in caps {
        permitted[(*cap / 32) as usize] |= 1 << (cap % 32);
    }
    let mut out = (VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE)
        .to_le_bytes()
        .to_vec();
    for word in permitted {
        out.extend_from_slice(&word.to_le_bytes()); // permitted
        out.extend_from_slice(&0u32.to_le_bytes()); // inheritable
    }
    out
}

/// One entry of a POSIX ACL.
#[derive(Clone, Copy, Debug)]
pub enum AclEntry {
    Owner(u16),
    User(u32, u16),
    Group(u16),
    NamedGroup(u32, u16),
    Mask(u16),
    Other(u16),
}

/// The value of a `system.posix_acl_access` or `system.posix_acl_default` xattr holding
/// `entries` (given in the kernel's order: owner, users, group, groups, mask, other): version 2,
/// then (tag, permissions, id) little-endian, as `setfacl` writes it.
pub fn acl_xattr(entries: &[AclEntry]) -> Vec<u8> {
    const UNDEFINED_ID: u32 = u32::MAX;
    let mut out = 2u32.to_le_bytes().to_vec();
    for entry in entries {
        let (tag, perm, id): (u16, u16, u32) = match *entry {
            AclEntry::Owner(p) => (0x01, p, UNDEFINED_ID),
            AclEntry::User(id, p) => (0x02, p, id),
            AclEntry::Group(p) => (0x04, p, UNDEFINED_ID),
            AclEntry::NamedGroup(id, p) => (0x08, p, id),
            AclEntry::Mask(p) => (0x10, p, UNDEFINED_ID),
            AclEntry::Other(p) => (0x20, p, UNDEFINED_ID),
        };
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}
