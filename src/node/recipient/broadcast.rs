//! The recipient's side of the signed broadcast (`docs/protocol.md` §7.11).
//!
//! A **ticket** (a reply with `broadcast`) passes every check a reply part does (MAC, owner signature,
//! outstanding nonce, seq, rollback, hold) and is recorded; its chunks are the parts of the broadcast it
//! names. A **broadcast part** is verified by the owner's Ed25519 signature under the pinned key; it is
//! kept as a chunk of a ticket's reply only if a ticket of this tree whose request is outstanding names it
//! and lists exactly its chunk (size and digest, authenticated by that ticket's MAC). A part no ticket
//! names yet is held, at most [`MAX_HELD_BYTES`] in all and for at most [`HOLD_SECS`]; when a ticket
//! comes it adopts them, and a part still held when the time is up is dropped and recorded as refused.
//! A broadcast part never changes a tree on its own.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use tracing::{info, warn};

use super::Recipient;
use crate::config::Subscription;
use crate::crypto::Key;
use crate::db::{HeldPart, TicketRow, now};
use crate::engine::recipient::{BroadcastStep, RecipientView as _, TicketState};
use crate::manifest::Digest;
use crate::node::Handled;
use crate::protocol::broadcast::{self, Broadcast};
use crate::protocol::envelope;
use crate::protocol::{FailureReason, Reason, Refusal, Reply, ReplyId};

/// Most bytes of broadcast parts held for tickets to come, all trees together.
pub const MAX_HELD_BYTES: u64 = 1 << 30;

/// How long a broadcast part is held for a ticket to come: a day.
pub const HOLD_SECS: u64 = 24 * 3600;

impl Recipient {
    /// A broadcast part (its auth part says so), verified and kept, held or refused; `None` when the
    /// message is no broadcast part.
    ///
    /// # Errors
    /// Local failures.
    pub(super) fn broadcast_part(&mut self, raw: &[u8], digest: &Digest) -> Result<Option<Result<Handled, Refusal>>> {
        if raw.len() as u64 > self.cfg.limits.max_message_bytes {
            return Ok(None);
        }
        let Ok(parsed) = envelope::parse(raw, self.cfg.limits.max_message_bytes) else { return Ok(None) };
        if !broadcast::is_broadcast_auth(&parsed.auth) {
            return Ok(None);
        }
        Ok(Some(self.on_broadcast_part(&parsed, digest)?))
    }

    fn on_broadcast_part(&mut self, parsed: &envelope::Parsed, digest: &Digest) -> Result<Result<Handled, Refusal>> {
        let part = refuse!(broadcast::open_broadcast(
            self.owner_key.as_ref(),
            &parsed.auth,
            &parsed.control,
            &self.cfg.limits
        ));
        let own = part.own_payload().expect("open_broadcast checked the part number").clone();
        let chunk = match parsed.attachments.get(&own.id) {
            Some(c) if parsed.attachments.len() == 1 && c.len() as u64 == own.size && Digest::of(c) == own.blake3 => c,
            _ => {
                return Ok(Err(Refusal::new(
                    Reason::BadPayload,
                    format!("broadcast {} part {} does not carry exactly its chunk", part.broadcast_id, part.part),
                )));
            }
        };
        let Some(tree) = self.cfg.subscription(&part.channel).cloned() else {
            return Ok(Err(Refusal::new(
                Reason::Unexpected,
                format!("broadcast for channel {:?}, which this recipient does not subscribe to", part.channel),
            )));
        };
        let sdb = self.state.db.sub(&tree.channel)?;
        let row = sdb.ticket_for(&part.broadcast_id)?;
        let ticket = match &row {
            Some(r) => Some(serde_json::from_slice::<Reply>(&r.control).context("a kept ticket is corrupt")?),
            None => None,
        };
        let state = match (&row, &ticket) {
            (Some(r), Some(t)) => Some(TicketState { ticket: t, outstanding: sdb.outstanding(&r.nonce)?.is_some() }),
            _ => None,
        };
        let held = self.state.db.held_broadcast_bytes()?;
        match crate::engine::recipient::on_broadcast_part(&part, state, held, MAX_HELD_BYTES) {
            BroadcastStep::Refused(r) => Ok(Err(r)),
            BroadcastStep::Hold => {
                let dir = self.held_dir(&tree, &part.broadcast_id);
                std::fs::create_dir_all(&dir).with_context(|| format!("failed to create `{}`", dir.display()))?;
                super::write_durably(&dir.join(format!("{}.chunk", part.part)), chunk)?;
                self.state.db.transaction(|db| {
                    db.sub(&tree.channel)?.hold_broadcast_part(&HeldPart {
                        broadcast_id: part.broadcast_id.clone(),
                        part: part.part,
                        control: parsed.control.clone(),
                        size: own.size,
                        digest: *digest,
                        hints: parsed.hints.clone(),
                        at: now(),
                    })?;
                    db.mark_seen(digest, "processed")
                })?;
                let have = sdb.held_broadcast_parts(Some(&part.broadcast_id))?.len() as u32;
                info!(broadcast = %part.broadcast_id, part = part.part, have, of = part.parts, "holding a broadcast part until its ticket comes");
                Ok(Ok(Handled::PartKept { reply_id: part.broadcast_id.clone(), have, of: part.parts }))
            }
            BroadcastStep::Adopt => {
                let (row, ticket) = (row.expect("adopted with a ticket"), ticket.expect("adopted with a ticket"));
                let under = refuse!(self.ticket_key(&tree, &row)?);
                let chunks = BTreeMap::from([(own.id.clone(), chunk.clone())]);
                let reply = Reply { part: part.part, ..ticket };
                self.take_chunk(&tree, &reply, &chunks, &row.nonce, &under, digest)
            }
        }
    }

    /// A ticket that passed every check of a reply part: recorded, and the parts of its broadcast held so
    /// far adopted; when they make the reply whole it is applied.
    ///
    /// # Errors
    /// Local failures.
    pub(super) fn accept_ticket(
        &mut self,
        tree: &Subscription,
        ticket: &Reply,
        attachments: &BTreeMap<String, Vec<u8>>,
        under: &Key,
        digest: &Digest,
    ) -> Result<Result<Handled, Refusal>> {
        let Some(b) = &ticket.broadcast else { anyhow::bail!("not a ticket") };
        if let Some(name) = attachments.keys().next() {
            return Ok(Err(Refusal::new(
                Reason::BadPayload,
                format!("a ticket carries no attachment, this one {name:?}"),
            )));
        }
        let nonce = ticket.nonce.to_hex();
        let row = TicketRow {
            reply_id: ticket.reply_id.clone(),
            broadcast_id: b.id.clone(),
            nonce: nonce.clone(),
            key_id: under.id().as_str().to_owned(),
            control: crate::protocol::encode(ticket),
        };
        self.state.db.transaction(|db| {
            let sdb = db.sub(&tree.channel)?;
            sdb.record_ticket(&row)?;
            // Until a part is here, a lost broadcast is asked for whole (`resend`) after `reply-timeout`.
            sdb.want_reply(&ticket.reply_id, &nonce, ticket.parts)
        })?;
        info!(reply = %ticket.reply_id, broadcast = %b.id, parts = ticket.parts, "accepted a ticket");
        let mut outcome = None;
        let state = self.state.clone();
        for h in state.db.sub(&tree.channel)?.held_broadcast_parts(Some(&b.id))? {
            let path = self.held_dir(tree, &b.id).join(format!("{}.chunk", h.part));
            let held: Option<Broadcast> = serde_json::from_slice(&h.control).ok();
            let chunk = std::fs::read(&path).ok();
            state.db.sub(&tree.channel)?.drop_held_part(&b.id, h.part)?;
            let _ = std::fs::remove_file(&path);
            let (Some(part), Some(chunk)) = (held, chunk) else { continue };
            if let Err(r) = broadcast::matches_ticket(ticket, &part) {
                warn!("dropped a held broadcast part: {r}");
                continue;
            }
            let Some(own) = ticket.payloads.get(part.part as usize - 1) else { continue };
            if chunk.len() as u64 != own.size || Digest::of(&chunk) != own.blake3 {
                warn!(broadcast = %b.id, part = part.part, "a held broadcast part is damaged on disk; dropped");
                continue;
            }
            let chunks = BTreeMap::from([(own.id.clone(), chunk)]);
            let reply = Reply { part: part.part, ..ticket.clone() };
            match self.take_chunk(tree, &reply, &chunks, &nonce, under, digest)? {
                Ok(Handled::PartKept { .. }) => {}
                other => {
                    outcome = Some(other);
                    break;
                }
            }
        }
        let _ = std::fs::remove_dir_all(self.held_dir(tree, &b.id));
        if let Some(o) = outcome {
            return Ok(o);
        }
        self.state.db.mark_seen(digest, "processed")?;
        let have = self.state.db.sub(&tree.channel)?.received_parts(&ticket.reply_id)?.len() as u32;
        Ok(Ok(Handled::PartKept { reply_id: ticket.reply_id.clone(), have, of: ticket.parts }))
    }

    /// Keeps one chunk of a ticket's reply; when the reply is whole, applies it as any reply.
    fn take_chunk(
        &mut self,
        tree: &Subscription,
        reply: &Reply,
        chunks: &BTreeMap<String, Vec<u8>>,
        nonce: &str,
        under: &Key,
        digest: &Digest,
    ) -> Result<Result<Handled, Refusal>> {
        let Some(update) = refuse!(self.keep_part(tree, reply, chunks, nonce, under)?) else {
            let have = self.state.db.sub(&tree.channel)?.received_parts(&reply.reply_id)?.len() as u32;
            self.state.db.mark_seen(digest, "processed")?;
            info!(reply = %reply.reply_id, part = reply.part, have, of = reply.parts, "kept a broadcast part for its ticket");
            return Ok(Ok(Handled::PartKept { reply_id: reply.reply_id.clone(), have, of: reply.parts }));
        };
        let res = self.answer_reply(tree, &update, under, digest, nonce, now());
        match &res {
            Ok(Err(r)) => {
                self.give_up(tree, nonce, &update.head.reply_id)?;
                let reason = FailureReason::of_refusal(r.reason);
                self.fail(tree, nonce, &update.head.reply_id, update.head.base, reason, &r.to_string())?;
            }
            Ok(Ok(_)) => self.forget_parts(tree, &update.head.reply_id)?,
            Err(_) => {}
        }
        res
    }

    /// The key a kept ticket verified under: the current key, or the previous one within its grace.
    fn ticket_key(&self, tree: &Subscription, row: &TicketRow) -> Result<Result<Key, Refusal>> {
        if self.key.id().as_str() == row.key_id {
            return Ok(Ok(self.key.clone()));
        }
        match self.view(tree).previous_key(now())? {
            Some(k) if k.id().as_str() == row.key_id => Ok(Ok(k)),
            _ => Ok(Err(Refusal::new(
                Reason::BadMac,
                format!("the key that verified ticket {} is no longer this recipient's", row.reply_id),
            ))),
        }
    }

    fn held_dir(&self, tree: &Subscription, id: &ReplyId) -> std::path::PathBuf {
        // Broadcast ids are 32 hex digits (checked when the control part was decoded): a plain file name.
        tree.dir.join("broadcasts").join(id.as_str())
    }

    /// Drops broadcast parts held past [`HOLD_SECS`] without a ticket naming them, each recorded as a
    /// refusal (`unexpected`): they changed nothing, and now never will.
    ///
    /// # Errors
    /// State failures.
    pub(crate) fn expire_held_broadcasts(&mut self) -> Result<usize> {
        let mut dropped = 0;
        let cutoff = now().saturating_sub(HOLD_SECS);
        for tree in self.cfg.subscriptions.clone() {
            let sdb = self.state.db.sub(&tree.channel)?;
            for h in sdb.held_broadcast_parts(None)? {
                if h.at > cutoff {
                    continue;
                }
                let refusal = Refusal::new(
                    Reason::Unexpected,
                    format!(
                        "broadcast {} part {}: no ticket named it within {} hours; dropped, nothing changed",
                        h.broadcast_id,
                        h.part,
                        HOLD_SECS / 3600
                    ),
                );
                self.state.db.transaction(|db| {
                    db.record_rejection(&refusal, &h.hints, &h.digest)?;
                    db.sub(&tree.channel)?.drop_held_part(&h.broadcast_id, h.part)
                })?;
                let dir = self.held_dir(&tree, &h.broadcast_id);
                let _ = std::fs::remove_file(dir.join(format!("{}.chunk", h.part)));
                let _ = std::fs::remove_dir(&dir);
                warn!(reason = refusal.reason.code(), "refused message: {}", refusal.detail);
                dropped += 1;
            }
        }
        Ok(dropped)
    }
}
