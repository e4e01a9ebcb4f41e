//! The origin's web console from the client side, for the demo, the tests and the benches:
//! accounts made with `origin admin add --password-stdin`, logging in over HTTP, and the
//! session's cookie and CSRF token, as a browser holds them.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hyper::{Method, StatusCode};

use crate::http::{self, Response};
use crate::procs::Binaries;
use crate::testbed::Testbed;

/// The content type of an HTML form's body.
pub const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

/// A logged-in client: the session's cookie (`name=value`, for a `cookie` header) and its
/// CSRF token (read from the overview page, where the console's scripts read it too).
#[derive(Clone, Debug)]
pub struct Session {
    /// `stagecoach_session=...`.
    pub cookie: String,
    /// The token every change must carry.
    pub csrf: String,
    /// The whole `set-cookie` header of the login answer, for checks of its attributes.
    pub set_cookie: String,
}

/// Adds (or replaces) console account `name` with `role` through `origin admin add
/// --password-stdin` on `mesh`'s origin.
pub async fn add_account(mesh: &Testbed, name: &str, role: &str, password: &str) -> Result<()> {
    let run = mesh
        .origin_cli_input(
            &["admin", "add", name, "--role", role, "--password-stdin"],
            format!("{password}\n").as_bytes(),
        )
        .await
        .context("run origin admin add")?;
    if !run.ok {
        bail!("origin admin add {name}:\n{}{}", run.stdout, run.stderr);
    }
    Ok(())
}

/// An URL-encoded form body of `fields`.
pub fn form_body(fields: &[(&str, &str)]) -> Vec<u8> {
    serde_urlencoded::to_string(fields)
        .unwrap_or_default()
        .into_bytes()
}

/// Posts the login form; returns the answer whatever it is.
pub async fn login(console: &str, name: &str, password: &str) -> Result<Response> {
    http::request(
        console,
        Method::POST,
        "/login",
        &[FORM],
        form_body(&[("name", name), ("password", password)]),
    )
    .await
    .context("POST /login")
}

/// Logs in; fails unless the console answers with a session.
pub async fn log_in(console: &str, name: &str, password: &str) -> Result<Session> {
    let answer = login(console, name, password).await?;
    if answer.status != StatusCode::SEE_OTHER {
        bail!("login as {name}: {} {}", answer.status, answer.body);
    }
    let set_cookie = answer.header_values("set-cookie").join("\n");
    let cookie = set_cookie
        .split(';')
        .next()
        .filter(|c| c.contains('='))
        .context("the login answer sets no cookie")?
        .trim()
        .to_owned();
    let page = http::get(console, "/", &[("cookie", cookie.as_str())]).await?;
    let csrf = page
        .body
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .context("the overview carries no CSRF token")?
        .to_owned();
    Ok(Session {
        cookie,
        csrf,
        set_cookie,
    })
}

/// `GET path` with `session`'s cookie (none when `None`).
pub async fn get(console: &str, path: &str, session: Option<&Session>) -> Result<Response> {
    match session {
        Some(s) => http::get(console, path, &[("cookie", s.cookie.as_str())]).await,
        None => http::get(console, path, &[]).await,
    }
}

impl Testbed {
    /// Waits until the origin's node table lists every running edge daemon's address (each
    /// daemon reports it when it starts), so a rollout or prepare can reach them.
    pub async fn wait_for_daemon_reports(&self, timeout: std::time::Duration) -> Result<()> {
        let daemons: Vec<String> = self
            .edges
            .iter()
            .filter_map(|e| e.daemon.as_ref().map(|d| d.mesh.clone()))
            .collect();
        stagecoach_testing::wait_until_async(
            timeout,
            std::time::Duration::from_millis(200),
            async || {
                let nodes = self
                    .origin_ok(&["nodes", "--json"])
                    .await
                    .unwrap_or_default();
                daemons.iter().all(|addr| nodes.contains(addr))
            },
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the edge daemons did not all report their addresses within {timeout:?}"
            )
        })
    }

    /// `origin rollout start TARGET --to all --rescue RESCUE`; returns its output.
    pub async fn rollout_all(&self, target: &str, rescue: &str) -> Result<String> {
        self.origin_ok(&[
            "rollout", "start", target, "--to", "all", "--rescue", rescue,
        ])
        .await
    }

    /// Restarts the origin (SIGTERM, so its peers reconnect at once) with its console on a
    /// free loopback port; returns the console's address.
    pub async fn restart_origin_with_console(&mut self) -> Result<String> {
        self.stop_origin().await?;
        self.restart_origin_with(&["--console".into(), "127.0.0.1:0".into()])
            .await?;
        self.origin
            .console
            .clone()
            .context("the origin's ready file names no console")
    }
}

/// A mesh whose console can show a rollout that stays running: one site with one edge,
/// `os@2` and `rescue-os@1` published, the accounts made, and the edge's daemon gone after it
/// reported, its address taken by a socket that never answers. A rollout of `os@2` (see
/// [`Testbed::rollout_all`]) then offers the canary and waits on its QUIC handshake (up to
/// the 30 s idle timeout), so it runs until paused.
pub struct HeldRollout {
    /// The mesh.
    pub mesh: Testbed,
    /// The console's address.
    pub console: String,
    /// Holds the daemon's address.
    _silent: std::net::UdpSocket,
}

impl HeldRollout {
    /// Builds it under `work`, with `accounts` (name, role, password).
    pub async fn start(
        bins: Binaries,
        work: &Path,
        accounts: &[(&str, &str, &str)],
    ) -> Result<Self> {
        let mut mesh = Testbed::start(bins, &work.join("mesh"), 1, 1, &[]).await?;
        for (name, role, password) in accounts {
            add_account(&mesh, name, role, password).await?;
        }
        for (name, version, kind, seed) in
            [("rescue-os", "1", "base-os", 1), ("os", "2", "os-image", 2)]
        {
            let tree = work.join(name);
            crate::datagen::generate_tree(&tree, 64 * 1024, seed)?;
            mesh.publish_as(&tree, name, version, kind).await?;
        }
        mesh.start_edge_daemons(false, &[]).await?;
        mesh.wait_for_daemon_reports(Duration::from_secs(60))
            .await?;
        let edge = mesh.edges[0].clone();
        let daemon_addr = edge
            .daemon
            .as_ref()
            .context("the edge's daemon")?
            .mesh
            .clone();
        mesh.stop_edge(&edge.name).await?;
        let silent = std::net::UdpSocket::bind(&daemon_addr)
            .with_context(|| format!("bind the daemon's address {daemon_addr}"))?;
        let console = mesh.restart_origin_with_console().await?;
        Ok(Self {
            mesh,
            console,
            _silent: silent,
        })
    }
}
