//! One-time enrollment secrets, in the control-plane store (table [`crate::db::TOKENS`]), so
//! that any origin sharing the store redeems a token, and only once.
//!
//! `origin enroll` asks the running origin, which draws the secret, records its hash with what
//! it grants ([`TokenRecord`], audited `token.issue`) and prints a token naming every origin's
//! enrollment address and the CA's fingerprint. The enrollment server spends the record in one
//! change with its audit record ([`redeem`]): two origins redeeming one token at once commit
//! one change between them, the other sees it gone. The store holds only the BLAKE3 of each
//! secret. Token files an older origin left in `tokens/` are moved into the store once
//! ([`import_files`]).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::net::{Role, Site};
use serde::{Deserialize, Serialize};

use crate::db::{Audit, Commit, Db, DbError, Put};

/// How long a token stays valid.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A token not yet redeemed: what it grants, never the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// BLAKE3 of the secret, hex: the record's key.
    pub key: String,
    /// Role of the certificate to issue.
    pub role: String,
    /// Site of the certificate to issue.
    pub site: String,
    /// Seconds since the epoch after which the token is refused.
    pub expires_unix_s: u64,
    /// The origin that issued it (its node id), or `file` for one imported from `tokens/`.
    pub issued_by: String,
}

impl TokenRecord {
    /// A record for `secret`, granting `role` in `site` for [`TOKEN_LIFETIME`].
    pub fn new(secret: &[u8; 32], role: Role, site: &Site, issued_by: &str) -> Self {
        TokenRecord {
            key: key_for(secret),
            role: role.as_str().to_owned(),
            site: site.as_str().to_owned(),
            expires_unix_s: now_s() + TOKEN_LIFETIME.as_secs(),
            issued_by: issued_by.to_owned(),
        }
    }

    /// The first hex digits of the key: names the token in audit records and logs.
    pub fn short(&self) -> &str {
        self.key.get(..12).unwrap_or(&self.key)
    }
}

/// The store key of `secret`: its BLAKE3, so neither the store nor a directory listing holds
/// a usable token.
pub fn key_for(secret: &[u8; 32]) -> String {
    blake3::hash(secret).to_hex().to_string()
}

/// `a stager`, `an edge`: a role with its article, for audit records.
pub fn a_role(role: &str) -> String {
    if role.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {role}")
    } else {
        format!("a {role}")
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Why an enrollment token grants nothing.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Never issued, or redeemed already (at this origin or another).
    #[error("unknown or already used enrollment token")]
    Unknown,
    /// Past its expiry (the record is removed).
    #[error("enrollment token expired; ask for a new one with `origin enroll`")]
    Expired,
    /// The store cannot be read or changed now; the token is not spent.
    #[error("the control-plane store cannot redeem the token now ({0}); the token is not spent, try again")]
    Store(#[from] DbError),
    /// Its record names a role or site that is not valid.
    #[error(transparent)]
    Grant(#[from] proto::net::NetError),
    /// Its record names a role that does not exist.
    #[error(transparent)]
    Role(#[from] proto::role::UnknownRole),
}

/// Redeems `secret` at the origin `origin` for a node at `remote`: removes its record in one
/// change with the audit record, and returns what it grants, or why not. A second use, here or
/// at another origin, is [`TokenError::Unknown`].
pub fn redeem(
    db: &Db,
    secret: &[u8; 32],
    origin: &str,
    remote: std::net::SocketAddr,
) -> Result<(Role, Site), TokenError> {
    let key = key_for(secret);
    let (record, expired) = db.change(|| {
        let Some(record) = db.token(&key)? else {
            return Err(TokenError::Unknown);
        };
        let expired = now_s() > record.expires_unix_s;
        let audit = if expired {
            Audit::new(
                remote.to_string(),
                &record.role,
                "token.expired",
                format!(
                    "token {} for {} in {} was presented after it expired; removed",
                    record.short(),
                    a_role(&record.role),
                    record.site
                ),
            )
        } else {
            Audit::new(
                remote.to_string(),
                &record.role,
                "token.redeem",
                format!(
                    "token {} enrolled {} in {} at origin {origin}",
                    record.short(),
                    a_role(&record.role),
                    record.site
                ),
            )
        };
        Ok(Commit::new(
            vec![Put::SpendToken(key.clone())],
            Some(audit),
            (record, expired),
        ))
    })?;
    if expired {
        return Err(TokenError::Expired);
    }
    let role = record.role.parse::<Role>()?;
    let site = Site::new(record.site)?;
    Ok((role, site))
}

/// Removes the tokens that expired without being redeemed (one audited change when there are
/// any), so the table holds only tokens that can still enroll. Returns how many went.
pub fn prune_expired(db: &Db) -> Result<usize, DbError> {
    db.change(|| {
        let now = now_s();
        let expired: Vec<TokenRecord> = db
            .tokens()?
            .into_iter()
            .filter(|record| now > record.expires_unix_s)
            .collect();
        if expired.is_empty() {
            return Ok(Commit::none(0));
        }
        let count = expired.len();
        let puts = expired
            .iter()
            .map(|record| Put::SpendToken(record.key.clone()))
            .collect();
        let names: Vec<&str> = expired.iter().take(10).map(TokenRecord::short).collect();
        Ok(Commit::new(
            puts,
            Some(Audit::new(
                "origin",
                "origin",
                "token.prune",
                format!(
                    "{count} enrollment tokens expired unredeemed and were removed ({}{})",
                    names.join(", "),
                    if count > names.len() { ", ..." } else { "" }
                ),
            )),
            count,
        ))
    })
}

/// What a token file of an older origin held.
#[derive(Deserialize)]
struct PendingFile {
    role: String,
    site: String,
    expires_unix_s: u64,
}

/// Moves the token files an older origin left in `dir` into the store (one audited change),
/// renaming each to `*.imported`, so tokens it printed still enroll. Returns how many.
pub fn import_files(dir: &Path, db: &Db) -> anyhow::Result<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let path = entry.path();
        let pending: PendingFile = match std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| serde_json::from_slice(&bytes).map_err(anyhow::Error::from))
        {
            Ok(pending) => pending,
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "an old token file is unreadable; left as it is");
                continue;
            }
        };
        found.push((
            path,
            TokenRecord {
                key: name,
                role: pending.role,
                site: pending.site,
                expires_unix_s: pending.expires_unix_s,
                issued_by: "file".to_owned(),
            },
        ));
    }
    if found.is_empty() {
        return Ok(0);
    }
    let count = found.len();
    db.change(|| -> Result<_, DbError> {
        let mut puts = Vec::new();
        for (_, record) in &found {
            if db.token(&record.key)?.is_none() {
                puts.push(Put::Token(Box::new(record.clone())));
            }
        }
        Ok(Commit::new(
            puts,
            Some(Audit::new(
                "origin",
                "origin",
                "token.import",
                format!(
                    "{count} unredeemed enrollment tokens moved from {} into the store",
                    dir.display()
                ),
            )),
            (),
        ))
    })?;
    for (path, _) in &found {
        let imported = path.with_extension("imported");
        if let Err(error) = std::fs::rename(path, &imported) {
            tracing::warn!(file = %path.display(), %error, "cannot rename an imported token file");
        }
    }
    tracing::info!(count, dir = %dir.display(), "enrollment token files moved into the store");
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&dir.path().join("db")).expect("db");
        (dir, db)
    }

    fn site(name: &str) -> Site {
        Site::new(name).expect("site")
    }

    #[test]
    fn a_token_redeems_once_and_an_expired_one_never() {
        let (_dir, db) = db();
        let secret = [3u8; 32];
        let record = TokenRecord::new(&secret, Role::Edge, &site("fra1"), "o1");
        db.commit(&[Put::Token(Box::new(record))], None)
            .expect("issue");
        let addr = "127.0.0.1:9".parse().expect("addr");
        let (role, granted) = redeem(&db, &secret, "o1", addr).expect("redeem");
        assert_eq!((role, granted.as_str()), (Role::Edge, "fra1"));
        assert!(matches!(
            redeem(&db, &secret, "o2", addr),
            Err(TokenError::Unknown)
        ));
        assert!(matches!(
            redeem(&db, &[4u8; 32], "o1", addr),
            Err(TokenError::Unknown)
        ));

        let old = [5u8; 32];
        let mut record = TokenRecord::new(&old, Role::Stager, &site("fra1"), "o1");
        record.expires_unix_s = now_s() - 1;
        db.commit(&[Put::Token(Box::new(record))], None)
            .expect("issue");
        assert!(matches!(
            redeem(&db, &old, "o1", addr),
            Err(TokenError::Expired)
        ));
        assert!(db.token(&key_for(&old)).expect("read").is_none());
        let actions: Vec<String> = db
            .audit(10)
            .expect("audit")
            .into_iter()
            .map(|r| r.action)
            .collect();
        assert!(actions.contains(&"token.redeem".to_owned()), "{actions:?}");
        assert!(actions.contains(&"token.expired".to_owned()), "{actions:?}");
    }

    #[test]
    fn expired_tokens_are_pruned_and_live_ones_kept() {
        let (_dir, db) = db();
        let mut old = TokenRecord::new(&[1u8; 32], Role::Edge, &site("fra1"), "o1");
        old.expires_unix_s = now_s() - 1;
        let live = TokenRecord::new(&[2u8; 32], Role::Edge, &site("fra1"), "o1");
        db.commit(
            &[
                Put::Token(Box::new(old.clone())),
                Put::Token(Box::new(live.clone())),
            ],
            None,
        )
        .expect("issue");
        assert_eq!(prune_expired(&db).expect("prune"), 1);
        assert_eq!(db.tokens().expect("tokens"), vec![live]);
        assert_eq!(prune_expired(&db).expect("again"), 0);
        let audit = db.audit(10).expect("audit");
        assert_eq!(
            audit.iter().filter(|r| r.action == "token.prune").count(),
            1,
            "{audit:?}"
        );
        assert!(audit.iter().any(|r| r.detail.contains(old.short())));
    }

    #[test]
    fn token_files_of_an_older_origin_move_into_the_store() {
        let (dir, db) = db();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens).expect("dir");
        let secret = [7u8; 32];
        std::fs::write(
            tokens.join(key_for(&secret)),
            format!(
                r#"{{"role":"stager","site":"ams2","expires_unix_s":{}}}"#,
                now_s() + 60
            ),
        )
        .expect("write");
        std::fs::write(tokens.join(format!("{}.used", key_for(&[8u8; 32]))), "{}").expect("write");
        assert_eq!(import_files(&tokens, &db).expect("import"), 1);
        assert_eq!(import_files(&tokens, &db).expect("again"), 0);
        let addr = "127.0.0.1:9".parse().expect("addr");
        let (role, granted) = redeem(&db, &secret, "o1", addr).expect("redeem");
        assert_eq!((role, granted.as_str()), (Role::Stager, "ams2"));
    }
}
