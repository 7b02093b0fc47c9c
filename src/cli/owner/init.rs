//! `mailferry owner init`: creates an owner's config and state.

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mailferry::node::owner;
use serde::Serialize;

use crate::cli::Exit;
use crate::cli::output::{Output, Render, Stream};
use crate::cli::transport_args::TransportArgs;

/// The arguments of `owner init` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  mailferry owner init --dir /etc/mailferry --state-dir /var/lib/mailferry \\\n      \
--source /srv/tree --address owner@example.org --smtp-host mail.example.org \\\n      \
--password-file /etc/mailferry/mail-password\n  \
mailferry owner init --dir ./owner --source ./tree --address owner@example.org --transport-root ./spool"
)]
pub struct InitCommand {
    /// Directory for the config and state.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The authoritative source tree.
    #[arg(long, value_name = "TREE")]
    source: PathBuf,
    /// The owner's mail address.
    #[arg(long, value_name = "ADDR")]
    address: String,
    /// State directory (database, content store, lock) [default: DIR].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    transport: TransportArgs,
}

/// The owner created.
#[derive(Debug, Serialize)]
struct Created {
    /// Its config file.
    config: PathBuf,
    /// Its mail address.
    address: String,
}

impl Render for Created {
    const STREAM: Stream = Stream::Stderr;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "created owner `{}` for {}", self.config.display(), self.address)?;
        writeln!(
            out,
            "next: mailferry owner add-recipient --config {} --name NAME --address ADDR --out FILE",
            self.config.display()
        )
    }
}

impl InitCommand {
    /// Creates the owner.
    ///
    /// # Errors
    /// An existing owner, an unusable directory or source tree.
    pub fn execute(self) -> Result<Exit> {
        let transport = self.transport.config(&self.address)?;
        let config = owner::init_with(&self.dir, &self.source, &self.address, self.state_dir.as_deref(), transport)?;
        Output::human().print(&Created { config, address: self.address })?;
        Ok(Exit::Success)
    }
}
