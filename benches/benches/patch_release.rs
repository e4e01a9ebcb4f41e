//! What an OS patch release costs on the WAN (issue 20): two versions of a Debian bookworm
//! minbase root, the second with a handful of packages added, packed as Stagecoach bundles and
//! set beside `tar | zstd -3` of the first, `zstd -3` of the second's new and changed files,
//! and casync's chunk store, all in the same run.
//!
//! `cargo bench -p benches --bench patch_release`
//!
//! Needs root and mmdebstrap (`scripts/install-deps.sh` installs it) and, the first time, the
//! Debian mirror (`STAGECOACH_DEBIAN_MIRROR`, default deb.debian.org): the trees are built once
//! and cached under `$HOME/.cache/stagecoach/rootfs/<blake3 of their inputs>/`. casync is
//! optional (Debian's `casync`); without it its column says so.
//!
//! A site pulls exactly the chunks it lacks, so the WAN bytes of a version are counted here as
//! the stored bytes of its chunks the site does not hold, plus its signed manifest. The mesh
//! adds 0.4% of bao hashes and QUIC's headers on the wire (`netsim demo` measures those).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use proto::chunking::ChunkerParams;
use proto::manifest::{generate_signing_key, BundleKind};
use proto::pack::{pack_path, MemChunks, PackOptions, PackedBundle};
use stagecoach_testing::debian;

const SUITE: &str = "bookworm";
const VARIANT: &str = "minbase";
/// The patch release: packages added to the first version's.
const PATCH_PACKAGES: &[&str] = &["less", "procps", "iproute2", "netbase", "iputils-ping"];
/// Average chunk sizes tried besides the default, for the choice issue 20 asks to measure.
const AVERAGES_KIB: &[usize] = &[512, 128, 64, 32];

fn main() {
    if !is_root() {
        eprintln!("patch_release: skipped: needs root (the trees hold files of many owners)");
        return;
    }
    if !have("mmdebstrap") {
        eprintln!("patch_release: skipped: mmdebstrap is not installed (scripts/install-deps.sh)");
        return;
    }
    let mirror = debian::mirror();
    let v1 = cached_tree(&mirror, &[]).expect("build the first version");
    let v2 = cached_tree(&mirror, PATCH_PACKAGES).expect("build the patch release");
    let changed = changed_files(&v1, &v2).expect("compare the trees");
    let raw_v1 = tree_bytes(&v1);
    println!(
        "trees: {} ({:.1} MB of file content), patch release adds {} → {} new or changed files ({:.1} MB)",
        v1.display(),
        mb(raw_v1),
        PATCH_PACKAGES.join(","),
        changed.len(),
        mb(changed.iter().map(|(_, len)| len).sum::<u64>()),
    );

    let whole_zstd = tar_zstd(&v1, None).expect("tar | zstd -3 of the first version");
    let changed_zstd = tar_zstd(&v2, Some(&changed)).expect("zstd -3 of the changed files");
    let casync = casync_bytes(&v1, &v2);

    println!();
    println!("| packer | first copy MB | ÷ tar\\|zstd -3 | patch MB | ÷ zstd -3 of changed files | chunks v1 | manifest v1 KB |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| tar \\| zstd -3 (whole tree) | {:.2} | 1.00 | {:.2} | — | — | — |",
        mb(whole_zstd),
        mb(changed_zstd)
    );
    match &casync {
        Ok((first, patch)) => println!(
            "| casync (64 KiB average) | {:.2} | {:.2} | {:.2} | {:.2} | — | — |",
            mb(*first),
            *first as f64 / whole_zstd as f64,
            mb(*patch),
            *patch as f64 / changed_zstd as f64
        ),
        Err(reason) => println!("| casync | {reason} | | | | | |"),
    }
    for &avg_kib in AVERAGES_KIB {
        let chunker = ChunkerParams::with_avg(avg_kib * 1024);
        let started = Instant::now();
        let (first, patch, chunks, manifest) = stagecoach_bytes(&v1, &v2, chunker);
        let label = if chunker == ChunkerParams::DEFAULT {
            format!("stagecoach, {avg_kib} KiB average (default)")
        } else {
            format!("stagecoach, {avg_kib} KiB average")
        };
        println!(
            "| {label} | {:.2} | {:.2} | {:.2} | {:.2} | {chunks} | {:.1} |",
            mb(first),
            first as f64 / whole_zstd as f64,
            mb(patch),
            patch as f64 / changed_zstd as f64,
            manifest as f64 / 1000.0
        );
        eprintln!(
            "  packed both versions at {avg_kib} KiB in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    println!();
    println!("first copy: what a site without the bundle pulls; patch: what a site holding the first version pulls for the second.");
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Whether this process runs as root: `/proc/self` belongs to its effective user.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Packs both versions into one store of `chunker`'s chunks: the first version's stored bytes
/// plus manifest, the second's new chunks plus manifest, the first's chunk count and its
/// manifest's size.
fn stagecoach_bytes(v1: &Path, v2: &Path, chunker: ChunkerParams) -> (u64, u64, usize, u64) {
    let key = generate_signing_key();
    let pack = |tree: &Path, version: &str, chunks: &mut MemChunks| -> PackedBundle {
        let mut options = PackOptions::new("debian", version, BundleKind::OsImage);
        options.chunker = chunker;
        pack_path(tree, &options, &key, chunks, &mut |_| {}).expect("pack")
    };
    let mut chunks = MemChunks::new();
    let first = pack(v1, "1", &mut chunks);
    let held: HashSet<_> = chunks.hashes().copied().collect();
    let first_bytes = chunks.stored_bytes() + first.signed.manifest_bytes.len() as u64;
    let second = pack(v2, "2", &mut chunks);
    let mut counted = HashSet::new();
    let patch_chunks: u64 = second
        .manifest
        .chunks
        .iter()
        .filter(|c| !held.contains(&c.hash) && counted.insert(c.hash))
        .map(|c| c.stored_bytes)
        .sum();
    let patch_bytes = patch_chunks + second.signed.manifest_bytes.len() as u64;
    (
        first_bytes,
        patch_bytes,
        held.len(),
        first.signed.manifest_bytes.len() as u64,
    )
}

/// Bytes of `tar -C tree -c . | zstd -3`, or of only `files` (paths relative to `tree`).
fn tar_zstd(tree: &Path, files: Option<&[(PathBuf, u64)]>) -> io::Result<u64> {
    let mut tar = Command::new("tar");
    tar.arg("-C").arg(tree).arg("-cf").arg("-");
    let list_file;
    match files {
        Some(files) => {
            list_file = tempfile::NamedTempFile::new()?;
            let mut list = Vec::new();
            for (path, _) in files {
                list.extend_from_slice(path.as_os_str().as_encoded_bytes());
                list.push(0);
            }
            fs::write(list_file.path(), list)?;
            tar.arg("--null")
                .arg("--no-recursion")
                .arg("-T")
                .arg(list_file.path());
        }
        None => {
            tar.arg(".");
        }
    }
    let mut tar = tar.stdout(Stdio::piped()).spawn()?;
    let tar_out = tar
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("no tar output"))?;
    let mut zstd = Command::new("zstd")
        .args(["-3", "-T1", "-c", "-q"])
        .stdin(tar_out)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = zstd
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("no zstd output"))?;
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    if !tar.wait()?.success() || !zstd.wait()?.success() {
        return Err(io::Error::other("tar | zstd failed"));
    }
    Ok(total)
}

/// casync with its defaults: the first version's chunk store plus its index, then the chunks
/// the second version adds to the same store plus its index.
fn casync_bytes(v1: &Path, v2: &Path) -> Result<(u64, u64), String> {
    if !have("casync") {
        return Err("not installed (apt-get install casync)".to_owned());
    }
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store = work.path().join("store");
    let make = |tree: &Path, index: &Path| -> Result<u64, String> {
        let status = Command::new("casync")
            .arg("make")
            .arg(format!("--store={}", store.display()))
            .arg(index)
            .arg(tree)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("casync make failed: {status}"));
        }
        fs::metadata(index)
            .map(|m| m.len())
            .map_err(|e| e.to_string())
    };
    let index1 = make(v1, &work.path().join("v1.caidx"))?;
    let after_v1 = file_sizes(&store);
    let index2 = make(v2, &work.path().join("v2.caidx"))?;
    let after_v2 = file_sizes(&store);
    let first: u64 = after_v1.values().sum::<u64>() + index1;
    let added: u64 = after_v2
        .iter()
        .filter(|(path, _)| !after_v1.contains_key(*path))
        .map(|(_, len)| len)
        .sum();
    Ok((first, added + index2))
}

/// Every regular file under `dir` with its size.
fn file_sizes(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                out.insert(entry.path(), meta.len());
            }
        }
    }
    out
}

fn tree_bytes(tree: &Path) -> u64 {
    file_sizes(tree).values().sum()
}

/// Files of `v2` (relative paths, sizes) that `v1` lacks or holds with other content.
fn changed_files(v1: &Path, v2: &Path) -> io::Result<Vec<(PathBuf, u64)>> {
    let mut changed = Vec::new();
    for (path, len) in file_sizes(v2) {
        let rel = path
            .strip_prefix(v2)
            .map_err(io::Error::other)?
            .to_path_buf();
        let old = v1.join(&rel);
        let same = match old.symlink_metadata() {
            Ok(meta) if meta.is_file() && meta.len() == len => {
                blake3::hash(&fs::read(&old)?) == blake3::hash(&fs::read(&path)?)
            }
            _ => false,
        };
        if !same {
            changed.push((rel, len));
        }
    }
    Ok(changed)
}

/// A bookworm minbase tree with `packages` added, built once with mmdebstrap and cached.
fn cached_tree(mirror: &str, packages: &[&str]) -> io::Result<PathBuf> {
    debian::TreeSpec {
        suite: SUITE,
        variant: VARIANT,
        packages,
        mirror,
    }
    .build()
}
