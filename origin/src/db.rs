//! The origin's databases: one RocksDB under the origin's home, one column family per table.
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
//! - `audit`: every change, by a big-endian sequence number, written in the same `WriteBatch`
//!   as the change it describes, so the log never misses a change nor records one that did not
//!   happen.
//!
//! Values are one format byte ([`VALUE_FORMAT`]) followed by JSON, so a record can gain fields
//! (with defaults) without a migration. A value that does not decode is a [`DbError::Corrupt`]
//! naming the table and the key, never a panic. Only `origin serve` opens the database
//! (RocksDB allows one process); the CLI asks the running server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use proto::inventory::Inventory;
use proto::manifest::BundleId;
use proto::wire::{NodeBundle, ReportEvent};
use rocksdb::{
    ColumnFamilyDescriptor, DBCompressionType, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
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

const TABLES: [&str; 9] = [
    NODES, PACKAGES, CLASSES, OVERRIDES, POLICY, AUDIT, REVOKED, PREPARES, ACCOUNTS,
];

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

/// The open database.
pub struct Db {
    db: DB,
    path: PathBuf,
    /// The next audit sequence number; held while a batch is built and written, so sequence
    /// numbers follow commit order.
    next_audit: Mutex<u64>,
}

impl Db {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_compression_type(DBCompressionType::None);
        options.set_keep_log_file_num(4);
        let families = TABLES.iter().map(|name| {
            let mut cf = Options::default();
            cf.set_compression_type(DBCompressionType::None);
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = DB::open_cf_descriptors(&options, path, families).map_err(|e| DbError::Open {
            path: path.to_owned(),
            message: e.into_string(),
        })?;
        let mut db = Self {
            db,
            path: path.to_owned(),
            next_audit: Mutex::new(1),
        };
        let last = db.last_audit_seq()?;
        db.next_audit = Mutex::new(last + 1);
        Ok(db)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, table: &'static str) -> Result<&rocksdb::ColumnFamily, DbError> {
        self.db.cf_handle(table).ok_or_else(|| DbError::Rocks {
            op: "open table",
            message: format!("table `{table}` is missing"),
        })
    }

    fn get<T: DeserializeOwned>(
        &self,
        table: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, DbError> {
        let bytes = self
            .db
            .get_cf(self.cf(table)?, key)
            .map_err(|e| rocks("read", e))?;
        bytes.map(|b| decode(table, key, &b)).transpose()
    }

    fn scan<T: DeserializeOwned>(
        &self,
        table: &'static str,
        mode: IteratorMode<'_>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, T)>, DbError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(table)?, mode) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(|e| rocks("scan", e))?;
            let decoded = decode(table, &key, &value)?;
            out.push((key.to_vec(), decoded));
        }
        Ok(out)
    }

    /// The node `id`.
    pub fn node(&self, id: &str) -> Result<Option<NodeRecord>, DbError> {
        self.get(NODES, id.as_bytes())
    }

    /// Every node, by id.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, DbError> {
        Ok(self
            .scan(NODES, IteratorMode::Start, usize::MAX)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// The package `name@version`.
    pub fn package(&self, name: &str, version: &str) -> Result<Option<PackageRecord>, DbError> {
        self.get(PACKAGES, &package_key(name, version))
    }

    /// Every package version, by name then version (byte order).
    pub fn packages(&self) -> Result<Vec<PackageRecord>, DbError> {
        Ok(self
            .scan(PACKAGES, IteratorMode::Start, usize::MAX)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
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
        self.scan(table, IteratorMode::Start, usize::MAX)?
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

    /// The console account `name`.
    pub fn account(&self, name: &str) -> Result<Option<AccountRecord>, DbError> {
        self.get(ACCOUNTS, name.as_bytes())
    }

    /// Every console account, by name.
    pub fn accounts(&self) -> Result<Vec<AccountRecord>, DbError> {
        Ok(self
            .scan(ACCOUNTS, IteratorMode::Start, usize::MAX)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// The prepare operation `id`.
    pub fn prepare(&self, id: u64) -> Result<Option<PrepareRecord>, DbError> {
        self.get(PREPARES, &id.to_be_bytes())
    }

    /// The newest `limit` prepare operations, newest first.
    pub fn prepares(&self, limit: usize) -> Result<Vec<PrepareRecord>, DbError> {
        Ok(self
            .scan(PREPARES, IteratorMode::End, limit.min(MAX_PREPARE_LISTING))?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// Every prepare operation, oldest first (the keep-sets and the resumption read them all).
    pub fn all_prepares(&self) -> Result<Vec<PrepareRecord>, DbError> {
        Ok(self
            .scan(PREPARES, IteratorMode::Start, usize::MAX)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
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
        let mut records: Vec<AuditRecord> = self
            .scan(AUDIT, IteratorMode::End, limit.min(MAX_AUDIT_LISTING))?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        records.reverse();
        Ok(records)
    }

    fn last_audit_seq(&self) -> Result<u64, DbError> {
        let cf = self.cf(AUDIT)?;
        match self.db.iterator_cf(cf, IteratorMode::End).next() {
            None => Ok(0),
            Some(item) => {
                let (key, _) = item.map_err(|e| rocks("scan", e))?;
                let bytes: [u8; 8] = key.as_ref().try_into().map_err(|_| DbError::Corrupt {
                    table: AUDIT,
                    key: hex::encode(&key),
                    why: "an audit key is not an 8-byte sequence number".into(),
                })?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    /// Writes `puts` and, when given, their audit record, in one synced `WriteBatch`: both or
    /// neither. Returns the audit record written.
    pub fn commit(
        &self,
        puts: &[Put],
        audit: Option<Audit>,
    ) -> Result<Option<AuditRecord>, DbError> {
        let mut next = self
            .next_audit
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (batch, record) = self.batch(puts, audit, *next, now_ms())?;
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db
            .write_opt(batch, &options)
            .map_err(|e| rocks("write", e))?;
        if record.is_some() {
            *next += 1;
        }
        Ok(record)
    }

    /// The batch [`Db::commit`] writes: one operation per put, then the audit record.
    pub fn batch(
        &self,
        puts: &[Put],
        audit: Option<Audit>,
        seq: u64,
        at_ms: u64,
    ) -> Result<(WriteBatch, Option<AuditRecord>), DbError> {
        let mut batch = WriteBatch::default();
        for put in puts {
            match put {
                Put::Node(node) => {
                    batch.put_cf(self.cf(NODES)?, node.id.as_bytes(), encode(NODES, node)?)
                }
                Put::Package(package) => batch.put_cf(
                    self.cf(PACKAGES)?,
                    package_key(&package.name, &package.version),
                    encode(PACKAGES, package)?,
                ),
                Put::Class { node, class: None } => {
                    batch.delete_cf(self.cf(CLASSES)?, node.as_bytes())
                }
                Put::Class {
                    node,
                    class: Some(class),
                } => batch.put_cf(self.cf(CLASSES)?, node.as_bytes(), encode(CLASSES, class)?),
                Put::Overrides { node, bundles } if bundles.is_empty() => {
                    batch.delete_cf(self.cf(OVERRIDES)?, node.as_bytes())
                }
                Put::Overrides { node, bundles } => batch.put_cf(
                    self.cf(OVERRIDES)?,
                    node.as_bytes(),
                    encode(OVERRIDES, bundles)?,
                ),
                Put::Policy(doc) => {
                    batch.put_cf(self.cf(POLICY)?, POLICY_KEY, encode(POLICY, doc)?)
                }
                Put::Revoked(record) => batch.put_cf(
                    self.cf(REVOKED)?,
                    record.node.as_bytes(),
                    encode(REVOKED, record)?,
                ),
                Put::Prepare(record) => batch.put_cf(
                    self.cf(PREPARES)?,
                    record.id.to_be_bytes(),
                    encode(PREPARES, record)?,
                ),
                Put::Account(account) => batch.put_cf(
                    self.cf(ACCOUNTS)?,
                    account.name.as_bytes(),
                    encode(ACCOUNTS, account)?,
                ),
                Put::RemoveAccount(name) => batch.delete_cf(self.cf(ACCOUNTS)?, name.as_bytes()),
            }
        }
        let record = match audit {
            Some(audit) => {
                let record = AuditRecord {
                    seq,
                    at_ms,
                    actor: audit.actor,
                    role: audit.role,
                    action: audit.action,
                    detail: audit.detail,
                };
                batch.put_cf(self.cf(AUDIT)?, seq.to_be_bytes(), encode(AUDIT, &record)?);
                Some(record)
            }
            None => None,
        };
        Ok((batch, record))
    }

    /// Test hook: writes raw bytes under `key` in `table`, bypassing the encoding.
    #[doc(hidden)]
    pub fn put_raw(&self, table: &'static str, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        self.db
            .put_cf(self.cf(table)?, key, value)
            .map_err(|e| rocks("write", e))
    }
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

fn rocks(op: &'static str, error: rocksdb::Error) -> DbError {
    DbError::Rocks {
        op,
        message: error.into_string(),
    }
}
