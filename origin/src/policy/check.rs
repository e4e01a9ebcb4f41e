//! `origin policy check`: every node resolved, every conflict listed.

use std::fmt;

use proto::inventory::Inventory;
use serde::Serialize;

use super::store::disagreeing_pairs;
use super::{list, resolve, BundleRef, MatcherKind, PolicyError, PolicyStore, Reason, Resolution};

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

pub(super) fn short_reason(reason: &Reason) -> String {
    match reason {
        Reason::Rule { rule, .. } => format!("rule {rule}"),
        Reason::Feature { feature, .. } => format!("feature {feature}"),
        Reason::Dependency { of, .. } => format!("needed by {of}"),
    }
}

/// Writes rows as left-aligned columns; the last column is not padded.
pub(super) fn write_table<const N: usize>(
    f: &mut fmt::Formatter<'_>,
    rows: &[[String; N]],
) -> fmt::Result {
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
