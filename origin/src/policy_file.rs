//! The policy file `origin policy load` reads: TOML with rules, an optional precedence and
//! features.
//!
//! ```toml
//! precedence = ["node-override", "class", "role", "model", "manufacturer", "subnet"]
//!
//! [[rule]]
//! id = "web-servers"
//! role = "web"                 # exactly one of: node, class, role, model, manufacturer, subnet
//! bundles = ["os@2", "nginx@1.24"]
//!
//! [features]
//! monitoring = ["node-exporter>=1.0"]
//!
//! [capture]                    # optional (brief 004): who may capture an image
//! classes = ["lab"]            # nodes of these classes that no rule matches
//! name = "captured-os"         # the bundle name captured images get (default `captured-os`)
//!
//! [encryption]                 # optional (issue 16): who reads encrypted bundles
//! read_classes = ["secure"]    # edges of these classes receive the content keys
//! require_classes = ["vault"]  # these read too, and are never offered an unencrypted bundle
//! ```
//!
//! Packages are not part of the file: they are every bundle ever published.

// The policy's errors are kept whole (they name rule, field and file), which makes them large.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::db::PolicyDoc;
use crate::policy::{
    BundleRef, CaptureConfig, Constraint, EncryptionConfig, Matcher, MatcherKind, PolicyError,
    PolicyStore, Requirement, RequirementError, Rule, DEFAULT_CAPTURE_NAME, DEFAULT_PRECEDENCE,
};

/// Largest policy file, in bytes.
pub const MAX_POLICY_FILE_BYTES: usize = proto::wire::MAX_DOCUMENT_BYTES;

/// Why a policy file was refused; every message starts with the file's name.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    /// Larger than [`MAX_POLICY_FILE_BYTES`].
    #[error("{file} is {size_bytes} bytes, more than the bound of {MAX_POLICY_FILE_BYTES}")]
    TooLarge {
        /// The file's name.
        file: String,
        /// Its size.
        size_bytes: usize,
    },
    /// Not TOML, or keys the file may not have.
    #[error("{file}: {error}")]
    Toml {
        /// The file's name.
        file: String,
        /// What the TOML parser said.
        error: toml::de::Error,
    },
    /// A rule with no matcher, or more than one.
    #[error("{file}: rule `{rule}` must match exactly one of node, class, role, model, manufacturer, subnet (it has {found})")]
    MatcherCount {
        /// The file's name.
        file: String,
        /// The rule's id.
        rule: String,
        /// How many matchers it has.
        found: usize,
    },
    /// A rule's bundle that is not `NAME@VERSION`.
    #[error("{file}: rule `{rule}`: {error}")]
    RuleBundle {
        /// The file's name.
        file: String,
        /// The rule's id.
        rule: String,
        /// What is wrong with the bundle.
        error: ExactBundleError,
    },
    /// A `[capture]` name that is not a bundle name.
    #[error("{file}: [capture] name `{name}` must be a bundle name (not empty, no `@`, at most {max} bytes)", max = proto::wire::MAX_NAME_BYTES)]
    CaptureName {
        /// The file's name.
        file: String,
        /// The name given.
        name: String,
    },
    /// An empty string among the `[capture]` classes.
    #[error("{file}: [capture] classes must not be empty strings")]
    EmptyCaptureClass {
        /// The file's name.
        file: String,
    },
    /// An empty string among the `[encryption]` classes.
    #[error("{file}: [encryption] classes must not be empty strings")]
    EmptyEncryptionClass {
        /// The file's name.
        file: String,
    },
    /// The rules parse but do not make a valid policy.
    #[error("{file}: {error}")]
    Invalid {
        /// The file's name.
        file: String,
        /// Why the policy is invalid.
        error: PolicyError,
    },
}

/// Why a bundle is not an exact `NAME@VERSION`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExactBundleError {
    /// Not a requirement at all.
    #[error(transparent)]
    Requirement(#[from] RequirementError),
    /// A requirement, but not of one exact version.
    #[error("`{0}` must name an exact version: write NAME@VERSION")]
    NotExact(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    precedence: Option<Vec<MatcherKind>>,
    #[serde(default)]
    rule: Vec<RuleEntry>,
    #[serde(default)]
    features: BTreeMap<String, Vec<Requirement>>,
    capture: Option<CaptureEntry>,
    encryption: Option<EncryptionEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EncryptionEntry {
    #[serde(default)]
    read_classes: Vec<String>,
    #[serde(default)]
    require_classes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptureEntry {
    classes: Vec<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    id: String,
    node: Option<String>,
    class: Option<String>,
    role: Option<String>,
    model: Option<String>,
    manufacturer: Option<String>,
    subnet: Option<String>,
    bundles: Vec<String>,
}

/// Parses and checks a policy file; `source` names it in errors and in the result.
pub fn parse(source: &str, text: &str) -> Result<PolicyDoc, PolicyFileError> {
    if text.len() > MAX_POLICY_FILE_BYTES {
        return Err(PolicyFileError::TooLarge {
            file: source.to_owned(),
            size_bytes: text.len(),
        });
    }
    let file: File = toml::from_str(text).map_err(|error| PolicyFileError::Toml {
        file: source.to_owned(),
        error,
    })?;
    let mut rules = Vec::with_capacity(file.rule.len());
    for entry in file.rule {
        let matchers: Vec<Matcher> = [
            entry.node.map(Matcher::NodeOverride),
            entry.class.map(Matcher::Class),
            entry.role.map(Matcher::Role),
            entry.model.map(Matcher::Model),
            entry.manufacturer.map(Matcher::Manufacturer),
            entry.subnet.map(Matcher::Subnet),
        ]
        .into_iter()
        .flatten()
        .collect();
        let matcher = match <[Matcher; 1]>::try_from(matchers) {
            Ok([matcher]) => matcher,
            Err(found) => {
                return Err(PolicyFileError::MatcherCount {
                    file: source.to_owned(),
                    rule: entry.id,
                    found: found.len(),
                })
            }
        };
        let mut bundles = Vec::with_capacity(entry.bundles.len());
        for text in &entry.bundles {
            bundles.push(
                exact_bundle(text).map_err(|error| PolicyFileError::RuleBundle {
                    file: source.to_owned(),
                    rule: entry.id.clone(),
                    error,
                })?,
            );
        }
        rules.push(Rule {
            id: entry.id,
            matcher,
            bundles,
        });
    }
    let capture = match file.capture {
        None => None,
        Some(entry) => {
            let name = entry
                .name
                .unwrap_or_else(|| DEFAULT_CAPTURE_NAME.to_owned());
            if name.is_empty() || name.len() > proto::wire::MAX_NAME_BYTES || name.contains('@') {
                return Err(PolicyFileError::CaptureName {
                    file: source.to_owned(),
                    name,
                });
            }
            if entry.classes.iter().any(String::is_empty) {
                return Err(PolicyFileError::EmptyCaptureClass {
                    file: source.to_owned(),
                });
            }
            Some(CaptureConfig {
                classes: entry.classes,
                name,
            })
        }
    };
    let encryption = match file.encryption {
        None => EncryptionConfig::default(),
        Some(entry) => {
            if entry
                .read_classes
                .iter()
                .chain(&entry.require_classes)
                .any(String::is_empty)
            {
                return Err(PolicyFileError::EmptyEncryptionClass {
                    file: source.to_owned(),
                });
            }
            EncryptionConfig {
                read_classes: entry.read_classes,
                require_classes: entry.require_classes,
            }
        }
    };
    let doc = PolicyDoc {
        capture,
        encryption,
        rules,
        precedence: file
            .precedence
            .unwrap_or_else(|| DEFAULT_PRECEDENCE.to_vec()),
        features: file.features,
        source: source.to_owned(),
    };
    let store = PolicyStore {
        rules: doc.rules.clone(),
        precedence: doc.precedence.clone(),
        features: doc.features.clone(),
        packages: BTreeMap::new(),
    };
    store.validate().map_err(|error| PolicyFileError::Invalid {
        file: source.to_owned(),
        error,
    })?;
    Ok(doc)
}

/// Parses `NAME@VERSION` (an exact version).
pub fn exact_bundle(text: &str) -> Result<BundleRef, ExactBundleError> {
    let requirement: Requirement = text.parse()?;
    match requirement.constraint {
        Constraint::Exact(version) => Ok(BundleRef::new(requirement.name, version)),
        _ => Err(ExactBundleError::NotExact(text.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_file_parses_into_rules_precedence_and_features() {
        let doc = parse(
            "p.toml",
            r#"
precedence = ["class", "role"]
[[rule]]
id = "web"
role = "web"
bundles = ["os@2", "app@1"]
[features]
monitoring = ["agent>=1.0"]
"#,
        )
        .expect("parse");
        assert_eq!(doc.precedence, vec![MatcherKind::Class, MatcherKind::Role]);
        assert_eq!(doc.rules[0].matcher, Matcher::Role("web".into()));
        assert_eq!(doc.rules[0].bundles[1], BundleRef::new("app", "1"));
        assert_eq!(doc.features["monitoring"][0].to_string(), "agent>=1.0");
    }

    #[test]
    fn a_capture_table_says_which_classes_may_capture() {
        let doc = parse("p.toml", "[capture]\nclasses = [\"lab\"]\n").expect("parse");
        let capture = doc.capture.expect("capture");
        assert_eq!(capture.name, DEFAULT_CAPTURE_NAME);
        assert!(capture.allows(Some("lab")));
        assert!(!capture.allows(Some("prod")));
        assert!(!capture.allows(None));
        let named = parse(
            "p.toml",
            "[capture]\nclasses = [\"lab\"]\nname = \"lab-os\"\n",
        )
        .expect("parse");
        assert_eq!(named.capture.expect("capture").name, "lab-os");
        assert!(parse("p.toml", "").expect("empty").capture.is_none());
        let bad = parse(
            "p.toml",
            "[capture]\nclasses = [\"lab\"]\nname = \"os@1\"\n",
        )
        .expect_err("bad name")
        .to_string();
        assert!(bad.contains("[capture] name"), "{bad}");
    }

    #[test]
    fn an_encryption_table_says_which_classes_read_and_which_require() {
        let doc = parse(
            "p.toml",
            "[encryption]\nread_classes = [\"secure\"]\nrequire_classes = [\"vault\"]\n",
        )
        .expect("parse");
        let encryption = doc.encryption;
        assert!(encryption.may_read(Some("secure")));
        assert!(encryption.may_read(Some("vault")), "require implies read");
        assert!(!encryption.may_read(Some("web")));
        assert!(!encryption.may_read(None));
        assert!(encryption.requires(Some("vault")));
        assert!(!encryption.requires(Some("secure")));
        assert_eq!(
            parse("p.toml", "").expect("empty").encryption,
            EncryptionConfig::default()
        );
        let bad = parse("p.toml", "[encryption]\nread_classes = [\"\"]\n")
            .expect_err("empty class")
            .to_string();
        assert!(bad.contains("[encryption]"), "{bad}");
    }

    #[test]
    fn bad_policy_files_say_what_is_wrong() {
        let two = parse(
            "p.toml",
            "[[rule]]\nid = \"x\"\nrole = \"a\"\nclass = \"b\"\nbundles = [\"os@1\"]\n",
        )
        .expect_err("two matchers")
        .to_string();
        assert!(two.contains("exactly one of"), "{two}");
        let loose = parse(
            "p.toml",
            "[[rule]]\nid = \"x\"\nrole = \"a\"\nbundles = [\"os\"]\n",
        )
        .expect_err("no version")
        .to_string();
        assert!(loose.contains("exact version"), "{loose}");
        let dup = parse(
            "p.toml",
            "[[rule]]\nid = \"x\"\nrole = \"a\"\nbundles = [\"os@1\"]\n[[rule]]\nid = \"x\"\nrole = \"b\"\nbundles = [\"os@1\"]\n",
        )
        .expect_err("duplicate id")
        .to_string();
        assert!(dup.contains("`x`"), "{dup}");
        let unknown = parse("p.toml", "packages = 1\n")
            .expect_err("unknown key")
            .to_string();
        assert!(unknown.contains("packages"), "{unknown}");
    }
}
