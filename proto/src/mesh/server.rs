//! The accept loop every mesh server runs: connections, one task per stream, one request per
//! stream, bad frames refused per stream without touching the others.

use std::future::Future;
use std::sync::Arc;

use quinn::{Endpoint, RecvStream, SendStream};

use crate::metrics::{Counter, Metrics};
use crate::net::{accept, read_frame, refuse_stream, PeerIdentity};
use crate::wire::{Request, MAX_FRAME_BYTES};

use super::names;

/// Most requests one connection may have in progress; more streams wait in QUIC flow control.
pub const MAX_STREAMS_PER_CONNECTION: usize = 256;

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
    while let Some(incoming) = endpoint.accept().await {
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
