//! The signed broadcast (`docs/protocol.md` §7.11): one payload for every recipient on the same tree.
//!
//! When several recipients need the same update (the same channel, base tree and generation), the owner
//! packs it once and sends it once, as **broadcast parts**: messages with no per-recipient data, signed
//! with the owner's Ed25519 key (never a recipient's MAC), addressed to a list address or to many envelope
//! recipients at once. Each recipient also gets a **ticket**: an ordinary reply to its own request
//! (authenticated by its own HMAC and the owner's signature) whose `broadcast` field says that its chunks
//! travel as the parts of broadcast `id`. The ticket lists the chunks' sizes and digests, so a broadcast
//! part is only ever used as a chunk the ticket's MAC vouches for; its signature only lets a recipient
//! hold it before its ticket arrives, bounded in size and time.
//!
//! Pure: parsing, encoding and signature checks.

use serde::{Deserialize, Deserializer, Serialize};

use super::{Payload, Reason, Refusal, ReplyId, VERSION, default_channel, is_default_channel, payload_list};
use crate::crypto::{PublicKey, SigningKey};
use crate::limits::Limits;
use crate::manifest::Digest;

/// The version of the broadcast format, carried in every broadcast part (`broadcast`) and in the
/// capability a request announces ([`Capability::Broadcast`]).
pub const BROADCAST_VERSION: u32 = 1;

/// The `alg` of a broadcast part's auth part.
pub const BROADCAST_ALG: &str = "ed25519";

/// Most capabilities a request may announce.
pub const MAX_ACCEPTS: usize = 16;

/// Domain separation for broadcast signatures: neither a reply signature nor any other Ed25519 signature
/// of the owner's verifies as one, and a broadcast signature never verifies as a reply's.
pub const BROADCAST_SIGNATURE_CONTEXT: &[u8] = b"mailferry broadcast signature v1\0";

/// What a recipient can take besides plain replies, announced in its requests (`accepts`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub enum Capability {
    /// Tickets and broadcast parts of format [`BROADCAST_VERSION`]; announced only by a recipient that
    /// pinned the owner's Ed25519 key (it could not verify a broadcast part otherwise).
    #[serde(rename = "broadcast-1")]
    Broadcast,
}

impl Capability {
    /// Every capability this build knows.
    pub const ALL: [Capability; 1] = [Capability::Broadcast];

    /// The name on the wire.
    pub fn code(self) -> &'static str {
        match self {
            Capability::Broadcast => "broadcast-1",
        }
    }
}

/// A request's `accepts`: names this build does not know are dropped, not refused (they say what a newer
/// recipient can take), repeats are dropped, and more than [`MAX_ACCEPTS`] names are refused as they come
/// in.
///
/// # Errors
/// Not a list of strings, or too long.
pub fn accepts_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Capability>, D::Error> {
    struct Names;
    impl<'de> serde::de::Visitor<'de> for Names {
        type Value = Vec<Capability>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a list of at most {MAX_ACCEPTS} capability names")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Capability>, A::Error> {
            let mut out = Vec::new();
            let mut n = 0;
            while let Some(name) = seq.next_element::<String>()? {
                n += 1;
                if n > MAX_ACCEPTS {
                    return Err(serde::de::Error::custom(format!("more than {MAX_ACCEPTS} capabilities")));
                }
                if let Some(c) = Capability::ALL.into_iter().find(|c| c.code() == name)
                    && !out.contains(&c)
                {
                    out.push(c);
                }
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Names)
}

/// A ticket's `broadcast` field: the broadcast whose parts carry this reply's chunks.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BroadcastRef {
    /// The broadcast's id (32 hex digits).
    pub id: ReplyId,
}

/// The `type` of a broadcast part.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BroadcastKind {
    /// The only value.
    Broadcast,
}

/// The control part of one broadcast part: chunk `part` of the broadcast's pack, and nothing about any
/// recipient.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Broadcast {
    /// Protocol version, always [`VERSION`].
    pub mailferry: u32,
    /// Always [`BroadcastKind::Broadcast`].
    #[serde(rename = "type")]
    pub kind: BroadcastKind,
    /// The broadcast format, always [`BROADCAST_VERSION`].
    pub broadcast: u32,
    /// The channel whose update it carries (absent: the default channel).
    #[serde(default = "default_channel", skip_serializing_if = "is_default_channel")]
    pub channel: String,
    /// Random id, shared by all its parts and named by every ticket.
    pub broadcast_id: ReplyId,
    /// This part's number, from 1.
    pub part: u32,
    /// How many parts the broadcast has.
    pub parts: u32,
    /// When it was made (a hint).
    pub created: u64,
    /// The generation it brings.
    pub generation: u64,
    /// That generation's root.
    pub root: Digest,
    /// The tree it was computed against.
    pub base: Digest,
    /// The pack's chunks in order; chunk `k` is carried by part `k`.
    #[serde(deserialize_with = "payload_list")]
    pub payloads: Vec<Payload>,
}

impl Broadcast {
    /// The chunk this part carries.
    pub fn own_payload(&self) -> Option<&Payload> {
        usize::try_from(self.part).ok().and_then(|k| k.checked_sub(1)).and_then(|i| self.payloads.get(i))
    }
}

/// A broadcast part's auth part: no recipient, no MAC, the owner's signature only.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BroadcastAuth {
    /// Protocol version, always [`VERSION`].
    pub mailferry: u32,
    /// Always [`BROADCAST_ALG`].
    pub alg: String,
    /// The owner's Ed25519 signature of [`BROADCAST_SIGNATURE_CONTEXT`] ‖ control bytes, 128 hex digits.
    pub signature: String,
}

impl BroadcastAuth {
    /// The auth part of a broadcast part whose control bytes are `control`.
    pub fn sign(owner: &SigningKey, control: &[u8]) -> BroadcastAuth {
        BroadcastAuth {
            mailferry: VERSION,
            alg: BROADCAST_ALG.to_owned(),
            signature: owner.sign_with(BROADCAST_SIGNATURE_CONTEXT, control),
        }
    }
}

/// Whether an auth part (not trusted) says it is a broadcast part's: its `alg` is [`BROADCAST_ALG`].
/// Only picks which verification the message goes through; a part that lies fails it.
pub fn is_broadcast_auth(auth: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Alg {
        #[serde(default)]
        alg: Option<String>,
    }
    auth.len() <= 4096 && serde_json::from_slice::<Alg>(auth).is_ok_and(|a| a.alg.as_deref() == Some(BROADCAST_ALG))
}

/// Verifies a broadcast part's signature under the pinned owner key, then decodes and checks its control
/// part (version, shape, limits).
///
/// # Errors
/// `bad-signature` without a pinned key or when the signature does not verify; `malformed`,
/// `unsupported-version` or `limit` for a part that does not decode.
pub fn open_broadcast(
    owner: Option<&PublicKey>,
    auth: &[u8],
    control: &[u8],
    limits: &Limits,
) -> Result<Broadcast, Refusal> {
    let auth: BroadcastAuth = serde_json::from_slice(auth)
        .map_err(|e| Refusal::new(Reason::Malformed, format!("broadcast auth part is not valid: {e}")))?;
    if auth.mailferry != VERSION {
        return Err(Refusal::new(Reason::UnsupportedVersion, "broadcast auth part of another protocol version"));
    }
    let Some(owner) = owner else {
        return Err(Refusal::new(
            Reason::BadSignature,
            "a broadcast part, but this recipient pinned no owner key to verify it with",
        ));
    };
    if !owner.verify_with(BROADCAST_SIGNATURE_CONTEXT, control, &auth.signature) {
        return Err(Refusal::new(
            Reason::BadSignature,
            format!("broadcast signature does not verify under the pinned owner key {}", owner.to_hex()),
        ));
    }
    if control.len() as u64 > limits.max_body_bytes {
        return Err(Refusal::new(Reason::Limit, "broadcast control part is over max-body-bytes"));
    }
    let b: Broadcast = super::bounded::decode(|| Ok(control), limits.max_body_bytes, limits, "broadcast control part")?;
    if b.mailferry != VERSION || b.broadcast != BROADCAST_VERSION {
        return Err(Refusal::new(
            Reason::UnsupportedVersion,
            format!(
                "broadcast format {} of protocol {}; this build speaks format {BROADCAST_VERSION}",
                b.broadcast, b.mailferry
            ),
        ));
    }
    if !super::valid_reply_id(b.broadcast_id.as_str()) {
        return Err(Refusal::new(Reason::Malformed, "broadcast id is not 32 hex digits"));
    }
    if !super::valid_channel_name(&b.channel) {
        return Err(Refusal::new(Reason::Malformed, format!("channel name {:?} is not valid", b.channel)));
    }
    if b.part == 0 || b.part > b.parts || b.parts as usize > limits.max_parts {
        return Err(Refusal::new(Reason::Limit, format!("broadcast part {} of {} is out of range", b.part, b.parts)));
    }
    if b.payloads.len() != b.parts as usize {
        return Err(Refusal::new(Reason::Malformed, "a broadcast lists one chunk per part"));
    }
    if b.generation > super::MAX_INTEGER || b.created > super::MAX_INTEGER {
        return Err(Refusal::new(Reason::Malformed, "a broadcast number is over 2^53 - 1"));
    }
    if b.payloads.iter().any(|p| !super::valid_payload_id(&p.id)) {
        return Err(Refusal::new(Reason::Malformed, "a broadcast payload id is not allowed"));
    }
    Ok(b)
}

/// Whether broadcast part `part` carries a chunk of the reply `ticket` names: the same broadcast id,
/// channel, generation, root, base and chunk list (sizes and digests), so its chunk is exactly the one the
/// ticket's MAC vouches for.
///
/// # Errors
/// `malformed` naming the first field that differs.
pub fn matches_ticket(ticket: &super::Reply, part: &Broadcast) -> Result<(), Refusal> {
    let named = ticket.broadcast.as_ref().map(|b| &b.id);
    let differs = if named != Some(&part.broadcast_id) {
        Some("id")
    } else if ticket.channel != part.channel {
        Some("channel")
    } else if (ticket.generation, ticket.root, ticket.base) != (part.generation, part.root, part.base) {
        Some("generation, root or base")
    } else if ticket.payloads != part.payloads || ticket.parts != part.parts {
        Some("chunks")
    } else {
        None
    };
    match differs {
        Some(what) => Err(Refusal::new(
            Reason::Malformed,
            format!(
                "broadcast {} part {} differs from its ticket (reply {}) in its {what}",
                part.broadcast_id, part.part, ticket.reply_id
            ),
        )),
        None => Ok(()),
    }
}

/// The associated data of every segment of a broadcast's encrypted pack: no recipient and no reply id
/// (it is the same for every recipient), but the broadcast's own id, channel, generation, root and base.
pub fn broadcast_pack_aad(id: &ReplyId, channel: &str, generation: u64, root: &Digest, base: &Digest) -> Vec<u8> {
    let fields = (id, channel, generation, root, base);
    [b"mailferry broadcast pack v1\0".as_slice(), &super::encode(&fields)].concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Frame, Kind, Nonce, Reply, decode_control, encode};

    fn part() -> Broadcast {
        Broadcast {
            mailferry: VERSION,
            kind: BroadcastKind::Broadcast,
            broadcast: BROADCAST_VERSION,
            channel: "default".into(),
            broadcast_id: ReplyId::unchecked("ee".repeat(16)),
            part: 1,
            parts: 1,
            created: 0,
            generation: 2,
            root: Digest([2; 32]),
            base: Digest([1; 32]),
            payloads: vec![Payload { id: "pack-0001.bin".into(), size: 10, blake3: Digest([3; 32]) }],
        }
    }

    #[test]
    fn a_broadcast_part_verifies_only_by_the_pinned_owner_key_and_its_own_context() {
        let owner = SigningKey::from_hex(&"22".repeat(32)).unwrap();
        let other = SigningKey::from_hex(&"33".repeat(32)).unwrap();
        let limits = Limits::default();
        let control = encode(&part());
        let auth = encode(&BroadcastAuth::sign(&owner, &control));
        assert!(is_broadcast_auth(&auth));
        assert_eq!(open_broadcast(Some(&owner.public()), &auth, &control, &limits).unwrap(), part());
        let reason = |auth: &[u8], control: &[u8], key: Option<&PublicKey>| {
            open_broadcast(key, auth, control, &limits).unwrap_err().reason
        };
        // Forged: another key, no pinned key, bytes changed after signing.
        assert_eq!(reason(&auth, &control, Some(&other.public())), Reason::BadSignature);
        assert_eq!(reason(&auth, &control, None), Reason::BadSignature);
        let changed = encode(&Broadcast { generation: 3, ..part() });
        assert_eq!(reason(&auth, &changed, Some(&owner.public())), Reason::BadSignature);
        // The owner's reply signature over the same bytes is not a broadcast signature.
        let as_reply =
            encode(&BroadcastAuth { signature: owner.sign(&control), ..BroadcastAuth::sign(&owner, &control) });
        assert_eq!(reason(&as_reply, &control, Some(&owner.public())), Reason::BadSignature);
        // Signed, but not a valid part: an unknown field, a format this build does not speak, parts out of range.
        let sign = |c: &[u8]| encode(&BroadcastAuth::sign(&owner, c));
        let extra = String::from_utf8(control.clone()).unwrap().replacen('{', r#"{"x":1,"#, 1).into_bytes();
        assert_eq!(reason(&sign(&extra), &extra, Some(&owner.public())), Reason::Malformed);
        let v2 = encode(&Broadcast { broadcast: 2, ..part() });
        assert_eq!(reason(&sign(&v2), &v2, Some(&owner.public())), Reason::UnsupportedVersion);
        let beyond = encode(&Broadcast { part: 2, ..part() });
        assert_eq!(reason(&sign(&beyond), &beyond, Some(&owner.public())), Reason::Limit);
        // A plain reply's auth part is no broadcast's.
        let hmac = encode(&crate::protocol::Auth::sign(
            "site1",
            &crate::crypto::Key::from_hex(&"11".repeat(32)).unwrap(),
            &control,
        ));
        assert!(!is_broadcast_auth(&hmac));
    }

    #[test]
    fn a_request_announces_what_it_accepts_and_unknown_names_are_dropped() {
        #[derive(Deserialize)]
        struct A(#[serde(deserialize_with = "accepts_list")] Vec<Capability>);
        let parse = |s: &str| serde_json::from_str::<A>(s).map(|a| a.0);
        assert_eq!(parse(r#"["broadcast-1"]"#).unwrap(), vec![Capability::Broadcast]);
        assert_eq!(parse(r#"["broadcast-9","broadcast-1","broadcast-1"]"#).unwrap(), vec![Capability::Broadcast]);
        let many = format!("[{}]", vec![r#""x""#; MAX_ACCEPTS + 1].join(","));
        assert!(parse(&many).is_err());
        assert!(parse("[1]").is_err());
    }

    #[test]
    fn a_ticket_has_the_shape_of_one_message_carrying_nothing() {
        let ticket = Reply {
            mailferry: VERSION,
            kind: Kind::Reply,
            recipient: "site1".into(),
            channel: "default".into(),
            nonce: Nonce([7; 16]),
            request_seq: 1,
            reply_id: ReplyId::unchecked("ab".repeat(16)),
            part: 1,
            parts: 2,
            created: 0,
            generation: 2,
            root: Digest([2; 32]),
            base: Digest([1; 32]),
            need_full_inventory: false,
            payloads: (1..=2)
                .map(|k| Payload { id: format!("pack-{k:04}.bin"), size: 10, blake3: Digest([3; 32]) })
                .collect(),
            body: Frame { offset: 0, length: 10, size: 10, blake3: Digest([0; 32]) },
            rekey: None,
            same_as: None,
            standing: None,
            pinned: None,
            sealed_key: None,
            broadcast: Some(BroadcastRef { id: ReplyId::unchecked("ee".repeat(16)) }),
        };
        let limits = Limits::default();
        assert!(decode_control(&encode(&ticket), &limits).is_ok());
        let malformed = |r: Reply| decode_control(&encode(&r), &limits).unwrap_err().reason;
        assert_eq!(malformed(Reply { part: 2, ..ticket.clone() }), Reason::Malformed);
        assert_eq!(malformed(Reply { need_full_inventory: true, ..ticket.clone() }), Reason::Malformed);
        let own_id = Reply { broadcast: Some(BroadcastRef { id: ticket.reply_id.clone() }), ..ticket.clone() };
        assert_eq!(malformed(own_id), Reason::Malformed);
        // Its pack is bound to the broadcast, not to the recipient: the same for every ticket.
        let other =
            Reply { recipient: "site2".into(), reply_id: ReplyId::unchecked("cd".repeat(16)), ..ticket.clone() };
        assert_eq!(crate::protocol::pack_aad(&ticket), crate::protocol::pack_aad(&other));
        let plain = Reply { broadcast: None, ..ticket.clone() };
        assert_ne!(crate::protocol::pack_aad(&plain), crate::protocol::pack_aad(&ticket));
    }
}
