//! The one verification pipeline both roles share: raw bytes in, a [`Verified`] message or a [`Refusal`] out.
//!
//! The steps are those of `docs/protocol.md` §11.2 and §11.3, in the order given there: size, MIME
//! structure, auth part, key, MAC, owner signature (when pinned), control part, the control part's
//! recipient, the message kind. Nothing of a message is interpreted before its MAC verifies, except the
//! auth part's recipient name and key id, which only select the key.
//!
//! Pure: the keys come from a [`Keyring`], which the shell implements over its state; this file does no
//! I/O and changes nothing. Whatever a key lookup would change (a rotation completing) is reported in
//! [`KeyRole`] and left to the role's engine, which turns it into an effect only if the message is accepted.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::crypto::{Key, KeyId, PublicKey};
use crate::limits::Limits;
use crate::protocol::envelope::{self, Hints};
use crate::protocol::{self, Auth, Control, Kind, Reason, Refusal};

/// Which of a recipient's keys authenticated a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRole {
    /// The key in force.
    Current,
    /// Owner: the new key a rotation is delivering. A message accepted under it completes the rotation.
    Rotating,
    /// A key a rotation replaced, still accepted during its grace period.
    Retired,
}

/// A key found for a message, and its role.
#[derive(Clone, Debug)]
pub struct Keyed {
    /// The key.
    pub key: Key,
    /// What it is to the recipient it belongs to.
    pub role: KeyRole,
}

/// Where [`open`] finds keys: the owner's registered recipients, or the recipient's own key.
pub trait Keyring {
    /// The key that should have made a message whose auth part names `recipient` and `key_id`, at time
    /// `now`. `Ok(Err(..))` refuses the message: an unknown recipient (owner), a message for another
    /// recipient (recipient), or a key id that is none of the recipient's keys (`bad-mac`).
    ///
    /// # Errors
    /// Local failures reading the state.
    fn lookup(&self, recipient: &str, key_id: &KeyId, now: u64) -> Result<Result<Keyed, Refusal>>;
}

/// What the verifying node expects of a message.
#[derive(Clone, Copy, Debug)]
pub struct Policy<'a> {
    /// The kinds this node accepts (an owner: requests and receipts; a recipient: replies).
    pub accepts: &'a [Kind],
    /// The kinds this node sends itself (an owner: replies; a recipient: requests and receipts). An
    /// authentic message of such a kind is this node's own mail come back (a file carried the wrong way,
    /// a spool shared by mistake): not for this node, and not an attack.
    pub sends: &'a [Kind],
    /// The owner key replies must be signed with, when the recipient pinned one.
    pub pinned_owner: Option<&'a PublicKey>,
    /// Size and count limits.
    pub limits: &'a Limits,
}

/// A message whose MAC (and, when pinned, signature) verified and whose control part decoded.
#[derive(Clone, Debug)]
pub struct Verified {
    /// The auth part.
    pub auth: Auth,
    /// The decoded, authenticated control part.
    pub control: Control,
    /// Every attachment besides the control and auth parts, by name; authenticated only through the
    /// digests the control part lists.
    pub attachments: BTreeMap<String, Vec<u8>>,
    /// The key that made the MAC.
    pub key: Key,
    /// Which of the recipient's keys that is.
    pub key_role: KeyRole,
    /// Header hints (never trusted).
    pub hints: Hints,
}

/// What [`open`] made of an authentic message.
#[derive(Clone, Debug)]
pub enum Opened {
    /// A message for this node.
    Verified(Box<Verified>),
    /// Authentic, but of a kind this node sends itself ([`Policy::sends`]): its own mail come back.
    NotForThisNode {
        /// What it is.
        kind: Kind,
        /// The recipient it concerns.
        recipient: String,
    },
}

/// Verifies one raw message, step by step, and decodes its control part.
///
/// # Errors
/// Outer `Err`: a local failure of the keyring. Inner `Err`: the refusal of the first check that failed.
pub fn open(raw: &[u8], keyring: &dyn Keyring, policy: &Policy<'_>, now: u64) -> Result<Result<Opened, Refusal>> {
    macro_rules! check {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(r) => return Ok(Err(r)),
            }
        };
    }
    // Steps 1 and 2: the size before parsing, then the MIME structure.
    let parsed = check!(envelope::parse(raw, policy.limits.max_message_bytes));
    // Step 3: the auth part, not trusted yet.
    let auth = check!(protocol::decode_auth(&parsed.auth));
    // Steps 4 and 5: the recipient it names, the key, the MAC.
    let keyed = check!(keyring.lookup(&auth.recipient, &auth.key_id, now)?);
    check!(protocol::verify_mac(&keyed.key, &auth, &parsed.control));
    // Step 5a (recipient): the owner's signature, when its key is pinned.
    if let Some(owner) = policy.pinned_owner {
        check!(protocol::verify_signature(owner, &auth, &parsed.control));
    }
    // Step 6: the control part, now authenticated.
    let control = check!(protocol::decode_control(&parsed.control, policy.limits));
    // Step 7: it speaks for the recipient whose key made the MAC.
    if control.recipient() != auth.recipient {
        return Ok(Err(Refusal::new(
            Reason::WrongRecipient,
            format!("control part names {:?} but is signed by {:?}'s key", control.recipient(), auth.recipient),
        )));
    }
    // Step 8: a kind this node accepts.
    if policy.sends.contains(&control.kind()) {
        return Ok(Ok(Opened::NotForThisNode { kind: control.kind(), recipient: auth.recipient }));
    }
    if !policy.accepts.contains(&control.kind()) {
        return Ok(Err(Refusal::new(Reason::Unexpected, format!("this node does not accept a {}", control.kind()))));
    }
    Ok(Ok(Opened::Verified(Box::new(Verified {
        auth,
        control,
        attachments: parsed.attachments,
        key: keyed.key,
        key_role: keyed.role,
        hints: parsed.hints,
    }))))
}
