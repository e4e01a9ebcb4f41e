//! The crash-safe A/B operating-system swap (brief 000, claims 7–14).
//!
//! Slot A holds the production OS, slot B the base (rescue) OS. The swap unpacks the rescue to
//! B, boots B once, wipes A, unpacks the target to A with the machine's identity copied in, boots
//! A with an attempt counter, health-checks it, and commits, or falls back to the rescue and
//! reports why. The rescue and the bundles stay in place for repair, reinstall or another OS.
//!
//! Layers, from pure to I/O:
//! - [`boot`]: slots, the GRUB environment block, [`boot::firmware_boot`] (pure);
//! - [`plan`], [`machine`]: the plan and the state machine (pure);
//! - [`platform`]: the [`Platform`] trait; [`sim`] and [`linux`] implement it;
//! - [`bundles`], [`store`], [`identity`], [`health`], [`journal`]: the side effects;
//! - [`driver`]: the entry points [`start_swap`], [`resume`], [`rollback`];
//! - [`status`]: what `edge-agent status` prints; [`fault`]: crash injection for tests.

pub mod boot;
pub mod bundles;
pub mod driver;
pub mod fault;
pub mod fsutil;
pub mod health;
pub mod identity;
pub mod journal;
pub mod linux;
pub mod machine;
pub mod plan;
pub mod platform;
pub mod sim;
pub mod status;
pub mod store;

use std::ffi::OsString;
use std::path::PathBuf;

use ed25519_dalek::VerifyingKey;

pub use boot::{firmware_boot, GrubEnv, Slot};
pub use driver::{resume, rollback, start_swap, RunEnd, SwapContext, SwapError};
pub use machine::{Step, SwapState};
pub use plan::{HealthCheck, SwapPlan};
pub use platform::{Platform, PlatformError, SlotMarker};
pub use sim::{SimPlatform, REBOOT_EXIT_CODE};

/// Directory of the machine's bundle store inside its storage area.
pub const MACHINE_STORE_DIR: &str = "store";

/// Which machine the agent acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MachineSpec {
    /// A simulated machine rooted at a directory.
    Sim {
        /// The machine root.
        root: PathBuf,
    },
    /// A real machine described by a JSON [`linux::LinuxConfig`].
    Linux {
        /// The configuration file.
        config: PathBuf,
    },
}

impl MachineSpec {
    /// Opens the platform. `booted` overrides where the machine runs from; without it a sim
    /// machine uses the slot its supervisor last booted, a real one its kernel command line.
    pub fn open(&self, booted: Option<Slot>) -> Result<Box<dyn Platform>, PlatformError> {
        match self {
            MachineSpec::Sim { root } => {
                let booted = match booted {
                    Some(slot) => slot,
                    None => sim::recorded_booted_slot(root)?.ok_or_else(|| {
                        PlatformError::Config(format!(
                            "{} records no booted slot: pass --booted-slot A|B",
                            root.display()
                        ))
                    })?,
                };
                Ok(Box::new(SimPlatform::open(root, booted)?))
            }
            MachineSpec::Linux { config } => {
                let config = linux::LinuxConfig::load(config)?;
                Ok(Box::new(linux::LinuxPlatform::open(config, booted)?))
            }
        }
    }

    /// The agent arguments naming this machine (`--root R` or `--linux-config C`).
    pub fn agent_args(&self) -> Vec<OsString> {
        match self {
            MachineSpec::Sim { root } => vec!["--root".into(), root.into()],
            MachineSpec::Linux { config } => vec!["--linux-config".into(), config.into()],
        }
    }
}

/// The machine's own bundle store, in its storage area.
pub fn machine_store_dir(platform: &dyn Platform) -> PathBuf {
    platform.storage_dir().join(MACHINE_STORE_DIR)
}

/// Opens the machine's own bundle store ([`machine_store_dir`]).
pub fn open_machine_store(platform: &dyn Platform) -> anyhow::Result<proto::store::Store> {
    use anyhow::Context as _;
    let dir = machine_store_dir(platform);
    store::open_store(&dir)
        .with_context(|| format!("cannot open the machine's store {}", dir.display()))
}

/// Why a simulated machine could not be provisioned.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// Creating the layout failed.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// Installing the OS failed.
    #[error(transparent)]
    Install(#[from] driver::InstallError),
}

/// Makes a simulated machine at `root` that runs bundle `os` from slot A, as if installed at the
/// factory: creates the layout, installs `os` from `store` into slot A, and makes A the default.
pub fn provision_sim(
    root: &std::path::Path,
    store: &dyn bundles::BundleStore,
    os: &proto::BundleId,
    trusted: &[VerifyingKey],
    keys: Option<&proto::keys::KeyRing>,
) -> Result<SlotMarker, ProvisionError> {
    SimPlatform::create(root)?;
    // The machine is off while it is provisioned: nothing runs from A.
    let mut platform = SimPlatform::open(root, Slot::B)?;
    if let Some(keys) = keys {
        proto::keyring::save(&driver::machine_keyring_path(&platform), keys)
            .map_err(driver::InstallError::from)?;
    }
    let marker = driver::install_bundle(&mut platform, store, Slot::A, os, trusted)?;
    platform.set_default(Slot::A)?;
    fsutil::write_atomic(&sim::booted_slot_path(root), b"A", 0o644).map_err(PlatformError::from)?;
    Ok(marker)
}
