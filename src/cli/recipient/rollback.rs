//! `mailferry recipient rollback`: returns the data tree to the generation before, or ends the hold.

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mailferry::node::Role as _;
use mailferry::node::recipient::Recipient;
use mailferry::node::rollback;
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `recipient rollback` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct RollbackCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// Only end the hold of an earlier rollback: the held generation may be applied again.
    #[arg(long)]
    release: bool,
    /// The channel whose tree to roll back (default: the `[recipient]` tree's).
    #[arg(long, value_name = "NAME")]
    channel: Option<String>,
}

/// What `--release` did.
#[derive(Debug, Serialize)]
struct Released {
    /// The generation that was held back; `None` when there was no hold.
    generation: Option<u64>,
}

impl Render for Released {
    const STREAM: Stream = Stream::Stderr;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        match self.generation {
            Some(g) => writeln!(out, "released the hold: generation {g} may be applied again by the next sync"),
            None => writeln!(out, "no rollback hold to release"),
        }
    }
}

/// What the rollback did.
#[derive(Debug, Serialize)]
struct RolledBack {
    /// The generation undone, now held back.
    from: u64,
    /// The generation the tree has again.
    to: u64,
    /// Operations performed.
    ops: usize,
    /// It finished a rollback that a crash had interrupted.
    resumed: bool,
    /// The recipient's config, for the hint on how to end the hold.
    config: PathBuf,
}

impl Render for RolledBack {
    const STREAM: Stream = Stream::Stderr;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "{} generation {} to generation {} ({} changes); generation {} is held back",
            if self.resumed { "finished rolling back" } else { "rolled back" },
            self.from,
            self.to,
            self.ops,
            self.from
        )?;
        writeln!(
            out,
            "a newer generation ends the hold; so does: mailferry recipient rollback --release --config {}",
            self.config.display()
        )
    }
}

impl RollbackCommand {
    /// Rolls back, or releases the hold.
    ///
    /// # Errors
    /// Nothing kept, an interrupted apply, a changed tree, state failures.
    pub fn execute(self) -> Result<Exit> {
        let cfg = self.config.recipient()?;
        let config = cfg.path.clone();
        let channel = self.channel.unwrap_or_else(|| cfg.main().channel.clone());
        let mut r = Recipient::open_as_is(cfg)?;
        let tree = r.sub(&channel)?;
        if self.release {
            Output::human().print(&Released { generation: rollback::release(r.db().sub(&tree.channel)?)? })?;
        } else {
            let done = r.rollback_channel(&tree.channel)?;
            Output::human().print(&RolledBack {
                from: done.from,
                to: done.to,
                ops: done.ops,
                resumed: done.resumed,
                config,
            })?;
        }
        Ok(Exit::Success)
    }
}
