//! `mailferry deliver`: hands messages to a node from files or stdin (an MTA pipe, a USB stick).

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Args;
use mailferry::config::NodeConfig;
use mailferry::node::owner::Owner;
use mailferry::node::recipient::Recipient;
use mailferry::node::run::{self, Admin};
use mailferry::node::{self, Role as _, RunReport};
use mailferry::transport::AnyTransport;
use tracing::warn;

use crate::cli::output::{Output, RunSummary};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `deliver` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct DeliverCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// Message files; stdin when none.
    #[arg(value_name = "EML")]
    files: Vec<PathBuf>,
}

impl DeliverCommand {
    /// Hands the messages to the node, then sends what that queued.
    ///
    /// # Errors
    /// An unreadable message or config, local failures.
    pub async fn execute(self) -> Result<Exit> {
        let messages = read_messages(&self.files)?;
        let (role, report) = match self.config.load()? {
            NodeConfig::Owner(cfg) => {
                let mut o = Owner::open(cfg)?;
                let mut t = AnyTransport::open(&o.config().transport, &o.config().owner.address)?;
                let r = node::deliver(&mut o, &mut t, &messages).await?;
                run::admin_summary(o.db(), &mut t, &Admin::owner(o.config())).await?;
                ("owner", r)
            }
            NodeConfig::Recipient(cfg) => {
                let mut rcp = Recipient::open(cfg)?;
                let mut t = AnyTransport::open(&rcp.config().transport, &rcp.config().recipient.address)?;
                let r = node::deliver(&mut rcp, &mut t, &messages).await?;
                run::admin_summary(rcp.db(), &mut t, &Admin::recipient(rcp.config())).await?;
                ("recipient", r)
            }
        };
        show(role, &report)?;
        if report.deferred > 0 {
            warn!("{} message(s) could not be handled yet; deliver them again later", report.deferred);
        }
        Ok(Exit::Success)
    }
}

fn show(role: &str, report: &RunReport) -> Result<()> {
    Output::human().print(&RunSummary { role, report })
}

fn read_messages(files: &[PathBuf]) -> Result<Vec<Vec<u8>>> {
    if files.is_empty() {
        let mut raw = Vec::new();
        std::io::stdin().lock().read_to_end(&mut raw).context("failed to read a message from stdin")?;
        return Ok(vec![raw]);
    }
    files.iter().map(|f| std::fs::read(f).with_context(|| format!("failed to read `{}`", f.display()))).collect()
}
