//! Virtual machines that boot a real Debian kernel through real GRUB (BIOS) in QEMU, on the
//! seed's A/B disk layout: the test bed of the OS swap on real machines (issue 13).
//!
//! [`build_image`] makes, from Debian's packages only and without loop devices, a raw disk with
//! an msdos partition table:
//!
//! | part | holds                                                                      |
//! |------|----------------------------------------------------------------------------|
//! | MBR  | GRUB's `boot.img`; its `core.img` sits in the gap, sectors 1..2048          |
//! | p1   | boot (ext2): `/boot/grub/grub.cfg`, `/boot/grub/grubenv`, GRUB's modules    |
//! | p2   | slot A (ext4): a whole Debian root, with its own kernel and initramfs       |
//! | p3   | slot B (ext4): a copy of A whose `/etc/stagecoach-marker` differs           |
//! | p4   | storage (ext4, empty)                                                       |
//!
//! Each slot carries its own kernel (`/vmlinuz`, `/initrd.img`, Debian's symlinks), so an OS
//! image written into a slot brings the kernel it was built with, and the boot partition holds
//! only what both slots share: GRUB and its environment block. The image is built once per set
//! of inputs and cached (see [`cache_root`]); callers boot a copy ([`VmImage::copy_to`]).
//!
//! [`boot`] runs QEMU (TCG, user-mode networking restricted to the guest) until the guest
//! prints its [`BOOTED_TAG`] line on the serial console, or exits, or time runs out.
//! [`VmImage::write_grubenv`] rewrites GRUB's environment block in place between boots, at the
//! byte offset found when the image was built, as GRUB's own `save_env` does.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

/// Bumped whenever the way an image is built changes, so cached images are rebuilt.
pub const IMAGE_FORMAT_VERSION: u32 = 2;

/// Names the directory that caches built images (default: [`DEFAULT_CACHE_DIR`] under `$HOME`).
pub const CACHE_DIR_VAR: &str = "STAGECOACH_VM_CACHE";

/// The image cache under `$HOME`, when [`CACHE_DIR_VAR`] is not set.
pub const DEFAULT_CACHE_DIR: &str = ".cache/stagecoach/vm-images";

pub use stagecoach_testing::debian::{mirror_reachable, DEFAULT_MIRROR, MIRROR_VAR};

/// What the guest prints on its serial console once it has booted: `STAGECOACH-BOOTED
/// slot=<stagecoach.slot= of /proc/cmdline> marker=<contents of /etc/stagecoach-marker>`.
pub const BOOTED_TAG: &str = "STAGECOACH-BOOTED";

/// Where GRUB's BIOS images and modules are installed (Debian's `grub-pc-bin`).
pub const GRUB_I386_PC_DIR: &str = "/usr/lib/grub/i386-pc";

/// The tools [`build_image`] and [`boot`] run.
pub const REQUIRED_TOOLS: &[&str] = &[
    "mmdebstrap",
    "mke2fs",
    "debugfs",
    "sfdisk",
    "grub-mkimage",
    "qemu-system-x86_64",
];

/// What a VM test needs of this machine: root (mmdebstrap installs files owned by many users),
/// the tools that build and boot an image and `extra_tools`, and GRUB's BIOS modules. Each
/// `Err` says what is missing and where it comes from.
pub fn test_preconditions(extra_tools: &[&str]) -> Vec<Result<(), String>> {
    use stagecoach_testing::need;
    let boot_img = Path::new(GRUB_I386_PC_DIR).join("boot.img");
    let grub = if boot_img.is_file() {
        Ok(())
    } else {
        Err(format!(
            "no {} (Debian: grub-pc-bin; scripts/install-deps.sh installs it)",
            boot_img.display()
        ))
    };
    vec![
        need::root(),
        need::tools(REQUIRED_TOOLS),
        need::tools(extra_tools),
        grub,
    ]
}

/// Whether the image of `spec` can be had here: cached under `cache`, or buildable because the
/// Debian mirror answers. `Err` says why not.
pub fn image_available(spec: &ImageSpec, cache: &Path) -> Result<(), String> {
    match cached_image(spec, cache) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => mirror_reachable(&spec.mirror)
            .map_err(|reason| format!("no cached VM image and no Debian mirror: {reason}")),
        Err(error) => Err(format!("cannot read the image cache: {error:#}")),
    }
}

/// For a test that boots the agent image of the `edge-agent` at `agent`: checks what it needs
/// ([`test_preconditions`], [`image_available`]) and returns the image's spec and the cache,
/// or `None` once the test was skipped with the reason (or failed, under
/// `STAGECOACH_REQUIRE_ALL=1`).
pub fn agent_image_for_test(test: &str, agent: &Path) -> Result<Option<(ImageSpec, PathBuf)>> {
    let mut needs = test_preconditions(&["chroot", "cp", "sha256sum"]);
    // Each VM runs in a network namespace of its own (crate::vmnet).
    needs.push(stagecoach_testing::need::network_namespaces());
    if !stagecoach_testing::can_run(test, &needs) {
        return Ok(None);
    }
    let cache = cache_root()?;
    let spec = ImageSpec::with_agent(agent)?;
    if let Err(reason) = image_available(&spec, &cache) {
        stagecoach_testing::skip_or_fail(test, &reason);
        return Ok(None);
    }
    Ok(Some((spec, cache)))
}

/// For a test that boots the agent image of the `edge-agent` at `agent`:
/// [`agent_image_for_test`], then the image built or taken from the cache (on a blocking
/// thread), with the time that took printed. `None` once the test was skipped.
pub async fn agent_image_ready(test: &str, agent: &Path) -> Result<Option<VmImage>> {
    let Some((spec, cache)) = agent_image_for_test(test, agent)? else {
        return Ok(None);
    };
    let started = Instant::now();
    let image = tokio::task::spawn_blocking(move || build_image(&spec, &cache))
        .await
        .context("the image build task failed")?
        .context("cannot build the VM image")?;
    eprintln!(
        "{test}: image ready in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        image.path.display()
    );
    Ok(Some(image))
}

/// Bytes per disk sector.
const SECTOR_BYTES: u64 = 512;
const MIB: u64 = 1024 * 1024;

/// The first partition starts at 1 MiB, leaving sectors 1..2048 to GRUB's core.img.
const FIRST_PARTITION_SECTOR: u64 = 2048;

/// The sector core.img is written at (patched into boot.img at [`BOOT_IMG_KERNEL_SECTOR`]).
const CORE_IMG_SECTOR: u64 = 1;

/// Offset in boot.img of the 64-bit LBA of core.img's first sector.
const BOOT_IMG_KERNEL_SECTOR: usize = 0x5c;
/// Offset in boot.img of the jump that tests the BIOS boot drive; `grub-bios-setup` replaces
/// it with two NOPs on a hard disk, to work around BIOSes that pass a floppy's drive number.
const BOOT_IMG_DRIVE_CHECK: usize = 0x66;
/// Where the MBR's partition table starts; boot.img's code must stop before it.
const MBR_PARTITION_TABLE: usize = 446;

/// Block size of the boot filesystem: the 1024-byte grubenv fills exactly one block.
const BOOT_FS_BLOCK_BYTES: u64 = 1024;

/// Size of a GRUB environment block, in bytes.
pub const GRUBENV_BYTES: usize = 1024;
const GRUBENV_HEADER: &str = "# GRUB Environment Block\n";

/// The GRUB modules built into core.img, so nothing is loaded from disk before grub.cfg runs.
const GRUB_MODULES: &[&str] = &[
    "biosdisk",
    "part_msdos",
    "ext2",
    "normal",
    "linux",
    "configfile",
    "loadenv",
    "echo",
    "test",
    "serial",
    "terminal",
];

/// Largest boot counter GRUB's script counts down (the agent's attempts are a `u8`).
const MAX_BOOT_COUNTER: u32 = u8::MAX as u32;

/// Copy granularity when writing a partition into the disk; all-zero chunks stay holes.
const COPY_CHUNK_BYTES: usize = MIB as usize;

/// How long [`boot`] waits for QEMU to exit after the guest reported (it powers off).
const POWEROFF_GRACE: Duration = Duration::from_secs(120);
/// How often [`boot`] reads the serial log.
const SERIAL_POLL: Duration = Duration::from_millis(200);

/// QEMU's memory for a guest, in MiB.
const GUEST_MEMORY_MIB: u32 = 1024;

/// Everything an image is built from; its hash names the cached image.
#[derive(Clone, Debug, Serialize)]
pub struct ImageSpec {
    /// Debian suite (`bookworm`).
    pub suite: String,
    /// Debian mirror URL.
    pub mirror: String,
    /// Packages added to mmdebstrap's `minbase` variant.
    pub packages: Vec<String>,
    /// Size of the boot partition, in MiB.
    pub boot_mib: u64,
    /// Size of each slot partition, in MiB.
    pub slot_mib: u64,
    /// Size of the storage partition, in MiB.
    pub storage_mib: u64,
    /// Contents of `/etc/stagecoach-marker` in slot A.
    pub marker_a: String,
    /// Contents of `/etc/stagecoach-marker` in slot B.
    pub marker_b: String,
    /// The agent image: the edge agent and its boot units in both slots, the guest staying up
    /// (see [`ImageSpec::with_agent`]); `None` for the boot image, whose guest reports and
    /// powers off.
    pub agent: Option<AgentSpec>,
}

/// The edge agent an agent image carries.
#[derive(Clone, Debug, Serialize)]
pub struct AgentSpec {
    /// The `edge-agent` executable copied into the image (its hash, not its path, keys the
    /// cache).
    #[serde(skip)]
    pub binary: PathBuf,
    /// BLAKE3 of the executable.
    pub binary_blake3: String,
}

impl ImageSpec {
    /// The image of a machine that runs the edge agent (`binary`): both slots hold the same
    /// Debian root with the agent at `/usr/local/bin/edge-agent`, DHCP on the first network
    /// interface (systemd-networkd), the boot partition mounted at [`GUEST_BOOT_MOUNT`] and
    /// the storage partition at [`GUEST_STORAGE`], the unit [`AGENT_UNIT_NAME`] (resume any
    /// journaled swap, then serve with the arguments of the storage area's `agent.env`), and
    /// the boot report on the serial console at every boot, without powering off. The root is
    /// kept beside the disk ([`VmImage::root`]) so a test can publish it as an OS image.
    pub fn with_agent(binary: &Path) -> Result<Self> {
        let bytes =
            fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
        Ok(Self {
            storage_mib: 1536,
            marker_a: "vm-os-1".into(),
            marker_b: "vm-os-1".into(),
            agent: Some(AgentSpec {
                binary: binary.to_owned(),
                binary_blake3: blake3::hash(&bytes).to_hex().to_string(),
            }),
            ..Self::default()
        })
    }
}

impl Default for ImageSpec {
    fn default() -> Self {
        Self {
            suite: "bookworm".into(),
            mirror: std::env::var(MIRROR_VAR).unwrap_or_else(|_| DEFAULT_MIRROR.into()),
            packages: [
                "linux-image-amd64",
                "systemd-sysv",
                "udev",
                "initramfs-tools",
            ]
            .map(String::from)
            .to_vec(),
            boot_mib: 32,
            slot_mib: 1024,
            storage_mib: 64,
            marker_a: "base-slot-a".into(),
            marker_b: "base-slot-b".into(),
            agent: None,
        }
    }
}

/// Where the parts of a built image are, in bytes from the start of the disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Total size of the disk.
    pub disk_bytes: u64,
    /// Start and length of p1 (boot), p2 (slot A), p3 (slot B), p4 (storage).
    pub partitions: [(u64, u64); 4],
    /// Where GRUB's 1024-byte environment block (`/boot/grub/grubenv` of p1) lies.
    pub grubenv_offset: u64,
}

/// A raw disk image with its [`Layout`].
#[derive(Clone, Debug)]
pub struct VmImage {
    /// The raw disk file.
    pub path: PathBuf,
    /// Where its parts are.
    pub layout: Layout,
    /// The Debian root both slots were made from (agent images only; slot A's marker).
    pub root: Option<PathBuf>,
}

/// What the guest printed on its serial console when it booted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestReport {
    /// The `stagecoach.slot=` of the guest's `/proc/cmdline`.
    pub slot: String,
    /// The contents of the guest's `/etc/stagecoach-marker`.
    pub marker: String,
    /// The guest's host name (agent images).
    pub hostname: Option<String>,
    /// The first 16 hex digits of the SHA-256 of `/etc/ssh/ssh_host_ed25519_key.pub`, or
    /// `none` (agent images).
    pub host_key: Option<String>,
}

/// How a boot ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootEnd {
    /// QEMU exited (the guest powered off, or QEMU failed), with this status.
    Exited(ExitStatus),
    /// Time ran out; QEMU was killed.
    TimedOut,
}

/// What [`boot`] saw.
#[derive(Clone, Debug)]
pub struct BootOutcome {
    /// The guest's report, if it printed one.
    pub guest: Option<GuestReport>,
    /// From QEMU's start to the guest's report (or to the end, without one).
    pub time_to_report: Duration,
    /// How the boot ended.
    pub end: BootEnd,
    /// The whole serial console output.
    pub serial: String,
}

/// The directory that caches built images: `$STAGECOACH_VM_CACHE`, or
/// `$HOME/.cache/stagecoach/vm-images`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(CACHE_DIR_VAR) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .with_context(|| format!("neither {CACHE_DIR_VAR} nor HOME is set"))?;
    Ok(Path::new(&home).join(DEFAULT_CACHE_DIR))
}

/// The cached image of `spec`, if the cache holds it (a test with no network can check this
/// before [`build_image`] needs the mirror).
pub fn cached_image(spec: &ImageSpec, cache: &Path) -> Result<Option<VmImage>> {
    load_cached(&cache.join(cache_key(spec)?))
}

/// The cached image of `spec`, built first when the cache lacks it (a few minutes: mmdebstrap
/// downloads and installs a Debian root with a kernel). Progress goes to stderr; mmdebstrap's
/// output to `mmdebstrap.log` beside the image.
pub fn build_image(spec: &ImageSpec, cache: &Path) -> Result<VmImage> {
    let key = cache_key(spec)?;
    let dir = cache.join(&key);
    if let Some(image) = load_cached(&dir)? {
        eprintln!("vm: using the cached image {}", image.path.display());
        mark_used(&dir)?;
        prune_stale_images(cache, &key, STALE_IMAGE_AFTER)?;
        return Ok(image);
    }
    fs::create_dir_all(cache).with_context(|| format!("cannot create {}", cache.display()))?;
    remove_abandoned_builds(cache)?;
    // Built beside its final place and renamed, so a cached image is always complete.
    let building = cache.join(format!(".building-{key}-{}", std::process::id()));
    if building.exists() {
        fs::remove_dir_all(&building)
            .with_context(|| format!("cannot remove {}", building.display()))?;
    }
    fs::create_dir_all(&building)
        .with_context(|| format!("cannot create {}", building.display()))?;
    let started = Instant::now();
    let built = build_into(spec, &building, started);
    if let Err(error) = built {
        let _ = fs::remove_dir_all(building.join("work"));
        return Err(error.context(format!(
            "building the VM image failed; its logs are in {}",
            building.display()
        )));
    }
    fs::remove_dir_all(building.join("work"))
        .with_context(|| format!("cannot remove {}/work", building.display()))?;
    match fs::rename(&building, &dir) {
        Ok(()) => {}
        // Another run finished first: use its image.
        Err(_) if dir.is_dir() => fs::remove_dir_all(&building)
            .with_context(|| format!("cannot remove {}", building.display()))?,
        Err(error) => {
            return Err(error).with_context(|| format!("cannot rename to {}", dir.display()))
        }
    }
    eprintln!(
        "vm: built {} in {:.0?}",
        dir.join(DISK_FILE).display(),
        started.elapsed()
    );
    mark_used(&dir)?;
    prune_stale_images(cache, &key, STALE_IMAGE_AFTER)?;
    load_cached(&dir)?.with_context(|| format!("{} vanished after its build", dir.display()))
}

/// How long a cached image may go unused before a build or use of another one removes it.
/// Every new `edge-agent` build makes a new agent image (700 MiB): without this, a developer's
/// cache grows by one per build.
pub const STALE_IMAGE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// File in an image's cache directory whose modification time says when it was last used.
const LAST_USED_FILE: &str = "last-used";

fn mark_used(dir: &Path) -> Result<()> {
    let path = dir.join(LAST_USED_FILE);
    File::create(&path)
        .and_then(|file| file.set_modified(std::time::SystemTime::now()))
        .with_context(|| format!("cannot mark {} used", dir.display()))
}

/// Removes the cached images other than `current` unused for `stale_after` (by their
/// [`LAST_USED_FILE`], else the directory's own time), saying which; names the others that
/// remain, with their size, and how to remove them. Returns the directories removed.
pub fn prune_stale_images(
    cache: &Path,
    current: &str,
    stale_after: Duration,
) -> Result<Vec<PathBuf>> {
    let now = std::time::SystemTime::now();
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    for entry in fs::read_dir(cache).with_context(|| format!("cannot list {}", cache.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        // Builds in progress (`.building-*`) are remove_abandoned_builds's.
        if name == current || name.starts_with('.') || !path.is_dir() {
            continue;
        }
        let used = fs::metadata(path.join(LAST_USED_FILE))
            .or_else(|_| fs::metadata(&path))
            .and_then(|meta| meta.modified())
            .with_context(|| format!("cannot read the time of {}", path.display()))?;
        let idle = now.duration_since(used).unwrap_or_default();
        if idle >= stale_after {
            eprintln!(
                "vm: removing the cached image {} (unused for {:.0} h)",
                path.display(),
                idle.as_secs_f64() / 3600.0
            );
            fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove the stale image {}", path.display()))?;
            removed.push(path);
        } else {
            kept.push(path);
        }
    }
    if !kept.is_empty() {
        eprintln!(
            "vm: {} other cached image(s) in {}, removed after {:.0} h unused (or remove them now: rm -r {})",
            kept.len(),
            cache.display(),
            stale_after.as_secs_f64() / 3600.0,
            kept.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(removed)
}

const DISK_FILE: &str = "disk.raw";
const LAYOUT_FILE: &str = "layout.json";
/// The Debian root an agent image keeps beside its disk.
const ROOT_DIR: &str = "root";

impl VmImage {
    /// Copies the image to `dest` (sparse), for a VM of its own.
    pub fn copy_to(&self, dest: &Path) -> Result<VmImage> {
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg("--reflink=auto")
            .arg(&self.path)
            .arg(dest))?;
        Ok(VmImage {
            path: dest.to_owned(),
            layout: self.layout.clone(),
            root: self.root.clone(),
        })
    }

    /// Replaces the storage partition (p4) with a fresh ext4 holding the tree `source`: a
    /// machine's own state before its first boot (the VM must not be running).
    pub fn write_storage(&self, source: &Path) -> Result<()> {
        let (offset, length) = self.layout.partitions[3];
        let fs_image = PathBuf::from(format!("{}.storage", self.path.display()));
        mke2fs("ext4", "storage", source, &fs_image, length / MIB, None)?;
        let copied = copy_into(&fs_image, &self.path, offset);
        let _ = fs::remove_file(&fs_image);
        copied
    }

    /// GRUB's environment block as `(key, value)` pairs, in file order.
    pub fn read_grubenv(&self) -> Result<Vec<(String, String)>> {
        let mut file = File::open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        file.seek(SeekFrom::Start(self.layout.grubenv_offset))?;
        let mut block = vec![0u8; GRUBENV_BYTES];
        file.read_exact(&mut block)
            .with_context(|| format!("cannot read the grubenv of {}", self.path.display()))?;
        parse_grubenv(&block)
    }

    /// Replaces GRUB's environment block with `vars`, in place (the VM must not be running).
    pub fn write_grubenv(&self, vars: &[(&str, &str)]) -> Result<()> {
        let block = encode_grubenv(vars)?;
        let mut file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        file.seek(SeekFrom::Start(self.layout.grubenv_offset))?;
        file.write_all(&block)
            .with_context(|| format!("cannot write the grubenv of {}", self.path.display()))?;
        file.sync_all()?;
        Ok(())
    }
}

/// Boots `image` in QEMU (TCG), its serial console captured to `serial_log` and QEMU's own
/// output to `serial_log` with `.qemu` appended. Returns when the guest has reported and
/// powered off, or QEMU exited, or `timeout` has passed (QEMU is then killed).
pub fn boot(image: &Path, serial_log: &Path, timeout: Duration) -> Result<BootOutcome> {
    let mut command = qemu_command(
        image,
        serial_log,
        "user,restrict=on,model=virtio-net-pci",
        None,
    )?;
    command.arg("-no-reboot");
    let started = Instant::now();
    let child = command
        .spawn()
        .context("cannot start qemu-system-x86_64 (Debian: qemu-system-x86)")?;
    let mut qemu = KillOnDrop(child);
    let mut guest = None;
    let mut time_to_report = None;
    let end = loop {
        if guest.is_none() {
            let serial = read_lossy(serial_log)?;
            if let Some(report) = find_report(&serial) {
                guest = Some(report);
                time_to_report = Some(started.elapsed());
            }
        }
        if let Some(status) = qemu.0.try_wait().context("cannot wait for QEMU")? {
            break BootEnd::Exited(status);
        }
        let limit = match time_to_report {
            Some(reported) => (reported + POWEROFF_GRACE).min(timeout),
            None => timeout,
        };
        if started.elapsed() >= limit {
            let _ = qemu.0.kill();
            let _ = qemu.0.wait();
            break BootEnd::TimedOut;
        }
        std::thread::sleep(SERIAL_POLL);
    };
    let serial = read_lossy(serial_log)?;
    if guest.is_none() {
        guest = find_report(&serial);
        time_to_report = guest.as_ref().map(|_| started.elapsed());
    }
    Ok(BootOutcome {
        guest,
        time_to_report: time_to_report.unwrap_or_else(|| started.elapsed()),
        end,
        serial,
    })
}

/// QEMU (TCG) for `image`, its serial console in `serial_log` (started empty) and its own
/// output beside it (`.qemu` appended), with the network `nic` (a `-nic` value); QEMU dies
/// with the process that starts it.
fn qemu_command(
    image: &Path,
    serial_log: &Path,
    nic: &str,
    netns: Option<std::os::fd::RawFd>,
) -> Result<Command> {
    let qemu_log_path = PathBuf::from(format!("{}.qemu", serial_log.display()));
    let qemu_log = File::create(&qemu_log_path)
        .with_context(|| format!("cannot create {}", qemu_log_path.display()))?;
    // QEMU appends to the serial file: start it empty.
    File::create(serial_log).with_context(|| format!("cannot create {}", serial_log.display()))?;
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-accel", "tcg", "-m", &GUEST_MEMORY_MIB.to_string()])
        .args(["-nographic", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", serial_log.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", image.display()))
        .args(["-nic", nic])
        .stdin(Stdio::null())
        .stdout(Stdio::from(qemu_log.try_clone()?))
        .stderr(Stdio::from(qemu_log));
    // SAFETY: prctl and setns are async-signal-safe and touch no memory of the parent; the
    // namespace's descriptor is held open by the caller until QEMU has started.
    unsafe {
        // QEMU dies with the process (test) that started it, also when that one is killed, and
        // runs in the VM's network namespace when it has one.
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = netns {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(command)
}

/// A machine that keeps running: an agent image in QEMU, rebooting inside QEMU as a real
/// machine does, until [`Vm::kill`] or drop (which kills QEMU: a power cut).
pub struct Vm {
    /// Dropped first: QEMU ends before its network.
    qemu: KillOnDrop,
    network: crate::vmnet::GuestNetwork,
    /// The serial console's log.
    pub serial_log: PathBuf,
    /// The host's UDP port forwarded to the guest's [`GUEST_AGENT_PORT`].
    pub agent_port: u16,
}

impl Vm {
    /// Starts `image` with user-mode networking in a network namespace of its own
    /// ([`crate::vmnet::GuestNetwork`]): the guest reaches, at [`GUEST_HOST_ADDR`], the UDP
    /// ports `reach` of the host's loopback (the origin and stager of a test) and nothing
    /// else, and UDP to 127.0.0.1:`agent_port` on the host reaches the guest's agent. Pick
    /// `agent_port` with [`free_udp_port`]. Needs root.
    pub fn start(image: &Path, serial_log: &Path, agent_port: u16, reach: &[u16]) -> Result<Vm> {
        let network = crate::vmnet::GuestNetwork::new(reach, agent_port)?;
        let nic = format!(
            "user,model=virtio-net-pci,hostfwd=udp:127.0.0.1:{agent_port}-:{GUEST_AGENT_PORT}"
        );
        let mut command = qemu_command(image, serial_log, &nic, Some(network.namespace_fd()))?;
        let child = command
            .spawn()
            .context("cannot start qemu-system-x86_64 (Debian: qemu-system-x86)")?;
        Ok(Vm {
            qemu: KillOnDrop(child),
            network,
            serial_log: serial_log.to_owned(),
            agent_port,
        })
    }

    /// Datagrams relayed between the guest's namespace and the host, both ways.
    pub fn relayed_datagrams(&self) -> u64 {
        self.network
            .relayed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What the guest's probe unit found (see [`PROBE_FILE`]): each target it tried, and
    /// whether a TCP connection to it opened.
    pub fn probes(&self) -> Result<Vec<(String, bool)>> {
        Ok(find_probes(&self.serial()?))
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.qemu.0.id()
    }

    /// The serial console so far.
    pub fn serial(&self) -> Result<String> {
        read_lossy(&self.serial_log)
    }

    /// Every boot report so far, in order.
    pub fn reports(&self) -> Result<Vec<GuestReport>> {
        Ok(find_reports(&self.serial()?))
    }

    /// Whether QEMU still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.qemu.0.try_wait(), Ok(None))
    }

    /// Waits until the guest printed `count` boot reports, failing when QEMU exits or
    /// `timeout` passes.
    pub fn wait_for_reports(
        &mut self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<GuestReport>> {
        let started = Instant::now();
        loop {
            let reports = self.reports()?;
            if reports.len() >= count {
                return Ok(reports);
            }
            if let Some(status) = self.qemu.0.try_wait().context("cannot wait for QEMU")? {
                bail!(
                    "QEMU exited ({status}) after {} of {count} boot reports; serial console in {}",
                    reports.len(),
                    self.serial_log.display()
                );
            }
            if started.elapsed() >= timeout {
                bail!(
                    "{} of {count} boot reports after {} s; serial console in {}",
                    reports.len(),
                    timeout.as_secs(),
                    self.serial_log.display()
                );
            }
            std::thread::sleep(SERIAL_POLL);
        }
    }

    /// Cuts the power: SIGKILL to QEMU, then waits for it; the relays stop after it.
    pub fn kill(mut self) {
        let _ = self.qemu.0.kill();
        let _ = self.qemu.0.wait();
    }
}

/// The storage area (p4) of a test machine before its first boot, made in `dir`: a copy of
/// the enrolled edge's directory `edge_dir` (its key, certificate and store), `agent.env` with
/// the daemon's arguments `serve_args`, and the seed of the machine's own identity (host name
/// `name`, an SSH host key of its own; not a real key: tests follow its bytes). Returns the
/// first 16 hex digits of the SHA-256 of the public key, as the guest's boot report gives it.
pub fn seed_storage(dir: &Path, edge_dir: &Path, name: &str, serve_args: &str) -> Result<String> {
    fs::create_dir_all(dir.join("machine"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    run(Command::new("cp")
        .arg("-a")
        .arg(edge_dir)
        .arg(dir.join("edge")))
    .with_context(|| format!("cannot copy {}", edge_dir.display()))?;
    write_file(
        &dir.join("agent.env"),
        &format!("STAGECOACH_SERVE_ARGS={serve_args}\n"),
        0o600,
    )?;
    let etc = dir.join("seed/identity/etc");
    write_file(&etc.join("hostname"), &format!("{name}\n"), 0o644)?;
    let public = format!(
        "ssh-ed25519 {} root@{name}\n",
        blake3::hash(name.as_bytes()).to_hex()
    );
    write_file(&etc.join("ssh/ssh_host_ed25519_key.pub"), &public, 0o644)?;
    write_file(
        &etc.join("ssh/ssh_host_ed25519_key"),
        &format!("secret of {name}\n"),
        0o600,
    )?;
    let digest = Command::new("sha256sum")
        .arg(etc.join("ssh/ssh_host_ed25519_key.pub"))
        .output()
        .context("cannot run sha256sum")?;
    ensure!(digest.status.success(), "sha256sum failed");
    let text = String::from_utf8_lossy(&digest.stdout);
    text.get(..16)
        .map(str::to_owned)
        .context("sha256sum printed no digest")
}

/// A copy of the root `root` in `dest` whose `/etc/stagecoach-marker` says `marker`: hard
/// links, so the cached root is never written (the marker is replaced, not edited).
pub fn marked_copy(root: &Path, dest: &Path, marker: &str) -> Result<()> {
    run(Command::new("cp").arg("-al").arg(root).arg(dest))
        .with_context(|| format!("cannot copy {}", root.display()))?;
    let path = dest.join("etc/stagecoach-marker");
    fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    write_file(&path, &format!("{marker}\n"), 0o644)
}

/// The port of `host_addr` (`HOST:PORT`): what a VM started with it in `reach` may use.
pub fn port_of(host_addr: &str) -> Result<u16> {
    let (_, port) = host_addr
        .rsplit_once(':')
        .with_context(|| format!("{host_addr} has no port"))?;
    port.parse()
        .with_context(|| format!("{host_addr}: bad port"))
}

/// The address at which a guest reaches `host_addr` (a `127.0.0.1:PORT` of the host) through
/// QEMU's user-mode networking.
pub fn guest_addr(host_addr: &str) -> Result<String> {
    let (_, port) = host_addr
        .rsplit_once(':')
        .with_context(|| format!("{host_addr} has no port"))?;
    Ok(format!("{GUEST_HOST_ADDR}:{port}"))
}

/// One line the guest's `edge-agent` logged on the serial console (tracing's default format,
/// through systemd's console output).
#[derive(Clone, Debug, PartialEq)]
pub struct AgentLogLine {
    /// When, in seconds since the Unix epoch, by the guest's clock.
    pub at: f64,
    /// `INFO`, `WARN`, ...
    pub level: String,
    /// The module that logged it (`edge_agent::swap::driver`).
    pub target: String,
    /// The message, without its fields.
    pub message: String,
    /// The fields, in order; quoted values unquoted.
    pub fields: Vec<(String, String)>,
}

impl AgentLogLine {
    /// The value of field `name`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// The agent's log lines among a serial console's output, in order.
pub fn agent_log(serial: &str) -> Vec<AgentLogLine> {
    strip_ansi(serial)
        .lines()
        .filter_map(|line| {
            let rest = &line[line.find("edge-agent[")?..];
            parse_agent_line(&rest[rest.find("]: ")? + 3..])
        })
        .collect()
}

/// Terminal escape sequences (colours, cursor moves) removed.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// `2026-12-06T17:15:26.338148Z  INFO edge_agent::swap::driver: step step="wipe-target"`.
fn parse_agent_line(line: &str) -> Option<AgentLogLine> {
    let mut words = line.split_whitespace();
    let at = parse_rfc3339_utc(words.next()?)?;
    let level = words.next()?.to_owned();
    let rest = line[line.find(&level)? + level.len()..].trim_start();
    let (target, rest) = rest.split_once(": ")?;
    let mut message = Vec::new();
    let mut fields = Vec::new();
    for token in split_quoted(rest) {
        match token.split_once('=') {
            Some((key, value))
                if !key.is_empty()
                    && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                fields.push((key.to_owned(), value.trim_matches('"').to_owned()));
            }
            _ if fields.is_empty() => message.push(token),
            _ => {}
        }
    }
    Some(AgentLogLine {
        at,
        level,
        target: target.to_owned(),
        message: message.join(" "),
        fields,
    })
}

/// Words split at spaces outside double quotes.
fn split_quoted(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                word.push(c);
            }
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            _ => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS.fffZ`.
fn parse_rfc3339_utc(text: &str) -> Option<f64> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let mut hms = time.splitn(3, ':');
    let h: f64 = hms.next()?.parse().ok()?;
    let min: f64 = hms.next()?.parse().ok()?;
    let s: f64 = hms.next()?.parse().ok()?;
    // Days from the civil date (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

/// A UDP port on 127.0.0.1 free now (bound and released), for a forwarding.
pub fn free_udp_port() -> Result<u16> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("cannot bind a UDP port")?;
    Ok(socket.local_addr()?.port())
}

/// The GRUB configuration of the A/B rule that `edge_agent::swap::boot::firmware_boot` models:
///
/// - `next_entry` set: boot it once, and remove it from the environment block;
/// - else `boot_counter` set: above 0, count it down and boot `saved_entry`; at 0 (or anything
///   but a number up to 255), boot the fallback slot B and leave the block as it is;
/// - else boot `saved_entry`; a missing or unknown `saved_entry` boots B.
///
/// One difference GRUB's script language imposes: a variable set to the empty string counts as
/// unset (the agent never writes one). Menu entries `A` and `B` boot each slot's own kernel with
/// `root=` its partition and `stagecoach.slot=` its name, console on the first serial port.
pub fn grub_cfg() -> String {
    let mut cfg = String::new();
    cfg.push_str(
        "# Stagecoach A/B boot: the rule of edge_agent::swap::boot::firmware_boot.\n\
         # Generated by netsim::vm; the environment block is /boot/grub/grubenv.\n\
         serial --unit=0 --speed=115200\n\
         terminal_input serial\n\
         terminal_output serial\n\
         set timeout=0\n\
         load_env\n\
         set stagecoach_boot=\n\
         if [ -n \"${next_entry}\" ]; then\n\
         \x20 if [ \"${next_entry}\" = A -o \"${next_entry}\" = a ]; then set stagecoach_boot=A; fi\n\
         \x20 if [ \"${next_entry}\" = B -o \"${next_entry}\" = b ]; then set stagecoach_boot=B; fi\n\
         \x20 unset next_entry\n\
         \x20 save_env next_entry\n\
         fi\n\
         if [ -z \"${stagecoach_boot}\" ]; then\n\
         \x20 set stagecoach_saved=B\n\
         \x20 if [ \"${saved_entry}\" = A -o \"${saved_entry}\" = a ]; then set stagecoach_saved=A; fi\n\
         \x20 if [ -n \"${boot_counter}\" ]; then\n\
         \x20   set stagecoach_counted=\n",
    );
    // GRUB has no arithmetic: one line per value. Ascending, so a value counted down at its
    // line matches no later one.
    for remaining in 1..=MAX_BOOT_COUNTER {
        cfg.push_str(&format!(
            "    if [ \"${{boot_counter}}\" = {remaining} ]; then set boot_counter={}; set stagecoach_counted=y; fi\n",
            remaining - 1
        ));
    }
    cfg.push_str(
        "    if [ \"${stagecoach_counted}\" = y ]; then\n\
         \x20     set stagecoach_boot=\"${stagecoach_saved}\"\n\
         \x20     save_env boot_counter\n\
         \x20   else\n\
         \x20     set stagecoach_boot=B\n\
         \x20   fi\n\
         \x20 else\n\
         \x20   set stagecoach_boot=\"${stagecoach_saved}\"\n\
         \x20 fi\n\
         fi\n\
         set default=\"${stagecoach_boot}\"\n\
         echo \"stagecoach: booting slot ${stagecoach_boot}\"\n",
    );
    for (slot, partition) in [("A", 2), ("B", 3)] {
        cfg.push_str(&format!(
            "menuentry '{slot}' --id {slot} {{\n\
             \x20 linux (hd0,msdos{partition})/vmlinuz root=/dev/vda{partition} rw console=ttyS0,115200 stagecoach.slot={slot}\n\
             \x20 initrd (hd0,msdos{partition})/initrd.img\n\
             }}\n"
        ));
    }
    cfg
}

/// Parses a GRUB environment block into `(key, value)` pairs.
pub fn parse_grubenv(block: &[u8]) -> Result<Vec<(String, String)>> {
    ensure!(
        block.len() == GRUBENV_BYTES,
        "a GRUB environment block is {GRUBENV_BYTES} bytes, not {}",
        block.len()
    );
    let body = block
        .strip_prefix(GRUBENV_HEADER.as_bytes())
        .context("not a GRUB environment block: the header line is missing")?;
    let mut vars = Vec::new();
    // Variable lines end in '\n'; the '#' padding after the last one has none.
    for line in body.split(|&b| b == b'\n') {
        if line.is_empty() || line[0] == b'#' {
            continue;
        }
        let text = String::from_utf8_lossy(line);
        let (key, value) = text
            .split_once('=')
            .with_context(|| format!("grubenv line {text:?} is not key=value"))?;
        vars.push((key.to_owned(), value.to_owned()));
    }
    Ok(vars)
}

/// Encodes a GRUB environment block: header, `key=value` lines, `#` padding.
pub fn encode_grubenv(vars: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut block = GRUBENV_HEADER.as_bytes().to_vec();
    for (key, value) in vars {
        ensure!(
            !key.is_empty() && !key.contains(['=', '\n', '\\']) && !value.contains(['\n', '\\']),
            "cannot write {key:?}={value:?} to a GRUB environment block"
        );
        block.extend_from_slice(format!("{key}={value}\n").as_bytes());
    }
    ensure!(
        block.len() <= GRUBENV_BYTES,
        "the variables need {} bytes, more than a GRUB environment block holds",
        block.len()
    );
    block.resize(GRUBENV_BYTES, b'#');
    Ok(block)
}

/// The guest's report in a serial console's output, if it printed one.
pub fn find_report(serial: &str) -> Option<GuestReport> {
    find_reports(serial).into_iter().next()
}

/// Every report in a serial console's output, one per boot, in order.
pub fn find_reports(serial: &str) -> Vec<GuestReport> {
    serial
        .lines()
        .filter_map(|line| {
            let rest = &line[line.find(BOOTED_TAG)? + BOOTED_TAG.len()..];
            let mut slot = None;
            let mut marker = None;
            let mut hostname = None;
            let mut host_key = None;
            for field in rest.split_whitespace() {
                if let Some(value) = field.strip_prefix("slot=") {
                    slot = Some(value.to_owned());
                } else if let Some(value) = field.strip_prefix("marker=") {
                    marker = Some(value.to_owned());
                } else if let Some(value) = field.strip_prefix("hostname=") {
                    hostname = Some(value.to_owned());
                } else if let Some(value) = field.strip_prefix("hostkey=") {
                    host_key = Some(value.to_owned());
                }
            }
            Some(GuestReport {
                slot: slot?,
                marker: marker?,
                hostname,
                host_key,
            })
        })
        .collect()
}

/// Where an agent image mounts the boot partition (p1), whose `boot/grub/grubenv` the agent
/// rewrites.
pub const GUEST_BOOT_MOUNT: &str = "/stagecoach-boot";

/// Where an agent image mounts the storage partition (p4): the edge's state (`edge/`), the
/// machine's storage area (`machine/`), the per-machine seed (`seed/`) and `agent.env`.
pub const GUEST_STORAGE: &str = "/var/lib/stagecoach";

/// The edge agent's unit in an agent image.
pub const AGENT_UNIT_NAME: &str = "stagecoach-agent.service";

/// The port the guest's agent serves the mesh on (forwarded from the host by [`Vm::start`]).
pub const GUEST_AGENT_PORT: u16 = 7420;

/// The host's loopback as a guest sees it through QEMU's user-mode networking: the origin and
/// stager a test starts on 127.0.0.1 are at this address, same port.
pub const GUEST_HOST_ADDR: &str = "10.0.2.2";

/// The machine configuration (`edge-agent --linux-config`) of an agent image.
const LINUX_CONFIG: &str = "{\n  \"slot_a_device\": \"/dev/vda2\",\n  \"slot_b_device\": \"/dev/vda3\",\n  \"grubenv\": \"/stagecoach-boot/boot/grub/grubenv\",\n  \"storage_dir\": \"/var/lib/stagecoach/machine\",\n  \"mount_dir\": \"/run/stagecoach/slots\",\n  \"reboot_command\": [\"systemctl\", \"reboot\", \"--no-block\"]\n}\n";

/// Mounts of an agent image: the boot partition and the storage area (the root is the slot
/// the kernel command line names).
const AGENT_FSTAB: &str = "/dev/vda1 /stagecoach-boot ext2 defaults 0 0\n\
/dev/vda4 /var/lib/stagecoach ext4 defaults 0 0\n";

/// DHCP on the first Ethernet interface (QEMU's user-mode network answers it).
const AGENT_NETWORK: &str = "[Match]\nName=en*\n\n[Network]\nDHCP=ipv4\n";

/// The agent: carry on a journaled swap before anything else the agent does, then serve.
const AGENT_UNIT: &str = "[Unit]\n\
Description=Stagecoach edge agent: carry on a journaled OS swap, then serve the mesh\n\
Wants=network-online.target\n\
After=network-online.target stagecoach-firstboot.service\n\
RequiresMountsFor=/var/lib/stagecoach /stagecoach-boot\n\
ConditionPathExists=/var/lib/stagecoach/agent.env\n\
\n\
[Service]\n\
EnvironmentFile=/var/lib/stagecoach/agent.env\n\
ExecStartPre=/usr/local/bin/edge-agent resume --linux-config /etc/stagecoach/linux.json\n\
ExecStart=/usr/local/bin/edge-agent serve --dir /var/lib/stagecoach/edge --linux-config /etc/stagecoach/linux.json $STAGECOACH_SERVE_ARGS\n\
Restart=on-failure\n\
RestartSec=2\n\
TimeoutStartSec=infinity\n\
StandardOutput=journal+console\n\
StandardError=journal+console\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n";

/// First boot of a machine: its own identity (host name, SSH host keys) from the storage
/// area's seed, once. Later OS versions get it from the swap's identity carry-over, never
/// from the seed again.
const FIRSTBOOT_UNIT: &str = "[Unit]\n\
Description=Stagecoach VM test bed: this machine's identity from its seed, once\n\
RequiresMountsFor=/var/lib/stagecoach\n\
ConditionPathExists=/var/lib/stagecoach/seed/identity\n\
ConditionPathExists=!/var/lib/stagecoach/seed/applied\n\
Before=stagecoach-booted.service stagecoach-agent.service\n\
\n\
[Service]\n\
Type=oneshot\n\
ExecStart=/bin/sh -c 'cp -a /var/lib/stagecoach/seed/identity/. / && hostname -F /etc/hostname && sync && touch /var/lib/stagecoach/seed/applied'\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n";

/// The report of an agent image: slot, marker and identity, at every boot; the guest stays up.
const AGENT_BOOTED_SCRIPT: &str = "#!/bin/sh\n\
slot=$(sed -n 's/.*stagecoach\\.slot=\\([^ ]*\\).*/\\1/p' /proc/cmdline)\n\
marker=$(cat /etc/stagecoach-marker)\n\
host=$(cat /etc/hostname)\n\
key=none\n\
[ -f /etc/ssh/ssh_host_ed25519_key.pub ] && key=$(sha256sum /etc/ssh/ssh_host_ed25519_key.pub | cut -c1-16)\n\
printf '\\nSTAGECOACH-BOOTED slot=%s marker=%s hostname=%s hostkey=%s\\n' \"$slot\" \"$marker\" \"$host\" \"$key\" > /dev/ttyS0\n";

/// Where a test lists, in a machine's storage area, the `HOST:PORT`s its guest tries to open a
/// TCP connection to once the network is up (one per line); the guest prints one
/// `STAGECOACH-PROBE HOST:PORT open|closed` line per target on its serial console.
pub const PROBE_FILE: &str = "probe-tcp";

/// The probe of an agent image (see [`PROBE_FILE`]).
const PROBE_SCRIPT: &str = "#!/bin/bash\n\
while read -r target; do\n\
  [ -n \"$target\" ] || continue\n\
  if timeout 5 bash -c \"exec 3<>/dev/tcp/${target%:*}/${target##*:}\" 2>/dev/null; then result=open; else result=closed; fi\n\
  printf '\\nSTAGECOACH-PROBE %s %s\\n' \"$target\" \"$result\" > /dev/ttyS0\n\
done < /var/lib/stagecoach/probe-tcp\n";

/// The unit that runs [`PROBE_SCRIPT`] when a test asked for it.
const PROBE_UNIT: &str = "[Unit]\n\
Description=Stagecoach VM test bed: report which addresses this machine reaches\n\
Wants=network-online.target\n\
After=network-online.target\n\
RequiresMountsFor=/var/lib/stagecoach\n\
ConditionPathExists=/var/lib/stagecoach/probe-tcp\n\
\n\
[Service]\n\
Type=oneshot\n\
ExecStart=/usr/local/sbin/stagecoach-probe\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n";

const PROBE_UNIT_NAME: &str = "stagecoach-probe.service";

/// The probes a guest reported on `serial`: target, and whether it opened.
pub fn find_probes(serial: &str) -> Vec<(String, bool)> {
    serial
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("STAGECOACH-PROBE ")?;
            let (target, result) = rest.split_once(' ')?;
            Some((target.to_owned(), result.trim() == "open"))
        })
        .collect()
}

/// Kernel modules an image keeps (with what they depend on): a virtio machine with ext4. The
/// rest of Debian's 400 MB of modules goes, so a slot unpacks in seconds.
const KEEP_MODULES: &[&str] = &[
    "virtio_net",
    "virtio_blk",
    "virtio_pci",
    "virtio_rng",
    "virtio_console",
    "ext4",
    "crc32c_generic",
];

/// Directories of the root an image drops (documentation and translations).
const DROPPED_DIRS: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
];

/// The systemd unit every slot starts at boot.
const BOOTED_UNIT: &str = "[Unit]\n\
Description=Stagecoach VM test bed: report the booted slot on the serial console\n\
After=systemd-remount-fs.service\n\
\n\
[Service]\n\
Type=oneshot\n\
ExecStart=/usr/local/sbin/stagecoach-booted\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n";

const BOOTED_UNIT_NAME: &str = "stagecoach-booted.service";

/// What the unit runs: one line on the serial port, in one write, then power off.
const BOOTED_SCRIPT: &str = "#!/bin/sh\n\
slot=$(sed -n 's/.*stagecoach\\.slot=\\([^ ]*\\).*/\\1/p' /proc/cmdline)\n\
marker=$(cat /etc/stagecoach-marker)\n\
printf '\\nSTAGECOACH-BOOTED slot=%s marker=%s\\n' \"$slot\" \"$marker\" > /dev/ttyS0\n\
systemctl poweroff --no-block\n";

/// Keeps the initramfs small: only the modules to mount a virtio ext4 root.
const INITRAMFS_CONF: &str = "MODULES=list\nCOMPRESS=gzip\n";
const INITRAMFS_HOOK: &str = "#!/bin/sh\n\
[ \"$1\" = prereqs ] && exit 0\n\
. /usr/share/initramfs-tools/hook-functions\n\
manual_add_modules virtio_pci virtio_blk ext4 crc32c_generic\n";

/// Written into the root before its packages are installed, so the kernel's first
/// initramfs is already the small one.
fn setup_hook() -> String {
    format!(
        "set -e\n\
         mkdir -p \"$1/etc/initramfs-tools/conf.d\" \"$1/etc/initramfs-tools/hooks\"\n\
         cat > \"$1/etc/initramfs-tools/conf.d/stagecoach-vm.conf\" <<'EOF'\n{INITRAMFS_CONF}EOF\n\
         cat > \"$1/etc/initramfs-tools/hooks/stagecoach-vm\" <<'EOF'\n{INITRAMFS_HOOK}EOF\n\
         chmod 755 \"$1/etc/initramfs-tools/hooks/stagecoach-vm\"\n"
    )
}

fn cache_key(spec: &ImageSpec) -> Result<String> {
    let inputs = format!(
        "version={IMAGE_FORMAT_VERSION}\nspec={}\ngrub.cfg={}\nmodules={}\nunit={BOOTED_UNIT}\nscript={BOOTED_SCRIPT}\nsetup={}\nkeep={}\ndrop={}\nagent={}\n",
        serde_json::to_string(spec)?,
        grub_cfg(),
        GRUB_MODULES.join(","),
        setup_hook(),
        KEEP_MODULES.join(","),
        DROPPED_DIRS.join(","),
        [LINUX_CONFIG, AGENT_FSTAB, AGENT_NETWORK, AGENT_UNIT, FIRSTBOOT_UNIT, AGENT_BOOTED_SCRIPT, PROBE_UNIT, PROBE_SCRIPT].join("\n"),
    );
    Ok(blake3::hash(inputs.as_bytes()).to_hex()[..32].to_owned())
}

fn load_cached(dir: &Path) -> Result<Option<VmImage>> {
    let disk = dir.join(DISK_FILE);
    let layout_path = dir.join(LAYOUT_FILE);
    if !disk.is_file() || !layout_path.is_file() {
        return Ok(None);
    }
    let text = fs::read_to_string(&layout_path)
        .with_context(|| format!("cannot read {}", layout_path.display()))?;
    let layout: Layout = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is damaged: remove {} to rebuild the image",
            layout_path.display(),
            dir.display()
        )
    })?;
    let root = dir.join(ROOT_DIR);
    Ok(Some(VmImage {
        path: disk,
        layout,
        root: root.is_dir().then_some(root),
    }))
}

/// Removes `.building-*` directories left by runs that died (their process is gone).
fn remove_abandoned_builds(cache: &Path) -> Result<()> {
    for entry in fs::read_dir(cache).with_context(|| format!("cannot list {}", cache.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".building-") else {
            continue;
        };
        let alive = rest
            .rsplit_once('-')
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            eprintln!(
                "vm: removing the abandoned build {}",
                entry.path().display()
            );
            fs::remove_dir_all(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn build_into(spec: &ImageSpec, dir: &Path, started: Instant) -> Result<()> {
    let step = |what: &str| eprintln!("vm: [{:>4.0?}] {what}", started.elapsed());
    let work = dir.join("work");
    let root = work.join("root");
    fs::create_dir_all(&work)?;

    let log_path = dir.join("mmdebstrap.log");
    step(&format!(
        "mmdebstrap {} minbase + {} (log: {})",
        spec.suite,
        spec.packages.join(","),
        log_path.display()
    ));
    let log = File::create(&log_path)?;
    run(Command::new("mmdebstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", spec.packages.join(",")))
        .arg(format!("--setup-hook={}", setup_hook()))
        .arg(&spec.suite)
        .arg(&root)
        .arg(&spec.mirror)
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log)))
    .with_context(|| format!("mmdebstrap failed: see {}", log_path.display()))?;

    step("adding the boot report unit");
    for link in ["vmlinuz", "initrd.img"] {
        ensure!(
            root.join(link).exists(),
            "the Debian root has no /{link}: did linux-image-amd64 install?"
        );
    }
    write_file(&root.join("etc/hostname"), "stagecoach-vm\n", 0o644)?;
    write_file(
        &root.join("etc/systemd/system").join(BOOTED_UNIT_NAME),
        BOOTED_UNIT,
        0o644,
    )?;
    let script = if spec.agent.is_some() {
        AGENT_BOOTED_SCRIPT
    } else {
        BOOTED_SCRIPT
    };
    write_file(
        &root.join("usr/local/sbin/stagecoach-booted"),
        script,
        0o755,
    )?;
    enable_unit(
        &root,
        "multi-user.target",
        Path::new("/etc/systemd/system"),
        BOOTED_UNIT_NAME,
    )
    .context("cannot enable the boot report unit")?;
    step("trimming kernel modules and documentation");
    trim_root(&root)?;
    if let Some(agent) = &spec.agent {
        step("adding the edge agent, its units and the network configuration");
        install_agent(&root, agent)?;
    }

    let marker = root.join("etc/stagecoach-marker");
    let slot_a = work.join("slot-a.ext4");
    let slot_b = work.join("slot-b.ext4");
    step("making slot A (ext4)");
    write_file(&marker, &format!("{}\n", spec.marker_a), 0o644)?;
    mke2fs("ext4", "slot-a", &root, &slot_a, spec.slot_mib, None)?;
    step("making slot B (ext4)");
    write_file(&marker, &format!("{}\n", spec.marker_b), 0o644)?;
    mke2fs("ext4", "slot-b", &root, &slot_b, spec.slot_mib, None)?;
    if spec.agent.is_some() {
        // Kept as slot A's root: the OS a test publishes as the first version.
        write_file(&marker, &format!("{}\n", spec.marker_a), 0o644)?;
        fs::rename(&root, dir.join(ROOT_DIR))
            .with_context(|| format!("cannot keep the root in {}", dir.display()))?;
    }

    step("making the boot partition (ext2: GRUB, grub.cfg, grubenv)");
    let boot_root = work.join("boot-root");
    let grub_dir = boot_root.join("boot/grub");
    fs::create_dir_all(grub_dir.join("i386-pc"))?;
    write_file(&grub_dir.join("grub.cfg"), &grub_cfg(), 0o644)?;
    fs::write(
        grub_dir.join("grubenv"),
        encode_grubenv(&[("saved_entry", "A")])?,
    )?;
    for entry in fs::read_dir(GRUB_I386_PC_DIR)
        .with_context(|| format!("cannot list {GRUB_I386_PC_DIR} (Debian: grub-pc-bin)"))?
    {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".mod") || name.to_string_lossy().ends_with(".lst") {
            fs::copy(entry.path(), grub_dir.join("i386-pc").join(&name))?;
        }
    }
    let boot_fs = work.join("boot.ext2");
    mke2fs(
        "ext2",
        "boot",
        &boot_root,
        &boot_fs,
        spec.boot_mib,
        Some(BOOT_FS_BLOCK_BYTES),
    )?;
    let grubenv_block = debugfs_block(&boot_fs, "/boot/grub/grubenv")?;

    step("partitioning the disk and writing GRUB");
    let sizes = [
        spec.boot_mib,
        spec.slot_mib,
        spec.slot_mib,
        spec.storage_mib,
    ];
    let mut partitions = [(0u64, 0u64); 4];
    let mut next = FIRST_PARTITION_SECTOR * SECTOR_BYTES;
    for (partition, size_mib) in partitions.iter_mut().zip(sizes) {
        *partition = (next, size_mib * MIB);
        next += size_mib * MIB;
    }
    let layout = Layout {
        disk_bytes: next,
        partitions,
        grubenv_offset: partitions[0].0 + grubenv_block * BOOT_FS_BLOCK_BYTES,
    };
    let storage_fs = work.join("storage.ext4");
    let empty = work.join("empty");
    fs::create_dir_all(&empty)?;
    mke2fs(
        "ext4",
        "storage",
        &empty,
        &storage_fs,
        spec.storage_mib,
        None,
    )?;

    let disk = dir.join(DISK_FILE);
    File::create(&disk)?.set_len(layout.disk_bytes)?;
    let mut table = String::from("label: dos\nlabel-id: 0x5354a6e1\n");
    for (index, (start, length)) in layout.partitions.iter().enumerate() {
        let bootable = if index == 0 { ", bootable" } else { "" };
        table.push_str(&format!(
            "start={}, size={}, type=83{bootable}\n",
            start / SECTOR_BYTES,
            length / SECTOR_BYTES
        ));
    }
    run_with_stdin(Command::new("sfdisk").arg("--quiet").arg(&disk), &table)?;
    for (file, (start, _)) in [&boot_fs, &slot_a, &slot_b, &storage_fs]
        .into_iter()
        .zip(layout.partitions)
    {
        copy_into(file, &disk, start)?;
    }
    install_grub(&work, &disk)?;

    // The offset must hold the block written above: a wrong offset would corrupt p1 later.
    let image = VmImage {
        path: disk,
        layout: layout.clone(),
        root: None,
    };
    let env = image.read_grubenv()?;
    ensure!(
        env == [("saved_entry".to_owned(), "A".to_owned())],
        "the grubenv at byte {} of the image is not the one written: {env:?}",
        layout.grubenv_offset
    );
    fs::write(
        dir.join(LAYOUT_FILE),
        serde_json::to_string_pretty(&layout)?,
    )?;
    step("done");
    Ok(())
}

/// Enables `unit` (found in `dir` of the guest) for `target`, as `systemctl enable` would.
fn enable_unit(root: &Path, target: &str, dir: &Path, unit: &str) -> Result<()> {
    let wants = root
        .join("etc/systemd/system")
        .join(format!("{target}.wants"));
    fs::create_dir_all(&wants)?;
    let link = wants.join(unit);
    if fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(dir.join(unit), &link)
            .with_context(|| format!("cannot enable {unit}"))?;
    }
    Ok(())
}

/// Drops the kernel modules a virtio machine does not load (keeping [`KEEP_MODULES`] and their
/// dependencies, from `modules.dep`) and [`DROPPED_DIRS`], then rebuilds the module index in
/// the root.
fn trim_root(root: &Path) -> Result<()> {
    for dir in DROPPED_DIRS {
        let path = root.join(dir);
        if path.exists() {
            fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    let modules = root.join("usr/lib/modules");
    for entry in
        fs::read_dir(&modules).with_context(|| format!("cannot list {}", modules.display()))?
    {
        let version_dir = entry?.path();
        let dep_path = version_dir.join("modules.dep");
        let deps = fs::read_to_string(&dep_path)
            .with_context(|| format!("cannot read {}", dep_path.display()))?;
        let mut depends: std::collections::HashMap<String, Vec<String>> = Default::default();
        let mut by_name: std::collections::HashMap<String, String> = Default::default();
        for line in deps.lines() {
            let Some((module, rest)) = line.split_once(':') else {
                continue;
            };
            depends.insert(
                module.to_owned(),
                rest.split_whitespace().map(str::to_owned).collect(),
            );
            by_name.insert(module_name(module), module.to_owned());
        }
        let mut keep = std::collections::HashSet::new();
        let mut todo: Vec<String> = KEEP_MODULES
            .iter()
            .filter_map(|name| by_name.get(*name).cloned())
            .collect();
        while let Some(module) = todo.pop() {
            if keep.insert(module.clone()) {
                todo.extend(depends.get(&module).into_iter().flatten().cloned());
            }
        }
        remove_modules_except(&version_dir.join("kernel"), &version_dir, &keep)?;
        let version = version_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("a module directory without a name")?;
        run(Command::new("chroot")
            .arg(root)
            .args(["depmod", "-a", &version]))
        .context("cannot rebuild the module index in the root")?;
    }
    Ok(())
}

/// `kernel/fs/ext4/ext4.ko` → `ext4`; dashes count as underscores, as for modprobe.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn remove_modules_except(
    dir: &Path,
    base: &Path,
    keep: &std::collections::HashSet<String>,
) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            remove_modules_except(&path, base, keep)?;
        } else if path.to_string_lossy().contains(".ko") {
            let relative = path
                .strip_prefix(base)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !keep.contains(&relative) {
                fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// Puts the edge agent, its configuration and units, the mounts and the network configuration
/// into the root of an agent image.
fn install_agent(root: &Path, agent: &AgentSpec) -> Result<()> {
    let binary = root.join("usr/local/bin/edge-agent");
    fs::create_dir_all(binary.parent().context("no parent")?)?;
    fs::copy(&agent.binary, &binary)
        .with_context(|| format!("cannot copy {} into the image", agent.binary.display()))?;
    let copied = blake3::hash(&fs::read(&binary)?).to_hex().to_string();
    ensure!(
        copied == agent.binary_blake3,
        "{} changed while the image was built: build the binaries first, then the image",
        agent.binary.display()
    );
    write_file(&root.join("etc/stagecoach/linux.json"), LINUX_CONFIG, 0o644)?;
    write_file(&root.join("etc/fstab"), AGENT_FSTAB, 0o644)?;
    fs::create_dir_all(root.join(GUEST_BOOT_MOUNT.trim_start_matches('/')))?;
    fs::create_dir_all(root.join(GUEST_STORAGE.trim_start_matches('/')))?;
    write_file(
        &root.join("etc/systemd/network/20-wired.network"),
        AGENT_NETWORK,
        0o644,
    )?;
    let local = Path::new("/etc/systemd/system");
    write_file(
        &root.join("etc/systemd/system").join(AGENT_UNIT_NAME),
        AGENT_UNIT,
        0o644,
    )?;
    write_file(
        &root.join("etc/systemd/system/stagecoach-firstboot.service"),
        FIRSTBOOT_UNIT,
        0o644,
    )?;
    write_file(
        &root.join("usr/local/sbin/stagecoach-probe"),
        PROBE_SCRIPT,
        0o755,
    )?;
    write_file(
        &root.join("etc/systemd/system").join(PROBE_UNIT_NAME),
        PROBE_UNIT,
        0o644,
    )?;
    enable_unit(root, "multi-user.target", local, PROBE_UNIT_NAME)?;
    enable_unit(root, "multi-user.target", local, AGENT_UNIT_NAME)?;
    enable_unit(
        root,
        "multi-user.target",
        local,
        "stagecoach-firstboot.service",
    )?;
    let packaged = Path::new("/lib/systemd/system");
    enable_unit(
        root,
        "multi-user.target",
        packaged,
        "systemd-networkd.service",
    )?;
    enable_unit(root, "sockets.target", packaged, "systemd-networkd.socket")?;
    enable_unit(
        root,
        "network-online.target",
        packaged,
        "systemd-networkd-wait-online.service",
    )?;
    Ok(())
}

/// Writes GRUB for BIOS: boot.img in the MBR (keeping the partition table), core.img in the
/// gap before the first partition, core.img's prefix `(hd0,msdos1)/boot/grub`.
fn install_grub(work: &Path, disk: &Path) -> Result<()> {
    let core_path = work.join("core.img");
    run(Command::new("grub-mkimage")
        .args(["-O", "i386-pc", "-p", "(hd0,msdos1)/boot/grub", "-o"])
        .arg(&core_path)
        .args(GRUB_MODULES))?;
    let mut core = fs::read(&core_path)?;
    let core_sectors = (core.len() as u64).div_ceil(SECTOR_BYTES);
    ensure!(
        core_sectors < FIRST_PARTITION_SECTOR - CORE_IMG_SECTOR,
        "core.img is {core_sectors} sectors, more than the gap before the first partition"
    );
    // The blocklist at the end of core.img's first sector (diskboot.img) says where the rest
    // is: start LBA (u64), sector count (u16), load segment (u16).
    let blocklist = SECTOR_BYTES as usize - 12;
    core[blocklist..blocklist + 8].copy_from_slice(&(CORE_IMG_SECTOR + 1).to_le_bytes());
    core[blocklist + 8..blocklist + 10].copy_from_slice(
        &u16::try_from(core_sectors - 1)
            .context("core.img too large")?
            .to_le_bytes(),
    );

    let boot_path = Path::new(GRUB_I386_PC_DIR).join("boot.img");
    let boot_img = fs::read(&boot_path)
        .with_context(|| format!("cannot read {} (Debian: grub-pc-bin)", boot_path.display()))?;
    ensure!(
        boot_img.len() == SECTOR_BYTES as usize,
        "{} is not one sector",
        boot_path.display()
    );
    let mut file = OpenOptions::new().read(true).write(true).open(disk)?;
    let mut mbr = vec![0u8; SECTOR_BYTES as usize];
    file.read_exact(&mut mbr)?;
    mbr[..MBR_PARTITION_TABLE].copy_from_slice(&boot_img[..MBR_PARTITION_TABLE]);
    mbr[BOOT_IMG_KERNEL_SECTOR..BOOT_IMG_KERNEL_SECTOR + 8]
        .copy_from_slice(&CORE_IMG_SECTOR.to_le_bytes());
    mbr[BOOT_IMG_DRIVE_CHECK..BOOT_IMG_DRIVE_CHECK + 2].copy_from_slice(&[0x90, 0x90]);
    ensure!(
        mbr[510..512] == [0x55, 0xaa],
        "the MBR has no boot signature after sfdisk"
    );
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&mbr)?;
    file.seek(SeekFrom::Start(CORE_IMG_SECTOR * SECTOR_BYTES))?;
    file.write_all(&core)?;
    file.sync_all()?;
    Ok(())
}

/// Makes a filesystem image file of `size_mib` from the tree `source`.
fn mke2fs(
    fs_type: &str,
    label: &str,
    source: &Path,
    dest: &Path,
    size_mib: u64,
    block_bytes: Option<u64>,
) -> Result<()> {
    let mut command = Command::new("mke2fs");
    command.args(["-q", "-F", "-t", fs_type, "-L", label]);
    if let Some(bytes) = block_bytes {
        command.arg("-b").arg(bytes.to_string());
    }
    command
        .arg("-d")
        .arg(source)
        .arg(dest)
        .arg(format!("{size_mib}M"));
    run(&mut command).with_context(|| {
        format!(
            "cannot make the {label} filesystem: is the slot ({size_mib} MiB) too small for {}?",
            source.display()
        )
    })?;
    Ok(())
}

/// The filesystem block holding the first bytes of `path` in the filesystem image `fs_image`.
fn debugfs_block(fs_image: &Path, path: &str) -> Result<u64> {
    let out = run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("bmap {path} 0"))
        .arg(fs_image))?;
    let block: u64 = out
        .trim()
        .parse()
        .with_context(|| format!("debugfs bmap {path}: unexpected output {out:?}"))?;
    ensure!(
        block > 0,
        "{path} has no data block in {}",
        fs_image.display()
    );
    Ok(block)
}

/// Copies `source` into `disk` at byte `offset`, leaving all-zero chunks as holes.
fn copy_into(source: &Path, disk: &Path, offset: u64) -> Result<()> {
    let mut input =
        File::open(source).with_context(|| format!("cannot open {}", source.display()))?;
    let mut output = OpenOptions::new().write(true).open(disk)?;
    let mut chunk = vec![0u8; COPY_CHUNK_BYTES];
    let mut position = offset;
    loop {
        let mut filled = 0;
        while filled < chunk.len() {
            let read = input.read(&mut chunk[filled..])?;
            if read == 0 {
                break;
            }
            filled += read;
        }
        if filled == 0 {
            break;
        }
        if chunk[..filled].iter().any(|&b| b != 0) {
            output.seek(SeekFrom::Start(position))?;
            output.write_all(&chunk[..filled])?;
        }
        position += filled as u64;
    }
    output.sync_all()?;
    Ok(())
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn read_lossy(path: &Path) -> Result<String> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Runs `command`; its stdout, or an error with its stderr.
fn run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn run_with_stdin(command: &mut Command, input: &str) -> Result<()> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {command:?}"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Kills the child when dropped, so no QEMU outlives an error.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_unused_for_long_are_removed_and_the_current_one_never() {
        let cache = tempfile::tempdir().expect("tempdir");
        let old = std::time::SystemTime::now() - Duration::from_secs(48 * 3600);
        for name in ["current", "stale", "recent"] {
            let dir = cache.path().join(name);
            fs::create_dir_all(&dir).expect("dir");
            mark_used(&dir).expect("mark");
            if name != "recent" {
                File::options()
                    .write(true)
                    .open(dir.join(LAST_USED_FILE))
                    .and_then(|f| f.set_modified(old))
                    .expect("age it");
            }
        }
        fs::create_dir_all(cache.path().join(".building-x-1")).expect("build dir");
        let removed =
            prune_stale_images(cache.path(), "current", STALE_IMAGE_AFTER).expect("prune");
        assert_eq!(removed, vec![cache.path().join("stale")]);
        for kept in ["current", "recent", ".building-x-1"] {
            assert!(cache.path().join(kept).is_dir(), "{kept} must stay");
        }
    }

    #[test]
    fn grubenv_round_trips_and_is_one_block() {
        let block = encode_grubenv(&[("saved_entry", "A"), ("next_entry", "B")]).expect("fits");
        assert_eq!(block.len(), GRUBENV_BYTES);
        assert_eq!(
            parse_grubenv(&block).expect("parses"),
            [("saved_entry", "A"), ("next_entry", "B")].map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn the_report_is_found_among_console_lines() {
        let serial =
            "[  1.0] Linux version 6.1\r\n\r\nSTAGECOACH-BOOTED slot=B marker=base-slot-b\r\n";
        assert_eq!(
            find_report(serial),
            Some(GuestReport {
                slot: "B".into(),
                marker: "base-slot-b".into(),
                hostname: None,
                host_key: None,
            })
        );
        assert_eq!(find_report("STAGECOACH-BOOTED slot=A\n"), None);
    }

    #[test]
    fn agent_log_lines_are_read_off_the_console() {
        let serial = "[   29.3] edge-agent[226]: \u{1b}[2m2026-12-06T17:15:35.995204Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2medge_agent::swap::driver\u{1b}[0m\u{1b}[2m:\u{1b}[0m slot installed \u{1b}[3mslot\u{1b}[0m\u{1b}[2m=\u{1b}[0mA \u{1b}[3mname\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"vm os\" \u{1b}[3melapsed_ms\u{1b}[0m\u{1b}[2m=\u{1b}[0m8849\r\n[  OK  ] Reached target\r\n";
        let lines = agent_log(serial);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert_eq!(line.level, "INFO");
        assert_eq!(line.target, "edge_agent::swap::driver");
        assert_eq!(line.message, "slot installed");
        assert_eq!(line.field("slot"), Some("A"));
        assert_eq!(line.field("name"), Some("vm os"));
        assert_eq!(line.field("elapsed_ms"), Some("8849"));
        // 2026-12-06 is day 20,793 since the epoch.
        assert!(
            (line.at - (20_793.0 * 86_400.0 + 17.0 * 3600.0 + 15.0 * 60.0 + 35.995204)).abs()
                < 1e-3
        );
    }

    #[test]
    fn grub_cfg_counts_down_every_value_the_agent_writes() {
        let cfg = grub_cfg();
        assert!(cfg.contains("= 255 ]; then set boot_counter=254;"));
        assert!(cfg.contains("= 1 ]; then set boot_counter=0;"));
        assert!(cfg.contains("stagecoach.slot=A"));
        assert!(cfg.contains("root=/dev/vda3"));
    }
}
