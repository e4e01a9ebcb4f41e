//! No matching image (brief 004) with real processes on loopback: a node whose class may
//! capture runs an install script into its spare slot, captures it as a bundle with its
//! inventory as metadata and publishes it with publisher rights; the next node with the same
//! facts is told to fetch exactly that bundle. A class that may not capture gets only "no
//! image", and an edge without publisher rights cannot upload.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use netsim::procs::Binaries;
use netsim::testbed::{site_name, Testbed};

/// How long a daemon may take to capture, publish and install an image.
const WAIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

/// How often the origin or a daemon's metrics are read while waiting on them.
const POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// The fake machine model both lab edges report (DMI product name).
const MODEL: &str = "LabBox-9000";

/// What the install script writes into the spare slot.
const MARKER_FILE: &str = "etc/captured-release";

/// A slot's completion marker, which the install script also leaves (as a copy of a running
/// OS would): the capture must not publish it.
const SLOT_MARKER: &str = ".stagecoach-slot.json";
const MARKER_TEXT: &str = "built by the lab install script";

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

use netsim::procs::CliRun as Run;

async fn run(bin: &Path, args: &[String]) -> Run {
    netsim::procs::run_cli(bin, args).await.expect("run")
}

async fn origin_ok(mesh: &Testbed, args: &[&str]) -> String {
    let out = mesh.origin_cli(args).await.expect("run origin");
    assert!(
        out.ok,
        "origin {args:?} failed:\n{}\n{}",
        out.stdout, out.stderr
    );
    out.stdout
}

async fn edge_agent(mesh: &Testbed, args: &[String]) -> Run {
    run(&mesh.bins.path("edge-agent"), args).await
}

fn s(text: impl Into<String>) -> String {
    text.into()
}

/// A fake `/proc` + `/sys` root whose DMI says `MODEL` by Acme.
fn fake_inventory_root(dir: &Path) -> PathBuf {
    let dmi = dir.join("sys/class/dmi/id");
    std::fs::create_dir_all(&dmi).expect("dmi");
    std::fs::write(dmi.join("product_name"), format!("{MODEL}\n")).expect("model");
    std::fs::write(dmi.join("sys_vendor"), "Acme\n").expect("vendor");
    dir.to_path_buf()
}

/// An empty simulated machine (two slots, an empty boot environment, booted from A), as
/// `SimPlatform::create` lays it out.
fn machine(dir: &Path) -> PathBuf {
    for slot in ["a", "b"] {
        std::fs::create_dir_all(dir.join("slots").join(slot)).expect("slot");
    }
    std::fs::create_dir_all(dir.join("boot")).expect("boot");
    // An empty GRUB environment block: the header, then '#' padding to 1024 bytes.
    let mut grubenv = b"# GRUB Environment Block\n".to_vec();
    grubenv.resize(1024, b'#');
    std::fs::write(dir.join("boot/grubenv"), grubenv).expect("grubenv");
    std::fs::write(dir.join("boot/booted-slot"), "a\n").expect("booted");
    std::fs::create_dir_all(dir.join("storage")).expect("storage");
    dir.to_path_buf()
}

fn install_script(dir: &Path) -> PathBuf {
    let path = dir.join("install.sh");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nset -e\nmkdir -p \"$1/etc\"\necho '{MARKER_TEXT}' > \"$1/{MARKER_FILE}\"\necho '{{}}' > \"$1/{SLOT_MARKER}\"\necho installed into \"$1\"\n"
        ),
    )
    .expect("script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_an_image_captures_one_and_the_next_identical_node_receives_it() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut mesh = Testbed::start(bins(), &work.path().join("mesh"), 1, 3, &[])
        .await
        .expect("mesh");
    let site = site_name(0);
    let stager = mesh.stager_addrs(&site)[0].clone();
    let facts = fake_inventory_root(&work.path().join("facts"));
    let script = install_script(work.path());
    let publisher_dir = mesh.origin_dir.join("publisher");

    // Capture allowed for the lab class only; no rule matches any node.
    let policy = work.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[capture]\nclasses = [\"lab\"]\nname = \"lab-os\"\n",
    )
    .expect("policy");
    origin_ok(&mesh, &["policy", "load", &policy.display().to_string()]).await;

    let edges: Vec<_> = mesh.edges.clone();
    let (lab1, lab2, prod) = (&edges[0], &edges[1], &edges[2]);
    let negotiate_args = |dir: &Path, class: &str| -> Vec<String> {
        vec![
            s("negotiate"),
            s("--dir"),
            dir.display().to_string(),
            s("--stager"),
            stager.clone(),
            s("--class"),
            s(class),
            s("--inventory-root"),
            facts.display().to_string(),
        ]
    };

    // A class that may not capture gets only the clear "no image".
    let refused = edge_agent(&mesh, &negotiate_args(&prod.dir, "prod")).await;
    assert!(!refused.ok, "no image is a failure:\n{}", refused.stdout);
    assert!(
        refused.stdout.contains("no image")
            && refused.stdout.contains(&format!("model={MODEL}"))
            && !refused.stdout.contains("may capture"),
        "{}",
        refused.stdout
    );

    // Without publisher rights (an edge's own identity) a capture is refused before it runs.
    let machine1 = machine(&work.path().join("machine-1"));
    let no_rights = edge_agent(
        &mesh,
        &[
            s("capture"),
            s("--dir"),
            lab1.dir.display().to_string(),
            s("--machine-root"),
            machine1.display().to_string(),
            s("--script"),
            script.display().to_string(),
            s("--publisher-dir"),
            lab1.dir.join("identity").display().to_string(),
        ],
    )
    .await;
    assert!(!no_rights.ok, "{}", no_rights.stdout);
    assert!(
        no_rights.stderr.contains("publisher rights"),
        "{}",
        no_rights.stderr
    );
    assert!(
        !machine1.join("slots/b").join(MARKER_FILE).exists(),
        "nothing ran without publisher rights"
    );
    // And the origin itself refuses uploads and publishing from an edge certificate.
    let edge_identity =
        proto::net::NodeIdentity::load(&lab1.dir.join("identity")).expect("edge identity");
    let tree = work.path().join("tree");
    std::fs::create_dir_all(&tree).expect("tree");
    std::fs::write(tree.join("f"), b"x").expect("file");
    let origin_addr = mesh.origin.mesh.parse().expect("origin address");
    let forged = proto::publish::publish_path(
        &edge_identity,
        &proto::manifest::generate_signing_key(),
        origin_addr,
        &tree,
        proto::pack::PackOptions::new("forged", "1", proto::BundleKind::OsImage),
        |_| {},
        || {},
    )
    .await
    .expect_err("an edge certificate may not publish");
    let forged = forged.to_string();
    assert!(
        forged.contains("Forbidden") && forged.contains("only the publisher"),
        "{forged}"
    );

    // Lab edge 1: no image, capture allowed → runs the script into its spare slot (B),
    // captures and publishes it, negotiates again and fetches the captured image.
    let mut args = negotiate_args(&lab1.dir, "lab");
    args.extend([
        s("--machine-root"),
        machine1.display().to_string(),
        s("--capture-script"),
        script.display().to_string(),
        s("--publisher-dir"),
        publisher_dir.display().to_string(),
    ]);
    let captured = edge_agent(&mesh, &args).await;
    assert!(
        captured.ok,
        "capture and renegotiation:\n{}\n{}",
        captured.stdout, captured.stderr
    );
    assert!(
        captured.stdout.contains("may capture one as lab-os")
            && captured.stdout.contains("captured slot B as lab-os@"),
        "{}",
        captured.stdout
    );
    assert_eq!(
        std::fs::read_to_string(machine1.join("slots/b").join(MARKER_FILE)).expect("script ran"),
        format!("{MARKER_TEXT}\n")
    );
    let id_line = captured
        .stdout
        .lines()
        .find(|l| l.starts_with("captured slot"))
        .expect("captured line");
    let captured_id = id_line
        .rsplit('(')
        .next()
        .and_then(|rest| rest.strip_suffix(')'))
        .expect("captured id")
        .to_owned();

    // The origin now maps the model to the captured image.
    let check = origin_ok(&mesh, &["policy", "check"]).await;
    assert!(
        check.contains(&format!("captured-model-{MODEL}")),
        "policy check names the captured rule:\n{check}"
    );
    let audit = origin_ok(&mesh, &["audit"]).await;
    assert!(audit.contains("captured by node"), "{audit}");

    // Lab edge 2, same facts: told to fetch exactly the captured bundle, and gets it.
    let second = edge_agent(&mesh, &negotiate_args(&lab2.dir, "lab")).await;
    assert!(
        second.ok,
        "the second node negotiates:\n{}\n{}",
        second.stdout, second.stderr
    );
    assert!(
        second.stdout.contains("fetch 1 bundle(s)")
            && second.stdout.contains(&captured_id)
            && second.stdout.contains("fetched"),
        "{}",
        second.stdout
    );
    let unpacked = work.path().join("unpacked");
    let fetched = edge_agent(
        &mesh,
        &[
            s("fetch"),
            captured_id.clone(),
            s("--dir"),
            lab2.dir.display().to_string(),
            s("--stager"),
            stager.clone(),
            s("--to"),
            unpacked.display().to_string(),
            s("--no-progress"),
        ],
    )
    .await;
    assert!(fetched.ok, "{}\n{}", fetched.stdout, fetched.stderr);
    assert_eq!(
        std::fs::read_to_string(unpacked.join(MARKER_FILE)).expect("the script's file"),
        format!("{MARKER_TEXT}\n"),
        "the second node got what the first node's script built"
    );
    assert!(
        !unpacked.join(SLOT_MARKER).exists(),
        "a captured image carries no slot marker (it would mark a slot complete mid-unpack)"
    );

    // `origin nodes` shows both lab nodes wanting the captured image; the prod node none.
    let nodes = origin_ok(&mesh, &["nodes", "--json"]).await;
    let rows: serde_json::Value = serde_json::from_str(nodes.trim()).expect("nodes JSON");
    let rows = rows.as_array().expect("rows");
    let wanting = rows
        .iter()
        .filter(|r| {
            r["desired"]
                .as_array()
                .is_some_and(|d| d.iter().any(|b| b["id"].as_str() == Some(&captured_id)))
        })
        .count();
    assert_eq!(
        wanting, 3,
        "rule by model: every node of that model, {rows:#?}"
    );
    mesh.shutdown().await;
}

/// Waits until edge `name`'s daemon counts `value` or more in `metric` with `labels`.
async fn wait_metric(mesh: &Testbed, name: &str, metric: &str, labels: &[(&str, &str)]) {
    let counted = stagecoach_testing::wait_until_async(WAIT_TIMEOUT, POLL, async || {
        let text = mesh.edge_metrics(name).await.unwrap_or_default();
        netsim::procs::metric_sum(&text, metric, labels) >= 1
    })
    .await;
    assert!(
        counted.is_ok(),
        "{name} never counted {metric} {labels:?}; see {}",
        mesh.work.join("logs").join(format!("{name}.log")).display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_started_with_a_capture_script_captures_at_start_when_allowed() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut mesh = Testbed::start(bins(), &work.path().join("mesh"), 1, 2, &[])
        .await
        .expect("mesh");
    let facts = fake_inventory_root(&work.path().join("facts"));
    let script = install_script(work.path());
    let publisher_dir = mesh.origin_dir.join("publisher");
    let machine0 = machine(&work.path().join("machine-0"));
    let policy = work.path().join("policy.toml");
    std::fs::write(&policy, "[capture]\nclasses = [\"lab\"]\n").expect("policy");
    origin_ok(&mesh, &["policy", "load", &policy.display().to_string()]).await;

    // Only the first edge may capture (it has the script and publisher rights).
    let first = mesh.edges[0].name.clone();
    let second = mesh.edges[1].name.clone();
    mesh.start_edge_daemons_with(false, &[], |edge| {
        let mut args = vec![
            s("--class"),
            s("lab"),
            s("--inventory-root"),
            facts.display().to_string(),
        ];
        if edge.name == first {
            args.extend([
                s("--machine-root"),
                machine0.display().to_string(),
                s("--capture-script"),
                script.display().to_string(),
                s("--publisher-dir"),
                publisher_dir.display().to_string(),
            ]);
        }
        args
    })
    .await
    .expect("daemons");
    wait_metric(
        &mesh,
        &first,
        "stagecoach_captures_total",
        &[("outcome", "captured")],
    )
    .await;
    wait_metric(
        &mesh,
        &first,
        "stagecoach_negotiations_total",
        &[("answer", "fetched")],
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(machine0.join("slots/b").join(MARKER_FILE)).expect("script ran"),
        format!("{MARKER_TEXT}\n")
    );

    // The second edge, restarted (it may have negotiated before the capture), is told to fetch
    // the captured image (named captured-os) or, when it already did, boots as it is: either
    // way both nodes end up with it installed.
    mesh.kill_edge(&second).await.expect("kill");
    mesh.restart_edge(&second).await.expect("restart");
    let nodes = async || -> serde_json::Value {
        let text = origin_ok(&mesh, &["nodes", "--json"]).await;
        serde_json::from_str(text.trim()).expect("nodes JSON")
    };
    let with_image = |rows: &serde_json::Value| {
        rows.as_array()
            .expect("rows")
            .iter()
            .filter(|r| {
                r["installed"].as_array().is_some_and(|list| {
                    list.iter()
                        .any(|b| b["name"].as_str() == Some("captured-os"))
                })
            })
            .count()
    };
    let both = stagecoach_testing::wait_until_async(WAIT_TIMEOUT, POLL, async || {
        with_image(&nodes().await) == 2
    })
    .await;
    if both.is_err() {
        panic!(
            "both nodes should run the captured image: {:#}",
            nodes().await
        );
    }
    mesh.shutdown().await;
}
