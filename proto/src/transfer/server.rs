//! The accept loop every mesh server runs: connections, one task per stream, one request per
//! stream, bad frames refused per stream without touching the others.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use quinn::{Connection, Endpoint, RecvStream, SendStream};

use crate::metrics::{Counter, Metrics};
use crate::net::{accept, read_frame, refuse_stream, PeerIdentity};
use crate::wire::{Request, MAX_FRAME_BYTES};

use super::names;

/// Most requests one connection may have in progress; more streams wait in QUIC flow control.
pub const MAX_STREAMS_PER_CONNECTION: usize = 256;

/// Bytes all of a server's connections together may have sent and not yet had acknowledged:
/// split evenly among the live connections (see [`SendWindows`]).
pub const NODE_SEND_WINDOW_BYTES: u64 = 64 * 1024 * 1024;

/// The smallest send window a connection gets however many share the node's: at a LAN's
/// sub-millisecond round trip this still fills a 1 Gbit/s link.
pub const MIN_CONNECTION_SEND_WINDOW_BYTES: u64 = 512 * 1024;

/// Splits [`NODE_SEND_WINDOW_BYTES`] among a server's live connections, so the data queued in
/// QUIC stays bounded however many peers fetch at once: one upstream peer on a long WAN gets
/// the whole window ([`crate::net::CONNECTION_SEND_WINDOW_BYTES`] at most), a hundred edges on
/// a LAN share it.
#[derive(Default)]
pub struct SendWindows {
    live: Mutex<HashMap<usize, Connection>>,
}

impl SendWindows {
    /// The window each of `connections` live connections gets.
    pub fn window_for(connections: usize) -> u64 {
        (NODE_SEND_WINDOW_BYTES / connections.max(1) as u64).clamp(
            MIN_CONNECTION_SEND_WINDOW_BYTES,
            crate::net::CONNECTION_SEND_WINDOW_BYTES,
        )
    }

    fn add(&self, conn: &Connection) {
        self.update(|live| {
            live.insert(conn.stable_id(), conn.clone());
        });
    }

    fn remove(&self, conn: &Connection) {
        self.update(|live| {
            live.remove(&conn.stable_id());
        });
    }

    fn update(&self, change: impl FnOnce(&mut HashMap<usize, Connection>)) {
        let mut live = match self.live.lock() {
            Ok(live) => live,
            Err(poisoned) => poisoned.into_inner(),
        };
        change(&mut live);
        let window = Self::window_for(live.len());
        for conn in live.values() {
            conn.set_send_window(window);
        }
    }
}

/// What a server does with one request.
pub trait RequestHandler: Send + Sync + 'static {
    /// Answers `request` from `peer` on `send`. `recv` stays open for requests that carry more
    /// (none today) and for subscriptions, whose end the handler watches.
    fn handle(
        self: Arc<Self>,
        peer: PeerIdentity,
        request: Request,
        send: SendStream,
        recv: RecvStream,
    ) -> impl Future<Output = ()> + Send;
}

/// Accepts connections on `endpoint` until it closes, handing every request to `handler`.
pub async fn run<H: RequestHandler>(endpoint: Endpoint, handler: Arc<H>, metrics: Arc<Metrics>) {
    let bad_frames = metrics.counter(
        names::BAD_FRAMES,
        "Streams refused for malformed, oversized or unknown-version frames",
        &[],
    );
    let refused = metrics.counter(
        "stagecoach_refused_connections_total",
        "Connections refused at the handshake (no or bad certificate)",
        &[],
    );
    let windows = Arc::new(SendWindows::default());
    while let Some(incoming) = endpoint.accept().await {
        let windows = windows.clone();
        let handler = handler.clone();
        let bad_frames = bad_frames.clone();
        let refused = refused.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let (conn, peer) = match accept(incoming).await {
                Ok(pair) => pair,
                Err(error) => {
                    refused.inc();
                    tracing::warn!(%remote, %error, "refused connection");
                    return;
                }
            };
            tracing::debug!(%remote, %peer, "connection accepted");
            windows.add(&conn);
            let slots = Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS_PER_CONNECTION));
            loop {
                let (send, recv) = match conn.accept_bi().await {
                    Ok(pair) => pair,
                    Err(error) => {
                        tracing::debug!(%remote, %peer, %error, "connection closed");
                        break;
                    }
                };
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let handler = handler.clone();
                let peer = peer.clone();
                let bad_frames = bad_frames.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    handle_stream(handler, peer, send, recv, bad_frames).await;
                });
            }
            windows.remove(&conn);
        });
    }
}

async fn handle_stream<H: RequestHandler>(
    handler: Arc<H>,
    peer: PeerIdentity,
    mut send: SendStream,
    mut recv: RecvStream,
    bad_frames: Counter,
) {
    let request: Request = match read_frame(&mut recv, MAX_FRAME_BYTES).await {
        Ok(Some(request)) => request,
        Ok(None) => return,
        Err(error) => {
            if error.is_bad_input() {
                bad_frames.inc();
                tracing::warn!(%peer, %error, "refused a stream with a bad frame");
                let _ = refuse_stream(&mut send, &mut recv, &error).await;
            } else {
                tracing::debug!(%peer, %error, "stream failed before its request arrived");
            }
            return;
        }
    };
    handler.handle(peer, request, send, recv).await;
}

/// Resolves on Ctrl-C or SIGTERM: how every daemon knows to stop.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
