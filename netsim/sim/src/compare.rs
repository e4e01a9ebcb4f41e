//! `netsim compare`: the three strategies over one topology, side by side.
//!
//! [`compare_with`] takes any way of running one strategy and builds one [`CompareTable`];
//! [`compare_simulated`] is that with the simulator, and `netsim::emulate::compare_emulated` the
//! same with the real binaries (async, so it tabulates with [`CompareTable::from_runs`]).
//! The table prints as text, and writes `compare.json`, `compare.md` and `compare.svg` (fleet
//! completion over time, one line per strategy) plus each run's own files under
//! `<strategy>/`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use crate::report::{self, human_bytes, human_seconds, Chart, Line, Mode, RunResult};
use crate::simulate;
use crate::topology::{Strategy, Topology};

/// Ratio of the last edge's completion time to the first's (over all strategies) above which
/// the comparison chart uses a log time axis.
const LOG_AXIS_SPREAD: f64 = 20.0;

/// One strategy's line of the comparison.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompareRow {
    /// The strategy.
    pub strategy: Strategy,
    /// Seconds until every edge held the bundle; `None` if some never did.
    pub all_edges_done_s: Option<f64>,
    /// `all_edges_done_s / line_rate_floor_s`.
    pub ratio_to_floor: Option<f64>,
    /// Bytes the origin sent in all.
    pub origin_egress_bytes: u64,
    /// Mean bytes per site over the WAN.
    pub wan_bytes_per_site_mean: f64,
    /// Bytes stagers sent to edges, all sites.
    pub stager_egress_bytes: u64,
    /// Bytes edges sent to edges, all sites.
    pub peer_bytes: u64,
}

/// The strategies of one topology side by side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompareTable {
    /// The topology's name.
    pub topology: String,
    /// Simulated or emulated.
    pub mode: Mode,
    /// Bytes of one copy of the bundle.
    pub bundle_bytes: u64,
    /// Sites in the topology.
    pub sites: usize,
    /// Edges in the topology.
    pub edges: u64,
    /// The line-rate floor in seconds.
    pub line_rate_floor_s: f64,
    /// One row per strategy, in the order run.
    pub rows: Vec<CompareRow>,
    /// The full runs behind the rows (written to `<strategy>/result.json`, not to
    /// `compare.json`).
    #[serde(skip)]
    pub runs: Vec<RunResult>,
}

/// Runs every strategy of [`Strategy::ALL`] with `run` and tabulates the results. All runs must
/// be of one topology and mode.
pub fn compare_with(mut run: impl FnMut(Strategy) -> Result<RunResult>) -> Result<CompareTable> {
    let mut runs = Vec::new();
    for strategy in Strategy::ALL {
        runs.push(run(strategy)?);
    }
    CompareTable::from_runs(runs)
}

/// Simulates the three strategies over `topo` with `seed`, writes the comparison's files into
/// `out_dir`, and returns the table.
pub fn compare_simulated(topo: &Topology, seed: u64, out_dir: &Path) -> Result<CompareTable> {
    let table = compare_with(|strategy| simulate::simulate(topo, strategy, seed))?;
    table.write_files(out_dir)?;
    Ok(table)
}

impl CompareTable {
    /// Tabulates finished runs (one per strategy, same topology and mode).
    pub fn from_runs(runs: Vec<RunResult>) -> Result<CompareTable> {
        let Some(first) = runs.first() else {
            anyhow::bail!("nothing to compare: no runs");
        };
        for run in &runs {
            ensure!(
                run.topology == first.topology && run.mode == first.mode,
                "cannot compare runs of different topologies or modes ({} {} vs {} {})",
                run.topology,
                run.mode.as_str(),
                first.topology,
                first.mode.as_str()
            );
        }
        let rows = runs
            .iter()
            .map(|run| CompareRow {
                strategy: run.strategy,
                all_edges_done_s: run.all_edges_done_s,
                ratio_to_floor: run.ratio_to_floor(),
                origin_egress_bytes: run.origin_egress_bytes,
                wan_bytes_per_site_mean: run.wan_bytes_per_site_mean(),
                stager_egress_bytes: run.stager_egress_bytes(),
                peer_bytes: run.peer_bytes(),
            })
            .collect();
        Ok(CompareTable {
            topology: first.topology.clone(),
            mode: first.mode,
            bundle_bytes: first.bundle_bytes,
            sites: first.sites.len(),
            edges: first.total_edges(),
            line_rate_floor_s: first.line_rate_floor_s,
            rows,
            runs,
        })
    }

    fn header(&self) -> String {
        format!(
            "{} ({}): {} sites, {} edges, bundle {}, line-rate floor {}",
            self.topology,
            self.mode.as_str(),
            self.sites,
            self.edges,
            human_bytes(self.bundle_bytes as f64),
            human_seconds(self.line_rate_floor_s)
        )
    }

    fn cells(&self) -> Vec<[String; 7]> {
        self.rows
            .iter()
            .map(|row| {
                [
                    row.strategy.to_string(),
                    row.all_edges_done_s
                        .map_or("never".to_string(), human_seconds),
                    row.ratio_to_floor
                        .map_or("—".to_string(), |r| format!("{r:.2}×")),
                    human_bytes(row.origin_egress_bytes as f64),
                    format!(
                        "{} ({:.2}×)",
                        human_bytes(row.wan_bytes_per_site_mean),
                        row.wan_bytes_per_site_mean / self.bundle_bytes.max(1) as f64
                    ),
                    human_bytes(row.stager_egress_bytes as f64),
                    human_bytes(row.peer_bytes as f64),
                ]
            })
            .collect()
    }

    /// The table as aligned plain text, for a terminal.
    pub fn text(&self) -> String {
        let header = HEADINGS.map(str::to_string);
        let cells = self.cells();
        let mut widths = [0usize; 7];
        for row in std::iter::once(&header).chain(&cells) {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = self.header();
        out.push_str("\n\n");
        for row in std::iter::once(&header).chain(&cells) {
            let line: Vec<String> = row
                .iter()
                .zip(widths)
                .enumerate()
                .map(|(i, (cell, w))| {
                    let pad = " ".repeat(w - cell.chars().count());
                    if i == 0 {
                        format!("{cell}{pad}")
                    } else {
                        format!("{pad}{cell}")
                    }
                })
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }

    /// The table in Markdown.
    pub fn markdown(&self) -> String {
        let mut out = format!("# {}\n\n", self.header());
        let _ = writeln!(out, "| {} |", HEADINGS.join(" | "));
        out.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
        for row in self.cells() {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        let mut notes: Vec<&String> = self.runs.iter().flat_map(|r| &r.notes).collect();
        notes.sort();
        notes.dedup();
        if !notes.is_empty() {
            out.push('\n');
            for note in notes {
                let _ = writeln!(out, "- note: {note}");
            }
        }
        out
    }

    /// Fraction of the fleet's edges complete over time, one line per strategy.
    pub fn svg(&self) -> String {
        let mut chart = Chart::new(
            format!(
                "{} ({}): edges holding the bundle",
                self.topology,
                self.mode.as_str()
            ),
            "seconds since publish",
            "edges complete (whole fleet)",
        );
        chart.marker = Some((self.line_rate_floor_s, "line-rate floor".to_string()));
        for run in &self.runs {
            chart.lines.push(Line {
                label: run.strategy.to_string(),
                points: run.fleet_completion(),
            });
        }
        // First edge done anywhere against last edge done anywhere.
        let times = chart
            .lines
            .iter()
            .flat_map(|line| line.points.iter().map(|p| p.0))
            .filter(|&t| t > 0.0);
        let fastest = times.clone().fold(f64::INFINITY, f64::min);
        let slowest = times.fold(0.0, f64::max);
        chart.x_log = fastest.is_finite() && slowest / fastest > LOG_AXIS_SPREAD;
        chart.render()
    }

    /// Writes `compare.json`, `compare.md`, `compare.svg`, and each run's files under
    /// `<strategy>/`, into `dir` (created if missing).
    pub fn write_files(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        report::write_json(&dir.join("compare.json"), self)?;
        report::write_text(&dir.join("compare.md"), &self.markdown())?;
        report::write_text(&dir.join("compare.svg"), &self.svg())?;
        for run in &self.runs {
            run.write_files(&dir.join(run.strategy.as_str()))?;
        }
        Ok(())
    }
}

const HEADINGS: [&str; 7] = [
    "strategy",
    "time to 100%",
    "÷ floor",
    "origin egress",
    "WAN bytes/site (÷ bundle)",
    "stager egress",
    "peer bytes",
];
