//! The origin's control-plane store: the tables below, kept by one of two backends behind
//! [`Backend`]: the embedded RocksDB under the origin's home ([`rocks`], one column family per
//! table; the default, for one origin), or an etcd cluster that several origins share
//! ([`etcd`], `origin serve --store etcd://...`).
//!
//! - `nodes`: every node that reported (id, site, inventory, installed, desired, state, last
//!   seen, daemon address), by node id.
//! - `packages`: every bundle version ever published, kept for regression, with its
//!   dependencies, by `name \0 version`.
//! - `classes`: the class an operator put a node in (it overrides the class the node reports).
//! - `overrides`: bundle versions an operator pinned on one node.
//! - `policy`: the loaded policy (rules, precedence, features).
//! - `revoked`: nodes an operator revoked (`origin nodes revoke`), by node id; the origin
//!   refuses their requests (direct or relayed) and gives them no content key.
//! - `prepares`: `origin prepare` operations (issue 17), by a big-endian id from 1: the bundle,
//!   the selector, and each selected node's state (pending, fetching, prepared, failed), so an
//!   operation survives a restart of the origin.
//! - `accounts`: the web console's accounts (issue 17): name, role (admin or viewer) and an
//!   Argon2id hash of the password (PHC string), by name; never a password.
//! - `rollouts`: the rollout (issue 14; was `rollout.json` in the origin's home): its waves,
//!   each node's state, which origin drives it and that driver's epoch, so the origin that
//!   takes over from a dead one resumes it where it stood.
//! - `audit`: every change, by a big-endian sequence number, written in the same atomic change
//!   (a RocksDB `WriteBatch`, an etcd transaction) as the change it describes, so the log never
//!   misses a change nor records one that did not happen.
//!
//! Changes that read before they write run through [`Db::change`]: they commit only if no
//! other change committed since they started reading (etcd: a compare on the change counter's
//! revision in the same transaction), and run again otherwise, so two origins never lose each
//! other's updates and the audit sequence has no gap and no duplicate.
//!
//! Values are one format byte ([`VALUE_FORMAT`]) followed by JSON, so a record can gain fields
//! (with defaults) without a migration. A value that does not decode is a [`DbError::Corrupt`]
//! naming the table and the key, never a panic. Only `origin serve` opens the store (RocksDB
//! allows one process; etcd any number of origins); the CLI asks the running server.

pub mod etcd;
pub mod rocks;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use proto::inventory::Inventory;
use proto::manifest::BundleId;
use proto::wire::{NodeBundle, ReportEvent};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::policy::{BundleRef, MatcherKind, PolicyStore, Requirement, Rule, DEFAULT_PRECEDENCE};

/// The format byte in front of every value.
pub const VALUE_FORMAT: u8 = 1;

/// The nodes table.
pub const NODES: &str = "nodes";
/// The packages table.
pub const PACKAGES: &str = "packages";
/// The class assignments table.
pub const CLASSES: &str = "classes";
/// The per-node overrides table.
pub const OVERRIDES: &str = "overrides";
/// The policy table (one key).
pub const POLICY: &str = "policy";
/// The audit log.
pub const AUDIT: &str = "audit";
/// Revoked nodes, by node id (issue 16): refused every request and every content key.
pub const REVOKED: &str = "revoked";
/// `origin prepare` operations, by a big-endian id (issue 17).
pub const PREPARES: &str = "prepares";

/// The console's accounts, by name (issue 17).
pub const ACCOUNTS: &str = "accounts";

/// The rollout (one key), with the origin that drives it (issue 14).
pub const ROLLOUTS: &str = "rollouts";

/// One-time enrollment tokens not yet redeemed, by the BLAKE3 of their secret (issue 14).
pub const TOKENS: &str = "tokens";

/// The content-key ring, sealed with a key only the origins hold (issue 14; one key).
pub const KEYRING: &str = "keyring";

/// Every table.
pub const TABLES: [&str; 12] = [
    NODES, PACKAGES, CLASSES, OVERRIDES, POLICY, AUDIT, REVOKED, PREPARES, ACCOUNTS, ROLLOUTS,
    TOKENS, KEYRING,
];

/// The key of the sealed ring in [`KEYRING`].
const KEYRING_KEY: &[u8] = b"current";

/// The key of the rollout in [`ROLLOUTS`].
const ROLLOUT_KEY: &[u8] = b"current";

/// Most prepare operations one listing returns (newest first).
pub const MAX_PREPARE_LISTING: usize = 1_000;

/// The key of the policy document in [`POLICY`].
const POLICY_KEY: &[u8] = b"current";

/// Largest value read back, in bytes (a node record with a full inventory is a few KiB).
pub const MAX_VALUE_BYTES: usize = 16 * 1024 * 1024;

/// Most audit records one listing returns.
pub const MAX_AUDIT_LISTING: usize = 10_000;

/// What went wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// RocksDB would not open it.
    #[error("cannot open the origin database {path}: {message} (is another `origin serve` running on this directory?)")]
    Open {
        /// The database directory.
        path: PathBuf,
        /// RocksDB's message.
        message: String,
    },
    /// A read or write failed.
    #[error("origin database {op} failed: {message}")]
    Rocks {
        /// What was being done.
        op: &'static str,
        /// RocksDB's message.
        message: String,
    },
    /// A stored value does not decode.
    #[error("corrupt value in table `{table}` at key `{key}`: {why}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// The key, printable.
        key: String,
        /// What is wrong.
        why: String,
    },
    /// etcd refused or did not answer.
    #[error("etcd {op} failed: {message}")]
    Etcd {
        /// What was being done.
        op: &'static str,
        /// etcd's message, with what to do about it.
        message: String,
    },
    /// Other origins kept committing first.
    #[error("the change conflicted with other origins' changes {attempts} times in a row; nothing was written: try again")]
    Conflict {
        /// How often it was tried.
        attempts: u32,
    },
    /// `--store` names no store this origin knows.
    #[error("bad --store {0}")]
    BadStore(String),
    /// `origin store copy` into a store that holds records.
    #[error("{0} is not empty: `origin store copy` writes only into an empty store")]
    NotEmpty(String),
    /// A value could not be encoded.
    #[error("cannot encode a value for table `{table}`: {why}")]
    Encode {
        /// The table.
        table: &'static str,
        /// Why.
        why: String,
    },
}

/// Where a node stands with its desired bundles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    /// It reported, but has not negotiated yet.
    Reported,
    /// It holds exactly its desired bundles.
    InSync,
    /// It was told to fetch bundles and has not reported them installed yet.
    Updating,
    /// The policy changed since it last negotiated: it should run other bundles, and learns
    /// which at its next start.
    Outdated,
    /// No rule matches it (brief 004).
    NoImage,
    /// The policy cannot decide for it (a conflict, an unknown package).
    PolicyError,
}

impl NodeState {
    /// The name shown in tables.
    pub fn name(self) -> &'static str {
        match self {
            NodeState::Reported => "reported",
            NodeState::InSync => "in-sync",
            NodeState::Updating => "updating",
            NodeState::Outdated => "outdated",
            NodeState::NoImage => "no-image",
            NodeState::PolicyError => "policy-error",
        }
    }
}

/// One node, as the origin knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id (from its certificate).
    pub id: String,
    /// Site (from its certificate).
    pub site: String,
    /// Its last inventory (with the role, class and features it was configured with).
    pub inventory: Inventory,
    /// Bundles it reported installed.
    pub installed: Vec<NodeBundle>,
    /// Bundles its store holds.
    #[serde(default)]
    pub held: Vec<NodeBundle>,
    /// Bundles it should run, from the last negotiation.
    #[serde(default)]
    pub desired: Vec<NodeBundle>,
    /// Where it stands.
    pub state: NodeState,
    /// Why, when the state is a problem (the facts tried, the conflicting rules).
    #[serde(default)]
    pub state_detail: String,
    /// Its daemon's mesh address (empty when none ran).
    #[serde(default)]
    pub data_addr: String,
    /// When it first reported (ms since the Unix epoch).
    pub first_seen_ms: u64,
    /// When it last reported.
    pub last_seen_ms: u64,
    /// Why it last reported.
    pub last_event: ReportEvent,
    /// Reports received.
    pub reports: u64,
}

impl NodeRecord {
    /// The configured role.
    pub fn role(&self) -> Option<&str> {
        self.inventory.role.as_deref()
    }
}

/// What a console account may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccountRole {
    /// Sees everything and may change things (pause, resume, abort a rollout).
    Admin,
    /// Sees everything and changes nothing.
    Viewer,
}

impl AccountRole {
    /// The name shown and typed (`admin`, `viewer`).
    pub fn name(self) -> &'static str {
        match self {
            AccountRole::Admin => "admin",
            AccountRole::Viewer => "viewer",
        }
    }
}

impl std::fmt::Display for AccountRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AccountRole {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(AccountRole::Admin),
            "viewer" => Ok(AccountRole::Viewer),
            other => Err(format!("unknown role `{other}`: use admin or viewer")),
        }
    }
}

/// One console account. Its `Debug` leaves the hash out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    /// The login name.
    pub name: String,
    /// What it may do.
    pub role: AccountRole,
    /// The Argon2id hash of its password, as a PHC string (`$argon2id$v=19$...`).
    pub password_hash: String,
    /// When it was created or last replaced (ms since the Unix epoch).
    pub updated_ms: u64,
}

impl std::fmt::Debug for AccountRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountRecord")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("updated_ms", &self.updated_ms)
            .finish_non_exhaustive()
    }
}

/// One published bundle version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRecord {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Bundle id.
    pub id: BundleId,
    /// Kind (`os-image`, `package`, ...).
    pub kind: String,
    /// Dependencies, as requirements (`name`, `name@version`).
    pub depends: Vec<Requirement>,
    /// Stored (compressed) bytes.
    pub stored_bytes: u64,
    /// Payload bytes.
    pub raw_bytes: u64,
    /// Catalog sequence number.
    pub seq: u64,
    /// When it was published (ms since the Unix epoch; 0 when imported from the catalog).
    pub published_ms: u64,
    /// Whether its chunks are encrypted (issue 16); false in records stored before.
    #[serde(default)]
    pub encrypted: bool,
    /// The content-key generation it was sealed with, when encrypted.
    #[serde(default)]
    pub key_generation: Option<u32>,
}

impl PackageRecord {
    /// As a node bundle.
    pub fn node_bundle(&self) -> NodeBundle {
        NodeBundle {
            name: self.name.clone(),
            version: self.version.clone(),
            id: self.id,
        }
    }
}

/// The loaded policy: rules, precedence and features (the packages come from [`PACKAGES`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDoc {
    /// Rules in definition order.
    pub rules: Vec<Rule>,
    /// Levels, highest first.
    pub precedence: Vec<MatcherKind>,
    /// Feature → packages.
    pub features: BTreeMap<String, Vec<Requirement>>,
    /// Where it was loaded from.
    pub source: String,
    /// Which classes may capture an image when no rule matches (brief 004); absent in
    /// policies stored before capture existed.
    #[serde(default)]
    pub capture: Option<crate::policy::CaptureConfig>,
    /// Which classes read encrypted bundles and which may run only those (issue 16); absent
    /// in policies stored before encryption existed (no class reads).
    #[serde(default)]
    pub encryption: crate::policy::EncryptionConfig,
}

impl Default for PolicyDoc {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            precedence: DEFAULT_PRECEDENCE.to_vec(),
            features: BTreeMap::new(),
            source: String::new(),
            capture: None,
            encryption: crate::policy::EncryptionConfig::default(),
        }
    }
}

/// One audit record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Sequence number, from 1.
    pub seq: u64,
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
    /// Who: an operator's login, or a node id.
    pub actor: String,
    /// The certificate role they acted with.
    pub role: String,
    /// What, e.g. `policy.load`.
    pub action: String,
    /// The details.
    pub detail: String,
}

/// An audit record to write with a change (its sequence number is assigned on commit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Audit {
    /// Who.
    pub actor: String,
    /// With which certificate role.
    pub role: String,
    /// What.
    pub action: String,
    /// The details.
    pub detail: String,
}

impl Audit {
    /// An audit record.
    pub fn new(
        actor: impl Into<String>,
        role: impl Into<String>,
        action: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            actor: actor.into(),
            role: role.into(),
            action: action.into(),
            detail: detail.into(),
        }
    }
}

/// One write of a change.
#[derive(Clone, Debug, PartialEq)]
pub enum Put {
    /// Insert or replace a node.
    Node(Box<NodeRecord>),
    /// Insert or replace a package version.
    Package(Box<PackageRecord>),
    /// Set (`Some`) or clear (`None`) a node's class.
    Class {
        /// Node id.
        node: String,
        /// The class.
        class: Option<String>,
    },
    /// Replace a node's overrides (an empty list clears them).
    Overrides {
        /// Node id.
        node: String,
        /// Pinned bundle versions.
        bundles: Vec<BundleRef>,
    },
    /// Replace the policy.
    Policy(Box<PolicyDoc>),
    /// Mark a node revoked.
    Revoked(Box<RevokedRecord>),
    /// Insert or replace a console account.
    Account(Box<AccountRecord>),
    /// Remove the console account of this name.
    RemoveAccount(String),
    /// Insert or replace a prepare operation.
    Prepare(Box<PrepareRecord>),
    /// Replace the rollout.
    Rollout(Box<crate::rollout::service::RolloutRecord>),
    /// Record an enrollment token not yet redeemed.
    Token(Box<crate::tokens::TokenRecord>),
    /// Remove the token of this key (the BLAKE3 of its secret, hex): redeemed or expired.
    SpendToken(String),
    /// Replace the sealed content-key ring.
    Keyring(Box<crate::keys::SealedRing>),
}

/// Where one node stands in a prepare operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrepareState {
    /// Not asked yet, or offline when asked: it prepares when its daemon reports again.
    Pending,
    /// Its daemon is fetching the bundle.
    Fetching,
    /// Its daemon holds the bundle, verified and kept.
    Prepared,
    /// Its daemon could not fetch the bundle (the detail says why).
    Failed,
    /// The operation was cancelled before this node prepared (`origin prepare cancel`).
    Cancelled,
}

impl PrepareState {
    /// The name shown in tables.
    pub fn name(self) -> &'static str {
        match self {
            PrepareState::Pending => "pending",
            PrepareState::Fetching => "fetching",
            PrepareState::Prepared => "prepared",
            PrepareState::Failed => "failed",
            PrepareState::Cancelled => "cancelled",
        }
    }
}

/// One node of a prepare operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareNode {
    /// Its site (from its certificate, when the operation started).
    pub site: String,
    /// Where it stands.
    pub state: PrepareState,
    /// Why, for people: the failure, or why it is still pending.
    #[serde(default)]
    pub detail: String,
    /// How often its daemon was asked (0: never reached yet).
    #[serde(default)]
    pub attempts: u32,
    /// Bytes its daemon received for the bundle when it finished (0 when it held it already).
    #[serde(default)]
    pub bytes_received: u64,
    /// When the state last changed (ms since the Unix epoch).
    pub updated_ms: u64,
}

/// An `origin prepare` operation: the selected nodes fetch a bundle and keep it, no swap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareRecord {
    /// Its id, from 1.
    pub id: u64,
    /// The bundle.
    pub bundle: NodeBundle,
    /// The bundle's stored (compressed) size, in bytes: what a node fetches at most.
    pub stored_bytes: u64,
    /// The selector, as given.
    pub selector: String,
    /// Who started it.
    pub actor: String,
    /// When (ms since the Unix epoch).
    pub created_ms: u64,
    /// The selected nodes, by node id.
    pub nodes: BTreeMap<String, PrepareNode>,
    /// Set when the operation was cancelled: no node is asked any more, and no node keeps
    /// the bundle for it.
    #[serde(default)]
    pub cancelled: Option<PrepareCancel>,
}

/// Who cancelled a prepare operation, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareCancel {
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
    /// Who.
    pub actor: String,
}

impl PrepareRecord {
    /// True when no node waits for an answer any more: each is prepared, failed, or pending
    /// after its daemon could not be reached (offline: it prepares when it comes back).
    pub fn settled(&self) -> bool {
        self.nodes.values().all(|n| match n.state {
            PrepareState::Prepared | PrepareState::Failed | PrepareState::Cancelled => true,
            PrepareState::Pending => n.attempts > 0,
            PrepareState::Fetching => false,
        })
    }
}

/// A revoked node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedRecord {
    /// Node id.
    pub node: String,
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
    /// Who revoked it.
    pub actor: String,
}

/// Where the control-plane store lives: `origin serve --store`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded RocksDB under the origin's home (the default, for one origin).
    Rocks(PathBuf),
    /// An etcd cluster shared by several origins.
    Etcd(etcd::EtcdConfig),
}

impl StoreConfig {
    /// Parses `--store`: `rocksdb` (the embedded database at `home_db`) or
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`.
    pub fn parse(text: &str, home_db: &Path) -> Result<Self, DbError> {
        let text = text.trim();
        if text.is_empty() || text == "rocksdb" {
            return Ok(StoreConfig::Rocks(home_db.to_owned()));
        }
        if let Some(rest) = text.strip_prefix("etcd://") {
            return Ok(StoreConfig::Etcd(etcd::EtcdConfig::parse(rest)?));
        }
        Err(DbError::BadStore(format!(
            "`{text}`: use `rocksdb` or `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`"
        )))
    }

    /// The backend's name, as `origin status` and the metrics show it.
    pub fn backend(&self) -> &'static str {
        match self {
            StoreConfig::Rocks(_) => "rocksdb",
            StoreConfig::Etcd(_) => "etcd",
        }
    }
}

impl std::fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreConfig::Rocks(path) => write!(f, "rocksdb at {}", path.display()),
            StoreConfig::Etcd(config) => write!(f, "{config}"),
        }
    }
}

/// One write of a backend: a value put under a key of a table, or a key deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Insert or replace.
    Put {
        /// The table.
        table: &'static str,
        /// The key.
        key: Vec<u8>,
        /// The encoded value.
        value: Vec<u8>,
    },
    /// Remove (nothing happens when the key is absent).
    Delete {
        /// The table.
        table: &'static str,
        /// The key.
        key: Vec<u8>,
    },
}

/// Where a change started: what the backend must still hold for the change to commit. A
/// change that read the store at one token commits only if nothing else committed since
/// (so no update is lost between origins sharing an etcd cluster).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    /// The backend's change revision (etcd: the mod revision of the change counter; the
    /// embedded database, which one process owns, keeps 0).
    pub revision: i64,
    /// The last audit sequence number written: the change's record gets the next.
    pub last_audit: u64,
}

/// Raw entries of one table, in key order: (key, encoded value).
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Every table's raw entries: what [`Db::export`] reads and [`Db::import`] writes.
pub type Tables = Vec<(&'static str, Entries)>;

/// What a backend did with a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// Every write and the audit record are stored.
    Committed,
    /// Another change committed since the token: nothing was written.
    Conflict,
}

/// A control-plane store: a few tables of keys and values, and changes that commit whole or
/// not at all. [`Db`] encodes, decodes and retries on top of it.
pub trait Backend: Send + Sync {
    /// The value under `key` in `table`.
    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, DbError>;
    /// At most `limit` entries of `table` in key order, or newest (highest key) first.
    fn scan(
        &self,
        table: &'static str,
        newest_first: bool,
        limit: usize,
    ) -> Result<Entries, DbError>;
    /// The token a change starts from.
    fn begin(&self) -> Result<Token, DbError>;
    /// Writes `writes`, the audit record `audit` (its sequence number and encoded value)
    /// when given, and the change counter (`token.last_audit`, plus one with a record), as
    /// one atomic and durable change, unless another change committed since `token`.
    fn write(
        &self,
        token: Token,
        writes: &[Write],
        audit: Option<(u64, &[u8])>,
    ) -> Result<Written, DbError>;
    /// Its health, for `origin status`: `Ok` with a line per member, or why it is not usable.
    fn health(&self) -> Result<Vec<String>, DbError>;
    /// Says that this process is up, as each `(key, value)` of `entries`, for as long as it
    /// lives: in etcd under a lease this backend keeps alive (the entries vanish [`LIVE_TTL`]
    /// after the process dies, or at once when it closes the store); in RocksDB, in memory
    /// (one origin). Not a change: no counter, no audit record. Announcing a key again
    /// replaces its value.
    fn announce(&self, entries: &[(String, Vec<u8>)]) -> Result<(), DbError>;
    /// Every live announcement, by key.
    fn live(&self) -> Result<Entries, DbError>;
    /// Campaigns in the election `name` with `value` for at most `wait`: `Some` once this
    /// process leads it, `None` when `wait` passed first. In etcd, through its election API
    /// under the lease of this process's announcements (so a dead origin's leadership ends
    /// [`LIVE_TTL`] after its death, and a lost lease loses it); in RocksDB, at once (one
    /// origin).
    fn campaign(
        &self,
        name: &str,
        value: &[u8],
        wait: std::time::Duration,
    ) -> Result<Option<Leadership>, DbError>;
    /// Who leads the election `name` now, and the value it campaigned with.
    fn leader(&self, name: &str) -> Result<Option<(Leadership, Vec<u8>)>, DbError>;
}

/// The leadership of an election: the key that stands for it (deleted when it ends).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leadership {
    /// The election's key of the leader.
    pub key: Vec<u8>,
}

/// The election of the origin that drives rollouts.
pub const ROLLOUT_ELECTION: &str = "rollouts";

/// Announcement keys of origins: `origin/NODE_ID`.
const LIVE_ORIGIN: &str = "origin/";
/// Announcement keys of bundles held: `held/BUNDLE_ID/NODE_ID`.
const LIVE_HELD: &str = "held/";

/// How long an origin's announcement outlives the origin (etcd's lease time to live).
pub const LIVE_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// An origin that serves, as it announces itself to the others sharing its store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginRecord {
    /// Its node id (from its own certificate).
    pub node_id: String,
    /// Its mesh address (QUIC, mutual TLS).
    pub mesh: String,
    /// Its enrollment address.
    pub enroll: String,
    /// Its metrics address.
    pub metrics: String,
    /// When it started serving (ms since the epoch).
    pub started_ms: u64,
    /// Its software version.
    pub version: String,
}

/// Most times a change is tried again after another origin committed first.
pub const MAX_CHANGE_ATTEMPTS: u32 = 32;

/// A change to commit: the puts, the audit record, and what the change returns.
#[derive(Debug)]
pub struct Commit<T> {
    /// The records written.
    pub puts: Vec<Put>,
    /// The audit record written with them.
    pub audit: Option<Audit>,
    /// What [`Db::change`] returns once committed.
    pub value: T,
}

impl<T> Commit<T> {
    /// A change of `puts` audited by `audit`, returning `value`.
    pub fn new(puts: Vec<Put>, audit: Option<Audit>, value: T) -> Self {
        Self { puts, audit, value }
    }

    /// Nothing to write: [`Db::change`] returns `value` at once.
    pub fn none(value: T) -> Self {
        Self::new(Vec::new(), None, value)
    }
}

/// The open control-plane store.
pub struct Db {
    backend: Box<dyn Backend>,
    config: StoreConfig,
    /// Held from the first read to the commit of every change of this process, so its own
    /// changes never conflict with each other; other origins are kept out by the token.
    changes: Mutex<()>,
}

impl Db {
    /// Opens (or creates) the embedded database at `path`.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        Self::open_store(&StoreConfig::Rocks(path.to_owned()))
    }

    /// Opens the store `config` names: the embedded database, or a connection to etcd that
    /// answered (a cluster that cannot be reached is an error here, not at the first change).
    pub fn open_store(config: &StoreConfig) -> Result<Self, DbError> {
        let backend: Box<dyn Backend> = match config {
            StoreConfig::Rocks(path) => Box::new(rocks::RocksBackend::open(path)?),
            StoreConfig::Etcd(etcd) => Box::new(etcd::EtcdBackend::connect(etcd)?),
        };
        Ok(Self {
            backend,
            config: config.clone(),
            changes: Mutex::new(()),
        })
    }

    /// Where the store lives.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The backend's health, one line per member (etcd) or the directory (RocksDB).
    pub fn health(&self) -> Result<Vec<String>, DbError> {
        self.backend.health()
    }

    /// Announces this origin to the others sharing the store, for as long as it runs.
    pub fn announce_origin(&self, origin: &OriginRecord) -> Result<(), DbError> {
        self.backend.announce(&[(
            format!("{LIVE_ORIGIN}{}", origin.node_id),
            encode("live", origin)?,
        )])
    }

    /// The origins up now (those whose announcement is live), by node id.
    pub fn origins(&self) -> Result<Vec<OriginRecord>, DbError> {
        self.backend
            .live()?
            .into_iter()
            .filter(|(key, _)| key.starts_with(LIVE_ORIGIN.as_bytes()))
            .map(|(key, value)| decode("live", &key, &value))
            .collect()
    }

    /// Announces that origin `node_id` holds the bundles `ids`, whole and verified, for as
    /// long as it runs (the bundle catalog of the store: which live origin serves what).
    pub fn announce_held(&self, node_id: &str, ids: &[BundleId]) -> Result<(), DbError> {
        let entries: Vec<(String, Vec<u8>)> = ids
            .iter()
            .map(|id| (format!("{LIVE_HELD}{id}/{node_id}"), vec![VALUE_FORMAT]))
            .collect();
        self.backend.announce(&entries)
    }

    /// The live origins that hold bundle `id`, by node id (an origin's announcements share
    /// its lease, so a dead origin holds nothing here).
    pub fn holders(&self, id: &BundleId) -> Result<Vec<String>, DbError> {
        let prefix = format!("{LIVE_HELD}{id}/");
        Ok(self
            .backend
            .live()?
            .into_iter()
            .filter_map(|(key, _)| {
                key.strip_prefix(prefix.as_bytes())
                    .map(|node| String::from_utf8_lossy(node).into_owned())
            })
            .collect())
    }

    fn get<T: DeserializeOwned>(
        &self,
        table: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, DbError> {
        self.backend
            .get(table, key)?
            .map(|b| decode(table, key, &b))
            .transpose()
    }

    fn scan<T: DeserializeOwned>(
        &self,
        table: &'static str,
        newest_first: bool,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, T)>, DbError> {
        self.backend
            .scan(table, newest_first, limit)?
            .into_iter()
            .map(|(key, value)| {
                let decoded = decode(table, &key, &value)?;
                Ok((key, decoded))
            })
            .collect()
    }

    fn values<T: DeserializeOwned>(
        &self,
        table: &'static str,
        newest_first: bool,
        limit: usize,
    ) -> Result<Vec<T>, DbError> {
        Ok(self
            .scan(table, newest_first, limit)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// Every live holding: (bundle id, node id of the origin that holds it).
    pub fn held(&self) -> Result<Vec<(String, String)>, DbError> {
        Ok(self
            .backend
            .live()?
            .into_iter()
            .filter_map(|(key, _)| {
                let rest = key.strip_prefix(LIVE_HELD.as_bytes())?;
                let rest = String::from_utf8_lossy(rest);
                let (id, node) = rest.split_once('/')?;
                Some((id.to_owned(), node.to_owned()))
            })
            .collect())
    }

    /// Campaigns in election `name` for at most `wait` (see [`Backend::campaign`]).
    pub fn campaign(
        &self,
        name: &str,
        value: &[u8],
        wait: std::time::Duration,
    ) -> Result<Option<Leadership>, DbError> {
        self.backend.campaign(name, value, wait)
    }

    /// Who leads election `name` now, with its value.
    pub fn leader(&self, name: &str) -> Result<Option<(Leadership, Vec<u8>)>, DbError> {
        self.backend.leader(name)
    }

    /// The rollout, if one was ever started.
    pub fn rollout(&self) -> Result<Option<crate::rollout::service::RolloutRecord>, DbError> {
        self.get(ROLLOUTS, ROLLOUT_KEY)
    }

    /// The node `id`.
    pub fn node(&self, id: &str) -> Result<Option<NodeRecord>, DbError> {
        self.get(NODES, id.as_bytes())
    }

    /// Every node, by id.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, DbError> {
        self.values(NODES, false, usize::MAX)
    }

    /// The package `name@version`.
    pub fn package(&self, name: &str, version: &str) -> Result<Option<PackageRecord>, DbError> {
        self.get(PACKAGES, &package_key(name, version))
    }

    /// Every package version, by name then version (byte order).
    pub fn packages(&self) -> Result<Vec<PackageRecord>, DbError> {
        self.values(PACKAGES, false, usize::MAX)
    }

    /// Every class assignment: node id → class.
    pub fn classes(&self) -> Result<BTreeMap<String, String>, DbError> {
        self.string_map(CLASSES)
    }

    /// Every node's overrides.
    pub fn overrides(&self) -> Result<BTreeMap<String, Vec<BundleRef>>, DbError> {
        self.string_map(OVERRIDES)
    }

    fn string_map<T: DeserializeOwned>(
        &self,
        table: &'static str,
    ) -> Result<BTreeMap<String, T>, DbError> {
        self.scan(table, false, usize::MAX)?
            .into_iter()
            .map(|(key, value)| {
                String::from_utf8(key)
                    .map(|k| (k, value))
                    .map_err(|e| DbError::Corrupt {
                        table,
                        key: String::from_utf8_lossy(e.as_bytes()).into_owned(),
                        why: "the key is not UTF-8".into(),
                    })
            })
            .collect()
    }

    /// The revocation of node `id`, if it was revoked.
    pub fn revoked(&self, id: &str) -> Result<Option<RevokedRecord>, DbError> {
        self.get(REVOKED, id.as_bytes())
    }

    /// The ids of every revoked node.
    pub fn revoked_ids(&self) -> Result<std::collections::HashSet<String>, DbError> {
        Ok(self
            .backend
            .scan(REVOKED, false, usize::MAX)?
            .into_iter()
            .map(|(key, _)| String::from_utf8_lossy(&key).into_owned())
            .collect())
    }

    /// The console account `name`.
    pub fn account(&self, name: &str) -> Result<Option<AccountRecord>, DbError> {
        self.get(ACCOUNTS, name.as_bytes())
    }

    /// The enrollment token whose key (BLAKE3 of the secret, hex) is `key`, if not redeemed.
    pub fn token(&self, key: &str) -> Result<Option<crate::tokens::TokenRecord>, DbError> {
        self.get(TOKENS, key.as_bytes())
    }

    /// Every enrollment token not yet redeemed.
    pub fn tokens(&self) -> Result<Vec<crate::tokens::TokenRecord>, DbError> {
        self.values(TOKENS, false, usize::MAX)
    }

    /// The sealed content-key ring the origins share, if one was stored.
    pub fn keyring(&self) -> Result<Option<crate::keys::SealedRing>, DbError> {
        self.get(KEYRING, KEYRING_KEY)
    }

    /// Every console account, by name.
    pub fn accounts(&self) -> Result<Vec<AccountRecord>, DbError> {
        self.values(ACCOUNTS, false, usize::MAX)
    }

    /// The prepare operation `id`.
    pub fn prepare(&self, id: u64) -> Result<Option<PrepareRecord>, DbError> {
        self.get(PREPARES, &id.to_be_bytes())
    }

    /// The newest `limit` prepare operations, newest first.
    pub fn prepares(&self, limit: usize) -> Result<Vec<PrepareRecord>, DbError> {
        self.values(PREPARES, true, limit.min(MAX_PREPARE_LISTING))
    }

    /// Every prepare operation, oldest first (the keep-sets and the resumption read them all).
    pub fn all_prepares(&self) -> Result<Vec<PrepareRecord>, DbError> {
        self.values(PREPARES, false, usize::MAX)
    }

    /// The loaded policy (the default, empty one before any load).
    pub fn policy(&self) -> Result<PolicyDoc, DbError> {
        Ok(self.get(POLICY, POLICY_KEY)?.unwrap_or_default())
    }

    /// The policy store resolution reads: the loaded rules, precedence and features, every
    /// node's overrides as node-override rules, and every published package.
    pub fn policy_store(&self) -> Result<PolicyStore, DbError> {
        Ok(build_store(
            self.policy()?,
            &self.overrides()?,
            &self.packages()?,
        ))
    }

    /// The newest `limit` audit records, oldest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditRecord>, DbError> {
        let mut records: Vec<AuditRecord> =
            self.values(AUDIT, true, limit.min(MAX_AUDIT_LISTING))?;
        records.reverse();
        Ok(records)
    }

    /// Runs a change: `body` reads what it needs through this `Db` and returns the puts, the
    /// audit record and its result. They commit in one atomic write, with the audit record,
    /// only if no other change committed since `body` started reading; otherwise `body` runs
    /// again on what is stored now (at most [`MAX_CHANGE_ATTEMPTS`] times, then
    /// [`DbError::Conflict`]). So two origins changing the same records never lose an update.
    /// `body` must have no effect outside its return value until it returns for the last time.
    pub fn change<T, E: From<DbError>>(
        &self,
        mut body: impl FnMut() -> Result<Commit<T>, E>,
    ) -> Result<T, E> {
        let _one_change = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 1..=MAX_CHANGE_ATTEMPTS {
            let token = self.backend.begin()?;
            let change = body()?;
            if change.puts.is_empty() && change.audit.is_none() {
                return Ok(change.value);
            }
            match self.write(token, &change.puts, change.audit)? {
                Some(_) => return Ok(change.value),
                None => {
                    tracing::debug!(
                        attempt,
                        "another origin changed the store first; the change runs again"
                    );
                    backoff(attempt);
                }
            }
        }
        Err(DbError::Conflict {
            attempts: MAX_CHANGE_ATTEMPTS,
        }
        .into())
    }

    /// Writes `puts` and, when given, their audit record, as one atomic and durable change:
    /// both or neither. For writes that do not depend on what the store holds (an audit
    /// record alone, an import); a change that read first goes through [`Db::change`].
    /// Returns the audit record written.
    pub fn commit(
        &self,
        puts: &[Put],
        audit: Option<Audit>,
    ) -> Result<Option<AuditRecord>, DbError> {
        let _one_change = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 1..=MAX_CHANGE_ATTEMPTS {
            let token = self.backend.begin()?;
            if let Some(written) = self.write(token, puts, audit.clone())? {
                return Ok(written);
            }
            backoff(attempt);
        }
        Err(DbError::Conflict {
            attempts: MAX_CHANGE_ATTEMPTS,
        })
    }

    /// `Some(record written)` once committed, `None` on a conflict.
    fn write(
        &self,
        token: Token,
        puts: &[Put],
        audit: Option<Audit>,
    ) -> Result<Option<Option<AuditRecord>>, DbError> {
        let (writes, record) = plan(puts, audit, token.last_audit + 1, now_ms())?;
        let encoded = record
            .as_ref()
            .map(|r| encode(AUDIT, r).map(|bytes| (r.seq, bytes)))
            .transpose()?;
        let audit = encoded
            .as_ref()
            .map(|(seq, bytes)| (*seq, bytes.as_slice()));
        match self.backend.write(token, &writes, audit)? {
            Written::Committed => Ok(Some(record)),
            Written::Conflict => Ok(None),
        }
    }

    /// Every entry of every table, raw: what `origin store copy` moves.
    pub fn export(&self) -> Result<Tables, DbError> {
        TABLES
            .iter()
            .map(|table| Ok((*table, self.backend.scan(table, false, usize::MAX)?)))
            .collect()
    }

    /// Writes `tables` (from [`Db::export`]) into this store, which must be empty, in changes
    /// of at most `batch` entries (etcd bounds the operations of one transaction); the audit
    /// sequence goes on from the highest record imported. Returns the entries written.
    pub fn import(
        &self,
        tables: &[(&'static str, Entries)],
        batch: usize,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, DbError> {
        let held: usize = TABLES
            .iter()
            .map(|table| self.backend.scan(table, false, 1).map(|e| e.len()))
            .sum::<Result<usize, DbError>>()?;
        if held > 0 {
            return Err(DbError::NotEmpty(self.config.to_string()));
        }
        let _one_change = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let mut last_audit = 0u64;
        let mut written = 0u64;
        for (table, entries) in tables {
            for chunk in entries.chunks(batch.max(1)) {
                if *table == AUDIT {
                    for (key, _) in chunk {
                        let seq = <[u8; 8]>::try_from(key.as_slice())
                            .map(u64::from_be_bytes)
                            .map_err(|_| DbError::Corrupt {
                                table: AUDIT,
                                key: hex::encode(key),
                                why: "an audit key is not an 8-byte sequence number".into(),
                            })?;
                        last_audit = last_audit.max(seq);
                    }
                }
                let writes: Vec<Write> = chunk
                    .iter()
                    .map(|(key, value)| Write::Put {
                        table,
                        key: key.clone(),
                        value: value.clone(),
                    })
                    .collect();
                let mut token = self.backend.begin()?;
                token.last_audit = token.last_audit.max(last_audit);
                if self.backend.write(token, &writes, None)? == Written::Conflict {
                    return Err(DbError::Conflict { attempts: 1 });
                }
                written += writes.len() as u64;
                progress(written);
            }
        }
        Ok(written)
    }

    /// Test hook: writes raw bytes under `key` in `table`, bypassing the encoding.
    #[doc(hidden)]
    pub fn put_raw(&self, table: &'static str, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        let write = Write::Put {
            table,
            key: key.to_vec(),
            value: value.to_vec(),
        };
        let _one_change = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let token = self.backend.begin()?;
        match self.backend.write(token, &[write], None)? {
            Written::Committed => Ok(()),
            Written::Conflict => Err(DbError::Conflict { attempts: 1 }),
        }
    }
}

/// A short, growing, jittered wait before a change runs again, so two origins that
/// conflicted do not collide again at once.
fn backoff(attempt: u32) {
    let base = 2u64.saturating_pow(attempt.min(6));
    let jitter = rand::random::<u64>() % base.max(1);
    std::thread::sleep(std::time::Duration::from_millis(base + jitter));
}

/// The writes of a change (one per put) and its audit record, with sequence number `seq` and
/// time `at_ms`: what [`Db::commit`] hands its backend, to write in one atomic change.
pub fn plan(
    puts: &[Put],
    audit: Option<Audit>,
    seq: u64,
    at_ms: u64,
) -> Result<(Vec<Write>, Option<AuditRecord>), DbError> {
    let mut writes = Vec::with_capacity(puts.len() + 1);
    let put = |table: &'static str, key: &[u8], value: Vec<u8>| Write::Put {
        table,
        key: key.to_vec(),
        value,
    };
    let delete = |table: &'static str, key: &[u8]| Write::Delete {
        table,
        key: key.to_vec(),
    };
    for item in puts {
        writes.push(match item {
            Put::Node(node) => put(NODES, node.id.as_bytes(), encode(NODES, node)?),
            Put::Package(package) => put(
                PACKAGES,
                &package_key(&package.name, &package.version),
                encode(PACKAGES, package)?,
            ),
            Put::Class { node, class: None } => delete(CLASSES, node.as_bytes()),
            Put::Class {
                node,
                class: Some(class),
            } => put(CLASSES, node.as_bytes(), encode(CLASSES, class)?),
            Put::Overrides { node, bundles } if bundles.is_empty() => {
                delete(OVERRIDES, node.as_bytes())
            }
            Put::Overrides { node, bundles } => {
                put(OVERRIDES, node.as_bytes(), encode(OVERRIDES, bundles)?)
            }
            Put::Policy(doc) => put(POLICY, POLICY_KEY, encode(POLICY, doc)?),
            Put::Revoked(record) => put(REVOKED, record.node.as_bytes(), encode(REVOKED, record)?),
            Put::Prepare(record) => put(
                PREPARES,
                &record.id.to_be_bytes(),
                encode(PREPARES, record)?,
            ),
            Put::Account(account) => put(
                ACCOUNTS,
                account.name.as_bytes(),
                encode(ACCOUNTS, account)?,
            ),
            Put::RemoveAccount(name) => delete(ACCOUNTS, name.as_bytes()),
            Put::Rollout(record) => put(ROLLOUTS, ROLLOUT_KEY, encode(ROLLOUTS, record)?),
            Put::Token(record) => put(TOKENS, record.key.as_bytes(), encode(TOKENS, record)?),
            Put::SpendToken(key) => delete(TOKENS, key.as_bytes()),
            Put::Keyring(ring) => put(KEYRING, KEYRING_KEY, encode(KEYRING, ring)?),
        });
    }
    let record = audit.map(|audit| AuditRecord {
        seq,
        at_ms,
        actor: audit.actor,
        role: audit.role,
        action: audit.action,
        detail: audit.detail,
    });
    Ok((writes, record))
}

/// The policy store made of a policy document, overrides (as node-override rules) and
/// packages: what resolution reads, before or after a change is committed.
pub fn build_store(
    doc: PolicyDoc,
    overrides: &BTreeMap<String, Vec<BundleRef>>,
    packages: &[PackageRecord],
) -> PolicyStore {
    let mut store = PolicyStore {
        rules: doc.rules,
        precedence: doc.precedence,
        features: doc.features,
        packages: BTreeMap::new(),
    };
    for (node, bundles) in overrides {
        if !bundles.is_empty() {
            store.rules.push(override_rule(node, bundles.clone()));
        }
    }
    for package in packages {
        store.add_package(
            package.name.clone(),
            package.version.clone(),
            package.depends.clone(),
        );
    }
    store
}

/// The rule a node's overrides make: a node-override rule naming every pinned bundle.
pub fn override_rule(node: &str, bundles: Vec<BundleRef>) -> Rule {
    Rule {
        id: format!("override:{node}"),
        matcher: crate::policy::Matcher::NodeOverride(node.to_owned()),
        bundles,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn package_key(name: &str, version: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 1 + version.len());
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key.extend_from_slice(version.as_bytes());
    key
}

fn printable_key(table: &'static str, key: &[u8]) -> String {
    if table == AUDIT || table == PREPARES {
        if let Ok(bytes) = <[u8; 8]>::try_from(key) {
            return u64::from_be_bytes(bytes).to_string();
        }
    }
    match std::str::from_utf8(key) {
        Ok(text) => text.replace('\0', "@"),
        Err(_) => hex::encode(key),
    }
}

fn encode<T: Serialize + ?Sized>(table: &'static str, value: &T) -> Result<Vec<u8>, DbError> {
    let mut bytes = vec![VALUE_FORMAT];
    serde_json::to_writer(&mut bytes, value).map_err(|e| DbError::Encode {
        table,
        why: e.to_string(),
    })?;
    Ok(bytes)
}

fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, DbError> {
    let corrupt = |why: String| DbError::Corrupt {
        table,
        key: printable_key(table, key),
        why,
    };
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(corrupt(format!(
            "{} bytes, more than the bound of {MAX_VALUE_BYTES}",
            bytes.len()
        )));
    }
    match bytes.split_first() {
        None => Err(corrupt("the value is empty".into())),
        Some((&VALUE_FORMAT, body)) => {
            serde_json::from_slice(body).map_err(|e| corrupt(e.to_string()))
        }
        Some((other, _)) => Err(corrupt(format!(
            "value format {other}, this origin reads format {VALUE_FORMAT}"
        ))),
    }
}
