//! The real machine: slots are ext4 partitions, the boot loader is GRUB's `grubenv`, a reboot is
//! `systemctl reboot` (configurable, so tests do not reboot the host).
//!
//! GRUB's menu entries must have the ids `A` and `B`, pass `stagecoach.slot=A` (or `B`) on the
//! kernel command line, and run the usual A/B script that [`super::boot::firmware_boot`]
//! describes.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::boot::{GrubEnv, Slot};
use super::fsutil::{self, IoContext};
use super::platform::{read_grubenv_file, write_grubenv_file, Platform, PlatformError};

/// Kernel command-line parameter naming the booted slot.
pub const CMDLINE_SLOT_PARAM: &str = "stagecoach.slot";

/// Where the kernel command line is read from.
const PROC_CMDLINE: &str = "/proc/cmdline";

/// Largest configuration file accepted, in bytes.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;

/// How a real machine is laid out. Read from a JSON file (`--linux-config`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxConfig {
    /// Block device of slot A (e.g. `/dev/sda2`).
    pub slot_a_device: PathBuf,
    /// Block device of slot B, the rescue (e.g. `/dev/sda3`).
    pub slot_b_device: PathBuf,
    /// GRUB's environment block (e.g. `/boot/grub/grubenv`), on a partition outside both slots.
    pub grubenv: PathBuf,
    /// The storage area, on a partition outside both slots.
    pub storage_dir: PathBuf,
    /// Where slots that are not the running root are mounted: `<mount_dir>/a`, `<mount_dir>/b`.
    pub mount_dir: PathBuf,
    /// The command that reboots the machine.
    #[serde(default = "default_reboot_command")]
    pub reboot_command: Vec<String>,
    /// Whether the running slot is mounted at `/` (true on a real machine; tests set false and
    /// have both slots mounted under `mount_dir`).
    #[serde(default = "default_true")]
    pub booted_slot_is_root: bool,
}

fn default_reboot_command() -> Vec<String> {
    vec!["systemctl".into(), "reboot".into()]
}

fn default_true() -> bool {
    true
}

impl LinuxConfig {
    /// Reads a configuration file.
    pub fn load(path: &Path) -> Result<Self, PlatformError> {
        let bytes = fsutil::read_optional(path)?
            .ok_or_else(|| PlatformError::Config(format!("{} does not exist", path.display())))?;
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(PlatformError::Config(format!(
                "{} is {} bytes, more than the limit of {MAX_CONFIG_BYTES}",
                path.display(),
                bytes.len()
            )));
        }
        let config: Self = serde_json::from_slice(&bytes)
            .map_err(|e| PlatformError::Config(format!("{}: {e}", path.display())))?;
        if config.reboot_command.is_empty() {
            return Err(PlatformError::Config(format!(
                "{}: reboot_command must not be empty",
                path.display()
            )));
        }
        Ok(config)
    }

    fn device(&self, slot: Slot) -> &Path {
        match slot {
            Slot::A => &self.slot_a_device,
            Slot::B => &self.slot_b_device,
        }
    }
}

/// A real machine with two ext4 slot partitions and GRUB.
#[derive(Debug)]
pub struct LinuxPlatform {
    config: LinuxConfig,
    booted: Slot,
    /// Mounts this process made, undone on drop.
    mounted: HashMap<Slot, PathBuf>,
}

impl LinuxPlatform {
    /// The machine described by `config`, booted from `booted` or, when `None`, from the slot
    /// named by `stagecoach.slot=` on the kernel command line.
    pub fn open(config: LinuxConfig, booted: Option<Slot>) -> Result<Self, PlatformError> {
        let booted = match booted {
            Some(slot) => slot,
            None => booted_from_cmdline()?,
        };
        for slot in Slot::ALL {
            let device = config.device(slot);
            let meta = std::fs::metadata(device).at("inspect slot device", device)?;
            if !std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
                return Err(PlatformError::Config(format!(
                    "slot {slot} device {} is not a block device",
                    device.display()
                )));
            }
        }
        Ok(Self {
            config,
            booted,
            mounted: HashMap::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LinuxConfig {
        &self.config
    }

    fn mount_point(&self, slot: Slot) -> PathBuf {
        self.config.mount_dir.join(slot.dir_name())
    }

    /// True when `dir` is the root of a filesystem on `device`.
    fn is_mounted_from(dir: &Path, device: &Path) -> Result<bool, PlatformError> {
        let Ok(dir_meta) = std::fs::metadata(dir) else {
            return Ok(false);
        };
        let device_meta = std::fs::metadata(device).at("inspect slot device", device)?;
        let parent = dir.parent().unwrap_or(Path::new("/"));
        let parent_meta = std::fs::metadata(parent).at("inspect", parent)?;
        Ok(dir_meta.dev() == device_meta.rdev() && parent_meta.dev() != dir_meta.dev())
    }

    fn unmount(&mut self, slot: Slot) -> Result<(), PlatformError> {
        let dir = self.mount_point(slot);
        if Self::is_mounted_from(&dir, self.config.device(slot))? {
            run(Command::new("umount").arg(&dir))?;
        }
        self.mounted.remove(&slot);
        Ok(())
    }
}

impl Drop for LinuxPlatform {
    fn drop(&mut self) {
        let slots: Vec<Slot> = self.mounted.keys().copied().collect();
        for slot in slots {
            if let Err(e) = self.unmount(slot) {
                tracing::warn!(slot = %slot, error = %e, "cannot unmount slot");
            }
        }
    }
}

impl Platform for LinuxPlatform {
    fn name(&self) -> &'static str {
        "linux"
    }

    fn booted_slot(&self) -> Slot {
        self.booted
    }

    fn storage_dir(&self) -> PathBuf {
        self.config.storage_dir.clone()
    }

    fn slot_root(&mut self, slot: Slot) -> Result<PathBuf, PlatformError> {
        if slot == self.booted && self.config.booted_slot_is_root {
            return Ok(PathBuf::from("/"));
        }
        let dir = self.mount_point(slot);
        let device = self.config.device(slot).to_path_buf();
        if Self::is_mounted_from(&dir, &device)? {
            return Ok(dir);
        }
        fsutil::create_dirs(&dir)?;
        run(Command::new("mount")
            .arg("-t")
            .arg("ext4")
            .arg(&device)
            .arg(&dir))?;
        self.mounted.insert(slot, dir.clone());
        Ok(dir)
    }

    fn format_slot(&mut self, slot: Slot) -> Result<(), PlatformError> {
        if slot == self.booted {
            return Err(PlatformError::RunningSlot {
                action: "format",
                slot,
            });
        }
        self.unmount(slot)?;
        let label = format!("stagecoach-{}", slot.dir_name());
        run(Command::new("mkfs.ext4")
            .arg("-F")
            .arg("-q")
            .arg("-L")
            .arg(&label)
            .arg(self.config.device(slot)))?;
        Ok(())
    }

    fn clear_slot_marker(&mut self, slot: Slot) -> Result<(), PlatformError> {
        // A partition without a filesystem holds no marker: nothing to clear.
        match self.slot_root(slot) {
            Ok(root) => {
                fsutil::remove_file_durably(&root.join(super::platform::SLOT_MARKER_FILE))?;
                Ok(())
            }
            Err(PlatformError::Command { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn read_boot_env(&mut self) -> Result<GrubEnv, PlatformError> {
        read_grubenv_file(&self.config.grubenv)
    }

    fn write_boot_env(&mut self, env: &GrubEnv) -> Result<(), PlatformError> {
        write_grubenv_file(&self.config.grubenv, env)
    }

    fn reboot(&mut self) -> Result<(), PlatformError> {
        // Unmount first so the slots are clean whatever the reboot command does.
        let slots: Vec<Slot> = self.mounted.keys().copied().collect();
        for slot in slots {
            self.unmount(slot)?;
        }
        let (program, args) = self
            .config
            .reboot_command
            .split_first()
            .ok_or_else(|| PlatformError::Config("reboot_command is empty".into()))?;
        tracing::info!(command = ?self.config.reboot_command, "rebooting");
        run(Command::new(program).args(args))
    }
}

fn booted_from_cmdline() -> Result<Slot, PlatformError> {
    let cmdline = std::fs::read_to_string(PROC_CMDLINE).at("read", Path::new(PROC_CMDLINE))?;
    parse_cmdline_slot(&cmdline).ok_or_else(|| {
        PlatformError::Config(format!(
            "cannot tell which slot is running: add {CMDLINE_SLOT_PARAM}=A (or B) to the kernel command line of each GRUB entry, or pass --booted-slot"
        ))
    })
}

/// The slot named by `stagecoach.slot=` in a kernel command line.
pub fn parse_cmdline_slot(cmdline: &str) -> Option<Slot> {
    cmdline
        .split_whitespace()
        .filter_map(|word| word.strip_prefix(CMDLINE_SLOT_PARAM)?.strip_prefix('='))
        .find_map(|value| value.parse().ok())
}

/// Runs a command; an error carries its status and output.
fn run(command: &mut Command) -> Result<(), PlatformError> {
    let line = describe(command);
    let output = command.output().map_err(|e| PlatformError::Command {
        command: line.clone(),
        detail: format!("cannot start: {e}"),
    })?;
    if output.status.success() {
        return Ok(());
    }
    Err(PlatformError::Command {
        command: line,
        detail: format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    })
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booted_slot_comes_from_the_kernel_command_line() {
        assert_eq!(
            parse_cmdline_slot("BOOT_IMAGE=/vmlinuz root=/dev/sda2 stagecoach.slot=B quiet"),
            Some(Slot::B)
        );
        assert_eq!(parse_cmdline_slot("root=/dev/sda2 quiet"), None);
        assert_eq!(parse_cmdline_slot("stagecoach.slot=C"), None);
    }

    #[test]
    fn config_defaults_reboot_with_systemctl() {
        let config: LinuxConfig = serde_json::from_str(
            r#"{"slot_a_device":"/dev/sda2","slot_b_device":"/dev/sda3","grubenv":"/boot/grub/grubenv","storage_dir":"/var/lib/stagecoach","mount_dir":"/run/stagecoach"}"#,
        )
        .expect("parse");
        assert_eq!(config.reboot_command, vec!["systemctl", "reboot"]);
        assert!(config.booted_slot_is_root);
    }
}
