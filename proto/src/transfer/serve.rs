//! Answering `GetBlob` from a [`Store`].

use std::time::Duration;

use quinn::SendStream;
use tokio::sync::{watch, Semaphore, SemaphorePermit};

use crate::hash::BlobHash;
use crate::net::{write_frame, NetError};
use crate::store::{Store, StoreError};
use crate::verify::GroupRanges;
use crate::wire::{ErrorCode, GroupSpan, Response, MAX_PART_GROUPS};

use super::pace::RateLimit;
use super::PeerCounters;

/// How long a cut-through answer waits for the next group from upstream before giving up.
pub const CUT_THROUGH_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Encoded answer bytes one node (process) holds in memory at once, over all its answers: a
/// part is encoded only once its size fits in this budget, and its share is given back when
/// QUIC has taken the part. Without it, every open request holds a whole encoded part (up to
/// [`MAX_PART_GROUPS`] × 16 KiB) while it waits for its peer's flow control, and a stager with
/// a few hundred requests in flight grows by hundreds of MiB.
pub const SERVE_BUDGET_BYTES: u64 = 32 * 1024 * 1024;

/// How long an answer may wait for its peer to take the next part (flow control) before the
/// stream is reset: a peer that stops reading must not keep a share of [`SERVE_BUDGET_BYTES`].
pub const SEND_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Budget units are KiB, so a whole budget fits a semaphore's `u32` permits.
const BUDGET_UNIT: u64 = 1024;
const BUDGET_UNITS: u32 = (SERVE_BUDGET_BYTES / BUDGET_UNIT) as u32;

/// The node's serve budget ([`SERVE_BUDGET_BYTES`]); one per process, as one process is one node.
static SERVE_BUDGET: Semaphore = Semaphore::const_new(BUDGET_UNITS as usize);

/// Waits until `bytes` of encoded data fit in the node's serve budget (a part larger than the
/// whole budget takes all of it).
async fn reserve(bytes: u64) -> SemaphorePermit<'static> {
    let units = bytes
        .div_ceil(BUDGET_UNIT)
        .clamp(1, u64::from(BUDGET_UNITS)) as u32;
    // The semaphore is a static that is never closed, so acquiring cannot fail.
    match SERVE_BUDGET.acquire_many(units).await {
        Ok(permit) => permit,
        Err(_) => unreachable!("the serve budget is never closed"),
    }
}

/// Bytes of the serve budget not held by any answer right now (for tests and metrics).
pub fn serve_budget_available() -> u64 {
    SERVE_BUDGET.available_permits() as u64 * BUDGET_UNIT
}

/// Converts wire spans into ranges, refusing spans that are empty, reversed or out of order.
pub fn spans_to_ranges(spans: &[GroupSpan]) -> Result<GroupRanges, String> {
    let mut boundaries = Vec::with_capacity(spans.len() * 2);
    let mut last_end = 0u64;
    for (i, &(start, end)) in spans.iter().enumerate() {
        if start >= end || (i > 0 && start <= last_end) {
            return Err(format!(
                "group spans must be ascending, disjoint and non-empty; span {i} is {start}..{end}"
            ));
        }
        boundaries.push(start);
        boundaries.push(end);
        last_end = end;
    }
    GroupRanges::from_boundaries(&boundaries).ok_or_else(|| "invalid group spans".to_owned())
}

/// Converts ranges into wire spans for a blob of `size` bytes.
pub fn ranges_to_spans(ranges: &GroupRanges, size: u64) -> Vec<GroupSpan> {
    ranges
        .runs(size)
        .into_iter()
        .map(|r| (r.start, r.end))
        .collect()
}

/// How the answer to one `GetBlob` ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Groups sent.
    pub groups: u64,
    /// Bytes written to the stream (headers and encodings).
    pub bytes: u64,
    /// Whether every requested group was sent.
    pub complete: bool,
}

/// Options of one answer.
pub struct ServeOptions<'a> {
    /// When the blob is still arriving, a receiver that changes whenever new groups landed;
    /// the answer then waits for them (cut-through). `None` answers with what is here now.
    pub progress: Option<watch::Receiver<u64>>,
    /// Test hook: flip one byte of every part sent (to test that clients reject it).
    pub corrupt: bool,
    /// Where to count bytes sent.
    pub counters: &'a PeerCounters,
    /// The node's upload limit, shared by all its answers; `None` sends as fast as QUIC goes.
    pub pace: Option<&'a RateLimit>,
}

/// Answers a `GetBlob` for `requested` groups of `hash` on `send`: one or more
/// [`Response::BlobPart`]s, each followed by its bao encoding, then [`Response::BlobEnd`].
/// Never sends a byte that did not verify in the store.
pub async fn serve_blob(
    store: &Store,
    send: &mut SendStream,
    hash: BlobHash,
    requested: GroupRanges,
    mut options: ServeOptions<'_>,
) -> Result<Served, NetError> {
    let mut served = Served::default();
    let mut remaining = requested;
    let mut size_known = None;
    loop {
        let servable = match store.servable_ranges(&hash, &remaining) {
            Ok(Some((size, ranges))) => {
                size_known = Some(size);
                ranges
            }
            Ok(None) => GroupRanges::empty(),
            Err(error) => return Err(internal(send, &hash, error).await),
        };
        if let Some(size) = size_known {
            remaining = remaining.normalized(size);
            if remaining.is_empty() {
                served.complete = true;
                break;
            }
        }
        if !servable.is_empty() {
            let size = size_known.unwrap_or(0);
            let part: GroupRanges = servable
                .iter_groups(size)
                .take(MAX_PART_GROUPS as usize)
                .collect();
            let expected = crate::verify::encoded_len(size, &part);
            let _budget = reserve(expected).await;
            let mut encoded = Vec::with_capacity(expected.min(64 * 1024 * 1024) as usize);
            let sent_ranges = match tokio::task::block_in_place(|| {
                store.encode_ranges(&hash, &part, &mut encoded)
            }) {
                Ok(ranges) => ranges,
                Err(error) => return Err(internal(send, &hash, error).await),
            };
            if options.corrupt && encoded.len() > 1 {
                let last = encoded.len() - 1;
                encoded[last] ^= 0x01;
            }
            let header = Response::BlobPart {
                groups: ranges_to_spans(&sent_ranges, size),
            };
            let encoded_bytes = encoded.len();
            if let Some(pace) = options.pace {
                pace.acquire(encoded_bytes as u64).await;
            }
            let header_bytes = match tokio::time::timeout(SEND_STALL_TIMEOUT, async {
                let header_bytes = write_frame(send, &header).await?;
                // Handing quinn the buffer itself saves a copy of every byte served.
                send.write_chunk(encoded.into()).await?;
                Ok::<_, NetError>(header_bytes)
            })
            .await
            {
                Ok(written) => written?,
                Err(_) => {
                    tracing::warn!(blob = %hash, "peer took no data for {SEND_STALL_TIMEOUT:?}; resetting the stream");
                    let _ = send.reset(quinn::VarInt::from_u32(0));
                    return Err(NetError::Timeout {
                        what: "sending a blob part",
                        after_ms: SEND_STALL_TIMEOUT.as_millis() as u64,
                    });
                }
            };
            let bytes = (header_bytes + encoded_bytes) as u64;
            options.counters.sent.add(bytes);
            served.bytes += bytes;
            served.groups += sent_ranges.count(size);
            remaining = remaining.difference(&sent_ranges);
            continue;
        }
        // Nothing servable now: wait for upstream, or end with what was sent.
        let Some(progress) = options.progress.as_mut() else {
            break;
        };
        match tokio::time::timeout(CUT_THROUGH_STALL_TIMEOUT, progress.changed()).await {
            Ok(Ok(())) => continue,
            // The upstream fetch ended (sender dropped): one last look, then stop waiting.
            Ok(Err(_)) => {
                options.progress = None;
                continue;
            }
            Err(_) => {
                tracing::warn!(blob = %hash, "upstream stalled; ending the answer with what was sent");
                break;
            }
        }
    }
    let last = if served.groups == 0 && !served.complete {
        Response::Error {
            code: ErrorCode::NotFound,
            message: format!("blob {hash} is not here"),
        }
    } else {
        Response::BlobEnd
    };
    let last_bytes = write_frame(send, &last).await? as u64;
    options.counters.sent.add(last_bytes);
    served.bytes += last_bytes;
    send.finish()?;
    Ok(served)
}

async fn internal(send: &mut SendStream, hash: &BlobHash, error: StoreError) -> NetError {
    tracing::error!(blob = %hash, %error, "cannot serve blob from the store");
    let answer = Response::Error {
        code: ErrorCode::Internal,
        message: format!("cannot read blob {hash}: {error}"),
    };
    let _ = write_frame(send, &answer).await;
    let _ = send.finish();
    NetError::UnexpectedMessage(format!("store failed while serving {hash}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_round_trip_and_bad_spans_are_refused() {
        let ranges = spans_to_ranges(&[(0, 3), (5, 9)]).expect("valid");
        assert_eq!(ranges_to_spans(&ranges, 20 * 16384), vec![(0, 3), (5, 9)]);
        assert!(spans_to_ranges(&[(3, 3)]).is_err());
        assert!(spans_to_ranges(&[(5, 9), (0, 3)]).is_err());
        assert!(spans_to_ranges(&[(0, 5), (4, 9)]).is_err());
    }
}
