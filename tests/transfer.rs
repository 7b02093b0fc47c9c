//! Efficient transfer over the Maildir transport: deltas against what the recipient has, local copies,
//! replies cut into parts that fit the relay limit, and lost parts sent again alone.

use std::fs;
use std::path::{Path, PathBuf};

use crate::util::*;

fn new_messages(site: &Site, w: &World) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(site.maildir(w).join("new")).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

fn set_owner(w: &World, from: &str, to: &str) {
    let text = fs::read_to_string(&w.owner_config).unwrap();
    assert!(text.contains(from), "{from:?} not in the owner config:\n{text}");
    fs::write(&w.owner_config, text.replace(from, to)).unwrap();
}

#[test]
fn small_edits_to_large_files_travel_as_small_deltas() {
    let w = World::new();
    let site = w.site("site1");
    let big = noise(3 << 20, 1);
    put(&w.source, "db/main.cvd", &big, 0o644);
    put(&w.source, "db/daily.cvd", &noise(1 << 20, 2), 0o644);
    put(&w.source, "README", b"signatures\n", 0o644);
    w.publish();
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);

    // An edit in the middle and an append: 1,000 + 2,000 new bytes in a 3 MiB incompressible file.
    let mut edited = big.clone();
    edited[1 << 20..(1 << 20) + 1000].copy_from_slice(&noise(1000, 3));
    edited.extend_from_slice(&noise(2000, 4));
    put(&w.source, "db/main.cvd", &edited, 0o644);
    // Renamed: the content is on the recipient already.
    fs::rename(w.source.join("db/daily.cvd"), w.source.join("db/daily-2026.cvd")).unwrap();
    w.publish();
    let reply = w.pending_reply(&site);
    let bytes = fs::metadata(&reply).unwrap().len();
    assert!(bytes < 20_000, "a 3,000-byte edit and a rename cost a {bytes}-byte reply");
    site.run(false);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 2);
}

#[test]
fn content_moved_between_files_is_found_in_the_old_versions() {
    let w = World::new();
    let site = w.site("site1");
    let (a, b) = (noise(400_000, 5), noise(400_000, 6));
    put(&w.source, "lib/a.js", &a, 0o644);
    put(&w.source, "lib/b.js", &b, 0o644);
    w.publish();
    w.sync(&site);
    // A bundler reshuffles: halves swap between the files, one is renamed, with small edits.
    let (a2, b2) = ([&b[..200_000], b"// v2\n", &a[..200_000]].concat(), [&a[200_000..], b"x", &b[200_000..]].concat());
    fs::remove_file(w.source.join("lib/a.js")).unwrap();
    put(&w.source, "lib/a-bundle.js", &a2, 0o644);
    put(&w.source, "lib/b.js", &b2, 0o644);
    w.publish();
    let reply = w.pending_reply(&site);
    let bytes = fs::metadata(&reply).unwrap().len();
    assert!(bytes < 20_000, "reshuffled content cost a {bytes}-byte reply (whole files: 1.1 MB)");
    site.run(false);
    assert_same_tree(&w.source, &site.data);
}

#[test]
fn a_reply_over_the_relay_limit_arrives_in_parts_that_each_fit() {
    let w = World::new();
    let site = w.site("site1");
    set_owner(&w, "relay-limit = 10240000", "relay-limit = 100000");
    put(&w.source, "big.bin", &noise(350_000, 7), 0o644);
    put(&w.source, "small.txt", b"small\n", 0o644);
    w.publish();
    site.run(true);
    w.owner_run();
    let parts = new_messages(&site, &w);
    assert!(parts.len() >= 5, "350 KB through a 100 KB relay: {} parts", parts.len());
    for p in &parts {
        assert!(fs::metadata(p).unwrap().len() <= 100_000, "{} is over the limit", p.display());
    }
    // Parts arrive in any order: hold all but the last back, then let them in.
    let held = w.path("held");
    fs::create_dir_all(&held).unwrap();
    for p in &parts[..parts.len() - 1] {
        fs::rename(p, held.join(p.file_name().unwrap())).unwrap();
    }
    let log = site.run(false);
    assert!(log.contains("kept a part of a reply"), "{log}");
    assert_eq!(site.status()["generation"], 0, "nothing applies before the set is complete");
    assert_eq!(count(&site.data), 0);
    for p in &parts[..parts.len() - 1] {
        fs::rename(held.join(p.file_name().unwrap()), p).unwrap();
    }
    site.run(false);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 1);
    w.owner_run();
    assert_eq!(w.owner_status()["recipients"][0]["applied_generation"], 1);
}

#[test]
fn a_lost_part_is_sent_again_alone_and_parts_lost_twice_come_smaller() {
    let w = World::new();
    let site = w.site("site1");
    set_owner(&w, "relay-limit = 10240000", "relay-limit = 100000");
    let cfg = fs::read_to_string(&site.config).unwrap().replace("reply-timeout = \"6h\"", "reply-timeout = \"0s\"");
    fs::write(&site.config, cfg).unwrap();
    put(&w.source, "big.bin", &noise(300_000, 8), 0o644);
    w.publish();
    site.run(true);
    w.owner_run();
    let parts = new_messages(&site, &w);
    let n = parts.len();
    assert!(n >= 4, "{n} parts");
    let lost_size = fs::metadata(&parts[1]).unwrap().len();
    fs::remove_file(&parts[1]).unwrap();
    site.run(false);
    assert_eq!(site.status()["generation"], 0);

    // After reply-timeout the request names just the missing part, and only it comes again.
    let log = site.run(true);
    assert!(log.contains("asking for lost parts again"), "{log}");
    w.owner_run();
    let again = new_messages(&site, &w);
    assert_eq!(again.len(), 1, "only the lost part is sent again");
    assert_eq!(fs::metadata(&again[0]).unwrap().len(), lost_size, "the same part, byte for byte");

    // Lost again (a relay that refuses it, say): the next request gets a fresh reply in smaller parts.
    fs::remove_file(&again[0]).unwrap();
    site.run(true);
    w.owner_run();
    let fresh = new_messages(&site, &w);
    assert!(fresh.len() > n, "{} parts now, {n} before", fresh.len());
    assert!(fresh.iter().all(|p| fs::metadata(p).unwrap().len() <= 75_000), "smaller parts");
    site.run(false);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 1);
    assert!(site.rejections().is_empty(), "{:?}", site.rejections());
}

#[test]
fn a_large_inventory_travels_compressed_and_is_checked() {
    let w = World::new();
    let site = w.site("site1");
    for i in 0..1500 {
        put(&site.data, &format!("local/some/deeper/directory/file-{i:04}.txt"), format!("{i}\n").as_bytes(), 0o644);
        put(&w.source, &format!("local/some/deeper/directory/file-{i:04}.txt"), format!("{i}\n").as_bytes(), 0o644);
    }
    put(&w.source, "new.txt", b"new\n", 0o644);
    w.publish();
    site.run(true);
    let inbox = w.spool.join(OWNER).join("new");
    let request = fs::read_dir(&inbox).unwrap().next().unwrap().unwrap().path();
    let raw = fs::read(&request).unwrap();
    let parsed = mailferry::protocol::envelope::parse(&raw, u64::MAX).unwrap();
    let inventory = &parsed.attachments["inventory.zst"];
    assert!(parsed.control.len() < 2000, "the control part stays small: {}", parsed.control.len());
    // Inline, the JSON would travel base64-encoded in the control part: at least three times as much.
    let json = zstd::decode_all(inventory.as_slice()).unwrap();
    assert!(raw.len() * 3 < json.len() * 137 / 100, "{} bytes of mail for {} bytes of JSON", raw.len(), json.len());
    // The owner's answer uses it: only the new file travels.
    w.owner_run();
    site.run(false);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 1);

    // The payload is covered by the MAC through its digest: an altered one is refused.
    let mut altered = inventory.clone();
    altered[inventory.len() / 2] ^= 1;
    let forged = forge(
        mailferry::protocol::Kind::Request,
        (&site.address, OWNER),
        &parsed.control,
        &parsed.auth,
        &[("inventory.zst", altered.as_slice())],
    );
    fs::write(inbox.join("forged"), forged).unwrap();
    w.owner_run();
    assert_eq!(rejections(&w.owner_config), ["bad-payload"]);
}

/// A delivery report as Postfix writes it when the next hop refuses the message at `original` (its whole
/// header section returned as `text/rfc822-headers`), with `status` and `diagnostic`.
fn delivery_report(original: &Path, status: &str, diagnostic: &str) -> String {
    let raw = fs::read(original).unwrap();
    assert!(mailferry::protocol::envelope::hints(&raw).message_id.is_some(), "our parts have a Message-ID");
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header section");
    let headers = String::from_utf8(raw[..end + 2].to_vec()).unwrap();
    report_with_headers(&headers, status, diagnostic)
}

/// A delivery report quoting `headers` as the original message's.
fn report_with_headers(headers: &str, status: &str, diagnostic: &str) -> String {
    format!(
        "From: MAILER-DAEMON@relay.test (Mail Delivery System)\r\nSubject: Undelivered Mail Returned to Sender\r\n\
         To: {OWNER}\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n\
         --B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n\
         --B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; relay.test\r\n\r\n\
         Final-Recipient: rfc822; site1@customer.test\r\nAction: failed\r\nStatus: {status}\r\n\
         Diagnostic-Code: smtp; {diagnostic}\r\n\r\n\
         --B\r\nContent-Type: text/rfc822-headers\r\n\r\n{headers}\r\n--B--\r\n"
    )
}

#[test]
fn a_relay_bounce_for_a_too_large_part_shrinks_the_parts() {
    let w = World::new();
    let site = w.site("site1");
    set_owner(&w, "relay-limit = 10240000", "relay-limit = 100000");
    let cfg = fs::read_to_string(&site.config).unwrap().replace("reply-timeout = \"6h\"", "reply-timeout = \"0s\"");
    fs::write(&site.config, cfg).unwrap();
    put(&w.source, "big.bin", &noise(300_000, 11), 0o644);
    w.publish();
    site.run(true);
    w.owner_run();
    let parts = new_messages(&site, &w);
    let n = parts.len();
    // A relay beyond the owner's server refuses part 2 and says so in a delivery report.
    let inbox = w.spool.join(OWNER).join("new");
    fs::write(
        inbox.join("bounce-1"),
        delivery_report(&parts[1], "5.3.4", "552 5.3.4 Message size exceeds fixed limit"),
    )
    .unwrap();
    fs::remove_file(&parts[1]).unwrap();
    let log = w.owner_run();
    assert!(log.contains("a relay returned a reply part as too large"), "{log}");
    let limit = w.owner_status()["recipients"][0]["relay_limit"].as_u64().expect("status shows the learned limit");
    assert!(limit < 100_000, "{limit}");
    assert!(rejections(&w.owner_config).is_empty(), "a report about our own part is not an intrusion");

    // The request for the missing part is answered afresh, in parts that fit the smaller limit.
    site.run(false);
    site.run(true);
    w.owner_run();
    let fresh = new_messages(&site, &w);
    assert!(fresh.len() > n, "{} parts now, {n} before", fresh.len());
    assert!(fresh.iter().all(|p| fs::metadata(p).unwrap().len() <= limit), "parts fit {limit}");
    let unknown_user = delivery_report(&fresh[0], "5.1.1", "550 5.1.1 User unknown");
    let forged = delivery_report(&fresh[0], "5.3.4", "552 too big").replace("Message-ID: <", "Message-ID: <x");
    site.run(false);
    assert_same_tree(&w.source, &site.data);

    // Any other failure is shown by status; a report about a message the owner never sent is refused.
    fs::write(inbox.join("bounce-2"), unknown_user).unwrap();
    w.owner_run();
    let bounce = w.owner_status()["recipients"][0]["last_bounce"].as_str().unwrap().to_owned();
    assert!(bounce.contains("5.1.1"), "{bounce}");
    fs::write(inbox.join("bounce-3"), forged).unwrap();
    w.owner_run();
    assert_eq!(rejections(&w.owner_config), ["unexpected"]);
    assert_eq!(w.owner_status()["recipients"][0]["relay_limit"].as_u64(), Some(limit), "unchanged by a forgery");
}

/// A report is input from nobody in particular: one that names a part's Message-ID (which relays log and
/// later mail quotes) but not the part's delivery token, which only the message itself carries, changes
/// nothing and is refused.
#[test]
fn a_delivery_report_without_the_parts_token_changes_nothing() {
    let w = World::new();
    let site = w.site("site1");
    set_owner(&w, "relay-limit = 10240000", "relay-limit = 100000");
    put(&w.source, "big.bin", &noise(300_000, 12), 0o644);
    w.publish();
    site.run(true);
    w.owner_run();
    let parts = new_messages(&site, &w);
    let raw = fs::read(&parts[1]).unwrap();
    let id = mailferry::protocol::envelope::hints(&raw).message_id.unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let headers = String::from_utf8(raw[..end + 2].to_vec()).unwrap();
    let token_at = headers.find("X-Mailferry-Token: ").expect("every reply part carries a delivery token") + 19;
    let guessed = format!("{}{}{}", &headers[..token_at], "0".repeat(32), &headers[token_at + 32..]);
    let inbox = w.spool.join(OWNER).join("new");
    let only_id = format!("From: {OWNER}\r\nMessage-ID: <{id}>\r\n");
    fs::write(inbox.join("r1"), report_with_headers(&only_id, "5.3.4", "552 5.3.4 too big")).unwrap();
    fs::write(inbox.join("r2"), report_with_headers(&guessed, "5.3.4", "552 5.3.4 too big")).unwrap();
    fs::write(inbox.join("r3"), report_with_headers(&only_id, "5.1.1", "550 5.1.1 User unknown")).unwrap();
    w.owner_run();
    assert_eq!(rejections(&w.owner_config), ["unexpected", "unexpected", "unexpected"]);
    let s = w.owner_status();
    assert!(s["recipients"][0]["relay_limit"].is_null(), "{s}");
    assert!(s["recipients"][0]["last_bounce"].is_null(), "{s}");
    // The reply's parts are still kept and arrive whole.
    site.run(false);
    assert_same_tree(&w.source, &site.data);
}

#[test]
fn pruned_generations_free_the_store_and_recipients_on_them_still_sync() {
    let w = World::new();
    let site = w.site("site1");
    // No old generations kept (`keep-history = 0`): what is pruned is gone.
    set_owner(&w, "keep-generations = 16", "keep-generations = 2");
    set_owner(&w, "keep-history = \"1year\"", "keep-history = 0");
    put(&w.source, "only-in-1.bin", &noise(50_000, 9), 0o644);
    put(&w.source, "kept.txt", b"kept\n", 0o644);
    w.publish();
    w.sync(&site);
    fs::remove_file(w.source.join("only-in-1.bin")).unwrap();
    for g in 2..=4 {
        put(&w.source, "gen.txt", format!("{g}\n").as_bytes(), 0o644);
        assert_eq!(w.publish(), g);
    }
    let objects: usize = fs::read_dir(w.path("owner/store/objects")).unwrap().map(|d| count(&d.unwrap().path())).sum();
    // Generations 3 and 4 are kept: kept.txt, and gen.txt twice.
    assert_eq!(objects, 3, "content only generations 1 and 2 had is gone");
    // The recipient still has generation 1, which the owner no longer knows: it is asked for its whole
    // tree and then brought up to date.
    site.run(true);
    w.owner_run();
    let log = site.run(false);
    assert!(log.contains("asked for the full tree"), "{log}");
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 4);
}

#[test]
fn a_fleet_on_the_same_generations_shares_one_cached_delta() {
    let w = World::new();
    let (one, two) = (w.site("site1"), w.site("site2"));
    let big = noise(1 << 20, 10);
    put(&w.source, "db.bin", &big, 0o644);
    w.publish();
    w.sync(&one);
    w.sync(&two);
    let mut edited = big;
    edited[1000..2000].copy_from_slice(&noise(1000, 11));
    put(&w.source, "db.bin", &edited, 0o644);
    w.publish();
    one.run(true);
    let first = w.owner_run();
    assert!(first.contains("cached=0"), "{first}");
    two.run(true);
    let second = w.owner_run();
    assert!(second.contains("cached=1"), "the second recipient's delta comes from the cache: {second}");
    one.run(false);
    two.run(false);
    assert_same_tree(&w.source, &one.data);
    assert_same_tree(&w.source, &two.data);
}

/// Something like machine code: incompressible bytes with NULs sprinkled in.
fn machine_code(n: usize, seed: u64) -> Vec<u8> {
    let mut code = noise(n, seed);
    for (i, b) in code.iter_mut().enumerate() {
        if i % 7 == 3 {
            *b = 0;
        }
    }
    code
}

/// What a rebuild does to a binary: every address moves by the same amount, and addresses are 4-byte
/// words a few dozen bytes apart (at irregular distances); a little code is new.
fn rebuilt(old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    let gaps = noise(new.len() / 16, 31);
    let mut at = 0;
    for g in gaps {
        at += 16 + usize::from(g % 64);
        if at + 4 > new.len() {
            break;
        }
        let word = u32::from_le_bytes(new[at..at + 4].try_into().unwrap()).wrapping_add(0x1230);
        new[at..at + 4].copy_from_slice(&word.to_le_bytes());
    }
    new.splice(100_000..100_000, noise(500, 32));
    new
}

#[test]
fn a_rebuilt_binary_travels_as_a_bsdiff_patch() {
    let w = World::new();
    let site = w.site("site1");
    let old = machine_code(600_000, 30);
    put(&w.source, "lib/ext.so", &old, 0o755);
    put(&w.source, "lib/notes.txt", b"text that does not change\n", 0o644);
    w.publish();
    w.sync(&site);

    let new = rebuilt(&old);
    put(&w.source, "lib/ext.so", &new, 0o755);
    w.publish();
    site.run(true);
    let log = w.owner_run();
    assert!(log.contains("bsdiff=1"), "the binary travels as a bsdiff patch: {log}");
    let replies = new_messages(&site, &w);
    assert_eq!(replies.len(), 1);
    let bytes = fs::metadata(&replies[0]).unwrap().len();
    // The zstd-prefix frame alone, before base64 and the rest of the message, is larger than the whole
    // reply with the patch.
    let lz = mailferry::delta::compress(&old, &new, 9).unwrap().len() as u64;
    eprintln!("reply {bytes} bytes; zstd-prefix frame alone {lz} bytes");
    assert!(bytes < lz, "a {bytes}-byte reply, the zstd-prefix frame alone is {lz} bytes");
    site.run(false);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 2);
}

#[test]
fn a_queued_reply_is_stored_once() {
    let w = World::new();
    let site = w.site("site1");
    put(&w.source, "db.bin", &noise(1 << 20, 21), 0o644);
    w.publish();
    site.run(true);
    // The recipient's Maildir cannot take mail for now: the reply stays queued at the owner.
    let tmp = site.maildir(&w).join("tmp");
    fs::remove_dir_all(&tmp).unwrap();
    fs::write(&tmp, b"in the way").unwrap();
    w.owner_run();
    let db = rusqlite::Connection::open(w.path("owner/state.db")).unwrap();
    let queued: i64 = db.query_row("SELECT count(*) FROM outbox WHERE failed_at IS NULL", [], |r| r.get(0)).unwrap();
    assert_eq!(queued, 1, "the reply is queued");
    let bytes = |table: &str| -> i64 {
        db.query_row(&format!("SELECT coalesce(sum(length(raw)), 0) FROM {table}"), [], |r| r.get(0)).unwrap()
    };
    assert!(bytes("sent_parts") > 1 << 20, "the part is kept for resending");
    assert_eq!(bytes("outbox"), 0, "the queued part refers to the kept copy instead of holding its own");
    drop(db);
    // Sent from the kept copy once the Maildir is back.
    fs::remove_file(&tmp).unwrap();
    fs::create_dir(&tmp).unwrap();
    w.owner_run();
    site.run(false);
    assert_same_tree(&w.source, &site.data);
}

#[test]
fn requests_from_the_same_base_answered_together_share_one_pack() {
    let w = World::new();
    let sites = [w.site("site1"), w.site("site2"), w.site("site3")];
    let text: String = (0..20_000).map(|i| format!("Sig.Agent-{i}:0:*:{:016x}\n", i * 7919)).collect();
    put(&w.source, "db/main.hdb", text.as_bytes(), 0o644);
    w.publish();
    for s in &sites {
        w.sync(s);
    }
    let edited: String = text.lines().filter(|l| !l.ends_with('7')).map(|l| format!("{l}\n")).collect::<String>()
        + "Sig.Agent-new:0:*:00ff\n";
    put(&w.source, "db/main.hdb", edited.as_bytes(), 0o644);
    w.publish();
    for s in &sites {
        s.run(true);
    }
    let log = w.owner_run();
    let answers: Vec<&str> = log.lines().filter(|l| l.contains("answered request")).collect();
    assert_eq!(answers.len(), 3, "{log}");
    assert!(answers[0].contains("reused=false") && answers[0].contains("lines=1"), "a line delta: {log}");
    assert!(answers[1..].iter().all(|a| a.contains("reused=true")), "packed once: {log}");
    for s in &sites {
        s.run(false);
        assert_same_tree(&w.source, &s.data);
    }
}

#[test]
fn a_recipient_that_does_not_name_line_deltas_is_never_sent_one() {
    use mailferry::manifest::Listed;
    use mailferry::protocol::{Auth, InventoryKind, Kind, Request, VERSION, Want};
    let w = World::new();
    let site = w.site("site1");
    let text: String = (0..20_000).map(|i| format!("Sig.Agent-{i}:0:*:{:016x}\n", i * 7919)).collect();
    put(&w.source, "db/main.hdb", text.as_bytes(), 0o644);
    w.publish();
    w.sync(&site);
    let edited: String = text.lines().filter(|l| !l.ends_with('7')).map(|l| format!("{l}\n")).collect::<String>()
        + "Sig.Agent-new:0:*:00ff\n";
    put(&w.source, "db/main.hdb", edited.as_bytes(), 0o644);
    w.publish();
    // A request as a recipient from before line deltas writes it: no `methods`.
    let tree = mailferry::scan::scan(&site.data).unwrap().manifest;
    let old = |seq: u64, methods: Vec<mailferry::protocol::Method>| Request {
        mailferry: VERSION,
        kind: Kind::Request,
        recipient: "site1".into(),
        channel: "default".into(),
        nonce: mailferry::crypto::Nonce::generate(),
        seq,
        created: 0,
        generation: 1,
        root: tree.root(),
        inventory_kind: InventoryKind::Full,
        inventory: tree.iter().map(|(p, e)| Listed { path: p.clone(), entry: e.clone() }).collect(),
        removed: vec![],
        inventory_payload: None,
        want: Want::Latest,
        full_content: false,
        resend: None,
        fresh: true,
        methods,
        registration: None,
        accepts: Vec::new(),
    };
    let answer = |req: Request, name: &str| {
        let control = mailferry::protocol::encode(&req);
        let auth = mailferry::protocol::encode(&Auth::sign("site1", &site.key(), &control));
        fs::write(
            w.spool.join(OWNER).join("new").join(name),
            forge(Kind::Request, (&site.address, OWNER), &control, &auth, &[]),
        )
        .unwrap();
        let log = w.owner_run();
        log.lines().find(|l| l.contains("answered request")).unwrap_or_else(|| panic!("{log}")).to_owned()
    };
    let line = answer(old(100, Vec::new()), "old-request");
    assert!(line.contains("lines=0") && line.contains("streams=1"), "a zstd-prefix delta instead: {line}");
    let line = answer(old(101, mailferry::protocol::Method::ALL.to_vec()), "new-request");
    assert!(line.contains("lines=1"), "named, so sent: {line}");
}
