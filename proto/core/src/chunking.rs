//! Content-defined chunking (FastCDC v2020), fed incrementally. Pure: no I/O.
//!
//! A bundle's payload is cut where the content says so, not at fixed offsets, so an edit in one
//! file moves the cut points only near the edit and a new version shares most chunks with the
//! old one. [`StreamChunker`] takes the payload in pieces of any size (a tar stream as it is
//! generated) and yields exactly the chunks that [`fastcdc::v2020::FastCDC`] would yield on the
//! whole payload, while holding less than two maximum-size chunks in memory.

use fastcdc::v2020::{self, Normalization};

/// Chunk-size bounds for FastCDC, in bytes.
///
/// All three must be even (FastCDC scans bytes in pairs) and within FastCDC's limits
/// ([`ChunkerParams::validate`] says which bound is broken).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkerParams {
    /// No cut is made before this many bytes (except the last chunk of the payload).
    pub min_bytes: usize,
    /// The size the cut-point test aims at.
    pub avg_bytes: usize,
    /// A cut is forced at this many bytes. Bounds the memory a server holds per chunk.
    pub max_bytes: usize,
}

/// Smallest `min_bytes` FastCDC accepts.
pub const MIN_BYTES_LOWEST: usize = v2020::MINIMUM_MIN;
/// Largest `min_bytes` FastCDC accepts.
pub const MIN_BYTES_HIGHEST: usize = v2020::MINIMUM_MAX;
/// Smallest `avg_bytes` FastCDC accepts.
pub const AVG_BYTES_LOWEST: usize = v2020::AVERAGE_MIN;
/// Largest `avg_bytes` FastCDC accepts.
pub const AVG_BYTES_HIGHEST: usize = v2020::AVERAGE_MAX;
/// Smallest `max_bytes` FastCDC accepts.
pub const MAX_BYTES_LOWEST: usize = v2020::MAXIMUM_MIN;
/// Largest `max_bytes` FastCDC accepts; also the largest chunk any bundle may hold.
pub const MAX_BYTES_HIGHEST: usize = v2020::MAXIMUM_MAX;

/// FastCDC normalization level (the library's default): most chunks land within a factor of
/// two of `avg_bytes`, fewer are forced at `max_bytes` than with level 0.
const NORMALIZATION: Normalization = Normalization::Level1;

impl ChunkerParams {
    /// The chunk sizes every publisher uses unless told otherwise: 128 KiB minimum, 512 KiB
    /// average, 2 MiB maximum.
    ///
    /// Chosen by measurement (`cargo test --release -p proto --test bundle_dedup -- --ignored
    /// --nocapture measure_chunker_params`): v1 is a 265 MB tree of 2,000 files (half text-like,
    /// half incompressible, log-uniform from 200 B to 256 KiB, plus 10 mixed files of 9–27 MiB);
    /// v2 edits 1% of the files in two places (16 bytes replaced, 8 inserted) and adds 10 files.
    /// "reused" is the share of v2's distinct stored bytes that v1 already holds, "new MB" what
    /// a site holding v1 must fetch, "stored MB" what a site holding nothing must fetch:
    ///
    /// | avg     | min/max        | reused | new MB | stored MB | chunks | manifest KB |
    /// |---------|----------------|--------|--------|-----------|--------|-------------|
    /// | 64 KiB  | 16 KiB/256 KiB | 98.1%  | 3.4    | 182.6     | 2,947  | 118.7       |
    /// | 256 KiB | 64 KiB/1 MiB   | 95.7%  | 7.3    | 170.4     | 744    | 31.3        |
    /// | 512 KiB | 128 KiB/2 MiB  | 91.8%  | 13.5   | 163.7     | 370    | 15.6        |
    /// | 1 MiB   | 256 KiB/4 MiB  | 86.1%  | 22.2   | 159.6     | 183    | 7.7         |
    /// | 4 MiB   | 1 MiB/16 MiB   | 70.9%  | 45.6   | 156.7     | 43     | 1.9         |
    ///
    /// Smaller chunks deduplicate better but compress worse (zstd sees less context: 64 KiB
    /// chunks store 14% more than 1 MiB ones) and cost more per byte: each chunk is a blob with
    /// its own manifest entry (~42 bytes), request, bao outboard and fsync. A first install plus
    /// one update costs least at 256–512 KiB (177.7 and 177.2 MB against 181.8 at 1 MiB); 512 KiB
    /// halves the per-chunk work of 256 KiB, fetches 40% fewer new bytes per update than 1 MiB,
    /// keeps a 20 GiB image near 40k chunks (a 1.7 MB manifest, far below the 16 MiB bound),
    /// and its 2 MiB maximum bounds what a server holds per stream. Pack speed hardly depends on
    /// the chunk size (zstd dominates). The minimum stays far above the 16 KiB verification
    /// group.
    pub const DEFAULT: ChunkerParams = ChunkerParams::with_avg(512 * 1024);

    /// Params with `min = avg / 4` and `max = avg * 4`, the ratio [`ChunkerParams::DEFAULT`] uses.
    pub const fn with_avg(avg_bytes: usize) -> ChunkerParams {
        ChunkerParams {
            min_bytes: avg_bytes / 4,
            avg_bytes,
            max_bytes: avg_bytes * 4,
        }
    }

    /// Checks the bounds FastCDC needs: each even and within its range, `min < avg < max`.
    pub fn validate(&self) -> Result<(), ChunkerParamsError> {
        let checks = [
            (
                "min_bytes",
                self.min_bytes,
                MIN_BYTES_LOWEST,
                MIN_BYTES_HIGHEST,
            ),
            (
                "avg_bytes",
                self.avg_bytes,
                AVG_BYTES_LOWEST,
                AVG_BYTES_HIGHEST,
            ),
            (
                "max_bytes",
                self.max_bytes,
                MAX_BYTES_LOWEST,
                MAX_BYTES_HIGHEST,
            ),
        ];
        for (name, value, lowest, highest) in checks {
            if !(lowest..=highest).contains(&value) {
                return Err(ChunkerParamsError::OutOfRange {
                    name,
                    value,
                    lowest,
                    highest,
                });
            }
            if value % 2 != 0 {
                return Err(ChunkerParamsError::Odd { name, value });
            }
        }
        if !(self.min_bytes < self.avg_bytes && self.avg_bytes < self.max_bytes) {
            return Err(ChunkerParamsError::Unordered(*self));
        }
        Ok(())
    }
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams::DEFAULT
    }
}

/// Why [`ChunkerParams`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkerParamsError {
    /// One bound is outside what FastCDC supports.
    #[error("chunker {name} = {value} is outside FastCDC's range {lowest}..={highest} bytes")]
    OutOfRange {
        /// Which field.
        name: &'static str,
        /// Its value.
        value: usize,
        /// Smallest allowed.
        lowest: usize,
        /// Largest allowed.
        highest: usize,
    },
    /// FastCDC tests cut points in byte pairs and needs even sizes.
    #[error("chunker {name} = {value} must be even")]
    Odd {
        /// Which field.
        name: &'static str,
        /// Its value.
        value: usize,
    },
    /// The bounds are not increasing.
    #[error("chunker sizes must satisfy min < avg < max, got {0:?}")]
    Unordered(ChunkerParams),
}

/// One chunk of the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Where the chunk starts in the payload, in bytes.
    pub offset: u64,
    /// The chunk's bytes.
    pub data: Vec<u8>,
}

/// Cuts a payload that arrives in pieces, with the cut points FastCDC v2020 finds on the whole.
///
/// Feed it with [`StreamChunker::push`] and drain the chunks each call yields, then call
/// [`StreamChunker::finish`] for the rest. Memory: less than `2 * max_bytes` of buffer, whatever
/// the size of the pieces (as long as each push's iterator is drained).
#[derive(Debug)]
pub struct StreamChunker {
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    /// Bytes not yet cut are `buf[start..]`; `buf[..start]` is spent and dropped lazily.
    buf: Vec<u8>,
    start: usize,
    /// Payload offset of `buf[start]`.
    offset: u64,
}

impl StreamChunker {
    /// A chunker for `params`, which must be valid.
    pub fn new(params: ChunkerParams) -> Result<Self, ChunkerParamsError> {
        params.validate()?;
        let (mask_s, mask_l) = v2020::select_masks(params.avg_bytes, NORMALIZATION);
        Ok(StreamChunker {
            params,
            mask_s,
            mask_l,
            buf: Vec::with_capacity(2 * params.max_bytes),
            start: 0,
            offset: 0,
        })
    }

    /// The params this chunker cuts with.
    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Bytes received and not yet returned in a chunk.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Bytes of buffer currently allocated; stays below `2 * max_bytes` when every push's
    /// iterator is drained.
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Adds `data` to the payload and yields every chunk it completes.
    ///
    /// Drain the iterator: chunks are cut while it runs, so the buffer stays bounded. If it is
    /// dropped early, the unread part of `data` is kept (nothing is lost) and cut on the next call.
    pub fn push<'a>(&'a mut self, data: &'a [u8]) -> PushChunks<'a> {
        PushChunks {
            chunker: self,
            input: data,
        }
    }

    /// Ends the payload and yields the remaining chunks (none if nothing is pending).
    pub fn finish(self) -> FinishChunks {
        FinishChunks { chunker: self }
    }

    /// Cuts one chunk if at least `max_bytes` are pending: with that much in view, FastCDC's
    /// decision is the same as on the whole payload, because it never looks past `max_bytes`.
    fn cut_if_full(&mut self) -> Option<Chunk> {
        if self.pending_bytes() >= self.params.max_bytes {
            Some(self.cut_pending())
        } else {
            None
        }
    }

    /// Cuts one chunk from the pending bytes, treating them as the end of the payload if fewer
    /// than `max_bytes` are pending. Must only be called with something pending.
    fn cut_pending(&mut self) -> Chunk {
        let pending = &self.buf[self.start..];
        debug_assert!(!pending.is_empty(), "cut with nothing pending");
        let (_, len) = v2020::cut(
            pending,
            self.params.min_bytes,
            self.params.avg_bytes,
            self.params.max_bytes,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        debug_assert!(len > 0 && len <= self.params.max_bytes.min(pending.len()));
        let chunk = Chunk {
            offset: self.offset,
            data: pending[..len].to_vec(),
        };
        self.start += len;
        self.offset += len as u64;
        chunk
    }

    /// Moves as much of `input` into the buffer as keeps at most `max_bytes` pending; returns how
    /// many bytes it took.
    fn fill(&mut self, input: &[u8]) -> usize {
        // Dropping the spent prefix only once it is at least `max_bytes` long moves each byte at
        // most once more, and keeps the buffer below `2 * max_bytes`.
        if self.start >= self.params.max_bytes {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let room = self.params.max_bytes.saturating_sub(self.pending_bytes());
        let take = room.min(input.len());
        self.buf.extend_from_slice(&input[..take]);
        take
    }
}

/// Chunks completed by one [`StreamChunker::push`].
#[must_use = "chunks are cut while the iterator is drained"]
#[derive(Debug)]
pub struct PushChunks<'a> {
    chunker: &'a mut StreamChunker,
    input: &'a [u8],
}

impl Iterator for PushChunks<'_> {
    type Item = Chunk;

    fn next(&mut self) -> Option<Chunk> {
        loop {
            if let Some(chunk) = self.chunker.cut_if_full() {
                return Some(chunk);
            }
            if self.input.is_empty() {
                return None;
            }
            let taken = self.chunker.fill(self.input);
            self.input = &self.input[taken..];
        }
    }
}

impl Drop for PushChunks<'_> {
    fn drop(&mut self) {
        // Keep what the caller did not let us cut, so the payload stays whole.
        self.chunker.buf.extend_from_slice(self.input);
    }
}

/// The last chunks of a payload, from [`StreamChunker::finish`].
#[derive(Debug)]
pub struct FinishChunks {
    chunker: StreamChunker,
}

impl Iterator for FinishChunks {
    type Item = Chunk;

    fn next(&mut self) -> Option<Chunk> {
        if self.chunker.pending_bytes() == 0 {
            None
        } else {
            Some(self.chunker.cut_pending())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Small bounds so that short inputs have many cuts, including forced ones.
    const SMALL: ChunkerParams = ChunkerParams {
        min_bytes: 64,
        avg_bytes: 256,
        max_bytes: 1024,
    };

    fn whole_input_cuts(params: ChunkerParams, data: &[u8]) -> Vec<(u64, usize)> {
        v2020::FastCDC::new(data, params.min_bytes, params.avg_bytes, params.max_bytes)
            .map(|c| (c.offset as u64, c.length))
            .collect()
    }

    fn streamed_cuts(params: ChunkerParams, data: &[u8], piece_sizes: &[usize]) -> Vec<Chunk> {
        let mut chunker = StreamChunker::new(params).expect("valid params");
        let mut chunks = Vec::new();
        let mut rest = data;
        let mut sizes = piece_sizes.iter().cycle();
        while !rest.is_empty() {
            let n = sizes
                .next()
                .copied()
                .unwrap_or(rest.len())
                .clamp(1, rest.len());
            let (piece, tail) = rest.split_at(n);
            chunks.extend(chunker.push(piece));
            assert!(chunker.buffer_capacity() < 2 * params.max_bytes + 64);
            rest = tail;
        }
        chunks.extend(chunker.finish());
        chunks
    }

    /// Low-entropy data with repeats, so content-defined cuts and forced cuts both occur.
    fn mixed_data(seed: &[u8], len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut state = blake3::Hasher::new();
        state.update(seed);
        let mut reader = state.finalize_xof();
        while out.len() < len {
            let mut block = [0u8; 64];
            reader.fill(&mut block);
            match block[0] % 4 {
                0 => out.extend_from_slice(&[block[1]; 700]),
                _ => out.extend_from_slice(&block),
            }
        }
        out.truncate(len);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn streamed_cuts_equal_whole_input_cuts(
            seed in any::<[u8; 8]>(),
            len in 0usize..20_000,
            pieces in proptest::collection::vec(1usize..3_000, 1..8),
        ) {
            let data = mixed_data(&seed, len);
            let expected = whole_input_cuts(SMALL, &data);
            let chunks = streamed_cuts(SMALL, &data, &pieces);
            let got: Vec<(u64, usize)> = chunks.iter().map(|c| (c.offset, c.data.len())).collect();
            prop_assert_eq!(&got, &expected);
            for chunk in &chunks {
                let start = chunk.offset as usize;
                prop_assert_eq!(&chunk.data[..], &data[start..start + chunk.data.len()]);
            }
        }
    }

    #[test]
    fn default_params_match_fastcdc_on_a_large_input_fed_in_odd_pieces() {
        let params = ChunkerParams::DEFAULT;
        let data = mixed_data(b"large", 24 * 1024 * 1024 + 3);
        let expected = whole_input_cuts(params, &data);
        assert!(
            expected.len() >= 8,
            "expected many chunks, got {}",
            expected.len()
        );
        let got: Vec<(u64, usize)> = streamed_cuts(params, &data, &[1, 65_537, 7_000_001, 511])
            .iter()
            .map(|c| (c.offset, c.data.len()))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn dropping_a_push_early_loses_nothing() {
        let data = mixed_data(b"drop", 10_000);
        let mut chunker = StreamChunker::new(SMALL).expect("valid");
        let mut chunks: Vec<Chunk> = chunker.push(&data).take(1).collect();
        chunks.extend(chunker.push(&[]));
        chunks.extend(chunker.finish());
        let got: Vec<(u64, usize)> = chunks.iter().map(|c| (c.offset, c.data.len())).collect();
        assert_eq!(got, whole_input_cuts(SMALL, &data));
    }

    #[test]
    fn empty_payload_has_no_chunks() {
        let mut chunker = StreamChunker::new(SMALL).expect("valid");
        assert_eq!(chunker.push(&[]).count(), 0);
        assert_eq!(chunker.finish().count(), 0);
    }

    #[test]
    fn invalid_params_are_refused_with_the_field_named() {
        assert!(ChunkerParams::DEFAULT.validate().is_ok());
        let odd = ChunkerParams {
            avg_bytes: 1001,
            ..SMALL
        };
        assert!(matches!(
            odd.validate(),
            Err(ChunkerParamsError::Odd {
                name: "avg_bytes",
                ..
            })
        ));
        let huge = ChunkerParams {
            min_bytes: 64 * 1024,
            avg_bytes: 8 * 1024 * 1024,
            max_bytes: 16 * 1024 * 1024,
        };
        let err = huge.validate().expect_err("avg above FastCDC's range");
        assert!(err.to_string().contains("avg_bytes"), "{err}");
        let unordered = ChunkerParams {
            min_bytes: 2048,
            ..SMALL
        };
        assert!(matches!(
            unordered.validate(),
            Err(ChunkerParamsError::Unordered(_))
        ));
        assert!(StreamChunker::new(unordered).is_err());
    }
}
