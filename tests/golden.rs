//! Golden messages from `fixtures/mail/`: protocol v1 as it was first sent must keep verifying, decoding
//! and unpacking exactly. A failure here means the wire format changed: bump the protocol version and
//! update docs/protocol.md, do not just regenerate the fixtures.

use std::path::PathBuf;

use mailferry::apply::{self, OnExtra};
use mailferry::crypto::Key;
use mailferry::limits::Limits;
use mailferry::manifest::{Digest, Manifest, Op};
use mailferry::protocol::{self, Control, Kind, Reason, Reply, Update, envelope};
use mailferry::scan::Scan;

fn fixture(rel: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn key() -> Key {
    Key::from_hex(std::str::from_utf8(&fixture("keys/site1.fixture-key")).unwrap()).unwrap()
}

fn open(name: &str) -> (envelope::Parsed, Control) {
    let parsed = envelope::parse(&fixture(&format!("mail/{name}.eml")), Limits::default().max_message_bytes).unwrap();
    let auth = protocol::decode_auth(&parsed.auth).unwrap();
    assert_eq!(auth.recipient, "site1");
    assert_eq!(auth.key_id, key().id());
    protocol::verify_mac(&key(), &auth, &parsed.control).unwrap();
    let control = protocol::decode_control(&parsed.control, &Limits::default()).unwrap();
    (parsed, control)
}

/// The update a single-part reply carries, and its pack (the one chunk) in a file.
fn whole(reply: &Reply, parsed: &envelope::Parsed) -> Result<(Update, tempfile::NamedTempFile), Reason> {
    let pack = &parsed.attachments[&reply.payloads[0].id];
    let frame = usize::try_from(reply.body.offset)
        .ok()
        .zip(usize::try_from(reply.body.offset + reply.body.length).ok())
        .and_then(|(a, b)| pack.get(a..b))
        .ok_or(Reason::BadPayload)?;
    let body = protocol::open_body(reply, frame, &Limits::default()).map_err(|r| r.reason)?;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), pack).unwrap();
    Ok((Update { head: reply.clone(), body }, file))
}

/// Stages `update` into `dir` with nothing local to copy from.
fn stage(update: &Update, pack: &std::path::Path, dir: &std::path::Path) -> Result<(), Reason> {
    let plan = apply::plan(&Scan::default(), &Manifest::new(), update, OnExtra::Delete).map_err(|r| r.reason)?;
    assert_eq!(plan.target.root(), update.head.root);
    let nothing = |_: &Digest| None;
    apply::stage(&plan, update, &apply::Sources { pack, local: &nothing }, dir).map_err(|e| match e {
        apply::StageError::Refused(r) => r.reason,
        other => panic!("{other}"),
    })
}

#[test]
fn golden_request_receipt_and_reply_verify() {
    let (_, request) = open("request");
    assert_eq!(request.kind(), Kind::Request);
    let Control::Request(r) = request else { unreachable!() };
    assert_eq!((r.seq, r.generation, r.inventory.len()), (1, 0, 0));
    assert_eq!(r.root, Manifest::new().root());

    let (_, receipt) = open("receipt");
    assert_eq!(receipt.kind(), Kind::Receipt);

    let (parsed, reply) = open("reply");
    let Control::Reply(reply) = reply else { panic!("not a reply") };
    assert_eq!((reply.generation, reply.part, reply.parts), (1, 1, 1));
    assert_eq!(reply.nonce, r.nonce, "the reply echoes the request's nonce");
    assert_eq!(reply.base, r.root);
    // Planning against the empty tree the request described, then staging, reproduces every file.
    protocol::check_payloads(&reply, &parsed.attachments).unwrap();
    let (update, pack) = whole(&reply, &parsed).unwrap();
    let dir = tempfile::tempdir().unwrap();
    stage(&update, pack.path(), dir.path()).unwrap();
    let puts = update.body.ops.iter().filter(|o| matches!(o, Op::Put { .. })).count();
    assert_eq!(std::fs::read_dir(dir.path().join("files")).unwrap().count(), puts);
    let hello = update.body.ops.iter().find(|o| o.path().as_str() == "hello.txt").unwrap();
    assert!(matches!(hello, Op::Put { blake3, .. } if *blake3 == Digest::of(b"hello\n")));
}

#[test]
fn golden_reply_with_one_flipped_bit_is_refused() {
    let raw = fixture("mail/reply.eml");
    let parsed = envelope::parse(&raw, u64::MAX).unwrap();
    let auth = protocol::decode_auth(&parsed.auth).unwrap();
    for i in (0..parsed.control.len()).step_by(7) {
        let mut c = parsed.control.clone();
        c[i] ^= 0x01;
        let err = protocol::verify_mac(&key(), &auth, &c).expect_err("a changed control part must not verify");
        assert_eq!(err.reason, Reason::BadMac);
    }
}

/// Runs every check a recipient runs on a reply that does not need local state (the nonce and the
/// generation are the state's business), then plans and stages it against the empty tree it was made for.
fn verify_as_recipient(raw: &[u8]) -> Result<usize, Reason> {
    let parsed = envelope::parse(raw, Limits::default().max_message_bytes).map_err(|r| r.reason)?;
    let auth = protocol::decode_auth(&parsed.auth).map_err(|r| r.reason)?;
    if auth.key_id != key().id() {
        return Err(Reason::BadMac);
    }
    protocol::verify_mac(&key(), &auth, &parsed.control).map_err(|r| r.reason)?;
    let Control::Reply(reply) = protocol::decode_control(&parsed.control, &Limits::default()).map_err(|r| r.reason)?
    else {
        return Err(Reason::Unexpected);
    };
    protocol::check_payloads(&reply, &parsed.attachments).map_err(|r| r.reason)?;
    let (update, pack) = whole(&reply, &parsed)?;
    let dir = tempfile::tempdir().unwrap();
    stage(&update, pack.path(), dir.path())?;
    Ok(std::fs::read_dir(dir.path().join("files")).unwrap().count())
}

fn corpus(sub: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/relay").join(sub);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .map(|p| (p.file_name().unwrap().to_str().unwrap().to_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn relay_rewrites_that_keep_decoded_bytes_verify() {
    let original = verify_as_recipient(&fixture("mail/reply.eml")).unwrap();
    let cases = corpus("ok");
    assert!(cases.len() >= 15, "the corpus is in fixtures/relay/ok");
    for (name, raw) in cases {
        assert_eq!(verify_as_recipient(&raw), Ok(original), "{name} must verify and unpack like the original");
    }
}

#[test]
fn relay_rewrites_that_change_decoded_bytes_are_refused() {
    let cases = corpus("bad");
    assert!(cases.len() >= 6, "the corpus is in fixtures/relay/bad");
    for (name, raw) in cases {
        // Files are named CASE.REASON.eml.
        let want = name.trim_end_matches(".eml").rsplit('.').next().unwrap().to_owned();
        let got = verify_as_recipient(&raw).expect_err(&name);
        assert_eq!(got.code(), want, "{name}");
    }
}
