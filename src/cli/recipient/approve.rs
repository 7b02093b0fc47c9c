//! `mailferry recipient approve`: installs the verified update kept ready (`install = "manual"`, or
//! one waiting for its apply window).

use std::io::{self, Write};

use anyhow::Result;
use clap::Args;
use mailferry::node::recipient::{Installed, Recipient};
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `recipient approve` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct ApproveCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The channel whose waiting update to install (default: the recipient's one channel).
    #[arg(long, value_name = "CHANNEL")]
    channel: Option<String>,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// What `approve` did.
#[derive(Debug, Serialize)]
struct Approved {
    #[serde(flatten)]
    installed: Installed,
    /// The tree is that generation now (false: its post-apply hook failed and the tree went back).
    in_tree: bool,
}

impl Render for Approved {
    const STREAM: Stream = Stream::Stderr;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        let i = &self.installed;
        if let Some(f) = &i.hook_failure {
            writeln!(out, "installed generation {}, but its {} hook failed ({})", i.generation, f.hook, f.action)?;
            for line in f.output_tail.lines() {
                writeln!(out, "  | {line}")?;
            }
        }
        if self.in_tree {
            writeln!(
                out,
                "installed generation {} ({} operations); the receipt goes with the next run",
                i.generation, i.ops
            )
        } else {
            writeln!(out, "the tree is back at generation {}; generation {} is held back", i.applied, i.generation)
        }
    }
}

impl ApproveCommand {
    /// Installs the waiting update.
    ///
    /// # Errors
    /// Nothing waiting, an unknown channel, a changed tree or a pre-apply veto, local failures.
    pub fn execute(self) -> Result<Exit> {
        let cfg = self.config.recipient()?;
        let mut r = Recipient::open(cfg)?;
        let installed = r.approve(self.channel.as_deref())?;
        let in_tree = installed.applied == installed.generation;
        Output::new(self.json).print(&Approved { installed, in_tree })?;
        Ok(Exit::Success)
    }
}
