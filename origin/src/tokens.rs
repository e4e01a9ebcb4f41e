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

/// Why an enrollment token grants nothing.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Never issued here, or consumed already.
    #[error("unknown or already used enrollment token")]
    Unknown,
    /// Its record cannot be read.
    #[error("cannot read token record: {0}")]
    Read(std::io::Error),
    /// Its record does not decode.
    #[error("corrupt token record: {0}")]
    Corrupt(serde_json::Error),
    /// Past its expiry.
    #[error("enrollment token expired; ask for a new one with `origin enroll`")]
    Expired,
    /// Its record names a role or site that is not valid.
    #[error(transparent)]
    Grant(#[from] proto::net::NetError),
    /// Its record names a role that does not exist.
    #[error(transparent)]
    Role(#[from] proto::role::UnknownRole),
}

/// Consumes `secret`: returns what it grants, or why not. A second use fails.
pub fn consume(dir: &Path, secret: &[u8; 32]) -> std::result::Result<(Role, Site), TokenError> {
    let path: PathBuf = dir.join(name_for(secret));
    let claimed = path.with_extension("used");
    std::fs::rename(&path, &claimed).map_err(|_| TokenError::Unknown)?;
    let bytes = std::fs::read(&claimed).map_err(TokenError::Read)?;
    let pending: PendingToken = serde_json::from_slice(&bytes).map_err(TokenError::Corrupt)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    if now > pending.expires_unix_s {
        return Err(TokenError::Expired);
    }
    let role = pending.role.parse::<Role>()?;
    let site = Site::new(pending.site)?;
    Ok((role, site))
}

/// Fails with context if the tokens directory is unusable.
pub fn check_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}
