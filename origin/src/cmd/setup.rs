//! `origin init` and `origin enroll`: the mesh's CA and keys, and one-time tokens for nodes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use origin::home::OriginHome;
use proto::net::{Role, Site};
use proto::wire::ControlCommand;

/// `origin init`.
pub fn init(home: &OriginHome) -> Result<()> {
    home.init()?;
    println!("origin initialised in {}", home.dir().display());
    println!("next: origin serve --dir {}", home.dir().display());
    Ok(())
}

/// `origin enroll`: asks the running origin for a one-time token for a node of `role` in
/// `site` and prints it (it enrolls at any origin sharing the store, once).
pub async fn enroll(home: &OriginHome, role: Role, site: String, json: bool) -> Result<()> {
    if !matches!(role, Role::Stager | Role::Edge) {
        anyhow::bail!("only stager and edge nodes enroll with tokens");
    }
    let site = Site::new(site)?;
    let reply = origin::admin::run(
        home,
        ControlCommand::EnrollToken {
            role: role.as_str().to_owned(),
            site: site.as_str().to_owned(),
        },
    )
    .await?;
    origin::admin::print(&reply, json, "no token was issued")?;
    if !json {
        eprintln!(
            "one-time token for a {role} in site {site}; valid 24 h, at any origin of the mesh"
        );
    }
    Ok(())
}

/// Where the passphrase that seals an origin's keys comes from.
#[derive(clap::Args, Clone, Debug)]
pub struct PassphraseArgs {
    /// Read the passphrase from the first line of this file (else the environment variable
    /// STAGECOACH_ORIGIN_PASSPHRASE, else a prompt on the terminal).
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
}

/// Environment variable with the passphrase, for scripts.
pub const PASSPHRASE_VAR: &str = "STAGECOACH_ORIGIN_PASSPHRASE";

impl PassphraseArgs {
    /// The passphrase; `confirm` asks twice on a terminal (when sealing).
    fn read(&self, confirm: bool) -> Result<zeroize::Zeroizing<String>> {
        if let Some(path) = &self.passphrase_file {
            let text =
                zeroize::Zeroizing::new(std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read the passphrase file {}", path.display())
                })?);
            let line = text.lines().next().unwrap_or_default();
            return Ok(zeroize::Zeroizing::new(line.to_owned()));
        }
        if let Ok(text) = std::env::var(PASSPHRASE_VAR) {
            return Ok(zeroize::Zeroizing::new(text));
        }
        let first = zeroize::Zeroizing::new(
            rpassword::prompt_password("Passphrase of the key export: ").context(
                "cannot read the passphrase (no terminal? use --passphrase-file or STAGECOACH_ORIGIN_PASSPHRASE)",
            )?,
        );
        if confirm {
            origin::join::check_passphrase(&first)?;
            let again = zeroize::Zeroizing::new(
                rpassword::prompt_password("Again: ").context("cannot read the passphrase")?,
            );
            if *again != *first {
                bail!("the two passphrases differ");
            }
        }
        Ok(first)
    }
}

/// `origin keys export --to FILE`.
pub fn export_keys(home: &OriginHome, to: &Path, passphrase: &PassphraseArgs) -> Result<()> {
    home.require_init()?;
    if to.exists() {
        bail!("{} exists; pick another file", to.display());
    }
    let passphrase = passphrase.read(true)?;
    let sealed = origin::join::export(home, &passphrase)?;
    proto::durable::write_atomic(to, &sealed, proto::durable::MODE_PRIVATE)
        .with_context(|| format!("cannot write {}", to.display()))?;
    println!(
        "sealed the mesh CA, the publisher key and the content keys of {} into {} ({} bytes)",
        home.dir().display(),
        to.display(),
        sealed.len()
    );
    println!(
        "next, on the new origin: origin init --dir DIR --join {}",
        to.display()
    );
    Ok(())
}

/// `origin init --join FILE`.
pub fn join(home: &OriginHome, file: &Path, passphrase: &PassphraseArgs) -> Result<()> {
    let sealed = origin::join::read_export(file)?;
    let passphrase = passphrase.read(false)?;
    let joined = origin::join::join(home, &sealed, &passphrase)?;
    println!(
        "origin joined the mesh in {}: {} shared files, publisher key {}, own identity {}",
        home.dir().display(),
        joined.files.len(),
        &joined.publisher[..16],
        joined.node_id
    );
    println!(
        "next: origin serve --dir {} --store etcd://... (the store the other origins use)",
        home.dir().display()
    );
    Ok(())
}
