//! `mailferry owner approve`: approves a generation for serving (the console's Approve button).

use std::io::{self, Write};

use anyhow::Result;
use clap::Args;
use mailferry::console::actions::{self, Done};
use mailferry::db::Db;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `owner approve` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct ApproveCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The generation's number.
    #[arg(long)]
    generation: u64,
    /// Its channel.
    #[arg(long, default_value = mailferry::db::DEFAULT_SUBSCRIPTION)]
    channel: String,
}

impl Render for Done {
    const STREAM: Stream = Stream::Stderr;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        match (self.action, self.changed) {
            ("approve", true) => writeln!(out, "approved generation {} for serving", self.target),
            ("approve", false) => writeln!(out, "generation {} was approved before", self.target),
            ("suspend", true) => writeln!(out, "suspended {:?}: its requests are refused from now on", self.target),
            ("suspend", false) => writeln!(out, "{:?} was suspended already", self.target),
            ("resume", true) => writeln!(out, "resumed {:?}: its requests are answered again", self.target),
            (_, _) => writeln!(out, "{:?} was not suspended", self.target),
        }
    }
}

impl ApproveCommand {
    /// Approves the generation.
    ///
    /// # Errors
    /// No such generation, state failures.
    pub fn execute(self) -> Result<Exit> {
        let cfg = self.config.owner()?;
        // A short transaction, like `status`: no state lock, so it works while the daemon runs.
        let db = Db::open(&cfg.state_dir.join("state.db"))?;
        let done = actions::approve(&db, &self.channel, self.generation, "cli")?;
        if !cfg.owner.require_approval {
            tracing::warn!("require-approval is off in `{}`: every generation is offered anyway", cfg.path.display());
        }
        Output::human().print(&done)?;
        Ok(Exit::Success)
    }
}
