//! The simulated machine: slots are directories, the boot loader is a grubenv file, and a reboot
//! is the agent exiting with [`REBOOT_EXIT_CODE`] for a supervisor to start it again "booted"
//! from the slot the firmware chooses.
//!
//! Layout of a machine root:
//!
//! ```text
//! ROOT/slots/a/      slot A's filesystem
//! ROOT/slots/b/      slot B's filesystem (the rescue)
//! ROOT/boot/grubenv  the boot loader's environment block
//! ROOT/storage/      the storage area: store/, swap/journal.json, swap/identity/
//! ROOT/boots.log     one line per boot, appended by the supervisor
//! ```

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::boot::{firmware_boot, Slot};
use super::fault;
use super::fsutil::{self, FsError};
use super::platform::{
    read_grubenv_file, write_grubenv_file, Platform, PlatformError, SlotMarker, SLOT_MARKER_FILE,
};

/// Exit code with which the agent asks its supervisor to reboot the machine.
pub const REBOOT_EXIT_CODE: i32 = 100;

/// Boots a supervisor allows before it declares the procedure stuck.
pub const DEFAULT_MAX_BOOTS: u32 = 32;

/// Name of the machine store directory inside the storage area.
pub const STORE_DIR: &str = "store";

/// A simulated machine rooted at a directory.
#[derive(Clone, Debug)]
pub struct SimPlatform {
    root: PathBuf,
    booted: Slot,
}

impl SimPlatform {
    /// Creates the layout of an empty machine at `root` (idempotent): two empty slots, an empty
    /// boot environment, an empty storage area.
    pub fn create(root: &Path) -> Result<(), PlatformError> {
        for slot in Slot::ALL {
            fsutil::create_dirs(&slot_dir(root, slot))?;
        }
        fsutil::create_dirs(&root.join("storage"))?;
        let grubenv = grubenv_path(root);
        if let Some(dir) = grubenv.parent() {
            fsutil::create_dirs(dir)?;
        }
        if !grubenv.exists() {
            write_grubenv_file(&grubenv, &super::boot::GrubEnv::new())?;
        }
        Ok(())
    }

    /// The machine at `root`, booted from `booted`.
    pub fn open(root: &Path, booted: Slot) -> Result<Self, PlatformError> {
        for slot in Slot::ALL {
            if !slot_dir(root, slot).is_dir() {
                return Err(PlatformError::Config(format!(
                    "{} is not a simulated machine (no {}): create it with `edge-agent sim-provision`",
                    root.display(),
                    slot_dir(root, slot).display()
                )));
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            booted,
        })
    }

    /// The machine's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Directory of `slot` under a machine root.
pub fn slot_dir(root: &Path, slot: Slot) -> PathBuf {
    root.join("slots").join(slot.dir_name())
}

/// The grubenv file under a machine root.
pub fn grubenv_path(root: &Path) -> PathBuf {
    root.join("boot").join("grubenv")
}

/// The file where the supervisor records the slot it booted, read by agent commands that are
/// not told `--booted-slot`.
pub fn booted_slot_path(root: &Path) -> PathBuf {
    root.join("boot").join("booted-slot")
}

/// The slot the machine at `root` last booted, as the supervisor recorded it.
pub fn recorded_booted_slot(root: &Path) -> Result<Option<Slot>, PlatformError> {
    let path = booted_slot_path(root);
    match fsutil::read_optional(&path)? {
        None => Ok(None),
        Some(bytes) => String::from_utf8_lossy(&bytes)
            .trim()
            .parse()
            .map(Some)
            .map_err(|e: String| PlatformError::Config(format!("{}: {e}", path.display()))),
    }
}

/// The storage area under a machine root.
pub fn storage_dir(root: &Path) -> PathBuf {
    root.join("storage")
}

/// The machine store under a machine root.
pub fn store_dir(root: &Path) -> PathBuf {
    storage_dir(root).join(STORE_DIR)
}

impl Platform for SimPlatform {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn booted_slot(&self) -> Slot {
        self.booted
    }

    fn storage_dir(&self) -> PathBuf {
        storage_dir(&self.root)
    }

    fn slot_root(&mut self, slot: Slot) -> Result<PathBuf, PlatformError> {
        Ok(slot_dir(&self.root, slot))
    }

    fn format_slot(&mut self, slot: Slot) -> Result<(), PlatformError> {
        if slot == self.booted {
            return Err(PlatformError::RunningSlot {
                action: "format",
                slot,
            });
        }
        let dir = slot_dir(&self.root, slot);
        fsutil::empty_dir(&dir, &mut || fault::op_point("wipe entry"))?;
        fsutil::sync_dir(&dir)?;
        Ok(())
    }

    fn read_boot_env(&mut self) -> Result<super::boot::GrubEnv, PlatformError> {
        read_grubenv_file(&grubenv_path(&self.root))
    }

    fn write_boot_env(&mut self, env: &super::boot::GrubEnv) -> Result<(), PlatformError> {
        write_grubenv_file(&grubenv_path(&self.root), env)
    }

    fn reboot(&mut self) -> Result<(), PlatformError> {
        tracing::info!(
            exit_code = REBOOT_EXIT_CODE,
            "rebooting (simulated: exiting for the supervisor)"
        );
        Ok(())
    }
}

/// How one boot of the simulated machine ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootExit {
    /// The agent exited with this code (not the reboot code).
    Exited(i32),
    /// The agent asked for a reboot.
    Rebooted,
    /// The agent was killed by this signal: a power cut.
    Killed(i32),
}

/// One boot of the simulated machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootRecord {
    /// 1-based boot number.
    pub index: u32,
    /// The slot the firmware chose.
    pub slot: Slot,
    /// The marker of that slot at power-on: what OS booted.
    pub marker: SlotMarker,
    /// How the boot ended.
    pub exit: BootExit,
}

/// Why the simulated machine could not go on.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The firmware chose a slot that holds no complete OS: the machine is bricked.
    #[error("boot {index}: the firmware chose slot {slot}, which holds no complete OS (no marker); the machine does not boot")]
    NoOs {
        /// Boot number.
        index: u32,
        /// The slot chosen.
        slot: Slot,
    },
    /// A slot marker is unreadable.
    #[error("boot {index}: slot {slot}'s marker is unreadable: {detail}")]
    BadMarker {
        /// Boot number.
        index: u32,
        /// The slot chosen.
        slot: Slot,
        /// Why.
        detail: String,
    },
    /// The procedure kept rebooting.
    #[error("the machine rebooted {0} times without settling: the procedure is stuck")]
    TooManyBoots(u32),
    /// The boot environment or a file could not be read or written.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// The agent could not be started.
    #[error("cannot start the agent {agent}: {source}")]
    Spawn {
        /// The executable.
        agent: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl From<FsError> for SimError {
    fn from(e: FsError) -> Self {
        SimError::Platform(PlatformError::Fs(e))
    }
}

/// What the supervisor runs.
#[derive(Clone, Debug)]
pub struct SimMachineConfig {
    /// The `edge-agent` executable.
    pub agent: PathBuf,
    /// The machine root.
    pub root: PathBuf,
    /// Arguments of the first boot's command (for example `swap --target ...`); `--root ROOT
    /// --booted-slot X` is appended. Later boots run `resume --root ROOT --booted-slot X`, as
    /// the agent's boot-time service would.
    pub first_args: Vec<OsString>,
    /// Boots before the supervisor gives up.
    pub max_boots: u32,
}

/// Per-boot decisions of a test harness.
pub trait SimHooks {
    /// Extra environment for the agent of boot `index` (fault injection, health flags).
    fn env_for_boot(
        &mut self,
        _index: u32,
        _slot: Slot,
        _history: &[BootRecord],
    ) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Called at power-on, after the firmware chose `slot` and before the agent runs: a place to
    /// check the slot's content.
    fn on_power_on(&mut self, _index: u32, _slot: Slot, _marker: &SlotMarker) {}
}

/// No hooks.
pub struct NoHooks;

impl SimHooks for NoHooks {}

/// Runs the simulated machine: firmware chooses a slot, the agent runs "booted" from it, and on
/// a reboot request or a power cut (the agent killed by a signal) the loop goes on. Stops when
/// the agent exits on its own, with the boots it took.
pub fn run_sim_machine(
    config: &SimMachineConfig,
    hooks: &mut dyn SimHooks,
) -> Result<Vec<BootRecord>, SimError> {
    let mut history: Vec<BootRecord> = Vec::new();
    for index in 1..=config.max_boots {
        let grubenv = grubenv_path(&config.root);
        let env = read_grubenv_file(&grubenv)?;
        let (slot, next_env) = firmware_boot(&env);
        if next_env != env {
            write_grubenv_file(&grubenv, &next_env)?;
        }
        let marker_path = slot_dir(&config.root, slot).join(SLOT_MARKER_FILE);
        let marker: SlotMarker = match fsutil::read_optional(&marker_path)? {
            None => return Err(SimError::NoOs { index, slot }),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| SimError::BadMarker {
                index,
                slot,
                detail: e.to_string(),
            })?,
        };
        // What /proc/cmdline is on a real machine: the agent's default idea of where it runs.
        fsutil::write_atomic(
            &booted_slot_path(&config.root),
            slot.as_str().as_bytes(),
            0o644,
        )?;
        hooks.on_power_on(index, slot, &marker);
        let mut command = Command::new(&config.agent);
        if index == 1 {
            command.args(&config.first_args);
        } else {
            command.arg("resume");
        }
        command
            .arg("--root")
            .arg(&config.root)
            .arg("--booted-slot")
            .arg(slot.as_str());
        for (key, value) in hooks.env_for_boot(index, slot, &history) {
            command.env(key, value);
        }
        let status = command.status().map_err(|source| SimError::Spawn {
            agent: config.agent.clone(),
            source,
        })?;
        let exit = match (status.code(), status.signal()) {
            (Some(REBOOT_EXIT_CODE), _) => BootExit::Rebooted,
            (Some(code), _) => BootExit::Exited(code),
            (None, Some(signal)) => BootExit::Killed(signal),
            (None, None) => BootExit::Killed(0),
        };
        tracing::info!(boot = index, slot = %slot, os = %marker.name, version = %marker.version, ?exit, "boot ended");
        log_boot(&config.root, index, slot, &marker, exit);
        history.push(BootRecord {
            index,
            slot,
            marker,
            exit,
        });
        if let BootExit::Exited(_) = exit {
            return Ok(history);
        }
    }
    Err(SimError::TooManyBoots(config.max_boots))
}

/// Appends one line per boot to `ROOT/boots.log`, for people reading a demo afterwards.
fn log_boot(root: &Path, index: u32, slot: Slot, marker: &SlotMarker, exit: BootExit) {
    let line = format!(
        "boot {index}: slot {slot} ({} {}) -> {exit:?}\n",
        marker.name, marker.version
    );
    let written = OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("boots.log"))
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot append to boots.log");
    }
}
