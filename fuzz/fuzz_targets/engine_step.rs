//! Arbitrary bytes as the control part of a message that authenticates (as a thief holding a recipient's
//! key would send it), through the one verification pipeline and the owner's engine and the recipient's
//! first step: nothing may panic, however the authenticated control part is made.
#![no_main]

use std::sync::Arc;

use anyhow::Result;
use libfuzzer_sys::fuzz_target;
use mailferry::crypto::{Key, KeyId, Nonce};
use mailferry::engine::owner::{
    self, Budget, Generation, LearnedLimit, OwnerKeys, OwnerPolicy, OwnerView, Registered, Rotation, SentMessage,
    SentReply, Spent,
};
use mailferry::engine::recipient::{self, Applied, RecipientKeys, RecipientView};
use mailferry::engine::verify::{self, KeyRole, Opened, Policy};
use mailferry::limits::Limits;
use mailferry::manifest::{Digest, Manifest};
use mailferry::protocol::envelope::{self, Outgoing};
use mailferry::protocol::{self, Auth, Control, Kind, ReplyId};

struct World {
    key: Key,
    generation: Arc<Manifest>,
}

impl OwnerView for World {
    fn recipient(&self, name: &str) -> Result<Option<Registered>> {
        Ok((name == "site1").then(|| Registered {
            name: name.into(),
            address: "site1@example.org".into(),
            key: self.key.clone(),
            last_seq: 3,
            suspended: false,
        }))
    }
    fn rotation(&self, _: &str) -> Result<Option<Rotation>> {
        Ok(None)
    }
    fn retired_key(&self, _: &str, _: &KeyId, _: u64) -> Result<Option<Key>> {
        Ok(None)
    }
    fn request_answered(&self, n: &Nonce) -> Result<bool> {
        Ok(n.0[0] == 1)
    }
    fn latest_generation(&self) -> Result<Option<Generation>> {
        Ok(Some(Generation { number: 2, root: self.generation.root() }))
    }
    fn manifest(&self, g: u64) -> Result<Option<Arc<Manifest>>> {
        Ok((g == 1 || g == 2).then(|| self.generation.clone()))
    }
    fn answered_for(&self, _: &str, n: &Nonce) -> Result<Option<SentReply>> {
        Ok((n.0[0] == 1).then(|| SentReply {
            reply_id: ReplyId::new("ab".repeat(16)).unwrap(),
            generation: 2,
            root: Some(Digest([0; 32])),
        }))
    }
    fn receipt_recorded(&self, _: &str, _: &ReplyId) -> Result<bool> {
        Ok(false)
    }
    fn reply_generation(&self, _: &str, _: &ReplyId) -> Result<Option<u64>> {
        Ok(Some(2))
    }
    fn sent_part(&self, _: &str, _: &ReplyId, k: u32) -> Result<Option<Vec<u8>>> {
        Ok((k < 4).then(|| vec![k as u8; 10]))
    }
    fn resent(&self, _: &ReplyId) -> Result<u64> {
        Ok(0)
    }
    fn spent_since(&self, _: &str, _: u64) -> Result<Spent> {
        Ok(Spent::default())
    }
    fn sent_message(&self, _: &str) -> Result<Option<SentMessage>> {
        Ok(None)
    }
    fn sent_part_count(&self, _: &ReplyId) -> Result<u64> {
        Ok(2)
    }
    fn relay_limit(&self, _: &str) -> Result<Option<LearnedLimit>> {
        Ok(None)
    }
    fn last_request_created(&self, _: &str) -> Result<Option<u64>> {
        Ok(Some(100))
    }
    fn repeat_of(&self, _: &str, _: &Digest, g: u64, _: bool) -> Result<Option<protocol::SameAs>> {
        Ok((g == 2).then(|| protocol::SameAs {
            reply_id: ReplyId::new("cd".repeat(16)).unwrap(),
            nonce: Nonce([7; 16]),
            parts: 2,
        }))
    }
}

impl RecipientView for World {
    fn name(&self) -> &str {
        "site1"
    }
    fn key(&self) -> &Key {
        &self.key
    }
    fn previous_key(&self, _: u64) -> Result<Option<Key>> {
        Ok(None)
    }
    fn outstanding(&self, n: &Nonce) -> Result<Option<u64>> {
        Ok((n.0[0] == 7).then_some(5))
    }
    fn reply_applied(&self, _: &ReplyId) -> Result<bool> {
        Ok(false)
    }
    fn applied(&self) -> Result<Applied> {
        Ok(Applied { generation: 1, root: Some(self.generation.root()), key_id: Some(self.key.id()) })
    }
    fn rollback_hold(&self) -> Result<Option<u64>> {
        Ok(None)
    }
    fn last_seq(&self) -> Result<u64> {
        Ok(5)
    }
    fn has_parts(&self, r: &ReplyId) -> Result<bool> {
        Ok(r.as_str().starts_with('a'))
    }
}

fuzz_target!(|control: &[u8]| {
    let world = World { key: Key::from_hex(&"11".repeat(32)).unwrap(), generation: Arc::new(Manifest::new()) };
    let auth = protocol::encode(&Auth::sign("site1", &world.key, control));
    let msg = Outgoing {
        from: "a@example.org",
        to: "b@example.org",
        subject: "fuzz".into(),
        text: "fuzz".into(),
        kind: Kind::Request,
        control,
        auth: &auth,
        payloads: vec![],
    };
    let Ok(raw) = envelope::build(&msg) else { return };
    let limits = Limits::default();
    let policy = OwnerPolicy {
        limits: limits.clone(),
        budget: Budget { replies: 10, bytes: 1 << 30, period: 86_400 },
        relay_limit: 10_240_000,
        min_relay_limit: 65_536,
    };
    let as_owner =
        Policy { accepts: &[Kind::Request, Kind::Receipt], sends: &[Kind::Reply], pinned_owner: None, limits: &limits };
    if let Ok(Ok(Opened::Verified(v))) = verify::open(&raw, &OwnerKeys(&world), &as_owner, 1_000) {
        let _ = owner::on_message(&world, *v, &policy, 1_000).expect("the view does not fail");
    }
    let as_recipient = Policy { accepts: &[Kind::Reply], sends: &[], pinned_owner: None, limits: &limits };
    if let Ok(Ok(Opened::Verified(v))) = verify::open(&raw, &RecipientKeys(&world), &as_recipient, 1_000)
        && let Control::Reply(reply) = &v.control
    {
        let _ = recipient::on_part(&world, reply, KeyRole::Current).expect("the view does not fail");
    }
});
