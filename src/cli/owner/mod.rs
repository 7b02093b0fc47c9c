//! `mailferry owner ...`: the commands of the node that publishes the authoritative tree.

mod add_recipient;
mod add_recipients;
mod approve;
mod channel;
pub mod fleet;
mod grant;
mod group;
mod history;
mod init;
mod publish;
mod reenroll;
mod remove_recipient;
mod rotate_key;
mod run;
mod serve;
mod show;
mod suspend;
mod tag;

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
    /// Register every recipient of a CSV or TOML list, one enrollment file each (mode 0600), all or
    /// nothing: the whole list is checked first and every problem named.
    AddRecipients(add_recipients::AddRecipientsCommand),
    /// Add or remove the owner's tags of a recipient (grant selectors test them: `tag = "eu"`).
    Tag(tag::TagCommand),
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
    /// Add, list or change channels: named trees, each with its own generations.
    #[command(subcommand)]
    Channel(channel::ChannelCommand),
    /// Add groups of recipients and change who is in them.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Grant a channel to a group, optionally until a date, pinned to a generation, or for the recipients a
    /// selector picks.
    Grant(grant::GrantCommand),
    /// Withdraw a group's grant of a channel.
    Revoke(grant::RevokeCommand),
    /// Suspend a recipient: it is answered "suspended" and sent nothing else.
    Suspend(suspend::SuspendCommand),
    /// Resume a suspended recipient.
    Resume(suspend::SuspendCommand),
    /// Show a recipient: its groups and what it is entitled to in each channel.
    Show(show::ShowCommand),
    /// Show every recipient's state: current, behind, in flight, silent, failed (with why), held, never
    /// seen; exit 1 when one shown is failed or silent.
    ///
    /// One line per recipient and a summary (`412 current, 9 behind, 2 silent, 1 failed`), as text, one
    /// JSON object (docs/fleet.schema.json) or Prometheus metrics. The states come from what each
    /// recipient's requests and receipts (negative ones included) stated, and when it last made contact:
    /// silent after `silent-after-intervals` of its intervals without a request.
    Fleet(fleet::FleetCommand),
    /// Show what happened to one recipient's replies: each reply sent, applied, failed (with why), rolled back.
    History(history::HistoryCommand),
    /// Serve the web console: the fleet, recipients, generations and refused messages, and the admin's
    /// actions, behind a login.
    Serve(serve::ServeCommand),
    /// Approve a generation for serving (under `require-approval`, recipients get only approved ones).
    Approve(approve::ApproveCommand),
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
            OwnerCommand::AddRecipients(c) => c.execute(),
            OwnerCommand::Tag(c) => c.execute(),
            OwnerCommand::RemoveRecipient(c) => c.execute(),
            OwnerCommand::RotateKey(c) => c.execute(),
            OwnerCommand::Reenroll(c) => c.execute(),
            OwnerCommand::Publish(c) => c.execute(),
            OwnerCommand::Run(c) => c.execute().await,
            OwnerCommand::Channel(c) => c.execute(),
            OwnerCommand::Group(c) => c.execute(),
            OwnerCommand::Grant(c) => c.execute(),
            OwnerCommand::Revoke(c) => c.execute(),
            OwnerCommand::Suspend(c) => c.execute(true),
            OwnerCommand::Resume(c) => c.execute(false),
            OwnerCommand::Show(c) => c.execute(),
            OwnerCommand::Fleet(c) => c.execute(),
            OwnerCommand::History(c) => c.execute(),
            OwnerCommand::Serve(c) => c.execute().await,
            OwnerCommand::Approve(c) => c.execute(),
        }
    }
}
