//! The Hello exchanged on every new connection, and its validation: nothing from the network
//! is trusted before it passed [`validate_hello`].

use std::net::{IpAddr, SocketAddr};

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use super::addr::{is_concrete, peer_of};
use super::{MAX_FIELD_BYTES, MAX_HELLO_ADDRS};

/// The Hello message, both request and response. Strings on the wire; validated on receipt.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Hello {
    pub(super) site: String,
    pub(super) node_id: String,
    pub(super) data_addr: String,
    #[serde(default)]
    pub(super) p2p_addrs: Vec<String>,
    /// The sender saw the receiver through mDNS (so they share a LAN).
    #[serde(default)]
    pub(super) found_by_mdns: bool,
}

/// A Hello that passed validation.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ValidHello {
    pub(super) site: String,
    pub(super) node_id: String,
    pub(super) data_addr: SocketAddr,
    pub(super) p2p_addrs: Vec<Multiaddr>,
    pub(super) found_by_mdns: bool,
}

/// Checks a Hello from `peer`; `remote_ip` completes an unspecified data address.
/// Why a Hello (or this node's own discovery settings) was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum HelloError {
    /// A field that must not be empty is.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// A field longer than [`MAX_FIELD_BYTES`].
    #[error("{field} is {size_bytes} bytes, more than {MAX_FIELD_BYTES}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        size_bytes: usize,
    },
    /// A field with control characters.
    #[error("{0} has control characters")]
    ControlCharacters(&'static str),
    /// A node id with characters node ids never have.
    #[error("node_id {0:?} is not lowercase letters and digits")]
    BadNodeId(String),
    /// A data address that does not parse.
    #[error("data_addr {0:?} is not an address")]
    BadDataAddr(String),
    /// A data address with port 0.
    #[error("data_addr {0} has port 0")]
    PortZero(SocketAddr),
    /// A multicast data address.
    #[error("data_addr {0} is multicast")]
    Multicast(SocketAddr),
    /// An unspecified data address with no connection to complete it from.
    #[error("data_addr {0} is unspecified")]
    Unspecified(SocketAddr),
    /// More addresses than [`MAX_HELLO_ADDRS`].
    #[error("{0} p2p addresses, more than {MAX_HELLO_ADDRS}")]
    TooManyAddrs(usize),
    /// A p2p address that does not parse.
    #[error("p2p address {0:?} is not a multiaddr")]
    BadP2pAddr(String),
    /// A p2p address of some other peer.
    #[error("p2p address {0:?} names another peer")]
    OtherPeer(String),
}

pub(super) fn validate_hello(
    hello: &Hello,
    peer: PeerId,
    remote_ip: Option<IpAddr>,
) -> Result<ValidHello, HelloError> {
    check_field("site", &hello.site)?;
    check_node_id(&hello.node_id)?;
    check_field("data_addr", &hello.data_addr)?;
    let mut data_addr: SocketAddr = hello
        .data_addr
        .parse()
        .map_err(|_| HelloError::BadDataAddr(hello.data_addr.clone()))?;
    if data_addr.port() == 0 {
        return Err(HelloError::PortZero(data_addr));
    }
    if data_addr.ip().is_multicast() {
        return Err(HelloError::Multicast(data_addr));
    }
    if data_addr.ip().is_unspecified() {
        match remote_ip {
            Some(ip) => data_addr.set_ip(ip),
            None => return Err(HelloError::Unspecified(data_addr)),
        }
    }
    if hello.p2p_addrs.len() > MAX_HELLO_ADDRS {
        return Err(HelloError::TooManyAddrs(hello.p2p_addrs.len()));
    }
    let mut p2p_addrs = Vec::new();
    for addr in &hello.p2p_addrs {
        check_field("p2p address", addr)?;
        let parsed: Multiaddr = addr
            .parse()
            .map_err(|_| HelloError::BadP2pAddr(addr.clone()))?;
        match peer_of(&parsed) {
            Some(p) if p != peer => {
                return Err(HelloError::OtherPeer(addr.clone()));
            }
            _ => {}
        }
        if is_concrete(&parsed) {
            p2p_addrs.push(parsed);
        }
    }
    Ok(ValidHello {
        site: hello.site.clone(),
        node_id: hello.node_id.clone(),
        data_addr,
        p2p_addrs,
        found_by_mdns: hello.found_by_mdns,
    })
}

pub(super) fn check_field(name: &'static str, value: &str) -> Result<(), HelloError> {
    if value.is_empty() {
        return Err(HelloError::Empty(name));
    }
    if value.len() > MAX_FIELD_BYTES {
        return Err(HelloError::TooLong {
            field: name,
            size_bytes: value.len(),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(HelloError::ControlCharacters(name));
    }
    Ok(())
}

pub(super) fn check_node_id(value: &str) -> Result<(), HelloError> {
    check_field("node_id", value)?;
    // Node ids print as lowercase base32 (DNSSEC alphabet) or hex: letters and digits only.
    if !value
        .bytes()
        .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        return Err(HelloError::BadNodeId(value.to_owned()));
    }
    Ok(())
}
