//! Web console accounts (issue 17): names, password rules and Argon2id hashes, shared by
//! `origin admin add` (which hashes, so the password never leaves the command), the control
//! plane (which checks the hash it is sent and stores it in the `accounts` table) and the
//! console (which verifies logins).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Longest account name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// Shortest password accepted, in characters.
pub const MIN_PASSWORD_CHARS: usize = 12;

/// Longest password accepted, in bytes (Argon2 takes any length; a bound keeps a login
/// request's work bounded).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Longest stored hash accepted, in bytes (a default Argon2id PHC string is ~100).
pub const MAX_HASH_BYTES: usize = 256;

/// What is wrong with an account's name, password or hash.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// A name outside `[A-Za-z0-9._-]{1,64}`.
    #[error("account name `{0}` must be 1 to 64 letters, digits, `.`, `_` or `-`")]
    BadName(String),
    /// A password too short or too long.
    #[error("the password must have at least {MIN_PASSWORD_CHARS} characters and at most {MAX_PASSWORD_BYTES} bytes")]
    BadPassword,
    /// A hash that is not an Argon2id PHC string.
    #[error("the password hash is not an Argon2id PHC string: {0}")]
    BadHash(String),
    /// Hashing failed (Argon2's own error).
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// Checks an account name.
pub fn check_name(name: &str) -> Result<(), AccountError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AccountError::BadName(name.chars().take(80).collect()))
    }
}

/// Checks a new password's length.
pub fn check_password(password: &str) -> Result<(), AccountError> {
    if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > MAX_PASSWORD_BYTES {
        return Err(AccountError::BadPassword);
    }
    Ok(())
}

/// The Argon2id hash (default parameters, random 16-byte salt) of `password`, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, AccountError> {
    check_password(password)?;
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AccountError::Hash(e.to_string()))
}

/// Checks that `hash` is an Argon2id PHC string this origin can verify against.
pub fn check_hash(hash: &str) -> Result<(), AccountError> {
    if hash.len() > MAX_HASH_BYTES {
        return Err(AccountError::BadHash(format!(
            "{} bytes, more than {MAX_HASH_BYTES}",
            hash.len()
        )));
    }
    let parsed = PasswordHash::new(hash).map_err(|e| AccountError::BadHash(e.to_string()))?;
    if parsed.algorithm != argon2::Algorithm::Argon2id.ident() {
        return Err(AccountError::BadHash(format!(
            "algorithm `{}`",
            parsed.algorithm
        )));
    }
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err(AccountError::BadHash("no salt or no output".into()));
    }
    Ok(())
}

/// Whether `password` matches the PHC string `hash`. A hash that does not parse matches no
/// password. CPU-heavy (tens of milliseconds): call it off the async threads.
pub fn verify_password(password: &str, hash: &str) -> bool {
    if password.len() > MAX_PASSWORD_BYTES {
        return false;
    }
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_are_argon2id() {
        let hash = hash_password("correct horse battery").expect("hash");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        check_hash(&hash).expect("argon2id");
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("correct horse battery!", &hash));
        assert!(!verify_password("correct horse battery", "not a hash"));
        // Two hashes of one password differ (random salt).
        assert_ne!(hash, hash_password("correct horse battery").expect("hash"));
    }

    #[test]
    fn refuses_bad_names_passwords_and_hashes() {
        check_name("ops.alice-1_b").expect("good name");
        for bad in ["", "a b", "ünï", "a/b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(hash_password("short"), Err(AccountError::BadPassword));
        assert!(check_hash("$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g").is_err());
        assert!(check_hash("plain text").is_err());
    }
}
