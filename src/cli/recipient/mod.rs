//! `mailferry recipient ...`: the commands of a node that keeps a data tree in sync with an owner.

mod approve;
mod enroll;
mod init;
mod rollback;
mod run;
mod subscribe;

use anyhow::Result;
use clap::Subcommand;

use super::Exit;

/// The `recipient` subcommands.
#[derive(Debug, Subcommand)]
pub enum RecipientCommand {
    /// Create a recipient from an enrollment file: DIR/recipient.toml and DIR/recipient.key.
    Init(Box<init::InitCommand>),
    /// Take up a new enrollment file for this recipient (from `owner reenroll`): its key replaces the key
    /// file at once.
    Enroll(enroll::EnrollCommand),
    /// Apply replies and request updates: once with --once, else until SIGINT/SIGTERM.
    Run(run::RunCommand),
    /// Return the data tree to the generation applied before the current one, from files kept locally,
    /// and hold the current one back until a newer generation arrives or --release.
    ///
    /// One level: the generation before is kept after each update to a newer generation, and a rollback
    /// uses it up. Refused when nothing is kept, while an apply is interrupted, or when the tree has
    /// changed since the current generation was applied.
    Rollback(rollback::RollbackCommand),
    /// Keep one more of the owner's channels, in a data tree of its own (a `[[subscription]]` in the config).
    Subscribe(subscribe::SubscribeCommand),
    /// Install the verified update kept ready (install = "manual", or waiting for its apply-window).
    ///
    /// Runs the pre-apply hook, swaps the update in and runs the post-apply hook, as a run would. Refused
    /// when nothing waits; an update whose tree changed since it was made ready, or that pre-apply
    /// vetoes, is discarded (the next request asks again).
    Approve(approve::ApproveCommand),
}

impl RecipientCommand {
    /// Runs the recipient command.
    ///
    /// # Errors
    /// Whatever the command reports.
    pub async fn execute(self) -> Result<Exit> {
        match self {
            RecipientCommand::Init(c) => c.execute(),
            RecipientCommand::Enroll(c) => c.execute(),
            RecipientCommand::Run(c) => c.execute().await,
            RecipientCommand::Rollback(c) => c.execute(),
            RecipientCommand::Subscribe(c) => c.execute(),
            RecipientCommand::Approve(c) => c.execute(),
        }
    }
}
