//! Policy resolution: which bundles a node runs, decided from its inventory (brief 002 and 004).
//!
//! Pure: no I/O, no clock. The origin loads a [`PolicyStore`] (rules, their precedence, the
//! feature map and the package catalog), and [`resolve`] answers for one node:
//!
//! 1. **Rules.** Each [`Rule`] matches one inventory fact ([`Matcher`]) and names bundles. Levels
//!    are tried in [`PolicyStore::precedence`] order (by default node override > class > role >
//!    model > manufacturer > subnet); the first level with any matching rule wins and the levels
//!    below it are not consulted. Two matching rules on the winning level must name the same
//!    bundles, or the answer is [`PolicyError::Conflict`] naming both: ambiguity is never
//!    resolved silently.
//! 2. **Features.** A node may ask for features ([`Inventory::features`]); each maps to package
//!    requirements, added on top of the rule's bundles (or instead of them, when no rule matches).
//! 3. **Dependencies.** Every chosen bundle's dependencies, from the package catalog, are added
//!    transitively, each at the newest version that satisfies its [`Requirement`].
//!
//! At most one version of each package name is chosen. Requirements are taken greedily in that
//! order (rule bundles, then features in the order the node lists them, then dependencies
//! breadth-first): a later requirement that the version already chosen does not satisfy is an
//! error ([`PolicyError::Unsatisfiable`]) naming both sides, not a search for another version.
//! No rule and no feature gives [`Resolution::NoImage`] with the facts that were tried (brief 004).
//!
//! [`check`] runs the resolution for many nodes and lists every conflict, for
//! `origin policy check`.
//!
//! The parts: `store` (rules, precedence, features, packages), `matcher` (inventory facts and
//! CIDR blocks), `resolve` (one node), `check` (many nodes, for `origin policy check`),
//! `capture` (the rules a captured image adds). Here: bundles, versions and requirements.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod capture;
mod check;
mod matcher;
mod resolve;
mod store;

pub use capture::{
    capture_keys, captured_rule, CaptureConfig, EncryptionConfig, DEFAULT_CAPTURE_NAME,
};
pub use check::{check, NodeCheck, NodeConflict, PolicyReport};
pub use matcher::{Cidr, Matcher, MatcherKind};
pub use resolve::{resolve, Fact, PolicyError, Reason, Resolution, ResolvedBundle};
pub use store::{PackageVersion, PolicyStore, Rule, DEFAULT_PRECEDENCE};

/// A bundle by name and exact version.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BundleRef {
    /// Bundle name, e.g. `ubuntu-base`.
    pub name: String,
    /// Version, ordered by [`compare_versions`].
    pub version: String,
}

impl BundleRef {
    /// `name` at `version`.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
        }
    }
}

impl fmt::Display for BundleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// The one ordering of versions (semver when both sides are, Debian's otherwise); see
/// [`proto::version`].
pub use proto::version::compare_versions;

/// Which package versions a dependency or a feature accepts.
///
/// Written `name` (the newest version), `name@version` (exactly that version) or
/// `name>=version` (that version or a newer one, by [`compare_versions`]). Serialized as that
/// text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Requirement {
    /// Package name.
    pub name: String,
    /// Accepted versions.
    pub constraint: Constraint,
}

/// The version part of a [`Requirement`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Constraint {
    /// Any version; the newest is chosen.
    Any,
    /// Exactly this version.
    Exact(String),
    /// This version or a newer one.
    AtLeast(String),
}

/// A [`Requirement`] that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad requirement `{text}`: {why} (write `name`, `name@version` or `name>=version`)")]
pub struct RequirementError {
    /// The text as given.
    pub text: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl Requirement {
    /// Any version of `name` (the newest is chosen).
    pub fn any(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            constraint: Constraint::Any,
        }
    }

    /// Exactly `version` of `name`.
    pub fn exact(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            constraint: Constraint::Exact(version.into()),
        }
    }

    /// `version` of `name` or newer.
    pub fn at_least(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            constraint: Constraint::AtLeast(version.into()),
        }
    }

    /// True when `version` of this package satisfies the requirement.
    pub fn allows(&self, version: &str) -> bool {
        match &self.constraint {
            Constraint::Any => true,
            Constraint::Exact(exact) => version == exact,
            Constraint::AtLeast(minimum) => compare_versions(version, minimum) != Ordering::Less,
        }
    }
}

impl FromStr for Requirement {
    type Err = RequirementError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |why| RequirementError {
            text: text.to_owned(),
            why,
        };
        let trimmed = text.trim();
        // (name, Some((version, at_least))) for the versioned forms.
        let (name, versioned) = if let Some((name, version)) = trimmed.split_once(">=") {
            (name.trim(), Some((version.trim(), true)))
        } else if let Some((name, version)) = trimmed.split_once('@') {
            (name.trim(), Some((version.trim(), false)))
        } else {
            (trimmed, None)
        };
        if name.is_empty() {
            return Err(bad("the package name is empty"));
        }
        if !name.chars().all(is_name_char) {
            return Err(bad(
                "the package name has a character outside letters, digits and `-_.+`",
            ));
        }
        let constraint = match versioned {
            None => Constraint::Any,
            Some(("", _)) => return Err(bad("the version is empty")),
            Some((version, _)) if !version.chars().all(is_version_char) => {
                return Err(bad(
                    "the version has a character outside letters, digits and `-_.+~:`",
                ))
            }
            Some((version, true)) => Constraint::AtLeast(version.to_owned()),
            Some((version, false)) => Constraint::Exact(version.to_owned()),
        };
        Ok(Self {
            name: name.to_owned(),
            constraint,
        })
    }
}

impl TryFrom<String> for Requirement {
    type Error = RequirementError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Requirement> for String {
    fn from(requirement: Requirement) -> Self {
        requirement.to_string()
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.constraint {
            Constraint::Any => write!(f, "{}", self.name),
            Constraint::Exact(version) => write!(f, "{}@{version}", self.name),
            Constraint::AtLeast(version) => write!(f, "{}>={version}", self.name),
        }
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+')
}

/// A name character, or `~` and `:` of Debian versions (`2.0~rc1`, `1:2.0`).
fn is_version_char(c: char) -> bool {
    is_name_char(c) || matches!(c, '~' | ':')
}

fn list(bundles: &[BundleRef]) -> String {
    bundles
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
