//! The origin's directory: where its CA, identities, keys, store and catalog live.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use proto::net::{CertAuthority, NodeIdentity, Role, Site};
use proto::store::{Store, StoreOptions};
use serde::{Deserialize, Serialize};

/// The site name in the origin's own certificates.
pub const ORIGIN_SITE: &str = "origin";

/// Default mesh address of `origin serve`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";

/// Default enrollment address of `origin serve`.
pub const DEFAULT_ENROLL_LISTEN: &str = "127.0.0.1:7401";

/// The origin's state directory.
#[derive(Clone, Debug)]
pub struct OriginHome {
    dir: PathBuf,
}

/// Addresses `origin serve` bound, written to `serve.json` for the other commands.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServeAddrs {
    /// The QUIC mesh endpoint.
    pub mesh: String,
    /// The enrollment endpoint.
    pub enroll: String,
    /// The metrics endpoint.
    pub metrics: String,
    /// The web console, metrics and health (`--console`), when served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
}

impl OriginHome {
    /// The home at `dir` (not checked).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    fn identity_dir(&self) -> PathBuf {
        self.dir.join("identity")
    }

    fn publisher_dir(&self) -> PathBuf {
        self.dir.join("publisher")
    }

    fn signing_key_path(&self) -> PathBuf {
        self.publisher_dir().join("manifest-signing.key")
    }

    /// Where pending enrollment secrets live.
    pub fn tokens_dir(&self) -> PathBuf {
        self.dir.join("tokens")
    }

    /// The catalog file.
    pub fn catalog_path(&self) -> PathBuf {
        self.dir.join("catalog.jsonl")
    }

    /// Where `serve` records its addresses.
    pub fn serve_file(&self) -> PathBuf {
        self.dir.join("serve.json")
    }

    /// True once `origin init` ran here.
    pub fn is_initialised(&self) -> bool {
        CertAuthority::exists(&self.ca_dir())
    }

    /// Creates the CA, the publisher's signing key, and the origin's and publisher's
    /// certificates. Refuses to overwrite an existing origin.
    pub fn init(&self) -> Result<()> {
        if self.is_initialised() {
            bail!(
                "{} already holds an origin; pick another --dir or remove it",
                self.dir.display()
            );
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let ca = CertAuthority::create(&self.ca_dir()).context("cannot create the mesh CA")?;
        let signing = proto::manifest::generate_signing_key();
        std::fs::create_dir_all(self.publisher_dir())?;
        proto::durable::write_atomic(
            &self.signing_key_path(),
            hex::encode(signing.to_bytes()).as_bytes(),
            proto::durable::MODE_PRIVATE,
        )?;
        let site = Site::new(ORIGIN_SITE)?;
        let publisher = ca.node_identity(
            Role::Publisher,
            &site,
            signing.verifying_key(),
            DEFAULT_LISTEN.to_owned(),
        )?;
        publisher.save(&self.publisher_dir())?;
        self.issue_origin_identity()?;
        Ok(())
    }

    /// Issues this origin's own identity (its mesh and enrollment certificate) from the CA
    /// and the publisher's key already in the home (`init`, and `init --join`, where the CA
    /// and key came from another origin); returns its node id.
    pub fn issue_origin_identity(&self) -> Result<String> {
        let ca = CertAuthority::load(&self.ca_dir()).context("cannot load the mesh CA")?;
        let signing = self.signing_key()?;
        let origin = ca.node_identity(
            Role::Origin,
            &Site::new(ORIGIN_SITE)?,
            signing.verifying_key(),
            DEFAULT_LISTEN.to_owned(),
        )?;
        origin.save(&self.identity_dir())?;
        std::fs::create_dir_all(self.tokens_dir())?;
        Ok(origin.node_id().to_string())
    }

    /// Fails with what to run when `origin init` did not run here.
    pub fn require_init(&self) -> Result<()> {
        if !self.is_initialised() {
            bail!(
                "{} holds no origin: run `origin init --dir {}` first",
                self.dir.display(),
                self.dir.display()
            );
        }
        Ok(())
    }

    /// The mesh CA.
    pub fn ca(&self) -> Result<CertAuthority> {
        self.require_init()?;
        Ok(CertAuthority::load(&self.ca_dir())?)
    }

    /// The origin's own identity (serves the mesh and enrollment).
    pub fn origin_identity(&self) -> Result<NodeIdentity> {
        self.require_init()?;
        Ok(NodeIdentity::load(&self.identity_dir())?)
    }

    /// The publisher's client identity.
    pub fn publisher_identity(&self) -> Result<NodeIdentity> {
        self.require_init()?;
        Ok(NodeIdentity::load(&self.publisher_dir())?)
    }

    /// The publisher's manifest-signing key.
    pub fn signing_key(&self) -> Result<SigningKey> {
        self.require_init()?;
        let path = self.signing_key_path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the signing key {}", path.display()))?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes)
            .with_context(|| format!("{} is not a hex ed25519 key", path.display()))?;
        Ok(SigningKey::from_bytes(&bytes))
    }

    /// Opens the blob store (only one process may hold it: `origin serve`).
    pub fn store(&self) -> Result<Store> {
        self.require_init()?;
        let dir = self.dir.join("store");
        Store::open(&dir, StoreOptions::default())
            .with_context(|| format!("cannot open the store in {}", dir.display()))
    }

    /// Opens the control-plane database (only one process may hold it: `origin serve`).
    pub fn db(&self) -> Result<crate::db::Db> {
        self.require_init()?;
        Ok(crate::db::Db::open(&self.db_dir())?)
    }

    /// Where the control-plane database lives.
    pub fn db_dir(&self) -> PathBuf {
        self.dir.join("db")
    }

    /// The addresses of the running `origin serve`.
    pub fn serve_addrs(&self) -> Result<ServeAddrs> {
        let path = self.serve_file();
        let text = std::fs::read(&path).with_context(|| {
            format!(
                "cannot read {}: is `origin serve --dir {}` running?",
                path.display(),
                self.dir.display()
            )
        })?;
        serde_json::from_slice(&text).with_context(|| format!("{} is malformed", path.display()))
    }

    /// The mesh address of the running `origin serve`.
    pub fn mesh_addr(&self) -> Result<SocketAddr> {
        let addrs = self.serve_addrs()?;
        addrs
            .mesh
            .parse()
            .with_context(|| format!("bad mesh address {:?} in serve.json", addrs.mesh))
    }
}
