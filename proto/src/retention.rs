//! Retention: which bundles a node's store keeps, and the garbage collector that frees the rest.
//! I/O (on a [`Store`]).
//!
//! A node's store pins exactly:
//! - the keep-set the origin last sent ([`Retention::set_keep_set`]): for an edge its installed,
//!   desired, rescue and prepared bundles; for a stager the union of its site's nodes' sets plus
//!   the newest published version of every bundle;
//! - what the node needs itself: [`Retention::set_local`] (an edge's `installed.json`, the two
//!   bundles of a swap that runs), bundles being fetched ([`Retention::hold`]), and bundles
//!   fetched since the keep-set was last asked for ([`Retention::fetched`]; the next keep-set
//!   decides about them).
//!
//! A kept bundle pins each of its chunks with the tag [`bundles::pin_tag`] (`bundle:<id>`), and
//! every other `bundle:` pin is removed in the same write. So a chunk that a kept bundle shares
//! with an unkept one keeps the kept bundle's pin, and the store never evicts it. Unpinned chunks
//! are a cache the store evicts least recently used while it exceeds its limit
//! ([`StoreOptions::cache_limit_bytes`](crate::store::StoreOptions)); blobs being written are
//! never evicted. When an unkept bundle is no longer whole, its manifest goes too: that bundle is
//! evicted, and fetching it again works like the first time.
//!
//! Until the origin has answered once, nothing is unpinned: missing information never costs a
//! kept bundle. A keep-set request that fails leaves the last keep-set in force.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use ed25519_dalek::VerifyingKey;

use crate::bundles::{self, has_all_chunks};
use crate::hash::BlobHash;
use crate::manifest::{BundleId, Manifest};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Prefix of the pin tags retention manages (see [`bundles::pin_tag`]). Pins with other tags
/// (a machine's slots, say) are never touched.
pub const KEEP_TAG_PREFIX: &str = "bundle:";

/// Bytes in a GiB, for `--cache-gib`.
pub const BYTES_PER_GIB: u64 = 1024 * 1024 * 1024;

/// Largest `--cache-gib` accepted (1 PiB): beyond it the figure is a typo.
pub const MAX_CACHE_GIB: f64 = 1024.0 * 1024.0;

/// A `--cache-gib` that cannot be a store limit.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("a cache size must be a number of GiB above 0 and at most {MAX_CACHE_GIB} (0.5 is 512 MiB), got {0}")]
pub struct CacheSizeError(pub String);

/// The store limit in bytes for `gib` GiB (fractions allowed: 0.5 is 512 MiB).
pub fn gib_to_bytes(gib: f64) -> Result<u64, CacheSizeError> {
    if !gib.is_finite() || gib <= 0.0 || gib > MAX_CACHE_GIB {
        return Err(CacheSizeError(gib.to_string()));
    }
    Ok((gib * BYTES_PER_GIB as f64) as u64)
}

/// Parses a `--cache-gib` argument into bytes (for clap's `value_parser`).
pub fn parse_cache_gib(text: &str) -> Result<u64, CacheSizeError> {
    let gib: f64 = text
        .trim()
        .parse()
        .map_err(|_| CacheSizeError(text.to_owned()))?;
    gib_to_bytes(gib)
}

/// Why retention failed.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one garbage collection did and found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Kept bundles whose manifest is here (their chunks are pinned).
    pub kept: Vec<BundleId>,
    /// Kept bundles not here yet (pinned when they arrive).
    pub missing: Vec<BundleId>,
    /// Unkept bundles no longer whole: their manifests were removed.
    pub evicted_bundles: Vec<BundleId>,
    /// Pins removed (one per chunk and bundle).
    pub unpinned: usize,
    /// Pins added.
    pub pinned: usize,
    /// Blobs evicted during this collection.
    pub evicted_blobs: u64,
    /// Bytes of those blobs.
    pub evicted_bytes: u64,
    /// Bytes of the store's blobs afterwards.
    pub stored_bytes: u64,
    /// Of those, bytes pinned (the kept set).
    pub pinned_bytes: u64,
    /// The store's limit.
    pub limit_bytes: u64,
}

/// Proof of when a keep-set was asked for: bundles fetched after it stay pinned when its
/// answer arrives (it may not know them yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepTicket(u64);

/// A node's retention over its store. Cheap to clone; clones share the plan.
#[derive(Clone)]
pub struct Retention {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    trusted: Vec<VerifyingKey>,
    plan: Mutex<Plan>,
    /// One collection at a time.
    collecting: Mutex<()>,
    metrics: Option<Arc<Metrics>>,
}

#[derive(Default)]
struct Plan {
    /// The origin's keep-set, once it answered.
    origin: Option<BTreeSet<BundleId>>,
    /// Bundles the node needs itself, by reason.
    local: BTreeMap<String, BTreeSet<BundleId>>,
    /// Bundles being fetched, with their manifests and the number of holds.
    holds: HashMap<BundleId, (Arc<Manifest>, usize)>,
    /// Bundles fetched, with the clock when they were.
    fetched: BTreeMap<BundleId, u64>,
    clock: u64,
    /// Decoded manifests of stored bundles (a cache: they are checked once).
    manifests: HashMap<BundleId, Arc<Manifest>>,
}

/// Keeps a bundle pinned while it is fetched; see [`Retention::hold`].
pub struct Hold {
    inner: Arc<Inner>,
    id: BundleId,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut plan = lock(&self.inner.plan);
        if let Some((_, count)) = plan.holds.get_mut(&self.id) {
            *count -= 1;
            if *count == 0 {
                plan.holds.remove(&self.id);
            }
        }
    }
}

impl Retention {
    /// Retention over `store`; stored manifests are checked against `trusted` (any signer
    /// when empty: keeping bytes is not trusting them).
    pub fn new(store: Store, trusted: Vec<VerifyingKey>) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                trusted,
                plan: Mutex::new(Plan::default()),
                collecting: Mutex::new(()),
                metrics: None,
            }),
        }
    }

    /// Also keeps the store gauges and eviction counters in `metrics`.
    pub fn with_metrics(store: Store, trusted: Vec<VerifyingKey>, metrics: Arc<Metrics>) -> Self {
        let retention = Self {
            inner: Arc::new(Inner {
                store,
                trusted,
                plan: Mutex::new(Plan::default()),
                collecting: Mutex::new(()),
                metrics: Some(metrics),
            }),
        };
        retention.update_metrics();
        retention
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The keep-set the origin last sent, `None` before its first answer.
    pub fn keep_set(&self) -> Option<BTreeSet<BundleId>> {
        lock(&self.inner.plan).origin.clone()
    }

    /// Call before asking for a keep-set, and give the ticket to [`Retention::set_keep_set`].
    pub fn ticket(&self) -> KeepTicket {
        let mut plan = lock(&self.inner.plan);
        plan.clock += 1;
        KeepTicket(plan.clock)
    }

    /// The origin's answer, asked for at `ticket`: pins become exactly `keep` plus the node's
    /// own needs, then the garbage collector runs.
    pub fn set_keep_set(
        &self,
        ticket: KeepTicket,
        keep: impl IntoIterator<Item = BundleId>,
    ) -> Result<GcReport, RetentionError> {
        {
            let mut plan = lock(&self.inner.plan);
            let keep: BTreeSet<BundleId> = keep.into_iter().collect();
            if plan.origin.as_ref() != Some(&keep) {
                tracing::info!(bundles = keep.len(), "new keep-set from the origin");
            }
            plan.origin = Some(keep);
            // Fetched before the question: the answer knew about them.
            plan.fetched.retain(|_, at| *at > ticket.0);
        }
        self.collect()
    }

    /// No keep-set could be had (the origin and the stagers did not answer): every pin stays,
    /// and the collector only frees unpinned blobs.
    pub fn keep_set_unavailable(
        &self,
        error: &dyn std::fmt::Display,
    ) -> Result<GcReport, RetentionError> {
        tracing::warn!(%error, "no keep-set from the origin; keeping every bundle kept so far");
        self.collect()
    }

    /// Sets the bundles this node needs itself for `reason` (replacing that reason's set; empty
    /// to drop it). Takes effect at the next collection.
    pub fn set_local(&self, reason: &str, ids: impl IntoIterator<Item = BundleId>) {
        let ids: BTreeSet<BundleId> = ids.into_iter().collect();
        let mut plan = lock(&self.inner.plan);
        if ids.is_empty() {
            plan.local.remove(reason);
        } else {
            plan.local.insert(reason.to_owned(), ids);
        }
    }

    /// Pins the chunks of bundle `id` now, before they arrive, and keeps them pinned while the
    /// returned hold lives (a fetch in progress is never evicted under itself).
    pub fn hold(&self, id: BundleId, manifest: &Manifest) -> Result<Hold, RetentionError> {
        let hashes: Vec<BlobHash> = manifest.chunks.iter().map(|c| c.hash).collect();
        {
            let mut plan = lock(&self.inner.plan);
            let entry = plan
                .holds
                .entry(id)
                .or_insert_with(|| (Arc::new(manifest.clone()), 0));
            entry.1 += 1;
        }
        let hold = Hold {
            inner: self.inner.clone(),
            id,
        };
        self.inner.store.pin_all(&hashes, &bundles::pin_tag(&id))?;
        Ok(hold)
    }

    /// Records that bundle `id` was fetched: it stays pinned until a keep-set asked for after
    /// now arrives.
    pub fn fetched(&self, id: BundleId) {
        let mut plan = lock(&self.inner.plan);
        plan.clock += 1;
        let now = plan.clock;
        plan.fetched.insert(id, now);
    }

    /// Sets the pins from the plan, evicts unpinned blobs down to the store's limit, and removes
    /// the manifests of unkept bundles that are no longer whole. Runs after every completed fetch
    /// and every new keep-set.
    pub fn collect(&self) -> Result<GcReport, RetentionError> {
        let _one = lock(&self.inner.collecting);
        let store = &self.inner.store;
        let before = store.usage();
        let (origin_known, wanted, held) = {
            let plan = lock(&self.inner.plan);
            let mut wanted: BTreeSet<BundleId> = plan.origin.clone().unwrap_or_default();
            wanted.extend(plan.local.values().flatten().copied());
            wanted.extend(plan.holds.keys().copied());
            wanted.extend(plan.fetched.keys().copied());
            let held: HashMap<BundleId, Arc<Manifest>> = plan
                .holds
                .iter()
                .map(|(id, (manifest, _))| (*id, manifest.clone()))
                .collect();
            (plan.origin.is_some(), wanted, held)
        };
        let stored = self.stored_manifests()?;

        let mut report = GcReport::default();
        let mut pins: HashMap<BlobHash, BTreeSet<String>> = HashMap::new();
        for id in &wanted {
            let manifest = held.get(id).or_else(|| stored.get(id));
            let Some(manifest) = manifest else {
                report.missing.push(*id);
                continue;
            };
            if stored.contains_key(id) {
                report.kept.push(*id);
            }
            let tag = bundles::pin_tag(id);
            for chunk in &manifest.chunks {
                pins.entry(chunk.hash).or_default().insert(tag.clone());
            }
        }
        // Without the origin's word, pins are only added, never removed.
        let change = store.replace_pins(KEEP_TAG_PREFIX, &pins, origin_known)?;
        report.pinned = change.added;
        report.unpinned = change.removed;

        for (id, manifest) in &stored {
            if wanted.contains(id) || still_pinned(store, id, manifest) {
                continue;
            }
            if !has_all_chunks(store, manifest) {
                store.delete_manifest(id)?;
                tracing::info!(
                    bundle = %id,
                    name = %manifest.name,
                    version = %manifest.version,
                    reason = "not in the keep-set, and chunks of it were evicted as least recently used",
                    "bundle evicted"
                );
                report.evicted_bundles.push(*id);
            }
        }
        if !report.evicted_bundles.is_empty() {
            let mut plan = lock(&self.inner.plan);
            for id in &report.evicted_bundles {
                plan.manifests.remove(id);
            }
        }

        let after = store.usage();
        report.evicted_blobs = after.evicted_blobs - before.evicted_blobs;
        report.evicted_bytes = after.evicted_bytes - before.evicted_bytes;
        report.stored_bytes = after.stored_bytes();
        report.pinned_bytes = after.pinned_bytes;
        report.limit_bytes = after.cache_limit_bytes;
        let changed =
            report.unpinned > 0 || report.evicted_blobs > 0 || !report.evicted_bundles.is_empty();
        if changed {
            tracing::info!(
                kept = report.kept.len(),
                missing = report.missing.len(),
                unpinned = report.unpinned,
                evicted_blobs = report.evicted_blobs,
                evicted_bytes = report.evicted_bytes,
                evicted_bundles = report.evicted_bundles.len(),
                stored_bytes = report.stored_bytes,
                pinned_bytes = report.pinned_bytes,
                limit_bytes = report.limit_bytes,
                origin_known,
                "garbage collected"
            );
        } else {
            tracing::debug!(
                kept = report.kept.len(),
                stored_bytes = report.stored_bytes,
                limit_bytes = report.limit_bytes,
                "garbage collection: nothing to free"
            );
        }
        if let Some(metrics) = &self.inner.metrics {
            metrics
                .counter(
                    "stagecoach_store_evicted_bundles_total",
                    "Bundles evicted from the store (not kept, no longer whole)",
                    &[],
                )
                .add(report.evicted_bundles.len() as u64);
        }
        self.update_metrics();
        Ok(report)
    }

    /// Refreshes the store gauges (bytes, limit, kept bytes) and eviction counters.
    pub fn update_metrics(&self) {
        let Some(metrics) = &self.inner.metrics else {
            return;
        };
        let usage = self.inner.store.usage();
        metrics
            .gauge(
                "stagecoach_store_bytes",
                "Bytes of the blobs in the store",
                &[],
            )
            .set(usage.stored_bytes());
        metrics
            .gauge(
                "stagecoach_store_limit_bytes",
                "The store's limit (--cache-gib), in bytes",
                &[],
            )
            .set(usage.cache_limit_bytes);
        metrics
            .gauge(
                "stagecoach_store_kept_bytes",
                "Bytes of the store's pinned blobs (kept bundles)",
                &[],
            )
            .set(usage.pinned_bytes);
        metrics
            .counter(
                "stagecoach_store_evicted_bytes_total",
                "Bytes of blobs evicted from the store",
                &[],
            )
            .set(usage.evicted_bytes);
        metrics
            .counter(
                "stagecoach_store_evicted_blobs_total",
                "Blobs evicted from the store",
                &[],
            )
            .set(usage.evicted_blobs);
    }

    /// Every stored bundle's manifest, decoded (and checked once).
    fn stored_manifests(&self) -> Result<BTreeMap<BundleId, Arc<Manifest>>, RetentionError> {
        let signed = self.inner.store.list_manifests()?;
        let mut out = BTreeMap::new();
        let mut plan = lock(&self.inner.plan);
        let mut seen = HashMap::with_capacity(signed.len());
        for signed in signed {
            let id = signed.id();
            let manifest = match plan.manifests.get(&id) {
                Some(manifest) => manifest.clone(),
                None => match signed.verify_as(id, &self.inner.trusted) {
                    Ok(manifest) => Arc::new(manifest),
                    Err(error) => {
                        tracing::warn!(bundle = %id, %error, "a stored manifest does not verify; ignoring it");
                        continue;
                    }
                },
            };
            seen.insert(id, manifest.clone());
            out.insert(id, manifest);
        }
        plan.manifests = seen;
        Ok(out)
    }
}

/// True when the bundle's own tag still pins its first chunk (kept from an earlier keep-set).
fn still_pinned(store: &Store, id: &BundleId, manifest: &Manifest) -> bool {
    let Some(first) = manifest.chunks.first() else {
        // Nothing to free.
        return true;
    };
    let tag = bundles::pin_tag(id);
    store.pins(&first.hash).contains(&tag)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_parse_with_fractions_and_refuse_nonsense() {
        assert_eq!(parse_cache_gib("0.5"), Ok(BYTES_PER_GIB / 2));
        assert_eq!(parse_cache_gib("64"), Ok(64 * BYTES_PER_GIB));
        for bad in ["0", "-1", "nan", "inf", "lots", "2000000"] {
            assert!(parse_cache_gib(bad).is_err(), "{bad} accepted");
        }
    }
}
