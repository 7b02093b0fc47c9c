//! Protocol v1: the control messages, how they are authenticated, and why a message is refused.
//!
//! Every mailferry message is ordinary MIME mail (see [`envelope`]) carrying three kinds of attachment:
//! the **control part** (`control.json`, canonical UTF-8 JSON, one line), the **auth part** (`auth.json`,
//! naming the recipient and key and holding the HMAC-SHA256 of the control part's decoded bytes) and, in
//! replies, **payload parts** whose BLAKE3 digests the control part lists. Nothing else of the mail is
//! trusted: headers, subject and text are hints for humans and filters.
//!
//! Pure: parsing, encoding and verification only. The format is specified in `docs/protocol.md`; keep the
//! two in step.

pub mod bounded;
pub mod broadcast;
pub mod envelope;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::crypto::{Key, KeyId, Nonce, PublicKey, SigningKey, string_id};
use crate::crypto::{hex, unhex};
use crate::limits::Limits;
use crate::manifest::{Digest, Entry, Listed, Op, Source};
use bounded::List;

/// The protocol version this build speaks; carried in every control and auth part.
pub const VERSION: u32 = 1;

/// The MAC algorithm of v1.
pub const MAC_ALG: &str = "hmac-sha256";

/// The longest grace a rotated key may be given: a year, in seconds.
pub const MAX_REKEY_GRACE: u64 = 366 * 24 * 3600;

/// Largest integer the wire allows anywhere: 2^53 − 1, exact both as a JSON number read into a double and
/// as SQLite's signed 64-bit integer, so every value a peer sends is stored and compared without loss.
pub const MAX_INTEGER: u64 = (1 << 53) - 1;

/// Largest `generation` in a request, reply or receipt ([`MAX_INTEGER`]): a reply naming a larger one
/// would otherwise make every later genuine reply look like a rollback.
pub const MAX_GENERATION: u64 = MAX_INTEGER;

/// Largest `seq` of a request and `request-seq` of a reply ([`MAX_INTEGER`]).
pub const MAX_SEQ: u64 = MAX_INTEGER;

/// The channel of an owner that publishes one tree, and of every message that names none.
pub const DEFAULT_CHANNEL: &str = "default";

/// Whether `name` may name a channel (or a group): 1–64 letters, digits, `-`, `_` and `.`, not starting
/// with `.` or `-`.
pub fn valid_channel_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !name.starts_with(['.', '-'])
}

fn default_channel() -> String {
    DEFAULT_CHANNEL.to_owned()
}

fn is_default_channel(c: &str) -> bool {
    c == DEFAULT_CHANNEL
}

// The lists an attacker controls are read through [`bounded::seq`], which counts their elements as
// they stream in (see [`bounded`]).
fn inventory_list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    bounded::seq(d, List::Inventory)
}
fn payload_list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    bounded::seq(d, List::Payloads)
}
fn resend_list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    bounded::seq(d, List::Resend)
}
fn op_list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    bounded::seq(d, List::Ops)
}
fn stream_list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    bounded::seq(d, List::Streams)
}
fn base_list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    bounded::seq(d, List::Bases)
}
/// A request's `methods`: names this build does not know are dropped, not refused (the list says what the
/// sender can decode, so a newer sender's extra names are no error).
fn method_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Method>, D::Error> {
    struct Name(Option<Method>);
    impl<'de> Deserialize<'de> for Name {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Name, D::Error> {
            let s = String::deserialize(d)?;
            Ok(Name(Method::ALL.into_iter().find(|m| m.code() == s)))
        }
    }
    let names: Vec<Name> = bounded::seq(d, List::Methods)?;
    let mut out: Vec<Method> = Vec::new();
    for m in names.into_iter().filter_map(|n| n.0) {
        if !out.contains(&m) {
            out.push(m);
        }
    }
    Ok(out)
}

/// What kind of control message this is.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Recipient → owner: what I have, what I want.
    Request,
    /// Owner → recipient: the operations that bring the recipient to a generation.
    Reply,
    /// Recipient → owner: what I did with a reply.
    Receipt,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Request => "request",
            Kind::Reply => "reply",
            Kind::Receipt => "receipt",
        })
    }
}

/// What a recipient asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Want {
    /// The newest published generation.
    Latest,
}

/// A recipient's authenticated request.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Request {
    /// Protocol version, always [`VERSION`].
    pub mailferry: u32,
    /// Always [`Kind::Request`].
    #[serde(rename = "type")]
    pub kind: Kind,
    /// The recipient's registered name.
    pub recipient: String,
    /// The channel whose tree this request describes (absent: [`DEFAULT_CHANNEL`]).
    #[serde(default = "default_channel", skip_serializing_if = "is_default_channel")]
    pub channel: String,
    /// Fresh random value the reply must echo.
    pub nonce: Nonce,
    /// Per-recipient and per-channel counter, strictly increasing.
    pub seq: u64,
    /// Seconds since the Unix epoch when the request was made (a hint; freshness comes from the nonce).
    pub created: u64,
    /// The generation last applied, 0 for none.
    pub generation: u64,
    /// Root of the tree as it is on disk now.
    pub root: Digest,
    /// Whether `inventory` is the whole tree or only what differs from `generation`.
    #[serde(default)]
    pub inventory_kind: InventoryKind,
    /// [`InventoryKind::Full`]: every entry of the tree now. [`InventoryKind::Changes`]: only the entries
    /// that are new or differ from generation `generation`.
    #[serde(deserialize_with = "inventory_list")]
    pub inventory: Vec<Listed>,
    /// [`InventoryKind::Changes`] only: paths of generation `generation` that are gone from the tree.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "inventory_list")]
    pub removed: Vec<crate::path::RelPath>,
    /// A large inventory travels as the request's one attachment instead ([`pack_inventory`]):
    /// `inventory` is then empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_payload: Option<Payload>,
    /// What the recipient wants.
    pub want: Want,
    /// Send whole files only: no deltas and no local copies (a delta's base was not what the owner
    /// thought, so the recipient asks for content it can check without one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full_content: bool,
    /// Parts of an earlier reply that never arrived. If the owner still has them it sends just those;
    /// otherwise it answers the request as usual.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resend: Option<Resend>,
    /// Do not answer with a reference to an earlier reply (`same-as`): this recipient cannot use it (the
    /// request it answered is no longer outstanding here).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh: bool,
    /// The recipient's registration facts (`docs/protocol.md` §7.8), in the first request after
    /// enrollment and after they change; authenticated with the request, kept by the owner with its answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<Box<crate::registration::Facts>>,
    /// What this recipient can take besides plain replies (`docs/protocol.md` §7.11): a recipient that
    /// pinned the owner's key announces broadcast tickets. Names this build does not know are dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "broadcast::accepts_list")]
    pub accepts: Vec<broadcast::Capability>,
    /// The delta methods this recipient decodes. Empty (absent on the wire) means the two every v1
    /// recipient decodes, `zstd-prefix` and `bsdiff`; see [`Request::decodes`].
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "method_list")]
    pub methods: Vec<Method>,
}

impl Request {
    /// Whether the request announces `capability`.
    pub fn accepts(&self, capability: broadcast::Capability) -> bool {
        self.accepts.contains(&capability)
    }

    /// Whether the sender can decode a delta stream of `method`: every v1 recipient decodes
    /// [`Method::ZstdPrefix`] and [`Method::Bsdiff`]; a newer method only when the request names it, so a
    /// recipient that predates it is never sent one.
    pub fn decodes(&self, method: Method) -> bool {
        matches!(method, Method::ZstdPrefix | Method::Bsdiff) || self.methods.contains(&method)
    }
}

/// How a request describes the recipient's tree.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InventoryKind {
    /// Every entry (first contact, or when the owner asked for it).
    #[default]
    Full,
    /// Only the difference from the generation the recipient applied: a request grows with local drift,
    /// not with the size of the tree.
    Changes,
}

/// One chunk of a reply's pack, carried as an attachment by exactly one part.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Payload {
    /// The attachment's file name in the MIME message.
    pub id: String,
    /// Decoded length in bytes.
    pub size: u64,
    /// BLAKE3 of the decoded bytes.
    pub blake3: Digest,
}

/// A zstd frame inside a reply's pack.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Frame {
    /// Offset of the frame in the pack.
    pub offset: u64,
    /// Length of the frame.
    pub length: u64,
    /// Length of what it decompresses to.
    pub size: u64,
    /// BLAKE3 of what it decompresses to.
    pub blake3: Digest,
}

/// The owner's authenticated reply to one request: the control part of one of its parts.
///
/// A reply's binary data is one byte string, the **pack**: the zstd frames of the files it carries, its
/// delta streams, and the [`Body`] (its operations). The pack is cut into chunks, the [`Payload`]s; part
/// `k` carries chunk `k` and every part lists them all, so each part authenticates on its own and the
/// recipient knows when it has the whole pack.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Reply {
    /// Protocol version, always [`VERSION`].
    pub mailferry: u32,
    /// Always [`Kind::Reply`].
    #[serde(rename = "type")]
    pub kind: Kind,
    /// The recipient this reply is for.
    pub recipient: String,
    /// The channel it brings (absent: [`DEFAULT_CHANNEL`]); always the request's.
    #[serde(default = "default_channel", skip_serializing_if = "is_default_channel")]
    pub channel: String,
    /// The nonce of the request answered.
    pub nonce: Nonce,
    /// The seq of the request answered.
    pub request_seq: u64,
    /// Random id shared by all parts of this reply.
    pub reply_id: ReplyId,
    /// This part's number, from 1.
    pub part: u32,
    /// How many parts the reply has.
    pub parts: u32,
    /// Seconds since the Unix epoch when the reply was made (a hint).
    pub created: u64,
    /// The generation this reply brings the recipient to.
    pub generation: u64,
    /// Root of that whole generation.
    pub root: Digest,
    /// Root of the recipient tree the operations were computed against (the request's `root`).
    pub base: Digest,
    /// The owner could not rebuild the recipient's tree from a changes-only request (it does not know the
    /// generation named): the reply carries no operations, and the next request must list the full tree.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub need_full_inventory: bool,
    /// The pack's chunks, in order; chunk `k` is carried by part `k`.
    #[serde(deserialize_with = "payload_list")]
    pub payloads: Vec<Payload>,
    /// Where in the pack the [`Body`] is (JSON, zstd-compressed).
    pub body: Frame,
    /// A new key for this recipient (`mailferry owner rotate-key`), sealed under the key that
    /// authenticates this reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rekey: Option<Rekey>,
    /// A **reference reply**: the owner already answered this recipient's tree, for this generation, with
    /// another reply, still on its way or lost. This reply carries no operations; the recipient uses the
    /// reply referred to (asking for its parts again if they were lost), or asks `fresh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_as: Option<SameAs>,
    /// The owner will not send this channel to this recipient (or not now): the reply carries no
    /// operations and changes nothing but what the recipient shows. Its `generation` and `root` are the
    /// request's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standing: Option<Standing>,
    /// The recipient is pinned at this generation of the channel: it is brought there and no further.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<u64>,
    /// The channel encrypts (`docs/protocol.md` §6.6): the pack is encrypted under the channel's key, which
    /// travels here sealed under the key that authenticates this reply. The payloads' sizes and digests
    /// are of the encrypted pack; the body frame's and the body's offsets are in the decrypted pack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_key: Option<SealedKey>,
    /// A **ticket** (`docs/protocol.md` §7.11): this reply's chunks travel as the parts of the broadcast
    /// named here, signed by the owner and sent once to every recipient on the same tree; the ticket
    /// itself carries no attachment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broadcast: Option<broadcast::BroadcastRef>,
}

/// How a reply's pack is encrypted, and the channel key that decrypts it, sealed for the recipient.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SealedKey {
    /// The channel key's epoch (a new one on `owner channel rekey`).
    pub epoch: u64,
    /// The channel key, sealed by [`Key::seal_channel_key`] under the key whose MAC this reply carries:
    /// 120 hex digits.
    pub sealed: String,
    /// The stream's random nonce prefix ([`crate::crypto::stream`]): 38 hex digits.
    pub nonce_prefix: String,
    /// Length of the decrypted pack.
    pub plain_size: u64,
    /// Always [`crate::crypto::stream::ALG`].
    pub alg: String,
}

impl SealedKey {
    /// The nonce prefix as bytes, if it is 19 bytes of hex.
    pub fn prefix(&self) -> Option<[u8; crate::crypto::stream::PREFIX]> {
        unhex(&self.nonce_prefix)?.try_into().ok()
    }
}

/// The associated data of every segment of a reply's encrypted pack: the reply's recipient, channel, id,
/// generation and root, so a pack decrypts only as the reply it was made for.
pub fn pack_aad(reply: &Reply) -> Vec<u8> {
    // A ticket's pack is the broadcast's, encrypted once for every recipient: bound to the broadcast.
    if let Some(b) = &reply.broadcast {
        return broadcast::broadcast_pack_aad(&b.id, &reply.channel, reply.generation, &reply.root, &reply.base);
    }
    let fields = (&reply.recipient, &reply.channel, &reply.reply_id, reply.generation, &reply.root);
    [b"mailferry pack v1\0".as_slice(), &encode(&fields)].concat()
}

/// Why the owner answers a request without an update (`docs/protocol.md` §4.4). A channel that does not
/// exist and one that exists without a grant get the same answer: a recipient learns nothing of channels
/// it may not have.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Standing {
    /// No grant reaches this recipient for the channel.
    NotEntitled,
    /// Its grants ended: the last valid day was `on` (`YYYY-MM-DD`, UTC).
    Expired {
        /// The last day of the grant.
        on: String,
    },
    /// The owner suspended this recipient.
    Suspended,
    /// The recipient has a generation newer than the one it is pinned at: nothing is sent until the pin
    /// moves.
    Pinned {
        /// The generation it is pinned at.
        at: u64,
    },
}

impl fmt::Display for Standing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Standing::NotEntitled => f.write_str("not-entitled"),
            Standing::Expired { on } => write!(f, "expired on {on}"),
            Standing::Suspended => f.write_str("suspended"),
            Standing::Pinned { at } => write!(f, "pinned at {at}"),
        }
    }
}

/// The earlier reply a reference reply points to.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SameAs {
    /// Its id (32 hex digits).
    pub reply_id: ReplyId,
    /// The nonce of the request it answered.
    pub nonce: Nonce,
    /// How many parts it has.
    pub parts: u32,
}

/// A recipient's next key, delivered inside an authenticated reply.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Rekey {
    /// Public id of the new key.
    pub key_id: KeyId,
    /// The new key, sealed by [`Key::seal_key`] under the key whose MAC this reply carries.
    pub sealed: String,
    /// Seconds the old key stays valid after the recipient takes up the new one (for messages already
    /// on their way).
    pub grace: u64,
}

impl Reply {
    /// Total length of the pack as it travels (encrypted, when the channel encrypts).
    pub fn pack_size(&self) -> u64 {
        self.payloads.iter().map(|p| p.size).sum()
    }

    /// Length of the pack its frames and sources point into: the decrypted pack's, when it is encrypted.
    pub fn plain_pack_size(&self) -> u64 {
        self.sealed_key.as_ref().map_or_else(|| self.pack_size(), |k| k.plain_size)
    }

    /// The chunk this part carries.
    pub fn own_payload(&self) -> Option<&Payload> {
        usize::try_from(self.part).ok().and_then(|k| k.checked_sub(1)).and_then(|i| self.payloads.get(i))
    }

    /// Whether `other` is another part of the same reply: everything but the part number agrees.
    pub fn same_reply(&self, other: &Reply) -> bool {
        Reply { part: other.part, created: other.created, ..self.clone() } == *other
    }
}

/// What a reply does, carried inside its pack.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Body {
    /// Protocol version, always [`VERSION`].
    pub mailferry: u32,
    /// The operations, in any order (they are applied in canonical order).
    #[serde(deserialize_with = "op_list")]
    pub ops: Vec<Op>,
    /// Delta streams that puts take their content from.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "stream_list")]
    pub streams: Vec<Stream>,
}

/// A delta stream: a zstd frame in the pack that, with the concatenated contents of `bases` (which the
/// recipient already has), decodes by its [`Method`] to the concatenated contents of several files.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Stream {
    /// Offset of the frame in the pack.
    pub offset: u64,
    /// Length of the frame.
    pub length: u64,
    /// Length of what it decodes to.
    pub size: u64,
    /// BLAKE3 of what it decodes to.
    pub blake3: Digest,
    /// How the frame and the bases make the output.
    pub method: Method,
    /// The local contents forming the prefix (the base of a patch), in order.
    #[serde(deserialize_with = "base_list")]
    pub bases: Vec<Base>,
}

/// How a delta stream is decoded.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The frame decompresses with the bases as its reference prefix (`zstd --patch-from`); see
    /// [`crate::delta`].
    ZstdPrefix,
    /// The frame decompresses (without a prefix) to a bsdiff patch that turns the bases into the output;
    /// see [`crate::delta::bsdiff`].
    Bsdiff,
    /// The frame decompresses (without a prefix) to a line delta that turns the bases into the output:
    /// deleted line ranges and inserted lines; see [`crate::delta::lines`]. Sent only to a recipient whose
    /// request names it ([`Request::decodes`]).
    Lines,
}

impl Method {
    /// Every method this build decodes.
    pub const ALL: [Method; 3] = [Method::ZstdPrefix, Method::Bsdiff, Method::Lines];

    /// The kebab-case name, as on the wire.
    pub fn code(self) -> &'static str {
        match self {
            Method::ZstdPrefix => "zstd-prefix",
            Method::Bsdiff => "bsdiff",
            Method::Lines => "lines",
        }
    }
}

impl Stream {
    /// The frame and what it decompresses to.
    pub fn frame(&self) -> Frame {
        Frame { offset: self.offset, length: self.length, size: self.size, blake3: self.blake3 }
    }

    /// Length of the prefix.
    pub fn prefix_size(&self) -> u64 {
        self.bases.iter().map(|b| b.size).fold(0, u64::saturating_add)
    }
}

/// Content the recipient has, named by digest.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Base {
    /// BLAKE3 of the content.
    pub blake3: Digest,
    /// Its length.
    pub size: u64,
}

/// A reply whose parts are all here: the shared control fields and the body from the pack.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Update {
    /// The control fields (of any part; they agree).
    pub head: Reply,
    /// The operations and delta streams.
    pub body: Body,
}

/// Which parts of an earlier reply a recipient is still missing.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Resend {
    /// The reply.
    pub reply_id: ReplyId,
    /// The part numbers missing.
    #[serde(deserialize_with = "resend_list")]
    pub parts: Vec<u32>,
}

/// What a recipient did with a reply.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReceiptStatus {
    /// The tree now is the reply's generation.
    Applied,
    /// The tree already was the reply's generation.
    Current,
    /// The recipient refused the authentic reply, or could not apply it (a negative receipt, with a
    /// [`FailureReason`] and a detail); `generation` and `root` say what the tree is now.
    Failed,
    /// A local rollback (`recipient rollback`) took the tree back from the generation this reply brought;
    /// `generation` and `root` say what the tree is now, and newer replies up to the one undone are held.
    RolledBack,
}

impl ReceiptStatus {
    /// The kebab-case code, as on the wire.
    pub fn code(self) -> &'static str {
        match self {
            ReceiptStatus::Applied => "applied",
            ReceiptStatus::Current => "current",
            ReceiptStatus::Failed => "failed",
            ReceiptStatus::RolledBack => "rolled-back",
        }
    }
}

/// Why a recipient did not apply an authentic reply, as a negative receipt says (`docs/protocol.md` §7.3.1).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum FailureReason {
    /// The data tree changed since the request, or holds a link leading outside or a special file.
    LocalTree,
    /// A local rollback holds the reply's generation back.
    Held,
    /// Staging ran out of disk space (`ENOSPC`, `EDQUOT`).
    DiskFull,
    /// Staging failed with another local I/O error (permissions, a read-only file system).
    StagingFailed,
    /// An install hook failed.
    HookFailed,
    /// The operations do not fit the tree, or do not produce the root promised.
    TreeMismatch,
    /// A payload that does not unpack to what was promised, or a limit the reply is over.
    BadPayload,
    /// The reply is for an older generation than the one applied.
    Rollback,
    /// Any other refusal of an authentic reply; the detail says which.
    Refused,
}

impl FailureReason {
    /// The kebab-case code, as on the wire.
    pub fn code(self) -> &'static str {
        match self {
            FailureReason::LocalTree => "local-tree",
            FailureReason::Held => "held",
            FailureReason::DiskFull => "disk-full",
            FailureReason::StagingFailed => "staging-failed",
            FailureReason::HookFailed => "hook-failed",
            FailureReason::TreeMismatch => "tree-mismatch",
            FailureReason::BadPayload => "bad-payload",
            FailureReason::Rollback => "rollback",
            FailureReason::Refused => "refused",
        }
    }

    /// The failure reason for a refusal of an authentic reply.
    pub fn of_refusal(reason: Reason) -> FailureReason {
        match reason {
            Reason::LocalTree => FailureReason::LocalTree,
            Reason::TreeMismatch | Reason::BadPath => FailureReason::TreeMismatch,
            Reason::BadPayload | Reason::Limit => FailureReason::BadPayload,
            Reason::Rollback => FailureReason::Rollback,
            _ => FailureReason::Refused,
        }
    }

    /// Every reason, for documentation and tests.
    pub const ALL: [FailureReason; 9] = [
        FailureReason::LocalTree,
        FailureReason::Held,
        FailureReason::DiskFull,
        FailureReason::StagingFailed,
        FailureReason::HookFailed,
        FailureReason::TreeMismatch,
        FailureReason::BadPayload,
        FailureReason::Rollback,
        FailureReason::Refused,
    ];
}

/// Longest `detail` of a negative receipt, in bytes (§14).
pub const MAX_RECEIPT_DETAIL: usize = 512;

/// Largest receipt control part, in bytes (§14): a receipt's fields with a detail of
/// [`MAX_RECEIPT_DETAIL`] bytes, escaped, fit well within it.
pub const MAX_RECEIPT_BYTES: usize = 4096;

/// Cuts `detail` to at most [`MAX_RECEIPT_DETAIL`] bytes, at a character boundary, for a negative receipt.
pub fn bounded_detail(detail: &str) -> String {
    let mut end = detail.len().min(MAX_RECEIPT_DETAIL);
    while !detail.is_char_boundary(end) {
        end -= 1;
    }
    detail[..end].to_owned()
}

/// A recipient's authenticated receipt.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Receipt {
    /// Protocol version, always [`VERSION`].
    pub mailferry: u32,
    /// Always [`Kind::Receipt`].
    #[serde(rename = "type")]
    pub kind: Kind,
    /// The recipient's registered name.
    pub recipient: String,
    /// The channel of the reply acknowledged (absent: [`DEFAULT_CHANNEL`]).
    #[serde(default = "default_channel", skip_serializing_if = "is_default_channel")]
    pub channel: String,
    /// The nonce of the request whose reply this acknowledges.
    pub nonce: Nonce,
    /// The reply acknowledged.
    pub reply_id: ReplyId,
    /// Seconds since the Unix epoch (a hint).
    pub created: u64,
    /// Generation now applied.
    pub generation: u64,
    /// Root of the tree now.
    pub root: Digest,
    /// Outcome.
    pub status: ReceiptStatus,
    /// [`ReceiptStatus::Failed`] only (and required there): why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<FailureReason>,
    /// [`ReceiptStatus::Failed`] only (and required there): a sentence for the operator, at most
    /// [`MAX_RECEIPT_DETAIL`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The auth part: which key, and the MAC of the control part's exact decoded bytes.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Auth {
    /// Protocol version, always [`VERSION`].
    pub mailferry: u32,
    /// The recipient whose key made the MAC (selects the key; not trusted until the MAC verifies).
    pub recipient: String,
    /// Public id of the key (see [`Key::id`]).
    pub key_id: KeyId,
    /// Always [`MAC_ALG`].
    pub alg: String,
    /// The tag, 64 hex digits.
    pub mac: String,
    /// Replies of an owner with `signing = "hmac+ed25519"`: the owner's Ed25519 signature of the control
    /// part, 128 hex digits (see [`crate::crypto::SigningKey::sign`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Auth {
    /// The auth part for `control` under `key`.
    pub fn sign(recipient: &str, key: &Key, control: &[u8]) -> Auth {
        Auth {
            mailferry: VERSION,
            recipient: recipient.to_owned(),
            key_id: key.id(),
            alg: MAC_ALG.to_owned(),
            mac: hex(&key.mac(control)),
            signature: None,
        }
    }

    /// Adds the owner's signature of `control`.
    #[must_use]
    pub fn signed_by(self, owner: Option<&SigningKey>, control: &[u8]) -> Auth {
        Auth { signature: owner.map(|k| k.sign(control)), ..self }
    }
}

/// A decoded control message of any kind.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Control {
    /// A request.
    Request(Request),
    /// A reply.
    Reply(Box<Reply>),
    /// A receipt.
    Receipt(Receipt),
}

impl Control {
    /// The kind.
    pub fn kind(&self) -> Kind {
        match self {
            Control::Request(_) => Kind::Request,
            Control::Reply(_) => Kind::Reply,
            Control::Receipt(_) => Kind::Receipt,
        }
    }

    /// The recipient named inside.
    pub fn recipient(&self) -> &str {
        match self {
            Control::Request(r) => &r.recipient,
            Control::Reply(r) => &r.recipient,
            Control::Receipt(r) => &r.recipient,
        }
    }
}

/// Canonical bytes of a control message: compact JSON, fields in declaration order, no newline.
///
/// # Panics
/// Never in practice: the control types contain nothing JSON cannot encode.
pub fn encode<T: Serialize>(control: &T) -> Vec<u8> {
    serde_json::to_vec(control).expect("control messages always encode")
}

/// A stable, machine-readable reason for refusing a message; shown in logs, the state database and
/// `mailferry log --rejected`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Reason {
    /// Not a mailferry message, or its structure is broken.
    Malformed,
    /// A protocol version this build does not speak.
    UnsupportedVersion,
    /// Over a configured limit.
    Limit,
    /// The MAC does not verify under the named recipient's key.
    BadMac,
    /// A reply lacks the owner's Ed25519 signature the recipient pinned, or it does not verify.
    BadSignature,
    /// The named recipient is not registered.
    UnknownRecipient,
    /// Authenticated, but for another recipient than this node.
    WrongRecipient,
    /// A request or reply seen before, or a reply to a nonce not outstanding.
    Replay,
    /// A reply for an older generation than the one applied.
    Rollback,
    /// A payload whose digest or size does not match the control part, or an attachment not listed.
    BadPayload,
    /// A hostile path or a tree that cannot be formed.
    BadPath,
    /// The reply does not produce the tree root it promises.
    TreeMismatch,
    /// The local tree has changed since the request the reply answers, or holds something unsafe.
    LocalTree,
    /// The message kind makes no sense for this node (a reply sent to an owner).
    Unexpected,
    /// An encrypted pack does not decrypt: its channel key does not open under this recipient's key, or a
    /// segment does not verify (another key, another reply's data, truncated or changed bytes).
    Undecryptable,
    /// The recipient's `pre-apply` hook (or the update's shipped one) refused to let the update in.
    Vetoed,
}

impl Reason {
    /// The kebab-case code.
    pub fn code(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::UnsupportedVersion => "unsupported-version",
            Reason::Limit => "limit",
            Reason::BadMac => "bad-mac",
            Reason::BadSignature => "bad-signature",
            Reason::UnknownRecipient => "unknown-recipient",
            Reason::WrongRecipient => "wrong-recipient",
            Reason::Replay => "replay",
            Reason::Rollback => "rollback",
            Reason::BadPayload => "bad-payload",
            Reason::BadPath => "bad-path",
            Reason::TreeMismatch => "tree-mismatch",
            Reason::LocalTree => "local-tree",
            Reason::Unexpected => "unexpected",
            Reason::Undecryptable => "undecryptable",
            Reason::Vetoed => "vetoed",
        }
    }
}

/// Why a message was refused: a [`Reason`] and a sentence for the operator.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("{}: {detail}", reason.code())]
pub struct Refusal {
    /// Machine-readable reason.
    pub reason: Reason,
    /// What exactly was wrong.
    pub detail: String,
}

impl Refusal {
    /// A refusal for `reason`.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Refusal {
        Refusal { reason, detail: detail.into() }
    }
}

/// Reads the auth part. It is not trusted yet: it only tells which key to check the MAC with.
///
/// # Errors
/// A refusal when the part is not a v1 auth part.
pub fn decode_auth(bytes: &[u8]) -> Result<Auth, Refusal> {
    if bytes.len() > 4096 {
        return Err(Refusal::new(Reason::Malformed, "auth part is larger than 4096 bytes"));
    }
    check_version(bytes, "auth part")?;
    let auth: Auth = serde_json::from_slice(bytes)
        .map_err(|e| Refusal::new(Reason::Malformed, format!("auth part is not valid: {e}")))?;
    if auth.alg != MAC_ALG {
        return Err(Refusal::new(Reason::UnsupportedVersion, format!("unknown MAC algorithm {:?}", auth.alg)));
    }
    Ok(auth)
}

/// Checks the MAC of `control` against `auth` under `key`, in constant time.
///
/// # Errors
/// [`Reason::BadMac`] when it does not verify.
pub fn verify_mac(key: &Key, auth: &Auth, control: &[u8]) -> Result<(), Refusal> {
    let tag = unhex(&auth.mac).ok_or_else(|| Refusal::new(Reason::BadMac, "MAC is not hex"))?;
    if !key.verify(control, &tag) {
        return Err(Refusal::new(
            Reason::BadMac,
            format!("MAC does not verify under the key of recipient {:?}", auth.recipient),
        ));
    }
    Ok(())
}

/// Inventories whose JSON is larger than this travel as a compressed payload (a 100,000-file tree lists
/// about 15 MB of JSON; compressed it fits a relay's limit).
pub const INVENTORY_INLINE_MAX: usize = 64 * 1024;

/// The attachment name of an inventory payload.
pub const INVENTORY_PAYLOAD_ID: &str = "inventory.zst";

/// The payload for a large inventory: a zstd frame of the JSON array of `entries`.
///
/// # Panics
/// Never in practice: zstd compresses any input in memory.
pub fn pack_inventory(entries: &[Listed]) -> (Payload, Vec<u8>) {
    let bytes = zstd::bulk::compress(&encode(&entries), 9).expect("zstd compresses in memory");
    (Payload { id: INVENTORY_PAYLOAD_ID.to_owned(), size: bytes.len() as u64, blake3: Digest::of(&bytes) }, bytes)
}

/// A request's inventory, inline or from its payload. The payload must be the message's only attachment,
/// with the size and digest the authenticated control part gives; it is decompressed (with a zstd window
/// of at most 8 MiB) and decoded as it streams, cut off at `max-body-bytes`, and must hold at most
/// `max-inventory-entries` entries (with `removed`): a payload over a limit is refused as soon as the
/// limit is passed, before the memory for its entries is spent (see [`bounded`]). A request without a
/// payload must carry no attachment.
///
/// # Errors
/// `bad-payload` for a missing, extra or altered attachment or a frame that does not decode; `limit`
/// when it is too large; `malformed` or `bad-path` for entries that do not parse.
pub fn open_inventory(
    req: &Request,
    attachments: &BTreeMap<String, Vec<u8>>,
    limits: &Limits,
) -> Result<Vec<Listed>, Refusal> {
    let Some(p) = &req.inventory_payload else {
        if let Some(name) = attachments.keys().next() {
            return Err(Refusal::new(Reason::BadPayload, format!("unexpected attachment {name:?}")));
        }
        return Ok(req.inventory.clone());
    };
    if let Some(extra) = attachments.keys().find(|k| **k != p.id) {
        return Err(Refusal::new(Reason::BadPayload, format!("unexpected attachment {extra:?}")));
    }
    let bytes = attachments
        .get(&p.id)
        .ok_or_else(|| Refusal::new(Reason::BadPayload, format!("inventory payload {:?} is missing", p.id)))?;
    if bytes.len() as u64 != p.size || Digest::of(bytes) != p.blake3 {
        return Err(Refusal::new(Reason::BadPayload, "inventory payload does not match its size and digest"));
    }
    #[derive(Deserialize)]
    #[serde(transparent)]
    struct Entries(#[serde(deserialize_with = "inventory_list")] Vec<Listed>);
    // `removed` counts against the same limit.
    let left = Limits {
        max_inventory_entries: limits.max_inventory_entries.saturating_sub(req.removed.len()),
        ..limits.clone()
    };
    let Entries(entries) =
        bounded::decode(|| bounded::zstd_json(bytes), limits.max_body_bytes, &left, "inventory payload")?;
    check_listed(&entries)?;
    Ok(entries)
}

/// Every number in inventory entries is at most [`MAX_INTEGER`].
fn check_listed(entries: &[Listed]) -> Result<(), Refusal> {
    let over = entries.iter().find(|l| matches!(&l.entry, Entry::File(m) if m.size > MAX_INTEGER));
    match over {
        Some(l) => Err(Refusal::new(Reason::Malformed, format!("`{}` has a size over 2^53 - 1", l.path))),
        None => Ok(()),
    }
}

/// Checks the owner's signature of `control` against the pinned `owner` key.
///
/// # Errors
/// [`Reason::BadSignature`] when the auth part has no signature or it does not verify.
pub fn verify_signature(owner: &PublicKey, auth: &Auth, control: &[u8]) -> Result<(), Refusal> {
    let Some(sig) = &auth.signature else {
        return Err(Refusal::new(
            Reason::BadSignature,
            "reply is not signed, but this recipient pinned the owner's Ed25519 key",
        ));
    };
    if !owner.verify(control, sig) {
        return Err(Refusal::new(
            Reason::BadSignature,
            format!("signature does not verify under the pinned owner key {}", owner.to_hex()),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
struct Head {
    mailferry: u32,
    #[serde(rename = "type", default)]
    kind: Option<Kind>,
}

fn check_version(bytes: &[u8], what: &str) -> Result<Option<Kind>, Refusal> {
    let head: Head = serde_json::from_slice(bytes)
        .map_err(|e| Refusal::new(Reason::Malformed, format!("{what} is not a mailferry JSON object: {e}")))?;
    if head.mailferry != VERSION {
        return Err(Refusal::new(
            Reason::UnsupportedVersion,
            format!("{what} speaks protocol version {}, this build speaks {VERSION}", head.mailferry),
        ));
    }
    Ok(head.kind)
}

/// Decodes an authenticated control part and checks what can be checked without local state: version,
/// kind, field consistency and limits.
///
/// Call only after [`verify_mac`] succeeded: a control part is never interpreted before it is
/// authenticated.
///
/// # Errors
/// A refusal naming the first problem.
pub fn decode_control(bytes: &[u8], limits: &Limits) -> Result<Control, Refusal> {
    // The JSON is at most what an inventory payload may unpack to, which holds the same entries.
    if bytes.len() as u64 > limits.max_body_bytes {
        return Err(Refusal::new(
            Reason::Limit,
            format!("control part is {} bytes, limit is {}", bytes.len(), limits.max_body_bytes),
        ));
    }
    let kind = check_version(bytes, "control part")?
        .ok_or_else(|| Refusal::new(Reason::Malformed, "control part has no type"))?;
    let max = limits.max_body_bytes;
    let control = match kind {
        Kind::Request => Control::Request(bounded::decode(|| Ok(bytes), max, limits, "request control part")?),
        Kind::Reply => Control::Reply(Box::new(bounded::decode(|| Ok(bytes), max, limits, "reply control part")?)),
        // A receipt holds no list: its size bounds it, checked before it is decoded (§14).
        Kind::Receipt if bytes.len() > MAX_RECEIPT_BYTES => {
            return Err(Refusal::new(
                Reason::Limit,
                format!("receipt control part is {} bytes, limit is {MAX_RECEIPT_BYTES}", bytes.len()),
            ));
        }
        Kind::Receipt => Control::Receipt(bounded::decode(|| Ok(bytes), max, limits, "receipt control part")?),
    };
    check_integers(&control)?;
    let channel = match &control {
        Control::Request(r) => &r.channel,
        Control::Reply(r) => &r.channel,
        Control::Receipt(r) => &r.channel,
    };
    if !valid_channel_name(channel) {
        return Err(Refusal::new(Reason::Malformed, format!("channel name {channel:?} is not valid")));
    }
    match &control {
        Control::Request(r) => {
            if r.inventory_kind == InventoryKind::Full && !r.removed.is_empty() {
                return Err(Refusal::new(Reason::Malformed, "a full inventory lists no removed paths"));
            }
            if let Some(p) = &r.inventory_payload {
                if !r.inventory.is_empty() {
                    return Err(Refusal::new(Reason::Malformed, "inventory is both inline and a payload"));
                }
                if p.id != INVENTORY_PAYLOAD_ID {
                    return Err(Refusal::new(
                        Reason::Malformed,
                        format!("inventory payload id {:?} is not allowed", p.id),
                    ));
                }
            }
            if let Some(facts) = &r.registration
                && let Err(e) = facts.validate()
            {
                return Err(Refusal::new(Reason::Malformed, format!("registration facts: {e}")));
            }
            if r.inventory.len() + r.removed.len() > limits.max_inventory_entries {
                return Err(Refusal::new(
                    Reason::Limit,
                    format!("inventory has {} entries, limit is {}", r.inventory.len(), limits.max_inventory_entries),
                ));
            }
        }
        Control::Reply(r) => check_reply_shape(r, limits)?,
        Control::Receipt(r) => {
            if !valid_reply_id(r.reply_id.as_str()) {
                return Err(Refusal::new(Reason::Malformed, format!("reply id {:?} is not 32 hex digits", r.reply_id)));
            }
            // A negative receipt says why, and only a negative receipt does.
            let failed = r.status == ReceiptStatus::Failed;
            if failed != r.reason.is_some() || failed != r.detail.is_some() {
                return Err(Refusal::new(
                    Reason::Malformed,
                    format!("a receipt with status {} has reason and detail only when it is failed", r.status.code()),
                ));
            }
            if let Some(d) = &r.detail
                && d.len() > MAX_RECEIPT_DETAIL
            {
                return Err(Refusal::new(
                    Reason::Limit,
                    format!("receipt detail is {} bytes, limit is {MAX_RECEIPT_DETAIL}", d.len()),
                ));
            }
        }
    }
    Ok(control)
}

/// Whether `s` is a date written `YYYY-MM-DD` (the form grants expire on).
pub fn valid_date(s: &str) -> bool {
    parse_date(s).is_some()
}

/// The Unix time of midnight UTC starting day `s` (`YYYY-MM-DD`), if it is a real date from 1970 to 9999.
pub fn parse_date(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let t = &s[r];
        t.bytes().all(|c| c.is_ascii_digit()).then(|| t.parse().ok()).flatten()
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if y < 1970 || !(1..=12).contains(&m) || d == 0 || d > days_in[m as usize - 1] {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), for the proleptic Gregorian calendar.
    let (y, m, d) = (i64::from(y) - i64::from(m <= 2), i64::from(m), i64::from(d));
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(((era * 146_097 + doe - 719_468) * 86_400) as u64)
}

/// The date (`YYYY-MM-DD`, UTC) of Unix time `t`.
pub fn format_date(t: u64) -> String {
    let s = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t)).to_string();
    s[..10].to_owned()
}

/// The numbers of a control part are at most [`MAX_INTEGER`]; sizes and offsets of a reply are bounded
/// further by the limits ([`check_reply_shape`]).
fn check_integers(control: &Control) -> Result<(), Refusal> {
    let fields: Vec<(&str, u64)> = match control {
        Control::Request(r) => {
            check_listed(&r.inventory)?;
            let payload = r.inventory_payload.as_ref().map_or(0, |p| p.size);
            vec![("seq", r.seq), ("created", r.created), ("generation", r.generation), ("payload size", payload)]
        }
        Control::Reply(r) => {
            let at = match &r.standing {
                Some(Standing::Pinned { at }) => *at,
                _ => 0,
            };
            vec![
                ("request-seq", r.request_seq),
                ("created", r.created),
                ("generation", r.generation),
                ("pinned", r.pinned.unwrap_or(0)),
                ("pinned at", at),
            ]
        }
        Control::Receipt(r) => vec![("created", r.created), ("generation", r.generation)],
    };
    match fields.iter().find(|(_, v)| *v > MAX_INTEGER) {
        Some((name, v)) => Err(Refusal::new(Reason::Malformed, format!("{name} {v} is over 2^53 - 1"))),
        None => Ok(()),
    }
}

fn check_reply_shape(r: &Reply, limits: &Limits) -> Result<(), Refusal> {
    if !valid_reply_id(r.reply_id.as_str()) {
        return Err(Refusal::new(Reason::Malformed, format!("reply id {:?} is not 32 hex digits", r.reply_id)));
    }
    if let Some(standing) = &r.standing {
        // An answer without an update carries nothing to apply or take up.
        if r.same_as.is_some() || r.rekey.is_some() || r.need_full_inventory || r.parts != 1 {
            return Err(Refusal::new(
                Reason::Malformed,
                format!("a {standing} reply has one part and no same-as, rekey or need-full-inventory"),
            ));
        }
        if let Standing::Expired { on } = standing
            && !valid_date(on)
        {
            return Err(Refusal::new(Reason::Malformed, format!("expiry date {on:?} is not YYYY-MM-DD")));
        }
    }
    if let Some(b) = &r.broadcast {
        // A ticket answers with an update carried elsewhere: one message, nothing else it could be.
        if !valid_reply_id(b.id.as_str()) || b.id == r.reply_id {
            return Err(Refusal::new(Reason::Malformed, format!("broadcast id {:?} is not valid", b.id)));
        }
        if r.standing.is_some() || r.same_as.is_some() || r.need_full_inventory || r.part != 1 {
            return Err(Refusal::new(
                Reason::Malformed,
                "a ticket is part 1 and has no standing, same-as or need-full-inventory",
            ));
        }
    }
    if let Some(same) = &r.same_as {
        // The id names a directory of kept parts, and the count a resend to ask for: both are bounded.
        if !valid_reply_id(same.reply_id.as_str()) || same.reply_id == r.reply_id {
            return Err(Refusal::new(Reason::Malformed, format!("same-as names reply {:?}", same.reply_id)));
        }
        if same.parts == 0 || same.parts as usize > limits.max_parts {
            return Err(Refusal::new(Reason::Limit, format!("same-as names a reply in {} parts", same.parts)));
        }
    }
    if r.part == 0 || r.part > r.parts || r.parts as usize > limits.max_parts {
        return Err(Refusal::new(Reason::Limit, format!("part {} of {} is out of range", r.part, r.parts)));
    }
    if r.payloads.len() != r.parts as usize {
        return Err(Refusal::new(
            Reason::Malformed,
            format!("reply in {} parts lists {} chunks", r.parts, r.payloads.len()),
        ));
    }
    let ids: BTreeSet<&str> = r.payloads.iter().map(|p| p.id.as_str()).collect();
    if ids.len() != r.payloads.len() {
        return Err(Refusal::new(Reason::Malformed, "a payload id is listed twice"));
    }
    if let Some(p) = r.payloads.iter().find(|p| !valid_payload_id(&p.id)) {
        return Err(Refusal::new(Reason::Malformed, format!("payload id {:?} is not allowed", p.id)));
    }
    let pack = r.payloads.iter().try_fold(0u64, |sum, p| sum.checked_add(p.size));
    let Some(pack) = pack.filter(|&n| n <= limits.max_reply_bytes) else {
        return Err(Refusal::new(Reason::Limit, format!("pack is larger than {} bytes", limits.max_reply_bytes)));
    };
    if let Some(k) = &r.sealed_key {
        // The ciphertext's length follows from the plaintext's: anything else is not a stream we make.
        let shaped = k.prefix().is_some()
            && k.alg == crate::crypto::stream::ALG
            && k.sealed.len() == 120
            && k.sealed.bytes().all(|b| b.is_ascii_hexdigit());
        if !shaped || k.epoch == 0 || k.epoch > MAX_INTEGER {
            return Err(Refusal::new(
                Reason::Malformed,
                "sealed-key is not a positive epoch, a 120-digit sealed key, a 38-digit nonce prefix and a known alg",
            ));
        }
        if r.standing.is_some() {
            return Err(Refusal::new(Reason::Malformed, "an answer without an update carries no sealed-key"));
        }
        if crate::crypto::stream::sealed_len(k.plain_size) != Some(pack) {
            return Err(Refusal::new(
                Reason::BadPayload,
                format!("an encrypted pack of {pack} bytes cannot hold the {} bytes sealed-key declares", k.plain_size),
            ));
        }
    }
    check_frame("body", &r.body, r.plain_pack_size())?;
    // No zstd frame is longer than this for its output, so a recipient never reads more for the body.
    if r.body.length > zstd::zstd_safe::compress_bound(usize::try_from(r.body.size).unwrap_or(usize::MAX)) as u64 {
        return Err(Refusal::new(Reason::BadPayload, "body frame is longer than any zstd frame of its size"));
    }
    if let Some(k) = &r.rekey {
        let hex_of = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_of(k.key_id.as_str(), 16) || !hex_of(&k.sealed, 120) || k.grace > MAX_REKEY_GRACE {
            return Err(Refusal::new(
                Reason::Malformed,
                "rekey is not a 16-digit key id, a 120-digit sealed key and a grace of at most a year",
            ));
        }
    }
    if r.body.size > limits.max_body_bytes {
        return Err(Refusal::new(
            Reason::Limit,
            format!("body unpacks to {} bytes, limit is {}", r.body.size, limits.max_body_bytes),
        ));
    }
    Ok(())
}

fn check_frame(what: &str, f: &Frame, pack: u64) -> Result<(), Refusal> {
    if f.offset.checked_add(f.length).is_none_or(|end| end > pack) {
        return Err(Refusal::new(Reason::BadPayload, format!("{what} points outside the pack")));
    }
    Ok(())
}

/// Decodes the body of a complete reply (the JSON its body frame decompressed to) and checks it against
/// the control fields and `limits`: every operation is well formed, every put names content that exists
/// (a frame or delta stream inside the pack, or a local copy), and the totals stay under the limits.
///
/// # Errors
/// A refusal naming the first problem.
pub fn decode_body(head: &Reply, bytes: &[u8], limits: &Limits) -> Result<Body, Refusal> {
    check_version(bytes, "reply body")?;
    let body = bounded::decode(|| Ok(bytes), limits.max_body_bytes, limits, "reply body")?;
    checked_body(head, body, limits)
}

fn checked_body(head: &Reply, body: Body, limits: &Limits) -> Result<Body, Refusal> {
    if body.mailferry != VERSION {
        return Err(Refusal::new(
            Reason::UnsupportedVersion,
            format!("reply body speaks protocol version {}, this build speaks {VERSION}", body.mailferry),
        ));
    }
    check_body(head, &body, limits)?;
    Ok(body)
}

/// Decompresses the body frame (`frame`, the bytes at the head's `body` offset and length in the pack),
/// checks it against its size and digest, and decodes it like [`decode_body`]. The frame is decompressed
/// as it is read, never whole: once to check it, then as it is decoded (see [`bounded`]), with a zstd
/// window of at most 8 MiB.
///
/// # Errors
/// A refusal naming the first problem.
pub fn open_body(head: &Reply, frame: &[u8], limits: &Limits) -> Result<Body, Refusal> {
    let size = head.body.size;
    let mut hasher = blake3::Hasher::new();
    let mut dec =
        bounded::zstd_json(frame).map_err(|r| Refusal::new(Reason::BadPayload, format!("reply body: {r}")))?;
    let n = std::io::copy(&mut std::io::Read::take(&mut dec, size.saturating_add(1)), &mut hasher)
        .map_err(|e| Refusal::new(Reason::BadPayload, format!("reply body: bad zstd frame: {e}")))?;
    if n > size {
        return Err(Refusal::new(
            Reason::BadPayload,
            format!("reply body unpacks to more than the declared {size} bytes"),
        ));
    }
    if n != size || Digest::from(hasher.finalize()) != head.body.blake3 {
        return Err(Refusal::new(Reason::BadPayload, "reply body does not match its digest"));
    }
    let body = bounded::decode(|| bounded::zstd_json(frame), size, limits, "reply body")?;
    checked_body(head, body, limits)
}

/// The checks of [`decode_body`] on a decoded body.
///
/// # Errors
/// A refusal naming the first problem.
pub fn check_body(head: &Reply, body: &Body, limits: &Limits) -> Result<(), Refusal> {
    if body.ops.len() > limits.max_files_per_reply {
        return Err(Refusal::new(
            Reason::Limit,
            format!("reply has {} operations, limit is {}", body.ops.len(), limits.max_files_per_reply),
        ));
    }
    if head.need_full_inventory && !body.ops.is_empty() {
        return Err(Refusal::new(Reason::Malformed, "a reply asking for a full inventory carries operations"));
    }
    let pack = head.plain_pack_size();
    let mut total: u64 = 0;
    for (i, s) in body.streams.iter().enumerate() {
        check_frame(&format!("delta stream {i}"), &s.frame(), pack)?;
        total = total.saturating_add(s.size);
        let window = s.prefix_size().saturating_add(s.size);
        if window > limits.max_delta_window || s.bases.len() > limits.max_files_per_reply {
            return Err(Refusal::new(
                Reason::Limit,
                format!("delta stream {i} needs a {window}-byte window, limit is {}", limits.max_delta_window),
            ));
        }
    }
    // A path may be deleted once and created (or changed) once: that is a type change. Anything more is a
    // reply no owner writes.
    let mut deleted = std::collections::HashSet::new();
    let mut written = std::collections::HashSet::new();
    for op in &body.ops {
        let fresh = match op {
            Op::Delete { path } => deleted.insert(path),
            other => written.insert(other.path()),
        };
        if !fresh {
            return Err(Refusal::new(Reason::Malformed, format!("`{}` is operated on twice", op.path())));
        }
    }
    for op in &body.ops {
        let Op::Put { path, size, source, .. } = op else { continue };
        if *size > limits.max_file_bytes {
            return Err(Refusal::new(
                Reason::Limit,
                format!("`{path}` is {size} bytes, limit per file is {}", limits.max_file_bytes),
            ));
        }
        let source =
            source.as_ref().ok_or_else(|| Refusal::new(Reason::Malformed, format!("put `{path}` names no source")))?;
        match source {
            Source::Pack { offset, length } => {
                total = total.saturating_add(*size);
                let f = Frame { offset: *offset, length: *length, size: *size, blake3: Digest([0; 32]) };
                check_frame(&format!("put `{path}`"), &f, pack)?;
            }
            Source::Delta { stream, start } => {
                let s = usize::try_from(*stream).ok().and_then(|i| body.streams.get(i)).ok_or_else(|| {
                    Refusal::new(Reason::BadPayload, format!("put `{path}` names unknown delta stream {stream}"))
                })?;
                if start.checked_add(*size).is_none_or(|end| end > s.size) {
                    return Err(Refusal::new(
                        Reason::BadPayload,
                        format!("put `{path}` points outside delta stream {stream}"),
                    ));
                }
            }
            Source::Local => total = total.saturating_add(*size),
        }
    }
    if total > limits.max_reply_bytes {
        return Err(Refusal::new(
            Reason::Limit,
            format!("reply unpacks to {total} bytes, limit is {}", limits.max_reply_bytes),
        ));
    }
    Ok(())
}

/// A part must carry exactly its own chunk, with the listed size and digest: an unlisted attachment is
/// refused, not ignored.
///
/// # Errors
/// [`Reason::BadPayload`] naming the first attachment that does not fit.
pub fn check_payloads(reply: &Reply, attachments: &BTreeMap<String, Vec<u8>>) -> Result<(), Refusal> {
    let own = reply
        .own_payload()
        .ok_or_else(|| Refusal::new(Reason::Malformed, format!("part {} lists no chunk of its own", reply.part)))?;
    if let Some(extra) = attachments.keys().find(|k| **k != own.id) {
        return Err(Refusal::new(
            Reason::BadPayload,
            format!("attachment {extra:?} is not this part's chunk ({:?})", own.id),
        ));
    }
    let bytes = attachments
        .get(&own.id)
        .ok_or_else(|| Refusal::new(Reason::BadPayload, format!("payload {:?} is missing", own.id)))?;
    if bytes.len() as u64 != own.size || Digest::of(bytes) != own.blake3 {
        return Err(Refusal::new(
            Reason::BadPayload,
            format!("payload {:?} does not match its digest ({} bytes, expected {})", own.id, bytes.len(), own.size),
        ));
    }
    Ok(())
}

/// Reply ids are 32 lowercase hex digits (they name a staging directory, so nothing else is allowed).
pub fn valid_reply_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The id shared by all parts of one reply: 32 lowercase hex digits, drawn at random by the owner. On the
/// wire and in the state database it is the bare string; decoding accepts any string, and
/// [`decode_control`] refuses those that are not ids ([`valid_reply_id`]).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReplyId(String);

impl ReplyId {
    /// `s` as a reply id, if it is one ([`valid_reply_id`]).
    pub fn new(s: impl Into<String>) -> Option<ReplyId> {
        let s = s.into();
        valid_reply_id(&s).then_some(ReplyId(s))
    }
}

string_id!(ReplyId);

/// Payload ids are short, boring file names: `[a-z0-9][a-z0-9.-]{0,63}`.
pub fn valid_payload_id(id: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    id.len() <= 64
        && id.bytes().next().is_some_and(alnum)
        && id.bytes().all(|b| alnum(b) || b == b'.' || b == b'-')
        && id != envelope::CONTROL_NAME
        && id != envelope::AUTH_NAME
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Entry, FileMeta, LinkTarget, Mode, Source};
    use crate::path::RelPath;

    fn reply() -> Reply {
        Reply {
            mailferry: VERSION,
            kind: Kind::Reply,
            recipient: "site1".into(),
            channel: DEFAULT_CHANNEL.into(),
            standing: None,
            pinned: None,
            nonce: Nonce([7; 16]),
            request_seq: 3,
            reply_id: ReplyId::unchecked("0123456789abcdef0123456789abcdef"),
            part: 1,
            parts: 1,
            created: 0,
            generation: 2,
            root: Digest([1; 32]),
            base: Digest([2; 32]),
            need_full_inventory: false,
            payloads: vec![Payload { id: "pack-0001.bin".into(), size: 100, blake3: Digest([3; 32]) }],
            body: Frame { offset: 10, length: 90, size: 400, blake3: Digest([4; 32]) },
            rekey: None,
            same_as: None,
            sealed_key: None,
            broadcast: None,
        }
    }

    fn body() -> Body {
        let content = b"hello";
        Body {
            mailferry: VERSION,
            ops: vec![Op::Put {
                path: RelPath::new("a/b").unwrap(),
                size: 5,
                mode: Mode::Executable,
                blake3: Digest::of(content),
                source: Some(Source::Pack { offset: 0, length: 10 }),
            }],
            streams: vec![],
        }
    }

    fn check(r: &Reply, b: &Body, limits: &Limits) -> Result<Body, Refusal> {
        decode_body(r, &encode(b), limits)
    }

    #[test]
    fn reply_round_trips_and_is_one_line() {
        let r = reply();
        let bytes = encode(&r);
        assert!(!bytes.contains(&b'\n'));
        assert!(bytes.starts_with(br#"{"mailferry":1,"type":"reply""#), "{}", String::from_utf8_lossy(&bytes));
        assert_eq!(decode_control(&bytes, &Limits::default()).unwrap(), Control::Reply(Box::new(r.clone())));
        assert_eq!(check(&r, &body(), &Limits::default()).unwrap(), body());
    }

    #[test]
    fn sources_must_lie_inside_the_pack_or_a_stream() {
        let limits = Limits::default();
        let r = reply();
        let mut b = body();
        let set = |b: &mut Body, s: Option<Source>| {
            let Op::Put { source, .. } = &mut b.ops[0] else { unreachable!() };
            *source = s;
        };
        set(&mut b, Some(Source::Pack { offset: 95, length: 10 }));
        assert_eq!(check(&r, &b, &limits).unwrap_err().reason, Reason::BadPayload);
        set(&mut b, Some(Source::Delta { stream: 0, start: 0 }));
        assert_eq!(check(&r, &b, &limits).unwrap_err().reason, Reason::BadPayload, "no such stream");
        let stream = Stream {
            offset: 0,
            length: 10,
            size: 4,
            blake3: Digest([5; 32]),
            method: Method::ZstdPrefix,
            bases: vec![Base { blake3: Digest([6; 32]), size: 1000 }],
        };
        b.streams.push(stream.clone());
        assert_eq!(check(&r, &b, &limits).unwrap_err().reason, Reason::BadPayload, "5 bytes from a 4-byte stream");
        b.streams[0].size = 5;
        check(&r, &b, &limits).unwrap();
        let small = Limits { max_delta_window: 1000, ..Limits::default() };
        assert_eq!(check(&r, &b, &small).unwrap_err().reason, Reason::Limit, "prefix + output over the window");
        b.streams[0].offset = 95;
        assert_eq!(check(&r, &b, &limits).unwrap_err().reason, Reason::BadPayload, "stream outside the pack");
        b.streams[0].offset = 0;
        set(&mut b, None);
        assert_eq!(check(&r, &b, &limits).unwrap_err().reason, Reason::Malformed);
    }

    #[test]
    fn a_stream_names_its_method_explicitly() {
        let (r, l) = (reply(), Limits::default());
        let mut b = body();
        let Op::Put { source, .. } = &mut b.ops[0] else { unreachable!() };
        *source = Some(Source::Delta { stream: 0, start: 0 });
        for (method, code) in [(Method::ZstdPrefix, "zstd-prefix"), (Method::Bsdiff, "bsdiff")] {
            let base = Base { blake3: Digest([6; 32]), size: 1000 };
            b.streams =
                vec![Stream { offset: 0, length: 10, size: 5, blake3: Digest([5; 32]), method, bases: vec![base] }];
            let json = String::from_utf8(encode(&b)).unwrap();
            assert!(json.contains(&format!(r#""method":"{code}","bases""#)), "{json}");
            assert_eq!(method.code(), code);
            assert_eq!(check(&r, &b, &l).unwrap(), b);
            let missing = json.replace(&format!(r#""method":"{code}","#), "");
            let unknown = json.replace(&format!(r#""method":"{code}""#), r#""method":"xdelta""#);
            for bad in [missing, unknown] {
                assert_eq!(decode_body(&r, bad.as_bytes(), &l).unwrap_err().reason, Reason::Malformed, "{bad}");
            }
        }
    }

    #[test]
    fn parts_list_one_chunk_each() {
        let limits = Limits::default();
        let mut r = reply();
        r.parts = 2;
        assert_eq!(decode_control(&encode(&r), &limits).unwrap_err().reason, Reason::Malformed);
        r.payloads.push(Payload { id: "pack-0002.bin".into(), size: 7, blake3: Digest([8; 32]) });
        decode_control(&encode(&r), &limits).unwrap();
        r.body.offset = 100;
        assert_eq!(decode_control(&encode(&r), &limits).unwrap_err().reason, Reason::BadPayload);
        r.body.offset = 10;
        let mut second = r.clone();
        second.part = 2;
        assert!(r.same_reply(&second));
        second.generation += 1;
        assert!(!r.same_reply(&second));
        // Each part carries exactly its own chunk.
        let chunk = vec![1u8; 7];
        let own = Payload { id: "pack-0002.bin".into(), size: 7, blake3: Digest::of(&chunk) };
        let mut p2 = Reply { part: 2, ..r.clone() };
        p2.payloads[1] = own;
        let attachments = BTreeMap::from([("pack-0002.bin".to_owned(), chunk.clone())]);
        check_payloads(&p2, &attachments).unwrap();
        let wrong = BTreeMap::from([("pack-0001.bin".to_owned(), chunk.clone())]);
        assert_eq!(check_payloads(&p2, &wrong).unwrap_err().reason, Reason::BadPayload);
        let mut extra = attachments.clone();
        extra.insert("evil.sh".into(), b"x".to_vec());
        assert_eq!(check_payloads(&p2, &extra).unwrap_err().reason, Reason::BadPayload);
        let mut flipped = attachments;
        flipped.get_mut("pack-0002.bin").unwrap()[0] ^= 1;
        assert_eq!(check_payloads(&p2, &flipped).unwrap_err().reason, Reason::BadPayload);
    }

    #[test]
    fn refusals_name_their_reason() {
        let limits = Limits::default();
        let cases: Vec<(Vec<u8>, Reason)> = vec![
            (b"not json".to_vec(), Reason::Malformed),
            (br#"{"mailferry":2,"type":"reply"}"#.to_vec(), Reason::UnsupportedVersion),
            (br#"{"mailferry":1}"#.to_vec(), Reason::Malformed),
            (
                String::from_utf8(encode(&reply())).unwrap().replace("\"length\":90", "\"length\":91").into_bytes(),
                Reason::BadPayload,
            ),
            (
                String::from_utf8(encode(&reply())).unwrap().replace("\"parts\":1", "\"parts\":0").into_bytes(),
                Reason::Limit,
            ),
            (
                String::from_utf8(encode(&reply()))
                    .unwrap()
                    .replace("\"recipient\"", "\"extra\":1,\"recipient\"")
                    .into_bytes(),
                Reason::Malformed,
            ),
        ];
        for (bytes, want) in cases {
            let got = decode_control(&bytes, &limits).expect_err(&String::from_utf8_lossy(&bytes));
            assert_eq!(got.reason, want, "{got}");
        }
        let (r, b) = (reply(), String::from_utf8(encode(&body())).unwrap());
        let body_cases: Vec<(String, Reason)> = vec![
            (b.replace("a/b", "../b"), Reason::BadPath),
            (b.replace("a/b", "/etc/b"), Reason::BadPath),
            (b.replace("\"mode\":493", "\"mode\":2541"), Reason::Malformed),
            (b.replace("\"length\":10", "\"length\":101"), Reason::BadPayload),
            (b.replace("\"mailferry\":1", "\"mailferry\":2"), Reason::UnsupportedVersion),
            (b.replace("\"ops\"", "\"extra\":1,\"ops\""), Reason::Malformed),
        ];
        for (bytes, want) in body_cases {
            let got = decode_body(&r, bytes.as_bytes(), &limits).expect_err(&bytes);
            assert_eq!(got.reason, want, "{got}");
        }
        let mut non_utf8 = encode(&body());
        let at = non_utf8.windows(3).position(|w| w == b"a/b").unwrap();
        non_utf8[at] = 0xff;
        assert_eq!(decode_body(&r, &non_utf8, &limits).unwrap_err().reason, Reason::Malformed);
    }

    #[test]
    fn ids_that_name_files_are_strict() {
        for bad in ["../evil-reply-id", "/tmp/x", "0123456789abcdef0123456789abcde", "0123456789ABCDEF0123456789ABCDEF"]
        {
            let r = Reply { reply_id: ReplyId::unchecked(bad), ..reply() };
            assert_eq!(decode_control(&encode(&r), &Limits::default()).unwrap_err().reason, Reason::Malformed, "{bad}");
        }
        for (id, ok) in [
            ("p1.zst", true),
            ("pack-0001.bin", true),
            ("-p1", false),
            (".p1", false),
            ("P1", false),
            ("", false),
            ("a/b", false),
        ] {
            assert_eq!(valid_payload_id(id), ok, "{id:?}");
        }
    }

    #[test]
    fn a_path_is_deleted_and_written_at_most_once() {
        let (r, l) = (reply(), Limits::default());
        let mut b = body();
        let put = b.ops[0].clone();
        b.ops.push(put);
        assert_eq!(check(&r, &b, &l).unwrap_err().reason, Reason::Malformed);
        let mut b = body();
        let path = b.ops[0].path().clone();
        b.ops.push(Op::Delete { path: path.clone() });
        assert!(check(&r, &b, &l).is_ok(), "delete + put is a type change");
        b.ops.push(Op::Delete { path });
        assert_eq!(check(&r, &b, &l).unwrap_err().reason, Reason::Malformed);
    }

    #[test]
    fn limits_are_enforced_before_use() {
        let small = Limits { max_file_bytes: 4, ..Limits::default() };
        assert_eq!(check(&reply(), &body(), &small).unwrap_err().reason, Reason::Limit);
        let few = Limits { max_files_per_reply: 0, ..Limits::default() };
        assert_eq!(check(&reply(), &body(), &few).unwrap_err().reason, Reason::Limit);
        let tiny_body = Limits { max_body_bytes: 399, ..Limits::default() };
        assert_eq!(decode_control(&encode(&reply()), &tiny_body).unwrap_err().reason, Reason::Limit);
        let tiny_reply = Limits { max_reply_bytes: 4, ..Limits::default() };
        assert_eq!(check(&reply(), &body(), &tiny_reply).unwrap_err().reason, Reason::Limit);
    }

    #[test]
    fn mac_binds_control_to_key() {
        let key = Key::generate();
        let control = encode(&reply());
        let auth = Auth::sign("site1", &key, &control);
        let auth = decode_auth(&encode(&auth)).unwrap();
        verify_mac(&key, &auth, &control).unwrap();
        let mut flipped = control.clone();
        flipped[20] ^= 1;
        assert_eq!(verify_mac(&key, &auth, &flipped).unwrap_err().reason, Reason::BadMac);
        assert_eq!(verify_mac(&Key::generate(), &auth, &control).unwrap_err().reason, Reason::BadMac);
    }

    /// A negative receipt is a v1 receipt with status `failed`, a reason and a detail; each of the three
    /// belongs with the others, the detail is bounded, and so is the whole receipt before it is decoded.
    #[test]
    fn negative_receipts_carry_a_reason_and_a_bounded_detail() {
        let base = Receipt {
            mailferry: VERSION,
            kind: Kind::Receipt,
            recipient: "site1".into(),
            channel: DEFAULT_CHANNEL.into(),
            nonce: Nonce([7; 16]),
            reply_id: ReplyId::unchecked("ab".repeat(16)),
            created: 0,
            generation: 1,
            root: Digest([1; 32]),
            status: ReceiptStatus::Failed,
            reason: Some(FailureReason::DiskFull),
            detail: Some("no space left on device".into()),
        };
        let limits = Limits::default();
        let decode = |r: &Receipt| decode_control(&encode(r), &limits).map(|_| ()).map_err(|e| e.reason);
        let cases: Vec<(&str, Receipt, Result<(), Reason>)> = vec![
            ("failed with reason and detail", base.clone(), Ok(())),
            (
                "applied without either",
                Receipt { status: ReceiptStatus::Applied, reason: None, detail: None, ..base.clone() },
                Ok(()),
            ),
            (
                "rolled back without either",
                Receipt { status: ReceiptStatus::RolledBack, reason: None, detail: None, ..base.clone() },
                Ok(()),
            ),
            ("failed without a reason", Receipt { reason: None, ..base.clone() }, Err(Reason::Malformed)),
            ("failed without a detail", Receipt { detail: None, ..base.clone() }, Err(Reason::Malformed)),
            (
                "applied with a reason",
                Receipt { status: ReceiptStatus::Applied, detail: None, ..base.clone() },
                Err(Reason::Malformed),
            ),
            (
                "a detail one byte too long",
                Receipt { detail: Some("x".repeat(MAX_RECEIPT_DETAIL + 1)), ..base.clone() },
                Err(Reason::Limit),
            ),
            ("a detail at the limit", Receipt { detail: Some("x".repeat(MAX_RECEIPT_DETAIL)), ..base.clone() }, Ok(())),
        ];
        for (name, r, want) in cases {
            assert_eq!(decode(&r), want, "{name}");
        }
        // A receipt padded past its size is refused before it is decoded.
        let mut padded = encode(&base);
        padded.splice(1..1, std::iter::repeat_n(b' ', MAX_RECEIPT_BYTES));
        assert_eq!(decode_control(&padded, &limits).unwrap_err().reason, Reason::Limit);
        // Unknown reasons are refused, as every unknown enumeration value is (§3).
        let mut v = serde_json::to_value(&base).unwrap();
        v["reason"] = "gremlins".into();
        let err = decode_control(&serde_json::to_vec(&v).unwrap(), &limits).unwrap_err();
        assert_eq!(err.reason, Reason::Malformed);
        // An applied receipt is the same bytes as before the negative receipt existed.
        let applied = Receipt { status: ReceiptStatus::Applied, reason: None, detail: None, ..base };
        assert!(!String::from_utf8(encode(&applied)).unwrap().contains("reason"));
        // Details are cut at a character boundary.
        let long = "é".repeat(MAX_RECEIPT_DETAIL);
        let cut = bounded_detail(&long);
        assert!(cut.len() <= MAX_RECEIPT_DETAIL && cut.chars().all(|c| c == 'é'));
        for r in FailureReason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.code());
        }
    }

    fn request(inventory: Vec<Listed>) -> Request {
        Request {
            mailferry: VERSION,
            kind: Kind::Request,
            recipient: "site1".into(),
            channel: DEFAULT_CHANNEL.into(),
            nonce: Nonce([1; 16]),
            seq: 1,
            created: 0,
            generation: 0,
            root: Digest([0; 32]),
            inventory_kind: InventoryKind::Full,
            inventory,
            removed: vec![],
            inventory_payload: None,
            want: Want::Latest,
            full_content: false,
            resend: None,
            fresh: false,
            registration: None,
            accepts: Vec::new(),
            methods: Vec::new(),
        }
    }

    #[test]
    fn a_request_names_the_delta_methods_it_decodes() {
        let limits = Limits::default();
        let decode = |json: &str| match decode_control(json.as_bytes(), &limits) {
            Ok(Control::Request(r)) => Ok(r),
            Ok(other) => panic!("{other:?}"),
            Err(r) => Err(r.reason),
        };
        let plain = String::from_utf8(encode(&request(vec![]))).unwrap();
        assert!(!plain.contains("methods"), "absent when empty: {plain}");
        let old = decode(&plain).unwrap();
        assert!(old.decodes(Method::ZstdPrefix) && old.decodes(Method::Bsdiff), "every v1 recipient decodes these");
        assert!(!old.decodes(Method::Lines), "a request that does not name `lines` is never sent one");
        let with = |names: &str| plain.replace(r#","want""#, &format!(r#","methods":[{names}],"want""#));
        let new = decode(&with(r#""zstd-prefix","bsdiff","lines""#)).unwrap();
        assert!(new.decodes(Method::Lines));
        assert_eq!(decode(&String::from_utf8(encode(&new)).unwrap()).unwrap(), new, "round trip");
        // Names this build does not know say what a newer recipient decodes: dropped, not refused.
        let newer = decode(&with(r#""lines","xdelta3","lines""#)).unwrap();
        assert_eq!(newer.methods, vec![Method::Lines]);
        let many = vec![r#""lines""#; bounded::MAX_METHODS + 1].join(",");
        assert_eq!(decode(&with(&many)).unwrap_err(), Reason::Limit);
        assert_eq!(decode(&with("1")).unwrap_err(), Reason::Malformed);
    }

    #[test]
    fn a_large_inventory_travels_as_a_checked_payload() {
        let entries: Vec<Listed> = (0..2000)
            .map(|i| Listed { path: RelPath::new(&format!("dir/file-{i:05}")).unwrap(), entry: Entry::Dir })
            .collect();
        let limits = Limits::default();
        let (payload, bytes) = pack_inventory(&entries);
        assert!(bytes.len() * 10 < encode(&entries).len(), "{} bytes compressed", bytes.len());
        let req = Request { inventory_payload: Some(payload.clone()), ..request(vec![]) };
        let decoded = match decode_control(&encode(&req), &limits).unwrap() {
            Control::Request(r) => r,
            other => panic!("{other:?}"),
        };
        let attach = |id: &str, b: &[u8]| BTreeMap::from([(id.to_owned(), b.to_vec())]);
        assert_eq!(open_inventory(&decoded, &attach(INVENTORY_PAYLOAD_ID, &bytes), &limits).unwrap(), entries);

        let reason =
            |atts: BTreeMap<String, Vec<u8>>, limits: &Limits| open_inventory(&req, &atts, limits).unwrap_err().reason;
        let mut altered = bytes.clone();
        altered[10] ^= 1;
        assert_eq!(reason(attach(INVENTORY_PAYLOAD_ID, &altered), &limits), Reason::BadPayload);
        assert_eq!(reason(BTreeMap::new(), &limits), Reason::BadPayload, "missing");
        let mut two = attach(INVENTORY_PAYLOAD_ID, &bytes);
        two.insert("other.bin".into(), vec![1]);
        assert_eq!(reason(two, &limits), Reason::BadPayload, "an extra attachment");
        let small = Limits { max_body_bytes: 1000, ..Limits::default() };
        assert_eq!(reason(attach(INVENTORY_PAYLOAD_ID, &bytes), &small), Reason::Limit, "a bomb is cut off");
        let few = Limits { max_inventory_entries: 10, ..Limits::default() };
        assert_eq!(reason(attach(INVENTORY_PAYLOAD_ID, &bytes), &few), Reason::Limit);
        // A payload that names a hostile path is refused like an inline one.
        let hostile = zstd::bulk::compress(br#"[{"path":"../etc"}]"#, 3).unwrap();
        let p = Payload { id: INVENTORY_PAYLOAD_ID.into(), size: hostile.len() as u64, blake3: Digest::of(&hostile) };
        let r = Request { inventory_payload: Some(p), ..request(vec![]) };
        let err = open_inventory(&r, &attach(INVENTORY_PAYLOAD_ID, &hostile), &limits).unwrap_err();
        assert_eq!(err.reason, Reason::BadPath, "{err}");
        // Inline and payload at once, or under another name, does not decode.
        let both = Request { inventory_payload: Some(payload.clone()), ..request(entries[..1].to_vec()) };
        assert_eq!(decode_control(&encode(&both), &limits).unwrap_err().reason, Reason::Malformed);
        let renamed = Request { inventory_payload: Some(Payload { id: "x.zst".into(), ..payload }), ..request(vec![]) };
        assert_eq!(decode_control(&encode(&renamed), &limits).unwrap_err().reason, Reason::Malformed);
        // Without a payload, any attachment is refused.
        assert_eq!(
            open_inventory(&request(vec![]), &attach("x", b"1"), &limits).unwrap_err().reason,
            Reason::BadPayload
        );
    }

    #[test]
    fn a_rekey_must_be_well_formed() {
        let (old, new) = (Key::generate(), Key::generate());
        let rekey = Rekey { key_id: new.id(), sealed: old.seal_key("site1", &new), grace: 3600 };
        let good = Reply { rekey: Some(rekey.clone()), ..reply() };
        assert_eq!(decode_control(&encode(&good), &Limits::default()).unwrap(), Control::Reply(Box::new(good)));
        for bad in [
            Rekey { key_id: KeyId::unchecked("../x"), ..rekey.clone() },
            Rekey { sealed: rekey.sealed[..100].into(), ..rekey.clone() },
            Rekey { grace: MAX_REKEY_GRACE + 1, ..rekey.clone() },
        ] {
            let r = Reply { rekey: Some(bad), ..reply() };
            assert_eq!(decode_control(&encode(&r), &Limits::default()).unwrap_err().reason, Reason::Malformed);
        }
    }

    #[test]
    fn a_sealed_key_must_be_well_formed_and_fit_the_encrypted_pack() {
        let (mine, ck) = (Key::generate(), Key::generate());
        let sealed = SealedKey {
            epoch: 1,
            sealed: mine.seal_channel_key("site1", DEFAULT_CHANNEL, 1, &ck, [1; 12]),
            nonce_prefix: hex(&[9; crate::crypto::stream::PREFIX]),
            // The pack travels as 100 bytes: 84 of plaintext and one tag.
            plain_size: 84,
            alg: crate::crypto::stream::ALG.into(),
        };
        let body = Frame { offset: 10, length: 70, size: 400, blake3: Digest([4; 32]) };
        let good = Reply { sealed_key: Some(sealed.clone()), body, ..reply() };
        assert_eq!(good.plain_pack_size(), 84);
        assert_eq!(decode_control(&encode(&good), &Limits::default()).unwrap(), Control::Reply(Box::new(good.clone())));
        let refused = |r: &Reply| decode_control(&encode(r), &Limits::default()).unwrap_err().reason;
        for bad in [
            SealedKey { epoch: 0, ..sealed.clone() },
            SealedKey { sealed: sealed.sealed[..100].into(), ..sealed.clone() },
            SealedKey { nonce_prefix: "00".into(), ..sealed.clone() },
            SealedKey { alg: "rot13".into(), ..sealed.clone() },
        ] {
            assert_eq!(refused(&Reply { sealed_key: Some(bad), ..good.clone() }), Reason::Malformed);
        }
        // A plaintext size the ciphertext cannot hold (a pack that is not such a stream).
        for plain_size in [83, 85, 100] {
            let r = Reply { sealed_key: Some(SealedKey { plain_size, ..sealed.clone() }), ..good.clone() };
            assert_eq!(refused(&r), Reason::BadPayload, "{plain_size}");
        }
        // Frames point into the plaintext: the body frame must fit its 84 bytes, not the 100 that travel.
        let beyond = Reply { body: Frame { offset: 10, length: 80, ..body }, ..good.clone() };
        assert_eq!(refused(&beyond), Reason::BadPayload);
        assert!(
            decode_control(&encode(&Reply { sealed_key: None, ..beyond }), &Limits::default()).is_ok(),
            "unencrypted it fits"
        );
        let standing = Reply { standing: Some(Standing::NotEntitled), ..good.clone() };
        assert_eq!(refused(&standing), Reason::Malformed);
        // And so do the body's sources.
        let b = Body {
            mailferry: VERSION,
            ops: vec![Op::Put {
                path: RelPath::new("a").unwrap(),
                mode: Mode::Regular,
                size: 5,
                blake3: Digest([5; 32]),
                source: Some(Source::Pack { offset: 80, length: 10 }),
            }],
            streams: Vec::new(),
        };
        assert_eq!(check_body(&good, &b, &Limits::default()).unwrap_err().reason, Reason::BadPayload);
        assert!(check_body(&Reply { sealed_key: None, ..good.clone() }, &b, &Limits::default()).is_ok());
        // The associated data binds the reply's identity.
        assert_ne!(pack_aad(&good), pack_aad(&Reply { recipient: "site2".into(), ..good.clone() }));
        assert_ne!(pack_aad(&good), pack_aad(&Reply { generation: 3, ..good.clone() }));
        assert_eq!(pack_aad(&good), pack_aad(&Reply { part: 1, created: 99, ..good.clone() }));
    }

    #[test]
    fn signatures_are_checked_only_against_the_pinned_key() {
        let (key, owner) = (Key::generate(), SigningKey::generate());
        let control = encode(&reply());
        let signed = Auth::sign("site1", &key, &control).signed_by(Some(&owner), &control);
        let signed = decode_auth(&encode(&signed)).unwrap();
        verify_signature(&owner.public(), &signed, &control).unwrap();
        let unsigned = Auth::sign("site1", &key, &control);
        assert_eq!(verify_signature(&owner.public(), &unsigned, &control).unwrap_err().reason, Reason::BadSignature);
        let stranger = SigningKey::generate().public();
        assert_eq!(verify_signature(&stranger, &signed, &control).unwrap_err().reason, Reason::BadSignature);
        let mut flipped = control.clone();
        flipped[20] ^= 1;
        assert_eq!(verify_signature(&owner.public(), &signed, &flipped).unwrap_err().reason, Reason::BadSignature);
    }

    #[test]
    fn file_meta_is_consistent_with_listing() {
        let l = Listed {
            path: RelPath::new("x").unwrap(),
            entry: Entry::File(FileMeta { size: 1, mode: Mode::Regular, blake3: Digest([0; 32]) }),
        };
        let json = String::from_utf8(encode(&l)).unwrap();
        assert!(json.contains("\"mode\":420"), "{json}");
        let link = Listed { path: RelPath::new("l").unwrap(), entry: Entry::Link(LinkTarget::new("x").unwrap()) };
        assert_eq!(String::from_utf8(encode(&link)).unwrap(), r#"{"path":"l","link":"x"}"#);
        for bad in [r#"{"path":"l","link":"/etc"}"#, r#"{"path":"l","link":"x","size":1}"#, r#"{"path":"l","link":""}"#]
        {
            assert!(serde_json::from_str::<Listed>(bad).is_err(), "{bad}");
        }
    }
}
