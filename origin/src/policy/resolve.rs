//! One node's resolution: the winning rules, then features, then dependencies.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use proto::inventory::Inventory;
use serde::{Deserialize, Serialize};

use super::store::disagreeing_pairs;
use super::{compare_versions, list, BundleRef, MatcherKind, PolicyStore, Requirement, Rule};

/// Why a bundle is in a resolution, or who asked for a package an error is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "kebab-case")]
pub enum Reason {
    /// A rule chose it.
    Rule {
        /// The rule's id.
        rule: String,
        /// The level the rule won on.
        level: MatcherKind,
    },
    /// A feature the node asked for needs it.
    Feature {
        /// The feature.
        feature: String,
        /// The feature's requirement it satisfies.
        requirement: Requirement,
    },
    /// Another chosen bundle depends on it.
    Dependency {
        /// The bundle that depends on it.
        of: BundleRef,
        /// The dependency it satisfies.
        requirement: Requirement,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Rule { rule, level } => write!(f, "rule `{rule}` ({level})"),
            Reason::Feature {
                feature,
                requirement,
            } => write!(f, "feature `{feature}` (`{requirement}`)"),
            Reason::Dependency { of, requirement } => {
                write!(f, "dependency `{requirement}` of {of}")
            }
        }
    }
}

/// One bundle of a resolution and why it was chosen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedBundle {
    /// The bundle.
    pub bundle: BundleRef,
    /// Who chose it.
    pub reason: Reason,
}

/// A fact resolution looked at, for a "no image" answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fact {
    /// The level.
    pub level: MatcherKind,
    /// The node's value for it (`None`: the node did not report it).
    pub value: Option<String>,
}

/// What a node should run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Resolution {
    /// These bundles, each with the reason it was chosen.
    Resolved {
        /// The level whose rules chose the image (`None`: no rule matched, only features).
        level: Option<MatcherKind>,
        /// Every rule that matched on that level (they all agree).
        rules: Vec<String>,
        /// Rule bundles first, then feature packages, then dependencies.
        bundles: Vec<ResolvedBundle>,
    },
    /// No rule matched and the node asked for no feature: the origin answers "no image", and
    /// the node may build and capture one (brief 004).
    NoImage {
        /// Each level in precedence order with the node's value for it.
        facts: Vec<Fact>,
    },
}

impl Resolution {
    /// The chosen bundles (none for [`Resolution::NoImage`]).
    pub fn bundles(&self) -> Vec<&BundleRef> {
        match self {
            Resolution::Resolved { bundles, .. } => bundles.iter().map(|b| &b.bundle).collect(),
            Resolution::NoImage { .. } => Vec::new(),
        }
    }
}

/// Why a node's resolution failed. Every variant names what to fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "error", rename_all = "kebab-case")]
pub enum PolicyError {
    /// Two rules match on the winning level and name different bundles.
    #[error(
        "rules `{first_rule}` and `{second_rule}` both match at level {level} but disagree \
         ({first_rule}: {}; {second_rule}: {}); change one of them or the precedence",
        list(first_bundles),
        list(second_bundles)
    )]
    Conflict {
        /// The level both rules are on.
        level: MatcherKind,
        /// The rule defined first.
        first_rule: String,
        /// The rule defined second.
        second_rule: String,
        /// What the first rule names.
        first_bundles: Vec<BundleRef>,
        /// What the second rule names.
        second_bundles: Vec<BundleRef>,
    },
    /// The node asks for a feature the store does not define.
    #[error("the node asks for feature `{feature}`, which the policy store does not define")]
    UnknownFeature {
        /// The feature.
        feature: String,
    },
    /// A required package is not in the catalog at all.
    #[error("package `{name}`, needed by {required_by}, is not in the package catalog")]
    UnknownPackage {
        /// The package name.
        name: String,
        /// Who needs it.
        required_by: Box<Reason>,
    },
    /// The catalog has the package but no version the requirement accepts.
    #[error(
        "no version of `{}` satisfies `{requirement}`, needed by {required_by} (catalog has: {})",
        requirement.name,
        if available.is_empty() { "none".to_owned() } else { available.join(", ") }
    )]
    NoMatchingVersion {
        /// The requirement.
        requirement: Requirement,
        /// Who needs it.
        required_by: Box<Reason>,
        /// Versions in the catalog, oldest first.
        available: Vec<String>,
    },
    /// A requirement rejects the version of that package already chosen.
    #[error(
        "`{requirement}`, needed by {required_by}, rejects {chosen}, already chosen by \
         {chosen_by}; make the two agree"
    )]
    Unsatisfiable {
        /// The requirement that failed.
        requirement: Requirement,
        /// Who needs it.
        required_by: Box<Reason>,
        /// The version already chosen.
        chosen: BundleRef,
        /// Who chose it.
        chosen_by: Box<Reason>,
    },
    /// The precedence lists a level twice.
    #[error("the precedence lists level {level} twice")]
    DuplicateLevel {
        /// The level.
        level: MatcherKind,
    },
    /// Two rules share an id.
    #[error("two rules have the id `{rule}`; rule ids must be unique")]
    DuplicateRule {
        /// The id.
        rule: String,
    },
    /// A rule names no bundle.
    #[error("rule `{rule}` names no bundle")]
    EmptyRule {
        /// The rule.
        rule: String,
    },
    /// A rule names two versions of one bundle.
    #[error("rule `{rule}` names bundle `{name}` more than once")]
    BundleTwiceInRule {
        /// The rule.
        rule: String,
        /// The bundle name.
        name: String,
    },
    /// A subnet rule's block is not CIDR.
    #[error("rule `{rule}`: `{cidr}` is not a CIDR block: {why}")]
    BadSubnet {
        /// The rule.
        rule: String,
        /// The text as given.
        cidr: String,
        /// What is wrong with it.
        why: String,
    },
    /// The catalog lists a package version twice.
    #[error("the package catalog lists {bundle} twice")]
    DuplicatePackageVersion {
        /// The package version.
        bundle: BundleRef,
    },
}

/// Resolves what `node_id` should run, given its inventory.
///
/// See the module documentation for the order of rules, features and dependencies.
pub fn resolve(
    store: &PolicyStore,
    node_id: &str,
    inventory: &Inventory,
) -> Result<Resolution, PolicyError> {
    store.validate()?;
    let winner = store.winning_rules(node_id, inventory);
    if let Some((level, rules)) = &winner {
        if let Some((first, second)) = disagreeing_pairs(rules).into_iter().next() {
            return Err(conflict(*level, first, second));
        }
    }
    if winner.is_none() && inventory.features.is_empty() {
        return Ok(Resolution::NoImage {
            facts: tried_facts(store, node_id, inventory),
        });
    }

    let mut picker = Picker::new(store);
    if let Some((level, rules)) = &winner {
        // Every rule on the level agrees; the first defined is named as the chooser.
        let chooser = rules[0];
        for bundle in &chooser.bundles {
            picker.require(
                Requirement::exact(&bundle.name, &bundle.version),
                Reason::Rule {
                    rule: chooser.id.clone(),
                    level: *level,
                },
            )?;
        }
    }
    let mut asked = BTreeSet::new();
    for feature in &inventory.features {
        if !asked.insert(feature.as_str()) {
            continue;
        }
        let requirements =
            store
                .features
                .get(feature)
                .ok_or_else(|| PolicyError::UnknownFeature {
                    feature: feature.clone(),
                })?;
        for requirement in requirements {
            picker.require(
                requirement.clone(),
                Reason::Feature {
                    feature: feature.clone(),
                    requirement: requirement.clone(),
                },
            )?;
        }
    }
    picker.add_dependencies()?;

    let (level, rules) = match winner {
        Some((level, rules)) => (Some(level), rules.iter().map(|r| r.id.clone()).collect()),
        None => (None, Vec::new()),
    };
    Ok(Resolution::Resolved {
        level,
        rules,
        bundles: picker.chosen,
    })
}

/// Chooses one version per package name, greedily, remembering who chose it.
struct Picker<'a> {
    store: &'a PolicyStore,
    chosen: Vec<ResolvedBundle>,
    index_by_name: BTreeMap<String, usize>,
    /// Chosen bundles whose dependencies are not added yet, as indexes into `chosen`.
    unexpanded: VecDeque<usize>,
}

impl<'a> Picker<'a> {
    fn new(store: &'a PolicyStore) -> Self {
        Self {
            store,
            chosen: Vec::new(),
            index_by_name: BTreeMap::new(),
            unexpanded: VecDeque::new(),
        }
    }

    /// Adds the newest version `requirement` accepts, unless a version of that package is
    /// already chosen, in which case it must satisfy `requirement`.
    fn require(
        &mut self,
        requirement: Requirement,
        required_by: Reason,
    ) -> Result<(), PolicyError> {
        if let Some(&index) = self.index_by_name.get(&requirement.name) {
            let existing = &self.chosen[index];
            if requirement.allows(&existing.bundle.version) {
                return Ok(());
            }
            return Err(PolicyError::Unsatisfiable {
                requirement,
                required_by: Box::new(required_by),
                chosen: existing.bundle.clone(),
                chosen_by: Box::new(existing.reason.clone()),
            });
        }
        let Some(versions) = self.store.packages.get(&requirement.name) else {
            return Err(PolicyError::UnknownPackage {
                name: requirement.name,
                required_by: Box::new(required_by),
            });
        };
        let Some(newest) = versions
            .iter()
            .filter(|package| requirement.allows(&package.version))
            .max_by(|a, b| compare_versions(&a.version, &b.version))
        else {
            let mut available: Vec<String> = versions.iter().map(|p| p.version.clone()).collect();
            available.sort_by(|a, b| compare_versions(a, b));
            return Err(PolicyError::NoMatchingVersion {
                requirement,
                required_by: Box::new(required_by),
                available,
            });
        };
        let bundle = BundleRef::new(&requirement.name, &newest.version);
        self.index_by_name
            .insert(requirement.name.clone(), self.chosen.len());
        self.unexpanded.push_back(self.chosen.len());
        self.chosen.push(ResolvedBundle {
            bundle,
            reason: required_by,
        });
        Ok(())
    }

    /// Adds dependencies breadth-first until every chosen bundle's are in. Each package name is
    /// chosen once, so cycles end.
    fn add_dependencies(&mut self) -> Result<(), PolicyError> {
        while let Some(index) = self.unexpanded.pop_front() {
            let bundle = self.chosen[index].bundle.clone();
            let store = self.store;
            let package = store
                .packages
                .get(&bundle.name)
                .and_then(|versions| versions.iter().find(|p| p.version == bundle.version));
            // `require` only chooses versions from the catalog, so the package is there.
            let Some(package) = package else {
                continue;
            };
            for dependency in &package.depends {
                self.require(
                    dependency.clone(),
                    Reason::Dependency {
                        of: bundle.clone(),
                        requirement: dependency.clone(),
                    },
                )?;
            }
        }
        Ok(())
    }
}

pub(super) fn conflict(level: MatcherKind, first: &Rule, second: &Rule) -> PolicyError {
    PolicyError::Conflict {
        level,
        first_rule: first.id.clone(),
        second_rule: second.id.clone(),
        first_bundles: first.bundles.clone(),
        second_bundles: second.bundles.clone(),
    }
}

pub(super) fn tried_facts(store: &PolicyStore, node_id: &str, inventory: &Inventory) -> Vec<Fact> {
    store
        .precedence
        .iter()
        .map(|level| Fact {
            level: *level,
            value: match level {
                MatcherKind::NodeOverride => Some(node_id.to_owned()),
                MatcherKind::Class => inventory.class.clone(),
                MatcherKind::Role => inventory.role.clone(),
                MatcherKind::Model => inventory.model.clone(),
                MatcherKind::Manufacturer => inventory.manufacturer.clone(),
                MatcherKind::Subnet => match (&inventory.address, &inventory.subnet) {
                    (Some(address), Some(subnet)) => Some(format!("{address} in {subnet}")),
                    (Some(address), None) => Some(address.to_string()),
                    (None, subnet) => subnet.clone(),
                },
            },
        })
        .collect()
}
