//! `mailferry owner suspend` and `owner resume`: stop or restart answering a recipient (the console's
//! Suspend and Resume buttons).

use anyhow::Result;
use clap::Args;
use mailferry::console::actions;
use mailferry::db::Db;

use crate::cli::output::Output;
use crate::cli::{ConfigArg, Exit};

/// The arguments of `owner suspend` and `owner resume` (their help texts are the docs of their variants in
/// the command enum).
#[derive(Debug, Args)]
pub struct SuspendCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The recipient's name.
    #[arg(long)]
    name: String,
}

impl SuspendCommand {
    /// Suspends (`on`) or resumes the recipient.
    ///
    /// # Errors
    /// No such recipient, state failures.
    pub fn execute(self, on: bool) -> Result<Exit> {
        let cfg = self.config.owner()?;
        // A short transaction, like `status`: no state lock, so it works while the daemon runs.
        let db = Db::open(&cfg.state_dir.join("state.db"))?;
        Output::human().print(&actions::suspend(&db, &self.name, on, "cli")?)?;
        Ok(Exit::Success)
    }
}
