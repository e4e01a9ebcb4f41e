//! Crash consistency: a child process downloads a blob into the store through the partial writer
//! and is killed with SIGKILL at random moments of its write, 50 times. After each kill the store
//! must reopen, every group it calls verified must hold the original bytes (and be servable, so
//! the tree entries above it are on disk too), a resumed writer must start from those plus the
//! groups recorded before their sync that re-verify (and each of those must hold the original
//! bytes too), and the resumed download must complete with the right hash.
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
/// Tells the child to stop (exit without running any destructor, as a crash would) once half
/// of the blob is written.
const CHILD_HALF_ENV: &str = "STAGECOACH_CRASH_CHILD_HALF";
/// Size of the blob the child writes.
const BLOB_BYTES: usize = 8 * 1024 * 1024 + 12_345;
/// Seed of the blob's contents.
const DATA_SEED: u64 = 0x5eed;
/// Record progress often so kills land between index writes too.
const CHILD_COMMIT_BATCH_BYTES: u64 = 256 * 1024;
/// Sync every 1 MiB, so a kill finds both synced and unsynced progress records.
const CHILD_SYNC_BATCH_BYTES: u64 = 1024 * 1024;
/// The child creates this file in the store directory once its writer is open: the write phase
/// starts there.
const STARTED_MARKER: &str = "writer-started";
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
            sync_batch_bytes: CHILD_SYNC_BATCH_BYTES,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let mut writer = store.begin_or_resume(outboard.hash, size).unwrap();
    std::fs::write(dir.join(STARTED_MARKER), b"").unwrap();
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
        if std::env::var_os(CHILD_HALF_ENV).is_some()
            && writer.missing().count(size) * 2 < size / GROUP_BYTES
        {
            // No destructor runs: nothing is committed or synced beyond what already was.
            std::process::exit(0);
        }
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
    child_command(dir, seed).spawn().unwrap()
}

fn child_command(dir: &Path, seed: u64) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
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
        .stderr(Stdio::inherit());
    command
}

/// What a kill left behind.
#[derive(Debug, Default)]
struct Outcomes {
    missing: u64,
    partial_empty: u64,
    partial_mid_write: u64,
    complete: u64,
    verified_groups_checked: u64,
    /// Trials where the resumed writer re-verified groups recorded before their sync.
    resumed_with_unsynced: u64,
    unsynced_groups_checked: u64,
}

/// Waits until the child has opened its writer; `false` if it exited first.
fn wait_started(dir: &Path, child: &mut std::process::Child) -> bool {
    let marker = dir.join(STARTED_MARKER);
    loop {
        if marker.exists() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return marker.exists();
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Checks that every group in `groups` holds the original bytes.
fn check_groups(store: &Store, data: &[u8], hash: BlobHash, groups: &GroupRanges) -> u64 {
    let size = data.len() as u64;
    let mut checked = 0;
    for group in groups.iter_groups(size) {
        let start = group * GROUP_BYTES;
        let end = (start + GROUP_BYTES).min(size);
        let on_disk = store.read_range(&hash, start..end).unwrap().unwrap();
        assert!(
            on_disk == data[start as usize..end as usize],
            "group {group} is claimed as verified but holds wrong bytes"
        );
        checked += 1;
    }
    checked
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
            outcomes.verified_groups_checked += check_groups(store, data, hash, &verified);
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
    let mut child = spawn_child(calibration.path(), 0);
    assert!(
        wait_started(calibration.path(), &mut child),
        "the writer child never opened its writer"
    );
    let started = Instant::now();
    let status = child.wait().unwrap();
    let full_run = started.elapsed();
    // Kills are spread over this window; it shrinks when a child finished before its kill (the
    // machine got faster than during calibration) so most kills still land mid-write.
    let mut window = full_run;
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
        wait_started(dir.path(), &mut child);
        let delay_micros = rng.next() % (window.as_micros() as u64).max(1);
        std::thread::sleep(Duration::from_micros(delay_micros));
        child.kill().unwrap();
        child.wait().unwrap();

        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let complete_before = outcomes.complete;
        check_after_kill(&store, &data, hash, &mut outcomes);
        if outcomes.complete > complete_before {
            window = window.mul_f64(0.7);
        }

        // Resume and complete from wherever the kill left it.
        let synced = match store.blob_status(&hash).unwrap() {
            BlobStatus::Partial { verified, .. } => verified,
            _ => GroupRanges::empty(),
        };
        let mut writer = store.begin_or_resume(hash, data.len() as u64).unwrap();
        let resumed_from = writer.verified();
        assert!(
            resumed_from.is_superset(&synced),
            "trial {trial}: the resumed writer dropped synced groups"
        );
        let reverified = resumed_from.difference(&synced);
        if !reverified.is_empty() {
            outcomes.resumed_with_unsynced += 1;
            outcomes.unsynced_groups_checked += check_groups(&store, &data, hash, &reverified);
        }
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
    assert!(
        outcomes.resumed_with_unsynced > 0,
        "no kill left groups recorded before their sync, so re-verification went untested: {outcomes:?}"
    );
}

/// A power loss can drop written bytes whose progress record made it to the index before their
/// sync. The resumed writer must not trust them: the child stops halfway without syncing, the
/// test wipes every byte on disk that no synced record covers (what a lost page cache leaves),
/// and the resumed writer must start from the synced groups only, then complete correctly.
#[test]
fn unsynced_groups_lost_by_the_disk_are_fetched_again() {
    let data = blob(BLOB_BYTES, DATA_SEED);
    let hash = BlobHash::of(&data);
    let size = data.len() as u64;
    let dir = tempfile::tempdir().unwrap();
    let status = child_command(dir.path(), 7)
        .env(CHILD_HALF_ENV, "1")
        .status()
        .unwrap();
    assert!(status.success(), "the writer child failed: {status}");

    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let BlobStatus::Partial {
        verified: synced, ..
    } = store.blob_status(&hash).unwrap()
    else {
        panic!("the child should have left a partial blob");
    };
    drop(store);
    // On a copy (a resumed writer commits when dropped): without a power loss, the resumed
    // writer keeps the unsynced groups too.
    let copy = tempfile::tempdir().unwrap();
    copy_tree(dir.path(), copy.path());
    let written_before_wipe = {
        let store = Store::open(copy.path(), StoreOptions::default()).unwrap();
        let writer = store.begin_or_resume(hash, size).unwrap();
        writer.verified()
    };
    assert!(
        written_before_wipe.is_superset(&synced)
            && written_before_wipe.count(size) > synced.count(size),
        "the child left no unsynced groups (synced {synced}, written {written_before_wipe})"
    );

    // Lose the page cache: zero every group that is not synced.
    let data_file = find_data_file(dir.path(), size);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&data_file)
        .unwrap();
    let zeros = vec![0u8; GROUP_BYTES as usize];
    for group in GroupRanges::all()
        .clamped(size)
        .difference(&synced)
        .iter_groups(size)
    {
        let start = group * GROUP_BYTES;
        let len = (GROUP_BYTES.min(size - start)) as usize;
        std::os::unix::fs::FileExt::write_all_at(&file, &zeros[..len], start).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);

    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let mut writer = store.begin_or_resume(hash, size).unwrap();
    assert_eq!(
        writer.verified(),
        synced,
        "the resumed writer trusted groups whose bytes were lost"
    );
    let missing = writer.missing();
    let outboard = compute_outboard(&data);
    let mut stream = Vec::new();
    encode_ranges(&data, &outboard.data, hash, &missing, &mut stream).unwrap();
    writer.write_stream(&stream[..], missing).unwrap();
    writer.finish().unwrap();
    assert_eq!(store.get_blob(&hash).unwrap().as_deref(), Some(&data[..]));
}

/// The one blob data file of `size` bytes under the store's blob directory.
fn find_data_file(root: &Path, size: u64) -> std::path::PathBuf {
    let mut found = Vec::new();
    let mut dirs = vec![root.join("blobs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if std::fs::metadata(&path).unwrap().len() == size {
                found.push(path);
            }
        }
    }
    assert_eq!(
        found.len(),
        1,
        "expected one data file of {size} bytes: {found:?}"
    );
    found.remove(0)
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
