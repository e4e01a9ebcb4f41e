//! `origin admin add`, server side: a console account in the `accounts` table, written with its
//! audit record in one synced batch. The command carries the Argon2id hash, never a password.

// CommandError carries the policy's own errors whole (see `commands`); built once per request.
#![allow(clippy::result_large_err)]

use proto::net::{PeerIdentity, Role};
use proto::wire::ControlReply;

use super::{CommandError, ControlPlane};
use crate::accounts;
use crate::db::{now_ms, AccountRecord, AccountRole, Audit, Put};

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
        let _change = self.one_change();
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
        self.db.commit(
            &[Put::Account(Box::new(record))],
            Some(who(action, format!("{name} ({role})"))),
        )?;
        let verb = if replaced { "replaced" } else { "added" };
        Ok(ControlReply {
            success: true,
            text: format!("console account {name} ({role}) {verb}\n"),
            json: serde_json::json!({ "name": name, "role": role.name(), "replaced": replaced })
                .to_string(),
        })
    }
}
