//! Retention with real processes on loopback: a stager with a small `--cache-gib` follows 20
//! versions of a bundle (each a small edit of the one before). Its store stays within the bound
//! after every version, the newest version (its site's keep-set) stays whole, and a version it
//! evicted is fetched again correctly through it.

use std::path::Path;
use std::time::{Duration, Instant};

use netsim::datagen;
use netsim::procs::{metric_sum, Binaries};
use netsim::testbed::Testbed;

const MIB: u64 = 1024 * 1024;

/// The stager's `--cache-gib`: about 6.3 MiB, room for two versions of a 3 MiB bundle.
const CACHE_GIB: &str = "0.006";

/// Versions published.
const VERSIONS: usize = 20;

fn bins() -> Binaries {
    Binaries::beside_current_exe().expect("build the binaries: cargo build --release --bins")
}

/// Bytes of the blob files (data and outboards) of the store in `store_dir`.
fn blob_file_bytes(store_dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(dirs) = std::fs::read_dir(store_dir.join("blobs")) else {
        return 0;
    };
    for dir in dirs.flatten() {
        let Ok(files) = std::fs::read_dir(dir.path()) else {
            continue;
        };
        for file in files.flatten() {
            total += file.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stager_with_a_small_cache_follows_twenty_versions_within_its_bound() {
    let limit_bytes = proto::retention::parse_cache_gib(CACHE_GIB).expect("limit");
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    let files = datagen::generate_tree(&tree, 3 * MIB, 31).expect("tree");
    let mut mesh = Testbed::start(
        bins(),
        work.path(),
        1,
        1,
        &["--cache-gib".to_owned(), CACHE_GIB.to_owned()],
    )
    .await
    .expect("mesh");
    let stager = mesh.stagers[0].clone();
    let store_dir = stager.dir.join("store");

    let mut ids = Vec::new();
    for version in 0..VERSIONS {
        if version > 0 {
            datagen::mutate_tree(&tree, &files, 0.1, 1, 100 + version as u64).expect("mutate");
        }
        let id = mesh
            .publish(&tree, "os", &format!("1.{version}"))
            .await
            .expect("publish");
        ids.push(id);
        mesh.wait_preheated("site-a", Duration::from_secs(120))
            .await
            .expect("preheat");
        // The kept set (the newest version, and the one before until the keep-set moves) is
        // below the bound here, so the whole store must be: outboards add under 1%.
        let on_disk = blob_file_bytes(&store_dir);
        println!("version {version}: stager store {on_disk} bytes on disk (limit {limit_bytes})");
        assert!(
            on_disk <= limit_bytes * 101 / 100,
            "after version {version} the stager's store holds {on_disk} bytes, over its limit of {limit_bytes}"
        );
    }

    // The stager evicted old versions (their chunks no longer fit) and says so.
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = mesh.stager_metrics(&stager.name).await.expect("metrics");
        if metric_sum(&text, "stagecoach_store_evicted_bundles_total", &[]) > 0 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the stager never evicted a bundle:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        metric_sum(&text, "stagecoach_store_limit_bytes", &[]),
        limit_bytes
    );
    assert!(metric_sum(&text, "stagecoach_store_bytes", &[]) <= limit_bytes);

    // The newest version is kept whole: an edge gets it without the stager fetching a byte
    // from the origin.
    let edges = mesh.edges.clone();
    let wan_before = mesh.wan_bytes("site-a").await.expect("wan");
    let newest = mesh
        .fetch_all(&edges, &ids[VERSIONS - 1])
        .await
        .expect("fetch");
    assert!(
        newest.iter().all(|f| f.ok),
        "fetching the newest version failed"
    );
    let wan_after_newest = mesh.wan_bytes("site-a").await.expect("wan");
    assert_eq!(
        wan_after_newest, wan_before,
        "the kept newest version was not whole at the stager"
    );

    // An evicted version is fetched again (the stager pulls what it evicted), verified group by
    // group against its signed manifest.
    let old = mesh.fetch_all(&edges, &ids[2]).await.expect("fetch");
    for f in &old {
        assert!(
            f.ok,
            "fetching an evicted version failed: {}",
            std::fs::read_to_string(&f.log).unwrap_or_default()
        );
    }
    let wan_after_old = mesh.wan_bytes("site-a").await.expect("wan");
    assert!(
        wan_after_old > wan_after_newest,
        "version 1.2 should have been evicted from the stager, yet it pulled nothing"
    );
    let on_disk = blob_file_bytes(&store_dir);
    assert!(
        on_disk <= limit_bytes * 101 / 100,
        "after the refetch the stager's store holds {on_disk} bytes, over {limit_bytes}"
    );
    mesh.shutdown().await;
}
