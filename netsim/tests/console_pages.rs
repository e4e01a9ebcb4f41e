//! The console's read-only pages (issue 17) with the real `origin` binary: sites, nodes (search,
//! paging, one node), bundles, prepare operations and the audit log, as HTML with the
//! navigation bar and as JSON twins; a viewer reads them all; bad query parameters get 400,
//! unknown ids 404, wrong methods 405, and no session a redirect (pages) or 401 (JSON).

use std::time::Duration;

use hyper::{Method, StatusCode};
use netsim::datagen;
use netsim::http::{self, Response};
use netsim::procs::Binaries;
use netsim::testbed::Testbed;
use serde_json::Value;
use stagecoach_testing::wait_until_async;

const POLL: Duration = Duration::from_millis(200);
const ADMIN: &str = "alice";
const ADMIN_PASSWORD: &str = "alice-has-a-long-password";
const VIEWER: &str = "vera";
const VIEWER_PASSWORD: &str = "vera-only-looks-around";

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

async fn add_account(mesh: &Testbed, name: &str, role: &str, password: &str) {
    netsim::console::add_account(mesh, name, role, password)
        .await
        .expect("origin admin add");
}

/// Logs in; returns the session's cookie header.
async fn log_in(console: &str, name: &str, password: &str) -> String {
    netsim::console::log_in(console, name, password)
        .await
        .expect("log in")
        .cookie
}

async fn get(console: &str, path: &str, cookie: &str) -> Response {
    let headers: Vec<(&str, &str)> = if cookie.is_empty() {
        Vec::new()
    } else {
        vec![("cookie", cookie)]
    };
    http::get(console, path, &headers).await.expect("GET")
}

async fn json(console: &str, path: &str, cookie: &str) -> Value {
    let answer = get(console, path, cookie).await;
    assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.body);
    serde_json::from_str(&answer.body).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_sites_nodes_bundles_prepares_and_audit() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut mesh = Testbed::start(bins(), &work.path().join("mesh"), 2, 2, &[])
        .await
        .expect("mesh");
    let tree = work.path().join("tree");
    datagen::generate_tree(&tree, 256 * 1024, 7).expect("tree");
    mesh.publish(&tree, "web", "1.0.0").await.expect("publish");
    add_account(&mesh, ADMIN, "admin", ADMIN_PASSWORD).await;
    add_account(&mesh, VIEWER, "viewer", VIEWER_PASSWORD).await;
    let console = mesh
        .restart_origin_with_console()
        .await
        .expect("restart origin with --console");

    // Without a session: pages send to the login form, JSON twins answer 401.
    for path in ["/sites", "/nodes", "/bundles", "/prepares", "/audit"] {
        let page = get(&console, path, "").await;
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{path}");
        assert_eq!(page.header_values("location"), ["/login"], "{path}");
        let api = get(&console, &format!("/api{path}"), "").await;
        assert_eq!(api.status, StatusCode::UNAUTHORIZED, "/api{path}");
    }

    let admin = log_in(&console, ADMIN, ADMIN_PASSWORD).await;
    let viewer = log_in(&console, VIEWER, VIEWER_PASSWORD).await;

    // Every edge's enrollment report is in the database.
    let edges: Vec<String> = mesh
        .edges
        .iter()
        .map(|e| {
            proto::net::NodeIdentity::load(&e.dir.join("identity"))
                .expect("edge identity")
                .node_id()
                .to_string()
        })
        .collect();
    assert_eq!(edges.len(), 4);
    wait_until_async(Duration::from_secs(30), POLL, async || {
        let nodes = json(&console, "/api/nodes?per_page=500", &admin).await;
        edges.iter().all(|e| {
            nodes["nodes"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n["id"] == *e))
        })
    })
    .await
    .expect("the edges' reports reach the console");

    // Sites: both sites, each with its edges and a word on where each figure comes from.
    let sites = json(&console, "/api/sites", &viewer).await;
    assert!(sites["note"]
        .as_str()
        .is_some_and(|n| n.contains("reports every few seconds")));
    let names: Vec<&str> = sites["sites"]
        .as_array()
        .expect("sites")
        .iter()
        .filter_map(|s| s["site"].as_str())
        .collect();
    assert_eq!(names, ["site-a", "site-b"], "{sites}");
    for site in sites["sites"].as_array().expect("sites") {
        let site_edges = site["edges"].as_array().expect("edges");
        assert_eq!(site_edges.len(), 2, "{site}");
    }

    // Every page is HTML with the navigation bar, for viewers too, and no buttons that change.
    let first_edge = edges[0].clone();
    for path in [
        "/".to_owned(),
        "/sites".into(),
        "/nodes".into(),
        format!("/nodes/{first_edge}"),
        "/bundles".into(),
        "/prepares".into(),
        "/audit".into(),
    ] {
        for cookie in [&admin, &viewer] {
            let page = get(&console, &path, cookie).await;
            assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.body);
            for link in [
                "href=\"/sites\"",
                "href=\"/nodes\"",
                "href=\"/bundles\"",
                "href=\"/prepares\"",
                "href=\"/audit\"",
            ] {
                assert!(page.body.contains(link), "{path} has no {link}");
            }
        }
    }
    let sites_page = get(&console, "/sites", &viewer).await;
    assert!(sites_page.body.contains(&first_edge), "{}", sites_page.body);

    // Nodes: search by id, site filter, paging, and one node.
    let found = json(&console, &format!("/api/nodes?q={first_edge}"), &viewer).await;
    assert_eq!(found["matching"], 1, "{found}");
    assert_eq!(found["nodes"][0]["id"], first_edge.as_str());
    let site_b = json(&console, "/api/nodes?site=site-b", &viewer).await;
    assert!(
        site_b["nodes"]
            .as_array()
            .is_some_and(|n| !n.is_empty() && n.iter().all(|n| n["site"] == "site-b")),
        "{site_b}"
    );
    let paged = json(&console, "/api/nodes?per_page=1&page=2", &viewer).await;
    assert_eq!(paged["nodes"].as_array().map(Vec::len), Some(1), "{paged}");
    assert_eq!(paged["page"], 2);
    let none = json(&console, "/api/nodes?q=no-such-node", &viewer).await;
    assert_eq!(none["matching"], 0);
    let node = json(&console, &format!("/api/nodes/{first_edge}"), &viewer).await;
    assert_eq!(node["node"]["id"], first_edge.as_str());
    assert_eq!(node["node"]["last_event"], "Enrolled", "{node}");
    let node_page = get(&console, &format!("/nodes/{first_edge}"), &viewer).await;
    assert!(node_page.body.contains("Inventory") && node_page.body.contains("Installed"));

    // Bundles: the published version with its sizes.
    let bundles = json(&console, "/api/bundles", &viewer).await;
    let web = &bundles["bundles"][0];
    assert_eq!(
        (web["name"].as_str(), web["version"].as_str()),
        (Some("web"), Some("1.0.0")),
        "{bundles}"
    );
    assert!(web["stored_bytes"].as_u64().is_some_and(|b| b > 0), "{web}");

    // Prepare operations: none yet.
    let prepares = json(&console, "/api/prepares", &viewer).await;
    assert_eq!(prepares["prepares"], serde_json::json!([]));

    // Audit: newest first, the logins on it.
    let audit = json(&console, "/api/audit", &viewer).await;
    let records = audit["records"].as_array().expect("records");
    assert!(
        records
            .iter()
            .any(|r| r["actor"] == ADMIN && r["action"] == "console.login"),
        "{audit}"
    );
    let seqs: Vec<u64> = records.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] > w[1]),
        "newest first: {seqs:?}"
    );

    // Unknown ids: 404; bad parameters: 400; oversized: 400; wrong methods: 405.
    for path in [
        "/nodes/no-such-node",
        "/api/nodes/no-such-node",
        "/prepares/999",
        "/api/prepares/999",
    ] {
        assert_eq!(
            get(&console, path, &viewer).await.status,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    let long = "a".repeat(4096);
    for path in [
        "/api/prepares/abc".to_owned(),
        "/prepares/-1".into(),
        "/api/nodes?page=0".into(),
        "/api/nodes?page=x".into(),
        "/nodes?per_page=100000".into(),
        "/api/nodes?colour=red".into(),
        format!("/api/nodes?q={long}"),
        "/api/audit?page=1000000".into(),
        "/audit?page=-3".into(),
    ] {
        let answer = get(&console, &path, &viewer).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            answer.body
        );
    }
    for (method, path) in [
        (Method::POST, "/sites"),
        (Method::DELETE, "/api/nodes"),
        (Method::PUT, "/bundles"),
        (Method::POST, "/api/audit"),
        (Method::POST, &*format!("/api/nodes/{first_edge}")),
    ] {
        let answer = http::request(
            &console,
            method.clone(),
            path,
            &[("cookie", viewer.as_str())],
            Vec::new(),
        )
        .await
        .expect("request");
        assert_eq!(
            answer.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
    }

    // Stagers: each site's stager reconnects to the restarted origin and is listed up; what
    // the origin sends it for a new bundle shows as the site's WAN bytes, on the sites page and
    // the overview.
    if wait_until_async(Duration::from_secs(30), POLL, async || {
        let sites = json(&console, "/api/sites", &viewer).await;
        sites["sites"].as_array().is_some_and(|sites| {
            sites.iter().all(|s| {
                s["stagers"].as_array().is_some_and(|st| {
                    st.len() == 1 && st[0]["up"] == true && st[0]["subscriptions"] == 1
                })
            })
        })
    })
    .await
    .is_err()
    {
        let sites = json(&console, "/api/sites", &viewer).await;
        panic!("both sites' stagers are listed up: {sites:#}");
    }
    let tree = work.path().join("tree-2");
    datagen::generate_tree(&tree, 256 * 1024, 8).expect("tree");
    mesh.publish(&tree, "web", "2.0.0").await.expect("publish");
    let stored = json(&console, "/api/bundles", &viewer).await["bundles"][0]["stored_bytes"]
        .as_u64()
        .expect("stored bytes");
    // Both stagers preheat the announced bundle.
    wait_until_async(Duration::from_secs(60), POLL, async || {
        let overview = json(&console, "/api/overview", &viewer).await;
        overview["sites"].as_array().is_some_and(|sites| {
            sites
                .iter()
                .all(|s| s["wan_bytes_from_origin"].as_u64() >= Some(stored))
        })
    })
    .await
    .expect("both sites pull the new bundle");
    let overview = json(&console, "/api/overview", &viewer).await;
    let wan = |name: &str| {
        overview["sites"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["site"] == name))
            .and_then(|s| s["wan_bytes_from_origin"].as_u64())
            .expect("the site's WAN bytes")
    };
    for site in ["site-a", "site-b"] {
        assert!(
            wan(site) < stored + stored / 10 + 65536,
            "{site} pulled the bundle once: {} bytes for {stored} stored ({overview:#})",
            wan(site)
        );
    }
    let sites_page = get(&console, "/sites", &viewer).await;
    assert_eq!(sites_page.body.matches("<tr class=\"stager\">").count(), 2);

    // Each stager reports its own figures: after site-a's edges fetch the bundle, site-a's
    // stager says it pulled the bundle and served its edges, and the overview sums it.
    let site_a_edges: Vec<_> = mesh
        .edges
        .iter()
        .filter(|e| e.site == "site-a")
        .cloned()
        .collect();
    mesh.fetch_all(&site_a_edges, "web@2.0.0")
        .await
        .expect("fetch in site-a");
    let stager_stats = async || {
        let sites = json(&console, "/api/sites", &viewer).await;
        sites["sites"][0]["stagers"][0]["stats"].clone()
    };
    if wait_until_async(Duration::from_secs(30), POLL, async || {
        let stats = stager_stats().await;
        stats["served_bytes"].as_u64() > Some(0) && stats["pulled_bytes"].as_u64() >= Some(stored)
    })
    .await
    .is_err()
    {
        panic!(
            "site-a's stager reports its figures: {:#}",
            stager_stats().await
        );
    }
    let overview = json(&console, "/api/overview", &viewer).await;
    assert!(
        overview["sites"][0]["served_by_stagers"].as_u64() > Some(0),
        "{overview:#}"
    );

    // A prepare operation (no daemon runs here, so every node stays pending) is listed with
    // the per-site counts `origin prepare status` shows, and has its own page.
    mesh.origin_ok(&["prepare", "web@2.0.0", "--to", "all"])
        .await
        .expect("prepare");
    let prepares = json(&console, "/api/prepares", &viewer).await;
    let op = &prepares["prepares"][0];
    assert_eq!(op["bundle"], "web 2.0.0", "{prepares:#}");
    for site in op["sites"].as_array().expect("sites") {
        assert_eq!(
            (site["nodes"].as_u64(), site["pending"].as_u64()),
            (Some(2), Some(2)),
            "{site}"
        );
    }
    let id = op["id"].as_u64().expect("id");
    let page = get(&console, &format!("/prepares/{id}"), &viewer).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("<th>Cancelled</th>"), "{}", page.body);
    let row = overview["sites"][0].clone();
    assert_eq!(
        (row["stagers"].as_u64(), row["edges"].as_u64()),
        (Some(1), Some(2)),
        "{row}"
    );

    mesh.shutdown().await;
}
