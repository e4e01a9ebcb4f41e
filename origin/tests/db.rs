//! The control plane's store, on both backends: the embedded RocksDB and a real 3-member etcd
//! cluster on loopback (Debian's etcd-server; skipped, counted, where it is missing). Every
//! record kind survives a reopen, every change is written with its audit record in one atomic
//! write, a corrupt value is a clear error naming its key; on etcd, two origins changing the
//! same record lose no update, a cluster without quorum refuses changes with a clear error and
//! recovers by itself, and `origin store copy` moves every record into etcd and back.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use origin::db::{
    plan, AccountRecord, AccountRole, Audit, Commit, Db, DbError, NodeRecord, NodeState,
    PackageRecord, PolicyDoc, PrepareNode, PrepareRecord, PrepareState, Put, StoreConfig, ACCOUNTS,
    AUDIT, NODES, PACKAGES, PREPARES,
};
use origin::policy::{self, BundleRef, Matcher, MatcherKind, Requirement, Resolution, Rule};
use proto::inventory::{Inventory, Nic};
use proto::wire::{NodeBundle, ReportEvent};
use proto::BlobHash;
use stagecoach_testing::etcd::{self, EtcdCluster};

fn node(id: &str) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        site: "site-a".into(),
        inventory: Inventory {
            cpu_model: Some("Xeon".into()),
            cpu_count: Some(16),
            model: Some("R640".into()),
            role: Some("web".into()),
            address: Some("10.1.2.3".parse().expect("ip")),
            nics: vec![Nic {
                name: "eth0".into(),
                mac: "52:54:00:00:00:01".into(),
            }],
            ..Inventory::default()
        },
        installed: vec![NodeBundle {
            name: "os".into(),
            version: "1".into(),
            id: BlobHash::of(b"os1"),
        }],
        held: Vec::new(),
        desired: vec![NodeBundle {
            name: "os".into(),
            version: "2".into(),
            id: BlobHash::of(b"os2"),
        }],
        state: NodeState::Updating,
        state_detail: String::new(),
        data_addr: "127.0.0.1:7420".into(),
        first_seen_ms: 1,
        last_seen_ms: 2,
        last_event: ReportEvent::Started,
        reports: 3,
    }
}

fn package(name: &str, version: &str, depends: &[&str]) -> PackageRecord {
    PackageRecord {
        name: name.into(),
        version: version.into(),
        id: BlobHash::of(format!("{name}@{version}").as_bytes()),
        kind: "package".into(),
        depends: depends
            .iter()
            .map(|d| d.parse::<Requirement>().expect("requirement"))
            .collect(),
        stored_bytes: 1000,
        raw_bytes: 2000,
        seq: 1,
        published_ms: 5,
        encrypted: false,
        key_generation: None,
    }
}

fn policy_doc() -> PolicyDoc {
    PolicyDoc {
        rules: vec![Rule {
            id: "web".into(),
            matcher: Matcher::Role("web".into()),
            bundles: vec![BundleRef::new("app", "1")],
        }],
        precedence: vec![MatcherKind::NodeOverride, MatcherKind::Role],
        features: BTreeMap::from([(
            "monitoring".to_owned(),
            vec!["agent>=1".parse::<Requirement>().expect("req")],
        )]),
        source: "policy.toml".into(),
        capture: None,
        encryption: Default::default(),
    }
}

/// A store under test, which can be opened again (a new connection, or a reopen).
enum TestStore {
    Rocks(tempfile::TempDir),
    Etcd(EtcdCluster, StoreConfig),
}

impl TestStore {
    fn name(&self) -> &'static str {
        match self {
            TestStore::Rocks(_) => "rocksdb",
            TestStore::Etcd(..) => "etcd",
        }
    }

    fn open(&self) -> Db {
        let config = match self {
            TestStore::Rocks(dir) => StoreConfig::Rocks(dir.path().to_owned()),
            TestStore::Etcd(_, config) => config.clone(),
        };
        Db::open_store(&config).unwrap_or_else(|e| panic!("open {}: {e}", self.name()))
    }
}

fn rocks_store() -> TestStore {
    TestStore::Rocks(tempfile::tempdir().expect("tempdir"))
}

/// A 3-member etcd cluster and the store on it, or `None` (reported as a skip) without etcd.
fn etcd_store(test: &str) -> Option<TestStore> {
    if !stagecoach_testing::can_run(test, &[etcd::available()]) {
        return None;
    }
    let cluster = EtcdCluster::start(3).expect("start a 3-member etcd cluster");
    let config = StoreConfig::parse(&cluster.store_url("test"), Path::new("/nonexistent"))
        .expect("store url");
    Some(TestStore::Etcd(cluster, config))
}

/// The embedded store and, where etcd is installed, one on a fresh etcd cluster.
fn both_stores(test: &str) -> Vec<TestStore> {
    let mut stores = vec![rocks_store()];
    stores.extend(etcd_store(&format!("{test} (etcd)")));
    stores
}

fn audit(action: &str) -> Option<Audit> {
    Some(Audit::new("alice", "origin", action, "details"))
}

#[test]
fn every_record_kind_survives_a_reopen() {
    for store in both_stores("every_record_kind_survives_a_reopen") {
        every_record_kind_survives_a_reopen_on(&store);
    }
}

fn every_record_kind_survives_a_reopen_on(store: &TestStore) {
    {
        let db = store.open();
        db.commit(&[Put::Node(Box::new(node("n1")))], audit("node"))
            .expect("node");
        db.commit(
            &[
                Put::Package(Box::new(package("app", "1", &["lib"]))),
                Put::Package(Box::new(package("lib", "2", &[]))),
            ],
            audit("packages"),
        )
        .expect("packages");
        db.commit(
            &[Put::Class {
                node: "n1".into(),
                class: Some("canary".into()),
            }],
            audit("class"),
        )
        .expect("class");
        db.commit(
            &[Put::Overrides {
                node: "n1".into(),
                bundles: vec![BundleRef::new("lib", "2")],
            }],
            audit("override"),
        )
        .expect("override");
        db.commit(&[Put::Policy(Box::new(policy_doc()))], audit("policy"))
            .expect("policy");
    }
    let db = store.open();
    assert_eq!(db.node("n1").expect("read"), Some(node("n1")));
    assert_eq!(db.nodes().expect("nodes"), vec![node("n1")]);
    assert_eq!(
        db.package("app", "1").expect("read"),
        Some(package("app", "1", &["lib"]))
    );
    assert_eq!(db.packages().expect("packages").len(), 2);
    assert_eq!(db.classes().expect("classes")["n1"], "canary");
    assert_eq!(
        db.overrides().expect("overrides")["n1"],
        vec![BundleRef::new("lib", "2")]
    );
    assert_eq!(db.policy().expect("policy"), policy_doc());
    let log = db.audit(100).expect("audit");
    let actions: Vec<&str> = log.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(actions, ["node", "packages", "class", "override", "policy"]);
    assert_eq!(
        log.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    // Sequence numbers continue after a reopen, and a limit returns the newest.
    db.commit(&[], audit("later")).expect("later");
    let newest = db.audit(2).expect("audit");
    assert_eq!(newest[0].action, "policy");
    assert_eq!(newest[1].action, "later");
    assert_eq!(newest[1].seq, 6);

    // Overrides become node-override rules; packages come from the table.
    let store = db.policy_store().expect("store");
    assert!(store
        .rules
        .iter()
        .any(|r| r.matcher == Matcher::NodeOverride("n1".into())));
    let resolution = policy::resolve(&store, "n1", &node("n1").inventory).expect("resolve");
    let Resolution::Resolved { level, bundles, .. } = resolution else {
        panic!("expected bundles");
    };
    assert_eq!(level, Some(MatcherKind::NodeOverride));
    assert_eq!(bundles[0].bundle, BundleRef::new("lib", "2"));
    // Clearing removes the class and the overrides.
    db.commit(
        &[
            Put::Class {
                node: "n1".into(),
                class: None,
            },
            Put::Overrides {
                node: "n1".into(),
                bundles: Vec::new(),
            },
        ],
        audit("clear"),
    )
    .expect("clear");
    assert!(db.classes().expect("classes").is_empty());
    assert!(db.overrides().expect("overrides").is_empty());
}

#[test]
fn the_audit_record_is_in_the_same_batch_as_its_change() {
    let puts = [
        Put::Node(Box::new(node("n1"))),
        Put::Class {
            node: "n1".into(),
            class: Some("c".into()),
        },
    ];
    let (writes, record) = plan(&puts, audit("two"), 7, 42).expect("plan");
    assert_eq!(writes.len(), puts.len(), "one write per put");
    let record = record.expect("record");
    assert_eq!((record.seq, record.at_ms), (7, 42));
    assert_eq!(record.actor, "alice");
    for store in both_stores("the_audit_record_is_in_the_same_batch_as_its_change") {
        let db = store.open();
        // A commit shows both or neither; without an audit, no record is written.
        let written = db
            .commit(&puts, audit("two"))
            .expect("commit")
            .expect("record");
        assert_eq!(written.seq, 1, "{}", store.name());
        assert!(db.node("n1").expect("read").is_some());
        assert_eq!(db.audit(10).expect("audit"), vec![written]);
        assert!(db.commit(&puts, None).expect("quiet").is_none());
        assert_eq!(db.audit(10).expect("audit").len(), 1);
    }
}

#[test]
fn a_corrupt_value_is_an_error_naming_its_key() {
    for store in both_stores("a_corrupt_value_is_an_error_naming_its_key") {
        a_corrupt_value_is_an_error_naming_its_key_on(&store);
    }
}

fn a_corrupt_value_is_an_error_naming_its_key_on(store: &TestStore) {
    let db = store.open();
    db.put_raw(NODES, b"node-x", b"\x01{not json").expect("raw");
    let error = db.node("node-x").expect_err("corrupt");
    assert!(matches!(error, DbError::Corrupt { .. }), "{error:?}");
    let text = error.to_string();
    assert!(text.contains("nodes") && text.contains("node-x"), "{text}");
    assert!(db.nodes().is_err(), "listing must not skip or panic");

    db.put_raw(PACKAGES, b"app\0" as &[u8], b"\x09{}")
        .expect("raw");
    assert_eq!(
        db.package("app", "1")
            .expect("a different key is not affected"),
        None
    );
    let text = db.packages().expect_err("format").to_string();
    assert!(text.contains("format 9") && text.contains("app@"), "{text}");

    db.put_raw(AUDIT, &1u64.to_be_bytes(), b"").expect("raw");
    let text = db.audit(5).expect_err("empty").to_string();
    assert!(text.contains("audit") && text.contains("`1`"), "{text}");
    drop(db);
    // Reopening works: the corrupt values are reported, not fatal.
    let db = store.open();
    assert!(db.node("node-x").is_err());
}

#[test]
fn a_second_process_gets_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = Db::open(dir.path()).expect("open");
    let error = Db::open(dir.path()).err().expect("locked").to_string();
    assert!(error.contains("origin serve"), "{error}");
}

fn prepare_record(id: u64, state: PrepareState, attempts: u32) -> PrepareRecord {
    let node = PrepareNode {
        site: "a".into(),
        state,
        detail: String::new(),
        attempts,
        bytes_received: 0,
        updated_ms: 1,
    };
    PrepareRecord {
        id,
        bundle: NodeBundle {
            name: "os".into(),
            version: "2".into(),
            id: BlobHash::of(b"os@2"),
        },
        stored_bytes: 1 << 20,
        selector: "all".into(),
        actor: "alice".into(),
        created_ms: 1,
        nodes: [("n1".to_owned(), node)].into_iter().collect(),
        cancelled: None,
    }
}

#[test]
fn prepare_operations_survive_a_reopen_newest_first_with_their_audit() {
    for store in both_stores("prepare_operations_survive_a_reopen_newest_first_with_their_audit") {
        prepare_operations_survive_a_reopen_on(&store);
    }
}

fn prepare_operations_survive_a_reopen_on(store: &TestStore) {
    {
        let db = store.open();
        for id in 1..=3 {
            db.commit(
                &[Put::Prepare(Box::new(prepare_record(
                    id,
                    PrepareState::Pending,
                    0,
                )))],
                audit("prepare.start"),
            )
            .expect("prepare");
        }
        db.commit(
            &[Put::Prepare(Box::new(prepare_record(
                2,
                PrepareState::Prepared,
                1,
            )))],
            audit("prepare.node"),
        )
        .expect("update");
    }
    let db = store.open();
    assert_eq!(
        db.prepare(2).expect("read"),
        Some(prepare_record(2, PrepareState::Prepared, 1))
    );
    assert_eq!(db.prepare(9).expect("read"), None);
    let ids: Vec<u64> = db.prepares(2).expect("list").iter().map(|p| p.id).collect();
    assert_eq!(ids, [3, 2], "newest first, bounded");
    let all: Vec<u64> = db
        .all_prepares()
        .expect("all")
        .iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(all, [1, 2, 3]);
    assert_eq!(db.audit(10).expect("audit").len(), 4);
    // Settled: nothing waits for an answer (an offline node counts once it was tried).
    assert!(!prepare_record(1, PrepareState::Pending, 0).settled());
    assert!(prepare_record(1, PrepareState::Pending, 1).settled());
    assert!(!prepare_record(1, PrepareState::Fetching, 1).settled());
    assert!(prepare_record(1, PrepareState::Failed, 1).settled());

    db.put_raw(PREPARES, &7u64.to_be_bytes(), b"\x01{not json")
        .expect("raw");
    let text = db.prepare(7).expect_err("corrupt").to_string();
    assert!(text.contains("prepares") && text.contains("`7`"), "{text}");
}

#[test]
fn a_console_account_survives_a_reopen_and_never_shows_its_hash() {
    for store in both_stores("a_console_account_survives_a_reopen_and_never_shows_its_hash") {
        a_console_account_survives_a_reopen_on(&store);
    }
}

fn a_console_account_survives_a_reopen_on(store: &TestStore) {
    let account = AccountRecord {
        name: "alice".into(),
        role: AccountRole::Admin,
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNo".into(),
        updated_ms: 7,
    };
    {
        let db = store.open();
        db.commit(
            &[Put::Account(Box::new(account.clone()))],
            audit("account.add"),
        )
        .expect("account");
        db.put_raw(ACCOUNTS, b"mallory", b"\x01{not json")
            .expect("raw");
    }
    let db = store.open();
    assert_eq!(db.account("alice").expect("read"), Some(account.clone()));
    assert_eq!(db.account("nobody").expect("read"), None);
    assert_eq!(db.audit(10).expect("audit")[0].action, "account.add");
    let shown = format!("{account:?}");
    assert!(
        shown.contains("alice") && !shown.contains("argon2id"),
        "{shown}"
    );
    match db.account("mallory") {
        Err(DbError::Corrupt { table, key, .. }) => {
            assert_eq!((table, key.as_str()), (ACCOUNTS, "mallory"));
        }
        other => panic!("expected a corrupt-value error, got {other:?}"),
    }
    assert!(
        db.accounts().is_err(),
        "a listing names the corrupt value too"
    );
}

/// Node `id` as never reported before.
fn fresh_node(id: &str) -> NodeRecord {
    NodeRecord {
        reports: 0,
        ..node(id)
    }
}

#[test]
fn two_origins_changing_the_same_record_lose_no_update() {
    let Some(store) = etcd_store("two_origins_changing_the_same_record_lose_no_update") else {
        return;
    };
    // Two connections: two origins sharing the cluster, each changing node n1 read-modify-write.
    let origins = [store.open(), store.open()];
    const EACH: u64 = 40;
    std::thread::scope(|scope| {
        for (i, db) in origins.iter().enumerate() {
            scope.spawn(move || {
                for n in 0..EACH {
                    db.change(|| {
                        let mut record = db.node("n1")?.unwrap_or_else(|| fresh_node("n1"));
                        record.reports += 1;
                        let audit =
                            Audit::new(format!("origin-{i}"), "origin", "report", n.to_string());
                        Ok::<_, DbError>(Commit::new(
                            vec![Put::Node(Box::new(record))],
                            Some(audit),
                            (),
                        ))
                    })
                    .expect("a change commits, retried after a conflict");
                }
            });
        }
    });
    let record = origins[0].node("n1").expect("read").expect("n1");
    assert_eq!(
        record.reports,
        2 * EACH,
        "every increment of both origins is kept"
    );
    let log = origins[1].audit(1000).expect("audit");
    let seqs: Vec<u64> = log.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        (1..=2 * EACH).collect::<Vec<_>>(),
        "the audit log has no gap and no duplicate"
    );
    for origin in ["origin-0", "origin-1"] {
        assert_eq!(
            log.iter().filter(|r| r.actor == origin).count() as u64,
            EACH,
            "{origin}'s changes are all recorded once"
        );
    }
}

#[test]
fn without_quorum_changes_are_refused_clearly_and_resume_when_members_return() {
    let Some(TestStore::Etcd(mut cluster, config)) =
        etcd_store("without_quorum_changes_are_refused_clearly_and_resume_when_members_return")
    else {
        return;
    };
    let db = Db::open_store(&config).expect("open");
    db.commit(&[Put::Node(Box::new(node("n1")))], audit("before"))
        .expect("a change with every member up");
    cluster.kill(1).expect("kill");
    cluster.kill(2).expect("kill");
    let started = Instant::now();
    let error = db
        .commit(&[Put::Node(Box::new(node("n2")))], audit("during"))
        .expect_err("a change without quorum is refused");
    let text = error.to_string();
    println!(
        "refused after {:.1} s: {text}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        text.contains("no leader") || text.contains("quorum"),
        "the error says the cluster lost its quorum: {text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "refused promptly, not after a long hang"
    );
    cluster.restart(1).expect("restart");
    cluster.restart(2).expect("restart");
    cluster
        .wait_healthy(Duration::from_secs(30))
        .expect("the members rejoin");
    // The same connection recovers by itself.
    let recovered = Instant::now();
    stagecoach_testing::wait_for(Duration::from_secs(30), Duration::from_millis(200), || {
        Ok::<_, DbError>(
            db.commit(&[Put::Node(Box::new(node("n3")))], audit("after"))
                .ok(),
        )
    })
    .expect("changes are accepted again once the quorum is back");
    println!(
        "accepted again {:.1} s after the members were healthy",
        recovered.elapsed().as_secs_f64()
    );
    // The client spreads requests over the members, and the ones that were down may still
    // hold a stale connection error: no read after the recovery fails for it.
    for _ in 0..30 {
        db.node("n1")
            .expect("every read after the recovery is answered");
    }
    let log = db.audit(10).expect("audit");
    let actions: Vec<&str> = log.iter().map(|r| r.action.as_str()).collect();
    // A refused change that etcd had already proposed may still apply, whole, once the quorum
    // is back; a change is never half-recorded, and nothing acknowledged is lost.
    assert!(
        actions == ["before", "after"] || actions == ["before", "during", "after"],
        "{actions:?}"
    );
    assert_eq!(
        log.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=log.len() as u64).collect::<Vec<_>>()
    );
    assert!(db.node("n1").expect("read").is_some());
    assert!(db.node("n3").expect("read").is_some());
    assert_eq!(
        db.node("n2").expect("read").is_some(),
        actions.contains(&"during"),
        "the refused change's record is there exactly when its audit record is"
    );
}

fn origin_cli(home: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_origin"))
        .arg("--dir")
        .arg(home)
        .args(args)
        .output()
        .expect("run origin");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "origin {args:?} failed: {text}");
    text
}

#[test]
fn store_copy_moves_every_record_into_etcd_and_back() {
    let Some(TestStore::Etcd(cluster, config)) =
        etcd_store("store_copy_moves_every_record_into_etcd_and_back")
    else {
        return;
    };
    let home = tempfile::tempdir().expect("home");
    let account = AccountRecord {
        name: "alice".into(),
        role: AccountRole::Viewer,
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNo".into(),
        updated_ms: 7,
    };
    {
        let db = Db::open(&home.path().join("db")).expect("open the home's database");
        // More nodes than one copy transaction holds.
        for i in 0..250 {
            db.commit(
                &[Put::Node(Box::new(node(&format!("n{i:03}"))))],
                audit("node"),
            )
            .expect("node");
        }
        db.commit(
            &[
                Put::Package(Box::new(package("app", "1", &[]))),
                Put::Class {
                    node: "n001".into(),
                    class: Some("canary".into()),
                },
                Put::Overrides {
                    node: "n002".into(),
                    bundles: vec![BundleRef::new("app", "1")],
                },
                Put::Policy(Box::new(policy_doc())),
                Put::Account(Box::new(account)),
                Put::Prepare(Box::new(prepare_record(1, PrepareState::Pending, 0))),
            ],
            audit("the rest"),
        )
        .expect("the rest");
    }
    let before = Db::open(&home.path().join("db"))
        .expect("reopen")
        .export()
        .expect("export");

    let url = cluster.store_url("test");
    let out = origin_cli(home.path(), &["store", "copy", "--to", &url]);
    assert!(out.contains("copied 507 records"), "{out}");
    let etcd_db = Db::open_store(&config).expect("open etcd");
    assert_eq!(
        etcd_db.export().expect("export"),
        before,
        "etcd holds every record"
    );
    assert_eq!(etcd_db.classes().expect("classes")["n001"], "canary");
    // The audit log goes on where the copy left it.
    let next = etcd_db
        .commit(&[], audit("after the copy"))
        .expect("commit")
        .expect("record");
    assert_eq!(next.seq, 252);
    drop(etcd_db);

    // A second copy into the same, no longer empty, store is refused.
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_origin"))
        .arg("--dir")
        .arg(home.path())
        .args(["store", "copy", "--to", &url])
        .output()
        .expect("run origin");
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && text.contains("not empty"),
        "{text}"
    );

    let status = origin_cli(home.path(), &["store", "status", "--store", &url]);
    assert_eq!(status.matches(": up, ").count(), 3, "{status}");
    assert_eq!(status.matches(", leader,").count(), 1, "{status}");
    assert!(status.contains("last change: audit #252"), "{status}");

    // And back into an empty home's RocksDB.
    let back = tempfile::tempdir().expect("home");
    let out = origin_cli(
        back.path(),
        &["store", "copy", "--from", &url, "--to", "rocksdb"],
    );
    assert!(out.contains("copied 508 records"), "{out}");
    let returned = Db::open(&back.path().join("db")).expect("open");
    let audit_log = returned.audit(1).expect("audit");
    assert_eq!(audit_log[0].action, "after the copy");
    assert_eq!(returned.nodes().expect("nodes").len(), 250);
    assert_eq!(
        returned.account("alice").expect("read").map(|a| a.role),
        Some(AccountRole::Viewer)
    );
}

fn origin_record(id: &str) -> origin::db::OriginRecord {
    origin::db::OriginRecord {
        node_id: id.into(),
        mesh: format!("127.0.0.1:{}", 7400 + id.len()),
        enroll: "127.0.0.1:7401".into(),
        metrics: "127.0.0.1:9400".into(),
        started_ms: 1,
        version: "test".into(),
    }
}

/// The origins sharing a store see each other while they run, and not once one closed the
/// store; an announcement is no change (the audit log stays empty).
#[test]
fn origins_see_each_other_while_they_run() {
    for store in both_stores("origins_see_each_other_while_they_run") {
        let a = store.open();
        a.announce_origin(&origin_record("origin-a"))
            .expect("announce");
        a.announce_origin(&origin_record("origin-a"))
            .expect("announce again replaces");
        let listed = |db: &Db| -> Vec<String> {
            db.origins()
                .expect("origins")
                .into_iter()
                .map(|o| o.node_id)
                .collect()
        };
        assert_eq!(listed(&a), ["origin-a"], "{}", store.name());
        assert!(a.audit(10).expect("audit").is_empty(), "not audited");
        if let TestStore::Etcd(..) = store {
            let b = store.open();
            b.announce_origin(&origin_record("origin-b"))
                .expect("announce");
            assert_eq!(listed(&a), ["origin-a", "origin-b"]);
            assert_eq!(listed(&b), ["origin-a", "origin-b"]);
            let id = package("os", "1", &[]).id;
            a.announce_held("origin-a", &[id]).expect("held");
            b.announce_held("origin-b", &[id]).expect("held");
            assert_eq!(a.holders(&id).expect("holders"), ["origin-a", "origin-b"]);
            drop(b);
            assert_eq!(
                listed(&a),
                ["origin-a"],
                "a closed store's origin is gone at once"
            );
            assert_eq!(
                a.holders(&id).expect("holders"),
                ["origin-a"],
                "and so is what it held"
            );
        }
    }
}

#[test]
fn one_origin_leads_an_election_until_it_closes_then_the_next_does() {
    use origin::db::ROLLOUT_ELECTION;
    use std::time::{Duration, Instant};
    for store in both_stores("one_origin_leads_an_election_until_it_closes_then_the_next_does") {
        let a = store.open();
        let lead = a
            .campaign(ROLLOUT_ELECTION, b"origin-a", Duration::from_secs(5))
            .expect("campaign")
            .expect("the only candidate leads");
        let (leader, value) = a
            .leader(ROLLOUT_ELECTION)
            .expect("leader")
            .expect("someone leads");
        assert_eq!((leader, value.as_slice()), (lead, &b"origin-a"[..]));
        if let TestStore::Etcd(..) = store {
            let b = store.open();
            // A second candidate waits while the first leads...
            let waited = b
                .campaign(ROLLOUT_ELECTION, b"origin-b", Duration::from_millis(500))
                .expect("campaign");
            assert_eq!(waited, None, "two leaders at once");
            let (_, value) = b.leader(ROLLOUT_ELECTION).expect("leader").expect("one");
            assert_eq!(value, b"origin-a", "b sees a lead");
            // ...and leads once the first is gone (its lease revoked as it closes).
            let handed = std::thread::spawn(move || {
                let started = Instant::now();
                let won = b
                    .campaign(ROLLOUT_ELECTION, b"origin-b", Duration::from_secs(15))
                    .expect("campaign");
                (b, won, started.elapsed())
            });
            std::thread::sleep(Duration::from_millis(300));
            drop(a);
            let (b, won, took) = handed.join().expect("campaign thread");
            assert!(won.is_some(), "b leads after a closed (waited {took:?})");
            let (_, value) = b.leader(ROLLOUT_ELECTION).expect("leader").expect("one");
            assert_eq!(value, b"origin-b");
        }
    }
}
