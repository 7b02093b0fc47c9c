//! A node that holds several roles on one state: one lock, one state database, one inbox.
//!
//! A [`Node`] holds an optional *downstream* part (an [`Owner`]: it answers recipients below it) and an
//! optional *upstream* part (a [`Recipient`]: it keeps a data tree in sync with an owner above it). Both
//! work on the same [`State`], so they never lock each other out, and incoming mail is routed to the part
//! it is for: a reply made for the upstream part's name goes to the recipient part, everything else (the
//! requests and receipts of the recipients below, their delivery reports) to the owner part. A node with
//! both parts whose owner publishes the recipient's data tree is a **relay**: what arrives from above is
//! published below in the same run.
//!
//! Routing reads only the auth part's recipient name, which selects a key and is not trusted; each part
//! then verifies the message in full, as it would alone.

use std::path::Path;
use std::rc::Rc;

use anyhow::{Context as _, Result};
use tracing::info;

use super::owner::Owner;
use super::recipient::Recipient;
use super::{Handled, Role, RunReport, State, process_inbox};
use crate::config::{OwnerConfig, RecipientConfig};
use crate::db::Db;
use crate::manifest::Digest;
use crate::protocol::{self, Refusal, envelope};
use crate::transport::Transport;

/// A node with its state open and the roles it holds.
#[derive(Debug)]
pub struct Node {
    state: Rc<State>,
    downstream: Option<Owner>,
    upstream: Option<Recipient>,
}

impl Node {
    /// Opens a node with the roles given (at least one), which must share one state directory, and finishes
    /// an apply a crash interrupted.
    ///
    /// # Errors
    /// No role, roles with different state directories, or what opening each role reports.
    pub fn open(owner: Option<OwnerConfig>, recipient: Option<RecipientConfig>) -> Result<Node> {
        let dir = match (&owner, &recipient) {
            (Some(o), Some(r)) if o.state_dir != r.state_dir => anyhow::bail!(
                "a node's roles share one state directory: the owner's is `{}`, the recipient's `{}`",
                o.state_dir.display(),
                r.state_dir.display()
            ),
            (Some(o), _) => o.state_dir.clone(),
            (None, Some(r)) => r.state_dir.clone(),
            (None, None) => anyhow::bail!("a node needs an owner or a recipient part"),
        };
        let state = State::open(&dir)?;
        let upstream = recipient
            .map(|cfg| -> Result<Recipient> {
                let mut r = Recipient::open_in(cfg, state.clone())?;
                r.recover()?;
                Ok(r)
            })
            .transpose()?;
        let downstream = owner.map(|cfg| Owner::open_in(cfg, state.clone())).transpose()?;
        Ok(Node { state, downstream, upstream })
    }

    /// The owner part, if the node has one.
    pub fn owner(&mut self) -> Option<&mut Owner> {
        self.downstream.as_mut()
    }

    /// The recipient part, if the node has one.
    pub fn recipient(&mut self) -> Option<&mut Recipient> {
        self.upstream.as_mut()
    }

    /// Whether the owner part publishes the recipient part's data tree.
    fn relays(&self) -> bool {
        match (&self.downstream, &self.upstream) {
            (Some(o), Some(r)) => o.config().owner.source == r.config().main().data,
            _ => false,
        }
    }

    /// One run of every role: sends what is queued, handles the inbox (each message by the part it is
    /// for), lets the recipient part request an update if `request`, publishes below what a relay applied
    /// from above, and sends what that queued.
    ///
    /// # Errors
    /// Transport or state failures that stop the run; refusals of single messages are not errors.
    pub async fn run_once<T: Transport>(&mut self, transport: &mut T, request: bool) -> Result<RunReport> {
        let mut report = RunReport::default();
        match &mut self.downstream {
            Some(o) => report.sent += o.begin_run(transport).await?,
            None => report.sent += super::Outbox::flush(&self.state.db, transport).await?.sent,
        }
        let applied_before = self.applied_root()?;
        if let Some(r) = &mut self.upstream
            && let Some(done) = r.install_due(super::install::local_now())?
        {
            report.outcomes.push(Handled::Applied { generation: done.generation, ops: done.ops });
        }
        if let Some(o) = &mut self.downstream {
            o.survey(transport).await?;
        }
        process_inbox(self, transport, &mut report).await?;
        if request && let Some(r) = &mut self.upstream {
            report.requested = r.maybe_request()?;
        }
        if self.relays() && self.applied_root()? != applied_before {
            let owner = self.downstream.as_mut().expect("a relay has an owner part");
            let published = owner.publish().context("failed to publish what the relay received")?;
            info!(generation = published.generation, new = published.new, "relayed: published what arrived from above");
        }
        match &mut self.downstream {
            Some(o) => report.sent += o.end_run(transport).await?,
            None => report.sent += super::Outbox::flush(&self.state.db, transport).await?.sent,
        }
        Ok(report)
    }

    fn applied_root(&self) -> Result<Option<Digest>> {
        Ok(match &self.upstream {
            Some(r) => self.state.db.sub(&r.config().main().channel)?.applied_root()?.1,
            None => None,
        })
    }
}

impl Role for Node {
    fn db(&self) -> &Db {
        &self.state.db
    }

    fn state_dir(&self) -> &Path {
        self.state.dir()
    }

    fn max_message_bytes(&self) -> u64 {
        let up = self.upstream.as_ref().map(|u| u.config().limits.max_message_bytes);
        let down = self.downstream.as_ref().map(|d| d.config().limits.max_message_bytes);
        up.into_iter().chain(down).max().unwrap_or_else(|| crate::limits::Limits::default().max_message_bytes)
    }

    fn act(&mut self, raw: &[u8], digest: &Digest) -> Result<Result<Handled, Refusal>> {
        let (up, down) = match (&mut self.upstream, &mut self.downstream) {
            (Some(up), None) => return up.act(raw, digest),
            (None, Some(down)) => return down.act(raw, digest),
            (Some(up), Some(down)) => (up, down),
            (None, None) => unreachable!("a node has a role"),
        };
        // A delivery report is about mail one of the parts sent: the owner part knows its replies'
        // Message-IDs; anything else is the recipient part's (its requests and receipts).
        if let Some(report) = envelope::bounce(raw) {
            let ours = match &report.message_id {
                Some(id) => down.sent_message(id)?.is_some(),
                None => false,
            };
            return if ours { down.act(raw, digest) } else { up.act(raw, digest) };
        }
        // The auth part's name and the control part's kind only pick the part (a recipient below may have
        // the same name as this node has above); that part verifies everything.
        #[derive(serde::Deserialize)]
        struct Kind {
            #[serde(rename = "type")]
            kind: Option<protocol::Kind>,
        }
        let for_up = envelope::parse(raw, up.config().limits.max_message_bytes).ok().is_some_and(|p| {
            protocol::decode_auth(&p.auth).is_ok_and(|a| a.recipient == up.config().recipient.name)
                && serde_json::from_slice::<Kind>(&p.control).is_ok_and(|k| k.kind == Some(protocol::Kind::Reply))
        });
        if for_up { up.act(raw, digest) } else { down.act(raw, digest) }
    }
}
