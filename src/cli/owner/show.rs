//! `mailferry owner show`: one recipient, its groups, and what it is entitled to in each channel.

use std::io::{self, Write};

use anyhow::Result;
use clap::Args;
use mailferry::node::grants::Shown;
use mailferry::node::owner::Owner;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `owner show`.
#[derive(Debug, Args)]
pub struct ShowCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The recipient.
    #[arg(long)]
    name: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Render for Shown {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "recipient {} <{}>, key {}{}",
            self.name,
            self.address,
            self.key_id,
            if self.suspended { ", SUSPENDED" } else { "" }
        )?;
        let groups = if self.groups.is_empty() { "none".to_owned() } else { self.groups.join(", ") };
        writeln!(out, "groups: {groups}")?;
        for c in &self.channels {
            writeln!(out, "  {:<16} {}", c.channel, c.entitlement)?;
        }
        Ok(())
    }
}

impl ShowCommand {
    /// Shows the recipient.
    ///
    /// # Errors
    /// No such recipient, state failures.
    pub fn execute(self) -> Result<Exit> {
        let shown = Owner::open(self.config.owner()?)?.show(&self.name)?;
        Output::new(self.json).print(&shown)?;
        Ok(Exit::Success)
    }
}
