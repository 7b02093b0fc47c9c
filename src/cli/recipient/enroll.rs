//! `mailferry recipient enroll`: takes up a new enrollment file for this recipient (its new key).

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `recipient enroll` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct EnrollCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The enrollment file `owner reenroll` wrote.
    #[arg(long, value_name = "FILE")]
    enrollment: PathBuf,
}

/// The key taken up.
#[derive(Debug, Serialize)]
struct Enrolled {
    key_id: mailferry::crypto::KeyId,
}

impl Render for Enrolled {
    const STREAM: Stream = Stream::Stderr;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "took up the new enrollment (key id {}); the previous key is forgotten", self.key_id)
    }
}

impl EnrollCommand {
    /// Takes up the enrollment.
    ///
    /// # Errors
    /// An enrollment for another recipient, an unreadable file, state failures.
    pub fn execute(self) -> Result<Exit> {
        let key_id = mailferry::node::recipient::enroll(&self.config.recipient()?, &self.enrollment)?;
        Output::human().print(&Enrolled { key_id })?;
        Ok(Exit::Success)
    }
}
