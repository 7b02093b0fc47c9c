//! `mailferry owner suspend` and `owner resume`: one recipient is sent nothing but the answer saying so.

use std::io::{self, Write};

use anyhow::Result;
use clap::Args;
use mailferry::node::owner::Owner;
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `owner suspend` and `owner resume`.
#[derive(Debug, Args)]
pub struct SuspendCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The recipient.
    #[arg(long)]
    name: String,
}

#[derive(Debug, Serialize)]
struct Suspended {
    name: String,
    suspended: bool,
}

impl Render for Suspended {
    const STREAM: Stream = Stream::Stderr;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        if self.suspended {
            writeln!(out, "suspended {:?}: its requests are answered \"suspended\" and nothing else", self.name)
        } else {
            writeln!(out, "resumed {:?}: it is sent what its grants allow again", self.name)
        }
    }
}

impl SuspendCommand {
    /// Suspends (`on`) or resumes the recipient.
    ///
    /// # Errors
    /// No such recipient, state failures.
    pub fn execute(self, on: bool) -> Result<Exit> {
        Owner::open(self.config.owner()?)?.suspend(&self.name, on)?;
        Output::human().print(&Suspended { name: self.name, suspended: on })?;
        Ok(Exit::Success)
    }
}
