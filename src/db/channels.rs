//! The owner's channels, groups and grants: which recipient may be sent which channel, until when, at
//! which generation. The decision itself is the engine's ([`crate::engine::owner::entitlement`]); this
//! is the record it reads.

use std::path::PathBuf;

use anyhow::{Result, bail};
use rusqlite::{OptionalExtension as _, params};
use serde::Serialize;

use super::{Db, now};

/// A channel as the owner keeps it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChannelRow {
    /// Its name.
    pub name: String,
    /// The tree it publishes (`None` for the default channel: the config's `source`).
    pub source: Option<PathBuf>,
    /// When it was added.
    pub created: u64,
    /// Every registered recipient may be sent it, grant or not (the default channel, unless restricted).
    pub open: bool,
    /// Reply payloads are encrypted under the channel's key.
    pub encrypt: bool,
}

/// A grant of a channel to a group.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GrantRow {
    /// The group.
    pub group: String,
    /// The channel.
    pub channel: String,
    /// The last day it is valid (`YYYY-MM-DD`, UTC), if it expires.
    pub until: Option<String>,
    /// The generation its members stay at, if pinned.
    pub pin: Option<u64>,
    /// A selector over registration facts its members must match, if any.
    pub selector: Option<String>,
    /// When it was made.
    pub created: u64,
}

/// A group with its members and grants.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GroupRow {
    /// Its name.
    pub name: String,
    /// Its members, by name.
    pub members: Vec<String>,
    /// What it is granted.
    pub grants: Vec<GrantRow>,
}

fn constraint(e: rusqlite::Error, what: impl FnOnce() -> String) -> anyhow::Error {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
            anyhow::format_err!("{}", what())
        }
        e => e.into(),
    }
}

impl Db {
    /// Adds a channel.
    ///
    /// # Errors
    /// A taken name, or SQLite errors.
    pub fn add_channel(&self, name: &str, source: Option<&str>, open: bool, encrypt: bool) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO channels (name, source, created, open, encrypt) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, source, now() as i64, open, encrypt],
            )
            .map_err(|e| constraint(e, || format!("a channel named {name:?} exists already")))?;
        Ok(())
    }

    /// Changes whether a channel is open to every recipient and whether its payloads are encrypted.
    ///
    /// # Errors
    /// No such channel, or SQLite errors.
    pub fn set_channel(&self, name: &str, open: Option<bool>, encrypt: Option<bool>) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE channels SET open = coalesce(?2, open), encrypt = coalesce(?3, encrypt) WHERE name = ?1",
            params![name, open, encrypt],
        )?;
        if n == 0 {
            bail!("no channel named {name:?}");
        }
        Ok(())
    }

    /// A channel by name.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn channel(&self, name: &str) -> Result<Option<ChannelRow>> {
        Ok(self.channels_where("WHERE name = ?1", [name])?.pop())
    }

    /// Every channel, the default one first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn channels(&self) -> Result<Vec<ChannelRow>> {
        self.channels_where("ORDER BY name != 'default', name", [])
    }

    fn channels_where<P: rusqlite::Params>(&self, clause: &str, p: P) -> Result<Vec<ChannelRow>> {
        let mut st =
            self.conn.prepare(&format!("SELECT name, source, created, open, encrypt FROM channels {clause}"))?;
        let rows = st.query_map(p, |r| {
            Ok(ChannelRow {
                name: r.get(0)?,
                source: r.get::<_, Option<String>>(1)?.map(PathBuf::from),
                created: r.get::<_, i64>(2)? as u64,
                open: r.get(3)?,
                encrypt: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Adds a group.
    ///
    /// # Errors
    /// A taken name, or SQLite errors.
    pub fn add_group(&self, name: &str) -> Result<()> {
        self.conn
            .execute("INSERT INTO groups (name, created) VALUES (?1, ?2)", params![name, now() as i64])
            .map_err(|e| constraint(e, || format!("a group named {name:?} exists already")))?;
        Ok(())
    }

    /// Whether group `name` exists.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn has_group(&self, name: &str) -> Result<bool> {
        Ok(self.conn.query_row("SELECT count(*) FROM groups WHERE name = ?1", [name], |r| r.get::<_, i64>(0))? > 0)
    }

    /// Puts `recipient` in group `group` (again is harmless).
    ///
    /// # Errors
    /// No such group or recipient, or SQLite errors.
    pub fn join_group(&self, group: &str, recipient: &str) -> Result<()> {
        if !self.has_group(group)? {
            bail!("no group named {group:?}");
        }
        if self.recipient(recipient)?.is_none() {
            bail!("no recipient named {recipient:?} is registered");
        }
        self.conn.execute(
            "INSERT OR IGNORE INTO group_members (grp, recipient) VALUES (?1, ?2)",
            params![group, recipient],
        )?;
        Ok(())
    }

    /// Takes `recipient` out of group `group`.
    ///
    /// # Errors
    /// Not a member, or SQLite errors.
    pub fn leave_group(&self, group: &str, recipient: &str) -> Result<()> {
        let n = self
            .conn
            .execute("DELETE FROM group_members WHERE grp = ?1 AND recipient = ?2", params![group, recipient])?;
        if n == 0 {
            bail!("{recipient:?} is not in group {group:?}");
        }
        Ok(())
    }

    /// Every group with its members and grants.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn groups(&self) -> Result<Vec<GroupRow>> {
        let mut st = self.conn.prepare("SELECT name FROM groups ORDER BY name")?;
        let names: Vec<String> = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        names
            .into_iter()
            .map(|name| {
                let mut st =
                    self.conn.prepare("SELECT recipient FROM group_members WHERE grp = ?1 ORDER BY recipient")?;
                let members = st.query_map([&name], |r| r.get(0))?.collect::<Result<_, _>>()?;
                let grants = self.grants_where("WHERE grp = ?1 ORDER BY channel", [&name])?;
                Ok(GroupRow { name, members, grants })
            })
            .collect()
    }

    /// The groups `recipient` is in.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn groups_of(&self, recipient: &str) -> Result<Vec<String>> {
        let mut st = self.conn.prepare("SELECT grp FROM group_members WHERE recipient = ?1 ORDER BY grp")?;
        let rows = st.query_map([recipient], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The members of `group`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn members(&self, group: &str) -> Result<Vec<String>> {
        let mut st = self.conn.prepare("SELECT recipient FROM group_members WHERE grp = ?1 ORDER BY recipient")?;
        let rows = st.query_map([group], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Grants `channel` to `group` (replacing an earlier grant of the same pair).
    ///
    /// # Errors
    /// No such group or channel, or SQLite errors.
    pub fn grant(&self, g: &GrantRow) -> Result<()> {
        if !self.has_group(&g.group)? {
            bail!("no group named {:?}", g.group);
        }
        if self.channel(&g.channel)?.is_none() {
            bail!("no channel named {:?}", g.channel);
        }
        self.conn.execute(
            "INSERT OR REPLACE INTO grants (grp, channel, until, pin, selector, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![g.group, g.channel, g.until, g.pin.map(|p| p as i64), g.selector, g.created as i64],
        )?;
        Ok(())
    }

    /// Withdraws the grant of `channel` to `group`.
    ///
    /// # Errors
    /// No such grant, or SQLite errors.
    pub fn revoke(&self, group: &str, channel: &str) -> Result<()> {
        let n = self.conn.execute("DELETE FROM grants WHERE grp = ?1 AND channel = ?2", params![group, channel])?;
        if n == 0 {
            bail!("group {group:?} has no grant of channel {channel:?}");
        }
        Ok(())
    }

    /// The grants that reach `recipient` for `channel`, through any of its groups.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn grants_for(&self, recipient: &str, channel: &str) -> Result<Vec<GrantRow>> {
        self.grants_where(
            "WHERE channel = ?2 AND grp IN (SELECT grp FROM group_members WHERE recipient = ?1) ORDER BY grp",
            params![recipient, channel],
        )
    }

    /// Every grant of `channel`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn grants_of(&self, channel: &str) -> Result<Vec<GrantRow>> {
        self.grants_where("WHERE channel = ?1 ORDER BY grp", [channel])
    }

    fn grants_where<P: rusqlite::Params>(&self, clause: &str, p: P) -> Result<Vec<GrantRow>> {
        let mut st =
            self.conn.prepare(&format!("SELECT grp, channel, until, pin, selector, created FROM grants {clause}"))?;
        let rows = st.query_map(p, |r| {
            Ok(GrantRow {
                group: r.get(0)?,
                channel: r.get(1)?,
                until: r.get(2)?,
                pin: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                selector: r.get(4)?,
                created: r.get::<_, i64>(5)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether `recipient` is suspended.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn suspended(&self, recipient: &str) -> Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT suspended FROM recipients WHERE name = ?1", [recipient], |r| r.get::<_, bool>(0))
            .optional()?
            .unwrap_or(false))
    }

    /// The current key of `channel` (its epoch and the key in hex, secret), if it has one.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn channel_key(&self, channel: &str) -> Result<Option<(u64, String)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT epoch, key FROM channel_keys WHERE channel = ?1 ORDER BY epoch DESC LIMIT 1",
                [channel],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?)
    }

    /// Starts a new key epoch for `channel` with `key_hex`; returns the epoch.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn new_channel_key(&self, channel: &str, key_hex: &str) -> Result<u64> {
        let epoch = self.channel_key(channel)?.map_or(1, |(e, _)| e + 1);
        self.conn.execute(
            "INSERT INTO channel_keys (channel, epoch, key, created) VALUES (?1, ?2, ?3, ?4)",
            params![channel, epoch as i64, key_hex, now() as i64],
        )?;
        Ok(epoch)
    }

    /// Keeps `facts` (carried by a request made at `created`) as `recipient`'s registration, replacing
    /// what it registered before.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_registration(&self, recipient: &str, facts: &crate::registration::Facts, created: u64) -> Result<()> {
        let json = String::from_utf8(facts.to_canonical_json())?;
        self.conn.execute(
            "INSERT OR REPLACE INTO registrations (recipient, facts, digest, created, received_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![recipient, json, hex::encode(facts.digest()), created as i64, now() as i64],
        )?;
        Ok(())
    }

    /// The facts `recipient` last registered and when it made them.
    ///
    /// # Errors
    /// SQLite errors, or stored facts that no longer decode.
    pub fn registration(&self, recipient: &str) -> Result<Option<(crate::registration::Facts, u64)>> {
        let row: Option<(String, i64)> = self
            .conn
            .query_row("SELECT facts, created FROM registrations WHERE recipient = ?1", [recipient], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        row.map(|(facts, created)| {
            let facts = crate::registration::Facts::from_json(facts.as_bytes())
                .map_err(|e| anyhow::format_err!("the registration kept for {recipient:?} is corrupt: {e}"))?;
            Ok((facts, created as u64))
        })
        .transpose()
    }

    /// The digest of the facts this recipient's owner has confirmed receiving (it answered a request that
    /// carried them), and the nonce of a request carrying newer facts, awaiting its answer.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn registered(&self) -> Result<(Option<String>, Option<String>)> {
        Ok(self
            .conn
            .query_row("SELECT registered_digest, registered_pending FROM node", [], |r| Ok((r.get(0)?, r.get(1)?)))?)
    }

    /// Records that the request with `nonce` carries facts with `digest` (pending until it is answered).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_registration_pending(&self, digest: &str, nonce: &str) -> Result<()> {
        self.conn.execute("UPDATE node SET registered_pending = ?1 || ' ' || ?2", params![nonce, digest])?;
        Ok(())
    }

    /// An authentic answer to request `nonce` arrived: if that request carried facts, they are registered.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn registration_answered(&self, nonce: &str) -> Result<()> {
        let (_, pending) = self.registered()?;
        if let Some((n, digest)) = pending.as_deref().and_then(|p| p.split_once(' '))
            && n == nonce
        {
            self.conn.execute("UPDATE node SET registered_digest = ?1, registered_pending = NULL", [digest])?;
        }
        Ok(())
    }

    /// What decides whether `recipient` may be sent `channel` ([`crate::engine::owner::entitlement`]).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn access(&self, recipient: &str, channel: &str) -> Result<crate::engine::owner::Access> {
        use crate::engine::owner::{Access, ChannelAccess, GrantAccess};
        Ok(Access {
            channel: self.channel(channel)?.map(|c| ChannelAccess { open: c.open }),
            suspended: self.suspended(recipient)?,
            grants: self
                .grants_for(recipient, channel)?
                .into_iter()
                .map(|g| GrantAccess { until: g.until, pin: g.pin, selector: g.selector })
                .collect(),
            facts: self.registration(recipient)?.map(|(f, _)| f),
            tags: self.recipient_tags(recipient)?,
        })
    }
}
