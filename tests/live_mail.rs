//! End-to-end syncs over real mail, through the real binary: owner and recipients with
//! `[transport] kind = "mail"` against the Postfix + Dovecot of `tests/mailserver/`.
//!
//! Every test takes fresh catch-all mailboxes (`t-*@example.test`) on the shared server; only the relay
//! outage test starts a private one, because it stops a daemon. Mailboxes are checked with `doveadm`,
//! independently of the code under test.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::mailserver::{self, MailServer};
use crate::util::*;

/// How a node connects: security mode and the harness's port key.
#[derive(Clone, Copy)]
struct Conn {
    security: &'static str,
    port_key: &'static str,
}

const SUBMISSION_STARTTLS: Conn = Conn { security: "starttls", port_key: "MAILTEST_SUBMISSION_PORT" };
const SUBMISSIONS_TLS: Conn = Conn { security: "tls", port_key: "MAILTEST_SUBMISSIONS_PORT" };
const RELAY_SUBMISSION_STARTTLS: Conn = Conn { security: "starttls", port_key: "MAILTEST_RELAY_SUBMISSION_PORT" };
const IMAPS: Conn = Conn { security: "tls", port_key: "MAILTEST_IMAPS_PORT" };
const IMAP_STARTTLS: Conn = Conn { security: "starttls", port_key: "MAILTEST_IMAP_PORT" };

/// Dovecot's name for the default processed folder (`mailferry/processed`, hierarchy delimiter `.`).
const PROCESSED: &str = "mailferry.processed";

/// The `[transport]`, `[smtp]` and `[imap]` tables for `user`, with a relative `password-file` (resolved
/// against the config file's directory) and the test CA as `ca-file`.
fn mail_tables(m: &MailServer, user: &str, smtp: Conn, imap: Conn) -> String {
    format!(
        r#"
[transport]
kind = "mail"

[smtp]
host = "{host}"
port = {smtp_port}
security = "{smtp_sec}"
username = "{user}"
password-file = "password"
ca-file = "{ca}"
timeout = "10s"

[imap]
host = "{host}"
port = {imap_port}
security = "{imap_sec}"
username = "{user}"
password-file = "password"
ca-file = "{ca}"
timeout = "10s"
poll-interval = "1s"
"#,
        host = m.host(),
        smtp_port = m.port(smtp.port_key),
        smtp_sec = smtp.security,
        imap_port = m.port(imap.port_key),
        imap_sec = imap.security,
        ca = m.ca_file().display(),
    )
}

/// Replaces the `[transport]` table `init` wrote (a spool) with the mail tables, and writes the password.
fn switch_to_mail(config: &Path, tables: &str, password: &str) {
    let text = fs::read_to_string(config).unwrap();
    let cut = text.find("[transport]").unwrap_or_else(|| panic!("no [transport] in {text}"));
    fs::write(config, format!("{}{tables}", &text[..cut])).unwrap();
    let pw = config.parent().unwrap().join("password");
    fs::write(&pw, format!("{password}\n")).unwrap();
}

fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs mailferry with `env` (unlike `util::run_env`, a failpoint may be armed).
fn run_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("MAILFERRY_FAILPOINT")
        .envs(env.iter().copied())
        .env("MAILFERRY_LOG", "mailferry=info")
        .output()
        .expect("failed to start the mailferry binary")
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `secs`.
fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A node on real mail: its config and mailbox.
struct Node {
    config: String,
    user: String,
}

impl Node {
    fn status(&self) -> serde_json::Value {
        let out = run(&["status", "--config", &self.config, "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe("status --json", &out)))
    }

    fn assert_outbox_empty(&self) {
        let s = self.status();
        assert_eq!((s["outbox"]["pending"].as_u64(), s["outbox"]["failed"].as_u64()), (Some(0), Some(0)), "{s}");
    }
}

/// A recipient on real mail.
struct MailSite {
    node: Node,
    data: PathBuf,
}

impl MailSite {
    fn run(&self, request: bool) -> String {
        let mut args = vec!["recipient", "run", "--config", &self.node.config, "--once"];
        if !request {
            args.push("--no-request");
        }
        let out = run(&args);
        assert!(out.status.success(), "{}", describe(&args.join(" "), &out));
        String::from_utf8(out.stderr).unwrap()
    }
}

/// An owner and its source tree on a mail server, in a temporary directory.
struct MailWorld<'m> {
    m: &'m MailServer,
    tmp: tempfile::TempDir,
    source: PathBuf,
    owner: Node,
}

impl<'m> MailWorld<'m> {
    /// An owner submitting with `smtp` and reading its mailbox with `imap`.
    fn new(m: &'m MailServer, smtp: Conn, imap: Conn) -> MailWorld<'m> {
        let tmp = tempfile::Builder::new().prefix("mailferry-live-").tempdir().unwrap();
        let source = tmp.path().join("source");
        fs::create_dir_all(&source).unwrap();
        let (user, password) = m.fresh_user("owner");
        let dir = tmp.path().join("owner");
        let spool = tmp.path().join("unused-spool");
        ok(&[
            "owner",
            "init",
            "--dir",
            dir.to_str().unwrap(),
            "--source",
            source.to_str().unwrap(),
            "--address",
            &user,
            "--transport-root",
            spool.to_str().unwrap(),
        ]);
        let config = dir.join("owner.toml");
        switch_to_mail(&config, &mail_tables(m, &user, smtp, imap), &password);
        let owner = Node { config: config.to_str().unwrap().to_owned(), user };
        MailWorld { m, tmp, source, owner }
    }

    /// Enrolls a recipient called `name` with its own fresh mailbox.
    fn site(&self, name: &str, smtp: Conn, imap: Conn) -> MailSite {
        let (user, password) = self.m.fresh_user(name);
        let enrollment = self.tmp.path().join(format!("{name}.enrollment"));
        let e = enrollment.to_str().unwrap();
        ok(&["owner", "add-recipient", "--config", &self.owner.config, "--name", name, "--address", &user, "--out", e]);
        let dir = self.tmp.path().join(name);
        let data = self.tmp.path().join(format!("{name}-data"));
        let spool = self.tmp.path().join("unused-spool");
        init_recipient(&dir, &data, &enrollment, &spool);
        let config = dir.join("recipient.toml");
        switch_to_mail(&config, &mail_tables(self.m, &user, smtp, imap), &password);
        MailSite { node: Node { config: config.to_str().unwrap().to_owned(), user }, data }
    }

    fn publish(&self) {
        ok(&["owner", "publish", "--config", &self.owner.config]);
    }

    fn owner_run(&self) -> String {
        let args = ["owner", "run", "--config", &self.owner.config, "--once"];
        let out = run(&args);
        assert!(out.status.success(), "{}", describe(&args.join(" "), &out));
        String::from_utf8(out.stderr).unwrap()
    }

    /// Messages in `folder` of `node`'s mailbox.
    fn count(&self, node: &Node, folder: &str) -> usize {
        if !self.m.folders(&node.user).iter().any(|f| f == folder) {
            return 0;
        }
        self.m.count(&node.user, folder)
    }

    /// Waits until `node`'s inbox holds at least `n` messages.
    fn wait_inbox(&self, node: &Node, n: usize) {
        wait_until(30, &format!("{n} message(s) in the inbox of {}", node.user), || self.count(node, "INBOX") >= n);
    }

    /// One exchange over the mail system: request, answer, apply, receipt.
    fn sync(&self, site: &MailSite) {
        site.run(true);
        self.wait_inbox(&self.owner, 1);
        self.owner_run();
        self.wait_inbox(&site.node, 1);
        site.run(false);
        self.wait_inbox(&self.owner, 1);
        self.owner_run();
        assert_eq!(self.count(&self.owner, "INBOX"), 0, "the owner's inbox still holds mail");
        assert_eq!(self.count(&site.node, "INBOX"), 0, "the recipient's inbox still holds mail");
    }
}

/// Edits that exercise an incremental reply: change, add, delete.
fn change_tree(source: &Path) {
    put(source, "README", b"hello again\n", 0o644);
    put(source, "new/file.txt", b"new\n", 0o644);
    fs::remove_dir_all(source.join("old")).unwrap();
}

fn first_and_incremental(m: &MailServer, owner: (Conn, Conn), site: (Conn, Conn)) {
    let w = MailWorld::new(m, owner.0, owner.1);
    let s = w.site("site1", site.0, site.1);
    varied_tree(&w.source);
    w.publish();
    w.sync(&s);
    assert_same_tree(&w.source, &s.data);
    change_tree(&w.source);
    w.publish();
    w.sync(&s);
    assert_same_tree(&w.source, &s.data);

    // Two requests and two receipts, two replies: all filed as processed, nothing left anywhere.
    assert_eq!(w.count(&w.owner, PROCESSED), 4);
    assert_eq!(w.count(&s.node, PROCESSED), 2);
    w.owner.assert_outbox_empty();
    s.node.assert_outbox_empty();
    let st = s.node.status();
    assert_eq!(st["generation"], 2, "{st}");
    assert_eq!(st["transport"]["receive_mode"], "idle", "{st}");
    let o = w.owner.status();
    assert_eq!(o["recipients"][0]["applied_generation"], 2, "{o}");
}

#[test]
fn mail_sync_starttls_submission_and_imaps_through_the_relay() {
    // The recipient submits to the relay MTA A, which forwards to B, the owner's MTA.
    first_and_incremental(mailserver::shared(), (SUBMISSION_STARTTLS, IMAPS), (RELAY_SUBMISSION_STARTTLS, IMAPS));
}

#[test]
fn mail_sync_implicit_tls_submission_and_imap_starttls() {
    first_and_incremental(mailserver::shared(), (SUBMISSIONS_TLS, IMAP_STARTTLS), (SUBMISSIONS_TLS, IMAP_STARTTLS));
}

#[test]
fn owner_daemon_in_idle_answers_within_two_seconds() {
    let m = mailserver::shared();
    let w = MailWorld::new(m, SUBMISSION_STARTTLS, IMAPS);
    let s = w.site("idle", SUBMISSION_STARTTLS, IMAPS);
    varied_tree(&w.source);
    w.publish();
    let daemon = Daemon::start(&["owner", "run", "--config", &w.owner.config], w.tmp.path().join("owner-daemon.log"));
    wait_until(30, "the owner daemon to report IMAP IDLE in status", || {
        w.owner.status()["transport"]["receive_mode"] == "idle"
    });

    // Every round publishes a new generation while the daemon runs (it holds the state lock only while it
    // answers), so each reply carries an update.
    let mut latencies = Vec::new();
    for round in 0..3 {
        if round > 0 {
            put(&w.source, &format!("round-{round}.txt"), format!("update {round}\n").as_bytes(), 0o644);
            w.publish();
        }
        // From the moment the request is accepted by the submission server to the reply being in the
        // recipient's mailbox: delivery to the owner, IDLE wake-up, answer, submission, delivery back.
        s.run(true);
        let submitted = Instant::now();
        wait_until(30, "the reply", || w.count(&s.node, "INBOX") >= 1);
        latencies.push(submitted.elapsed());
        s.run(false);
        assert_same_tree(&w.source, &s.data);
    }
    eprintln!("owner daemon (IDLE) request-to-reply latencies: {latencies:?}");
    for l in &latencies {
        assert!(*l < Duration::from_secs(2), "reply took {l:?} (all: {latencies:?})\n{}", daemon.log());
    }
    // The receipts are recorded by the daemon too.
    wait_until(30, "the receipt", || w.owner.status()["recipients"][0]["applied_generation"] == 3);
    let log = daemon.stop();
    assert!(log.contains("stopping"), "{log}");
    w.owner.assert_outbox_empty();
    assert_eq!(w.count(&w.owner, "INBOX"), 0);
}

#[test]
fn relay_outage_queues_the_request_and_nothing_is_lost() {
    let m = mailserver::private("mf-outage", 41, &[]);
    let w = MailWorld::new(&m, SUBMISSION_STARTTLS, IMAPS);
    let s = w.site("outage", RELAY_SUBMISSION_STARTTLS, IMAPS);
    varied_tree(&w.source);
    w.publish();

    // The final MTA is down: the relay accepts the request and queues it.
    m.ctl(&["stop", "b"]);
    s.run(true);
    s.node.assert_outbox_empty();
    wait_until(30, "the request to queue at the relay", || m.ctl(&["queue", "a"]).trim() != "0");
    w.owner_run();
    assert_eq!(w.count(&w.owner, "INBOX"), 0, "nothing can have arrived while B is down");

    m.ctl(&["start"]);
    m.ctl(&["flush", "a"]);
    m.ctl(&["wait-empty", "a", "30"]);
    w.wait_inbox(&w.owner, 1);
    w.owner_run();
    w.wait_inbox(&s.node, 1);
    s.run(false);
    w.wait_inbox(&w.owner, 1);
    w.owner_run();
    assert_same_tree(&w.source, &s.data);
    assert_eq!(w.count(&w.owner, PROCESSED), 2);
    assert_eq!(w.count(&s.node, PROCESSED), 1);
    w.owner.assert_outbox_empty();
    s.node.assert_outbox_empty();
}

#[test]
fn wrong_password_is_a_clear_error_naming_server_and_user() {
    let m = mailserver::shared();
    let w = MailWorld::new(m, SUBMISSION_STARTTLS, IMAPS);
    let s = w.site("badpw", SUBMISSION_STARTTLS, IMAPS);
    fs::write(Path::new(&s.node.config).parent().unwrap().join("password"), "not-the-password\n").unwrap();
    let args = ["recipient", "run", "--config", &s.node.config, "--once"];
    let out = run(&args);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&args.join(" "), &out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let server = format!("{}:{}", m.host(), m.port("MAILTEST_IMAPS_PORT"));
    assert!(stderr.contains(&server) && stderr.contains(&s.node.user), "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
    // `status` shows it too, and asks for attention.
    let st = run(&["status", "--config", &s.node.config]);
    assert_eq!(st.status.code(), Some(1), "{}", describe("status", &st));
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(text.contains("last error:") && text.contains(&s.node.user), "{text}");
}

#[test]
fn reply_over_the_servers_size_limit_arrives_in_parts_through_the_relay() {
    let m = mailserver::shared();
    let limit: u64 = m.env.get("MAILTEST_SIZE_LIMIT").and_then(|v| v.parse().ok()).unwrap_or(10_485_760);
    let w = MailWorld::new(m, SUBMISSION_STARTTLS, IMAPS);
    // relay-limit above the server's SIZE: the owner must learn SIZE and cut to it.
    let cfg = fs::read_to_string(&w.owner.config).unwrap().replace("relay-limit = 10240000", "relay-limit = 50000000");
    fs::write(&w.owner.config, cfg).unwrap();
    let s = w.site("big", SUBMISSION_STARTTLS, IMAPS);
    let size = usize::try_from(limit + limit / 10).unwrap();
    put(&w.source, "big.bin", &noise(size, 0x9E37_79B9_7F4A_7C15), 0o644);
    w.publish();
    s.run(true);
    w.wait_inbox(&w.owner, 1);
    let started = Instant::now();
    let answer = w.owner_run();
    w.wait_inbox(&s.node, 2);
    let parts = w.count(&s.node, "INBOX");
    assert!(parts >= 2, "{parts} part(s); owner log:\n{answer}");
    s.run(false);
    assert_same_tree(&w.source, &s.data);
    eprintln!("a {} MiB reply in {parts} parts through a {limit}-byte relay took {:?}", size >> 20, started.elapsed());
    w.wait_inbox(&w.owner, 1);
    w.owner_run();
    w.owner.assert_outbox_empty();
    s.node.assert_outbox_empty();
    assert_eq!(w.count(&s.node, PROCESSED), parts);
}

/// Puts a person's message into `user`'s inbox with `doveadm save`, not through mailferry.
fn deliver_persons_mail(m: &MailServer, user: &str) {
    let conf = format!("{}/dovecot/dovecot.conf", m.dir);
    let mut child = Command::new("doveadm")
        .args(["-c", &conf, "save", "-u", user, "-m", "INBOX"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("failed to run doveadm save");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"From: Alice <alice@example.test>\r\nTo: the owner\r\nSubject: lunch?\r\n\
              Message-ID: <lunch@example.test>\r\nDate: Sun, 22 Nov 2026 12:00:00 +0000\r\n\r\nAt noon?\r\n",
        )
        .unwrap();
    assert!(child.wait().unwrap().success(), "doveadm save failed");
}

#[test]
fn a_persons_mail_in_the_owners_inbox_is_untouched_after_many_cycles() {
    let m = mailserver::shared();
    let w = MailWorld::new(m, SUBMISSION_STARTTLS, IMAPS);
    let s = w.site("person", SUBMISSION_STARTTLS, IMAPS);
    deliver_persons_mail(m, &w.owner.user);
    put(&w.source, "a.txt", b"0\n", 0o644);
    let cycles = 5;
    for i in 0..cycles {
        put(&w.source, "a.txt", format!("{i}\n").as_bytes(), 0o644);
        w.publish();
        s.run(true);
        wait_until(30, "the request", || w.count(&w.owner, "INBOX") >= 2);
        w.owner_run();
        w.wait_inbox(&s.node, 1);
        s.run(false);
        wait_until(30, "the receipt", || w.count(&w.owner, "INBOX") >= 2);
        w.owner_run();
        assert_same_tree(&w.source, &s.data);
    }
    assert_eq!(m.count(&w.owner.user, "INBOX"), 1, "the person's mail must stay in the inbox");
    let flags = m.flags(&w.owner.user, "INBOX");
    assert!(!flags[0].contains("\\Seen"), "the person's mail was marked read: {flags:?}");
    assert_eq!(w.count(&w.owner, PROCESSED), 2 * cycles);
}

#[test]
fn owner_killed_between_fetch_and_move_answers_each_request_exactly_once() {
    let m = mailserver::shared();
    let w = MailWorld::new(m, SUBMISSION_STARTTLS, IMAPS);
    let sites = [w.site("crash1", SUBMISSION_STARTTLS, IMAPS), w.site("crash2", SUBMISSION_STARTTLS, IMAPS)];
    varied_tree(&w.source);
    w.publish();
    for s in &sites {
        s.run(true);
    }
    w.wait_inbox(&w.owner, 2);

    // Dies after answering the first request (reply queued), before filing it.
    let args = ["owner", "run", "--config", &w.owner.config, "--once"];
    let out = run_with(&args, &[("MAILFERRY_FAILPOINT", "before-settle:1")]);
    assert!(!out.status.success(), "the failpoint did not fire\n{}", describe("owner run", &out));
    assert_eq!(w.count(&w.owner, "INBOX"), 2, "nothing was filed before the crash");

    w.owner_run();
    for s in &sites {
        w.wait_inbox(&s.node, 1);
    }
    // Give a duplicate reply time to show up, then check there is none.
    std::thread::sleep(Duration::from_millis(1500));
    for s in &sites {
        assert_eq!(w.count(&s.node, "INBOX"), 1, "{} got more than one reply", s.node.user);
    }
    assert_eq!(w.count(&w.owner, "INBOX"), 0);
    assert_eq!(w.count(&w.owner, PROCESSED), 2);
    for s in &sites {
        s.run(false);
        assert_same_tree(&w.source, &s.data);
        s.node.assert_outbox_empty();
    }
    w.owner.assert_outbox_empty();
}

/// Issue 13 over real mail: an owner with three products besides its open default channel and four groups
/// serves six recipients through Postfix and Dovecot; each ends with exactly the trees it is entitled to,
/// the rest answered "not-entitled" or "expired", a pinned one kept at its generation.
#[test]
fn channels_over_real_mail_each_site_gets_exactly_its_entitled_trees() {
    let m = mailserver::shared();
    let w = MailWorld::new(m, SUBMISSION_STARTTLS, IMAPS);
    put(&w.source, "README", b"for every customer\n", 0o644);
    w.publish();
    let cfg = w.owner.config.clone();
    let owner = |args: &[&str]| {
        let words = if matches!(args[0], "channel" | "group") { 2 } else { 1 };
        let mut all = vec!["owner"];
        all.extend_from_slice(&args[..words]);
        all.extend_from_slice(&["--config", &cfg]);
        all.extend_from_slice(&args[words..]);
        ok(&all)
    };
    let src = |c: &str| w.tmp.path().join(format!("src-{c}"));
    for c in ["sigdb", "engine", "rules"] {
        put(&src(c), &format!("{c}.dat"), format!("{c} 1\n").as_bytes(), 0o644);
        owner(&["channel", "add", "--name", c, "--source", src(c).to_str().unwrap()]);
        ok(&["owner", "publish", "--config", &cfg, "--channel", c]);
    }
    put(&src("engine"), "engine.dat", b"engine 2\n", 0o644);
    ok(&["owner", "publish", "--config", &cfg, "--channel", "engine"]);
    let plan: [(&str, &[&str]); 6] = [
        ("basic1", &["sigdb", "engine"]),
        ("basic2", &["sigdb"]),
        ("pro1", &["sigdb", "engine", "rules"]),
        ("pro2", &["sigdb", "engine", "rules"]),
        ("eval1", &["sigdb"]),
        ("legacy1", &["engine"]),
    ];
    let mut sites = Vec::new();
    for (name, subs) in plan {
        let s = w.site(name, SUBMISSION_STARTTLS, IMAPS);
        for c in subs {
            let tree = w.tmp.path().join(format!("{name}-{c}"));
            ok(&[
                "recipient",
                "subscribe",
                "--config",
                &s.node.config,
                "--channel",
                c,
                "--data",
                tree.to_str().unwrap(),
            ]);
        }
        sites.push((name, s, subs));
    }
    owner(&["group", "add", "--name", "basic", "--members", "basic1,basic2"]);
    owner(&["group", "add", "--name", "pro", "--members", "pro1,pro2"]);
    owner(&["group", "add", "--name", "eval", "--members", "eval1"]);
    owner(&["group", "add", "--name", "legacy", "--members", "legacy1"]);
    owner(&["grant", "--group", "basic", "--channel", "sigdb"]);
    for c in ["sigdb", "engine", "rules"] {
        owner(&["grant", "--group", "pro", "--channel", c]);
    }
    owner(&["grant", "--group", "eval", "--channel", "sigdb", "--until", "2020-06-30"]);
    owner(&["grant", "--group", "legacy", "--channel", "engine", "--pin", "1"]);

    // One cycle: every tree asks (the default one too), the owner answers each, the sites apply.
    let trees: usize = sites.iter().map(|(_, _, subs)| 1 + subs.len()).sum();
    for (_, s, _) in &sites {
        s.run(true);
    }
    w.wait_inbox(&w.owner, trees);
    w.owner_run();
    for (_, s, subs) in &sites {
        w.wait_inbox(&s.node, 1 + subs.len());
        s.run(false);
    }
    let entitled = |name: &str, c: &str| match name {
        "basic1" | "basic2" => c == "sigdb",
        "pro1" | "pro2" => true,
        "legacy1" => c == "engine",
        _ => false,
    };
    for (name, s, subs) in &sites {
        assert_same_tree(&w.source, &s.data);
        let st = s.node.status();
        for c in subs.iter() {
            let tree = w.tmp.path().join(format!("{name}-{c}"));
            let sub = st["subscriptions"].as_array().unwrap().iter().find(|t| t["channel"] == *c).unwrap().clone();
            if *name == "legacy1" {
                assert_eq!(fs::read(tree.join("engine.dat")).unwrap(), b"engine 1\n", "pinned at 1");
                assert_eq!(sub["pinned"], 1, "{sub}");
            } else if entitled(name, c) {
                assert_same_tree(&src(c), &tree);
                assert_eq!(sub["standing"], serde_json::Value::Null, "{name} {c}: {sub}");
            } else {
                assert_eq!(count(&tree), 0, "{name} must not get {c}");
                let want = if *name == "eval1" { "expired on 2020-06-30" } else { "not-entitled" };
                assert_eq!(sub["standing"], want, "{name} {c}: {sub}");
            }
        }
    }
    // The receipts reach the owner; its fleet view agrees, channel by channel.
    w.wait_inbox(&w.owner, 1);
    w.owner_run();
    let fleet: serde_json::Value =
        serde_json::from_slice(&run(&["owner", "fleet", "--config", &cfg, "--channel", "sigdb", "--json"]).stdout)
            .unwrap();
    let state =
        |n: &str| fleet["recipients"].as_array().unwrap().iter().find(|r| r["name"] == n).map(|r| r["state"].clone());
    assert_eq!(state("pro1"), Some("current".into()));
    assert_eq!(state("eval1"), Some("expired".into()));
}

/// The signed broadcast over real mail: one submission with many `RCPT TO` through Postfix, a ticket
/// each, and every recipient applies the update it was sent once.
#[test]
fn a_broadcast_reaches_three_recipients_through_one_submission() {
    let m = mailserver::shared();
    let w = MailWorld::new(m, SUBMISSION_STARTTLS, IMAPS);
    let cfg = fs::read_to_string(&w.owner.config).unwrap();
    fs::write(&w.owner.config, cfg.replacen("signing = \"hmac\"", "signing = \"hmac+ed25519\"", 1)).unwrap();
    varied_tree(&w.source);
    w.publish();
    let sites: Vec<MailSite> = ["b1", "b2", "b3"].iter().map(|n| w.site(n, SUBMISSION_STARTTLS, IMAPS)).collect();
    for s in &sites {
        w.sync(s);
    }
    change_tree(&w.source);
    put(&w.source, "big.bin", &noise(300_000, 7), 0o644);
    w.publish();
    for s in &sites {
        s.run(true);
    }
    w.wait_inbox(&w.owner, sites.len());
    let log = w.owner_run();
    assert!(log.contains("broadcast"), "{log}");
    for s in &sites {
        // The ticket and the broadcast's part(s).
        w.wait_inbox(&s.node, 2);
        s.run(false);
        assert_same_tree(&w.source, &s.data);
        assert_eq!(s.node.status()["generation"], 2);
        s.node.assert_outbox_empty();
    }
    w.owner.assert_outbox_empty();
    // Each recipient's mailbox got the broadcast's one copy: two messages for this update, both filed.
    for s in &sites {
        assert_eq!(w.count(&s.node, "INBOX"), 0);
        assert_eq!(w.count(&s.node, PROCESSED), 1 + 2, "generation 1's reply, then the ticket and the broadcast");
    }
}
