//! `mailferry deliver`: hands messages to a node from files or stdin (an MTA pipe, a USB stick).
//!
//! Exit codes follow what an MTA's pipe delivery expects: 0 handled, 1 refused (kept and logged), 75
//! (`EX_TEMPFAIL`) when a message could not be handled now (nothing published yet, the state locked for
//! long, a local failure such as a full disk), so the MTA defers it instead of bouncing it.

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
use crate::cli::{ConfigArg, Exit, Temporary};

/// The arguments of `deliver` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
#[command(after_help = "Exit codes: 0 every message handled (or already handled); 1 a message was refused (it is \
kept in STATE/rejected/ and listed by `mailferry log --rejected`; an MTA bounces it); 2 error in the command line \
or config; 75 a message could not be handled now (an MTA defers it and tries again).\n\
Examples:\n  mailferry deliver --config /etc/mailferry/owner.toml /media/usb/*.eml\n  \
Postfix master.cf: mailferry unix - n n - - pipe user=mailferry argv=/usr/bin/mailferry deliver --config \
/etc/mailferry/owner.toml")]
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
        let cfg = self.config.load()?;
        // Past this point the messages were read and the config is sound: whatever fails now may work on
        // another try, and an MTA should keep the message rather than bounce it.
        let (role, report) = handle(cfg, &messages).await.map_err(|e| anyhow::Error::new(Temporary(e)))?;
        show(role, &report)?;
        if report.deferred > 0 {
            warn!("{} message(s) could not be handled yet; deliver them again later", report.deferred);
            return Ok(Exit::TempFail);
        }
        Ok(if report.refused > 0 { Exit::Attention } else { Exit::Success })
    }
}

async fn handle(cfg: NodeConfig, messages: &[Vec<u8>]) -> Result<(&'static str, RunReport)> {
    Ok(match cfg {
        NodeConfig::Owner(cfg) => {
            let mut o = Owner::open(cfg)?;
            let mut t = AnyTransport::open(&o.config().transport, &o.config().owner.address)?;
            let r = node::deliver(&mut o, &mut t, messages).await?;
            run::admin_summary(o.db(), &mut t, &Admin::owner(o.config())).await?;
            ("owner", r)
        }
        NodeConfig::Recipient(cfg) => {
            let mut rcp = Recipient::open(cfg)?;
            let mut t = AnyTransport::open(&rcp.config().transport, &rcp.config().recipient.address)?;
            let r = node::deliver(&mut rcp, &mut t, messages).await?;
            run::admin_summary(rcp.db(), &mut t, &Admin::recipient(rcp.config())).await?;
            ("recipient", r)
        }
    })
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
