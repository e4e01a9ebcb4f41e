//! What `edge-agent status` reports: the slots, the boot loader, and the swap journal.

use std::fmt;

use serde::Serialize;

use super::boot::{firmware_boot, Slot, SlotHealth};
use super::journal::Journal;
use super::platform::{Platform, SlotMarker};

/// One slot.
#[derive(Clone, Debug, Serialize)]
pub struct SlotStatus {
    /// Which slot.
    pub slot: Slot,
    /// `os` for A, `rescue` for B.
    pub role: &'static str,
    /// The complete OS it holds, if any.
    pub os: Option<SlotMarker>,
    /// Its good/bad mark in the boot loader.
    pub health: Option<SlotHealth>,
    /// Why the slot could not be inspected, if it could not.
    pub problem: Option<String>,
}

/// The boot loader's state.
#[derive(Clone, Debug, Serialize)]
pub struct BootStatus {
    /// `saved_entry`.
    pub default: Option<Slot>,
    /// `next_entry`.
    pub once: Option<Slot>,
    /// `boot_counter`, as written.
    pub boot_counter: Option<String>,
    /// The slot the firmware will boot next.
    pub next_boot: Slot,
}

/// The swap journal.
#[derive(Clone, Debug, Serialize)]
pub struct SwapStatus {
    /// Current step name.
    pub step: &'static str,
    /// Whether the procedure has ended.
    pub finished: bool,
    /// Target bundle id.
    pub target: String,
    /// Rescue bundle id.
    pub rescue: String,
    /// Slot the swap started on.
    pub started_on: Slot,
    /// Trial boots of the new OS so far.
    pub trial_boots: u32,
    /// Health-check failures, oldest first.
    pub health_failures: Vec<String>,
    /// Why it was abandoned or rolled back.
    pub failure: Option<String>,
}

/// Everything `status` shows.
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    /// Platform name.
    pub platform: &'static str,
    /// The slot running now.
    pub booted: Slot,
    /// Both slots.
    pub slots: Vec<SlotStatus>,
    /// The boot loader, or why it could not be read.
    pub boot: Result<BootStatus, String>,
    /// The swap journal, if any, or why it could not be read.
    pub swap: Result<Option<SwapStatus>, String>,
}

/// Inspects the machine. Never fails: what cannot be read is reported as a problem.
pub fn collect(platform: &mut dyn Platform) -> StatusReport {
    let env = platform.read_boot_env().map_err(|e| e.to_string());
    let slots = Slot::ALL
        .into_iter()
        .map(|slot| {
            let (os, problem) = match platform.slot_marker(slot) {
                Ok(os) => (os, None),
                Err(e) => (None, Some(e.to_string())),
            };
            SlotStatus {
                slot,
                role: if slot == Slot::A { "os" } else { "rescue" },
                os,
                health: env.as_ref().ok().and_then(|env| env.slot_health(slot)),
                problem,
            }
        })
        .collect();
    let boot = env.map(|env| BootStatus {
        default: env.saved_entry(),
        once: env.next_entry(),
        boot_counter: env.get(super::boot::KEY_BOOT_COUNTER).map(str::to_owned),
        next_boot: firmware_boot(&env).0,
    });
    let swap = Journal::in_storage(&platform.storage_dir())
        .load()
        .map(|state| {
            state.map(|s| SwapStatus {
                step: s.step.name(),
                finished: s.step.is_terminal(),
                target: s.plan.target.to_string(),
                rescue: s.plan.rescue.to_string(),
                started_on: s.started_on,
                trial_boots: s.trial_boots,
                health_failures: s.health_failures.clone(),
                failure: s.failure.clone(),
            })
        })
        .map_err(|e| e.to_string());
    StatusReport {
        platform: platform.name(),
        booted: platform.booted_slot(),
        slots,
        boot,
        swap,
    }
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "platform: {}   running: slot {}",
            self.platform, self.booted
        )?;
        for slot in &self.slots {
            let os = match &slot.os {
                Some(m) => format!(
                    "{} {} ({}, bundle {})",
                    m.name,
                    m.version,
                    m.kind,
                    m.bundle.short()
                ),
                None => "empty (no complete OS)".to_owned(),
            };
            let health = slot
                .health
                .map(|h| format!(" [{}]", h.as_str()))
                .unwrap_or_default();
            writeln!(f, "slot {} ({:6}): {os}{health}", slot.slot, slot.role)?;
            if let Some(problem) = &slot.problem {
                writeln!(f, "    problem: {problem}")?;
            }
        }
        match &self.boot {
            Ok(boot) => writeln!(
                f,
                "boot loader: default={} once={} boot_counter={} -> next boot: slot {}",
                boot.default.map_or("-".into(), |s| s.to_string()),
                boot.once.map_or("-".into(), |s| s.to_string()),
                boot.boot_counter.as_deref().unwrap_or("-"),
                boot.next_boot
            )?,
            Err(e) => writeln!(f, "boot loader: unreadable: {e}")?,
        }
        match &self.swap {
            Ok(None) => writeln!(f, "swap: none on record")?,
            Ok(Some(swap)) => {
                writeln!(
                    f,
                    "swap: {} ({}) target {} rescue {} (started on slot {}, {} trial boots)",
                    swap.step,
                    if swap.finished {
                        "finished"
                    } else {
                        "in progress"
                    },
                    &swap.target[..8.min(swap.target.len())],
                    &swap.rescue[..8.min(swap.rescue.len())],
                    swap.started_on,
                    swap.trial_boots
                )?;
                if let Some(failure) = &swap.failure {
                    writeln!(f, "    failure: {failure}")?;
                }
                for (i, failure) in swap.health_failures.iter().enumerate() {
                    writeln!(f, "    health failure {}: {failure}", i + 1)?;
                }
            }
            Err(e) => writeln!(f, "swap: journal unreadable: {e}")?,
        }
        Ok(())
    }
}
