//! `mailferry log`: the refused messages with their reasons, a line or a JSON object each
//! (`docs/log.schema.json`), each naming the copy of the message kept in `STATE/rejected/`.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use mailferry::config::NodeConfig;
use mailferry::db::{Db, Rejection};
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::status::SCHEMA_VERSION;
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

/// One refusal as shown.
#[derive(Debug, Serialize)]
struct Logged {
    schema_version: u32,
    #[serde(flatten)]
    rejection: Rejection,
    /// The kept copy of the refused message, if it is still there.
    kept: Option<PathBuf>,
}

impl Render for Logged {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        let r = &self.rejection;
        let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(r.at));
        writeln!(
            out,
            "{at} {} from={} message-id={} {}{}",
            r.reason,
            r.sender.as_deref().unwrap_or("-"),
            r.message_id.as_deref().unwrap_or("-"),
            r.detail,
            self.kept.as_ref().map_or(String::new(), |k| format!(" kept={}", k.display()))
        )
    }
}

/// Where the copy of a refused message is kept (`node::keep_rejected`), if it is there.
fn kept(state_dir: &Path, digest: Option<&str>) -> Option<PathBuf> {
    // The digest is our own hex, but a damaged database must not make `log` name a path elsewhere.
    let digest = digest.filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_hexdigit()))?;
    let path = state_dir.join("rejected").join(format!("{digest}.eml"));
    path.is_file().then_some(path)
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
            let kept = kept(&state_dir, r.digest.as_deref());
            out.print(&Logged { schema_version: SCHEMA_VERSION, rejection: r, kept })?;
        }
        Ok(Exit::Success)
    }
}
