//! Test harness: a temporary world with a spool, an owner and recipients, driven through the real binary.
//!
//! Failures panic with the command, its exit status, stdout and stderr. Trees are compared by an
//! independent walk (not by mailferry's own scanner), so a scanner bug cannot hide a sync bug.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const OWNER: &str = "owner@vendor.test";

/// Path of the binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mailferry"))
}

/// Runs mailferry with `args`; returns the output whatever the exit status.
pub fn run(args: &[&str]) -> Output {
    run_env(args, &[])
}

/// Runs mailferry with `args` and extra environment variables.
pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .env_remove("MAILFERRY_FAILPOINT")
        .env("MAILFERRY_LOG", "mailferry=info")
        .output()
        .expect("failed to start the mailferry binary")
}

fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "command: mailferry {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs mailferry and panics unless it succeeds; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "expected success\n{}", describe(args, &out));
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Runs mailferry and panics unless it fails with exit code `code`; returns stderr.
pub fn fails(args: &[&str], code: i32) -> String {
    let out = run(args);
    assert_eq!(out.status.code(), Some(code), "expected exit {code}\n{}", describe(args, &out));
    String::from_utf8(out.stderr).expect("stderr is UTF-8")
}

/// Writes `data` at `root/rel` with `mode`, creating parents.
pub fn put(root: &Path, rel: &str, data: &[u8], mode: u32) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, data).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

/// What a tree holds, walked independently: path -> None for a directory, or (bytes, executable). A
/// symbolic link is listed as `PATH -> TARGET` (None), anything else as `PATH (special)`.
pub fn snapshot(root: &Path) -> BTreeMap<String, Option<(Vec<u8>, bool)>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Option<(Vec<u8>, bool)>>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_owned();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                out.insert(rel, None);
                walk(root, &p, out);
            } else if m.is_file() {
                out.insert(rel, Some((fs::read(&p).unwrap(), m.permissions().mode() & 0o100 != 0)));
            } else if m.file_type().is_symlink() {
                out.insert(format!("{rel} -> {}", fs::read_link(&p).unwrap().display()), None);
            } else {
                out.insert(format!("{rel} (special)"), None);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Panics with the first difference unless the two trees hold the same paths, types, bytes and exec bits.
pub fn assert_same_tree(want: &Path, got: &Path) {
    let (a, b) = (snapshot(want), snapshot(got));
    for (k, v) in &a {
        match b.get(k) {
            None => panic!("`{k}` is missing from `{}`", got.display()),
            Some(w) if w != v => panic!("`{k}` differs between `{}` and `{}`", want.display(), got.display()),
            _ => {}
        }
    }
    if let Some(k) = b.keys().find(|k| !a.contains_key(*k)) {
        panic!("`{k}` in `{}` should not be there", got.display());
    }
}

/// Copies a tree (files, directories, exec bits, symbolic links).
pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for (rel, e) in snapshot(from) {
        match e {
            None if rel.ends_with(" (special)") => panic!("cannot copy `{rel}`"),
            None => match rel.split_once(" -> ") {
                Some((link, target)) => std::os::unix::fs::symlink(target, to.join(link)).unwrap(),
                None => fs::create_dir_all(to.join(&rel)).unwrap(),
            },
            Some((data, exec)) => put(to, &rel, &data, if exec { 0o755 } else { 0o644 }),
        }
    }
}

/// A recipient in the world.
pub struct Site {
    pub address: String,
    pub dir: PathBuf,
    pub data: PathBuf,
    pub config: String,
}

impl Site {
    /// Its Maildir in the spool.
    pub fn maildir(&self, w: &World) -> PathBuf {
        w.spool.join(&self.address)
    }

    /// `recipient run --once`, with or without a request.
    pub fn run(&self, request: bool) -> String {
        let mut args = vec!["recipient", "run", "--config", &self.config, "--once"];
        if !request {
            args.push("--no-request");
        }
        let out = run(&args);
        assert!(out.status.success(), "{}", describe(&args, &out));
        String::from_utf8(out.stderr).unwrap()
    }

    /// The key, from the recipient's key file.
    pub fn key(&self) -> mailferry::crypto::Key {
        mailferry::config::read_key_file(&self.dir.join("recipient.key")).unwrap()
    }

    /// `status --json` (exit 0, or 1 when the node needs attention).
    pub fn status(&self) -> serde_json::Value {
        let args = ["status", "--config", &self.config, "--json"];
        let out = run(&args);
        assert!(matches!(out.status.code(), Some(0 | 1)), "{}", describe(&args, &out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The refusal reasons recorded, oldest first.
    pub fn rejections(&self) -> Vec<String> {
        rejections(&self.config)
    }
}

/// Reason codes of `mailferry log --rejected --json`.
pub fn rejections(config: &str) -> Vec<String> {
    ok(&["log", "--config", config, "--rejected", "--json"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["reason"].as_str().unwrap().to_owned())
        .collect()
}

/// A temporary world: a spool, an owner with a source tree, and recipients.
pub struct World {
    pub tmp: tempfile::TempDir,
    pub spool: PathBuf,
    pub source: PathBuf,
    pub owner_config: String,
}

impl World {
    pub fn new() -> World {
        let tmp = tempfile::Builder::new().prefix("mailferry-test-").tempdir().unwrap();
        let spool = tmp.path().join("spool");
        let source = tmp.path().join("source");
        fs::create_dir_all(&source).unwrap();
        let owner_dir = tmp.path().join("owner");
        ok(&[
            "owner",
            "init",
            "--dir",
            owner_dir.to_str().unwrap(),
            "--source",
            source.to_str().unwrap(),
            "--address",
            OWNER,
            "--transport-root",
            spool.to_str().unwrap(),
        ]);
        let owner_config = owner_dir.join("owner.toml").to_str().unwrap().to_owned();
        World { tmp, spool, source, owner_config }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Enrolls and initializes a recipient called `name`.
    pub fn site(&self, name: &str) -> Site {
        let address = format!("{name}@customer.test");
        let enrollment = self.path(&format!("{name}.enrollment"));
        let e = enrollment.to_str().unwrap();
        ok(&[
            "owner",
            "add-recipient",
            "--config",
            &self.owner_config,
            "--name",
            name,
            "--address",
            &address,
            "--out",
            e,
        ]);
        let dir = self.path(name);
        let data = self.path(&format!("{name}-data"));
        init_recipient(&dir, &data, &enrollment, &self.spool);
        let config = dir.join("recipient.toml").to_str().unwrap().to_owned();
        Site { address, dir, data, config }
    }

    /// `owner publish`; returns the generation number.
    pub fn publish(&self) -> u64 {
        let out = ok(&["owner", "publish", "--config", &self.owner_config]);
        out.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("publish printed {out:?}"))
    }

    /// `owner run --once`; returns stderr.
    pub fn owner_run(&self) -> String {
        let args = ["owner", "run", "--config", &self.owner_config, "--once"];
        let out = run(&args);
        assert!(out.status.success(), "{}", describe(&args, &out));
        String::from_utf8(out.stderr).unwrap()
    }

    /// One full exchange: request, answer, apply, receipt.
    pub fn sync(&self, site: &Site) {
        site.run(true);
        self.owner_run();
        site.run(false);
        self.owner_run();
    }

    /// Sends a request and lets the owner answer; returns the path of the reply waiting for `site`.
    pub fn pending_reply(&self, site: &Site) -> PathBuf {
        site.run(true);
        self.owner_run();
        let new = site.maildir(self).join("new");
        let mut files: Vec<PathBuf> = fs::read_dir(&new).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 1, "expected one reply in `{}`", new.display());
        files.pop().unwrap()
    }

    /// `status --json` of the owner.
    pub fn owner_status(&self) -> serde_json::Value {
        serde_json::from_str(&ok(&["status", "--config", &self.owner_config, "--json"])).unwrap()
    }
}

/// `mailferry recipient init` for a data tree `data` with its state in `dir`.
pub fn init_recipient(dir: &Path, data: &Path, enrollment: &Path, spool: &Path) {
    ok(&[
        "recipient",
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--enrollment",
        enrollment.to_str().unwrap(),
        "--transport-root",
        spool.to_str().unwrap(),
    ]);
}

/// Builds a varied tree: nested directories, binary, empty and executable files, an empty directory.
pub fn varied_tree(root: &Path) {
    put(root, "README", b"hello\n", 0o644);
    put(root, "bin/tool", b"#!/bin/sh\necho tool\n", 0o755);
    let binary: Vec<u8> = (0..70_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    put(root, "data/blob.bin", &binary, 0o644);
    put(root, "data/empty", b"", 0o644);
    put(root, "deep/a/b/c/d/e/leaf.txt", b"leaf\n", 0o644);
    put(root, "names/with space & ünïcode.txt", b"x", 0o644);
    put(root, "old/gone.txt", b"to be deleted\n", 0o644);
    put(root, "typechange", b"a file that becomes a directory\n", 0o644);
    put(root, "dir-to-file/inner.txt", b"inner\n", 0o644);
    fs::create_dir_all(root.join("empty/dir")).unwrap();
}

/// Files in a directory; 0 when it does not exist yet (a Maildir is created on first delivery).
pub fn count(dir: &Path) -> usize {
    fs::read_dir(dir).map_or(0, |d| d.count())
}

/// A mailferry daemon started by a test, its log in a file. Dropping it kills it, so a failing test leaves
/// nothing behind.
pub struct Daemon {
    child: std::process::Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `mailferry ARGS` in the background, logging to `log`.
    pub fn start(args: &[&str], log: PathBuf) -> Daemon {
        let child = Command::new(bin())
            .args(args)
            .env_remove("MAILFERRY_FAILPOINT")
            .env("MAILFERRY_LOG", "mailferry=info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("failed to start the mailferry daemon");
        Daemon { child, log }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits (at most 15 s) for a clean exit; returns the log.
    pub fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        // The `kill` command keeps the tests free of `unsafe`; the pid is our own child's.
        let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("failed to run kill");
        assert!(killed.success(), "kill -TERM {pid} failed");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "daemon exited with {status}\n{}", self.log());
                return self.log();
            }
            assert!(std::time::Instant::now() < deadline, "daemon did not stop within 15 s of SIGTERM\n{}", self.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A message of `kind` from `from` to `to` made of the given control, auth and attachment bytes, as an
/// attacker (or a relay) could put together; subject and text say it is forged.
pub fn forge(
    kind: mailferry::protocol::Kind,
    (from, to): (&str, &str),
    control: &[u8],
    auth: &[u8],
    attachments: &[(&str, &[u8])],
) -> Vec<u8> {
    mailferry::protocol::envelope::build(&mailferry::protocol::envelope::Outgoing {
        from,
        to,
        subject: "forged".into(),
        text: "forged".into(),
        kind,
        control,
        auth,
        payloads: attachments.to_vec(),
    })
    .unwrap()
}

/// The attachments of a parsed message, as [`forge`] takes them.
pub fn attachments_of(parsed: &mailferry::protocol::envelope::Parsed) -> Vec<(&str, &[u8])> {
    parsed.attachments.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect()
}

/// `n` bytes that zstd cannot shrink (xorshift from `seed`), so any saving comes from deltas.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Unmounts a tmpfs when the test ends, however it ends.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "the full-disk test mounts a small tmpfs and needs root (CI runs as root)"
        );
        Tmpfs(at.to_path_buf())
    }

    pub fn resize(&self, size: &str) {
        let st = Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.0).status().unwrap();
        assert!(st.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
