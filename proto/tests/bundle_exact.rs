//! Exact unpack: a tree with every kind of entry and attribute (owners, setuid/setgid/sticky
//! modes, nanosecond and pre-1970 mtimes, hard links, device nodes, fifos, symlinks, file
//! capabilities, POSIX ACLs, `user.*` and `trusted.*` xattrs) packed into a real store and
//! unpacked comes back identical on every attribute, and packs again to the same bundle. As
//! another user, what only root may restore is counted, not silently dropped.

mod bundle_common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use bundle_common::*;
use proto::bundles::StoreSink;
use proto::chunking::ChunkerParams;
use proto::manifest::SignedManifest;
use proto::pack::{pack_path, unpack, ChunkSource, MemChunks, PackedBundle, UnpackStats};
use proto::store::{Store, StoreOptions};

/// Small chunks, so entries and pax headers straddle chunk boundaries.
const SMALL_CHUNKS: ChunkerParams = ChunkerParams {
    min_bytes: 1024,
    avg_bytes: 4096,
    max_bytes: 16384,
};

const ALICE: u32 = 1000;
const BOB: u32 = 1001;
const STAFF: u32 = 2000;
/// Beyond what a GNU header's octal field holds (base-256 then).
const HUGE_ID: u32 = 4_000_000_000;
/// The unprivileged user the second test unpacks as.
const NOBODY: u32 = 65534;

const RWX: u16 = 7;
const RW: u16 = 6;
const RX: u16 = 5;
const R: u16 = 4;

/// Names the work directory of the child unpack run by
/// [`unpacking_as_another_user_counts_what_only_root_may_restore`].
const CHILD_WORK_VAR: &str = "STAGECOACH_EXACT_CHILD_WORK";

fn write(root: &Path, rel: &str, content: &[u8], uid: u32, gid: u32, mode: u32) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, content).unwrap();
    lchown(&path, uid, gid);
    set_mode(&path, mode);
}

fn dir(root: &Path, rel: &str, uid: u32, gid: u32, mode: u32) {
    let path = root.join(rel);
    fs::create_dir_all(&path).unwrap();
    lchown(&path, uid, gid);
    set_mode(&path, mode);
}

fn set_xattr(root: &Path, rel: &str, name: &str, value: &[u8]) {
    xattr::set(root.join(rel), name, value).unwrap_or_else(|e| panic!("set {name} on {rel}: {e}"));
}

/// Builds the tree (as root). Every entry ends with its own nanosecond mtime.
fn build_exact_tree(root: &Path) {
    dir(root, "", 0, 0, 0o755);
    set_xattr(root, "", "user.tree", b"exact");
    dir(root, "usr/bin", 0, 0, 0o755);
    write(root, "usr/bin/ping", &[0x7f; 40_000], 0, 0, 0o755);
    set_xattr(
        root,
        "usr/bin/ping",
        "security.capability",
        &capability_xattr(&[CAP_NET_RAW]),
    );
    write(root, "usr/bin/sudo", b"#!/bin/false\n", 0, 0, 0o4755);
    write(root, "usr/bin/wall", b"#!/bin/false\n", 0, 5, 0o2755);
    write(root, "etc/shadow", b"root:*:19000::::::\n", 0, 42, 0o640);
    dir(root, "tmp", 0, 0, 0o1777);
    dir(root, "var/mail", 0, 8, 0o2775);

    dir(root, "home/alice", ALICE, ALICE, 0o700);
    write(root, "home/alice/notes", b"private", ALICE, ALICE, 0o600);
    // Values a line-based pax reader would cut, an empty one, a long name, a large value.
    set_xattr(root, "home/alice/notes", "user.binary", b"a\nb=c\0\n\xff");
    set_xattr(root, "home/alice/notes", "user.empty", b"");
    set_xattr(
        root,
        "home/alice/notes",
        &format!("user.{}", "n".repeat(200)),
        b"long name",
    );
    set_xattr(root, "home/alice/notes", "user.big", &vec![b'v'; 3000]);
    set_xattr(root, "home/alice/notes", "trusted.origin", b"build-42");
    set_xattr(
        root,
        "home/alice",
        "user.dir",
        b"a directory's own attribute",
    );
    symlink("notes", root.join("home/alice/notes.link")).unwrap();
    lchown(&root.join("home/alice/notes.link"), ALICE, ALICE);
    set_xattr(
        root,
        "home/alice/notes.link",
        "trusted.link",
        b"on the symlink itself",
    );
    dir(root, "home/alice/frozen", ALICE, ALICE, 0o755);
    write(
        root,
        "home/alice/frozen/inside",
        b"in a read-only dir",
        ALICE,
        ALICE,
        0o444,
    );
    set_mode(&root.join("home/alice/frozen"), 0o555);

    // A shared directory with access and default ACLs, and a file with a named-user ACL.
    dir(root, "srv/shared", ALICE, STAFF, 0o2775);
    set_xattr(
        root,
        "srv/shared",
        "system.posix_acl_access",
        &acl_xattr(&[
            AclEntry::Owner(RWX),
            AclEntry::User(BOB, RWX),
            AclEntry::Group(RWX),
            AclEntry::Mask(RWX),
            AclEntry::Other(RX),
        ]),
    );
    set_xattr(
        root,
        "srv/shared",
        "system.posix_acl_default",
        &acl_xattr(&[
            AclEntry::Owner(RWX),
            AclEntry::User(BOB, RW),
            AclEntry::Group(RX),
            AclEntry::NamedGroup(STAFF + 1, RWX),
            AclEntry::Mask(RWX),
            AclEntry::Other(0),
        ]),
    );
    write(root, "srv/shared/report", b"numbers", BOB, STAFF, 0o664);
    set_xattr(
        root,
        "srv/shared/report",
        "system.posix_acl_access",
        &acl_xattr(&[
            AclEntry::Owner(RW),
            AclEntry::User(ALICE + 2, R),
            AclEntry::Group(RW),
            AclEntry::Mask(RW),
            AclEntry::Other(R),
        ]),
    );

    // One file with three names in three directories, a hard-linked symlink, fifo and device.
    write(root, "data/linked-a", &[0x33; 20_000], ALICE, STAFF, 0o640);
    set_xattr(root, "data/linked-a", "user.tag", b"one inode");
    fs::create_dir_all(root.join("data/sub")).unwrap();
    fs::hard_link(root.join("data/linked-a"), root.join("data/sub/linked-b")).unwrap();
    fs::hard_link(root.join("data/linked-a"), root.join("home/alice/linked-c")).unwrap();
    symlink("../usr/bin", root.join("data/bin")).unwrap();
    fs::hard_link(root.join("data/bin"), root.join("data/bin-again")).unwrap();

    dir(root, "dev", 0, 0, 0o755);
    mknod(&root.join("dev/null"), libc::S_IFCHR | 0o666, 1, 3);
    mknod(&root.join("dev/loop0"), libc::S_IFBLK | 0o660, 7, 0);
    lchown(&root.join("dev/loop0"), 0, 6);
    set_xattr(root, "dev/loop0", "trusted.device", b"loop");
    mkfifo(&root.join("dev/initctl"), 0o600);
    set_mode(&root.join("dev/initctl"), 0o620);
    lchown(&root.join("dev/initctl"), ALICE, 5);
    fs::hard_link(root.join("dev/initctl"), root.join("dev/initctl-again")).unwrap();
    fs::hard_link(root.join("dev/null"), root.join("dev/null-again")).unwrap();

    write(
        root,
        "var/huge-ids",
        b"far away",
        HUGE_ID,
        HUGE_ID + 1,
        0o644,
    );
    write(root, "var/before-1970", b"old", 0, 0, 0o644);

    // Times last, deepest first: every entry its own nanoseconds; one before 1970.
    let entries = snapshot(root);
    for (i, rel) in entries.keys().rev().enumerate() {
        let i = i as i64;
        set_times_ns(
            &path_from_bytes(root, rel),
            7,
            1_600_000_000 + i * 1000,
            (i * 123_456_789 + 1) % 1_000_000_000,
        );
    }
    set_times_ns(&root.join("var/before-1970"), 7, -12_346, 500_000_000);
}

/// Packs `root` into a store in `store_dir`, reads the manifest back, verifies it, and
/// unpacks into `dest`.
fn pack_store_unpack(root: &Path, store_dir: &Path, dest: &Path) -> (PackedBundle, UnpackStats) {
    let store = Store::open(store_dir, StoreOptions::default()).unwrap();
    let packed = pack_path(
        root,
        &options(SMALL_CHUNKS),
        &test_key(),
        &mut StoreSink(&store),
        &mut |_| {},
    )
    .unwrap();
    store.put_manifest(&packed.signed).unwrap();
    let manifest = store
        .get_manifest(&packed.id)
        .unwrap()
        .expect("manifest stored")
        .verify_as(packed.id, &[test_key().verifying_key()])
        .unwrap();
    let stats = unpack(&manifest, &store, dest, &mut |_| {}).unwrap();
    (packed, stats)
}

#[test]
fn every_kind_of_entry_and_attribute_round_trips_through_a_store() {
    let test = "every_kind_of_entry_and_attribute_round_trips_through_a_store";
    if !is_root() {
        skip_or_fail(
            test,
            "needs root to create device nodes, set owners, trusted.* xattrs and file capabilities",
        );
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("tree");
    build_exact_tree(&root);
    let expected = snapshot(&root);
    assert_eq!(
        expected[b"usr/bin/ping".as_slice()].xattrs[b"security.capability".as_slice()],
        capability_xattr(&[CAP_NET_RAW])
    );

    let store_dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("restored");
    let (packed, stats) = pack_store_unpack(&root, store_dir.path(), &dest);
    let compared = assert_same_entries(&expected, &snapshot(&dest));
    eprintln!("compared {compared} entries on every attribute");

    // linked-b, linked-c, bin-again, initctl-again, null-again.
    assert_eq!(packed.stats.hard_links, 5);
    assert_eq!(stats.hard_links, 5);
    assert_eq!(stats.specials, 3);
    assert_eq!(stats.xattrs, packed.stats.xattrs);
    assert_eq!(
        (
            stats.owners_skipped,
            stats.xattrs_skipped,
            stats.specials_skipped
        ),
        (0, 0, 0)
    );

    // The unpacked tree is the same tree: it packs to the same chunks and bundle id.
    let mut again = MemChunks::new();
    let repacked = pack_path(
        &dest,
        &options(SMALL_CHUNKS),
        &test_key(),
        &mut again,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(repacked.manifest.chunks, packed.manifest.chunks);
    assert_eq!(repacked.id, packed.id);
}

/// Chunks read from a directory of files named by hash: what the child process unpacks from.
struct DirChunks(std::path::PathBuf);

impl ChunkSource for DirChunks {
    type Error = std::io::Error;

    fn get_chunk(&self, hash: proto::hash::BlobHash) -> Result<Vec<u8>, std::io::Error> {
        fs::read(self.0.join(hash.to_string()))
    }
}

#[test]
fn unpacking_as_another_user_counts_what_only_root_may_restore() {
    let test = "unpacking_as_another_user_counts_what_only_root_may_restore";
    if !is_root() {
        skip_or_fail(
            test,
            "needs root to build the tree and to unpack as user nobody",
        );
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("tree");
    build_exact_tree(&root);
    let (packed, chunks) = pack_mem(&root, &options(SMALL_CHUNKS));

    // A work directory the child can use: the bundle, a copy of this test binary, and its
    // destination.
    let work_parent = tempfile::tempdir().unwrap();
    fs::set_permissions(work_parent.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let work = work_parent.path().join("work");
    fs::create_dir_all(work.join("chunks")).unwrap();
    fs::write(work.join("manifest"), packed.signed.to_bytes()).unwrap();
    for hash in chunks.hashes() {
        fs::write(
            work.join("chunks").join(hash.to_string()),
            chunks.get(hash).unwrap(),
        )
        .unwrap();
    }
    let exe = work.join("test-binary");
    fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    for entry in walk(&work) {
        lchown(&entry, NOBODY, NOBODY);
    }
    let output = Command::new(&exe)
        .args([
            "--exact",
            "child_unpacks_as_nobody",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_WORK_VAR, &work)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let counters: BTreeMap<&str, u64> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("counter "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k, v.parse().unwrap()))
        .collect();
    // Owners: nothing in the tree is nobody's, so every entry restored (all but the five hard
    // links and the two device nodes) counts.
    let entries = snapshot(&root);
    assert_eq!(counters["owners_skipped"], (entries.len() - 5 - 2) as u64);
    // security.capability, trusted.origin, trusted.link, trusted.device (the last on a device
    // node that is skipped, so never tried).
    assert_eq!(counters["xattrs_skipped"], 3);
    // dev/null, dev/loop0 and the hard link to dev/null.
    assert_eq!(counters["specials_skipped"], 3);
    assert_eq!(counters["hard_links"], 4);

    // Everything else came back: content, modes, mtimes, user.* xattrs and ACLs.
    let restored = snapshot(&work.join("dest"));
    for (rel, want) in &entries {
        let shown = String::from_utf8_lossy(rel);
        if rel.starts_with(b"dev/null") || rel.as_slice() == b"dev/loop0" {
            assert!(
                !restored.contains_key(rel),
                "{shown}: a device node appeared"
            );
            continue;
        }
        let got = &restored[rel];
        assert_eq!(got.kind, want.kind, "{shown}");
        assert_eq!(got.mode, want.mode, "{shown}: mode");
        assert_eq!((got.uid, got.gid), (NOBODY, NOBODY), "{shown}: owner");
        assert_eq!(
            (got.mtime_secs, got.mtime_nsec),
            (want.mtime_secs, want.mtime_nsec),
            "{shown}"
        );
        let unprivileged: BTreeMap<_, _> = want
            .xattrs
            .iter()
            .filter(|(name, _)| !name.starts_with(b"trusted.") && !name.starts_with(b"security."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(got.xattrs, unprivileged, "{shown}: xattrs");
    }
}

/// Not a test of its own: the unprivileged half of
/// [`unpacking_as_another_user_counts_what_only_root_may_restore`], run by it in a child
/// process as user nobody.
#[test]
#[ignore = "run as user nobody by unpacking_as_another_user_counts_what_only_root_may_restore"]
fn child_unpacks_as_nobody() {
    let work = std::path::PathBuf::from(
        std::env::var_os(CHILD_WORK_VAR).expect("run by the parent test with its work directory"),
    );
    let signed = SignedManifest::from_bytes(&fs::read(work.join("manifest")).unwrap()).unwrap();
    let manifest = signed.verify(&[test_key().verifying_key()]).unwrap();
    let stats = unpack(
        &manifest,
        &DirChunks(work.join("chunks")),
        &work.join("dest"),
        &mut |_| {},
    )
    .unwrap();
    println!("counter owners_skipped={}", stats.owners_skipped);
    println!("counter xattrs_skipped={}", stats.xattrs_skipped);
    println!("counter specials_skipped={}", stats.specials_skipped);
    println!("counter hard_links={}", stats.hard_links);
}

/// Every path under `root`, `root` included, not following symlinks.
fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let path = out[i].clone();
        if fs::symlink_metadata(&path).unwrap().is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                out.push(entry.unwrap().path());
            }
        }
        i += 1;
    }
    out
}
