//! Progress bars for long scans, packs and applies.
//!
//! Bars are off unless the binary turns them on ([`enable`]), which it does only when stderr is a terminal;
//! library users and tests never see them. A bar stays hidden for its first second, so quick steps print
//! nothing, and draws to stderr, away from machine-readable output.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// How long a step runs before its bar appears.
const DELAY: Duration = Duration::from_secs(1);

/// Turns progress bars on for this process (the binary calls it when stderr is a terminal).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// A byte counter for one step, drawn as a bar once the step has run for a second.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Progress {
    /// A bar for `what`, which will count up to `total` bytes.
    pub fn bytes(what: &str, total: u64) -> Progress {
        let bar = ENABLED.load(Ordering::Relaxed).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
            let style =
                ProgressStyle::with_template("{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(what.to_owned());
            bar
        });
        Progress { bar, started: Instant::now() }
    }

    /// A counter for `what`, which will count up to `total` steps (an apply's renames).
    pub fn steps(what: &str, total: u64) -> Progress {
        let bar = ENABLED.load(Ordering::Relaxed).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
            let style = ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} steps {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(what.to_owned());
            bar
        });
        Progress { bar, started: Instant::now() }
    }

    /// Counts `n` more bytes (or steps) done.
    pub fn add(&self, n: u64) {
        let Some(bar) = &self.bar else { return };
        bar.inc(n);
        if bar.is_hidden() && self.started.elapsed() >= DELAY {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
