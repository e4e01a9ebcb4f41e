//! What resolution reads: rules, their precedence, the feature map and the package catalog.

use std::collections::{BTreeMap, BTreeSet};

use proto::inventory::Inventory;
use serde::{Deserialize, Serialize};

use super::matcher::{Cidr, Matcher};
use super::{BundleRef, MatcherKind, PolicyError, Requirement};

/// The default precedence, highest first.
pub const DEFAULT_PRECEDENCE: [MatcherKind; 6] = [
    MatcherKind::NodeOverride,
    MatcherKind::Class,
    MatcherKind::Role,
    MatcherKind::Model,
    MatcherKind::Manufacturer,
    MatcherKind::Subnet,
];

/// One policy rule: nodes whose fact matches get these bundles.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Unique id, used in reports and errors.
    pub id: String,
    /// Which nodes the rule is for.
    pub matcher: Matcher,
    /// Exact bundles the nodes get.
    pub bundles: Vec<BundleRef>,
}

/// One version of a package in the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageVersion {
    /// Version, ordered by [`compare_versions`].
    pub version: String,
    /// Packages this version needs.
    #[serde(default)]
    pub depends: Vec<Requirement>,
}

/// Everything resolution reads: rules, their precedence, features and the package catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStore {
    /// Rules in the order they were defined (errors name the earlier rule first).
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Levels, highest first. Rules of a kind not listed are never consulted.
    #[serde(default = "default_precedence")]
    pub precedence: Vec<MatcherKind>,
    /// Feature name → the packages that provide it.
    #[serde(default)]
    pub features: BTreeMap<String, Vec<Requirement>>,
    /// Package name → every version kept (older ones too, for regression), with dependencies.
    #[serde(default)]
    pub packages: BTreeMap<String, Vec<PackageVersion>>,
}

impl Default for PolicyStore {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            precedence: default_precedence(),
            features: BTreeMap::new(),
            packages: BTreeMap::new(),
        }
    }
}

impl PolicyStore {
    /// An empty store with the default precedence.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `version` of package `name` with its dependencies to the catalog.
    pub fn add_package(
        &mut self,
        name: impl Into<String>,
        version: impl Into<String>,
        depends: Vec<Requirement>,
    ) -> &mut Self {
        self.packages
            .entry(name.into())
            .or_default()
            .push(PackageVersion {
                version: version.into(),
                depends,
            });
        self
    }

    /// Checks what does not depend on a node: precedence levels listed once, rule ids unique,
    /// every rule names at least one bundle and each bundle name once, subnet rules are valid
    /// CIDR, and the catalog lists each package version once. [`resolve`] calls it first.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let mut levels = BTreeSet::new();
        for kind in &self.precedence {
            if !levels.insert(*kind) {
                return Err(PolicyError::DuplicateLevel { level: *kind });
            }
        }
        let mut ids = BTreeSet::new();
        for rule in &self.rules {
            if !ids.insert(rule.id.as_str()) {
                return Err(PolicyError::DuplicateRule {
                    rule: rule.id.clone(),
                });
            }
            if rule.bundles.is_empty() {
                return Err(PolicyError::EmptyRule {
                    rule: rule.id.clone(),
                });
            }
            let mut names = BTreeSet::new();
            for bundle in &rule.bundles {
                if !names.insert(bundle.name.as_str()) {
                    return Err(PolicyError::BundleTwiceInRule {
                        rule: rule.id.clone(),
                        name: bundle.name.clone(),
                    });
                }
            }
            if let Matcher::Subnet(cidr) = &rule.matcher {
                if let Err(why) = cidr.parse::<Cidr>() {
                    return Err(PolicyError::BadSubnet {
                        rule: rule.id.clone(),
                        cidr: cidr.clone(),
                        why,
                    });
                }
            }
        }
        for (name, versions) in &self.packages {
            let mut seen = BTreeSet::new();
            for package in versions {
                if !seen.insert(package.version.as_str()) {
                    return Err(PolicyError::DuplicatePackageVersion {
                        bundle: BundleRef::new(name, &package.version),
                    });
                }
            }
        }
        Ok(())
    }

    /// The highest level with a matching rule, and every rule that matches on it.
    pub(super) fn winning_rules(
        &self,
        node_id: &str,
        inventory: &Inventory,
    ) -> Option<(MatcherKind, Vec<&Rule>)> {
        self.precedence.iter().find_map(|level| {
            let matching: Vec<&Rule> = self
                .rules
                .iter()
                .filter(|rule| {
                    rule.matcher.kind() == *level && rule.matcher.matches(node_id, inventory)
                })
                .collect();
            (!matching.is_empty()).then_some((*level, matching))
        })
    }
}

pub(super) fn default_precedence() -> Vec<MatcherKind> {
    DEFAULT_PRECEDENCE.to_vec()
}

pub(super) fn same_bundles(first: &Rule, second: &Rule) -> bool {
    let mut a = first.bundles.clone();
    let mut b = second.bundles.clone();
    a.sort();
    b.sort();
    a == b
}

/// Every pair of rules (in definition order) that name different bundles.
pub(super) fn disagreeing_pairs<'r>(rules: &[&'r Rule]) -> Vec<(&'r Rule, &'r Rule)> {
    let mut pairs = Vec::new();
    for (i, first) in rules.iter().enumerate() {
        for second in &rules[i + 1..] {
            if !same_bundles(first, second) {
                pairs.push((*first, *second));
            }
        }
    }
    pairs
}
