//! Counters and gauges every daemon keeps, encoded by `prometheus-client` and served over HTTP
//! by axum, with a health endpoint beside them.
//!
//! Deliberately small: counters and gauges keyed by name and labels, no histograms. The
//! registry is `prometheus-client`'s; this module adds what the daemons need around it: series
//! created on first use with labels known only at run time, cheap cloneable handles, and
//! [`Metrics::total`]/[`Metrics::value`]/[`Metrics::summary`] for logs and tests.
//!
//! HTTP: [`router`] answers `GET /metrics` (the Prometheus text format, version 0.0.4) and
//! `GET /healthz`; any other path is 404 and any other method 405. A server that serves more
//! (the origin's console) merges its own routes into that router and passes the result to
//! [`serve_router`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter as CounterSeries;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge as GaugeSeries;
use prometheus_client::registry::Registry;

/// The path of the Prometheus text exposition.
pub const METRICS_PATH: &str = "/metrics";

/// The path of the health endpoint: `200 ok` while the daemon's runtime answers.
pub const HEALTH_PATH: &str = "/healthz";

/// The suffix the text encoding appends to every counter's name.
const COUNTER_SUFFIX: &str = "_total";

/// Label pairs of one series, in the order the caller gave them.
type Labels = Vec<(String, String)>;

/// One gauge series: a `u64` that can go up and down.
type Gauge = GaugeSeries<u64, AtomicU64>;

/// A handle to one counter or gauge series; cheap to clone, lock-free to bump.
#[derive(Clone, Debug)]
pub struct Counter(Series);

#[derive(Clone, Debug)]
enum Series {
    Counter(CounterSeries<u64>),
    Gauge(Gauge),
}

impl Default for Counter {
    /// A series registered nowhere: it counts, and nothing reads it.
    fn default() -> Self {
        Counter(Series::Gauge(Gauge::default()))
    }
}

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        match &self.0 {
            Series::Counter(c) => {
                c.inc_by(n);
            }
            Series::Gauge(g) => {
                g.inc_by(n);
            }
        }
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Sets the value (for gauges; on a counter it must not go down, or rates break).
    pub fn set(&self, n: u64) {
        match &self.0 {
            Series::Counter(c) => {
                c.inner().store(n, std::sync::atomic::Ordering::Relaxed);
            }
            Series::Gauge(g) => {
                g.set(n);
            }
        }
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        match &self.0 {
            Series::Counter(c) => c.get(),
            Series::Gauge(g) => g.get(),
        }
    }
}

/// What kind of series a metric name holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// A registered family: every series of one name.
enum FamilyHandle {
    Counter(Family<Labels, CounterSeries<u64>>),
    Gauge(Family<Labels, Gauge>),
}

impl FamilyHandle {
    fn kind(&self) -> Kind {
        match self {
            FamilyHandle::Counter(_) => Kind::Counter,
            FamilyHandle::Gauge(_) => Kind::Gauge,
        }
    }

    fn series(&self, labels: &Labels) -> Counter {
        match self {
            FamilyHandle::Counter(f) => Counter(Series::Counter(f.get_or_create_owned(labels))),
            FamilyHandle::Gauge(f) => Counter(Series::Gauge(f.get_or_create_owned(labels))),
        }
    }
}

/// Every series created so far, for lookups the encoder does not offer.
#[derive(Default)]
struct Index {
    families: BTreeMap<&'static str, FamilyHandle>,
    series: BTreeMap<(&'static str, Labels), Counter>,
}

/// A registry of counters and gauges.
#[derive(Default)]
pub struct Metrics {
    registry: Mutex<Registry>,
    index: Mutex<Index>,
}

impl Metrics {
    /// A new, empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The counter `name{labels}`, created at zero on first use. `name` ends in `_total`, as
    /// the text encoding of a counter does.
    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
    ) -> Counter {
        self.get_or_create(name, help, Kind::Counter, labels)
    }

    /// The gauge `name{labels}`, created at zero on first use.
    pub fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
    ) -> Counter {
        self.get_or_create(name, help, Kind::Gauge, labels)
    }

    fn get_or_create(
        &self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        labels: &[(&str, &str)],
    ) -> Counter {
        let labels = owned(labels);
        let mut index = match self.index.lock() {
            Ok(index) => index,
            // A poisoned lock only means another thread panicked mid-insert; counting on a
            // detached series is better than taking the daemon down.
            Err(_) => return Counter::default(),
        };
        let key = (name, labels);
        if let Some(series) = index.series.get(&key) {
            return series.clone();
        }
        if !index.families.contains_key(name) {
            let Some(family) = self.register(name, help, kind) else {
                return Counter::default();
            };
            index.families.insert(name, family);
        }
        let Some(family) = index.families.get(name) else {
            return Counter::default();
        };
        if family.kind() != kind {
            tracing::warn!(
                metric = name,
                "metric asked as both counter and gauge; this series is not exported"
            );
            return Counter::default();
        }
        let series = family.series(&key.1);
        index.series.insert(key, series.clone());
        series
    }

    /// Registers the family `name` with the encoder; `None` when the registry is poisoned or
    /// a counter's name lacks the `_total` the encoding would append.
    fn register(&self, name: &'static str, help: &'static str, kind: Kind) -> Option<FamilyHandle> {
        let mut registry = self.registry.lock().ok()?;
        Some(match kind {
            Kind::Counter => {
                let Some(base) = name.strip_suffix(COUNTER_SUFFIX) else {
                    tracing::warn!(
                        metric = name,
                        "counter name does not end in _total; the series is not exported"
                    );
                    return None;
                };
                let family = Family::<Labels, CounterSeries<u64>>::default();
                registry.register(base, help, family.clone());
                FamilyHandle::Counter(family)
            }
            Kind::Gauge => {
                let family = Family::<Labels, Gauge>::default();
                registry.register(name, help, family.clone());
                FamilyHandle::Gauge(family)
            }
        })
    }

    /// Sum of every series of `name` (all label values).
    pub fn total(&self, name: &str) -> u64 {
        self.index
            .lock()
            .map(|index| {
                index
                    .series
                    .iter()
                    .filter(|((n, _), _)| *n == name)
                    .map(|(_, c)| c.get())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Sum of the series of `name` whose label `key` is `value` (whatever their other labels).
    pub fn total_where(&self, name: &str, key: &str, value: &str) -> u64 {
        self.index
            .lock()
            .map(|index| {
                index
                    .series
                    .iter()
                    .filter(|((n, labels), _)| {
                        *n == name && labels.iter().any(|(k, v)| k == key && v == value)
                    })
                    .map(|(_, c)| c.get())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The value of `name` with exactly these labels, or 0.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let labels = owned(labels);
        self.index
            .lock()
            .ok()
            .and_then(|index| {
                index
                    .series
                    .iter()
                    .find(|((n, l), _)| *n == name && *l == labels)
                    .map(|(_, c)| c.get())
            })
            .unwrap_or(0)
    }

    /// The Prometheus text exposition (version 0.0.4) of every series.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(registry) = self.registry.lock() else {
            return out;
        };
        if let Err(error) = prometheus_text::encode(&mut out, &registry) {
            // Writing to a String cannot fail; an encoder error is a bug worth a log line.
            tracing::warn!(%error, "cannot encode metrics");
        }
        out
    }

    /// One line summarising the non-zero series, for periodic logs.
    pub fn summary(&self) -> String {
        let Ok(index) = self.index.lock() else {
            return String::new();
        };
        let mut parts = Vec::new();
        for ((name, labels), counter) in index.series.iter() {
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

fn owned(labels: &[(&str, &str)]) -> Labels {
    labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The routes every daemon serves: `GET /metrics` (Prometheus text) and `GET /healthz`.
/// Unknown paths answer 404 and other methods 405. Merge more routes into it with
/// [`Router::merge`] to serve them on the same address.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(METRICS_PATH, get(metrics_page))
        .route(HEALTH_PATH, get(health))
        .with_state(metrics)
}

async fn metrics_page(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        metrics.render(),
    )
}

async fn health() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "ok\n",
    )
}

/// Serves [`router`] of `metrics` on `addr` until the runtime stops. Returns the bound address
/// (pass port 0 to pick a free one).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    serve_router(addr, router(metrics)).await
}

/// How long an HTTP client may take to send a request's headers, and stay idle between two
/// requests on one connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP connections served at once by one server; more wait in the listener's backlog.
pub const MAX_HTTP_CONNECTIONS: usize = 256;

/// Serves `router` on `addr` until the runtime stops, giving handlers the client's address as
/// `ConnectInfo<SocketAddr>`. At most [`MAX_HTTP_CONNECTIONS`] at once, each closed when its
/// client takes longer than [`HEADER_READ_TIMEOUT`] to send a request. Returns the bound
/// address (pass port 0 to pick a free one).
pub async fn serve_router(addr: SocketAddr, router: Router) -> std::io::Result<SocketAddr> {
    serve_router_with(addr, router, |stream, _peer| async move { Some(stream) }).await
}

/// Like [`serve_router`], with each accepted connection passed through `wrap` first (a TLS
/// handshake, say) in its own task; a connection `wrap` answers `None` for is dropped (`wrap`
/// logs why). The bound and the header timeout hold for wrapped connections too.
pub async fn serve_router_with<W, F, Io>(
    addr: SocketAddr,
    router: Router,
    wrap: W,
) -> std::io::Result<SocketAddr>
where
    W: Fn(tokio::net::TcpStream, SocketAddr) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Option<Io>> + Send + 'static,
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(accept_loop(listener, router, wrap));
    Ok(local)
}

async fn accept_loop<W, F, Io>(listener: tokio::net::TcpListener, router: Router, wrap: W)
where
    W: Fn(tokio::net::TcpStream, SocketAddr) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Option<Io>> + Send + 'static,
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let Ok(permit) = connections.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(%error, "HTTP listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = router
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        let wrapped = wrap(stream, peer);
        let http = http.clone();
        tokio::spawn(async move {
            let Some(io) = wrapped.await else {
                return;
            };
            let connection = http.serve_connection(
                hyper_util::rt::TokioIo::new(io),
                hyper_util::service::TowerToHyperService::new(service),
            );
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "HTTP connection ended");
            }
            drop(permit);
        });
    }
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn encodes_counters_and_gauges_with_labels() {
        let metrics = Metrics::new();
        metrics
            .counter(
                "stagecoach_bytes_sent_total",
                "Bytes sent",
                &[("peer_role", "edge"), ("peer_site", "a")],
            )
            .add(42);
        metrics
            .counter(
                "stagecoach_bytes_sent_total",
                "Bytes sent",
                &[("peer_role", "stager"), ("peer_site", "a")],
            )
            .add(8);
        metrics
            .counter("stagecoach_requests_total", "Requests", &[])
            .inc();
        let gauge = metrics.gauge(
            "stagecoach_store_bytes",
            "Bytes stored",
            &[("area", "main")],
        );
        gauge.set(10);
        gauge.set(7);
        let text = metrics.render();
        assert!(
            text.contains("# TYPE stagecoach_bytes_sent_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# HELP stagecoach_bytes_sent_total Bytes sent"),
            "{text}"
        );
        assert!(
            text.contains("stagecoach_bytes_sent_total{peer_role=\"edge\",peer_site=\"a\"} 42\n"),
            "{text}"
        );
        assert!(text.contains("stagecoach_requests_total 1\n"), "{text}");
        assert!(
            text.contains("# TYPE stagecoach_store_bytes gauge"),
            "{text}"
        );
        assert!(
            text.contains("stagecoach_store_bytes{area=\"main\"} 7\n"),
            "{text}"
        );
        assert_eq!(metrics.total("stagecoach_bytes_sent_total"), 50);
        assert_eq!(
            metrics.value(
                "stagecoach_bytes_sent_total",
                &[("peer_role", "stager"), ("peer_site", "a")]
            ),
            8
        );
        assert_eq!(
            metrics.value("stagecoach_store_bytes", &[("area", "main")]),
            7
        );
    }

    #[test]
    fn one_series_per_name_and_labels() {
        let metrics = Metrics::new();
        let first = metrics.counter("stagecoach_x_total", "X", &[("k", "v")]);
        let second = metrics.counter("stagecoach_x_total", "X", &[("k", "v")]);
        first.add(2);
        second.add(3);
        assert_eq!(first.get(), 5);
        assert_eq!(metrics.total("stagecoach_x_total"), 5);
        assert_eq!(metrics.summary(), "x_total[v]=5");
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::new();
        metrics
            .counter("stagecoach_y_total", "Y", &[("site", "a\"b\\c\nd")])
            .inc();
        let text = metrics.render();
        assert!(
            text.contains("stagecoach_y_total{site=\"a\\\"b\\\\c\\nd\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn mismatched_kinds_and_names_never_panic() {
        let metrics = Metrics::new();
        metrics.counter("stagecoach_z_total", "Z", &[]).inc();
        // The same name as a gauge, and a counter without `_total`: detached, not exported.
        metrics
            .gauge("stagecoach_z_total", "Z", &[("k", "v")])
            .set(9);
        metrics.counter("stagecoach_no_suffix", "N", &[]).add(4);
        let text = metrics.render();
        assert!(text.contains("stagecoach_z_total 1\n"), "{text}");
        assert!(!text.contains("k=\"v\""), "{text}");
        assert!(!text.contains("no_suffix"), "{text}");
    }

    /// Sends one raw HTTP/1.1 request and returns the status line and the body.
    async fn raw_request(addr: SocketAddr, request: &str) -> (String, String) {
        let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
        socket.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        socket.read_to_string(&mut response).await.expect("read");
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or((response.as_str(), ""));
        let status = head.lines().next().unwrap_or_default().to_owned();
        (status, body.to_owned())
    }

    #[tokio::test]
    async fn serves_metrics_health_and_refuses_the_rest() {
        let metrics = Metrics::new();
        metrics
            .counter("stagecoach_requests_total", "Requests", &[])
            .add(3);
        let addr = serve("127.0.0.1:0".parse().expect("addr"), metrics)
            .await
            .expect("bind");
        let close = "Host: localhost\r\nConnection: close\r\n\r\n";
        let (status, body) = raw_request(addr, &format!("GET /metrics HTTP/1.1\r\n{close}")).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.contains("stagecoach_requests_total 3"), "{body}");
        let (status, body) = raw_request(addr, &format!("GET /healthz HTTP/1.1\r\n{close}")).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, "ok\n");
        let (status, _) = raw_request(addr, &format!("GET /nothing HTTP/1.1\r\n{close}")).await;
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        let (status, _) = raw_request(
            addr,
            &format!("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n{close}"),
        )
        .await;
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
        let (status, _) = raw_request(addr, "NOT HTTP AT ALL\r\n\r\n").await;
        assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    }
}
