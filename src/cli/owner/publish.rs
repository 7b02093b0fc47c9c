//! `mailferry owner publish`: snapshots the source tree into the next generation.

use std::io::{self, Write};

use anyhow::Result;
use clap::Args;
use mailferry::node::owner::{Owner, Published};

use crate::cli::output::{Output, Render, Stream, bytes};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `owner publish` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct PublishCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The channel to publish (default: the default channel, the config's `source`).
    #[arg(long, value_name = "NAME")]
    channel: Option<String>,
}

impl Render for Published {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        if self.new {
            writeln!(
                out,
                "generation {} root {} ({} files, {})",
                self.generation,
                self.root,
                self.files,
                bytes(self.bytes)
            )
        } else {
            writeln!(
                out,
                "generation {} root {} (unchanged: source equals the latest generation)",
                self.generation, self.root
            )
        }
    }
}

impl PublishCommand {
    /// Publishes.
    ///
    /// # Errors
    /// An unreadable source tree, store or state failures.
    pub fn execute(self) -> Result<Exit> {
        let mut owner = Owner::open(self.config.owner()?)?;
        let published = match &self.channel {
            Some(c) => owner.publish_channel(c)?,
            None => owner.publish()?,
        };
        Output::human().print(&published)?;
        Ok(Exit::Success)
    }
}
