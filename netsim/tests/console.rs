//! The origin's web console (issue 17) with the real `origin` binary on loopback: accounts
//! added with `origin admin add`, logins right and wrong, sessions, CSRF tokens, viewers,
//! bad requests (oversized bodies, wrong methods, unknown paths and ids, forged cookies), the
//! login rate limit, and pausing a running rollout from the console as `origin rollout pause`
//! would.

use hyper::{Method, StatusCode};
use netsim::console::{form_body, HeldRollout, Session, FORM};
use netsim::http::{self, Response};
use netsim::procs::Binaries;
use netsim::testbed::Testbed;
use serde_json::Value;

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

async fn login(console: &str, name: &str, password: &str) -> Response {
    netsim::console::login(console, name, password)
        .await
        .expect("POST /login")
}

/// Logs in, checking the session cookie's attributes and id.
async fn log_in(console: &str, name: &str, password: &str) -> Session {
    let session = netsim::console::log_in(console, name, password)
        .await
        .expect("log in");
    let set_cookie = &session.set_cookie;
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{attribute}: {set_cookie}");
    }
    assert!(
        !set_cookie.contains("Secure"),
        "no TLS, no Secure: {set_cookie}"
    );
    let id = session
        .cookie
        .split_once('=')
        .map(|(_, id)| id)
        .unwrap_or_default();
    assert_eq!(
        id.len(),
        64,
        "a 256-bit session id in hex: {}",
        session.cookie
    );
    session
}

async fn get(console: &str, path: &str, cookie: &str) -> Response {
    let headers: Vec<(&str, &str)> = if cookie.is_empty() {
        Vec::new()
    } else {
        vec![("cookie", cookie)]
    };
    http::get(console, path, &headers).await.expect("GET")
}

/// `POST path` as `browser`, with `csrf` in the `X-CSRF-Token` header when given.
async fn post(console: &str, path: &str, cookie: &str, csrf: Option<&str>) -> Response {
    let mut headers = vec![("cookie", cookie)];
    if let Some(csrf) = csrf {
        headers.push(("x-csrf-token", csrf));
    }
    http::request(console, Method::POST, path, &headers, Vec::new())
        .await
        .expect("POST")
}

async fn audit(mesh: &Testbed) -> Value {
    let out = mesh
        .origin_ok(&["audit", "--limit", "100", "--json"])
        .await
        .expect("origin audit");
    serde_json::from_str(out.trim()).expect("audit JSON")
}

fn audited(audit: &Value, actor: &str, action: &str) -> bool {
    audit.as_array().is_some_and(|records| {
        records
            .iter()
            .any(|r| r["actor"] == actor && r["action"] == action)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_logins_sessions_csrf_viewers_bad_requests_and_the_rate_limit() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut mesh = Testbed::start(bins(), &work.path().join("mesh"), 0, 0, &[])
        .await
        .expect("mesh");
    add_account(&mesh, ADMIN, "admin", ADMIN_PASSWORD).await;
    add_account(&mesh, VIEWER, "viewer", VIEWER_PASSWORD).await;
    let short = mesh
        .origin_cli_input(
            &["admin", "add", "bob", "--role", "admin", "--password-stdin"],
            b"short\n",
        )
        .await
        .expect("run");
    assert!(
        !short.ok && short.stderr.contains("at least"),
        "{}",
        short.stderr
    );
    let bad_role = mesh
        .origin_cli_input(
            &["admin", "add", "bob", "--role", "root", "--password-stdin"],
            format!("{ADMIN_PASSWORD}\n").as_bytes(),
        )
        .await
        .expect("run");
    assert!(!bad_role.ok, "{}", bad_role.stderr);

    // A console on another address than loopback needs TLS.
    let refused = mesh
        .origin_cli(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--enroll-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--console",
            "0.0.0.0:0",
        ])
        .await
        .expect("run origin serve");
    assert!(
        !refused.ok
            && refused
                .stderr
                .contains("--console-tls-cert/--console-tls-key"),
        "{}",
        refused.stderr
    );

    let console = mesh
        .restart_origin_with_console()
        .await
        .expect("restart origin with --console");

    // Health and metrics are served beside the console.
    let health = get(&console, "/healthz", "").await;
    assert_eq!(
        (health.status, health.body.as_str()),
        (StatusCode::OK, "ok\n")
    );
    let metrics = get(&console, "/metrics", "").await;
    assert!(
        metrics
            .body
            .contains("# TYPE stagecoach_enrollments_total counter"),
        "{}",
        metrics.body
    );

    // Not logged in: the API says 401, the page sends to the login form.
    assert_eq!(
        get(&console, "/api/overview", "").await.status,
        StatusCode::UNAUTHORIZED
    );
    let page = get(&console, "/", "").await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.header_values("location"), ["/login"]);
    let form = get(&console, "/login", "").await;
    assert!(
        form.status == StatusCode::OK && form.body.contains("<form"),
        "{}",
        form.body
    );
    assert!(
        form.header_values("content-security-policy")
            .iter()
            .any(|csp| csp.contains("default-src 'none'")),
        "the page may load nothing from elsewhere"
    );

    // A wrong password, then the right one.
    let wrong = login(&console, ADMIN, "not-alices-password").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.header_values("set-cookie").is_empty());
    let unknown = login(&console, "nobody", ADMIN_PASSWORD).await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    // Login CSRF: a login form posted from another site's page is refused, right password or
    // not; the console's own page (same origin) logs in.
    for header in [
        ("origin", "http://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let answer = http::request(
            &console,
            Method::POST,
            "/login",
            &[FORM, header],
            form_body(&[("name", ADMIN), ("password", ADMIN_PASSWORD)]),
        )
        .await
        .expect("POST /login");
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{header:?}");
        assert!(answer.header_values("set-cookie").is_empty(), "{header:?}");
    }
    let own_origin = format!("http://{console}");
    let same_origin = http::request(
        &console,
        Method::POST,
        "/login",
        &[
            FORM,
            ("origin", own_origin.as_str()),
            ("sec-fetch-site", "same-origin"),
        ],
        form_body(&[("name", ADMIN), ("password", ADMIN_PASSWORD)]),
    )
    .await
    .expect("POST /login");
    assert_eq!(
        same_origin.status,
        StatusCode::SEE_OTHER,
        "{}",
        same_origin.body
    );
    let admin = log_in(&console, ADMIN, ADMIN_PASSWORD).await;
    let overview = get(&console, "/api/overview", &admin.cookie).await;
    assert_eq!(overview.status, StatusCode::OK, "{}", overview.body);
    let overview: Value = serde_json::from_str(&overview.body).expect("overview JSON");
    assert_eq!(overview["account"]["name"], ADMIN);
    assert_eq!(overview["account"]["role"], "admin");
    assert_eq!(overview["rollouts"], serde_json::json!([]));

    // Forged cookies are not sessions.
    let forged = format!("stagecoach_session={}", "ab".repeat(32));
    assert_eq!(
        get(&console, "/api/overview", &forged).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&console, "/api/overview", "stagecoach_session=<script>")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let forged_post = post(
        &console,
        "/api/rollouts/x/pause",
        &forged,
        Some(&admin.csrf),
    )
    .await;
    assert_eq!(forged_post.status, StatusCode::UNAUTHORIZED);

    // No CSRF token, or another one: 403.
    let no_csrf = post(&console, "/api/rollouts/x/pause", &admin.cookie, None).await;
    assert_eq!(no_csrf.status, StatusCode::FORBIDDEN, "{}", no_csrf.body);
    let bad_csrf = post(
        &console,
        "/api/rollouts/x/pause",
        &admin.cookie,
        Some(&"0".repeat(64)),
    )
    .await;
    assert_eq!(bad_csrf.status, StatusCode::FORBIDDEN, "{}", bad_csrf.body);
    let logout_without = post(&console, "/logout", &admin.cookie, None).await;
    assert_eq!(logout_without.status, StatusCode::FORBIDDEN);

    // Unknown ids and actions: 404.
    let unknown_id = post(
        &console,
        &format!("/api/rollouts/{}/pause", "00".repeat(32)),
        &admin.cookie,
        Some(&admin.csrf),
    )
    .await;
    assert_eq!(
        unknown_id.status,
        StatusCode::NOT_FOUND,
        "{}",
        unknown_id.body
    );
    let unknown_action = post(
        &console,
        "/api/rollouts/x/explode",
        &admin.cookie,
        Some(&admin.csrf),
    )
    .await;
    assert_eq!(unknown_action.status, StatusCode::NOT_FOUND);
    assert_eq!(
        get(&console, "/no/such/page", &admin.cookie).await.status,
        StatusCode::NOT_FOUND
    );

    // Wrong methods: 405.
    for (method, path) in [
        (Method::DELETE, "/login"),
        (Method::GET, "/logout"),
        (Method::GET, "/api/rollouts/x/pause"),
        (Method::POST, "/api/overview"),
        (Method::PUT, "/metrics"),
    ] {
        let answer = http::request(
            &console,
            method.clone(),
            path,
            &[("cookie", admin.cookie.as_str())],
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

    // Oversized bodies: 413, and nothing else happens.
    let big = vec![b'a'; 70 * 1024];
    let oversized_login = http::request(&console, Method::POST, "/login", &[FORM], big.clone())
        .await
        .expect("POST");
    assert_eq!(oversized_login.status, StatusCode::PAYLOAD_TOO_LARGE);
    let csrf_header = ("x-csrf-token", admin.csrf.as_str());
    let oversized_post = http::request(
        &console,
        Method::POST,
        "/logout",
        &[("cookie", admin.cookie.as_str()), csrf_header],
        big,
    )
    .await
    .expect("POST");
    assert_eq!(oversized_post.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        get(&console, "/api/overview", &admin.cookie).await.status,
        StatusCode::OK,
        "still logged in"
    );
    // A body that is not a form.
    let json_login = http::request(
        &console,
        Method::POST,
        "/login",
        &[("content-type", "application/json")],
        b"{}".to_vec(),
    )
    .await
    .expect("POST");
    assert!(json_login.status.is_client_error(), "{}", json_login.status);

    // A viewer sees, and changes nothing.
    let viewer = log_in(&console, VIEWER, VIEWER_PASSWORD).await;
    let page = get(&console, "/", &viewer.cookie).await;
    assert!(
        !page.body.contains("<button type=\"submit\">pause"),
        "a viewer gets no buttons"
    );
    let viewer_post = post(
        &console,
        "/api/rollouts/x/pause",
        &viewer.cookie,
        Some(&viewer.csrf),
    )
    .await;
    assert_eq!(
        viewer_post.status,
        StatusCode::FORBIDDEN,
        "{}",
        viewer_post.body
    );

    // Logging out ends the session.
    let out = http::request(
        &console,
        Method::POST,
        "/logout",
        &[("cookie", viewer.cookie.as_str()), FORM],
        form_body(&[("csrf", &viewer.csrf)]),
    )
    .await
    .expect("POST /logout");
    assert_eq!(out.status, StatusCode::SEE_OTHER, "{}", out.body);
    assert_eq!(
        get(&console, "/api/overview", &viewer.cookie).await.status,
        StatusCode::UNAUTHORIZED
    );

    // Logins and logouts are in the audit log with the account's name.
    let log = audit(&mesh).await;
    assert!(audited(&log, ADMIN, "console.login"), "{log:#}");
    assert!(audited(&log, VIEWER, "console.logout"), "{log:#}");
    assert!(log.to_string().contains("account.add"), "{log:#}");

    // Replacing an account ends its sessions.
    add_account(&mesh, ADMIN, "viewer", ADMIN_PASSWORD).await;
    assert_eq!(
        get(&console, "/api/overview", &admin.cookie).await.status,
        StatusCode::UNAUTHORIZED
    );

    // `origin admin list` shows the accounts and roles, never a hash; `origin admin remove`
    // ends the removed account's sessions and is audited; removing it again fails clearly.
    add_account(&mesh, "otto", "admin", ADMIN_PASSWORD).await;
    let otto = log_in(&console, "otto", ADMIN_PASSWORD).await;
    let list = mesh
        .origin_ok(&["admin", "list", "--json"])
        .await
        .expect("admin list");
    let accounts: Value = serde_json::from_str(list.trim()).expect("accounts JSON");
    let listed: Vec<(&str, &str)> = accounts
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|a| Some((a["name"].as_str()?, a["role"].as_str()?)))
        .collect();
    assert_eq!(
        listed,
        [(ADMIN, "viewer"), ("otto", "admin"), (VIEWER, "viewer")]
    );
    assert!(!list.contains("argon2"), "{list}");
    let removed = mesh
        .origin_ok(&["admin", "remove", "otto"])
        .await
        .expect("admin remove");
    assert!(removed.contains("removed"), "{removed}");
    assert_eq!(
        get(&console, "/api/overview", &otto.cookie).await.status,
        StatusCode::UNAUTHORIZED,
        "a removed account's session ends"
    );
    let again = mesh
        .origin_cli(&["admin", "remove", "otto"])
        .await
        .expect("run admin remove");
    assert!(!again.ok, "removing a missing account fails");
    assert!(
        format!("{}{}", again.stdout, again.stderr).contains("no console account `otto`"),
        "{}{}",
        again.stdout,
        again.stderr
    );
    assert!(audit(&mesh).await.to_string().contains("account.remove"));

    // Five wrong passwords for a name: the next attempt is refused, even with the right one.
    for attempt in 1..=5 {
        let answer = login(&console, VIEWER, "wrong-password-again").await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "attempt {attempt}");
    }
    let limited = login(&console, VIEWER, VIEWER_PASSWORD).await;
    assert_eq!(
        limited.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        limited.body
    );
    assert!(!limited.header_values("retry-after").is_empty());
    assert!(limited.header_values("set-cookie").is_empty());

    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_pauses_a_running_rollout_from_the_console() {
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
    let admin = log_in(&console, ADMIN, ADMIN_PASSWORD).await;
    let viewer = log_in(&console, VIEWER, VIEWER_PASSWORD).await;

    mesh.rollout_all("os@2", "rescue-os@1")
        .await
        .expect("rollout start");
    let overview: Value =
        serde_json::from_str(&get(&console, "/api/overview", &admin.cookie).await.body)
            .expect("overview JSON");
    let rollout = &overview["rollouts"][0];
    assert_eq!(
        rollout["status"]["phase"]["phase"], "running",
        "{overview:#}"
    );
    let id = rollout["id"].as_str().expect("rollout id").to_owned();
    let page = get(&console, "/", &admin.cookie).await;
    assert!(
        page.body.contains(&format!("/api/rollouts/{id}/pause")),
        "the admin gets buttons"
    );
    let phase = async || {
        let out = mesh
            .origin_ok(&["rollout", "status", "--json"])
            .await
            .expect("rollout status");
        let status: Value = serde_json::from_str(out.trim()).expect("status JSON");
        status["phase"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let pause = format!("/api/rollouts/{id}/pause");

    // Refused: a viewer, and an admin without the CSRF token. Nothing changes.
    let by_viewer = post(&console, &pause, &viewer.cookie, Some(&viewer.csrf)).await;
    assert_eq!(by_viewer.status, StatusCode::FORBIDDEN);
    let without_csrf = post(&console, &pause, &admin.cookie, None).await;
    assert_eq!(without_csrf.status, StatusCode::FORBIDDEN);
    assert_eq!(phase().await, "running");

    // The admin pauses it: `origin rollout status` says so, and the audit log names her.
    let paused = post(&console, &pause, &admin.cookie, Some(&admin.csrf)).await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.body);
    let answer: Value = serde_json::from_str(&paused.body).expect("status JSON");
    assert_eq!(answer["phase"]["phase"], "paused", "{answer:#}");
    assert_eq!(phase().await, "paused");
    assert!(audited(&audit(mesh).await, ADMIN, "rollout.pause"));

    // The canary's node page shows its part in the rollout: offered, waiting on its swap.
    let canary = rollout["status"]["waves"][0]["nodes"][0]["node"]
        .as_str()
        .expect("the canary")
        .to_owned();
    let node: Value = serde_json::from_str(
        &get(&console, &format!("/api/nodes/{canary}"), &viewer.cookie)
            .await
            .body,
    )
    .expect("node JSON");
    assert_eq!(node["last_rollout"]["bundle"], "os@2", "{node:#}");
    assert_eq!(node["last_rollout"]["result"], "offered", "{node:#}");
    let node_page = get(&console, &format!("/nodes/{canary}"), &viewer.cookie).await;
    assert!(
        node_page.body.contains("os@2 (paused): offered"),
        "{}",
        node_page.body
    );

    // Aborted (from a form, as the page's button posts): it ends, and takes no more actions.
    let aborted = http::request(
        &console,
        Method::POST,
        &format!("/api/rollouts/{id}/abort"),
        &[("cookie", admin.cookie.as_str()), FORM],
        form_body(&[("csrf", &admin.csrf)]),
    )
    .await
    .expect("POST abort");
    assert!(
        aborted.status == StatusCode::SEE_OTHER || aborted.status == StatusCode::NOT_FOUND,
        "{}: {}",
        aborted.status,
        aborted.body
    );
    assert!(phase().await.starts_with("halted"));
    let again = post(&console, &pause, &admin.cookie, Some(&admin.csrf)).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND, "{}", again.body);

    mesh.shutdown().await;
}
