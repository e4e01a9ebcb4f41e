//! Download planner decisions per second: a whole plan (poll + on_success until done) for
//! 10,000 pieces and 100 peers each holding a random half, plus one seed holding everything.
//! Target: well over 100k decisions/s on one core.
//!
//! `cargo bench --release -p benches --bench planner -- --warm-up-time 1 --measurement-time 3`

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use proto::planner::{Planner, PlannerConfig, SourceId, SourceKind};

/// Pieces in the plan.
const PIECES: u32 = 10_000;
/// Peers, each holding a random half of the pieces.
const PEERS: u32 = 100;
/// The upstream's source id (peers are `0..PEERS`).
const UPSTREAM_ID: SourceId = PEERS;
/// Bytes per piece (the edge's default run of 16 KiB groups).
const PIECE_BYTES: u64 = 256 * 1024;
/// Virtual time between two completions: 400 requests in flight over ~40 ms each.
const COMPLETION_INTERVAL: Duration = Duration::from_micros(100);
/// Samples per measurement (criterion's minimum): one plan takes tens of milliseconds.
const SAMPLES: usize = 10;

/// A planner with every source added and announced (not measured).
fn site() -> Planner {
    let mut planner = Planner::new(
        vec![PIECE_BYTES; PIECES as usize],
        &[],
        PlannerConfig::default(),
        0x5eed,
    );
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for peer in 0..PEERS {
        planner.add_source(peer, SourceKind::Peer);
        for piece in 0..PIECES {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if state & 1 == 1 {
                planner.source_has(peer, piece);
            }
        }
    }
    planner.add_source(UPSTREAM_ID, SourceKind::Upstream);
    planner.source_has_all(UPSTREAM_ID);
    planner
}

/// Runs the plan to the end, completing requests in the order they were made, each taking
/// 20–65 ms depending on its source. Returns the number of decisions (requests made).
fn plan(planner: &mut Planner) -> u64 {
    let mut now = Duration::ZERO;
    let mut flights = VecDeque::new();
    let mut decisions = 0u64;
    loop {
        let requests = planner.poll(now);
        decisions += requests.len() as u64;
        flights.extend(requests);
        let Some(request) = flights.pop_front() else {
            break;
        };
        now += COMPLETION_INTERVAL;
        let elapsed = Duration::from_millis(20 + 5 * u64::from(request.source % 10));
        for cancelled in planner.on_success(request.source, request.piece, elapsed, now) {
            flights.retain(|r| *r != cancelled);
        }
    }
    assert!(planner.is_done(), "bench plan finishes");
    decisions
}

fn planner(c: &mut Criterion) {
    let decisions = plan(&mut site());
    let mut group = c.benchmark_group("planner_10k_pieces_100_peers");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(SAMPLES);
    group.throughput(Throughput::Elements(decisions));
    group.bench_function("full_plan", |b| {
        b.iter_batched(
            site,
            |mut p| black_box(plan(&mut p)),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, planner);
criterion_main!(benches);
