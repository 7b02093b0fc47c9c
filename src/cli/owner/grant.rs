//! `mailferry owner grant` and `owner revoke`: which group may be sent which channel, until when, at
//! which generation.

use std::io::{self, Write};

use anyhow::Result;
use clap::Args;
use mailferry::db::{GrantRow, now};
use mailferry::node::grants::Reach;
use mailferry::node::owner::Owner;
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `owner grant`.
#[derive(Debug, Args)]
pub struct GrantCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The group granted.
    #[arg(long)]
    group: String,
    /// The channel granted.
    #[arg(long)]
    channel: String,
    /// The last day the grant is valid (UTC), e.g. the end of a paid licence or support period.
    #[arg(long, value_name = "YYYY-MM-DD")]
    until: Option<String>,
    /// Keep the group's recipients at this generation (version control: approve the next one by moving it).
    #[arg(long, value_name = "GENERATION")]
    pin: Option<u64>,
    /// Only recipients whose registration facts or tags match, e.g. `arch = "x86_64" and os = "linux"`.
    #[arg(long, value_name = "EXPR")]
    selector: Option<String>,
    /// Show which recipients the grant would reach, and make no change.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The arguments of `owner revoke`.
#[derive(Debug, Args)]
pub struct RevokeCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The group.
    #[arg(long)]
    group: String,
    /// The channel.
    #[arg(long)]
    channel: String,
}

#[derive(Debug, Serialize)]
struct Granted {
    #[serde(flatten)]
    reach: Reach,
    /// False for `--dry-run`.
    made: bool,
}

impl Render for Granted {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        let g = &self.reach.grant;
        let verb = if self.made { "granted" } else { "would grant" };
        let mut terms = Vec::new();
        if let Some(u) = &g.until {
            terms.push(format!("until {u}"));
        }
        if let Some(p) = g.pin {
            terms.push(format!("pinned at {p}"));
        }
        let terms = if terms.is_empty() { String::new() } else { format!(" ({})", terms.join(", ")) };
        writeln!(out, "{verb} channel {} to group {}{terms}", g.channel, g.group)?;
        let names = |v: &[String]| if v.is_empty() { "nobody".to_owned() } else { v.join(", ") };
        writeln!(out, "reaches {} recipient(s): {}", self.reach.reaches.len(), names(&self.reach.reaches))?;
        if !self.reach.leaves_out.is_empty() {
            writeln!(out, "its selector leaves out: {}", names(&self.reach.leaves_out))?;
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
struct Revoked {
    group: String,
    channel: String,
}

impl Render for Revoked {
    const STREAM: Stream = Stream::Stderr;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "revoked channel {} from group {}", self.channel, self.group)
    }
}

impl GrantCommand {
    /// Makes (or, with `--dry-run`, shows the reach of) the grant.
    ///
    /// # Errors
    /// An unknown group or channel, a bad date, a pin that is not kept, a selector that does not parse.
    pub fn execute(self) -> Result<Exit> {
        let mut owner = Owner::open(self.config.owner()?)?;
        let g = GrantRow {
            group: self.group,
            channel: self.channel,
            until: self.until,
            pin: self.pin,
            selector: self.selector,
            created: now(),
        };
        let reach = owner.grant_reach(&g)?;
        if !self.dry_run {
            owner.grant(&g)?;
        }
        Output::new(self.json).print(&Granted { reach, made: !self.dry_run })?;
        Ok(Exit::Success)
    }
}

impl RevokeCommand {
    /// Withdraws the grant.
    ///
    /// # Errors
    /// No such grant, state failures.
    pub fn execute(self) -> Result<Exit> {
        Owner::open(self.config.owner()?)?.revoke(&self.group, &self.channel)?;
        Output::human().print(&Revoked { group: self.group, channel: self.channel })?;
        Ok(Exit::Success)
    }
}
