//! `mailferry completions SHELL`: shell completions generated from the clap definitions (hidden; the
//! package installs their output).

use anyhow::Result;
use clap::{Args, CommandFactory};
use clap_complete::Shell;

use crate::cli::{Cli, Exit};

/// The arguments of `completions`.
#[derive(Debug, Args)]
pub struct CompletionsCommand {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: Shell,
}

impl CompletionsCommand {
    /// Writes the completion script for the shell to stdout.
    ///
    /// # Errors
    /// Never; a closed stdout is a broken pipe, which `main` ignores.
    pub fn execute(self) -> Result<Exit> {
        let mut cmd = Cli::command();
        clap_complete::generate(self.shell, &mut cmd, "mailferry", &mut std::io::stdout());
        Ok(Exit::Success)
    }
}
