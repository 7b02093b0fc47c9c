//! The recipient's decisions: what a verified reply makes the recipient do.
//!
//! Two steps, because the shell does I/O between them. [`on_part`] judges one verified reply part against
//! the outstanding requests, the applied generation and a rollback hold (`docs/protocol.md` §11.3 steps
//! 8–11); the shell then checks and keeps the part, and once the reply is whole scans the tree and calls
//! [`on_whole`] (steps 12a–19), which plans the apply. Every accepting outcome carries its [`Effect`]s,
//! applied in the transaction that records the outcome: a new key a reply brings is taken up only with
//! the reply itself, never by a reply that is then refused.

use anyhow::Result;

use super::verify::{KeyRole, Keyed, Keyring};
use crate::apply::{self, OnExtra, Plan};
use crate::crypto::{Key, KeyId, Nonce};
use crate::manifest::{Digest, Manifest};
use crate::protocol::{Reason, Refusal, Reply, ReplyId, Standing, Update};
use crate::scan::Scan;

/// The recipient's state, read-only, as the engine sees it.
pub trait RecipientView {
    /// The recipient's registered name.
    fn name(&self) -> &str;
    /// The channel of the tree this view is about.
    fn channel(&self) -> &str;
    /// The key in force.
    fn key(&self) -> &Key;
    /// The key a rotation replaced, while its grace lasts at `now`.
    ///
    /// # Errors
    /// Local failures.
    fn previous_key(&self, now: u64) -> Result<Option<Key>>;
    /// The seq of the request with this nonce, if it is outstanding.
    ///
    /// # Errors
    /// Local failures.
    fn outstanding(&self, nonce: &Nonce) -> Result<Option<u64>>;
    /// Whether reply `reply_id` was applied before.
    ///
    /// # Errors
    /// Local failures.
    fn reply_applied(&self, reply_id: &ReplyId) -> Result<bool>;
    /// The applied generation (0 for none), its root, and the id of the key whose reply applied it
    /// (`None` when not known: applied before key ids were recorded, or by a rollback).
    ///
    /// # Errors
    /// Local failures.
    fn applied(&self) -> Result<Applied>;
    /// The generation a local rollback holds back, if any.
    ///
    /// # Errors
    /// Local failures.
    fn rollback_hold(&self) -> Result<Option<u64>>;
    /// Whether some part of reply `reply_id` is kept here.
    ///
    /// # Errors
    /// Local failures.
    fn has_parts(&self, reply_id: &ReplyId) -> Result<bool>;
    /// The last request sequence number this recipient used.
    ///
    /// # Errors
    /// Local failures.
    fn last_seq(&self) -> Result<u64>;
}

/// What the recipient last applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The generation, 0 for none.
    pub generation: u64,
    /// Its root.
    pub root: Option<Digest>,
    /// The id of the key that authenticated the reply that brought it.
    pub key_id: Option<KeyId>,
}

/// The recipient's keyring: its own key, and the one a rotation replaced while its grace lasts.
pub struct RecipientKeys<'a>(pub &'a dyn RecipientView);

impl Keyring for RecipientKeys<'_> {
    fn lookup(&self, recipient: &str, key_id: &KeyId, now: u64) -> Result<Result<Keyed, Refusal>> {
        let me = self.0.name();
        if recipient != me {
            return Ok(Err(Refusal::new(
                Reason::WrongRecipient,
                format!("message is for recipient {recipient:?}, this is {me:?}"),
            )));
        }
        let key = self.0.key();
        if *key_id == key.id() {
            return Ok(Ok(Keyed { key: key.clone(), role: KeyRole::Current }));
        }
        if let Some(previous) = self.0.previous_key(now)?.filter(|k| k.id() == *key_id) {
            return Ok(Ok(Keyed { key: previous, role: KeyRole::Retired }));
        }
        Ok(Err(Refusal::new(
            Reason::BadMac,
            format!("message is authenticated with key {key_id}, this recipient's key is {}", key.id()),
        )))
    }
}

/// A change to the recipient's state, applied with the outcome that accepts the reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Take up the key a rotation delivered: the current key becomes the previous one, valid until
    /// `previous_until`, and the key file is replaced.
    TakeKey {
        /// The new key.
        new: Key,
        /// Until when replies under the current key are still accepted.
        previous_until: u64,
    },
    /// The owner asked for the full tree: the next request lists it.
    NeedFullInventory,
}

/// What to do with one verified reply part.
#[derive(Debug, PartialEq, Eq)]
pub enum PartStep {
    /// Refuse it. With `give_up`, the reply is authentic and answers an outstanding request but cannot be
    /// applied: the request is closed and the reply's kept parts are dropped, so the next run asks again.
    Refused {
        /// Why.
        refusal: Refusal,
        /// Close the request.
        give_up: bool,
    },
    /// A local rollback holds its generation back: close the request, drop the parts, change nothing else.
    Held {
        /// The generation it brings.
        generation: u64,
        /// The newest generation held back.
        held: u64,
    },
    /// The owner answers without an update (not entitled, expired, suspended, pinned): close the request,
    /// record what it said, change nothing else.
    Standing(Standing),
    /// Check the part's chunk and keep it; when the reply is whole, call [`on_whole`].
    Keep {
        /// The seq of the request it answers.
        seq: u64,
    },
}

/// §11.3 steps 8–11 for one verified reply part made under a key in `role`.
///
/// # Errors
/// Local failures of the view.
pub fn on_part(view: &dyn RecipientView, reply: &Reply, role: KeyRole) -> Result<PartStep> {
    let me = view.name();
    let refuse = |reason, detail: String, give_up| PartStep::Refused { refusal: Refusal::new(reason, detail), give_up };
    if reply.recipient != me {
        return Ok(refuse(
            Reason::WrongRecipient,
            format!("reply is for {:?}, this is {me:?}", reply.recipient),
            false,
        ));
    }
    if reply.channel != view.channel() {
        return Ok(refuse(
            Reason::Malformed,
            format!("reply is for channel {:?}, this tree keeps {:?}", reply.channel, view.channel()),
            false,
        ));
    }
    let nonce = reply.nonce;
    let Some(seq) = view.outstanding(&nonce)? else {
        let why = if view.reply_applied(&reply.reply_id)? {
            format!("reply {} was applied before (replayed)", reply.reply_id)
        } else if reply.request_seq > view.last_seq()? {
            // Authentic, so made by the owner for a request under this recipient's key, with a sequence
            // number this recipient never used: another machine holds the same enrollment.
            format!(
                "reply answers request {}, which this recipient never sent (its last is {}): another machine uses \
                 this recipient's enrollment; each machine needs its own (`mailferry owner add-recipient`)",
                reply.request_seq,
                view.last_seq()?
            )
        } else {
            format!("reply answers nonce {nonce}, which is not outstanding (replayed, or answered already)")
        };
        return Ok(refuse(Reason::Replay, why, false));
    };
    // An authentic reply that must not be applied answers its request all the same: the next run asks
    // again at once instead of waiting for `reply-timeout`.
    if reply.request_seq != seq {
        return Ok(refuse(
            Reason::Malformed,
            format!("reply names request {}, but nonce {nonce} belongs to request {seq}", reply.request_seq),
            true,
        ));
    }
    // An answer without an update states the request's own generation back: nothing to compare.
    if let Some(standing) = &reply.standing {
        return Ok(PartStep::Standing(standing.clone()));
    }
    if let Err(r) = check_generation(&view.applied()?, reply, view.key(), role) {
        return Ok(PartStep::Refused { refusal: r, give_up: true });
    }
    if let Some(held) = view.rollback_hold()?
        && reply.generation <= held
    {
        return Ok(PartStep::Held { generation: reply.generation, held });
    }
    Ok(PartStep::Keep { seq })
}

/// Step 10: a reply must not take the tree back: an older generation, or the applied generation with
/// another root, is refused.
///
/// One exception gives the owner a way back after a key was stolen: a generation applied under a key the
/// recipient no longer holds (a rotation or a new enrollment replaced it) does not bind replies made under
/// the key it holds now. Whoever held the old key could have sent any generation number; the holder of
/// the current key is the owner.
fn check_generation(applied: &Applied, reply: &Reply, key: &Key, role: KeyRole) -> Result<(), Refusal> {
    if role == KeyRole::Current
        && let Some(old) = &applied.key_id
        && *old != key.id()
    {
        if reply.generation < applied.generation {
            tracing::warn!(
                applied = applied.generation, generation = reply.generation, old_key = %old, key = %key.id(),
                "generation {} was applied under a key this recipient no longer holds; the owner's generation {} \
                 under the current key replaces it",
                applied.generation, reply.generation
            );
        }
        return Ok(());
    }
    if reply.generation < applied.generation {
        return Err(Refusal::new(
            Reason::Rollback,
            format!("reply brings generation {}, older than the applied {}", reply.generation, applied.generation),
        ));
    }
    if reply.generation == applied.generation
        && let Some(root) = applied.root
        && root != reply.root
    {
        return Err(Refusal::new(
            Reason::Rollback,
            format!(
                "reply brings generation {} with root {}, but generation {} has root {}",
                applied.generation,
                reply.root.short(),
                applied.generation,
                root.short()
            ),
        ));
    }
    Ok(())
}

/// What a reference reply leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Referred {
    /// Some of the reply referred to is here: its other parts come, or are asked for as usual.
    Wait,
    /// None of it is here but its request is outstanding: the next request asks for all its parts.
    AskParts,
    /// Its request is no longer outstanding, so it could not be accepted: the next request asks `fresh`.
    AskFresh,
}

/// What to do with a whole, verified reply.
#[derive(Debug)]
pub enum WholeStep {
    /// Refuse it and close its request (it is authentic, only not applicable).
    Refused(Refusal),
    /// The tree already is what the reply brings: close the request, apply the effects.
    Current {
        /// The generation in the tree.
        generation: u64,
        /// Effects to apply.
        effects: Vec<Effect>,
    },
    /// A reference reply: close the request, apply the effects, and act on the reply referred to.
    Referred {
        /// The reply referred to.
        same: crate::protocol::SameAs,
        /// What to do about it.
        step: Referred,
        /// Effects to apply.
        effects: Vec<Effect>,
    },
    /// Stage the plan, commit the journal, apply, and record it with the effects.
    Apply {
        /// The plan.
        plan: Plan,
        /// Effects to apply with the record of the apply.
        effects: Vec<Effect>,
        /// The tree as scanned (where local copies come from).
        scan: Scan,
    },
}

/// Steps 12a–19 for a whole reply made under `under`. `scan` reads the data tree (step 13), and is called
/// only when the reply needs it.
///
/// # Errors
/// Local failures of the view or of the scan.
pub fn on_whole(
    view: &dyn RecipientView,
    update: &Update,
    under: &Key,
    scan: &mut dyn FnMut() -> Result<Scan>,
    previous: &Manifest,
    on_extra: OnExtra,
    now: u64,
) -> Result<WholeStep> {
    let reply = &update.head;
    let mut effects = Vec::new();
    // 12a: a new key it brings opens under the key that authenticated it.
    if let Some(rekey) = &reply.rekey
        && rekey.key_id != view.key().id()
    {
        let Some(new) = under.open_key(view.name(), &rekey.key_id, &rekey.sealed) else {
            return Ok(WholeStep::Refused(Refusal::new(
                Reason::Malformed,
                format!("the new key {} in the reply does not open under key {}", rekey.key_id, under.id()),
            )));
        };
        effects.push(Effect::TakeKey { new, previous_until: now.saturating_add(rekey.grace) });
    }
    if let Some(same) = &reply.same_as {
        let step = if view.has_parts(&same.reply_id)? {
            Referred::Wait
        } else if view.outstanding(&same.nonce)?.is_some() {
            Referred::AskParts
        } else {
            Referred::AskFresh
        };
        return Ok(WholeStep::Referred { same: same.clone(), step, effects });
    }
    let applied = view.applied()?.generation;
    if reply.need_full_inventory {
        effects.push(Effect::NeedFullInventory);
        return Ok(WholeStep::Current { generation: applied, effects });
    }
    let scan = scan()?;
    // 14: the "current" shortcut.
    if reply.generation == applied
        && update.body.ops.is_empty()
        && scan.manifest.root() == reply.root
        && scan.foreign.is_empty()
    {
        return Ok(WholeStep::Current { generation: applied, effects });
    }
    // 15–19.
    let plan = match apply::plan(&scan, previous, update, on_extra) {
        Ok(p) => p,
        Err(r) => return Ok(WholeStep::Refused(r)),
    };
    if plan.steps.is_empty() && reply.generation == applied {
        // Only kept extras differ from the generation: nothing to do.
        return Ok(WholeStep::Current { generation: applied, effects });
    }
    Ok(WholeStep::Apply { plan, effects, scan })
}

/// What to do with one broadcast part whose owner signature verified (`docs/protocol.md` §7.11).
#[derive(Debug, PartialEq, Eq)]
pub enum BroadcastStep {
    /// Refuse it: it changes nothing.
    Refused(Refusal),
    /// No ticket names it yet: hold its chunk (bounded) until one does, or drop it when the bound passes.
    Hold,
    /// The ticket of an outstanding request names it, and it carries exactly the chunk the ticket lists:
    /// keep it as that reply's part.
    Adopt,
}

/// A ticket naming a broadcast, as the recipient keeps it.
#[derive(Debug, Clone, Copy)]
pub struct TicketState<'a> {
    /// The ticket's control part (a reply with `broadcast`), authenticated by its MAC.
    pub ticket: &'a Reply,
    /// Whether the request it answers is still outstanding.
    pub outstanding: bool,
}

/// Decides what a verified broadcast part `part` does: with a ticket of this tree naming its broadcast,
/// whose request is outstanding, it must agree with the ticket in everything (id, channel, generation,
/// root, base, chunks) to be kept as its part; without one it is held if `held` bytes plus its chunk stay
/// within `max_held`. A broadcast part is never applied on its own: what it carries counts only through
/// the chunk digests a ticket's MAC vouches for.
pub fn on_broadcast_part(
    part: &crate::protocol::broadcast::Broadcast,
    ticket: Option<TicketState<'_>>,
    held: u64,
    max_held: u64,
) -> BroadcastStep {
    match ticket {
        Some(t) if !t.outstanding => BroadcastStep::Refused(Refusal::new(
            Reason::Replay,
            format!(
                "broadcast {} part {}: the request its ticket (reply {}) answered is no longer outstanding",
                part.broadcast_id, part.part, t.ticket.reply_id
            ),
        )),
        Some(t) => match crate::protocol::broadcast::matches_ticket(t.ticket, part) {
            Ok(()) => BroadcastStep::Adopt,
            Err(r) => BroadcastStep::Refused(r),
        },
        None => {
            let size = part.own_payload().map_or(0, |p| p.size);
            if held.saturating_add(size) > max_held {
                BroadcastStep::Refused(Refusal::new(
                    Reason::Limit,
                    format!(
                        "broadcast {} part {}: no ticket names it, and holding it would pass the {max_held} bytes \
                         held for tickets to come",
                        part.broadcast_id, part.part
                    ),
                ))
            } else {
                BroadcastStep::Hold
            }
        }
    }
}
