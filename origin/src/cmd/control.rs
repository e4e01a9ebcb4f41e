//! The control-plane subcommands (`policy`, `nodes`, `class`, `override`, `audit`,
//! `test-run`, `rollout`, `admin`): each becomes one [`ControlCommand`] asked of the running origin
//! ([`admin::run`]), whose answer is printed ([`admin::print`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use origin::db::AccountRole;
use origin::home::OriginHome;
use origin::{accounts, admin};
use proto::wire::{ControlCommand, RolloutAction};

#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Start a rollout (one at a time).
    Start {
        /// The OS to install: NAME@VERSION, NAME (the newest) or a bundle id.
        bundle: String,
        /// Which nodes: `all`, or KEY=VALUE[,KEY=VALUE] with keys site, class, role, node.
        #[arg(long = "to")]
        selector: String,
        /// The rescue OS every swap keeps in its spare slot.
        #[arg(long)]
        rescue: String,
        /// Failures tolerated outside canary waves before the rollout halts.
        #[arg(long, default_value_t = 0)]
        max_failures: u32,
        /// Offer the bundle to nodes that run a newer version too.
        #[arg(long)]
        downgrade: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Where the rollout stands: every wave, every node, and why it halted.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start no new wave until resumed (swaps already started finish).
    Pause,
    /// Continue a paused rollout.
    Resume,
    /// Halt the rollout for good (swaps already started finish).
    Abort,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Replace the policy with a TOML file (rules, precedence, features); audited.
    Load {
        /// The policy file.
        file: PathBuf,
    },
    /// Resolve every node and list every conflict; exits non-zero if any node does not resolve.
    Check {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ClassCommand {
    /// Put NODE in CLASS (outranks the class the node reports).
    Set {
        /// Node id (or a unique prefix).
        node: String,
        /// The class.
        class: String,
    },
}

#[derive(Subcommand)]
pub enum OverrideCommand {
    /// Pin NAME@VERSION on NODE.
    Set {
        /// Node id (or a unique prefix).
        node: String,
        /// NAME@VERSION.
        bundle: String,
    },
    /// Remove NODE's overrides (all, or of one bundle name).
    Clear {
        /// Node id (or a unique prefix).
        node: String,
        /// Only this bundle name.
        #[arg(long)]
        name: Option<String>,
    },
}

/// Asks the running origin to carry out `command`; prints the answer (its JSON with `json`)
/// and fails with `failure` when the command did not succeed.
pub async fn run(
    home: &OriginHome,
    command: ControlCommand,
    json: bool,
    failure: &str,
) -> Result<()> {
    let reply = admin::run(home, command).await?;
    admin::print(&reply, json, failure)
}

/// `origin policy load|check`.
pub async fn policy(home: &OriginHome, command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Load { file } => {
            let toml = read_policy(&file)?;
            let source = file.display().to_string();
            run(
                home,
                ControlCommand::PolicyLoad { source, toml },
                false,
                "the policy was not loaded",
            )
            .await
        }
        PolicyCommand::Check { json } => {
            run(
                home,
                ControlCommand::PolicyCheck,
                json,
                "the policy does not resolve every node (conflicts or errors above)",
            )
            .await
        }
    }
}

fn read_policy(file: &Path) -> Result<String> {
    std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the policy file {}", file.display()))
}

/// `origin class set`.
pub async fn class(home: &OriginHome, command: ClassCommand) -> Result<()> {
    let ClassCommand::Set { node, class } = command;
    run(
        home,
        ControlCommand::ClassSet { node, class },
        false,
        "the class was not set",
    )
    .await
}

/// `origin override set|clear`.
pub async fn override_(home: &OriginHome, command: OverrideCommand) -> Result<()> {
    match command {
        OverrideCommand::Set { node, bundle } => {
            run(
                home,
                ControlCommand::OverrideSet { node, bundle },
                false,
                "the override was not set",
            )
            .await
        }
        OverrideCommand::Clear { node, name } => {
            run(
                home,
                ControlCommand::OverrideClear { node, name },
                false,
                "the override was not cleared",
            )
            .await
        }
    }
}

/// `origin rollout start|status|pause|resume|abort`.
pub async fn rollout(home: &OriginHome, command: RolloutCommand) -> Result<()> {
    let (command, json, failure) = match command {
        RolloutCommand::Start {
            bundle,
            selector,
            rescue,
            max_failures,
            downgrade,
            json,
        } => (
            ControlCommand::RolloutStart {
                bundle,
                rescue,
                selector,
                max_failures,
                downgrade,
            },
            json,
            "the rollout did not start",
        ),
        RolloutCommand::Status { json } => (
            ControlCommand::Rollout {
                action: RolloutAction::Status,
            },
            json,
            "no rollout status",
        ),
        RolloutCommand::Pause => (
            ControlCommand::Rollout {
                action: RolloutAction::Pause,
            },
            false,
            "cannot pause the rollout",
        ),
        RolloutCommand::Resume => (
            ControlCommand::Rollout {
                action: RolloutAction::Resume,
            },
            false,
            "cannot resume the rollout",
        ),
        RolloutCommand::Abort => (
            ControlCommand::Rollout {
                action: RolloutAction::Abort,
            },
            false,
            "cannot abort the rollout",
        ),
    };
    run(home, command, json, failure).await
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Seal the keys every origin of the mesh shares (CA, publisher key, content keys) into
    /// one file for `origin init --join` on another machine; needs no running origin.
    Export {
        /// The file to write (mode 0600; it is sealed, but keep it private all the same).
        #[arg(long)]
        to: PathBuf,
        #[command(flatten)]
        passphrase: super::setup::PassphraseArgs,
    },
    /// Start a new content-key generation: new encrypted publishes use it; audited.
    Rotate,
    /// The content-key generations with their fingerprints and which is current (never keys).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a content-key generation (not the current one): edges drop it at their next key
    /// refresh, and bundles sealed with it can no longer be read; audited.
    Retire {
        /// The generation number.
        generation: u32,
        /// Retire it even while nodes run (or should run) bundles sealed with it: they can
        /// no longer read them.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum NodesCommand {
    /// Revoke a node: the origin refuses its requests and content keys from now on, and
    /// rotates the content keys so bundles published next use a generation it never gets.
    Revoke {
        /// The node's id (or a unique prefix of it).
        node: String,
    },
}

pub async fn keys(home: &OriginHome, command: KeysCommand) -> Result<()> {
    let (command, json, failure) = match command {
        KeysCommand::Rotate => (
            ControlCommand::KeysRotate,
            false,
            "the keys were not rotated",
        ),
        KeysCommand::List { json } => (ControlCommand::KeysList, json, "cannot list the keys"),
        KeysCommand::Retire { generation, force } => (
            ControlCommand::KeysRetire { generation, force },
            false,
            "the generation was not retired",
        ),
        KeysCommand::Export { to, passphrase } => {
            return super::setup::export_keys(home, &to, &passphrase);
        }
    };
    run(home, command, json, failure).await
}

pub async fn nodes(home: &OriginHome, command: NodesCommand) -> Result<()> {
    match command {
        NodesCommand::Revoke { node } => {
            run(
                home,
                ControlCommand::NodeRevoke { node },
                false,
                "the node was not revoked",
            )
            .await
        }
    }
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Add a web console account, or replace its role and password (the running origin keeps
    /// an Argon2id hash of the password; the password itself never leaves this command).
    Add {
        /// The login name: letters, digits, `.`, `_`, `-`.
        name: String,
        /// `admin` (may pause, resume and abort rollouts) or `viewer` (sees everything,
        /// changes nothing).
        #[arg(long)]
        role: AccountRole,
        /// Read the password from the first line of standard input instead of a prompt.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List the web console accounts: name, role, when each was last set.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a web console account; its open sessions end at their next request.
    Remove {
        /// The login name.
        name: String,
    },
}

/// `origin admin add|list|remove`.
pub async fn admin(home: &OriginHome, command: AdminCommand) -> Result<()> {
    match command {
        AdminCommand::Add {
            name,
            role,
            password_stdin,
        } => {
            accounts::check_name(&name)?;
            let password = if password_stdin {
                read_password_line()?
            } else {
                prompt_password(&name)?
            };
            let hash = tokio::task::spawn_blocking(move || accounts::hash_password(&password))
                .await
                .context("the password hashing task failed")??;
            run(
                home,
                ControlCommand::AccountAdd {
                    name,
                    role: role.name().to_owned(),
                    password_hash: hash,
                },
                false,
                "the account was not added",
            )
            .await
        }
        AdminCommand::List { json } => {
            run(
                home,
                ControlCommand::AccountList,
                json,
                "the accounts cannot be listed",
            )
            .await
        }
        AdminCommand::Remove { name } => {
            accounts::check_name(&name)?;
            run(
                home,
                ControlCommand::AccountRemove { name },
                false,
                "the account was not removed",
            )
            .await
        }
    }
}

/// The first line of standard input, without its line ending.
fn read_password_line() -> Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password).to_owned();
    accounts::check_password(&password)?;
    Ok(password)
}

/// Asks for the password twice on the terminal, without echo.
fn prompt_password(name: &str) -> Result<String> {
    let password = rpassword::prompt_password(format!("Password for {name}: "))
        .context("cannot read the password (no terminal? use --password-stdin)")?;
    accounts::check_password(&password)?;
    let again = rpassword::prompt_password("Again: ").context("cannot read the password")?;
    if again != password {
        anyhow::bail!("the two passwords differ");
    }
    Ok(password)
}
