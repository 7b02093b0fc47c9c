//! The owner's decisions: what a verified request, receipt or delivery report makes the owner do.
//!
//! Input is a [`Verified`] message (or a parsed delivery report), a read-only [`OwnerView`] of the state
//! and the time; output is an [`Outcome`]: a refusal, or a plan with the [`Effect`]s the shell applies in
//! the one transaction that also queues the mail. A refusal carries no effect at all, so a refused message
//! changes nothing (a key rotation does not complete, a relay limit does not shrink).
//!
//! Packing (reading the content store, computing deltas) is the shell's: the engine says which tree to
//! diff against which generation, and [`reply_head`] says what the reply looks like.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::Result;

use super::Entropy;
use super::verify::{KeyRole, Keyed, Keyring, Verified};
use crate::crypto::{Key, KeyId, Nonce};
use crate::manifest::{Digest, Manifest, Op, diff};
use crate::protocol::{
    self, Control, Frame, InventoryKind, Kind, Reason, Receipt, ReceiptStatus, Refusal, Rekey, Reply, ReplyId, Request,
    Resend, SameAs, Standing, VERSION,
};

/// A registered recipient as the engine needs it.
#[derive(Clone, Debug)]
pub struct Registered {
    /// Its name.
    pub name: String,
    /// The only address replies go to.
    pub address: String,
    /// Its key.
    pub key: Key,
}

/// A key rotation under way.
#[derive(Clone, Debug)]
pub struct Rotation {
    /// The new key.
    pub key: Key,
    /// Seconds the old key stays valid once the new one is used.
    pub grace: u64,
}

/// A published generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Generation {
    /// Its number.
    pub number: u64,
    /// Its root.
    pub root: Digest,
}

/// What the owner sent for one request, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentReply {
    /// The reply's id.
    pub reply_id: ReplyId,
    /// The generation it brought.
    pub generation: u64,
    /// That generation's root (`None` for replies recorded before roots were kept).
    pub root: Option<Digest>,
    /// The channel it was for.
    pub channel: String,
}

/// What decides whether a recipient may be sent a channel: the record [`entitlement`] reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// The channel, if it exists.
    pub channel: Option<ChannelAccess>,
    /// The owner suspended this recipient.
    pub suspended: bool,
    /// The grants of the channel that reach the recipient through its groups.
    pub grants: Vec<GrantAccess>,
    /// The recipient's registration facts, for grants with a selector.
    pub facts: Option<crate::registration::Facts>,
    /// The tags the owner set on the recipient.
    pub tags: std::collections::BTreeSet<String>,
}

/// A channel as entitlement sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelAccess {
    /// Every registered recipient may be sent it, grant or not.
    pub open: bool,
}

/// One grant as entitlement sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrantAccess {
    /// The last valid day (`YYYY-MM-DD`, UTC), if it expires.
    pub until: Option<String>,
    /// The generation it pins, if any.
    pub pin: Option<u64>,
    /// The selector its recipients must match, if any.
    pub selector: Option<String>,
}

/// Whether a recipient is sent a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entitlement {
    /// It is, up to generation `pin` if pinned.
    Granted {
        /// The generation it stays at.
        pin: Option<u64>,
    },
    /// It is not: the answer says why.
    Denied(Standing),
}

/// Decides what a recipient is entitled to of a channel at `now`. A suspended recipient gets nothing; a
/// channel that does not exist reads as one without a grant; grants whose selector the recipient's facts
/// do not match do not count. Among the grants in force the most generous wins (unpinned over pinned,
/// a later pin over an earlier); an open channel needs no grant. With grants that all ended, the answer
/// names the last day any of them was valid.
pub fn entitlement(a: &Access, now: u64) -> Entitlement {
    if a.suspended {
        return Entitlement::Denied(Standing::Suspended);
    }
    let Some(channel) = a.channel else { return Entitlement::Denied(Standing::NotEntitled) };
    let selected: Vec<&GrantAccess> = a
        .grants
        .iter()
        .filter(|g| g.selector.as_deref().is_none_or(|s| selector_matches(s, a.facts.as_ref(), &a.tags)))
        .collect();
    // A grant is valid through the whole of its last day, in UTC.
    let ends = |g: &GrantAccess| g.until.as_deref().map(|u| protocol::parse_date(u).map_or(0, |d| d + 86_400));
    let active: Vec<&&GrantAccess> = selected.iter().filter(|g| ends(g).is_none_or(|end| now < end)).collect();
    if !active.is_empty() {
        let pin = if active.iter().any(|g| g.pin.is_none()) { None } else { active.iter().filter_map(|g| g.pin).max() };
        return Entitlement::Granted { pin };
    }
    if channel.open {
        return Entitlement::Granted { pin: None };
    }
    match selected.iter().filter_map(|g| g.until.clone()).max() {
        Some(on) => Entitlement::Denied(Standing::Expired { on }),
        None => Entitlement::Denied(Standing::NotEntitled),
    }
}

/// Whether a grant's selector admits a recipient with these facts and tags. A selector that does not
/// parse admits nobody (the owner's commands refuse to store one).
fn selector_matches(
    selector: &str,
    facts: Option<&crate::registration::Facts>,
    tags: &std::collections::BTreeSet<String>,
) -> bool {
    crate::registration::selector::Selector::parse(selector).is_ok_and(|s| s.matches(facts, tags))
}

/// A reply part as sent, remembered by its `Message-ID` so that a delivery report about it can be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage {
    /// To whom.
    pub recipient: String,
    /// Which reply.
    pub reply_id: ReplyId,
    /// Which part.
    pub part: u32,
    /// Its size.
    pub bytes: u64,
    /// Its delivery token (`None` for parts sent before tokens were).
    pub token: Option<String>,
}

/// A part size learned for a recipient from a relay's refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnedLimit {
    /// Parts are cut to at most this many bytes.
    pub limit: u64,
    /// When it was learned (it is forgotten after a while).
    pub learned_at: u64,
    /// The smallest part size refused, which growing back never reaches.
    pub refused: Option<u64>,
    /// The reply whose refusal taught it (one reply shrinks the limit once).
    pub reply_id: Option<ReplyId>,
}

/// What a recipient was sent over a recent period, for its budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spent {
    /// Replies (answers and resends).
    pub replies: u64,
    /// Their bytes, as queued.
    pub bytes: u64,
}

/// Per-recipient reply budgets: what one recipient (or whoever holds its key) can make the owner send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Budget {
    /// Most replies per period.
    pub replies: u64,
    /// Most bytes per period.
    pub bytes: u64,
    /// The period, in seconds.
    pub period: u64,
}

/// The owner's state, read-only, as the engine sees it.
pub trait OwnerView {
    /// A registered recipient.
    ///
    /// # Errors
    /// Local failures.
    fn recipient(&self, name: &str) -> Result<Option<Registered>>;
    /// The rotation under way for `name`.
    ///
    /// # Errors
    /// Local failures.
    fn rotation(&self, name: &str) -> Result<Option<Rotation>>;
    /// A retired key of `name` with id `key_id` still within its grace at `now`.
    ///
    /// # Errors
    /// Local failures.
    fn retired_key(&self, name: &str, key_id: &KeyId, now: u64) -> Result<Option<Key>>;
    /// Whether a request with this nonce was answered before (for any recipient).
    ///
    /// # Errors
    /// Local failures.
    fn request_answered(&self, nonce: &Nonce) -> Result<bool>;
    /// The newest generation of `channel`.
    ///
    /// # Errors
    /// Local failures.
    fn latest_generation(&self, channel: &str) -> Result<Option<Generation>>;
    /// Generation `number` of `channel`, if it is kept.
    ///
    /// # Errors
    /// Local failures.
    fn generation(&self, channel: &str, number: u64) -> Result<Option<Generation>>;
    /// The tree of generation `generation` of `channel`: a kept generation, or an old one whose file list
    /// is still kept (beyond `keep-generations`, within `keep-history`); `None` when it was forgotten or
    /// never existed. Only a kept generation can be a reply's target ([`OwnerView::generation`]); an old
    /// one is what a changes-only request is rebuilt from (R3/R4).
    ///
    /// # Errors
    /// Local failures.
    fn manifest(&self, channel: &str, generation: u64) -> Result<Option<Arc<Manifest>>>;
    /// What decides whether `recipient` may be sent `channel`.
    ///
    /// # Errors
    /// Local failures.
    fn access(&self, recipient: &str, channel: &str) -> Result<Access>;
    /// The highest request seq answered for `recipient` on `channel` (0 for none).
    ///
    /// # Errors
    /// Local failures.
    fn last_seq(&self, recipient: &str, channel: &str) -> Result<u64>;
    /// What was sent for `recipient`'s request `nonce`.
    ///
    /// # Errors
    /// Local failures.
    fn answered_for(&self, recipient: &str, nonce: &Nonce) -> Result<Option<SentReply>>;
    /// Whether a receipt for reply `reply_id` was recorded.
    ///
    /// # Errors
    /// Local failures.
    fn receipt_recorded(&self, recipient: &str, reply_id: &ReplyId) -> Result<bool>;
    /// Whether a negative (`failed`) or `rolled-back` receipt with `status` for reply `reply_id` was
    /// recorded.
    ///
    /// # Errors
    /// Local failures.
    fn outcome_recorded(&self, recipient: &str, reply_id: &ReplyId, status: ReceiptStatus) -> Result<bool>;
    /// The generation reply `reply_id` to `recipient` brought, if the owner sent it.
    ///
    /// # Errors
    /// Local failures.
    fn reply_generation(&self, recipient: &str, reply_id: &ReplyId) -> Result<Option<u64>>;
    /// A kept part of an earlier reply.
    ///
    /// # Errors
    /// Local failures.
    fn sent_part(&self, recipient: &str, reply_id: &ReplyId, part: u32) -> Result<Option<Vec<u8>>>;
    /// How often the parts of `reply_id` were sent again.
    ///
    /// # Errors
    /// Local failures.
    fn resent(&self, reply_id: &ReplyId) -> Result<u64>;
    /// What `recipient` was sent since `since`.
    ///
    /// # Errors
    /// Local failures.
    fn spent_since(&self, recipient: &str, since: u64) -> Result<Spent>;
    /// The reply part sent under `message_id`, if it is remembered.
    ///
    /// # Errors
    /// Local failures.
    fn sent_message(&self, message_id: &str) -> Result<Option<SentMessage>>;
    /// How many parts reply `reply_id` went out in.
    ///
    /// # Errors
    /// Local failures.
    fn sent_part_count(&self, reply_id: &ReplyId) -> Result<u64>;
    /// The part size learned for `recipient`, if any.
    ///
    /// # Errors
    /// Local failures.
    fn relay_limit(&self, recipient: &str) -> Result<Option<LearnedLimit>>;
    /// The `created` time the last answered request of `recipient` stated (`None` before any, or for
    /// requests answered before it was recorded).
    ///
    /// # Errors
    /// Local failures.
    fn last_request_created(&self, recipient: &str, channel: &str) -> Result<Option<u64>>;
    /// The newest reply with operations already sent to `recipient` for a tree with root `base`, bringing
    /// `generation` (asked for whole files or not, as `full_content`), with no receipt yet and its parts
    /// still kept.
    ///
    /// # Errors
    /// Local failures.
    fn repeat_of(
        &self,
        recipient: &str,
        channel: &str,
        base: &Digest,
        generation: u64,
        full_content: bool,
    ) -> Result<Option<SameAs>>;
}

/// The owner's keyring: registered recipients' keys, the keys rotations deliver, retired keys in their grace.
pub struct OwnerKeys<'a>(pub &'a dyn OwnerView);

impl Keyring for OwnerKeys<'_> {
    fn lookup(&self, recipient: &str, key_id: &KeyId, now: u64) -> Result<Result<Keyed, Refusal>> {
        let Some(rec) = self.0.recipient(recipient)? else {
            return Ok(Err(Refusal::new(
                Reason::UnknownRecipient,
                format!("no recipient named {recipient:?} is registered"),
            )));
        };
        if *key_id == rec.key.id() {
            return Ok(Ok(Keyed { key: rec.key, role: KeyRole::Current }));
        }
        if let Some(r) = self.0.rotation(recipient)?.filter(|r| r.key.id() == *key_id) {
            return Ok(Ok(Keyed { key: r.key, role: KeyRole::Rotating }));
        }
        if let Some(key) = self.0.retired_key(recipient, key_id, now)? {
            return Ok(Ok(Keyed { key, role: KeyRole::Retired }));
        }
        Ok(Err(Refusal::new(
            Reason::BadMac,
            format!("message names key {key_id}, {recipient:?}'s key is {}", rec.key.id()),
        )))
    }
}

/// A change to the owner's state, applied by the shell in the step's one transaction, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// The recipient used the key its rotation delivered: it becomes the key, the old one is retired.
    CompleteRotation {
        /// Whose.
        recipient: String,
    },
    /// Later replies to `recipient` are cut into parts of at most `limit.limit` bytes.
    SetRelayLimit {
        /// Whose.
        recipient: String,
        /// The limit learned.
        limit: LearnedLimit,
    },
    /// The learned part size for `recipient` has grown back to the configured one: forget it.
    ClearRelayLimit {
        /// Whose.
        recipient: String,
    },
    /// A reply part to `recipient` could not be delivered (shown by `status`).
    SetBounce {
        /// Whose.
        recipient: String,
        /// When and what the report said.
        summary: String,
    },
    /// The parts of `reply_id` were sent again once more.
    CountResend {
        /// Which reply.
        reply_id: ReplyId,
    },
    /// Record a receipt (any status) as the recipient's state and in its history.
    RecordReceipt(Receipt),
    /// Keep the facts a request carried as the recipient's registration.
    RecordRegistration {
        /// Whose.
        recipient: String,
        /// The facts.
        facts: Box<crate::registration::Facts>,
        /// When the request carrying them was made.
        created: u64,
    },
    /// Forget the kept parts of a reply.
    DropSentParts {
        /// Which reply.
        reply_id: ReplyId,
    },
}

/// A request to answer with a fresh reply, once the shell has packed it.
#[derive(Clone, Debug)]
pub struct AnswerPlan {
    /// Who asked.
    pub recipient: Registered,
    /// The request.
    pub request: Request,
    /// The key the reply is made under: the recipient's key once this step's effects are applied.
    pub key: Key,
    /// The key a rotation is delivering, to send sealed in the reply.
    pub rekey: Option<Rotation>,
    /// The recipient's tree, when the owner could rebuild it; `None` asks for the full inventory (unless
    /// `current`).
    pub inventory: Option<Arc<Manifest>>,
    /// The recipient's tree is the generation itself (a changes-only request naming the newest generation
    /// with no changes and its root): the reply says "current", and no file list was loaded or diffed.
    pub current: bool,
    /// The generation the reply brings.
    pub generation: Generation,
    /// Its tree; `None` when `current` (not loaded).
    pub target: Option<Arc<Manifest>>,
    /// The operations that turn the recipient's tree into it (none without an inventory).
    pub ops: Vec<Op>,
    /// The size its parts must fit, with this step's effects taken into account.
    pub limit: u64,
    /// A reference reply: the earlier reply that already answers this tree (no operations then).
    pub same_as: Option<SameAs>,
    /// An answer without an update: why the recipient is not sent the channel (no operations then).
    pub standing: Option<Standing>,
    /// The generation the recipient is pinned at, if it is.
    pub pinned: Option<u64>,
    /// Effects to apply with the reply.
    pub effects: Vec<Effect>,
}

/// Kept parts of an earlier reply to send again.
#[derive(Clone, Debug)]
pub struct ResendPlan {
    /// Who asked.
    pub recipient: Registered,
    /// The request asking.
    pub request: Request,
    /// The reply.
    pub reply_id: ReplyId,
    /// Its generation.
    pub generation: u64,
    /// The parts, as sent the first time.
    pub parts: Vec<(u32, Vec<u8>)>,
    /// Effects to apply with the resend.
    pub effects: Vec<Effect>,
}

/// What the owner does with one verified message.
#[derive(Debug)]
pub enum Outcome {
    /// Refuse it; nothing changes.
    Refused(Refusal),
    /// Leave it in the inbox (nothing published yet).
    Deferred(String),
    /// Answer a request afresh.
    Answer(Box<AnswerPlan>),
    /// Answer a request with kept parts.
    Resend(Box<ResendPlan>),
    /// Record a receipt.
    Receipt {
        /// The receipt.
        receipt: Receipt,
        /// Effects to apply.
        effects: Vec<Effect>,
    },
}

/// What the owner is configured to allow.
#[derive(Clone, Debug)]
pub struct OwnerPolicy {
    /// Size and count limits.
    pub limits: crate::limits::Limits,
    /// Per-recipient reply budget.
    pub budget: Budget,
    /// The configured part size (`relay-limit`, or the server's `SIZE` if smaller).
    pub relay_limit: u64,
    /// Smallest relay limit.
    pub min_relay_limit: u64,
}

/// How long a learned part size lasts without a new refusal confirming it: a limit taught by a report,
/// forged or genuine, heals by itself.
pub const LEARNED_LIMIT_TTL: u64 = 30 * 24 * 3600;

/// How long a learned part size holds before proven deliveries let it grow back (a quarter at a time).
pub const LEARNED_LIMIT_GROW_AFTER: u64 = 24 * 3600;

/// The part size replies to `recipient` must fit at `now`: the configured one, or a learned one that is
/// smaller and still fresh, never below the smallest usable limit.
///
/// # Errors
/// Local failures of the view.
pub fn part_limit(view: &dyn OwnerView, recipient: &str, policy: &OwnerPolicy, now: u64) -> Result<u64> {
    let learned = learned_limit(view, recipient, now)?.map(|l| l.limit);
    Ok(learned.map_or(policy.relay_limit, |l| l.min(policy.relay_limit)).max(policy.min_relay_limit))
}

fn learned_limit(view: &dyn OwnerView, recipient: &str, now: u64) -> Result<Option<LearnedLimit>> {
    Ok(view.relay_limit(recipient)?.filter(|l| now.saturating_sub(l.learned_at) < LEARNED_LIMIT_TTL))
}

/// Decides what to do with a verified request or receipt.
///
/// # Errors
/// Local failures of the view.
pub fn on_message(view: &dyn OwnerView, msg: Verified, policy: &OwnerPolicy, now: u64) -> Result<Outcome> {
    let Some(rec) = view.recipient(&msg.auth.recipient)? else {
        return Ok(Outcome::Refused(Refusal::new(
            Reason::UnknownRecipient,
            format!("no recipient named {:?} is registered", msg.auth.recipient),
        )));
    };
    // A message made under the key a rotation delivers completes the rotation, if it is accepted.
    let mut effects = Vec::new();
    let rotation = view.rotation(&rec.name)?;
    let (key, rekey) = match msg.key_role {
        KeyRole::Rotating => {
            effects.push(Effect::CompleteRotation { recipient: rec.name.clone() });
            (msg.key.clone(), None)
        }
        KeyRole::Current | KeyRole::Retired => (rec.key.clone(), rotation),
    };
    match msg.control {
        Control::Request(req) => {
            // A request's only possible attachment is its inventory.
            let inventory = match crate::protocol::open_inventory(&req, &msg.attachments, &policy.limits) {
                Ok(i) => i,
                Err(r) => return Ok(Outcome::Refused(r)),
            };
            let req = Request { inventory, inventory_payload: None, ..req };
            on_request(view, rec, req, key, rekey, effects, policy, now)
        }
        Control::Receipt(_) if !msg.attachments.is_empty() => {
            let name = msg.attachments.keys().next().map_or("", String::as_str);
            Ok(Outcome::Refused(Refusal::new(Reason::BadPayload, format!("unexpected attachment {name:?}"))))
        }
        Control::Receipt(r) => on_receipt(view, &rec, r, effects, policy, now),
        Control::Reply(_) => Ok(Outcome::Refused(Refusal::new(Reason::Unexpected, "an owner does not accept replies"))),
    }
}

macro_rules! refuse {
    ($reason:expr, $($fmt:tt)*) => {
        return Ok(Outcome::Refused(Refusal::new($reason, format!($($fmt)*))))
    };
}

/// Receipt checks C1–C4 (`docs/protocol.md` §11.2).
fn on_receipt(
    view: &dyn OwnerView,
    rec: &Registered,
    r: Receipt,
    mut effects: Vec<Effect>,
    policy: &OwnerPolicy,
    now: u64,
) -> Result<Outcome> {
    let Some(sent) = view.answered_for(&rec.name, &r.nonce)? else {
        refuse!(Reason::Replay, "receipt for nonce {} that was never answered", r.nonce);
    };
    if matches!(r.status, ReceiptStatus::Failed | ReceiptStatus::RolledBack) {
        return on_outcome(view, rec, r, &sent, effects);
    }
    if r.reply_id != sent.reply_id || r.generation != sent.generation || r.channel != sent.channel {
        refuse!(
            Reason::Malformed,
            "receipt names reply {} and generation {} of channel {:?}, but the reply sent was {} with generation {} \
             of {:?}",
            r.reply_id,
            r.generation,
            r.channel,
            sent.reply_id,
            sent.generation,
            sent.channel
        );
    }
    // The owner knows the root of what it sent: a receipt claiming another state could come from no reply.
    if let Some(root) = sent.root
        && root != r.root
    {
        refuse!(
            Reason::Malformed,
            "receipt reports root {} for reply {}, but that reply brought root {}",
            r.root.short(),
            r.reply_id,
            root.short()
        );
    }
    if view.receipt_recorded(&rec.name, &r.reply_id)? {
        refuse!(Reason::Replay, "a receipt for reply {} was recorded before", r.reply_id);
    }
    effects.push(Effect::RecordReceipt(r.clone()));
    // Its parts arrived: no need to keep them for sending again.
    effects.push(Effect::DropSentParts { reply_id: r.reply_id.clone() });
    // A reply in several parts cut to a learned size got through whole: once the size has held for
    // LEARNED_LIMIT_GROW_AFTER, parts may grow back a quarter (once per period), never to the size a relay
    // refused, and to the configured size in the end.
    if let Some(l) = learned_limit(view, &rec.name, now)?
        && now.saturating_sub(l.learned_at) >= LEARNED_LIMIT_GROW_AFTER
        && view.sent_part_count(&r.reply_id)? > 1
    {
        let ceiling = l.refused.map_or(policy.relay_limit, |refused| refused.saturating_sub(1).min(policy.relay_limit));
        let grown = (l.limit + l.limit / 4).min(ceiling);
        if grown >= policy.relay_limit {
            effects.push(Effect::ClearRelayLimit { recipient: rec.name.clone() });
        } else if grown > l.limit {
            effects.push(Effect::SetRelayLimit {
                recipient: rec.name.clone(),
                limit: LearnedLimit { limit: grown, learned_at: now, ..l },
            });
        }
    }
    Ok(Outcome::Receipt { receipt: r, effects })
}

/// Checks C2n–C3n of a negative or rolled-back receipt (`docs/protocol.md` §11.2): it names the reply sent
/// for its nonce; a rollback goes back from the generation that reply brought, to a tree the owner knows
/// that generation by (when it still keeps it); and each is recorded at most once per reply. Its
/// `generation` and `root` say what the recipient has now.
fn on_outcome(
    view: &dyn OwnerView,
    rec: &Registered,
    r: Receipt,
    sent: &SentReply,
    mut effects: Vec<Effect>,
) -> Result<Outcome> {
    if r.reply_id != sent.reply_id {
        refuse!(
            Reason::Malformed,
            "{} receipt names reply {}, but the reply sent for its nonce was {}",
            r.status.code(),
            r.reply_id,
            sent.reply_id
        );
    }
    if r.status == ReceiptStatus::RolledBack {
        if r.generation >= sent.generation {
            refuse!(
                Reason::Malformed,
                "receipt reports a rollback to generation {} from reply {}, which brought generation {}",
                r.generation,
                r.reply_id,
                sent.generation
            );
        }
        if let Some(m) = view.manifest(&r.channel, r.generation)?
            && m.root() != r.root
        {
            refuse!(
                Reason::Malformed,
                "receipt reports a rollback to generation {} with root {}, but that generation's root is {}",
                r.generation,
                r.root.short(),
                m.root().short()
            );
        }
    }
    if view.outcome_recorded(&rec.name, &r.reply_id, r.status)? {
        refuse!(Reason::Replay, "a {} receipt for reply {} was recorded before", r.status.code(), r.reply_id);
    }
    effects.push(Effect::RecordReceipt(r.clone()));
    Ok(Outcome::Receipt { receipt: r, effects })
}

/// Request checks R1–R6 (`docs/protocol.md` §11.2), then the answer.
#[allow(clippy::too_many_arguments)]
fn on_request(
    view: &dyn OwnerView,
    rec: Registered,
    req: Request,
    key: Key,
    rekey: Option<Rotation>,
    mut effects: Vec<Effect>,
    policy: &OwnerPolicy,
    now: u64,
) -> Result<Outcome> {
    if view.request_answered(&req.nonce)? {
        refuse!(Reason::Replay, "request nonce {} was answered before", req.nonce);
    }
    let last_seq = view.last_seq(&rec.name, &req.channel)?;
    if req.seq <= last_seq {
        // A fresh nonce under the recipient's key with an old seq, made after the request that used the
        // newer seq (to the second: clocks are hints): not a delayed request but, most likely, another machine
        // counting from its own start.
        if view.last_request_created(&rec.name, &req.channel)?.is_some_and(|last| req.created >= last) {
            refuse!(
                Reason::Replay,
                "request seq {} is not newer than {}, though it was made no earlier: most likely another machine \
                 uses {:?}'s enrollment; each machine needs its own (`mailferry owner add-recipient`)",
                req.seq,
                last_seq,
                rec.name
            );
        }
        refuse!(Reason::Replay, "request seq {} is not newer than {} (replayed or reordered)", req.seq, last_seq);
    }
    // R6: the recipient's budget. Whoever holds a key (a stolen one, or a recipient stuck in a loop)
    // can make the owner mail only so much to the registered address.
    let b = policy.budget;
    let spent = view.spent_since(&rec.name, now.saturating_sub(b.period))?;
    if spent.replies >= b.replies || spent.bytes >= b.bytes {
        refuse!(
            Reason::Limit,
            "{:?} was sent {} replies ({} bytes) in the last {}, its budget is {} replies or {} bytes",
            rec.name,
            spent.replies,
            spent.bytes,
            humantime::format_duration(std::time::Duration::from_secs(b.period)),
            b.replies,
            b.bytes
        );
    }
    // R8: what the recipient is entitled to. A refusal here is an authenticated answer, so the recipient
    // can tell "not entitled" from "current" and from silence.
    // Facts the request carries are the recipient's from now on, if it is answered; grants with a selector
    // already see them.
    let mut access = view.access(&rec.name, &req.channel)?;
    if let Some(facts) = &req.registration {
        access.facts = Some((**facts).clone());
        effects.push(Effect::RecordRegistration {
            recipient: rec.name.clone(),
            facts: facts.clone(),
            created: req.created,
        });
    }
    let pin = match entitlement(&access, now) {
        Entitlement::Denied(standing) => return denial(view, rec, req, key, effects, standing, policy, now),
        Entitlement::Granted { pin } => pin,
    };
    let Some(latest) = view.latest_generation(&req.channel)? else {
        return Ok(Outcome::Deferred(format!(
            "request from {:?} for channel {:?} left waiting: nothing is published yet (run `mailferry owner \
             publish`)",
            rec.name, req.channel
        )));
    };
    if req.generation > latest.number {
        tracing::warn!(
            recipient = %rec.name, claimed = req.generation, newest = latest.number,
            "the recipient claims a generation newer than any published: its key may have been used by someone \
             else; enroll it afresh (`mailferry owner reenroll`)"
        );
    }
    let generation = match pin {
        Some(p) if req.generation > p => {
            return denial(view, rec, req, key, effects, Standing::Pinned { at: p }, policy, now);
        }
        Some(p) if p < latest.number => match view.generation(&req.channel, p)? {
            Some(g) => g,
            None => {
                tracing::warn!(recipient = %rec.name, channel = %req.channel, pin = p, "the pinned generation is not kept");
                return denial(view, rec, req, key, effects, Standing::Pinned { at: p }, policy, now);
            }
        },
        _ => latest,
    };
    // An up-to-date tree: a changes-only request naming the newest generation with no changes describes
    // exactly that generation, whose root is known. It is answered without loading, rebuilding or diffing
    // a file list, which on a large tree costs far more than the rest of the answer.
    let current = req.inventory_kind == InventoryKind::Changes
        && req.generation == generation.number
        && req.inventory.is_empty()
        && req.removed.is_empty();
    if current && req.root != generation.root {
        refuse!(Reason::Malformed, "request root does not match its inventory");
    }
    // R3 and R4: the recipient's tree, listed whole, or rebuilt from the generation it names plus its changes.
    let inventory = match req.inventory_kind {
        _ if current => None,
        InventoryKind::Full => match Manifest::from_listing(req.inventory.clone()) {
            Ok(m) => Some(Arc::new(m)),
            Err(e) => refuse!(Reason::BadPath, "inventory is not a valid tree: {e}"),
        },
        InventoryKind::Changes if req.generation == 0 || req.generation > generation.number => None,
        InventoryKind::Changes => match view.manifest(&req.channel, req.generation)? {
            None => None,
            // No changes: the tree is that generation, shared rather than copied (a stored generation is
            // a valid tree).
            Some(base) if req.removed.is_empty() && req.inventory.is_empty() => Some(base),
            Some(base) => {
                let mut m = (*base).clone();
                for p in &req.removed {
                    if m.remove(p).is_none() {
                        refuse!(
                            Reason::Malformed,
                            "request removes `{p}`, which generation {} does not have",
                            req.generation
                        );
                    }
                }
                for l in &req.inventory {
                    m.insert(l.path.clone(), l.entry.clone());
                }
                if let Err(e) = m.validate_shape() {
                    refuse!(Reason::BadPath, "inventory is not a valid tree: {e}");
                }
                Some(Arc::new(m))
            }
        },
    };
    if let Some(inv) = &inventory
        && inv.root() != req.root
    {
        refuse!(Reason::Malformed, "request root does not match its inventory");
    }
    // The parts of an earlier reply that never arrived, if they are still kept.
    if let Some(resend) = &req.resend
        && let Some(plan) = resend_plan(view, &rec, &req, resend, &mut effects, policy, now)?
    {
        return Ok(Outcome::Resend(Box::new(ResendPlan { effects, ..plan })));
    }
    let target = if current {
        None
    } else {
        Some(view.manifest(&req.channel, generation.number)?.ok_or_else(|| {
            anyhow::format_err!(
                "generation {} of channel {:?} has no manifest in the state database",
                generation.number,
                req.channel
            )
        })?)
    };
    // R7: the same tree, for the same generation, was answered before and that reply is still on its way
    // (or lost): a reference to it costs a few kilobytes, a new reply as much as the first. A recipient
    // that cannot use the earlier reply asks `fresh`.
    let same_as = match (&inventory, &req.resend, req.fresh) {
        (Some(_), None, false) => {
            view.repeat_of(&rec.name, &req.channel, &req.root, generation.number, req.full_content)?
        }
        _ => None,
    };
    let ops = match (&inventory, &same_as, &target) {
        (Some(inv), None, Some(target)) => diff(inv, target),
        _ => Vec::new(),
    };
    // A limit this very step learns applies to the reply it sends.
    let learned_now = effects.iter().rev().find_map(|e| match e {
        Effect::SetRelayLimit { recipient, limit } if *recipient == rec.name => Some(limit.limit),
        _ => None,
    });
    let limit = match learned_now {
        Some(l) => l.min(policy.relay_limit).max(policy.min_relay_limit),
        None => part_limit(view, &rec.name, policy, now)?,
    };
    Ok(Outcome::Answer(Box::new(AnswerPlan {
        recipient: rec,
        request: req,
        key,
        rekey,
        inventory,
        current,
        generation,
        target,
        ops,
        limit,
        same_as,
        standing: None,
        pinned: pin,
        effects,
    })))
}

/// The answer without an update: the request's own generation and root back, no operations, and why.
#[allow(clippy::too_many_arguments)]
fn denial(
    view: &dyn OwnerView,
    rec: Registered,
    req: Request,
    key: Key,
    effects: Vec<Effect>,
    standing: Standing,
    policy: &OwnerPolicy,
    now: u64,
) -> Result<Outcome> {
    let limit = part_limit(view, &rec.name, policy, now)?;
    let generation = Generation { number: req.generation, root: req.root };
    let pinned = match standing {
        Standing::Pinned { at } => Some(at),
        _ => None,
    };
    Ok(Outcome::Answer(Box::new(AnswerPlan {
        recipient: rec,
        request: req,
        key,
        rekey: None,
        inventory: Some(Arc::new(Manifest::default())),
        current: false,
        generation,
        target: None,
        ops: Vec::new(),
        limit,
        same_as: None,
        standing: Some(standing),
        pinned,
        effects,
    })))
}

/// The resend of kept parts, when they are all still kept and were not lost before. Parts asked for twice
/// were lost twice: a relay on the way likely refuses them as too big (and its bounce went where mailferry
/// does not look), so the limit shrinks and the request is answered afresh in smaller parts.
fn resend_plan(
    view: &dyn OwnerView,
    rec: &Registered,
    req: &Request,
    resend: &Resend,
    effects: &mut Vec<Effect>,
    policy: &OwnerPolicy,
    now: u64,
) -> Result<Option<ResendPlan>> {
    let mut parts = Vec::with_capacity(resend.parts.len());
    for &k in &resend.parts {
        match view.sent_part(&rec.name, &resend.reply_id, k)? {
            Some(raw) => parts.push((k, raw)),
            None => {
                tracing::info!(
                    recipient = %rec.name, reply = %resend.reply_id,
                    "parts asked for again are no longer kept; answering afresh"
                );
                return Ok(None);
            }
        }
    }
    let asked = view.resent(&resend.reply_id)?;
    if asked >= 1 {
        if let Some(largest) = parts.iter().map(|(_, raw)| raw.len() as u64).max() {
            let limit = shrunk_limit(largest, policy.min_relay_limit);
            tracing::warn!(
                recipient = %rec.name, reply = %resend.reply_id, limit,
                "parts were lost twice; answering afresh with smaller parts"
            );
            effects.push(Effect::SetRelayLimit {
                recipient: rec.name.clone(),
                limit: LearnedLimit {
                    limit,
                    learned_at: now,
                    refused: Some(largest),
                    reply_id: Some(resend.reply_id.clone()),
                },
            });
        }
        return Ok(None);
    }
    let Some(generation) = view.reply_generation(&rec.name, &resend.reply_id)? else { return Ok(None) };
    if parts.is_empty() {
        return Ok(None);
    }
    effects.push(Effect::CountResend { reply_id: resend.reply_id.clone() });
    Ok(Some(ResendPlan {
        recipient: rec.clone(),
        request: req.clone(),
        reply_id: resend.reply_id.clone(),
        generation,
        parts,
        effects: Vec::new(),
    }))
}

/// What a delivery report makes the owner do.
#[derive(Debug, PartialEq, Eq)]
pub enum ReportOutcome {
    /// Refuse it (not about a message this owner sent, or not corroborated): nothing changes.
    Refused(Refusal),
    /// Apply these effects (possibly none) and log `what`.
    Act {
        /// Effects to apply.
        effects: Vec<Effect>,
        /// What it did, for the log.
        what: String,
        /// Whether it reports a failure (logged as a warning).
        failed: bool,
    },
}

/// Decides what a delivery report (a bounce) changes. A report is input from nobody in particular, so:
/// it must name a reply part this owner sent and quote that part's delivery token (which only someone who
/// saw the message itself can know); a too-large report cuts that recipient's parts to three quarters of
/// the refused part at most once per reply, never below the smallest limit; the cut heals (receipts
/// grow parts back, and a learned limit expires after [`LEARNED_LIMIT_TTL`]); a failure is only shown.
///
/// # Errors
/// Local failures of the view.
pub fn on_report(
    view: &dyn OwnerView,
    report: &crate::protocol::envelope::Bounce,
    policy: &OwnerPolicy,
    now: u64,
) -> Result<ReportOutcome> {
    let what = report.summary();
    let refused = |detail: String| Ok(ReportOutcome::Refused(Refusal::new(Reason::Unexpected, detail)));
    let sent = match &report.message_id {
        Some(id) => view.sent_message(id)?,
        None => None,
    };
    let Some(sent) = sent else {
        return refused(format!(
            "a delivery report ({what}) about a message this owner did not send, or no longer remembers"
        ));
    };
    let genuine = match (&sent.token, &report.token) {
        (Some(ours), Some(quoted)) => crate::crypto::ct_eq(ours.as_bytes(), quoted.as_bytes()),
        _ => false,
    };
    if !genuine {
        return refused(format!(
            "a delivery report ({what}) names reply part {} of {} to {:?} but does not quote its delivery              token: not corroborated, nothing changed",
            sent.part, sent.reply_id, sent.recipient
        ));
    }
    let head = format!("reply part {} of {} to {:?}", sent.part, sent.reply_id, sent.recipient);
    if report.too_large() {
        let current = learned_limit(view, &sent.recipient, now)?;
        let limit = shrunk_limit(sent.bytes, policy.min_relay_limit);
        let already = current.as_ref().is_some_and(|l| l.reply_id.as_ref() == Some(&sent.reply_id) || l.limit <= limit);
        if already {
            return Ok(ReportOutcome::Act {
                effects: Vec::new(),
                what: format!("{head} was refused as too large ({what}); parts are already cut to fit"),
                failed: true,
            });
        }
        return Ok(ReportOutcome::Act {
            effects: vec![
                Effect::SetRelayLimit {
                    recipient: sent.recipient.clone(),
                    limit: LearnedLimit {
                        limit,
                        learned_at: now,
                        refused: Some(sent.bytes),
                        reply_id: Some(sent.reply_id.clone()),
                    },
                },
                // The request for the missing part is then answered afresh, in smaller parts.
                Effect::DropSentParts { reply_id: sent.reply_id.clone() },
            ],
            what: format!(
                "a relay returned a reply part as too large ({what}): {head}, {} bytes; later replies to this \
                 recipient use parts of at most {limit} bytes",
                sent.bytes
            ),
            failed: true,
        });
    }
    if report.failed() {
        return Ok(ReportOutcome::Act {
            effects: vec![Effect::SetBounce { recipient: sent.recipient.clone(), summary: format!("{now} {what}") }],
            what: format!("{head} could not be delivered: {what}"),
            failed: true,
        });
    }
    Ok(ReportOutcome::Act { effects: Vec::new(), what: format!("delivery report about {head}: {what}"), failed: false })
}

/// The part size after a part of `refused` bytes did not get through: three quarters of it, never below
/// the smallest usable limit.
pub fn shrunk_limit(refused: u64, min: u64) -> u64 {
    (refused / 4 * 3).max(min)
}

/// The control fields of a fresh reply (one part, no payloads yet: the shell cuts the pack into parts).
pub fn reply_head(plan: &AnswerPlan, rng: &mut dyn Entropy, created: u64, body: Frame) -> Reply {
    let rec = &plan.recipient;
    // Sixteen random bytes in hex are always a valid reply id.
    let reply_id = ReplyId::unchecked(rng.hex_id(16));
    let mut seal_nonce = [0; 12];
    rng.fill(&mut seal_nonce);
    Reply {
        mailferry: VERSION,
        kind: Kind::Reply,
        recipient: rec.name.clone(),
        channel: plan.request.channel.clone(),
        nonce: plan.request.nonce,
        request_seq: plan.request.seq,
        reply_id,
        part: 1,
        parts: 1,
        created,
        generation: plan.generation.number,
        root: plan.generation.root,
        base: plan.request.root,
        need_full_inventory: plan.inventory.is_none() && !plan.current,
        payloads: Vec::new(),
        body,
        // The next key travels sealed under the key the reply is made under.
        rekey: plan.rekey.as_ref().map(|r| Rekey {
            key_id: r.key.id(),
            sealed: plan.key.seal_key_with_nonce(&rec.name, &r.key, seal_nonce),
            grace: r.grace,
        }),
        same_as: plan.same_as.clone(),
        sealed_key: None,
        broadcast: None,
        standing: plan.standing.clone(),
        pinned: plan.pinned,
    }
}

/// What requests must have in common to be answered by one broadcast (`docs/protocol.md` §7.11): the
/// channel, the tree they describe (its root) and the generation they are brought to. Whole files only
/// (`full-content`) never share one: such a recipient could not use the deltas it carries.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct BroadcastKey {
    /// The channel.
    pub channel: String,
    /// The recipients' tree root: the reply's `base`.
    pub base: Digest,
    /// The generation the update brings.
    pub generation: u64,
    /// Whether the recipients decode line deltas (their requests name `lines`): a pack that uses them
    /// is for those only.
    pub lines: bool,
}

/// Whether `req`, looked at before any request of the run is answered, could be answered by a broadcast
/// bringing `latest` (the newest generation of its channel offered, if any): the owner signs
/// (`signing`), the request announces tickets, asks for no lost parts and not for whole files, and its
/// tree is not `latest` already. The survey counts these per [`BroadcastKey`].
pub fn broadcast_candidate(req: &Request, latest: Option<&Generation>, signing: bool) -> Option<BroadcastKey> {
    let latest = latest?;
    let eligible = signing
        && req.accepts(crate::protocol::broadcast::Capability::Broadcast)
        && !req.full_content
        && req.resend.is_none()
        && req.root != latest.root;
    eligible.then(|| BroadcastKey {
        channel: req.channel.clone(),
        base: req.root,
        generation: latest.number,
        lines: req.decodes(protocol::Method::Lines),
    })
}

/// The keys at least `min` surveyed requests share (at least one): those requests are answered by one
/// broadcast each key, the rest privately.
pub fn shared_broadcasts(keys: impl IntoIterator<Item = BroadcastKey>, min: usize) -> BTreeSet<BroadcastKey> {
    let mut counts: BTreeMap<BroadcastKey, usize> = BTreeMap::new();
    for k in keys {
        *counts.entry(k).or_default() += 1;
    }
    counts.into_iter().filter(|(_, n)| *n >= min.max(1)).map(|(k, _)| k).collect()
}

/// Whether the reply `plan` calls for goes as a ticket to the broadcast of its key: the key is one the
/// survey found shared, the owner signs, the request announces tickets and is not a resend or a request
/// for whole files, and the reply is an update with operations (not a reference, an answer without an
/// update, a request for the full tree or a current reply), cut for the relay limit every recipient shares
/// (a recipient whose relays taught a smaller part size is answered privately).
pub fn joins_broadcast(
    plan: &AnswerPlan,
    shared: &BTreeSet<BroadcastKey>,
    signing: bool,
    relay_limit: u64,
) -> Option<BroadcastKey> {
    let req = &plan.request;
    let update = plan.same_as.is_none()
        && plan.standing.is_none()
        && plan.inventory.is_some()
        && !plan.ops.is_empty()
        && plan.limit >= relay_limit;
    let key = BroadcastKey {
        channel: req.channel.clone(),
        base: req.root,
        generation: plan.generation.number,
        lines: req.decodes(protocol::Method::Lines),
    };
    let eligible = update
        && signing
        && req.accepts(crate::protocol::broadcast::Capability::Broadcast)
        && !req.full_content
        && req.resend.is_none()
        && shared.contains(&key);
    eligible.then_some(key)
}
