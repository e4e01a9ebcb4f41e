//! The console in a real browser (issue 17): headless Chromium driven through chromedriver's
//! WebDriver protocol (W3C JSON over HTTP on loopback, spoken with netsim's hyper client: the
//! handful of commands below need no WebDriver crate), against the real `origin` binary. An admin logs in through the
//! form, watches a rollout's per-site progress advance on the rollout page without reloading,
//! presses pause and sees it in the page and in `origin rollout status`; a script POST without
//! the CSRF token is refused, and so is a viewer's with it; a viewer sees no buttons; five
//! wrong passwords through the form slow the next login. Screenshots of the overview and of the rollout page are saved under
//! `$CARGO_TARGET_DIR/console-screenshots/` (else the test's work directory) and printed.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/install-deps.sh` installs them);
//! without them the test is skipped with a counted message (a failure under
//! STAGECOACH_REQUIRE_ALL=1).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hyper::{Method, StatusCode};
use netsim::procs::Binaries;
use netsim::testbed::Testbed;
use netsim::{datagen, machines};
use serde_json::Value;
use stagecoach_testing::{skip_or_fail, wait_for_async, wait_until_async};

const TEST: &str = "console_browser";

/// How often the origin or the page is asked while waiting on it.
const POLL: Duration = Duration::from_millis(200);

/// How long the page may take to show a change.
const PAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long chromedriver may take to say its port.
const DRIVER_START_TIMEOUT: Duration = Duration::from_secs(30);

const ADMIN: &str = "alice";
const ADMIN_PASSWORD: &str = "alice-has-a-long-password";
const VIEWER: &str = "vera";
const VIEWER_PASSWORD: &str = "vera-only-looks-around";

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

fn find_tool(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// A chromedriver on an ephemeral loopback port, killed when dropped (on every exit path,
/// panics included).
struct Driver {
    child: Child,
    addr: String,
}

impl Driver {
    fn start(chromedriver: &Path, log: &Path) -> Driver {
        let mut child = Command::new(chromedriver)
            .args(["--port=0", &format!("--log-path={}", log.display())])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let stdout = child.stdout.take().expect("chromedriver's stdout");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(port) = line
                    .split("started successfully on port ")
                    .nth(1)
                    .and_then(|rest| rest.trim_end_matches('.').trim().parse::<u16>().ok())
                {
                    let _ = sender.send(port);
                }
            }
        });
        let mut driver = Driver {
            child,
            addr: String::new(),
        };
        let port = receiver
            .recv_timeout(DRIVER_START_TIMEOUT)
            .expect("chromedriver says its port");
        driver.addr = format!("127.0.0.1:{port}");
        driver
    }

    /// A new headless Chromium session.
    async fn browser(&self) -> Client {
        let chromium = find_tool(&["chromium", "chromium-browser"]).expect("chromium");
        let capabilities = serde_json::json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1200,1000"],
                },
            }},
        });
        let answer = webdriver(&self.addr, Method::POST, "/session", Some(capabilities))
            .await
            .expect("a WebDriver session");
        let session = answer["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        Client {
            addr: self.addr.clone(),
            session,
        }
    }
}

/// The W3C WebDriver key of an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One WebDriver command; answers its `value`.
async fn webdriver(addr: &str, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
    let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    let answer = netsim::http::request(
        addr,
        method,
        path,
        &[("content-type", "application/json; charset=utf-8")],
        body,
    )
    .await?;
    let json: Value = serde_json::from_str(&answer.body)
        .with_context(|| format!("WebDriver {path}: {}", answer.body))?;
    if answer.status != StatusCode::OK {
        bail!("WebDriver {path}: {}: {}", answer.status, json["value"]);
    }
    Ok(json["value"].clone())
}

/// A browser session.
struct Client {
    addr: String,
    session: String,
}

impl Client {
    async fn cmd(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        webdriver(
            &self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
        .await
    }

    async fn goto(&self, url: &str) -> Result<()> {
        self.cmd(
            Method::POST,
            "/url",
            Some(serde_json::json!({ "url": url })),
        )
        .await
        .map(|_| ())
    }

    async fn current_url(&self) -> Result<String> {
        let url = self.cmd(Method::GET, "/url", None).await?;
        url.as_str().map(str::to_owned).context("no URL")
    }

    /// The first element matching `css`.
    async fn find(&self, css: &str) -> Result<String> {
        let found = self
            .cmd(
                Method::POST,
                "/element",
                Some(serde_json::json!({ "using": "css selector", "value": css })),
            )
            .await?;
        found[ELEMENT_KEY]
            .as_str()
            .map(str::to_owned)
            .context("no element reference")
    }

    async fn find_all(&self, css: &str) -> Result<Vec<String>> {
        let found = self
            .cmd(
                Method::POST,
                "/elements",
                Some(serde_json::json!({ "using": "css selector", "value": css })),
            )
            .await?;
        Ok(found
            .as_array()
            .map(|all| {
                all.iter()
                    .filter_map(|e| e[ELEMENT_KEY].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn click(&self, css: &str) -> Result<()> {
        let element = self.find(css).await?;
        self.cmd(
            Method::POST,
            &format!("/element/{element}/click"),
            Some(serde_json::json!({})),
        )
        .await
        .map(|_| ())
    }

    async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let element = self.find(css).await?;
        self.cmd(
            Method::POST,
            &format!("/element/{element}/value"),
            Some(serde_json::json!({ "text": text })),
        )
        .await
        .map(|_| ())
    }

    async fn execute(&self, script: &str) -> Result<Value> {
        self.cmd(
            Method::POST,
            "/execute/sync",
            Some(serde_json::json!({ "script": script, "args": [] })),
        )
        .await
    }

    async fn screenshot(&self) -> Result<Vec<u8>> {
        let png = self.cmd(Method::GET, "/screenshot", None).await?;
        data_encoding::BASE64
            .decode(png.as_str().context("no screenshot")?.as_bytes())
            .context("screenshot base64")
    }

    async fn close(self) -> Result<()> {
        webdriver(
            &self.addr,
            Method::DELETE,
            &format!("/session/{}", self.session),
            None,
        )
        .await
        .map(|_| ())
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn add_account(mesh: &Testbed, name: &str, role: &str, password: &str) {
    netsim::console::add_account(mesh, name, role, password)
        .await
        .expect("origin admin add");
}

/// Fills in and sends the login form, as a person would.
async fn submit_login(browser: &Client, console: &str, name: &str, password: &str) {
    browser
        .goto(&format!("http://{console}/login"))
        .await
        .expect("open /login");
    browser
        .type_into("input[name=name]", name)
        .await
        .expect("type the name");
    browser
        .type_into("input[name=password]", password)
        .await
        .expect("type the password");
    browser
        .click("form.login button[type=submit]")
        .await
        .expect("press log in");
}

/// Logs in through the form and waits for the overview.
async fn log_in(browser: &Client, console: &str, name: &str, password: &str) {
    submit_login(browser, console, name, password).await;
    wait_until_async(PAGE_TIMEOUT, POLL, async || {
        browser.find("body[data-page=overview]").await.is_ok()
    })
    .await
    .expect("the overview after logging in");
}

/// The text of the element `css`; empty when there is none (yet).
async fn text(browser: &Client, css: &str) -> String {
    let Ok(element) = browser.find(css).await else {
        return String::new();
    };
    browser
        .cmd(Method::GET, &format!("/element/{element}/text"), None)
        .await
        .ok()
        .and_then(|t| t.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Waits until the element `css` shows `wanted`.
async fn wait_text(browser: &Client, css: &str, wanted: impl Fn(&str) -> bool) -> String {
    wait_for_async(PAGE_TIMEOUT, POLL, async || {
        let shown = text(browser, css).await;
        Ok::<_, std::convert::Infallible>(wanted(&shown).then_some(shown))
    })
    .await
    .unwrap_or_else(|_| panic!("{css} never showed what was expected"))
}

fn screenshot_dir(work: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(|dir| PathBuf::from(dir).join("console-screenshots"))
        .unwrap_or_else(|| work.join("console-screenshots"))
}

async fn save_screenshot(browser: &Client, dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).expect("screenshot directory");
    let png = browser.screenshot().await.expect("screenshot");
    let path = dir.join(name);
    std::fs::write(&path, png).expect("write the screenshot");
    println!("screenshot: {}", path.display());
}

async fn rollout_status(mesh: &Testbed) -> Value {
    let out = mesh
        .origin_ok(&["rollout", "status", "--json"])
        .await
        .expect("rollout status");
    serde_json::from_str(out.trim()).expect("status JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_browser_follows_and_pauses_a_rollout() {
    let (Some(chromedriver), Some(_)) = (
        find_tool(&["chromedriver"]),
        find_tool(&["chromium", "chromium-browser"]),
    ) else {
        skip_or_fail(
            TEST,
            "needs chromium and chromedriver (Debian: chromium, chromium-driver; scripts/install-deps.sh)",
        );
        return;
    };
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let mut mesh = Testbed::start(bins(), &w.join("mesh"), 2, 1, &[])
        .await
        .expect("mesh");
    add_account(&mesh, ADMIN, "admin", ADMIN_PASSWORD).await;
    add_account(&mesh, VIEWER, "viewer", VIEWER_PASSWORD).await;
    datagen::generate_tree(&w.join("factory"), 64 * 1024, 3).expect("tree");
    datagen::generate_tree(&w.join("rescue"), 64 * 1024, 1).expect("tree");
    datagen::generate_tree(&w.join("target"), 64 * 1024, 2).expect("tree");
    let factory = mesh
        .publish(&w.join("factory"), "factory-os", "1")
        .await
        .expect("publish factory");
    mesh.publish_as(&w.join("rescue"), "rescue-os", "1", "base-os")
        .await
        .expect("publish rescue");
    mesh.publish(&w.join("target"), "os", "2")
        .await
        .expect("publish target");
    // Simulated machines behind the edges, so the swaps really happen. Each new OS's health
    // check waits for a gate file the test creates, so every step of the rollout happens
    // when the test says and never before: a swap cannot finish between two commands.
    machines::provision(&mut mesh, &factory)
        .await
        .expect("provision");
    let gate = |edge: &str| w.join(format!("gate-{edge}"));
    mesh.start_edge_daemons_with(false, &[], |edge| {
        let check = format!(
            "command=while [ ! -e '{}' ]; do sleep 0.1; done",
            gate(&edge.name).display()
        );
        machines::daemon_flags(edge, &[check])
    })
    .await
    .expect("daemons");
    mesh.wait_for_daemon_reports(Duration::from_secs(60))
        .await
        .expect("the edges report their daemons' addresses");
    let console = mesh
        .restart_origin_with_console()
        .await
        .expect("restart origin with --console");

    // The rollout starts and is paused: the first site's canary is offered and waits at its
    // health check, so the second site's wave cannot start.
    mesh.rollout_all("os@2", "rescue-os@1")
        .await
        .expect("rollout start");
    mesh.origin_ok(&["rollout", "pause"])
        .await
        .expect("rollout pause");
    let status = rollout_status(&mesh).await;
    assert_eq!(status["phase"]["phase"], "paused", "{status:#}");
    let waves = status["waves"].as_array().expect("waves");
    assert_eq!(waves.len(), 2, "one canary per site: {status:#}");
    let first_site = waves[0]["site"].as_str().expect("site").to_owned();
    let second_site = waves[1]["site"].as_str().expect("site").to_owned();
    let second_node = waves[1]["nodes"][0]["node"]
        .as_str()
        .expect("node")
        .to_owned();
    let first_edge = mesh
        .edges
        .iter()
        .find(|e| e.site == first_site)
        .expect("the first site's edge")
        .name
        .clone();

    let driver = Driver::start(&chromedriver, &w.join("chromedriver.log"));
    let shots = screenshot_dir(w);
    let browser = driver.browser().await;
    log_in(&browser, &console, ADMIN, ADMIN_PASSWORD).await;
    wait_text(&browser, "#live-status", |t| t == "live").await;
    save_screenshot(&browser, &shots, "overview.png").await;
    browser
        .click("a[href^='/rollouts/']")
        .await
        .expect("open the rollout page from the overview's link");
    wait_until_async(PAGE_TIMEOUT, POLL, async || {
        browser.find("body[data-page=rollout]").await.is_ok()
    })
    .await
    .expect("the rollout page");
    wait_text(&browser, "#rollout-phase", |t| t == "paused").await;
    wait_text(&browser, "#live-status", |t| t == "live").await;
    // A mark that a reload would wipe.
    browser
        .execute("window.stagecoachMark = 17; return null;")
        .await
        .expect("mark the page");
    let second_row = format!("#site-progress-rows tr[data-site='{second_site}']");
    assert_eq!(
        text(&browser, &format!("{second_row} td.pending")).await,
        "1"
    );

    // Resume from the page, then let the first site's canary pass its health check: the
    // first site finishes and the second site's node is offered (its own check waits on a
    // gate never opened), and the page shows both without reloading.
    let first_row = format!("#site-progress-rows tr[data-site='{first_site}']");
    assert_eq!(
        text(&browser, &format!("{first_row} td.offered")).await,
        "1"
    );
    browser
        .click("#rollout-resume")
        .await
        .expect("press resume");
    wait_text(&browser, "#rollout-phase", |t| t == "running").await;
    std::fs::write(gate(&first_edge), b"").expect("open the first canary's gate");
    wait_text(&browser, &format!("{first_row} td.done"), |t| t == "1").await;
    wait_text(&browser, &format!("{second_row} td.offered"), |t| t == "1").await;
    let mark = browser
        .execute("return window.stagecoachMark || 0;")
        .await
        .expect("read the mark");
    assert_eq!(mark, serde_json::json!(17), "the page was not reloaded");
    let chart = browser
        .find_all("#progress-chart svg polyline")
        .await
        .expect("chart lines");
    assert_eq!(chart.len(), 2, "one line per site");
    save_screenshot(&browser, &shots, "rollout.png").await;

    // Pause from the page: the page and `origin rollout status` say paused.
    browser.click("#rollout-pause").await.expect("press pause");
    wait_text(&browser, "#rollout-phase", |t| t == "paused").await;
    let status = rollout_status(&mesh).await;
    assert_eq!(status["phase"]["phase"], "paused", "{status:#}");
    assert!(
        status.to_string().contains(&second_node),
        "the status names the node still at its health check"
    );
    let rollout_url = browser.current_url().await.expect("url");
    let resume_path = format!(
        "/api/rollouts/{rollout_id}/resume",
        rollout_id = rollout_url.rsplit('/').next().unwrap_or_default()
    );
    // A script on the admin's own page that leaves out the CSRF token is refused.
    assert_eq!(
        post_from_page(&browser, &resume_path, false).await,
        403,
        "a POST without the CSRF token"
    );
    browser.close().await.expect("close the admin's browser");

    // A viewer sees the same page without buttons.
    let viewer = driver.browser().await;
    log_in(&viewer, &console, VIEWER, VIEWER_PASSWORD).await;
    viewer
        .goto(&rollout_url)
        .await
        .expect("open the rollout page");
    wait_text(&viewer, "#rollout-phase", |t| t == "paused").await;
    assert!(viewer
        .find_all("button[id^='rollout-'], form.rollout-action")
        .await
        .expect("query")
        .is_empty());
    // Even with its session's CSRF token, a viewer's POST is refused.
    assert_eq!(
        post_from_page(&viewer, &resume_path, true).await,
        403,
        "a viewer's POST"
    );
    let status = rollout_status(&mesh).await;
    assert_eq!(
        status["phase"]["phase"], "paused",
        "nothing changed: {status:#}"
    );
    viewer.close().await.expect("close the viewer's browser");

    // Five wrong passwords through the form: the next try is slowed, right password or not.
    let guesser = driver.browser().await;
    for attempt in 1..=5 {
        submit_login(&guesser, &console, VIEWER, "not-the-password-at-all").await;
        wait_text(&guesser, "p.error", |t| {
            t.contains("Wrong name or password")
        })
        .await;
        println!("wrong password {attempt} refused");
    }
    submit_login(&guesser, &console, VIEWER, VIEWER_PASSWORD).await;
    wait_text(&guesser, "p.error", |t| {
        t.contains("Too many wrong passwords")
    })
    .await;
    assert!(guesser.find("body[data-page=overview]").await.is_err());
    guesser.close().await.expect("close the guesser's browser");
    drop(driver);
    mesh.shutdown().await;
}

/// POSTs `path` from a script of the page open in `browser` (a synchronous XMLHttpRequest,
/// as the page's own scripts could), with the page's CSRF token when `with_token`; returns
/// the HTTP status.
async fn post_from_page(browser: &Client, path: &str, with_token: bool) -> u64 {
    let script = format!(
        "var x = new XMLHttpRequest(); x.open('POST', '{path}', false); \
         var m = document.querySelector('meta[name=csrf-token]'); \
         if ({with_token} && m) {{ x.setRequestHeader('X-CSRF-Token', m.content); }} \
         x.send(); return x.status;"
    );
    browser
        .execute(&script)
        .await
        .expect("run the script")
        .as_u64()
        .expect("a status")
}
