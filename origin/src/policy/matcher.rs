//! Which nodes a rule is for: one inventory fact, or a CIDR block the node has an address in.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use proto::inventory::Inventory;
use serde::{Deserialize, Serialize};

use super::DEFAULT_PRECEDENCE;

/// The inventory fact a rule matches, with the value it must have.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Matcher {
    /// The node with this id.
    NodeOverride(String),
    /// Nodes configured with this class.
    Class(String),
    /// Nodes configured with this role.
    Role(String),
    /// Nodes whose DMI product name is exactly this.
    Model(String),
    /// Nodes whose DMI system vendor is exactly this.
    Manufacturer(String),
    /// Nodes whose address lies in this CIDR block (or whose whole subnet does, when the node
    /// reported no address), e.g. `10.1.0.0/16`.
    Subnet(String),
}

impl Matcher {
    /// The level this matcher belongs to.
    pub fn kind(&self) -> MatcherKind {
        match self {
            Matcher::NodeOverride(_) => MatcherKind::NodeOverride,
            Matcher::Class(_) => MatcherKind::Class,
            Matcher::Role(_) => MatcherKind::Role,
            Matcher::Model(_) => MatcherKind::Model,
            Matcher::Manufacturer(_) => MatcherKind::Manufacturer,
            Matcher::Subnet(_) => MatcherKind::Subnet,
        }
    }

    /// The value the fact must have.
    pub fn value(&self) -> &str {
        match self {
            Matcher::NodeOverride(v)
            | Matcher::Class(v)
            | Matcher::Role(v)
            | Matcher::Model(v)
            | Matcher::Manufacturer(v)
            | Matcher::Subnet(v) => v,
        }
    }

    /// True when the node matches. A subnet matcher that is not valid CIDR matches nothing
    /// ([`PolicyStore::validate`] reports it).
    pub fn matches(&self, node_id: &str, inventory: &Inventory) -> bool {
        let same = |fact: &Option<String>, wanted: &str| fact.as_deref() == Some(wanted);
        match self {
            Matcher::NodeOverride(id) => id == node_id,
            Matcher::Class(class) => same(&inventory.class, class),
            Matcher::Role(role) => same(&inventory.role, role),
            Matcher::Model(model) => same(&inventory.model, model),
            Matcher::Manufacturer(vendor) => same(&inventory.manufacturer, vendor),
            Matcher::Subnet(cidr) => cidr
                .parse::<Cidr>()
                .is_ok_and(|block| node_in_block(&block, inventory)),
        }
    }
}

/// A level of precedence: the kind of fact a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MatcherKind {
    /// A rule for one node.
    NodeOverride,
    /// A rule for a configured class.
    Class,
    /// A rule for a configured role.
    Role,
    /// A rule for a DMI model.
    Model,
    /// A rule for a DMI manufacturer.
    Manufacturer,
    /// A rule for a CIDR block.
    Subnet,
}

impl MatcherKind {
    /// The kebab-case name used in configuration, reports and logs.
    pub fn name(self) -> &'static str {
        match self {
            MatcherKind::NodeOverride => "node-override",
            MatcherKind::Class => "class",
            MatcherKind::Role => "role",
            MatcherKind::Model => "model",
            MatcherKind::Manufacturer => "manufacturer",
            MatcherKind::Subnet => "subnet",
        }
    }
}

impl fmt::Display for MatcherKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MatcherKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        DEFAULT_PRECEDENCE
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| {
                let known: Vec<_> = DEFAULT_PRECEDENCE.iter().map(|k| k.name()).collect();
                format!(
                    "unknown policy level `{name}` (known: {})",
                    known.join(", ")
                )
            })
    }
}

/// An IPv4 or IPv6 CIDR block, e.g. `10.1.0.0/16`. Host bits in the text are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// True when `address` lies in the block. IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        let (bits, width) = address_bits(address);
        let (network_bits, network_width) = address_bits(self.network);
        width == network_width && bits & mask(self.prefix_len, width) == network_bits
    }

    /// True when every address of `other` lies in this block.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.prefix_len >= self.prefix_len && self.contains(other.network)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = text
            .trim()
            .split_once('/')
            .ok_or("missing `/prefix-length`")?;
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("`{address}` is not an IP address"))?;
        let address = canonical(address);
        let prefix_len: u8 = prefix
            .parse()
            .map_err(|_| format!("`{prefix}` is not a prefix length"))?;
        let (bits, width) = address_bits(address);
        if prefix_len > width {
            return Err(format!("prefix length {prefix_len} exceeds {width} bits"));
        }
        let network_bits = bits & mask(prefix_len, width);
        let network = match address {
            IpAddr::V4(_) => IpAddr::from((network_bits as u32).to_be_bytes()),
            IpAddr::V6(_) => IpAddr::from(network_bits.to_be_bytes()),
        };
        Ok(Self {
            network,
            prefix_len,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// True when the node's address lies in `block`, or, when it reported no address, when its
/// whole subnet does. Facts come from the node: one that does not parse simply does not match.
pub(super) fn node_in_block(block: &Cidr, inventory: &Inventory) -> bool {
    if let Some(address) = inventory.address {
        return block.contains(address);
    }
    inventory
        .subnet
        .as_deref()
        .and_then(|subnet| subnet.parse::<Cidr>().ok())
        .is_some_and(|subnet| block.covers(&subnet))
}

pub(super) fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

/// The address as an integer and its width in bits.
pub(super) fn address_bits(address: IpAddr) -> (u128, u8) {
    match address {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// The network mask of `prefix_len` bits in an address `width` bits wide.
pub(super) fn mask(prefix_len: u8, width: u8) -> u128 {
    debug_assert!(prefix_len <= width && width <= 128);
    if prefix_len == 0 {
        return 0;
    }
    (u128::MAX << (128 - u32::from(prefix_len))) >> (128 - u32::from(width))
}
