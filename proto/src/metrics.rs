//! Counters every daemon keeps, rendered as Prometheus text and served on a local HTTP port.
//!
//! Deliberately small: monotonic counters and gauges keyed by name and labels, no histograms.
//! The HTTP side answers any `GET` with the text exposition format and closes the connection.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest HTTP request head read from a metrics client, in bytes.
const MAX_HTTP_REQUEST_BYTES: usize = 8 * 1024;

/// How long a metrics client may take to send its request.
const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle to one counter; cheap to clone, lock-free to bump.
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Sets the value (for gauges).
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

type Key = (&'static str, Vec<(String, String)>);

struct Family {
    help: &'static str,
    kind: &'static str,
}

/// A registry of counters and gauges.
#[derive(Default)]
pub struct Metrics {
    values: Mutex<BTreeMap<Key, Counter>>,
    families: Mutex<BTreeMap<&'static str, Family>>,
}

impl Metrics {
    /// A new, empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The counter `name{labels}`, created at zero on first use.
    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
    ) -> Counter {
        self.get_or_create(name, help, "counter", labels)
    }

    /// The gauge `name{labels}`, created at zero on first use.
    pub fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
    ) -> Counter {
        self.get_or_create(name, help, "gauge", labels)
    }

    fn get_or_create(
        &self,
        name: &'static str,
        help: &'static str,
        kind: &'static str,
        labels: &[(&str, &str)],
    ) -> Counter {
        if let Ok(mut families) = self.families.lock() {
            families.entry(name).or_insert(Family { help, kind });
        }
        let key = (
            name,
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        match self.values.lock() {
            Ok(mut values) => values.entry(key).or_default().clone(),
            // A poisoned lock only means another thread panicked mid-insert; counting on a
            // detached counter is better than taking the daemon down.
            Err(_) => Counter::default(),
        }
    }

    /// Sum of every series of `name` (all label values).
    pub fn total(&self, name: &str) -> u64 {
        self.values
            .lock()
            .map(|values| {
                values
                    .iter()
                    .filter(|((n, _), _)| *n == name)
                    .map(|(_, c)| c.get())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The value of `name` with exactly these labels, or 0.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.values
            .lock()
            .ok()
            .and_then(|values| {
                values
                    .iter()
                    .find(|((n, l), _)| *n == name && *l == labels)
                    .map(|(_, c)| c.get())
            })
            .unwrap_or(0)
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let families = match self.families.lock() {
            Ok(f) => f,
            Err(_) => return out,
        };
        let values = match self.values.lock() {
            Ok(v) => v,
            Err(_) => return out,
        };
        let mut last = "";
        for ((name, labels), counter) in values.iter() {
            if *name != last {
                if let Some(family) = families.get(name) {
                    let _ = writeln!(out, "# HELP {name} {}", family.help);
                    let _ = writeln!(out, "# TYPE {name} {}", family.kind);
                }
                last = name;
            }
            let _ = write!(out, "{name}");
            if !labels.is_empty() {
                let rendered: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                    .collect();
                let _ = write!(out, "{{{}}}", rendered.join(","));
            }
            let _ = writeln!(out, " {}", counter.get());
        }
        out
    }

    /// One line summarising the non-zero series, for periodic logs.
    pub fn summary(&self) -> String {
        let values = match self.values.lock() {
            Ok(v) => v,
            Err(_) => return String::new(),
        };
        let mut parts = Vec::new();
        for ((name, labels), counter) in values.iter() {
            let value = counter.get();
            if value == 0 {
                continue;
            }
            let short = name.trim_start_matches("stagecoach_");
            let label_text: Vec<&str> = labels.iter().map(|(_, v)| v.as_str()).collect();
            if label_text.is_empty() {
                parts.push(format!("{short}={value}"));
            } else {
                parts.push(format!("{short}[{}]={value}", label_text.join(",")));
            }
        }
        parts.join(" ")
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `metrics` as Prometheus text on `addr` until the runtime stops. Returns the bound
/// address (pass port 0 to pick a free one).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (mut socket, peer) = match listener.accept().await {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut head = vec![0u8; MAX_HTTP_REQUEST_BYTES];
                let read = tokio::time::timeout(HTTP_READ_TIMEOUT, socket.read(&mut head)).await;
                if !matches!(read, Ok(Ok(n)) if n > 0) {
                    tracing::debug!(%peer, "metrics client sent no request");
                    return;
                }
                let body = metrics.render();
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    body.len(),
                    body
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    Ok(local)
}

/// Logs [`Metrics::summary`] every `every` until the runtime stops.
pub fn spawn_log_summary(metrics: Arc<Metrics>, every: Duration, daemon: &'static str) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let summary = metrics.summary();
            if !summary.is_empty() {
                tracing::info!(daemon, metrics = %summary, "metrics summary");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_labels() {
        let metrics = Metrics::new();
        metrics
            .counter(
                "stagecoach_bytes_sent_total",
                "Bytes sent",
                &[("peer_role", "edge")],
            )
            .add(42);
        metrics
            .counter(
                "stagecoach_bytes_sent_total",
                "Bytes sent",
                &[("peer_role", "stager")],
            )
            .add(8);
        let text = metrics.render();
        assert!(text.contains("# TYPE stagecoach_bytes_sent_total counter"));
        assert!(text.contains("stagecoach_bytes_sent_total{peer_role=\"edge\"} 42"));
        assert_eq!(metrics.total("stagecoach_bytes_sent_total"), 50);
        assert_eq!(
            metrics.value("stagecoach_bytes_sent_total", &[("peer_role", "stager")]),
            8
        );
    }

    #[tokio::test]
    async fn serves_over_http() {
        let metrics = Metrics::new();
        metrics
            .counter("stagecoach_requests_total", "Requests", &[])
            .add(3);
        let addr = serve("127.0.0.1:0".parse().expect("addr"), metrics)
            .await
            .expect("bind");
        let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
        socket
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut response = String::new();
        socket.read_to_string(&mut response).await.expect("read");
        assert!(response.starts_with("HTTP/1.1 200 OK"));
        assert!(response.contains("stagecoach_requests_total 3"));
    }
}
