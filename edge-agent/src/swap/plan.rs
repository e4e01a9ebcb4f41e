//! What a swap is asked to do: the bundles, the identity to carry over, the health checks.
//!
//! Pure data, recorded in the journal so that every boot of the procedure works from the same
//! plan, whatever the command line of that boot was.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use proto::BundleId;
use serde::{Deserialize, Serialize};

/// Trial boots of the new OS before the firmware falls back to the rescue slot.
pub const DEFAULT_BOOT_ATTEMPTS: u8 = 3;

/// Largest accepted number of trial boots.
pub const MAX_BOOT_ATTEMPTS: u8 = 10;

/// Largest accepted number of identity paths.
pub const MAX_IDENTITY_PATHS: usize = 64;

/// Largest accepted number of health checks.
pub const MAX_HEALTH_CHECKS: usize = 32;

/// The identity carried from the old OS into the new one when none is configured: network
/// configuration, SSH host keys, the agent's own keys and ACLs. Paths are relative to a slot's
/// root; a path absent on the old OS is skipped.
pub const DEFAULT_IDENTITY_PATHS: &[&str] = &[
    "etc/hostname",
    "etc/hosts",
    "etc/network/interfaces",
    "etc/netplan",
    "etc/systemd/network",
    "etc/ssh/ssh_host_ed25519_key",
    "etc/ssh/ssh_host_ed25519_key.pub",
    "etc/ssh/ssh_host_ecdsa_key",
    "etc/ssh/ssh_host_ecdsa_key.pub",
    "etc/ssh/ssh_host_rsa_key",
    "etc/ssh/ssh_host_rsa_key.pub",
    "etc/stagecoach",
];

/// One health check run on each trial boot of the new OS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthCheck {
    /// A network interface other than loopback is up.
    NetworkUp,
    /// A QUIC handshake (or a TCP connection) with the stager at `addr` (`host:port`; several
    /// separated by commas: any one of them) completes in time.
    ReachStager {
        /// `host:port` of the stager, or several separated by commas.
        addr: String,
    },
    /// `sh -c command` exits 0, run with `STAGECOACH_SLOT` and `STAGECOACH_SLOT_ROOT` set.
    Command {
        /// The shell command.
        command: String,
    },
}

impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthCheck::NetworkUp => f.write_str("network-up"),
            HealthCheck::ReachStager { addr } => write!(f, "reach-stager={addr}"),
            HealthCheck::Command { command } => write!(f, "command={command}"),
        }
    }
}

impl FromStr for HealthCheck {
    type Err = String;

    /// Parses `network-up`, `reach-stager=HOST:PORT` or `command=SHELL COMMAND`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            None if s == "network-up" => Ok(HealthCheck::NetworkUp),
            Some(("reach-stager", addr)) if !addr.is_empty() => Ok(HealthCheck::ReachStager {
                addr: addr.to_owned(),
            }),
            Some(("command", command)) if !command.trim().is_empty() => {
                Ok(HealthCheck::Command {
                    command: command.to_owned(),
                })
            }
            _ => Err(format!(
                "unknown health check {s:?}: expected network-up, reach-stager=HOST:PORT or command=SHELL COMMAND"
            )),
        }
    }
}

/// Everything one swap needs, fixed when it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapPlan {
    /// The OS bundle to install in slot A.
    pub target: BundleId,
    /// The base (rescue) OS bundle for slot B.
    pub rescue: BundleId,
    /// Paths relative to a slot's root carried from the old OS into the new one.
    pub identity_paths: Vec<String>,
    /// Checks the new OS must pass on a trial boot.
    pub health_checks: Vec<HealthCheck>,
    /// Trial boots of the new OS before the firmware falls back to rescue.
    pub boot_attempts: u8,
    /// Hex ed25519 keys of the publishers whose bundles may be installed.
    pub trusted_publishers: Vec<String>,
    /// Store holding the bundles when they are not yet in the machine's storage area.
    pub source_store: Option<PathBuf>,
}

/// Why a plan cannot be carried out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// An identity path is absolute, climbs with `..`, or is empty.
    #[error("identity path {0:?} must be relative to the slot root, without `..` (e.g. etc/ssh/ssh_host_ed25519_key)")]
    BadIdentityPath(String),
    /// Too many identity paths.
    #[error("{0} identity paths, more than the limit of {MAX_IDENTITY_PATHS}")]
    TooManyIdentityPaths(usize),
    /// Too many or no health checks.
    #[error("{0} health checks: give between 1 and {MAX_HEALTH_CHECKS}")]
    HealthCheckCount(usize),
    /// Boot attempts out of range.
    #[error("{0} boot attempts: give between 1 and {MAX_BOOT_ATTEMPTS}")]
    BootAttempts(u8),
    /// No publisher is trusted, so no bundle could be installed.
    #[error("no trusted publisher key: pass --trust HEX (the publisher's ed25519 public key)")]
    NoTrustedPublisher,
    /// Target and rescue are the same bundle.
    #[error(
        "the target and the rescue are the same bundle {0}: the rescue must be a separate base OS"
    )]
    SameBundle(BundleId),
}

impl SwapPlan {
    /// Checks the plan's bounds and paths.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.identity_paths.len() > MAX_IDENTITY_PATHS {
            return Err(PlanError::TooManyIdentityPaths(self.identity_paths.len()));
        }
        for path in &self.identity_paths {
            if !is_safe_relative(path) {
                return Err(PlanError::BadIdentityPath(path.clone()));
            }
        }
        if self.health_checks.is_empty() || self.health_checks.len() > MAX_HEALTH_CHECKS {
            return Err(PlanError::HealthCheckCount(self.health_checks.len()));
        }
        if self.boot_attempts == 0 || self.boot_attempts > MAX_BOOT_ATTEMPTS {
            return Err(PlanError::BootAttempts(self.boot_attempts));
        }
        if self.trusted_publishers.is_empty() {
            return Err(PlanError::NoTrustedPublisher);
        }
        if self.target == self.rescue {
            return Err(PlanError::SameBundle(self.target));
        }
        Ok(())
    }
}

/// True when `path` names something inside a slot: relative, no `..`, not empty.
pub fn is_safe_relative(path: &str) -> bool {
    let path = Path::new(path);
    !path.as_os_str().is_empty()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && path.components().any(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::BlobHash;

    fn plan() -> SwapPlan {
        SwapPlan {
            target: BlobHash::of(b"target"),
            rescue: BlobHash::of(b"rescue"),
            identity_paths: DEFAULT_IDENTITY_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            health_checks: vec![HealthCheck::NetworkUp],
            boot_attempts: DEFAULT_BOOT_ATTEMPTS,
            trusted_publishers: vec!["00".repeat(32)],
            source_store: None,
        }
    }

    #[test]
    fn default_plan_is_valid() {
        assert_eq!(plan().validate(), Ok(()));
    }

    #[test]
    fn identity_paths_cannot_escape_the_slot() {
        for bad in ["/etc/hosts", "../etc", "etc/../../x", "", "."] {
            let mut p = plan();
            p.identity_paths = vec![bad.into()];
            assert_eq!(
                p.validate(),
                Err(PlanError::BadIdentityPath(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn bounds_are_enforced() {
        let mut p = plan();
        p.boot_attempts = 0;
        assert!(p.validate().is_err());
        let mut p = plan();
        p.health_checks.clear();
        assert!(p.validate().is_err());
        let mut p = plan();
        p.trusted_publishers.clear();
        assert_eq!(p.validate(), Err(PlanError::NoTrustedPublisher));
        let mut p = plan();
        p.rescue = p.target;
        assert!(matches!(p.validate(), Err(PlanError::SameBundle(_))));
    }

    #[test]
    fn health_checks_parse_from_the_command_line() {
        for text in ["network-up", "reach-stager=10.0.0.1:4433", "command=true"] {
            let check: HealthCheck = text.parse().expect("parses");
            assert_eq!(check.to_string(), text);
        }
        assert!("ping".parse::<HealthCheck>().is_err());
        assert!("command=".parse::<HealthCheck>().is_err());
    }
}
