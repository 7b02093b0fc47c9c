//! `mailferry owner group ...`: groups of recipients, which grants reach.

use std::io::{self, Write};

use anyhow::Result;
use clap::{Args, Subcommand};
use mailferry::db::GroupRow;
use mailferry::node::Role as _;
use mailferry::node::owner::Owner;
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// The `owner group` subcommands.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Add a group, optionally with members.
    Add(AddCommand),
    /// Put a recipient in a group.
    Join(MemberCommand),
    /// Take a recipient out of a group.
    Leave(MemberCommand),
    /// List the groups with their members and grants.
    List(ListCommand),
}

/// The arguments of `owner group add`.
#[derive(Debug, Args)]
pub struct AddCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The group's name.
    #[arg(long)]
    name: String,
    /// Recipients to put in it, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "R1,R2")]
    members: Vec<String>,
}

/// The arguments of `owner group join` and `leave`.
#[derive(Debug, Args)]
pub struct MemberCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The group.
    #[arg(long)]
    name: String,
    /// The recipient.
    #[arg(long)]
    recipient: String,
}

/// The arguments of `owner group list`.
#[derive(Debug, Args)]
pub struct ListCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Render for GroupRow {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        let members = if self.members.is_empty() { "no members".to_owned() } else { self.members.join(", ") };
        writeln!(out, "group {}: {members}", self.name)?;
        for g in &self.grants {
            let mut terms = Vec::new();
            if let Some(u) = &g.until {
                terms.push(format!("until {u}"));
            }
            if let Some(p) = g.pin {
                terms.push(format!("pinned at {p}"));
            }
            if let Some(s) = &g.selector {
                terms.push(format!("where {s}"));
            }
            writeln!(
                out,
                "  granted {}{}",
                g.channel,
                if terms.is_empty() { String::new() } else { format!(" ({})", terms.join(", ")) }
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
struct Groups {
    groups: Vec<GroupRow>,
}

impl Render for Groups {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        if self.groups.is_empty() {
            writeln!(out, "no groups (`mailferry owner group add`)")?;
        }
        self.groups.iter().try_for_each(|g| g.human(out))
    }
}

impl GroupCommand {
    /// Runs the group command.
    ///
    /// # Errors
    /// Unknown groups or recipients, a taken name, state failures.
    pub fn execute(self) -> Result<Exit> {
        match self {
            GroupCommand::Add(c) => {
                let g = Owner::open(c.config.owner()?)?.add_group(&c.name, &c.members)?;
                Output::human().print(&g)?;
            }
            GroupCommand::Join(c) => {
                let g = Owner::open(c.config.owner()?)?.join_group(&c.name, &c.recipient)?;
                Output::human().print(&g)?;
            }
            GroupCommand::Leave(c) => {
                let g = Owner::open(c.config.owner()?)?.leave_group(&c.name, &c.recipient)?;
                Output::human().print(&g)?;
            }
            GroupCommand::List(c) => {
                let owner = Owner::open(c.config.owner()?)?;
                Output::new(c.json).print(&Groups { groups: owner.db().groups()? })?;
            }
        }
        Ok(Exit::Success)
    }
}
