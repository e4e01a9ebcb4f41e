//! `origin admin add|list|remove`, server side: console accounts in the `accounts` table, each
//! change written with its audit record in one synced batch. The add command carries the
//! Argon2id hash, never a password; the list never shows hashes. Only the origin's own
//! certificate may do any of it.

// CommandError carries the policy's own errors whole (see `commands`); built once per request.
#![allow(clippy::result_large_err)]

use proto::net::{PeerIdentity, Role};
use proto::wire::ControlReply;

use super::{CommandError, ControlPlane};
use crate::accounts;
use crate::db::{now_ms, AccountRecord, AccountRole, Audit, Commit, Put};

impl ControlPlane {
    /// Adds or replaces the console account `name` with `role` and `password_hash`.
    pub(super) fn account_add(
        &self,
        peer: &PeerIdentity,
        name: &str,
        role: &str,
        password_hash: &str,
        who: impl Fn(&str, String) -> Audit,
    ) -> Result<ControlReply, CommandError> {
        if peer.role != Role::Origin {
            return Err(CommandError::AccountsNeedOrigin);
        }
        accounts::check_name(name)?;
        accounts::check_hash(password_hash)?;
        let role: AccountRole = role.parse().map_err(CommandError::BadRole)?;
        let replaced = self.db.change(|| {
            let replaced = self.db.account(name)?.is_some();
            let record = AccountRecord {
                name: name.to_owned(),
                role,
                password_hash: password_hash.to_owned(),
                updated_ms: now_ms(),
            };
            let action = if replaced {
                "account.replace"
            } else {
                "account.add"
            };
            let audit = who(action, format!("{name} ({role})"));
            Ok::<_, CommandError>(Commit::new(
                vec![Put::Account(Box::new(record))],
                Some(audit),
                replaced,
            ))
        })?;
        let verb = if replaced { "replaced" } else { "added" };
        Ok(ControlReply {
            success: true,
            text: format!("console account {name} ({role}) {verb}\n"),
            json: serde_json::json!({ "name": name, "role": role.name(), "replaced": replaced })
                .to_string(),
        })
    }

    /// The console accounts, by name.
    pub(super) fn account_list(&self, peer: &PeerIdentity) -> Result<ControlReply, CommandError> {
        if peer.role != Role::Origin {
            return Err(CommandError::AccountsNeedOrigin);
        }
        let accounts = self.db.accounts()?;
        let mut text = String::new();
        if accounts.is_empty() {
            text.push_str(
                "no console accounts; add one with `origin admin add NAME --role admin`\n",
            );
        }
        for account in &accounts {
            text.push_str(&format!(
                "{:<24} {:<7} set {}\n",
                account.name,
                account.role.name(),
                super::render::utc(account.updated_ms)
            ));
        }
        let json: Vec<serde_json::Value> = accounts
            .iter()
            .map(|a| {
                serde_json::json!({
                    "name": a.name,
                    "role": a.role.name(),
                    "updated_ms": a.updated_ms,
                })
            })
            .collect();
        Ok(ControlReply {
            success: true,
            text,
            json: serde_json::Value::from(json).to_string(),
        })
    }

    /// Removes the console account `name`; its sessions end at their next request (every
    /// request reads the account).
    pub(super) fn account_remove(
        &self,
        peer: &PeerIdentity,
        name: &str,
        who: impl Fn(&str, String) -> Audit,
    ) -> Result<ControlReply, CommandError> {
        if peer.role != Role::Origin {
            return Err(CommandError::AccountsNeedOrigin);
        }
        accounts::check_name(name)?;
        self.db.change(|| {
            let Some(account) = self.db.account(name)? else {
                return Err(CommandError::NoSuchAccount(name.to_owned()));
            };
            let audit = who(
                "account.remove",
                format!("{name} ({})", account.role.name()),
            );
            Ok(Commit::new(
                vec![Put::RemoveAccount(name.to_owned())],
                Some(audit),
                (),
            ))
        })?;
        Ok(ControlReply {
            success: true,
            text: format!("console account {name} removed; its sessions have ended\n"),
            json: serde_json::json!({ "name": name, "removed": true }).to_string(),
        })
    }
}
