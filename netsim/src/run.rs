//! What every run of the real binaries shares, whether `netsim demo`, `netsim emulate` or
//! `netsim compare --emulate` starts it: the work directory that holds its state and logs, and
//! the error that says it was interrupted.
//!
//! A leaf module: it uses no other module of netsim, so [`crate::emulate`] and
//! [`crate::demo`] both build on it and neither depends on the other for it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Subdirectory of a work directory that holds one log file per process (and the demo's own
/// `netsim.log`).
pub const LOGS_DIR: &str = "logs";

/// The run was stopped with Ctrl-C (SIGINT); `netsim` exits with 130 for it, as shells do.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Where a run keeps its state (a directory per node) and its logs ([`LOGS_DIR`]): a directory
/// the user named, or `run/` in a temporary directory that is removed with this value.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    /// The temporary directory `path` lives in, when the user named none.
    temp: Option<tempfile::TempDir>,
}

impl WorkDir {
    /// `given`, created if missing and checked empty, or `run/` in a new temporary directory
    /// named `prefix…`. Fails when `given` holds anything, so a run never mixes with an
    /// earlier one.
    pub fn create(given: Option<&Path>, prefix: &str) -> Result<WorkDir> {
        let (path, temp) = match given {
            Some(dir) => (dir.to_path_buf(), None),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix(prefix)
                    .tempdir()
                    .context("cannot create a temporary directory")?;
                (temp.path().join("run"), Some(temp))
            }
        };
        ensure_empty_dir(&path)?;
        Ok(WorkDir { path, temp })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory of the run's log files.
    pub fn logs(&self) -> PathBuf {
        self.path.join(LOGS_DIR)
    }

    /// Whether the directory is a temporary one, removed when this value is dropped.
    pub fn is_temporary(&self) -> bool {
        self.temp.is_some()
    }

    /// Ends the run's use of the directory but keeps its logs where [`WorkDir::logs`] said:
    /// a temporary directory loses everything else (state, stores, the generated tree); a
    /// directory the user named stays whole.
    pub fn keep_logs(self) -> Result<PathBuf> {
        let logs = self.logs();
        let Some(temp) = self.temp else {
            return Ok(logs);
        };
        let entries = std::fs::read_dir(&self.path)
            .with_context(|| format!("cannot list {}", self.path.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", self.path.display()))?;
            if entry.file_name() == LOGS_DIR {
                continue;
            }
            let path = entry.path();
            let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| format!("cannot remove {}", path.display()))?;
        }
        // The temporary directory now holds only the logs; it outlives this value.
        let _kept = temp.keep();
        Ok(logs)
    }
}

/// Creates `dir`, or checks that it is empty, so a run never mixes with an earlier one.
pub fn ensure_empty_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    if entries.next().is_some() {
        bail!(
            "work directory {} is not empty: give a new or empty directory",
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temporary_work_dir_keeps_only_its_logs() {
        let work = WorkDir::create(None, "netsim-run-test-").expect("work dir");
        assert!(work.is_temporary());
        std::fs::create_dir_all(work.logs()).expect("logs");
        std::fs::write(work.logs().join("origin.log"), "started\n").expect("log");
        std::fs::create_dir_all(work.path().join("tree/etc")).expect("tree");
        std::fs::write(work.path().join("tree/etc/os-release"), "x").expect("file");
        std::fs::write(work.path().join("origin.ready.json"), "{}").expect("file");
        let root = work.path().parent().expect("temp root").to_path_buf();

        let logs = work.keep_logs().expect("keep logs");
        let left: Vec<String> = std::fs::read_dir(logs.parent().expect("run dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, [LOGS_DIR]);
        assert_eq!(
            std::fs::read_to_string(logs.join("origin.log")).expect("log kept"),
            "started\n"
        );
        std::fs::remove_dir_all(root).expect("clean up");
    }

    #[test]
    fn a_named_work_dir_must_be_empty() {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("demo");
        let work = WorkDir::create(Some(&dir), "unused-").expect("a new directory");
        assert!(!work.is_temporary());
        std::fs::write(dir.join("leftover"), "x").expect("file");
        drop(work);
        assert!(dir.join("leftover").exists(), "a named directory is kept");
        assert!(WorkDir::create(Some(&dir), "unused-").is_err());
    }
}
