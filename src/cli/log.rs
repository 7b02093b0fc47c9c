//! `mailferry log`: the refused messages with their reasons, a line or a JSON object each.

use std::io::{self, Write};
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use mailferry::config::NodeConfig;
use mailferry::db::{Db, Rejection};

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `log` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct LogCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// Refused messages (the only log kept so far).
    #[arg(long)]
    rejected: bool,
    /// One JSON object per line on stdout.
    #[arg(long)]
    json: bool,
}

impl Render for Rejection {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(self.at));
        writeln!(
            out,
            "{at} {} from={} message-id={} {}",
            self.reason,
            self.sender.as_deref().unwrap_or("-"),
            self.message_id.as_deref().unwrap_or("-"),
            self.detail
        )
    }
}

impl LogCommand {
    /// Lists the refused messages, oldest first.
    ///
    /// # Errors
    /// An unreadable config or state database.
    pub fn execute(self) -> Result<Exit> {
        let state_dir = match self.config.load()? {
            NodeConfig::Owner(cfg) => cfg.state_dir,
            NodeConfig::Recipient(cfg) => cfg.state_dir,
        };
        let out = Output::new(self.json);
        for r in Db::open(&state_dir.join("state.db"))?.rejections()? {
            out.print(&r)?;
        }
        Ok(Exit::Success)
    }
}
