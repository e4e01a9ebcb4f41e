//! Results of a run (simulated or emulated) and the files that show them: `result.json`,
//! `result.md` (tables) and `completion.svg` (fraction of edges complete over time).
//!
//! The SVG is written by hand: a handful of axes, lines and bands needs no plotting library, and
//! it keeps text as real `<text>` elements without a font stack.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::topology::Strategy;

/// Sites above which a chart draws min/median/max bands instead of one line per site.
pub const MAX_SITE_LINES: usize = 10;

/// Time samples of a band chart.
const BAND_SAMPLES: usize = 400;

/// Legend entry style of a shaded band.
const FILLED: &str = "filled";

/// Dash pattern of the marker line.
const MARKER_DASH: &str = "5,4";

/// Chart size in SVG user units (pixels).
const CHART_WIDTH: f64 = 860.0;
const CHART_HEIGHT: f64 = 500.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 200.0;
const MARGIN_TOP: f64 = 45.0;
const MARGIN_BOTTOM: f64 = 60.0;

/// Dash patterns of lines, in order, so overlapping lines stay distinguishable.
const DASHES: [&str; 4] = ["", "8,4", "2,3", "12,3,3,3"];

/// Line colours, in order (Tableau 10).
const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// Where a result came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The flow-level simulator.
    Simulate,
    /// Real binaries through emulated links.
    Emulate,
}

impl Mode {
    /// The name used in files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Simulate => "simulate",
            Mode::Emulate => "emulate",
        }
    }
}

/// One run of one strategy over one topology.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// The topology's name.
    pub topology: String,
    /// The strategy that ran.
    pub strategy: Strategy,
    /// Simulated or emulated.
    pub mode: Mode,
    /// Bytes of one copy of the bundle.
    pub bundle_bytes: u64,
    /// Seconds from publish until every edge held the bundle; `None` if some never did.
    pub all_edges_done_s: Option<f64>,
    /// The line-rate floor in seconds (see `Topology::line_rate_floor_s`).
    pub line_rate_floor_s: f64,
    /// Bytes the origin sent in all (payload, over its uplink): to flat sites and to regions.
    pub origin_egress_bytes: u64,
    /// Per site, in topology order.
    pub sites: Vec<SiteResult>,
    /// Per region of the topology, in topology order (empty without `[[regions]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<RegionResult>,
    /// The WAN split of every site with several stagers, in topology order (sites with one
    /// stager are not listed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub site_stagers: Vec<SiteStagers>,
    /// Anything a reader needs to interpret the numbers (folding, caps, piece count).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// One site's share of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteResult {
    /// Site name.
    pub name: String,
    /// Edges in the site.
    pub edges: u32,
    /// Bytes that crossed the site's WAN link (origin → site).
    pub wan_bytes: u64,
    /// Bytes moved between nodes inside the site: `stager_egress_bytes + peer_bytes`.
    pub lan_bytes: u64,
    /// Bytes the site's stagers sent to its edges.
    pub stager_egress_bytes: u64,
    /// Bytes edges sent to other edges.
    pub peer_bytes: u64,
    /// Edges that held the whole bundle at the end.
    pub edges_done: u32,
    /// Seconds from publish until the site's last edge held the bundle; `None` if one never did.
    pub done_s: Option<f64>,
    /// (seconds, fraction of the site's edges complete), starting at (0, 0), non-decreasing.
    pub completion: Vec<(f64, f64)>,
    /// Seconds from publish until each edge held the bundle, in ascending order, when the run
    /// timed every edge (emulate; the simulator gives only `completion`). An edge that failed
    /// is absent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edge_done_s: Vec<f64>,
}

/// One region's share of a run: what its stagers pulled from the origin and served to the
/// stagers of its sites.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegionResult {
    /// Region name.
    pub name: String,
    /// Sites whose stagers pull through the region.
    pub sites: u32,
    /// Bytes the origin sent to the region's stagers (over the region's link).
    pub pulled_bytes: u64,
    /// Of `pulled_bytes`, each of the region's stagers' (each piece crosses to one of them).
    pub stager_pulled_bytes: Vec<u64>,
    /// Bytes the region's stagers sent to the stagers of its sites.
    pub served_bytes: u64,
}

/// How a site with several stagers split its WAN pulls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteStagers {
    /// Site name.
    pub site: String,
    /// Bytes each of the site's stagers pulled across the site's WAN (from the origin or the
    /// site's region); they sum to the site's `wan_bytes`.
    pub pulled_bytes: Vec<u64>,
}

impl RunResult {
    /// Edges over all sites.
    pub fn total_edges(&self) -> u64 {
        self.sites.iter().map(|s| u64::from(s.edges)).sum()
    }

    /// Edges that finished, over all sites.
    pub fn edges_done(&self) -> u64 {
        self.sites.iter().map(|s| u64::from(s.edges_done)).sum()
    }

    /// `all_edges_done_s / line_rate_floor_s`: 1.0 is as fast as the links allow.
    pub fn ratio_to_floor(&self) -> Option<f64> {
        self.all_edges_done_s
            .filter(|_| self.line_rate_floor_s > 0.0)
            .map(|t| t / self.line_rate_floor_s)
    }

    /// Mean bytes per site over the WAN.
    pub fn wan_bytes_per_site_mean(&self) -> f64 {
        mean(self.sites.iter().map(|s| s.wan_bytes as f64))
    }

    /// Stager egress over all sites.
    pub fn stager_egress_bytes(&self) -> u64 {
        self.sites.iter().map(|s| s.stager_egress_bytes).sum()
    }

    /// Edge-to-edge bytes over all sites.
    pub fn peer_bytes(&self) -> u64 {
        self.sites.iter().map(|s| s.peer_bytes).sum()
    }

    /// Fraction of all edges of the fleet complete over time, as a step series from (0, 0).
    pub fn fleet_completion(&self) -> Vec<(f64, f64)> {
        let total = self.total_edges().max(1) as f64;
        let mut steps: Vec<(f64, i64)> = Vec::new();
        for site in &self.sites {
            let edges = f64::from(site.edges);
            let mut done_before = 0i64;
            for &(t, fraction) in &site.completion {
                let done = (fraction * edges).round() as i64;
                if done != done_before {
                    steps.push((t, done - done_before));
                    done_before = done;
                }
            }
        }
        steps.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut series = vec![(0.0, 0.0)];
        let mut done = 0i64;
        for (t, delta) in steps {
            done += delta;
            let fraction = done as f64 / total;
            match series.last_mut() {
                Some(last) if last.0 == t => last.1 = fraction,
                _ => series.push((t, fraction)),
            }
        }
        series
    }

    /// A readable summary and per-site table, in Markdown.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# {} — {} ({})\n",
            self.topology,
            self.strategy,
            self.mode.as_str()
        );
        let _ = writeln!(
            out,
            "- bundle: {}\n- edges complete: {} of {}\n- all edges done: {}\n- line-rate floor: {}\n\
             - ratio to floor: {}\n- origin egress: {} ({:.2}× bundle)\n- stager egress: {}\n\
             - peer bytes: {}",
            human_bytes(self.bundle_bytes as f64),
            self.edges_done(),
            self.total_edges(),
            seconds_or_never(self.all_edges_done_s),
            human_seconds(self.line_rate_floor_s),
            self.ratio_to_floor()
                .map_or("—".to_string(), |r| format!("{r:.2}×")),
            human_bytes(self.origin_egress_bytes as f64),
            self.origin_egress_bytes as f64 / self.bundle_bytes.max(1) as f64,
            human_bytes(self.stager_egress_bytes() as f64),
            human_bytes(self.peer_bytes() as f64),
        );
        for note in &self.notes {
            let _ = writeln!(out, "- note: {note}");
        }
        out.push('\n');
        let bundle = self.bundle_bytes.max(1) as f64;
        if !self.regions.is_empty() {
            out.push_str(
                "| upstream | sites | sent | sent ÷ bundle | pulled | pulled ÷ bundle |\n\
                 |---|---:|---:|---:|---:|---:|\n",
            );
            let _ = writeln!(
                out,
                "| origin | {} | {} | {:.2} | — | — |",
                self.sites.len(),
                human_bytes(self.origin_egress_bytes as f64),
                self.origin_egress_bytes as f64 / bundle,
            );
            for region in &self.regions {
                let _ = writeln!(
                    out,
                    "| region {} | {} | {} | {:.2} | {} | {:.2} |",
                    region.name,
                    region.sites,
                    human_bytes(region.served_bytes as f64),
                    region.served_bytes as f64 / bundle,
                    human_bytes(region.pulled_bytes as f64),
                    region.pulled_bytes as f64 / bundle,
                );
            }
            out.push('\n');
        }
        out.push_str(
            "| site | edges | done | done at | WAN bytes | WAN ÷ bundle | stager egress | peer bytes |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for site in &self.sites {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.2} | {} | {} |",
                site.name,
                site.edges,
                site.edges_done,
                seconds_or_never(site.done_s),
                human_bytes(site.wan_bytes as f64),
                site.wan_bytes as f64 / bundle,
                human_bytes(site.stager_egress_bytes as f64),
                human_bytes(site.peer_bytes as f64),
            );
        }
        out
    }

    /// The completion chart: one line per site, or min/median/max bands over sites when there
    /// are more than [`MAX_SITE_LINES`].
    pub fn completion_svg(&self) -> String {
        let mut chart = Chart::new(
            format!(
                "{} — {} ({}): edges holding the bundle",
                self.topology,
                self.strategy,
                self.mode.as_str()
            ),
            "seconds since publish",
            "edges complete",
        );
        chart.marker = Some((self.line_rate_floor_s, "line-rate floor".to_string()));
        if self.sites.len() <= MAX_SITE_LINES {
            for site in &self.sites {
                chart.lines.push(Line {
                    label: site.name.clone(),
                    points: site.completion.clone(),
                });
            }
        } else {
            let series: Vec<&[(f64, f64)]> =
                self.sites.iter().map(|s| s.completion.as_slice()).collect();
            chart.bands.push(Band::over_series(
                format!("{} sites: min–max", self.sites.len()),
                &series,
            ));
        }
        chart.render()
    }

    /// Writes `result.json`, `result.md` and `completion.svg` into `dir` (created if missing).
    pub fn write_files(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_json(&dir.join("result.json"), self)?;
        write_text(&dir.join("result.md"), &self.markdown())?;
        write_text(&dir.join("completion.svg"), &self.completion_svg())
    }
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("cannot serialise result")?;
    write_text(path, &text)
}

/// Writes `text` to `path`, naming the file in any error.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// `1.5 GiB`, `320.0 MiB`, `12 B`.
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `850 ms`, `12.3 s`, `1 h 02 min`.
pub fn human_seconds(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{:.0} ms", seconds * 1000.0)
    } else if seconds < 600.0 {
        format!("{seconds:.2} s")
    } else if seconds < 3600.0 {
        format!("{:.1} min", seconds / 60.0)
    } else {
        let minutes = (seconds / 60.0).round() as u64;
        format!("{} h {:02} min", minutes / 60, minutes % 60)
    }
}

fn seconds_or_never(seconds: Option<f64>) -> String {
    seconds.map_or("never".to_string(), human_seconds)
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if count == 0 {
        0.0
    } else {
        sum / count as f64
    }
}

// ---------------------------------------------------------------------------------------------
// Charts.

/// A chart of fractions (0..1) over time: step lines, shaded bands and one vertical marker.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Shown above the plot.
    pub title: String,
    /// Under the x axis.
    pub x_label: String,
    /// Beside the y axis.
    pub y_label: String,
    /// One step line per series.
    pub lines: Vec<Line>,
    /// Shaded ranges with a median line.
    pub bands: Vec<Band>,
    /// A vertical dashed line at this x, with a label.
    pub marker: Option<(f64, String)>,
    /// Logarithmic time axis (for series that differ by orders of magnitude).
    pub x_log: bool,
}

/// A step series: the fraction holds from each point until the next.
#[derive(Clone, Debug)]
pub struct Line {
    /// Legend text.
    pub label: String,
    /// (x, fraction) with non-decreasing x.
    pub points: Vec<(f64, f64)>,
}

/// The spread of many step series over time.
#[derive(Clone, Debug)]
pub struct Band {
    /// Legend text.
    pub label: String,
    /// Sample times.
    pub x: Vec<f64>,
    /// Per sample: smallest, median and largest fraction over the series.
    pub min: Vec<f64>,
    /// Median per sample.
    pub median: Vec<f64>,
    /// Largest per sample.
    pub max: Vec<f64>,
}

impl Band {
    /// Samples `series` (each a step series starting at its first point) at evenly spaced times
    /// from 0 to the last point of any series.
    pub fn over_series(label: String, series: &[&[(f64, f64)]]) -> Band {
        let end = series
            .iter()
            .filter_map(|s| s.last().map(|p| p.0))
            .fold(0.0, f64::max);
        let x: Vec<f64> = (0..=BAND_SAMPLES)
            .map(|i| end * i as f64 / BAND_SAMPLES as f64)
            .collect();
        let mut cursors = vec![0usize; series.len()];
        let mut values = vec![0.0; series.len()];
        let (mut min, mut median, mut max) = (Vec::new(), Vec::new(), Vec::new());
        for &t in &x {
            for (k, s) in series.iter().enumerate() {
                while cursors[k] < s.len() && s[cursors[k]].0 <= t {
                    cursors[k] += 1;
                }
                values[k] = if cursors[k] == 0 {
                    0.0
                } else {
                    s[cursors[k] - 1].1
                };
            }
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            min.push(sorted.first().copied().unwrap_or(0.0));
            max.push(sorted.last().copied().unwrap_or(0.0));
            median.push(sorted.get(sorted.len() / 2).copied().unwrap_or(0.0));
        }
        Band {
            label,
            x,
            min,
            median,
            max,
        }
    }
}

impl Chart {
    /// An empty chart.
    pub fn new(title: impl Into<String>, x_label: &str, y_label: &str) -> Chart {
        Chart {
            title: title.into(),
            x_label: x_label.to_string(),
            y_label: y_label.to_string(),
            lines: Vec::new(),
            bands: Vec::new(),
            marker: None,
            x_log: false,
        }
    }

    /// The chart as a standalone SVG document.
    pub fn render(&self) -> String {
        let plot_w = CHART_WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
        let plot_h = CHART_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
        let xs = self
            .lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.0))
            .chain(self.bands.iter().flat_map(|b| b.x.iter().copied()))
            .chain(self.marker.iter().map(|m| m.0));
        let x_max_data = xs.clone().fold(0.0, f64::max);
        let x_min_positive = xs.filter(|&x| x > 0.0).fold(f64::INFINITY, f64::min);
        let axis = if self.x_log && x_min_positive.is_finite() {
            Axis::log(x_min_positive, x_max_data)
        } else {
            Axis::linear(x_max_data)
        };
        let px = |x: f64| MARGIN_LEFT + axis.fraction(x) * plot_w;
        let py = |y: f64| MARGIN_TOP + (1.0 - y.clamp(0.0, 1.0)) * plot_h;

        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_WIDTH}" height="{CHART_HEIGHT}" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            svg,
            r#"<rect x="0" y="0" width="{CHART_WIDTH}" height="{CHART_HEIGHT}" fill="white"/>"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="24" font-size="15" text-anchor="middle">{}</text>"#,
            MARGIN_LEFT + plot_w / 2.0,
            escape(&self.title)
        );

        // Grid and ticks.
        for i in 0..=5 {
            let y = i as f64 / 5.0;
            let _ = writeln!(
                svg,
                r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#e0e0e0"/>"##,
                MARGIN_LEFT,
                py(y),
                MARGIN_LEFT + plot_w,
                py(y)
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}%</text>"#,
                MARGIN_LEFT - 8.0,
                py(y) + 4.0,
                y * 100.0
            );
        }
        for tick in axis.ticks() {
            let x = px(tick);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#e0e0e0"/>"##,
                MARGIN_TOP,
                MARGIN_TOP + plot_h
            );
            let _ = writeln!(
                svg,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                MARGIN_TOP + plot_h + 18.0,
                tick_label(tick)
            );
        }
        let _ = writeln!(
            svg,
            r##"<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{plot_w:.1}" height="{plot_h:.1}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}{}</text>"#,
            MARGIN_LEFT + plot_w / 2.0,
            CHART_HEIGHT - 18.0,
            escape(&self.x_label),
            if matches!(axis, Axis::Log { .. }) {
                " (log scale)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            svg,
            r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
            MARGIN_TOP + plot_h / 2.0,
            MARGIN_TOP + plot_h / 2.0,
            escape(&self.y_label)
        );

        // Data.
        // (label, colour, dash pattern or FILLED for a shaded box).
        let mut legend: Vec<(String, &str, &str)> = Vec::new();
        let mut colour = 0;
        for band in &self.bands {
            let c = PALETTE[colour % PALETTE.len()];
            colour += 1;
            let mut area = String::new();
            for (i, (&x, &y)) in band.x.iter().zip(&band.max).enumerate() {
                let _ = write!(
                    area,
                    "{}{:.1},{:.1} ",
                    if i == 0 { "M" } else { "L" },
                    px(x),
                    py(y)
                );
            }
            for (&x, &y) in band.x.iter().zip(&band.min).rev() {
                let _ = write!(area, "L{:.1},{:.1} ", px(x), py(y));
            }
            let _ = writeln!(
                svg,
                r#"<path d="{}Z" fill="{c}" fill-opacity="0.25" stroke="none"/>"#,
                area
            );
            let median: Vec<(f64, f64)> = band
                .x
                .iter()
                .copied()
                .zip(band.median.iter().copied())
                .collect();
            let _ = writeln!(
                svg,
                r#"<path d="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
                polyline(&median, &px, &py)
            );
            legend.push((band.label.clone(), c, FILLED));
            legend.push(("median site".to_string(), c, ""));
        }
        for (i, line) in self.lines.iter().enumerate() {
            let c = PALETTE[colour % PALETTE.len()];
            colour += 1;
            let dash = DASHES[i % DASHES.len()];
            // A finished series holds its last value to the right edge.
            let mut points = line.points.clone();
            if let Some(&(x, y)) = points.last() {
                if x < axis.max() {
                    points.push((axis.max(), y));
                }
            }
            let _ = writeln!(
                svg,
                r#"<path d="{}" fill="none" stroke="{c}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
                step_path(&points, &px, &py)
            );
            legend.push((line.label.clone(), c, dash));
        }
        if let Some((x, label)) = &self.marker {
            if *x > 0.0 {
                let _ = writeln!(
                    svg,
                    r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#555" stroke-dasharray="{MARKER_DASH}"/>"##,
                    px(*x),
                    MARGIN_TOP,
                    MARGIN_TOP + plot_h
                );
                legend.push((
                    format!("{label} ({})", human_seconds(*x)),
                    "#555",
                    MARKER_DASH,
                ));
            }
        }

        // Legend.
        let lx = MARGIN_LEFT + plot_w + 15.0;
        for (i, (label, c, dash)) in legend.iter().enumerate() {
            let y = MARGIN_TOP + 10.0 + i as f64 * 20.0;
            if *dash == FILLED {
                let _ = writeln!(
                    svg,
                    r#"<rect x="{lx:.1}" y="{:.1}" width="22" height="10" fill="{c}" fill-opacity="0.25"/>"#,
                    y - 5.0
                );
            } else {
                let _ = writeln!(
                    svg,
                    r#"<line x1="{lx:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{c}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
                    lx + 22.0
                );
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                lx + 28.0,
                y + 4.0,
                escape(label)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// The time axis.
enum Axis {
    Linear { max: f64 },
    Log { min: f64, max: f64 },
}

impl Axis {
    fn linear(data_max: f64) -> Axis {
        Axis::Linear {
            max: nice_ceiling(data_max.max(1e-3)),
        }
    }

    fn log(data_min: f64, data_max: f64) -> Axis {
        let min = 10f64.powf(data_min.log10().floor());
        let max = 10f64.powf(data_max.max(min * 10.0).log10().ceil());
        Axis::Log { min, max }
    }

    /// The right end of the axis.
    fn max(&self) -> f64 {
        match *self {
            Axis::Linear { max } | Axis::Log { max, .. } => max,
        }
    }

    /// Position of `x` across the plot, 0..1.
    fn fraction(&self, x: f64) -> f64 {
        match *self {
            Axis::Linear { max } => (x / max).clamp(0.0, 1.0),
            Axis::Log { min, max } => {
                ((x.max(min).log10() - min.log10()) / (max.log10() - min.log10())).clamp(0.0, 1.0)
            }
        }
    }

    fn ticks(&self) -> Vec<f64> {
        match *self {
            Axis::Linear { max } => {
                let step = nice_ceiling(max / 6.0);
                let count = (max / step).round() as usize;
                (0..=count).map(|i| i as f64 * step).collect()
            }
            Axis::Log { min, max } => {
                let mut ticks = Vec::new();
                let mut decade = min;
                while decade <= max * 1.000_001 {
                    ticks.push(decade);
                    decade *= 10.0;
                }
                ticks
            }
        }
    }
}

/// The smallest of 1, 2, 2.5, 5 × 10^k that is at least `x`.
fn nice_ceiling(x: f64) -> f64 {
    let magnitude = 10f64.powf(x.log10().floor());
    for factor in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if factor * magnitude >= x * (1.0 - 1e-9) {
            return factor * magnitude;
        }
    }
    10.0 * magnitude
}

fn tick_label(x: f64) -> String {
    if x == 0.0 {
        "0".to_string()
    } else if !(0.01..1e5).contains(&x) {
        format!("{x:.0e}")
    } else {
        let text = format!("{x:.2}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// An SVG path drawing a step series (horizontal, then vertical at each point).
fn step_path(points: &[(f64, f64)], px: &dyn Fn(f64) -> f64, py: &dyn Fn(f64) -> f64) -> String {
    let mut d = String::new();
    for (i, &(x, y)) in points.iter().enumerate() {
        if i == 0 {
            let _ = write!(d, "M{:.1},{:.1}", px(x), py(y));
        } else {
            let _ = write!(d, " H{:.1} V{:.1}", px(x), py(y));
        }
    }
    d
}

/// An SVG path through the points.
fn polyline(points: &[(f64, f64)], px: &dyn Fn(f64) -> f64, py: &dyn Fn(f64) -> f64) -> String {
    let mut d = String::new();
    for (i, &(x, y)) in points.iter().enumerate() {
        let _ = write!(
            d,
            "{}{:.1},{:.1} ",
            if i == 0 { "M" } else { "L" },
            px(x),
            py(y)
        );
    }
    d.trim_end().to_string()
}

/// Escapes text for SVG content and attributes.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
