//! Discovery between real swarms on loopback (and mDNS in a network namespace), and the
//! validation of Hellos.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::time::timeout;

use super::hello::{validate_hello, Hello};
use super::*;

fn config(site: &str, node_id: &str, data_port: u16) -> DiscoveryConfig {
    DiscoveryConfig {
        listen: "/ip4/127.0.0.1/tcp/0".to_owned(),
        mdns: false,
        site: site.to_owned(),
        node_id: node_id.to_owned(),
        data_addr: SocketAddr::from(([127, 0, 0, 1], data_port)),
    }
}

async fn next_within(d: &mut Discovery, secs: u64) -> Option<DiscoveredPeer> {
    timeout(Duration::from_secs(secs), d.next())
        .await
        .ok()
        .flatten()
}

async fn wait_for(secs: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

#[tokio::test]
async fn same_site_dial_reports_both_sides() {
    let mut a = Discovery::start(config("a", "aa01", 7001)).await.unwrap();
    let mut b = Discovery::start(config("a", "bb02", 7002)).await.unwrap();
    let a_addrs = a.listen_addrs();
    assert!(!a_addrs.is_empty());
    for addr in &a_addrs {
        assert!(addr.ends_with(&format!("/p2p/{}", a.peer_id())), "{addr}");
        assert!(!addr.contains("0.0.0.0"), "{addr}");
    }
    b.dial(&a_addrs[0]).unwrap();
    let (seen_by_a, seen_by_b) = tokio::join!(next_within(&mut a, 10), next_within(&mut b, 10));
    let seen_by_a = seen_by_a.expect("A reports B within 10 s");
    let seen_by_b = seen_by_b.expect("B reports A within 10 s");
    assert_eq!(seen_by_a.node_id, "bb02");
    assert_eq!(seen_by_a.site, "a");
    assert_eq!(seen_by_a.data_addr, "127.0.0.1:7002".parse().unwrap());
    assert_eq!(seen_by_a.via, Via::Dial);
    assert!(seen_by_a
        .p2p_addrs
        .iter()
        .all(|x| x.ends_with(&b.peer_id())));
    assert!(seen_by_a.p2p_addrs.contains(&b.listen_addrs()[0]));
    assert_eq!(seen_by_b.node_id, "aa01");
    assert_eq!(seen_by_b.data_addr, "127.0.0.1:7001".parse().unwrap());
    assert_eq!(seen_by_b.via, Via::Dial);
    assert!(seen_by_b.p2p_addrs.contains(&a_addrs[0]));

    // Reported once: dialing again (the stager's list comes back often) reports nothing.
    b.dial(&a_addrs[0]).unwrap();
    a.dial(&b.listen_addrs()[0]).unwrap();
    assert_eq!(next_within(&mut a, 1).await, None);
    assert_eq!(next_within(&mut b, 1).await, None);
    assert_eq!(a.stats().reported, 1);
    assert_eq!(a.stats().other_site_rejected, 0);
}

#[tokio::test]
async fn changed_data_addr_is_reported_again() {
    let mut a = Discovery::start(config("a", "aa01", 7001)).await.unwrap();
    let target = a.listen_addrs()[0].clone();

    let b1 = Discovery::start(config("a", "bb02", 7002)).await.unwrap();
    b1.dial(&target).unwrap();
    let first = next_within(&mut a, 10).await.expect("first report");
    assert_eq!(first.data_addr, "127.0.0.1:7002".parse().unwrap());
    drop(b1);

    // Same node restarted with another data address: reported again.
    let b2 = Discovery::start(config("a", "bb02", 7003)).await.unwrap();
    b2.dial(&target).unwrap();
    let second = next_within(&mut a, 10).await.expect("second report");
    assert_eq!(second.node_id, "bb02");
    assert_eq!(second.data_addr, "127.0.0.1:7003".parse().unwrap());
    drop(b2);

    // Restarted again with the same data address: not reported.
    let b3 = Discovery::start(config("a", "bb02", 7003)).await.unwrap();
    b3.dial(&target).unwrap();
    assert_eq!(next_within(&mut a, 2).await, None);
    assert_eq!(a.stats().reported, 2);
}

#[tokio::test]
async fn other_site_is_rejected_and_counted() {
    let mut a = Discovery::start(config("a", "aa01", 7001)).await.unwrap();
    let mut b = Discovery::start(config("b", "bb02", 7002)).await.unwrap();
    b.dial(&a.listen_addrs()[0]).unwrap();
    let counted = wait_for(10, || {
        a.stats().other_site_rejected >= 1 && b.stats().other_site_rejected >= 1
    })
    .await;
    assert!(counted, "a: {:?}, b: {:?}", a.stats(), b.stats());
    let (seen_by_a, seen_by_b) = tokio::join!(next_within(&mut a, 3), next_within(&mut b, 3));
    assert_eq!(seen_by_a, None);
    assert_eq!(seen_by_b, None);
    assert_eq!(a.stats().reported, 0);
    assert_eq!(b.stats().reported, 0);
    assert_eq!(a.stats().other_site_rejected, 1);
}

#[tokio::test]
async fn dial_to_self_is_ignored() {
    let mut a = Discovery::start(config("a", "aa01", 7001)).await.unwrap();
    for addr in a.listen_addrs() {
        a.dial(&addr).unwrap();
    }
    assert_eq!(next_within(&mut a, 1).await, None);
    assert!(a.stats().dials_skipped >= 1);
}

#[tokio::test]
async fn bad_addresses_are_errors() {
    let a = Discovery::start(config("a", "aa01", 7001)).await.unwrap();
    for bad in [
        "",
        "not a multiaddr",
        "/ip4/127.0.0.1/tcp/notaport",
        "/dns4/example.com/tcp/1",
        "/ip4/127.0.0.1/udp/1",
        "/ip4/127.0.0.1/tcp/1/p2p/notapeerid",
    ] {
        assert!(a.dial(bad).is_err(), "dial({bad:?}) should fail");
    }
    assert!(a.dial(&"/ip4/127.0.0.1/tcp/1".repeat(20)).is_err());
    // An address without a peer id is fine (nothing listens there; the dial just fails).
    a.dial("/ip4/127.0.0.1/tcp/1").unwrap();

    for (listen, expect) in [
        ("garbage", "invalid listen multiaddr"),
        ("/ip4/127.0.0.1/udp/0", "unsupported listen multiaddr"),
        ("/ip4/203.0.113.7/tcp/0", "cannot listen on"),
    ] {
        let mut c = config("a", "cc03", 7003);
        c.listen = listen.to_owned();
        let err = match Discovery::start(c).await {
            Ok(_) => panic!("start with listen {listen:?} should fail"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(expect), "{listen:?}: {err}");
    }

    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = config("a", "cc03", 7003);
    c.listen = format!("/ip4/127.0.0.1/tcp/{}", held.local_addr().unwrap().port());
    let err = Discovery::start(c).await.err().expect("port in use");
    assert!(format!("{err:#}").contains("cannot listen on"), "{err:#}");

    let mut c = config("a", "not hex!", 7003);
    assert!(Discovery::start(c.clone()).await.is_err());
    c.node_id = "cc03".to_owned();
    c.site = String::new();
    assert!(Discovery::start(c).await.is_err());
}

#[test]
fn malformed_hellos_are_rejected() {
    let peer = PeerId::random();
    let other = PeerId::random();
    let good = Hello {
        site: "a".into(),
        node_id: "ab12".into(),
        data_addr: "10.1.2.3:4433".into(),
        p2p_addrs: vec![format!("/ip4/10.1.2.3/tcp/4001/p2p/{peer}")],
        found_by_mdns: false,
    };
    let valid = validate_hello(&good, peer, None).unwrap();
    assert_eq!(valid.data_addr, "10.1.2.3:4433".parse().unwrap());
    assert_eq!(valid.p2p_addrs.len(), 1);

    let long = "a".repeat(MAX_FIELD_BYTES + 1);
    let cases: Vec<(&str, Hello)> = vec![
        (
            "long site",
            Hello {
                site: long.clone(),
                ..good.clone()
            },
        ),
        (
            "empty site",
            Hello {
                site: String::new(),
                ..good.clone()
            },
        ),
        (
            "long node id",
            Hello {
                node_id: long.clone(),
                ..good.clone()
            },
        ),
        (
            "node id with other characters",
            Hello {
                node_id: "XY/z".into(),
                ..good.clone()
            },
        ),
        (
            "bad addr",
            Hello {
                data_addr: "nowhere".into(),
                ..good.clone()
            },
        ),
        (
            "port 0",
            Hello {
                data_addr: "10.1.2.3:0".into(),
                ..good.clone()
            },
        ),
        (
            "long addr",
            Hello {
                data_addr: long.clone(),
                ..good.clone()
            },
        ),
        (
            "unspecified, no remote",
            Hello {
                data_addr: "0.0.0.0:1".into(),
                ..good.clone()
            },
        ),
        (
            "control chars",
            Hello {
                site: "a\nb".into(),
                ..good.clone()
            },
        ),
        (
            "too many addrs",
            Hello {
                p2p_addrs: vec![good.p2p_addrs[0].clone(); MAX_HELLO_ADDRS + 1],
                ..good.clone()
            },
        ),
        (
            "bad p2p addr",
            Hello {
                p2p_addrs: vec!["junk".into()],
                ..good.clone()
            },
        ),
        (
            "long p2p addr",
            Hello {
                p2p_addrs: vec![long.clone()],
                ..good.clone()
            },
        ),
        (
            "p2p addr of another peer",
            Hello {
                p2p_addrs: vec![format!("/ip4/10.1.2.3/tcp/4001/p2p/{other}")],
                ..good.clone()
            },
        ),
    ];
    for (what, hello) in cases {
        assert!(
            validate_hello(&hello, peer, None).is_err(),
            "{what} accepted"
        );
    }

    // An unspecified data address is completed with the connection's IP.
    let any = Hello {
        data_addr: "0.0.0.0:4433".into(),
        ..good.clone()
    };
    let remote = Some("192.0.2.9".parse().unwrap());
    let valid = validate_hello(&any, peer, remote).unwrap();
    assert_eq!(valid.data_addr, "192.0.2.9:4433".parse().unwrap());

    // Oversized or non-JSON bytes never reach validation: the codec refuses them.
    let json = serde_json::to_vec(&good).unwrap();
    assert!((json.len() as u64) < MAX_HELLO_BYTES);
    assert!(serde_json::from_slice::<Hello>(b"{\"site\":1}").is_err());
}

/// Set in the child process that runs the mDNS test inside a private network namespace.
const NETNS_ENV: &str = "STAGECOACH_DISCOVERY_NETNS";

#[tokio::test]
async fn mdns_finds_peers_without_dialing() {
    if std::env::var_os(NETNS_ENV).is_some() {
        return mdns_in_namespace().await;
    }
    // mDNS needs a multicast interface and skips loopback. The host's interfaces lead to a
    // real network, which tests must not send to, so the test re-runs itself in a private
    // network namespace with a veth pair that reaches nothing but this process.
    let module = module_path!();
    let test_name = format!(
        "{}::mdns_finds_peers_without_dialing",
        module.split_once("::").map_or(module, |(_, rest)| rest)
    );
    if !stagecoach_testing::can_run(
        &test_name,
        &[stagecoach_testing::need::network_namespaces()],
    ) {
        return;
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let script = "set -e; ip link set lo up; \
        ip link add scdisc0 type veth peer name scdisc1; \
        ip addr add 10.233.0.1/24 dev scdisc0; \
        ip link set scdisc0 multicast on up; ip link set scdisc1 up; \
        ip route add 224.0.0.0/4 dev scdisc0; \
        echo STAGECOACH_NETNS_READY; exec \"$0\" \"$@\"";
    let output = tokio::process::Command::new("unshare")
        .args(["--net", "sh", "-c", script])
        .arg(&exe)
        .args([
            test_name.as_str(),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(NETNS_ENV, "1")
        .kill_on_drop(true)
        .output();
    let output = match timeout(Duration::from_secs(60), output).await {
        Err(_) => panic!("mDNS test in a network namespace did not finish in 60 s"),
        Ok(Err(e)) => panic!("cannot run unshare for the mDNS test: {e}"),
        Ok(Ok(output)) => output,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !stdout.contains("STAGECOACH_NETNS_READY") {
        let reason = format!(
            "cannot give a private network namespace a multicast veth interface: {}",
            stderr.trim()
        );
        return stagecoach_testing::skip_or_fail(&test_name, &reason);
    }
    print!("{stdout}");
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "mDNS test in a network namespace failed:\n{stdout}\n{stderr}"
    );
    println!("mDNS test ran for real in a private network namespace");
}

async fn mdns_in_namespace() {
    let mdns_config = |node: &str, port| DiscoveryConfig {
        listen: "/ip4/0.0.0.0/tcp/0".to_owned(),
        mdns: true,
        ..config("a", node, port)
    };
    let mut a = Discovery::start(mdns_config("aa01", 7001)).await.unwrap();
    let mut b = Discovery::start(mdns_config("bb02", 7002)).await.unwrap();
    let (seen_by_a, seen_by_b) = tokio::join!(next_within(&mut a, 15), next_within(&mut b, 15));
    let seen_by_a = seen_by_a.expect("A finds B by mDNS within 15 s");
    let seen_by_b = seen_by_b.expect("B finds A by mDNS within 15 s");
    assert_eq!(seen_by_a.node_id, "bb02");
    assert_eq!(seen_by_a.data_addr, "127.0.0.1:7002".parse().unwrap());
    assert_eq!(seen_by_b.node_id, "aa01");
    assert_eq!(seen_by_b.data_addr, "127.0.0.1:7001".parse().unwrap());
    // Whoever dialed first did so because of mDNS, and says so in its Hello.
    assert_eq!(seen_by_a.via, Via::Mdns);
    assert_eq!(seen_by_b.via, Via::Mdns);
    assert_eq!(a.stats().dials_skipped, 0);
    println!("mDNS: A and B found each other");
}
