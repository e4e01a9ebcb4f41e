//! The origin's catalog: every published bundle in publish order, with its sequence number.
//!
//! An append-only JSON-lines file, fsynced per entry. Sequence numbers start at 1 and let a
//! stager that reconnects ask for "everything after N". A torn last line (power cut mid-append)
//! is ignored on load and overwritten by the next append.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use proto::wire::BundleInfo;

/// The catalog file and its entries in memory.
pub struct Catalog {
    path: PathBuf,
    entries: Mutex<Vec<BundleInfo>>,
}

impl Catalog {
    /// Opens (or creates) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let mut entries = Vec::new();
        let mut valid_len = 0usize;
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.split_inclusive('\n') {
                if !line.ends_with('\n') {
                    tracing::warn!(path = %path.display(), "ignoring a torn last catalog line");
                    break;
                }
                match serde_json::from_str::<BundleInfo>(line.trim_end()) {
                    Ok(info) => {
                        entries.push(info);
                        valid_len += line.len();
                    }
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "ignoring a bad catalog line and what follows");
                        break;
                    }
                }
            }
            // Drop whatever followed the last good line so appends stay parseable.
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("cannot open catalog {}", path.display()))?;
            file.set_len(valid_len as u64)?;
        }
        Ok(Self {
            path: path.to_owned(),
            entries: Mutex::new(entries),
        })
    }

    /// Every entry, oldest first.
    pub fn all(&self) -> Vec<BundleInfo> {
        self.entries.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Entries with a sequence number above `after_seq`.
    pub fn after(&self, after_seq: u64) -> Vec<BundleInfo> {
        self.all()
            .into_iter()
            .filter(|b| b.seq > after_seq)
            .collect()
    }

    /// The entry named `name` at `version`, or at its newest version when none is given (see
    /// [`proto::version`]; the latest published among equal versions).
    pub fn resolve(&self, name: &str, version: Option<&str>) -> Option<BundleInfo> {
        let entries = self.all();
        let named = entries
            .iter()
            .filter(|b| b.name == name && version.is_none_or(|v| b.version == v));
        proto::version::newest_by(named, |b| &b.version).cloned()
    }

    /// Appends `info` with the next sequence number and returns it; a bundle already in the
    /// catalog is returned as it is (publishing is idempotent).
    pub fn append(&self, mut info: BundleInfo) -> Result<BundleInfo> {
        let mut entries = self
            .entries
            .lock()
            .map_err(|_| anyhow::anyhow!("catalog lock poisoned"))?;
        if let Some(existing) = entries.iter().find(|b| b.id == info.id) {
            return Ok(existing.clone());
        }
        info.seq = entries.last().map_or(1, |b| b.seq + 1);
        let mut line = serde_json::to_string(&info)?;
        line.push('\n');
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open catalog {}", self.path.display()))?;
        file.write_all(line.as_bytes())
            .and_then(|_| file.sync_data())
            .with_context(|| format!("cannot append to catalog {}", self.path.display()))?;
        entries.push(info.clone());
        Ok(info)
    }
}
