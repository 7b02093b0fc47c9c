//! `mailferry owner fleet`: every recipient's state (current, behind, in flight, silent, failed, held,
//! never seen) from the owner's version database, one line each and a summary, as text, one JSON object
//! (`docs/fleet.schema.json`) or Prometheus metrics; exits 1 when a recipient shown is failed or silent.

use std::io::{self, Write};

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use mailferry::db::{Db, now};
use mailferry::fleet::{self, FleetPolicy, FleetRow, FleetState};
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::status::{Format, fmt_time};
use crate::cli::{ConfigArg, Exit};

/// The version of the `owner fleet --json` object (`schema_version`): raised when a field is removed or
/// changes meaning; fields may be added without a raise.
pub const SCHEMA_VERSION: u32 = 1;

/// How rows are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Sort {
    /// By name.
    Name,
    /// The states that need attention first (failed, silent, held, never seen, behind, in flight, current).
    State,
    /// The longest quiet first.
    LastContact,
}

/// The arguments of `owner fleet` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
#[command(after_help = "Exit codes: 0 no recipient shown is failed or silent; 1 one is; 2 error.\n\
Examples:\n  mailferry owner fleet --state failed,silent\n  \
mailferry owner fleet --json | jq -r '.recipients[] | select(.state == \"behind\") | .name'\n  \
mailferry owner fleet --format prometheus > /var/lib/node_exporter/mailferry-fleet.prom")]
pub struct FleetCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The channel.
    #[arg(long, value_name = "CHANNEL", default_value = fleet::DEFAULT_CHANNEL)]
    channel: String,
    /// Only the members of this group.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Only recipients in these states (comma-separated: current, behind, in-flight, silent, failed, held,
    /// not-entitled, expired, never-seen); the summary and the exit code count only them.
    #[arg(long, value_name = "STATES", value_delimiter = ',')]
    state: Vec<String>,
    /// Order of the rows.
    #[arg(long, value_enum, default_value_t = Sort::Name)]
    sort: Sort,
    /// One JSON object on stdout (the same as --format json).
    #[arg(long, conflicts_with = "format")]
    json: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

/// The fleet as shown (`docs/fleet.schema.json`).
#[derive(Debug, Serialize)]
pub struct Shown {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The channel.
    pub channel: String,
    /// The newest generation of the channel, if any.
    pub generation: Option<u64>,
    /// When the states were derived (Unix seconds).
    pub at: u64,
    /// Whether the command exits 1 (a recipient shown is failed or silent).
    pub attention: bool,
    /// The count of each state among the recipients shown (every state, 0 included).
    pub summary: std::collections::BTreeMap<&'static str, usize>,
    /// The recipients shown.
    pub recipients: Vec<FleetRow>,
}

impl Render for Shown {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        let width = self.recipients.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
        writeln!(
            out,
            "{:width$}  {:12}  {:>5}  {:>6}  {:38}  REASON",
            "NAME", "STATE", "GEN", "BEHIND", "LAST CONTACT"
        )?;
        for r in &self.recipients {
            let reason = match (&r.reason, &r.detail) {
                (Some(code), Some(d)) => format!("{code}: {d}"),
                (Some(code), None) => code.clone(),
                (None, Some(d)) => d.clone(),
                (None, None) => String::new(),
            };
            writeln!(
                out,
                "{:width$}  {:12}  {:>5}  {:>6}  {:38}  {reason}",
                r.name,
                r.state.code(),
                r.generation.map_or("-".into(), |g| g.to_string()),
                r.behind.map_or("-".into(), |b| b.to_string()),
                fmt_time(r.last_contact_at),
            )?;
        }
        writeln!(out, "{}", fleet::summary_line(&self.recipients))
    }
}

impl FleetCommand {
    /// Shows the fleet.
    ///
    /// # Errors
    /// An unknown state, an unreadable config or state.
    pub fn execute(self) -> Result<Exit> {
        let cfg = self.config.owner()?;
        let mut wanted = Vec::new();
        for s in &self.state {
            match FleetState::from_code(s.trim()) {
                Some(st) => wanted.push(st),
                None => {
                    bail!("unknown state {s:?}; the states are {}", FleetState::ALL.map(FleetState::code).join(", "))
                }
            }
        }
        let db = Db::open(&cfg.state_dir.join("state.db"))?;
        let at = now();
        if db.channel(&self.channel)?.is_none() {
            bail!("no channel named {:?} (`mailferry owner channel list`)", self.channel);
        }
        let mut rows = fleet::fleet_of(&db, &self.channel, &FleetPolicy::of(&cfg), at)?;
        if let Some(g) = &self.group {
            if !db.has_group(g)? {
                bail!("no group named {g:?} (`mailferry owner group list`)");
            }
            let members = db.members(g)?;
            rows.retain(|r| members.contains(&r.name));
        }
        if !wanted.is_empty() {
            rows.retain(|r| wanted.contains(&r.state));
        }
        match self.sort {
            Sort::Name => rows.sort_by(|a, b| a.name.cmp(&b.name)),
            Sort::State => rows.sort_by(|a, b| (a.state, &a.name).cmp(&(b.state, &b.name))),
            Sort::LastContact => rows.sort_by(|a, b| (a.last_contact_at, &a.name).cmp(&(b.last_contact_at, &b.name))),
        }
        let attention = rows.iter().any(|r| r.state.alarming());
        let generation = db.channel_latest(&self.channel)?.map(|(n, _)| n);
        let format = if self.json { Format::Json } else { self.format };
        if format == Format::Prometheus {
            let text = crate::cli::prometheus::fleet(&rows, attention);
            io::stdout().lock().write_all(text.as_bytes())?;
        } else {
            let summary =
                FleetState::ALL.iter().map(|s| (s.code(), rows.iter().filter(|r| r.state == *s).count())).collect();
            let shown = Shown {
                schema_version: SCHEMA_VERSION,
                channel: self.channel,
                generation,
                at,
                attention,
                summary,
                recipients: rows,
            };
            Output::new(format == Format::Json).print(&shown)?;
        }
        Ok(if attention { Exit::Attention } else { Exit::Success })
    }
}
