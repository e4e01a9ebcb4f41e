//! Capture (brief 004): which classes may capture an image, and the rule a captured image adds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{BundleRef, Matcher, MatcherKind, Rule};

/// Which nodes may capture an image when no rule matches them (brief 004), from the policy
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

/// Which classes read encrypted bundles (issue 16), from the policy file's `[encryption]`
/// table: an edge of a `read` class receives every content-key generation the origin keeps;
/// a `require` class also reads, and is never offered an unencrypted bundle.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionConfig {
    /// Classes whose edges receive content keys.
    #[serde(default)]
    pub read_classes: Vec<String>,
    /// Classes that may run encrypted bundles only (they read them too).
    #[serde(default)]
    pub require_classes: Vec<String>,
}

impl EncryptionConfig {
    /// True when a node of `class` may read encrypted bundles.
    pub fn may_read(&self, class: Option<&str>) -> bool {
        class.is_some_and(|class| {
            self.read_classes.iter().any(|c| c == class) || self.requires(Some(class))
        })
    }

    /// True when a node of `class` may be offered encrypted bundles only.
    pub fn requires(&self, class: Option<&str>) -> bool {
        class.is_some_and(|class| self.require_classes.iter().any(|c| c == class))
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

#[cfg(test)]
mod capture_tests {
    use super::*;
    use crate::policy::DEFAULT_PRECEDENCE;

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
