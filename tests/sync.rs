//! End-to-end syncs over the Maildir transport, through the real binary.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::util::*;

#[test]
fn first_and_incremental_sync_of_a_varied_tree() {
    let w = World::new();
    let site = w.site("site1");
    varied_tree(&w.source);
    assert_eq!(w.publish(), 1);
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 1);

    // Edit, add, delete, rename, exec bit on and off, file <-> directory, a new empty directory.
    put(&w.source, "README", b"hello again\n", 0o644);
    put(&w.source, "new/file.txt", b"new\n", 0o644);
    fs::remove_dir_all(w.source.join("old")).unwrap();
    fs::rename(w.source.join("data/blob.bin"), w.source.join("data/renamed.bin")).unwrap();
    fs::set_permissions(w.source.join("deep/a/b/c/d/e/leaf.txt"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(w.source.join("bin/tool"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::remove_file(w.source.join("typechange")).unwrap();
    put(&w.source, "typechange/now-a-dir.txt", b"inside\n", 0o644);
    fs::remove_dir_all(w.source.join("dir-to-file")).unwrap();
    put(&w.source, "dir-to-file", b"now a file\n", 0o644);
    fs::create_dir_all(w.source.join("another/empty")).unwrap();
    assert_eq!(w.publish(), 2);
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);

    let status = site.status();
    assert_eq!(status["generation"], 2);
    assert_eq!(status["rejected"], 0);
    assert_eq!(status["outbox"]["pending"], 0);
    let owner = w.owner_status();
    assert_eq!(owner["generation"]["number"], 2);
    assert_eq!(owner["recipients"][0]["applied_generation"], 2, "the receipt was recorded: {owner}");
    assert_eq!(owner["rejected"], 0);
    // Handled mail was filed as processed.
    assert_eq!(fs::read_dir(site.maildir(&w).join("new")).unwrap().count(), 0);
    assert!(fs::read_dir(site.maildir(&w).join("cur")).unwrap().count() >= 2);
}

#[test]
fn a_published_generation_is_immutable() {
    let w = World::new();
    let site = w.site("site1");
    varied_tree(&w.source);
    w.publish();
    let snapshot = w.path("published-copy");
    copy_tree(&w.source, &snapshot);
    put(&w.source, "README", b"edited after publish\n", 0o644);
    put(&w.source, "leak.txt", b"must not arrive\n", 0o644);
    w.sync(&site);
    assert_same_tree(&snapshot, &site.data);
}

#[test]
fn publishing_an_unchanged_tree_makes_no_new_generation() {
    let w = World::new();
    put(&w.source, "a", b"1", 0o644);
    assert_eq!(w.publish(), 1);
    let out = ok(&["owner", "publish", "--config", &w.owner_config]);
    assert!(out.starts_with("generation 1 ") && out.contains("unchanged"), "{out}");
}

#[test]
fn thousands_of_files_then_a_few_dozen_changes() {
    let w = World::new();
    let site = w.site("big");
    for d in 0..40 {
        for f in 0..75 {
            put(&w.source, &format!("d{d:02}/f{f:03}.txt"), format!("file {d} {f}\n").repeat(20).as_bytes(), 0o644);
        }
    }
    w.publish();
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    for i in 0..36 {
        put(&w.source, &format!("d{:02}/f{:03}.txt", i, i), format!("changed {i}\n").as_bytes(), 0o644);
    }
    for i in 0..6 {
        fs::remove_file(w.source.join(format!("d39/f{i:03}.txt"))).unwrap();
        put(&w.source, &format!("added/n{i}.txt"), b"added\n", 0o644);
    }
    w.publish();
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
}

#[test]
fn extras_are_deleted_by_default_and_kept_on_request() {
    let w = World::new();
    let del = w.site("del");
    let keep = w.site("keep");
    let cfg = fs::read_to_string(&keep.config).unwrap().replace("on-extra = \"delete\"", "on-extra = \"keep\"");
    assert!(cfg.contains("on-extra = \"keep\""), "{cfg}");
    fs::write(&keep.config, cfg).unwrap();
    for s in [&del, &keep] {
        put(&s.data, "local/notes.txt", b"mine\n", 0o644);
        put(&s.data, "shared.txt", b"local version\n", 0o644);
    }
    put(&w.source, "shared.txt", b"owner version\n", 0o644);
    put(&w.source, "owned.txt", b"owner\n", 0o644);
    w.publish();
    w.sync(&del);
    w.sync(&keep);
    assert_same_tree(&w.source, &del.data);
    assert_eq!(fs::read(keep.data.join("local/notes.txt")).unwrap(), b"mine\n", "keep leaves extras");
    assert_eq!(fs::read(keep.data.join("shared.txt")).unwrap(), b"owner version\n", "owned paths are still synced");

    // A file the owner removes is deleted even with keep.
    fs::remove_file(w.source.join("owned.txt")).unwrap();
    w.publish();
    w.sync(&keep);
    assert!(!keep.data.join("owned.txt").exists());
    assert!(keep.data.join("local/notes.txt").exists());
    assert_eq!(keep.status()["generation"], 2);
}

#[test]
fn local_drift_is_repaired_on_the_next_sync() {
    let w = World::new();
    let site = w.site("site1");
    varied_tree(&w.source);
    w.publish();
    w.sync(&site);
    put(&site.data, "README", b"someone edited this\n", 0o644);
    fs::remove_file(site.data.join("data/empty")).unwrap();
    put(&site.data, "stray", b"x", 0o644);
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 1);
}

#[test]
fn an_unanswered_request_is_not_repeated_until_it_times_out() {
    let w = World::new();
    let site = w.site("site1");
    put(&w.source, "a", b"1", 0o644);
    site.run(true);
    site.run(true);
    let owner_new = w.spool.join(OWNER).join("new");
    assert_eq!(fs::read_dir(&owner_new).unwrap().count(), 1, "second run must not send a second request");
    // With a zero reply-timeout the outstanding request counts as lost at once.
    let cfg = fs::read_to_string(&site.config).unwrap().replace("reply-timeout = \"6h\"", "reply-timeout = \"0s\"");
    fs::write(&site.config, cfg).unwrap();
    site.run(true);
    assert_eq!(fs::read_dir(&owner_new).unwrap().count(), 2);
    // The owner has nothing published: requests wait in the inbox, nothing is refused.
    let err = w.owner_run();
    assert!(err.contains("nothing is published yet"), "{err}");
    assert_eq!(fs::read_dir(&owner_new).unwrap().count(), 2);
    w.publish();
    w.owner_run();
    site.run(false);
    assert_same_tree(&w.source, &site.data);
}

#[test]
fn deliver_carries_mail_between_two_machines() {
    // Two machines, each with its own spool; files move by hand (a USB stick) and enter with `deliver`.
    let w = World::new();
    let site = w.site("airgap");
    let site_spool = w.path("site-spool");
    let cfg =
        fs::read_to_string(&site.config).unwrap().replace(w.spool.to_str().unwrap(), site_spool.to_str().unwrap());
    fs::write(&site.config, cfg).unwrap();
    varied_tree(&w.source);
    w.publish();

    site.run(true);
    let requests: Vec<_> =
        fs::read_dir(site_spool.join(OWNER).join("new")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(requests.len(), 1);
    let usb = w.path("usb");
    fs::create_dir_all(&usb).unwrap();
    fs::copy(&requests[0], usb.join("request.eml")).unwrap();
    ok(&["deliver", "--config", &w.owner_config, usb.join("request.eml").to_str().unwrap()]);

    let replies: Vec<_> = fs::read_dir(site.maildir(&w).join("new")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(replies.len(), 1, "the owner's reply is in its own spool");
    // The reply travels on stdin this time, as from an MTA pipe.
    let out = std::process::Command::new(bin())
        .args(["deliver", "--config", &site.config])
        .stdin(fs::File::open(&replies[0]).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 1);
}

#[test]
fn symlinks_inside_the_tree_are_synced() {
    use std::os::unix::fs::symlink;
    let w = World::new();
    let site = w.site("site1");
    put(&w.source, "lib/libfoo.so.1.2", b"\x7fELF pretend", 0o755);
    symlink("libfoo.so.1.2", w.source.join("lib/libfoo.so.1")).unwrap();
    symlink("libfoo.so.1", w.source.join("lib/libfoo.so")).unwrap();
    symlink("../lib", w.source.join("lib/up")).unwrap();
    put(&w.source, "conf/real.conf", b"x=1\n", 0o644);
    symlink("conf", w.source.join("conf-link")).unwrap();
    w.publish();
    w.sync(&site);
    let read = |p: &str| fs::read_link(site.data.join(p)).unwrap();
    assert_eq!(read("lib/libfoo.so"), std::path::Path::new("libfoo.so.1"));
    assert_eq!(read("lib/up"), std::path::Path::new("../lib"));
    assert_eq!(fs::read(site.data.join("lib/libfoo.so")).unwrap(), b"\x7fELF pretend", "links resolve inside the tree");

    // Retarget a link, turn a link into a file, a directory into a link, and a link into a directory.
    fs::remove_file(w.source.join("lib/libfoo.so")).unwrap();
    symlink("libfoo.so.1.2", w.source.join("lib/libfoo.so")).unwrap();
    fs::remove_file(w.source.join("lib/up")).unwrap();
    put(&w.source, "lib/up", b"now a file\n", 0o644);
    fs::remove_dir_all(w.source.join("conf")).unwrap();
    fs::remove_file(w.source.join("conf-link")).unwrap();
    symlink("lib", w.source.join("conf")).unwrap();
    put(&w.source, "conf-link/inner", b"dir now\n", 0o644);
    w.publish();
    w.sync(&site);
    assert_eq!(read("lib/libfoo.so"), std::path::Path::new("libfoo.so.1.2"));
    assert_eq!(read("conf"), std::path::Path::new("lib"));
    assert_eq!(fs::read(site.data.join("lib/up")).unwrap(), b"now a file\n");
    assert_eq!(fs::read(site.data.join("conf-link/inner")).unwrap(), b"dir now\n");
    assert_eq!(site.status()["generation"], 2);
    assert_eq!(site.status()["rejected"], 0);
}

#[test]
fn publishing_a_symlink_that_leads_outside_is_refused() {
    let w = World::new();
    put(&w.source, "a", b"1", 0o644);
    std::os::unix::fs::symlink("/etc/passwd", w.source.join("escape")).unwrap();
    let err = fails(&["owner", "publish", "--config", &w.owner_config], 2);
    assert!(err.contains("escape") && err.contains("outside the tree"), "{err}");
}

#[test]
fn publishing_while_the_owner_daemon_runs() {
    use std::time::{Duration, Instant};
    let w = World::new();
    let site = w.site("site1");
    let cfg = fs::read_to_string(&w.owner_config).unwrap().replace("interval = \"1m\"", "interval = \"300ms\"");
    fs::write(&w.owner_config, cfg).unwrap();
    put(&w.source, "a.txt", b"one\n", 0o644);
    w.publish();
    let daemon = Daemon::start(&["owner", "run", "--config", &w.owner_config], w.path("owner-daemon.log"));
    let wait_for_reply = || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while count(&site.maildir(&w).join("new")) == 0 {
            assert!(Instant::now() < deadline, "the daemon did not answer within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    site.run(true);
    wait_for_reply();
    site.run(false);
    assert_same_tree(&w.source, &site.data);

    // Publishing does not need the daemon to stop: it waits, at most, for the step in progress.
    put(&w.source, "b.txt", b"two\n", 0o644);
    let started = Instant::now();
    assert_eq!(w.publish(), 2);
    assert!(started.elapsed() < Duration::from_secs(10), "publish waited {:?}", started.elapsed());
    site.run(true);
    wait_for_reply();
    site.run(false);
    assert_same_tree(&w.source, &site.data);

    // SIGTERM stops it cleanly.
    daemon.stop();
}

#[test]
fn the_recipient_daemon_requests_applies_and_stops_on_sigterm() {
    use std::time::{Duration, Instant};
    let w = World::new();
    let site = w.site("site1");
    let cfg = fs::read_to_string(&site.config).unwrap().replace("interval = \"1h\"", "interval = \"1s\"");
    assert!(cfg.contains("interval = \"1s\""), "{cfg}");
    fs::write(&site.config, cfg).unwrap();
    varied_tree(&w.source);
    w.publish();
    let daemon = Daemon::start(&["recipient", "run", "--config", &site.config], w.path("recipient-daemon.log"));
    let owner_inbox = w.spool.join(OWNER).join("new");
    let deadline = Instant::now() + Duration::from_secs(20);
    // The daemon requests by itself; the owner answers; the daemon applies as the reply arrives.
    while count(&owner_inbox) == 0 {
        assert!(Instant::now() < deadline, "the daemon sent no request");
        std::thread::sleep(Duration::from_millis(50));
    }
    w.owner_run();
    while site.status()["generation"] != 1 {
        assert!(Instant::now() < deadline, "the daemon did not apply the reply");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_same_tree(&w.source, &site.data);
    daemon.stop();
}

/// The request waiting in the owner's inbox: its control part and its raw size.
fn waiting_request(w: &World) -> (serde_json::Value, usize) {
    let new = w.spool.join(OWNER).join("new");
    let files: Vec<_> = fs::read_dir(&new).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "one request waits");
    let raw = fs::read(&files[0]).unwrap();
    let parsed = mailferry::protocol::envelope::parse(&raw, u64::MAX).unwrap();
    (serde_json::from_slice(&parsed.control).unwrap(), raw.len())
}

#[test]
fn requests_grow_with_drift_not_with_the_tree() {
    let w = World::new();
    let site = w.site("site1");
    for d in 0..20 {
        for f in 0..50 {
            put(&w.source, &format!("d{d:02}/f{f:02}.txt"), format!("{d} {f}\n").as_bytes(), 0o644);
        }
    }
    w.publish();
    site.run(true);
    let (first, first_size) = waiting_request(&w);
    assert_eq!(first["inventory-kind"], "full", "first contact lists the whole tree");
    w.owner_run();
    site.run(false);
    w.owner_run();

    // 1,020 entries, unchanged: the request says so in a few hundred bytes of control part.
    site.run(true);
    let (unchanged, size) = waiting_request(&w);
    assert_eq!(unchanged["inventory-kind"], "changes");
    assert_eq!(unchanged["inventory"].as_array().unwrap().len(), 0);
    assert!(size < 4096, "an unchanged tree's request is {size} bytes of mail (first contact: {first_size})");
    w.owner_run();
    site.run(false);

    // Local drift: the request lists exactly what drifted, and the reply repairs it.
    put(&site.data, "d03/f07.txt", b"edited locally\n", 0o644);
    fs::remove_file(site.data.join("d04/f08.txt")).unwrap();
    put(&site.data, "stray.txt", b"x", 0o644);
    site.run(true);
    let (drift, _) = waiting_request(&w);
    let listed: Vec<&str> =
        drift["inventory"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(listed, ["d03/f07.txt", "stray.txt"]);
    assert_eq!(drift["removed"], serde_json::json!(["d04/f08.txt"]));
    w.owner_run();
    site.run(false);
    assert_same_tree(&w.source, &site.data);
}

#[test]
fn the_stat_cache_is_written_only_when_it_changes_and_never_hides_an_edit() {
    use std::os::unix::fs::MetadataExt;
    let w = World::new();
    let site = w.site("site1");
    for f in 0..30 {
        put(&w.source, &format!("d/f{f:02}.txt"), format!("file {f}\n").as_bytes(), 0o644);
    }
    w.publish();
    w.sync(&site);
    // Files changed within two seconds of a scan are never cached: let the tree age first.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let cache = site.dir.join("stat-cache");
    let stamp = || fs::metadata(&cache).map(|m| (m.ino(), m.mtime(), m.mtime_nsec())).ok();
    w.sync(&site);
    let written = stamp().expect("a scan of an aged tree writes the stat cache");

    // Unchanged: the request is empty and the cache file is left as it was.
    site.run(true);
    let (unchanged, _) = waiting_request(&w);
    assert_eq!(unchanged["inventory"].as_array().unwrap().len(), 0);
    assert_eq!(stamp(), Some(written), "an unchanged tree rewrote the stat cache");
    w.owner_run();
    site.run(false);
    w.owner_run();

    // Same size and modification time, new content: the status change time gives it away, the request
    // carries the new digest, the cache is rewritten, and the next sync repairs the file.
    let path = site.data.join("d/f07.txt");
    let before = fs::metadata(&path).unwrap().modified().unwrap();
    fs::write(&path, b"FILE 7\n").unwrap();
    fs::File::options().write(true).open(&path).unwrap().set_modified(before).unwrap();
    site.run(true);
    let (drift, _) = waiting_request(&w);
    let listed = drift["inventory"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{drift}");
    assert_eq!(listed[0]["path"], "d/f07.txt");
    let want = mailferry::manifest::Digest::of(b"FILE 7\n").to_hex();
    assert!(listed[0].to_string().contains(&want), "{}", listed[0]);
    assert_ne!(stamp(), Some(written), "the edited file's entry must leave the cache");
    w.owner_run();
    site.run(false);
    w.owner_run();
    assert_same_tree(&w.source, &site.data);

    // A damaged cache file costs a full rehash, never a wrong answer.
    fs::write(&cache, b"MFSTATC\0 garbage").unwrap();
    put(&site.data, "d/f08.txt", b"edited\n", 0o644);
    let log = site.run(true);
    assert!(log.contains("every file will be read again"), "{log}");
    let (after_damage, _) = waiting_request(&w);
    let listed: Vec<&str> =
        after_damage["inventory"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(listed, ["d/f08.txt"]);
    w.owner_run();
    site.run(false);
    assert_same_tree(&w.source, &site.data);
}

/// Runs README.md's walkthrough as written: each `sh` block of the section, in order, with the machines'
/// absolute paths moved under a temporary directory and `mailferry` the binary under test. It must end
/// with the tree synced, the receipt recorded, and nothing refused on either side.
#[test]
fn the_readme_walkthrough_works_as_written() {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("## Walkthrough: two machines and a carried spool").expect("the walkthrough");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let blocks: Vec<&str> = section.split("```sh\n").skip(1).map(|b| &b[..b.find("```").unwrap()]).collect();
    assert!(blocks.len() >= 5, "{} blocks", blocks.len());
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let bin_dir = root.join("bin");
    fs::create_dir_all(&bin_dir).unwrap();
    std::os::unix::fs::symlink(bin(), bin_dir.join("mailferry")).unwrap();
    let (a, b, usb) = (root.join("machine-a"), root.join("machine-b"), root.join("usb"));
    for block in &blocks {
        let script = block
            .replace("/srv/", &format!("{}/srv/", a.display()))
            .replace("/var/", &format!("{}/var/", b.display()))
            .replace("/opt/", &format!("{}/opt/", b.display()))
            .replace("/media/usb", &usb.display().to_string());
        let out = std::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(root)
            .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()))
            .env_remove("MAILFERRY_CONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "block failed:\n{script}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_same_tree(&a.join("srv/signatures"), &b.join("opt/scanner/db"));
    let owner = a.join("srv/mf-owner/owner.toml");
    let recipient = b.join("var/lib/mf/recipient.toml");
    let status = |cfg: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&ok(&["status", "--config", cfg.to_str().unwrap(), "--json"])).unwrap()
    };
    let o = status(&owner);
    assert_eq!(o["recipients"][0]["applied_generation"], 1, "{o}");
    assert!(o["recipients"][0]["last_receipt_at"].is_u64(), "the receipt was carried back: {o}");
    assert_eq!(o["rejected"], 0, "{o}");
    let r = status(&recipient);
    assert_eq!((r["generation"].as_u64(), r["rejected"].as_u64()), (Some(1), Some(0)), "{r}");
    assert_eq!(count(&usb.join("to-owner")) + count(&usb.join("to-plant7")), 0, "the stick is empty");
    // Carrying a file twice, or a node's own message back to it, is no refusal.
    ok(&["recipient", "run", "--config", recipient.to_str().unwrap(), "--once"]);
    let outgoing = b.join("var/spool/mf/owner@vendor.example/new");
    let request = fs::read_dir(&outgoing).unwrap().next().unwrap().unwrap().path();
    let deliver = |cfg: &std::path::Path| {
        let out = run(&["deliver", "--config", cfg.to_str().unwrap(), request.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    let back = deliver(&recipient);
    assert!(back.contains("not for this node: a request this recipient sent"), "{back}");
    deliver(&owner);
    let twice = deliver(&owner);
    assert!(twice.contains("already handled at") && twice.contains("delivered before"), "{twice}");
    assert_eq!(status(&owner)["rejected"], 0);
    assert_eq!(status(&recipient)["rejected"], 0);
}

/// A relay: one node with one state directory, one lock and one inbox, that is the recipient of the
/// owner above and the owner of a site below, publishing below what arrives from above. The site ends
/// with the top owner's tree; every message went to the part it was for; nothing was refused.
#[test]
fn a_relay_node_holds_both_roles_on_one_state() {
    use mailferry::config::NodeConfig;
    use mailferry::node::compose::Node;
    use mailferry::transport::AnyTransport;

    let w = World::new();
    varied_tree(&w.source);
    w.publish();
    let relay = "relay7@customer.test";
    let (dir, data) = (w.path("relay"), w.path("relay-data"));
    fs::create_dir_all(&data).unwrap();
    let (d, t) = (dir.to_str().unwrap(), data.to_str().unwrap());
    let spool = w.spool.to_str().unwrap();
    ok(&["owner", "init", "--dir", d, "--source", t, "--address", relay, "--transport-root", spool]);
    let up = w.path("relay7.enrollment");
    let e = up.to_str().unwrap();
    ok(&["owner", "add-recipient", "--config", &w.owner_config, "--name", "relay7", "--address", relay, "--out", e]);
    init_recipient(&dir, &data, &up, &w.spool);
    let owner_cfg = dir.join("owner.toml");
    let down = w.path("site1.enrollment");
    let site_args = ["--name", "site1", "--address", "site1@customer.test", "--out", down.to_str().unwrap()];
    ok(&[&["owner", "add-recipient", "--config", owner_cfg.to_str().unwrap()][..], &site_args[..]].concat());
    let (site_dir, site_data) = (w.path("site1"), w.path("site1-data"));
    init_recipient(&site_dir, &site_data, &down, &w.spool);
    let site_cfg = site_dir.join("recipient.toml");
    let site = site_cfg.to_str().unwrap();

    let NodeConfig::Owner(o) = NodeConfig::load(&owner_cfg).unwrap() else { panic!("owner config") };
    let NodeConfig::Recipient(r) = NodeConfig::load(&dir.join("recipient.toml")).unwrap() else {
        panic!("recipient config")
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let relay_run = |request: bool| {
        let mut node = Node::open(Some(o.clone()), Some(r.clone())).unwrap();
        let mut t = AnyTransport::open(&r.transport, relay).unwrap();
        rt.block_on(node.run_once(&mut t, request)).unwrap()
    };
    // The relay asks the top owner, which answers; the relay applies and publishes below.
    assert!(relay_run(true).requested);
    w.owner_run();
    let report = relay_run(false);
    assert_eq!((report.handled, report.refused), (1, 0), "{report:?}");
    assert_same_tree(&w.source, &data);
    // The site asks the relay, which answers from what it published.
    ok(&["recipient", "run", "--config", site, "--once"]);
    let report = relay_run(false);
    assert_eq!((report.handled, report.refused), (1, 0), "{report:?}");
    ok(&["recipient", "run", "--config", site, "--once", "--no-request"]);
    assert_same_tree(&w.source, &site_data);
    // The receipts went where they belong: the top owner has the relay's, the relay's owner part the site's.
    w.owner_run();
    let report = relay_run(false);
    assert_eq!((report.handled, report.refused), (1, 0), "the site's receipt: {report:?}");
    assert_eq!(w.owner_status()["recipients"][0]["applied_generation"], 1);
    let relay_status: serde_json::Value =
        serde_json::from_str(&ok(&["status", "--config", owner_cfg.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(relay_status["recipients"][0]["applied_generation"], 1, "{relay_status}");
    assert_eq!(relay_status["rejected"], 0);
    assert!(rejections(&w.owner_config).is_empty());
    // A change at the top reaches the site through the relay.
    put(&w.source, "README", b"through the relay\n", 0o644);
    w.publish();
    relay_run(true);
    w.owner_run();
    relay_run(false);
    ok(&["recipient", "run", "--config", site, "--once"]);
    relay_run(false);
    ok(&["recipient", "run", "--config", site, "--once", "--no-request"]);
    assert_same_tree(&w.source, &site_data);
    // Both roles work on one state directory: one database, one lock.
    assert!(dir.join("state.db").exists() && !data.join("state.db").exists());
}

/// `recipient run --dry-run` lists what applying the waiting reply would change, as `rsync -n -i` does,
/// and changes nothing: the tree, the reply in the inbox, the outstanding request and the state stay.
#[test]
fn a_dry_run_lists_what_an_apply_would_change_and_changes_nothing() {
    let w = World::new();
    let site = w.site("site1");
    varied_tree(&w.source);
    w.publish();
    w.sync(&site);
    put(&w.source, "README", b"version 2\n", 0o644);
    put(&w.source, "added/new.bin", &[7u8; 5000], 0o644);
    w.publish();
    site.run(true);
    w.owner_run();
    let before = (snapshot(&site.data), count(&site.maildir(&w).join("new")), site.status());
    let out = ok(&["recipient", "run", "--config", &site.config, "--dry-run"]);
    assert!(out.starts_with("generation 2 (reply "), "{out}");
    assert!(out.lines().any(|l| l.starts_with(">fc") && l.ends_with(" README")), "{out}");
    assert!(out.lines().any(|l| l == ">f+++++++++ added/new.bin"), "{out}");
    assert!(out.lines().any(|l| l == "cd+++++++++ added"), "{out}");
    let json = ok(&["recipient", "run", "--config", &site.config, "--dry-run", "--json"]);
    let v: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!((v["outcome"].as_str(), v["generation"].as_u64()), (Some("apply"), Some(2)), "{v}");
    assert_eq!((snapshot(&site.data), count(&site.maildir(&w).join("new")), site.status()), before, "nothing changed");
    // The real run applies exactly that.
    site.run(false);
    assert_same_tree(&w.source, &site.data);
    let out = ok(&["recipient", "run", "--config", &site.config, "--dry-run"]);
    assert!(out.is_empty(), "nothing waits now: {out}");
}

/// `owner publish` with debug logs: its output and how many source files it read.
fn publish_reading(w: &World) -> (String, usize) {
    let args = ["owner", "publish", "--config", &w.owner_config];
    let out = std::process::Command::new(bin()).args(args).env("MAILFERRY_LOG", "mailferry=debug").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let read = stderr
        .lines()
        .find(|l| l.contains("scanned the source tree"))
        .and_then(|l| l.split(" read=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no scan line in {stderr}"));
    (String::from_utf8(out.stdout).unwrap(), read)
}

#[test]
fn publish_rereads_only_what_changed_and_catches_a_same_size_same_mtime_edit() {
    let w = World::new();
    for i in 0..20 {
        put(&w.source, &format!("d/f{i:02}.txt"), format!("file {i:02}\n").as_bytes(), 0o644);
    }
    // Files changed within two seconds of a scan are never cached: let the tree age first.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (out, read) = publish_reading(&w);
    assert!(out.starts_with("generation 1"), "{out}");
    assert_eq!(read, 20, "the first publish reads everything");
    let (out, read) = publish_reading(&w);
    assert!(out.contains("unchanged") || out.starts_with("generation 1"), "{out}");
    assert_eq!(read, 0, "an unchanged tree is not read again");

    // The same size, and the modification time set back: the change time still differs.
    let edited = w.source.join("d/f07.txt");
    let before = fs::metadata(&edited).unwrap().modified().unwrap();
    put(&w.source, "d/f07.txt", b"FILE 07\n", 0o644);
    fs::File::options().write(true).open(&edited).unwrap().set_modified(before).unwrap();
    let (out, read) = publish_reading(&w);
    assert!(out.starts_with("generation 2"), "the edit is published: {out}");
    assert_eq!(read, 1, "only the edited file is read");

    // A file written just now is read, but not cached: a second write in the same clock tick (on a
    // file system with coarse times) could leave its stamp as it is.
    put(&w.source, "d/new.txt", b"new\n", 0o644);
    let (out, _) = publish_reading(&w);
    assert!(out.starts_with("generation 3"), "{out}");
    let cache = mailferry::statcache::StatCache::load(&w.path("owner/publish-stat-cache")).unwrap();
    assert!(cache.get("d/f00.txt").is_some() && cache.get("d/new.txt").is_none(), "racily clean files are not cached");
    let (_, read) = publish_reading(&w);
    assert_eq!(read, 2, "so they are read again next time: the new file and the edited one");

    // A cache that does not belong to the newest generation is not used.
    fs::write(w.path("owner/publish-stat-cache.root"), "00".repeat(32)).unwrap();
    let (_, read) = publish_reading(&w);
    assert_eq!(read, 21, "a stale cache costs one full read");
}
