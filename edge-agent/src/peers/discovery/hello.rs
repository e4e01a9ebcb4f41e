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
pub(super) fn validate_hello(
    hello: &Hello,
    peer: PeerId,
    remote_ip: Option<IpAddr>,
) -> std::result::Result<ValidHello, String> {
    check_field("site", &hello.site)?;
    check_node_id(&hello.node_id)?;
    check_field("data_addr", &hello.data_addr)?;
    let mut data_addr: SocketAddr = hello
        .data_addr
        .parse()
        .map_err(|_| format!("data_addr {:?} is not an address", hello.data_addr))?;
    if data_addr.port() == 0 {
        return Err(format!("data_addr {data_addr} has port 0"));
    }
    if data_addr.ip().is_multicast() {
        return Err(format!("data_addr {data_addr} is multicast"));
    }
    if data_addr.ip().is_unspecified() {
        match remote_ip {
            Some(ip) => data_addr.set_ip(ip),
            None => return Err(format!("data_addr {data_addr} is unspecified")),
        }
    }
    if hello.p2p_addrs.len() > MAX_HELLO_ADDRS {
        return Err(format!(
            "{} p2p addresses, more than {MAX_HELLO_ADDRS}",
            hello.p2p_addrs.len()
        ));
    }
    let mut p2p_addrs = Vec::new();
    for addr in &hello.p2p_addrs {
        check_field("p2p address", addr)?;
        let parsed: Multiaddr = addr
            .parse()
            .map_err(|_| format!("p2p address {addr:?} is not a multiaddr"))?;
        match peer_of(&parsed) {
            Some(p) if p != peer => {
                return Err(format!("p2p address {addr:?} names another peer"));
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

pub(super) fn check_field(name: &str, value: &str) -> std::result::Result<(), String> {
    if value.is_empty() {
        return Err(format!("{name} is empty"));
    }
    if value.len() > MAX_FIELD_BYTES {
        return Err(format!(
            "{name} is {} bytes, more than {MAX_FIELD_BYTES}",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{name} has control characters"));
    }
    Ok(())
}

pub(super) fn check_node_id(value: &str) -> std::result::Result<(), String> {
    check_field("node_id", value)?;
    // Node ids print as lowercase base32 (DNSSEC alphabet) or hex: letters and digits only.
    if !value
        .bytes()
        .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        return Err(format!(
            "node_id {value:?} is not lowercase letters and digits"
        ));
    }
    Ok(())
}
