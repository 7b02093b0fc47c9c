//! The signed broadcast (`docs/protocol.md` §7.11): a fleet on one base is sent the update once, plus a
//! ticket each; stragglers, recipients without a pinned owner key and unsolicited broadcast parts.

use std::fs;
use std::path::{Path, PathBuf};

use mailferry::config::NodeConfig;
use mailferry::db::Db;
use mailferry::node::owner::Owner;
use mailferry::protocol::envelope;
use mailferry::transport::maildir::MaildirTransport;
use mailferry::transport::{Disposition, Incoming, Transport, TransportError};

use crate::util::*;

/// The Maildir transport, counting the bytes the owner hands it (a submission to many envelope
/// recipients counts once, as it does on the wire to the submission server).
#[derive(Debug)]
struct Counting {
    inner: MaildirTransport,
    bytes: u64,
    submissions: u64,
}

impl Transport for Counting {
    async fn send(&mut self, from: &str, to: &str, raw: &[u8]) -> Result<(), TransportError> {
        self.bytes += raw.len() as u64;
        self.submissions += 1;
        self.inner.send(from, to, raw).await
    }
    async fn send_many(&mut self, from: &str, to: &[&str], raw: &[u8]) -> Result<(), TransportError> {
        self.bytes += raw.len() as u64;
        self.submissions += 1;
        self.inner.send_many(from, to, raw).await
    }
    async fn fetch(&mut self) -> Result<Vec<Incoming>, TransportError> {
        self.inner.fetch().await
    }
    async fn settle(&mut self, id: &str, disposition: Disposition) -> Result<(), TransportError> {
        self.inner.settle(id, disposition).await
    }
}

/// `owner run --once` through the library; returns the bytes and submissions handed to the transport.
fn owner_run_counted(w: &World) -> (u64, u64) {
    let NodeConfig::Owner(cfg) = NodeConfig::load(Path::new(&w.owner_config)).unwrap() else { panic!("an owner") };
    let mut t = Counting { inner: MaildirTransport::new(&w.spool, OWNER).unwrap(), bytes: 0, submissions: 0 };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut owner = Owner::open(cfg).unwrap();
    rt.block_on(owner.run_once(&mut t)).unwrap();
    (t.bytes, t.submissions)
}

fn signing_world() -> World {
    let w = World::new();
    let cfg = fs::read_to_string(&w.owner_config).unwrap();
    fs::write(&w.owner_config, cfg.replacen("signing = \"hmac\"", "signing = \"hmac+ed25519\"", 1)).unwrap();
    w
}

/// The messages waiting in a site's `new/`, as (path, control part).
fn waiting(site: &Site, w: &World) -> Vec<(PathBuf, serde_json::Value)> {
    let new = site.maildir(w).join("new");
    let Ok(dir) = fs::read_dir(&new) else { return Vec::new() };
    let mut out: Vec<_> = dir
        .map(|e| {
            let p = e.unwrap().path();
            let control = envelope::parse(&fs::read(&p).unwrap(), u64::MAX).unwrap().control;
            (p, serde_json::from_slice(&control).unwrap())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn kinds(msgs: &[(PathBuf, serde_json::Value)]) -> (usize, usize, usize) {
    let broadcasts = msgs.iter().filter(|(_, c)| c["type"] == "broadcast").count();
    let tickets = msgs.iter().filter(|(_, c)| c["type"] == "reply" && c.get("broadcast").is_some()).count();
    let private = msgs.iter().filter(|(_, c)| c["type"] == "reply" && c.get("broadcast").is_none()).count();
    (broadcasts, tickets, private)
}

#[test]
fn a_fleet_on_one_base_is_sent_the_update_once_and_a_ticket_each() {
    let w = signing_world();
    put(&w.source, "README", b"generation one\n", 0o644);
    put(&w.source, "db/main.bin", &noise(200_000, 1), 0o644);
    w.publish();
    // A straggler on generation 1; everyone else starts empty.
    let late = w.site("late");
    w.sync(&late);
    assert_eq!(late.status()["generation"], 1);
    put(&w.source, "db/daily.bin", &noise(150_000, 2), 0o644);
    put(&w.source, "README", b"generation two\n", 0o644);
    w.publish();
    let sites: Vec<Site> = (0..20).map(|i| w.site(&format!("site{i:02}"))).collect();
    // A recipient that never pinned the owner's key cannot verify a broadcast: it is answered privately.
    let unpinned = w.site("unpinned");
    let cfg = fs::read_to_string(&unpinned.config).unwrap();
    let cfg: String = cfg.lines().filter(|l| !l.starts_with("owner-public-key")).map(|l| format!("{l}\n")).collect();
    fs::write(&unpinned.config, cfg).unwrap();
    for s in sites.iter().chain([&late, &unpinned]) {
        s.run(true);
    }
    let (bytes, submissions) = owner_run_counted(&w);

    // Every site on the empty tree has one copy of the broadcast and its own ticket.
    let mut broadcast_bytes = 0;
    for s in &sites {
        let msgs = waiting(s, &w);
        assert_eq!(kinds(&msgs), (1, 1, 0), "{}: {msgs:?}", s.address);
        let (path, _) = msgs.iter().find(|(_, c)| c["type"] == "broadcast").unwrap();
        broadcast_bytes = fs::metadata(path).unwrap().len();
    }
    // The straggler (another base) and the unpinned site get private replies.
    assert_eq!(kinds(&waiting(&late, &w)), (0, 0, 1));
    assert_eq!(kinds(&waiting(&unpinned, &w)), (0, 0, 1));
    let private: u64 = [&late, &unpinned].iter().map(|s| fs::metadata(&waiting(s, &w)[0].0).unwrap().len()).sum();
    let unpinned_reply = fs::metadata(&waiting(&unpinned, &w)[0].0).unwrap().len();
    assert!(unpinned_reply > 300_000, "a private reply to an empty tree carries the payload: {unpinned_reply}");
    // What the owner handed its transport: one payload and twenty tickets, beside the two private
    // replies; not twenty payloads.
    let fleet = bytes - private;
    assert!(
        fleet <= broadcast_bytes * 12 / 10 + 20 * 4096,
        "fleet bytes {fleet}, one broadcast {broadcast_bytes}: should be one payload plus 20 tickets"
    );
    assert!(fleet >= broadcast_bytes, "the broadcast itself is sent: {fleet} < {broadcast_bytes}");
    assert!(
        fleet * 10 < 20 * unpinned_reply,
        "20 private replies would cost {}; broadcast {fleet}",
        20 * unpinned_reply
    );
    assert_eq!(submissions, 1 + 20 + 2, "one submission for the broadcast, one per ticket and private reply");
    let owner = Db::open(&w.path("owner/state.db")).unwrap();
    let made = owner.broadcasts().unwrap();
    assert_eq!(made.len(), 1);
    assert_eq!(made[0].3, 20, "twenty tickets");

    // Every tree ends at generation 2, each through its own ticket.
    for s in sites.iter().chain([&late, &unpinned]) {
        s.run(false);
        assert_eq!(s.status()["generation"], 2, "{}", s.address);
        assert_same_tree(&w.source, &s.data);
        assert!(s.rejections().is_empty(), "{}: {:?}", s.address, s.rejections());
    }
    w.owner_run();

    // A ticket is for its recipient only, and only once.
    let (a, b) = (&sites[0], &sites[1]);
    put(&w.source, "README", b"generation three\n", 0o644);
    w.publish();
    a.run(true);
    b.run(true);
    w.owner_run();
    let ticket = |s: &Site| {
        waiting(s, &w).into_iter().find(|(_, c)| c["type"] == "reply" && c.get("broadcast").is_some()).unwrap().0
    };
    let (ticket_a, ticket_b) = (ticket(a), ticket(b));
    let kept_a = fs::read(&ticket_a).unwrap();
    fs::copy(&ticket_b, a.maildir(&w).join("new").join("ticket-of-b")).unwrap();
    a.run(false);
    assert_eq!(a.status()["generation"], 3);
    assert_eq!(a.rejections(), ["wrong-recipient"], "another recipient's ticket is refused");
    fs::write(a.maildir(&w).join("new").join("ticket-again"), &kept_a).unwrap();
    a.run(false);
    assert_eq!(a.rejections(), ["wrong-recipient", "replay"], "a ticket replayed is refused");
    b.run(false);
    assert_eq!(b.status()["generation"], 3);
}

#[test]
fn broadcast_parts_without_a_ticket_change_nothing_and_an_encrypted_one_is_unreadable() {
    let w = signing_world();
    Db::open(&w.path("owner/state.db")).unwrap().set_channel("default", None, Some(true)).unwrap();
    let marker = b"MARKER-the-plaintext-of-a-shipped-file";
    put(&w.source, "plans/one.bin", &[noise(3000, 1), marker.to_vec(), noise(3000, 2)].concat(), 0o644);
    w.publish();
    let (a, b, outsider) = (w.site("site1"), w.site("site2"), w.site("outsider"));
    a.run(true);
    b.run(true);
    w.owner_run();
    let part = waiting(&a, &w).into_iter().find(|(_, c)| c["type"] == "broadcast").unwrap().0;
    let raw = fs::read(&part).unwrap();
    let parsed = envelope::parse(&raw, u64::MAX).unwrap();
    let all: Vec<u8> = [raw.clone(), parsed.attachments.values().flatten().copied().collect()].concat();
    assert!(!all.windows(marker.len()).any(|x| x == marker), "the broadcast travels in the clear");
    assert!(!all.windows(13).any(|x| x == b"plans/one.bin"), "the body travels in the clear");

    // A recipient that asked for nothing, handed the broadcast (another customer's copy): it holds the
    // part for a ticket that never comes, its tree stays as it is, and when the bound passes the part is
    // refused with a reason.
    fs::create_dir_all(outsider.maildir(&w).join("new")).unwrap();
    fs::write(outsider.maildir(&w).join("new").join("someone-elses"), &raw).unwrap();
    // And a forged one: the same part, its signature made by another key.
    let forged_auth = {
        let other = mailferry::crypto::SigningKey::from_hex(&"44".repeat(32)).unwrap();
        mailferry::protocol::encode(&mailferry::protocol::broadcast::BroadcastAuth::sign(&other, &parsed.control))
    };
    let forged = forge(
        mailferry::protocol::Kind::Reply,
        (OWNER, &outsider.address),
        &parsed.control,
        &forged_auth,
        &attachments_of(&parsed),
    );
    fs::write(outsider.maildir(&w).join("new").join("forged"), &forged).unwrap();
    outsider.run(false);
    assert_eq!(outsider.status()["generation"], 0);
    assert!(snapshot(&outsider.data).is_empty(), "nothing reached the tree");
    assert_eq!(outsider.rejections(), ["bad-signature"]);
    let db = Db::open(&outsider.dir.join("state.db")).unwrap();
    assert!(db.held_broadcast_bytes().unwrap() > 0, "the genuine part is held for a ticket");
    drop(db);
    let conn = rusqlite::Connection::open(outsider.dir.join("state.db")).unwrap();
    conn.execute("UPDATE held_broadcast_parts SET at = at - 25 * 3600", []).unwrap();
    drop(conn);
    outsider.run(false);
    assert_eq!(outsider.rejections(), ["bad-signature", "unexpected"], "no ticket within the bound");
    assert_eq!(Db::open(&outsider.dir.join("state.db")).unwrap().held_broadcast_bytes().unwrap(), 0);
    assert!(snapshot(&outsider.data).is_empty());

    // The two that asked decrypt it through their own tickets.
    for s in [&a, &b] {
        s.run(false);
        assert_eq!(s.status()["generation"], 1, "{}", s.address);
        assert_same_tree(&w.source, &s.data);
    }
}
