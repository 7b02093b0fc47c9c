//! `mailferry recipient run`: applies replies and requests updates, once or as a daemon
//! ([`mailferry::node::run`]).

use std::io::{self, Write};

use anyhow::Result;
use clap::Args;
use mailferry::node::recipient::{Preview, Recipient};
use mailferry::node::run::{self, RecipientDaemon, RunConfig};
use mailferry::transport::{AnyTransport, Transport as _};
use tracing::info;

use crate::cli::output::{Output, Render, RunSummary, Stream};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `recipient run` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct RunCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// Apply waiting replies, request if nothing is outstanding, then exit.
    #[arg(long)]
    once: bool,
    /// Only apply; send no request.
    #[arg(long)]
    no_request: bool,
    /// With --once: exit 1 when a message was refused (it is recorded either way).
    #[arg(long, requires = "once")]
    fail_on_refusal: bool,
    /// List what applying the waiting replies would change, as `rsync -n -i` does, and change nothing:
    /// no message is filed or marked seen, no part kept, no request sent.
    #[arg(long, conflicts_with_all = ["once", "fail_on_refusal"])]
    dry_run: bool,
    /// With --dry-run: one JSON object per reply on stdout.
    #[arg(long, requires = "dry_run")]
    json: bool,
}

/// What `--dry-run` found for one waiting reply.
#[derive(Debug, serde::Serialize)]
struct Previewed(Preview);

impl Render for Previewed {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        match &self.0 {
            Preview::Apply { generation, reply_id, changes } => {
                writeln!(out, "generation {generation} (reply {reply_id}): {} change(s)", changes.len())?;
                for c in changes {
                    writeln!(out, "{:<11} {}", c.code, c.path)?;
                }
                Ok(())
            }
            Preview::Current { generation } => writeln!(out, "generation {generation}: the tree is current"),
            Preview::Incomplete { reply_id, have, of } => {
                writeln!(out, "reply {reply_id}: {have} of {of} part(s) here; nothing to show yet")
            }
            Preview::Referred { reply_id } => writeln!(out, "a reference to reply {reply_id}, sent before"),
            Preview::Held { generation } => {
                writeln!(out, "generation {generation}: held back by a local rollback; it would not be applied")
            }
            Preview::Refused { reason, detail } => writeln!(out, "would be refused ({reason}): {detail}"),
            Preview::Standing { standing } => writeln!(out, "the owner answers without an update: {standing}"),
        }
    }
}

impl RunCommand {
    /// Runs the recipient once, or until SIGINT or SIGTERM.
    ///
    /// # Errors
    /// An unusable config or transport; with `--once`, a failed run (recorded for `status` first; an
    /// unreachable mail server exits 75, see [`crate::cli::exit_for`]).
    pub async fn execute(self) -> Result<Exit> {
        let cfg = self.config.recipient()?;
        let mut t = AnyTransport::open(&cfg.transport, &cfg.recipient.address)?;
        if self.dry_run {
            // Read, never settle: the messages stay where they are for the real run.
            let messages: Vec<Vec<u8>> = t.fetch().await?.into_iter().map(|m| m.raw).collect();
            let found = Recipient::open_as_is(cfg)?.preview(&messages)?;
            let output = Output::new(self.json);
            if found.is_empty() && !self.json {
                eprintln!("no reply waiting");
            }
            for p in found {
                output.print(&Previewed(p))?;
            }
            return Ok(Exit::Success);
        }
        let show = |report: &_| Output::human().print(&RunSummary { role: "recipient", report });
        let interval = cfg.recipient.interval;
        let mut daemon = RecipientDaemon::new(cfg, !self.no_request);
        if self.once {
            let report = daemon.once(&mut t).await?;
            show(&report)?;
            if self.fail_on_refusal && report.refused > 0 {
                return Ok(Exit::Attention);
            }
        } else {
            let shutdown = crate::cli::signal::shutdown()?;
            info!(interval = %humantime::format_duration(interval), "recipient running until SIGINT or SIGTERM");
            crate::cli::notify::ready("recipient running");
            run::run(&mut daemon, &mut t, RunConfig::default(), shutdown, |r| {
                // A summary that cannot be written (stderr closed) is no reason to stop syncing.
                let _ = show(r);
            })
            .await?;
        }
        Ok(Exit::Success)
    }
}
