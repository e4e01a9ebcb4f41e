//! Components: sets of flows whose rates depend on each other, recomputed together.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Flows that share links; rates are recomputed per component. The WAN component holds every
/// flow from the origin; each site's LAN component holds the flows between its nodes. No link
/// is crossed by flows of two components.
#[derive(Default)]
pub(super) struct Component {
    pub(super) active: Vec<u32>,
    /// Active flows grouped by (source, destination): a group's flows share a path, so max-min
    /// gives them one rate and the solver sees one weighted flow per group.
    pub(super) groups: Vec<PairGroup>,
    free_groups: Vec<u32>,
    pub(super) live_groups: Vec<u32>,
    group_of_pair: HashMap<u64, u32, BuildHasherDefault<PairHasher>>,
    pub(super) last_ns: u64,
    pub(super) version: u64,
    pub(super) dirty: bool,
}

#[derive(Clone, Copy, Default)]
pub(super) struct PairGroup {
    pub(super) src: u32,
    pub(super) dst: u32,
    /// Active flows in the group (0: the slot is free).
    pub(super) flows: u32,
    /// Rate of each flow in the group, bytes/s.
    pub(super) rate: f64,
    /// Index in `live_groups`.
    pub(super) slot: u32,
}

impl Component {
    /// Counts an active flow from `src` to `dst`; returns its group.
    pub(super) fn join_group(&mut self, src: u32, dst: u32) -> u32 {
        let key = (u64::from(src) << 32) | u64::from(dst);
        if let Some(&g) = self.group_of_pair.get(&key) {
            self.groups[g as usize].flows += 1;
            return g;
        }
        let group = PairGroup {
            src,
            dst,
            flows: 1,
            rate: 0.0,
            slot: self.live_groups.len() as u32,
        };
        let g = match self.free_groups.pop() {
            Some(g) => {
                self.groups[g as usize] = group;
                g
            }
            None => {
                self.groups.push(group);
                (self.groups.len() - 1) as u32
            }
        };
        self.live_groups.push(g);
        self.group_of_pair.insert(key, g);
        g
    }

    pub(super) fn leave_group(&mut self, g: u32) {
        let group = &mut self.groups[g as usize];
        group.flows -= 1;
        if group.flows > 0 {
            return;
        }
        let (slot, key) = (
            group.slot as usize,
            (u64::from(group.src) << 32) | u64::from(group.dst),
        );
        self.group_of_pair.remove(&key);
        self.live_groups.swap_remove(slot);
        if let Some(&moved) = self.live_groups.get(slot) {
            self.groups[moved as usize].slot = slot as u32;
        }
        self.free_groups.push(g);
    }
}

/// A multiplicative hash for (source, destination) keys: the std SipHash costs more than the
/// solver's work per flow.
#[derive(Default)]
struct PairHasher(u64);

impl Hasher for PairHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = (key ^ (key >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (key >> 32);
    }
}
