//! What a run shows on the terminal while it works: one line naming the phase (starting the
//! mesh, generating the tree, publishing) with a spinner, then a bar of the edges that hold the
//! bundle and the bytes moved so far.
//!
//! It draws on stderr, and only when stderr is a terminal, so a pipe or a file gets no escape
//! codes; [`Progress::hidden`] draws nothing (for runs whose log lines go to stderr instead).
//! A leaf module: it uses no other module of netsim.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};

/// How often the spinner turns while a phase runs.
const SPINNER_TICK: Duration = Duration::from_millis(120);

/// The phase line: a spinner, the run's elapsed time, what it does.
const PHASE_TEMPLATE: &str = "{spinner:.green} [{elapsed_precise}] {msg}";

/// The fan-out line: elapsed time, edges holding the bundle, bytes moved.
const FANOUT_TEMPLATE: &str =
    "  [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} edges hold the bundle · {msg}";

const MIB: f64 = 1024.0 * 1024.0;

/// A run's progress display; cleared from the terminal when dropped.
#[derive(Clone, Debug)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A display on stderr, drawn only when stderr is a terminal.
    pub fn stderr() -> Self {
        Self::with_target(ProgressDrawTarget::stderr())
    }

    /// A display that draws nothing.
    pub fn hidden() -> Self {
        Self::with_target(ProgressDrawTarget::hidden())
    }

    fn with_target(target: ProgressDrawTarget) -> Self {
        let bar = ProgressBar::with_draw_target(None, target)
            .with_style(style(PHASE_TEMPLATE))
            .with_finish(ProgressFinish::AndClear);
        Self { bar }
    }

    /// Whether nothing is drawn (stderr is not a terminal, or [`Progress::hidden`]).
    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }

    /// Shows that the run now does `what`, with a turning spinner.
    pub fn phase(&self, what: impl Into<String>) {
        self.bar.set_style(style(PHASE_TEMPLATE));
        self.bar.set_message(what.into());
        self.bar.enable_steady_tick(SPINNER_TICK);
    }

    /// Turns the display into the fan-out's bar: none of `edges` holds the bundle yet.
    pub fn start_fanout(&self, edges: u64) {
        // The message first, so the bar is never drawn with the phase's message.
        self.set_bytes(0, None);
        self.bar.disable_steady_tick();
        self.bar.set_length(edges);
        self.bar.set_position(0);
        self.bar.set_style(style(FANOUT_TEMPLATE));
    }

    /// One more edge holds the bundle (or gave up: the result tells which).
    pub fn edge_done(&self) {
        self.bar.inc(1);
    }

    /// Bytes moved so far: into the sites over their WAN links, and inside the sites (stagers
    /// and peers to edges) when known.
    pub fn set_bytes(&self, wan_bytes: u64, lan_bytes: Option<u64>) {
        let wan = format!("WAN {:.1} MiB", wan_bytes as f64 / MIB);
        self.bar.set_message(match lan_bytes {
            Some(lan) => format!("{wan} · in sites {:.1} MiB", lan as f64 / MIB),
            None => wan,
        });
    }

    /// Prints `line` on stderr above the display (so the two do not garble each other).
    pub fn println(&self, line: impl AsRef<str>) {
        if self.bar.is_hidden() {
            eprintln!("{}", line.as_ref());
        } else {
            self.bar.println(line.as_ref());
        }
    }

    /// Removes the display from the terminal.
    pub fn clear(&self) {
        self.bar.finish_and_clear();
    }
}

/// The style of `template`, which is a constant of this module and always valid; the default
/// bar style stands in if it ever is not.
fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_templates_are_valid() {
        for template in [PHASE_TEMPLATE, FANOUT_TEMPLATE] {
            assert!(ProgressStyle::with_template(template).is_ok(), "{template}");
        }
    }

    #[test]
    fn a_hidden_display_counts_edges_without_drawing() {
        let progress = Progress::hidden();
        assert!(progress.is_hidden());
        progress.phase("publishing");
        progress.start_fanout(3);
        progress.edge_done();
        progress.edge_done();
        progress.set_bytes(3 * 1024 * 1024, Some(1024 * 1024));
        assert_eq!(progress.bar.position(), 2);
        assert_eq!(progress.bar.length(), Some(3));
        assert_eq!(progress.bar.message(), "WAN 3.0 MiB · in sites 1.0 MiB");
    }
}
