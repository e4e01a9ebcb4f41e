//! One QUIC stream over loopback: a verified blob fetch beside a plain quinn transfer of the
//! same bytes, in the same run, on the same endpoints and TLS configuration.
//!
//! Four ways to move the same blob, interleaved round by round so machine noise hits all of
//! them alike:
//! - `plain quinn`: the server writes the bytes from memory, the client reads and drops them;
//! - `plain quinn, into a file`: the same, but the client writes the bytes to a file and fsyncs
//!   it at the end (the baseline for a durable download: what the disk costs without any
//!   verification);
//! - `verified, into store`: the real `serve_blob` (data and outboard read from the server's
//!   store, every group re-hashed before it is sent: the default) and the real `fetch_blob`,
//!   which verifies every 16 KiB group, writes it and makes it durable in the client's store;
//! - `verified, into store, server trusts its store`: the same with
//!   `StoreOptions::serve_check = TrustData` on the server (the client still verifies all);
//! - `verified, to memory`: the trusting server, and a client that verifies every group with the
//!   sans-IO decoder and then drops it (shows what the client's store costs).
//!
//! Client and server share this machine's cores, so every BLAKE3 pass either side makes is
//! taken out of quinn's budget: on two cores, the server's re-hash is the difference between
//! the two `into store` rows.
//!
//! Run: `cargo bench -p benches --bench fetch` (1 GiB, 3 rounds). Smaller:
//! `STAGECOACH_FETCH_MIB=256 STAGECOACH_FETCH_ROUNDS=2 cargo bench -p benches --bench fetch`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use proto::hash::BlobHash;
use proto::net::{
    accept, client_endpoint, connect, read_frame, send_request, CertAuthority, NodeIdentity, Role,
    Site,
};
use proto::store::{Store, StoreOptions};
use proto::transfer::fetch::fetch_blob;
use proto::transfer::serve::{ranges_to_spans, serve_blob, ServeOptions};
use proto::transfer::PeerCounters;
use proto::verify::{Decoder, GroupCheck, GroupRanges};
use proto::wire::{Request, MAX_FRAME_BYTES};
use rand::RngCore;

/// Default blob size, in MiB.
const DEFAULT_SIZE_MIB: u64 = 1024;
/// Default number of rounds of each mode.
const DEFAULT_ROUNDS: usize = 3;
/// Slice the plain sender hands to quinn at a time.
const PLAIN_WRITE_BYTES: usize = 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Plain,
    PlainIntoFile,
    VerifiedIntoStore,
    VerifiedIntoStoreTrusting,
    VerifiedToMemory,
}

impl Mode {
    const ALL: [Mode; 5] = [
        Mode::Plain,
        Mode::PlainIntoFile,
        Mode::VerifiedIntoStore,
        Mode::VerifiedIntoStoreTrusting,
        Mode::VerifiedToMemory,
    ];

    /// Whether the bytes end on disk (durably) or in memory.
    fn to_disk(self) -> bool {
        matches!(
            self,
            Mode::PlainIntoFile | Mode::VerifiedIntoStore | Mode::VerifiedIntoStoreTrusting
        )
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Plain => "plain quinn",
            Mode::PlainIntoFile => "plain quinn, into a file (fsync at end)",
            Mode::VerifiedIntoStore => "verified, into store",
            Mode::VerifiedIntoStoreTrusting => "verified, into store, server trusts its store",
            Mode::VerifiedToMemory => "verified, to memory, server trusts its store",
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    // Criterion-style flags (`--bench`) are passed by cargo; nothing to parse.
    let size_mib: u64 = env_or("STAGECOACH_FETCH_MIB", DEFAULT_SIZE_MIB);
    let rounds: usize = env_or("STAGECOACH_FETCH_ROUNDS", DEFAULT_ROUNDS);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(run(size_mib * 1024 * 1024, rounds))
}

async fn run(size: u64, rounds: usize) -> Result<()> {
    proto::net::install_crypto_provider();
    let work = tempfile::tempdir().context("cannot create a work directory")?;
    eprintln!(
        "fetch bench: generating and storing a {} MiB blob…",
        size >> 20
    );
    let mut data = vec![0u8; size as usize];
    rand::thread_rng().fill_bytes(&mut data);
    let mut stores = Vec::new();
    let mut hash = None;
    for (name, serve_check) in [
        ("rehash", GroupCheck::Rehash),
        ("trust", GroupCheck::TrustData),
    ] {
        let options = StoreOptions {
            serve_check,
            ..StoreOptions::default()
        };
        let store = Store::open(work.path().join(name), options)?;
        hash = Some(tokio::task::block_in_place(|| store.put_blob(&data))?);
        stores.push(Arc::new(store));
    }
    let hash = hash.context("no store")?;
    let data = Bytes::from(data);

    let ca = CertAuthority::generate()?;
    let publisher = proto::manifest::generate_signing_key().verifying_key();
    let identity = |role, site: &str| -> Result<NodeIdentity> {
        Ok(ca.node_identity(role, &Site::new(site)?, publisher, "127.0.0.1:1".to_owned())?)
    };
    let server_identity = identity(Role::Stager, "bench")?;
    let client_identity = identity(Role::Edge, "bench")?;
    let client = client_endpoint(&client_identity)?;
    // One server (and one connection) per store: the rehashing one also answers the plain
    // requests, so plain and default-verified share a connection.
    let mut servers = Vec::new();
    let mut conns = Vec::new();
    for store in stores {
        let server = proto::net::server_endpoint("127.0.0.1:0".parse()?, &server_identity)?;
        let addr = server.local_addr()?;
        servers.push((
            server.clone(),
            tokio::spawn(serve(server, store, data.clone())),
        ));
        conns.push(connect(&client, addr).await?);
    }
    let mut results: Vec<(Mode, Vec<f64>)> = Mode::ALL.iter().map(|m| (*m, vec![])).collect();
    for round in 1..=rounds {
        for (mode, samples) in &mut results {
            let store_dir = work.path().join(format!("client-{round}"));
            let started = Instant::now();
            let conn = match mode {
                Mode::Plain | Mode::PlainIntoFile | Mode::VerifiedIntoStore => &conns[0],
                Mode::VerifiedIntoStoreTrusting | Mode::VerifiedToMemory => &conns[1],
            };
            let moved = match mode {
                Mode::Plain => plain_fetch(conn, None).await?,
                Mode::PlainIntoFile => {
                    std::fs::create_dir_all(&store_dir)?;
                    plain_fetch(conn, Some(&store_dir.join("blob"))).await?
                }
                Mode::VerifiedToMemory => verified_to_memory(conn, hash, size).await?,
                Mode::VerifiedIntoStore | Mode::VerifiedIntoStoreTrusting => {
                    let store = Store::open(&store_dir, StoreOptions::default())?;
                    let counters = PeerCounters::detached();
                    fetch_blob(conn, &store, hash, size, &counters, None).await?;
                    if !store.has_blob(&hash) {
                        bail!("the verified fetch did not leave a complete blob");
                    }
                    size
                }
            };
            let elapsed = started.elapsed();
            if moved != size {
                bail!("{} moved {moved} bytes, expected {size}", mode.label());
            }
            let mb_s = size as f64 / 1e6 / elapsed.as_secs_f64();
            eprintln!(
                "round {round}: {:<46} {:>8.1} MB/s ({:.2} s)",
                mode.label(),
                mb_s,
                elapsed.as_secs_f64()
            );
            samples.push(mb_s);
            let _ = std::fs::remove_dir_all(&store_dir);
        }
    }
    for conn in conns {
        conn.close(0u32.into(), b"done");
    }
    for (server, serving) in servers {
        server.close(0u32.into(), b"done");
        serving.abort();
    }

    let median = |samples: &[f64]| {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    };
    let plain = median(&results[0].1);
    let plain_to_disk = median(&results[1].1);
    println!(
        "\nOne stream over loopback, {} MiB, median of {rounds} rounds:",
        size >> 20
    );
    println!("| transfer | MB/s | vs plain quinn | vs plain quinn, same destination |");
    println!("|---|---:|---:|---:|");
    for (mode, samples) in &results {
        let mb_s = median(samples);
        let same = if mode.to_disk() { plain_to_disk } else { plain };
        println!(
            "| {} | {:.1} | {:.1}% | {:.1}% |",
            mode.label(),
            mb_s,
            100.0 * mb_s / plain,
            100.0 * mb_s / same
        );
    }
    Ok(())
}

/// The server: `GetBlob` goes through the real `serve_blob`; any other request gets the raw
/// bytes of the blob from memory (the plain baseline).
async fn serve(endpoint: quinn::Endpoint, store: Arc<Store>, data: Bytes) {
    while let Some(incoming) = endpoint.accept().await {
        let Ok((conn, _peer)) = accept(incoming).await else {
            continue;
        };
        let store = store.clone();
        let data = data.clone();
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let store = store.clone();
                let data = data.clone();
                tokio::spawn(async move {
                    let Ok(Some(request)) = read_frame::<Request>(&mut recv, MAX_FRAME_BYTES).await
                    else {
                        return;
                    };
                    match request {
                        Request::GetBlob { hash, size, groups } => {
                            let Ok(ranges) = proto::transfer::serve::spans_to_ranges(&groups)
                            else {
                                return;
                            };
                            let counters = PeerCounters::detached();
                            let options = ServeOptions {
                                progress: None,
                                corrupt: false,
                                counters: &counters,
                                pace: None,
                            };
                            let _ = size;
                            if let Err(error) =
                                serve_blob(&store, &mut send, hash, ranges, options).await
                            {
                                eprintln!("serve_blob failed: {error}");
                            }
                        }
                        _ => {
                            let mut offset = 0;
                            while offset < data.len() {
                                let end = (offset + PLAIN_WRITE_BYTES).min(data.len());
                                if send.write_chunk(data.slice(offset..end)).await.is_err() {
                                    return;
                                }
                                offset = end;
                            }
                            let _ = send.finish();
                            let _ = send.stopped().await;
                        }
                    }
                });
            }
        });
    }
}

/// Asks for the raw bytes and reads them to the end, into `file` (fsynced at the end) or
/// nowhere; returns the byte count.
async fn plain_fetch(conn: &quinn::Connection, file: Option<&std::path::Path>) -> Result<u64> {
    use std::io::Write;
    let mut out = match file {
        Some(path) => Some(std::fs::File::create(path)?),
        None => None,
    };
    let mut recv = send_request(conn, &Request::ListBundles).await?;
    let mut received = 0u64;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        received += chunk.bytes.len() as u64;
        if let Some(out) = out.as_mut() {
            tokio::task::block_in_place(|| out.write_all(&chunk.bytes))?;
        }
    }
    if let Some(out) = out {
        tokio::task::block_in_place(|| out.sync_all())?;
    }
    Ok(received)
}

/// The real blob request and answer, verified group by group in memory and then dropped.
async fn verified_to_memory(conn: &quinn::Connection, hash: BlobHash, size: u64) -> Result<u64> {
    let all = GroupRanges::all().normalized(size);
    let request = Request::GetBlob {
        hash,
        size,
        groups: ranges_to_spans(&all, size),
    };
    let mut recv = send_request(conn, &request).await?;
    let mut verified = 0u64;
    let mut buf = Vec::new();
    loop {
        let header: proto::wire::Response = read_frame(&mut recv, 64 * 1024)
            .await?
            .context("stream ended without BlobEnd")?;
        let spans = match header {
            proto::wire::Response::BlobPart { groups } => groups,
            proto::wire::Response::BlobEnd => break,
            other => bail!("unexpected answer {other:?}"),
        };
        let part = proto::transfer::serve::spans_to_ranges(&spans).map_err(anyhow::Error::msg)?;
        // Like fetch_blob: read the part whole, then verify it.
        buf.resize(proto::verify::encoded_len(size, &part) as usize, 0);
        recv.read_exact(&mut buf).await?;
        let mut decoder = Decoder::with_size(hash, size, part);
        let mut at = 0;
        while let Some(needed) = decoder.needed() {
            let piece = buf
                .get(at..at + needed)
                .context("part shorter than its ranges")?;
            at += needed;
            if let proto::verify::DecodeItem::Group(group) = decoder.push(piece)? {
                verified += group.data().len() as u64;
            }
        }
        decoder.finish()?;
    }
    // Keep the timing honest about reaching the end of the answer.
    tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(0))
        .await
        .ok();
    Ok(verified)
}
