//! The boot loader as data: slots, the GRUB environment block, and the firmware's choice.
//!
//! Pure: no I/O. Both platforms keep the boot loader's state in a GRUB environment block
//! (`grubenv`), and [`firmware_boot`] is the one place that says which slot a machine boots from
//! a given block, emulating the usual GRUB A/B script. The simulator, the test harnesses and the
//! state machine's reasoning all rely on that one function.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Size of a GRUB environment block file, in bytes. GRUB refuses blocks of any other size.
pub const GRUBENV_BYTES: usize = 1024;

/// The first line of every GRUB environment block.
pub const GRUBENV_HEADER: &str = "# GRUB Environment Block\n";

/// The byte GRUB pads the block with.
const GRUBENV_PAD: u8 = b'#';

/// Key of the slot booted when nothing else applies (`grub-set-default`).
pub const KEY_SAVED_ENTRY: &str = "saved_entry";
/// Key of a slot to boot once, then forget (`grub-reboot`).
pub const KEY_NEXT_ENTRY: &str = "next_entry";
/// Key of the remaining trial boots of `saved_entry`; at 0 the firmware boots the rescue slot.
pub const KEY_BOOT_COUNTER: &str = "boot_counter";

/// The slot the firmware falls back to when a trial's boot attempts run out.
pub const FALLBACK_SLOT: Slot = Slot::B;

/// One of the two OS slots.
///
/// `A` holds the production OS (old, then new); `B` holds the base (rescue) OS. The names are
/// also the GRUB menu entry ids written to `saved_entry` and `next_entry`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Slot {
    /// The production slot.
    A,
    /// The rescue slot.
    B,
}

impl Slot {
    /// Both slots, A first.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The entry id in the boot loader: `A` or `B`.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }

    /// The lower-case name used for directories and mount points: `a` or `b`.
    pub fn dir_name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The boot-environment key holding this slot's good/bad mark.
    pub fn status_key(self) -> &'static str {
        match self {
            Slot::A => "status_A",
            Slot::B => "status_B",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Slot {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "A" | "a" => Ok(Slot::A),
            "B" | "b" => Ok(Slot::B),
            other => Err(format!("unknown slot {other:?}: expected A or B")),
        }
    }
}

/// The mark the agent leaves on a slot after a trial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotHealth {
    /// Passed its health checks and was committed.
    Good,
    /// Failed its trial and was rolled back from.
    Bad,
}

impl SlotHealth {
    /// The value written to the boot environment.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotHealth::Good => "good",
            SlotHealth::Bad => "bad",
        }
    }
}

/// Why bytes are not a usable GRUB environment block, or a change cannot be written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrubEnvError {
    /// The block is not exactly [`GRUBENV_BYTES`] long.
    #[error("a GRUB environment block is {GRUBENV_BYTES} bytes, this one is {0}: recreate it with `grub-editenv FILE create`")]
    WrongSize(usize),
    /// The header line is missing.
    #[error("not a GRUB environment block (the header line is missing): recreate it with `grub-editenv FILE create`")]
    NoHeader,
    /// A line is neither a comment, padding, nor `key=value`.
    #[error("line {line} of the GRUB environment block is not key=value")]
    BadLine {
        /// 1-based line number.
        line: usize,
    },
    /// A key or value holds a character this agent never writes.
    #[error("{what} {text:?} holds characters outside [A-Za-z0-9_.-]")]
    BadText {
        /// `key` or `value`.
        what: &'static str,
        /// The offending text.
        text: String,
    },
    /// The variables no longer fit in the block.
    #[error("the variables need {needed} bytes, more than the {GRUBENV_BYTES}-byte block holds: remove unused variables with `grub-editenv FILE unset`")]
    TooLarge {
        /// Bytes needed.
        needed: usize,
    },
}

/// The variables of a GRUB environment block, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrubEnv {
    vars: Vec<(String, String)>,
}

impl GrubEnv {
    /// An empty environment (what `grub-editenv FILE create` writes).
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a block. Accepts comment lines (grub-editenv writes one) and backslash escapes.
    pub fn parse(bytes: &[u8]) -> Result<Self, GrubEnvError> {
        if bytes.len() != GRUBENV_BYTES {
            return Err(GrubEnvError::WrongSize(bytes.len()));
        }
        let body = bytes
            .strip_prefix(GRUBENV_HEADER.as_bytes())
            .ok_or(GrubEnvError::NoHeader)?;
        let mut vars: Vec<(String, String)> = Vec::new();
        // Every variable line ends in '\n'; the padding after the last one has none.
        let mut rest = body;
        let mut line_number = 1;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let line = &rest[..end];
            rest = &rest[end + 1..];
            line_number += 1;
            if line.first() == Some(&GRUBENV_PAD) || line.is_empty() {
                continue;
            }
            let text = std::str::from_utf8(line)
                .map_err(|_| GrubEnvError::BadLine { line: line_number })?;
            let (key, value) = text
                .split_once('=')
                .ok_or(GrubEnvError::BadLine { line: line_number })?;
            let value = unescape(value);
            match vars.iter_mut().find(|(k, _)| k == key) {
                Some(slot) => slot.1 = value,
                None => vars.push((key.to_owned(), value)),
            }
        }
        Ok(Self { vars })
    }

    /// Encodes the block: header, `key=value` lines, `#` padding to [`GRUBENV_BYTES`].
    pub fn to_bytes(&self) -> Result<Vec<u8>, GrubEnvError> {
        let mut out = Vec::with_capacity(GRUBENV_BYTES);
        out.extend_from_slice(GRUBENV_HEADER.as_bytes());
        for (key, value) in &self.vars {
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
            out.push(b'\n');
        }
        if out.len() > GRUBENV_BYTES {
            return Err(GrubEnvError::TooLarge { needed: out.len() });
        }
        out.resize(GRUBENV_BYTES, GRUBENV_PAD);
        Ok(out)
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `key` to `value`, keeping its position if it was set.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), GrubEnvError> {
        check_text("key", key)?;
        check_text("value", value)?;
        match self.vars.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_owned(),
            None => self.vars.push((key.to_owned(), value.to_owned())),
        }
        Ok(())
    }

    /// Removes `key`.
    pub fn unset(&mut self, key: &str) {
        self.vars.retain(|(k, _)| k != key);
    }

    /// All variables, in file order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The slot booted when nothing else applies; `None` when unset or not a slot.
    pub fn saved_entry(&self) -> Option<Slot> {
        self.get(KEY_SAVED_ENTRY).and_then(|v| v.parse().ok())
    }

    /// The slot to boot once, if any.
    pub fn next_entry(&self) -> Option<Slot> {
        self.get(KEY_NEXT_ENTRY).and_then(|v| v.parse().ok())
    }

    /// The remaining trial boots, if a trial is armed. `Some(Err)` when the value is garbage.
    pub fn boot_counter(&self) -> Option<Result<u32, String>> {
        self.get(KEY_BOOT_COUNTER)
            .map(|v| v.parse::<u32>().map_err(|_| v.to_owned()))
    }

    /// The good/bad mark of `slot`, if any.
    pub fn slot_health(&self, slot: Slot) -> Option<SlotHealth> {
        match self.get(slot.status_key()) {
            Some("good") => Some(SlotHealth::Good),
            Some("bad") => Some(SlotHealth::Bad),
            _ => None,
        }
    }

    /// Makes `slot` the default, and drops any pending once-boot or trial counter.
    pub fn set_default(&mut self, slot: Slot) {
        self.set_slot(KEY_SAVED_ENTRY, slot);
        self.unset(KEY_NEXT_ENTRY);
        self.unset(KEY_BOOT_COUNTER);
    }

    /// Boots `slot` on the next boot only (GRUB clears `next_entry` as it boots it).
    pub fn set_boot_once(&mut self, slot: Slot) {
        self.set_slot(KEY_NEXT_ENTRY, slot);
    }

    /// Makes `slot` the default for `attempts` trial boots; then the firmware falls back.
    pub fn arm_trial(&mut self, slot: Slot, attempts: u8) {
        self.set_slot(KEY_SAVED_ENTRY, slot);
        self.unset(KEY_NEXT_ENTRY);
        // Digits only: cannot fail validation.
        self.vars.retain(|(k, _)| k != KEY_BOOT_COUNTER);
        self.vars
            .push((KEY_BOOT_COUNTER.to_owned(), attempts.to_string()));
    }

    /// Records the mark of `slot`.
    pub fn mark(&mut self, slot: Slot, health: SlotHealth) {
        self.vars.retain(|(k, _)| k != slot.status_key());
        self.vars
            .push((slot.status_key().to_owned(), health.as_str().to_owned()));
    }

    /// Slot names are valid text; writing one cannot fail.
    fn set_slot(&mut self, key: &str, slot: Slot) {
        match self.vars.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = slot.as_str().to_owned(),
            None => self.vars.push((key.to_owned(), slot.as_str().to_owned())),
        }
    }
}

/// What the firmware does at power-on, given the environment block: which slot it boots and
/// the block it leaves behind.
///
/// Emulates the usual GRUB A/B script:
/// - `next_entry` set: boot it once and clear it;
/// - else `boot_counter` set: above 0, decrement it and boot `saved_entry`; at 0 (or unreadable),
///   boot the fallback (rescue) slot [`FALLBACK_SLOT`] and leave the block as it is;
/// - else boot `saved_entry`.
///
/// A missing or unknown `saved_entry` boots the fallback slot, as GRUB boots its fallback entry
/// when the default does not exist.
pub fn firmware_boot(env: &GrubEnv) -> (Slot, GrubEnv) {
    let mut next = env.clone();
    if let Some(get) = env.get(KEY_NEXT_ENTRY) {
        next.unset(KEY_NEXT_ENTRY);
        if let Ok(slot) = get.parse::<Slot>() {
            return (slot, next);
        }
    }
    let saved = env.saved_entry().unwrap_or(FALLBACK_SLOT);
    match env.boot_counter() {
        Some(Ok(remaining)) if remaining > 0 => {
            next.vars.retain(|(k, _)| k != KEY_BOOT_COUNTER);
            next.vars
                .push((KEY_BOOT_COUNTER.to_owned(), (remaining - 1).to_string()));
            (saved, next)
        }
        Some(_) => (FALLBACK_SLOT, next),
        None => (saved, next),
    }
}

fn check_text(what: &'static str, text: &str) -> Result<(), GrubEnvError> {
    let allowed = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    // Values may be empty (`key=`); keys may not.
    if allowed && !(what == "key" && text.is_empty()) {
        Ok(())
    } else {
        Err(GrubEnvError::BadText {
            what,
            text: text.to_owned(),
        })
    }
}

/// GRUB escapes `\` and newlines in values with a backslash.
fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_with(vars: &[(&str, &str)]) -> GrubEnv {
        let mut env = GrubEnv::new();
        for (k, v) in vars {
            env.set(k, v).expect("valid");
        }
        env
    }

    #[test]
    fn block_is_exactly_1024_bytes_with_header_and_padding() {
        let env = env_with(&[("saved_entry", "A"), ("boot_counter", "3")]);
        let bytes = env.to_bytes().expect("fits");
        assert_eq!(bytes.len(), GRUBENV_BYTES);
        let text = String::from_utf8(bytes.clone()).expect("ascii");
        assert!(text.starts_with("# GRUB Environment Block\nsaved_entry=A\nboot_counter=3\n###"));
        assert!(text.ends_with('#'));
        assert_eq!(GrubEnv::parse(&bytes).expect("parse"), env);
    }

    #[test]
    fn parses_what_grub_editenv_writes() {
        // Byte for byte what `grub-editenv F create; grub-editenv F set saved_entry=A` writes.
        let mut bytes = b"# GRUB Environment Block\n# WARNING: Do not edit this file by tools other than grub-editenv!!!\nsaved_entry=A\n".to_vec();
        bytes.resize(GRUBENV_BYTES, b'#');
        let env = GrubEnv::parse(&bytes).expect("parse");
        assert_eq!(env.saved_entry(), Some(Slot::A));
        assert_eq!(env.vars().count(), 1);
    }

    #[test]
    fn rejects_wrong_size_missing_header_and_overflow() {
        assert_eq!(
            GrubEnv::parse(&[b'#'; 10]),
            Err(GrubEnvError::WrongSize(10))
        );
        assert_eq!(
            GrubEnv::parse(&[b'#'; GRUBENV_BYTES]),
            Err(GrubEnvError::NoHeader)
        );
        let mut env = GrubEnv::new();
        for i in 0..100 {
            env.set(&format!("key{i}"), "0123456789").expect("valid");
        }
        assert!(matches!(env.to_bytes(), Err(GrubEnvError::TooLarge { .. })));
        assert!(env.set("bad key", "x").is_err());
        assert!(env.set("k", "new\nline").is_err());
    }

    #[test]
    fn firmware_boots_next_entry_once_then_saved_entry() {
        let mut env = GrubEnv::new();
        env.set_default(Slot::A);
        env.set_boot_once(Slot::B);
        let (slot, env) = firmware_boot(&env);
        assert_eq!(slot, Slot::B);
        let (slot, _) = firmware_boot(&env);
        assert_eq!(slot, Slot::A, "next_entry is consumed by one boot");
    }

    #[test]
    fn firmware_counts_trial_boots_down_then_falls_back_to_rescue() {
        let mut env = GrubEnv::new();
        env.arm_trial(Slot::A, 3);
        let mut booted = Vec::new();
        for _ in 0..5 {
            let (slot, next) = firmware_boot(&env);
            booted.push(slot);
            env = next;
        }
        assert_eq!(booted, [Slot::A, Slot::A, Slot::A, Slot::B, Slot::B]);
        assert_eq!(env.boot_counter(), Some(Ok(0)));
    }

    #[test]
    fn firmware_falls_back_on_garbage() {
        let env = env_with(&[("saved_entry", "C")]);
        assert_eq!(firmware_boot(&env).0, FALLBACK_SLOT);
        let env = env_with(&[("saved_entry", "A"), ("boot_counter", "x")]);
        assert_eq!(firmware_boot(&env).0, FALLBACK_SLOT);
        assert_eq!(firmware_boot(&GrubEnv::new()).0, FALLBACK_SLOT);
    }

    #[test]
    fn set_default_clears_pending_once_and_trial() {
        let mut env = GrubEnv::new();
        env.arm_trial(Slot::A, 3);
        env.set_boot_once(Slot::B);
        env.set_default(Slot::B);
        assert_eq!(env.next_entry(), None);
        assert_eq!(env.boot_counter(), None);
        assert_eq!(firmware_boot(&env).0, Slot::B);
        env.mark(Slot::A, SlotHealth::Bad);
        assert_eq!(env.slot_health(Slot::A), Some(SlotHealth::Bad));
        assert_eq!(env.slot_health(Slot::B), None);
    }
}
