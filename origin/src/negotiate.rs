//! Boot-time negotiation (brief 002), pure: from a node's resolution and what it holds, the
//! answer it gets at start.
//!
//! The node boots as it is when it holds exactly the desired bundles (same ids); otherwise it
//! gets the bundles that differ (and learns which installed ones to keep and which to drop). A
//! node no rule matches gets "no image" with the facts tried (brief 004); a resolution error (a
//! conflict naming both rules, a package never published) is passed on as it is.

use std::collections::BTreeMap;

use proto::wire::{
    BootPlan, NodeBundle, PlannedBundle, MAX_FACTS, MAX_MESSAGE_BYTES, MAX_NODE_BUNDLES,
};

use crate::db::{NodeState, PackageRecord};
use crate::policy::{CaptureConfig, PolicyError, Reason, Resolution};

/// A negotiation's result: the answer, the desired bundles and the node's new state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// What the node is told.
    pub plan: BootPlan,
    /// What it should run.
    pub desired: Vec<NodeBundle>,
    /// Its state once told.
    pub state: NodeState,
    /// Why, when the state is a problem.
    pub detail: String,
}

/// Computes the answer for a node that holds `installed`, given its `resolution` and the
/// published `packages` by (name, version).
pub fn plan(
    resolution: &Result<Resolution, PolicyError>,
    installed: &[NodeBundle],
    packages: &BTreeMap<(String, String), PackageRecord>,
) -> Negotiated {
    let chosen = match resolution {
        Err(error) => return problem(NodeState::PolicyError, error.to_string()),
        Ok(Resolution::NoImage { facts }) => {
            let facts: Vec<String> = facts
                .iter()
                .take(MAX_FACTS)
                .map(|fact| format!("{}={}", fact.level, fact.value.as_deref().unwrap_or("-")))
                .collect();
            let detail = format!("no rule matches; tried {}", facts.join(" "));
            return Negotiated {
                plan: BootPlan::NoImage { facts },
                desired: Vec::new(),
                state: NodeState::NoImage,
                detail,
            };
        }
        Ok(Resolution::Resolved { bundles, .. }) => bundles,
    };
    if chosen.len() > MAX_NODE_BUNDLES {
        return problem(
            NodeState::PolicyError,
            format!(
                "the policy chooses {} bundles for this node, more than the {MAX_NODE_BUNDLES} a boot plan may list",
                chosen.len()
            ),
        );
    }
    let mut desired = Vec::with_capacity(chosen.len());
    let mut fetch = Vec::new();
    for resolved in chosen {
        let key = (
            resolved.bundle.name.clone(),
            resolved.bundle.version.clone(),
        );
        let Some(package) = packages.get(&key) else {
            return problem(
                NodeState::PolicyError,
                format!("{} was chosen but was never published", resolved.bundle),
            );
        };
        let wanted = package.node_bundle();
        if !installed.iter().any(|held| held.id == wanted.id) {
            fetch.push(PlannedBundle {
                bundle: wanted.clone(),
                stored_bytes: package.stored_bytes,
                reason: short_reason(&resolved.reason),
            });
        }
        desired.push(wanted);
    }
    let (keep, drop): (Vec<NodeBundle>, Vec<NodeBundle>) = installed
        .iter()
        .cloned()
        .partition(|held| desired.iter().any(|d| d.id == held.id));
    if fetch.is_empty() && drop.is_empty() {
        return Negotiated {
            plan: BootPlan::BootAsYouAre {
                bundles: desired.clone(),
            },
            desired,
            state: NodeState::InSync,
            detail: String::new(),
        };
    }
    Negotiated {
        plan: BootPlan::Fetch { fetch, keep, drop },
        desired,
        state: NodeState::Updating,
        detail: String::new(),
    }
}

/// For a node whose class may run encrypted bundles only (`[encryption] require_classes`,
/// issue 16): a plan that names an unencrypted bundle becomes a policy error saying which, so
/// the node is never told to fetch or boot one.
pub fn require_encrypted(
    negotiated: Negotiated,
    required: bool,
    packages: &BTreeMap<(String, String), PackageRecord>,
) -> Negotiated {
    if !required {
        return negotiated;
    }
    let plain: Vec<String> = negotiated
        .desired
        .iter()
        .filter(|bundle| {
            packages
                .get(&(bundle.name.clone(), bundle.version.clone()))
                .is_none_or(|package| !package.encrypted)
        })
        .map(ToString::to_string)
        .collect();
    if plain.is_empty() {
        return negotiated;
    }
    problem(
        NodeState::PolicyError,
        format!(
            "this node's class may run encrypted bundles only ([encryption] require_classes), but {} {} not encrypted: publish {} with `origin publish --encrypt`",
            plain.join(", "),
            if plain.len() == 1 { "is" } else { "are" },
            if plain.len() == 1 { "it" } else { "them" },
        ),
    )
}

/// Turns a "no image" into "no image, capture one" (brief 004) when the policy's capture table
/// allows the node's `class`; any other answer is returned as it is.
pub fn offer_capture(
    negotiated: Negotiated,
    capture: Option<&CaptureConfig>,
    class: Option<&str>,
) -> Negotiated {
    let Some(capture) = capture.filter(|c| c.allows(class)) else {
        return negotiated;
    };
    match negotiated.plan {
        BootPlan::NoImage { facts } => Negotiated {
            plan: BootPlan::NoImageCapture {
                facts,
                name: capture.name.clone(),
            },
            detail: format!(
                "{}; class {} may capture an image as {}",
                negotiated.detail,
                class.unwrap_or("-"),
                capture.name
            ),
            ..negotiated
        },
        plan => Negotiated { plan, ..negotiated },
    }
}

/// The state of a node that reports `installed` after being told `desired`.
pub fn state_after_update(installed: &[NodeBundle], desired: &[NodeBundle]) -> NodeState {
    let mut have: Vec<_> = installed.iter().map(|b| b.id).collect();
    let mut want: Vec<_> = desired.iter().map(|b| b.id).collect();
    have.sort();
    want.sort();
    if have == want {
        NodeState::InSync
    } else {
        NodeState::Updating
    }
}

fn problem(state: NodeState, mut message: String) -> Negotiated {
    // The node's decoder refuses longer messages.
    if message.len() > MAX_MESSAGE_BYTES {
        let mut cut = MAX_MESSAGE_BYTES - 16;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str(" ...");
    }
    Negotiated {
        plan: BootPlan::PolicyError {
            message: message.clone(),
        },
        desired: Vec::new(),
        state,
        detail: message,
    }
}

fn short_reason(reason: &Reason) -> String {
    match reason {
        Reason::Rule { rule, level } => format!("rule {rule} ({level})"),
        Reason::Feature { feature, .. } => format!("feature {feature}"),
        Reason::Dependency { of, .. } => format!("needed by {of}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{BundleRef, MatcherKind, ResolvedBundle};
    use proto::BlobHash;

    fn package(name: &str, version: &str) -> PackageRecord {
        PackageRecord {
            name: name.into(),
            version: version.into(),
            id: BlobHash::of(format!("{name}@{version}").as_bytes()),
            kind: "package".into(),
            depends: Vec::new(),
            stored_bytes: 100,
            raw_bytes: 200,
            seq: 1,
            published_ms: 0,
            encrypted: false,
            key_generation: None,
        }
    }

    #[test]
    fn a_class_that_requires_encryption_is_never_offered_a_plain_bundle() {
        let mut plain = package("os", "1");
        let mut sealed = package("os", "2");
        sealed.encrypted = true;
        plain.encrypted = false;
        for (package, refused) in [(plain, true), (sealed, false)] {
            let packages = catalog(std::slice::from_ref(&package));
            let negotiated = Negotiated {
                plan: BootPlan::BootAsYouAre {
                    bundles: vec![package.node_bundle()],
                },
                desired: vec![package.node_bundle()],
                state: NodeState::InSync,
                detail: String::new(),
            };
            let unchanged = require_encrypted(negotiated.clone(), false, &packages);
            assert_eq!(unchanged.state, NodeState::InSync);
            let checked = require_encrypted(negotiated, true, &packages);
            if refused {
                assert_eq!(checked.state, NodeState::PolicyError);
                assert!(checked.detail.contains("os@1"), "{}", checked.detail);
                assert!(checked.detail.contains("--encrypt"), "{}", checked.detail);
                assert!(matches!(checked.plan, BootPlan::PolicyError { .. }));
            } else {
                assert_eq!(checked.state, NodeState::InSync);
            }
        }
    }

    fn catalog(list: &[PackageRecord]) -> BTreeMap<(String, String), PackageRecord> {
        list.iter()
            .map(|p| ((p.name.clone(), p.version.clone()), p.clone()))
            .collect()
    }

    fn resolved(bundles: &[(&str, &str)]) -> Result<Resolution, PolicyError> {
        Ok(Resolution::Resolved {
            level: Some(MatcherKind::Role),
            rules: vec!["web".into()],
            bundles: bundles
                .iter()
                .map(|(n, v)| ResolvedBundle {
                    bundle: BundleRef::new(*n, *v),
                    reason: Reason::Rule {
                        rule: "web".into(),
                        level: MatcherKind::Role,
                    },
                })
                .collect(),
        })
    }

    #[test]
    fn a_node_holding_the_desired_bundles_boots_as_it_is_and_others_fetch_what_differs() {
        let (os1, os2, app1) = (package("os", "1"), package("os", "2"), package("app", "1"));
        let packages = catalog(&[os1.clone(), os2.clone(), app1.clone()]);
        let resolution = resolved(&[("os", "2"), ("app", "1")]);

        let in_sync = plan(
            &resolution,
            &[os2.node_bundle(), app1.node_bundle()],
            &packages,
        );
        assert_eq!(in_sync.state, NodeState::InSync);
        assert!(matches!(in_sync.plan, BootPlan::BootAsYouAre { .. }));

        let behind = plan(
            &resolution,
            &[os1.node_bundle(), app1.node_bundle()],
            &packages,
        );
        assert_eq!(behind.state, NodeState::Updating);
        let BootPlan::Fetch { fetch, keep, drop } = behind.plan else {
            panic!("expected a fetch plan, got {:?}", behind.plan);
        };
        assert_eq!(fetch.len(), 1);
        assert_eq!(fetch[0].bundle, os2.node_bundle());
        assert_eq!(keep, vec![app1.node_bundle()]);
        assert_eq!(drop, vec![os1.node_bundle()]);
        assert_eq!(
            state_after_update(&[app1.node_bundle(), os2.node_bundle()], &behind.desired),
            NodeState::InSync
        );
    }

    #[test]
    fn no_image_and_unpublished_bundles_are_named() {
        let packages = catalog(&[package("os", "1")]);
        let none = plan(
            &Ok(Resolution::NoImage {
                facts: vec![crate::policy::Fact {
                    level: MatcherKind::Role,
                    value: None,
                }],
            }),
            &[],
            &packages,
        );
        assert_eq!(none.state, NodeState::NoImage);
        let capture = CaptureConfig {
            classes: vec!["lab".into()],
            name: "captured-os".into(),
        };
        let offered = offer_capture(none.clone(), Some(&capture), Some("lab"));
        assert!(
            matches!(&offered.plan, BootPlan::NoImageCapture { name, .. } if name == "captured-os"),
            "{offered:?}"
        );
        assert_eq!(offered.state, NodeState::NoImage);
        assert!(offered.detail.contains("may capture"), "{}", offered.detail);
        let refused = offer_capture(none.clone(), Some(&capture), Some("prod"));
        assert_eq!(refused, none);
        assert_eq!(offer_capture(none.clone(), None, Some("lab")), none);
        assert_eq!(
            none.plan,
            BootPlan::NoImage {
                facts: vec!["role=-".into()]
            }
        );
        let missing = plan(&resolved(&[("os", "9")]), &[], &packages);
        assert_eq!(missing.state, NodeState::PolicyError);
        assert!(missing.detail.contains("os@9"), "{}", missing.detail);
    }
}
