//! LinuxPlatform on real block devices: a loop device over an image partitioned with sfdisk,
//! two ext4 slot partitions, a real grubenv, cross-checked with GRUB's own grub-editenv. Needs
//! root, loop devices and losetup, sfdisk, mkfs.ext4, mount, grub-editenv
//! (`scripts/install-deps.sh` installs them); where they lack, the test reports a skip, or fails
//! under `STAGECOACH_REQUIRE_ALL=1` (see `stagecoach_testing`).

mod swap_support;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edge_agent::swap::driver::install_bundle;
use edge_agent::swap::linux::{LinuxConfig, LinuxPlatform};
use edge_agent::swap::store::open_store;
use edge_agent::swap::{firmware_boot, GrubEnv, Platform, Slot, Step, REBOOT_EXIT_CODE};
use proto::BundleKind;
use stagecoach_testing::need::{self, find_tool};
use stagecoach_testing::{can_run, skip_or_fail, wait_until};
use swap_support::{agent, pack_into, snapshot, Fixture};

/// Size of the disk image, in MiB: a GPT and two 28 MiB ext4 partitions.
const IMAGE_MIB: u64 = 64;

/// Boots before the test declares the procedure stuck.
const MAX_BOOTS: u32 = 16;

/// How long to wait for partition device nodes to appear, in milliseconds.
const PARTITION_WAIT_MS: u64 = 2_000;

const REQUIRED_TOOLS: &[&str] = &["losetup", "sfdisk", "mkfs.ext4", "mount", "umount"];

/// How often the partition device nodes are looked for, in milliseconds.
const PARTITION_POLL_MS: u64 = 20;

fn run(command: &mut Command) -> Result<String, String> {
    let output = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{command:?}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Loop devices made by the test, detached on drop (also when the test fails). The platform
/// unmounts what it mounted when it is dropped.
#[derive(Default)]
struct Cleanup {
    loops: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for device in self.loops.iter().rev() {
            let _ = Command::new("losetup").arg("-d").arg(device).status();
        }
    }
}

/// Partitions the image and returns the block devices of its two partitions.
fn attach_partitions(image: &Path, cleanup: &mut Cleanup) -> Result<[PathBuf; 2], String> {
    let table = "label: gpt\n,28M,L\n,28M,L\n";
    let mut child = Command::new("sfdisk")
        .arg("--quiet")
        .arg(image)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("sfdisk: {e}"))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().ok_or("sfdisk stdin")?;
        stdin
            .write_all(table.as_bytes())
            .map_err(|e| format!("sfdisk: {e}"))?;
    }
    let status = child.wait().map_err(|e| format!("sfdisk: {e}"))?;
    if !status.success() {
        return Err(format!("sfdisk failed: {status}"));
    }
    let device = run(Command::new("losetup")
        .args(["-f", "--show", "-P"])
        .arg(image))?;
    cleanup.loops.push(device.clone());
    let parts = [
        PathBuf::from(format!("{device}p1")),
        PathBuf::from(format!("{device}p2")),
    ];
    // Without udev the partition nodes may need partx to appear.
    let mut asked_partx = false;
    wait_until(
        Duration::from_millis(PARTITION_WAIT_MS),
        Duration::from_millis(PARTITION_POLL_MS),
        || {
            if !asked_partx && find_tool("partx").is_some() {
                let _ = run(Command::new("partx").arg("-a").arg(&device));
                asked_partx = true;
            }
            parts.iter().all(|p| p.exists())
        },
    )
    .map_err(|error| format!("partitions of {device} did not appear: {error}"))?;
    Ok(parts)
}

#[test]
fn linux_platform_swaps_between_two_ext4_partitions_with_real_grubenv_edits() {
    const TEST: &str = "linux_platform_swaps_between_two_ext4_partitions_with_real_grubenv_edits";
    let preconditions = [
        need::root(),
        need::tools(REQUIRED_TOOLS),
        need::loop_devices(),
    ];
    if !can_run(TEST, &preconditions) {
        return;
    }
    let fixture = Fixture::new();
    let work = fixture.dir.path().join("linux");
    fs::create_dir_all(work.join("boot")).expect("mkdir");
    let image = work.join("disk.img");
    fs::File::create(&image)
        .and_then(|f| f.set_len(IMAGE_MIB * 1024 * 1024))
        .expect("image");
    let mut cleanup = Cleanup::default();
    let [part_a, part_b] = match attach_partitions(&image, &mut cleanup) {
        Ok(parts) => parts,
        Err(e) => {
            skip_or_fail(TEST, &format!("cannot set up loop partitions: {e}"));
            return;
        }
    };
    let config = LinuxConfig {
        slot_a_device: part_a,
        slot_b_device: part_b,
        grubenv: work.join("boot/grubenv"),
        storage_dir: work.join("storage"),
        mount_dir: work.join("mnt"),
        reboot_command: vec!["true".into()],
        booted_slot_is_root: false,
    };
    let config_path = work.join("machine.json");
    fs::write(
        &config_path,
        serde_json::to_vec_pretty(&config).expect("json"),
    )
    .expect("write");

    // The machine's store holds the bundles; slot A gets the old OS and the machine's identity.
    let store_dir = config.storage_dir.join("store");
    for (bundle, version, kind) in [
        (&fixture.old, "1.0", BundleKind::OsImage),
        (&fixture.rescue, "0.9", BundleKind::BaseOs),
        (&fixture.target, "2.0", BundleKind::OsImage),
    ] {
        assert_eq!(
            pack_into(
                &store_dir,
                &bundle.tree,
                bundle.name,
                version,
                kind,
                &fixture.key
            ),
            bundle.id
        );
    }
    run(Command::new("mkfs.ext4")
        .args(["-F", "-q"])
        .arg(&config.slot_a_device))
    .expect("mkfs A");
    {
        let store = open_store(&store_dir).expect("store");
        let mut platform = LinuxPlatform::open(config.clone(), Some(Slot::B)).expect("platform");
        install_bundle(
            &mut platform,
            &store,
            Slot::A,
            &fixture.old.id,
            &[fixture.key.verifying_key()],
        )
        .expect("install old OS");
        let root_a = platform.slot_root(Slot::A).expect("mount A");
        swap_support::overlay_identity(&fixture.identity_src, &root_a);
        platform.set_default(Slot::A).expect("grubenv");
    }

    // The firmware and the reboots, as the sim supervisor does them, on the real devices.
    let mut booted = Vec::new();
    let mut exit = None;
    for boot in 1..=MAX_BOOTS {
        let env = GrubEnv::parse(&fs::read(&config.grubenv).expect("grubenv")).expect("parse");
        let (slot, next_env) = firmware_boot(&env);
        fs::write(&config.grubenv, next_env.to_bytes().expect("encode")).expect("write grubenv");
        {
            let mut platform = LinuxPlatform::open(config.clone(), Some(slot)).expect("platform");
            let marker = platform
                .slot_marker(slot)
                .expect("marker readable")
                .unwrap_or_else(|| panic!("boot {boot}: slot {slot} holds no complete OS"));
            booted.push(marker.name);
        }
        let mut args: Vec<OsString> = if boot == 1 {
            fixture.swap_args(&fixture.target)
        } else {
            vec!["resume".into()]
        };
        args.extend([
            "--linux-config".into(),
            config_path.clone().into(),
            "--booted-slot".into(),
            slot.as_str().into(),
        ]);
        let status = Command::new(agent())
            .args(&args)
            .status()
            .expect("run agent");
        match status.code() {
            Some(REBOOT_EXIT_CODE) => continue,
            code => {
                exit = code;
                break;
            }
        }
    }
    assert_eq!(
        exit,
        Some(0),
        "the swap ended on its own; boots: {booted:?}"
    );
    assert_eq!(booted, ["old", "rescue", "new"]);

    // Slot A holds the new OS and the identity, byte for byte; B the rescue.
    let mut platform = LinuxPlatform::open(config.clone(), Some(Slot::A)).expect("platform");
    let state = edge_agent::swap::journal::Journal::in_storage(&config.storage_dir)
        .load()
        .expect("journal")
        .expect("present");
    assert_eq!(state.step, Step::Done);
    for (slot, bundle) in [(Slot::A, &fixture.target), (Slot::B, &fixture.rescue)] {
        let root = platform.slot_root(slot).expect("mount");
        let mut actual = snapshot(&root);
        actual.retain(|p, _| !p.starts_with("lost+found"));
        let mut expected = fixture.expected_tree(bundle);
        expected.retain(|p, _| !p.starts_with("lost+found"));
        assert_eq!(
            actual.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "slot {slot}"
        );
        assert!(actual == expected, "slot {slot} content differs");
    }
    drop(platform);

    let env = GrubEnv::parse(&fs::read(&config.grubenv).expect("grubenv")).expect("parse");
    assert_eq!(env.saved_entry(), Some(Slot::A));
    assert_eq!(env.boot_counter(), None);

    // Cross-check with GRUB's own tool, when it is installed: it reads what we wrote, and we
    // read what it writes.
    match find_tool("grub-editenv") {
        None => skip_or_fail(
            &format!("{TEST} (grub-editenv cross-check)"),
            "grub-editenv not installed (Debian: grub-common; scripts/install-deps.sh installs it)",
        ),
        Some(tool) => {
            let listed = run(Command::new(&tool).arg(&config.grubenv).arg("list"))
                .expect("grub-editenv list");
            assert!(listed.lines().any(|l| l == "saved_entry=A"), "{listed}");
            assert!(listed.lines().any(|l| l == "status_A=good"), "{listed}");
            run(Command::new(&tool).arg(&config.grubenv).args([
                "set",
                "next_entry=B",
                "boot_counter=2",
            ]))
            .expect("grub-editenv set");
            let bytes = fs::read(&config.grubenv).expect("grubenv");
            assert_eq!(bytes.len(), 1024);
            let env = GrubEnv::parse(&bytes).expect("parse grub-editenv's block");
            assert_eq!(env.next_entry(), Some(Slot::B));
            assert_eq!(env.boot_counter(), Some(Ok(2)));
            assert_eq!(firmware_boot(&env).0, Slot::B);
            println!("grub-editenv cross-check passed");
        }
    }
    drop(cleanup);
}
