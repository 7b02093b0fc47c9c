//! `mailferry owner reenroll`: gives a registered recipient a new key at once and writes its enrollment.

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mailferry::node::owner::Owner;
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `owner reenroll` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct ReenrollCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The recipient's name.
    #[arg(long)]
    name: String,
    /// Where to write the new enrollment file.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// The recipient enrolled afresh. The key itself is only in the enrollment file.
#[derive(Debug, Serialize)]
struct Reenrolled {
    name: String,
    key_id: mailferry::crypto::KeyId,
    enrollment: PathBuf,
}

impl Render for Reenrolled {
    const STREAM: Stream = Stream::Stderr;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "enrolled {:?} afresh (key id {}); its old key no longer verifies", self.name, self.key_id)?;
        writeln!(
            out,
            "wrote enrollment file `{}` (mode 600): carry it by a trusted path and give it to \
             `mailferry recipient enroll`",
            self.enrollment.display()
        )
    }
}

impl ReenrollCommand {
    /// Enrolls the recipient afresh.
    ///
    /// # Errors
    /// An unknown name, an existing enrollment file, state failures.
    pub fn execute(self) -> Result<Exit> {
        let e = Owner::open(self.config.owner()?)?.reenroll(&self.name, &self.out)?;
        Output::human().print(&Reenrolled { name: self.name, key_id: e.key_id, enrollment: self.out })?;
        Ok(Exit::Success)
    }
}
