//! Property tests of the download planner: random pieces, random sources (reliable, flaky,
//! lying, leaving, late), random event orders, driven to the end in virtual time the way the
//! edge agent drives it (poll after every event, sleep until `next_wakeup` when idle). A model
//! of what the caller knows checks every request the planner makes.

use std::collections::HashSet;
use std::time::Duration;

use proptest::prelude::*;
use proto_core::planner::*;

/// Steps (one event or one sleep each) after which a run counts as not terminating.
const MAX_STEPS: u32 = 20_000;
/// Consecutive wakeups that do not move time forward before a run counts as spinning.
const MAX_WAKEUPS_WITHOUT_PROGRESS: u32 = 2;
/// Virtual time at which runs start: the planner's epoch is arbitrary.
const START: Duration = Duration::from_secs(1_000_000);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// Always delivers; never leaves.
    Reliable,
    /// Fails transiently 40 % of the time.
    Flaky,
    /// Sends bad data 60 % of the time, good data otherwise.
    Liar,
    /// Delivers, then leaves at this step.
    Leaver(u32),
}

#[derive(Clone, Debug)]
struct SourceSpec {
    id: SourceId,
    kind: SourceKind,
    /// `None`: announces every piece with `source_has_all`.
    holds: Option<Vec<bool>>,
    behaviour: Behaviour,
    /// Step at which the source is added (0: before the first poll).
    join_at: u32,
}

impl SourceSpec {
    fn holds(&self, piece: PieceId) -> bool {
        self.holds
            .as_ref()
            .is_none_or(|holds| holds[piece as usize])
    }
}

#[derive(Clone, Debug)]
struct Scenario {
    sizes: Vec<u64>,
    have: Vec<bool>,
    sources: Vec<SourceSpec>,
    config: PlannerConfig,
    planner_seed: u64,
    event_seed: u64,
}

fn behaviour() -> impl Strategy<Value = Behaviour> {
    prop_oneof![
        4 => Just(Behaviour::Reliable),
        2 => Just(Behaviour::Flaky),
        1 => Just(Behaviour::Liar),
        1 => (1u32..300).prop_map(Behaviour::Leaver),
    ]
}

fn join_at() -> impl Strategy<Value = u32> {
    prop_oneof![3 => Just(0u32), 1 => 1u32..100]
}

fn peer(pieces: usize) -> impl Strategy<Value = (Option<Vec<bool>>, Behaviour, u32)> {
    let holds = prop_oneof![
        1 => Just(None),
        6 => (0.05f64..0.95).prop_flat_map(move |p| {
            prop::collection::vec(prop::bool::weighted(p), pieces).prop_map(Some)
        }),
    ];
    (holds, behaviour(), join_at())
}

fn seed(pieces: usize) -> impl Strategy<Value = (Option<Vec<bool>>, Behaviour, u32)> {
    let holds = prop_oneof![
        4 => Just(None),
        1 => prop::collection::vec(prop::bool::weighted(0.7), pieces).prop_map(Some),
    ];
    (holds, behaviour(), join_at())
}

fn config() -> impl Strategy<Value = PlannerConfig> {
    (
        1u32..=4,
        0u32..=2,
        0u32..=2,
        0u64..=3000,
        1u64..=300,
        1u32..=8,
    )
        .prop_map(
            |(in_flight, upstream_in_flight, duplicates, fallback_ms, backoff_ms, failures)| {
                PlannerConfig {
                    max_in_flight_per_source: in_flight,
                    // 0 draws "no separate bound for seeds".
                    max_in_flight_per_upstream: (upstream_in_flight > 0)
                        .then_some(upstream_in_flight),
                    endgame_max_duplicates: duplicates,
                    upstream_fallback_after: Duration::from_millis(fallback_ms),
                    backoff_base: Duration::from_millis(backoff_ms),
                    backoff_max: Duration::from_millis(backoff_ms * 20),
                    max_failures_per_source: failures,
                }
            },
        )
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (1usize..=40)
        .prop_flat_map(|pieces| {
            (
                prop::collection::vec(1u64..=1 << 20, pieces),
                prop_oneof![
                    Just(Vec::new()),
                    prop::collection::vec(prop::bool::weighted(0.2), pieces),
                ],
                prop::collection::vec(peer(pieces), 0..=6),
                prop::collection::vec(seed(pieces), 0..=2),
                config(),
                any::<u64>(),
                any::<u64>(),
            )
        })
        .prop_map(
            |(sizes, have, peers, seeds, config, planner_seed, event_seed)| {
                let kinds = peers
                    .into_iter()
                    .map(|p| (SourceKind::Peer, p))
                    .chain(seeds.into_iter().map(|s| (SourceKind::Upstream, s)));
                let sources = kinds
                    .enumerate()
                    .map(|(i, (kind, (holds, behaviour, join_at)))| SourceSpec {
                        // Sparse ids: the planner must not treat them as indices.
                        id: 1000 + 7 * i as SourceId,
                        kind,
                        holds,
                        behaviour,
                        join_at,
                    })
                    .collect();
                Scenario {
                    sizes,
                    have,
                    sources,
                    config,
                    planner_seed,
                    event_seed,
                }
            },
        )
}

/// xorshift64: the event order, from a seed proptest can shrink.
struct EventRng(u64);

impl EventRng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    /// Nothing in flight and nothing to wait for: the caller gives up.
    Stuck,
}

/// What the caller knows, checked against the planner after every step.
struct Model<'a> {
    scenario: &'a Scenario,
    held: Vec<bool>,
    /// Requests in flight with their start time.
    flights: Vec<(Request, Duration)>,
    joined: HashSet<SourceId>,
    removed: HashSet<SourceId>,
    banned: HashSet<SourceId>,
}

impl<'a> Model<'a> {
    fn new(scenario: &'a Scenario) -> Self {
        let pieces = scenario.sizes.len();
        let held = (0..pieces)
            .map(|i| scenario.have.get(i).copied().unwrap_or(false))
            .collect();
        Model {
            scenario,
            held,
            flights: Vec::new(),
            joined: HashSet::new(),
            removed: HashSet::new(),
            banned: HashSet::new(),
        }
    }

    fn spec(&self, id: SourceId) -> &'a SourceSpec {
        self.scenario
            .sources
            .iter()
            .find(|s| s.id == id)
            .expect("request names a known source")
    }

    fn usable(&self, id: SourceId) -> bool {
        self.joined.contains(&id) && !self.removed.contains(&id) && !self.banned.contains(&id)
    }

    fn flights_for(&self, piece: PieceId) -> usize {
        self.flights
            .iter()
            .filter(|(r, _)| r.piece == piece)
            .count()
    }

    fn flights_at(&self, source: SourceId) -> usize {
        self.flights
            .iter()
            .filter(|(r, _)| r.source == source)
            .count()
    }

    fn missing(&self) -> impl Iterator<Item = PieceId> + '_ {
        (0..self.held.len() as PieceId).filter(|&p| !self.held[p as usize])
    }

    /// Missing pieces that no source the caller still uses holds.
    fn unavailable(&self) -> Vec<PieceId> {
        self.missing()
            .filter(|&p| {
                !self
                    .scenario
                    .sources
                    .iter()
                    .any(|s| self.usable(s.id) && s.holds(p))
            })
            .collect()
    }

    /// Takes the request out of the model; false if it was not in flight.
    fn end(&mut self, request: Request) -> Option<Duration> {
        let at = self.flights.iter().position(|(r, _)| *r == request)?;
        Some(self.flights.swap_remove(at).1)
    }

    /// Properties (1) and (2) for one poll's answer; records the requests.
    fn check_and_record(&mut self, requests: &[Request], now: Duration) {
        let config = &self.scenario.config;
        let mut duplicated = false;
        for &request in requests {
            let spec = self.spec(request.source);
            assert!(
                self.usable(request.source),
                "{request:?} to an unusable source"
            );
            assert!(
                spec.holds(request.piece),
                "{request:?} to a source without the piece"
            );
            assert!(
                !self.held[request.piece as usize],
                "{request:?} for a held piece"
            );
            assert!(
                !self.flights.iter().any(|(r, _)| *r == request),
                "{request:?} already in flight"
            );
            let copies = self.flights_for(request.piece);
            duplicated |= copies > 0;
            assert!(
                copies < 1 + config.endgame_max_duplicates as usize,
                "{request:?}: too many copies in flight"
            );
            assert!(
                self.flights_at(request.source) < config.max_in_flight_per_source as usize,
                "{request:?}: source over its in-flight bound"
            );
            self.flights.push((request, now));
        }
        if duplicated {
            let idle: Vec<PieceId> = self
                .missing()
                .filter(|&p| self.flights_for(p) == 0)
                .collect();
            assert!(
                idle.is_empty(),
                "duplicate outside endgame; idle pieces {idle:?}"
            );
        }
    }
}

/// Adds and announces the sources due at `step`, removes the leavers due at `step`.
fn membership(planner: &mut Planner, model: &mut Model, step: u32) {
    for spec in &model.scenario.sources {
        if spec.join_at == step {
            planner.add_source(spec.id, spec.kind);
            model.joined.insert(spec.id);
            match &spec.holds {
                None => planner.source_has_all(spec.id),
                Some(holds) => {
                    for (piece, _) in holds.iter().enumerate().filter(|(_, &h)| h) {
                        planner.source_has(spec.id, piece as PieceId);
                    }
                }
            }
        }
        if spec.behaviour == Behaviour::Leaver(step) && model.joined.contains(&spec.id) {
            let ended = planner.remove_source(spec.id);
            let expected = model
                .flights
                .iter()
                .filter(|(r, _)| r.source == spec.id)
                .count();
            assert_eq!(
                ended.len(),
                expected,
                "remove_source returns every flight it ends"
            );
            model.removed.insert(spec.id);
            model.flights.retain(|(r, _)| r.source != spec.id);
        }
    }
}

/// Resolves one request in flight the way its source behaves.
fn resolve(planner: &mut Planner, model: &mut Model, rng: &mut EventRng, now: Duration) {
    let at = rng.below(model.flights.len() as u64) as usize;
    let (request, started) = model.flights[at];
    let behaviour = model.spec(request.source).behaviour;
    let roll = rng.below(100);
    let fails = behaviour == Behaviour::Flaky && roll < 40;
    let lies = behaviour == Behaviour::Liar && roll < 60;
    if roll >= 97 && !lies {
        // The caller gives up on a request by itself now and then.
        model.end(request);
        planner.on_cancelled(request.source, request.piece);
    } else if fails {
        model.end(request);
        planner.on_failure(request.source, request.piece, now);
    } else if lies {
        model.end(request);
        let cancel: HashSet<Request> = planner
            .on_bad_data(request.source, request.piece)
            .into_iter()
            .collect();
        let expected: HashSet<Request> = model
            .flights
            .iter()
            .map(|(r, _)| *r)
            .filter(|r| r.source == request.source)
            .collect();
        assert_eq!(
            cancel, expected,
            "bad data returns the liar's other requests"
        );
        model.flights.retain(|(r, _)| r.source != request.source);
        model.banned.insert(request.source);
        assert!(planner.is_banned(request.source));
    } else {
        model.end(request);
        let cancel = planner.on_success(request.source, request.piece, now - started, now);
        model.held[request.piece as usize] = true;
        for other in cancel {
            assert_eq!(other.piece, request.piece, "cancel names another piece");
            assert!(
                model.end(other).is_some(),
                "cancel of {other:?}, not in flight"
            );
            if rng.chance(50) {
                // Harmless: the planner already forgot it.
                planner.on_cancelled(other.source, other.piece);
            }
        }
        assert_eq!(model.flights_for(request.piece), 0);
    }
}

/// Runs a scenario to its end, checking the properties at every step. Returns the outcome and
/// the requests made, in order.
fn run(scenario: &Scenario) -> (Outcome, Vec<Request>) {
    let mut planner = Planner::new(
        scenario.sizes.clone(),
        &scenario.have,
        scenario.config.clone(),
        scenario.planner_seed,
    );
    let mut model = Model::new(scenario);
    let mut rng = EventRng(scenario.event_seed | 1);
    let last_join = scenario
        .sources
        .iter()
        .map(|s| s.join_at)
        .max()
        .unwrap_or(0);
    let mut trace = Vec::new();
    let mut now = START;
    let mut wakeups_without_progress = 0;

    for step in 0..MAX_STEPS {
        membership(&mut planner, &mut model, step);
        let requests = planner.poll(now);
        model.check_and_record(&requests, now);
        trace.extend_from_slice(&requests);

        assert_eq!(planner.in_flight(), model.flights.len());
        assert_eq!(planner.missing(), model.missing().count());
        let unavailable = planner.unavailable_pieces();
        for &piece in &unavailable {
            assert!(
                !model.held[piece as usize],
                "held piece {piece} listed unavailable"
            );
            assert_eq!(
                model.flights_for(piece),
                0,
                "piece {piece} in flight listed unavailable"
            );
        }
        // Property (4), first half: a piece nothing usable holds is named.
        for piece in model.unavailable() {
            assert!(
                unavailable.contains(&piece),
                "piece {piece} unavailable but not listed"
            );
        }
        if planner.is_done() {
            assert!(model.held.iter().all(|&h| h));
            return (Outcome::Done, trace);
        }

        if !model.flights.is_empty() {
            wakeups_without_progress = 0;
            now += if rng.chance(5) {
                Duration::from_millis(rng.below(3000))
            } else {
                Duration::from_millis(rng.below(20))
            };
            resolve(&mut planner, &mut model, &mut rng, now);
            continue;
        }
        match planner.next_wakeup() {
            Some(wakeup) if wakeup > now => {
                wakeups_without_progress = 0;
                now = wakeup;
            }
            Some(_) => {
                wakeups_without_progress += 1;
                assert!(
                    wakeups_without_progress <= MAX_WAKEUPS_WITHOUT_PROGRESS,
                    "next_wakeup is due but polling gives nothing: spinning"
                );
            }
            None if step >= last_join => {
                // Property (4), second half: the caller can tell why it stops.
                assert!(!unavailable.is_empty(), "stuck with nothing unavailable");
                return (Outcome::Stuck, trace);
            }
            None => now += Duration::from_millis(1),
        }
    }
    panic!("no end after {MAX_STEPS} steps");
}

/// Every piece still missing at the start is held by a reliable source (one that never fails,
/// lies or leaves).
fn reliably_available(scenario: &Scenario) -> bool {
    (0..scenario.sizes.len() as PieceId).all(|p| {
        scenario.have.get(p as usize).copied().unwrap_or(false)
            || scenario
                .sources
                .iter()
                .any(|s| s.behaviour == Behaviour::Reliable && s.holds(p))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Properties (1) to (4); see `Model::check_and_record` and `run`.
    #[test]
    fn planner_runs_end_and_keep_their_bounds(scenario in scenario()) {
        let (outcome, _) = run(&scenario);
        if reliably_available(&scenario) {
            // Property (3).
            prop_assert_eq!(outcome, Outcome::Done);
        }
    }

    /// Same seeds and events, same requests.
    #[test]
    fn planner_is_deterministic(scenario in scenario()) {
        let (first_outcome, first) = run(&scenario);
        let (second_outcome, second) = run(&scenario);
        prop_assert_eq!(first_outcome, second_outcome);
        prop_assert_eq!(first, second);
    }
}
