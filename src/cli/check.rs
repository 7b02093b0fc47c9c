//! `mailferry check`: is this node set up so that it can work? The config, the modes of the files that
//! hold secrets, the data tree and where files are staged, and one login to each mail server (through
//! [`mailferry::transport::probe`]; only the transport talks to mail servers). Each finding is one line;
//! each problem says how to fix it. Nothing is changed, created or sent.

use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use mailferry::config::{NodeConfig, OwnerConfig, RecipientConfig, TransportConfig};
use mailferry::transport::TransportErrorKind;
use mailferry::transport::mail::MailConfig;
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::status::SCHEMA_VERSION;
use crate::cli::{ConfigArg, Exit};

/// The arguments of `check` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
#[command(
    after_help = "Exit codes: 0 no problem found; 1 a problem found (each on a line starting with FAIL, with its \
fix); 2 no config file found, or another error.\n\
Examples:\n  mailferry check --config /etc/mailferry/recipient.toml\n  mailferry check --offline --json"
)]
pub struct CheckCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// Do not log in to the mail servers.
    #[arg(long)]
    offline: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// One thing checked.
#[derive(Debug, Serialize)]
struct Finding {
    /// What was checked (`config`, `key-file`, `staging`, `smtp`, ...).
    check: &'static str,
    /// Whether it is fine.
    ok: bool,
    /// What was found.
    detail: String,
    /// How to fix it, for a problem.
    fix: Option<String>,
}

/// Everything `check` found.
#[derive(Debug, Serialize)]
struct Checked {
    schema_version: u32,
    config: PathBuf,
    /// `owner` or `recipient`; `None` when the config cannot be read.
    role: Option<&'static str>,
    findings: Vec<Finding>,
}

impl Render for Checked {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        for f in &self.findings {
            match &f.fix {
                Some(fix) if !f.ok => writeln!(out, "FAIL  {}: {}; fix: {fix}", f.check, f.detail)?,
                _ => writeln!(out, "{}  {}: {}", if f.ok { "ok  " } else { "FAIL" }, f.check, f.detail)?,
            }
        }
        let problems = self.findings.iter().filter(|f| !f.ok).count();
        match problems {
            0 => writeln!(out, "no problem found in `{}`", self.config.display()),
            n => writeln!(out, "{n} problem(s) found in `{}`", self.config.display()),
        }
    }
}

#[derive(Default)]
struct Findings(Vec<Finding>);

impl Findings {
    fn ok(&mut self, check: &'static str, detail: impl Into<String>) {
        self.0.push(Finding { check, ok: true, detail: detail.into(), fix: None });
    }

    fn fail(&mut self, check: &'static str, detail: impl Into<String>, fix: impl Into<String>) {
        self.0.push(Finding { check, ok: false, detail: detail.into(), fix: Some(fix.into()) });
    }
}

impl CheckCommand {
    /// Checks the node.
    ///
    /// # Errors
    /// No config file could be found, or the result could not be written.
    pub async fn execute(self) -> Result<Exit> {
        let path = self.config.locate(None)?;
        let mut f = Findings::default();
        let role = match NodeConfig::load(&path) {
            Err(e) => {
                f.fail("config", one_line(&format!("{e:#}")), "correct the file (see README.md, \"Configuration\")");
                None
            }
            Ok(NodeConfig::Owner(cfg)) => {
                f.ok("config", format!("`{}` is a valid owner config for {}", path.display(), cfg.owner.address));
                owner(&cfg, &mut f);
                transport(&cfg.transport, self.offline, &mut f).await;
                Some("owner")
            }
            Ok(NodeConfig::Recipient(cfg)) => {
                f.ok(
                    "config",
                    format!("`{}` is a valid recipient config for {:?}", path.display(), cfg.recipient.name),
                );
                recipient(&cfg, &mut f);
                transport(&cfg.transport, self.offline, &mut f).await;
                Some("recipient")
            }
        };
        let problems = f.0.iter().any(|x| !x.ok);
        let checked = Checked { schema_version: SCHEMA_VERSION, config: path, role, findings: f.0 };
        Output::new(self.json).print(&checked)?;
        Ok(if problems { Exit::Attention } else { Exit::Success })
    }
}

/// A multi-line message (a TOML error with its source excerpt and caret) as one line: the excerpt's
/// lines (`3 | intervall = "1h"`, `| ^^^^`) are left out, the rest joined.
fn one_line(text: &str) -> String {
    let excerpt = |l: &str| {
        let rest = l.trim_start_matches(|c: char| c.is_ascii_digit()).trim_start();
        rest.starts_with('|')
    };
    let kept: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !excerpt(l)).collect();
    kept.join(" ")
}

fn mode(meta: &std::fs::Metadata) -> u32 {
    meta.permissions().mode() & 0o7777
}

/// The state directory and its database, which holds keys (the owner's recipients' keys, a recipient's
/// previous keys): others must not be able to read the database.
fn state(state_dir: &Path, f: &mut Findings) {
    let dir = match std::fs::metadata(state_dir) {
        Ok(m) if m.is_dir() => m,
        Ok(_) => {
            return f.fail(
                "state-dir",
                format!("`{}` is not a directory", state_dir.display()),
                "set state-dir to a directory",
            );
        }
        Err(e) => {
            return f.fail(
                "state-dir",
                format!("`{}` cannot be read: {e}", state_dir.display()),
                format!("create it: `mkdir -m 700 {}`, or run `mailferry ... init`", state_dir.display()),
            );
        }
    };
    let db = state_dir.join("state.db");
    match std::fs::metadata(&db) {
        Ok(m) if mode(&m) & 0o077 != 0 && mode(&dir) & 0o077 != 0 => f.fail(
            "state-dir",
            format!(
                "`{}` holds keys and others can read it (file mode {:o}, directory mode {:o})",
                db.display(),
                mode(&m),
                mode(&dir)
            ),
            format!("chmod 700 {}", state_dir.display()),
        ),
        Ok(_) => f.ok("state-dir", format!("`{}` (mode {:o})", state_dir.display(), mode(&dir))),
        Err(_) => f.ok("state-dir", format!("`{}` (no database yet: the first run creates it)", state_dir.display())),
    }
}

/// A file holding a secret: others may not read it (group access is left to the operator, for a
/// `root:mailferry 0640` password file).
fn secret_file(check: &'static str, what: &str, path: &Path, private: u32, f: &mut Findings) {
    match std::fs::metadata(path) {
        Err(e) => f.fail(
            check,
            format!("{what} `{}` cannot be read: {e}", path.display()),
            "create it (mode 600) or correct the path in the config",
        ),
        Ok(m) if !m.is_file() => {
            f.fail(check, format!("{what} `{}` is not a file", path.display()), "point the config at the file")
        }
        Ok(m) if mode(&m) & private != 0 => f.fail(
            check,
            format!("{what} `{}` is readable by others (mode {:o})", path.display(), mode(&m)),
            format!("chmod 600 {}", path.display()),
        ),
        Ok(m) => f.ok(check, format!("{what} `{}` (mode {:o})", path.display(), mode(&m))),
    }
}

fn owner(cfg: &OwnerConfig, f: &mut Findings) {
    state(&cfg.state_dir, f);
    let source = &cfg.owner.source;
    match std::fs::metadata(source) {
        Ok(m) if m.is_dir() => f.ok("source", format!("`{}` is a directory", source.display())),
        _ => f.fail(
            "source",
            format!("source tree `{}` is not a directory", source.display()),
            format!("create it (`mkdir -p {}`) or correct [owner] source", source.display()),
        ),
    }
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if canon(&cfg.state_dir).starts_with(canon(source)) {
        f.fail(
            "source",
            format!("state directory `{}` is inside the source tree", cfg.state_dir.display()),
            "move state-dir out of the source tree, or `publish` snapshots mailferry's own state",
        );
    }
}

fn recipient(cfg: &RecipientConfig, f: &mut Findings) {
    secret_file("key-file", "key file", &cfg.recipient.key_file, 0o077, f);
    if f.0.last().is_some_and(|x| x.ok)
        && let Err(e) = mailferry::config::read_key_file(&cfg.recipient.key_file)
    {
        f.fail(
            "key-file",
            format!("{e:#}"),
            "take up a fresh enrollment with `mailferry recipient enroll --enrollment FILE`",
        );
    }
    state(&cfg.state_dir, f);
    let data = &cfg.recipient.data;
    let meta = match std::fs::symlink_metadata(data) {
        Ok(m) if m.is_dir() => m,
        Ok(_) => {
            return f.fail(
                "data",
                format!("data tree `{}` is not a directory", data.display()),
                "point [recipient] data at a directory",
            );
        }
        Err(e) => {
            return f.fail(
                "data",
                format!("data tree `{}` cannot be read: {e}", data.display()),
                format!("create it: `mkdir -p {}`", data.display()),
            );
        }
    };
    f.ok("data", format!("`{}` is a directory", data.display()));
    staging(cfg, data, &meta, f);
}

/// Where the recipient stages files (as `Recipient::staging_root` chooses, without creating anything),
/// and whether a rename from there into the data tree can work: the same file system and the same mount.
fn staging(cfg: &RecipientConfig, data: &Path, data_meta: &std::fs::Metadata, f: &mut Findings) {
    let dev = |p: &Path| std::fs::metadata(nearest_existing(p)).map(|m| m.dev()).ok();
    let staging = match &cfg.recipient.staging_dir {
        Some(dir) => dir.clone(),
        None => {
            let in_state = cfg.state_dir.join("staging");
            if dev(&in_state) == Some(data_meta.dev()) {
                in_state
            } else {
                let name = data.file_name().map_or_else(|| "data".into(), |n| n.to_string_lossy().into_owned());
                data.parent().unwrap_or(Path::new("/")).join(format!(".{name}.mailferry-staging"))
            }
        }
    };
    let canon = |p: &Path| std::fs::canonicalize(nearest_existing(p)).unwrap_or_else(|_| p.to_path_buf());
    if canon(&staging).starts_with(canon(data)) {
        return f.fail(
            "staging",
            format!("staging directory `{}` is inside the data tree `{}`", staging.display(), data.display()),
            "set staging-dir outside the data tree, on its file system",
        );
    }
    if dev(&staging) != Some(data_meta.dev()) {
        return f.fail(
            "staging",
            format!(
                "staging directory `{}` is on another file system than the data tree `{}`; files cannot be renamed \
                 into place",
                staging.display(),
                data.display()
            ),
            "set [recipient] staging-dir to a directory on the data tree's file system, outside the tree",
        );
    }
    match (mount_id(&staging), mount_id(data)) {
        (Some(a), Some(b)) if a != b => f.fail(
            "staging",
            format!(
                "staging directory `{}` and data tree `{}` are on one file system but different mounts (a bind mount, \
                 as systemd's ReadWritePaths= makes one per path): renames between them fail with EXDEV",
                staging.display(),
                data.display()
            ),
            "make them one mount (in a unit: list their common parent in ReadWritePaths=), or set staging-dir inside \
             the data tree's mount",
        ),
        _ => f.ok("staging", format!("`{}` is on the data tree's file system and mount", staging.display())),
    }
}

/// `p`, or its nearest ancestor that exists (a staging directory is created at the first apply).
fn nearest_existing(p: &Path) -> &Path {
    let mut p = p;
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    p
}

/// The id of the mount `p` is on, from `/proc/self/mountinfo` (the longest mount point that contains it;
/// the last one listed when mounts are stacked). `None` where that file cannot be read.
fn mount_id(p: &Path) -> Option<u64> {
    let p = std::fs::canonicalize(nearest_existing(p)).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, u64)> = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(id), Some(point)) = (fields.first().and_then(|i| i.parse::<u64>().ok()), fields.get(4)) else {
            continue;
        };
        let point = PathBuf::from(unescape_mountinfo(point));
        if p.starts_with(&point) {
            let len = point.as_os_str().len();
            if best.is_none_or(|(l, _)| len >= l) {
                best = Some((len, id));
            }
        }
    }
    best.map(|(_, id)| id)
}

/// Mount points in mountinfo escape space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn transport(t: &TransportConfig, offline: bool, f: &mut Findings) {
    match t {
        TransportConfig::Maildir { root } => {
            if root.is_dir() {
                f.ok("transport", format!("Maildir spool `{}`", root.display()));
            } else if root.parent().is_some_and(Path::is_dir) {
                f.ok("transport", format!("Maildir spool `{}` (created at the first delivery)", root.display()));
            } else {
                f.fail(
                    "transport",
                    format!("Maildir spool `{}` and its parent do not exist", root.display()),
                    format!("create it: `mkdir -p {}`, or correct [transport] root", root.display()),
                );
            }
        }
        TransportConfig::Mail(mail) => mail_transport(mail, offline, f).await,
    }
}

async fn mail_transport(mail: &MailConfig, offline: bool, f: &mut Findings) {
    for (check, pw, ca) in
        [("smtp", &mail.smtp.password_file, &mail.smtp.ca_file), ("imap", &mail.imap.password_file, &mail.imap.ca_file)]
    {
        if let Some(pw) = pw {
            secret_file(check, "password-file", pw, 0o007, f);
        }
        if let Some(ca) = ca
            && !ca.is_file()
        {
            f.fail(check, format!("ca-file `{}` does not exist", ca.display()), "correct ca-file or remove it");
        }
    }
    if offline {
        return;
    }
    let infos = match mailferry::transport::probe(mail).await {
        Ok(infos) => infos,
        Err(e) => return f.fail("transport", e.to_string(), "correct the [smtp] and [imap] tables"),
    };
    for info in infos {
        let check = info.service;
        match info.result {
            Ok(text) => f.ok(check, format!("{} as {}: {text}", info.server, info.user)),
            Err(e) => {
                let fix = match e.kind {
                    TransportErrorKind::Auth => {
                        "check username and the password source (password-file, \
                                                 password-command or token-command)"
                    }
                    TransportErrorKind::Transient => {
                        "check host and port, that the server runs, and that the network lets the connection through"
                    }
                    _ => {
                        "check security and port (starttls on 587/143, tls on 465/993) and the server certificate \
                          (ca-file)"
                    }
                };
                f.fail(check, format!("{e:#}"), fix);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_errors_become_one_line() {
        let e = "config file `r.toml` is invalid: TOML parse error at line 3, column 1\n  |\n3 | intervall = \"1h\"\n  | ^^^^^^^^^\nunknown field `intervall`, expected one of `name`\n";
        assert_eq!(
            one_line(e),
            "config file `r.toml` is invalid: TOML parse error at line 3, column 1 unknown field `intervall`, expected one of `name`"
        );
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape_mountinfo("/mnt/with\\040space"), "/mnt/with space");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/a\\134b"), "/a\\b");
    }

    #[test]
    fn a_path_is_on_the_mount_of_its_longest_mount_point() {
        // `/` is always a mount; `/proc` is another one wherever mountinfo exists.
        let (root, proc) = (mount_id(Path::new("/")), mount_id(Path::new("/proc/self")));
        assert!(root.is_some() && proc.is_some() && root != proc, "{root:?} {proc:?}");
    }
}
