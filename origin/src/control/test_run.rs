//! `origin test-run`: a node runs a bundle in test mode. Kept in memory only, by design: a
//! restart of the origin (or the node) forgets it.

use std::net::SocketAddr;
use std::time::Duration;

use proto::manifest::BundleId;
use proto::net::{connect, read_frame, send_request};
use proto::wire::{ControlReply, Request, Response, TestRunSummary, MAX_FRAME_BYTES};
use serde::Serialize;

use super::commands::{find_bundle, to_json};
use super::ControlPlane;
use crate::catalog::Catalog;
use crate::db::now_ms;

/// How long a test run on an edge may take (fetch included).
pub const TEST_RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// A bundle a node runs in test mode (in memory only).
#[derive(Clone, Debug, Serialize)]
pub struct TestRun {
    /// The bundle.
    pub bundle: String,
    /// Its id.
    pub id: String,
    /// Where the edge runs it from.
    pub root: String,
    /// When it started (ms since the Unix epoch).
    pub started_ms: u64,
}

impl ControlPlane {
    pub(super) async fn test_run(
        &self,
        node: &str,
        bundle: &str,
        catalog: &Catalog,
    ) -> Result<ControlReply, String> {
        let record = tokio::task::block_in_place(|| self.find_node(node))?;
        let info = find_bundle(catalog, bundle)?;
        let addr: SocketAddr = record.data_addr.parse().map_err(|_| {
            format!(
                "node {} reported no daemon address; start `edge-agent serve` on it",
                record.id
            )
        })?;
        let summary = tokio::time::timeout(TEST_RUN_TIMEOUT, self.ask_test_run(addr, info.id))
            .await
            .map_err(|_| {
                format!(
                    "node {} did not finish within {TEST_RUN_TIMEOUT:?}",
                    record.id
                )
            })??;
        let run = TestRun {
            bundle: format!("{}@{}", info.name, info.version),
            id: info.id.to_string(),
            root: summary.root.clone(),
            started_ms: now_ms(),
        };
        tracing::info!(node = %record.id, bundle = %run.bundle, root = %run.root, "test run started (in memory only)");
        self.test_runs().insert(record.id.clone(), run.clone());
        Ok(ControlReply {
            success: true,
            text: format!(
                "node {} runs {} in test mode from {} ({} bytes fetched); not persisted: a restart of the node or the origin forgets it\n",
                record.id, run.bundle, run.root, summary.fetch.bytes_received
            ),
            json: to_json(&run),
        })
    }

    async fn ask_test_run(&self, addr: SocketAddr, id: BundleId) -> Result<TestRunSummary, String> {
        let conn = connect(&self.endpoint, addr)
            .await
            .map_err(|e| format!("cannot reach the node's daemon at {addr}: {e}"))?;
        let mut recv = send_request(&conn, &Request::TestRun { bundle: id })
            .await
            .map_err(|e| e.to_string())?;
        let answer = loop {
            let frame: Option<Response> = read_frame(&mut recv, MAX_FRAME_BYTES)
                .await
                .map_err(|e| e.to_string())?;
            match frame {
                Some(Response::FetchProgress { .. }) => continue,
                Some(Response::TestRunning(summary)) => break Ok(summary),
                Some(Response::Error { code, message }) => {
                    break Err(format!("the node refused ({code:?}): {message}"))
                }
                Some(other) => break Err(format!("unexpected answer from the node: {other:?}")),
                None => break Err("the node closed the stream without an answer".into()),
            }
        };
        conn.close(0u32.into(), b"done");
        answer
    }
}
