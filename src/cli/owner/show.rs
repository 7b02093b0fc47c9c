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
        if !self.tags.is_empty() {
            writeln!(out, "tags:   {}", self.tags.join(", "))?;
        }
        match &self.registration {
            None => writeln!(out, "registration: none yet (sent with its first request)")?,
            Some(f) => {
                writeln!(
                    out,
                    "platform: {} {} on {}{}",
                    f.os,
                    f.arch,
                    f.hostname,
                    f.os_release.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
                )?;
                writeln!(out, "install:  {}, timing {}", f.install, f.update_timing.as_deref().unwrap_or("-"))?;
                if let Some(c) = &f.contact {
                    writeln!(out, "contact:  {c}")?;
                }
                for (channel, i) in &f.installed {
                    writeln!(
                        out,
                        "installed: {channel} generation {} root {}",
                        i.generation,
                        &i.root[..12.min(i.root.len())]
                    )?;
                }
            }
        }
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
