//! The signed broadcast's state (`docs/protocol.md` §7.11): on an owner, the broadcasts it made; on a
//! recipient, the tickets it accepted and the broadcast parts it holds until a ticket names them.

use anyhow::Result;
use rusqlite::{OptionalExtension as _, params};

use super::{Db, Sub, now};
use crate::manifest::Digest;
use crate::protocol::ReplyId;
use crate::protocol::envelope::Hints;

/// A ticket a recipient accepted: the reply it is, and the broadcast whose parts carry its chunks.
#[derive(Clone, Debug)]
pub struct TicketRow {
    /// The ticket's reply id.
    pub reply_id: ReplyId,
    /// The broadcast it names.
    pub broadcast_id: ReplyId,
    /// The nonce of the request it answers.
    pub nonce: String,
    /// The id of the key its MAC verified under.
    pub key_id: String,
    /// Its control part, as received.
    pub control: Vec<u8>,
}

/// A broadcast part held for a ticket to come.
#[derive(Clone, Debug)]
pub struct HeldPart {
    /// The broadcast.
    pub broadcast_id: ReplyId,
    /// Its part number.
    pub part: u32,
    /// The part's control bytes.
    pub control: Vec<u8>,
    /// Its chunk's size.
    pub size: u64,
    /// Its message's digest and hints, for the refusal recorded when no ticket comes.
    pub digest: Digest,
    /// Untrusted header hints.
    pub hints: Hints,
    /// When it arrived.
    pub at: u64,
}

impl Db {
    /// Records a broadcast the owner made.
    ///
    /// # Errors
    /// SQLite errors.
    #[allow(clippy::too_many_arguments)]
    pub fn record_broadcast(
        &self,
        id: &ReplyId,
        channel: &str,
        generation: u64,
        root: &Digest,
        base: &Digest,
        parts: u32,
        bytes: u64,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO broadcasts (id, channel, generation, root, base, parts, bytes, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![id, channel, generation as i64, root.to_hex(), base.to_hex(), parts, bytes as i64, now() as i64],
        )?;
        Ok(())
    }

    /// Adds `to` to the envelope recipients of every queued part of broadcast `id` (one submission with
    /// many recipients), and counts its ticket.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn join_broadcast(&self, id: &ReplyId, to: Option<&str>) -> Result<()> {
        if let Some(to) = to {
            self.conn.execute(
                "UPDATE outbox SET rcpt = rcpt || char(10) || ?2 WHERE name LIKE 'broadcast-' || ?1 || '-%'",
                params![id, to],
            )?;
        }
        self.conn.execute("UPDATE broadcasts SET tickets = tickets + 1 WHERE id = ?1", [id])?;
        Ok(())
    }

    /// The broadcasts made: id, parts, bytes of its parts, tickets sent.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn broadcasts(&self) -> Result<Vec<(ReplyId, u32, u64, u64)>> {
        let mut st = self.conn.prepare("SELECT id, parts, bytes, tickets FROM broadcasts ORDER BY created_at, id")?;
        let rows =
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64, r.get::<_, i64>(3)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Bytes of broadcast parts held for tickets to come, on every subscription.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn held_broadcast_bytes(&self) -> Result<u64> {
        Ok(self.conn.query_row("SELECT coalesce(sum(size), 0) FROM held_broadcast_parts", [], |r| r.get::<_, i64>(0))?
            as u64)
    }
}

impl Sub<'_> {
    /// Records a ticket accepted for an outstanding request.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_ticket(&self, t: &TicketRow) -> Result<()> {
        self.db.conn.execute(
            "INSERT OR REPLACE INTO tickets (reply_id, subscription, broadcast_id, nonce, key_id, control, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![t.reply_id, self.name, t.broadcast_id, t.nonce, t.key_id, t.control, now() as i64],
        )?;
        Ok(())
    }

    /// The newest ticket of this tree naming broadcast `id`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn ticket_for(&self, id: &ReplyId) -> Result<Option<TicketRow>> {
        Ok(self
            .db
            .conn
            .query_row(
                "SELECT reply_id, broadcast_id, nonce, key_id, control FROM tickets
                 WHERE subscription = ?1 AND broadcast_id = ?2 ORDER BY at DESC LIMIT 1",
                params![self.name, id],
                |r| {
                    Ok(TicketRow {
                        reply_id: r.get(0)?,
                        broadcast_id: r.get(1)?,
                        nonce: r.get(2)?,
                        key_id: r.get(3)?,
                        control: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// Forgets ticket `reply_id` (its reply was applied or given up).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn forget_ticket(&self, reply_id: &ReplyId) -> Result<()> {
        self.db.conn.execute("DELETE FROM tickets WHERE reply_id = ?1", [reply_id])?;
        Ok(())
    }

    /// Holds a broadcast part (its chunk is on disk) until a ticket names it.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn hold_broadcast_part(&self, h: &HeldPart) -> Result<()> {
        self.db.conn.execute(
            "INSERT OR REPLACE INTO held_broadcast_parts
             (broadcast_id, part, subscription, control, size, digest, sender, message_id, subject, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                h.broadcast_id,
                h.part,
                self.name,
                h.control,
                h.size as i64,
                h.digest.to_hex(),
                h.hints.from,
                h.hints.message_id,
                h.hints.subject,
                h.at as i64
            ],
        )?;
        Ok(())
    }

    /// The parts of broadcast `id` held on this tree, or (with `None`) every held part of it.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn held_broadcast_parts(&self, id: Option<&ReplyId>) -> Result<Vec<HeldPart>> {
        let mut st = self.db.conn.prepare(
            "SELECT broadcast_id, part, control, size, digest, sender, message_id, subject, at
             FROM held_broadcast_parts WHERE subscription = ?1 AND (?2 IS NULL OR broadcast_id = ?2)
             ORDER BY broadcast_id, part",
        )?;
        let rows = st.query_map(params![self.name, id], |r| {
            let digest: String = r.get(4)?;
            Ok(HeldPart {
                broadcast_id: r.get(0)?,
                part: r.get(1)?,
                control: r.get(2)?,
                size: r.get::<_, i64>(3)? as u64,
                digest: Digest::from_hex(&digest).unwrap_or(Digest([0; 32])),
                hints: Hints { from: r.get(5)?, message_id: r.get(6)?, subject: r.get(7)? },
                at: r.get::<_, i64>(8)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stops holding part `part` of broadcast `id`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn drop_held_part(&self, id: &ReplyId, part: u32) -> Result<()> {
        self.db
            .conn
            .execute("DELETE FROM held_broadcast_parts WHERE broadcast_id = ?1 AND part = ?2", params![id, part])?;
        Ok(())
    }
}
