//! `mailferry owner remove-recipient`: unregisters a recipient.

use std::io::{self, Write};

use anyhow::Result;
use clap::Args;
use mailferry::node::owner::Owner;
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `owner remove-recipient` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct RemoveRecipientCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The recipient's name.
    #[arg(long)]
    name: String,
}

/// The recipient removed.
#[derive(Debug, Serialize)]
struct Removed {
    name: String,
}

impl Render for Removed {
    const STREAM: Stream = Stream::Stderr;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "removed recipient {:?}; its requests are refused from now on", self.name)
    }
}

impl RemoveRecipientCommand {
    /// Removes the recipient.
    ///
    /// # Errors
    /// An unknown name, state failures.
    pub fn execute(self) -> Result<Exit> {
        Owner::open(self.config.owner()?)?.remove_recipient(&self.name)?;
        Output::human().print(&Removed { name: self.name })?;
        Ok(Exit::Success)
    }
}
