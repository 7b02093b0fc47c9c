//! Keys: `owner rotate-key` delivers a new key sealed under the old one and retires the old one after its
//! grace period; `signing = "hmac+ed25519"` makes a recipient that pinned the owner's key refuse replies
//! the owner did not sign, even when their MAC is right.

use std::fs;
use std::path::{Path, PathBuf};

use mailferry::crypto::{Key, Nonce, SigningKey};
use mailferry::protocol::envelope;
use mailferry::protocol::{Auth, Kind};

use crate::hostile::expect_refused;
use crate::util::*;

/// `owner rotate-key` for `name` with `grace`; returns stderr.
fn rotate(w: &World, name: &str, grace: &str) -> String {
    let args = ["owner", "rotate-key", "--config", &w.owner_config, "--name", name, "--grace", grace];
    let out = run(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stderr).unwrap()
}

fn owner_inbox(w: &World) -> PathBuf {
    w.spool.join(OWNER).join("new")
}

/// The only message waiting in `dir`.
fn only_message(dir: &Path) -> PathBuf {
    let mut files: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "expected one message in `{}`", dir.display());
    files.pop().unwrap()
}

/// A copy of the request at `path` with a fresh nonce and sequence number, authenticated under `key`:
/// what a request made before the recipient took up its new key looks like when it arrives late.
fn late_request(path: &Path, key: &Key, recipient: &str, seq: u64) -> Vec<u8> {
    let parsed = envelope::parse(&fs::read(path).unwrap(), u64::MAX).unwrap();
    let mut control: serde_json::Value = serde_json::from_slice(&parsed.control).unwrap();
    control["nonce"] = serde_json::json!(Nonce::generate().to_hex());
    control["seq"] = serde_json::json!(seq);
    let control = serde_json::to_vec(&control).unwrap();
    let auth = mailferry::protocol::encode(&Auth::sign(recipient, key, &control));
    forge(Kind::Request, (&format!("{recipient}@customer.test"), OWNER), &control, &auth, &[])
}

#[test]
fn a_rotated_key_travels_sealed_and_the_old_one_ends_after_its_grace() {
    let w = World::new();
    let (kept, cut) = (w.site("kept"), w.site("cut"));
    varied_tree(&w.source);
    w.publish();
    w.sync(&kept);
    w.sync(&cut);
    let (old_kept, old_cut) = (kept.key(), cut.key());

    assert!(rotate(&w, "kept", "1h").contains("rotating the key of \"kept\""));
    rotate(&w, "cut", "0s");
    let rotating = |name: &str| {
        let s = w.owner_status();
        let r = s["recipients"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap().clone();
        (r["key_id"].as_str().unwrap().to_owned(), r["rotating_to"].as_str().map(str::to_owned))
    };
    let (id, next) = rotating("kept");
    assert_eq!(id, old_kept.id());
    let next = next.expect("status shows the rotation under way");
    put(&w.source, "README", b"generation 2\n", 0o644);
    w.publish();
    for site in [&kept, &cut] {
        site.run(true);
        // Keep a copy of the request made under the old key, to send late.
        fs::copy(only_message(&owner_inbox(&w)), w.path(&format!("late-{}.eml", site.address))).unwrap();
        w.owner_run();
        let raw_reply = fs::read(only_message(&site.maildir(&w).join("new"))).unwrap();
        let parsed = envelope::parse(&raw_reply, u64::MAX).unwrap();
        let control = String::from_utf8(parsed.control).unwrap();
        assert!(control.contains("\"rekey\""), "{control}");
        site.run(false);
        assert_same_tree(&w.source, &site.data);
        assert!(!control.contains(&site.key().to_hex()), "the new key never travels in the clear");
        // The receipt, made under the new key, completes the rotation.
        w.owner_run();
    }
    assert_eq!((kept.key().id().to_string(), cut.key().id().to_string()), (next.clone(), rotating("cut").0));
    assert_ne!(kept.key(), old_kept);
    assert_ne!(cut.key(), old_cut);
    assert_eq!(kept.status()["key_id"], next.as_str(), "status shows the key in use");
    assert_eq!(rotating("kept"), (next, None), "the rotation is complete");
    assert!(rejections(&w.owner_config).is_empty());

    // Both recipients keep syncing under their new keys.
    put(&w.source, "README", b"generation 3\n", 0o644);
    w.publish();
    w.sync(&kept);
    w.sync(&cut);
    assert_same_tree(&w.source, &kept.data);
    assert_same_tree(&w.source, &cut.data);

    // The recipient's side: a reply made under its previous key is accepted during the grace, not after.
    put(&w.source, "README", b"generation 4\n", 0o644);
    w.publish();
    for (site, old) in [(&kept, &old_kept), (&cut, &old_cut)] {
        let path = w.pending_reply(site);
        let parsed = envelope::parse(&fs::read(&path).unwrap(), u64::MAX).unwrap();
        let auth =
            mailferry::protocol::encode(&Auth::sign(&site.address.replace("@customer.test", ""), old, &parsed.control));
        let rebuilt = forge(Kind::Reply, (OWNER, &site.address), &parsed.control, &auth, &attachments_of(&parsed));
        fs::write(&path, rebuilt).unwrap();
        site.run(false);
    }
    assert_same_tree(&w.source, &kept.data);
    assert!(kept.rejections().is_empty());
    assert_eq!(cut.rejections(), ["bad-mac"]);
    assert_eq!(cut.status()["generation"], 3);

    // A request made under the old key that arrives late: within the grace it is answered, after it (a
    // grace of zero) it is refused.
    let inbox = owner_inbox(&w);
    fs::write(
        inbox.join("late-kept.eml"),
        late_request(&w.path(&format!("late-{}.eml", kept.address)), &old_kept, "kept", 1000),
    )
    .unwrap();
    let log = w.owner_run();
    assert!(log.contains("answered request"), "{log}");
    assert!(rejections(&w.owner_config).is_empty(), "{log}");
    fs::write(
        inbox.join("late-cut.eml"),
        late_request(&w.path(&format!("late-{}.eml", cut.address)), &old_cut, "cut", 1001),
    )
    .unwrap();
    w.owner_run();
    assert_eq!(rejections(&w.owner_config), ["bad-mac"]);
}

#[test]
fn a_crash_while_taking_up_a_new_key_converges() {
    let w = World::new();
    let site = w.site("site1");
    varied_tree(&w.source);
    w.publish();
    w.sync(&site);
    let old = site.key();
    rotate(&w, "site1", "1h");
    put(&w.source, "README", b"generation 2\n", 0o644);
    w.publish();
    site.run(true);
    w.owner_run();
    let args = ["recipient", "run", "--config", &site.config, "--once", "--no-request"];
    let out = crate::crash::run_with_failpoint(&args, "rekey-saved:1");
    assert!(crate::crash::crashed(&out), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(site.key(), old, "the key file is untouched until the new key is written whole");
    // The reply is still in the inbox: the next run verifies it under the old key, takes up the new key
    // and applies it; the receipt under the new key completes the rotation.
    site.run(false);
    w.owner_run();
    assert_ne!(site.key(), old);
    assert_same_tree(&w.source, &site.data);
    let s = w.owner_status();
    assert_eq!(s["recipients"][0]["key_id"], site.key().id().as_str());
    assert!(s["recipients"][0]["rotating_to"].is_null());
    assert!(rejections(&w.owner_config).is_empty());
    assert!(site.rejections().is_empty());
    put(&w.source, "README", b"generation 3\n", 0o644);
    w.publish();
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
}

#[test]
fn rotate_key_refuses_unknown_recipients_and_overlong_grace() {
    let w = World::new();
    let _site = w.site("site1");
    let err = fails(&["owner", "rotate-key", "--config", &w.owner_config, "--name", "nobody"], 2);
    assert!(err.contains("no recipient named \"nobody\""), "{err}");
    let err = fails(&["owner", "rotate-key", "--config", &w.owner_config, "--name", "site1", "--grace", "400d"], 2);
    assert!(err.contains("longer than a year"), "{err}");
}

/// A world whose owner signs replies, with one recipient enrolled before signing was turned on (it pins
/// nothing) and one after (it pins the owner's key).
fn signing_world() -> (World, Site, Site) {
    let w = World::new();
    let unpinned = w.site("unpinned");
    let cfg = fs::read_to_string(&w.owner_config).unwrap();
    fs::write(&w.owner_config, cfg.replacen("signing = \"hmac\"", "signing = \"hmac+ed25519\"", 1)).unwrap();
    let pinned = w.site("site1");
    varied_tree(&w.source);
    w.publish();
    (w, unpinned, pinned)
}

#[test]
fn a_pinned_owner_key_makes_the_recipient_refuse_replies_the_owner_did_not_sign() {
    let (w, unpinned, site) = signing_world();
    let public = w.owner_status()["public_key"].as_str().expect("status shows the public key").to_owned();
    let enrollment = fs::read_to_string(w.path("site1.enrollment")).unwrap();
    assert!(enrollment.contains(&format!("owner-public-key = \"{public}\"")), "{enrollment}");
    assert!(fs::read_to_string(&site.config).unwrap().contains(&public), "recipient init pins the key");
    assert_eq!(site.status()["owner_public_key"], public.as_str());
    assert!(unpinned.status()["owner_public_key"].is_null());
    w.sync(&site);
    w.sync(&unpinned);
    assert_same_tree(&w.source, &site.data);
    assert_same_tree(&w.source, &unpinned.data);
    put(&w.source, "README", b"version 2\n", 0o644);
    w.publish();
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
}

#[test]
fn replies_with_the_right_mac_but_no_owner_signature_are_refused() {
    // Someone who holds the recipient's shared key (a stolen enrollment file) but not the owner's signing
    // key: the MAC verifies, the signature is missing or made with another key.
    let other = SigningKey::generate();
    let unsigned = |auth: Auth| Auth { signature: None, ..auth };
    let stranger = |auth: Auth| Auth { signature: Some(other.sign(b"anything")), ..auth };
    for tamper in [&unsigned as &dyn Fn(Auth) -> Auth, &stranger] {
        let (w, _, site) = signing_world();
        w.sync(&site);
        put(&w.source, "README", b"version 2\n", 0o644);
        w.publish();
        let path = w.pending_reply(&site);
        let raw = fs::read(&path).unwrap();
        let parsed = envelope::parse(&raw, u64::MAX).unwrap();
        let auth: Auth = serde_json::from_slice(&parsed.auth).unwrap();
        assert!(auth.signature.is_some(), "the owner signs its replies");
        let forged = mailferry::protocol::encode(&tamper(Auth::sign("site1", &site.key(), &parsed.control)));
        let rebuilt = forge(Kind::Reply, (OWNER, &site.address), &parsed.control, &forged, &attachments_of(&parsed));
        fs::write(&path, rebuilt).unwrap();
        expect_refused(&w, &site, "bad-signature");
    }
}
