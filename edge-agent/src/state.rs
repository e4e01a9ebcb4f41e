//! The edge's state directory: where each thing lives under it and the small files kept there
//! (the operator's configuration, the installed bundles, the running daemon's addresses, the
//! test-mode area). Every other module of the agent reaches the directory through here, so this
//! module depends on none of them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use proto::store::{Store, StoreOptions};
use proto::wire::NodeBundle;
use serde::{Deserialize, Serialize};

/// The identity directory under an edge's state directory.
pub fn identity_dir(dir: &Path) -> PathBuf {
    dir.join("identity")
}

/// Opens the edge's blob store.
pub fn open_store(dir: &Path) -> Result<Store> {
    open_store_with_limit(dir, proto::store::DEFAULT_CACHE_LIMIT_BYTES)
}

/// Opens the edge's store bounded at `limit_bytes` (`edge-agent serve --cache-gib`).
pub fn open_store_with_limit(dir: &Path, limit_bytes: u64) -> Result<Store> {
    let path = dir.join("store");
    Store::open(
        &path,
        StoreOptions {
            cache_limit_bytes: limit_bytes,
            ..StoreOptions::default()
        },
    )
    .with_context(|| format!("cannot open the store in {}", path.display()))
}

/// What the operator configured for this node, kept in the edge's directory.
pub const CONFIG_FILE: &str = "node.json";

/// The bundles this node has installed (what it boots with).
pub const INSTALLED_FILE: &str = "installed.json";

/// The OS the machine ran when the daemon last looked (its booted slot's marker), so the entry
/// of an OS the machine left is dropped from [`INSTALLED_FILE`] after a swap.
pub const RUNNING_OS_FILE: &str = "running-os.json";

/// Temporary area (test mode); purged at every start.
pub const TMP_DIR: &str = "tmp";

/// What an operator configured: the role, class and features reported with the inventory,
/// and where `/proc` and `/sys` are read (`/` on a real machine).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeConfig {
    /// Role, e.g. `web`.
    pub role: Option<String>,
    /// Class, e.g. `edge-cache`.
    pub class: Option<String>,
    /// Features the node asks for (brief 002).
    pub features: Vec<String>,
    /// Root of `/proc` and `/sys` (default `/`).
    pub inventory_root: Option<PathBuf>,
}

impl NodeConfig {
    /// The configuration saved under `dir` (the default when none is).
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is malformed; fix or remove it", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// The saved configuration with what was given on the command line on top; saved back
    /// when anything was given, so later starts report the same.
    pub fn load_with(dir: &Path, given: NodeConfig) -> Result<Self> {
        let mut config = Self::load(dir)?;
        let mut changed = false;
        if given.role.is_some() {
            config.role = given.role;
            changed = true;
        }
        if given.class.is_some() {
            config.class = given.class;
            changed = true;
        }
        if !given.features.is_empty() {
            config.features = given.features;
            changed = true;
        }
        if given.inventory_root.is_some() {
            config.inventory_root = given.inventory_root;
            changed = true;
        }
        if changed {
            write_json_atomically(&dir.join(CONFIG_FILE), &config)?;
        }
        Ok(config)
    }
}

/// The installed bundles recorded under `dir`.
pub fn load_installed(dir: &Path) -> Result<Vec<NodeBundle>> {
    let path = dir.join(INSTALLED_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is malformed; fix or remove it", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Records `installed` under `dir` (written whole, then renamed, then the directory synced).
pub fn save_installed(dir: &Path, installed: &[NodeBundle]) -> Result<()> {
    write_json_atomically(&dir.join(INSTALLED_FILE), installed)
}

/// The running OS recorded under `dir`, if any.
pub fn load_running_os(dir: &Path) -> Result<Option<NodeBundle>> {
    let path = dir.join(RUNNING_OS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is malformed; fix or remove it", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Records the running OS under `dir`.
pub fn save_running_os(dir: &Path, running: &NodeBundle) -> Result<()> {
    write_json_atomically(&dir.join(RUNNING_OS_FILE), running)
}

/// Removes the temporary area (test mode) under `dir`; returns true when there was one.
pub fn purge_tmp(dir: &Path) -> Result<bool> {
    let tmp = dir.join(TMP_DIR);
    match std::fs::remove_dir_all(&tmp) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot purge {}", tmp.display())),
    }
}

/// The file in the edge's directory where a running daemon writes its addresses.
pub const DAEMON_FILE: &str = "daemon.json";

/// What a running daemon writes to [`DAEMON_FILE`] (and `--ready-file`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonReady {
    /// Where it serves peers and takes requests.
    pub mesh: String,
    /// Prometheus metrics.
    pub metrics: String,
    /// The daemon's process (absent in files of older daemons).
    #[serde(default)]
    pub pid: Option<u32>,
}

/// The daemon running for the edge under `dir`, if its address file is there and, when the
/// file names a process, that process is alive (a daemon that was killed leaves its file
/// behind; it must not keep the CLI from the store).
pub fn running_daemon(dir: &Path) -> Option<DaemonReady> {
    let text = std::fs::read(dir.join(DAEMON_FILE)).ok()?;
    let ready: DaemonReady = serde_json::from_slice(&text).ok()?;
    match ready.pid {
        Some(pid) if !process_alive(pid) => {
            tracing::debug!(pid, "the daemon file names a process that is gone");
            None
        }
        _ => Some(ready),
    }
}

/// Whether process `pid` runs (exists and is not a zombie), from `/proc/PID/stat`.
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X"))
}

/// Writes `value` as JSON to `path` durably (see [`proto::durable`]), readable by everyone.
pub fn write_json_atomically<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    proto::durable::write_json_atomic(path, value, proto::durable::MODE_READABLE)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_file_of_a_dead_process_names_no_daemon() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ready = DaemonReady {
            mesh: "127.0.0.1:1".into(),
            metrics: "127.0.0.1:2".into(),
            pid: Some(std::process::id()),
        };
        write_json_atomically(&dir.path().join(DAEMON_FILE), &ready).expect("write");
        assert!(running_daemon(dir.path()).is_some(), "this process runs");
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let gone = child.id();
        child.wait().expect("wait");
        ready.pid = Some(gone);
        write_json_atomically(&dir.path().join(DAEMON_FILE), &ready).expect("write");
        assert!(running_daemon(dir.path()).is_none(), "process {gone} ended");
        // A file of an older daemon, without a pid, is taken at its word.
        std::fs::write(
            dir.path().join(DAEMON_FILE),
            r#"{"mesh":"127.0.0.1:1","metrics":"127.0.0.1:2"}"#,
        )
        .expect("write");
        assert!(running_daemon(dir.path()).is_some());
    }

    #[test]
    fn installed_bundles_and_configuration_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load_installed(dir.path()).expect("none").is_empty());
        let list = vec![NodeBundle {
            name: "os".into(),
            version: "1".into(),
            id: proto::BlobHash::of(b"os"),
        }];
        save_installed(dir.path(), &list).expect("save");
        assert_eq!(load_installed(dir.path()).expect("load"), list);

        let given = NodeConfig {
            role: Some("web".into()),
            ..NodeConfig::default()
        };
        let config = NodeConfig::load_with(dir.path(), given).expect("config");
        assert_eq!(config.role.as_deref(), Some("web"));
        // A later start without flags keeps it; a flag replaces one field only.
        let later = NodeConfig::load_with(
            dir.path(),
            NodeConfig {
                class: Some("canary".into()),
                ..NodeConfig::default()
            },
        )
        .expect("later");
        assert_eq!(later.role.as_deref(), Some("web"));
        assert_eq!(later.class.as_deref(), Some("canary"));

        std::fs::create_dir_all(dir.path().join(TMP_DIR).join("x")).expect("tmp");
        assert!(purge_tmp(dir.path()).expect("purge"));
        assert!(!dir.path().join(TMP_DIR).exists());
        assert!(!purge_tmp(dir.path()).expect("again"));
    }
}
