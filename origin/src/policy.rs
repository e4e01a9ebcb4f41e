//! Policy resolution: which bundles a node runs, decided from its inventory (seeds 002 and 004).
//!
//! Pure: no I/O, no clock. The origin loads a [`PolicyStore`] (rules, their precedence, the
//! feature map and the package catalog), and [`resolve`] answers for one node:
//!
//! 1. **Rules.** Each [`Rule`] matches one inventory fact ([`Matcher`]) and names bundles. Levels
//!    are tried in [`PolicyStore::precedence`] order (by default node override > class > role >
//!    model > manufacturer > subnet); the first level with any matching rule wins and the levels
//!    below it are not consulted. Two matching rules on the winning level must name the same
//!    bundles, or the answer is [`PolicyError::Conflict`] naming both: ambiguity is never
//!    resolved silently.
//! 2. **Features.** A node may ask for features ([`Inventory::features`]); each maps to package
//!    requirements, added on top of the rule's bundles (or instead of them, when no rule matches).
//! 3. **Dependencies.** Every chosen bundle's dependencies, from the package catalog, are added
//!    transitively, each at the newest version that satisfies its [`Requirement`].
//!
//! At most one version of each package name is chosen. Requirements are taken greedily in that
//! order (rule bundles, then features in the order the node lists them, then dependencies
//! breadth-first): a later requirement that the version already chosen does not satisfy is an
//! error ([`PolicyError::Unsatisfiable`]) naming both sides, not a search for another version.
//! No rule and no feature gives [`Resolution::NoImage`] with the facts that were tried (seed 004).
//!
//! [`check`] runs the resolution for many nodes and lists every conflict, for
//! `origin policy check`.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use proto::inventory::Inventory;
use serde::{Deserialize, Serialize};

/// The default precedence, highest first.
pub const DEFAULT_PRECEDENCE: [MatcherKind; 6] = [
    MatcherKind::NodeOverride,
    MatcherKind::Class,
    MatcherKind::Role,
    MatcherKind::Model,
    MatcherKind::Manufacturer,
    MatcherKind::Subnet,
];

/// A bundle by name and exact version.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BundleRef {
    /// Bundle name, e.g. `ubuntu-base`.
    pub name: String,
    /// Version, ordered by [`compare_versions`].
    pub version: String,
}

impl BundleRef {
    /// `name` at `version`.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
        }
    }
}

impl fmt::Display for BundleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// The one ordering of versions (semver when both sides are, Debian's otherwise); see
/// [`proto::version`].
pub use proto::version::compare_versions;

/// Which package versions a dependency or a feature accepts.
///
/// Written `name` (the newest version), `name@version` (exactly that version) or
/// `name>=version` (that version or a newer one, by [`compare_versions`]). Serialized as that
/// text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Requirement {
    /// Package name.
    pub name: String,
    /// Accepted versions.
    pub constraint: Constraint,
}

/// The version part of a [`Requirement`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Constraint {
    /// Any version; the newest is chosen.
    Any,
    /// Exactly this version.
    Exact(String),
    /// This version or a newer one.
    AtLeast(String),
}

/// A [`Requirement`] that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad requirement `{text}`: {why} (write `name`, `name@version` or `name>=version`)")]
pub struct RequirementError {
    /// The text as given.
    pub text: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl Requirement {
    /// Any version of `name` (the newest is chosen).
    pub fn any(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            constraint: Constraint::Any,
        }
    }

    /// Exactly `version` of `name`.
    pub fn exact(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            constraint: Constraint::Exact(version.into()),
        }
    }

    /// `version` of `name` or newer.
    pub fn at_least(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            constraint: Constraint::AtLeast(version.into()),
        }
    }

    /// True when `version` of this package satisfies the requirement.
    pub fn allows(&self, version: &str) -> bool {
        match &self.constraint {
            Constraint::Any => true,
            Constraint::Exact(exact) => version == exact,
            Constraint::AtLeast(minimum) => compare_versions(version, minimum) != Ordering::Less,
        }
    }
}

impl FromStr for Requirement {
    type Err = RequirementError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |why| RequirementError {
            text: text.to_owned(),
            why,
        };
        let trimmed = text.trim();
        // (name, Some((version, at_least))) for the versioned forms.
        let (name, versioned) = if let Some((name, version)) = trimmed.split_once(">=") {
            (name.trim(), Some((version.trim(), true)))
        } else if let Some((name, version)) = trimmed.split_once('@') {
            (name.trim(), Some((version.trim(), false)))
        } else {
            (trimmed, None)
        };
        if name.is_empty() {
            return Err(bad("the package name is empty"));
        }
        if !name.chars().all(is_name_char) {
            return Err(bad(
                "the package name has a character outside letters, digits and `-_.+`",
            ));
        }
        let constraint = match versioned {
            None => Constraint::Any,
            Some(("", _)) => return Err(bad("the version is empty")),
            Some((version, _)) if !version.chars().all(is_version_char) => {
                return Err(bad(
                    "the version has a character outside letters, digits and `-_.+~:`",
                ))
            }
            Some((version, true)) => Constraint::AtLeast(version.to_owned()),
            Some((version, false)) => Constraint::Exact(version.to_owned()),
        };
        Ok(Self {
            name: name.to_owned(),
            constraint,
        })
    }
}

impl TryFrom<String> for Requirement {
    type Error = RequirementError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Requirement> for String {
    fn from(requirement: Requirement) -> Self {
        requirement.to_string()
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.constraint {
            Constraint::Any => write!(f, "{}", self.name),
            Constraint::Exact(version) => write!(f, "{}@{version}", self.name),
            Constraint::AtLeast(version) => write!(f, "{}>={version}", self.name),
        }
    }
}

/// The inventory fact a rule matches, with the value it must have.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Matcher {
    /// The node with this id.
    NodeOverride(String),
    /// Nodes configured with this class.
    Class(String),
    /// Nodes configured with this role.
    Role(String),
    /// Nodes whose DMI product name is exactly this.
    Model(String),
    /// Nodes whose DMI system vendor is exactly this.
    Manufacturer(String),
    /// Nodes whose address lies in this CIDR block (or whose whole subnet does, when the node
    /// reported no address), e.g. `10.1.0.0/16`.
    Subnet(String),
}

impl Matcher {
    /// The level this matcher belongs to.
    pub fn kind(&self) -> MatcherKind {
        match self {
            Matcher::NodeOverride(_) => MatcherKind::NodeOverride,
            Matcher::Class(_) => MatcherKind::Class,
            Matcher::Role(_) => MatcherKind::Role,
            Matcher::Model(_) => MatcherKind::Model,
            Matcher::Manufacturer(_) => MatcherKind::Manufacturer,
            Matcher::Subnet(_) => MatcherKind::Subnet,
        }
    }

    /// The value the fact must have.
    pub fn value(&self) -> &str {
        match self {
            Matcher::NodeOverride(v)
            | Matcher::Class(v)
            | Matcher::Role(v)
            | Matcher::Model(v)
            | Matcher::Manufacturer(v)
            | Matcher::Subnet(v) => v,
        }
    }

    /// True when the node matches. A subnet matcher that is not valid CIDR matches nothing
    /// ([`PolicyStore::validate`] reports it).
    pub fn matches(&self, node_id: &str, inventory: &Inventory) -> bool {
        let same = |fact: &Option<String>, wanted: &str| fact.as_deref() == Some(wanted);
        match self {
            Matcher::NodeOverride(id) => id == node_id,
            Matcher::Class(class) => same(&inventory.class, class),
            Matcher::Role(role) => same(&inventory.role, role),
            Matcher::Model(model) => same(&inventory.model, model),
            Matcher::Manufacturer(vendor) => same(&inventory.manufacturer, vendor),
            Matcher::Subnet(cidr) => cidr
                .parse::<Cidr>()
                .is_ok_and(|block| node_in_block(&block, inventory)),
        }
    }
}

/// A level of precedence: the kind of fact a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MatcherKind {
    /// A rule for one node.
    NodeOverride,
    /// A rule for a configured class.
    Class,
    /// A rule for a configured role.
    Role,
    /// A rule for a DMI model.
    Model,
    /// A rule for a DMI manufacturer.
    Manufacturer,
    /// A rule for a CIDR block.
    Subnet,
}

impl MatcherKind {
    /// The kebab-case name used in configuration, reports and logs.
    pub fn name(self) -> &'static str {
        match self {
            MatcherKind::NodeOverride => "node-override",
            MatcherKind::Class => "class",
            MatcherKind::Role => "role",
            MatcherKind::Model => "model",
            MatcherKind::Manufacturer => "manufacturer",
            MatcherKind::Subnet => "subnet",
        }
    }
}

impl fmt::Display for MatcherKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MatcherKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        DEFAULT_PRECEDENCE
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| {
                let known: Vec<_> = DEFAULT_PRECEDENCE.iter().map(|k| k.name()).collect();
                format!(
                    "unknown policy level `{name}` (known: {})",
                    known.join(", ")
                )
            })
    }
}

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

/// Which nodes may capture an image when no rule matches them (seed 004), from the policy
/// file's `[capture]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureConfig {
    /// Classes whose nodes may run their install script and publish the result.
    pub classes: Vec<String>,
    /// The bundle name captured images are published under.
    #[serde(default = "default_capture_name")]
    pub name: String,
}

/// The bundle name of captured images when the policy names none.
pub const DEFAULT_CAPTURE_NAME: &str = "captured-os";

fn default_capture_name() -> String {
    DEFAULT_CAPTURE_NAME.to_owned()
}

impl CaptureConfig {
    /// True when a node of `class` may capture.
    pub fn allows(&self, class: Option<&str>) -> bool {
        class.is_some_and(|class| self.classes.iter().any(|c| c == class))
    }
}

/// Metadata keys of a captured image's manifest: the capturing node and its inventory facts.
pub mod capture_keys {
    /// The capturing node's id; its presence marks a captured image.
    pub const NODE: &str = "capture.node";
    /// DMI model.
    pub const MODEL: &str = "capture.model";
    /// DMI manufacturer.
    pub const MANUFACTURER: &str = "capture.manufacturer";
    /// Configured class.
    pub const CLASS: &str = "capture.class";
}

/// The rule that gives a captured image to the next node with the same facts: it matches the
/// most specific fact the capturing node reported and the precedence consults (model, else
/// manufacturer, else class). `None` when the image carries no such fact.
pub fn captured_rule(
    metadata: &BTreeMap<String, String>,
    precedence: &[MatcherKind],
    bundle: BundleRef,
) -> Option<Rule> {
    metadata.get(capture_keys::NODE)?;
    let candidates = [
        (MatcherKind::Model, capture_keys::MODEL),
        (MatcherKind::Manufacturer, capture_keys::MANUFACTURER),
        (MatcherKind::Class, capture_keys::CLASS),
    ];
    candidates.into_iter().find_map(|(kind, key)| {
        let value = metadata.get(key).filter(|v| !v.is_empty())?;
        if !precedence.contains(&kind) {
            return None;
        }
        let matcher = match kind {
            MatcherKind::Model => Matcher::Model(value.clone()),
            MatcherKind::Manufacturer => Matcher::Manufacturer(value.clone()),
            _ => Matcher::Class(value.clone()),
        };
        Some(Rule {
            id: format!("captured-{}-{}", kind.name(), value),
            matcher,
            bundles: vec![bundle.clone()],
        })
    })
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
    fn winning_rules(
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
    /// the node may build and capture one (seed 004).
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

/// Every node's resolution and every conflict, for `origin policy check`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PolicyReport {
    /// One entry per node, in the order given.
    pub nodes: Vec<NodeCheck>,
    /// Every pair of disagreeing rules on a node's winning level.
    pub conflicts: Vec<NodeConflict>,
}

/// One node's line in a [`PolicyReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeCheck {
    /// The node.
    pub node: String,
    /// Its resolution, or why there is none.
    pub result: Result<Resolution, PolicyError>,
}

/// Two rules that match one node on its winning level and disagree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeConflict {
    /// The node.
    pub node: String,
    /// The level.
    pub level: MatcherKind,
    /// The rule defined first.
    pub first_rule: String,
    /// The rule defined second.
    pub second_rule: String,
    /// What the first rule names.
    pub first_bundles: Vec<BundleRef>,
    /// What the second rule names.
    pub second_bundles: Vec<BundleRef>,
}

impl PolicyReport {
    /// True when every node resolved (to bundles or to "no image") without an error.
    pub fn is_clean(&self) -> bool {
        self.nodes.iter().all(|n| n.result.is_ok())
    }
}

/// Resolves every node and lists every conflict: all disagreeing pairs on each node's winning
/// level, where [`resolve`] stops at the first.
pub fn check(store: &PolicyStore, nodes: &[(String, Inventory)]) -> PolicyReport {
    let store_is_valid = store.validate().is_ok();
    let mut report = PolicyReport::default();
    for (node, inventory) in nodes {
        if store_is_valid {
            if let Some((level, rules)) = store.winning_rules(node, inventory) {
                for (first, second) in disagreeing_pairs(&rules) {
                    report.conflicts.push(NodeConflict {
                        node: node.clone(),
                        level,
                        first_rule: first.id.clone(),
                        second_rule: second.id.clone(),
                        first_bundles: first.bundles.clone(),
                        second_bundles: second.bundles.clone(),
                    });
                }
            }
        }
        report.nodes.push(NodeCheck {
            node: node.clone(),
            result: resolve(store, node, inventory),
        });
    }
    report
}

impl fmt::Display for PolicyReport {
    /// A table: node, outcome, level, and the bundles with their reasons (or the facts tried,
    /// or the error); then the conflicts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows = vec![[
            "NODE".to_owned(),
            "RESULT".to_owned(),
            "LEVEL".to_owned(),
            "DETAIL".to_owned(),
        ]];
        for check in &self.nodes {
            let (outcome, level, detail) = match &check.result {
                Ok(Resolution::Resolved { level, bundles, .. }) => (
                    "resolved",
                    level.map_or("-", MatcherKind::name),
                    bundles
                        .iter()
                        .map(|b| format!("{} ({})", b.bundle, short_reason(&b.reason)))
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                Ok(Resolution::NoImage { facts }) => (
                    "no-image",
                    "-",
                    format!(
                        "tried {}",
                        facts
                            .iter()
                            .map(|fact| format!(
                                "{}={}",
                                fact.level,
                                fact.value.as_deref().unwrap_or("-")
                            ))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                ),
                Err(error) => ("error", "-", error.to_string()),
            };
            rows.push([
                check.node.clone(),
                outcome.to_owned(),
                level.to_owned(),
                detail,
            ]);
        }
        write_table(f, &rows)?;
        if self.conflicts.is_empty() {
            return writeln!(f, "\nno conflicts");
        }
        writeln!(f, "\n{} conflict(s):", self.conflicts.len())?;
        let mut rows = vec![[
            "NODE".to_owned(),
            "LEVEL".to_owned(),
            "FIRST RULE".to_owned(),
            "SECOND RULE".to_owned(),
        ]];
        for conflict in &self.conflicts {
            rows.push([
                conflict.node.clone(),
                conflict.level.to_string(),
                format!(
                    "{} ({})",
                    conflict.first_rule,
                    list(&conflict.first_bundles)
                ),
                format!(
                    "{} ({})",
                    conflict.second_rule,
                    list(&conflict.second_bundles)
                ),
            ]);
        }
        write_table(f, &rows)
    }
}

/// An IPv4 or IPv6 CIDR block, e.g. `10.1.0.0/16`. Host bits in the text are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// True when `address` lies in the block. IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        let (bits, width) = address_bits(address);
        let (network_bits, network_width) = address_bits(self.network);
        width == network_width && bits & mask(self.prefix_len, width) == network_bits
    }

    /// True when every address of `other` lies in this block.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.prefix_len >= self.prefix_len && self.contains(other.network)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = text
            .trim()
            .split_once('/')
            .ok_or("missing `/prefix-length`")?;
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("`{address}` is not an IP address"))?;
        let address = canonical(address);
        let prefix_len: u8 = prefix
            .parse()
            .map_err(|_| format!("`{prefix}` is not a prefix length"))?;
        let (bits, width) = address_bits(address);
        if prefix_len > width {
            return Err(format!("prefix length {prefix_len} exceeds {width} bits"));
        }
        let network_bits = bits & mask(prefix_len, width);
        let network = match address {
            IpAddr::V4(_) => IpAddr::from((network_bits as u32).to_be_bytes()),
            IpAddr::V6(_) => IpAddr::from(network_bits.to_be_bytes()),
        };
        Ok(Self {
            network,
            prefix_len,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
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

fn default_precedence() -> Vec<MatcherKind> {
    DEFAULT_PRECEDENCE.to_vec()
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+')
}

/// A name character, or `~` and `:` of Debian versions (`2.0~rc1`, `1:2.0`).
fn is_version_char(c: char) -> bool {
    is_name_char(c) || matches!(c, '~' | ':')
}

/// True when the node's address lies in `block`, or, when it reported no address, when its
/// whole subnet does. Facts come from the node: one that does not parse simply does not match.
fn node_in_block(block: &Cidr, inventory: &Inventory) -> bool {
    if let Some(address) = inventory.address {
        return block.contains(address);
    }
    inventory
        .subnet
        .as_deref()
        .and_then(|subnet| subnet.parse::<Cidr>().ok())
        .is_some_and(|subnet| block.covers(&subnet))
}

fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

/// The address as an integer and its width in bits.
fn address_bits(address: IpAddr) -> (u128, u8) {
    match address {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

/// The network mask of `prefix_len` bits in an address `width` bits wide.
fn mask(prefix_len: u8, width: u8) -> u128 {
    debug_assert!(prefix_len <= width && width <= 128);
    if prefix_len == 0 {
        return 0;
    }
    (u128::MAX << (128 - u32::from(prefix_len))) >> (128 - u32::from(width))
}

fn same_bundles(first: &Rule, second: &Rule) -> bool {
    let mut a = first.bundles.clone();
    let mut b = second.bundles.clone();
    a.sort();
    b.sort();
    a == b
}

/// Every pair of rules (in definition order) that name different bundles.
fn disagreeing_pairs<'r>(rules: &[&'r Rule]) -> Vec<(&'r Rule, &'r Rule)> {
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

fn conflict(level: MatcherKind, first: &Rule, second: &Rule) -> PolicyError {
    PolicyError::Conflict {
        level,
        first_rule: first.id.clone(),
        second_rule: second.id.clone(),
        first_bundles: first.bundles.clone(),
        second_bundles: second.bundles.clone(),
    }
}

fn tried_facts(store: &PolicyStore, node_id: &str, inventory: &Inventory) -> Vec<Fact> {
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

fn list(bundles: &[BundleRef]) -> String {
    bundles
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn short_reason(reason: &Reason) -> String {
    match reason {
        Reason::Rule { rule, .. } => format!("rule {rule}"),
        Reason::Feature { feature, .. } => format!("feature {feature}"),
        Reason::Dependency { of, .. } => format!("needed by {of}"),
    }
}

/// Writes rows as left-aligned columns; the last column is not padded.
fn write_table<const N: usize>(f: &mut fmt::Formatter<'_>, rows: &[[String; N]]) -> fmt::Result {
    let mut widths = [0usize; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                let pad = widths[column] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        writeln!(f, "{}", line.trim_end())?;
    }
    Ok(())
}

#[cfg(test)]
mod capture_tests {
    use super::*;

    fn metadata(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_captured_image_maps_the_most_specific_consulted_fact_to_itself() {
        let bundle = BundleRef::new("captured-os", "1");
        let all = metadata(&[
            (capture_keys::NODE, "n1"),
            (capture_keys::MODEL, "LabBox"),
            (capture_keys::MANUFACTURER, "Acme"),
            (capture_keys::CLASS, "lab"),
        ]);
        type Case = (BTreeMap<String, String>, Vec<MatcherKind>, Option<Matcher>);
        let cases: Vec<Case> = vec![
            (
                all.clone(),
                DEFAULT_PRECEDENCE.to_vec(),
                Some(Matcher::Model("LabBox".into())),
            ),
            (
                all.clone(),
                vec![MatcherKind::Class, MatcherKind::Manufacturer],
                Some(Matcher::Manufacturer("Acme".into())),
            ),
            (
                metadata(&[(capture_keys::NODE, "n1"), (capture_keys::CLASS, "lab")]),
                DEFAULT_PRECEDENCE.to_vec(),
                Some(Matcher::Class("lab".into())),
            ),
            // Not a captured image (no node), or no usable fact: no rule.
            (
                metadata(&[(capture_keys::MODEL, "LabBox")]),
                DEFAULT_PRECEDENCE.to_vec(),
                None,
            ),
            (
                metadata(&[(capture_keys::NODE, "n1")]),
                DEFAULT_PRECEDENCE.to_vec(),
                None,
            ),
        ];
        for (meta, precedence, want) in cases {
            let rule = captured_rule(&meta, &precedence, bundle.clone());
            assert_eq!(rule.as_ref().map(|r| r.matcher.clone()), want, "{meta:?}");
            if let Some(rule) = rule {
                assert_eq!(rule.bundles, vec![bundle.clone()]);
                assert!(rule.id.starts_with("captured-"), "{}", rule.id);
            }
        }
    }
}
