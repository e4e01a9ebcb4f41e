//! The content-key commands, server side (issue 16): `origin keys rotate|list|retire` and
//! `origin nodes revoke`, and what the mesh server asks before it answers a node: is it
//! revoked, and which key generations may it read.
//!
//! A key change is two writes that cannot share one batch: the ring file (atomic, 0600) and
//! the audit record. The ring is written first, so the audit log never names a generation
//! that does not exist; a failed audit write is reported to the operator as a failure.

// CommandError carries the policy's own errors whole (see `commands`).
#![allow(clippy::result_large_err)]

use proto::keys::{ContentKey, KeyGeneration};
use proto::wire::ControlReply;

use super::commands::to_json;
use super::{render_table, CommandError, ControlPlane};
use crate::db::{now_ms, Audit, Commit, Db, DbError, Put, RevokedRecord};
use crate::keys::{KeysError, OriginKeys, SealedRing, RING_REFRESH};

/// The generations of `ring`, for people: `generations 1, 2, 3`.
fn generations(ring: &proto::keys::KeyRing) -> String {
    let list: Vec<String> = ring.generations().map(|g| g.0.to_string()).collect();
    if list.is_empty() {
        "no generation".to_owned()
    } else {
        format!("generations {}", list.join(", "))
    }
}

/// Reads the store's ring every [`RING_REFRESH`] on a thread of its own, until `db` is
/// dropped, and adopts a newer one (another origin rotated or retired). A failure keeps the
/// keys held (logged once per outage).
fn watch_ring(
    db: &std::sync::Arc<Db>,
    keys: std::sync::Arc<OriginKeys>,
    seal: zeroize::Zeroizing<[u8; 32]>,
) {
    let weak = std::sync::Arc::downgrade(db);
    let spawned = std::thread::Builder::new()
        .name("content-keys".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(RING_REFRESH);
                let Some(db) = weak.upgrade() else {
                    return;
                };
                let read = db
                    .keyring()
                    .map_err(CommandError::from)
                    .and_then(|stored| match stored {
                        Some(stored) if stored.version > keys.version() => {
                            let ring = stored.open(&seal)?;
                            Ok(Some((keys.adopt(ring, stored.version)?, stored.version)))
                        }
                        _ => Ok(None),
                    });
                match read {
                    Ok(adopted) => {
                        if failing {
                            tracing::info!("the content keys can be read from the store again");
                        }
                        failing = false;
                        if let Some((true, version)) = adopted {
                            tracing::info!(version, generations = %generations(&keys.snapshot()), "adopted the content keys another origin changed");
                        }
                    }
                    Err(error) => {
                        if !failing {
                            tracing::warn!(%error, "cannot read the content keys from the store; the keys held stay in force");
                        }
                        failing = true;
                    }
                }
            }
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the thread that reads the content keys");
    }
}

/// What the origin answers an edge's [`proto::wire::Request::ContentKeys`].
#[derive(Debug)]
pub enum KeysAnswer {
    /// The generations the node may read (empty when its class may read none).
    Keys(Vec<(KeyGeneration, ContentKey)>),
    /// The node was revoked: it gets nothing.
    Revoked,
    /// The node never reported: the origin does not know its class yet.
    Unknown,
}

impl ControlPlane {
    /// The payload bytes of `manifest`, opening its sealed metadata when it is encrypted (0
    /// when that fails, which is logged).
    pub fn raw_bytes(&self, manifest: &proto::manifest::Manifest) -> u64 {
        self.keys.raw_bytes(manifest).unwrap_or(0)
    }

    /// Whether node `id` was revoked, as the store said at most [`super::REVOKED_REFRESH`] ago
    /// (what the mesh server asks on every request: a store that stops answering, such as an
    /// etcd cluster without quorum, leaves the last set in force instead of stopping the data
    /// path). A revocation made on this origin counts at once.
    pub fn is_revoked_recently(&self, id: &str) -> bool {
        self.revoked
            .ids
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    /// Whether node `id` was revoked.
    pub fn is_revoked(&self, id: &str) -> Result<bool, DbError> {
        Ok(self.db.revoked(id)?.is_some())
    }

    /// The key generations node `id` may read: every one the origin keeps when the node's
    /// class (the operator's, else its own) is an `[encryption]` reading class, none
    /// otherwise.
    pub fn content_keys_for(&self, id: &str) -> Result<(KeysAnswer, Option<String>), DbError> {
        if self.is_revoked(id)? {
            return Ok((KeysAnswer::Revoked, None));
        }
        let Some(record) = self.db.node(id)? else {
            return Ok((KeysAnswer::Unknown, None));
        };
        let class = self.effective_inventory(&record)?.class;
        let policy = self.db.policy()?;
        if policy.encryption.may_read(class.as_deref()) {
            Ok((KeysAnswer::Keys(self.keys.readable()), class))
        } else {
            Ok((KeysAnswer::Keys(Vec::new()), class))
        }
    }

    /// Refuses a rollout of an unencrypted bundle to nodes whose class may run encrypted
    /// bundles only (`[encryption] require_classes`), naming one such node and the bundle.
    pub(super) fn refuse_plain_rollout(
        &self,
        nodes: &[crate::db::NodeRecord],
        selector: &str,
        bundles: &[&proto::wire::BundleInfo],
    ) -> Result<(), CommandError> {
        let encryption = self.db.policy()?.encryption;
        if encryption.require_classes.is_empty() {
            return Ok(());
        }
        // A selector that does not parse is the rollout service's to report.
        let Ok(picked) = crate::rollout::service::select(nodes, selector) else {
            return Ok(());
        };
        let classes = self.db.classes()?;
        for bundle in bundles {
            let encrypted = self
                .db
                .package(&bundle.name, &bundle.version)?
                .is_some_and(|package| package.encrypted);
            if encrypted {
                continue;
            }
            for node in &picked {
                let class = classes
                    .get(&node.id)
                    .cloned()
                    .or_else(|| node.inventory.class.clone());
                if encryption.requires(class.as_deref()) {
                    return Err(CommandError::PlainRollout {
                        bundle: format!("{}@{}", bundle.name, bundle.version),
                        node: node.id.clone(),
                        class: class.unwrap_or_default(),
                    });
                }
            }
        }
        Ok(())
    }

    /// At `origin serve`: makes the content-key ring the one the store holds, sealed with
    /// `seal` (see [`crate::keys::ring_seal_key`]), and keeps it so. The first origin on a
    /// store puts its ring there (creating generation 1 when it has none); a later one adds the
    /// generations only its own file holds (never one the store retired) and takes the rest.
    /// Then the store's ring is read every [`RING_REFRESH`] and a newer one adopted, so a
    /// rotation or retirement on any origin reaches every other within seconds.
    pub fn share_keys(
        &self,
        seal: zeroize::Zeroizing<[u8; 32]>,
        origin: &str,
    ) -> Result<(), CommandError> {
        let _one_change = self.one_key_change();
        let local = self.keys.snapshot();
        let (ring, version) = self.db.change(|| -> Result<_, CommandError> {
            let Some(stored) = self.db.keyring()? else {
                let (ring, action, detail) = if local.is_empty() {
                    let (ring, generation, fingerprint) = crate::keys::rotated(&local)?;
                    let detail =
                        format!("{generation} created (fingerprint {fingerprint}); it is current");
                    (ring, "keys.create", detail)
                } else {
                    let detail = format!(
                        "the content keys of origin {origin} ({}) are shared through the store",
                        generations(&local)
                    );
                    (local.clone(), "keys.share", detail)
                };
                let sealed = SealedRing::seal(&ring, 1, Vec::new(), &seal)?;
                return Ok(Commit::new(
                    vec![Put::Keyring(Box::new(sealed))],
                    Some(Audit::new("origin", "origin", action, detail)),
                    (ring, 1),
                ));
            };
            let mut ring = stored.open(&seal)?;
            let mut added = proto::keys::KeyRing::new();
            for generation in local.generations() {
                let Ok(key) = local.get(generation) else {
                    continue;
                };
                match ring.get(generation) {
                    _ if stored.retired.contains(&generation.0) => {}
                    Ok(shared) if shared == key => {}
                    Ok(_) => tracing::error!(
                        %generation,
                        file = %self.keys.path().display(),
                        "this origin's file holds another key than the store for the same generation; the store's is kept and bundles this origin sealed with its own cannot be read"
                    ),
                    Err(_) => {
                        ring.insert(generation, key.clone()).map_err(KeysError::from)?;
                        added.insert(generation, key.clone()).map_err(KeysError::from)?;
                    }
                }
            }
            if added.is_empty() {
                return Ok(Commit::none((ring, stored.version)));
            }
            let version = stored.version + 1;
            let sealed = SealedRing::seal(&ring, version, stored.retired.clone(), &seal)?;
            let detail = format!(
                "{} of origin {origin} added to the content keys the origins share",
                generations(&added)
            );
            Ok(Commit::new(
                vec![Put::Keyring(Box::new(sealed))],
                Some(Audit::new("origin", "origin", "keys.merge", detail)),
                (ring, version),
            ))
        })?;
        self.keys.adopt(ring, version)?;
        tracing::info!(version, generations = %generations(&self.keys.snapshot()), "content keys shared through the store");
        let _ = self.ring_seal.set(seal.clone());
        watch_ring(&self.db, self.keys.clone(), seal);
        Ok(())
    }

    /// Changes the ring: `change` gets the ring in force (the store's when shared) and returns
    /// the new one, its audit record and a value. Shared: committed to the store with the
    /// audit record, then adopted; otherwise the file first, then the audit record. The caller
    /// holds `_one_change`.
    fn change_ring<T: Clone>(
        &self,
        _one_change: &std::sync::MutexGuard<'_, ()>,
        change: impl Fn(&proto::keys::KeyRing) -> Result<(proto::keys::KeyRing, Audit, T), KeysError>,
        retiring: Option<u32>,
    ) -> Result<T, CommandError> {
        let Some(seal) = self.ring_seal.get() else {
            let (ring, audit, value) = change(&self.keys.snapshot())?;
            self.keys.adopt(ring, 0)?;
            self.db.commit(&[], Some(audit))?;
            return Ok(value);
        };
        let (ring, version, value) = self.db.change(|| -> Result<_, CommandError> {
            let (current, version, mut retired) = match self.db.keyring()? {
                Some(stored) => (stored.open(seal)?, stored.version, stored.retired),
                None => (self.keys.snapshot(), 0, Vec::new()),
            };
            let (ring, audit, value) = change(&current)?;
            retired.extend(retiring);
            let sealed = SealedRing::seal(&ring, version + 1, retired, seal)?;
            Ok(Commit::new(
                vec![Put::Keyring(Box::new(sealed))],
                Some(audit),
                (ring, version + 1, value),
            ))
        })?;
        self.keys.adopt(ring, version)?;
        Ok(value)
    }

    pub(super) fn keys_rotate(
        &self,
        who: impl Fn(&str, String) -> Audit,
        why: &str,
    ) -> Result<ControlReply, CommandError> {
        let one_change = self.one_key_change();
        let (generation, fingerprint, detail) = self.change_ring(
            &one_change,
            |ring| {
                let (next, generation, fingerprint) = crate::keys::rotated(ring)?;
                let detail = format!("{generation} (fingerprint {fingerprint}) is current{why}");
                let audit = who("keys.rotate", detail.clone());
                Ok((next, audit, (generation, fingerprint, detail)))
            },
            None,
        )?;
        tracing::info!(%generation, fingerprint, "content keys rotated");
        Ok(ControlReply {
            success: true,
            text: format!("{detail}; new encrypted publishes use it\n"),
            json: format!("{{\"generation\":{}}}", generation.0),
        })
    }

    pub(super) fn keys_list(&self) -> Result<ControlReply, CommandError> {
        let rows = self.keys.list();
        let mut table = vec![["GENERATION", "FINGERPRINT", "CURRENT"].map(str::to_owned)];
        for row in &rows {
            table.push([
                row.generation.to_string(),
                row.fingerprint.clone(),
                if row.current { "yes" } else { "" }.to_owned(),
            ]);
        }
        let mut text = render_table(&table);
        if rows.is_empty() {
            text.push_str("no content key yet (`origin serve` creates the first)\n");
        }
        Ok(ControlReply {
            success: true,
            text,
            json: to_json(&rows),
        })
    }

    pub(super) fn keys_retire(
        &self,
        generation: u32,
        force: bool,
        who: impl Fn(&str, String) -> Audit,
    ) -> Result<ControlReply, CommandError> {
        let one_change = self.one_key_change();
        let needing = self.nodes_needing(generation)?;
        if !needing.is_empty() && !force {
            return Err(CommandError::GenerationInUse {
                generation: KeyGeneration(generation),
                count: needing.len(),
                nodes: needing
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let generation = KeyGeneration(generation);
        let (fingerprint, detail) = self.change_ring(
            &one_change,
            |ring| {
                let (next, fingerprint) = crate::keys::retired(ring, generation)?;
                let detail = format!(
                    "{generation} (fingerprint {fingerprint}) retired: edges drop it at their next key refresh, and bundles sealed with it can no longer be read"
                );
                let audit = who("keys.retire", detail.clone());
                Ok((next, audit, (fingerprint, detail)))
            },
            Some(generation.0),
        )?;
        tracing::info!(%generation, fingerprint, "content-key generation retired");
        Ok(ControlReply {
            success: true,
            text: format!("{detail}\n"),
            json: "null".into(),
        })
    }

    /// The nodes (not revoked) that run or should run a bundle sealed with `generation`.
    fn nodes_needing(&self, generation: u32) -> Result<Vec<String>, DbError> {
        let sealed: std::collections::BTreeSet<proto::manifest::BundleId> = self
            .db
            .packages()?
            .into_iter()
            .filter(|package| package.key_generation == Some(generation))
            .map(|package| package.id)
            .collect();
        if sealed.is_empty() {
            return Ok(Vec::new());
        }
        let mut needing = Vec::new();
        for node in self.db.nodes()? {
            let uses = node
                .installed
                .iter()
                .chain(&node.desired)
                .any(|bundle| sealed.contains(&bundle.id));
            if uses && !self.is_revoked(&node.id)? {
                needing.push(node.id);
            }
        }
        Ok(needing)
    }

    /// Revokes a node, then rotates the keys so what is published next uses a generation the
    /// node never gets.
    pub(super) fn node_revoke(
        &self,
        node: &str,
        who: impl Fn(&str, String) -> Audit,
    ) -> Result<ControlReply, CommandError> {
        let revoked = self.db.change(|| {
            let record = self.find_node(node)?;
            if self.is_revoked(&record.id)? {
                return Ok(Commit::none(Err(record.id)));
            }
            let detail = format!("node {} (site {}) revoked", record.id, record.site);
            let revoked = RevokedRecord {
                node: record.id.clone(),
                at_ms: now_ms(),
                actor: who("", String::new()).actor,
            };
            let audit = who("node.revoke", detail);
            Ok::<_, CommandError>(Commit::new(
                vec![Put::Revoked(Box::new(revoked))],
                Some(audit),
                Ok(record),
            ))
        })?;
        let record = match revoked {
            Ok(record) => record,
            Err(id) => {
                return Ok(ControlReply {
                    success: true,
                    text: format!("node {id} was already revoked\n"),
                    json: "null".into(),
                })
            }
        };
        tracing::warn!(node = %record.id, "node revoked");
        self.revoked
            .ids
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(record.id.clone());
        let rotated = self.keys_rotate(who, &format!(" after revoking node {}", record.id))?;
        Ok(ControlReply {
            success: true,
            text: format!(
                "node {} revoked: the origin refuses its requests and its keys\n{}",
                record.id, rotated.text
            ),
            json: "null".into(),
        })
    }
}
