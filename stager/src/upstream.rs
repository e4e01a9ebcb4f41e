//! The stager's side of the WAN: one connection to the origin, re-established on demand, and
//! single-flight fetches so each chunk crosses the WAN once however many edges ask.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::net::{connect, NetError};
use proto::retry::{retry, RetryPolicy};
use proto::store::Store;
use proto::transfer::fetch::{fetch_blob, FetchError};
use proto::transfer::PeerCounters;
use proto::BlobHash;
use quinn::{Connection, Endpoint};
use tokio::sync::watch;

/// Attempts per chunk before a flight gives up (edges then retry or go elsewhere), with waits
/// of up to 200 ms, 400 ms, 800 ms and 1.6 s between them.
pub const FLIGHT_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 5,
    max_elapsed: None,
    base_delay: Duration::from_millis(200),
    max_delay: Duration::from_secs(2),
};

/// The origin connection.
pub struct Upstream {
    endpoint: Endpoint,
    origin: SocketAddr,
    conn: tokio::sync::Mutex<Option<Connection>>,
}

impl Upstream {
    /// Upstream to `origin` through `endpoint`.
    pub fn new(endpoint: Endpoint, origin: SocketAddr) -> Self {
        Self {
            endpoint,
            origin,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// The live connection, connecting if there is none.
    pub async fn connection(&self) -> Result<Connection, NetError> {
        let mut guard = self.conn.lock().await;
        if let Some(conn) = guard.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let conn = connect(&self.endpoint, self.origin).await?;
        tracing::info!(origin = %self.origin, "connected to the origin");
        *guard = Some(conn.clone());
        Ok(conn)
    }
}

/// Chunk fetches in progress, by hash. A receiver changes whenever a group lands and closes when
/// the fetch ends.
pub struct Flights {
    upstream: Arc<Upstream>,
    store: Store,
    counters: PeerCounters,
    inflight: Mutex<HashMap<BlobHash, watch::Receiver<u64>>>,
}

impl Flights {
    /// Flights through `upstream` into `store`.
    pub fn new(upstream: Arc<Upstream>, store: Store, counters: PeerCounters) -> Arc<Self> {
        Arc::new(Self {
            upstream,
            store,
            counters,
            inflight: Mutex::new(HashMap::new()),
        })
    }

    /// The upstream connection manager.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// Joins the fetch of `hash` (`size` bytes, from a verified manifest), starting it if none
    /// runs. `None` if the blob is already complete.
    pub fn join(self: &Arc<Self>, hash: BlobHash, size: u64) -> Option<watch::Receiver<u64>> {
        if self.store.has_blob(&hash) {
            return None;
        }
        let mut inflight = match self.inflight.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(rx) = inflight.get(&hash) {
            return Some(rx.clone());
        }
        let (tx, rx) = watch::channel(0u64);
        inflight.insert(hash, rx.clone());
        let flights = self.clone();
        tokio::spawn(async move {
            flights.fly(hash, size, tx).await;
            if let Ok(mut inflight) = flights.inflight.lock() {
                inflight.remove(&hash);
            }
        });
        Some(rx)
    }

    /// Fetches `hash` if needed and waits until the fetch ends; true if the blob is complete.
    pub async fn fetch(self: &Arc<Self>, hash: BlobHash, size: u64) -> bool {
        if let Some(mut rx) = self.join(hash, size) {
            while rx.changed().await.is_ok() {}
        }
        self.store.has_blob(&hash)
    }

    async fn fly(&self, hash: BlobHash, size: u64, tx: watch::Sender<u64>) {
        let what = format!("fetch of chunk {hash} from the origin");
        let tx = &tx;
        let fetched = retry(
            &what,
            &FLIGHT_RETRY,
            FetchError::is_source_fault,
            |_| async move {
                let conn = self.upstream.connection().await?;
                fetch_blob(&conn, &self.store, hash, size, &self.counters, Some(tx)).await
            },
        )
        .await;
        match fetched {
            Ok(bytes) => tracing::debug!(blob = %hash, bytes, "chunk fetched from the origin"),
            Err(error) => tracing::error!(blob = %hash, %error, "giving up on chunk for now"),
        }
    }
}
