//! `mailferry owner ...`: the commands of the node that publishes the authoritative tree.

mod add_recipient;
mod approve;
mod init;
mod publish;
mod reenroll;
mod remove_recipient;
mod rotate_key;
mod run;
mod serve;
mod suspend;

use anyhow::Result;
use clap::Subcommand;

use super::Exit;

/// The `owner` subcommands.
#[derive(Debug, Subcommand)]
pub enum OwnerCommand {
    /// Create an owner: DIR/owner.toml, its state database and content store.
    Init(Box<init::InitCommand>),
    /// Register a recipient with a fresh key and write its enrollment file (mode 0600).
    AddRecipient(add_recipient::AddRecipientCommand),
    /// Unregister a recipient; its key stops verifying at once.
    RemoveRecipient(remove_recipient::RemoveRecipientCommand),
    /// Give a recipient a new key, delivered with its next reply sealed under the current key; the current
    /// key stays valid until the recipient uses the new one, and for the grace period after.
    RotateKey(rotate_key::RotateKeyCommand),
    /// Give a recipient a new key at once, for a key that may be stolen: the old key, a key in rotation and
    /// retired keys stop verifying, and a new enrollment file is written for `recipient enroll`.
    Reenroll(reenroll::ReenrollCommand),
    /// Snapshot the source tree into the next immutable generation.
    Publish(publish::PublishCommand),
    /// Answer requests: once with --once, else until SIGINT/SIGTERM.
    Run(run::RunCommand),
    /// Serve the web console: the fleet, recipients, generations and refused messages, and the admin's
    /// actions, behind a login.
    Serve(serve::ServeCommand),
    /// Approve a generation for serving (under `require-approval`, recipients get only approved ones).
    Approve(approve::ApproveCommand),
    /// Suspend a recipient: its requests are refused and nothing is sent to it until `owner resume`.
    Suspend(suspend::SuspendCommand),
    /// Resume a suspended recipient: its requests are answered again.
    Resume(suspend::SuspendCommand),
}

impl OwnerCommand {
    /// Runs the owner command.
    ///
    /// # Errors
    /// Whatever the command reports.
    pub async fn execute(self) -> Result<Exit> {
        match self {
            OwnerCommand::Init(c) => c.execute(),
            OwnerCommand::AddRecipient(c) => c.execute(),
            OwnerCommand::RemoveRecipient(c) => c.execute(),
            OwnerCommand::RotateKey(c) => c.execute(),
            OwnerCommand::Reenroll(c) => c.execute(),
            OwnerCommand::Publish(c) => c.execute(),
            OwnerCommand::Run(c) => c.execute().await,
            OwnerCommand::Serve(c) => c.execute().await,
            OwnerCommand::Approve(c) => c.execute(),
            OwnerCommand::Suspend(c) => c.execute(true),
            OwnerCommand::Resume(c) => c.execute(false),
        }
    }
}
