//! The OS swap on machines that boot a real Debian kernel through real GRUB (issue 13): two
//! QEMU virtual machines built by `netsim::vm` from Debian's packages, each running the real
//! `edge-agent serve --linux-config` on `LinuxPlatform`, reach the origin and stager this test
//! starts on the host's loopback through QEMU's user-mode networking. `origin rollout start`
//! (canary first) swaps both to a new version of their OS, published with `origin publish`:
//! each machine reboots into its rescue slot, writes the new OS into slot A, reboots into it on
//! a trial, passes its health checks and commits, and its daemon reports the new version.
//! Then a third version whose network never comes up: the canary's trial boots fail their
//! health checks, GRUB falls back to the rescue slot, the daemon there reports the failure and
//! the rescue OS, and the rollout halts with the other machine untouched.
//!
//! What the test checks comes from inside each guest, on its serial console (the slot on
//! `/proc/cmdline`, the OS's marker file, the host name and SSH host key carried over from the
//! machine's first OS), and from the origin (the rollout's outcome, the node's installed OS).
//!
//! Needs root, the VM tools (`scripts/install-deps.sh` installs them) and, the first time, the
//! Debian mirror; runs the guests under TCG:
//!
//! `cargo nextest run --release --workspace --features origin/test-hooks,stager/test-hooks,edge-agent/test-hooks -E 'binary(vm_swap)' --no-capture`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use netsim::procs::Binaries;
use netsim::testbed::Testbed;
use netsim::vm::{self, GuestReport, Vm, GUEST_AGENT_PORT};
use serde_json::Value;
use stagecoach_testing::wait_for_async;

const TEST: &str = "a_rollout_swaps_two_vms_through_grub_and_a_failing_os_falls_back_to_the_rescue";

/// Longest a first boot may take under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Longest the whole rollout (two machines, each two reboots, under TCG) may take.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(1800);

/// How often the origin is asked while waiting on it.
const POLL: Duration = Duration::from_secs(2);

const MACHINES: usize = 2;

/// Trial boots of a new OS before the rescue takes over (fewer than the default 3: each is
/// half a minute under TCG).
const BOOT_ATTEMPTS: u8 = 2;

/// One virtual machine of the test and what it must keep across the swap.
struct Machine {
    name: String,
    vm: Vm,
    host_key: String,
    /// When QEMU started, in seconds since the epoch.
    started_at: f64,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Where a machine's swap spent its time, from its agent's log on the serial console (the
/// guest's clock, which QEMU sets from the host's).
#[derive(Debug)]
struct SwapTimes {
    /// From the origin's request to the end of the journal.
    total: f64,
    /// Fetching both bundles through the site, and delivering them to the machine's store.
    fetch: f64,
    /// Writing slots (verified unpack).
    unpack: f64,
    /// Running the health checks.
    health: f64,
    /// The rest: reboots, mostly.
    reboots: f64,
    /// Bytes the daemon received for the swap.
    fetched_bytes: u64,
}

fn swap_times(serial: &str, target: &str) -> Option<SwapTimes> {
    let log = vm::agent_log(serial);
    let start = log
        .iter()
        .position(|l| l.message.starts_with("swap asked") && l.field("target") == Some(target))?;
    let log = &log[start..];
    let asked = log[0].at;
    let staged = log
        .iter()
        .find(|l| l.message == "swap starting on this machine")?
        .at;
    let end = log
        .iter()
        .find(|l| {
            l.message.starts_with("swap complete") || l.message.starts_with("swap ended without")
        })?
        .at;
    let seconds = |message: &str| {
        log.iter()
            .filter(|l| l.message == message)
            .filter_map(|l| l.field("elapsed_ms")?.parse::<f64>().ok())
            .sum::<f64>()
            / 1000.0
    };
    let unpack = seconds("slot installed");
    let health = seconds("health check passed") + seconds("health check failed");
    let fetched_bytes = log
        .iter()
        .take_while(|l| l.at <= staged)
        .filter(|l| l.message == "fetched")
        .filter_map(|l| l.field("bytes")?.parse::<u64>().ok())
        .sum();
    Some(SwapTimes {
        total: end - asked,
        fetch: staged - asked,
        unpack,
        health,
        reboots: end - staged - unpack - health,
        fetched_bytes,
    })
}

fn print_swap_times(machine: &Machine, target: &str, what: &str) -> SwapTimes {
    let serial = machine.vm.serial().expect("serial console");
    let times = swap_times(&serial, target).unwrap_or_else(|| {
        panic!(
            "{}: the agent's log of its swap to {target} is incomplete: serial console in {}",
            machine.name,
            machine.vm.serial_log.display()
        )
    });
    eprintln!(
        "{TEST}: {} {what}: {:.0} s = fetch {:.1} s + unpack {:.1} s + health checks {:.1} s + reboots and the rest {:.1} s; fetched {:.1} MiB",
        machine.name,
        times.total,
        times.fetch,
        times.unpack,
        times.health,
        times.reboots,
        times.fetched_bytes as f64 / (1024.0 * 1024.0)
    );
    times
}

fn assert_report(report: &GuestReport, machine: &Machine, slot: &str, marker: &str, when: &str) {
    assert_eq!(
        (
            report.slot.as_str(),
            report.marker.as_str(),
            report.hostname.as_deref(),
            report.host_key.as_deref()
        ),
        (
            slot,
            marker,
            Some(machine.name.as_str()),
            Some(machine.host_key.as_str())
        ),
        "{} {when}: serial console in {}",
        machine.name,
        machine.vm.serial_log.display()
    );
}

async fn origin_json(mesh: &Testbed, args: &[&str]) -> Value {
    mesh.origin_json(args).await.expect("origin --json")
}

/// Waits for the running rollout to leave the `running` phase; returns its status.
async fn settle(mesh: &Testbed, started: Instant, what: &str) -> Value {
    let settled = wait_for_async(ROLLOUT_TIMEOUT, POLL, async || {
        let status = origin_json(mesh, &["rollout", "status", "--json"]).await;
        Ok::<_, std::convert::Infallible>((status["phase"]["phase"] != "running").then_some(status))
    })
    .await;
    let Ok(status) = settled else {
        let status = origin_json(mesh, &["rollout", "status", "--json"]).await;
        panic!("the {what} did not settle: {status:#}");
    };
    eprintln!(
        "{TEST}: {what} settled after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_swaps_two_vms_through_grub_and_a_failing_os_falls_back_to_the_rescue() {
    let bins = Binaries::beside_current_exe().expect("build the binaries first");
    let Some(base) = vm::agent_image_ready(TEST, &bins.path("edge-agent"))
        .await
        .unwrap_or_else(|error| panic!("the agent image: {error:#}"))
    else {
        return;
    };
    let started = Instant::now();
    let root: PathBuf = base.root.clone().expect("an agent image keeps its root");

    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let mut mesh = Testbed::start(bins, &w.join("mesh"), 1, 0, &[])
        .await
        .expect("mesh");

    // The machines' first OS is the image's root as built, published again as their rescue OS
    // (a base-os bundle); the new OS differs from it by its marker.
    let published = Instant::now();
    let first = mesh
        .publish_as(&root, "vm-rescue", "1", "base-os")
        .await
        .expect("publish vm-rescue@1");
    let second_root = w.join("vm-os-2");
    vm::marked_copy(&root, &second_root, "vm-os-2").expect("vm-os@2");
    let second = mesh
        .publish(&second_root, "vm-os", "2")
        .await
        .expect("publish vm-os@2");
    eprintln!(
        "{TEST}: published vm-rescue@1 ({first}) and vm-os@2 in {:.1} s",
        published.elapsed().as_secs_f64()
    );

    // The guests reach the origin and the stager through QEMU at the host's address.
    let stager = mesh.stager_addrs("site-a")[0].clone();
    let origin = mesh.origin.mesh.clone();
    mesh.route_site_via("site-a", &vm::guest_addr(&origin).expect("origin address"));
    // All a machine reaches: the origin and the stager.
    let reach = [
        vm::port_of(&origin).expect("origin port"),
        vm::port_of(&stager).expect("stager port"),
    ];
    let mut machines = Vec::new();
    for index in 0..MACHINES {
        let name = format!("vm-{index}");
        let edge = mesh.add_edge("site-a", index).await.expect("enroll");
        let dir = w.join(&name);
        std::fs::create_dir_all(&dir).expect("vm dir");
        let port = vm::free_udp_port().expect("port");
        let serve_args = format!(
            "--stager {} --listen 0.0.0.0:{GUEST_AGENT_PORT} --advertise 127.0.0.1:{port} --peers off --swap-boot-attempts {BOOT_ATTEMPTS}",
            vm::guest_addr(&stager).expect("stager address")
        );
        let host_key = vm::seed_storage(&dir.join("storage"), &edge.dir, &name, &serve_args)
            .expect("the machine's storage area");
        let disk = base.copy_to(&dir.join("disk.raw")).expect("copy the image");
        disk.write_storage(&dir.join("storage"))
            .expect("write the storage area");
        let started_at = unix_now();
        let vm = Vm::start(&disk.path, &dir.join("serial.log"), port, &reach).expect("start QEMU");
        machines.push(Machine {
            name,
            vm,
            host_key,
            started_at,
        });
    }

    // First boot: slot A, the first OS, the machine's own identity from its seed.
    for machine in &mut machines {
        let reports = machine
            .vm
            .wait_for_reports(1, BOOT_TIMEOUT)
            .unwrap_or_else(|error| panic!("{}: {error:#}", machine.name));
        eprintln!(
            "{TEST}: {} booted after {:.1} s",
            machine.name,
            started.elapsed().as_secs_f64()
        );
        assert_report(&reports[0], machine, "A", "vm-os-1", "at its first boot");
    }

    // Each daemon reports its address (the forwarded port) through the stager.
    let reported = wait_for_async(BOOT_TIMEOUT, POLL, async || {
        let nodes = origin_json(&mesh, &["nodes", "--json"]).await;
        let with_addr = nodes.as_array().map_or(0, |rows| {
            rows.iter()
                .filter(|r| r["data_addr"].as_str().is_some_and(|a| !a.is_empty()))
                .count()
        });
        Ok::<_, std::convert::Infallible>((with_addr == MACHINES).then_some(nodes))
    })
    .await;
    if reported.is_err() {
        let nodes = origin_json(&mesh, &["nodes", "--json"]).await;
        let consoles: Vec<String> = machines
            .iter()
            .map(|m| m.vm.serial().unwrap_or_default())
            .collect();
        panic!(
            "the machines' daemons did not all report: {nodes:#}\n{}",
            consoles.join("\n-----\n")
        );
    }

    for machine in &machines {
        let serial = machine.vm.serial().expect("serial console");
        if let Some(ready) = vm::agent_log(&serial)
            .iter()
            .find(|l| l.message == "edge agent serving")
        {
            eprintln!(
                "{TEST}: {} boot to agent ready: {:.1} s",
                machine.name,
                ready.at - machine.started_at
            );
        }
    }

    // The nodes as the origin knows them: by the node id of their mesh certificate.
    let node_ids = |nodes: &Value| -> Vec<String> {
        let mut ids: Vec<String> = nodes
            .as_array()
            .map(|rows| {
                rows.iter()
                    .filter_map(|r| r["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    };
    let ids_before = node_ids(&origin_json(&mesh, &["nodes", "--json"]).await);
    let rollout_started = Instant::now();
    let plan = origin_json(
        &mesh,
        &[
            "rollout",
            "start",
            "vm-os@2",
            "--to",
            "all",
            "--rescue",
            "vm-rescue@1",
            "--json",
        ],
    )
    .await;
    assert_eq!(
        plan["waves"].as_array().map(Vec::len),
        Some(2),
        "one site: its canary, then the rest: {plan:#}"
    );
    let status = settle(&mesh, rollout_started, "rollout").await;
    assert_eq!(
        status["phase"]["phase"], "done",
        "the rollout must complete: {status:#}"
    );

    // Inside each guest: the boots of the swap (rescue B, then A on its trial), and the new OS
    // on slot A with the identity of the machine's first OS.
    for machine in &mut machines {
        let reports = machine.vm.reports().expect("reports");
        eprintln!("{TEST}: {} boots: {reports:?}", machine.name);
        assert!(
            reports.len() >= 3,
            "{}: the swap must boot the rescue, then the new OS: {reports:?}",
            machine.name
        );
        assert_report(&reports[1], machine, "B", "vm-os-1", "in its rescue slot");
        let last = reports.last().expect("a report");
        assert_report(last, machine, "A", "vm-os-2", "after the swap");
        let times = print_swap_times(machine, &second, "swap to vm-os@2");
        assert!(
            times.fetched_bytes > 0,
            "{}: the daemon fetched the bundles for its swap",
            machine.name
        );
    }

    // The origin: every node's installed OS is the new version (its daemon reported it after
    // the swap).
    let updated = wait_for_async(BOOT_TIMEOUT, POLL, async || {
        let nodes = origin_json(&mesh, &["nodes", "--json"]).await;
        let on_new = nodes.as_array().map_or(0, |rows| {
            rows.iter()
                .filter(|r| {
                    r["installed"].as_array().is_some_and(|installed| {
                        installed
                            .iter()
                            .any(|b| b["name"] == "vm-os" && b["version"] == "2")
                    })
                })
                .count()
        });
        Ok::<_, std::convert::Infallible>((on_new == MACHINES).then_some(()))
    })
    .await;
    if updated.is_err() {
        let nodes = origin_json(&mesh, &["nodes", "--json"]).await;
        panic!("the origin must show the new version for both machines: {nodes:#}");
    }
    // Each machine came back with its own mesh certificate (kept in its storage area): the
    // same node ids, and no new enrollment.
    assert_eq!(
        node_ids(&origin_json(&mesh, &["nodes", "--json"]).await),
        ids_before,
        "the machines must reconnect as the same nodes"
    );

    // A third OS whose network never comes up: systemd-networkd is not enabled, so the network
    // configuration the swap carries over is kept but nothing applies it. Its trial boots fail
    // the health checks until the firmware falls back to the rescue; the rollout halts after
    // its canary and the other machine is left alone.
    let third_root = w.join("vm-os-3");
    vm::marked_copy(&root, &third_root, "vm-os-3").expect("vm-os@3");
    for link in NETWORKD_LINKS {
        std::fs::remove_file(third_root.join(link))
            .unwrap_or_else(|e| panic!("cannot disable the network of vm-os@3 ({link}): {e}"));
    }
    let third = mesh
        .publish(&third_root, "vm-os", "3")
        .await
        .expect("publish vm-os@3");
    let boots_before: Vec<usize> = machines
        .iter()
        .map(|m| m.vm.reports().expect("reports").len())
        .collect();
    let rollout_started = Instant::now();
    origin_json(
        &mesh,
        &[
            "rollout",
            "start",
            "vm-os@3",
            "--to",
            "all",
            "--rescue",
            "vm-rescue@1",
            "--json",
        ],
    )
    .await;
    let status = settle(&mesh, rollout_started, "failing rollout").await;
    assert_eq!(
        status["phase"]["phase"], "halted",
        "a canary that fails its health checks halts the rollout: {status:#}"
    );
    let canary = &status["waves"][0]["nodes"][0];
    let reason = canary["state"].to_string();
    assert!(
        reason.contains("health check") && reason.contains("network"),
        "the origin records why the canary failed: {status:#}"
    );
    assert_eq!(
        status["waves"][1]["nodes"][0]["state"]["state"], "pending",
        "the machine after the canary is not swapped: {status:#}"
    );

    // Which machine was the canary: the origin knows its daemon by the forwarded port.
    let nodes = origin_json(&mesh, &["nodes", "--json"]).await;
    let canary_id = canary["node"].as_str().expect("canary id");
    let canary_node = nodes
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["id"] == canary_id))
        .unwrap_or_else(|| panic!("no node {canary_id}: {nodes:#}"));
    let canary_port = canary_node["data_addr"].as_str().expect("data_addr");
    for (machine, before) in machines.iter().zip(&boots_before) {
        let reports = machine.vm.reports().expect("reports");
        let new = &reports[*before..];
        if !canary_port.ends_with(&format!(":{}", machine.vm.agent_port)) {
            assert!(
                new.is_empty(),
                "{} is not the canary and must not reboot: {new:?}",
                machine.name
            );
            continue;
        }
        eprintln!("{TEST}: {} (canary) boots: {new:?}", machine.name);
        assert!(
            new.iter().any(|r| r.slot == "A" && r.marker == "vm-os-3"),
            "{}: the new OS must have been tried: {new:?}",
            machine.name
        );
        let last = new.last().expect("the canary rebooted");
        assert_report(last, machine, "B", "vm-os-1", "after its failed trial");
        print_swap_times(machine, &third, "failed swap to vm-os@3");
    }
    // The canary is reachable on its rescue and says so; the bundles stay for a retry.
    let rescued = wait_for_async(BOOT_TIMEOUT, POLL, async || {
        let nodes = origin_json(&mesh, &["nodes", "--json"]).await;
        let node = nodes
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["id"] == canary_id).cloned());
        Ok::<_, std::convert::Infallible>(node.filter(|node| {
            let has = |field: &str, name: &str, version: &str| {
                node[field].as_array().is_some_and(|list| {
                    list.iter()
                        .any(|b| b["name"] == name && b["version"] == version)
                })
            };
            has("installed", "vm-rescue", "1")
                && !has("installed", "vm-os", "2")
                && !has("installed", "vm-os", "3")
                && has("held", "vm-os", "3")
        }))
    })
    .await;
    if rescued.is_err() {
        let nodes = origin_json(&mesh, &["nodes", "--json"]).await;
        panic!("the canary must report its rescue OS and keep vm-os@3: {nodes:#}");
    }
    for machine in machines {
        machine.vm.kill();
    }
}

/// What enables systemd-networkd in the image (`netsim::vm` enables it for DHCP).
const NETWORKD_LINKS: [&str; 3] = [
    "etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
    "etc/systemd/system/sockets.target.wants/systemd-networkd.socket",
    "etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service",
];
