//! Live tests of the `mail` transport (the library API, no binary) against a real Postfix + Dovecot on 127.0.0.1
//! (`tests/mailserver/`, started by `tests/support/mailserver.rs`).
//!
//! Every test takes fresh mailboxes on the shared server, or its own private server when it needs
//! other settings or stops daemons. Server state is checked with `doveadm`, independently of the
//! code under test.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::mailserver::{self, MailServer};
use mailferry::transport::mail::imap::{ImapMailbox, Wake};
use mailferry::transport::mail::smtp::SmtpSender;
use mailferry::transport::mail::{MailConfig, MailTransport};
use mailferry::transport::{Disposition, Incoming, Transport, TransportErrorKind};

/// How the test connects: which security mode and which port key of the harness.
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

/// How the password reaches the transport.
enum Secret<'a> {
    File(&'a Path),
    Command(String),
}

impl Secret<'_> {
    fn toml(&self) -> String {
        match self {
            Secret::File(p) => format!("password-file = \"{}\"", p.display()),
            Secret::Command(c) => format!("password-command = \"{c}\""),
        }
    }
}

/// A `[transport]`-style configuration parsed from TOML, so the serde path is exercised as well.
fn config(m: &MailServer, user: &str, secret: &Secret<'_>, smtp: Conn, imap: Conn, ca: bool) -> MailConfig {
    let ca_line = if ca { format!("ca-file = \"{}\"", m.ca_file().display()) } else { String::new() };
    let text = format!(
        r#"
[smtp]
host = "{host}"
port = {smtp_port}
security = "{smtp_sec}"
username = "{user}"
{secret}
timeout = "10s"
{ca_line}

[imap]
host = "{host}"
port = {imap_port}
security = "{imap_sec}"
username = "{user}"
{secret}
timeout = "10s"
poll-interval = "1s"
{ca_line}
"#,
        host = m.host(),
        smtp_port = m.port(smtp.port_key),
        smtp_sec = smtp.security,
        imap_port = m.port(imap.port_key),
        imap_sec = imap.security,
        secret = secret.toml(),
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("test config does not parse: {e}\n{text}"))
}

/// A password file for `password` in a temp dir that lives as long as the returned guard.
fn password_file(password: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("password");
    std::fs::write(&path, format!("{password}\n")).expect("write password file");
    (dir, path)
}

/// A minimal RFC 5322 message; `mailferry` adds the `X-Mailferry` header that marks our messages.
fn message(from: &str, to: &str, marker: &str, mailferry: bool, body_len: usize) -> Vec<u8> {
    let header = if mailferry { "X-Mailferry: 1\r\n" } else { "" };
    let mut raw = format!(
        "From: {from}\r\nTo: {to}\r\nSubject: test {marker}\r\nMessage-ID: <{marker}@example.test>\r\n\
         Date: Sun, 22 Nov 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\n{header}\
         Content-Type: text/plain; charset=us-ascii\r\n\r\nmarker {marker}\r\n\
         X-Mailferry: this line is body text, not a header\r\n"
    )
    .into_bytes();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    while raw.len() < body_len {
        raw.extend_from_slice(line);
    }
    raw
}

/// Fetches until at least `n` messages are there (delivery takes a few ms after SMTP returns).
async fn fetch_at_least(t: &mut impl Transport, n: usize) -> Vec<Incoming> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = t.fetch().await.expect("fetch");
        if found.len() >= n || Instant::now() > deadline {
            assert!(found.len() >= n, "expected {n} messages, found {} after 15 s", found.len());
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `user`'s `folder` holds `n` messages, checked with doveadm.
async fn wait_count(m: &MailServer, user: &str, folder: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while m.count(user, folder) != n {
        assert!(Instant::now() < deadline, "{folder} of {user} never held {n} messages");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn starttls_submission_then_imaps_fetch_and_settle_processed() {
    let m = mailserver::shared();
    let (user, pw) = m.fresh_user("proc");
    let (_dir, pw_file) = password_file(&pw);
    let mut t = MailTransport::new(&config(m, &user, &Secret::File(&pw_file), SUBMISSION_STARTTLS, IMAPS, true))
        .expect("valid config");

    let raw = message(&user, &user, "proc-1", true, 0);
    t.send(&user, &user, &raw).await.expect("send over STARTTLS submission");
    let found = fetch_at_least(&mut t, 1).await;
    assert_eq!(found.len(), 1);
    let msg = &found[0];
    assert!(contains(&msg.raw, "marker proc-1"), "fetched the wrong message");
    assert!(contains(&msg.raw, "X-Mailferry: 1"));
    let (validity, uid) = msg.id.split_once(':').expect("id is uidvalidity:uid");
    assert!(validity.parse::<u32>().unwrap() > 0 && uid.parse::<u32>().unwrap() > 0, "{}", msg.id);

    // BODY.PEEK[]: fetching must not mark the message as read.
    let flags = m.flags(&user, "INBOX");
    assert_eq!(flags.len(), 1);
    assert!(!flags[0].contains("\\Seen"), "fetch set \\Seen: {flags:?}");

    t.settle(&msg.id, Disposition::Processed).await.expect("settle");
    assert_eq!(m.count(&user, "INBOX"), 0, "message still in INBOX after settle");
    assert!(m.folders(&user).iter().any(|f| f == "mailferry.processed"), "folder not created: {:?}", m.folders(&user));
    assert_eq!(m.count(&user, "mailferry.processed"), 1);
    assert!(t.fetch().await.expect("fetch after settle").is_empty(), "settled message fetched again");

    // A second message reuses the folder that now exists.
    t.send(&user, &user, &message(&user, &user, "proc-2", true, 0)).await.expect("second send");
    let found = fetch_at_least(&mut t, 1).await;
    t.settle(&found[0].id, Disposition::Processed).await.expect("settle into existing folder");
    assert_eq!(m.count(&user, "mailferry.processed"), 2);

    // Someone deletes the folder behind our back: the next settle creates it again.
    m.doveadm(&["mailbox", "delete", "-u", &user, "mailferry.processed"]);
    t.send(&user, &user, &message(&user, &user, "proc-3", true, 0)).await.expect("third send");
    let found = fetch_at_least(&mut t, 1).await;
    t.settle(&found[0].id, Disposition::Processed).await.expect("settle after the folder was deleted");
    assert_eq!(m.count(&user, "mailferry.processed"), 1);
    assert_eq!(m.count(&user, "INBOX"), 0);
}

#[tokio::test]
async fn implicit_tls_submission_then_starttls_imap_and_settle_rejected() {
    let m = mailserver::shared();
    let (user, pw) = m.fresh_user("rej");
    let secret = Secret::Command(format!("printf %s {pw}"));
    let mut t =
        MailTransport::new(&config(m, &user, &secret, SUBMISSIONS_TLS, IMAP_STARTTLS, true)).expect("valid config");

    t.send(&user, &user, &message(&user, &user, "rej-1", true, 0)).await.expect("send over implicit TLS");
    let found = fetch_at_least(&mut t, 1).await;
    assert!(contains(&found[0].raw, "marker rej-1"));
    t.settle(&found[0].id, Disposition::Rejected).await.expect("settle rejected");
    assert_eq!(m.count(&user, "INBOX"), 0);
    assert_eq!(m.count(&user, "mailferry.rejected"), 1);
    assert!(!m.folders(&user).iter().any(|f| f == "mailferry.processed"), "processed folder created for a rejection");
}

#[tokio::test]
async fn a_persons_mail_is_never_fetched_nor_moved() {
    let m = mailserver::shared();
    let (user, pw) = m.fresh_user("person");
    let (_dir, pw_file) = password_file(&pw);
    let mut t = MailTransport::new(&config(m, &user, &Secret::File(&pw_file), SUBMISSION_STARTTLS, IMAPS, true))
        .expect("valid config");

    // The person's mail even mentions X-Mailferry in its body; only a header counts.
    t.send(&user, &user, &message(&user, &user, "person-1", false, 0)).await.expect("send personal mail");
    t.send(&user, &user, &message(&user, &user, "ferry-1", true, 0)).await.expect("send mailferry mail");
    wait_count(m, &user, "INBOX", 2).await;

    let found = t.fetch().await.expect("fetch");
    assert_eq!(found.len(), 1, "fetched a message without the X-Mailferry header");
    assert!(contains(&found[0].raw, "marker ferry-1"));
    t.settle(&found[0].id, Disposition::Processed).await.expect("settle");

    assert_eq!(m.count(&user, "INBOX"), 1, "the person's mail was moved");
    assert_eq!(m.count(&user, "mailferry.processed"), 1);
    let flags = m.flags(&user, "INBOX");
    assert!(!flags[0].contains("\\Seen") && !flags[0].contains("\\Deleted"), "person's mail touched: {flags:?}");
    assert!(t.fetch().await.expect("fetch again").is_empty());
}

#[tokio::test]
async fn wrong_password_is_an_auth_error_naming_server_and_user() {
    let m = mailserver::shared();
    let (user, _) = m.fresh_user("badpw");
    let (_dir, pw_file) = password_file("not-the-password");
    let cfg = config(m, &user, &Secret::File(&pw_file), SUBMISSION_STARTTLS, IMAPS, true);
    let mut t = MailTransport::new(&cfg).expect("valid config");

    let started = Instant::now();
    let err = t.send(&user, &user, &message(&user, &user, "badpw", true, 0)).await.expect_err("smtp must refuse");
    assert_eq!(err.kind, TransportErrorKind::Auth, "{err:#}");
    let text = format!("{err:#}");
    let addr = format!("{}:{}", m.host(), m.port("MAILTEST_SUBMISSION_PORT"));
    assert!(text.contains(&addr) && text.contains(&user), "smtp error must name server and user: {text}");

    let err = t.fetch().await.expect_err("imap must refuse");
    assert_eq!(err.kind, TransportErrorKind::Auth, "{err:#}");
    let text = format!("{err:#}");
    let addr = format!("{}:{}", m.host(), m.port("MAILTEST_IMAPS_PORT"));
    assert!(text.contains(&addr) && text.contains(&user), "imap error must name server and user: {text}");
    // The harness disables Dovecot's auth penalty; a slow failure means that fix regressed.
    assert!(started.elapsed() < Duration::from_secs(5), "auth failures took {:?}", started.elapsed());
}

#[tokio::test]
async fn failing_password_command_is_named_in_the_error() {
    let m = mailserver::shared();
    let (user, _) = m.fresh_user("pwcmd");
    let secret = Secret::Command("exit 7".into());
    let mut t = MailTransport::new(&config(m, &user, &secret, SUBMISSION_STARTTLS, IMAPS, true)).expect("valid config");
    let err = t.fetch().await.expect_err("no password");
    let text = format!("{err:#}");
    assert!(text.contains("password-command `exit 7` failed"), "{text}");
    let err = t.send(&user, &user, b"x").await.expect_err("no password");
    assert!(format!("{err:#}").contains("password-command `exit 7` failed"), "{err:#}");
}

#[tokio::test]
async fn server_certificate_is_verified() {
    let m = mailserver::shared();
    let (user, pw) = m.fresh_user("cert");
    let (_dir, pw_file) = password_file(&pw);
    // Without ca-file the test CA is unknown: both protocols must refuse to talk.
    let mut t = MailTransport::new(&config(m, &user, &Secret::File(&pw_file), SUBMISSIONS_TLS, IMAP_STARTTLS, false))
        .expect("valid config");
    let err = t.fetch().await.expect_err("imap with an unknown CA");
    assert_eq!(err.kind, TransportErrorKind::Permanent, "{err:#}");
    assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    let err = t.send(&user, &user, &message(&user, &user, "cert", true, 0)).await.expect_err("smtp with an unknown CA");
    assert_eq!(err.kind, TransportErrorKind::Permanent, "{err:#}");
    assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    assert_eq!(m.count(&user, "INBOX"), 0);
}

#[tokio::test]
async fn stale_uidvalidity_never_settles_a_message() {
    let m = mailserver::shared();
    let (user, pw) = m.fresh_user("uidv");
    let (_dir, pw_file) = password_file(&pw);
    let mut t = MailTransport::new(&config(m, &user, &Secret::File(&pw_file), SUBMISSION_STARTTLS, IMAPS, true))
        .expect("valid config");
    t.send(&user, &user, &message(&user, &user, "uidv", true, 0)).await.expect("send");
    let found = fetch_at_least(&mut t, 1).await;
    let (validity, uid) = found[0].id.split_once(':').expect("id");
    let stale = format!("{}:{uid}", validity.parse::<u32>().expect("validity") ^ 1);
    let err = t.settle(&stale, Disposition::Processed).await.expect_err("stale id");
    assert_eq!(err.kind, TransportErrorKind::Permanent);
    assert!(format!("{err:#}").contains("UIDVALIDITY"), "{err:#}");
    assert_eq!(m.count(&user, "INBOX"), 1, "a stale id moved a message");
}

#[tokio::test]
async fn message_over_the_size_limit_is_refused_as_too_large() {
    let m = mailserver::private("size", 33, &[("MAILTEST_SIZE_LIMIT", "100000"), ("MAILTEST_RELAY", "0")]);
    let (user, pw) = m.fresh_user("size");
    let (_dir, pw_file) = password_file(&pw);
    let cfg = config(&m, &user, &Secret::File(&pw_file), SUBMISSION_STARTTLS, IMAPS, true);

    let mut smtp = SmtpSender::new(&cfg.smtp).expect("valid config");
    let big = message(&user, &user, "big", true, 150_000);
    let err = smtp.send(&user, &user, &big).await.expect_err("over the limit");
    // The server's 552 is told apart from other permanent refusals: a smaller message would pass.
    assert_eq!(err.kind, TransportErrorKind::TooLarge, "{err:#}");
    let text = format!("{err:#}");
    assert!(text.contains("552"), "the server's reply must be included: {text}");

    // Once learned from EHLO, the limit refuses oversize messages before uploading them.
    assert_eq!(smtp.size_limit().await.expect("EHLO SIZE"), Some(100_000));
    let err = smtp.send(&user, &user, &big).await.expect_err("over the known limit");
    assert_eq!(err.kind, TransportErrorKind::TooLarge);
    assert!(format!("{err:#}").contains("exceeds the server's SIZE limit of 100000"), "{err:#}");

    // A message under the limit still goes through the same sender.
    smtp.send(&user, &user, &message(&user, &user, "small", true, 50_000)).await.expect("under the limit");
    wait_count(&m, &user, "INBOX", 1).await;
}

#[tokio::test]
async fn idle_wakes_within_two_seconds_of_delivery() {
    let m = mailserver::shared();
    let (user, pw) = m.fresh_user("idle");
    let (_dir, pw_file) = password_file(&pw);
    let cfg = config(m, &user, &Secret::File(&pw_file), SUBMISSION_STARTTLS, IMAPS, true);
    let mut inbox = ImapMailbox::new(&cfg.imap).expect("valid config");
    let mut smtp = SmtpSender::new(&cfg.smtp).expect("valid config");
    assert!(inbox.fetch().await.expect("first fetch connects").is_empty());

    // Nothing arrives: the wait ends at max, not earlier (poll-interval is 1 s, so this also shows
    // IDLE rather than polling is used).
    let started = Instant::now();
    assert_eq!(inbox.wait_for_mail(Duration::from_millis(2500)).await.expect("idle"), Wake::TimedOut);
    assert!(started.elapsed() >= Duration::from_millis(2400), "woke early after {:?}", started.elapsed());

    let raw = message(&user, &user, "idle-1", true, 0);
    let (woke, sent_at) = tokio::join!(inbox.wait_for_mail(Duration::from_secs(30)), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        smtp.send(&user, &user, &raw).await.expect("send");
        Instant::now()
    });
    let woke_at = Instant::now();
    assert_eq!(woke.expect("idle"), Wake::MaybeNewMail);
    let latency = woke_at.saturating_duration_since(sent_at);
    assert!(latency < Duration::from_secs(2), "IDLE woke {latency:?} after delivery");
    let found = inbox.fetch().await.expect("fetch after wake");
    assert_eq!(found.len(), 1);
    assert!(contains(&found[0].raw, "marker idle-1"));
}

#[tokio::test]
async fn relay_chain_delivers_through_mta_a() {
    let m = mailserver::shared();
    let (site, site_pw) = m.fresh_user("site");
    let (owner, owner_pw) = m.fresh_user("owner");
    let (_d1, site_file) = password_file(&site_pw);
    let (_d2, owner_file) = password_file(&owner_pw);
    let mut site_t =
        MailTransport::new(&config(m, &site, &Secret::File(&site_file), RELAY_SUBMISSION_STARTTLS, IMAPS, true))
            .expect("valid config");
    let mut owner_t =
        MailTransport::new(&config(m, &owner, &Secret::File(&owner_file), SUBMISSION_STARTTLS, IMAPS, true))
            .expect("valid config");

    site_t.send(&site, &owner, &message(&site, &owner, "relay-1", true, 0)).await.expect("submit at MTA A");
    let found = fetch_at_least(&mut owner_t, 1).await;
    assert!(contains(&found[0].raw, "marker relay-1"));
    assert!(contains(&found[0].raw, "mx-a.example.test"), "no Received header from MTA A: not relayed");
    assert!(contains(&found[0].raw, "mx-b.example.test"));
}

#[tokio::test]
async fn reconnects_after_the_imap_server_restarts() {
    let m = mailserver::private("reconnect", 32, &[("MAILTEST_RELAY", "0")]);
    let (user, pw) = m.fresh_user("recon");
    let (_dir, pw_file) = password_file(&pw);
    let mut t = MailTransport::new(&config(&m, &user, &Secret::File(&pw_file), SUBMISSION_STARTTLS, IMAPS, true))
        .expect("valid config");
    assert!(t.fetch().await.expect("connect").is_empty());

    // Outage while idling: the wait rides it out with backoff and reports once the server is back.
    let started = Instant::now();
    let (woke, restarted_at) = tokio::join!(t.wait_for_mail(Duration::from_secs(60)), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // ctl blocks this thread for ~1.5 s; the IDLE future sees the dropped connection afterwards.
        m.ctl(&["stop", "dovecot"]);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        m.ctl(&["start"]);
        started.elapsed()
    });
    assert_eq!(woke.expect("reconnected within the wait"), Wake::MaybeNewMail);
    assert!(started.elapsed() >= restarted_at, "returned before the server was back: {:?}", started.elapsed());
    assert!(started.elapsed() < restarted_at + Duration::from_secs(10), "backoff too slow: {:?}", started.elapsed());

    // Outage between calls: fetch reports a transient error, the next fetch reconnects by itself.
    m.ctl(&["stop", "dovecot"]);
    let err = t.fetch().await.expect_err("server down");
    assert_eq!(err.kind, TransportErrorKind::Transient, "{err:#}");
    m.ctl(&["start"]);
    t.send(&user, &user, &message(&user, &user, "recon-1", true, 0)).await.expect("send");
    let found = fetch_at_least(&mut t, 1).await;
    assert!(contains(&found[0].raw, "marker recon-1"));
}

#[tokio::test]
async fn polls_when_idle_is_off() {
    let m = mailserver::shared();
    let (user, pw) = m.fresh_user("poll");
    let (_dir, pw_file) = password_file(&pw);
    let mut cfg = config(m, &user, &Secret::File(&pw_file), SUBMISSION_STARTTLS, IMAPS, true);
    cfg.imap.idle = false;
    let mut inbox = ImapMailbox::new(&cfg.imap).expect("valid config");
    assert!(inbox.fetch().await.expect("connect").is_empty());
    let started = Instant::now();
    // poll-interval is 1 s: the wait returns after one interval even though max is much longer.
    assert_eq!(inbox.wait_for_mail(Duration::from_secs(30)).await.expect("poll"), Wake::MaybeNewMail);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "poll took {waited:?}");
}

#[tokio::test]
async fn without_move_settle_copies_and_expunges_only_that_message() {
    // No MOVE and no IDLE after login; UIDPLUS is there, so UID EXPUNGE removes just our UID.
    let m = mailserver::private(
        "nomove",
        35,
        &[("MAILTEST_RELAY", "0"), ("MAILTEST_IMAP_CAPABILITY", "IMAP4rev1 UIDPLUS")],
    );
    let (user, pw) = m.fresh_user("nomove");
    let (_dir, pw_file) = password_file(&pw);
    let mut t =
        MailTransport::new(&config(&m, &user, &Secret::File(&pw_file), SUBMISSION_STARTTLS, IMAP_STARTTLS, true))
            .expect("valid config");
    t.send(&user, &user, &message(&user, &user, "person", false, 0)).await.expect("send personal mail");
    t.send(&user, &user, &message(&user, &user, "nomove-1", true, 0)).await.expect("send");
    wait_count(&m, &user, "INBOX", 2).await;
    let found = t.fetch().await.expect("fetch");
    assert_eq!(found.len(), 1);
    t.settle(&found[0].id, Disposition::Processed).await.expect("settle without MOVE");
    assert_eq!(m.count(&user, "mailferry.processed"), 1);
    assert_eq!(m.count(&user, "INBOX"), 1, "our message must be expunged, the person's kept");
    let flags = m.flags(&user, "INBOX");
    assert!(!flags[0].contains("\\Deleted"), "the person's mail was flagged: {flags:?}");
    assert!(t.fetch().await.expect("fetch again").is_empty());

    // Without IDLE the wait falls back to polling every poll-interval (1 s) although idle = true.
    let started = Instant::now();
    assert_eq!(t.wait_for_mail(Duration::from_secs(30)).await.expect("poll"), Wake::MaybeNewMail);
    assert!(started.elapsed() < Duration::from_secs(5), "no polling fallback: waited {:?}", started.elapsed());
}

#[tokio::test]
async fn a_relay_bounce_of_a_too_large_message_is_fetched_and_read() {
    // MTA A (where the owner submits) takes 1 MB, MTA B behind it only 200 kB: B refuses, A bounces.
    let m =
        mailserver::private("bounce", 37, &[("MAILTEST_SIZE_LIMIT_A", "1000000"), ("MAILTEST_SIZE_LIMIT_B", "200000")]);
    let (owner, pw) = m.fresh_user("bowner");
    let (site, _) = m.fresh_user("bsite");
    let (_dir, pw_file) = password_file(&pw);
    let mut t =
        MailTransport::new(&config(&m, &owner, &Secret::File(&pw_file), RELAY_SUBMISSION_STARTTLS, IMAPS, true))
            .expect("valid config");
    // One of ours and a person's, both too large for B.
    t.send(&owner, &site, &message(&owner, &site, "part-7", true, 400_000)).await.expect("A accepts it");
    t.send(&owner, &site, &message(&owner, &site, "holiday-photos", false, 400_000)).await.expect("A accepts it");
    wait_count(&m, &owner, "INBOX", 2).await;
    // Only the report about our message is fetched; the person's report stays where it is.
    let found = t.fetch().await.expect("fetch");
    assert_eq!(found.len(), 1, "{} fetched", found.len());
    let report = mailferry::protocol::envelope::bounce(&found[0].raw).expect("a delivery report");
    assert_eq!(report.message_id.as_deref(), Some("part-7@example.test"), "{report:?}");
    assert!(report.too_large(), "Postfix's report must read as too large: {report:?}");
    t.settle(&found[0].id, Disposition::Processed).await.expect("file it");
    assert_eq!(m.count(&owner, "INBOX"), 1, "the person's report is left alone");
}

#[tokio::test]
async fn without_move_and_uidplus_the_filed_copy_is_never_fetched_again() {
    // No MOVE, no UIDPLUS: the original is only flagged \Deleted (a plain EXPUNGE could remove a
    // person's deleted mail too), and the search skips it from then on.
    let m = mailserver::private(
        "nouidplus",
        36,
        &[("MAILTEST_RELAY", "0"), ("MAILTEST_IMAP_CAPABILITY", "IMAP4rev1 IDLE")],
    );
    let (user, pw) = m.fresh_user("nouidplus");
    let (_dir, pw_file) = password_file(&pw);
    let mut t = MailTransport::new(&config(&m, &user, &Secret::File(&pw_file), SUBMISSION_STARTTLS, IMAPS, true))
        .expect("valid config");
    t.send(&user, &user, &message(&user, &user, "nouidplus-1", true, 0)).await.expect("send");
    let found = fetch_at_least(&mut t, 1).await;
    t.settle(&found[0].id, Disposition::Rejected).await.expect("settle without MOVE and UIDPLUS");
    assert_eq!(m.count(&user, "mailferry.rejected"), 1);
    let flags = m.flags(&user, "INBOX");
    assert_eq!(flags.len(), 1);
    assert!(flags[0].contains("\\Deleted"), "original not flagged deleted: {flags:?}");
    assert!(t.fetch().await.expect("fetch again").is_empty(), "a filed message was fetched again");
}

/// `mailferry check` logs in once to each server through `transport::probe`, as `msmtp --serverinfo` does:
/// nothing is sent or moved, a wrong password is an `Auth` failure naming server and user, and the
/// binary's `check` turns each into one line (the command's own test of its offline parts is in `ops`).
#[tokio::test]
async fn probe_logs_in_once_and_names_what_fails() {
    let m = mailserver::shared();
    let (user, pw) = m.fresh_user("probe");
    let (_dir, pw_file) = password_file(&pw);
    let cfg = config(m, &user, &Secret::File(&pw_file), SUBMISSION_STARTTLS, IMAPS, true);
    let infos = mailferry::transport::probe(&cfg).await.expect("valid config");
    assert_eq!(infos.iter().map(|i| i.service).collect::<Vec<_>>(), ["smtp", "imap"]);
    for info in &infos {
        let text = info.result.as_ref().unwrap_or_else(|e| panic!("{} probe failed: {e:#}", info.service));
        assert!(text.starts_with("logged in"), "{}: {text}", info.service);
        assert_eq!(info.user, user);
    }
    assert!(infos[0].result.as_ref().unwrap().contains("SIZE"), "smtp shows its size limit");
    assert_eq!(m.count(&user, "INBOX"), 0, "a probe sends nothing");

    let (_bad_dir, bad_file) = password_file("not-the-password");
    let bad = config(m, &user, &Secret::File(&bad_file), SUBMISSION_STARTTLS, IMAPS, true);
    for info in mailferry::transport::probe(&bad).await.expect("valid config") {
        let err = info.result.expect_err("a wrong password must fail the probe");
        assert_eq!(err.kind, TransportErrorKind::Auth, "{}: {err:#}", info.service);
        assert!(format!("{err:#}").contains(&user), "{err:#}");
    }

    // Through the binary: a recipient config whose mail settings are these, checked online.
    let dir = tempfile::tempdir().unwrap();
    let mail_toml = toml::to_string(&cfg).unwrap();
    let key = dir.path().join("recipient.key");
    mailferry::config::write_secret(&key, &mailferry::crypto::Key::generate().to_hex()).unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::set_permissions(dir.path().join("state"), std::fs::Permissions::from_mode(0o700)).unwrap();
        // `check` wants a password file nobody else can read (the probes above do not look).
        std::fs::set_permissions(&pw_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let node = dir.path().join("recipient.toml");
    std::fs::write(
        &node,
        format!(
            "[recipient]\nname = \"probe\"\naddress = \"{user}\"\nowner-address = \"{user}\"\ndata = \"data\"\n\
             state-dir = \"state\"\nkey-file = \"recipient.key\"\n[transport]\nkind = \"mail\"\n{mail_toml}"
        ),
    )
    .unwrap();
    let out = crate::util::run(&["check", "--config", node.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().any(|l| l.starts_with("ok    smtp:") && l.contains("logged in")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("ok    imap:") && l.contains("logged in")), "{stdout}");
}
