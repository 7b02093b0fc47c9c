//! `mailferry manpage [--out DIR]`: man pages generated from the clap definitions (hidden; the package
//! installs their output).

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Args, CommandFactory};

use crate::cli::{Cli, Exit};

/// The arguments of `manpage`.
#[derive(Debug, Args)]
pub struct ManpageCommand {
    /// Write `mailferry.1` and one page per subcommand (`mailferry-owner-run.1`, ...) into DIR instead
    /// of `mailferry.1` to stdout.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

impl ManpageCommand {
    /// Renders the pages.
    ///
    /// # Errors
    /// The directory cannot be created or written.
    pub fn execute(self) -> Result<Exit> {
        let cmd = Cli::command();
        match self.out {
            Some(dir) => {
                std::fs::create_dir_all(&dir).with_context(|| format!("failed to create `{}`", dir.display()))?;
                clap_mangen::generate_to(cmd, &dir)
                    .with_context(|| format!("failed to write man pages into `{}`", dir.display()))?;
            }
            None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout().lock())?,
        }
        Ok(Exit::Success)
    }
}
