//! The control-plane commands, client side: each asks the running `origin serve` over the
//! mesh with the origin's own certificate (the database belongs to the server process).

use anyhow::{bail, Context, Result};
use proto::net::{call, client_endpoint, connect};
use proto::wire::{ControlCommand, ControlReply, Request, Response, MAX_FRAME_BYTES};

use crate::home::OriginHome;

/// Sends `command` to the running origin at `home` and returns its answer.
pub async fn run(home: &OriginHome, command: ControlCommand) -> Result<ControlReply> {
    let identity = home.origin_identity()?;
    let addr = home.mesh_addr()?;
    let endpoint = client_endpoint(&identity)?;
    let conn = connect(&endpoint, addr).await.with_context(|| {
        format!(
            "cannot reach the running origin at {addr}: start `origin serve --dir {}` (the control plane's database belongs to it)",
            home.dir().display()
        )
    })?;
    let actor = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "operator".to_owned());
    let actor: String = actor.chars().take(64).collect();
    let answer = ask(&conn, &actor, command).await;
    endpoint.wait_idle().await;
    answer
}

/// Asks the origin at the other end of `conn` to run `command` for `actor`, then closes `conn`
/// (what `origin` commands do, and what an origin does to pass a rollout request to the one
/// that drives it).
pub async fn ask(
    conn: &quinn::Connection,
    actor: &str,
    command: ControlCommand,
) -> Result<ControlReply> {
    let request = Request::Control {
        actor: actor.to_owned(),
        command,
    };
    let answer = call(conn, &request, MAX_FRAME_BYTES).await;
    conn.close(0u32.into(), b"done");
    match answer.context("the origin did not answer the command")? {
        Response::Control(reply) => Ok(reply),
        Response::Error { code, message } => bail!("the origin refused ({code:?}): {message}"),
        other => bail!("unexpected answer from the origin: {other:?}"),
    }
}

/// Prints `reply` (its JSON with `json`) and fails when the command did not succeed.
pub fn print(reply: &ControlReply, json: bool, failure: &str) -> Result<()> {
    if json {
        println!("{}", reply.json);
    } else {
        print!("{}", reply.text);
        if !reply.text.is_empty() && !reply.text.ends_with('\n') {
            println!();
        }
    }
    if !reply.success {
        if json {
            eprint!("{}", reply.text);
        }
        bail!("{failure}");
    }
    Ok(())
}
