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

/// What a user sees of one entry: type, content, mode, mtime.
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

/// One entry of a [`snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntrySnapshot {
    pub kind: EntryKind,
    /// `mode & 0o7777`; 0 for symlinks, whose mode Linux does not let anyone set.
    pub mode: u32,
    pub mtime_secs: i64,
}

/// Every entry under `root` (the root itself under the empty path), keyed by relative path bytes.
pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, EntrySnapshot> {
    let mut out = BTreeMap::new();
    snapshot_into(root, Vec::new(), &mut out);
    out
}

fn snapshot_into(path: &Path, rel: Vec<u8>, out: &mut BTreeMap<Vec<u8>, EntrySnapshot>) {
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
    out.insert(
        rel.clone(),
        EntrySnapshot {
            kind,
            mode,
            mtime_secs: metadata.mtime(),
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
            snapshot_into(&entry.path(), child, out);
        }
    }
}

/// Sets atime and mtime of `path` itself (not a symlink's target), in whole seconds.
pub fn set_times(path: &Path, atime_secs: i64, mtime_secs: i64) {
    let c_path = CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    let times = [
        libc::timespec {
            tv_sec: atime_secs,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: mtime_secs,
            tv_nsec: 0,
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
    let c_path = CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: valid C string.
    let rc = unsafe {
        libc::mknod(
            c_path.as_ptr(),
            libc::S_IFCHR | 0o640,
            libc::makedev(major, minor),
        )
    };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
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
