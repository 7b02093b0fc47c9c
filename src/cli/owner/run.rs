//! `mailferry owner run`: answers requests, once or as a daemon ([`mailferry::node::run`]).

use anyhow::Result;
use clap::Args;
use mailferry::node::run::{self, OwnerDaemon, RunConfig};
use mailferry::transport::AnyTransport;
use tracing::info;

use crate::cli::output::{Output, RunSummary};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `owner run` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct RunCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// Answer every pending request, then exit.
    #[arg(long)]
    once: bool,
    /// With --once: exit 1 when a message was refused (it is recorded either way).
    #[arg(long, requires = "once")]
    fail_on_refusal: bool,
}

impl RunCommand {
    /// Runs the owner once, or until SIGINT or SIGTERM.
    ///
    /// # Errors
    /// An unusable config or transport; with `--once`, a failed run (recorded for `status` first; an
    /// unreachable mail server exits 75, see [`crate::cli::exit_for`]).
    pub async fn execute(self) -> Result<Exit> {
        let cfg = self.config.owner()?;
        let mut t = AnyTransport::open(&cfg.transport, &cfg.owner.address)?;
        let show = |report: &_| Output::human().print(&RunSummary { role: "owner", report });
        let interval = cfg.owner.interval;
        let mut daemon = OwnerDaemon::new(cfg);
        if self.once {
            let report = daemon.once(&mut t).await?;
            show(&report)?;
            if self.fail_on_refusal && report.refused > 0 {
                return Ok(Exit::Attention);
            }
        } else {
            let shutdown = crate::cli::signal::shutdown()?;
            info!(interval = %humantime::format_duration(interval), "owner running until SIGINT or SIGTERM");
            crate::cli::notify::ready("owner running");
            run::run(&mut daemon, &mut t, RunConfig::default(), shutdown, |r| {
                // A summary that cannot be written (stderr closed) is no reason to stop serving.
                let _ = show(r);
            })
            .await?;
        }
        Ok(Exit::Success)
    }
}
