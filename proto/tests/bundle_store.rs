//! Pack into the real blob store, reopen it, read the bundle back and unpack: the tree comes back
//! byte for byte, and the manifest read back from the store still verifies.

mod bundle_common;

use std::os::unix::fs::symlink;

use bundle_common::*;
use proto::bundles::{has_all_chunks, pin_bundle, StoreSink};
use proto::chunking::ChunkerParams;
use proto::pack::{pack_path, unpack};
use proto::store::{Store, StoreOptions};

#[test]
fn pack_store_reopen_read_back_and_unpack_is_byte_identical() {
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("tree");
    std::fs::create_dir(&root).unwrap();
    write_files(&root, &mixed_tree(41, 120, 6 << 20, 2));
    std::fs::create_dir_all(root.join("empty/dir")).unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    symlink("d00/s0", root.join("link")).unwrap();
    symlink("does/not/exist", root.join("dangling")).unwrap();

    let store_dir = tempfile::tempdir().unwrap();
    let key = test_key();
    let (id, signed) = {
        let store = Store::open(store_dir.path(), StoreOptions::default()).unwrap();
        let packed = pack_path(
            &root,
            &options(ChunkerParams::DEFAULT),
            &key,
            &mut StoreSink(&store),
            &mut |_| {},
        )
        .unwrap();
        store.put_manifest(&packed.signed).unwrap();
        pin_bundle(&store, &packed.id, &packed.manifest).unwrap();
        (packed.id, packed.signed)
    };

    // A new process would see only what reached the disk: reopen and read everything back.
    let store = Store::open(store_dir.path(), StoreOptions::default()).unwrap();
    let read_back = store.get_manifest(&id).unwrap().expect("manifest stored");
    assert_eq!(read_back, signed);
    let manifest = read_back
        .verify_as(id, &[key.verifying_key()])
        .expect("stored manifest verifies");
    assert!(has_all_chunks(&store, &manifest));

    let dest = tempfile::tempdir().unwrap();
    let out = dest.path().join("out");
    unpack(&manifest, &store, &out, &mut |_| {}).unwrap();
    assert_eq!(snapshot(&root), snapshot(&out), "unpacked tree differs");
}
