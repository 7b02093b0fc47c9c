//! The recipient's facts about one subscription (one data tree, one channel): what it applied, what it
//! asked for, what it keeps for a rollback. [`Db::sub`] scopes the state database to a subscription;
//! everything here reads and writes that subscription's rows only, so two trees never see each other's
//! requests, parts or history.

use std::path::Path;

use anyhow::{Context as _, Result};
use rusqlite::{OptionalExtension as _, params};

use super::{Db, HookFailureRow, Previous, Subscription, WaitingRow, now, pack_manifest, unpack_manifest};
use crate::crypto::KeyId;
use crate::manifest::{Digest, Manifest};
use crate::protocol::ReplyId;

/// The state database, scoped to one subscription of a recipient.
#[derive(Clone, Copy, Debug)]
pub struct Sub<'a> {
    pub(super) db: &'a Db,
    pub(super) name: &'a str,
}

impl Db {
    /// The state of subscription `name`. Reading one that has no row yet (a tree subscribed to but never
    /// opened) gives its empty state; the recipient makes every configured one's row when it opens
    /// ([`Db::add_subscriptions`]), before anything is written.
    ///
    /// # Errors
    /// None today; kept fallible so that callers need not change if scoping ever reads the database.
    pub fn sub<'a>(&'a self, name: &'a str) -> Result<Sub<'a>> {
        Ok(Sub { db: self, name })
    }

    /// Makes the rows of subscriptions `names` that have none (once, when a recipient opens its state).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn add_subscriptions<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<()> {
        for name in names {
            self.conn.execute("INSERT OR IGNORE INTO subscriptions (name) VALUES (?1)", [name])?;
        }
        Ok(())
    }

    /// The names of the subscriptions this state holds, `default` first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn subscription_names(&self) -> Result<Vec<String>> {
        let mut st = self.conn.prepare("SELECT name FROM subscriptions ORDER BY name != 'default', name")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl Sub<'_> {
    /// The subscription's name (its channel).
    pub fn name(&self) -> &str {
        self.name
    }

    /// The whole state database.
    pub fn db(&self) -> &Db {
        self.db
    }

    /// Takes the next request sequence number.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn next_seq(&self) -> Result<u64> {
        let seq = self.subscription()?.seq + 1;
        self.db.conn.execute("UPDATE subscriptions SET seq = ?1 WHERE name = ?2", params![seq as i64, self.name])?;
        Ok(seq)
    }

    /// The recipient's facts about its data tree.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn subscription(&self) -> Result<Subscription> {
        Ok(self
            .db
            .conn
            .query_row(
                "SELECT seq, applied_generation, applied_root, applied_key_id, last_request_at, last_reply_at,
                    stale_notified_at, need_full_inventory, full_content, rollback_hold, standing, pinned,
                    fresh_next
             FROM subscriptions WHERE name = ?1",
                [self.name],
                |r| {
                    let opt = |v: Option<i64>| v.map(|v| v as u64);
                    Ok(Subscription {
                        seq: r.get::<_, i64>(0)? as u64,
                        applied_generation: r.get::<_, i64>(1)? as u64,
                        applied_root: r.get(2)?,
                        applied_key_id: r.get(3)?,
                        last_request_at: opt(r.get(4)?),
                        last_reply_at: opt(r.get(5)?),
                        stale_notified_at: opt(r.get(6)?),
                        need_full_inventory: r.get(7)?,
                        full_content: r.get(8)?,
                        rollback_hold: r.get::<_, i64>(9)? as u64,
                        standing: r.get(10)?,
                        pinned: opt(r.get(11)?),
                        fresh_next: r.get(12)?,
                    })
                },
            )
            .optional()?
            .unwrap_or_default())
    }

    /// Whether the next request lists the whole tree (the owner asked for it).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_need_full_inventory(&self, on: bool) -> Result<()> {
        self.db
            .conn
            .execute("UPDATE subscriptions SET need_full_inventory = ?1 WHERE name = ?2", params![on, self.name])?;
        Ok(())
    }

    /// Whether the next request asks for whole files only (a delta base was not what the owner thought).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_full_content(&self, on: bool) -> Result<()> {
        self.db.conn.execute("UPDATE subscriptions SET full_content = ?1 WHERE name = ?2", params![on, self.name])?;
        Ok(())
    }

    /// Whether the next request asks `fresh`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_fresh_next(&self, on: bool) -> Result<()> {
        self.db.conn.execute("UPDATE subscriptions SET fresh_next = ?1 WHERE name = ?2", params![on, self.name])?;
        Ok(())
    }

    /// Records that every part of reply `reply_id` (answering `nonce`, in `parts` parts) is wanted: a
    /// reference reply pointed to it and none of it is here. The next request asks for them.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn want_reply(&self, reply_id: &ReplyId, nonce: &str, parts: u32) -> Result<()> {
        self.db.conn.execute(
            "INSERT OR REPLACE INTO wanted_replies (reply_id, subscription, nonce, parts) VALUES (?1, ?2, ?3, ?4)",
            params![reply_id, self.name, nonce, parts],
        )?;
        Ok(())
    }

    /// The replies wanted whole: reply id, nonce, parts.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn wanted_replies(&self) -> Result<Vec<(ReplyId, String, u32)>> {
        let mut st =
            self.db.conn.prepare("SELECT reply_id, nonce, parts FROM wanted_replies WHERE subscription = ?1")?;
        let rows = st.query_map([self.name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records that a staleness notice went out (or, with `None`, that the stale spell is over).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_stale_notified(&self, at: Option<u64>) -> Result<()> {
        self.db.conn.execute(
            "UPDATE subscriptions SET stale_notified_at = ?1 WHERE name = ?2",
            params![at.map(|v| v as i64), self.name],
        )?;
        Ok(())
    }

    /// Records a request as sent and awaiting its reply.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn add_outstanding(&self, nonce: &str, seq: u64) -> Result<()> {
        self.db.conn.execute(
            "INSERT INTO outstanding (nonce, seq, sent_at, subscription) VALUES (?1, ?2, ?3, ?4)",
            params![nonce, seq as i64, now() as i64, self.name],
        )?;
        self.db.conn.execute(
            "UPDATE subscriptions SET last_request_at = ?1 WHERE name = ?2",
            params![now() as i64, self.name],
        )?;
        Ok(())
    }

    /// The sequence number of the request with `nonce`, if it is still outstanding.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outstanding(&self, nonce: &str) -> Result<Option<u64>> {
        Ok(self
            .db
            .conn
            .query_row("SELECT seq FROM outstanding WHERE nonce = ?1 AND subscription = ?2", [nonce, self.name], |r| {
                r.get::<_, i64>(0)
            })
            .optional()?
            .map(|v| v as u64))
    }

    /// The send time of the newest outstanding request.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn newest_outstanding(&self) -> Result<Option<u64>> {
        Ok(self
            .db
            .conn
            .query_row("SELECT max(sent_at) FROM outstanding WHERE subscription = ?1", [self.name], |r| {
                r.get::<_, Option<i64>>(0)
            })?
            .map(|v| v as u64))
    }

    /// Number of outstanding requests.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outstanding_count(&self) -> Result<u64> {
        Ok(self.db.conn.query_row("SELECT count(*) FROM outstanding WHERE subscription = ?1", [self.name], |r| {
            r.get::<_, i64>(0)
        })? as u64)
    }

    /// Marks a request answered: its nonce is no longer accepted.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn close_outstanding(&self, nonce: &str) -> Result<()> {
        self.db.conn.execute("DELETE FROM outstanding WHERE nonce = ?1 AND subscription = ?2", [nonce, self.name])?;
        Ok(())
    }

    /// Records that a fresh, authenticated reply was accepted now (applied, or confirming the tree is
    /// current): the clock that staleness is measured on.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn mark_fresh_reply(&self) -> Result<()> {
        self.db.conn.execute(
            "UPDATE subscriptions SET last_reply_at = ?1, stale_notified_at = NULL WHERE name = ?2",
            params![now() as i64, self.name],
        )?;
        Ok(())
    }

    /// Forgets outstanding requests older than `max_age` seconds, keeping the newest 16 in any case.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn expire_outstanding(&self, max_age: u64) -> Result<()> {
        let cutoff = now().saturating_sub(max_age) as i64;
        self.db.conn.execute(
            "DELETE FROM outstanding WHERE subscription = ?2 AND sent_at < ?1
               AND nonce NOT IN (SELECT nonce FROM outstanding WHERE subscription = ?2 ORDER BY sent_at DESC LIMIT 16)",
            params![cutoff, self.name],
        )?;
        Ok(())
    }

    /// The generation and root this recipient last applied, without loading the manifest.
    ///
    /// # Errors
    /// SQLite errors or a corrupt root.
    pub fn applied_root(&self) -> Result<(u64, Option<Digest>)> {
        let sub = self.subscription()?;
        let root = sub.applied_root.map(|r| Digest::from_hex(&r)).transpose().map_err(anyhow::Error::msg)?;
        Ok((sub.applied_generation, root))
    }

    fn manifest_named(&self, name: &str) -> Result<Option<Manifest>> {
        let data: Option<Vec<u8>> = self
            .db
            .conn
            .query_row("SELECT data FROM manifests WHERE subscription = ?1 AND name = ?2", [self.name, name], |r| {
                r.get(0)
            })
            .optional()?;
        data.map(|d| unpack_manifest(&d)).transpose()
    }

    fn set_manifest_named(&self, name: &str, m: &Manifest) -> Result<()> {
        self.db.conn.execute(
            "INSERT OR REPLACE INTO manifests (subscription, name, data) VALUES (?1, ?2, ?3)",
            params![self.name, name, pack_manifest(m)?],
        )?;
        Ok(())
    }

    /// The generation, root and manifest this recipient last applied.
    ///
    /// # Errors
    /// SQLite errors or a corrupt manifest.
    pub fn applied(&self) -> Result<(u64, Option<Digest>, Manifest)> {
        let (generation, root) = self.applied_root()?;
        Ok((generation, root, self.manifest_named("applied")?.unwrap_or_default()))
    }

    /// Records a completed apply: the new generation, its root and manifest, the id of the key whose reply
    /// brought it (`None` for a rollback), and the history row.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_applied(
        &self,
        generation: u64,
        manifest: &Manifest,
        reply_id: &ReplyId,
        nonce: &str,
        ops: usize,
        key_id: Option<&KeyId>,
    ) -> Result<()> {
        let root = manifest.root();
        self.db.conn.execute(
            "UPDATE subscriptions SET applied_generation = ?1, applied_root = ?2,
                    applied_key_id = coalesce(?3, applied_key_id) WHERE name = ?4",
            params![generation as i64, root.to_hex(), key_id, self.name],
        )?;
        self.set_manifest_named("applied", manifest)?;
        self.db.conn.execute(
            "INSERT INTO applied (at, generation, root, reply_id, nonce, ops, subscription)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![now() as i64, generation as i64, root.to_hex(), reply_id, nonce, ops as i64, self.name],
        )?;
        Ok(())
    }

    /// The generation kept for `mailferry recipient rollback`, if any.
    ///
    /// # Errors
    /// SQLite errors or a corrupt manifest.
    pub fn previous(&self) -> Result<Option<Previous>> {
        let row: Option<(i64, Option<String>)> = self
            .db
            .conn
            .query_row(
                "SELECT previous_generation, previous_store FROM subscriptions WHERE name = ?1",
                [self.name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (generation, store) = row.unwrap_or((0, None));
        let store = store.filter(|s| !s.is_empty());
        let manifest = self.manifest_named("previous")?;
        let (Some(store), Some(manifest), true) = (store, manifest, generation > 0) else { return Ok(None) };
        Ok(Some(Previous { generation: generation as u64, manifest, store: store.into() }))
    }

    /// Keeps `generation` with `manifest` for a rollback, its files in `store`, replacing what was kept.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_previous(&self, generation: u64, manifest: &Manifest, store: &Path) -> Result<()> {
        let store = store.to_str().with_context(|| format!("`{}` is not UTF-8", store.display()))?;
        self.db.conn.execute(
            "UPDATE subscriptions SET previous_generation = ?1, previous_store = ?2 WHERE name = ?3",
            params![generation as i64, store, self.name],
        )?;
        self.set_manifest_named("previous", manifest)
    }

    /// Forgets the generation kept for a rollback.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn clear_previous(&self) -> Result<()> {
        self.db.conn.execute(
            "UPDATE subscriptions SET previous_generation = 0, previous_store = NULL WHERE name = ?1",
            [self.name],
        )?;
        self.db.conn.execute("DELETE FROM manifests WHERE subscription = ?1 AND name = 'previous'", [self.name])?;
        Ok(())
    }

    /// Records a finished rollback: `generation` with `manifest` is applied again (a history row under
    /// `id`), nothing is kept for another rollback, and generations up to `held` are held back.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_rollback(
        &self,
        generation: u64,
        manifest: &Manifest,
        id: &ReplyId,
        ops: usize,
        held: u64,
    ) -> Result<()> {
        // A history row with no nonce: no reply brought it.
        self.record_applied(generation, manifest, id, "", ops, None)?;
        self.clear_previous()?;
        let held = held.max(self.rollback_hold()?.unwrap_or(0));
        self.set_rollback_hold(Some(held))
    }

    /// The generation a rollback holds back: replies bringing it or an older one are not applied.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn rollback_hold(&self) -> Result<Option<u64>> {
        Ok(Some(self.subscription()?.rollback_hold).filter(|g| *g > 0))
    }

    /// Sets or (with `None`) ends the rollback hold.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_rollback_hold(&self, held: Option<u64>) -> Result<()> {
        self.db.conn.execute(
            "UPDATE subscriptions SET rollback_hold = ?1 WHERE name = ?2",
            params![held.unwrap_or(0) as i64, self.name],
        )?;
        Ok(())
    }

    /// Whether a reply with this id was applied already.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn reply_applied(&self, reply_id: &ReplyId) -> Result<bool> {
        Ok(self
            .db
            .conn
            .query_row("SELECT count(*) FROM applied WHERE reply_id = ?1", [reply_id], |r| r.get::<_, i64>(0))?
            > 0)
    }

    /// Records a verified part of a reply (its chunk is on disk) with its control bytes.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_part(&self, reply_id: &ReplyId, part: u32, nonce: &str, control: &[u8]) -> Result<()> {
        self.db.conn.execute(
            "INSERT OR REPLACE INTO received_parts (reply_id, part, nonce, received_at, control, subscription)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![reply_id, part, nonce, now() as i64, control, self.name],
        )?;
        Ok(())
    }

    /// The parts of a reply received so far, with their control bytes.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn received_parts(&self, reply_id: &ReplyId) -> Result<Vec<(u32, Vec<u8>)>> {
        let mut st =
            self.db.conn.prepare("SELECT part, control FROM received_parts WHERE reply_id = ?1 ORDER BY part")?;
        let rows = st.query_map([reply_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Incomplete replies: reply id, nonce, and when the last part arrived.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn partial_replies(&self) -> Result<Vec<(ReplyId, String, u64)>> {
        let mut st = self.db.conn.prepare(
            "SELECT reply_id, nonce, max(received_at) FROM received_parts WHERE subscription = ?1
             GROUP BY reply_id ORDER BY 3 DESC",
        )?;
        let rows = st.query_map([self.name], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets the received parts of a reply.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn forget_parts(&self, reply_id: &ReplyId) -> Result<()> {
        self.db.conn.execute("DELETE FROM received_parts WHERE reply_id = ?1", [reply_id])?;
        self.db.conn.execute("DELETE FROM wanted_replies WHERE reply_id = ?1", [reply_id])?;
        Ok(())
    }

    /// Forgets every outstanding request (a reply was applied: the tree they described is gone).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn close_all_outstanding(&self) -> Result<()> {
        self.db.conn.execute("DELETE FROM outstanding WHERE subscription = ?1", [self.name])?;
        Ok(())
    }

    /// Records what the owner last said of this recipient's entitlement (`None`: plain service) and the
    /// generation it is pinned at, if any.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_standing(&self, standing: Option<&str>, pinned: Option<u64>) -> Result<()> {
        self.db.conn.execute(
            "UPDATE subscriptions SET standing = ?1, pinned = ?2 WHERE name = ?3",
            params![standing, pinned.map(|p| p as i64), self.name],
        )?;
        Ok(())
    }

    /// Records a failed install hook and what was done about it (`rolled-back`, `kept`, or why neither).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_hook_failure(&self, f: &HookFailureRow) -> Result<()> {
        self.db.conn.execute(
            "INSERT INTO hook_failures (subscription, at, generation, reply_id, hook, exit_status, output_tail, action)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                self.name,
                f.at as i64,
                f.generation as i64,
                f.reply_id,
                f.hook,
                f.exit_status,
                f.output_tail,
                f.action
            ],
        )?;
        Ok(())
    }

    /// The most recent failed install hook, if any.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn last_hook_failure(&self) -> Result<Option<HookFailureRow>> {
        Ok(self
            .db
            .conn
            .query_row(
                "SELECT at, generation, reply_id, hook, exit_status, output_tail, action FROM hook_failures
                 WHERE subscription = ?1 ORDER BY id DESC LIMIT 1",
                [self.name],
                |r| {
                    Ok(HookFailureRow {
                        at: r.get::<_, i64>(0)? as u64,
                        generation: r.get::<_, i64>(1)? as u64,
                        reply_id: r.get(2)?,
                        hook: r.get(3)?,
                        exit_status: r.get(4)?,
                        output_tail: r.get(5)?,
                        action: r.get(6)?,
                    })
                },
            )
            .optional()?)
    }

    /// Keeps a verified, staged update ready to install, replacing the one kept before.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_waiting_install(&self, w: &WaitingRow) -> Result<()> {
        self.db.conn.execute(
            "INSERT OR REPLACE INTO install_waiting (subscription, generation, reply_id, base, reason, since, journal)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![self.name, w.generation as i64, w.reply_id, w.base.to_hex(), w.reason, w.since as i64, w.journal],
        )?;
        Ok(())
    }

    /// The update kept ready to install, if any.
    ///
    /// # Errors
    /// SQLite errors or a corrupt row.
    pub fn waiting_install(&self) -> Result<Option<WaitingRow>> {
        let row = self
            .db
            .conn
            .query_row(
                "SELECT generation, reply_id, base, reason, since, journal FROM install_waiting WHERE subscription = ?1",
                [self.name],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, ReplyId>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)? as u64,
                        r.get::<_, Vec<u8>>(5)?,
                    ))
                },
            )
            .optional()?;
        let Some((generation, reply_id, base, reason, since, journal)) = row else { return Ok(None) };
        let base = Digest::from_hex(&base).map_err(anyhow::Error::msg).context("a waiting update's base is corrupt")?;
        Ok(Some(WaitingRow { generation, reply_id, base, reason, since, journal }))
    }

    /// Forgets the update kept ready.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn clear_waiting_install(&self) -> Result<()> {
        self.db.conn.execute("DELETE FROM install_waiting WHERE subscription = ?1", [self.name])?;
        Ok(())
    }

    /// Whether a negative receipt was sent for request `nonce`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn failure_receipt_sent(&self, nonce: &str) -> Result<bool> {
        Ok(self.db.conn.query_row(
            "SELECT count(*) FROM failure_receipts WHERE subscription = ?1 AND nonce = ?2",
            params![self.name, nonce],
            |r| r.get::<_, i64>(0),
        )? > 0)
    }

    /// Records that a negative receipt for request `nonce` (reply `reply_id`) was queued.
    ///
    /// # Errors
    /// SQLite errors, including one recorded before for the nonce.
    pub fn record_failure_receipt(&self, nonce: &str, reply_id: &ReplyId, reason: &str) -> Result<()> {
        self.db.conn.execute(
            "INSERT INTO failure_receipts (subscription, nonce, reply_id, reason, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![self.name, nonce, reply_id, reason, now() as i64],
        )?;
        Ok(())
    }

    /// The reply that brought generation `generation` (its id and the nonce it answered), the newest such
    /// apply; `None` when none did (nothing applied it, or a rollback did).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn applied_reply(&self, generation: u64) -> Result<Option<(ReplyId, String)>> {
        Ok(self
            .db
            .conn
            .query_row(
                "SELECT reply_id, nonce FROM applied WHERE generation = ?1 AND nonce != '' AND subscription = ?2
                 ORDER BY id DESC LIMIT 1",
                params![generation as i64, self.name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }
}
