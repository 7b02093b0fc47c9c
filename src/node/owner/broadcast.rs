//! The owner's side of the signed broadcast (`docs/protocol.md` §7.11).
//!
//! Before a run answers anything, [`Owner::survey`] looks at the requests waiting (verified, nothing
//! changed) and [`engine::owner::shared_broadcasts`] decides which updates enough of them share. The first
//! request of such a group that is answered packs the update once, encrypts it under the channel key when
//! the channel encrypts, cuts it into broadcast parts signed with the owner's Ed25519 key and queues them
//! once (to `broadcast-address`, or to the recipients as envelope recipients of one submission); every
//! request of the group, that first one included, is answered with a ticket in the transaction that
//! records its answer and adds its address to the broadcast's envelope recipients. A crash in between
//! leaves a broadcast queued for the tickets that were queued, and nothing else.

use std::collections::{BTreeSet, HashMap};

use anyhow::{Context as _, Result};
use tracing::info;

use super::{Owner, OwnerKeys, apply_effects};
use crate::crypto::SigningKey;
use crate::db::Answered;
use crate::engine::owner::{AnswerPlan, BroadcastKey, OwnerView as _};
use crate::engine::{self, Entropy, verify};
use crate::manifest::Digest;
use crate::node::pack::{Packed, Packer};
use crate::node::sealing::{self, BroadcastSealing};
use crate::node::{Handled, SystemEntropy};
use crate::protocol::broadcast::{BROADCAST_VERSION, Broadcast, BroadcastAuth, BroadcastKind, BroadcastRef};
use crate::protocol::envelope::{self, Outgoing};
use crate::protocol::{self, Auth, Control, Frame, Kind, Payload, ReplyId, VERSION};
use crate::transport::Transport;

/// What one run knows of its broadcasts: the updates enough requests share, and those made so far.
#[derive(Debug, Default)]
pub(crate) struct Broadcasting {
    shared: BTreeSet<BroadcastKey>,
    made: HashMap<BroadcastKey, Made>,
}

/// A broadcast made this run: what its tickets name.
#[derive(Debug, Clone)]
struct Made {
    id: ReplyId,
    payloads: Vec<Payload>,
    body: Frame,
    ops: usize,
    sealing: Option<BroadcastSealing>,
}

impl Owner {
    /// Looks at the requests waiting before any is answered (each verified; nothing is changed or
    /// filed) and keeps the updates at least `broadcast-min` of them share: those are answered by one
    /// broadcast with a ticket each. An owner that does not sign (`signing = "hmac"`) broadcasts nothing.
    ///
    /// # Errors
    /// Transport or state failures.
    pub(crate) async fn survey<T: Transport>(&mut self, transport: &mut T) -> Result<()> {
        self.broadcasting = Broadcasting::default();
        if self.signer.is_none() {
            return Ok(());
        }
        let messages = transport.fetch().await?;
        let now = crate::db::now();
        let view = self.view();
        let (accepts, sends) = ([Kind::Request], [Kind::Reply]);
        let policy = verify::Policy { accepts: &accepts, sends: &sends, pinned_owner: None, limits: &self.cfg.limits };
        let mut keys = Vec::new();
        for m in &messages {
            if self.state.db.seen(&Digest::of(&m.raw))?.is_some() {
                continue;
            }
            let Ok(verify::Opened::Verified(v)) = verify::open(&m.raw, &OwnerKeys(&view), &policy, now)? else {
                continue;
            };
            let Control::Request(req) = &v.control else { continue };
            let latest = view.latest_generation(&req.channel)?;
            keys.extend(engine::owner::broadcast_candidate(req, latest.as_ref(), true));
        }
        let shared = engine::owner::shared_broadcasts(keys, self.cfg.owner.broadcast_min);
        if !shared.is_empty() {
            tracing::debug!(updates = shared.len(), "requests waiting share updates: answering them by broadcast");
        }
        self.broadcasting.shared = shared;
        Ok(())
    }

    /// The broadcast `plan` joins, if any ([`engine::owner::joins_broadcast`]).
    pub(super) fn joins_broadcast(&self, plan: &AnswerPlan) -> Option<BroadcastKey> {
        let limit = self.policy().relay_limit;
        engine::owner::joins_broadcast(plan, &self.broadcasting.shared, self.signer.is_some(), limit)
    }

    /// Answers `plan` with a ticket to the broadcast of `key`, making the broadcast first if this is its
    /// first ticket; queues both with the record of the answer, in one transaction.
    pub(super) fn answer_ticket(
        &mut self,
        plan: AnswerPlan,
        key: BroadcastKey,
        digest: &Digest,
        now: u64,
    ) -> Result<Handled> {
        let signer = self.signer.clone().context("a broadcast needs the owner's signing key")?;
        let mut rng = SystemEntropy;
        let (made, first) = match self.broadcasting.made.get(&key) {
            Some(m) => (m.clone(), None),
            None => {
                let (m, parts) = self.make_broadcast(&plan, &key, &signer, &mut rng, now)?;
                (m, Some(parts))
            }
        };
        let mut head = engine::owner::reply_head(&plan, &mut rng, now, made.body);
        head.parts = made.payloads.len() as u32;
        head.payloads = made.payloads.clone();
        head.broadcast = Some(BroadcastRef { id: made.id.clone() });
        head.sealed_key =
            made.sealing.as_ref().map(|s| s.for_recipient(&head.recipient, &head.channel, &plan.key, &mut rng));
        let control = protocol::encode(&head);
        let auth =
            protocol::encode(&Auth::sign(&head.recipient, &plan.key, &control).signed_by(Some(&signer), &control));
        let (rec, req) = (&plan.recipient, &plan.request);
        let from = self.cfg.owner.address.clone();
        let list = self.cfg.owner.broadcast_address.clone();
        let token = rng.hex_id(16);
        let message_id = format!("{}@{}", rng.hex_id(16), from.rsplit_once('@').map_or("mailferry", |(_, d)| d));
        let boundary = format!("mf_{}", rng.hex_id(16));
        let env = envelope::Envelope {
            message_id: Some(&message_id),
            date: Some(now),
            token: Some(&token),
            boundary: Some(&boundary),
        };
        let raw = envelope::build_with(
            &Outgoing {
                from: &from,
                to: &rec.address,
                subject: format!(
                    "mailferry: generation {} for {} ({} changes, by broadcast)",
                    head.generation, head.recipient, made.ops
                ),
                text: format!(
                    "This is an automatic message from mailferry.\n\n\
                     It brings recipient {:?} to generation {} ({} changes); the changes travel once for every\n\
                     recipient on the same tree, as broadcast {}. There is nothing to do by hand.\n",
                    head.recipient, head.generation, made.ops, made.id
                ),
                kind: Kind::Reply,
                control: &control,
                auth: &auth,
                payloads: Vec::new(),
            },
            &env,
        )?;
        let nonce = req.nonce.to_hex();
        let id = made.id.clone();
        self.state.db.transaction(|db| {
            apply_effects(db, &plan.effects)?;
            match &first {
                Some(parts) => {
                    let bytes: usize = parts.iter().map(Vec::len).sum();
                    db.record_broadcast(
                        &id,
                        &key.channel,
                        key.generation,
                        &head.root,
                        &key.base,
                        parts.len() as u32,
                        bytes as u64,
                    )?;
                    // The first ticket's address starts the envelope recipients; a list address is all of them.
                    let to = list.as_deref().unwrap_or(&rec.address);
                    for (k, raw) in (1..).zip(parts) {
                        db.outbox_put(&format!("broadcast-{id}-{k:04}"), &from, to, raw)?;
                    }
                    db.join_broadcast(&id, None)?;
                }
                None => db.join_broadcast(&id, if list.is_some() { None } else { Some(&rec.address) })?,
            }
            db.outbox_put(&format!("reply-{nonce}-0001"), &from, &rec.address, &raw)?;
            let sent = crate::db::SentMessage {
                recipient: rec.name.clone(),
                reply_id: head.reply_id.clone(),
                part: 1,
                bytes: raw.len() as u64,
                token: Some(token.clone()),
            };
            db.record_sent_id(&message_id, &sent)?;
            db.record_answer(&Answered {
                recipient: &rec.name,
                channel: &req.channel,
                nonce: &nonce,
                seq: req.seq,
                created: req.created,
                reply_id: &head.reply_id,
                generation: head.generation,
                root: head.root,
                base: req.root,
                ops: made.ops,
                reply_bytes: raw.len(),
                parts: head.parts,
                full_content: req.full_content,
                stated_generation: req.generation,
            })?;
            db.mark_seen(digest, "processed")
        })?;
        crate::failpoint::hit("owner-queued");
        if first.is_some() {
            self.broadcasting.made.insert(key, made.clone());
        }
        info!(
            recipient = %rec.name, generation = head.generation, ops = made.ops, bytes = raw.len(), broadcast = %made.id,
            "answered request with a ticket to a broadcast"
        );
        Ok(Handled::Answered { recipient: rec.name.clone(), generation: head.generation, ops: made.ops })
    }

    /// Packs `plan`'s update once, encrypts it when the channel encrypts, and cuts it into signed
    /// broadcast parts. Nothing is queued or recorded here.
    fn make_broadcast(
        &self,
        plan: &AnswerPlan,
        key: &BroadcastKey,
        signer: &SigningKey,
        rng: &mut dyn Entropy,
        now: u64,
    ) -> Result<(Made, Vec<Vec<u8>>)> {
        let packer = Packer {
            store: &self.store,
            level: self.cfg.owner.compression_level,
            // Every ticket's recipient decodes line deltas, or none does: it is part of the key.
            lines: key.lines,
            bsdiff_max: crate::node::pack::bsdiff_max_input(),
            cache: self.cfg.state_dir.join("deltas"),
            tmp: self.cfg.state_dir.join("tmp"),
            bsdiff_budget: std::cell::Cell::new(crate::node::pack::bsdiff_allowance(
                &self.state.db,
                &plan.recipient.name,
                self.cfg.owner.bsdiff_request_budget,
                self.cfg.owner.bsdiff_daily_budget,
                now,
            )?),
            made: Default::default(),
        };
        let ops = plan.ops.len();
        let packed = packer.pack(plan.inventory.as_deref(), plan.ops.clone(), false)?;
        crate::node::pack::charge_bsdiff(&self.state.db, &plan.recipient.name, packed.stats.bsdiff_bytes, now)?;
        let body = packed.body_frame;
        let id = ReplyId::unchecked(rng.hex_id(16));
        let aad = protocol::broadcast::broadcast_pack_aad(
            &id,
            &key.channel,
            key.generation,
            &plan.generation.root,
            &key.base,
        );
        let (packed, sealing) = sealing::seal_broadcast_pack(&self.state.db, &key.channel, &aad, packed, rng)?;
        let head = Broadcast {
            mailferry: VERSION,
            kind: BroadcastKind::Broadcast,
            broadcast: BROADCAST_VERSION,
            channel: key.channel.clone(),
            broadcast_id: id.clone(),
            part: 1,
            parts: 1,
            created: now,
            generation: key.generation,
            root: plan.generation.root,
            base: key.base,
            payloads: Vec::new(),
        };
        let to = self.cfg.owner.broadcast_address.as_deref().unwrap_or(&self.cfg.owner.address);
        let parts = cut(&head, &packed, self.policy().relay_limit, signer, (&self.cfg.owner.address, to), rng)?;
        info!(
            broadcast = %id, generation = key.generation, ops, parts = parts.1.len(), bytes = packed.size,
            encrypted = sealing.is_some(), "made a broadcast"
        );
        Ok((Made { id, payloads: parts.0, body, ops, sealing }, parts.1))
    }
}

/// Cuts a broadcast's pack into parts that fit `limit`, each signed; returns the chunk list and the
/// messages.
fn cut(
    head: &Broadcast,
    packed: &Packed,
    limit: u64,
    signer: &SigningKey,
    (from, to): (&str, &str),
    rng: &mut dyn Entropy,
) -> Result<(Vec<Payload>, Vec<Vec<u8>>)> {
    let mut chunks = crate::node::pack::Chunks::cut(packed, limit, |parts, chunk| {
        let probe =
            Broadcast { part: parts, parts, payloads: crate::node::pack::probe_payloads(parts, chunk), ..head.clone() };
        protocol::encode(&probe).len()
    })?;
    let (parts, payloads) = (chunks.parts(), chunks.payloads.clone());
    let mut out = Vec::with_capacity(parts as usize);
    for k in 1..=parts {
        let bytes = chunks.read(k)?;
        let part = Broadcast { part: k, parts, payloads: payloads.clone(), ..head.clone() };
        let control = protocol::encode(&part);
        let auth = protocol::encode(&BroadcastAuth::sign(signer, &control));
        let message_id = format!("{}@{}", rng.hex_id(16), from.rsplit_once('@').map_or("mailferry", |(_, d)| d));
        let boundary = format!("mf_{}", rng.hex_id(16));
        let env = envelope::Envelope {
            message_id: Some(&message_id),
            date: Some(head.created),
            token: None,
            boundary: Some(&boundary),
        };
        let of = if parts > 1 { format!(", part {k} of {parts}") } else { String::new() };
        let raw = envelope::build_with(
            &Outgoing {
                from,
                to,
                subject: format!(
                    "mailferry: generation {} of channel {} (broadcast{of})",
                    head.generation, head.channel
                ),
                text: "This is an automatic message from mailferry: part of an update sent once to every recipient\n\
                       on the same tree. Each recipient's own ticket says whether it is for it; there is nothing to do\n\
                       by hand.\n"
                    .to_owned(),
                kind: Kind::Reply,
                control: &control,
                auth: &auth,
                payloads: vec![(&payloads[k as usize - 1].id, &bytes)],
            },
            &env,
        )?;
        anyhow::ensure!(
            raw.len() as u64 <= limit,
            "broadcast part {k} is {} bytes, over the {limit}-byte limit (a bug)",
            raw.len()
        );
        out.push(raw);
    }
    Ok((payloads, out))
}
