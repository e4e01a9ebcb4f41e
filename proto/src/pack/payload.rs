//! The payload as chunks: cutting, compressing and storing it when packing
//! ([`ChunkPipeline`]); fetching, verifying and decompressing it when unpacking
//! ([`VerifiedPayload`]).
//!
//! Packing spends most of its time in zstd, so chunks are compressed on worker threads while
//! the calling thread reads files and cuts chunks. Results are put back in payload order before
//! they reach the sink, so the sink and the progress callback run on the calling thread only and
//! the output does not depend on thread timing.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{mpsc, Mutex};

use crate::chunking::{Chunk, ChunkerParams, StreamChunker};
use crate::hash::BlobHash;
use crate::keys::{ContentKey, KeyGeneration};
use crate::manifest::ChunkRef;
use crate::seal::{self, SealedMeta};

use super::{
    ChunkSink, ChunkSource, PackError, PackProgress, UnpackError, UnpackProgress,
    MAX_CHUNK_RAW_BYTES,
};

/// Most compression threads a pack uses, whatever the core count.
pub const MAX_COMPRESS_THREADS: usize = 16;

/// Chunks in flight (queued, compressing, or waiting for their turn) per compression thread.
/// Bounds pack memory to about `2 × threads × (max chunk + its compressed copy)`.
const IN_FLIGHT_PER_THREAD: usize = 2;

/// How to cut and compress.
#[derive(Clone, Debug)]
pub(super) struct PipelineConfig {
    pub(super) chunker: ChunkerParams,
    pub(super) zstd_level: i32,
    /// Compression threads; 0 means one per core.
    pub(super) threads: usize,
    /// Seal each compressed chunk with this generation's key.
    pub(super) seal: Option<(KeyGeneration, ContentKey)>,
}

/// The chunk lists of a packed payload.
pub(super) struct PackedChunks {
    /// The chunks as stored (the ciphertext when sealed, with raw sizes zero).
    pub(super) stored: Vec<ChunkRef>,
    /// When sealed, the plaintext (compressed) chunks in the same order.
    pub(super) plain: Vec<ChunkRef>,
}

/// Runs `produce`, which writes the payload into a [`ChunkPipeline`], with compression threads
/// alongside; returns what `produce` returned and the chunk list.
pub(super) fn pack_payload<S: ChunkSink, T>(
    config: PipelineConfig,
    sink: &mut S,
    total_bytes: u64,
    progress: &mut dyn FnMut(PackProgress),
    produce: impl FnOnce(&mut ChunkPipeline<'_, S>) -> Result<T, PackError>,
) -> Result<(T, PackedChunks), PackError> {
    let chunker = StreamChunker::new(config.chunker)?;
    // Fail early, on this thread, if zstd refuses the level.
    zstd::bulk::Compressor::new(config.zstd_level).map_err(PackError::Compress)?;
    let threads = match config.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(MAX_COMPRESS_THREADS);
    let max_in_flight = threads * IN_FLIGHT_PER_THREAD;
    let (job_tx, job_rx) = mpsc::sync_channel::<CompressJob>(max_in_flight);
    let job_rx = Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::channel::<CompressDone>();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            let job_rx = &job_rx;
            let level = config.zstd_level;
            let seal = config.seal.as_ref();
            scope.spawn(move || compress_worker(job_rx, done_tx, level, seal));
        }
        drop(done_tx);
        let mut pipeline = ChunkPipeline {
            chunker,
            jobs: job_tx,
            done: done_rx,
            max_in_flight,
            next_seq: 0,
            submitted_raw_bytes: 0,
            storer: ChunkStorer {
                sink,
                chunks: Vec::new(),
                plain: Vec::new(),
                waiting: BTreeMap::new(),
                progress,
                state: PackProgress {
                    total_bytes,
                    ..PackProgress::default()
                },
            },
        };
        let value = produce(&mut pipeline)?;
        let chunks = pipeline.finish()?;
        Ok((value, chunks))
        // On error the pipeline is dropped here: the job queue closes, the workers finish
        // what they hold and exit, and the scope joins them.
    })
}

/// Receives the payload in pieces, cuts it, and has each chunk compressed and stored.
pub(super) struct ChunkPipeline<'a, S: ChunkSink> {
    chunker: StreamChunker,
    /// Dropping it closes the queue, which stops the workers.
    jobs: mpsc::SyncSender<CompressJob>,
    done: mpsc::Receiver<CompressDone>,
    max_in_flight: usize,
    next_seq: u64,
    submitted_raw_bytes: u64,
    storer: ChunkStorer<'a, S>,
}

/// A chunk to compress, numbered in payload order.
struct CompressJob {
    seq: u64,
    data: Vec<u8>,
}

/// A compressed (and maybe sealed) chunk, or why it could not be compressed.
struct CompressDone {
    seq: u64,
    raw_bytes: u64,
    result: io::Result<Compressed>,
}

/// The bytes to store under `hash`, and when sealed, the plaintext's hash and size.
struct Compressed {
    hash: BlobHash,
    stored: Vec<u8>,
    plain: Option<(BlobHash, u64)>,
}

/// Puts compressed chunks back in payload order and hands them to the sink.
struct ChunkStorer<'a, S: ChunkSink> {
    sink: &'a mut S,
    chunks: Vec<ChunkRef>,
    /// When sealed, the plaintext chunks.
    plain: Vec<ChunkRef>,
    /// Compressed chunks that finished before an earlier one, by sequence number.
    waiting: BTreeMap<u64, CompressDone>,
    progress: &'a mut dyn FnMut(PackProgress),
    state: PackProgress,
}

impl<S: ChunkSink> ChunkPipeline<'_, S> {
    /// Appends tar headers, padding or other bytes that are not file content.
    pub(super) fn write(&mut self, data: &[u8]) -> Result<(), PackError> {
        for chunk in self.chunker.push(data) {
            Self::submit(
                chunk,
                &self.jobs,
                &self.done,
                &mut self.storer,
                self.max_in_flight,
                &mut self.next_seq,
                &mut self.submitted_raw_bytes,
            )?;
        }
        Ok(())
    }

    /// Appends file content (counted as read for progress).
    pub(super) fn write_content(&mut self, data: &[u8]) -> Result<(), PackError> {
        self.storer.state.bytes_read += data.len() as u64;
        self.write(data)
    }

    /// Bytes appended so far.
    pub(super) fn position(&self) -> u64 {
        self.submitted_raw_bytes + self.chunker.pending_bytes() as u64
    }

    /// Cuts the rest, waits for every chunk to be stored, and returns the chunk list.
    fn finish(self) -> Result<PackedChunks, PackError> {
        let ChunkPipeline {
            chunker,
            jobs,
            done,
            max_in_flight,
            mut next_seq,
            mut submitted_raw_bytes,
            mut storer,
        } = self;
        for chunk in chunker.finish() {
            Self::submit(
                chunk,
                &jobs,
                &done,
                &mut storer,
                max_in_flight,
                &mut next_seq,
                &mut submitted_raw_bytes,
            )?;
        }
        // Closing the queue lets the workers exit once it is empty.
        drop(jobs);
        while storer.stored() < next_seq {
            storer.receive_one(&done)?;
        }
        (storer.progress)(storer.state);
        Ok(PackedChunks {
            stored: storer.chunks,
            plain: storer.plain,
        })
    }

    /// Queues a chunk for compression, first storing finished ones while too many are in flight.
    /// (An associated function over the fields, so it can run while the chunker is borrowed.)
    fn submit(
        chunk: Chunk,
        jobs: &mpsc::SyncSender<CompressJob>,
        done: &mpsc::Receiver<CompressDone>,
        storer: &mut ChunkStorer<'_, S>,
        max_in_flight: usize,
        next_seq: &mut u64,
        submitted_raw_bytes: &mut u64,
    ) -> Result<(), PackError> {
        while *next_seq - storer.stored() >= max_in_flight as u64 {
            storer.receive_one(done)?;
        }
        *submitted_raw_bytes += chunk.data.len() as u64;
        let job = CompressJob {
            seq: *next_seq,
            data: chunk.data,
        };
        jobs.send(job).map_err(|_| workers_gone())?;
        *next_seq += 1;
        Ok(())
    }
}

impl<S: ChunkSink> ChunkStorer<'_, S> {
    /// Chunks handed to the sink so far (also the sequence number of the next one).
    fn stored(&self) -> u64 {
        self.chunks.len() as u64
    }

    /// Waits for one compressed chunk, then stores every chunk that is now next in order.
    fn receive_one(&mut self, done: &mpsc::Receiver<CompressDone>) -> Result<(), PackError> {
        let finished = done.recv().map_err(|_| workers_gone())?;
        self.waiting.insert(finished.seq, finished);
        while let Some(next) = self.waiting.remove(&self.stored()) {
            self.store(next)?;
        }
        Ok(())
    }

    fn store(&mut self, done: CompressDone) -> Result<(), PackError> {
        let Compressed {
            hash,
            stored: compressed,
            plain,
        } = done.result.map_err(PackError::Compress)?;
        self.sink
            .put_chunk(hash, &compressed)
            .map_err(|e| PackError::Sink {
                hash,
                source: Box::new(e),
            })?;
        // A sealed chunk's raw size is only in the sealed metadata.
        let clear_raw_bytes = match plain {
            Some((plain_hash, plain_bytes)) => {
                self.plain.push(ChunkRef {
                    hash: plain_hash,
                    stored_bytes: plain_bytes,
                    raw_bytes: done.raw_bytes,
                });
                0
            }
            None => done.raw_bytes,
        };
        self.chunks.push(ChunkRef {
            hash,
            stored_bytes: compressed.len() as u64,
            raw_bytes: clear_raw_bytes,
        });
        self.state.chunks += 1;
        self.state.stored_bytes += compressed.len() as u64;
        (self.progress)(self.state);
        Ok(())
    }
}

/// Compresses and hashes chunks until the job queue closes.
fn compress_worker(
    jobs: &Mutex<mpsc::Receiver<CompressJob>>,
    done: mpsc::Sender<CompressDone>,
    level: i32,
    seal: Option<&(KeyGeneration, ContentKey)>,
) {
    let mut compressor = zstd::bulk::Compressor::new(level);
    loop {
        // The lock is held only while waiting for a job, not while compressing.
        let job = match jobs.lock() {
            Ok(receiver) => receiver.recv(),
            Err(_) => return, // Another worker panicked; the pipeline reports it.
        };
        let Ok(job) = job else {
            return; // Queue closed: the payload ended or packing failed.
        };
        let result = match &mut compressor {
            Ok(compressor) => compressor.compress(&job.data).map(|compressed| match seal {
                None => Compressed {
                    hash: BlobHash::of(&compressed),
                    stored: compressed,
                    plain: None,
                },
                Some((generation, key)) => {
                    let plain_hash = BlobHash::of(&compressed);
                    let sealed = seal::seal_chunk(key, *generation, &plain_hash, &compressed);
                    Compressed {
                        hash: BlobHash::of(&sealed),
                        stored: sealed,
                        plain: Some((plain_hash, compressed.len() as u64)),
                    }
                }
            }),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        };
        let finished = CompressDone {
            seq: job.seq,
            raw_bytes: job.data.len() as u64,
            result,
        };
        if done.send(finished).is_err() {
            return; // The pipeline is gone.
        }
    }
}

fn workers_gone() -> PackError {
    PackError::Compress(io::Error::other(
        "the compression threads stopped unexpectedly",
    ))
}

/// Chunks fetched ahead of the one being decompressed, verified (and opened) meanwhile on the
/// verifier thread.
const VERIFY_AHEAD: usize = 2;

/// Reads the payload of a chunk list, in order. Chunks are fetched on the calling thread and
/// verified (hash and size; opened and the plaintext checked when encrypted) on a verifier
/// thread up to [`VERIFY_AHEAD`] chunks ahead, while the calling thread decompresses and hands
/// out the previous one: a chunk's bytes are used only once it verified, and errors surface in
/// chunk order. Implements [`Read`] for the tar reader; a chunk failure is kept for
/// [`VerifiedPayload::take_failure`].
pub(super) struct VerifiedPayload<'a, S: ChunkSource> {
    chunks: &'a [ChunkRef],
    opener: Option<Opener<'a>>,
    source: &'a S,
    /// The next chunk to decompress.
    next_index: usize,
    /// The next chunk to fetch.
    next_fetch: usize,
    /// Chunks fetched and not decompressed yet, in order.
    ahead: VecDeque<Ahead>,
    /// The verifier thread, started on the first chunk; `None` before, or when it could not be
    /// started (chunks are then verified on the calling thread).
    verifier: Option<Verifier>,
    verifier_tried: bool,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    /// The current verified chunk, and how much of it has been read.
    current: Vec<u8>,
    read_pos: usize,
    progress: &'a mut dyn FnMut(UnpackProgress),
    state: UnpackProgress,
    failure: Option<UnpackError>,
}

/// Why copying the payload to a writer stopped.
pub(super) enum CopyError {
    /// A chunk failed verification.
    Chunk(UnpackError),
    /// The writer failed.
    Write(io::Error),
}

impl CopyError {
    /// The error to report, naming `path` if the writer failed.
    pub(super) fn at_path(self, path: &Path) -> UnpackError {
        match self {
            CopyError::Chunk(e) => e,
            CopyError::Write(source) => UnpackError::Io {
                action: "write",
                path: path.to_path_buf(),
                source,
            },
        }
    }
}

/// What opens the chunks of an encrypted bundle: the generation's key and the sealed metadata.
pub(super) struct Opener<'a> {
    pub(super) generation: KeyGeneration,
    pub(super) key: &'a ContentKey,
    pub(super) meta: &'a SealedMeta,
}

impl<'a, S: ChunkSource> VerifiedPayload<'a, S> {
    /// Reads `chunks` (the manifest's list) from `source`, opening each with `opener` when the
    /// bundle is encrypted.
    pub(super) fn new(
        chunks: &'a [ChunkRef],
        opener: Option<Opener<'a>>,
        source: &'a S,
        progress: &'a mut dyn FnMut(UnpackProgress),
    ) -> Self {
        let raw_bytes_total = match &opener {
            Some(opener) => opener.meta.total_raw_bytes(),
            None => chunks.iter().map(|c| c.raw_bytes).sum(),
        };
        VerifiedPayload {
            chunks,
            opener,
            source,
            next_index: 0,
            next_fetch: 0,
            ahead: VecDeque::new(),
            verifier: None,
            verifier_tried: false,
            decompressor: None,
            current: Vec::new(),
            read_pos: 0,
            progress,
            state: UnpackProgress {
                chunks_total: chunks.len() as u64,
                raw_bytes_total,
                ..UnpackProgress::default()
            },
            failure: None,
        }
    }

    /// Payload bytes verified so far.
    pub(super) fn raw_bytes_done(&self) -> u64 {
        self.state.raw_bytes_done
    }

    /// Chunks verified so far.
    pub(super) fn chunks_done(&self) -> u64 {
        self.state.chunks_done
    }

    /// The chunk error that made a read fail, if any.
    pub(super) fn take_failure(&mut self) -> Option<UnpackError> {
        self.failure.take()
    }

    /// Verifies every chunk not read yet, discarding the bytes.
    pub(super) fn drain(&mut self) -> Result<(), UnpackError> {
        while self.load_next()? {}
        Ok(())
    }

    /// Writes the rest of the payload to `writer`, each chunk only after it verified.
    pub(super) fn copy_to<W: Write + ?Sized>(&mut self, writer: &mut W) -> Result<(), CopyError> {
        writer
            .write_all(&self.current[self.read_pos..])
            .map_err(CopyError::Write)?;
        self.read_pos = self.current.len();
        while self.load_next().map_err(CopyError::Chunk)? {
            writer.write_all(&self.current).map_err(CopyError::Write)?;
            self.read_pos = self.current.len();
        }
        Ok(())
    }

    /// Starts the verifier thread, once; without a second core, or if it cannot start, chunks
    /// are verified on this thread.
    fn start_verifier(&mut self) {
        if self.verifier_tried {
            return;
        }
        self.verifier_tried = true;
        if self.chunks.len() < 2 || std::thread::available_parallelism().map_or(1, |n| n.get()) < 2
        {
            return;
        }
        let key = self.opener.as_ref().map(|o| (o.generation, o.key.clone()));
        let (job_tx, job_rx) = mpsc::sync_channel::<VerifyJob>(VERIFY_AHEAD);
        let (done_tx, done_rx) =
            mpsc::sync_channel::<Result<Vec<u8>, UnpackError>>(VERIFY_AHEAD + 1);
        let spawned = std::thread::Builder::new()
            .name("chunk-verifier".into())
            .spawn(move || {
                for job in job_rx {
                    let verified = verify_chunk(key.as_ref().map(|(g, k)| (*g, k)), job);
                    if done_tx.send(verified).is_err() {
                        return; // The payload is gone.
                    }
                }
            });
        match spawned {
            Ok(handle) => {
                self.verifier = Some(Verifier {
                    jobs: Some(job_tx),
                    done: done_rx,
                    handle: Some(handle),
                })
            }
            Err(error) => {
                tracing::debug!(%error, "no chunk verifier thread; verifying on this thread")
            }
        }
    }

    /// Fetches chunks up to [`VERIFY_AHEAD`] ahead and hands them to the verifier. A chunk that
    /// cannot be fetched stays in line as its error, and nothing after it is fetched.
    fn fetch_ahead(&mut self) {
        let Some(verifier) = &self.verifier else {
            return;
        };
        while self.ahead.len() < VERIFY_AHEAD
            && !matches!(self.ahead.back(), Some(Ahead::Failed(_)))
        {
            let index = self.next_fetch;
            let Some(job) = self.fetch(index) else {
                return;
            };
            self.next_fetch += 1;
            let entry = match job {
                Ok(job) => {
                    let chunk = job.chunk;
                    let sent = match &verifier.jobs {
                        Some(jobs) => jobs.send(job).is_ok(),
                        None => false,
                    };
                    if sent {
                        Ahead::Sent(chunk)
                    } else {
                        Ahead::Failed(verifier_gone(index, chunk.hash))
                    }
                }
                Err(e) => Ahead::Failed(e),
            };
            self.ahead.push_back(entry);
        }
    }

    /// Fetches chunk `index`, with its plaintext description when encrypted; `None` past the
    /// end.
    fn fetch(&self, index: usize) -> Option<Result<VerifyJob, UnpackError>> {
        let chunk = self.chunks.get(index).copied()?;
        Some(self.fetch_chunk(index, chunk))
    }

    fn fetch_chunk(&self, index: usize, mut chunk: ChunkRef) -> Result<VerifyJob, UnpackError> {
        let plain = match &self.opener {
            Some(opener) => {
                // `open_meta` checked that it describes as many chunks as the manifest lists.
                let plain = opener.meta.chunks.get(index).copied().ok_or_else(|| {
                    UnpackError::Malformed(format!("no sealed metadata for chunk {index}"))
                })?;
                chunk.raw_bytes = plain.raw_bytes;
                Some(plain)
            }
            None => None,
        };
        if chunk.raw_bytes > MAX_CHUNK_RAW_BYTES {
            return Err(UnpackError::ChunkTooLarge {
                index,
                hash: chunk.hash,
                raw_bytes: chunk.raw_bytes,
                limit: MAX_CHUNK_RAW_BYTES,
            });
        }
        let stored = self
            .source
            .get_chunk(chunk.hash)
            .map_err(|e| UnpackError::Fetch {
                index,
                hash: chunk.hash,
                source: Box::new(e),
            })?;
        Ok(VerifyJob {
            index,
            chunk,
            plain,
            stored,
        })
    }

    /// Fetches, verifies and decompresses the next chunk into `current`. Returns false at the
    /// end of the payload. `current` is left empty on error, so no unverified byte is served.
    fn load_next(&mut self) -> Result<bool, UnpackError> {
        let loaded = self.load_next_inner();
        if loaded.is_err() {
            // Forget what was fetched ahead and stop the verifier, so that a later call starts
            // again at the failed chunk, on this thread.
            self.ahead.clear();
            self.verifier = None;
            self.next_fetch = self.next_index;
        }
        loaded
    }

    fn load_next_inner(&mut self) -> Result<bool, UnpackError> {
        self.current.clear();
        self.read_pos = 0;
        self.start_verifier();
        self.fetch_ahead();
        let index = self.next_index;
        let (chunk, stored) = match self.ahead.pop_front() {
            Some(Ahead::Failed(e)) => return Err(e),
            Some(Ahead::Sent(chunk)) => {
                // Keep the verifier busy with the next chunks while this one is decompressed.
                self.fetch_ahead();
                let verified = self
                    .verifier
                    .as_ref()
                    .and_then(|v| v.done.recv().ok())
                    .unwrap_or_else(|| Err(verifier_gone(index, chunk.hash)));
                (chunk, verified?)
            }
            None => match self.fetch(index) {
                None => return Ok(false),
                Some(job) => {
                    let job = job?;
                    self.next_fetch = index + 1;
                    let chunk = job.chunk;
                    let opener = self.opener.as_ref().map(|o| (o.generation, o.key));
                    (chunk, verify_chunk(opener, job)?)
                }
            },
        };
        let bad_compression = |detail: String| UnpackError::BadCompression {
            index,
            hash: chunk.hash,
            raw_bytes: chunk.raw_bytes,
            detail,
        };
        let decompressor = match &mut self.decompressor {
            Some(d) => d,
            slot => slot.insert(
                zstd::bulk::Decompressor::new().map_err(|e| bad_compression(e.to_string()))?,
            ),
        };
        // The buffer's capacity bounds the output: a chunk that inflates beyond its declared
        // size fails here instead of allocating. `raw_bytes` is bounded above.
        let raw_bytes = chunk.raw_bytes as usize;
        self.current.reserve_exact(raw_bytes);
        let produced = decompressor
            .decompress_to_buffer(&stored, &mut self.current)
            .map_err(|e| bad_compression(e.to_string()));
        match produced {
            Ok(n) if n == raw_bytes => {}
            Ok(n) => {
                self.current.clear();
                return Err(bad_compression(format!("it decompressed to {n} bytes")));
            }
            Err(e) => {
                self.current.clear();
                return Err(e);
            }
        }
        self.next_index += 1;
        self.state.chunks_done += 1;
        self.state.raw_bytes_done += chunk.raw_bytes;
        (self.progress)(self.state);
        Ok(true)
    }
}

/// A fetched chunk for the verifier.
struct VerifyJob {
    index: usize,
    /// The manifest's entry, with the plaintext's raw size when encrypted.
    chunk: ChunkRef,
    /// The sealed metadata's entry when encrypted.
    plain: Option<ChunkRef>,
    stored: Vec<u8>,
}

/// A chunk fetched ahead: handed to the verifier, or why it could not be fetched.
enum Ahead {
    Sent(ChunkRef),
    Failed(UnpackError),
}

/// The verifier thread and its queues.
struct Verifier {
    /// Dropping it closes the queue, which stops the thread.
    jobs: Option<mpsc::SyncSender<VerifyJob>>,
    done: mpsc::Receiver<Result<Vec<u8>, UnpackError>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Verifier {
    fn drop(&mut self) {
        // Closing the queue stops the thread after its current chunk; it never blocks on
        // `done`, which has room for every chunk in flight.
        self.jobs = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn verifier_gone(index: usize, hash: BlobHash) -> UnpackError {
    UnpackError::Fetch {
        index,
        hash,
        source: Box::new(io::Error::other(
            "the chunk verifier thread stopped unexpectedly",
        )),
    }
}

/// Checks a fetched chunk's hash and size and, when encrypted, opens it (in place) and checks
/// the plaintext; returns the compressed bytes to decompress.
fn verify_chunk(
    opener: Option<(KeyGeneration, &ContentKey)>,
    job: VerifyJob,
) -> Result<Vec<u8>, UnpackError> {
    let VerifyJob {
        index,
        chunk,
        plain,
        stored,
    } = job;
    let actual_hash = BlobHash::of(&stored);
    if actual_hash != chunk.hash || stored.len() as u64 != chunk.stored_bytes {
        tracing::warn!(index, chunk = %chunk.hash, actual = %actual_hash, "corrupt chunk refused");
        return Err(UnpackError::Corrupt {
            index,
            hash: chunk.hash,
            expected_bytes: chunk.stored_bytes,
            actual_hash,
            actual_bytes: stored.len() as u64,
        });
    }
    match (opener, plain) {
        (Some((generation, key)), Some(plain)) => seal::open_chunk_in_place(
            key, generation, index, chunk.hash, &plain, stored,
        )
        .inspect_err(
            |e| tracing::warn!(index, chunk = %chunk.hash, error = %e, "sealed chunk refused"),
        )
        .map_err(UnpackError::from),
        (Some(_), None) => Err(UnpackError::Malformed(format!(
            "no sealed metadata for chunk {index}"
        ))),
        _ => Ok(stored),
    }
}

impl<S: ChunkSource> Read for VerifiedPayload<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.read_pos == self.current.len() {
            if self.failure.is_some() {
                return Err(io::Error::other("an earlier chunk failed verification"));
            }
            match self.load_next() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => {
                    let message = e.to_string();
                    self.failure = Some(e);
                    return Err(io::Error::other(message));
                }
            }
        }
        let available = &self.current[self.read_pos..];
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.read_pos += n;
        Ok(n)
    }
}
