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
//! [capture]                    # optional (seed 004): who may capture an image
//! classes = ["lab"]            # nodes of these classes that no rule matches
//! name = "captured-os"         # the bundle name captured images get (default `captured-os`)
//! ```
//!
//! Packages are not part of the file: they are every bundle ever published.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::db::PolicyDoc;
use crate::policy::{
    BundleRef, CaptureConfig, Constraint, Matcher, MatcherKind, PolicyStore, Requirement, Rule,
    DEFAULT_CAPTURE_NAME, DEFAULT_PRECEDENCE,
};

/// Largest policy file, in bytes.
pub const MAX_POLICY_FILE_BYTES: usize = proto::wire::MAX_DOCUMENT_BYTES;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    precedence: Option<Vec<MatcherKind>>,
    #[serde(default)]
    rule: Vec<RuleEntry>,
    #[serde(default)]
    features: BTreeMap<String, Vec<Requirement>>,
    capture: Option<CaptureEntry>,
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
pub fn parse(source: &str, text: &str) -> Result<PolicyDoc, String> {
    if text.len() > MAX_POLICY_FILE_BYTES {
        return Err(format!(
            "{source} is {} bytes, more than the bound of {MAX_POLICY_FILE_BYTES}",
            text.len()
        ));
    }
    let file: File = toml::from_str(text).map_err(|e| format!("{source}: {e}"))?;
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
                return Err(format!(
                    "{source}: rule `{}` must match exactly one of node, class, role, model, manufacturer, subnet (it has {})",
                    entry.id,
                    found.len()
                ))
            }
        };
        let mut bundles = Vec::with_capacity(entry.bundles.len());
        for text in &entry.bundles {
            bundles.push(
                exact_bundle(text)
                    .map_err(|why| format!("{source}: rule `{}`: {why}", entry.id))?,
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
                return Err(format!(
                    "{source}: [capture] name `{name}` must be a bundle name (not empty, no `@`, at most {} bytes)",
                    proto::wire::MAX_NAME_BYTES
                ));
            }
            if entry.classes.iter().any(String::is_empty) {
                return Err(format!(
                    "{source}: [capture] classes must not be empty strings"
                ));
            }
            Some(CaptureConfig {
                classes: entry.classes,
                name,
            })
        }
    };
    let doc = PolicyDoc {
        capture,
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
    store.validate().map_err(|e| format!("{source}: {e}"))?;
    Ok(doc)
}

/// Parses `NAME@VERSION` (an exact version).
pub fn exact_bundle(text: &str) -> Result<BundleRef, String> {
    let requirement: Requirement = text.parse().map_err(|e| format!("{e}"))?;
    match requirement.constraint {
        Constraint::Exact(version) => Ok(BundleRef::new(requirement.name, version)),
        _ => Err(format!(
            "`{text}` must name an exact version: write NAME@VERSION"
        )),
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
        .expect_err("bad name");
        assert!(bad.contains("[capture] name"), "{bad}");
    }

    #[test]
    fn bad_policy_files_say_what_is_wrong() {
        let two = parse(
            "p.toml",
            "[[rule]]\nid = \"x\"\nrole = \"a\"\nclass = \"b\"\nbundles = [\"os@1\"]\n",
        )
        .expect_err("two matchers");
        assert!(two.contains("exactly one of"), "{two}");
        let loose = parse(
            "p.toml",
            "[[rule]]\nid = \"x\"\nrole = \"a\"\nbundles = [\"os\"]\n",
        )
        .expect_err("no version");
        assert!(loose.contains("exact version"), "{loose}");
        let dup = parse(
            "p.toml",
            "[[rule]]\nid = \"x\"\nrole = \"a\"\nbundles = [\"os@1\"]\n[[rule]]\nid = \"x\"\nrole = \"b\"\nbundles = [\"os@1\"]\n",
        )
        .expect_err("duplicate id");
        assert!(dup.contains("`x`"), "{dup}");
        let unknown = parse("p.toml", "packages = 1\n").expect_err("unknown key");
        assert!(unknown.contains("packages"), "{unknown}");
    }
}
