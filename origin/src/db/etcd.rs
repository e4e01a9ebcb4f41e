//! The shared backend: an etcd cluster that several origins use at once
//! (`origin serve --store etcd://HOST:PORT,HOST:PORT,.../PREFIX`).
//!
//! Layout, under the prefix (default `stagecoach`): `PREFIX/t/TABLE/KEY` holds the value of
//! `KEY` in `TABLE`, and `PREFIX/meta/changes` the change counter: the last audit sequence
//! number (8 bytes, big-endian). Every change is one etcd transaction that compares the
//! counter's mod revision with the one its token read, then writes the records, the audit
//! record and the counter. So a change commits only if no other change (from any origin)
//! committed since it began reading, and audit sequence numbers follow commit order with no
//! gap and no duplicate. Every request asks for a leader (`require_leader`): a cluster that
//! lost its quorum refuses at once with a clear error instead of answering from a stale member.
//!
//! The store's API is synchronous (RocksDB's is); requests run on a small runtime of this
//! backend's own and the caller's thread waits for the answer, as it waits on a RocksDB write.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KvClient,
    PutOptions, SortOrder, SortTarget, TlsOptions, Txn, TxnOp,
};

use super::{Backend, DbError, Entries, Leadership, Token, Write, Written, LIVE_TTL};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "stagecoach";

/// How long one request may take before it fails (a member that does not answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection to a member may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Entries read per request of a scan (a node record with its inventory is a few KiB).
const SCAN_PAGE: i64 = 256;

/// Largest answer read (a page of records, a large policy).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Where the etcd cluster is and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `HOST:PORT` of each member given.
    pub endpoints: Vec<String>,
    /// The key prefix of this fleet's records (several fleets may share a cluster).
    pub prefix: String,
    /// TLS to etcd (`--etcd-ca`, `--etcd-cert`, `--etcd-key`); plain HTTP/2 when `None`.
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd: the CA that issued the members' certificates and, for mutual TLS, this
/// origin's client certificate and key (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    /// The members' CA.
    pub ca: PathBuf,
    /// The client certificate and key, for clusters that ask for one.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl EtcdConfig {
    /// Parses what follows `etcd://`: `HOST:PORT[,HOST:PORT...][/PREFIX]`.
    pub fn parse(text: &str) -> Result<Self, DbError> {
        let (hosts, prefix) = match text.split_once('/') {
            Some((hosts, prefix)) => (hosts, prefix.trim_matches('/')),
            None => (text, DEFAULT_PREFIX),
        };
        let bad = |why: String| DbError::BadStore(format!("`etcd://{text}`: {why}"));
        let mut endpoints = Vec::new();
        for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            let Some((name, port)) = host.rsplit_once(':') else {
                return Err(bad(format!(
                    "`{host}` has no port (HOST:PORT, etcd's is 2379)"
                )));
            };
            if name.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad(format!("`{host}` is not HOST:PORT")));
            }
            endpoints.push(host.to_owned());
        }
        if endpoints.is_empty() {
            return Err(bad("no member named".into()));
        }
        if prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(format!("`{prefix}` is not a key prefix")));
        }
        Ok(Self {
            endpoints,
            prefix: prefix.to_owned(),
            tls: None,
        })
    }

    /// With TLS to the members.
    pub fn with_tls(mut self, tls: EtcdTls) -> Self {
        self.tls = Some(tls);
        self
    }

    fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect()
    }
}

impl std::fmt::Display for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "etcd at {} (prefix {}{})",
            self.endpoints.join(","),
            self.prefix,
            if self.tls.is_some() { ", TLS" } else { "" }
        )
    }
}

/// This process's announcements (full key → value), shared with the task that keeps them.
type Announced = Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>>;

/// A connection to the cluster.
pub struct EtcdBackend {
    client: Client,
    config: EtcdConfig,
    /// Runs the client's requests; shut down in the background on drop (a runtime may not be
    /// dropped from inside another's async context).
    runtime: Option<tokio::runtime::Runtime>,
    /// The lease announcements are put under (granted at the first one; the keep-alive task
    /// replaces it when it was lost) and that task.
    lease: Mutex<Option<(Arc<AtomicI64>, tokio::task::JoinHandle<()>)>>,
    /// The announcements, put again under a new lease when the old one was lost.
    announced: Announced,
}

impl EtcdBackend {
    /// Connects to the cluster and reads the change counter once, so a cluster that cannot
    /// be reached or has no leader is an error here.
    pub fn connect(config: &EtcdConfig) -> Result<Self, DbError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(|e| DbError::Etcd {
                op: "start",
                message: format!("cannot start the client's runtime: {e}"),
            })?;
        let options = connect_options(config)?;
        let urls = config.urls();
        let described = config.to_string();
        // Not `block_on`: the caller may itself run inside a runtime (`origin serve`).
        let client = wait_on(&runtime, CONNECT_TIMEOUT + REQUEST_TIMEOUT, async move {
            Client::connect(urls, Some(options)).await
        })
        .ok_or_else(|| DbError::Etcd {
            op: "connect",
            message: format!("{described}: no member answered within {CONNECT_TIMEOUT:?}"),
        })?
        .map_err(|e| etcd_error("connect", config, e))?;
        let backend = Self {
            client,
            config: config.clone(),
            runtime: Some(runtime),
            lease: Mutex::new(None),
            announced: Arc::default(),
        };
        backend.begin()?;
        Ok(backend)
    }

    /// Runs the request `make` builds on the backend's runtime and waits for it on this thread.
    /// A request that never left this process (no connection to the member the client picked,
    /// for example one that was down a moment ago) is sent again, within the same deadline.
    fn run<T, F, Fut>(&self, op: &'static str, make: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        self.run_with(op, true, make)
    }

    /// [`Self::run`]; with `resend` false, a request that was not sent fails at once (asking
    /// one member whether it is up: "down" is the answer).
    fn run_with<T, F, Fut>(&self, op: &'static str, resend: bool, make: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let Some(runtime) = &self.runtime else {
            return Err(DbError::Etcd {
                op,
                message: "the client is shut down".into(),
            });
        };
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut pause = Duration::from_millis(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match wait_on(runtime, left, make()) {
                Some(Ok(value)) => return Ok(value),
                Some(Err(error))
                    if resend
                        && (never_sent(&error) || (op != "write" && leader_changed(&error)))
                        && Instant::now() + pause < deadline =>
                {
                    tracing::debug!(op, %error, "etcd request not sent; trying again");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Some(Err(error)) => return Err(etcd_error(op, &self.config, error)),
                None => {
                    return Err(DbError::Etcd {
                        op,
                        message: format!(
                            "{}: no answer within {REQUEST_TIMEOUT:?}: members down, or no quorum?{}",
                            self.config,
                            if op == "write" {
                                " The change may still be applied, whole, once the cluster recovers: the audit log will show it"
                            } else {
                                ""
                            }
                        ),
                    });
                }
            }
        }
    }

    fn kv(&self) -> KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn table_prefix(&self, table: &str) -> Vec<u8> {
        format!("{}/t/{table}/", self.config.prefix).into_bytes()
    }

    fn key(&self, table: &str, key: &[u8]) -> Vec<u8> {
        let mut full = self.table_prefix(table);
        full.extend_from_slice(key);
        full
    }

    fn election_name(&self, name: &str) -> Vec<u8> {
        format!("{}/election/{name}", self.config.prefix).into_bytes()
    }

    fn counter_key(&self) -> Vec<u8> {
        format!("{}/meta/changes", self.config.prefix).into_bytes()
    }

    fn live_prefix(&self) -> Vec<u8> {
        format!("{}/live/", self.config.prefix).into_bytes()
    }

    /// The lease announcements are put under now: granted at the first announcement, and kept
    /// alive by a task that grants a new one (and puts every announcement again) when it was
    /// lost, say after the cluster was without quorum for longer than its time to live.
    fn lease(&self) -> Result<i64, DbError> {
        let mut slot = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((current, _)) = slot.as_ref() {
            return Ok(current.load(Ordering::Acquire));
        }
        let Some(runtime) = &self.runtime else {
            return Err(DbError::Etcd {
                op: "grant a lease",
                message: "the client is shut down".into(),
            });
        };
        let client = self.client.clone();
        let id = self.run("grant a lease", || grant(client.clone()))?;
        let current = Arc::new(AtomicI64::new(id));
        let task = runtime.spawn(keep_announcing(
            self.client.clone(),
            current.clone(),
            self.announced.clone(),
        ));
        *slot = Some((current, task));
        Ok(id)
    }

    /// Puts `entries` under `lease`, in transactions of at most [`ANNOUNCE_BATCH`] puts.
    fn put_leased(&self, entries: &[(Vec<u8>, Vec<u8>)], lease: i64) -> Result<(), DbError> {
        for batch in entries.chunks(ANNOUNCE_BATCH) {
            let kv = self.kv();
            self.run("announce", || {
                let (mut kv, txn) = (kv.clone(), leased_puts(batch, lease));
                async move { kv.txn(txn).await.map(|_| ()) }
            })?;
        }
        Ok(())
    }
}

/// Puts per announcement transaction (below etcd's default --max-txn-ops of 128).
const ANNOUNCE_BATCH: usize = 100;

/// A transaction that puts `entries` under `lease`.
fn leased_puts(entries: &[(Vec<u8>, Vec<u8>)], lease: i64) -> Txn {
    Txn::new().and_then(
        entries
            .iter()
            .map(|(key, value)| {
                TxnOp::put(
                    key.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
            })
            .collect::<Vec<_>>(),
    )
}

/// A new lease of [`LIVE_TTL`].
async fn grant(mut client: Client) -> Result<i64, etcd_client::Error> {
    Ok(client
        .lease_grant(LIVE_TTL.as_secs() as i64, None)
        .await?
        .id())
}

/// Keeps the lease in `current` alive; when it is lost, grants another, puts the announcements
/// again under it and stores its id in `current`, until the backend's runtime stops.
async fn keep_announcing(mut client: Client, current: Arc<AtomicI64>, announced: Announced) {
    let beat = LIVE_TTL / 3;
    loop {
        let id = current.load(Ordering::Acquire);
        let kept = async {
            let (mut keeper, mut answers) = client.lease_keep_alive(id).await?;
            loop {
                tokio::time::sleep(beat).await;
                keeper.keep_alive().await?;
                match answers.message().await? {
                    Some(answer) if answer.ttl() > 0 => {}
                    _ => return Ok::<(), etcd_client::Error>(()),
                }
            }
        }
        .await;
        tracing::warn!(lease = id, outcome = ?kept, "etcd lease of this origin's announcements lost; announcing again");
        loop {
            tokio::time::sleep(beat).await;
            let again = async {
                let lease = grant(client.clone()).await?;
                let entries: Vec<(Vec<u8>, Vec<u8>)> = announced
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                for batch in entries.chunks(ANNOUNCE_BATCH) {
                    client.txn(leased_puts(batch, lease)).await?;
                }
                Ok::<i64, etcd_client::Error>(lease)
            }
            .await;
            match again {
                Ok(lease) => {
                    current.store(lease, Ordering::Release);
                    break;
                }
                Err(error) => tracing::warn!(%error, "cannot announce this origin again yet"),
            }
        }
    }
}

/// Runs `future` on `runtime` and waits on this thread for its output, for at most `timeout`
/// (`None` when it did not finish in time, or the runtime stopped).
fn wait_on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    timeout: Duration,
    future: impl Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        if let Ok(output) = tokio::time::timeout(timeout, future).await {
            let _ = tx.send(output);
        }
    });
    rx.recv().ok()
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        let lease = self.lease.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let (Some((current, task)), Some(runtime)) = (lease, &self.runtime) {
            task.abort();
            let id = current.load(Ordering::Acquire);
            // The announcements go at once instead of after the lease's time to live.
            let mut client = self.client.clone();
            let _ = wait_on(runtime, Duration::from_secs(1), async move {
                client.lease_revoke(id).await
            });
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions, DbError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_require_leader(true);
    if let Some(tls) = &config.tls {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| DbError::Etcd {
                op: "read TLS files",
                message: format!("{}: {e}", path.display()),
            })
        };
        let mut tls_options =
            TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
        if let Some((cert, key)) = &tls.client {
            tls_options = tls_options.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls_options);
    }
    Ok(options)
}

/// Whether the request failed before it reached any member (the client had no connection to
/// the member it picked), so sending it again cannot apply a change twice.
fn never_sent(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => status.message().contains("connect error"),
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

/// The member dropped the request because the cluster was electing a new leader: a read (or
/// any request but a change, which might have committed) is sent again.
fn leader_changed(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if status.message().contains("leader changed"))
}

/// etcd's error, with what an operator can do about the common ones.
fn etcd_error(op: &'static str, config: &EtcdConfig, error: etcd_client::Error) -> DbError {
    let text = error.to_string();
    let hint = if text.contains("no leader") {
        ": the cluster has no leader (fewer than a quorum of its members are up?); changes are refused until it has one"
    } else if text.contains("too many operations in txn") {
        ": one change writes more records than the cluster allows in a transaction (raise etcd's --max-txn-ops)"
    } else if text.contains("request is too large") {
        ": one change is larger than the cluster accepts (raise etcd's --max-request-bytes)"
    } else if text.contains("Timeout expired")
        || text.contains("transport")
        || text.contains("connect")
        || text.contains("Unavailable")
    {
        ": no answer from the cluster: members down, or fewer than a quorum of them up? (is the address right?)"
    } else {
        ""
    };
    let unsure = if op == "write" && text.contains("Timeout expired") {
        ". The change may still be applied, whole, once the cluster recovers: the audit log will show it"
    } else {
        ""
    };
    DbError::Etcd {
        op,
        message: format!("{config}: {text}{hint}{unsure}"),
    }
}

/// The key just past every key that starts with `prefix` (its last byte is never 0xff here:
/// table prefixes end in `/`).
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Backend for EtcdBackend {
    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        let kv = self.kv();
        let key = self.key(table, key);
        self.run("read", || {
            let (mut kv, key) = (kv.clone(), key.clone());
            async move {
                let mut response = kv.get(key, None).await?;
                Ok(response
                    .take_kvs()
                    .into_iter()
                    .next()
                    .map(|kv| kv.into_key_value().1))
            }
        })
    }

    fn scan(
        &self,
        table: &'static str,
        newest_first: bool,
        limit: usize,
    ) -> Result<Entries, DbError> {
        let prefix = self.table_prefix(table);
        let mut start = prefix.clone();
        let mut end = range_end(&prefix);
        let mut out = Vec::new();
        // Every page reads the revision the first one saw: one consistent listing.
        let mut revision = 0;
        while out.len() < limit {
            let page = SCAN_PAGE.min(i64::try_from(limit - out.len()).unwrap_or(SCAN_PAGE));
            let order = if newest_first {
                SortOrder::Descend
            } else {
                SortOrder::Ascend
            };
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(page)
                .with_sort(SortTarget::Key, order);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let kv = self.kv();
            let mut response = self.run("scan", || {
                let (mut kv, from, options) = (kv.clone(), start.clone(), options.clone());
                async move { kv.get(from, Some(options)).await }
            })?;
            if revision == 0 {
                revision = response.header().map_or(0, |h| h.revision());
            }
            let kvs = response.take_kvs();
            let more = response.more();
            let fetched = kvs.len();
            for kv in kvs {
                let (key, value) = kv.into_key_value();
                if newest_first {
                    end.clone_from(&key);
                } else {
                    start.clone_from(&key);
                    start.push(0);
                }
                out.push((key[prefix.len()..].to_vec(), value));
            }
            if !more || fetched == 0 {
                break;
            }
        }
        Ok(out)
    }

    fn begin(&self) -> Result<Token, DbError> {
        let kv = self.kv();
        let key = self.counter_key();
        let found = self.run("read the change counter", || {
            let (mut kv, key) = (kv.clone(), key.clone());
            async move {
                let mut response = kv.get(key, None).await?;
                Ok(response.take_kvs().into_iter().next())
            }
        })?;
        let Some(found) = found else {
            return Ok(Token {
                revision: 0,
                last_audit: 0,
            });
        };
        let revision = found.mod_revision();
        let bytes: [u8; 8] = found.value().try_into().map_err(|_| DbError::Corrupt {
            table: "meta",
            key: "changes".into(),
            why: format!("the change counter is {} bytes, not 8", found.value().len()),
        })?;
        Ok(Token {
            revision,
            last_audit: u64::from_be_bytes(bytes),
        })
    }

    fn write(
        &self,
        token: Token,
        writes: &[Write],
        audit: Option<(u64, &[u8])>,
    ) -> Result<Written, DbError> {
        let counter = self.counter_key();
        let mut ops: Vec<TxnOp> = writes
            .iter()
            .map(|write| match write {
                Write::Put { table, key, value } => {
                    TxnOp::put(self.key(table, key), value.clone(), None)
                }
                Write::Delete { table, key } => TxnOp::delete(self.key(table, key), None),
            })
            .collect();
        let last_audit = match audit {
            Some((seq, value)) => {
                ops.push(TxnOp::put(
                    self.key(super::AUDIT, &seq.to_be_bytes()),
                    value.to_vec(),
                    None,
                ));
                seq
            }
            None => token.last_audit,
        };
        ops.push(TxnOp::put(
            counter.clone(),
            last_audit.to_be_bytes().to_vec(),
            None,
        ));
        let txn = Txn::new()
            .when([Compare::mod_revision(
                counter,
                CompareOp::Equal,
                token.revision,
            )])
            .and_then(ops);
        let kv = self.kv();
        let response = self.run("write", || {
            let (mut kv, txn) = (kv.clone(), txn.clone());
            async move { kv.txn(txn).await }
        })?;
        Ok(if response.succeeded() {
            Written::Committed
        } else {
            Written::Conflict
        })
    }

    fn announce(&self, entries: &[(String, Vec<u8>)]) -> Result<(), DbError> {
        let prefix = self.live_prefix();
        let full: Vec<(Vec<u8>, Vec<u8>)> = entries
            .iter()
            .map(|(key, value)| ([prefix.as_slice(), key.as_bytes()].concat(), value.clone()))
            .collect();
        self.announced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(full.iter().cloned());
        let lease = self.lease()?;
        self.put_leased(&full, lease)
    }

    fn live(&self) -> Result<Entries, DbError> {
        let prefix = self.live_prefix();
        let kv = self.kv();
        let found = self.run("read the live origins", || {
            let (mut kv, prefix) = (kv.clone(), prefix.clone());
            async move {
                let options = GetOptions::new().with_range(range_end(&prefix));
                let mut response = kv.get(prefix, Some(options)).await?;
                Ok(response.take_kvs())
            }
        })?;
        Ok(found
            .into_iter()
            .map(|kv| {
                let (key, value) = kv.into_key_value();
                (key[prefix.len()..].to_vec(), value)
            })
            .collect())
    }

    fn campaign(
        &self,
        name: &str,
        value: &[u8],
        wait: Duration,
    ) -> Result<Option<Leadership>, DbError> {
        let lease = self.lease()?;
        let Some(runtime) = &self.runtime else {
            return Err(DbError::Etcd {
                op: "campaign",
                message: "the client is shut down".into(),
            });
        };
        let mut election = self.client.election_client();
        let (name, value) = (self.election_name(name), value.to_vec());
        // etcd withdraws the candidacy of a campaign given up (its key is deleted), so one
        // that waited `wait` in vain leaves nothing behind; the next campaigns again.
        match wait_on(runtime, wait, async move {
            election.campaign(name, value, lease).await
        }) {
            None => Ok(None),
            Some(Ok(response)) => Ok(response.leader().map(|leader| Leadership {
                key: leader.key().to_vec(),
            })),
            Some(Err(error)) => Err(etcd_error("campaign", &self.config, error)),
        }
    }

    fn leader(&self, name: &str) -> Result<Option<(Leadership, Vec<u8>)>, DbError> {
        let election = self.client.election_client();
        let name = self.election_name(name);
        let answer = self.run("ask who leads", || {
            let (mut election, name) = (election.clone(), name.clone());
            async move {
                match election.leader(name).await {
                    Ok(mut response) => Ok(response.take_kv()),
                    // etcd answers "election: no leader" as an error.
                    Err(etcd_client::Error::GRpcStatus(status))
                        if status.message().contains("no leader") =>
                    {
                        Ok(None)
                    }
                    Err(error) => Err(error),
                }
            }
        })?;
        Ok(answer.map(|kv| {
            let (key, value) = kv.into_key_value();
            (Leadership { key }, value)
        }))
    }

    fn health(&self) -> Result<Vec<String>, DbError> {
        let mut lines = Vec::new();
        let options = connect_options(&self.config)?;
        for url in self.config.urls() {
            let status = self.run_with("status", false, || {
                let (options, target) = (options.clone(), url.clone());
                async move {
                    let mut client = Client::connect([target], Some(options)).await?;
                    client.status().await
                }
            });
            lines.push(match status {
                Ok(status) => {
                    let member = status.header().map_or(0, |h| h.member_id());
                    let role = if status.leader() == member {
                        "leader"
                    } else {
                        "follower"
                    };
                    format!(
                        "{url}: up, {role}, etcd {}, raft term {}, {} bytes",
                        status.version(),
                        status.raft_term(),
                        status.db_size()
                    )
                }
                Err(error) => format!("{url}: down: {error}"),
            });
        }
        Ok(lines)
    }
}
