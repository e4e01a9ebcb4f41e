//! libp2p addresses: the only form this transport dials, and the parts of one.

use std::net::IpAddr;

use anyhow::{bail, Result};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// Accepts `/ip4|ip6/<ip>/tcp/<port>[/p2p/<peer id>]`, the only addresses this transport has.
pub(super) fn check_tcp_addr(addr: &Multiaddr) -> Result<()> {
    let mut parts = addr.iter();
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (
            Some(Protocol::Ip4(_) | Protocol::Ip6(_)),
            Some(Protocol::Tcp(_)),
            None | Some(Protocol::P2p(_)),
            None,
        ) => Ok(()),
        _ => bail!("expected /ip4|ip6/<address>/tcp/<port>[/p2p/<peer id>]"),
    }
}

pub(super) fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

pub(super) fn with_p2p(addr: Multiaddr, peer: PeerId) -> Multiaddr {
    if peer_of(&addr).is_some() {
        addr
    } else {
        addr.with(Protocol::P2p(peer))
    }
}

pub(super) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => Some(IpAddr::V4(ip)),
        Some(Protocol::Ip6(ip)) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// An address someone else could dial: a concrete IP (not 0.0.0.0 / ::) and a port.
pub(super) fn is_concrete(addr: &Multiaddr) -> bool {
    ip_of(addr).is_some_and(|ip| !ip.is_unspecified())
        && addr
            .iter()
            .any(|p| matches!(p, Protocol::Tcp(port) if port != 0))
}
