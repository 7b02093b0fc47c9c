//! Hostile and broken input: every case must be refused with its reason recorded and the tree unchanged.

use std::fs;
use std::path::Path;

use mailferry::manifest::Digest;
use mailferry::protocol::envelope::{self, Outgoing};
use mailferry::protocol::{Auth, Frame, Kind, Reply};

use crate::util::*;

/// A world with one synced recipient and generation 2 published (so the next reply carries changes).
fn world_with_pending_change() -> (World, Site) {
    let w = World::new();
    let site = w.site("site1");
    varied_tree(&w.source);
    w.publish();
    w.sync(&site);
    put(&w.source, "README", b"version 2\n", 0o644);
    put(&w.source, "added/new.bin", &[7u8; 5000], 0o644);
    w.publish();
    (w, site)
}

/// Rewrites the control part of the message at `path` with `edit`, then signs it again with `key`, as
/// an attacker holding the key (or a bug in the owner) would. This isolates the checks after the MAC.
///
/// For a single-part reply `edit` sees the control part and the body (from the pack) as two lines, so it
/// can change either; the pack and the control part's chunk and body entries are rebuilt to match.
fn resign(path: &Path, key: &mailferry::crypto::Key, recipient: &str, edit: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    let raw = fs::read(path).unwrap();
    let parsed = envelope::parse(&raw, u64::MAX).unwrap();
    let head: serde_json::Value = serde_json::from_slice(&parsed.control).unwrap();
    let (control, attachments) = if head["type"] == "reply" {
        let (reply, pack, body) = unpack(&parsed);
        let (id, at) = (reply.payloads[0].id.clone(), reply.body.offset as usize);
        let both = edit([parsed.control.clone(), b"\n".to_vec(), body.clone()].concat());
        let split = both.iter().position(|&b| b == b'\n').expect("the edit keeps the two lines");
        let (control, new_body) = (&both[..split], &both[split + 1..]);
        assert!(control != parsed.control || new_body != body, "the edit must change the reply");
        let frame = zstd::encode_all(new_body, 3).unwrap();
        let new_pack = [&pack[..at], frame.as_slice()].concat();
        let mut reply: Reply = serde_json::from_slice(control).unwrap();
        reply.body = Frame {
            offset: at as u64,
            length: frame.len() as u64,
            size: new_body.len() as u64,
            blake3: Digest::of(new_body),
        };
        reply.payloads[0].size = new_pack.len() as u64;
        reply.payloads[0].blake3 = Digest::of(&new_pack);
        (mailferry::protocol::encode(&reply), vec![(id, new_pack)])
    } else {
        let control = edit(parsed.control.clone());
        assert_ne!(control, parsed.control, "the edit must change the control part");
        (control, parsed.attachments.clone().into_iter().collect())
    };
    let auth = mailferry::protocol::encode(&Auth::sign(recipient, key, &control));
    let payloads = attachments.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
    let rebuilt = envelope::build(&Outgoing {
        from: OWNER,
        to: "site1@customer.test",
        subject: "forged".into(),
        text: "forged".into(),
        kind: Kind::Reply,
        control: &control,
        auth: &auth,
        payloads,
    })
    .unwrap();
    fs::write(path, rebuilt).unwrap();
}

/// A single-part reply's control fields, its pack (the one chunk) and its decoded body bytes.
fn unpack(parsed: &envelope::Parsed) -> (Reply, &[u8], Vec<u8>) {
    let reply: Reply = serde_json::from_slice(&parsed.control).unwrap();
    let pack = parsed.attachments[&reply.payloads[0].id].as_slice();
    let (at, len) = (reply.body.offset as usize, reply.body.length as usize);
    let body = zstd::decode_all(&pack[at..at + len]).unwrap();
    (reply, pack, body)
}

/// The decoded body of the single-part reply at `path`.
fn body_of(path: &Path) -> serde_json::Value {
    let parsed = envelope::parse(&fs::read(path).unwrap(), u64::MAX).unwrap();
    serde_json::from_slice(&unpack(&parsed).2).unwrap()
}

fn replace(control: Vec<u8>, from: &str, to: &[u8]) -> Vec<u8> {
    let s = control;
    let at =
        s.windows(from.len()).position(|w| w == from.as_bytes()).unwrap_or_else(|| panic!("{from:?} not in control"));
    [&s[..at], to, &s[at + from.len()..]].concat()
}

/// Applies the pending reply and checks it was refused for `reason` with the tree unchanged.
pub(crate) fn expect_refused(w: &World, site: &Site, reason: &str) {
    let before = snapshot(&site.data);
    let refused_before = site.rejections().len();
    let log = site.run(false);
    assert_eq!(snapshot(&site.data), before, "tree changed after a refused reply; log:\n{log}");
    let reasons = site.rejections();
    assert_eq!(reasons.len(), refused_before + 1, "one refusal recorded; log:\n{log}");
    assert_eq!(reasons.last().unwrap(), reason, "log:\n{log}");
    assert!(log.contains("refused message"), "refusal is logged:\n{log}");
    assert_eq!(fs::read_dir(site.maildir(w).join(".rejected/cur")).unwrap().count(), refused_before + 1);
    assert_eq!(site.status()["generation"], 1);
}

/// Flips one alphanumeric character of the encoded body of the part named `marker`, about `skip` bytes in
/// (wrapping around in a short body), so the decoded bytes change and the MIME structure does not.
fn flip_after(path: &Path, marker: &str, skip: usize) {
    let mut raw = fs::read(path).unwrap();
    let at = raw.windows(marker.len()).position(|w| w == marker.as_bytes()).unwrap();
    let body = at + raw[at..].windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let end = body + raw[body..].windows(4).position(|w| w == b"\r\n--").unwrap();
    let alnum: Vec<usize> = (body..end).filter(|&i| raw[i].is_ascii_alphanumeric()).collect();
    assert!(!alnum.is_empty(), "part {marker} has an empty body");
    let pos = alnum[skip % alnum.len()];
    raw[pos] = if raw[pos] == b'Q' { b'R' } else { b'Q' };
    fs::write(path, raw).unwrap();
}

#[test]
fn tampered_control_part_is_refused() {
    let (w, site) = world_with_pending_change();
    let reply = w.pending_reply(&site);
    flip_after(&reply, "control.json", 30);
    expect_refused(&w, &site, "bad-mac");
}

#[test]
fn tampered_payload_is_refused() {
    let (w, site) = world_with_pending_change();
    let reply = w.pending_reply(&site);
    flip_after(&reply, "pack-0001.bin", 50);
    expect_refused(&w, &site, "bad-payload");
}

#[test]
fn payload_that_unpacks_to_other_content_is_refused() {
    // Even with a valid MAC, a file whose content does not hash to the listed digest never lands.
    let (w, site) = world_with_pending_change();
    let reply = w.pending_reply(&site);
    let key = site.key();
    let body = body_of(&reply);
    let readme = body["ops"].as_array().unwrap().iter().find(|o| o["path"] == "README").unwrap();
    let digest = readme["blake3"].as_str().unwrap().to_owned();
    resign(&reply, &key, "site1", |c| {
        replace(c, &digest, mailferry::manifest::Digest::of(b"other").to_hex().as_bytes())
    });
    // The root no longer matches either, so it is refused before staging.
    expect_refused(&w, &site, "tree-mismatch");
}

#[test]
fn unlisted_attachment_is_refused() {
    let (w, site) = world_with_pending_change();
    let reply = w.pending_reply(&site);
    let raw = fs::read(&reply).unwrap();
    let parsed = envelope::parse(&raw, u64::MAX).unwrap();
    let mut payloads = attachments_of(&parsed);
    payloads.push(("evil.sh", b"#!/bin/sh\nrm -rf /\n"));
    let rebuilt = forge(Kind::Reply, (OWNER, &site.address), &parsed.control, &parsed.auth, &payloads);
    fs::write(&reply, rebuilt).unwrap();
    expect_refused(&w, &site, "bad-payload");
}

#[test]
fn reply_for_another_recipient_is_refused() {
    let (w, site) = world_with_pending_change();
    let other = w.site("site2");
    let reply = w.pending_reply(&other);
    site.run(true);
    let stolen = site.maildir(&w).join("new").join("stolen");
    fs::rename(&reply, &stolen).unwrap();
    expect_refused(&w, &site, "wrong-recipient");
}

#[test]
fn replayed_old_reply_is_refused() {
    let (w, site) = world_with_pending_change();
    let reply = w.pending_reply(&site);
    let copy = fs::read(&reply).unwrap();
    site.run(false);
    assert_eq!(site.status()["generation"], 2);
    w.owner_run();
    // Move on to generation 3, then replay generation 2's reply under a new name.
    put(&w.source, "README", b"version 3\n", 0o644);
    w.publish();
    w.sync(&site);
    assert_eq!(site.status()["generation"], 3);
    let before = snapshot(&site.data);
    fs::write(site.maildir(&w).join("new/replayed"), &copy).unwrap();
    let log = site.run(false);
    assert_eq!(snapshot(&site.data), before);
    assert_eq!(site.rejections(), ["replay"], "{log}");
    assert_eq!(site.status()["generation"], 3);
}

#[test]
fn reply_to_a_nonce_never_sent_is_refused() {
    let (w, site) = world_with_pending_change();
    let reply = w.pending_reply(&site);
    let key = site.key();
    let raw = fs::read(&reply).unwrap();
    let parsed = envelope::parse(&raw, u64::MAX).unwrap();
    let control: serde_json::Value = serde_json::from_slice(&parsed.control).unwrap();
    let nonce = control["nonce"].as_str().unwrap().to_owned();
    resign(&reply, &key, "site1", |c| replace(c, &nonce, "00000000000000000000000000000000".as_bytes()));
    // The real reply was consumed by the edit; the forged one answers nothing we asked.
    let before = snapshot(&site.data);
    site.run(false);
    assert_eq!(snapshot(&site.data), before);
    assert_eq!(site.rejections(), ["replay"]);
}

#[test]
fn rollback_to_an_older_generation_is_refused() {
    let (w, site) = world_with_pending_change();
    let reply = w.pending_reply(&site);
    let key = site.key();
    resign(&reply, &key, "site1", |c| replace(c, "\"generation\":2", b"\"generation\":0"));
    expect_refused(&w, &site, "rollback");
}

/// Every hostile path or mode, put into a correctly signed reply, is refused before anything is written.
#[test]
fn hostile_paths_are_refused() {
    let cases: &[(&str, &[u8], &str)] = &[
        ("dotdot", b"../escape", "bad-path"),
        ("dotdot-inner", b"added/../../escape", "bad-path"),
        ("absolute", b"/tmp/mailferry-escape", "bad-path"),
        ("empty-component", b"added//new.bin", "bad-path"),
        ("dot", b"./added/new.bin", "bad-path"),
        ("nul", b"added/new\\u0000.bin", "bad-path"),
        ("backslash", b"added\\\\..\\\\..\\\\x", "bad-path"),
        ("control-char", b"added/new\\n.bin", "bad-path"),
        ("non-utf8", b"added/new\xff.bin", "malformed"),
        ("empty", b"", "bad-path"),
    ];
    for (name, hostile, reason) in cases {
        let (w, site) = world_with_pending_change();
        let reply = w.pending_reply(&site);
        resign(&reply, &site.key(), "site1", |c| replace(c, "added/new.bin", hostile));
        eprintln!("case {name}");
        expect_refused(&w, &site, reason);
        assert!(!Path::new("/tmp/mailferry-escape").exists());
    }
}

#[test]
fn setuid_and_odd_modes_are_refused() {
    let (w, site) = world_with_pending_change();
    let reply = w.pending_reply(&site);
    resign(&reply, &site.key(), "site1", |c| {
        let s = String::from_utf8(c).unwrap();
        let at = s.find("\"path\":\"added/new.bin\"").unwrap();
        let mode_at = at + s[at..].find("\"mode\":420").unwrap();
        format!("{}\"mode\":2541{}", &s[..mode_at], &s[mode_at + "\"mode\":420".len()..]).into_bytes()
    });
    expect_refused(&w, &site, "malformed");
}

#[test]
fn case_insensitive_collisions_are_refused() {
    let (w, site) = world_with_pending_change();
    let reply = w.pending_reply(&site);
    // Add a second directory that differs only in case from an existing one.
    resign(&reply, &site.key(), "site1", |c| {
        replace(c, "\"ops\":[", b"\"ops\":[{\"op\":\"mkdir\",\"path\":\"DATA\"},")
    });
    expect_refused(&w, &site, "bad-path");
}

#[test]
fn symlink_leading_outside_the_tree_is_refused() {
    let (w, site) = world_with_pending_change();
    let outside = w.path("outside");
    fs::create_dir_all(&outside).unwrap();
    let _reply = w.pending_reply(&site);
    // Someone plants a symlink in the data tree after the request went out.
    std::os::unix::fs::symlink(&outside, site.data.join("added")).unwrap();
    expect_refused(&w, &site, "local-tree");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "nothing was written through the link");
}

#[test]
fn special_files_in_the_tree_are_refused() {
    // A FIFO always; a character device where this process may create one (as root).
    for (name, cmd) in [("fifo", vec!["mkfifo"]), ("null-device", vec!["mknod", "-m", "666"])] {
        let (w, site) = world_with_pending_change();
        let _reply = w.pending_reply(&site);
        let path = site.data.join(name);
        let mut c = std::process::Command::new(cmd[0]);
        c.args(&cmd[1..]).arg(&path);
        if name == "null-device" {
            c.args(["c", "1", "3"]);
        }
        if !c.status().is_ok_and(|s| s.success()) {
            assert_ne!(name, "fifo", "mkfifo must work");
            continue;
        }
        expect_refused(&w, &site, "local-tree");
        // The reply was authentic but unusable: the recipient asks again at once, and once the special
        // file is gone the sync goes through.
        fs::remove_file(&path).unwrap();
        w.sync(&site);
        assert_same_tree(&w.source, &site.data);
    }
}

#[test]
fn oversized_message_is_refused_before_parsing() {
    let (w, site) = world_with_pending_change();
    let cfg = fs::read_to_string(&site.config).unwrap();
    fs::write(&site.config, format!("{cfg}\n[limits]\nmax-message-bytes = 2000\n")).unwrap();
    let _reply = w.pending_reply(&site);
    expect_refused(&w, &site, "limit");
}

#[test]
fn forged_sender_headers_do_not_redirect_replies() {
    let (w, site) = world_with_pending_change();
    site.run(true);
    let owner_new = w.spool.join(OWNER).join("new");
    let req = fs::read_dir(&owner_new).unwrap().next().unwrap().unwrap().path();
    let raw = String::from_utf8(fs::read(&req).unwrap()).unwrap();
    let forged = raw.replacen(
        "From: <site1@customer.test>",
        "From: <attacker@evil.test>\r\nReply-To: <attacker@evil.test>\r\nSender: <attacker@evil.test>",
        1,
    );
    assert_ne!(forged, raw, "From header found");
    fs::write(&req, forged).unwrap();
    w.owner_run();
    assert!(!w.spool.join("attacker@evil.test").exists(), "nothing was sent to the forged address");
    assert_eq!(
        fs::read_dir(site.maildir(&w).join("new")).unwrap().count(),
        1,
        "the reply went to the registered address"
    );
    site.run(false);
    assert_same_tree(&w.source, &site.data);
}

#[test]
fn requests_from_unknown_or_removed_recipients_are_refused() {
    let (w, site) = world_with_pending_change();
    ok(&["owner", "remove-recipient", "--config", &w.owner_config, "--name", "site1"]);
    site.run(true);
    w.owner_run();
    assert_eq!(rejections(&w.owner_config), ["unknown-recipient"]);
    assert!(!site.maildir(&w).join("new").read_dir().unwrap().any(|_| true), "no reply was sent");
    let err = fails(&["owner", "remove-recipient", "--config", &w.owner_config, "--name", "nobody"], 2);
    assert!(err.contains("no recipient named \"nobody\""), "{err}");
}

#[test]
fn a_request_signed_with_another_key_is_refused() {
    let (w, site) = world_with_pending_change();
    let other = w.site("site2");
    // site2 claims to be site1: it signs with its own key but names site1.
    fs::write(
        other.dir.join("recipient.toml"),
        fs::read_to_string(&other.config).unwrap().replace("name = \"site2\"", "name = \"site1\""),
    )
    .unwrap();
    other.run(true);
    w.owner_run();
    assert_eq!(rejections(&w.owner_config), ["bad-mac"]);
    let _ = site;
}

#[test]
fn user_mistakes_get_one_clear_line() {
    let w = World::new();
    let site = w.site("site1");
    let err = fails(&["status", "--config", "/nonexistent/owner.toml"], 2);
    assert_eq!(err.trim(), "error: config file `/nonexistent/owner.toml` does not exist");

    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(site.dir.join("recipient.key"), fs::Permissions::from_mode(0o644)).unwrap();
    let err = fails(&["recipient", "run", "--config", &site.config, "--once"], 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("readable by others") && err.contains("chmod 600"), "{err}");

    let err = fails(&["owner", "publish", "--config", &site.config], 2);
    assert!(err.contains("is a recipient's config"), "{err}");

    let enrollment = w.path("site1.enrollment");
    let err = fails(
        &[
            "owner",
            "add-recipient",
            "--config",
            &w.owner_config,
            "--name",
            "site1",
            "--address",
            "x@y",
            "--out",
            w.path("again").to_str().unwrap(),
        ],
        2,
    );
    assert!(err.contains("already registered"), "{err}");
    assert!(enrollment.exists());
}

#[test]
fn enrollment_files_are_private() {
    let w = World::new();
    let _site = w.site("site1");
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(w.path("site1.enrollment")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = fs::read_to_string(w.path("site1.enrollment")).unwrap();
    for key in ["owner-address", "name = \"site1\"", "address = \"site1@customer.test\"", "key = ", "[transport]"] {
        assert!(text.contains(key), "enrollment lacks {key}: {text}");
    }
    // Keys differ per recipient.
    let other = w.site("site2");
    assert_ne!(_site.key(), other.key());
}

#[test]
fn reply_id_that_names_a_path_is_refused() {
    let (w, site) = world_with_pending_change();
    let victim = w.path("victim");
    fs::create_dir_all(&victim).unwrap();
    fs::write(victim.join("precious"), b"keep me").unwrap();
    let reply = w.pending_reply(&site);
    let raw = fs::read(&reply).unwrap();
    let control: serde_json::Value = serde_json::from_slice(&envelope::parse(&raw, u64::MAX).unwrap().control).unwrap();
    let id = control["reply-id"].as_str().unwrap().to_owned();
    let evil = format!("../../../../../../..{}", victim.display());
    resign(&reply, &site.key(), "site1", |c| replace(c, &id, evil.as_bytes()));
    expect_refused(&w, &site, "malformed");
    assert_eq!(fs::read(victim.join("precious")).unwrap(), b"keep me");
}

#[test]
fn reply_naming_another_request_or_same_generation_with_other_root_is_refused() {
    let (w, site) = world_with_pending_change();
    let reply = w.pending_reply(&site);
    resign(&reply, &site.key(), "site1", |c| replace(c, "\"request-seq\":2", b"\"request-seq\":1"));
    expect_refused(&w, &site, "malformed");

    // Generation 1 is applied; a reply claiming generation 1 with another root is a rollback in disguise.
    let reply = w.pending_reply(&site);
    resign(&reply, &site.key(), "site1", |c| replace(c, "\"generation\":2", b"\"generation\":1"));
    expect_refused(&w, &site, "rollback");
    // The refused replies answered their requests: the next run asks again and the sync completes.
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
}

#[test]
fn auth_part_naming_another_key_is_refused() {
    let (w, site) = world_with_pending_change();
    let reply = w.pending_reply(&site);
    let raw = String::from_utf8(fs::read(&reply).unwrap()).unwrap();
    let parsed = envelope::parse(raw.as_bytes(), u64::MAX).unwrap();
    let mut auth: serde_json::Value = serde_json::from_slice(&parsed.auth).unwrap();
    auth["key-id"] = "0000000000000000".into();
    let auth = serde_json::to_vec(&auth).unwrap();
    let rebuilt = forge(Kind::Reply, (OWNER, &site.address), &parsed.control, &auth, &attachments_of(&parsed));
    fs::write(&reply, rebuilt).unwrap();
    expect_refused(&w, &site, "bad-mac");
}

#[test]
fn receipts_must_match_the_reply_that_was_sent() {
    let (w, site) = world_with_pending_change();
    site.run(true);
    w.owner_run();
    site.run(false);
    let owner_new = w.spool.join(OWNER).join("new");
    let receipt = fs::read_dir(&owner_new).unwrap().next().unwrap().unwrap().path();
    let original = fs::read(&receipt).unwrap();
    resign(&receipt, &site.key(), "site1", |c| replace(c, "\"generation\":2", b"\"generation\":99"));
    w.owner_run();
    assert_eq!(rejections(&w.owner_config), ["malformed"]);
    assert_ne!(w.owner_status()["recipients"][0]["applied_generation"], 99);
    // The genuine receipt is recorded once; a second copy is a replay.
    fs::write(owner_new.join("genuine"), &original).unwrap();
    w.owner_run();
    assert_eq!(w.owner_status()["recipients"][0]["applied_generation"], 2);
    fs::write(owner_new.join("again"), &original).unwrap();
    w.owner_run();
    assert_eq!(rejections(&w.owner_config), ["malformed", "replay"]);
}

#[test]
fn request_with_an_attachment_is_refused() {
    let (w, site) = world_with_pending_change();
    site.run(true);
    let owner_new = w.spool.join(OWNER).join("new");
    let req = fs::read_dir(&owner_new).unwrap().next().unwrap().unwrap().path();
    let parsed = envelope::parse(&fs::read(&req).unwrap(), u64::MAX).unwrap();
    let extra: &[u8] = b"surprise";
    let rebuilt = forge(Kind::Request, (&site.address, OWNER), &parsed.control, &parsed.auth, &[("extra.bin", extra)]);
    fs::write(&req, rebuilt).unwrap();
    w.owner_run();
    assert_eq!(rejections(&w.owner_config), ["bad-payload"]);
    assert_eq!(fs::read_dir(site.maildir(&w).join("new")).unwrap().count(), 0, "no reply");
}

#[test]
fn links_that_escape_or_are_written_through_are_refused() {
    let cases: &[(&str, &[u8], &str)] = &[
        // A link whose target climbs out of the tree.
        ("escaping", b"{\"op\":\"link\",\"path\":\"evil\",\"target\":\"../../../../../../etc\"},", "bad-path"),
        // An absolute target does not even decode.
        ("absolute", b"{\"op\":\"link\",\"path\":\"evil\",\"target\":\"/etc\"},", "malformed"),
        // A link to a directory, then something created "inside" it: its parent is not a directory.
        (
            "through",
            b"{\"op\":\"link\",\"path\":\"via\",\"target\":\"data\"},{\"op\":\"mkdir\",\"path\":\"via/x\"},",
            "bad-path",
        ),
    ];
    for (name, ops, reason) in cases {
        let (w, site) = world_with_pending_change();
        let reply = w.pending_reply(&site);
        resign(&reply, &site.key(), "site1", |c| replace(c, "\"ops\":[", &[b"\"ops\":[".as_slice(), ops].concat()));
        eprintln!("case {name}");
        expect_refused(&w, &site, reason);
        assert!(!site.data.join("evil").exists() && !site.data.join("via").exists());
    }
}

/// An attacker who withholds every reply cannot make the recipient believe it is current: after
/// `stale-after` without a fresh, authenticated reply it says it is stale, and tells an admin once.
#[test]
fn withheld_updates_make_the_recipient_report_itself_stale() {
    let w = World::new();
    let site = w.site("site1");
    let cfg = fs::read_to_string(&site.config).unwrap();
    fs::write(
        &site.config,
        cfg.replace("[transport]", "stale-after = \"2s\"\nadmin-address = \"admin@customer.test\"\n\n[transport]"),
    )
    .unwrap();
    put(&w.source, "a", b"1", 0o644);
    w.publish();
    site.run(true);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    // The owner's reply never arrives (withheld): the recipient is stale.
    let out = run(&["status", "--config", &site.config]);
    assert_eq!(out.status.code(), Some(1), "status exits 1 when stale");
    assert!(String::from_utf8_lossy(&out.stdout).contains("STALE"));
    assert_eq!(site.status()["stale"], true);
    let log = site.run(false);
    assert!(log.contains("updates may be withheld"), "{log}");
    site.run(false);
    let admin = w.spool.join("admin@customer.test").join("new");
    assert_eq!(count(&admin), 1, "one notice per stale spell");
    let notice = fs::read_to_string(fs::read_dir(&admin).unwrap().next().unwrap().unwrap().path()).unwrap();
    assert!(notice.contains("recipient site1 is stale"), "{notice}");

    // A fresh reply ends the spell.
    w.owner_run();
    site.run(false);
    assert_eq!(site.status()["stale"], false);
    assert_eq!(site.status()["generation"], 1);
}

#[test]
fn an_admin_gets_one_summary_of_refused_messages_an_hour() {
    let (w, site) = world_with_pending_change();
    let cfg = fs::read_to_string(&w.owner_config).unwrap();
    fs::write(&w.owner_config, cfg.replace("[transport]", "admin-address = \"security@vendor.test\"\n\n[transport]"))
        .unwrap();
    let owner_new = w.spool.join(OWNER).join("new");
    for i in 0..2 {
        site.run(true);
        let req = fs::read_dir(&owner_new).unwrap().next().unwrap().unwrap().path();
        let raw = String::from_utf8(fs::read(&req).unwrap()).unwrap();
        // A forged copy: the control part altered, the sender claimed to be someone else.
        fs::write(&req, raw.replacen("From: <site1@customer.test>", &format!("From: <mallory{i}@evil.test>"), 1))
            .unwrap();
        flip_after(&req, "control.json", 40);
        w.owner_run();
        // The refused request stays answered-for by nobody: let the recipient ask again at once.
        let cfg = fs::read_to_string(&site.config).unwrap().replace("reply-timeout = \"6h\"", "reply-timeout = \"0s\"");
        fs::write(&site.config, cfg).unwrap();
    }
    assert_eq!(rejections(&w.owner_config), ["bad-mac", "bad-mac"]);
    let admin = w.spool.join("security@vendor.test").join("new");
    assert_eq!(count(&admin), 1, "one summary within the hour");
    let summary = fs::read_to_string(fs::read_dir(&admin).unwrap().next().unwrap().unwrap().path()).unwrap();
    assert!(summary.contains("bad-mac") && summary.contains("mallory0@evil.test"), "{summary}");
}

#[test]
fn a_request_naming_an_unknown_generation_gets_asked_for_the_full_tree() {
    let (w, site) = world_with_pending_change();
    site.run(true);
    let owner_new = w.spool.join(OWNER).join("new");
    let req = fs::read_dir(&owner_new).unwrap().next().unwrap().unwrap().path();
    // The recipient claims a generation this owner never published (say, its state was restored).
    resign(&req, &site.key(), "site1", |c| replace(c, "\"generation\":1", b"\"generation\":7"));
    w.owner_run();
    assert!(rejections(&w.owner_config).is_empty());
    site.run(false);
    assert!(site.rejections().is_empty(), "the owner's answer is authentic: {:?}", site.rejections());
    assert_eq!(site.status()["generation"], 1, "nothing applied yet");
    // The next request lists the whole tree, and the sync completes.
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 2);
}

/// The detail of the newest refusal recorded by the node whose config is `config`.
fn last_refusal_detail(config: &str) -> String {
    let out = ok(&["log", "--config", config, "--rejected", "--json"]);
    let line = out.lines().last().expect("a refusal is recorded");
    serde_json::from_str::<serde_json::Value>(line).unwrap()["detail"].as_str().unwrap().to_owned()
}

/// Puts `ops` (JSON, each followed by a comma) first in the pending reply's operations, signs it again, and
/// checks that the reply is refused with `bad-path`, logged with a detail naming `named`, the tree unchanged.
fn expect_ops_refused(ops: &[u8], named: &[&str]) {
    let (w, site) = world_with_pending_change();
    let reply = w.pending_reply(&site);
    resign(&reply, &site.key(), "site1", |c| replace(c, "\"ops\":[", &[b"\"ops\":[".as_slice(), ops].concat()));
    expect_refused(&w, &site, "bad-path");
    let detail = last_refusal_detail(&site.config);
    for name in named {
        assert!(detail.contains(&format!("`{name}`")), "detail names `{name}`: {detail}");
    }
}

/// Names that one file system or another holds as one file (macOS normalizes and folds case, Windows
/// folds case, HFS+ skips ignorable code points), each in a correctly signed reply, are refused.
#[test]
fn names_that_collide_under_normalization_or_case_folding_are_refused() {
    let cases: &[(&str, &[u8], &[&str])] = &[
        (
            "NFC and NFD",
            br#"{"op":"mkdir","path":"caf\u00e9"},{"op":"mkdir","path":"cafe\u0301"},"#,
            &["caf\u{e9}", "cafe\u{301}"],
        ),
        (
            "full case folding",
            br#"{"op":"mkdir","path":"Stra\u00dfe"},{"op":"mkdir","path":"STRASSE"},"#,
            &["Stra\u{df}e", "STRASSE"],
        ),
        ("dotless i against an existing directory", br#"{"op":"mkdir","path":"B\u0131N"},"#, &["B\u{131}N", "bin"]),
        (
            "an ignorable code point against an existing file",
            br#"{"op":"mkdir","path":"READ\u200dME"},"#,
            &["READ\u{200d}ME", "README"],
        ),
        (
            "a compatibility form below a new directory",
            br#"{"op":"mkdir","path":"added/\ufb01le"},{"op":"mkdir","path":"added/FILE"},"#,
            &["added/\u{fb01}le", "added/FILE"],
        ),
    ];
    for (name, ops, named) in cases {
        eprintln!("case {name}");
        expect_ops_refused(ops, named);
    }
}

/// Links that each stay inside by their own target but lead outside (or nowhere) when followed through the
/// tree's other links, in a correctly signed reply, are refused.
#[test]
fn link_chains_that_escape_or_loop_are_refused() {
    let cases: &[(&str, &[u8], &[&str])] = &[
        (
            "through a link to the parent",
            br#"{"op":"link","path":"added/y","target":".."},{"op":"link","path":"added/z","target":"y/../.."},"#,
            &["added/z", "added/y"],
        ),
        (
            "through a link's parent",
            br#"{"op":"link","path":"added/y","target":".."},{"op":"link","path":"x","target":"added/y/.."},"#,
            &["x", "added/y"],
        ),
        ("a loop", br#"{"op":"link","path":"a","target":"b"},{"op":"link","path":"b","target":"a"},"#, &["a"]),
        (
            "through an existing directory to a link of the reply",
            br#"{"op":"link","path":"data/up","target":".."},{"op":"link","path":"bin/go","target":"../data/up/.."},"#,
            &["bin/go", "data/up"],
        ),
    ];
    for (name, ops, named) in cases {
        eprintln!("case {name}");
        expect_ops_refused(ops, named);
    }
}

#[test]
fn a_link_chain_planted_in_the_data_tree_leaves_the_tree_alone() {
    let (w, site) = world_with_pending_change();
    let outside = w.path("outside");
    fs::create_dir_all(&outside).unwrap();
    let _reply = w.pending_reply(&site);
    // Each link stays inside by its own target; followed, `data/z` is the recipient's parent directory.
    std::os::unix::fs::symlink("..", site.data.join("data/y")).unwrap();
    std::os::unix::fs::symlink("y/../..", site.data.join("data/z")).unwrap();
    expect_refused(&w, &site, "local-tree");
    let detail = last_refusal_detail(&site.config);
    assert!(detail.contains("`data/z`"), "{detail}");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "nothing was written through the links");
    // Once the chain is gone the sync goes through.
    fs::remove_file(site.data.join("data/z")).unwrap();
    fs::remove_file(site.data.join("data/y")).unwrap();
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
}

#[test]
fn the_owner_refuses_to_publish_names_that_collide_or_links_that_lead_out() {
    use std::os::unix::fs::symlink;
    let w = World::new();
    put(&w.source, "keep", b"k", 0o644);
    let publish = ["owner", "publish", "--config", &w.owner_config];
    // (case, directories, links with their targets, what the error says)
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        ("NFC and NFD", &["caf\u{e9}", "cafe\u{301}"], &[], &["caf\u{e9}", "cafe\u{301}", "name the same file"]),
        ("case", &["Stra\u{df}e", "STRASSE"], &[], &["Stra\u{df}e", "STRASSE"]),
        ("ignorable", &["a\u{feff}b", "ab"], &[], &["a\u{feff}b", "ab"]),
        ("escaping chain", &["d"], &[("d/y", ".."), ("d/z", "y/../..")], &["d/z", "y/../..", "outside the tree"]),
        ("loop", &[], &[("a", "b"), ("b", "a")], &["`a`", "never resolves"]),
    ];
    for (name, dirs, links, said) in cases {
        eprintln!("case {name}");
        for d in *dirs {
            fs::create_dir_all(w.source.join(d)).unwrap();
        }
        for (link, target) in *links {
            symlink(target, w.source.join(link)).unwrap();
        }
        let err = fails(&publish, 2);
        assert!(err.contains("cannot publish"), "{err}");
        for s in *said {
            assert!(err.contains(s), "the error says {s:?}: {err}");
        }
        assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
        for d in *dirs {
            fs::remove_dir(w.source.join(d)).unwrap_or_else(|_| fs::remove_dir_all(w.source.join(d)).unwrap());
        }
        for (link, _) in *links {
            let _ = fs::remove_file(w.source.join(link));
        }
    }
    assert_eq!(w.publish(), 1, "nothing was published before, and the tree without them publishes");
}

// ---- a stolen key and the way back ----

/// With the site's key (and no owner signature), a thief can make the site apply any generation number,
/// the largest the wire allows included. Every genuine reply is then refused as a rollback, and rotating
/// the key would not help (the thief opens the new key). Enrolling the site afresh does: the generation
/// applied under the stolen key does not bind replies under the new one.
#[test]
fn a_generation_forced_by_a_stolen_key_is_undone_by_enrolling_afresh() {
    let (w, site) = world_with_pending_change();
    let reply = w.pending_reply(&site);
    let stolen = site.key();
    let top = ((1u64 << 53) - 1).to_string();
    resign(&reply, &stolen, "site1", |c| replace(c, "\"generation\":2", format!("\"generation\":{top}").as_bytes()));
    site.run(false);
    assert_eq!(site.status()["generation"].to_string(), top, "the thief's generation is applied");

    // The genuine owner's next generation is refused as a rollback, and says why in the owner's log.
    put(&w.source, "README", b"version 3\n", 0o644);
    w.publish();
    site.run(true);
    let log = w.owner_run();
    assert!(log.contains("claims a generation newer than any published"), "{log}");
    site.run(false);
    assert_eq!(site.rejections(), ["rollback"]);

    // Enrolled afresh: the old key stops verifying at once, the new one brings the owner's generation.
    let out = w.path("site1-again.enrollment");
    let out = out.to_str().unwrap();
    ok(&["owner", "reenroll", "--config", &w.owner_config, "--name", "site1", "--out", out]);
    ok(&["recipient", "enroll", "--config", &site.config, "--enrollment", out]);
    assert_ne!(site.key(), stolen);
    // The owner never published the generation the site names: the first exchange asks for the full
    // tree, the second brings the owner's generation.
    w.sync(&site);
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 3);

    // The stolen key is useless now, at the owner and at the site.
    put(&w.source, "README", b"version 4\n", 0o644);
    w.publish();
    let reply = w.pending_reply(&site);
    resign(&reply, &stolen, "site1", |c| replace(c, "\"generation\":4", format!("\"generation\":{top}").as_bytes()));
    site.run(false);
    assert_eq!(site.rejections().last().map(String::as_str), Some("bad-mac"));
    assert_eq!(site.status()["generation"], 3);
}

/// An enrollment for another recipient, or pinning another owner key, is not taken up.
#[test]
fn an_enrollment_for_someone_else_is_refused() {
    let w = World::new();
    let site = w.site("site1");
    let _other = w.site("site2");
    let before = site.key();
    let theirs = w.path("site2.enrollment");
    let err = fails(&["recipient", "enroll", "--config", &site.config, "--enrollment", theirs.to_str().unwrap()], 2);
    assert!(err.contains("is for name \"site2\""), "{err}");
    assert_eq!(site.key(), before);
    let err = fails(&["owner", "reenroll", "--config", &w.owner_config, "--name", "nobody", "--out", "/tmp/x"], 2);
    assert!(err.contains("no recipient named \"nobody\""), "{err}");
}

/// The owner knows the root of what it sent: a receipt with the right nonce, reply and generation but
/// another root could come from no reply, and is refused without touching the fleet's state.
#[test]
fn a_receipt_claiming_a_root_no_reply_brought_is_refused() {
    let (w, site) = world_with_pending_change();
    site.run(true);
    w.owner_run();
    site.run(false);
    let owner_new = w.spool.join(OWNER).join("new");
    let receipt = fs::read_dir(&owner_new).unwrap().next().unwrap().unwrap().path();
    let original = fs::read(&receipt).unwrap();
    let root = serde_json::from_slice::<serde_json::Value>(&envelope::parse(&original, u64::MAX).unwrap().control)
        .unwrap()["root"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = format!("\"root\":\"{}\"", "ab".repeat(32));
    resign(&receipt, &site.key(), "site1", |c| replace(c, &format!("\"root\":\"{root}\""), other.as_bytes()));
    w.owner_run();
    assert_eq!(rejections(&w.owner_config), ["malformed"]);
    let s = w.owner_status();
    assert_eq!(s["recipients"][0]["applied_generation"], 1, "{s}");
    assert_eq!(s["recipients"][0]["applied_root"].as_str().map(|r| r != "ab".repeat(32)), Some(true));
    fs::write(owner_new.join("genuine"), &original).unwrap();
    w.owner_run();
    assert_eq!(w.owner_status()["recipients"][0]["applied_root"].as_str(), Some(root.as_str()));
}

/// A reply that brings a new key (a rotation) but is refused for anything (here: it does not produce the
/// root it promises) changes nothing: the key file stays, the owner keeps the old key, and the next
/// genuine reply brings the key again.
#[test]
fn a_refused_reply_carrying_a_new_key_changes_no_key() {
    let (w, site) = world_with_pending_change();
    ok(&["owner", "rotate-key", "--config", &w.owner_config, "--name", "site1"]);
    let old = site.key();
    let reply = w.pending_reply(&site);
    let parsed = envelope::parse(&fs::read(&reply).unwrap(), u64::MAX).unwrap();
    assert!(String::from_utf8_lossy(&parsed.control).contains("\"rekey\""), "the reply carries the new key");
    let root =
        serde_json::from_slice::<serde_json::Value>(&parsed.control).unwrap()["root"].as_str().unwrap().to_owned();
    let other = format!("\"root\":\"{}\"", "ab".repeat(32));
    resign(&reply, &old, "site1", |c| replace(c, &format!("\"root\":\"{root}\""), other.as_bytes()));
    let log = site.run(false);
    assert_eq!(site.rejections(), ["tree-mismatch"], "{log}");
    assert_eq!(site.key(), old, "a refused reply does not replace the key file");
    assert_eq!(site.status()["key_id"], old.id().as_str());
    // The owner never saw the new key used: it still answers under the old one, and the key arrives.
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    assert_ne!(site.key(), old);
    w.sync(&site);
    let s = w.owner_status();
    assert_eq!(s["recipients"][0]["key_id"], site.key().id().as_str());
    assert!(s["recipients"][0]["rotating_to"].is_null());
    assert!(rejections(&w.owner_config).is_empty());
}

// ---- bounded decoding ----

/// A request from `site` made by someone holding its key, with `payload` as its inventory payload.
fn forged_request(w: &World, site: &Site, payload: Option<&[u8]>) -> std::path::PathBuf {
    use mailferry::protocol::{INVENTORY_PAYLOAD_ID, InventoryKind, Payload, Request, VERSION, Want};
    let req = Request {
        mailferry: VERSION,
        kind: Kind::Request,
        recipient: "site1".into(),
        channel: "default".into(),
        nonce: mailferry::crypto::Nonce::generate(),
        seq: 1,
        created: 0,
        generation: 0,
        root: Digest([0; 32]),
        inventory_kind: InventoryKind::Full,
        inventory: vec![],
        removed: vec![],
        inventory_payload: payload.map(|p| Payload {
            id: INVENTORY_PAYLOAD_ID.into(),
            size: p.len() as u64,
            blake3: Digest::of(p),
        }),
        want: Want::Latest,
        full_content: false,
        resend: None,
        fresh: false,
        registration: None,
        accepts: Vec::new(),
        methods: Vec::new(),
    };
    let control = mailferry::protocol::encode(&req);
    let auth = mailferry::protocol::encode(&Auth::sign("site1", &site.key(), &control));
    let atts: Vec<(&str, &[u8])> = payload.map(|p| (INVENTORY_PAYLOAD_ID, p)).into_iter().collect();
    let new = w.spool.join(OWNER).join("new");
    fs::create_dir_all(&new).unwrap();
    let path = new.join("forged-request");
    fs::write(&path, forge(Kind::Request, (&site.address, OWNER), &control, &auth, &atts)).unwrap();
    path
}

/// The owner refused the last request for `reason`, sent nothing, and still answers the genuine one.
fn expect_owner_refused(w: &World, site: &Site, reason: &str) {
    let log = w.owner_run();
    assert_eq!(rejections(&w.owner_config), [reason], "{log}");
    assert_eq!(count(&site.maildir(w).join("new")), 0, "no reply was sent");
    // Nothing was taken: the recipient's own first request (seq 1) is answered as usual.
    w.sync(site);
    assert_same_tree(&w.source, &site.data);
}

#[test]
fn an_inventory_payload_that_inflates_to_whitespace_is_refused_while_it_streams() {
    let w = World::new();
    let site = w.site("site1");
    put(&w.source, "a", b"1", 0o644);
    w.publish();
    // Valid JSON of 20 MB from a frame of a few hundred bytes: only the bound on one element stops it.
    let json = [b"[".as_slice(), &vec![b' '; 20 << 20], b"]"].concat();
    let bomb = zstd::bulk::compress(&json, 19).unwrap();
    assert!(bomb.len() < 4096, "{} bytes", bomb.len());
    forged_request(&w, &site, Some(&bomb));
    expect_owner_refused(&w, &site, "limit");
}

#[test]
fn an_inventory_payload_over_the_entry_limit_is_refused() {
    let w = World::new();
    let site = w.site("site1");
    put(&w.source, "a", b"1", 0o644);
    w.publish();
    let cfg = fs::read_to_string(&w.owner_config).unwrap();
    fs::write(&w.owner_config, format!("{cfg}\n[limits]\nmax-inventory-entries = 1000\n")).unwrap();
    let json = format!("[{}{{\"path\":\"a\"}}]", "{\"path\":\"a\"},".repeat(100_000));
    forged_request(&w, &site, Some(&zstd::bulk::compress(json.as_bytes(), 19).unwrap()));
    expect_owner_refused(&w, &site, "limit");
}

#[test]
fn a_reply_body_that_inflates_to_whitespace_is_refused_while_it_streams() {
    let (w, site) = world_with_pending_change();
    let reply = w.pending_reply(&site);
    let pad = [b"\"ops\":[".as_slice(), &vec![b' '; 5 << 20]].concat();
    resign(&reply, &site.key(), "site1", |c| replace(c, "\"ops\":[", &pad));
    expect_refused(&w, &site, "limit");
}

#[test]
fn generations_and_seqs_past_2_pow_53_are_refused() {
    let (w, site) = world_with_pending_change();
    let reply = w.pending_reply(&site);
    resign(&reply, &site.key(), "site1", |c| replace(c, "\"generation\":2", b"\"generation\":9007199254740992"));
    expect_refused(&w, &site, "malformed");
    // A request with a seq no SQLite integer or JSON double holds exactly. (The refusal came before the
    // nonce was proven answered, so it is still outstanding: let the recipient ask again at once.)
    let cfg = fs::read_to_string(&site.config).unwrap().replace("reply-timeout = \"6h\"", "reply-timeout = \"0s\"");
    fs::write(&site.config, cfg).unwrap();
    site.run(true);
    let req = fs::read_dir(w.spool.join(OWNER).join("new")).unwrap().next().unwrap().unwrap().path();
    resign(&req, &site.key(), "site1", |c| {
        let s = String::from_utf8(c).unwrap();
        let at = s.find("\"seq\":").unwrap() + 6;
        let end = at + s[at..].find(',').unwrap();
        format!("{}18446744073709551615{}", &s[..at], &s[end..]).into_bytes()
    });
    w.owner_run();
    assert_eq!(rejections(&w.owner_config), ["malformed"]);
}

#[test]
fn a_message_with_room_for_too_many_headers_is_refused_before_parsing() {
    let w = World::new();
    let site = w.site("site1");
    put(&w.source, "a", b"1", 0o644);
    w.publish();
    site.run(true);
    let req = fs::read_dir(w.spool.join(OWNER).join("new")).unwrap().next().unwrap().unwrap().path();
    let raw = fs::read(&req).unwrap();
    let padded = [b"X-Pad: x\r\n".repeat(25_000).as_slice(), &raw].concat();
    fs::write(&req, padded).unwrap();
    w.owner_run();
    assert_eq!(rejections(&w.owner_config), ["limit"]);
    assert_eq!(count(&site.maildir(&w).join("new")), 0, "no reply was sent");
}

// ---- owner state inside its source ----

/// The owner's state directory in a [`World`].
fn owner_dir(w: &World) -> std::path::PathBuf {
    w.path("owner")
}

/// The names of every object in the owner's content store.
fn store_objects(w: &World) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut todo = vec![owner_dir(w).join("store")];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.insert(e.path().strip_prefix(owner_dir(w)).unwrap().display().to_string());
            }
        }
    }
    out
}

/// A world with generation 1 published; returns it with the store's objects then.
fn published_world() -> (World, std::collections::BTreeSet<String>) {
    let w = World::new();
    varied_tree(&w.source);
    assert_eq!(w.publish(), 1);
    let objects = store_objects(&w);
    (w, objects)
}

/// `owner publish` fails, naming `want`, and publishes nothing: still generation 1, not one new object.
fn publish_refused(w: &World, before: &std::collections::BTreeSet<String>, want: &[&str]) {
    let err = fails(&["owner", "publish", "--config", &w.owner_config], 2);
    for want in want {
        assert!(err.contains(want), "{want:?} not in {err}");
    }
    assert_eq!(w.owner_status()["generation"]["number"], 1, "no new generation");
    assert_eq!(&store_objects(w), before, "nothing of the owner's state reached the store");
}

#[test]
fn owner_init_refuses_a_state_directory_overlapping_its_source() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    let linked = tmp.path().join("linked");
    std::os::unix::fs::symlink(&tree, &linked).unwrap();
    let spool = tmp.path().join("spool");
    // The same directory, the state inside the source (directly or through a symbolic link), and the
    // source inside the state directory.
    for (dir, source) in [
        (tree.clone(), tree.clone()),
        (tree.join("owner"), tree.clone()),
        (linked.join("sub/owner"), tree.clone()),
        (tmp.path().to_path_buf(), tree.join("sub")),
    ] {
        let args = [
            "owner",
            "init",
            "--dir",
            dir.to_str().unwrap(),
            "--source",
            source.to_str().unwrap(),
            "--address",
            OWNER,
            "--transport-root",
            spool.to_str().unwrap(),
        ];
        let err = fails(&args, 2);
        assert!(err.contains("overlap") && err.contains("outside the source tree"), "{dir:?} {source:?}: {err}");
        assert!(!dir.join("owner.toml").exists() && !dir.join("state.db").exists(), "nothing was made in {dir:?}");
    }
}

#[test]
fn an_owner_whose_source_came_to_hold_its_state_refuses_to_start_and_to_publish() {
    let (w, before) = published_world();
    let cfg = fs::read_to_string(&w.owner_config).unwrap();
    let source_line = format!("source = {:?}", w.source.to_str().unwrap());
    assert!(cfg.contains(&source_line), "{cfg}");
    // The source edited to the directory holding the state, and to a directory inside the state.
    fs::create_dir_all(owner_dir(&w).join("inner")).unwrap();
    for source in [w.tmp.path().to_path_buf(), owner_dir(&w).join("inner")] {
        fs::write(&w.owner_config, cfg.replace(&source_line, &format!("source = {:?}", source.to_str().unwrap())))
            .unwrap();
        let err = fails(&["owner", "run", "--config", &w.owner_config, "--once"], 2);
        assert!(err.contains("overlap") && err.contains("every recipient's key"), "{err}");
        publish_refused(&w, &before, &["overlap", "outside the source tree"]);
    }
}

#[test]
fn a_symlink_from_the_source_to_the_owners_state_is_not_published() {
    let (w, before) = published_world();
    // Absolute and relative, to the state directory and to the database itself: the scan never follows
    // a link, and one that leads out of the tree is refused, saying where it leads.
    let state = owner_dir(&w);
    for (name, target) in [("abs", state.clone()), ("rel", "../owner".into()), ("db", state.join("state.db"))] {
        let link = w.source.join(name);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        publish_refused(
            &w,
            &before,
            &[&format!("`{name}` is a symlink leading outside the tree, to the owner's state directory")],
        );
        fs::remove_file(&link).unwrap();
    }
}

#[test]
fn a_hard_link_of_the_owners_state_is_not_published() {
    let (w, before) = published_world();
    let state = owner_dir(&w);
    // A hard link needs no privileges: only its inode tells it is the database.
    let linked = w.source.join("sub/copy-of-db");
    fs::create_dir_all(linked.parent().unwrap()).unwrap();
    fs::hard_link(state.join("state.db"), &linked).unwrap();
    publish_refused(&w, &before, &["sub/copy-of-db", "state.db", "own state"]);
    fs::remove_file(&linked).unwrap();
    // So does a store object.
    let object = before.iter().next().unwrap();
    fs::hard_link(state.join(object), w.source.join("object")).unwrap();
    publish_refused(&w, &before, &["source/object`", "own state"]);
    fs::remove_file(w.source.join("object")).unwrap();
    fs::remove_dir(w.source.join("sub")).unwrap();
    assert_eq!(w.publish(), 1, "with the links gone, the same tree as generation 1");
}

#[test]
fn a_bind_mount_of_the_owners_state_is_not_published() {
    let (w, before) = published_world();
    let state = owner_dir(&w);
    // Where this process may mount (as root); a path check cannot see a mount, its inode can.
    let mnt = w.source.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount").arg("--bind").arg(&state).arg(&mnt).output();
    match mounted {
        Ok(out) if out.status.success() => {
            struct Unmount(std::path::PathBuf);
            impl Drop for Unmount {
                fn drop(&mut self) {
                    let _ = std::process::Command::new("umount").arg(&self.0).status();
                }
            }
            let _unmount = Unmount(mnt.clone());
            publish_refused(&w, &before, &["source/mnt`", "own state", "through a hard link or a mount"]);
        }
        other => println!("skipping the bind mount case: `mount --bind` is not permitted here ({other:?})"),
    }
    fs::remove_dir(&mnt).unwrap();
    assert_eq!(w.publish(), 1, "with the mount gone, the same tree as generation 1");
}

// ---- valid but hostile in volume ----

/// Something like machine code: incompressible bytes with NULs sprinkled in.
fn machine_code(n: usize, seed: u64) -> Vec<u8> {
    let mut code = noise(n, seed);
    code.iter_mut().skip(3).step_by(7).for_each(|b| *b = 0);
    code
}

/// A rebuild of a binary: addresses a few dozen bytes apart move by `shift`, and a little code is new.
fn rebuilt(old: &[u8], shift: u32) -> Vec<u8> {
    let mut new = old.to_vec();
    let mut at = 0;
    for g in noise(new.len() / 16, u64::from(shift)) {
        at += 16 + usize::from(g % 64);
        if at + 4 > new.len() {
            break;
        }
        let word = u32::from_le_bytes(new[at..at + 4].try_into().unwrap()).wrapping_add(shift);
        new[at..at + 4].copy_from_slice(&word.to_le_bytes());
    }
    new.splice(100_000..100_000, noise(500, u64::from(shift) + 1));
    new
}

/// Request, answer (returning the owner's log), apply, receipt.
fn answered(w: &World, site: &Site) -> String {
    site.run(true);
    let log = w.owner_run();
    site.run(false);
    w.owner_run();
    assert_same_tree(&w.source, &site.data);
    log
}

#[test]
fn fresh_bsdiff_work_for_a_recipient_stops_at_its_daily_budget() {
    let w = World::new();
    let (one, two) = (w.site("site1"), w.site("site2"));
    let v1 = machine_code(600_000, 40);
    put(&w.source, "lib/ext.so", &v1, 0o755);
    w.publish();
    w.sync(&one);
    w.sync(&two);
    // A day's budget of about one and a half patches (each diffs a 600 KB old version with its new one).
    let cfg = fs::read_to_string(&w.owner_config).unwrap();
    let default = "bsdiff-daily-budget = 1073741824";
    assert!(cfg.contains(default), "{cfg}");
    fs::write(&w.owner_config, cfg.replace(default, "bsdiff-daily-budget = 1800000")).unwrap();

    let v2 = rebuilt(&v1, 0x1230);
    put(&w.source, "lib/ext.so", &v2, 0o755);
    w.publish();
    let log = answered(&w, &one);
    assert!(log.contains("bsdiff=1") && !log.contains("budget"), "the first patch is within the budget: {log}");
    let log = answered(&w, &two);
    assert!(log.contains("bsdiff=1") && log.contains("cached=1"), "the same patch, from the cache: {log}");

    let v3 = rebuilt(&v2, 0x0810);
    put(&w.source, "lib/ext.so", &v3, 0o755);
    w.publish();
    // site1 spent its day on the first patch: the binary travels by zstd-prefix, and arrives all the same.
    let log = answered(&w, &one);
    assert!(log.contains("bsdiff=0") && log.contains("bsdiff budget is spent"), "{log}");
    // The cached patch cost site2 nothing, so its day has room for this one.
    let log = answered(&w, &two);
    assert!(log.contains("bsdiff=1") && !log.contains("budget"), "{log}");
}

// ---- one enrollment on two machines ----

/// A second machine set up from the same enrollment counts its requests from 1: the owner refuses them as
/// replays and says why, and the replies the owner sends to the first machine, when they reach the second,
/// are refused there with the same explanation.
#[test]
fn one_enrollment_on_two_machines_is_named_on_both_sides() {
    let w = World::new();
    let first = w.site("site1");
    varied_tree(&w.source);
    w.publish();
    w.sync(&first);
    w.sync(&first);
    let (dir, data, spool) = (w.path("second"), w.path("second-data"), w.path("second-spool"));
    init_recipient(&dir, &data, &w.path("site1.enrollment"), &spool);
    let config = dir.join("recipient.toml").to_str().unwrap().to_owned();
    ok(&["recipient", "run", "--config", &config, "--once"]);
    let outbox = spool.join(OWNER).join("new");
    let request = fs::read_dir(&outbox).unwrap().next().unwrap().unwrap().path();
    fails(&["deliver", "--config", &w.owner_config, request.to_str().unwrap()], 1);
    assert_eq!(rejections(&w.owner_config), ["replay"]);
    let detail = last_refusal_detail(&w.owner_config);
    assert!(detail.contains("another machine uses \"site1\"'s enrollment"), "{detail}");

    let reply = w.pending_reply(&first);
    let inbox = spool.join(&first.address).join("new");
    fs::create_dir_all(&inbox).unwrap();
    fs::copy(&reply, inbox.join("carried")).unwrap();
    ok(&["recipient", "run", "--config", &config, "--once", "--no-request"]);
    let detail = last_refusal_detail(&config);
    assert!(detail.contains("another machine uses this recipient's enrollment"), "{detail}");
    assert_eq!(count(&data), 0, "the second machine's tree is untouched");
}

// ---- amplification: a repeated request costs a reference ----

/// Twenty requests from the same tree with fresh nonces (a stolen key, or a recipient stuck in a loop)
/// cost one reply and nineteen references to it, not twenty replies.
#[test]
fn repeated_requests_from_the_same_tree_cost_a_reference_each() {
    let w = World::new();
    let site = w.site("site1");
    varied_tree(&w.source);
    w.publish();
    w.sync(&site);
    put(&w.source, "big.bin", &noise(200_000, 21), 0o644);
    w.publish();
    site.run(true);
    let owner_new = w.spool.join(OWNER).join("new");
    let request = fs::read_dir(&owner_new).unwrap().next().unwrap().unwrap().path();
    let raw = fs::read(&request).unwrap();
    let control: serde_json::Value = serde_json::from_slice(&envelope::parse(&raw, u64::MAX).unwrap().control).unwrap();
    let (nonce, seq) = (control["nonce"].as_str().unwrap().to_owned(), control["seq"].as_u64().unwrap());
    for i in 1..20u64 {
        let copy = owner_new.join(format!("again-{i}"));
        fs::write(&copy, &raw).unwrap();
        let new_nonce = format!("{:032x}", 0xfeed_0000u64 + i);
        let edit = |c: Vec<u8>| {
            let c = replace(c, &nonce, new_nonce.as_bytes());
            replace(c, &format!("\"seq\":{seq}"), format!("\"seq\":{}", seq + i).as_bytes())
        };
        resign(&copy, &site.key(), "site1", edit);
    }
    let log = w.owner_run();
    assert!(log.contains("with a reference to the reply already sent"), "{log}");
    let mut sizes: Vec<u64> =
        fs::read_dir(site.maildir(&w).join("new")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).collect();
    sizes.sort_unstable();
    assert_eq!(sizes.len(), 20, "every request is answered: {sizes:?}");
    let (full, references) = (sizes[19], &sizes[..19]);
    assert!(full > 200_000, "one full reply: {sizes:?}");
    assert!(references.iter().all(|s| *s < 8_000), "nineteen references of a few KB: {sizes:?}");
    assert!(rejections(&w.owner_config).is_empty());
    // The genuine recipient applies the one reply and is not confused by the references.
    site.run(false);
    assert_same_tree(&w.source, &site.data);
    assert!(site.rejections().iter().all(|r| r == "replay"), "{:?}", site.rejections());
}

/// A reply lost on the way as a whole: the recipient asks again, the owner answers with a reference, the
/// recipient asks for the reply's parts, and gets the very same parts.
#[test]
fn a_reply_lost_whole_comes_again_through_a_reference() {
    let w = World::new();
    let site = w.site("site1");
    let cfg = fs::read_to_string(&site.config).unwrap().replace("reply-timeout = \"6h\"", "reply-timeout = \"0s\"");
    fs::write(&site.config, cfg).unwrap();
    varied_tree(&w.source);
    put(&w.source, "big.bin", &noise(100_000, 22), 0o644);
    w.publish();
    site.run(true);
    w.owner_run();
    let inbox = site.maildir(&w).join("new");
    let lost: Vec<_> = fs::read_dir(&inbox).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(lost.len(), 1);
    let original = fs::read(&lost[0]).unwrap();
    fs::remove_file(&lost[0]).unwrap();
    site.run(true);
    let log = w.owner_run();
    assert!(log.contains("with a reference"), "{log}");
    let log = site.run(true);
    assert!(log.contains("none of it is here"), "{log}");
    assert!(log.contains("asking for lost parts again"), "{log}");
    w.owner_run();
    let again: Vec<_> = fs::read_dir(&inbox).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(again.len(), 1);
    assert_eq!(fs::read(&again[0]).unwrap(), original, "the very same part, byte for byte");
    site.run(false);
    assert_same_tree(&w.source, &site.data);
    assert!(site.rejections().is_empty(), "{:?}", site.rejections());
}
