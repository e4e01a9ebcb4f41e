//! The console's live parts (issue 17) over HTTP with the real `origin` binary: the rollout
//! page (buttons for admins only, its script from the origin, a CSP that allows nothing from
//! elsewhere), `GET /api/events` sending the state on open and again when a rollout is
//! paused, refused without a session, and ending when its session ends.

use std::time::Duration;

use hyper::{Method, StatusCode};
use netsim::console::HeldRollout;
use netsim::http::{self, Response};
use netsim::procs::Binaries;
use netsim::sse::EventStream;
use serde_json::Value;

/// How long an expected event may take.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

const ADMIN: &str = "alice";
const ADMIN_PASSWORD: &str = "alice-has-a-long-password";
const VIEWER: &str = "vera";
const VIEWER_PASSWORD: &str = "vera-only-looks-around";

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

/// Logs in; returns the session cookie (`name=value`) and its CSRF token.
async fn log_in(console: &str, name: &str, password: &str) -> (String, String) {
    let session = netsim::console::log_in(console, name, password)
        .await
        .expect("log in");
    (session.cookie, session.csrf)
}

async fn get(console: &str, path: &str, cookie: &str) -> Response {
    http::get(console, path, &[("cookie", cookie)])
        .await
        .expect("GET")
}

fn rollout_phase(data: &str) -> String {
    let state: Value = serde_json::from_str(data).expect("state JSON");
    state["rollout"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollout_page_and_its_event_stream_follow_a_pause() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut held = HeldRollout::start(
        bins(),
        work.path(),
        &[
            (ADMIN, "admin", ADMIN_PASSWORD),
            (VIEWER, "viewer", VIEWER_PASSWORD),
        ],
    )
    .await
    .expect("a mesh with a held rollout");
    let console = held.console.clone();
    let mesh = &mut held.mesh;
    let (admin, _admin_csrf) = log_in(&console, ADMIN, ADMIN_PASSWORD).await;
    let (viewer, viewer_csrf) = log_in(&console, VIEWER, VIEWER_PASSWORD).await;

    // No session, no stream.
    match EventStream::open(&console, "/api/events", "").await {
        Err(error) => assert_eq!(
            error
                .downcast_ref::<netsim::sse::Refused>()
                .map(|r| r.status),
            Some(401),
            "{error:#}"
        ),
        Ok(_) => panic!("an event stream without a session"),
    }

    mesh.rollout_all("os@2", "rescue-os@1")
        .await
        .expect("rollout start");
    let overview: Value = serde_json::from_str(&get(&console, "/api/overview", &admin).await.body)
        .expect("overview JSON");
    let id = overview["rollouts"][0]["id"]
        .as_str()
        .expect("rollout id")
        .to_owned();

    // The overview links the rollout page; the admin's page has buttons, the viewer's none.
    let page = get(&console, "/", &admin).await;
    assert!(page.body.contains(&format!("href=\"/rollouts/{id}\"")));
    let rollout_path = format!("/rollouts/{id}");
    let admin_page = get(&console, &rollout_path, &admin).await;
    assert_eq!(admin_page.status, StatusCode::OK, "{}", admin_page.body);
    assert!(admin_page
        .body
        .contains(&format!("/api/rollouts/{id}/pause")));
    assert!(admin_page.body.contains("id=\"site-progress-rows\""));
    assert!(admin_page.body.contains("<script src=\"/console.js\">"));
    let csp = admin_page.header_values("content-security-policy").join("");
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
    ] {
        assert!(csp.contains(directive), "{directive}: {csp}");
    }
    let viewer_page = get(&console, &rollout_path, &viewer).await;
    assert_eq!(viewer_page.status, StatusCode::OK);
    assert!(
        !viewer_page.body.contains("/api/rollouts/"),
        "a viewer gets no buttons"
    );
    assert_eq!(
        get(&console, &format!("/rollouts/{}", "00".repeat(32)), &admin)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // The page's JSON twin: the same progress, for a viewer too; no session, 401.
    let twin = get(&console, &format!("/api{rollout_path}"), &viewer).await;
    assert_eq!(twin.status, StatusCode::OK, "{}", twin.body);
    let twin: Value = serde_json::from_str(&twin.body).expect("rollout JSON");
    assert_eq!(twin["id"], id.as_str());
    assert_eq!(twin["phase"], "running", "{twin:#}");
    assert!(
        twin["sites"].as_array().is_some_and(|s| !s.is_empty()),
        "{twin:#}"
    );
    assert_eq!(
        get(&console, &format!("/api{rollout_path}"), "")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let script = get(&console, "/console.js", &admin).await;
    assert_eq!(script.status, StatusCode::OK);
    assert!(script.body.contains("EventSource"));
    assert!(!script.body.contains("http://") || !script.body.contains("src=\"http"));

    // The stream sends the state when it opens, and again when the rollout is paused.
    let mut events = EventStream::open(&console, "/api/events", &admin)
        .await
        .expect("open the event stream");
    let first = events
        .next_matching("state", EVENT_TIMEOUT, |data| {
            rollout_phase(data) == "running"
        })
        .await
        .expect("the running rollout's state");
    let state: Value = serde_json::from_str(&first.data).expect("state JSON");
    assert_eq!(state["rollout"]["id"], id.as_str());
    assert_eq!(
        state["rollout"]["sites"][0]["counts"]["total"], 1,
        "{state:#}"
    );
    let mut viewer_events = EventStream::open(&console, "/api/events", &viewer)
        .await
        .expect("the viewer's stream");
    viewer_events
        .next_matching("state", EVENT_TIMEOUT, |_| true)
        .await
        .expect("the viewer's first state");
    mesh.origin_ok(&["rollout", "pause"])
        .await
        .expect("rollout pause");
    events
        .next_matching("state", EVENT_TIMEOUT, |data| {
            rollout_phase(data) == "paused"
        })
        .await
        .expect("the pause arrives");

    // Streams are bounded: 128 at once (the admin's is one), the next gets 503, and the
    // console still answers other requests meanwhile.
    let mut more = Vec::new();
    let refused = loop {
        match EventStream::open(&console, "/api/events", &admin).await {
            Ok(stream) => more.push(stream),
            Err(error) => break error,
        }
        assert!(more.len() <= 128, "more than 128 event streams");
    };
    assert_eq!(
        refused
            .downcast_ref::<netsim::sse::Refused>()
            .map(|r| r.status),
        Some(503),
        "{refused:#}"
    );
    assert_eq!(
        more.len() + 2,
        128,
        "the admin's and the viewer's streams count"
    );
    assert_eq!(
        get(&console, "/api/overview", &admin).await.status,
        StatusCode::OK
    );
    drop(more);

    // The viewer logs out: that stream ends.
    let logout = http::request(
        &console,
        Method::POST,
        "/logout",
        &[
            ("cookie", viewer.as_str()),
            ("x-csrf-token", viewer_csrf.as_str()),
        ],
        Vec::new(),
    )
    .await
    .expect("POST /logout");
    assert_eq!(logout.status, StatusCode::SEE_OTHER);
    let ended = async {
        loop {
            if viewer_events.next(EVENT_TIMEOUT).await.is_err() {
                return;
            }
        }
    };
    tokio::time::timeout(EVENT_TIMEOUT, ended)
        .await
        .expect("the viewer's stream ends with the session");

    mesh.shutdown().await;
}
