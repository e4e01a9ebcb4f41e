//! The console's sessions: server-side, in memory only (a restarted origin logs everyone out),
//! bounded in count, each with an idle and an absolute expiry.
//!
//! A session id is 256 random bits, sent to the browser only in an HttpOnly cookie; the CSRF
//! token is another 256 random bits, put in the page and required on every state-changing
//! request. Each session remembers a fingerprint of its account's password hash and role, so
//! replacing an account (`origin admin add` again) ends its sessions at their next request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;

use crate::db::AccountRole;

/// A session unused this long ends.
pub const SESSION_IDLE: Duration = Duration::from_secs(60 * 60);

/// A session ends this long after login, however busy.
pub const SESSION_MAX_AGE: Duration = Duration::from_secs(12 * 60 * 60);

/// Most sessions held at once; a login past it ends the least recently used one.
pub const MAX_SESSIONS: usize = 4096;

/// Random bytes in a session id and in a CSRF token.
pub const TOKEN_BYTES: usize = 32;

/// One logged-in browser.
#[derive(Clone, Debug)]
pub struct Session {
    /// The account's name.
    pub account: String,
    /// What it may do.
    pub role: AccountRole,
    /// The token every state-changing request must carry.
    pub csrf: String,
    /// BLAKE3 of the account's role and password hash at login.
    pub account_fingerprint: [u8; 32],
    created: Instant,
    last_used: Instant,
}

/// Every live session, by id.
#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

/// 256 random bits as 64 lowercase hex digits.
pub fn random_token() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// What a session remembers of its account, to notice a replaced password or role.
pub fn account_fingerprint(role: AccountRole, password_hash: &str) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(role.name().as_bytes());
    hasher.update(&[0]);
    hasher.update(password_hash.as_bytes());
    *hasher.finalize().as_bytes()
}

/// Compares two tokens in time that depends only on their lengths.
pub fn tokens_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Sessions {
    /// Opens a session for `account` at `now`; returns its id (the cookie's value).
    pub fn create(
        &self,
        account: &str,
        role: AccountRole,
        account_fingerprint: [u8; 32],
        now: Instant,
    ) -> (String, Session) {
        let id = random_token();
        let session = Session {
            account: account.to_owned(),
            role,
            csrf: random_token(),
            account_fingerprint,
            created: now,
            last_used: now,
        };
        let mut by_id = self.lock();
        by_id.retain(|_, s| live(s, now));
        while by_id.len() >= MAX_SESSIONS {
            let Some(oldest) = by_id
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            by_id.remove(&oldest);
        }
        by_id.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The live session `id` at `now` (and marks it used); `None` for an unknown, malformed or
    /// expired id (an expired one is dropped).
    pub fn get(&self, id: &str, now: Instant) -> Option<Session> {
        if id.len() != 2 * TOKEN_BYTES || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut by_id = self.lock();
        let session = by_id.get_mut(id)?;
        if !live(session, now) {
            by_id.remove(id);
            return None;
        }
        session.last_used = now;
        Some(session.clone())
    }

    /// Ends session `id`.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// How many sessions are held (live or not yet pruned).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn live(session: &Session, now: Instant) -> bool {
    now.saturating_duration_since(session.last_used) < SESSION_IDLE
        && now.saturating_duration_since(session.created) < SESSION_MAX_AGE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_when_idle_and_at_their_max_age() {
        let sessions = Sessions::default();
        let t0 = Instant::now();
        let (id, session) = sessions.create("alice", AccountRole::Admin, [1; 32], t0);
        assert_eq!(id.len(), 64);
        assert_ne!(id, session.csrf);
        assert!(sessions.get(&id, t0 + SESSION_IDLE / 2).is_some());
        // Used at IDLE/2, so still live just before IDLE/2 + IDLE.
        assert!(sessions.get(&id, t0 + SESSION_IDLE).is_some());
        assert!(sessions.get(&id, t0 + SESSION_IDLE * 3).is_none());
        assert!(sessions.is_empty(), "an expired session is dropped");

        let (id, _) = sessions.create("bob", AccountRole::Viewer, [2; 32], t0);
        let mut t = t0;
        while t < t0 + SESSION_MAX_AGE - SESSION_IDLE {
            t += SESSION_IDLE / 2;
            assert!(sessions.get(&id, t).is_some());
        }
        assert!(sessions.get(&id, t0 + SESSION_MAX_AGE).is_none());
    }

    #[test]
    fn forged_and_malformed_ids_find_nothing() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let (id, _) = sessions.create("alice", AccountRole::Admin, [1; 32], now);
        assert!(sessions.get(&random_token(), now).is_none());
        assert!(sessions.get("", now).is_none());
        assert!(sessions.get(&id[..63], now).is_none());
        assert!(sessions.get(&format!("{}ü", &id[..62]), now).is_none());
        sessions.remove(&id);
        assert!(sessions.get(&id, now).is_none());
    }

    #[test]
    fn tokens_compare_by_value() {
        assert!(tokens_equal("abc", "abc"));
        assert!(!tokens_equal("abc", "abd"));
        assert!(!tokens_equal("abc", "abcd"));
        assert_ne!(
            account_fingerprint(AccountRole::Admin, "h"),
            account_fingerprint(AccountRole::Viewer, "h")
        );
    }
}
