//! The owner's fleet records: groups, grants, suspensions, and what a recipient is entitled to.
//!
//! Every change here is one transaction on the state database, checked before it is made (a grant names
//! a group and a channel that exist, an expiry is a real date, a pin a kept generation, a selector one that
//! parses). What a recipient is then sent is decided by [`crate::engine::owner::entitlement`], which reads
//! the same records.

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use tracing::info;

use super::Role as _;
use super::owner::Owner;
use crate::db::{GrantRow, GroupRow, now};
use crate::engine::owner::{self, Entitlement, OwnerView as _};
use crate::protocol;

/// A recipient as `owner show` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Shown {
    /// Its name.
    pub name: String,
    /// Its registered address.
    pub address: String,
    /// Its key's public id.
    pub key_id: String,
    /// Whether the owner suspended it.
    pub suspended: bool,
    /// The groups it is in.
    pub groups: Vec<String>,
    /// The tags the owner set on it (`owner tag`).
    pub tags: Vec<String>,
    /// The facts it last registered, and when it made them.
    pub registration: Option<crate::registration::Facts>,
    /// When it made them.
    pub registered_at: Option<u64>,
    /// What it is entitled to, per channel.
    pub channels: Vec<ShownChannel>,
}

/// One channel of a recipient, as `owner show` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ShownChannel {
    /// The channel.
    pub channel: String,
    /// `granted`, `pinned at N`, `not-entitled`, `expired on DATE` or `suspended`.
    pub entitlement: String,
    /// The last request sequence number answered on it.
    pub last_seq: u64,
}

/// A grant's reach, as `owner grant --dry-run` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Reach {
    /// The grant (not made).
    pub grant: GrantRow,
    /// The members of its group it would reach (its selector matches them).
    pub reaches: Vec<String>,
    /// Members its selector leaves out.
    pub leaves_out: Vec<String>,
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if !protocol::valid_channel_name(name) {
        bail!(
            "{what} name {name:?} must be 1-64 characters of letters, digits, `-`, `_` and `.`, not starting with \
             `-` or `.`"
        );
    }
    Ok(())
}

impl Owner {
    /// Adds a group, with `members` in it (`mailferry owner group add`).
    ///
    /// # Errors
    /// A bad or taken name, an unknown member, or state failures; nothing is changed then.
    pub fn add_group(&mut self, name: &str, members: &[String]) -> Result<GroupRow> {
        check_name("group", name)?;
        self.db().transaction(|db| {
            db.add_group(name)?;
            for m in members {
                db.join_group(name, m)?;
            }
            Ok(())
        })?;
        info!(group = name, members = members.len(), "group added");
        self.group(name)
    }

    /// Puts `recipient` in group `group`.
    ///
    /// # Errors
    /// No such group or recipient, or state failures.
    pub fn join_group(&mut self, group: &str, recipient: &str) -> Result<GroupRow> {
        self.db().join_group(group, recipient)?;
        self.group(group)
    }

    /// Takes `recipient` out of group `group`.
    ///
    /// # Errors
    /// Not a member, or state failures.
    pub fn leave_group(&mut self, group: &str, recipient: &str) -> Result<GroupRow> {
        self.db().leave_group(group, recipient)?;
        self.group(group)
    }

    /// Group `name` with its members and grants.
    ///
    /// # Errors
    /// No such group, or state failures.
    pub fn group(&self, name: &str) -> Result<GroupRow> {
        self.db().groups()?.into_iter().find(|g| g.name == name).with_context(|| format!("no group named {name:?}"))
    }

    /// Checks a grant before it is made: the group and channel exist, the expiry is a date, the pin a kept
    /// generation of the channel, the selector parses.
    ///
    /// # Errors
    /// The first thing wrong with it.
    pub fn check_grant(&self, g: &GrantRow) -> Result<()> {
        let db = self.db();
        if !db.has_group(&g.group)? {
            bail!("no group named {:?} (`mailferry owner group add`)", g.group);
        }
        if db.channel(&g.channel)?.is_none() {
            bail!("no channel named {:?} (`mailferry owner channel list`)", g.channel);
        }
        if let Some(until) = &g.until
            && !protocol::valid_date(until)
        {
            bail!("--until {until:?} is not a date written YYYY-MM-DD");
        }
        if let Some(pin) = g.pin
            && db.generation(&g.channel, pin)?.is_none()
        {
            bail!("generation {pin} of channel {:?} is not kept (see `mailferry owner channel list`)", g.channel);
        }
        if let Some(s) = &g.selector {
            crate::registration::selector::Selector::parse(s)
                .map_err(|e| anyhow::format_err!("--selector {s:?}: {e}"))?;
        }
        Ok(())
    }

    /// Grants a channel to a group (replacing its earlier grant of that channel).
    ///
    /// # Errors
    /// What [`Owner::check_grant`] finds, or state failures.
    pub fn grant(&mut self, g: &GrantRow) -> Result<()> {
        self.check_grant(g)?;
        self.db().grant(g)?;
        info!(group = %g.group, channel = %g.channel, until = ?g.until, pin = ?g.pin, "granted");
        Ok(())
    }

    /// Which members of the grant's group it reaches, without making it (`owner grant --dry-run`).
    ///
    /// # Errors
    /// What [`Owner::check_grant`] finds, or state failures.
    pub fn grant_reach(&self, g: &GrantRow) -> Result<Reach> {
        self.check_grant(g)?;
        let (mut reaches, mut leaves_out) = (Vec::new(), Vec::new());
        for m in self.db().members(&g.group)? {
            let access = self.view().access(&m, &g.channel)?;
            let selected = match &g.selector {
                None => true,
                Some(s) => crate::registration::selector::Selector::parse(s)
                    .is_ok_and(|sel| sel.matches(access.facts.as_ref(), &access.tags)),
            };
            if selected { reaches.push(m) } else { leaves_out.push(m) }
        }
        Ok(Reach { grant: g.clone(), reaches, leaves_out })
    }

    /// Withdraws a group's grant of a channel.
    ///
    /// # Errors
    /// No such grant, or state failures.
    pub fn revoke(&mut self, group: &str, channel: &str) -> Result<()> {
        self.db().revoke(group, channel)?;
        info!(group, channel, "grant revoked");
        Ok(())
    }

    /// Suspends a recipient (or, with `on` false, resumes it): while suspended it is answered that it is,
    /// and sent nothing else.
    ///
    /// # Errors
    /// No such recipient, or state failures.
    pub fn suspend(&mut self, name: &str, on: bool) -> Result<()> {
        self.db().set_suspended(name, on)?;
        info!(recipient = name, suspended = on, "recipient {}", if on { "suspended" } else { "resumed" });
        Ok(())
    }

    /// A recipient with its groups and what it is entitled to in each channel now (`owner show`).
    ///
    /// # Errors
    /// No such recipient, or state failures.
    pub fn show(&self, name: &str) -> Result<Shown> {
        let db = self.db();
        let rec = db.recipient(name)?.with_context(|| format!("no recipient named {name:?} is registered"))?;
        let view = self.view();
        let registration = db.registration(name)?;
        let channels = db
            .channels()?
            .into_iter()
            .map(|c| {
                let entitlement = match owner::entitlement(&view.access(name, &c.name)?, now()) {
                    Entitlement::Granted { pin: None } => "granted".to_owned(),
                    Entitlement::Granted { pin: Some(p) } => format!("pinned at {p}"),
                    Entitlement::Denied(s) => s.to_string(),
                };
                Ok(ShownChannel { last_seq: db.last_seq(name, &c.name)?, channel: c.name, entitlement })
            })
            .collect::<Result<_>>()?;
        Ok(Shown {
            name: rec.name,
            address: rec.address,
            key_id: rec.key_id.to_string(),
            suspended: db.suspended(name)?,
            groups: db.groups_of(name)?,
            tags: db.recipient_tags(name)?.into_iter().collect(),
            registered_at: registration.as_ref().map(|(_, at)| *at),
            registration: registration.map(|(f, _)| f),
            channels,
        })
    }
}
