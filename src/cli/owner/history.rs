//! `mailferry owner history`: what happened to one recipient's replies, oldest first: each reply sent, and
//! each outcome its receipts reported (applied, current, failed with its reason, rolled back).

use std::io::{self, Write};

use anyhow::Result;
use clap::Args;
use mailferry::db::Db;
use mailferry::fleet::{self, HistoryEntry};
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::status::fmt_time;
use crate::cli::{ConfigArg, Exit};

/// The arguments of `owner history` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct HistoryCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The recipient.
    #[arg(long)]
    name: String,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// A recipient's history as shown.
#[derive(Debug, Serialize)]
struct Shown {
    /// The version of this object, as `owner fleet --json`'s.
    schema_version: u32,
    /// The recipient.
    name: String,
    /// Oldest first.
    entries: Vec<HistoryEntry>,
}

impl Render for Shown {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        if self.entries.is_empty() {
            return writeln!(out, "{}: nothing sent or reported yet", self.name);
        }
        for e in &self.entries {
            let generation = e.generation.map_or("-".into(), |g| g.to_string());
            let what = match e.event.as_str() {
                "sent" => format!("sent reply bringing generation {generation}"),
                "applied" => format!("applied: has generation {generation}"),
                "current" => format!("current: has generation {generation}"),
                "failed" => format!("FAILED: still has generation {generation}"),
                "rolled-back" => format!("rolled back to generation {generation}"),
                other => format!("{other}: generation {generation}"),
            };
            write!(out, "{}  {what}", fmt_time(Some(e.at)))?;
            if let Some(id) = &e.reply_id {
                write!(out, " (reply {id})")?;
            }
            match (&e.reason, &e.detail) {
                (Some(r), Some(d)) => writeln!(out, ": {r}: {d}")?,
                (None, Some(d)) => writeln!(out, ": {d}")?,
                (Some(r), None) => writeln!(out, ": {r}")?,
                (None, None) => writeln!(out)?,
            }
        }
        Ok(())
    }
}

impl HistoryCommand {
    /// Shows the history.
    ///
    /// # Errors
    /// No such recipient, an unreadable config or state.
    pub fn execute(self) -> Result<Exit> {
        let cfg = self.config.owner()?;
        let db = Db::open(&cfg.state_dir.join("state.db"))?;
        let entries = fleet::history(&db, &self.name)?;
        Output::new(self.json).print(&Shown {
            schema_version: crate::cli::owner::fleet::SCHEMA_VERSION,
            name: self.name,
            entries,
        })?;
        Ok(Exit::Success)
    }
}
