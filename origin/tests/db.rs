//! The control plane's database: every record kind survives a reopen, every change is written
//! with its audit record in one batch, and a corrupt value is a clear error naming its key.

use std::collections::BTreeMap;

use origin::db::{
    AccountRecord, AccountRole, Audit, Db, DbError, NodeRecord, NodeState, PackageRecord,
    PolicyDoc, PrepareNode, PrepareRecord, PrepareState, Put, ACCOUNTS, AUDIT, NODES, PACKAGES,
    PREPARES,
};
use origin::policy::{self, BundleRef, Matcher, MatcherKind, Requirement, Resolution, Rule};
use proto::inventory::{Inventory, Nic};
use proto::wire::{NodeBundle, ReportEvent};
use proto::BlobHash;

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

fn audit(action: &str) -> Option<Audit> {
    Some(Audit::new("alice", "origin", action, "details"))
}

#[test]
fn every_record_kind_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = Db::open(dir.path()).expect("open");
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
    let db = Db::open(dir.path()).expect("reopen");
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
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path()).expect("open");
    let puts = [
        Put::Node(Box::new(node("n1"))),
        Put::Class {
            node: "n1".into(),
            class: Some("c".into()),
        },
    ];
    let (batch, record) = db.batch(&puts, audit("two"), 7, 42).expect("batch");
    assert_eq!(
        batch.len(),
        puts.len() + 1,
        "one batch: the changes and the audit"
    );
    let record = record.expect("record");
    assert_eq!((record.seq, record.at_ms), (7, 42));
    assert_eq!(record.actor, "alice");
    // A commit shows both or neither; without an audit, no record is written.
    let written = db
        .commit(&puts, audit("two"))
        .expect("commit")
        .expect("record");
    assert_eq!(written.seq, 1);
    assert!(db.node("n1").expect("read").is_some());
    assert_eq!(db.audit(10).expect("audit"), vec![written]);
    assert!(db.commit(&puts, None).expect("quiet").is_none());
    assert_eq!(db.audit(10).expect("audit").len(), 1);
}

#[test]
fn a_corrupt_value_is_an_error_naming_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path()).expect("open");
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
    let db = Db::open(dir.path()).expect("reopen");
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
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = Db::open(dir.path()).expect("open");
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
    let db = Db::open(dir.path()).expect("reopen");
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
    let dir = tempfile::tempdir().expect("tempdir");
    let account = AccountRecord {
        name: "alice".into(),
        role: AccountRole::Admin,
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNo".into(),
        updated_ms: 7,
    };
    {
        let db = Db::open(dir.path()).expect("open");
        db.commit(
            &[Put::Account(Box::new(account.clone()))],
            audit("account.add"),
        )
        .expect("account");
        db.put_raw(ACCOUNTS, b"mallory", b"\x01{not json")
            .expect("raw");
    }
    let db = Db::open(dir.path()).expect("reopen");
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
