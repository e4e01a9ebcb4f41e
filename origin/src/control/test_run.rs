//! `origin test-run`: a node runs a bundle in test mode. Kept in memory only, by design: a
//! restart of the origin (or the node) forgets it.

// The policy's errors are kept whole (they name rule, field and file), which makes them large.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::time::Duration;

use proto::manifest::BundleId;
use proto::net::{connect, read_frame, send_request, NetError};
use proto::wire::{ControlReply, ErrorCode, Request, Response, TestRunSummary, MAX_FRAME_BYTES};
use serde::Serialize;

use super::commands::{find_bundle, to_json};
use super::{CommandError, ControlPlane};
use crate::catalog::Catalog;
use crate::db::now_ms;

/// How long a test run on an edge may take (fetch included).
pub const TEST_RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// Why a test run did not start.
#[derive(Debug, thiserror::Error)]
pub enum TestRunError {
    /// The node never said where its daemon listens.
    #[error("node {0} reported no daemon address; start `edge-agent serve` on it")]
    NoDaemonAddress(String),
    /// The node took longer than [`TEST_RUN_TIMEOUT`].
    #[error("node {0} did not finish within {TEST_RUN_TIMEOUT:?}")]
    TimedOut(String),
    /// The node's daemon cannot be reached.
    #[error("cannot reach the node's daemon at {addr}: {error}")]
    Unreachable {
        /// The daemon's address.
        addr: SocketAddr,
        /// Why.
        error: NetError,
    },
    /// The request or its answer was lost.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The node refused.
    #[error("the node refused ({code:?}): {message}")]
    Refused {
        /// The node's error code.
        code: ErrorCode,
        /// The node's message.
        message: String,
    },
    /// The node answered something else.
    #[error("unexpected answer from the node: {0}")]
    Unexpected(String),
    /// The node closed the stream without answering.
    #[error("the node closed the stream without an answer")]
    NoAnswer,
}

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
    ) -> Result<ControlReply, CommandError> {
        let record = tokio::task::block_in_place(|| self.find_node(node))?;
        let info = find_bundle(catalog, bundle)?;
        let addr: SocketAddr = record
            .data_addr
            .parse()
            .map_err(|_| TestRunError::NoDaemonAddress(record.id.clone()))?;
        let summary = tokio::time::timeout(TEST_RUN_TIMEOUT, self.ask_test_run(addr, info.id))
            .await
            .map_err(|_| TestRunError::TimedOut(record.id.clone()))??;
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

    async fn ask_test_run(
        &self,
        addr: SocketAddr,
        id: BundleId,
    ) -> Result<TestRunSummary, TestRunError> {
        let conn = connect(&self.endpoint, addr)
            .await
            .map_err(|error| TestRunError::Unreachable { addr, error })?;
        let mut recv = send_request(&conn, &Request::TestRun { bundle: id }).await?;
        let answer = loop {
            let frame: Option<Response> = read_frame(&mut recv, MAX_FRAME_BYTES).await?;
            match frame {
                Some(Response::FetchProgress { .. }) => continue,
                Some(Response::TestRunning(summary)) => break Ok(summary),
                Some(Response::Error { code, message }) => {
                    break Err(TestRunError::Refused { code, message })
                }
                Some(other) => break Err(TestRunError::Unexpected(format!("{other:?}"))),
                None => break Err(TestRunError::NoAnswer),
            }
        };
        conn.close(0u32.into(), b"done");
        answer
    }
}
