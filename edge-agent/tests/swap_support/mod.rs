//! Shared fixtures for the swap tests: tiny OS bundles packed into real stores, simulated
//! machines, and tree comparisons.
// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use edge_agent::swap::journal::Journal;
use edge_agent::swap::platform::SLOT_MARKER_FILE;
use edge_agent::swap::sim::{self, BootRecord, SimError, SimHooks, SimMachineConfig};
use edge_agent::swap::store::open_store;
use edge_agent::swap::{Slot, SwapState};
use proto::bundles::StoreSink;
use proto::pack::{pack_path, PackOptions};
use proto::{BundleId, BundleKind};

/// The identity carried over in these tests: single files, and one directory.
pub const IDENTITY_PATHS: &[&str] = &[
    "etc/hostname",
    "etc/ssh/ssh_host_ed25519_key",
    "etc/ssh/ssh_host_ed25519_key.pub",
    "etc/network/interfaces",
    "etc/stagecoach",
    "etc/not-on-this-machine",
];

/// The health check of these tests: fails while `ROOT/health-fails` holds a count above zero
/// (decrementing it), and fails for an OS without `usr/bin/app`.
pub const HEALTH_CHECK: &str = "command=f=\"$STAGECOACH_SLOT_ROOT/../../health-fails\"; n=$(cat \"$f\" 2>/dev/null || echo 0); if [ \"$n\" -gt 0 ]; then echo $((n-1)) > \"$f\"; echo 'injected failure: stager unreachable' >&2; exit 1; fi; test -x \"$STAGECOACH_SLOT_ROOT/usr/bin/app\" || { echo 'usr/bin/app is missing' >&2; exit 1; }";

/// The agent binary under test.
pub fn agent() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edge-agent"))
}

/// One bundle of the fixture.
#[derive(Clone, Debug)]
pub struct Bundle {
    /// Its id.
    pub id: BundleId,
    /// The tree it was packed from.
    pub tree: PathBuf,
    /// Name, for outcome reports.
    pub name: &'static str,
}

/// Bundles, keys and a provisioned template machine.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub key: SigningKey,
    pub trusted_hex: String,
    /// The OS the machine runs before the swap.
    pub old: Bundle,
    /// The base (rescue) OS.
    pub rescue: Bundle,
    /// A healthy new OS.
    pub target: Bundle,
    /// A new OS that fails its health check (no usr/bin/app).
    pub broken: Bundle,
    /// The machine's identity files, as they are on the old OS.
    pub identity_src: PathBuf,
    /// A store holding every bundle, outside any machine.
    pub publisher_store: PathBuf,
    /// A provisioned machine to copy: old OS in A, identity in place, bundles in its store.
    pub template: PathBuf,
}

/// A file of a test tree: path, content, mode.
type FileSpec<'a> = (&'a str, &'a [u8], u32);

fn os_tree(dir: &Path, files: &[FileSpec<'_>]) {
    for sub in ["etc/ssh", "etc/network", "etc/stagecoach", "usr/bin"] {
        fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
    for (path, content, mode) in files {
        let full = dir.join(path);
        fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        fs::write(&full, content).expect("write");
        fs::set_permissions(&full, fs::Permissions::from_mode(*mode)).expect("chmod");
    }
}

/// Packs `tree` into the store at `store_dir`.
pub fn pack_into(
    store_dir: &Path,
    tree: &Path,
    name: &str,
    version: &str,
    kind: BundleKind,
    key: &SigningKey,
) -> BundleId {
    let store = open_store(store_dir).expect("open store");
    let packed = pack_path(
        tree,
        &PackOptions::new(name, version, kind),
        key,
        &mut StoreSink(&store),
        &mut |_| {},
    )
    .expect("pack");
    store.put_manifest(&packed.signed).expect("put manifest");
    packed.id
}

impl Fixture {
    /// Builds the bundles (a few KiB each) and the template machine.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SigningKey::from_bytes(&[42; 32]);
        let trusted_hex = hex::encode(key.verifying_key().to_bytes());
        let trees = dir.path().join("trees");
        let publisher_store = dir.path().join("publisher-store");

        let mut bundles = Vec::new();
        let specs: [(&'static str, &str, BundleKind, Vec<FileSpec<'_>>); 4] = [
            (
                "old",
                "1.0",
                BundleKind::OsImage,
                vec![
                    ("etc/os-release", b"NAME=old\nVERSION=1.0\n", 0o644),
                    ("etc/hostname", b"localhost\n", 0o644),
                    ("usr/bin/app", b"#!/bin/sh\necho old\n", 0o755),
                ],
            ),
            (
                "rescue",
                "0.9",
                BundleKind::BaseOs,
                vec![
                    ("etc/os-release", b"NAME=rescue\n", 0o644),
                    ("etc/hostname", b"rescue\n", 0o644),
                    ("usr/bin/app", b"#!/bin/sh\necho rescue\n", 0o755),
                ],
            ),
            (
                "new",
                "2.0",
                BundleKind::OsImage,
                vec![
                    ("etc/os-release", b"NAME=new\nVERSION=2.0\n", 0o644),
                    ("etc/hostname", b"localhost\n", 0o644),
                    (
                        "etc/ssh/ssh_host_ed25519_key",
                        b"IMAGE DEFAULT KEY\n",
                        0o600,
                    ),
                    ("etc/stagecoach/defaults", b"image defaults\n", 0o644),
                    ("usr/bin/app", b"#!/bin/sh\necho new\n", 0o755),
                    ("usr/share/doc/big", &[7u8; 20_000], 0o644),
                ],
            ),
            (
                "broken",
                "2.1",
                BundleKind::OsImage,
                vec![("etc/os-release", b"NAME=broken\nVERSION=2.1\n", 0o644)],
            ),
        ];
        for (name, version, kind, files) in specs {
            let tree = trees.join(name);
            os_tree(&tree, &files);
            let id = pack_into(&publisher_store, &tree, name, version, kind, &key);
            bundles.push(Bundle { id, tree, name });
        }
        let [old, rescue, target, broken]: [Bundle; 4] = bundles.try_into().expect("four");

        let identity_src = dir.path().join("identity");
        os_tree(
            &identity_src,
            &[
                ("etc/hostname", b"edge-17\n", 0o644),
                (
                    "etc/ssh/ssh_host_ed25519_key",
                    b"HOST KEY OF edge-17\n",
                    0o600,
                ),
                (
                    "etc/ssh/ssh_host_ed25519_key.pub",
                    b"ssh-ed25519 AAAA edge-17\n",
                    0o644,
                ),
                (
                    "etc/network/interfaces",
                    b"auto eth0\niface eth0 inet static\n  address 10.1.2.3/24\n",
                    0o644,
                ),
                ("etc/stagecoach/acl", b"allow origin.example\n", 0o640),
                ("etc/stagecoach/node.key", b"NODE KEY\n", 0o600),
            ],
        );

        let template = dir.path().join("template");
        {
            let store = open_store(&publisher_store).expect("open store");
            let trusted = vec![key.verifying_key()];
            edge_agent::swap::provision_sim(&template, &store, &old.id, &trusted, None)
                .expect("provision");
        }
        overlay_identity(&identity_src, &sim::slot_dir(&template, Slot::A));
        // The machine already holds the bundles in its storage area (fetched by the mesh).
        let machine_store = sim::store_dir(&template);
        for (bundle, version, kind) in [
            (&rescue, "0.9", BundleKind::BaseOs),
            (&target, "2.0", BundleKind::OsImage),
            (&broken, "2.1", BundleKind::OsImage),
        ] {
            let id = pack_into(
                &machine_store,
                &bundle.tree,
                bundle.name,
                version,
                kind,
                &key,
            );
            assert_eq!(id, bundle.id, "packing is deterministic");
        }
        Self {
            dir,
            key,
            trusted_hex,
            old,
            rescue,
            target,
            broken,
            identity_src,
            publisher_store,
            template,
        }
    }

    /// A fresh copy of the template machine under `name`.
    pub fn machine(&self, name: &str) -> PathBuf {
        let root = self.dir.path().join("machines").join(name);
        if root.exists() {
            fs::remove_dir_all(&root).expect("remove old machine");
        }
        copy_dir(&self.template, &root);
        root
    }

    /// Arguments of `swap` to `target` with the fixture's identity paths and health check.
    pub fn swap_args(&self, target: &Bundle) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "swap".into(),
            "--target".into(),
            target.id.to_string().into(),
            "--rescue".into(),
            self.rescue.id.to_string().into(),
            "--trust".into(),
            self.trusted_hex.clone().into(),
            "--health-check".into(),
            HEALTH_CHECK.into(),
        ];
        for path in IDENTITY_PATHS {
            args.push("--identity".into());
            args.push((*path).into());
        }
        args
    }

    /// Which bundle `id` is.
    pub fn bundle(&self, id: &BundleId) -> Option<&Bundle> {
        [&self.old, &self.rescue, &self.target, &self.broken]
            .into_iter()
            .find(|b| b.id == *id)
    }

    /// Checks that `slot` of `root` holds exactly the OS its marker names, with the machine's
    /// identity in place; returns the bundle's name.
    pub fn check_slot(&self, root: &Path, slot: Slot) -> Result<&'static str, String> {
        let dir = sim::slot_dir(root, slot);
        let marker = fs::read(dir.join(SLOT_MARKER_FILE))
            .map_err(|e| format!("slot {slot} has no marker: {e}"))?;
        let marker: edge_agent::swap::SlotMarker =
            serde_json::from_slice(&marker).map_err(|e| format!("bad marker: {e}"))?;
        let bundle = self
            .bundle(&marker.bundle)
            .ok_or_else(|| format!("slot {slot} holds unknown bundle {}", marker.bundle))?;
        let expected = self.expected_tree(bundle);
        let actual = snapshot(&dir);
        if actual != expected {
            return Err(format!(
                "slot {slot} ({}) differs from the bundle plus identity: {}",
                bundle.name,
                describe_difference(&expected, &actual)
            ));
        }
        Ok(bundle.name)
    }

    /// The tree a slot holding `bundle` must have: the bundle's files, then the identity.
    pub fn expected_tree(&self, bundle: &Bundle) -> BTreeMap<PathBuf, Entry> {
        let mut expected = snapshot(&bundle.tree);
        let identity = snapshot(&self.identity_src);
        for path in IDENTITY_PATHS {
            let path = Path::new(path);
            if !self.identity_src.join(path).exists() {
                continue;
            }
            expected.retain(|p, _| !p.starts_with(path));
            for (p, entry) in &identity {
                if p.starts_with(path) {
                    expected.insert(p.clone(), entry.clone());
                }
            }
        }
        expected
    }
}

/// Copies the identity files into an OS tree, as the machine had them before the swap.
pub fn overlay_identity(identity: &Path, slot: &Path) {
    for path in IDENTITY_PATHS {
        let from = identity.join(path);
        if !from.exists() {
            continue;
        }
        let to = slot.join(path);
        if to.is_dir() {
            fs::remove_dir_all(&to).expect("remove");
        }
        if from.is_dir() {
            copy_dir(&from, &to);
        } else {
            fs::copy(&from, &to).expect("copy");
        }
    }
}

/// Recursively copies a directory, keeping modes.
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for entry in fs::read_dir(from).expect("list") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        let file_type = entry.file_type().expect("type");
        if file_type.is_dir() {
            copy_dir(&entry.path(), &target);
        } else if file_type.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path()).expect("link"), &target)
                .expect("symlink");
        } else {
            fs::copy(entry.path(), &target).expect("copy");
        }
    }
    let mode = fs::metadata(from).expect("meta").permissions();
    fs::set_permissions(to, mode).expect("chmod");
}

/// One entry of a tree snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A directory with its mode.
    Dir(u32),
    /// A file with its mode and bytes.
    File(u32, Vec<u8>),
    /// A symlink with its target.
    Link(PathBuf),
}

/// Every entry under `root` (excluding the root and the slot marker), by relative path.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out.remove(Path::new(SLOT_MARKER_FILE));
    out
}

fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
    let Ok(entries) = fs::read_dir(root.join(rel)) else {
        return;
    };
    for entry in entries {
        let entry = entry.expect("entry");
        let path = rel.join(entry.file_name());
        let meta = fs::symlink_metadata(root.join(&path)).expect("meta");
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            out.insert(
                path,
                Entry::Link(fs::read_link(entry.path()).expect("link")),
            );
        } else if meta.is_dir() {
            out.insert(path.clone(), Entry::Dir(mode));
            walk(root, &path, out);
        } else {
            out.insert(
                path,
                Entry::File(mode, fs::read(entry.path()).expect("read")),
            );
        }
    }
}

fn describe_difference(
    expected: &BTreeMap<PathBuf, Entry>,
    actual: &BTreeMap<PathBuf, Entry>,
) -> String {
    let mut notes = Vec::new();
    for (path, entry) in expected {
        match actual.get(path) {
            None => notes.push(format!("missing {}", path.display())),
            Some(other) if other != entry => notes.push(format!("different {}", path.display())),
            _ => {}
        }
    }
    for path in actual.keys() {
        if !expected.contains_key(path) {
            notes.push(format!("extra {}", path.display()));
        }
    }
    notes.join(", ")
}

/// The journal of the machine at `root`.
pub fn journal(root: &Path) -> Option<SwapState> {
    Journal::in_storage(&sim::storage_dir(root))
        .load()
        .expect("journal readable")
}

/// Runs the simulated machine with `first_args` on its first boot.
pub fn run_machine(
    root: &Path,
    first_args: Vec<OsString>,
    hooks: &mut dyn SimHooks,
) -> Result<Vec<BootRecord>, SimError> {
    sim::run_sim_machine(
        &SimMachineConfig {
            agent: agent(),
            root: root.to_path_buf(),
            first_args,
            max_boots: sim::DEFAULT_MAX_BOOTS,
        },
        hooks,
    )
}

/// Decides the extra environment of a boot from its number and the boots before it.
pub type BootEnvFn<'a> = dyn FnMut(u32, &[BootRecord]) -> Vec<(String, String)> + 'a;

/// Hooks checking, at every power-on, that the chosen slot holds a complete OS with the
/// machine's identity, and counting which OS booted.
pub struct CheckingHooks<'a> {
    pub fixture: &'a Fixture,
    pub root: PathBuf,
    pub booted: Vec<&'static str>,
    pub problems: Vec<String>,
    /// Environment for each boot, decided by the test.
    pub env: Box<BootEnvFn<'a>>,
}

impl<'a> CheckingHooks<'a> {
    pub fn new(fixture: &'a Fixture, root: &Path) -> Self {
        Self {
            fixture,
            root: root.to_path_buf(),
            booted: Vec::new(),
            problems: Vec::new(),
            env: Box::new(|_, _| Vec::new()),
        }
    }
}

impl SimHooks for CheckingHooks<'_> {
    fn env_for_boot(
        &mut self,
        index: u32,
        _slot: Slot,
        history: &[BootRecord],
    ) -> Vec<(String, String)> {
        let mut env = (self.env)(index, history);
        // Hundreds of agent runs: keep their logs to warnings unless asked.
        if std::env::var_os("EDGE_AGENT_LOG").is_none() {
            env.push(("EDGE_AGENT_LOG".into(), "warn".into()));
        }
        env
    }

    fn on_power_on(&mut self, index: u32, slot: Slot, _marker: &edge_agent::swap::SlotMarker) {
        match self.fixture.check_slot(&self.root, slot) {
            Ok(name) => self.booted.push(name),
            Err(e) => self.problems.push(format!("boot {index}: {e}")),
        }
    }
}

/// Runs `edge-agent ARGS --root ROOT` and returns (exit code, stdout, stderr).
pub fn agent_command(root: &Path, args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(agent())
        .args(args)
        .arg("--root")
        .arg(root)
        .output()
        .expect("run agent");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
