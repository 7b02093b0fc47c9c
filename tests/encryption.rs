//! Payload encryption per channel (`docs/protocol.md` §4.6): what a relay, a mailbox reader or another
//! customer holding a reply mail can read of it.

use std::fs;
use std::path::{Path, PathBuf};

use mailferry::db::Db;
use mailferry::protocol::envelope;
use mailferry::protocol::{Auth, Kind};

use crate::util::*;

/// A string that stands for the content a vendor ships, embedded in bytes zstd cannot shrink (so that
/// without encryption it travels as it is, and the test can see it).
fn marked(marker: &str, seed: u64) -> Vec<u8> {
    [noise(3000, seed), marker.as_bytes().to_vec(), noise(3000, seed + 1)].concat()
}

fn owner_db(w: &World) -> Db {
    Db::open(&w.path("owner/state.db")).unwrap()
}

/// Turns encryption on for `channel`, as `owner channel add --encrypt` records it.
fn encrypt(w: &World, channel: &str) {
    owner_db(w).set_channel(channel, None, Some(true)).unwrap();
}

/// Everything of a mail a reader of it gets: the raw message and every part decoded.
fn readable(raw: &[u8]) -> Vec<u8> {
    let parsed = envelope::parse(raw, u64::MAX).unwrap();
    let mut all = raw.to_vec();
    all.extend_from_slice(&parsed.control);
    all.extend_from_slice(&parsed.auth);
    for bytes in parsed.attachments.values() {
        all.extend_from_slice(bytes);
    }
    all
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn control_of(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&envelope::parse(&fs::read(path).unwrap(), u64::MAX).unwrap().control).unwrap()
}

/// The one message waiting in `maildir`'s `new/`.
fn only_message(maildir: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = fs::read_dir(maildir.join("new")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "expected one message in `{}`", maildir.display());
    files.pop().unwrap()
}

#[test]
fn an_encrypted_channel_syncs_and_its_mail_shows_nothing_of_the_content() {
    let w = World::new();
    let site = w.site("site1");
    put(&w.source, "README", b"hello\n", 0o644);
    put(&w.source, "plans/one.bin", &marked("MARKER-ONE-the-plaintext-of-a-file", 1), 0o644);
    w.publish();
    // Without encryption the content is in the mail, for anyone who reads it: the check below can fail.
    let plain = w.pending_reply(&site);
    assert!(control_of(&plain).get("sealed-key").is_none());
    assert!(contains(&readable(&fs::read(&plain).unwrap()), b"MARKER-ONE-the-plaintext-of-a-file"));
    site.run(false);
    w.owner_run();
    assert_eq!(site.status()["generation"], 1);

    encrypt(&w, "default");
    put(&w.source, "plans/two.bin", &marked("MARKER-TWO-the-plaintext-of-a-file", 3), 0o644);
    put(&w.source, "README", b"hello, encrypted\n", 0o644);
    w.publish();
    let sealed = w.pending_reply(&site);
    let raw = fs::read(&sealed).unwrap();
    let all = readable(&raw);
    assert!(!contains(&all, b"MARKER-TWO"), "the new file's content travels in the clear");
    assert!(!contains(&all, b"plans/two.bin"), "the body (paths) travels in the clear");
    let (_, channel_key) = owner_db(&w).channel_key("default").unwrap().unwrap();
    assert!(!contains(&all, channel_key.as_bytes()), "the channel key travels in the clear");
    let control = control_of(&sealed);
    let key = &control["sealed-key"];
    assert_eq!(key["epoch"], 1, "{control}");
    assert_eq!(key["alg"], "xchacha20poly1305-stream-64k");
    // The payload sizes are of the ciphertext: one tag per 64 KiB segment more than the plaintext.
    let travels: u64 = control["payloads"].as_array().unwrap().iter().map(|p| p["size"].as_u64().unwrap()).sum();
    assert_eq!(
        travels,
        key["plain-size"].as_u64().unwrap() + 16 * key["plain-size"].as_u64().unwrap().div_ceil(65536).max(1)
    );

    // A dry run decrypts it too, and says what it would change.
    let out = ok(&["recipient", "run", "--config", &site.config, "--dry-run"]);
    assert!(out.lines().any(|l| l == ">f+++++++++ plans/two.bin"), "{out}");
    site.run(false);
    w.owner_run();
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 2);
    assert!(site.rejections().is_empty(), "{:?}", site.rejections());

    // A new epoch: the next reply is encrypted under another key.
    let out = ok(&["owner", "channel", "rekey", "--config", &w.owner_config, "--name", "default", "--json"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["epoch"], 2, "{out}");
    put(&w.source, "plans/three.bin", &marked("MARKER-THREE", 5), 0o644);
    w.publish();
    let next = w.pending_reply(&site);
    assert_eq!(control_of(&next)["sealed-key"]["epoch"], 2);
    site.run(false);
    w.owner_run();
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 3);
}

#[test]
fn another_recipient_handed_a_reply_cannot_read_it() {
    let w = World::new();
    let (site1, site2) = (w.site("site1"), w.site("site2"));
    encrypt(&w, "default");
    put(&w.source, "secret.bin", &marked("MARKER-FOR-SITE1", 7), 0o644);
    w.publish();
    let reply = fs::read(w.pending_reply(&site1)).unwrap();
    // site2 asks too; the owner has not answered it yet.
    site2.run(true);
    let request = only_message(&w.spool.join(OWNER));
    let req = control_of(&request);

    // As it is: another recipient's reply.
    fs::write(site2.maildir(&w).join("new/handed-over"), &reply).unwrap();
    site2.run(false);
    assert_eq!(site2.rejections(), ["wrong-recipient"]);
    assert!(!site2.data.join("secret.bin").exists());

    // With its control part rewritten to answer site2's own request and authenticated under site2's own
    // key (what site2 can do with a copy of site1's mail): the channel key does not open under site2's
    // key, and the pack, bound to site1's reply, does not decrypt.
    let parsed = envelope::parse(&reply, u64::MAX).unwrap();
    let mut control: serde_json::Value = serde_json::from_slice(&parsed.control).unwrap();
    control["recipient"] = "site2".into();
    control["nonce"] = req["nonce"].clone();
    control["request-seq"] = req["seq"].clone();
    let control: mailferry::protocol::Reply = serde_json::from_value(control).unwrap();
    let control = mailferry::protocol::encode(&control);
    let auth = mailferry::protocol::encode(&Auth::sign("site2", &site2.key(), &control));
    let forged = forge(Kind::Reply, (OWNER, &site2.address), &control, &auth, &attachments_of(&parsed));
    fs::write(site2.maildir(&w).join("new/forged"), forged).unwrap();
    let log = site2.run(false);
    assert_eq!(site2.rejections(), ["wrong-recipient", "undecryptable"], "{log}");
    assert!(!site2.data.join("secret.bin").exists());
    assert_eq!(site2.status()["generation"], 0);
    // Nothing of the refused reply is left in site2's state: no decrypted pack, no assembled one.
    let leftovers: Vec<_> =
        walk(&site2.dir).into_iter().filter(|p| p.ends_with("pack") || p.ends_with("sealed")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // site2's own reply, sealed for it, it reads.
    w.owner_run();
    site2.run(false);
    assert_same_tree(&w.source, &site2.data);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn an_encrypted_reply_in_parts_arrives_in_any_order() {
    let w = World::new();
    let site = w.site("site1");
    encrypt(&w, "default");
    let text = fs::read_to_string(&w.owner_config).unwrap();
    fs::write(&w.owner_config, text.replace("relay-limit = 10240000", "relay-limit = 100000")).unwrap();
    put(&w.source, "big.bin", &marked("MARKER-IN-A-BIG-FILE", 11), 0o644);
    put(&w.source, "more.bin", &noise(300_000, 13), 0o644);
    w.publish();
    site.run(true);
    w.owner_run();
    let new = site.maildir(&w).join("new");
    let mut parts: Vec<PathBuf> = fs::read_dir(&new).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(parts.len() >= 4, "300 KB through a 100 KB relay: {} parts", parts.len());
    for p in &parts {
        let control = control_of(p);
        assert!(control["sealed-key"].is_object(), "every part names the sealed key");
        assert!(!contains(&readable(&fs::read(p).unwrap()), b"MARKER-IN-A-BIG-FILE"));
    }
    // The last part first, then the rest: the encrypted pack is whole only then, and decrypts.
    parts.sort_by_key(|p| std::cmp::Reverse(control_of(p)["part"].as_u64().unwrap()));
    let held = w.path("held");
    fs::create_dir_all(&held).unwrap();
    for p in &parts[1..] {
        fs::rename(p, held.join(p.file_name().unwrap())).unwrap();
    }
    site.run(false);
    assert_eq!(site.status()["generation"], 0);
    for p in &parts[1..] {
        fs::rename(held.join(p.file_name().unwrap()), p).unwrap();
    }
    site.run(false);
    assert_same_tree(&w.source, &site.data);
    assert!(site.rejections().is_empty(), "{:?}", site.rejections());
}

#[test]
fn a_channel_added_with_encrypt_reaches_its_granted_recipient_encrypted() {
    let w = World::new();
    let site = w.site("site1");
    put(&w.source, "README", b"the open default channel\n", 0o644);
    w.publish();
    let engine = w.path("engine-source");
    put(&engine, "engine.bin", &marked("MARKER-ENGINE-BUILD", 17), 0o755);
    let cfg = w.owner_config.as_str();
    let src = engine.to_str().unwrap();
    ok(&["owner", "channel", "add", "--config", cfg, "--name", "engine", "--source", src, "--encrypt"]);
    ok(&["owner", "publish", "--config", cfg, "--channel", "engine"]);
    ok(&["owner", "group", "add", "--config", cfg, "--name", "pro", "--members", "site1"]);
    ok(&["owner", "grant", "--config", cfg, "--group", "pro", "--channel", "engine"]);
    let tree = w.path("site1-engine");
    ok(&["recipient", "subscribe", "--config", &site.config, "--channel", "engine", "--data", tree.to_str().unwrap()]);
    site.run(true);
    w.owner_run();
    let new = site.maildir(&w).join("new");
    let replies: Vec<PathBuf> = fs::read_dir(&new).unwrap().map(|e| e.unwrap().path()).collect();
    let (sealed, plain): (Vec<_>, Vec<_>) = replies.iter().partition(|p| control_of(p)["channel"] == "engine");
    assert_eq!((sealed.len(), plain.len()), (1, 1), "one reply per channel");
    assert!(control_of(sealed[0])["sealed-key"].is_object());
    assert!(control_of(plain[0]).get("sealed-key").is_none(), "the default channel does not encrypt");
    assert!(!contains(&readable(&fs::read(sealed[0]).unwrap()), b"MARKER-ENGINE-BUILD"));
    site.run(false);
    assert_same_tree(&engine, &tree);
    assert_same_tree(&w.source, &site.data);
    assert!(site.rejections().is_empty(), "{:?}", site.rejections());
}
