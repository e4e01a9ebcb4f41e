//! One-time enrollment secrets, as files: `origin enroll` writes one, the enrollment server
//! consumes it with an atomic rename, so each token enrolls exactly one node.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use proto::net::{Role, Site};
use serde::{Deserialize, Serialize};

/// How long a token stays valid.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// What a pending secret grants.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PendingToken {
    /// Role of the certificate to issue.
    pub role: String,
    /// Site of the certificate to issue.
    pub site: String,
    /// Seconds since the epoch after which the token is refused.
    pub expires_unix_s: u64,
}

fn name_for(secret: &[u8; 32]) -> String {
    // The file name is a hash of the secret, so the directory listing does not leak tokens.
    blake3::hash(secret).to_hex().to_string()
}

/// Records `secret` as granting `role` in `site`.
pub fn record(dir: &Path, secret: &[u8; 32], role: Role, site: &Site) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let expires = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        + TOKEN_LIFETIME.as_secs();
    let pending = PendingToken {
        role: role.as_str().to_owned(),
        site: site.as_str().to_owned(),
        expires_unix_s: expires,
    };
    proto::durable::write_json_atomic(
        &dir.join(name_for(secret)),
        &pending,
        proto::durable::MODE_PRIVATE,
    )?;
    Ok(())
}

/// Consumes `secret`: returns what it grants, or why not. A second use fails.
pub fn consume(dir: &Path, secret: &[u8; 32]) -> std::result::Result<(Role, Site), String> {
    let path: PathBuf = dir.join(name_for(secret));
    let claimed = path.with_extension("used");
    std::fs::rename(&path, &claimed)
        .map_err(|_| "unknown or already used enrollment token".to_owned())?;
    let bytes = std::fs::read(&claimed).map_err(|e| format!("cannot read token record: {e}"))?;
    let pending: PendingToken =
        serde_json::from_slice(&bytes).map_err(|e| format!("corrupt token record: {e}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    if now > pending.expires_unix_s {
        return Err("enrollment token expired; ask for a new one with `origin enroll`".into());
    }
    let role = pending.role.parse::<Role>().map_err(|e| e.to_string())?;
    let site = Site::new(pending.site).map_err(|e| e.to_string())?;
    Ok((role, site))
}

/// Fails with context if the tokens directory is unusable.
pub fn check_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}
