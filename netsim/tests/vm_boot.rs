//! A real Debian kernel boots through real GRUB (BIOS) in QEMU from the A/B disk that
//! `netsim::vm` builds, and GRUB follows the A/B rule of the agent's boot model: slot A by
//! `saved_entry`, slot B once by `next_entry`, then A again; a trial counted down by
//! `boot_counter`, then the rescue slot B once its attempts are used up.
//!
//! Needs root (mmdebstrap installs packages owned by many users), mmdebstrap, e2fsprogs,
//! fdisk, grub-pc-bin and qemu-system-x86 (`scripts/install-deps.sh` installs them) and, the
//! first time, the network: the image is built once and cached (see `netsim::vm::cache_root`).
//! Runs the guest under TCG, so each boot takes a minute or so:
//!
//! `cargo nextest run --release --workspace --features origin/test-hooks,stager/test-hooks,edge-agent/test-hooks -E 'binary(vm_boot)' --no-capture`

use std::path::Path;
use std::time::{Duration, Instant};

use netsim::vm::{self, BootOutcome, ImageSpec, VmImage};
use stagecoach_testing::{can_run, skip_or_fail};

const TEST: &str = "a_real_kernel_boots_the_slot_grub_chooses_by_the_a_b_rule";

/// Longest a boot may take under TCG before the test gives up on it.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Boots `image`, prints the boot time, and returns what the guest printed.
fn boot(image: &VmImage, work: &Path, name: &str) -> BootOutcome {
    let serial_log = work.join(format!("{name}.serial.log"));
    let outcome = vm::boot(&image.path, &serial_log, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("boot {name}: {e:#}"));
    eprintln!(
        "{TEST}: boot {name}: guest reported after {:.1} s ({:?}): {:?}",
        outcome.time_to_report.as_secs_f64(),
        outcome.end,
        outcome.guest
    );
    assert!(
        outcome.guest.is_some(),
        "boot {name}: the guest never reported ({:?}); serial console:\n{}",
        outcome.end,
        outcome.serial
    );
    outcome
}

fn assert_booted(outcome: &BootOutcome, slot: &str, marker: &str) {
    let guest = outcome.guest.as_ref().expect("checked by boot()");
    // GRUB's own line, from grub.cfg, before the kernel: the choice was GRUB's.
    assert!(
        outcome
            .serial
            .contains(&format!("stagecoach: booting slot {slot}")),
        "GRUB did not say it boots slot {slot}; serial console:\n{}",
        outcome.serial
    );
    assert_eq!(
        (guest.slot.as_str(), guest.marker.as_str()),
        (slot, marker),
        "serial console:\n{}",
        outcome.serial
    );
}

#[test]
fn a_real_kernel_boots_the_slot_grub_chooses_by_the_a_b_rule() {
    if !can_run(TEST, &vm::test_preconditions(&[])) {
        return;
    }
    let cache = vm::cache_root().expect("cache directory");
    let spec = ImageSpec::default();
    let started = Instant::now();
    // Building needs the Debian mirror; without a cached image or a network this machine
    // cannot run the test.
    if let Err(reason) = vm::image_available(&spec, &cache) {
        skip_or_fail(TEST, &reason);
        return;
    }
    let base = vm::build_image(&spec, &cache)
        .unwrap_or_else(|error| panic!("cannot build the VM image: {error:#}"));
    eprintln!(
        "{TEST}: image ready in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        base.path.display()
    );

    let work = tempfile::tempdir().expect("tempdir");
    let image = base
        .copy_to(&work.path().join("disk.raw"))
        .expect("copy the image");

    // (a) Nothing pending: GRUB boots saved_entry, slot A.
    let first = boot(&image, work.path(), "1-saved-a");
    assert!(
        first.serial.contains("Linux version"),
        "the kernel's banner is missing from the serial console:\n{}",
        first.serial
    );
    assert_booted(&first, "A", &spec.marker_a);

    // (b) next_entry=B: slot B, once.
    image
        .write_grubenv(&[("saved_entry", "A"), ("next_entry", "B")])
        .expect("write grubenv");
    let second = boot(&image, work.path(), "2-next-b");
    assert_booted(&second, "B", &spec.marker_b);
    let env = image.read_grubenv().expect("read grubenv");
    assert!(
        env.iter().all(|(key, _)| key != "next_entry"),
        "GRUB should have removed next_entry as it booted it: {env:?}"
    );

    // (c) Untouched: next_entry was used once, saved_entry rules again.
    let third = boot(&image, work.path(), "3-saved-a-again");
    assert_booted(&third, "A", &spec.marker_a);

    // (d) A trial of A with one attempt left: GRUB counts it down and boots A...
    image
        .write_grubenv(&[("saved_entry", "A"), ("boot_counter", "1")])
        .expect("write grubenv");
    let fourth = boot(&image, work.path(), "4-trial-a");
    assert_booted(&fourth, "A", &spec.marker_a);
    let env = image.read_grubenv().expect("read grubenv");
    assert!(
        env.iter()
            .any(|(key, value)| key == "boot_counter" && value == "0"),
        "GRUB should have counted boot_counter down to 0: {env:?}"
    );

    // (e) ...and with no attempt left (the trial was never committed), the rescue slot B.
    let fifth = boot(&image, work.path(), "5-attempts-used-b");
    assert_booted(&fifth, "B", &spec.marker_b);

    let times: Vec<String> = [&first, &second, &third, &fourth, &fifth]
        .iter()
        .map(|outcome| format!("{:.1} s", outcome.time_to_report.as_secs_f64()))
        .collect();
    eprintln!(
        "{TEST}: boot times (QEMU start to the guest's report, TCG): {}",
        times.join(", ")
    );
}
