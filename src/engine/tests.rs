//! Table-driven tests of the engine, without processes, files or databases: one named test per refusal
//! rule of `docs/protocol.md` §11.2 (owner) and §11.3 (recipient), in the order the document gives,
//! each asserting the refusal and that no effect came out; and the determinism of a whole answer.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;

use super::owner::{
    self, Budget, Effect, Generation, Outcome, OwnerKeys, OwnerPolicy, OwnerView, Registered, ReportOutcome, Rotation,
    SentReply, Spent,
};
use super::owner::{Access, ChannelAccess, Entitlement, GrantAccess, LearnedLimit, SentMessage};
use super::recipient::{self as rcp, Applied, PartStep, RecipientKeys, RecipientView, WholeStep};
use super::verify::{self, KeyRole, Keyring as _, Opened, Policy, Verified};
use super::{Entropy, SeededEntropy};
use crate::apply::OnExtra;
use crate::crypto::{Key, KeyId, Nonce, SigningKey};
use crate::limits::Limits;
use crate::manifest::{Digest, Entry, FileMeta, Listed, Manifest, Mode, Op};
use crate::path::RelPath;
use crate::protocol::envelope::{self, Envelope, Outgoing};
use crate::protocol::{
    self, Auth, Body, Control, Frame, InventoryKind, Kind, Reason, Receipt, ReceiptStatus, Reply, ReplyId, Request,
    Standing, Update, VERSION, Want,
};
use crate::scan::Scan;

const NOW: u64 = 1_800_000_000;

fn key(seed: u8) -> Key {
    Key::from_hex(&format!("{seed:02x}").repeat(32)).unwrap()
}

fn path(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

fn file(content: &[u8]) -> Entry {
    Entry::File(FileMeta { size: content.len() as u64, mode: Mode::Regular, blake3: Digest::of(content) })
}

fn tree(entries: &[(&str, Entry)]) -> Manifest {
    let mut m = Manifest::new();
    for (p, e) in entries {
        m.insert(path(p), e.clone());
    }
    m
}

/// Writes a control message as a mail under `key` for `name`, deterministically.
fn mail<T: serde::Serialize>(kind: Kind, control: &T, name: &str, key: &Key, attachments: &[(&str, &[u8])]) -> Vec<u8> {
    let control = protocol::encode(control);
    seal(kind, &control, &protocol::encode(&Auth::sign(name, key, &control)), attachments)
}

fn seal(kind: Kind, control: &[u8], auth: &[u8], attachments: &[(&str, &[u8])]) -> Vec<u8> {
    let msg = Outgoing {
        from: "a@example.org",
        to: "b@example.org",
        subject: "test".into(),
        text: "test".into(),
        kind,
        control,
        auth,
        payloads: attachments.to_vec(),
    };
    let env = Envelope { message_id: Some("fixed@example.org"), date: Some(NOW), token: None, boundary: Some("b") };
    envelope::build_with(&msg, &env).unwrap()
}

// ---- the owner ----

/// An owner's state in memory.
#[derive(Default)]
struct MemOwner {
    recipients: HashMap<String, Registered>,
    rotations: HashMap<String, Rotation>,
    answered: HashMap<Nonce, (String, SentReply)>,
    receipts: Vec<(String, String)>,
    outcomes: Vec<(String, String, ReceiptStatus)>,
    generations: Vec<(Generation, Arc<Manifest>)>,
    spent: Spent,
    sent: HashMap<String, SentMessage>,
    parts: HashMap<String, u64>,
    limits: HashMap<String, LearnedLimit>,
    last_created: Option<u64>,
    earlier: Option<protocol::SameAs>,
    access: HashMap<String, Access>,
    last_seq: HashMap<(String, String), u64>,
    /// How many generation file lists the engine asked for.
    manifest_reads: std::cell::Cell<u32>,
}

impl OwnerView for MemOwner {
    fn recipient(&self, name: &str) -> Result<Option<Registered>> {
        Ok(self.recipients.get(name).cloned())
    }
    fn rotation(&self, name: &str) -> Result<Option<Rotation>> {
        Ok(self.rotations.get(name).cloned())
    }
    fn retired_key(&self, _: &str, _: &KeyId, _: u64) -> Result<Option<Key>> {
        Ok(None)
    }
    fn request_answered(&self, nonce: &Nonce) -> Result<bool> {
        Ok(self.answered.contains_key(nonce))
    }
    fn latest_generation(&self, channel: &str) -> Result<Option<Generation>> {
        Ok(self.generations.last().map(|(g, _)| *g).filter(|_| channel == "default"))
    }
    fn generation(&self, channel: &str, number: u64) -> Result<Option<Generation>> {
        Ok(self.generations.iter().map(|(g, _)| *g).find(|g| g.number == number).filter(|_| channel == "default"))
    }
    fn manifest(&self, channel: &str, generation: u64) -> Result<Option<Arc<Manifest>>> {
        self.manifest_reads.set(self.manifest_reads.get() + 1);
        Ok(self
            .generations
            .iter()
            .find(|(g, _)| g.number == generation)
            .map(|(_, m)| m.clone())
            .filter(|_| channel == "default"))
    }
    fn access(&self, _: &str, channel: &str) -> Result<Access> {
        Ok(self.access.get(channel).cloned().unwrap_or_default())
    }
    fn last_seq(&self, recipient: &str, channel: &str) -> Result<u64> {
        Ok(self.last_seq.get(&(recipient.to_owned(), channel.to_owned())).copied().unwrap_or(0))
    }
    fn answered_for(&self, recipient: &str, nonce: &Nonce) -> Result<Option<SentReply>> {
        Ok(self.answered.get(nonce).filter(|(r, _)| r == recipient).map(|(_, s)| s.clone()))
    }
    fn receipt_recorded(&self, recipient: &str, reply_id: &ReplyId) -> Result<bool> {
        Ok(self.receipts.iter().any(|(r, id)| r == recipient && id == reply_id))
    }
    fn reply_generation(&self, _: &str, _: &ReplyId) -> Result<Option<u64>> {
        Ok(None)
    }
    fn outcome_recorded(&self, recipient: &str, reply_id: &ReplyId, status: ReceiptStatus) -> Result<bool> {
        Ok(self.outcomes.iter().any(|(r, id, s)| r == recipient && id == reply_id && *s == status))
    }
    fn sent_part(&self, _: &str, _: &ReplyId, _: u32) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
    fn resent(&self, _: &ReplyId) -> Result<u64> {
        Ok(0)
    }
    fn spent_since(&self, _: &str, _: u64) -> Result<Spent> {
        Ok(self.spent)
    }
    fn sent_message(&self, message_id: &str) -> Result<Option<SentMessage>> {
        Ok(self.sent.get(message_id).cloned())
    }
    fn sent_part_count(&self, reply_id: &ReplyId) -> Result<u64> {
        Ok(self.parts.get(reply_id.as_str()).copied().unwrap_or(0))
    }
    fn relay_limit(&self, recipient: &str) -> Result<Option<LearnedLimit>> {
        Ok(self.limits.get(recipient).cloned())
    }
    fn last_request_created(&self, _: &str, _: &str) -> Result<Option<u64>> {
        Ok(self.last_created)
    }
    fn repeat_of(&self, _: &str, _: &str, base: &Digest, generation: u64, _: bool) -> Result<Option<protocol::SameAs>> {
        Ok(self.earlier.clone().filter(|_| *base == site_tree().root() && generation == 2))
    }
}

fn site_tree() -> Manifest {
    tree(&[("a.txt", file(b"a")), ("d", Entry::Dir)])
}

fn new_tree() -> Manifest {
    tree(&[("a.txt", file(b"a2")), ("d", Entry::Dir), ("d/b.txt", file(b"b"))])
}

/// An owner with recipient `site1` (key 1, last seq 4) and generations 1 (the site's tree) and 2.
fn owner_world() -> MemOwner {
    let mut w = MemOwner::default();
    w.recipients
        .insert("site1".into(), Registered { name: "site1".into(), address: "site1@example.org".into(), key: key(1) });
    w.last_seq.insert(("site1".into(), "default".into()), 4);
    w.access.insert("default".into(), Access { channel: Some(ChannelAccess { open: true }), ..Access::default() });
    for (n, m) in [(1, site_tree()), (2, new_tree())] {
        w.generations.push((Generation { number: n, root: m.root() }, Arc::new(m)));
    }
    w
}

fn policy() -> OwnerPolicy {
    OwnerPolicy {
        limits: Limits::default(),
        budget: Budget { replies: 10, bytes: 1 << 30, period: 86_400 },
        relay_limit: 10_240_000,
        min_relay_limit: 65_536,
    }
}

fn request() -> Request {
    Request {
        mailferry: VERSION,
        kind: Kind::Request,
        recipient: "site1".into(),
        channel: "default".into(),
        nonce: Nonce([7; 16]),
        seq: 5,
        created: NOW,
        generation: 1,
        root: site_tree().root(),
        inventory_kind: InventoryKind::Changes,
        inventory: Vec::new(),
        removed: Vec::new(),
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

fn receipt() -> Receipt {
    Receipt {
        mailferry: VERSION,
        kind: Kind::Receipt,
        recipient: "site1".into(),
        channel: "default".into(),
        nonce: Nonce([9; 16]),
        reply_id: ReplyId::unchecked("ab".repeat(16)),
        created: NOW,
        generation: 2,
        root: new_tree().root(),
        status: ReceiptStatus::Applied,
        reason: None,
        detail: None,
    }
}

/// Runs a raw message through verification and the owner's engine.
fn owner_step(w: &MemOwner, raw: &[u8]) -> Outcome {
    let limits = Limits { max_message_bytes: 100_000, ..Limits::default() };
    let accepts = [Kind::Request, Kind::Receipt];
    let policy_v = Policy { accepts: &accepts, sends: &[], pinned_owner: None, limits: &limits };
    match verify::open(raw, &OwnerKeys(w), &policy_v, NOW).unwrap() {
        Err(r) => Outcome::Refused(r),
        Ok(Opened::Verified(msg)) => owner::on_message(w, *msg, &policy(), NOW).unwrap(),
        Ok(other) => panic!("{other:?}"),
    }
}

fn refused(outcome: &Outcome) -> Reason {
    match outcome {
        Outcome::Refused(r) => r.reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn owner_cases() -> Vec<(&'static str, Vec<u8>, Reason)> {
    let k = key(1);
    let req = request();
    let ok = |r: &Request| mail(Kind::Request, r, "site1", &k, &[]);
    let control = protocol::encode(&req);
    let good_auth = Auth::sign("site1", &k, &control);
    let auth_with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = serde_json::to_value(&good_auth).unwrap();
        f(&mut v);
        seal(Kind::Request, &control, &serde_json::to_vec(&v).unwrap(), &[])
    };
    let mut other_version: serde_json::Value = serde_json::to_value(&req).unwrap();
    other_version["mailferry"] = 2.into();
    vec![
        // Steps 1-8 (both sides).
        ("1_oversized", [ok(&req), vec![b' '; 100_000]].concat(), Reason::Limit),
        ("2_not_mime_no_control_part", b"Subject: hello\r\n\r\njust text\r\n".to_vec(), Reason::Malformed),
        ("3_auth_not_json", seal(Kind::Request, &control, b"{nope", &[]), Reason::Malformed),
        ("3_auth_other_version", auth_with(&|v| v["mailferry"] = 2.into()), Reason::UnsupportedVersion),
        (
            "4_unknown_recipient",
            mail(Kind::Request, &Request { recipient: "nobody".into(), ..req.clone() }, "nobody", &k, &[]),
            Reason::UnknownRecipient,
        ),
        ("5_wrong_key_id", mail(Kind::Request, &req, "site1", &key(2), &[]), Reason::BadMac),
        ("5_forged_mac", auth_with(&|v| v["mac"] = "00".repeat(32).into()), Reason::BadMac),
        (
            "5a_receipt_with_attachment",
            mail(Kind::Receipt, &receipt(), "site1", &k, &[("x.bin", b"x")]),
            Reason::BadPayload,
        ),
        (
            "6_control_other_version",
            {
                let c = serde_json::to_vec(&other_version).unwrap();
                seal(Kind::Request, &c, &protocol::encode(&Auth::sign("site1", &k, &c)), &[])
            },
            Reason::UnsupportedVersion,
        ),
        (
            "7_control_names_another_recipient",
            {
                let mut w2 = req.clone();
                w2.recipient = "site2".into();
                let c = protocol::encode(&w2);
                seal(Kind::Request, &c, &protocol::encode(&Auth::sign("site1", &k, &c)), &[])
            },
            Reason::WrongRecipient,
        ),
        ("8_a_reply_sent_to_the_owner", mail(Kind::Reply, &reply(), "site1", &k, &[]), Reason::Unexpected),
        // Requests.
        ("r1_nonce_answered_before", ok(&Request { nonce: Nonce([8; 16]), ..req.clone() }), Reason::Replay),
        ("r2_seq_not_newer", ok(&Request { seq: 4, ..req.clone() }), Reason::Replay),
        (
            "r3_inventory_not_a_tree",
            ok(&Request { inventory: vec![Listed { path: path("a.txt/x"), entry: file(b"x") }], ..req.clone() }),
            Reason::BadPath,
        ),
        (
            "r3_removes_what_the_generation_lacks",
            ok(&Request { removed: vec![path("zz")], ..req.clone() }),
            Reason::Malformed,
        ),
        ("r4_root_does_not_match_inventory", ok(&Request { root: Digest([1; 32]), ..req.clone() }), Reason::Malformed),
        (
            "r4_up_to_date_root_does_not_match",
            ok(&Request { generation: 2, root: Digest([1; 32]), ..req.clone() }),
            Reason::Malformed,
        ),
        // Receipts.
        (
            "c1_receipt_for_a_nonce_never_answered",
            mail(Kind::Receipt, &Receipt { nonce: Nonce([3; 16]), ..receipt() }, "site1", &k, &[]),
            Reason::Replay,
        ),
        (
            "c2_receipt_names_another_reply",
            mail(
                Kind::Receipt,
                &Receipt { reply_id: ReplyId::unchecked("cd".repeat(16)), ..receipt() },
                "site1",
                &k,
                &[],
            ),
            Reason::Malformed,
        ),
        (
            "c2_receipt_names_another_generation",
            mail(Kind::Receipt, &Receipt { generation: 1, ..receipt() }, "site1", &k, &[]),
            Reason::Malformed,
        ),
        (
            "c2_receipt_claims_another_root",
            mail(Kind::Receipt, &Receipt { root: Digest([5; 32]), ..receipt() }, "site1", &k, &[]),
            Reason::Malformed,
        ),
    ]
}

fn owner_with_history() -> MemOwner {
    let mut w = owner_world();
    let sent = SentReply {
        reply_id: ReplyId::unchecked("ab".repeat(16)),
        generation: 2,
        root: Some(new_tree().root()),
        channel: "default".into(),
    };
    w.answered.insert(Nonce([9; 16]), ("site1".into(), sent.clone()));
    w.answered.insert(Nonce([8; 16]), ("site1".into(), sent));
    w
}

#[test]
fn owner_refuses_each_rule_of_11_2_in_order_with_no_effect() {
    let w = owner_with_history();
    for (name, raw, reason) in owner_cases() {
        let outcome = owner_step(&w, &raw);
        assert_eq!(refused(&outcome), reason, "{name}: {outcome:?}");
    }
}

#[test]
fn a_nodes_own_mail_come_back_is_not_for_it_and_no_refusal() {
    let w = owner_world();
    let limits = Limits::default();
    let p =
        Policy { accepts: &[Kind::Request, Kind::Receipt], sends: &[Kind::Reply], pinned_owner: None, limits: &limits };
    let own = mail(Kind::Reply, &reply(), "site1", &key(1), &[]);
    assert!(matches!(
        verify::open(&own, &OwnerKeys(&w), &p, NOW).unwrap(),
        Ok(Opened::NotForThisNode { kind: Kind::Reply, .. })
    ));
    // Forged under another key it is still refused before its kind is looked at.
    let forged = mail(Kind::Reply, &reply(), "site1", &key(2), &[]);
    assert_eq!(verify::open(&forged, &OwnerKeys(&w), &p, NOW).unwrap().unwrap_err().reason, Reason::BadMac);
}

#[test]
fn c3_a_second_receipt_for_a_reply_is_a_replay() {
    let mut w = owner_with_history();
    let raw = mail(Kind::Receipt, &receipt(), "site1", &key(1), &[]);
    assert!(matches!(owner_step(&w, &raw), Outcome::Receipt { .. }));
    w.receipts.push(("site1".into(), "ab".repeat(16)));
    assert_eq!(refused(&owner_step(&w, &raw)), Reason::Replay);
}

/// Negative and rolled-back receipts (§11.2 C1, C2n, C3n): each rule refuses with no effect, and an
/// accepted one is recorded as it is, once per reply and status, after a success too (a hook can fail after
/// the apply).
#[test]
fn negative_and_rolled_back_receipts_are_checked_then_recorded_once() {
    let failed = Receipt {
        status: ReceiptStatus::Failed,
        generation: 1,
        root: site_tree().root(),
        reason: Some(protocol::FailureReason::DiskFull),
        detail: Some("no space left on device".into()),
        ..receipt()
    };
    let rolled = Receipt { status: ReceiptStatus::RolledBack, generation: 1, root: site_tree().root(), ..receipt() };
    let other_reply = ReplyId::unchecked("cd".repeat(16));
    let k = key(1);
    let cases: Vec<(&str, Receipt, Option<Reason>)> = vec![
        ("failed", failed.clone(), None),
        (
            "failed at a newer generation (a reply it refused as a rollback)",
            Receipt { generation: 7, ..failed.clone() },
            None,
        ),
        (
            "failed for a nonce never answered",
            Receipt { nonce: Nonce([3; 16]), ..failed.clone() },
            Some(Reason::Replay),
        ),
        (
            "failed naming another reply",
            Receipt { reply_id: other_reply.clone(), ..failed.clone() },
            Some(Reason::Malformed),
        ),
        ("rolled back", rolled.clone(), None),
        (
            "rolled back to the generation the reply brought",
            Receipt { generation: 2, root: new_tree().root(), ..rolled.clone() },
            Some(Reason::Malformed),
        ),
        (
            "rolled back to a root that generation does not have",
            Receipt { root: Digest([5; 32]), ..rolled.clone() },
            Some(Reason::Malformed),
        ),
        (
            "rolled back naming another reply",
            Receipt { reply_id: other_reply, ..rolled.clone() },
            Some(Reason::Malformed),
        ),
    ];
    let mut w = owner_with_history();
    // A success recorded before does not stop a failure reported after it.
    w.receipts.push(("site1".into(), "ab".repeat(16)));
    for (name, r, want) in cases {
        let outcome = owner_step(&w, &mail(Kind::Receipt, &r, "site1", &k, &[]));
        match (want, outcome) {
            (Some(reason), outcome) => assert_eq!(refused(&outcome), reason, "{name}: {outcome:?}"),
            (None, Outcome::Receipt { receipt, effects }) => {
                assert_eq!(receipt, r, "{name}");
                assert_eq!(effects, vec![Effect::RecordReceipt(r.clone())], "{name}: recorded, nothing else");
            }
            (None, other) => panic!("{name}: {other:?}"),
        }
    }
    // C3n: once per reply and status.
    w.outcomes.push(("site1".into(), "ab".repeat(16), ReceiptStatus::Failed));
    assert_eq!(refused(&owner_step(&w, &mail(Kind::Receipt, &failed, "site1", &k, &[]))), Reason::Replay);
    assert!(matches!(owner_step(&w, &mail(Kind::Receipt, &rolled, "site1", &k, &[])), Outcome::Receipt { .. }));
}

#[test]
fn r2_an_old_seq_made_after_the_newer_one_is_another_machine() {
    let mut w = owner_world();
    let raw = mail(Kind::Request, &Request { seq: 2, ..request() }, "site1", &key(1), &[]);
    let detail = |w: &MemOwner| match owner_step(w, &raw) {
        Outcome::Refused(r) if r.reason == Reason::Replay => r.detail,
        other => panic!("{other:?}"),
    };
    assert!(detail(&w).contains("replayed or reordered"));
    w.last_created = Some(NOW - 10);
    assert!(detail(&w).contains("another machine uses"), "{}", detail(&w));
    w.last_created = Some(NOW);
    assert!(detail(&w).contains("another machine uses"), "the same second: {}", detail(&w));
    w.last_created = Some(NOW + 10);
    assert!(detail(&w).contains("replayed or reordered"), "an older request delayed on its way");
}

#[test]
fn step_9_a_reply_to_a_seq_never_used_names_another_machine() {
    let v = site();
    let raw = mail(Kind::Reply, &Reply { nonce: Nonce([1; 16]), request_seq: 9, ..reply() }, "site1", &key(1), &[]);
    let PartStep::Refused { refusal, give_up: false } = recipient_step(&v, &raw, None) else { panic!() };
    assert_eq!(refusal.reason, Reason::Replay);
    assert!(refusal.detail.contains("another machine uses this recipient's enrollment"), "{}", refusal.detail);
}

#[test]
fn r7_a_repeated_tree_is_answered_with_a_reference_unless_fresh_or_resending() {
    let mut w = owner_world();
    let earlier = protocol::SameAs { reply_id: ReplyId::unchecked("cd".repeat(16)), nonce: Nonce([3; 16]), parts: 4 };
    w.earlier = Some(earlier.clone());
    let answer = |r: &Request| match owner_step(&w, &mail(Kind::Request, r, "site1", &key(1), &[])) {
        Outcome::Answer(plan) => *plan,
        other => panic!("{other:?}"),
    };
    let plan = answer(&request());
    assert_eq!(plan.same_as, Some(earlier.clone()));
    assert!(plan.ops.is_empty(), "a reference carries no operations");
    let fresh = answer(&Request { fresh: true, ..request() });
    assert!(fresh.same_as.is_none() && !fresh.ops.is_empty(), "asked fresh: a new reply");
    let other_tree = answer(&Request {
        inventory: vec![Listed { path: path("x"), entry: file(b"x") }],
        root: {
            let mut m = site_tree();
            m.insert(path("x"), file(b"x"));
            m.root()
        },
        ..request()
    });
    assert!(other_tree.same_as.is_none(), "another tree is another answer");
}

#[test]
fn r5_nothing_published_leaves_the_request_waiting() {
    let mut w = owner_world();
    w.generations.clear();
    let raw = mail(Kind::Request, &request(), "site1", &key(1), &[]);
    assert!(matches!(owner_step(&w, &raw), Outcome::Deferred(_)));
}

/// `owner::entitlement`, one case per rule: suspension, unknown channel, grants (expired, pinned, in
/// force, with selectors), open channels.
#[test]
fn r8_entitlement_follows_grants_expiry_pins_and_suspension() {
    // 2026-12-01T00:00:00Z.
    let day = 1_796_083_200;
    let open = Some(ChannelAccess { open: true });
    let closed = Some(ChannelAccess { open: false });
    let grant =
        |until: Option<&str>, pin: Option<u64>| GrantAccess { until: until.map(str::to_owned), pin, selector: None };
    let granted = |pin| Entitlement::Granted { pin };
    let denied = Entitlement::Denied;
    let cases: Vec<(&str, Access, Entitlement)> = vec![
        ("suspended", Access { channel: open, suspended: true, ..Access::default() }, denied(Standing::Suspended)),
        ("no_such_channel", Access { channel: None, ..Access::default() }, denied(Standing::NotEntitled)),
        (
            "no_such_channel_even_with_a_grant",
            Access { channel: None, grants: vec![grant(None, None)], ..Access::default() },
            denied(Standing::NotEntitled),
        ),
        ("closed_without_grant", Access { channel: closed, ..Access::default() }, denied(Standing::NotEntitled)),
        ("open_without_grant", Access { channel: open, ..Access::default() }, granted(None)),
        ("granted", Access { channel: closed, grants: vec![grant(None, None)], ..Access::default() }, granted(None)),
        (
            "valid_through_its_last_day",
            Access { channel: closed, grants: vec![grant(Some("2026-12-01"), None)], ..Access::default() },
            granted(None),
        ),
        (
            "expired_the_day_before",
            Access { channel: closed, grants: vec![grant(Some("2026-11-30"), None)], ..Access::default() },
            denied(Standing::Expired { on: "2026-11-30".into() }),
        ),
        (
            "expired_names_the_last_day_of_any",
            Access {
                channel: closed,
                grants: vec![grant(Some("2026-10-01"), None), grant(Some("2026-11-15"), None)],
                ..Access::default()
            },
            denied(Standing::Expired { on: "2026-11-15".into() }),
        ),
        (
            "open_channel_outlives_an_expired_grant",
            Access { channel: open, grants: vec![grant(Some("2026-11-30"), Some(3))], ..Access::default() },
            granted(None),
        ),
        (
            "pinned",
            Access { channel: closed, grants: vec![grant(None, Some(41))], ..Access::default() },
            granted(Some(41)),
        ),
        (
            "the_later_pin_wins",
            Access { channel: closed, grants: vec![grant(None, Some(41)), grant(None, Some(42))], ..Access::default() },
            granted(Some(42)),
        ),
        (
            "unpinned_beats_pinned",
            Access { channel: closed, grants: vec![grant(None, Some(41)), grant(None, None)], ..Access::default() },
            granted(None),
        ),
        (
            "an_expired_pin_does_not_hold",
            Access {
                channel: closed,
                grants: vec![grant(Some("2026-01-01"), Some(5)), grant(None, None)],
                ..Access::default()
            },
            granted(None),
        ),
        (
            "an_unparsable_selector_admits_nobody",
            Access {
                channel: closed,
                grants: vec![GrantAccess { selector: Some("arch = ".into()), ..grant(None, None) }],
                ..Access::default()
            },
            denied(Standing::NotEntitled),
        ),
    ];
    for (name, access, want) in cases {
        assert_eq!(owner::entitlement(&access, day + 3600), want, "{name}");
    }
}

#[test]
fn r8_a_request_without_entitlement_gets_an_answer_that_says_so_and_carries_nothing() {
    let mut w = owner_world();
    let raw = mail(Kind::Request, &Request { channel: "sigdb".into(), ..request() }, "site1", &key(1), &[]);
    let Outcome::Answer(plan) = owner_step(&w, &raw) else { panic!("answered") };
    assert_eq!(plan.standing, Some(Standing::NotEntitled), "a channel that does not exist: not entitled");
    assert!(plan.ops.is_empty() && plan.rekey.is_none() && plan.same_as.is_none());
    assert_eq!((plan.generation.number, plan.generation.root), (1, site_tree().root()), "the request's own state");
    // The same answer for a channel that exists without a grant: nothing tells them apart.
    w.access.insert("sigdb".into(), Access { channel: Some(ChannelAccess { open: false }), ..Access::default() });
    let Outcome::Answer(again) = owner_step(&w, &raw) else { panic!("answered") };
    assert_eq!(again.standing, plan.standing);
    let mut rng = SeededEntropy::new(1);
    let head =
        owner::reply_head(&again, &mut rng, NOW, Frame { offset: 0, length: 0, size: 0, blake3: Digest([0; 32]) });
    assert_eq!(head.channel, "sigdb");
    assert!(!head.need_full_inventory, "an answer without an update asks for nothing");
    // A suspended recipient is told so even for the open default channel.
    w.access.get_mut("default").unwrap().suspended = true;
    let raw = mail(Kind::Request, &request(), "site1", &key(1), &[]);
    let Outcome::Answer(plan) = owner_step(&w, &raw) else { panic!("answered") };
    assert_eq!(plan.standing, Some(Standing::Suspended));
}

#[test]
fn r8_a_pinned_recipient_is_brought_to_its_pin_and_no_further() {
    let mut w = owner_world();
    let pin = |p| Access {
        channel: Some(ChannelAccess { open: false }),
        grants: vec![GrantAccess { pin: Some(p), ..GrantAccess::default() }],
        ..Access::default()
    };
    w.access.insert("default".into(), pin(1));
    let raw = mail(Kind::Request, &request(), "site1", &key(1), &[]);
    let Outcome::Answer(plan) = owner_step(&w, &raw) else { panic!("answered") };
    assert_eq!((plan.generation.number, plan.pinned, plan.standing.clone()), (1, Some(1), None), "stays at 1");
    assert!(plan.ops.is_empty(), "it has generation 1 already");
    w.access.insert("default".into(), pin(2));
    let Outcome::Answer(plan) = owner_step(&w, &raw) else { panic!("answered") };
    assert_eq!((plan.generation.number, plan.pinned), (2, Some(2)), "the pin moved: brought to 2");
    assert!(!plan.ops.is_empty());
    // A recipient already past its pin is told so, and sent nothing.
    let ahead = Request { generation: 2, root: new_tree().root(), ..request() };
    w.access.insert("default".into(), pin(1));
    let raw = mail(Kind::Request, &ahead, "site1", &key(1), &[]);
    let Outcome::Answer(plan) = owner_step(&w, &raw) else { panic!("answered") };
    assert_eq!(plan.standing, Some(Standing::Pinned { at: 1 }));
}

#[test]
fn r2_sequence_numbers_count_per_channel() {
    let mut w = owner_world();
    w.access.insert("sigdb".into(), Access { channel: Some(ChannelAccess { open: true }), ..Access::default() });
    // seq 3 is old on the default channel (its last is 4) but new on another.
    let raw = mail(Kind::Request, &Request { seq: 3, channel: "sigdb".into(), ..request() }, "site1", &key(1), &[]);
    assert!(!matches!(owner_step(&w, &raw), Outcome::Refused(_)), "new on sigdb");
    let raw = mail(Kind::Request, &Request { seq: 3, ..request() }, "site1", &key(1), &[]);
    assert_eq!(refused(&owner_step(&w, &raw)), Reason::Replay, "old on default");
}

#[test]
fn c1_a_receipt_must_name_the_channel_of_the_reply() {
    let mut w = owner_world();
    let sent = SentReply {
        reply_id: ReplyId::unchecked("ab".repeat(16)),
        generation: 2,
        root: Some(new_tree().root()),
        channel: "default".into(),
    };
    w.answered.insert(Nonce([9; 16]), ("site1".into(), sent));
    let ok = mail(Kind::Receipt, &receipt(), "site1", &key(1), &[]);
    assert!(matches!(owner_step(&w, &ok), Outcome::Receipt { .. }));
    let other = mail(Kind::Receipt, &Receipt { channel: "sigdb".into(), ..receipt() }, "site1", &key(1), &[]);
    assert_eq!(refused(&owner_step(&w, &other)), Reason::Malformed);
}

#[test]
fn a_suspended_recipients_request_is_answered_suspended_and_its_receipt_still_recorded() {
    let mut w = owner_world();
    let raw = mail(Kind::Request, &request(), "site1", &key(1), &[]);
    assert!(matches!(owner_step(&w, &raw), Outcome::Answer(ref p) if p.standing.is_none()));
    w.access.get_mut("default").unwrap().suspended = true;
    let Outcome::Answer(plan) = owner_step(&w, &raw) else { panic!("answered") };
    assert_eq!(plan.standing, Some(Standing::Suspended));
    assert!(plan.ops.is_empty());
    // A receipt keeps the owner's view of what the recipient has true, suspended or not.
    let mut w = owner_with_history();
    w.access.get_mut("default").unwrap().suspended = true;
    let raw = mail(Kind::Receipt, &receipt(), "site1", &key(1), &[]);
    assert!(matches!(owner_step(&w, &raw), Outcome::Receipt { .. }), "{:?}", owner_step(&w, &raw));
}

#[test]
fn r6_a_recipient_over_its_budget_is_refused() {
    let mut w = owner_world();
    let raw = mail(Kind::Request, &request(), "site1", &key(1), &[]);
    assert!(matches!(owner_step(&w, &raw), Outcome::Answer(_)));
    w.spent = Spent { replies: 10, bytes: 0 };
    assert_eq!(refused(&owner_step(&w, &raw)), Reason::Limit);
    w.spent = Spent { replies: 0, bytes: 1 << 30 };
    assert_eq!(refused(&owner_step(&w, &raw)), Reason::Limit);
}

#[test]
fn a_request_under_the_rotating_key_completes_the_rotation_only_when_it_is_answered() {
    let mut w = owner_world();
    w.rotations.insert("site1".into(), Rotation { key: key(3), grace: 60 });
    // A replayed seq under the new key: refused, and the rotation does not complete.
    let stale = mail(Kind::Request, &Request { seq: 3, ..request() }, "site1", &key(3), &[]);
    assert_eq!(refused(&owner_step(&w, &stale)), Reason::Replay);
    let raw = mail(Kind::Request, &request(), "site1", &key(3), &[]);
    let Outcome::Answer(plan) = owner_step(&w, &raw) else { panic!("answered") };
    assert_eq!(plan.effects, vec![Effect::CompleteRotation { recipient: "site1".into() }]);
    assert_eq!(plan.key, key(3), "the reply is made under the key now in use");
    assert!(plan.rekey.is_none(), "and carries no key any more");
    // Under the old key, the reply carries the new one.
    let raw = mail(Kind::Request, &request(), "site1", &key(1), &[]);
    let Outcome::Answer(plan) = owner_step(&w, &raw) else { panic!("answered") };
    assert!(plan.effects.is_empty());
    assert_eq!(plan.rekey.map(|r| r.key), Some(key(3)));
}

#[test]
fn a_changes_request_is_diffed_against_the_newest_generation() {
    let w = owner_world();
    let raw = mail(Kind::Request, &request(), "site1", &key(1), &[]);
    let Outcome::Answer(plan) = owner_step(&w, &raw) else { panic!("answered") };
    assert_eq!(plan.generation.number, 2);
    assert_eq!(site_tree().apply(&plan.ops).unwrap().root(), new_tree().root());
    // A generation the owner does not know: the full inventory is asked for, with no operations.
    let raw = mail(Kind::Request, &Request { generation: 9, ..request() }, "site1", &key(1), &[]);
    let Outcome::Answer(plan) = owner_step(&w, &raw) else { panic!("answered") };
    assert!(plan.inventory.is_none() && plan.ops.is_empty());
}

#[test]
fn an_up_to_date_request_is_answered_without_file_list_work() {
    let w = owner_world();
    let newest = new_tree().root();
    let cases: Vec<(&str, Request, bool, bool)> = vec![
        // (case, request, answered as current, file lists read)
        ("no changes at the newest generation", Request { generation: 2, root: newest, ..request() }, true, false),
        ("no changes at an older generation", request(), false, true),
        (
            "the newest generation with drift",
            Request {
                generation: 2,
                inventory: vec![Listed { path: path("x"), entry: file(b"x") }],
                root: {
                    let mut m = new_tree();
                    m.insert(path("x"), file(b"x"));
                    m.root()
                },
                ..request()
            },
            false,
            true,
        ),
        (
            "a full inventory of the newest tree",
            Request {
                generation: 2,
                root: newest,
                inventory_kind: InventoryKind::Full,
                inventory: new_tree().iter().map(|(p, e)| Listed { path: p.clone(), entry: e.clone() }).collect(),
                ..request()
            },
            false,
            true,
        ),
    ];
    for (name, req, current, reads) in cases {
        w.manifest_reads.set(0);
        let Outcome::Answer(plan) = owner_step(&w, &mail(Kind::Request, &req, "site1", &key(1), &[])) else {
            panic!("{name}: answered")
        };
        assert_eq!(plan.current, current, "{name}");
        assert_eq!(w.manifest_reads.get() > 0, reads, "{name}: file lists read");
        if current {
            assert!(plan.ops.is_empty() && plan.target.is_none() && plan.inventory.is_none(), "{name}");
            let head = owner::reply_head(
                &plan,
                &mut SeededEntropy::new(1),
                NOW,
                Frame { offset: 0, length: 0, size: 0, blake3: Digest([0; 32]) },
            );
            assert!(!head.need_full_inventory, "{name}: says current, asks for nothing");
            assert_eq!((head.generation, head.root, head.base), (2, newest, newest), "{name}");
        } else {
            let inv = plan.inventory.as_ref().unwrap();
            assert_eq!(inv.apply(&plan.ops).unwrap().root(), newest, "{name}");
        }
    }
}

fn reply_at(generation: u64, root: Digest) -> Reply {
    Reply {
        mailferry: VERSION,
        kind: Kind::Reply,
        recipient: "site1".into(),
        nonce: Nonce([7; 16]),
        request_seq: 5,
        reply_id: ReplyId::unchecked("ab".repeat(16)),
        part: 1,
        parts: 1,
        created: NOW,
        generation,
        root,
        base: site_tree().root(),
        need_full_inventory: false,
        payloads: vec![protocol::Payload { id: "pack-0001.bin".into(), size: 100, blake3: Digest([0; 32]) }],
        body: Frame { offset: 0, length: 100, size: 100, blake3: Digest([0; 32]) },
        rekey: None,
        same_as: None,
        sealed_key: None,
        broadcast: None,
        channel: "default".into(),
        standing: None,
        pinned: None,
    }
}

fn reply() -> Reply {
    reply_at(2, new_tree().root())
}

#[test]
fn a_fixed_clock_and_seeded_randomness_give_byte_identical_replies() {
    let w = owner_world();
    let raw = mail(Kind::Request, &request(), "site1", &key(1), &[]);
    let render = |seed| {
        let Outcome::Answer(plan) = owner_step(&w, &raw) else { panic!("answered") };
        let mut plan = *plan;
        plan.rekey = Some(Rotation { key: key(4), grace: 60 });
        let mut rng = SeededEntropy::new(seed);
        let head =
            owner::reply_head(&plan, &mut rng, NOW, Frame { offset: 0, length: 1, size: 1, blake3: Digest([2; 32]) });
        let control = protocol::encode(&head);
        let signer = SigningKey::from_hex(&"11".repeat(32)).unwrap();
        let auth = protocol::encode(&Auth::sign("site1", &plan.key, &control).signed_by(Some(&signer), &control));
        let token = rng.hex_id(16);
        let boundary = rng.hex_id(16);
        let msg = Outgoing {
            from: "owner@example.org",
            to: "site1@example.org",
            subject: "s".into(),
            text: "t".into(),
            kind: Kind::Reply,
            control: &control,
            auth: &auth,
            payloads: vec![("pack-0001.bin", b"x")],
        };
        let env = Envelope {
            message_id: Some("m@example.org"),
            date: Some(NOW),
            token: Some(&token),
            boundary: Some(&boundary),
        };
        envelope::build_with(&msg, &env).unwrap()
    };
    assert_eq!(render(1), render(1), "same seed, same clock: the same bytes");
    assert_ne!(render(1), render(2), "the seed matters");
}

#[test]
fn a_delivery_report_needs_the_token_and_shrinks_once_per_reply() {
    let mut w = owner_world();
    let token = "0f".repeat(16);
    w.sent.insert(
        "m1@example.org".into(),
        SentMessage {
            recipient: "site1".into(),
            reply_id: ReplyId::unchecked("ab".repeat(16)),
            part: 2,
            bytes: 1_000_000,
            token: Some(token.clone()),
        },
    );
    let report = |token: Option<String>| envelope::Bounce {
        message_id: Some("m1@example.org".into()),
        token,
        action: Some("failed".into()),
        status: Some("5.3.4".into()),
        diagnostic: Some("smtp; 552 5.3.4 too big".into()),
    };
    for forged in [None, Some("00".repeat(16))] {
        let out = owner::on_report(&w, &report(forged), &policy(), NOW).unwrap();
        assert!(matches!(&out, ReportOutcome::Refused(r) if r.reason == Reason::Unexpected), "{out:?}");
    }
    let ReportOutcome::Act { effects, .. } =
        owner::on_report(&w, &report(Some(token.clone())), &policy(), NOW).unwrap()
    else {
        panic!("a corroborated report acts")
    };
    let Effect::SetRelayLimit { limit, .. } = &effects[0] else { panic!("{effects:?}") };
    assert_eq!(limit.limit, 750_000);
    // The same reply cannot shrink it again.
    w.limits.insert("site1".into(), limit.clone());
    let ReportOutcome::Act { effects, .. } = owner::on_report(&w, &report(Some(token)), &policy(), NOW).unwrap() else {
        panic!("acts")
    };
    assert!(effects.is_empty(), "{effects:?}");
}

#[test]
fn a_learned_part_size_grows_back_after_proven_deliveries_and_expires() {
    let mut w = owner_with_history();
    let learned = LearnedLimit { limit: 100_000, learned_at: NOW, refused: Some(200_000), reply_id: None };
    w.limits.insert("site1".into(), learned.clone());
    w.parts.insert("ab".repeat(16), 3);
    let raw = mail(Kind::Receipt, &receipt(), "site1", &key(1), &[]);
    let effects = |w: &MemOwner, now| match owner::on_message(w, verified(w, &raw), &policy(), now).unwrap() {
        Outcome::Receipt { effects, .. } => effects,
        other => panic!("{other:?}"),
    };
    let grows = |e: &[Effect]| {
        e.iter().find_map(|e| match e {
            Effect::SetRelayLimit { limit, .. } => Some(limit.limit),
            _ => None,
        })
    };
    assert_eq!(grows(&effects(&w, NOW)), None, "not within a day of learning it");
    assert_eq!(grows(&effects(&w, NOW + 86_400)), Some(125_000), "a quarter more after a day");
    w.limits.insert("site1".into(), LearnedLimit { limit: 190_000, ..learned.clone() });
    assert_eq!(grows(&effects(&w, NOW + 86_400)), Some(199_999), "never to the size refused");
    let part = |w: &MemOwner, now| owner::part_limit(w, "site1", &policy(), now).unwrap();
    assert_eq!(part(&w, NOW), 190_000);
    assert_eq!(part(&w, NOW + owner::LEARNED_LIMIT_TTL), 10_240_000, "a learned size expires");
}

fn verified(w: &MemOwner, raw: &[u8]) -> Verified {
    let limits = Limits::default();
    let accepts = [Kind::Request, Kind::Receipt];
    let p = Policy { accepts: &accepts, sends: &[], pinned_owner: None, limits: &limits };
    match verify::open(raw, &OwnerKeys(w), &p, NOW).unwrap().unwrap() {
        Opened::Verified(v) => *v,
        other => panic!("{other:?}"),
    }
}

// ---- the recipient ----

struct MemRecipient {
    key: Key,
    previous: Option<(Key, u64)>,
    outstanding: HashMap<Nonce, u64>,
    applied: Applied,
    hold: Option<u64>,
    kept: Vec<ReplyId>,
}

impl RecipientView for MemRecipient {
    fn name(&self) -> &str {
        "site1"
    }
    fn channel(&self) -> &str {
        "default"
    }
    fn key(&self) -> &Key {
        &self.key
    }
    fn previous_key(&self, now: u64) -> Result<Option<Key>> {
        Ok(self.previous.clone().filter(|(_, until)| now < *until).map(|(k, _)| k))
    }
    fn outstanding(&self, nonce: &Nonce) -> Result<Option<u64>> {
        Ok(self.outstanding.get(nonce).copied())
    }
    fn reply_applied(&self, _: &ReplyId) -> Result<bool> {
        Ok(false)
    }
    fn applied(&self) -> Result<Applied> {
        Ok(self.applied.clone())
    }
    fn rollback_hold(&self) -> Result<Option<u64>> {
        Ok(self.hold)
    }
    fn last_seq(&self) -> Result<u64> {
        Ok(5)
    }
    fn has_parts(&self, reply_id: &ReplyId) -> Result<bool> {
        Ok(self.kept.iter().any(|k| k == reply_id))
    }
}

fn site() -> MemRecipient {
    MemRecipient {
        key: key(1),
        previous: None,
        outstanding: HashMap::from([(Nonce([7; 16]), 5)]),
        applied: Applied { generation: 1, root: Some(site_tree().root()), key_id: Some(key(1).id()) },
        hold: None,
        kept: Vec::new(),
    }
}

/// What a reply part comes to at the recipient: a refusal (and whether the request is given up), held,
/// or kept.
fn recipient_step(v: &MemRecipient, raw: &[u8], pinned: Option<&crate::crypto::PublicKey>) -> PartStep {
    let limits = Limits { max_message_bytes: 100_000, ..Limits::default() };
    let accepts = [Kind::Reply];
    let policy = Policy { accepts: &accepts, sends: &[], pinned_owner: pinned, limits: &limits };
    match verify::open(raw, &RecipientKeys(v), &policy, NOW).unwrap() {
        Err(refusal) => PartStep::Refused { refusal, give_up: false },
        Ok(Opened::NotForThisNode { kind, .. }) => panic!("{kind}"),
        Ok(Opened::Verified(msg)) => {
            let Control::Reply(reply) = msg.control else { panic!("a reply") };
            rcp::on_part(v, &reply, msg.key_role).unwrap()
        }
    }
}

fn part_refusal(step: &PartStep) -> (Reason, bool) {
    match step {
        PartStep::Refused { refusal, give_up } => (refusal.reason, *give_up),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn recipient_refuses_each_rule_of_11_3_steps_1_to_10_in_order() {
    let v = site();
    let k = key(1);
    let r = reply();
    let signer = SigningKey::from_hex(&"22".repeat(32)).unwrap();
    let control = protocol::encode(&r);
    // Name, message, pinned owner key, refusal, whether the request is given up.
    type Case = (&'static str, Vec<u8>, Option<crate::crypto::PublicKey>, Reason, bool);
    let cases: Vec<Case> = vec![
        (
            "1_oversized",
            [mail(Kind::Reply, &r, "site1", &k, &[]), vec![b' '; 100_000]].concat(),
            None,
            Reason::Limit,
            false,
        ),
        ("2_no_control_part", b"Subject: x\r\n\r\nhello\r\n".to_vec(), None, Reason::Malformed, false),
        ("3_auth_not_json", seal(Kind::Reply, &control, b"[]", &[]), None, Reason::Malformed, false),
        (
            "4_for_another_recipient",
            mail(Kind::Reply, &Reply { recipient: "site2".into(), ..r.clone() }, "site2", &k, &[]),
            None,
            Reason::WrongRecipient,
            false,
        ),
        ("5_wrong_key", mail(Kind::Reply, &r, "site1", &key(2), &[]), None, Reason::BadMac, false),
        (
            "5a_unsigned_while_pinned",
            mail(Kind::Reply, &r, "site1", &k, &[]),
            Some(signer.public()),
            Reason::BadSignature,
            false,
        ),
        (
            "5a_signed_by_another_key",
            {
                let other = SigningKey::from_hex(&"33".repeat(32)).unwrap();
                seal(
                    Kind::Reply,
                    &control,
                    &protocol::encode(&Auth::sign("site1", &k, &control).signed_by(Some(&other), &control)),
                    &[],
                )
            },
            Some(signer.public()),
            Reason::BadSignature,
            false,
        ),
        (
            "6_bad_reply_id",
            mail(Kind::Reply, &Reply { reply_id: ReplyId::unchecked("XYZ"), ..r.clone() }, "site1", &k, &[]),
            None,
            Reason::Malformed,
            false,
        ),
        (
            "7_a_request_sent_to_a_recipient",
            mail(Kind::Request, &request(), "site1", &k, &[]),
            None,
            Reason::Unexpected,
            false,
        ),
        (
            "8_control_names_another_recipient",
            {
                let c = protocol::encode(&Reply { recipient: "site2".into(), ..r.clone() });
                seal(Kind::Reply, &c, &protocol::encode(&Auth::sign("site1", &k, &c)), &[])
            },
            None,
            Reason::WrongRecipient,
            false,
        ),
        (
            "9_nonce_not_outstanding",
            mail(Kind::Reply, &Reply { nonce: Nonce([1; 16]), ..r.clone() }, "site1", &k, &[]),
            None,
            Reason::Replay,
            false,
        ),
        (
            "9a_request_seq_differs",
            mail(Kind::Reply, &Reply { request_seq: 4, ..r.clone() }, "site1", &k, &[]),
            None,
            Reason::Malformed,
            true,
        ),
        (
            "10_older_generation",
            mail(Kind::Reply, &reply_at(0, r.root), "site1", &k, &[]),
            None,
            Reason::Rollback,
            true,
        ),
        (
            "10_same_generation_other_root",
            mail(Kind::Reply, &reply_at(1, Digest([4; 32])), "site1", &k, &[]),
            None,
            Reason::Rollback,
            true,
        ),
    ];
    for (name, raw, pinned, reason, give_up) in cases {
        let step = recipient_step(&v, &raw, pinned.as_ref());
        assert_eq!(part_refusal(&step), (reason, give_up), "{name}: {step:?}");
    }
    // And a good one is kept.
    assert_eq!(recipient_step(&v, &mail(Kind::Reply, &r, "site1", &k, &[]), None), PartStep::Keep { seq: 5 });
}

#[test]
fn step_11_a_held_generation_is_held_not_refused() {
    let mut v = site();
    v.hold = Some(2);
    let step = recipient_step(&v, &mail(Kind::Reply, &reply(), "site1", &key(1), &[]), None);
    assert_eq!(step, PartStep::Held { generation: 2, held: 2 });
}

#[test]
fn step_12_a_part_must_carry_exactly_its_own_chunk() {
    // The shell checks the chunk of a part the engine keeps (`PartStep::Keep`) before it keeps it.
    let chunk = vec![5u8; 100];
    let r = Reply {
        payloads: vec![protocol::Payload { id: "pack-0001.bin".into(), size: 100, blake3: Digest::of(&chunk) }],
        ..reply()
    };
    let with = |items: &[(&str, &[u8])]| {
        let m: std::collections::BTreeMap<String, Vec<u8>> =
            items.iter().map(|(k, v)| ((*k).to_owned(), v.to_vec())).collect();
        protocol::check_payloads(&r, &m).map_err(|e| e.reason)
    };
    assert_eq!(with(&[("pack-0001.bin", &chunk)]), Ok(()));
    assert_eq!(with(&[]), Err(Reason::BadPayload), "missing");
    assert_eq!(with(&[("pack-0001.bin", &chunk[..99])]), Err(Reason::BadPayload), "short");
    assert_eq!(with(&[("pack-0001.bin", &[6u8; 100])]), Err(Reason::BadPayload), "altered");
    assert_eq!(with(&[("pack-0001.bin", &chunk), ("extra.bin", b"x")]), Err(Reason::BadPayload), "unlisted");
}

#[test]
fn step_10_a_generation_applied_under_a_key_no_longer_held_does_not_bind_the_current_one() {
    // A stolen key (key 9) once set generation 2^53 - 1; the site has since been enrolled afresh (key 1).
    let mut v = site();
    v.applied = Applied { generation: (1 << 53) - 1, root: Some(Digest([6; 32])), key_id: Some(key(9).id()) };
    let raw = mail(Kind::Reply, &reply(), "site1", &key(1), &[]);
    assert_eq!(recipient_step(&v, &raw, None), PartStep::Keep { seq: 5 });
    // Under the key it was applied with, the rule holds.
    v.applied.key_id = Some(key(1).id());
    assert_eq!(part_refusal(&recipient_step(&v, &raw, None)), (Reason::Rollback, true));
    // And a reply under a previous key (still in its grace) gets no such exception.
    v.key = key(5);
    v.previous = Some((key(1), NOW + 60));
    v.applied.key_id = Some(key(9).id());
    assert_eq!(part_refusal(&recipient_step(&v, &raw, None)), (Reason::Rollback, true));
}

fn update(reply: Reply, ops: Vec<Op>) -> Update {
    Update { head: reply, body: Body { mailferry: VERSION, ops, streams: Vec::new() } }
}

fn scan_of(m: Manifest) -> Scan {
    Scan { manifest: m, foreign: Vec::new() }
}

fn whole(v: &MemRecipient, u: &Update, scanned: Scan) -> WholeStep {
    let mut once = Some(scanned);
    let mut scan = || Ok(once.take().expect("scanned once"));
    rcp::on_whole(v, u, &key(1), &mut scan, &site_tree(), OnExtra::Delete, NOW).unwrap()
}

fn whole_refusal(step: &WholeStep) -> Reason {
    match step {
        WholeStep::Refused(r) => r.reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn ops_to_new() -> Vec<Op> {
    crate::manifest::diff(&site_tree(), &new_tree())
        .into_iter()
        .map(|op| match op {
            Op::Put { path, size, mode, blake3, .. } => {
                Op::Put { path, size, mode, blake3, source: Some(crate::manifest::Source::Local) }
            }
            other => other,
        })
        .collect()
}

#[test]
fn recipient_refuses_each_rule_of_11_3_steps_12a_to_18_in_order_with_no_effect() {
    let v = site();
    let sealed_wrong = Reply {
        rekey: Some(protocol::Rekey { key_id: key(3).id(), sealed: key(2).seal_key("site1", &key(3)), grace: 60 }),
        ..reply()
    };
    let foreign = Scan {
        manifest: site_tree(),
        foreign: vec![crate::scan::Foreign { path: path("fifo"), kind: crate::scan::ForeignKind::Special("FIFO") }],
    };
    let cases: Vec<(&str, Update, Scan, Reason)> = vec![
        ("12a_rekey_that_does_not_open", update(sealed_wrong, ops_to_new()), scan_of(site_tree()), Reason::Malformed),
        ("15_special_file_in_the_tree", update(reply(), ops_to_new()), foreign, Reason::LocalTree),
        (
            "16_tree_changed_since_the_request",
            update(reply(), ops_to_new()),
            scan_of(tree(&[("a.txt", file(b"changed")), ("d", Entry::Dir)])),
            Reason::LocalTree,
        ),
        (
            "17_ops_do_not_fit_the_tree",
            update(reply(), vec![Op::Delete { path: path("nope") }]),
            scan_of(site_tree()),
            Reason::BadPath,
        ),
        (
            "18_result_is_not_the_promised_root",
            update(reply_at(2, Digest([3; 32])), ops_to_new()),
            scan_of(site_tree()),
            Reason::TreeMismatch,
        ),
    ];
    for (name, u, scanned, reason) in cases {
        let step = whole(&v, &u, scanned);
        assert_eq!(whole_refusal(&step), reason, "{name}: {step:?}");
    }
}

#[test]
fn a_new_key_is_taken_up_only_with_a_reply_that_is_accepted() {
    let v = site();
    let sealed = key(1).seal_key("site1", &key(3));
    let rekey = Some(protocol::Rekey { key_id: key(3).id(), sealed, grace: 60 });
    // Refused at step 18: no key is taken up (the outcome carries no effects at all).
    let bad = update(Reply { rekey: rekey.clone(), ..reply_at(2, Digest([3; 32])) }, ops_to_new());
    assert_eq!(whole_refusal(&whole(&v, &bad, scan_of(site_tree()))), Reason::TreeMismatch);
    // Accepted: the key comes with the apply.
    let good = update(Reply { rekey, ..reply() }, ops_to_new());
    let WholeStep::Apply { effects, plan, .. } = whole(&v, &good, scan_of(site_tree())) else { panic!("applies") };
    assert_eq!(effects, vec![rcp::Effect::TakeKey { new: key(3), previous_until: NOW + 60 }]);
    assert_eq!(plan.target.root(), new_tree().root());
}

#[test]
fn a_reference_reply_waits_for_asks_for_or_asks_afresh() {
    let mut v = site();
    let same = protocol::SameAs { reply_id: ReplyId::unchecked("cd".repeat(16)), nonce: Nonce([8; 16]), parts: 3 };
    let u = update(Reply { same_as: Some(same.clone()), ..reply() }, Vec::new());
    let step = |v: &MemRecipient| {
        let mut scan = || -> Result<Scan> { panic!("a reference needs no scan") };
        match rcp::on_whole(v, &u, &key(1), &mut scan, &site_tree(), OnExtra::Delete, NOW).unwrap() {
            WholeStep::Referred { step, effects, .. } => {
                assert!(effects.is_empty());
                step
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(step(&v), rcp::Referred::AskFresh, "the request it answered is not outstanding");
    v.outstanding.insert(Nonce([8; 16]), 4);
    assert_eq!(step(&v), rcp::Referred::AskParts);
    v.kept.push(same.reply_id.clone());
    assert_eq!(step(&v), rcp::Referred::Wait);
}

#[test]
fn step_14_a_current_tree_is_confirmed_without_an_apply() {
    let mut v = site();
    v.applied = Applied { generation: 2, root: Some(new_tree().root()), key_id: None };
    let u = update(reply(), Vec::new());
    assert!(
        matches!(whole(&v, &u, scan_of(new_tree())), WholeStep::Current { generation: 2, ref effects } if effects.is_empty())
    );
    let ask = update(Reply { need_full_inventory: true, ..reply() }, Vec::new());
    let mut scan = || -> Result<Scan> { panic!("no scan is needed to ask for the full tree") };
    let step = rcp::on_whole(&v, &ask, &key(1), &mut scan, &site_tree(), OnExtra::Delete, NOW).unwrap();
    assert!(matches!(step, WholeStep::Current { ref effects, .. } if effects == &[rcp::Effect::NeedFullInventory]));
}

#[test]
fn the_keyrings_name_the_role_of_the_key() {
    let mut v = site();
    v.previous = Some((key(2), NOW + 10));
    let ring = RecipientKeys(&v);
    assert_eq!(ring.lookup("site1", &key(1).id(), NOW).unwrap().unwrap().role, KeyRole::Current);
    assert_eq!(ring.lookup("site1", &key(2).id(), NOW).unwrap().unwrap().role, KeyRole::Retired);
    assert_eq!(ring.lookup("site1", &key(2).id(), NOW + 10).unwrap().unwrap_err().reason, Reason::BadMac, "grace over");
}

// ---- the signed broadcast (docs/protocol.md §7.11) ----

fn with_tickets(r: Request) -> Request {
    Request { accepts: vec![protocol::broadcast::Capability::Broadcast], ..r }
}

fn bkey(base: Digest, generation: u64) -> owner::BroadcastKey {
    owner::BroadcastKey { channel: "default".into(), base, generation, lines: false }
}

#[test]
fn broadcast_only_requests_that_announce_tickets_and_need_the_same_update_share_one() {
    let latest = Generation { number: 2, root: new_tree().root() };
    let base = site_tree().root();
    let resend = protocol::Resend { reply_id: ReplyId::unchecked("cd".repeat(16)), parts: vec![1] };
    // Name, request, whether the owner signs, the latest generation, the key it counts under.
    type Case = (&'static str, Request, bool, Option<Generation>, Option<owner::BroadcastKey>);
    let cases: Vec<Case> = vec![
        ("announces_tickets", with_tickets(request()), true, Some(latest), Some(bkey(base, 2))),
        ("an_old_recipient_or_no_pinned_key", request(), true, Some(latest), None),
        ("the_owner_does_not_sign", with_tickets(request()), false, Some(latest), None),
        ("whole_files_only", with_tickets(Request { full_content: true, ..request() }), true, Some(latest), None),
        ("asks_for_lost_parts", with_tickets(Request { resend: Some(resend), ..request() }), true, Some(latest), None),
        ("already_current", with_tickets(Request { root: new_tree().root(), ..request() }), true, Some(latest), None),
        ("nothing_published", with_tickets(request()), true, None, None),
    ];
    for (name, req, signing, latest, want) in cases {
        assert_eq!(owner::broadcast_candidate(&req, latest.as_ref(), signing), want, "{name}");
    }
    let (a, b) = (bkey(base, 2), bkey(new_tree().root(), 2));
    let keys = || vec![a.clone(), b.clone(), a.clone()];
    assert_eq!(owner::shared_broadcasts(keys(), 2), [a.clone()].into(), "a straggler alone gets a private reply");
    assert_eq!(owner::shared_broadcasts(keys(), 1), [a.clone(), b.clone()].into());
    assert!(owner::shared_broadcasts(keys(), 3).is_empty());
    assert_eq!(owner::shared_broadcasts(keys(), 0), [a.clone(), b.clone()].into(), "a minimum of 0 is 1");
}

#[test]
fn broadcast_a_reply_joins_only_when_it_is_an_update_for_a_shared_key() {
    let answer = |w: &MemOwner, r: &Request| match owner_step(w, &mail(Kind::Request, r, "site1", &key(1), &[])) {
        Outcome::Answer(plan) => *plan,
        other => panic!("{other:?}"),
    };
    let w = owner_world();
    let shared = [bkey(site_tree().root(), 2)].into();
    let limit = policy().relay_limit;
    let plan = answer(&w, &with_tickets(request()));
    assert_eq!(owner::joins_broadcast(&plan, &shared, true, limit), Some(bkey(site_tree().root(), 2)));
    assert_eq!(owner::joins_broadcast(&plan, &Default::default(), true, limit), None, "not shared this run");
    assert_eq!(owner::joins_broadcast(&plan, &shared, false, limit), None, "no signing key");
    let small = owner::AnswerPlan { limit: limit - 1, ..plan.clone() };
    assert_eq!(owner::joins_broadcast(&small, &shared, true, limit), None, "a learned smaller part size");
    let old = answer(&w, &request());
    assert_eq!(owner::joins_broadcast(&old, &shared, true, limit), None, "a request without accepts");
    let mut w = owner_world();
    w.earlier =
        Some(protocol::SameAs { reply_id: ReplyId::unchecked("cd".repeat(16)), nonce: Nonce([3; 16]), parts: 1 });
    let reference = answer(&w, &with_tickets(request()));
    assert!(reference.same_as.is_some());
    assert_eq!(owner::joins_broadcast(&reference, &shared, true, limit), None, "a reference reply");
}

fn broadcast_part_of(ticket: &Reply, part: u32) -> protocol::broadcast::Broadcast {
    protocol::broadcast::Broadcast {
        mailferry: VERSION,
        kind: protocol::broadcast::BroadcastKind::Broadcast,
        broadcast: protocol::broadcast::BROADCAST_VERSION,
        channel: ticket.channel.clone(),
        broadcast_id: ticket.broadcast.as_ref().unwrap().id.clone(),
        part,
        parts: ticket.parts,
        created: NOW,
        generation: ticket.generation,
        root: ticket.root,
        base: ticket.base,
        payloads: ticket.payloads.clone(),
    }
}

fn ticket() -> Reply {
    let payloads = (1..=2)
        .map(|k| protocol::Payload { id: format!("pack-{k:04}.bin"), size: 50, blake3: Digest([k as u8; 32]) })
        .collect();
    Reply {
        parts: 2,
        payloads,
        broadcast: Some(protocol::broadcast::BroadcastRef { id: ReplyId::unchecked("ee".repeat(16)) }),
        ..reply()
    }
}

#[test]
fn broadcast_a_part_is_kept_only_for_an_outstanding_ticket_naming_its_exact_chunk() {
    let t = ticket();
    let part = broadcast_part_of(&t, 2);
    let live = Some(rcp::TicketState { ticket: &t, outstanding: true });
    assert_eq!(rcp::on_broadcast_part(&part, live, 0, 1000), rcp::BroadcastStep::Adopt);
    let reason = |step: rcp::BroadcastStep| match step {
        rcp::BroadcastStep::Refused(r) => r.reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    // No ticket yet: held within the bound, refused past it.
    assert_eq!(rcp::on_broadcast_part(&part, None, 950, 1000), rcp::BroadcastStep::Hold);
    assert_eq!(reason(rcp::on_broadcast_part(&part, None, 951, 1000)), Reason::Limit);
    // The ticket's request was answered already: a replayed broadcast changes nothing.
    let closed = Some(rcp::TicketState { ticket: &t, outstanding: false });
    assert_eq!(reason(rcp::on_broadcast_part(&part, closed, 0, 1000)), Reason::Replay);
    // Anything the ticket's MAC vouches for that differs: another chunk, generation, base or channel.
    let mut other_chunk = part.clone();
    other_chunk.payloads[1].blake3 = Digest([9; 32]);
    let mut other_generation = part.clone();
    other_generation.generation += 1;
    let other_base = protocol::broadcast::Broadcast { base: Digest([4; 32]), ..part.clone() };
    let other_channel = protocol::broadcast::Broadcast { channel: "other".into(), ..part.clone() };
    for forged in [other_chunk, other_generation, other_base, other_channel] {
        assert_eq!(reason(rcp::on_broadcast_part(&forged, live, 0, 1000)), Reason::Malformed, "{forged:?}");
    }
}

#[test]
fn broadcast_a_ticket_is_checked_as_any_reply_part() {
    let v = site();
    let t = ticket();
    let signer = SigningKey::from_hex(&"22".repeat(32)).unwrap();
    let signed = |r: &Reply, name: &str, k: &Key| {
        let control = protocol::encode(r);
        let auth = protocol::encode(&Auth::sign(name, k, &control).signed_by(Some(&signer), &control));
        seal(Kind::Reply, &control, &auth, &[])
    };
    let pinned = Some(signer.public());
    assert!(matches!(recipient_step(&v, &signed(&t, "site1", &key(1)), pinned.as_ref()), PartStep::Keep { .. }));
    // A ticket made for another recipient (its key, its name) is refused before anything of it is read.
    let theirs = Reply { recipient: "site2".into(), ..t.clone() };
    assert_eq!(
        part_refusal(&recipient_step(&v, &signed(&theirs, "site2", &key(2)), pinned.as_ref())).0,
        Reason::WrongRecipient
    );
    // Under this recipient's name but another's key.
    assert_eq!(part_refusal(&recipient_step(&v, &signed(&t, "site1", &key(2)), pinned.as_ref())).0, Reason::BadMac);
    // A replayed ticket: its nonce is no longer outstanding.
    let replayed = Reply { nonce: Nonce([8; 16]), ..t.clone() };
    assert_eq!(
        part_refusal(&recipient_step(&v, &signed(&replayed, "site1", &key(1)), pinned.as_ref())),
        (Reason::Replay, false)
    );
    // A ticket for an older generation is a rollback, as any reply.
    let old = Reply { generation: 0, ..t.clone() };
    assert_eq!(part_refusal(&recipient_step(&v, &signed(&old, "site1", &key(1)), pinned.as_ref())).0, Reason::Rollback);
    // Unsigned, at a recipient that pinned the owner key.
    let control = protocol::encode(&t);
    let unsigned = seal(Kind::Reply, &control, &protocol::encode(&Auth::sign("site1", &key(1), &control)), &[]);
    assert_eq!(part_refusal(&recipient_step(&v, &unsigned, pinned.as_ref())).0, Reason::BadSignature);
}
