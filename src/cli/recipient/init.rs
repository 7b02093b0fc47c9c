//! `mailferry recipient init`: creates a recipient from an enrollment file.

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mailferry::node::recipient;
use serde::Serialize;

use crate::cli::Exit;
use crate::cli::output::{Output, Render, Stream};
use crate::cli::transport_args::TransportArgs;

/// The arguments of `recipient init` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct InitCommand {
    /// Directory for the config and state (outside the data tree).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The data tree to keep in sync.
    #[arg(long, value_name = "TREE")]
    data: PathBuf,
    /// The enrollment file from `owner add-recipient`.
    #[arg(long, value_name = "FILE")]
    enrollment: PathBuf,
    /// State directory (database, stat cache, lock), outside the data tree [default: DIR].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    transport: TransportArgs,
}

/// The recipient created.
#[derive(Debug, Serialize)]
struct Created {
    /// Its config file.
    config: PathBuf,
    /// Its data tree.
    data: PathBuf,
}

impl Render for Created {
    const STREAM: Stream = Stream::Stderr;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "created recipient `{}` for data tree `{}`", self.config.display(), self.data.display())?;
        writeln!(out, "next: mailferry recipient run --config {} --once", self.config.display())
    }
}

impl InitCommand {
    /// Creates the recipient.
    ///
    /// # Errors
    /// An existing recipient, an unreadable enrollment file, state inside the data tree.
    pub fn execute(self) -> Result<Exit> {
        let address = mailferry::config::Enrollment::load(&self.enrollment)?.address;
        let transport = self.transport.config(&address)?;
        let config =
            recipient::init_with(&self.dir, &self.data, &self.enrollment, self.state_dir.as_deref(), transport)?;
        Output::human().print(&Created { config, data: self.data })?;
        Ok(Exit::Success)
    }
}
