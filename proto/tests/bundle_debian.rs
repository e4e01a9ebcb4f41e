//! A real Debian root tree (bookworm, minbase, built with mmdebstrap), with a file capability, a
//! POSIX ACL, a hard link and device nodes added, packed into a real store and unpacked into a
//! fresh directory, comes back identical entry by entry on every attribute: type, mode, owner,
//! group, size, content hash, mtime, symlink target, device number, hard-link groups, xattrs.
//!
//! Needs root, mmdebstrap (`scripts/install-deps.sh` installs it) and, the first time, the
//! network: the tree is built once and cached under
//! `$HOME/.cache/stagecoach/rootfs/<blake3 of its inputs>/`. Prints pack and unpack throughput:
//!
//! `cargo test --release -p proto --test bundle_debian -- --nocapture`

mod bundle_common;

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use bundle_common::*;
use proto::bundles::StoreSink;
use proto::chunking::ChunkerParams;
use proto::pack::{pack_path, unpack};
use proto::store::{Store, StoreOptions};
use stagecoach_testing::debian;

const TEST: &str = "debian_root_tree_unpacks_exactly";
const SUITE: &str = "bookworm";
const VARIANT: &str = "minbase";
/// Packages added to the variant's; part of the cache key.
const EXTRA_PACKAGES: &[&str] = &[];

#[test]
fn debian_root_tree_unpacks_exactly() {
    if !is_root() {
        skip_or_fail(
            TEST,
            "needs root: the tree holds files of many owners, device nodes and file capabilities",
        );
        return;
    }
    if tool_version("mmdebstrap").is_none() {
        skip_or_fail(
            TEST,
            "mmdebstrap is not installed (scripts/install-deps.sh installs it)",
        );
        return;
    };
    let mirror = debian::mirror();
    let cached = match cached_rootfs(&mirror) {
        Ok(Some(tree)) => tree,
        Ok(None) => return, // skipped: no network
        Err(e) => panic!("cannot build the Debian tree: {e}"),
    };

    // A copy, so the cache stays as mmdebstrap made it, with what minbase lacks added.
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    run(Command::new("cp").arg("-a").arg(&cached).arg(&source));
    add_attributes(&source);

    let expected = snapshot(&source);
    // File content as packed: once per inode.
    let content_bytes: u64 = expected
        .iter()
        .filter(|(rel, e)| e.hard_link_group.as_ref().is_none_or(|first| first == *rel))
        .map(|(_, e)| match e.kind {
            EntryKind::File { len, .. } => len,
            _ => 0,
        })
        .sum();
    let distinct =
        |pred: &dyn Fn(&EntrySnapshot) -> bool| expected.values().filter(|e| pred(e)).count();
    let devices =
        distinct(&|e| matches!(e.kind, EntryKind::CharDevice(_) | EntryKind::BlockDevice(_)));
    let linked = distinct(&|e| e.hard_link_group.is_some());
    let with_xattrs = distinct(&|e| !e.xattrs.is_empty());
    let setid = distinct(&|e| e.mode & 0o6000 != 0);
    let not_root_owned = distinct(&|e| (e.uid, e.gid) != (0, 0));
    assert!(devices >= 2 && linked >= 2 && with_xattrs >= 3 && setid >= 1 && not_root_owned >= 1);

    let store_dir = work.path().join("store");
    let store = Store::open(&store_dir, StoreOptions::default()).unwrap();
    let started = Instant::now();
    let packed = pack_path(
        &source,
        &options(ChunkerParams::DEFAULT),
        &test_key(),
        &mut StoreSink(&store),
        &mut |_| {},
    )
    .unwrap();
    let pack_secs = started.elapsed().as_secs_f64();
    store.put_manifest(&packed.signed).unwrap();
    let manifest = store
        .get_manifest(&packed.id)
        .unwrap()
        .expect("manifest stored")
        .verify_as(packed.id, &[test_key().verifying_key()])
        .unwrap();

    let dest = work.path().join("unpacked");
    let started = Instant::now();
    let stats = unpack(&manifest, &store, &dest, &mut |_| {}).unwrap();
    let unpack_secs = started.elapsed().as_secs_f64();

    let compared = assert_same_entries(&expected, &snapshot(&dest));
    let mb = content_bytes as f64 / 1e6;
    println!(
        "debian {SUITE} {VARIANT}: compared {compared} entries on every attribute ({} files, {} dirs, {} symlinks, {} hard links, {} devices and fifos, {} xattrs on {with_xattrs} entries, {setid} setuid/setgid, {not_root_owned} not owned by root:root)",
        stats.files, stats.dirs, stats.symlinks, stats.hard_links, stats.specials, stats.xattrs
    );
    println!(
        "debian {SUITE} {VARIANT}: {mb:.0} MB of file content, {:.0} MB tar stream, {} chunks, {:.0} MB stored; pack {pack_secs:.2} s = {:.0} MB/s; unpack {unpack_secs:.2} s = {:.0} MB/s",
        manifest.total_raw_bytes as f64 / 1e6,
        manifest.chunks.len(),
        manifest.total_stored_bytes as f64 / 1e6,
        mb / pack_secs,
        mb / unpack_secs,
    );
    assert_eq!(
        (
            stats.owners_skipped,
            stats.xattrs_skipped,
            stats.specials_skipped
        ),
        (0, 0, 0)
    );
}

/// The cached tree for these inputs, built first if missing; `None` (after reporting the skip)
/// when it must be built and the mirror cannot be reached.
fn cached_rootfs(mirror: &str) -> io::Result<Option<PathBuf>> {
    let spec = debian::TreeSpec {
        suite: SUITE,
        variant: VARIANT,
        packages: EXTRA_PACKAGES,
        mirror,
    };
    if let Some(tree) = spec.cached()? {
        eprintln!("{TEST}: using the cached tree {}", tree.display());
        return Ok(Some(tree));
    }
    if let Err(reason) = debian::mirror_reachable(mirror) {
        skip_or_fail(TEST, &format!("no cached tree and no network: {reason}"));
        return Ok(None);
    }
    spec.build().map(Some)
}

/// Adds to a Debian tree what minbase lacks: a binary with a file capability, POSIX ACLs, a
/// `user.*` xattr, a hard link, and device nodes. With the system tools when present
/// (`setcap`, `setfacl`), otherwise by writing the xattr bytes they would write.
fn add_attributes(root: &Path) {
    let bin = root.join("usr/local/bin");
    fs::create_dir_all(&bin).unwrap();
    let ping = bin.join("ping-copy");
    fs::copy(root.join("usr/bin/true"), &ping).unwrap();
    set_mode(&ping, 0o755);
    if let Some(setcap) = on_path("setcap") {
        run(Command::new(setcap).arg("cap_net_raw+ep").arg(&ping));
    } else {
        xattr::set(
            &ping,
            "security.capability",
            &capability_xattr(&[CAP_NET_RAW]),
        )
        .unwrap();
    }
    assert_eq!(
        xattr::get(&ping, "security.capability").unwrap(),
        Some(capability_xattr(&[CAP_NET_RAW])),
        "setcap and the test disagree on the capability bytes"
    );

    let shared = root.join("srv/shared");
    fs::create_dir_all(&shared).unwrap();
    let notes = shared.join("notes");
    fs::write(&notes, b"shared notes\n").unwrap();
    set_mode(&notes, 0o640);
    let access = acl_xattr(&[
        AclEntry::Owner(6),
        AclEntry::User(1000, 6),
        AclEntry::Group(4),
        AclEntry::Mask(6),
        AclEntry::Other(0),
    ]);
    let default = acl_xattr(&[
        AclEntry::Owner(7),
        AclEntry::Group(5),
        AclEntry::NamedGroup(100, 7),
        AclEntry::Mask(7),
        AclEntry::Other(5),
    ]);
    if let Some(setfacl) = on_path("setfacl") {
        run(Command::new(&setfacl)
            .arg("-m")
            .arg("u:1000:rw")
            .arg(&notes));
        run(Command::new(&setfacl)
            .arg("-d")
            .arg("-m")
            .arg("g:100:rwx")
            .arg(&shared));
    } else {
        xattr::set(&notes, "system.posix_acl_access", &access).unwrap();
        xattr::set(&shared, "system.posix_acl_default", &default).unwrap();
    }
    assert!(xattr::get(&notes, "system.posix_acl_access")
        .unwrap()
        .is_some());
    assert!(xattr::get(&shared, "system.posix_acl_default")
        .unwrap()
        .is_some());
    xattr::set(&notes, "user.comment", b"added by the test").unwrap();

    fs::hard_link(
        root.join("etc/hostname"),
        root.join("etc/hostname.hardlink"),
    )
    .unwrap();
    let dev = root.join("usr/local/dev");
    fs::create_dir_all(&dev).unwrap();
    mknod(&dev.join("net-tun"), libc::S_IFCHR | 0o666, 10, 200);
    mknod(&dev.join("loop7"), libc::S_IFBLK | 0o660, 7, 7);
    lchown(&dev.join("loop7"), 0, 6);
}

/// Whether `tool` is an executable on `PATH` (or in the sbin directories, where Debian puts
/// setcap).
fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(tool))
        .find(|exe| {
            fs::metadata(exe).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The first line `tool --version` prints, or `None` when it does not run.
fn tool_version(tool: &str) -> Option<String> {
    let output = Command::new(tool).arg("--version").output().ok()?;
    output.status.success().then(|| {
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned()
    })
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
