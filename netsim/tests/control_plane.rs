//! The origin's control plane with real processes on loopback: inventory reports at
//! enrollment and at every start, `origin nodes`, policy load and check, boot-time negotiation
//! (brief 002) and test mode. Each test runs twice: the origin's store in its embedded RocksDB,
//! and in a real 3-member etcd cluster (`origin serve --store etcd://...`, issue 14).

use std::path::{Path, PathBuf};
use std::time::Duration;

use netsim::datagen;
use netsim::procs::{self, Binaries};
use netsim::testbed::{EdgeNode, Testbed};
use serde_json::Value;
use stagecoach_testing::etcd::{self, EtcdCluster};
use stagecoach_testing::{wait_for_async, wait_until_async};

/// A 3-member etcd cluster on loopback for the origin's store, or `None` (a counted skip) where
/// etcd is not installed.
fn etcd_cluster(test: &str) -> Option<EtcdCluster> {
    if !stagecoach_testing::can_run(test, &[etcd::available()]) {
        return None;
    }
    Some(tokio::task::block_in_place(|| {
        EtcdCluster::start(3).expect("start a 3-member etcd cluster")
    }))
}

/// Checks that the origin keeps its control plane where the test asked: etcd, or its RocksDB.
async fn assert_store(mesh: &Testbed, store: Option<&str>) {
    let etcd_by_env = std::env::var(netsim::testbed::ORIGIN_STORE_VAR).as_deref() == Ok("etcd");
    let backend = if store.is_some() || etcd_by_env {
        "etcd"
    } else {
        "rocksdb"
    };
    let metrics = mesh.origin_metrics().await.expect("origin metrics");
    let line = format!("stagecoach_origin_store_info{{backend=\"{backend}\"}} 1");
    assert!(
        metrics.contains(&line),
        "no `{line}` in the origin's metrics"
    );
}

/// How often a daemon's metrics or log are read while waiting on them.
const POLL: Duration = Duration::from_millis(100);

/// Milliseconds since the Unix epoch, as the origin stamps `last_seen_ms`.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

const MIB: u64 = 1024 * 1024;

/// How long an edge may take to negotiate (and fetch) after its daemon starts.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(180);

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

use netsim::procs::CliRun as Run;

async fn run(bin: &Path, args: &[String]) -> Run {
    netsim::procs::run_cli(bin, args).await.expect("run")
}

/// Runs `origin ARGS --dir ORIGIN_DIR`.
async fn origin(mesh: &Testbed, args: &[&str]) -> Run {
    mesh.origin_cli(args).await.expect("run origin")
}

async fn origin_ok(mesh: &Testbed, args: &[&str]) -> String {
    let out = origin(mesh, args).await;
    assert!(
        out.ok,
        "origin {args:?} failed:\n{}\n{}",
        out.stdout, out.stderr
    );
    out.stdout
}

async fn nodes(mesh: &Testbed) -> Vec<Value> {
    let text = origin_ok(mesh, &["nodes", "--json"]).await;
    match serde_json::from_str(text.trim()).expect("nodes JSON") {
        Value::Array(rows) => rows,
        other => panic!("nodes JSON is not a list: {other}"),
    }
}

/// The row of `edge` (matched by its daemon's address).
fn row<'a>(rows: &'a [Value], edge: &EdgeNode) -> &'a Value {
    let addr = &edge.daemon.as_ref().expect("daemon").mesh;
    rows.iter()
        .find(|r| r["data_addr"].as_str() == Some(addr))
        .unwrap_or_else(|| panic!("no node row with data_addr {addr}: {rows:#?}"))
}

fn node_id(row: &Value) -> String {
    row["id"].as_str().expect("id").to_owned()
}

fn installed(row: &Value, field: &str) -> Vec<String> {
    let mut list: Vec<String> = row[field]
        .as_array()
        .expect("bundle list")
        .iter()
        .map(|b| {
            format!(
                "{}@{}",
                b["name"].as_str().unwrap_or("?"),
                b["version"].as_str().unwrap_or("?")
            )
        })
        .collect();
    list.sort();
    list
}

/// Waits until the current daemon of edge `name` has finished `count` negotiations.
async fn wait_negotiated(mesh: &Testbed, name: &str, count: u64) -> String {
    let negotiated = wait_for_async(NEGOTIATION_TIMEOUT, POLL, async || {
        let Ok(text) = mesh.edge_metrics(name).await else {
            return Ok::<_, std::convert::Infallible>(None);
        };
        // Transient failures are retried by the daemon; only answers count.
        let all = procs::metric_sum(&text, "stagecoach_negotiations_total", &[]);
        let failed = procs::metric_sum(
            &text,
            "stagecoach_negotiations_total",
            &[("answer", "error")],
        );
        Ok((all - failed >= count).then_some(text))
    })
    .await;
    negotiated.unwrap_or_else(|error| {
        panic!(
            "{name} did not negotiate: {error}; see {}",
            mesh.work.join("logs").join(format!("{name}.log")).display()
        )
    })
}

async fn restart_edge(mesh: &mut Testbed, name: &str) -> String {
    mesh.kill_edge(name).await.expect("kill edge");
    mesh.restart_edge(name).await.expect("restart edge");
    wait_negotiated(mesh, name, 1).await
}

/// Kills the origin and starts it again on the same mesh address (its state stays on disk).
async fn restart_origin(mesh: &mut Testbed) {
    mesh.kill_origin().await.expect("kill origin");
    mesh.restart_origin().await.expect("restart origin");
}

/// Waits until edge `name`'s log says `needle` (the daemon logs right after it counts).
async fn wait_log(mesh: &Testbed, name: &str, needle: &str) {
    let said = wait_until_async(Duration::from_secs(10), POLL, async || {
        edge_log(mesh, name).contains(needle)
    })
    .await;
    assert!(said.is_ok(), "{name}'s log never said {needle:?}");
}

fn edge_log(mesh: &Testbed, name: &str) -> String {
    std::fs::read_to_string(mesh.work.join("logs").join(format!("{name}.log"))).unwrap_or_default()
}

/// Stored bytes of `name@version`, from `origin bundles`.
async fn stored_bytes(mesh: &Testbed, name: &str, version: &str) -> u64 {
    let table = origin_ok(mesh, &["bundles"]).await;
    table
        .lines()
        .find_map(|line| {
            let cells: Vec<&str> = line.split_whitespace().collect();
            (cells.len() >= 7 && cells[1] == name && cells[2] == version)
                .then(|| cells[4].parse::<u64>().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("{name}@{version} not in `origin bundles`:\n{table}"))
}

fn write_policy(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("policy file");
    path
}

/// True when any file under `dir` contains `needle`.
fn any_file_contains(dir: &Path, needle: &[u8]) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = any_file_contains(&path, needle) {
                return Some(found);
            }
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                return Some(path);
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_shows_in_origin_nodes_and_policy_check_names_both_conflicting_rules() {
    inventory_shows_in_origin_nodes_and_policy_check_names_both_conflicting_rules_on(None).await;
}

/// The same, the origin's control plane in a 3-member etcd cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_shows_in_origin_nodes_and_policy_check_names_both_conflicting_rules_on_etcd() {
    let Some(cluster) = etcd_cluster(
        "inventory_shows_in_origin_nodes_and_policy_check_names_both_conflicting_rules_on_etcd",
    ) else {
        return;
    };
    inventory_shows_in_origin_nodes_and_policy_check_names_both_conflicting_rules_on(Some(
        &cluster.store_url("stagecoach"),
    ))
    .await;
}

async fn inventory_shows_in_origin_nodes_and_policy_check_names_both_conflicting_rules_on(
    store: Option<&str>,
) {
    let work = tempfile::tempdir().expect("tempdir");
    let mut mesh =
        Testbed::start_on_store(bins(), &work.path().join("mesh"), 1, 2, &[], &[], store)
            .await
            .expect("mesh");
    assert_store(&mesh, store).await;

    // Enrollment reported each edge's inventory.
    let enrolled = nodes(&mesh).await;
    assert_eq!(enrolled.len(), 2, "{enrolled:#?}");
    for node in &enrolled {
        assert_eq!(node["site"], "site-a");
        assert_eq!(node["last_event"], "Enrolled");
        assert!(
            node["inventory"]["cpu_count"].as_u64().unwrap_or(0) > 0,
            "the inventory carries the machine's facts: {node:#}"
        );
        assert_eq!(node["inventory"]["site"], "site-a");
    }
    let enrolled_seen: Vec<u64> = enrolled
        .iter()
        .map(|n| n["last_seen_ms"].as_u64().expect("last seen"))
        .collect();

    // Every start reports again (through the stager), with the configured role; the clock
    // moves past the enrollment reports first, so a new report shows as a later time.
    let newest_seen = enrolled_seen.iter().copied().max().unwrap_or(0);
    stagecoach_testing::wait_until(Duration::from_secs(5), Duration::from_millis(1), || {
        now_ms() > newest_seen
    })
    .expect("the clock moves");
    mesh.start_edge_daemons_with(false, &[], |_| vec!["--role".into(), "web".into()])
        .await
        .expect("daemons");
    let names: Vec<String> = mesh.edges.iter().map(|e| e.name.clone()).collect();
    for name in &names {
        wait_negotiated(&mesh, name, 1).await;
    }
    let started = nodes(&mesh).await;
    assert_eq!(started.len(), 2, "the same two nodes: {started:#?}");
    for edge in &mesh.edges {
        let node = row(&started, edge);
        let before = enrolled
            .iter()
            .position(|n| n["id"] == node["id"])
            .expect("the node that enrolled");
        assert!(
            node["last_seen_ms"].as_u64().expect("seen") > enrolled_seen[before],
            "last seen advances at start: {node:#}"
        );
        assert_eq!(node["inventory"]["role"], "web");
        // No policy yet: "no image", with the facts tried, on both sides (brief 004).
        assert_eq!(node["state"], "no-image", "{node:#}");
        wait_log(&mesh, &edge.name, "has no image").await;
    }
    let stager_metrics = mesh
        .stager_metrics(&mesh.stagers[0].name)
        .await
        .expect("stager metrics");
    assert!(
        procs::metric_sum(
            &stager_metrics,
            "stagecoach_reports_relayed_total",
            &[("outcome", "relayed")]
        ) >= 2,
        "the reports went through the site's stager"
    );
    let table = origin_ok(&mesh, &["nodes"]).await;
    assert!(table.starts_with("ID"), "{table}");
    for header in [
        "SITE",
        "CLASS",
        "ROLE",
        "INSTALLED",
        "DESIRED",
        "STATE",
        "LAST SEEN",
    ] {
        assert!(table.contains(header), "{header} missing:\n{table}");
    }
    assert!(
        table.contains(&node_id(&started[0])) && table.contains("no-image"),
        "{table}"
    );

    // A one-shot negotiation goes through the daemon and says "no image", exiting non-zero.
    let edge0 = mesh.edges[0].clone();
    let one_shot = run(
        &mesh.bins.path("edge-agent"),
        &[
            "negotiate".into(),
            "--dir".into(),
            edge0.dir.display().to_string(),
        ],
    )
    .await;
    assert!(!one_shot.ok, "no image is a failure:\n{}", one_shot.stdout);
    assert!(
        one_shot.stdout.contains("no image") && one_shot.stdout.contains("role=web"),
        "{}",
        one_shot.stdout
    );

    // Restarting an edge reports again: last seen advances once more.
    let seen = row(&started, &edge0)["last_seen_ms"]
        .as_u64()
        .expect("seen");
    restart_edge(&mut mesh, &edge0.name).await;
    let restarted = nodes(&mesh).await;
    assert!(
        row(&restarted, &edge0)["last_seen_ms"]
            .as_u64()
            .expect("seen")
            > seen
    );
    assert!(
        row(&restarted, &edge0)["reports"]
            .as_u64()
            .expect("reports")
            >= 3
    );

    // Two role rules that disagree: policy check lists every node and names both rules.
    for (version, seed) in [("1", 31), ("2", 32)] {
        let tree = work.path().join(format!("os{version}"));
        datagen::generate_tree(&tree, MIB / 4, seed).expect("tree");
        mesh.publish(&tree, "os", version).await.expect("publish");
    }
    let ids: Vec<String> = mesh
        .edges
        .iter()
        .map(|e| node_id(row(&restarted, e)))
        .collect();
    let conflicting = write_policy(
        work.path(),
        "conflict.toml",
        r#"
[[rule]]
id = "web-stable"
role = "web"
bundles = ["os@1"]

[[rule]]
id = "web-next"
role = "web"
bundles = ["os@2"]

[[rule]]
id = "canaries"
class = "canary"
bundles = ["os@2"]
"#,
    );
    let loaded = origin_ok(
        &mesh,
        &["policy", "load", &conflicting.display().to_string()],
    )
    .await;
    assert!(loaded.contains("3 rules"), "{loaded}");
    let check = origin(&mesh, &["policy", "check"]).await;
    assert!(!check.ok, "a conflict exits non-zero:\n{}", check.stdout);
    for id in &ids {
        assert!(
            check.stdout.contains(id.as_str()),
            "every node is listed:\n{}",
            check.stdout
        );
    }
    assert!(
        check.stdout.contains("web-stable") && check.stdout.contains("web-next"),
        "both rules are named:\n{}",
        check.stdout
    );
    assert!(check.stdout.contains("2 conflict(s)"), "{}", check.stdout);

    // A class outranks the role: the node in class canary resolves, the other still conflicts.
    origin_ok(&mesh, &["class", "set", &ids[0][..12], "canary"]).await;
    let check = origin(&mesh, &["policy", "check", "--json"]).await;
    assert!(!check.ok);
    let report: Value = serde_json::from_str(check.stdout.trim()).expect("check JSON");
    let conflicts = report["conflicts"].as_array().expect("conflicts");
    assert_eq!(conflicts.len(), 1, "{report:#}");
    assert_eq!(conflicts[0]["node"], ids[1].as_str());
    let resolved = report["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["node"] == ids[0].as_str())
        .expect("node 0");
    assert_eq!(resolved["result"]["Ok"]["level"], "class", "{resolved:#}");

    // Without the conflict, the check passes.
    let fixed = write_policy(
        work.path(),
        "fixed.toml",
        "[[rule]]\nid = \"web-stable\"\nrole = \"web\"\nbundles = [\"os@1\"]\n",
    );
    origin_ok(&mesh, &["policy", "load", &fixed.display().to_string()]).await;
    let check = origin(&mesh, &["policy", "check"]).await;
    assert!(
        check.ok,
        "no conflict exits 0:\n{}\n{}",
        check.stdout, check.stderr
    );
    assert!(check.stdout.contains("no conflicts"), "{}", check.stdout);

    // An override pins a version on one node and outranks its role; clearing it restores it.
    let pinned = origin_ok(&mesh, &["override", "set", &ids[1], "os@2"]).await;
    assert!(pinned.contains("os@2"), "{pinned}");
    let never = origin(&mesh, &["override", "set", &ids[1], "os@7"]).await;
    assert!(
        !never.ok && never.stdout.contains("never published"),
        "{}",
        never.stdout
    );
    let check = origin(&mesh, &["policy", "check", "--json"]).await;
    assert!(check.ok, "{}", check.stderr);
    let report: Value = serde_json::from_str(check.stdout.trim()).expect("check JSON");
    let pinned_node = report["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["node"] == ids[1].as_str())
        .expect("node 1");
    assert_eq!(pinned_node["result"]["Ok"]["level"], "node-override");
    origin_ok(&mesh, &["override", "clear", &ids[1]]).await;

    // Every change is in the audit log, with who did it.
    let audit = origin_ok(&mesh, &["audit", "--limit", "50", "--json"]).await;
    let records: Vec<Value> = serde_json::from_str(audit.trim()).expect("audit JSON");
    let actions: Vec<&str> = records
        .iter()
        .filter_map(|r| r["action"].as_str())
        .collect();
    assert_eq!(
        actions.iter().filter(|a| **a == "policy.load").count(),
        2,
        "{actions:?}"
    );
    for action in ["override.set", "override.clear", "package.publish"] {
        assert!(
            actions.contains(&action),
            "{action} not audited: {actions:?}"
        );
    }
    assert_eq!(
        actions
            .iter()
            .filter(|a| **a == "node.first-report")
            .count(),
        2,
        "{actions:?}"
    );
    let class_set = records
        .iter()
        .find(|r| r["action"] == "class.set")
        .expect("class.set audited");
    assert_eq!(class_set["role"], "origin");
    assert!(class_set["detail"]
        .as_str()
        .expect("detail")
        .contains("canary"));
    let seqs: Vec<u64> = records.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiation_downloads_nothing_when_in_sync_and_only_the_bundles_that_differ() {
    negotiation_downloads_nothing_when_in_sync_and_only_the_bundles_that_differ_on(None).await;
}

/// The same, the origin's control plane in a 3-member etcd cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiation_downloads_nothing_when_in_sync_and_only_the_bundles_that_differ_on_etcd() {
    let Some(cluster) = etcd_cluster(
        "negotiation_downloads_nothing_when_in_sync_and_only_the_bundles_that_differ_on_etcd",
    ) else {
        return;
    };
    negotiation_downloads_nothing_when_in_sync_and_only_the_bundles_that_differ_on(Some(
        &cluster.store_url("stagecoach"),
    ))
    .await;
}

async fn negotiation_downloads_nothing_when_in_sync_and_only_the_bundles_that_differ_on(
    store: Option<&str>,
) {
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let mut mesh = Testbed::start_on_store(bins(), &w.join("mesh"), 1, 2, &[], &[], store)
        .await
        .expect("mesh");
    assert_store(&mesh, store).await;
    for (dir, bytes, seed) in [
        ("os1", 2 * MIB, 11),
        ("os2", 2 * MIB, 12),
        ("app1", MIB, 13),
    ] {
        datagen::generate_tree(&w.join(dir), bytes, seed).expect("tree");
    }
    mesh.publish(&w.join("os1"), "os", "1").await.expect("os@1");
    mesh.publish(&w.join("os2"), "os", "2").await.expect("os@2");
    mesh.publish_as(&w.join("app1"), "app", "1", "package")
        .await
        .expect("app@1");
    let os2_bytes = stored_bytes(&mesh, "os", "2").await;
    let os1_bytes = stored_bytes(&mesh, "os", "1").await;
    let app1_bytes = stored_bytes(&mesh, "app", "1").await;
    let policy = write_policy(
        w,
        "policy.toml",
        r#"
[[rule]]
id = "web"
role = "web"
bundles = ["os@1", "app@1"]

[[rule]]
id = "canaries"
class = "canary"
bundles = ["os@2", "app@1"]
"#,
    );
    origin_ok(&mesh, &["policy", "load", &policy.display().to_string()]).await;
    mesh.wait_preheated("site-a", Duration::from_secs(120))
        .await
        .expect("preheat");

    // First start: both edges fetch what the role rule names.
    mesh.start_edge_daemons_with(false, &[], |_| vec!["--role".into(), "web".into()])
        .await
        .expect("daemons");
    let names: Vec<String> = mesh.edges.iter().map(|e| e.name.clone()).collect();
    for name in &names {
        let metrics = wait_negotiated(&mesh, name, 1).await;
        assert_eq!(
            procs::metric_sum(
                &metrics,
                "stagecoach_negotiations_total",
                &[("answer", "fetched")]
            ),
            1
        );
        let bytes = procs::metric_sum(&metrics, "stagecoach_bytes_received_total", &[]);
        assert!(
            bytes >= (os1_bytes + app1_bytes) * 95 / 100,
            "{name} fetched os@1 and app@1 ({bytes} bytes)"
        );
    }
    let first = nodes(&mesh).await;
    for edge in &mesh.edges {
        let node = row(&first, edge);
        assert_eq!(installed(node, "installed"), ["app@1", "os@1"], "{node:#}");
        assert_eq!(node["state"], "in-sync", "{node:#}");
    }

    // Edge 1 becomes a canary: its desired os is 2, app stays 1.
    let (in_sync, behind) = (mesh.edges[0].clone(), mesh.edges[1].clone());
    let behind_id = node_id(row(&first, &behind));
    origin_ok(&mesh, &["class", "set", &behind_id, "canary"]).await;
    // The node table says at once what the canary should run; the canary learns at its start.
    let told = nodes(&mesh).await;
    let node = row(&told, &behind);
    assert_eq!(node["state"], "outdated", "{node:#}");
    assert_eq!(installed(node, "desired"), ["app@1", "os@2"], "{node:#}");
    assert_eq!(row(&told, &in_sync)["state"], "in-sync");

    // At the next start the in-sync edge boots as it is and downloads nothing.
    let metrics = restart_edge(&mut mesh, &in_sync.name).await;
    assert_eq!(
        procs::metric_sum(
            &metrics,
            "stagecoach_negotiations_total",
            &[("answer", "boot-as-you-are")]
        ),
        1,
        "{metrics}"
    );
    assert_eq!(
        procs::metric_sum(&metrics, "stagecoach_bytes_received_total", &[]),
        0
    );
    assert_eq!(
        procs::metric_sum(&metrics, "stagecoach_negotiation_bytes_total", &[]),
        0
    );

    // The canary downloads exactly os@2: about its stored size, not app@1's too.
    let metrics = restart_edge(&mut mesh, &behind.name).await;
    assert_eq!(
        procs::metric_sum(
            &metrics,
            "stagecoach_negotiations_total",
            &[("answer", "fetched")]
        ),
        1
    );
    assert_eq!(
        procs::metric_sum(
            &metrics,
            "stagecoach_negotiation_bundles_fetched_total",
            &[]
        ),
        1
    );
    let bytes = procs::metric_sum(&metrics, "stagecoach_bytes_received_total", &[]);
    assert!(
        bytes >= os2_bytes * 95 / 100 && bytes <= os2_bytes * 105 / 100 + 64 * 1024,
        "the canary received {bytes} bytes; os@2 is {os2_bytes} stored, app@1 {app1_bytes}"
    );
    let log = edge_log(&mesh, &behind.name);
    assert!(
        log.contains("fetching the bundles that differ"),
        "the edge logs the plan"
    );

    let after = nodes(&mesh).await;
    let node = row(&after, &behind);
    assert_eq!(installed(node, "installed"), ["app@1", "os@2"], "{node:#}");
    assert_eq!(installed(node, "desired"), ["app@1", "os@2"], "{node:#}");
    assert_eq!(node["state"], "in-sync", "{node:#}");
    assert_eq!(node["class"], "canary");
    assert_eq!(
        installed(row(&after, &in_sync), "installed"),
        ["app@1", "os@1"]
    );

    // A one-shot negotiation (through the running daemon) now says boot as you are.
    let one_shot = run(
        &mesh.bins.path("edge-agent"),
        &[
            "negotiate".into(),
            "--dir".into(),
            behind.dir.display().to_string(),
        ],
    )
    .await;
    assert!(one_shot.ok, "{}\n{}", one_shot.stdout, one_shot.stderr);
    assert!(
        one_shot.stdout.contains("boot as you are: os@2, app@1"),
        "{}",
        one_shot.stdout
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_mode_leaves_nothing_behind_after_restarts() {
    test_mode_leaves_nothing_behind_after_restarts_on(None).await;
}

/// The same, the origin's control plane in a 3-member etcd cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_mode_leaves_nothing_behind_after_restarts_on_etcd() {
    let Some(cluster) = etcd_cluster("test_mode_leaves_nothing_behind_after_restarts_on_etcd")
    else {
        return;
    };
    test_mode_leaves_nothing_behind_after_restarts_on(Some(&cluster.store_url("stagecoach"))).await;
}

async fn test_mode_leaves_nothing_behind_after_restarts_on(store: Option<&str>) {
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let mut mesh = Testbed::start_on_store(bins(), &w.join("mesh"), 1, 1, &[], &[], store)
        .await
        .expect("mesh");
    assert_store(&mesh, store).await;
    datagen::generate_tree(&w.join("os1"), MIB, 21).expect("tree");
    datagen::generate_tree(&w.join("trial"), MIB, 22).expect("tree");
    mesh.publish(&w.join("os1"), "os", "1").await.expect("os@1");
    mesh.publish_as(&w.join("trial"), "trialapp", "9", "package")
        .await
        .expect("trialapp@9");
    let policy = write_policy(
        w,
        "policy.toml",
        "[[rule]]\nid = \"web\"\nrole = \"web\"\nbundles = [\"os@1\"]\n",
    );
    origin_ok(&mesh, &["policy", "load", &policy.display().to_string()]).await;
    mesh.start_edge_daemons_with(false, &[], |_| vec!["--role".into(), "web".into()])
        .await
        .expect("daemons");
    let edge = mesh.edges[0].clone();
    wait_negotiated(&mesh, &edge.name, 1).await;
    let id = node_id(row(&nodes(&mesh).await, &edge));

    // The test run: the edge fetches and runs trialapp@9 from its temporary area.
    let started = origin_ok(&mesh, &["test-run", "--node", &id, "trialapp@9"]).await;
    assert!(started.contains("test mode"), "{started}");
    let running = nodes(&mesh).await;
    let node = row(&running, &edge);
    assert_eq!(node["test_run"]["bundle"], "trialapp@9", "{node:#}");
    assert_eq!(
        installed(node, "installed"),
        ["os@1"],
        "a test run is not installed"
    );
    let root = PathBuf::from(node["test_run"]["root"].as_str().expect("root"));
    assert!(root.starts_with(&edge.dir), "{}", root.display());
    assert!(
        std::fs::read_dir(&root).map(|d| d.count()).unwrap_or(0) > 0,
        "the bundle is unpacked where it runs"
    );
    assert!(
        any_file_contains(&edge.dir, b"trialapp").is_some(),
        "the edge holds the trial bundle while it runs"
    );

    // After the edge restarts, nothing of it is left on the edge.
    restart_edge(&mut mesh, &edge.name).await;
    assert!(
        !edge.dir.join("tmp").exists(),
        "the temporary area is purged"
    );
    if let Some(found) = any_file_contains(&edge.dir, b"trialapp") {
        panic!("{} still mentions the trial bundle", found.display());
    }
    let after_edge = nodes(&mesh).await;
    let node = row(&after_edge, &edge);
    assert_eq!(node["test_run"], Value::Null, "{node:#}");
    assert_eq!(installed(node, "installed"), ["os@1"]);
    assert!(!installed(node, "held")
        .iter()
        .any(|b| b.starts_with("trialapp")));

    // Start another test run, then restart the origin: it forgets it (never in its database).
    origin_ok(&mesh, &["test-run", "--node", &id, "trialapp@9"]).await;
    assert_eq!(
        row(&nodes(&mesh).await, &edge)["test_run"]["bundle"],
        "trialapp@9"
    );
    restart_origin(&mut mesh).await;
    let after_origin = nodes(&mesh).await;
    let node = row(&after_origin, &edge);
    assert_eq!(node["test_run"], Value::Null, "{node:#}");
    assert_eq!(
        installed(node, "installed"),
        ["os@1"],
        "the database survived the restart"
    );
    let audit = origin_ok(&mesh, &["audit", "--limit", "100"]).await;
    assert!(
        !audit.contains("test-run") && !audit.contains("test_run"),
        "test runs are not audited in the database:\n{audit}"
    );
    if let Some(found) = any_file_contains(&mesh.origin_dir.join("db"), b"test-run") {
        panic!(
            "the origin's database mentions a test run in {}",
            found.display()
        );
    }

    // With the site's stager down, the edge negotiates with the origin directly.
    let stager = mesh.stagers[0].name.clone();
    mesh.kill_stager(&stager).await.expect("kill stager");
    let metrics = restart_edge(&mut mesh, &edge.name).await;
    assert_eq!(
        procs::metric_sum(
            &metrics,
            "stagecoach_negotiations_total",
            &[("answer", "boot-as-you-are")]
        ),
        1,
        "{metrics}"
    );
    let log = edge_log(&mesh, &edge.name);
    let this_run = &log[log.rfind("edge agent serving").unwrap_or(0)..];
    assert!(
        this_run.contains("reporting elsewhere"),
        "the edge says it skipped the stager"
    );
    mesh.shutdown().await;
}

/// Runs `origin ARGS --dir DIR` for another origin of the mesh, failing unless it succeeds.
async fn origin_at(mesh: &Testbed, dir: &Path, args: &[&str]) -> String {
    mesh.origin_ok_at(dir, args).await.expect("origin")
}

/// Node id → (site, class) as `origin nodes --json` lists them.
fn fleet_view(text: &str) -> Vec<(String, String, String)> {
    let rows: Vec<Value> = serde_json::from_str(text.trim()).expect("nodes JSON");
    let mut view: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            (
                node_id(r),
                r["site"].as_str().unwrap_or_default().to_owned(),
                r["class"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    view.sort();
    view
}

/// Two origins of one mesh on a 3-member etcd cluster: the testbed's (one site with `edges`
/// edges, and `os@1` published when `os` is given, from a tree of that many bytes) and a second
/// set up with `origin keys export` and `origin init --join`. `None` (a counted skip) where etcd
/// is not installed. Keep the cluster and the directory for as long as the mesh runs.
struct TwoOrigins {
    cluster: EtcdCluster,
    work: tempfile::TempDir,
    mesh: Testbed,
    second: PathBuf,
    ready: netsim::testbed::Ready,
}

async fn two_origins(test: &str, edges: usize, os: Option<u64>) -> Option<TwoOrigins> {
    let cluster = etcd_cluster(test)?;
    let store = cluster.store_url("stagecoach");
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let mut mesh =
        Testbed::start_on_store(bins(), &w.join("mesh"), 1, edges, &[], &[], Some(&store))
            .await
            .expect("mesh");
    if let Some(bytes) = os {
        datagen::generate_tree(&w.join("os1"), bytes, 41).expect("tree");
        mesh.publish(&w.join("os1"), "os", "1").await.expect("os@1");
    }
    let (second, ready) = mesh
        .join_origin("origin-2")
        .await
        .expect("join a second origin");
    Some(TwoOrigins {
        cluster,
        work,
        mesh,
        second,
        ready,
    })
}

/// Two origins of one mesh on one etcd cluster (issue 14): the second set up with `origin
/// keys export` and `origin init --join`, as an operator would. Either answers the command
/// line for the whole fleet, a change made on one shows on the other, the audit log is one,
/// and the control plane outlives the first origin's kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_origin_answers_for_the_same_fleet_and_outlives_the_first() {
    let Some(TwoOrigins {
        cluster,
        work,
        mut mesh,
        second,
        ready,
    }) = two_origins(
        "a_joined_origin_answers_for_the_same_fleet_and_outlives_the_first",
        2,
        Some(MIB / 4),
    )
    .await
    else {
        return;
    };
    let w = work.path();

    // The same CA, its own certificate: the second origin's identity differs from the first's.
    let ca = |dir: &Path| std::fs::read(dir.join("ca").join("ca.crt")).expect("CA cert");
    assert_eq!(ca(&mesh.origin_dir), ca(&second), "one CA for the mesh");
    let identity = |dir: &Path| {
        std::fs::read_dir(dir.join("identity"))
            .expect("identity")
            .flatten()
            .map(|e| std::fs::read(e.path()).unwrap_or_default())
            .collect::<Vec<_>>()
    };
    assert_ne!(identity(&mesh.origin_dir), identity(&second));

    // The fleet enrolled at the first origin; the second lists the same nodes.
    let first_view = fleet_view(&origin_ok(&mesh, &["nodes", "--json"]).await);
    assert_eq!(first_view.len(), 2, "{first_view:?}");
    let second_view = fleet_view(&origin_at(&mesh, &second, &["nodes", "--json"]).await);
    assert_eq!(first_view, second_view, "both origins see one fleet");

    // A change on either shows on the other.
    let node = first_view[0].0.clone();
    origin_at(&mesh, &second, &["class", "set", &node, "canary"]).await;
    let on_first = fleet_view(&origin_ok(&mesh, &["nodes", "--json"]).await);
    assert_eq!(on_first[0].2, "canary", "{on_first:?}");
    let policy = write_policy(
        w,
        "policy.toml",
        "[[rule]]\nid = \"canaries\"\nclass = \"canary\"\nbundles = [\"os@1\"]\n",
    );
    // The second origin holds none of the bundle's bytes, but the package record is shared.
    origin_at(
        &mesh,
        &second,
        &["policy", "load", &policy.display().to_string()],
    )
    .await;
    let check = origin_ok(&mesh, &["policy", "check", "--json"]).await;
    assert!(check.contains("canaries"), "{check}");

    // One audit log, in one order, with every change once.
    let audit_first = origin_ok(&mesh, &["audit", "--limit", "100", "--json"]).await;
    let audit_second = origin_at(&mesh, &second, &["audit", "--limit", "100", "--json"]).await;
    assert_eq!(audit_first.trim(), audit_second.trim());
    let records: Vec<Value> = serde_json::from_str(audit_first.trim()).expect("audit JSON");
    let seqs: Vec<u64> = records.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no gap");
    for action in ["package.publish", "class.set", "policy.load"] {
        assert_eq!(
            records.iter().filter(|r| r["action"] == action).count(),
            1,
            "{action} once: {records:#?}"
        );
    }

    // Each origin sees both, with their addresses.
    let first_mesh = mesh.origin.mesh.clone();
    let status =
        |text: String| -> Value { serde_json::from_str(text.trim()).expect("status JSON") };
    let up = |status: &Value| -> Vec<String> {
        let mut list: Vec<String> = status["origins"]
            .as_array()
            .expect("origins")
            .iter()
            .filter_map(|o| o["mesh"].as_str().map(str::to_owned))
            .collect();
        list.sort();
        list
    };
    let mut both = vec![first_mesh.clone(), ready.mesh.clone()];
    both.sort();
    let at_first = status(origin_ok(&mesh, &["status", "--json"]).await);
    assert_eq!(at_first["backend"], "etcd", "{at_first:#}");
    assert_eq!(up(&at_first), both, "{at_first:#}");
    assert_eq!(
        at_first["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter(|m| m.as_str().is_some_and(|m| m.contains(": up,")))
            .count(),
        3,
        "{at_first:#}"
    );
    let at_second = status(origin_at(&mesh, &second, &["status", "--json"]).await);
    assert_eq!(up(&at_second), both, "{at_second:#}");

    // An edge enrolled now learns both origins.
    let late = mesh
        .add_edge("site-a", 7)
        .await
        .expect("enroll a late edge");
    let mesh_file: Value = serde_json::from_slice(
        &std::fs::read(late.dir.join("identity").join("mesh.json")).expect("mesh.json"),
    )
    .expect("mesh.json is JSON");
    let mut learnt: Vec<String> = mesh_file["origins"]
        .as_array()
        .expect("the origins up at enrollment")
        .iter()
        .filter_map(|o| o.as_str().map(str::to_owned))
        .collect();
    learnt.sort();
    assert_eq!(learnt, both, "{mesh_file:#}");
    let records: Vec<Value> = serde_json::from_str(
        origin_at(&mesh, &second, &["audit", "--limit", "100", "--json"])
            .await
            .trim(),
    )
    .expect("audit JSON");
    let last_seq = records.last().and_then(|r| r["seq"].as_u64()).unwrap_or(0);

    // kill -9 the first origin: the second still answers and changes the fleet.
    mesh.kill_origin().await.expect("kill the first origin");
    let killed = std::time::Instant::now();
    origin_at(&mesh, &second, &["class", "set", &node, "web"]).await;
    let after = fleet_view(&origin_at(&mesh, &second, &["nodes", "--json"]).await);
    let changed = after.iter().find(|n| n.0 == node).expect("the node");
    assert_eq!(changed.2, "web", "{after:?}");
    let records: Vec<Value> = serde_json::from_str(
        origin_at(&mesh, &second, &["audit", "--limit", "100", "--json"])
            .await
            .trim(),
    )
    .expect("audit JSON");
    assert_eq!(
        records.last().and_then(|r| r["seq"].as_u64()),
        Some(last_seq + 1),
        "the next change has the next number"
    );
    // The killed origin drops out of the list once its lease expires (10 s).
    let gone = wait_until_async(
        Duration::from_secs(30),
        Duration::from_millis(250),
        async || {
            let now = status(origin_at(&mesh, &second, &["status", "--json"]).await);
            up(&now) == vec![ready.mesh.clone()]
        },
    )
    .await;
    assert!(gone.is_ok(), "the dead origin is still listed after 30 s");
    println!(
        "the killed origin left the list of origins {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    // The late edge's report reaches the second origin (its stager relays to the dead one).
    let late_id = {
        let nodes = fleet_view(&origin_at(&mesh, &second, &["nodes", "--json"]).await);
        let known: Vec<String> = first_view.iter().map(|n| n.0.clone()).collect();
        nodes
            .into_iter()
            .map(|n| n.0)
            .find(|id| !known.contains(id))
            .expect("the late edge reported at enrollment")
    };
    let reports_of = |text: String| -> u64 {
        let rows: Value = serde_json::from_str(text.trim()).expect("nodes JSON");
        rows.as_array()
            .and_then(|rows| rows.iter().find(|r| r["id"] == late_id.as_str()))
            .and_then(|r| r["reports"].as_u64())
            .unwrap_or(0)
    };
    let before = reports_of(origin_at(&mesh, &second, &["nodes", "--json"]).await);
    let asked = std::time::Instant::now();
    let negotiated = run(
        &mesh.bins.path("edge-agent"),
        &[
            "negotiate".into(),
            "--dir".into(),
            late.dir.display().to_string(),
        ],
    )
    .await;
    let after = reports_of(origin_at(&mesh, &second, &["nodes", "--json"]).await);
    assert_eq!(
        after,
        before + 1,
        "the report reached the second origin:\n{}\n{}",
        negotiated.stdout,
        negotiated.stderr
    );
    println!(
        "the late edge's report reached the second origin {:.1} s after it began",
        asked.elapsed().as_secs_f64()
    );

    drop(mesh);
    drop(cluster);
}

/// The content-key generations `origin keys list` shows at the origin of home `dir`:
/// (generation, fingerprint, current).
async fn keys(mesh: &Testbed, dir: &Path) -> Vec<(u64, String, bool)> {
    let rows = mesh
        .origin_json_at(dir, &["keys", "list", "--json"])
        .await
        .expect("keys list");
    rows.as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["generation"].as_u64().unwrap_or_default(),
                r["fingerprint"].as_str().unwrap_or_default().to_owned(),
                r["current"].as_bool().unwrap_or_default(),
            )
        })
        .collect()
}

/// Enrollment tokens and content keys belong to the mesh, not to one origin (issue 14): a
/// token issued at one origin names every origin and enrolls at another when the first is
/// down, once; two nodes racing with one token at two origins get one certificate between
/// them; a key rotation or retirement on either origin reaches the other within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_content_keys_are_the_meshs_not_one_origins() {
    let Some(TwoOrigins {
        cluster,
        work,
        mut mesh,
        second,
        ready,
    }) = two_origins(
        "tokens_and_content_keys_are_the_meshs_not_one_origins",
        0,
        None,
    )
    .await
    else {
        return;
    };
    let w = work.path();
    let second_enroll = ready
        .enroll
        .clone()
        .expect("the second origin's enrollment address");
    let first_enroll = mesh
        .origin
        .enroll
        .clone()
        .expect("the first origin's enrollment address");
    let edge_agent = bins().path("edge-agent");
    let enroll_edge = |token: String, dir: PathBuf| {
        let edge_agent = edge_agent.clone();
        async move {
            run(
                &edge_agent,
                &[
                    "enroll".to_owned(),
                    token,
                    "--dir".to_owned(),
                    dir.display().to_string(),
                ],
            )
            .await
        }
    };

    // Both content-key rings are one from the start: the second origin took the first's.
    let first_keys = keys(&mesh, &mesh.origin_dir).await;
    assert_eq!(first_keys.len(), 1, "{first_keys:?}");
    assert_eq!(
        keys(&mesh, &second).await,
        first_keys,
        "one ring for the mesh"
    );

    // A token from the first origin names both; `--json` says what it grants.
    let issued = mesh
        .origin_json(&["enroll", "--role", "edge", "--site", "site-a", "--json"])
        .await
        .expect("origin enroll");
    let addrs: Vec<String> = issued["enroll_addrs"]
        .as_array()
        .expect("addrs")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        addrs,
        vec![first_enroll.clone(), second_enroll.clone()],
        "{issued:#}"
    );
    let from_first = issued["token"].as_str().expect("token").to_owned();

    // Two nodes race with one token, one at each origin: one certificate between them.
    let raced = mesh
        .origin_json_at(
            &second,
            &["enroll", "--role", "edge", "--site", "site-a", "--json"],
        )
        .await
        .expect("origin enroll at the second");
    let raced =
        proto::net::EnrollToken::parse(raced["token"].as_str().expect("token")).expect("a token");
    assert_eq!(raced.enroll_addrs.len(), 2, "{raced:?}");
    let mut reversed = raced.clone();
    reversed.enroll_addrs.reverse();
    let (a, b) = tokio::join!(
        enroll_edge(raced.encode(), w.join("race-a")),
        enroll_edge(reversed.encode(), w.join("race-b")),
    );
    assert_eq!(
        [a.ok, b.ok].iter().filter(|ok| **ok).count(),
        1,
        "exactly one enrolls:\n{}\n{}\n{}\n{}",
        a.stdout,
        a.stderr,
        b.stdout,
        b.stderr
    );
    let refused = if a.ok { &b } else { &a };
    assert!(
        refused.stderr.contains("already used"),
        "{}",
        refused.stderr
    );

    // kill -9 the first origin: the token it issued enrolls at the second, once.
    mesh.kill_origin().await.expect("kill the first origin");
    let started = std::time::Instant::now();
    let enrolled = enroll_edge(from_first.clone(), w.join("late")).await;
    assert!(enrolled.ok, "{}\n{}", enrolled.stdout, enrolled.stderr);
    println!(
        "a token of the killed origin enrolled at the other in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let again = enroll_edge(from_first, w.join("again")).await;
    assert!(
        !again.ok && again.stderr.contains("already used"),
        "{}",
        again.stderr
    );
    let audit: Vec<Value> = serde_json::from_str(
        mesh.origin_ok_at(&second, &["audit", "--limit", "100", "--json"])
            .await
            .expect("audit")
            .trim(),
    )
    .expect("audit JSON");
    // The stager's token, then the two for edges: each issued once and redeemed once.
    let count = |action: &str| audit.iter().filter(|r| r["action"] == action).count();
    assert_eq!(
        (count("token.issue"), count("token.redeem")),
        (3, 3),
        "{audit:#?}"
    );
    let secret: String = raced.secret.iter().map(|b| format!("{b:02x}")).collect();
    let secrets_in_audit = audit
        .iter()
        .any(|r| r["detail"].as_str().is_some_and(|d| d.contains(&secret)));
    assert!(!secrets_in_audit, "the audit log never holds a secret");

    // Back with the first origin: a rotation on the second reaches it, and a retirement on
    // the first reaches the second.
    mesh.restart_origin()
        .await
        .expect("restart the first origin");
    mesh.origin_ok_at(&second, &["keys", "rotate"])
        .await
        .expect("rotate at the second");
    let rotated = keys(&mesh, &second).await;
    assert_eq!(rotated.len(), 2, "{rotated:?}");
    let started = std::time::Instant::now();
    let reached = wait_until_async(Duration::from_secs(15), POLL, async || {
        keys(&mesh, &mesh.origin_dir).await == rotated
    })
    .await;
    assert!(
        reached.is_ok(),
        "the rotation did not reach the first origin: {:?}",
        keys(&mesh, &mesh.origin_dir).await
    );
    println!(
        "a key rotation on one origin reached the other in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The file `origin publish --encrypt` reads changed too.
    let ring = proto::keyring::load(&mesh.origin_dir.join(proto::keyring::KEYRING_FILE))
        .expect("the first origin's ring file");
    assert_eq!(ring.generations().count(), 2);
    // A rotation on the first reaches the second.
    mesh.origin_ok(&["keys", "rotate"])
        .await
        .expect("rotate at the first");
    let three = keys(&mesh, &mesh.origin_dir).await;
    assert_eq!(three.len(), 3, "{three:?}");
    let reached = wait_until_async(Duration::from_secs(15), POLL, async || {
        keys(&mesh, &second).await == three
    })
    .await;
    assert!(
        reached.is_ok(),
        "the rotation did not reach the second origin: {:?}",
        keys(&mesh, &second).await
    );
    // Generation 1 retired on the second while the first is down: the first, restarted with
    // generation 1 still in its file, takes the retirement instead of bringing it back.
    mesh.stop_origin().await.expect("stop the first origin");
    mesh.origin_ok_at(&second, &["keys", "retire", "1"])
        .await
        .expect("retire at the second");
    mesh.restart_origin()
        .await
        .expect("restart the first origin");
    let generations = |rows: Vec<(u64, String, bool)>| rows.iter().map(|k| k.0).collect::<Vec<_>>();
    assert_eq!(generations(keys(&mesh, &mesh.origin_dir).await), vec![2, 3]);
    assert_eq!(generations(keys(&mesh, &second).await), vec![2, 3]);
    let ring = proto::keyring::load(&mesh.origin_dir.join(proto::keyring::KEYRING_FILE))
        .expect("the first origin's ring file");
    assert_eq!(
        ring.generations().count(),
        2,
        "the retired key left the file"
    );

    // An origin told the address other machines reach it at (`--advertise`) announces that
    // address and puts it in its tokens, not the one it listens on.
    mesh.stop_origin().await.expect("stop the first origin");
    mesh.restart_origin_with(&["--advertise".to_owned(), "127.0.0.2".to_owned()])
        .await
        .expect("restart the first origin with --advertise");
    let issued = mesh
        .origin_json(&["enroll", "--role", "edge", "--site", "site-a", "--json"])
        .await
        .expect("origin enroll");
    let first = issued["enroll_addrs"][0].as_str().unwrap_or_default();
    assert!(first.starts_with("127.0.0.2:"), "{issued:#}");
    let status = mesh
        .origin_json_at(&second, &["status", "--json"])
        .await
        .expect("status");
    let listed: Vec<&str> = status["origins"]
        .as_array()
        .expect("origins")
        .iter()
        .filter_map(|o| o["mesh"].as_str())
        .collect();
    assert!(
        listed.iter().any(|m| m.starts_with("127.0.0.2:")),
        "{status:#}"
    );
    mesh.shutdown().await;
    drop(cluster);
}

/// `origin policy load` on one origin and `origin class set` on another, at the same time and
/// many times over (issue 14): every change lands once, none overwrites another (a policy load
/// rewrites every node's record, a class change one node's), and the audit log has each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_loads_and_class_changes_racing_on_two_origins_lose_no_update() {
    let Some(TwoOrigins {
        cluster,
        work,
        mut mesh,
        second,
        ..
    }) = two_origins(
        "policy_loads_and_class_changes_racing_on_two_origins_lose_no_update",
        2,
        Some(MIB / 8),
    )
    .await
    else {
        return;
    };
    let w = work.path();
    let ids: Vec<String> = fleet_view(&origin_ok(&mesh, &["nodes", "--json"]).await)
        .into_iter()
        .map(|n| n.0)
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    const ROUNDS: usize = 15;
    let policies: Vec<PathBuf> = (0..ROUNDS)
        .map(|i| {
            write_policy(
                w,
                &format!("policy-{i}.toml"),
                &format!("[[rule]]\nid = \"round-{i}\"\nclass = \"c{i}\"\nbundles = [\"os@1\"]\n"),
            )
        })
        .collect();
    let loads = async {
        for policy in &policies {
            origin_ok(&mesh, &["policy", "load", &policy.display().to_string()]).await;
        }
    };
    let classes = async {
        for i in 0..ROUNDS {
            for id in &ids {
                origin_at(&mesh, &second, &["class", "set", id, &format!("c{i}")]).await;
            }
        }
    };
    tokio::join!(loads, classes);

    // The last class set on each node, the last policy loaded, on both origins.
    let last = format!("c{}", ROUNDS - 1);
    for view in [
        fleet_view(&origin_ok(&mesh, &["nodes", "--json"]).await),
        fleet_view(&origin_at(&mesh, &second, &["nodes", "--json"]).await),
    ] {
        assert!(view.iter().all(|n| n.2 == last), "{view:?}");
    }
    let check = origin_at(&mesh, &second, &["policy", "check", "--json"]).await;
    assert!(check.contains(&format!("round-{}", ROUNDS - 1)), "{check}");
    // Both nodes of the last class now want the bundle its rule names: the policy load and the
    // class changes were computed on each other's results, not on stale copies.
    let nodes: Vec<Value> =
        serde_json::from_str(origin_ok(&mesh, &["nodes", "--json"]).await.trim()).expect("JSON");
    for node in &nodes {
        assert!(
            installed(node, "desired")
                .iter()
                .any(|b| b.starts_with("os@1")),
            "{node:#}"
        );
    }
    let audit: Vec<Value> = serde_json::from_str(
        origin_ok(&mesh, &["audit", "--limit", "1000", "--json"])
            .await
            .trim(),
    )
    .expect("audit JSON");
    let seqs: Vec<u64> = audit.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no gap");
    let count = |action: &str| audit.iter().filter(|r| r["action"] == action).count();
    assert_eq!(count("policy.load"), ROUNDS, "every policy load once");
    assert_eq!(
        count("class.set"),
        ROUNDS * ids.len(),
        "every class change once"
    );
    mesh.shutdown().await;
    drop(cluster);
}
