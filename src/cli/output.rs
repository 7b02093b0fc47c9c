//! Showing a command's result: the same value becomes human text or one JSON object per line.
//!
//! Human text goes to the stream the result belongs on ([`Stream`]): data (`publish`, `status`, `log`)
//! to stdout, narration (what a command did, run summaries) to stderr. JSON always goes to stdout.

use std::io::{self, Write};

use anyhow::Result;
use mailferry::node::RunReport;
use serde::Serialize;

/// Where a result's human form goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Data, for a pipe or a script.
    Stdout,
    /// Narration, for the person at the terminal.
    Stderr,
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
        let r = self.report;
        writeln!(
            out,
            "{}: {} message(s): {} handled, {} refused, {} duplicate, {} waiting; {} sent{}",
            self.role,
            r.messages,
            r.handled,
            r.refused,
            r.duplicates,
            r.deferred,
            r.sent,
            if r.requested { "; request sent" } else { "" }
        )
    }
}
