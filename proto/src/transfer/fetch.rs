//! Fetching manifests and blobs from a peer into a [`Store`], verified group by group.

use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;
use quinn::{Connection, RecvStream};
use tokio::sync::watch;

use crate::hash::BlobHash;
use crate::manifest::{BundleId, Manifest, ManifestError, SignedManifest, MAX_MANIFEST_BYTES};
use crate::net::{call, read_exact, read_frame_counted, send_request, NetError};
use crate::store::{BlobStatus, Store, StoreError};
use crate::verify::{GroupRanges, VerifyError};
use crate::wire::{BundleInfo, ErrorCode, Request, Response, MAX_FRAME_BYTES, MAX_PART_GROUPS};

use super::serve::{ranges_to_spans, spans_to_ranges};
use super::PeerCounters;

/// Largest answer frame expected on a blob stream (headers only; data is raw).
const MAX_BLOB_HEADER_BYTES: usize = 64 * 1024;

/// Why a fetch failed. [`FetchError::is_source_fault`] tells whether to try another source.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The connection or stream failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The source sent data that did not verify; it should be dropped.
    #[error("source sent bad data for blob {hash}: {source}")]
    Verify {
        /// The blob.
        hash: BlobHash,
        /// What failed, naming the group.
        source: VerifyError,
    },
    /// The manifest was refused.
    #[error("bundle {id}: {source}")]
    Manifest {
        /// The bundle.
        id: BundleId,
        /// Why.
        source: ManifestError,
    },
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The source answered with an error.
    #[error("source refused: {code:?}: {message}")]
    Refused {
        /// Why, for machines.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// The source broke the protocol.
    #[error("protocol violation by the source: {0}")]
    Protocol(String),
    /// The source did not have every group.
    #[error("source held only part of blob {hash}: {missing} groups still missing")]
    Incomplete {
        /// The blob.
        hash: BlobHash,
        /// Groups still missing.
        missing: u64,
    },
}

impl FetchError {
    /// True when the source (not this node) is at fault, so another source may succeed.
    pub fn is_source_fault(&self) -> bool {
        !matches!(self, FetchError::Store(_) | FetchError::Manifest { .. })
    }

    /// True when the source sent provably wrong bytes: drop and ban it.
    pub fn is_corrupt_source(&self) -> bool {
        matches!(self, FetchError::Verify { source, .. } if source.is_corrupt_data())
    }
}

fn refused_or_unexpected(response: Response, wanted: &str) -> FetchError {
    match response {
        Response::Error { code, message } => FetchError::Refused { code, message },
        other => FetchError::Protocol(format!("expected {wanted}, got {other:?}")),
    }
}

/// Lists the bundles of the server on `conn`.
pub async fn list_bundles(conn: &Connection) -> Result<Vec<BundleInfo>, FetchError> {
    match call(conn, &Request::ListBundles, MAX_FRAME_BYTES).await? {
        Response::Bundles(list) => Ok(list),
        other => Err(refused_or_unexpected(other, "a bundle list")),
    }
}

/// Asks the server on `conn` which bundles to keep: `request` is [`Request::KeepSet`] (this
/// node's, or its site's for a stager) or [`Request::RelayKeepSet`].
pub async fn keep_set(
    conn: &Connection,
    request: &Request,
) -> Result<crate::wire::KeepSet, FetchError> {
    match call(conn, request, MAX_FRAME_BYTES).await? {
        Response::KeepSet(keep) => Ok(keep),
        other => Err(refused_or_unexpected(other, "a keep-set")),
    }
}

/// Resolves `name` (at `version`, or the newest) on the server on `conn`.
pub async fn resolve(
    conn: &Connection,
    name: &str,
    version: Option<&str>,
) -> Result<BundleInfo, FetchError> {
    let request = Request::Resolve {
        name: name.to_owned(),
        version: version.map(str::to_owned),
    };
    match call(conn, &request, MAX_FRAME_BYTES).await? {
        Response::Resolved(info) => Ok(info),
        other => Err(refused_or_unexpected(other, "a resolved bundle")),
    }
}

/// Fetches the signed manifest of `id` and checks it is that bundle, signed by a `trusted` key.
pub async fn fetch_manifest(
    conn: &Connection,
    id: BundleId,
    trusted: &[VerifyingKey],
) -> Result<(SignedManifest, Manifest), FetchError> {
    let answer = call(
        conn,
        &Request::GetManifest { id },
        MAX_MANIFEST_BYTES + 4096,
    )
    .await?;
    let signed = match answer {
        Response::Manifest(signed) => signed,
        other => return Err(refused_or_unexpected(other, "a manifest")),
    };
    let manifest = signed
        .verify_as(id, trusted)
        .map_err(|source| FetchError::Manifest { id, source })?;
    Ok((signed, manifest))
}

/// Where a blob fetch reports progress: the number of groups written so far, bumped after
/// every group (cut-through servers wait on it).
pub type Progress = watch::Sender<u64>;

/// Fetches the groups of blob `hash` (of `size` bytes) that `store` lacks from the server on
/// `conn`, resuming a partial blob. Only verified groups are written. Returns the bytes
/// received. On a verification failure the blob keeps its verified groups, and the error says
/// which group failed.
pub async fn fetch_blob(
    conn: &Connection,
    store: &Store,
    hash: BlobHash,
    size: u64,
    counters: &PeerCounters,
    progress: Option<&Progress>,
) -> Result<u64, FetchError> {
    let Some(mut partial) = open_writer(store, hash, size).await? else {
        return Ok(0);
    };
    let missing = partial.missing();
    if missing.is_empty() {
        tokio::task::block_in_place(|| partial.finish())?;
        return Ok(0);
    }
    let request = Request::GetBlob {
        hash,
        size,
        groups: ranges_to_spans(&missing, size),
    };
    let mut recv = send_request(conn, &request).await?;
    let mut received = 0u64;
    let mut buf = PartBuffer::take();
    loop {
        let (header, header_bytes): (Response, usize) =
            read_frame_counted(&mut recv, MAX_BLOB_HEADER_BYTES)
                .await?
                .ok_or_else(|| FetchError::Protocol("stream ended without BlobEnd".into()))?;
        received += header_bytes as u64;
        counters.received.add(header_bytes as u64);
        let spans = match header {
            Response::BlobPart { groups } => groups,
            Response::BlobEnd => break,
            other => return Err(refused_or_unexpected(other, "a blob part")),
        };
        let part = spans_to_ranges(&spans).map_err(FetchError::Protocol)?;
        if !missing.is_superset(&part) {
            return Err(FetchError::Protocol(format!(
                "part {part} holds groups that were not asked for"
            )));
        }
        received += receive_part(
            &mut recv,
            &mut partial,
            part,
            &mut buf.0,
            hash,
            counters,
            progress,
        )
        .await?;
    }
    if partial.is_complete() {
        tokio::task::block_in_place(|| partial.finish())?;
        Ok(received)
    } else {
        let missing = partial.missing().count(size);
        tokio::task::block_in_place(|| partial.commit())?;
        Err(FetchError::Incomplete { hash, missing })
    }
}

/// Part buffers kept between fetches (each at most one part, about 530 KiB): a node fetches
/// many blobs of about half a MiB, and a fresh buffer for each is fresh memory to map, fault
/// in and zero.
const KEPT_PART_BUFFERS: usize = 16;

static PART_BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// A fetch's part buffer, from the pool and back to it when dropped.
struct PartBuffer(Vec<u8>);

impl PartBuffer {
    fn take() -> Self {
        let kept = PART_BUFFERS.lock().unwrap_or_else(|e| e.into_inner()).pop();
        Self(kept.unwrap_or_default())
    }
}

impl Drop for PartBuffer {
    fn drop(&mut self) {
        let mut kept = PART_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < KEPT_PART_BUFFERS {
            kept.push(std::mem::take(&mut self.0));
        }
    }
}

/// How long a fetch waits for another task that is writing the same blob (an aborted request
/// still unwinding, say) before it gives up.
const WRITER_WAIT: Duration = Duration::from_secs(10);

/// Opens the blob for writing, waiting while another task of this node holds it. `None` when
/// the blob is (or became, by that other task) complete.
async fn open_writer(
    store: &Store,
    hash: BlobHash,
    size: u64,
) -> Result<Option<crate::store::PartialBlob>, FetchError> {
    let deadline = Instant::now() + WRITER_WAIT;
    loop {
        if matches!(store.blob_status(&hash)?, BlobStatus::Complete { .. }) {
            return Ok(None);
        }
        match tokio::task::block_in_place(|| store.begin_or_resume(hash, size)) {
            Ok(partial) => return Ok(Some(partial)),
            Err(StoreError::WriteInProgress { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(other) => return Err(other.into()),
        }
    }
}

/// Reads one part whole (at most [`MAX_PART_GROUPS`] groups, so its size is bounded), then
/// verifies and writes it in one blocking step: one hand-off to a blocking thread per part
/// instead of one per 16 KiB group. On a bad group, the groups before it are kept and nothing
/// of it or after it is written.
async fn receive_part(
    recv: &mut RecvStream,
    partial: &mut crate::store::PartialBlob,
    part: GroupRanges,
    buf: &mut Vec<u8>,
    hash: BlobHash,
    counters: &PeerCounters,
    progress: Option<&Progress>,
) -> Result<u64, FetchError> {
    let size = partial.size();
    let groups = part.count(size);
    if groups > MAX_PART_GROUPS {
        return Err(FetchError::Protocol(format!(
            "part {part} carries {groups} groups; at most {MAX_PART_GROUPS} are allowed"
        )));
    }
    let encoded_len = crate::verify::encoded_len(size, &part) as usize;
    // Grown, never shrunk: the buffer comes back from the pool with its bytes, so only growth
    // is zeroed.
    if buf.len() < encoded_len {
        buf.resize(encoded_len, 0);
    }
    let buf = &mut buf[..encoded_len];
    read_exact(recv, buf).await?;
    counters.received.add(encoded_len as u64);
    let written = tokio::task::block_in_place(|| partial.write_part(buf, part));
    match written {
        Ok(written_groups) => {
            if let Some(progress) = progress {
                progress.send_modify(|done| *done += written_groups);
            }
            Ok(encoded_len as u64)
        }
        Err(StoreError::Verify(source)) => {
            counters.verify_failures.inc();
            tracing::warn!(blob = %hash, error = %source, "rejected data that did not verify");
            tokio::task::block_in_place(|| partial.commit())?;
            Err(FetchError::Verify { hash, source })
        }
        Err(other) => Err(other.into()),
    }
}
