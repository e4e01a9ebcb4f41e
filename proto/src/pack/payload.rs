//! The payload as chunks: cutting, compressing and storing it when packing
//! ([`ChunkPipeline`]); fetching, verifying and decompressing it when unpacking
//! ([`VerifiedPayload`]).

use std::io::{self, Read, Write};
use std::path::Path;

use crate::chunking::{Chunk, ChunkerParams, StreamChunker};
use crate::hash::BlobHash;
use crate::manifest::ChunkRef;

use super::{
    ChunkSink, ChunkSource, PackError, PackProgress, UnpackError, UnpackProgress,
    MAX_CHUNK_RAW_BYTES,
};

/// Receives the payload in pieces, cuts it, and stores each chunk compressed.
pub(super) struct ChunkPipeline<'a, S: ChunkSink> {
    chunker: StreamChunker,
    storer: ChunkStorer<'a, S>,
}

/// The half of the pipeline that compresses and stores finished chunks (a separate struct so it
/// can be borrowed while the chunker's iterator is live).
struct ChunkStorer<'a, S: ChunkSink> {
    compressor: zstd::bulk::Compressor<'static>,
    /// Reused output buffer, so compression allocates once.
    compressed: Vec<u8>,
    sink: &'a mut S,
    chunks: Vec<ChunkRef>,
    progress: &'a mut dyn FnMut(PackProgress),
    state: PackProgress,
    /// Payload bytes in the chunks stored so far.
    raw_in_chunks: u64,
}

impl<'a, S: ChunkSink> ChunkPipeline<'a, S> {
    /// A pipeline for a payload whose file content totals `total_bytes` (for progress only).
    pub(super) fn new(
        params: ChunkerParams,
        zstd_level: i32,
        sink: &'a mut S,
        total_bytes: u64,
        progress: &'a mut dyn FnMut(PackProgress),
    ) -> Result<Self, PackError> {
        let chunker = StreamChunker::new(params)?;
        let compressor = zstd::bulk::Compressor::new(zstd_level).map_err(PackError::Compress)?;
        Ok(ChunkPipeline {
            chunker,
            storer: ChunkStorer {
                compressor,
                compressed: Vec::with_capacity(zstd::zstd_safe::compress_bound(params.max_bytes)),
                sink,
                chunks: Vec::new(),
                progress,
                state: PackProgress {
                    total_bytes,
                    ..PackProgress::default()
                },
                raw_in_chunks: 0,
            },
        })
    }

    /// Appends tar headers, padding or other bytes that are not file content.
    pub(super) fn write(&mut self, data: &[u8]) -> Result<(), PackError> {
        for chunk in self.chunker.push(data) {
            self.storer.store(chunk)?;
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
        self.storer.raw_in_chunks + self.chunker.pending_bytes() as u64
    }

    /// Cuts and stores the rest; returns the chunk list.
    pub(super) fn finish(self) -> Result<Vec<ChunkRef>, PackError> {
        let ChunkPipeline {
            chunker,
            mut storer,
        } = self;
        for chunk in chunker.finish() {
            storer.store(chunk)?;
        }
        (storer.progress)(storer.state);
        Ok(storer.chunks)
    }
}

impl<S: ChunkSink> ChunkStorer<'_, S> {
    fn store(&mut self, chunk: Chunk) -> Result<(), PackError> {
        self.compressed.clear();
        self.compressor
            .compress_to_buffer(&chunk.data, &mut self.compressed)
            .map_err(PackError::Compress)?;
        let hash = BlobHash::of(&self.compressed);
        self.sink
            .put_chunk(hash, &self.compressed)
            .map_err(|e| PackError::Sink {
                hash,
                source: Box::new(e),
            })?;
        self.chunks.push(ChunkRef {
            hash,
            stored_bytes: self.compressed.len() as u64,
            raw_bytes: chunk.data.len() as u64,
        });
        self.state.chunks += 1;
        self.state.stored_bytes += self.compressed.len() as u64;
        self.raw_in_chunks += chunk.data.len() as u64;
        (self.progress)(self.state);
        Ok(())
    }
}

/// Reads the payload of a chunk list, fetching and verifying one chunk at a time. Implements
/// [`Read`] for the tar reader; a chunk failure is kept for [`VerifiedPayload::take_failure`].
pub(super) struct VerifiedPayload<'a, S: ChunkSource> {
    chunks: &'a [ChunkRef],
    source: &'a S,
    next_index: usize,
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

impl<'a, S: ChunkSource> VerifiedPayload<'a, S> {
    pub(super) fn new(
        chunks: &'a [ChunkRef],
        source: &'a S,
        progress: &'a mut dyn FnMut(UnpackProgress),
    ) -> Self {
        VerifiedPayload {
            chunks,
            source,
            next_index: 0,
            decompressor: None,
            current: Vec::new(),
            read_pos: 0,
            progress,
            state: UnpackProgress {
                chunks_total: chunks.len() as u64,
                raw_bytes_total: chunks.iter().map(|c| c.raw_bytes).sum(),
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

    /// Fetches, verifies and decompresses the next chunk into `current`. Returns false at the
    /// end of the payload. `current` is left empty on error, so no unverified byte is served.
    fn load_next(&mut self) -> Result<bool, UnpackError> {
        self.current.clear();
        self.read_pos = 0;
        let Some(chunk) = self.chunks.get(self.next_index).copied() else {
            return Ok(false);
        };
        let index = self.next_index;
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
