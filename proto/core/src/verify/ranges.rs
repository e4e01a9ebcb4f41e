//! [`GroupRanges`]: which 16 KiB groups of a blob a request asks for or a store holds.

use std::fmt;
use std::ops::Range;

use bao_tree::{ChunkNum, ChunkRanges};
use serde::{Deserialize, Serialize};

use super::{block_size, group_count, CHUNKS_PER_GROUP, GROUP_BYTES};

/// A set of 16 KiB groups of a blob: what a request asks for, what a store has verified.
///
/// Always aligned to whole groups. May be open-ended (`5..` means group 5 to the end), so the
/// same set works before the blob size is known; methods that count or list groups take the size.
/// Serialises as its boundaries in group units.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct GroupRanges(ChunkRanges);

impl GroupRanges {
    /// No groups.
    pub fn empty() -> Self {
        Self(ChunkRanges::empty())
    }

    /// Every group of the blob, whatever its size.
    pub fn all() -> Self {
        Self(ChunkRanges::all())
    }

    /// The groups `range.start .. range.end`.
    pub fn groups(range: Range<u64>) -> Self {
        if range.start >= range.end {
            return Self::empty();
        }
        let start = ChunkNum(range.start.saturating_mul(CHUNKS_PER_GROUP));
        match range.end.checked_mul(CHUNKS_PER_GROUP) {
            Some(end) => Self(ChunkRanges::from(start..ChunkNum(end))),
            None => Self(ChunkRanges::from(start..)),
        }
    }

    /// Group `index` and every later group.
    pub fn from_group(index: u64) -> Self {
        Self(ChunkRanges::from(
            ChunkNum(index.saturating_mul(CHUNKS_PER_GROUP))..,
        ))
    }

    /// The single group `index`.
    pub fn group(index: u64) -> Self {
        Self::groups(index..index.saturating_add(1))
    }

    /// The groups that hold any byte of `bytes` (rounded out to whole groups).
    pub fn from_byte_range(bytes: Range<u64>) -> Self {
        if bytes.start >= bytes.end {
            return Self::empty();
        }
        Self::groups(bytes.start / GROUP_BYTES..bytes.end.div_ceil(GROUP_BYTES))
    }

    /// Rounds bao-tree chunk ranges out to whole groups.
    pub fn from_chunk_ranges(ranges: ChunkRanges) -> Self {
        Self(bao_tree::io::round_up_to_chunks_groups(
            ranges,
            block_size(),
        ))
    }

    /// Builds the set from boundaries in group units (`[a, b, c]` is `a..b` and `c..`), as
    /// produced by [`GroupRanges::boundaries`]. `None` unless strictly increasing.
    pub fn from_boundaries(boundaries: &[u64]) -> Option<Self> {
        let mut chunks = Vec::with_capacity(boundaries.len());
        for &group in boundaries {
            chunks.push(ChunkNum(group.checked_mul(CHUNKS_PER_GROUP)?));
        }
        ChunkRanges::new(chunks.into()).map(Self)
    }

    /// Boundaries in group units: even positions start a run, odd positions end it; an odd count
    /// means the last run is open-ended.
    pub fn boundaries(&self) -> Vec<u64> {
        self.0
            .boundaries()
            .iter()
            .map(|chunk| chunk.0 / CHUNKS_PER_GROUP)
            .collect()
    }

    /// The same set as bao-tree chunk ranges.
    pub fn as_chunk_ranges(&self) -> &ChunkRanges {
        &self.0
    }

    /// True if the set holds no group.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True if the set holds every group of any blob.
    pub fn is_all(&self) -> bool {
        self.0.is_all()
    }

    /// True if group `index` is in the set.
    pub fn contains(&self, index: u64) -> bool {
        self.0
            .contains(&ChunkNum(index.saturating_mul(CHUNKS_PER_GROUP)))
    }

    /// True if every group of `other` is in `self`.
    pub fn is_superset(&self, other: &GroupRanges) -> bool {
        self.0.is_superset(&other.0)
    }

    /// Groups in `self` or in `other`.
    pub fn union(&self, other: &GroupRanges) -> GroupRanges {
        Self(&self.0 | &other.0)
    }

    /// Groups in both `self` and `other`.
    pub fn intersection(&self, other: &GroupRanges) -> GroupRanges {
        Self(&self.0 & &other.0)
    }

    /// Groups in `self` but not in `other`.
    pub fn difference(&self, other: &GroupRanges) -> GroupRanges {
        Self(&self.0 - &other.0)
    }

    /// Adds group `index`.
    pub fn insert(&mut self, index: u64) {
        self.0 |= Self::group(index).0;
    }

    /// The part of the set inside a blob of `size` bytes.
    pub fn clamped(&self, size: u64) -> GroupRanges {
        self.intersection(&Self::groups(0..group_count(size)))
    }

    /// What a response for this request actually carries for a blob of `size` bytes: groups past
    /// the end stand for the last group (the bao convention, so asking past the end yields a proof
    /// of the size), and nothing lies beyond the blob. Encoder and decoder both apply this.
    pub fn normalized(&self, size: u64) -> GroupRanges {
        let last = group_count(size) - 1;
        let inside = self.clamped(size);
        if self.intersection(&Self::from_group(last)).is_empty() {
            inside
        } else {
            inside.union(&Self::group(last))
        }
    }

    /// The runs of the set inside a blob of `size` bytes, in group units.
    pub fn runs(&self, size: u64) -> Vec<Range<u64>> {
        let clamped = self.clamped(size);
        clamped
            .boundaries()
            .chunks(2)
            .filter_map(|pair| match *pair {
                [start, end] => Some(start..end),
                // clamped() is bounded, so every run has an end.
                _ => None,
            })
            .collect()
    }

    /// The group indices of the set inside a blob of `size` bytes, in ascending order.
    pub fn iter_groups(&self, size: u64) -> impl Iterator<Item = u64> {
        self.runs(size).into_iter().flatten()
    }

    /// Number of groups of the set inside a blob of `size` bytes.
    pub fn count(&self, size: u64) -> u64 {
        self.runs(size).iter().map(|run| run.end - run.start).sum()
    }

    /// Number of bytes the set covers in a blob of `size` bytes.
    pub fn byte_count(&self, size: u64) -> u64 {
        self.runs(size)
            .iter()
            .map(|run| (run.end * GROUP_BYTES).min(size) - (run.start * GROUP_BYTES).min(size))
            .sum()
    }
}

impl FromIterator<u64> for GroupRanges {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> Self {
        let mut set = GroupRanges::empty();
        for index in iter {
            set.insert(index);
        }
        set
    }
}

impl fmt::Debug for GroupRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupRanges({self})")
    }
}

impl fmt::Display for GroupRanges {
    /// Runs in group units, e.g. `0..4, 9..`; `{}` when empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let boundaries = self.boundaries();
        if boundaries.is_empty() {
            return f.write_str("{}");
        }
        for (i, pair) in boundaries.chunks(2).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match pair {
                [start, end] => write!(f, "{start}..{end}")?,
                [start] => write!(f, "{start}..")?,
                _ => {}
            }
        }
        Ok(())
    }
}

impl Serialize for GroupRanges {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.boundaries().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for GroupRanges {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let boundaries = Vec::<u64>::deserialize(deserializer)?;
        GroupRanges::from_boundaries(&boundaries).ok_or_else(|| {
            serde::de::Error::custom("group range boundaries must be strictly increasing")
        })
    }
}
