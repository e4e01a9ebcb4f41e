//! The swap journal on disk: one JSON file in the storage area, replaced atomically.

use std::path::{Path, PathBuf};

use super::fault;
use super::fsutil::{self, FsError};
use super::identity::SWAP_DIR;
use super::machine::{SwapState, JOURNAL_FORMAT};

/// The journal's file name under the storage area's swap directory.
pub const JOURNAL_FILE: &str = "journal.json";

/// Largest journal accepted, in bytes (a plan with every bound at its maximum is far smaller).
pub const MAX_JOURNAL_BYTES: usize = 1024 * 1024;

/// Why the journal cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A filesystem operation failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The file is not a journal this build reads.
    #[error("swap journal {path} is unreadable ({detail}); inspect it, and if no swap is running move it aside to start afresh")]
    Corrupt {
        /// The journal file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
}

/// The journal of the machine whose storage area is `storage`.
#[derive(Clone, Debug)]
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    /// The journal under `storage` (not read yet).
    pub fn in_storage(storage: &Path) -> Self {
        Self {
            path: storage.join(SWAP_DIR).join(JOURNAL_FILE),
        }
    }

    /// The journal file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded state; `None` when no swap was ever journaled.
    pub fn load(&self) -> Result<Option<SwapState>, JournalError> {
        let Some(bytes) = fsutil::read_optional(&self.path)? else {
            return Ok(None);
        };
        if bytes.len() > MAX_JOURNAL_BYTES {
            return Err(self.corrupt(format!(
                "{} bytes, more than the limit of {MAX_JOURNAL_BYTES}",
                bytes.len()
            )));
        }
        let state: SwapState =
            serde_json::from_slice(&bytes).map_err(|e| self.corrupt(e.to_string()))?;
        if state.format != JOURNAL_FORMAT {
            return Err(self.corrupt(format!(
                "format {} (this build reads {JOURNAL_FORMAT})",
                state.format
            )));
        }
        Ok(Some(state))
    }

    /// Records `state`: durable when this returns, atomic against power cuts.
    pub fn save(&self, state: &SwapState) -> Result<(), JournalError> {
        if let Some(dir) = self.path.parent() {
            fsutil::create_dirs(dir)?;
        }
        // Plain data: serializing cannot fail.
        let bytes = serde_json::to_vec_pretty(state).unwrap_or_default();
        fsutil::write_atomic(&self.path, &bytes, 0o600)?;
        tracing::debug!(step = state.step.name(), "journaled");
        fault::op_point("journal write");
        Ok(())
    }

    fn corrupt(&self, detail: String) -> JournalError {
        JournalError::Corrupt {
            path: self.path.clone(),
            detail,
        }
    }
}
