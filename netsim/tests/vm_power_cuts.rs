//! Power cuts during real swaps (issue 13): one QEMU virtual machine built by `netsim::vm`,
//! booting Debian through GRUB and running `edge-agent serve --linux-config`, is swapped by
//! `origin swap` again and again between two versions of its OS. In each trial QEMU is killed
//! (SIGKILL: the power goes, nothing is flushed) at a moment spread over the swap — while a
//! slot is unpacked, between journal and boot-loader writes, during a reboot — and started
//! again at once. Every trial must end with the machine booting a slot that holds a complete
//! OS (its boot report on the serial console), and the swap completing or rolling back by
//! itself, which `origin swap` learns from the rebooted machine's journal.
//!
//! `STAGECOACH_VM_TRIALS=N` sets the number of trials (default 5) and `STAGECOACH_VM_SEED` the
//! seed of the cut moments (printed). Needs root and the VM tools; runs the guest under TCG:
//!
//! `STAGECOACH_VM_TRIALS=30 cargo nextest run --release --workspace --features origin/test-hooks,stager/test-hooks,edge-agent/test-hooks -E 'binary(vm_power_cuts)' --no-capture`

use std::time::Duration;

use netsim::procs::{self, Binaries};
use netsim::testbed::Testbed;
use netsim::vm::{self, GuestReport, Vm, GUEST_AGENT_PORT};
use rand::{Rng, SeedableRng};
use stagecoach_testing::wait_for_async;

const TEST: &str = "power_cuts_during_swaps_never_leave_a_vm_unbootable";

/// Longest a boot may take under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Longest one swap, its cut and its recovery included, may take.
const SWAP_TIMEOUT: Duration = Duration::from_secs(1200);

/// The cuts fall within this long after the daemon starts the procedure (a swap here takes
/// about 80 s from there: a reboot into the rescue, the unpack, a trial boot).
const CUT_WINDOW_SECS: f64 = 90.0;

const DEFAULT_TRIALS: usize = 5;

const NAME: &str = "vm-cut";

/// How a trial ended.
struct Trial {
    cut_after: f64,
    cut_during: String,
    outcome: String,
    boots_after_cut: usize,
}

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// What the machine was doing when the power went: the last step of the swap logged during
/// the boot it was in, else where that boot was.
fn doing(serial: &str) -> String {
    let boots = serial.matches("Linux version").count();
    let current = serial
        .rfind("Linux version")
        .map_or(serial, |start| &serial[start..]);
    let log = vm::agent_log(current);
    let swap_line = log.iter().rev().find(|l| {
        l.target.starts_with("edge_agent::swap") || l.message == "swap starting on this machine"
    });
    match swap_line {
        Some(line) if line.message == "step" => {
            format!("step {} (boot {boots})", line.field("step").unwrap_or("?"))
        }
        Some(line) if line.message == "rebooting" => format!("the shutdown of boot {boots}"),
        Some(line) => format!("{:?} (boot {boots})", line.message),
        None if vm::find_reports(current).is_empty() => format!("boot {boots}, starting"),
        None => format!("boot {boots}, before the agent"),
    }
}

fn check_identity(report: &GuestReport, host_key: &str, when: &str) {
    assert_eq!(
        (report.hostname.as_deref(), report.host_key.as_deref()),
        (Some(NAME), Some(host_key)),
        "the machine's identity {when}: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_during_swaps_never_leave_a_vm_unbootable() {
    let bins = Binaries::beside_current_exe().expect("build the binaries first");
    let Some(base) = vm::agent_image_ready(TEST, &bins.path("edge-agent"))
        .await
        .unwrap_or_else(|error| panic!("the agent image: {error:#}"))
    else {
        return;
    };
    let trials: usize = env_number("STAGECOACH_VM_TRIALS").unwrap_or(DEFAULT_TRIALS);
    let seed: u64 = env_number("STAGECOACH_VM_SEED").unwrap_or_else(rand::random);
    eprintln!("{TEST}: {trials} trials, seed {seed} (STAGECOACH_VM_SEED={seed} repeats the cuts)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let root = base.root.clone().expect("an agent image keeps its root");

    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let mut mesh = Testbed::start(bins.clone(), &w.join("mesh"), 1, 0, &[])
        .await
        .expect("mesh");
    // The image's root is the rescue and version 1; version 2 differs by its marker.
    mesh.publish_as(&root, "vm-rescue", "1", "base-os")
        .await
        .expect("publish vm-rescue@1");
    mesh.publish(&root, "vm-os", "1")
        .await
        .expect("publish vm-os@1");
    let second_root = w.join("vm-os-2");
    vm::marked_copy(&root, &second_root, "vm-os-2").expect("vm-os@2");
    mesh.publish(&second_root, "vm-os", "2")
        .await
        .expect("publish vm-os@2");

    let stager = mesh.stager_addrs("site-a")[0].clone();
    let origin = mesh.origin.mesh.clone();
    mesh.route_site_via("site-a", &vm::guest_addr(&origin).expect("origin address"));
    let edge = mesh.add_edge("site-a", 0).await.expect("enroll");
    // All the machine reaches: the origin and the stager.
    let reach = [
        vm::port_of(&origin).expect("origin port"),
        vm::port_of(&stager).expect("stager port"),
    ];
    let port = vm::free_udp_port().expect("port");
    let serve_args = format!(
        "--stager {} --listen 0.0.0.0:{GUEST_AGENT_PORT} --advertise 127.0.0.1:{port} --peers off --swap-boot-attempts 2",
        vm::guest_addr(&stager).expect("stager address")
    );
    let host_key = vm::seed_storage(&w.join("storage"), &edge.dir, NAME, &serve_args)
        .expect("the machine's storage area");
    let disk = base.copy_to(&w.join("disk.raw")).expect("copy the image");
    disk.write_storage(&w.join("storage"))
        .expect("write the storage area");
    let mut run = 0;
    let serial_of = |run: usize| w.join(format!("serial-{run}.log"));
    let mut machine = Vm::start(&disk.path, &serial_of(run), port, &reach).expect("start QEMU");
    let first = machine
        .wait_for_reports(1, BOOT_TIMEOUT)
        .expect("first boot");
    assert_eq!(
        (first[0].slot.as_str(), first[0].marker.as_str()),
        ("A", "vm-os-1")
    );
    check_identity(&first[0], &host_key, "at its first boot");
    let data_addr = format!("127.0.0.1:{port}");
    let reported = wait_for_async(BOOT_TIMEOUT, Duration::from_secs(2), async || {
        let nodes = mesh.origin_json(&["nodes", "--json"]).await.expect("nodes");
        let found = nodes
            .as_array()
            .is_some_and(|rows| rows.iter().any(|r| r["data_addr"] == data_addr.as_str()));
        Ok::<_, std::convert::Infallible>(found.then_some(()))
    })
    .await;
    assert!(reported.is_ok(), "the machine's daemon did not report");

    let mut results = Vec::new();
    let mut unbootable = Vec::new();
    let mut on_a = "vm-os-1".to_owned();
    for trial in 0..trials {
        let target = if on_a == "vm-os-2" {
            "vm-os@1"
        } else {
            "vm-os@2"
        };
        let target_marker = target.replace('@', "-");
        let args: Vec<String> = [
            "swap",
            "--target",
            target,
            "--rescue",
            "vm-rescue@1",
            "--edge",
            &data_addr,
            "--no-progress",
            "--dir",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([mesh.origin_dir.display().to_string()])
        .collect();
        let origin_bin = bins.path("origin");
        let swap = tokio::spawn(async move { procs::run_cli(&origin_bin, &args).await });

        // The cut: spread over the window, one stratum per trial.
        let cut_after = CUT_WINDOW_SECS * (trial as f64 + rng.gen::<f64>()) / trials.max(1) as f64;
        let before = vm::agent_log(&machine.serial().expect("serial"))
            .iter()
            .filter(|l| l.message == "swap starting on this machine")
            .count();
        let started = wait_for_async(SWAP_TIMEOUT, Duration::from_millis(200), async || {
            let count = vm::agent_log(&machine.serial().expect("serial"))
                .iter()
                .filter(|l| l.message == "swap starting on this machine")
                .count();
            Ok::<_, std::convert::Infallible>((count > before).then_some(()))
        })
        .await;
        assert!(
            started.is_ok(),
            "trial {trial}: the daemon never started the swap to {target}: serial console in {}",
            machine.serial_log.display()
        );
        tokio::time::sleep(Duration::from_secs_f64(cut_after)).await;
        let serial = machine.serial().expect("serial");
        let cut_during = doing(&serial);
        let log = machine.serial_log.clone();
        machine.kill();
        eprintln!(
            "{TEST}: trial {trial}: to {target}, power cut {cut_after:.1} s into the procedure, during {cut_during} (console before the cut: {})",
            log.display()
        );

        // Power back: the machine must boot an OS, whatever the cut interrupted.
        run += 1;
        machine = Vm::start(&disk.path, &serial_of(run), port, &reach).expect("restart QEMU");
        if let Err(error) = machine.wait_for_reports(1, BOOT_TIMEOUT) {
            unbootable.push(format!("trial {trial} ({cut_during}): {error:#}"));
            break;
        }
        let ended = tokio::time::timeout(SWAP_TIMEOUT, swap)
            .await
            .unwrap_or_else(|_| panic!("trial {trial}: origin swap did not end"))
            .expect("swap task")
            .expect("run origin swap");
        let line = ended.stdout.lines().next().unwrap_or_default().to_owned();
        let outcome = line
            .split_whitespace()
            .nth(1)
            .unwrap_or("nothing")
            .trim_end_matches(':')
            .to_owned();
        let reports = machine.reports().expect("reports");
        let last = reports.last().expect("a boot report").clone();
        check_identity(&last, &host_key, &format!("after trial {trial}"));
        match outcome.as_str() {
            "done" => {
                assert!(ended.ok, "trial {trial}: {line}\n{}", ended.stderr);
                assert_eq!(
                    (last.slot.as_str(), last.marker.as_str()),
                    ("A", target_marker.as_str()),
                    "trial {trial}: done, so the new OS runs on A: {reports:?}"
                );
                on_a = target_marker;
            }
            "rolled-back" => {
                assert_eq!(
                    (last.slot.as_str(), last.marker.as_str()),
                    ("B", "vm-os-1"),
                    "trial {trial}: rolled back, so the rescue runs on B: {reports:?}"
                );
            }
            // Cut before the journal's first write: no swap happened, the old OS runs.
            "error" if line.contains("no swap on record") || line.contains("last swap is to") => {
                assert!(reports.iter().all(|r| !r.marker.is_empty()));
            }
            _ => panic!(
                "trial {trial} ({cut_during}): origin swap must learn how the swap ended:\n{}{}",
                ended.stdout, ended.stderr
            ),
        }
        let boots_after_cut = reports.len();
        eprintln!(
            "{TEST}: trial {trial}: {outcome} after {boots_after_cut} boots since the cut; running {} on {}",
            last.marker, last.slot
        );
        results.push(Trial {
            cut_after,
            cut_during,
            outcome,
            boots_after_cut,
        });
    }
    machine.kill();
    eprintln!(
        "{TEST}: {} trials, {} unbootable",
        results.len(),
        unbootable.len()
    );
    for (index, trial) in results.iter().enumerate() {
        eprintln!(
            "{TEST}:   {index}: cut {:.1} s in, during {}: {} after {} boots",
            trial.cut_after, trial.cut_during, trial.outcome, trial.boots_after_cut
        );
    }
    assert!(
        unbootable.is_empty(),
        "unbootable after a power cut: {unbootable:#?}"
    );
    assert_eq!(results.len(), trials);
}
