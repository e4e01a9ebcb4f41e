//! `origin init` and `origin enroll`: the mesh's CA and keys, and one-time tokens for nodes.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use origin::home::OriginHome;
use proto::net::{EnrollToken, Role, Site};

/// `origin init`.
pub fn init(home: &OriginHome) -> Result<()> {
    home.init()?;
    println!("origin initialised in {}", home.dir().display());
    println!("next: origin serve --dir {}", home.dir().display());
    Ok(())
}

/// `origin enroll`: prints a one-time token for a node of `role` in `site`.
pub fn enroll(home: &OriginHome, role: Role, site: String) -> Result<()> {
    if !matches!(role, Role::Stager | Role::Edge) {
        anyhow::bail!("only stager and edge nodes enroll with tokens");
    }
    let site = Site::new(site)?;
    let addrs = home.serve_addrs()?;
    let enroll_addr: SocketAddr = addrs.enroll.parse().context("bad enroll address")?;
    let identity = home.origin_identity()?;
    let fingerprint = proto::net::cert_fingerprint(identity.cert_der());
    let token = EnrollToken::new(enroll_addr, fingerprint, role, site.clone());
    origin::tokens::record(&home.tokens_dir(), &token.secret, role, &site)?;
    println!("{}", token.encode());
    eprintln!("one-time token for a {role} in site {site}; valid 24 h");
    Ok(())
}
