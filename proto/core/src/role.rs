//! What a node does in the mesh. Every node certificate carries one [`Role`]; servers decide
//! what a peer may ask from it ([`crate::wire::authorize`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a node does in the mesh. Part of its certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// The control plane and certificate authority.
    Origin,
    /// A node allowed to publish bundles.
    Publisher,
    /// A per-site stage server.
    Stager,
    /// A machine that installs bundles.
    Edge,
}

impl Role {
    /// Every role, in order.
    pub const ALL: [Role; 4] = [Role::Origin, Role::Publisher, Role::Stager, Role::Edge];

    /// The lowercase name used on command lines and in certificates.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Origin => "origin",
            Role::Publisher => "publisher",
            Role::Stager => "stager",
            Role::Edge => "edge",
        }
    }

    /// The name with its indefinite article, for messages: "an origin", "a stager".
    pub fn with_article(self) -> &'static str {
        match self {
            Role::Origin => "an origin",
            Role::Publisher => "a publisher",
            Role::Stager => "a stager",
            Role::Edge => "an edge",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name is not one of the four roles.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected one of origin, publisher, stager, edge")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_their_names() {
        for role in Role::ALL {
            assert_eq!(role.to_string().parse::<Role>().expect("parse"), role);
        }
        let err = "admin".parse::<Role>().expect_err("unknown");
        assert!(err.to_string().contains("origin, publisher, stager, edge"));
    }
}
