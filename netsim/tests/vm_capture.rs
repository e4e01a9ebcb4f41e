//! Capture on a real machine (issue 13): a QEMU virtual machine that boots Debian through GRUB,
//! in a class the origin lets capture and with no image of its own, builds its image in its
//! spare slot (a fresh ext4 filesystem on its slot B partition, mounted for the install
//! script), publishes it with publisher rights, and the origin maps the machine's model to it.
//! A second VM of the same model then negotiates, is told to fetch exactly that image, and
//! `origin swap` installs it: the second machine boots the captured OS on slot A with its own
//! identity (host name, SSH host key) carried over, as its serial console shows.
//!
//! Each VM runs in a network namespace of its own (`netsim::vmnet`): it reaches the origin
//! and the stager and nothing else, which the first machine's probe checks (a TCP service of
//! the host, at 10.0.2.2 and at the host's own address, stays out of reach).
//!
//! The install script is the operator's: here it copies the running OS into the slot
//! (`cp -ax`) and marks the copy, which is what an operator capturing a hand-installed machine
//! does.
//!
//! Needs root, the VM tools (`scripts/install-deps.sh` installs them) and, the first time, the
//! Debian mirror; runs the guests under TCG:
//!
//! `cargo nextest run --release --workspace --features origin/test-hooks,stager/test-hooks,edge-agent/test-hooks -E 'binary(vm_capture)' --no-capture`

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use netsim::procs::Binaries;
use netsim::testbed::Testbed;
use netsim::vm::{self, Vm, GUEST_AGENT_PORT, GUEST_STORAGE};
use serde_json::Value;
use stagecoach_testing::wait_for_async;

const TEST: &str = "a_vm_without_an_image_captures_one_and_a_second_vm_of_its_model_boots_it";

/// Longest a first boot may take under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Longest the capture (copy, pack and upload of a Debian root inside a TCG guest) may take.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(1200);

/// How often the origin is asked while waiting on it.
const POLL: Duration = Duration::from_secs(2);

/// The bundle name the origin gives captured images (its policy's `[capture] name`).
const CAPTURED_NAME: &str = "vm-captured";

/// What the install script writes as the copy's marker (`/etc/stagecoach-marker`).
const CAPTURED_MARKER: &str = "vm-captured";

/// The operator's install script, in the machine's storage area: a copy of the running OS
/// (one filesystem: not the storage area, the boot partition or `/run`), marked.
const INSTALL_SCRIPT: &str = "#!/bin/sh\n\
# Installs this machine's OS into the spare slot given as $1: a copy of the running one, marked.\n\
set -eu\n\
cp -ax /. \"$1/\"\n\
echo vm-captured > \"$1/etc/stagecoach-marker\"\n\
echo \"copied the running OS into $1\"\n";

/// The policy: the `lab` class may capture; no rule maps any machine to an image yet.
const POLICY: &str = "[capture]\nclasses = [\"lab\"]\nname = \"vm-captured\"\n";

/// Trial boots of a new OS before the rescue takes over.
const BOOT_ATTEMPTS: u8 = 2;

/// The host's address on its default route (none without one): a guest of plain user-mode
/// networking reaches the host there too.
fn host_address() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // No datagram is sent: connecting a UDP socket only picks the route and source address.
    socket.connect("192.0.2.1:9").ok()?;
    Some(socket.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback())
}

async fn origin_json(mesh: &Testbed, args: &[&str]) -> Value {
    mesh.origin_json(args).await.expect("origin --json")
}

/// One machine: its storage area seeded and written to its copy of `base`, then booted.
struct Machine {
    name: String,
    vm: Vm,
    host_key: String,
}

async fn start_machine(
    mesh: &mut Testbed,
    base: &vm::VmImage,
    work: &Path,
    index: usize,
    extra_args: &str,
    extra_storage: impl FnOnce(&Path),
) -> Machine {
    let name = format!("vm-{index}");
    let edge = mesh.add_edge("site-a", index).await.expect("enroll");
    let dir = work.join(&name);
    std::fs::create_dir_all(&dir).expect("vm dir");
    let stager = mesh.stager_addrs("site-a")[0].clone();
    // All the machine reaches: the origin and the stager.
    let reach = [
        vm::port_of(&mesh.origin.mesh).expect("origin port"),
        vm::port_of(&stager).expect("stager port"),
    ];
    let port = vm::free_udp_port().expect("port");
    let serve_args = format!(
        "--stager {} --listen 0.0.0.0:{GUEST_AGENT_PORT} --advertise 127.0.0.1:{port} --peers off --swap-boot-attempts {BOOT_ATTEMPTS} --class lab {extra_args}",
        vm::guest_addr(&stager).expect("stager address")
    );
    let storage = dir.join("storage");
    let host_key = vm::seed_storage(&storage, &edge.dir, &name, &serve_args)
        .expect("the machine's storage area");
    extra_storage(&storage);
    let disk = base.copy_to(&dir.join("disk.raw")).expect("copy the image");
    disk.write_storage(&storage)
        .expect("write the storage area");
    let vm = Vm::start(&disk.path, &dir.join("serial.log"), port, &reach).expect("start QEMU");
    Machine { name, vm, host_key }
}

/// The catalog entry of the captured image, once the origin has one.
async fn captured_bundle(mesh: &Testbed) -> Option<Value> {
    let bundles = origin_json(mesh, &["bundles", "--json"]).await;
    bundles
        .as_array()?
        .iter()
        .find(|b| b["name"] == CAPTURED_NAME)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_without_an_image_captures_one_and_a_second_vm_of_its_model_boots_it() {
    let bins = Binaries::beside_current_exe().expect("build the binaries first");
    let Some(base) = vm::agent_image_ready(TEST, &bins.path("edge-agent"))
        .await
        .unwrap_or_else(|error| panic!("the agent image: {error:#}"))
    else {
        return;
    };
    let root = base.root.clone().expect("an agent image keeps its root");

    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let mut mesh = Testbed::start(bins, &w.join("mesh"), 1, 0, &[])
        .await
        .expect("mesh");
    // The rescue OS of the second machine's swap: the image's root as built.
    mesh.publish_as(&root, "vm-rescue", "1", "base-os")
        .await
        .expect("publish vm-rescue@1");
    let policy = w.join("policy.toml");
    std::fs::write(&policy, POLICY).expect("policy");
    mesh.origin_ok(&["policy", "load", &policy.display().to_string()])
        .await
        .expect("policy load");
    let origin = mesh.origin.mesh.clone();
    mesh.route_site_via("site-a", &vm::guest_addr(&origin).expect("origin address"));

    // A host service the machines must not reach (QEMU's user-mode network alone would let
    // them, at 10.0.2.2 and at the host's own address); the first machine's probe tries it.
    let forbidden = std::net::TcpListener::bind("0.0.0.0:0").expect("a host service");
    forbidden.set_nonblocking(true).expect("nonblocking");
    let forbidden_port = forbidden.local_addr().expect("addr").port();
    let mut probe_targets = vec![format!("{}:{forbidden_port}", vm::GUEST_HOST_ADDR)];
    if let Some(ip) = host_address() {
        probe_targets.push(format!("{ip}:{forbidden_port}"));
    }

    // The first machine may capture: the install script and a copy of the publisher's
    // identity are in its storage area.
    let publisher = mesh.origin_dir.join("publisher");
    let capture_args = format!(
        "--capture-script {GUEST_STORAGE}/capture.sh --publisher-dir {GUEST_STORAGE}/publisher"
    );
    let capturing = Instant::now();
    let first = start_machine(&mut mesh, &base, w, 0, &capture_args, |storage| {
        let script = storage.join("capture.sh");
        std::fs::write(&script, INSTALL_SCRIPT).expect("install script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(&publisher)
            .arg(storage.join("publisher"))
            .status()
            .expect("cp");
        assert!(copied.success(), "cannot copy the publisher directory");
        std::fs::write(
            storage.join(vm::PROBE_FILE),
            probe_targets.join("\n") + "\n",
        )
        .expect("probe list");
    })
    .await;

    let captured = wait_for_async(CAPTURE_TIMEOUT, POLL, async || {
        Ok::<_, std::convert::Infallible>(captured_bundle(&mesh).await)
    })
    .await;
    let Ok(captured) = captured else {
        panic!(
            "the first machine never published a captured image; its console:\n{}",
            first.vm.serial().unwrap_or_default()
        );
    };
    let captured_id = captured["id"].as_str().expect("bundle id").to_owned();
    let serial = first.vm.serial().expect("serial console");
    let log = vm::agent_log(&serial);
    let seconds_between = |from: &str, to: &str| {
        let from = log.iter().find(|l| l.message.starts_with(from))?.at;
        let to = log.iter().find(|l| l.message.starts_with(to))?.at;
        Some(to - from)
    };
    eprintln!(
        "{TEST}: {} captured {CAPTURED_NAME}@{} ({captured_id}) {:.1} s after QEMU started: install script {:.1} s, pack and upload {:.1} s; {:.1} MiB stored",
        first.name,
        captured["version"].as_str().unwrap_or("?"),
        capturing.elapsed().as_secs_f64(),
        seconds_between("running the install script", "install script done").unwrap_or(f64::NAN),
        seconds_between("packing and publishing", "captured image published").unwrap_or(f64::NAN),
        captured["stored_bytes"].as_u64().unwrap_or(0) as f64 / (1024.0 * 1024.0),
    );
    // The machine reached the origin and the stager (it negotiated, captured and published)
    // and nothing else.
    let probes = wait_for_async(BOOT_TIMEOUT, POLL, async || {
        let probes = first.vm.probes().expect("serial console");
        Ok::<_, std::convert::Infallible>((probes.len() >= probe_targets.len()).then_some(probes))
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the first machine's probe never reported; console in {}",
            first.vm.serial_log.display()
        )
    });
    eprintln!(
        "{TEST}: {} probes: {probes:?}; {} datagrams relayed to and from the origin and stager",
        first.name,
        first.vm.relayed_datagrams()
    );
    for (target, open) in &probes {
        assert!(
            !open,
            "{}: the guest opened a connection to {target}, a host service outside the origin and stager",
            first.name
        );
    }
    assert!(
        matches!(forbidden.accept(), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the host service must not have been reached"
    );

    // The origin records the capturing machine's facts and maps its model to the image.
    let check = mesh
        .origin_ok(&["policy", "check"])
        .await
        .expect("policy check");
    assert!(
        check.contains("captured-model-"),
        "the origin maps the machine's model to the captured image:\n{check}"
    );
    let audit = mesh.origin_ok(&["audit"]).await.expect("audit");
    assert!(audit.contains("captured by node"), "{audit}");

    // The second machine, same model, no capture script: its start-up negotiation fetches the
    // captured image.
    let second = start_machine(&mut mesh, &base, w, 1, "", |_| {}).await;
    let told = wait_for_async(BOOT_TIMEOUT, POLL, async || {
        let nodes = origin_json(&mesh, &["nodes", "--json"]).await;
        let row = nodes.as_array().and_then(|rows| {
            rows.iter()
                .find(|r| {
                    r["data_addr"]
                        .as_str()
                        .is_some_and(|a| a.ends_with(&format!(":{}", second.vm.agent_port)))
                })
                .cloned()
        });
        Ok::<_, std::convert::Infallible>(row.filter(|row| {
            let has = |field: &str| {
                row[field]
                    .as_array()
                    .is_some_and(|list| list.iter().any(|b| b["id"] == captured_id.as_str()))
            };
            has("desired") && has("held")
        }))
    })
    .await;
    if told.is_err() {
        let nodes = origin_json(&mesh, &["nodes", "--json"]).await;
        panic!(
            "the second machine must want and hold the captured image: {nodes:#}\n{}",
            second.vm.serial().unwrap_or_default()
        );
    }

    // The swap: the captured OS into slot A, the rescue into B.
    let swapping = Instant::now();
    let edge = format!("127.0.0.1:{}", second.vm.agent_port);
    let out = mesh
        .origin_cli(&[
            "swap",
            "--target",
            &captured_id,
            "--rescue",
            "vm-rescue@1",
            "--edge",
            &edge,
            "--no-progress",
        ])
        .await
        .expect("origin swap");
    assert!(
        out.ok,
        "origin swap:\n{}\n{}\nconsole in {}",
        out.stdout,
        out.stderr,
        second.vm.serial_log.display()
    );
    eprintln!(
        "{TEST}: {} swapped to the captured image in {:.1} s",
        second.name,
        swapping.elapsed().as_secs_f64()
    );
    let reports = second.vm.reports().expect("reports");
    let last = reports.last().expect("a boot report");
    assert_eq!(
        (
            last.slot.as_str(),
            last.marker.as_str(),
            last.hostname.as_deref(),
            last.host_key.as_deref()
        ),
        (
            "A",
            CAPTURED_MARKER,
            Some(second.name.as_str()),
            Some(second.host_key.as_str())
        ),
        "{}: the captured OS on slot A with its own identity (not the capturer's): {reports:?}, console in {}",
        second.name,
        second.vm.serial_log.display()
    );
    for machine in [first, second] {
        machine.vm.kill();
    }
}
