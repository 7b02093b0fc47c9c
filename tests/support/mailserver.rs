//! A real Postfix + Dovecot on 127.0.0.1 for live mail tests, driven by `tests/mailserver/*.sh`.
//!
//! - [`shared`]: one instance for every test and test process (`/tmp/mailtest-shared`, port offset 0),
//!   started on first use by `start.sh` (idempotent, serialised with flock) and never stopped by a test.
//!   Tests isolate themselves with [`MailServer::fresh_user`] mailboxes, never by restarting anything.
//! - [`private`]: an own instance (own dir and port offset) for tests that stop daemons or need other
//!   settings; stopped and removed on drop.
//!
//! A live test never passes silently: without root or the packages this panics and names
//! `scripts/install-test-deps.sh`. CI stops the shared instance at the end with
//! `MAILTEST_DIR=/tmp/mailtest-shared tests/mailserver/stop.sh`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Directory of the shared instance.
pub const SHARED_DIR: &str = "/tmp/mailtest-shared";

/// A running mail system and the `KEY=VALUE` settings `start.sh` printed.
#[derive(Debug)]
pub struct MailServer {
    /// Its `MAILTEST_DIR`.
    pub dir: String,
    /// `MAILTEST_*` values (ports, CA path, users, limits).
    pub env: HashMap<String, String>,
    remove_on_drop: bool,
}

fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mailserver")
}

/// Panics with install instructions unless this process can run the mail system.
fn require_prerequisites() {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    assert!(root, "live mail tests must run as root (Postfix's master starts as root and drops privileges)");
    let missing: Vec<&str> =
        ["/usr/sbin/postfix", "/usr/sbin/dovecot", "/usr/lib/dovecot/imap", "/usr/lib/dovecot/lmtp"]
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
    assert!(
        missing.is_empty(),
        "live mail tests need Postfix and Dovecot, missing {missing:?}: run `scripts/install-test-deps.sh` as root \
         (installs postfix dovecot-imapd dovecot-lmtpd without starting system daemons)"
    );
}

fn start(dir: &str, offset: u16, extra: &[(&str, &str)]) -> MailServer {
    require_prerequisites();
    // `.output()` is safe: start.sh detaches the daemons from our pipes and from its lock fd.
    let out = Command::new(scripts().join("start.sh"))
        .env("MAILTEST_DIR", dir)
        .env("MAILTEST_PORT_OFFSET", offset.to_string())
        .env("MAILTEST_QUIET", "1")
        .envs(extra.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("failed to run tests/mailserver/start.sh: {e}"));
    assert!(
        out.status.success(),
        "tests/mailserver/start.sh failed for {dir} (offset {offset}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect();
    MailServer { dir: dir.to_string(), env, remove_on_drop: false }
}

/// The instance shared by all tests of all test processes; never stop it from a test.
pub fn shared() -> &'static MailServer {
    static SHARED: OnceLock<MailServer> = OnceLock::new();
    SHARED.get_or_init(|| start(SHARED_DIR, 0, &[]))
}

/// An own instance in `/tmp/mailtest-{name}` with port `offset` (unique per test, 1..=59), started
/// fresh (`MAILTEST_RESET=1`) with the `extra` settings (for example `MAILTEST_SIZE_LIMIT`).
/// Stopped and removed on drop.
pub fn private(name: &str, offset: u16, extra: &[(&str, &str)]) -> MailServer {
    assert!((1..=59).contains(&offset), "private mail server offsets are 1..=59 (0 is the shared one)");
    let mut settings = vec![("MAILTEST_RESET", "1")];
    settings.extend_from_slice(extra);
    let mut s = start(&format!("/tmp/mailtest-{name}"), offset, &settings);
    s.remove_on_drop = true;
    s
}

impl MailServer {
    /// A `MAILTEST_*` value, panicking with the available keys if it is missing.
    pub fn var(&self, key: &str) -> &str {
        self.env.get(key).map(String::as_str).unwrap_or_else(|| panic!("start.sh printed no {key}: {:?}", self.env))
    }

    /// A port by its key, e.g. `MAILTEST_SUBMISSION_PORT`, `MAILTEST_IMAPS_PORT`.
    pub fn port(&self, key: &str) -> u16 {
        self.var(key).parse().unwrap_or_else(|e| panic!("{key} is not a port: {e}"))
    }

    /// Host to connect to (127.0.0.1; nothing listens on IPv6).
    pub fn host(&self) -> &str {
        self.var("MAILTEST_HOST")
    }

    /// Path of the test CA certificate (PEM) that signed the servers' certificate.
    pub fn ca_file(&self) -> PathBuf {
        PathBuf::from(self.var("MAILTEST_CA_CERT"))
    }

    /// The mail domain (example.test).
    pub fn domain(&self) -> &str {
        self.var("MAILTEST_DOMAIN")
    }

    /// A never-used mailbox (`t-{tag}-...@domain`, catch-all) and its password.
    pub fn fresh_user(&self, tag: &str) -> (String, String) {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let user = format!("t-{tag}-{}-{n}-{nanos}@{}", std::process::id(), self.domain());
        (user, self.var("MAILTEST_CATCHALL_PASSWORD").to_string())
    }

    /// Runs `tests/mailserver/ctl.sh` on this instance: `stop a|b|dovecot`, `start`, `status`,
    /// `flush a|b`, `queue a|b`, `mailq a|b`, `wait-empty a|b SECS`, `env`. Returns stdout.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(scripts().join("ctl.sh"))
            .args(args)
            .env("MAILTEST_DIR", &self.dir)
            .env("MAILTEST_QUIET", "1")
            .output()
            .unwrap_or_else(|e| panic!("failed to run ctl.sh {args:?}: {e}"));
        assert!(out.status.success(), "ctl.sh {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `doveadm` against this instance's Dovecot and returns stdout; an independent view of
    /// the mailboxes, not going through the code under test.
    pub fn doveadm(&self, args: &[&str]) -> String {
        let conf = format!("{}/dovecot/dovecot.conf", self.dir);
        let out = Command::new("doveadm")
            .arg("-c")
            .arg(&conf)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("failed to run doveadm {args:?}: {e}"));
        assert!(out.status.success(), "doveadm {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Number of messages in `folder` of `user` (the folder name in the server's own syntax).
    pub fn count(&self, user: &str, folder: &str) -> usize {
        let out = self.doveadm(&["-f", "flow", "mailbox", "status", "-u", user, "messages", folder]);
        out.split_whitespace()
            .find_map(|w| w.strip_prefix("messages="))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected doveadm output for {user} {folder}: {out:?}"))
    }

    /// Folder names of `user`, as the server lists them.
    pub fn folders(&self, user: &str) -> Vec<String> {
        self.doveadm(&["mailbox", "list", "-u", user]).lines().map(str::to_string).collect()
    }

    /// Flags of every message in `folder` of `user`, one string per message.
    pub fn flags(&self, user: &str, folder: &str) -> Vec<String> {
        self.doveadm(&["-f", "flow", "fetch", "-u", user, "flags", "mailbox", folder, "all"])
            .lines()
            .map(|l| l.trim().trim_start_matches("flags=").to_string())
            .collect()
    }
}

impl Drop for MailServer {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = Command::new(scripts().join("stop.sh"))
                .env("MAILTEST_DIR", &self.dir)
                .env("MAILTEST_CLEAN", "1")
                .env("MAILTEST_QUIET", "1")
                .output();
        }
    }
}
