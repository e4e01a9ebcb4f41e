//! The swap on a simulated machine, end to end through the real `edge-agent` binary.

mod swap_support;

use std::fs;
use std::time::Instant;

use edge_agent::swap::sim::{self, BootExit};
use edge_agent::swap::{firmware_boot, GrubEnv, Slot, Step};
use proto::BundleKind;
use swap_support::{agent_command, journal, run_machine, CheckingHooks, Fixture};

fn next_boot(root: &std::path::Path) -> Slot {
    let env = GrubEnv::parse(&fs::read(sim::grubenv_path(root)).expect("grubenv")).expect("parse");
    firmware_boot(&env).0
}

#[test]
fn healthy_swap_installs_the_new_os_with_the_identity_byte_identical() {
    let fixture = Fixture::new();
    let root = fixture.machine("healthy");
    let mut hooks = CheckingHooks::new(&fixture, &root);
    let boots =
        run_machine(&root, fixture.swap_args(&fixture.target), &mut hooks).expect("machine runs");
    assert!(hooks.problems.is_empty(), "{:?}", hooks.problems);
    // old (swap) -> rescue (wipe, install) -> new (health check, commit).
    assert_eq!(hooks.booted, ["old", "rescue", "new"]);
    assert_eq!(boots.last().map(|b| b.exit), Some(BootExit::Exited(0)));
    assert_eq!(journal(&root).map(|s| s.step), Some(Step::Done));
    assert_eq!(fixture.check_slot(&root, Slot::A), Ok("new"));
    assert_eq!(
        fixture.check_slot(&root, Slot::B),
        Ok("rescue"),
        "the rescue OS stays"
    );
    assert_eq!(
        next_boot(&root),
        Slot::A,
        "the new OS is the default for good"
    );

    // The preserved files, byte for byte, against the machine's identity before the swap.
    let slot_a = sim::slot_dir(&root, Slot::A);
    for path in [
        "etc/hostname",
        "etc/ssh/ssh_host_ed25519_key",
        "etc/network/interfaces",
        "etc/stagecoach/node.key",
    ] {
        assert_eq!(
            fs::read(slot_a.join(path)).expect("identity file"),
            fs::read(fixture.identity_src.join(path)).expect("original"),
            "{path}"
        );
    }
    // The image's own default key was replaced, and the image's other files are the image's.
    assert!(!slot_a.join("etc/stagecoach/defaults").exists());
    assert_eq!(
        fs::read(slot_a.join("etc/os-release")).expect("read"),
        b"NAME=new\nVERSION=2.0\n"
    );

    let (code, out, _) = agent_command(&root, &["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("swap: done (finished)"), "{out}");
    assert!(out.contains("slot A (os    ): new 2.0"), "{out}");
    assert!(out.contains("[good]"), "{out}");
}

#[test]
fn target_failing_its_health_check_three_times_rolls_back_to_rescue_and_reports_why() {
    let fixture = Fixture::new();
    let root = fixture.machine("broken");
    let mut hooks = CheckingHooks::new(&fixture, &root);
    let boots =
        run_machine(&root, fixture.swap_args(&fixture.broken), &mut hooks).expect("machine runs");
    assert!(hooks.problems.is_empty(), "{:?}", hooks.problems);
    // Three trial boots of the broken OS, then the firmware falls back to the rescue.
    assert_eq!(
        hooks.booted,
        ["old", "rescue", "broken", "broken", "broken", "rescue"]
    );
    assert_eq!(
        boots.last().map(|b| b.exit),
        Some(BootExit::Exited(3)),
        "the run that rolled back reports failure"
    );
    let state = journal(&root).expect("journal");
    assert_eq!(state.step, Step::RolledBack);
    assert_eq!(state.trial_boots, 3);
    assert_eq!(next_boot(&root), Slot::B);
    // The rescue runs with the machine's identity, byte for byte.
    assert_eq!(fixture.check_slot(&root, Slot::B), Ok("rescue"));
    // Everything a retry needs is kept: the failed OS in A, the bundles, the identity copy.
    assert_eq!(fixture.check_slot(&root, Slot::A), Ok("broken"));

    let (code, out, _) = agent_command(&root, &["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("swap: rolled-back (finished)"), "{out}");
    assert!(
        out.contains("did not pass its health checks within 3 boot attempts"),
        "{out}"
    );
    assert!(out.contains("usr/bin/app is missing"), "{out}");
    assert!(out.contains("[bad]"), "{out}");
    assert_eq!(out.matches("health failure ").count(), 3, "{out}");

    // A retry from the rescue with a good target completes without reinstalling the rescue.
    let mut hooks = CheckingHooks::new(&fixture, &root);
    run_machine(&root, fixture.swap_args(&fixture.target), &mut hooks).expect("retry runs");
    assert!(hooks.problems.is_empty(), "{:?}", hooks.problems);
    assert_eq!(hooks.booted, ["rescue", "new"]);
    assert_eq!(journal(&root).map(|s| s.step), Some(Step::Done));
    assert_eq!(fixture.check_slot(&root, Slot::A), Ok("new"));
}

#[test]
fn tampered_target_is_refused_before_any_slot_is_touched() {
    let fixture = Fixture::new();
    // Bad signature: the publisher store holds the target's manifest with a flipped bit.
    let bad_signature = fixture.dir.path().join("bad-signature-store");
    swap_support::copy_dir(&fixture.publisher_store, &bad_signature);
    {
        let store = edge_agent::swap::store::open_store(&bad_signature).expect("store");
        let mut signed = store
            .get_manifest(&fixture.target.id)
            .expect("read")
            .expect("held");
        signed.signature[10] ^= 1;
        store.put_manifest(&signed).expect("put");
    }
    // Bad chunk: one byte of one of the target's chunks changed on disk.
    let bad_chunk = fixture.dir.path().join("bad-chunk-store");
    swap_support::copy_dir(&fixture.publisher_store, &bad_chunk);
    {
        let store = edge_agent::swap::store::open_store(&bad_chunk).expect("store");
        let signed = store
            .get_manifest(&fixture.target.id)
            .expect("read")
            .expect("held");
        let manifest = signed.verify(&[]).expect("valid");
        let hash = manifest.chunks[0].hash.to_string();
        let data = bad_chunk
            .join("blobs")
            .join(&hash[..2])
            .join(format!("{hash}.data"));
        let mut bytes = fs::read(&data).expect("chunk file");
        bytes[0] ^= 0xff;
        fs::write(&data, bytes).expect("tamper");
    }

    for (case, store, expected) in [
        ("bad signature", &bad_signature, "signature does not verify"),
        ("bad chunk", &bad_chunk, "corrupt"),
    ] {
        let root = fixture.machine(&case.replace(' ', "-"));
        let slots_before = [
            swap_support::snapshot(&sim::slot_dir(&root, Slot::A)),
            swap_support::snapshot(&sim::slot_dir(&root, Slot::B)),
        ];
        let grubenv_before = fs::read(sim::grubenv_path(&root)).expect("grubenv");
        let mut args = fixture.swap_args(&fixture.target);
        args.push("--store".into());
        args.push(store.into());
        let mut hooks = CheckingHooks::new(&fixture, &root);
        let boots = run_machine(&root, args, &mut hooks).expect("machine runs");
        assert_eq!(boots.len(), 1, "{case}: no reboot");
        assert_eq!(boots[0].exit, BootExit::Exited(3), "{case}");
        let state = journal(&root).expect("journal");
        assert_eq!(state.step, Step::Aborted, "{case}");
        let failure = state.failure.unwrap_or_default();
        assert!(failure.contains("target bundle"), "{case}: {failure}");
        assert!(failure.contains(expected), "{case}: {failure}");
        assert_eq!(
            [
                swap_support::snapshot(&sim::slot_dir(&root, Slot::A)),
                swap_support::snapshot(&sim::slot_dir(&root, Slot::B)),
            ],
            slots_before,
            "{case}: a slot was touched"
        );
        assert_eq!(
            fs::read(sim::grubenv_path(&root)).expect("grubenv"),
            grubenv_before,
            "{case}"
        );
        let (_, out, _) = agent_command(&root, &["status"]);
        assert!(out.contains("swap: aborted (finished)"), "{case}: {out}");
    }
}

#[test]
fn operator_rollback_after_commit_boots_the_rescue_with_the_identity() {
    let fixture = Fixture::new();
    let root = fixture.machine("rollback");
    let mut hooks = CheckingHooks::new(&fixture, &root);
    run_machine(&root, fixture.swap_args(&fixture.target), &mut hooks).expect("swap");
    assert_eq!(journal(&root).map(|s| s.step), Some(Step::Done));

    let mut hooks = CheckingHooks::new(&fixture, &root);
    let boots = run_machine(
        &root,
        vec![
            "rollback".into(),
            "--reason".into(),
            "customer complaint".into(),
        ],
        &mut hooks,
    )
    .expect("rollback");
    assert!(hooks.problems.is_empty(), "{:?}", hooks.problems);
    assert_eq!(hooks.booted, ["new", "rescue"]);
    assert_eq!(boots.last().map(|b| b.exit), Some(BootExit::Exited(0)));
    let state = journal(&root).expect("journal");
    assert_eq!(state.step, Step::RolledBack);
    assert!(state
        .failure
        .unwrap_or_default()
        .contains("customer complaint"));
    assert_eq!(next_boot(&root), Slot::B);
    // Identity byte-identical in the rescue the machine now runs.
    assert_eq!(fixture.check_slot(&root, Slot::B), Ok("rescue"));

    // A second rollback is refused with a clear message.
    let (code, _, err) = agent_command(&root, &["rollback", "--booted-slot", "B"]);
    assert_eq!(code, 1);
    assert!(err.contains("nothing to roll back"), "{err}");
}

#[test]
fn a_second_swap_is_refused_while_one_is_in_progress() {
    let fixture = Fixture::new();
    let root = fixture.machine("in-progress");
    // Stop the first swap at the reboot into the rescue: the agent exits asking for a reboot.
    let mut args: Vec<String> = fixture
        .swap_args(&fixture.target)
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    args.extend(["--booted-slot".into(), "A".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, _) = agent_command(&root, &args);
    assert_eq!(code, sim::REBOOT_EXIT_CODE);
    let other: Vec<String> = fixture
        .swap_args(&fixture.broken)
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .chain(["--booted-slot".into(), "A".into()])
        .collect();
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    let (code, _, err) = agent_command(&root, &other);
    assert_eq!(code, 1);
    assert!(err.contains("is in progress"), "{err}");
}

/// Time of a swap of a 256 MiB OS image on the simulated machine. Run with
/// `cargo test --release -p edge-agent --test swap_sim -- --ignored --nocapture`.
#[test]
#[ignore = "timing: packs and swaps a 256 MiB image"]
fn timing_swap_of_a_256_mib_image() {
    const IMAGE_BYTES: usize = 256 * 1024 * 1024;
    let fixture = Fixture::new();
    // Incompressible content (an xorshift stream), so the chunks are real size after zstd.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut image = vec![0u8; IMAGE_BYTES];
    for chunk in image.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    let image_path = fixture.dir.path().join("os.img");
    fs::write(&image_path, &image).expect("write image");
    drop(image);
    let root = fixture.machine("big");
    let started = Instant::now();
    let id = swap_support::pack_into(
        &sim::store_dir(&root),
        &image_path,
        "big",
        "1.0",
        BundleKind::OsImage,
        &fixture.key,
    );
    let pack_secs = started.elapsed().as_secs_f64();
    let mut args = fixture.swap_args(&fixture.target);
    assert_eq!(args[1], "--target");
    args[2] = id.to_string().into();
    assert_eq!(args[7], "--health-check");
    args[8] = "command=test -s \"$STAGECOACH_SLOT_ROOT/os.img\"".into();
    let started = Instant::now();
    let boots = run_machine(&root, args, &mut edge_agent::swap::sim::NoHooks).expect("swap");
    let swap_secs = started.elapsed().as_secs_f64();
    assert_eq!(journal(&root).map(|s| s.step), Some(Step::Done));
    assert_eq!(
        fs::read(sim::slot_dir(&root, Slot::A).join("os.img"))
            .expect("image")
            .len(),
        IMAGE_BYTES
    );
    println!(
        "256 MiB image: pack {pack_secs:.2} s; swap (verify, install rescue, reboot, wipe, unpack, identity, trial boot, health check, commit; {} boots) {swap_secs:.2} s",
        boots.len()
    );
}

#[test]
fn the_cli_provisions_and_runs_a_simulated_machine_from_a_separate_store() {
    use std::process::Command;
    let fixture = Fixture::new();
    let root = fixture.dir.path().join("cli-machine");
    let provision = Command::new(swap_support::agent())
        .arg("sim-provision")
        .arg("--root")
        .arg(&root)
        .arg("--store")
        .arg(&fixture.publisher_store)
        .args([
            "--os",
            &fixture.old.id.to_string(),
            "--trust",
            &fixture.trusted_hex,
        ])
        .output()
        .expect("run sim-provision");
    assert!(
        provision.status.success(),
        "{}",
        String::from_utf8_lossy(&provision.stderr)
    );
    assert!(String::from_utf8_lossy(&provision.stdout).contains("slot A runs old 1.0"));

    // The bundles come from the publisher's store; the swap copies them into the machine's.
    let run = Command::new(swap_support::agent())
        .arg("sim-machine")
        .arg("--root")
        .arg(&root)
        .arg("--")
        .args(fixture.swap_args(&fixture.target))
        .arg("--store")
        .arg(&fixture.publisher_store)
        .env("EDGE_AGENT_LOG", "warn")
        .output()
        .expect("run sim-machine");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("boot 1: slot A (old 1.0) -> Rebooted"),
        "{stdout}"
    );
    assert!(
        stdout.contains("boot 2: slot B (rescue 0.9) -> Rebooted"),
        "{stdout}"
    );
    assert!(
        stdout.contains("boot 3: slot A (new 2.0) -> Exited(0)"),
        "{stdout}"
    );
    assert!(fs::read_to_string(root.join("boots.log"))
        .expect("boots.log")
        .contains("boot 3: slot A (new 2.0)"));

    let (code, out, _) = agent_command(&root, &["status", "--json"]);
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(status["swap"]["Ok"]["step"], "done", "{out}");
    assert_eq!(status["booted"], "A", "{out}");
    assert_eq!(status["slots"][1]["os"]["name"], "rescue", "{out}");
    // Both bundles are now kept in the machine's own store, pinned for the slots.
    let store = edge_agent::swap::store::open_store(&sim::store_dir(&root)).expect("machine store");
    for id in [fixture.target.id, fixture.rescue.id] {
        let manifest = store
            .get_manifest(&id)
            .expect("read")
            .expect("staged")
            .verify(&[])
            .expect("valid");
        for chunk in &manifest.chunks {
            assert!(store.has_blob(&chunk.hash));
            assert!(
                !store.pins(&chunk.hash).is_empty(),
                "chunk of {id} is pinned"
            );
        }
    }
}
