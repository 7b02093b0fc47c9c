//! `mailferry recipient subscribe`: keeps one more of the owner's channels, in a data tree of its own.

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mailferry::node::recipient::{Subscribed, subscribe};

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `recipient subscribe`.
#[derive(Debug, Args)]
pub struct SubscribeCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The owner's channel.
    #[arg(long, value_name = "NAME")]
    channel: String,
    /// The data tree to keep it in (made if missing; must not overlap another tree or the state).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Render for Subscribed {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "subscribed to channel {:?} in `{}`; the next run requests it (the owner answers \"not-entitled\" \
             unless a grant reaches this recipient)",
            self.channel,
            self.data.display()
        )
    }
}

impl SubscribeCommand {
    /// Adds the subscription to the config.
    ///
    /// # Errors
    /// A bad channel name, a channel subscribed already, a tree that overlaps another or the state.
    pub fn execute(self) -> Result<Exit> {
        let cfg = self.config.recipient()?;
        let done = subscribe(&cfg, &self.channel, &self.data)?;
        Output::new(self.json).print(&done)?;
        Ok(Exit::Success)
    }
}
