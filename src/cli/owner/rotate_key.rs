//! `mailferry owner rotate-key`: gives a recipient a new key, delivered with its next reply.

use std::io::{self, Write};
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use mailferry::node::owner::Owner;
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `owner rotate-key` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct RotateKeyCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The recipient's name.
    #[arg(long)]
    name: String,
    /// How long the old key stays valid once the new one is in use (messages already on their way).
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = humantime::parse_duration)]
    grace: Duration,
}

/// The rotation begun.
#[derive(Debug, Serialize)]
struct Rotating {
    name: String,
    /// The new key's id.
    key_id: mailferry::crypto::KeyId,
    grace: Duration,
}

impl Render for Rotating {
    const STREAM: Stream = Stream::Stderr;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        let name = &self.name;
        writeln!(
            out,
            "rotating the key of {name:?} to key id {}: it travels with the next reply, sealed under the \
             current key; the current key stays valid until {name:?} uses the new one, then for {} more",
            self.key_id,
            humantime::format_duration(self.grace)
        )
    }
}

impl RotateKeyCommand {
    /// Begins the rotation.
    ///
    /// # Errors
    /// An unknown name, state failures.
    pub fn execute(self) -> Result<Exit> {
        let key_id = Owner::open(self.config.owner()?)?.rotate_key(&self.name, self.grace)?;
        Output::human().print(&Rotating { name: self.name, key_id, grace: self.grace })?;
        Ok(Exit::Success)
    }
}
