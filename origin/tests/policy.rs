//! Policy resolution, table-driven: precedence, features with dependencies, conflicts,
//! subnets, "no image", and the `origin policy check` report.

use std::cmp::Ordering;
use std::net::IpAddr;

use origin::policy::{
    check, compare_versions, resolve, BundleRef, Constraint, Fact, Matcher, MatcherKind,
    PolicyError, PolicyStore, Reason, Requirement, Resolution, Rule, DEFAULT_PRECEDENCE,
};
use proto::inventory::Inventory;

/// A node with every fact a rule can match.
fn full_inventory() -> Inventory {
    Inventory {
        class: Some("cache".into()),
        role: Some("web".into()),
        model: Some("PowerEdge R640".into()),
        manufacturer: Some("Dell Inc.".into()),
        address: Some(ip("10.1.2.7")),
        subnet: Some("10.1.2.0/24".into()),
        site: Some("ams".into()),
        ..Inventory::default()
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

fn bundle(text: &str) -> BundleRef {
    let (name, version) = text.split_once('@').expect("name@version");
    BundleRef::new(name, version)
}

fn rule(id: &str, matcher: Matcher, bundles: &[&str]) -> Rule {
    Rule {
        id: id.into(),
        matcher,
        bundles: bundles.iter().map(|b| bundle(b)).collect(),
    }
}

fn req(text: &str) -> Requirement {
    text.parse().expect("test requirement")
}

/// A store with `rules`, and every bundle they name in the catalog without dependencies.
fn store_with(rules: Vec<Rule>) -> PolicyStore {
    let mut store = PolicyStore::new();
    for rule in &rules {
        for bundle in &rule.bundles {
            let known = store
                .packages
                .get(&bundle.name)
                .is_some_and(|v| v.iter().any(|p| p.version == bundle.version));
            if !known {
                store.add_package(&bundle.name, &bundle.version, Vec::new());
            }
        }
    }
    store.rules = rules;
    store
}

/// One rule per level, each naming `os@<level>`.
fn one_rule_per_level() -> Vec<Rule> {
    vec![
        rule(
            "subnet",
            Matcher::Subnet("10.1.0.0/16".into()),
            &["os@subnet"],
        ),
        rule(
            "vendor",
            Matcher::Manufacturer("Dell Inc.".into()),
            &["os@manufacturer"],
        ),
        rule(
            "model",
            Matcher::Model("PowerEdge R640".into()),
            &["os@model"],
        ),
        rule("role", Matcher::Role("web".into()), &["os@role"]),
        rule("class", Matcher::Class("cache".into()), &["os@class"]),
        rule(
            "node",
            Matcher::NodeOverride("edge-7".into()),
            &["os@node-override"],
        ),
    ]
}

/// The (level, rule ids, bundles) of a resolution, or what went wrong.
fn summary(resolution: &Resolution) -> (Option<MatcherKind>, Vec<String>, Vec<String>) {
    match resolution {
        Resolution::Resolved {
            level,
            rules,
            bundles,
        } => (
            *level,
            rules.clone(),
            bundles.iter().map(|b| b.bundle.to_string()).collect(),
        ),
        Resolution::NoImage { .. } => (None, Vec::new(), Vec::new()),
    }
}

#[test]
fn each_level_beats_the_next() {
    let store = store_with(one_rule_per_level());
    let full = full_inventory();
    let no_class = Inventory {
        class: None,
        ..full.clone()
    };
    let no_role = Inventory {
        role: None,
        ..no_class.clone()
    };
    let no_model = Inventory {
        model: None,
        ..no_role.clone()
    };
    let no_vendor = Inventory {
        manufacturer: None,
        ..no_model.clone()
    };
    let no_address = Inventory {
        address: None,
        subnet: None,
        ..no_vendor.clone()
    };
    // (node, inventory, winning level, winning rule)
    let cases: Vec<(&str, &Inventory, MatcherKind, &str)> = vec![
        ("edge-7", &full, MatcherKind::NodeOverride, "node"),
        ("edge-8", &full, MatcherKind::Class, "class"),
        ("edge-8", &no_class, MatcherKind::Role, "role"),
        ("edge-8", &no_role, MatcherKind::Model, "model"),
        ("edge-8", &no_model, MatcherKind::Manufacturer, "vendor"),
        ("edge-8", &no_vendor, MatcherKind::Subnet, "subnet"),
    ];
    for (node, inventory, level, rule_id) in cases {
        let resolution = resolve(&store, node, inventory).expect("resolves");
        let expected_bundle = format!("os@{level}");
        assert_eq!(
            summary(&resolution),
            (Some(level), vec![rule_id.to_owned()], vec![expected_bundle]),
            "{node} with {level} as the highest fact"
        );
    }
    assert!(matches!(
        resolve(&store, "edge-8", &no_address),
        Ok(Resolution::NoImage { .. })
    ));
}

#[test]
fn configured_precedence_changes_the_winner() {
    use MatcherKind::*;
    // (precedence, node, winning level)
    let cases: Vec<(Vec<MatcherKind>, &str, Option<MatcherKind>)> = vec![
        (DEFAULT_PRECEDENCE.to_vec(), "edge-7", Some(NodeOverride)),
        (
            vec![Subnet, Manufacturer, Model, Role, Class, NodeOverride],
            "edge-7",
            Some(Subnet),
        ),
        (vec![Model, Class], "edge-7", Some(Model)),
        // Levels left out of the precedence are never consulted.
        (vec![Role], "edge-7", Some(Role)),
        (vec![], "edge-7", None),
    ];
    for (precedence, node, level) in cases {
        let mut store = store_with(one_rule_per_level());
        store.precedence = precedence.clone();
        let resolution = resolve(&store, node, &full_inventory()).expect("resolves");
        match level {
            Some(level) => assert_eq!(
                resolution.bundles(),
                vec![&BundleRef::new("os", level.name())],
                "precedence {precedence:?}"
            ),
            None => assert!(
                matches!(resolution, Resolution::NoImage { ref facts } if facts.is_empty()),
                "precedence {precedence:?}: {resolution:?}"
            ),
        }
    }
}

#[test]
fn a_level_listed_twice_is_an_error() {
    let mut store = store_with(one_rule_per_level());
    store.precedence = vec![MatcherKind::Class, MatcherKind::Role, MatcherKind::Class];
    assert_eq!(
        resolve(&store, "edge-7", &full_inventory()),
        Err(PolicyError::DuplicateLevel {
            level: MatcherKind::Class
        })
    );
}

/// A catalog with versions, dependencies, a cycle and broken entries.
fn feature_store() -> PolicyStore {
    let mut store = PolicyStore::new();
    store
        .add_package("base", "1.0", vec![])
        .add_package("base", "1.2", vec![])
        .add_package("base", "2.0", vec![])
        .add_package("base", "10.0", vec![])
        .add_package("libssl", "1.1", vec![])
        .add_package("libssl", "3.0", vec![])
        .add_package("routing", "1.0", vec![req("libssl>=1.1"), req("base@1.2")])
        .add_package("routing", "2.0", vec![req("libssl>=3.0"), req("base>=2.0")])
        .add_package("routing", "2.9", vec![req("libssl>=3.0"), req("base>=2.0")])
        .add_package("cycle-a", "1", vec![req("cycle-b")])
        .add_package("cycle-b", "1", vec![req("cycle-a")])
        .add_package("needs-ghost", "1.0", vec![req("ghost")])
        .add_package("os", "1.0", vec![req("base@1.0")])
        .add_package("os", "2.0", vec![req("base>=2.0")]);
    for (feature, requirements) in [
        ("bgp", vec!["routing>=2.0"]),
        ("legacy-bgp", vec!["routing@1.0"]),
        ("newest-base", vec!["base"]),
        ("cyclic", vec!["cycle-a"]),
        ("haunted", vec!["needs-ghost"]),
        ("future", vec!["routing>=9"]),
        ("absent", vec!["nowhere"]),
    ] {
        store
            .features
            .insert(feature.into(), requirements.into_iter().map(req).collect());
    }
    store
}

#[test]
fn features_select_packages_with_their_dependencies() {
    // (rule bundles for the node's class, features, expected bundles in order)
    let cases: Vec<(&[&str], &[&str], &[&str])> = vec![
        // Newest satisfying version, then its dependencies, each newest satisfying.
        (&[], &["bgp"], &["routing@2.9", "libssl@3.0", "base@10.0"]),
        // Exact pins are honoured, even when newer versions exist.
        (
            &[],
            &["legacy-bgp"],
            &["routing@1.0", "libssl@3.0", "base@1.2"],
        ),
        // Numeric ordering: 10.0 is newer than 2.0.
        (&[], &["newest-base"], &["base@10.0"]),
        // A dependency cycle ends.
        (&[], &["cyclic"], &["cycle-a@1", "cycle-b@1"]),
        // Asking twice for one feature is asking once.
        (&[], &["cyclic", "cyclic"], &["cycle-a@1", "cycle-b@1"]),
        // A rule's bundles come first and their dependencies are added too.
        (&["os@1.0"], &[], &["os@1.0", "base@1.0"]),
        (
            &["os@2.0"],
            &["bgp"],
            &["os@2.0", "routing@2.9", "base@10.0", "libssl@3.0"],
        ),
    ];
    for (rule_bundles, features, expected) in cases {
        let mut store = feature_store();
        if !rule_bundles.is_empty() {
            store.rules.push(rule(
                "cache-os",
                Matcher::Class("cache".into()),
                rule_bundles,
            ));
        }
        let inventory = Inventory {
            class: Some("cache".into()),
            features: features.iter().map(|f| f.to_string()).collect(),
            ..Inventory::default()
        };
        let resolution = resolve(&store, "edge-1", &inventory);
        let got: Vec<String> = match &resolution {
            Ok(r) => r.bundles().iter().map(|b| b.to_string()).collect(),
            Err(e) => panic!("rules {rule_bundles:?} features {features:?}: {e}"),
        };
        assert_eq!(
            got, expected,
            "rules {rule_bundles:?} features {features:?}"
        );
    }
}

#[test]
fn a_resolution_says_who_chose_each_bundle() {
    let mut store = feature_store();
    store.rules.push(rule(
        "cache-os",
        Matcher::Class("cache".into()),
        &["os@2.0"],
    ));
    let inventory = Inventory {
        class: Some("cache".into()),
        features: vec!["bgp".into()],
        ..Inventory::default()
    };
    let Ok(Resolution::Resolved {
        level,
        rules,
        bundles,
    }) = resolve(&store, "edge-1", &inventory)
    else {
        panic!("resolves")
    };
    assert_eq!(level, Some(MatcherKind::Class));
    assert_eq!(rules, ["cache-os"]);
    let got: Vec<(String, Reason)> = bundles
        .into_iter()
        .map(|b| (b.bundle.to_string(), b.reason))
        .collect();
    assert_eq!(
        got,
        [
            (
                "os@2.0".to_owned(),
                Reason::Rule {
                    rule: "cache-os".into(),
                    level: MatcherKind::Class
                }
            ),
            (
                "routing@2.9".to_owned(),
                Reason::Feature {
                    feature: "bgp".into(),
                    requirement: req("routing>=2.0")
                }
            ),
            (
                "base@10.0".to_owned(),
                Reason::Dependency {
                    of: bundle("os@2.0"),
                    requirement: req("base>=2.0")
                }
            ),
            (
                "libssl@3.0".to_owned(),
                Reason::Dependency {
                    of: bundle("routing@2.9"),
                    requirement: req("libssl>=3.0")
                }
            ),
        ]
    );
}

#[test]
fn feature_errors_name_what_is_missing() {
    // (rule bundles, features, check on the error)
    type Check = fn(&PolicyError) -> bool;
    let cases: Vec<(&[&str], &[&str], Check, &str)> = vec![
        (
            &[],
            &["teleport"],
            |e| matches!(e, PolicyError::UnknownFeature { feature } if feature == "teleport"),
            "teleport",
        ),
        (
            &[],
            &["absent"],
            |e| {
                matches!(e, PolicyError::UnknownPackage { name, required_by }
                    if name == "nowhere"
                        && matches!(&**required_by, Reason::Feature { feature, .. } if feature == "absent"))
            },
            "nowhere",
        ),
        (
            &[],
            &["haunted"],
            |e| {
                matches!(e, PolicyError::UnknownPackage { name, required_by }
                    if name == "ghost"
                        && matches!(&**required_by, Reason::Dependency { of, .. } if of.to_string() == "needs-ghost@1.0"))
            },
            "ghost",
        ),
        (
            &[],
            &["future"],
            |e| {
                matches!(e, PolicyError::NoMatchingVersion { requirement, available, .. }
                    if requirement.to_string() == "routing>=9" && available == &["1.0", "2.0", "2.9"])
            },
            "routing>=9",
        ),
        (
            &[],
            &["bgp", "legacy-bgp"],
            |e| {
                matches!(e, PolicyError::Unsatisfiable { requirement, chosen, .. }
                    if requirement.to_string() == "routing@1.0" && chosen.to_string() == "routing@2.9")
            },
            "routing@1.0",
        ),
        (
            &["os@1.0"],
            &["bgp"],
            |e| {
                matches!(e, PolicyError::Unsatisfiable { chosen, chosen_by, .. }
                    if chosen.to_string() == "base@1.0"
                        && matches!(&**chosen_by, Reason::Dependency { of, .. } if of.to_string() == "os@1.0"))
            },
            "base@1.0",
        ),
        (
            &["os@3.0"],
            &[],
            |e| {
                matches!(e, PolicyError::NoMatchingVersion { required_by, .. }
                    if matches!(&**required_by, Reason::Rule { rule, .. } if rule == "cache-os"))
            },
            "os@3.0",
        ),
    ];
    for (rule_bundles, features, check, named) in cases {
        let mut store = feature_store();
        if !rule_bundles.is_empty() {
            store.rules.push(rule(
                "cache-os",
                Matcher::Class("cache".into()),
                rule_bundles,
            ));
        }
        let inventory = Inventory {
            class: Some("cache".into()),
            features: features.iter().map(|f| f.to_string()).collect(),
            ..Inventory::default()
        };
        let error = resolve(&store, "edge-1", &inventory).expect_err("fails");
        assert!(
            check(&error),
            "rules {rule_bundles:?} features {features:?}: {error:?}"
        );
        assert!(
            error.to_string().contains(named),
            "the message names `{named}`: {error}"
        );
    }
}

#[test]
fn disagreeing_rules_on_one_level_are_a_conflict_naming_both() {
    // (rules, expected: Ok(bundles) or Err((first rule, second rule)))
    type Expected = Result<Vec<&'static str>, (&'static str, &'static str)>;
    let cases: Vec<(Vec<Rule>, Expected)> = vec![
        (
            vec![
                rule("cache-a", Matcher::Class("cache".into()), &["os@1.0"]),
                rule("cache-b", Matcher::Class("cache".into()), &["os@2.0"]),
            ],
            Err(("cache-a", "cache-b")),
        ),
        // Different rules on one level that agree (in any order) are not a conflict.
        (
            vec![
                rule("web-a", Matcher::Role("web".into()), &["os@1.0", "agent@3"]),
                rule("web-b", Matcher::Role("web".into()), &["agent@3", "os@1.0"]),
            ],
            Ok(vec!["os@1.0", "agent@3"]),
        ),
        // Two levels that disagree: precedence decides, nothing is ambiguous.
        (
            vec![
                rule("web", Matcher::Role("web".into()), &["os@1.0"]),
                rule(
                    "dell",
                    Matcher::Manufacturer("Dell Inc.".into()),
                    &["os@2.0"],
                ),
            ],
            Ok(vec!["os@1.0"]),
        ),
        // A disagreement below the winning level is never consulted.
        (
            vec![
                rule("cache", Matcher::Class("cache".into()), &["os@3.0"]),
                rule("web-a", Matcher::Role("web".into()), &["os@1.0"]),
                rule("web-b", Matcher::Role("web".into()), &["os@2.0"]),
            ],
            Ok(vec!["os@3.0"]),
        ),
        // Overlapping subnets on one level are ambiguous too.
        (
            vec![
                rule("wide", Matcher::Subnet("10.0.0.0/8".into()), &["os@1.0"]),
                rule("narrow", Matcher::Subnet("10.1.2.0/24".into()), &["os@2.0"]),
            ],
            Err(("wide", "narrow")),
        ),
    ];
    for (rules, expected) in cases {
        let ids: Vec<String> = rules.iter().map(|r| r.id.clone()).collect();
        let store = store_with(rules);
        let result = resolve(&store, "edge-1", &full_inventory());
        match expected {
            Ok(bundles) => {
                let resolution = result.unwrap_or_else(|e| panic!("{ids:?}: {e}"));
                let got: Vec<String> = resolution.bundles().iter().map(|b| b.to_string()).collect();
                assert_eq!(got, bundles, "{ids:?}");
            }
            Err((first, second)) => {
                let error = result.expect_err("a conflict");
                assert!(
                    matches!(&error, PolicyError::Conflict { first_rule, second_rule, .. }
                        if first_rule == first && second_rule == second),
                    "{ids:?}: {error:?}"
                );
                let message = error.to_string();
                assert!(
                    message.contains(first) && message.contains(second),
                    "{message}"
                );
            }
        }
    }
}

#[test]
fn subnet_rules_match_addresses_and_subnets_in_the_block() {
    // (rule block, node address, node subnet, matches)
    let cases: Vec<(&str, Option<&str>, Option<&str>, bool)> = vec![
        ("10.1.0.0/16", Some("10.1.2.7"), Some("10.1.2.0/24"), true),
        ("10.1.0.0/16", Some("10.2.0.1"), Some("10.2.0.0/24"), false),
        ("10.1.0.0/16", Some("10.1.255.255"), None, true),
        ("10.1.0.0/16", Some("10.0.255.255"), None, false),
        // Without an address, the node's whole subnet must lie in the block.
        ("10.1.0.0/16", None, Some("10.1.2.0/24"), true),
        ("10.1.0.0/16", None, Some("10.0.0.0/8"), false),
        ("10.1.0.0/16", None, Some("not a subnet"), false),
        ("10.1.0.0/16", None, None, false),
        // Host bits in the rule are ignored; /0 matches every IPv4 address; /32 one.
        ("10.1.2.3/16", Some("10.1.9.9"), None, true),
        ("0.0.0.0/0", Some("192.0.2.1"), None, true),
        ("192.0.2.1/32", Some("192.0.2.1"), None, true),
        ("192.0.2.1/32", Some("192.0.2.2"), None, false),
        // IPv4-mapped IPv6 addresses are IPv4; IPv6 blocks work; families never mix.
        ("10.1.0.0/16", Some("::ffff:10.1.2.7"), None, true),
        ("2001:db8::/32", Some("2001:db8:1::5"), None, true),
        ("2001:db8::/32", Some("2001:db9::5"), None, false),
        ("::/0", Some("10.1.2.7"), None, false),
    ];
    for (block, address, subnet, matches) in cases {
        let store = store_with(vec![rule(
            "block",
            Matcher::Subnet(block.into()),
            &["os@1.0"],
        )]);
        let inventory = Inventory {
            address: address.map(ip),
            subnet: subnet.map(str::to_owned),
            ..Inventory::default()
        };
        let resolution = resolve(&store, "edge-1", &inventory).expect("resolves");
        assert_eq!(
            !resolution.bundles().is_empty(),
            matches,
            "{block} against {address:?} / {subnet:?}"
        );
    }
}

#[test]
fn bad_rules_are_rejected_with_the_rule_named() {
    let cases: Vec<(Vec<Rule>, &str)> = vec![
        (
            vec![rule(
                "bad-block",
                Matcher::Subnet("10.1.0.0/33".into()),
                &["os@1"],
            )],
            "bad-block",
        ),
        (
            vec![rule(
                "no-prefix",
                Matcher::Subnet("10.1.0.0".into()),
                &["os@1"],
            )],
            "no-prefix",
        ),
        (
            vec![
                rule("twin", Matcher::Role("web".into()), &["os@1"]),
                rule("twin", Matcher::Role("db".into()), &["os@1"]),
            ],
            "twin",
        ),
        (
            vec![rule("empty", Matcher::Role("web".into()), &[])],
            "empty",
        ),
        (
            vec![rule(
                "two-os",
                Matcher::Role("web".into()),
                &["os@1", "os@2"],
            )],
            "two-os",
        ),
    ];
    for (rules, named) in cases {
        let store = store_with(rules);
        let error = resolve(&store, "edge-1", &full_inventory()).expect_err("invalid store");
        assert!(error.to_string().contains(named), "{named}: {error}");
    }
}

#[test]
fn no_matching_rule_is_no_image_with_the_facts_tried() {
    let store = store_with(vec![
        rule("db", Matcher::Role("db".into()), &["os@1.0"]),
        rule("hp", Matcher::Manufacturer("HP".into()), &["os@1.0"]),
    ]);
    let inventory = Inventory {
        role: Some("web".into()),
        model: Some("R640".into()),
        manufacturer: Some("Dell Inc.".into()),
        address: Some(ip("10.1.2.7")),
        subnet: Some("10.1.2.0/24".into()),
        ..Inventory::default()
    };
    let resolution = resolve(&store, "edge-9", &inventory).expect("resolves");
    let fact = |level, value: Option<&str>| Fact {
        level,
        value: value.map(str::to_owned),
    };
    assert_eq!(
        resolution,
        Resolution::NoImage {
            facts: vec![
                fact(MatcherKind::NodeOverride, Some("edge-9")),
                fact(MatcherKind::Class, None),
                fact(MatcherKind::Role, Some("web")),
                fact(MatcherKind::Model, Some("R640")),
                fact(MatcherKind::Manufacturer, Some("Dell Inc.")),
                fact(MatcherKind::Subnet, Some("10.1.2.7 in 10.1.2.0/24")),
            ]
        }
    );
    // A node that asks for features instead of matching a rule gets its packages.
    let mut store = feature_store();
    store.rules.clear();
    let with_features = Inventory {
        features: vec!["cyclic".into()],
        ..inventory
    };
    assert!(matches!(
        resolve(&store, "edge-9", &with_features),
        Ok(Resolution::Resolved { level: None, .. })
    ));
}

#[test]
fn check_lists_every_node_and_every_conflict() {
    let store = store_with(vec![
        rule("cache-a", Matcher::Class("cache".into()), &["os@1.0"]),
        rule("cache-b", Matcher::Class("cache".into()), &["os@2.0"]),
        rule("cache-c", Matcher::Class("cache".into()), &["os@1.0"]),
        rule("web", Matcher::Role("web".into()), &["os@3.0"]),
    ]);
    let node = |class: Option<&str>, role: Option<&str>| Inventory {
        class: class.map(str::to_owned),
        role: role.map(str::to_owned),
        ..Inventory::default()
    };
    let nodes = vec![
        ("conflicted".to_owned(), node(Some("cache"), Some("web"))),
        ("web-node".to_owned(), node(None, Some("web"))),
        ("lost".to_owned(), node(None, Some("db"))),
    ];
    let report = check(&store, &nodes);
    assert_eq!(report.nodes.len(), 3);
    assert!(!report.is_clean());
    assert!(matches!(
        report.nodes[0].result,
        Err(PolicyError::Conflict { .. })
    ));
    assert!(matches!(
        report.nodes[1].result,
        Ok(Resolution::Resolved { .. })
    ));
    assert!(matches!(
        report.nodes[2].result,
        Ok(Resolution::NoImage { .. })
    ));
    // a vs b and b vs c disagree; a and c agree.
    let pairs: Vec<(&str, &str)> = report
        .conflicts
        .iter()
        .map(|c| (c.first_rule.as_str(), c.second_rule.as_str()))
        .collect();
    assert_eq!(pairs, [("cache-a", "cache-b"), ("cache-b", "cache-c")]);
    assert!(report.conflicts.iter().all(|c| c.node == "conflicted"));

    let table = report.to_string();
    for needle in [
        "conflicted",
        "web-node",
        "os@3.0 (rule web)",
        "no-image",
        "role=db",
        "2 conflict(s)",
        "cache-b (os@2.0)",
    ] {
        assert!(table.contains(needle), "table lacks `{needle}`:\n{table}");
    }
    let json = serde_json::to_value(&report).expect("serializes");
    assert_eq!(json["conflicts"][0]["first_rule"], "cache-a");
    assert_eq!(json["nodes"][1]["result"]["Ok"]["result"], "resolved");
}

#[test]
fn versions_order_semver_then_debian() {
    // The full rule and its property tests live in `proto::version`; these are the cases a
    // policy meets: the newest version, `>=`, and release candidates of either scheme.
    let cases = [
        ("1.10", "1.9", Ordering::Greater),
        ("1.0", "1.0.1", Ordering::Less),
        ("2.0-rc1", "2.0", Ordering::Less),
        ("2.0~rc1", "2.0", Ordering::Less),
        ("2.0~rc1", "2.0-rc1", Ordering::Less),
        ("2.0", "2.beta", Ordering::Less),
        ("2.alpha", "2.beta", Ordering::Less),
        ("1:1.0", "9.0", Ordering::Greater),
        ("10", "9", Ordering::Greater),
        ("1.0", "1.0", Ordering::Equal),
        ("1.01", "1.1", Ordering::Less),
        ("123456789012345678901234567890", "99", Ordering::Greater),
        ("", "0", Ordering::Less),
    ];
    for (left, right, order) in cases {
        assert_eq!(compare_versions(left, right), order, "{left} vs {right}");
        assert_eq!(
            compare_versions(right, left),
            order.reverse(),
            "{right} vs {left}"
        );
    }
}

#[test]
fn the_newest_version_is_the_release_not_its_candidate() {
    // (published versions of `app`, the feature's requirement, the version chosen)
    let cases: [(&[&str], &str, &str); 5] = [
        (&["1.9", "2.0", "2.0-rc1"], "app", "2.0"),
        (&["1.9", "2.0-rc1", "2.0-rc2"], "app", "2.0-rc2"),
        (&["1.9", "2.0~rc1", "2.0"], "app", "2.0"),
        (&["1.9", "2.0-rc1"], "app>=2.0-rc1", "2.0-rc1"),
        (&["1:0.9", "2.0"], "app", "1:0.9"),
    ];
    for (published, requirement, chosen) in cases {
        let mut store = PolicyStore::new();
        for version in published {
            store.add_package("app", *version, Vec::new());
        }
        store.features.insert("app".into(), vec![req(requirement)]);
        let inventory = Inventory {
            features: vec!["app".into()],
            ..Inventory::default()
        };
        let resolution = resolve(&store, "edge-1", &inventory)
            .unwrap_or_else(|e| panic!("{published:?} {requirement}: {e}"));
        let got: Vec<String> = resolution.bundles().iter().map(|b| b.to_string()).collect();
        assert_eq!(
            got,
            [format!("app@{chosen}")],
            "{published:?} {requirement}"
        );
    }
    // `>=` a release refuses its candidates, and the refusal lists them oldest first.
    let mut store = PolicyStore::new();
    for version in ["2.0-rc2", "1.9", "2.0-rc1"] {
        store.add_package("app", version, Vec::new());
    }
    store.features.insert("app".into(), vec![req("app>=2.0")]);
    let inventory = Inventory {
        features: vec!["app".into()],
        ..Inventory::default()
    };
    match resolve(&store, "edge-1", &inventory) {
        Err(PolicyError::NoMatchingVersion { available, .. }) => {
            assert_eq!(available, ["1.9", "2.0-rc1", "2.0-rc2"]);
        }
        other => panic!("expected no matching version, got {other:?}"),
    }
}

#[test]
fn requirements_parse_and_print() {
    // (text, Some((name, constraint, printed)) or None when it must be refused)
    type Parsed = Option<(&'static str, Constraint, &'static str)>;
    let cases: Vec<(&str, Parsed)> = vec![
        ("base", Some(("base", Constraint::Any, "base"))),
        (
            "base@1.0",
            Some(("base", Constraint::Exact("1.0".into()), "base@1.0")),
        ),
        (
            " base >= 1.0 ",
            Some(("base", Constraint::AtLeast("1.0".into()), "base>=1.0")),
        ),
        ("", None),
        ("@1.0", None),
        ("base@", None),
        ("base>=", None),
        ("ba se", None),
        ("base@1 0", None),
        (
            "base>=2.0~rc1",
            Some((
                "base",
                Constraint::AtLeast("2.0~rc1".into()),
                "base>=2.0~rc1",
            )),
        ),
        (
            "base@1:2.0-3",
            Some(("base", Constraint::Exact("1:2.0-3".into()), "base@1:2.0-3")),
        ),
        ("ba~se", None),
    ];
    for (text, expected) in cases {
        match (text.parse::<Requirement>(), expected) {
            (Ok(parsed), Some((name, constraint, printed))) => {
                assert_eq!(parsed.name, name, "{text:?}");
                assert_eq!(parsed.constraint, constraint, "{text:?}");
                assert_eq!(parsed.to_string(), printed, "{text:?}");
            }
            (Err(error), None) => assert!(error.to_string().contains("name@version")),
            (got, expected) => panic!("{text:?}: got {got:?}, expected {expected:?}"),
        }
    }
}

#[test]
fn a_store_round_trips_through_json() {
    let mut store = feature_store();
    store.rules = one_rule_per_level();
    store.precedence = vec![MatcherKind::Role, MatcherKind::Subnet];
    let json = serde_json::to_string(&store).expect("serializes");
    let back: PolicyStore = serde_json::from_str(&json).expect("deserializes");
    assert_eq!(back, store);
    // Written by hand: defaults fill what is left out; a bad requirement is refused.
    let minimal: PolicyStore = serde_json::from_str(
        r#"{"rules":[{"id":"r","matcher":{"node-override":"n1"},"bundles":[{"name":"os","version":"1"}]}]}"#,
    )
    .expect("minimal store");
    assert_eq!(minimal.precedence, DEFAULT_PRECEDENCE);
    let bad = serde_json::from_str::<PolicyStore>(r#"{"features":{"f":["x>="]}}"#);
    assert!(bad.is_err());
}
