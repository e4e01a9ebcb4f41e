//! [`Platform`]: everything the swap does to the machine, behind one trait.
//!
//! A platform provides slots as directories it has mounted, a way to format a slot, the boot
//! loader's environment block, a reboot, and the health checks. The procedures built on those
//! (installing a bundle with its completion marker, the boot-loader operations) are provided
//! methods, so [`super::sim::SimPlatform`] and [`super::linux::LinuxPlatform`] behave the same.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::boot::{GrubEnv, GrubEnvError, Slot, SlotHealth};
use super::fsutil::{self, FsError};
use super::health;
use super::plan::HealthCheck;
use proto::{BundleId, BundleKind, Manifest};

/// File at a slot's root recording that the slot holds a complete, verified OS. Written last
/// (after the filesystem is synced) and removed first (before the slot is wiped or unpacked).
pub const SLOT_MARKER_FILE: &str = ".stagecoach-slot.json";

/// The contents of [`SLOT_MARKER_FILE`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotMarker {
    /// The bundle unpacked into the slot.
    pub bundle: BundleId,
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its kind.
    pub kind: BundleKind,
}

impl SlotMarker {
    /// The marker for a verified manifest.
    pub fn for_manifest(bundle: BundleId, manifest: &Manifest) -> Self {
        Self {
            bundle,
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            kind: manifest.kind,
        }
    }
}

/// Why a platform operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// A filesystem operation failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The boot environment block is unusable.
    #[error("boot environment {path}: {source}")]
    BootEnv {
        /// The grubenv file.
        path: PathBuf,
        /// Why.
        #[source]
        source: GrubEnvError,
    },
    /// An external command (mkfs, mount, reboot) failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status and output.
        detail: String,
    },
    /// The platform's configuration is unusable.
    #[error("platform configuration: {0}")]
    Config(String),
    /// A slot marker exists but cannot be read.
    #[error("slot {slot} marker {path} is corrupt ({detail}): the slot does not hold a usable OS; reinstall it")]
    CorruptMarker {
        /// The slot.
        slot: Slot,
        /// The marker file.
        path: PathBuf,
        /// The parse error.
        detail: String,
    },
    /// An operation would modify the OS that is running.
    #[error("refusing to {action} slot {slot}: it is the running OS")]
    RunningSlot {
        /// What was asked.
        action: &'static str,
        /// The slot.
        slot: Slot,
    },
}

/// Everything that touches the machine. `Send`, so an async task (a capture, a remote swap)
/// may hold one across its awaits.
pub trait Platform: Send {
    /// A short name for logs (`sim`, `linux`).
    fn name(&self) -> &'static str;

    /// The slot this boot runs from.
    fn booted_slot(&self) -> Slot;

    /// The storage area outside both slots: the bundle store, the journal, the identity copy.
    fn storage_dir(&self) -> PathBuf;

    /// The root directory of `slot`'s filesystem, mounted and writable.
    fn slot_root(&mut self, slot: Slot) -> Result<PathBuf, PlatformError>;

    /// Leaves `slot` with an empty filesystem. Never called on the running slot.
    fn format_slot(&mut self, slot: Slot) -> Result<(), PlatformError>;

    /// Reads the boot loader's environment block.
    fn read_boot_env(&mut self) -> Result<GrubEnv, PlatformError>;

    /// Replaces the boot loader's environment block atomically.
    fn write_boot_env(&mut self, env: &GrubEnv) -> Result<(), PlatformError>;

    /// Asks the machine to reboot. Returns once the request is made; the caller then exits.
    fn reboot(&mut self) -> Result<(), PlatformError>;

    /// Runs one health check against the running OS.
    fn run_health_check(&mut self, check: &HealthCheck) -> Result<(), String> {
        let slot = self.booted_slot();
        let root = self
            .slot_root(slot)
            .map_err(|e| format!("cannot reach the running slot: {e}"))?;
        health::run_check(check, slot, &root)
    }

    /// The completion marker of `slot`: `Some` only when it holds a complete, verified OS.
    fn slot_marker(&mut self, slot: Slot) -> Result<Option<SlotMarker>, PlatformError> {
        let path = self.slot_root(slot)?.join(SLOT_MARKER_FILE);
        let Some(bytes) = fsutil::read_optional(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| PlatformError::CorruptMarker {
                slot,
                path,
                detail: e.to_string(),
            })
    }

    /// Removes `slot`'s marker durably: from here on the slot counts as empty.
    fn clear_slot_marker(&mut self, slot: Slot) -> Result<(), PlatformError> {
        let path = self.slot_root(slot)?.join(SLOT_MARKER_FILE);
        fsutil::remove_file_durably(&path)?;
        Ok(())
    }

    /// Syncs `slot`'s filesystem, then writes its marker atomically.
    fn seal_slot(&mut self, slot: Slot, marker: &SlotMarker) -> Result<(), PlatformError> {
        let root = self.slot_root(slot)?;
        fsutil::sync_filesystem(&root)?;
        // Serializing strings and a hash cannot fail.
        let bytes = serde_json::to_vec_pretty(marker).unwrap_or_default();
        fsutil::write_atomic(&root.join(SLOT_MARKER_FILE), &bytes, 0o644)?;
        Ok(())
    }

    /// Wipes `slot`: marker first, then the filesystem. Refuses the running slot.
    fn wipe_slot(&mut self, slot: Slot) -> Result<(), PlatformError> {
        if slot == self.booted_slot() {
            return Err(PlatformError::RunningSlot {
                action: "wipe",
                slot,
            });
        }
        self.clear_slot_marker(slot)?;
        self.format_slot(slot)
    }

    /// Boot-loader operation: make `slot` the default (clears a once-boot and trial counter).
    fn set_default(&mut self, slot: Slot) -> Result<(), PlatformError> {
        self.edit_boot_env(&mut |env| env.set_default(slot))
    }

    /// Boot-loader operation: boot `slot` on the next boot only.
    fn set_boot_once(&mut self, slot: Slot) -> Result<(), PlatformError> {
        self.edit_boot_env(&mut |env| env.set_boot_once(slot))
    }

    /// Boot-loader operation: boot `slot` by default for `attempts` trial boots, then fall back.
    fn arm_trial(&mut self, slot: Slot, attempts: u8) -> Result<(), PlatformError> {
        self.edit_boot_env(&mut |env| env.arm_trial(slot, attempts))
    }

    /// Boot-loader operation: mark `slot` good and make it the default for good.
    fn commit_slot(&mut self, slot: Slot) -> Result<(), PlatformError> {
        self.edit_boot_env(&mut |env| {
            env.set_default(slot);
            env.mark(slot, SlotHealth::Good);
        })
    }

    /// Boot-loader operation: mark `bad` bad and make `default` the default.
    fn roll_back_slot(&mut self, bad: Slot, default: Slot) -> Result<(), PlatformError> {
        self.edit_boot_env(&mut |env| {
            env.set_default(default);
            env.mark(bad, SlotHealth::Bad);
        })
    }

    /// Reads, edits and writes back the environment block in one atomic replacement.
    fn edit_boot_env(&mut self, edit: &mut dyn FnMut(&mut GrubEnv)) -> Result<(), PlatformError> {
        let mut env = self.read_boot_env()?;
        edit(&mut env);
        self.write_boot_env(&env)
    }
}

/// Reads a grubenv file; a missing file reads as an empty environment.
pub(crate) fn read_grubenv_file(path: &Path) -> Result<GrubEnv, PlatformError> {
    match fsutil::read_optional(path)? {
        None => Ok(GrubEnv::new()),
        Some(bytes) => GrubEnv::parse(&bytes).map_err(|source| PlatformError::BootEnv {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes a grubenv file atomically (temp file, fsync, rename, directory fsync).
pub(crate) fn write_grubenv_file(path: &Path, env: &GrubEnv) -> Result<(), PlatformError> {
    let bytes = env.to_bytes().map_err(|source| PlatformError::BootEnv {
        path: path.to_path_buf(),
        source,
    })?;
    fsutil::write_atomic(path, &bytes, 0o644)?;
    Ok(())
}
