//! Crash consistency: a child process downloads a blob into the store through the partial writer
//! and is killed with SIGKILL at random moments, 50 times. After each kill the store must reopen,
//! every group it calls verified must hold the original bytes (and be servable, so the tree
//! entries above it are on disk too), and a resumed download must complete with the right hash.
//!
//! The child is this test binary itself, re-executed with an environment variable that makes the
//! ignored test `crash_child_writer` do the writing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proto::store::{BlobStatus, Store, StoreOptions};
use proto::verify::{self, compute_outboard, encode_ranges, GroupRanges, GROUP_BYTES};
use proto::BlobHash;

/// Tells the re-executed binary to act as the writer child, in this store directory.
const CHILD_DIR_ENV: &str = "STAGECOACH_CRASH_CHILD_DIR";
/// Seed for the child's choice of which groups to fetch in which order.
const CHILD_SEED_ENV: &str = "STAGECOACH_CRASH_CHILD_SEED";
/// Size of the blob the child writes.
const BLOB_BYTES: usize = 8 * 1024 * 1024 + 12_345;
/// Seed of the blob's contents.
const DATA_SEED: u64 = 0x5eed;
/// Commit often so kills land between fsyncs and index writes too.
const CHILD_COMMIT_BATCH_BYTES: u64 = 256 * 1024;
/// Number of kills.
const TRIALS: u64 = 50;
/// Trials that must catch the child with some but not all groups verified, or the test proves
/// nothing.
const MIN_MID_WRITE_TRIALS: u64 = 10;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(2).wrapping_add(1));
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let take = (len - out.len()).min(8);
        out.extend_from_slice(&rng.next().to_le_bytes()[..take]);
    }
    out
}

/// Downloads the blob into the store at `dir` in random order of small runs, as a real download
/// from several sources would.
fn write_blob(dir: &Path, seed: u64) {
    let data = blob(BLOB_BYTES, DATA_SEED);
    let outboard = compute_outboard(&data);
    let size = data.len() as u64;
    let store = Store::open(
        dir,
        StoreOptions {
            commit_batch_bytes: CHILD_COMMIT_BATCH_BYTES,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let mut writer = store.begin_or_resume(outboard.hash, size).unwrap();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    loop {
        let missing = writer.missing();
        let groups: Vec<u64> = missing.iter_groups(size).collect();
        if groups.is_empty() {
            break;
        }
        let start = groups[(rng.next() % groups.len() as u64) as usize];
        let run = 1 + rng.next() % 16;
        let ranges = GroupRanges::groups(start..start + run).intersection(&missing);
        let mut stream = Vec::new();
        encode_ranges(&data, &outboard.data, outboard.hash, &ranges, &mut stream).unwrap();
        writer.write_stream(&stream[..], ranges).unwrap();
        if rng.next().is_multiple_of(7) {
            writer.commit().unwrap();
        }
    }
    writer.finish().unwrap();
}

#[test]
#[ignore = "child process of crash_consistency_under_sigkill; does nothing unless started by it"]
fn crash_child_writer() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let seed = std::env::var(CHILD_SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    write_blob(Path::new(&dir), seed);
}

fn spawn_child(dir: &Path, seed: u64) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_writer",
            "--exact",
            "--ignored",
            "--test-threads=1",
            "--quiet",
        ])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_SEED_ENV, seed.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// What a kill left behind.
#[derive(Debug, Default)]
struct Outcomes {
    missing: u64,
    partial_empty: u64,
    partial_mid_write: u64,
    complete: u64,
    verified_groups_checked: u64,
}

/// Checks every claim the reopened store makes against the original bytes.
fn check_after_kill(store: &Store, data: &[u8], hash: BlobHash, outcomes: &mut Outcomes) {
    let size = data.len() as u64;
    match store.blob_status(&hash).unwrap() {
        BlobStatus::Missing => outcomes.missing += 1,
        BlobStatus::Complete { size: recorded } => {
            assert_eq!(recorded, size);
            assert_eq!(store.get_blob(&hash).unwrap().as_deref(), Some(data));
            outcomes.complete += 1;
        }
        BlobStatus::Partial {
            size: recorded,
            verified,
        } => {
            assert_eq!(recorded, size);
            for group in verified.iter_groups(size) {
                let start = group * GROUP_BYTES;
                let end = (start + GROUP_BYTES).min(size);
                let on_disk = store.read_range(&hash, start..end).unwrap().unwrap();
                assert!(
                    on_disk == data[start as usize..end as usize],
                    "group {group} is recorded as verified but holds wrong bytes"
                );
                outcomes.verified_groups_checked += 1;
            }
            // The tree entries above every verified group are on disk: the store can serve them
            // and a verifying client accepts them.
            let mut stream = Vec::new();
            let served = store.encode_ranges(&hash, &verified, &mut stream).unwrap();
            assert_eq!(served, verified);
            verify::decode_from_reader(&stream[..], hash, served, |_| {}).unwrap();
            if verified.is_empty() {
                outcomes.partial_empty += 1;
            } else {
                outcomes.partial_mid_write += 1;
            }
        }
    }
}

#[test]
fn crash_consistency_under_sigkill() {
    let data = blob(BLOB_BYTES, DATA_SEED);
    let hash = BlobHash::of(&data);

    // How long an uninterrupted child takes, so kills can be spread over its whole run.
    let calibration = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let status = spawn_child(calibration.path(), 0).wait().unwrap();
    let full_run = started.elapsed();
    assert!(
        status.success(),
        "the writer child failed on its own: {status}"
    );
    let store = Store::open(calibration.path(), StoreOptions::default()).unwrap();
    assert_eq!(store.get_blob(&hash).unwrap().as_deref(), Some(&data[..]));
    drop(store);

    let mut rng = Rng(0xc0ffee);
    let mut outcomes = Outcomes::default();
    for trial in 1..=TRIALS {
        let dir = tempfile::tempdir().unwrap();
        let mut child = spawn_child(dir.path(), trial);
        let delay_micros = rng.next() % (full_run.as_micros() as u64).max(1);
        std::thread::sleep(Duration::from_micros(delay_micros));
        child.kill().unwrap();
        child.wait().unwrap();

        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        check_after_kill(&store, &data, hash, &mut outcomes);

        // Resume and complete from wherever the kill left it.
        let mut writer = store.begin_or_resume(hash, data.len() as u64).unwrap();
        let missing = writer.missing();
        if !missing.is_empty() {
            let outboard = compute_outboard(&data);
            let mut stream = Vec::new();
            encode_ranges(&data, &outboard.data, hash, &missing, &mut stream).unwrap();
            writer.write_stream(&stream[..], missing).unwrap();
        }
        writer.finish().unwrap();
        let whole = store.get_blob(&hash).unwrap().unwrap();
        assert_eq!(BlobHash::of(&whole), hash, "trial {trial}");
    }
    eprintln!("crash trials: {TRIALS} kills over a {full_run:?} write: {outcomes:?}");
    assert!(
        outcomes.partial_mid_write >= MIN_MID_WRITE_TRIALS,
        "too few kills landed mid-write to test anything: {outcomes:?}"
    );
}
