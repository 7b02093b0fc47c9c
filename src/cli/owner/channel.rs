//! `mailferry owner channel ...`: the owner's channels, each an independent tree with its own generations.

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use mailferry::db::{ChannelRow, GenerationRow};
use mailferry::node::Role as _;
use mailferry::node::owner::Owner;
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream, bytes};
use crate::cli::{ConfigArg, Exit};

/// The `owner channel` subcommands.
#[derive(Debug, Subcommand)]
pub enum ChannelCommand {
    /// Add a channel publishing a source tree (`owner publish --channel NAME` makes its generations).
    Add(AddCommand),
    /// List the channels with their newest generation.
    List(ListCommand),
    /// Change whether a channel is open to every recipient.
    Set(SetCommand),
    /// Start a new key epoch for an encrypting channel: replies made from now on are encrypted under a
    /// fresh key (do this after cutting a recipient off: it keeps the keys it was sent).
    Rekey(RekeyCommand),
}

/// The arguments of `owner channel add`.
#[derive(Debug, Args)]
pub struct AddCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The channel's name (letters, digits, `-`, `_`, `.`).
    #[arg(long)]
    name: String,
    /// The tree it publishes.
    #[arg(long, value_name = "DIR")]
    source: PathBuf,
    /// Send it to every registered recipient, grant or not (default: only through grants).
    #[arg(long)]
    open: bool,
    /// Encrypt its reply payloads under a key only the recipients it is sent to receive.
    #[arg(long)]
    encrypt: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The arguments of `owner channel list`.
#[derive(Debug, Args)]
pub struct ListCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The arguments of `owner channel set`.
#[derive(Debug, Args)]
pub struct SetCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The channel.
    #[arg(long)]
    name: String,
    /// `true`: every registered recipient is sent it; `false`: only recipients with a grant.
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    open: bool,
}

/// The arguments of `owner channel rekey`.
#[derive(Debug, Args)]
pub struct RekeyCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The channel.
    #[arg(long)]
    name: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// What `owner channel rekey` did.
#[derive(Debug, Serialize)]
struct Rekeyed {
    channel: String,
    epoch: u64,
    encrypt: bool,
}

impl Render for Rekeyed {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "channel {:?}: key epoch {}; replies made from now on use the new key",
            self.channel, self.epoch
        )?;
        if !self.encrypt {
            writeln!(out, "(the channel does not encrypt: the key is used once it does)")?;
        }
        Ok(())
    }
}

/// One channel as listed.
#[derive(Debug, Serialize)]
struct Listed {
    #[serde(flatten)]
    channel: ChannelRow,
    /// Its newest generation.
    latest: Option<GenerationRow>,
    /// How many generations are kept.
    kept: usize,
}

#[derive(Debug, Serialize)]
struct Channels {
    channels: Vec<Listed>,
}

impl Render for Channels {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        for l in &self.channels {
            let c = &l.channel;
            let access = if c.open { "open" } else { "granted" };
            let enc = if c.encrypt { ", encrypted" } else { "" };
            match &l.latest {
                Some(g) => writeln!(
                    out,
                    "{} ({access}{enc}): generation {} root {} ({} files, {}), {} kept",
                    c.name,
                    g.number,
                    g.root.short(),
                    g.files,
                    bytes(g.bytes),
                    l.kept
                )?,
                None => writeln!(out, "{} ({access}{enc}): nothing published yet", c.name)?,
            }
        }
        Ok(())
    }
}

impl Render for Listed {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        let c = &self.channel;
        let source =
            c.source.as_ref().map_or_else(|| "the config's source".to_owned(), |s| format!("`{}`", s.display()));
        writeln!(
            out,
            "channel {:?} publishes {source}; {}{}; `mailferry owner publish --channel {}` makes its first generation",
            c.name,
            if c.open { "sent to every recipient" } else { "sent only through grants (`mailferry owner grant`)" },
            if c.encrypt { ", payloads encrypted" } else { "" },
            c.name
        )
    }
}

fn listed(owner: &Owner, channel: ChannelRow) -> Result<Listed> {
    let db = owner.db();
    Ok(Listed { latest: db.latest_generation(&channel.name)?, kept: db.generations(&channel.name)?.len(), channel })
}

impl ChannelCommand {
    /// Runs the channel command.
    ///
    /// # Errors
    /// A bad name or source, an unknown channel, state failures.
    pub fn execute(self) -> Result<Exit> {
        match self {
            ChannelCommand::Add(c) => {
                let mut owner = Owner::open(c.config.owner()?)?;
                let row = owner.add_channel(&c.name, &c.source, c.open, c.encrypt)?;
                let l = listed(&owner, row)?;
                Output::new(c.json).print(&l)?;
            }
            ChannelCommand::List(c) => {
                let owner = Owner::open(c.config.owner()?)?;
                let channels =
                    owner.db().channels()?.into_iter().map(|ch| listed(&owner, ch)).collect::<Result<_>>()?;
                Output::new(c.json).print(&Channels { channels })?;
            }
            ChannelCommand::Set(c) => {
                let owner = Owner::open(c.config.owner()?)?;
                owner.db().set_channel(&c.name, Some(c.open), None)?;
                let row = owner.db().channel(&c.name)?.expect("the channel was just changed");
                Output::human().print(&listed(&owner, row)?)?;
            }
            ChannelCommand::Rekey(c) => {
                let mut owner = Owner::open(c.config.owner()?)?;
                let epoch = owner.rekey_channel(&c.name)?;
                let encrypt = owner.db().channel(&c.name)?.is_some_and(|ch| ch.encrypt);
                Output::new(c.json).print(&Rekeyed { channel: c.name, epoch, encrypt })?;
            }
        }
        Ok(Exit::Success)
    }
}
