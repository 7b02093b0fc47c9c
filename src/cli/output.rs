//! Showing a command's result: the same value becomes human text or one JSON object per line.
//!
//! Human text goes to the stream the result belongs on ([`Stream`]): data (`publish`, `status`, `log`)
//! to stdout, narration (what a command did, run summaries) to stderr, and not at all under `-q`. JSON
//! always goes to stdout. Sizes are shown to a person in binary units ([`bytes`]); JSON keeps byte counts.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use mailferry::node::{Handled, RunReport};
use mailferry::protocol::ReceiptStatus;
use serde::Serialize;

/// Where a result's human form goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Data, for a pipe or a script.
    Stdout,
    /// Narration, for the person at the terminal.
    Stderr,
}

/// `-q`: narration is not shown.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Turns narration off (`-q`) or on.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// A size for a person: `512 bytes`, `1.5 KiB`, `12.0 MiB`, `3.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return if n == 1 { "1 byte".into() } else { format!("{n} bytes") };
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A command's result, shown to a person or as JSON.
pub trait Render: Serialize {
    /// Where the human form goes.
    const STREAM: Stream;

    /// Writes the human form.
    fn human(&self, out: &mut dyn Write) -> io::Result<()>;
}

/// How a command shows its results.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    json: bool,
}

impl Output {
    /// Human text, for the commands without `--json`.
    pub fn human() -> Output {
        Output { json: false }
    }

    /// JSON when `json`, else human text.
    pub fn new(json: bool) -> Output {
        Output { json }
    }

    /// Shows `value`: one JSON object on a line of stdout, or its human form on its stream.
    ///
    /// # Errors
    /// Writing failed (a closed pipe is reported as one, and `main` exits quietly on it).
    pub fn print<R: Render>(&self, value: &R) -> Result<()> {
        if self.json {
            let mut out = io::stdout().lock();
            serde_json::to_writer(&mut out, value)?;
            writeln!(out)?;
            return Ok(());
        }
        match R::STREAM {
            Stream::Stdout => value.human(&mut io::stdout().lock())?,
            Stream::Stderr if QUIET.load(Ordering::Relaxed) => {}
            Stream::Stderr => value.human(&mut io::stderr().lock())?,
        }
        Ok(())
    }
}

/// What a run of a node did (`owner run`, `recipient run`, `deliver`).
#[derive(Debug, Serialize)]
pub struct RunSummary<'a> {
    /// `owner` or `recipient`.
    pub role: &'a str,
    /// The counts.
    #[serde(flatten)]
    pub report: &'a RunReport,
}

impl Render for RunSummary<'_> {
    const STREAM: Stream = Stream::Stderr;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "{}: {}", self.role, summary_words(self.report))
    }
}

/// What a run did, in words: `applied generation 2 (100 changes); sent 1 message`.
pub fn summary_words(r: &RunReport) -> String {
    let mut said: Vec<String> = Vec::new();
    let mut kept_parts = 0;
    for h in &r.outcomes {
        match h {
            Handled::Answered { recipient, generation, ops } => {
                said.push(format!("answered {recipient:?} with generation {generation} ({})", changes(*ops)))
            }
            Handled::Receipt { recipient, generation, status } => said.push(match status {
                ReceiptStatus::Applied => format!("{recipient:?} reports generation {generation} applied"),
                ReceiptStatus::Current => format!("{recipient:?} reports generation {generation} current"),
                ReceiptStatus::Failed => {
                    format!("{recipient:?} could not apply its reply (has generation {generation})")
                }
                ReceiptStatus::RolledBack => format!("{recipient:?} rolled back to generation {generation}"),
            }),
            Handled::Applied { generation, ops } => {
                said.push(format!("applied generation {generation} ({})", changes(*ops)))
            }
            Handled::PartKept { .. } => kept_parts += 1,
            Handled::Current { generation } => said.push(format!("generation {generation} is current")),
            Handled::Standing { channel, standing } => {
                said.push(format!("the owner answers for {channel:?}: {standing}"))
            }
            Handled::Referred { reply_id } => said.push(format!("the owner refers to reply {reply_id}, sent before")),
            Handled::Bounced { status } => said.push(format!("read a delivery report ({status})")),
            Handled::Held { generation, .. } => {
                said.push(format!("held back generation {generation} (rolled back locally)"))
            }
            Handled::Ready { generation, wait } => said.push(match wait {
                mailferry::node::install::Wait::Manual => {
                    format!("generation {generation} is ready; `mailferry recipient approve` installs it")
                }
                mailferry::node::install::Wait::Window => {
                    format!("generation {generation} is ready; it is installed when its apply window opens")
                }
            }),
            Handled::Duplicate { .. } | Handled::Deferred(_) | Handled::Refused(_) | Handled::NotForThisNode(_) => {}
        }
    }
    if kept_parts > 0 {
        said.push(format!("kept {kept_parts} reply part(s) until the rest arrive"));
    }
    if r.refused > 0 {
        said.push(format!("refused {} message(s) (see `mailferry log --rejected`)", r.refused));
    }
    if r.duplicates > 0 {
        said.push(format!("{} message(s) already handled", r.duplicates));
    }
    if r.deferred > 0 {
        said.push(format!("{} message(s) left for later", r.deferred));
    }
    if r.not_for_this_node > 0 {
        said.push(format!("{} message(s) of this node's own, not for it", r.not_for_this_node));
    }
    // The request is one of the messages sent; count only the others.
    let others = if r.requested { r.sent.saturating_sub(1) } else { r.sent };
    if r.requested {
        said.push("request sent".into());
    }
    match (others, r.requested) {
        (0, _) => {}
        (n, false) => said.push(format!("sent {n} message(s)")),
        (n, true) => said.push(format!("sent {n} other message(s)")),
    }
    if said.is_empty() { "nothing to do".into() } else { said.join("; ") }
}

fn changes(ops: usize) -> String {
    if ops == 1 { "1 change".into() } else { format!("{ops} changes") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_for_people() {
        let cases = [(0, "0 bytes"), (1, "1 byte"), (1023, "1023 bytes"), (1536, "1.5 KiB"), (10 << 20, "10.0 MiB")];
        for (n, want) in cases {
            assert_eq!(bytes(n), want);
        }
        assert_eq!(bytes(4 << 30), "4.0 GiB");
    }

    #[test]
    fn summaries_say_what_happened() {
        let mut r = RunReport::default();
        assert_eq!(summary_words(&r), "nothing to do");
        r.outcomes.push(Handled::Applied { generation: 2, ops: 100 });
        r.sent = 1;
        assert_eq!(summary_words(&r), "applied generation 2 (100 changes); sent 1 message(s)");
    }
}
