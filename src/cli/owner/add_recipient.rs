//! `mailferry owner add-recipient`: registers a recipient and writes its enrollment file.

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mailferry::node::owner::Owner;
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `owner add-recipient` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct AddRecipientCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The recipient's name.
    #[arg(long)]
    name: String,
    /// The recipient's mail address: the only address replies go to.
    #[arg(long, value_name = "ADDR")]
    address: String,
    /// Where to write the enrollment file.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// How often this recipient is to request (written into the enrollment file); `owner fleet` shows it
    /// silent after `silent-after-intervals` of them without a request. Default: `recipient-interval`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    interval: Option<std::time::Duration>,
}

/// The recipient registered. The key itself is only in the enrollment file.
#[derive(Debug, Serialize)]
struct Registered {
    name: String,
    address: String,
    key_id: mailferry::crypto::KeyId,
    enrollment: PathBuf,
}

impl Render for Registered {
    const STREAM: Stream = Stream::Stderr;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "registered recipient {:?} at {} (key id {})", self.name, self.address, self.key_id)?;
        writeln!(
            out,
            "wrote enrollment file `{}` (mode 600): it holds the key, carry it by a trusted path",
            self.enrollment.display()
        )
    }
}

impl AddRecipientCommand {
    /// Registers the recipient.
    ///
    /// # Errors
    /// A name or address already registered, an unwritable enrollment file, state failures.
    pub fn execute(self) -> Result<Exit> {
        let mut o = Owner::open(self.config.owner()?)?;
        let e = o.add_recipient_with(&self.name, &self.address, &self.out, self.interval)?;
        Output::human().print(&Registered {
            name: self.name,
            address: self.address,
            key_id: e.key_id,
            enrollment: self.out,
        })?;
        Ok(Exit::Success)
    }
}
