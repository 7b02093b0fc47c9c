//! Installing a verified update: the recipient's own hooks, the install scripts an update ships, manual
//! installation, apply windows, and what a failed hook does.
//!
//! Hooks run only around a change of the tree, never as part of verifying anything: `pre-apply` after the
//! reply is verified and every file is staged, before the journal commits (a non-zero exit vetoes the
//! update: the staged files are discarded and the reply is refused with `vetoed`); `post-apply` after the
//! swap. Each runs through `sh -c` in its own process group, with `/` as its working directory, no
//! standard input, a clean environment ([`HookEnv`]), its stdout and stderr captured (only the last
//! [`OUTPUT_TAIL`] bytes are kept), and is killed with its whole group at `hook-timeout`.
//!
//! **Shipped hooks.** An owner may put scripts at [`SHIPPED_PRE`] and [`SHIPPED_POST`] in the channel's
//! tree. They run only when the recipient opted in (`shipped-hooks = true`), the reply carried the
//! owner's Ed25519 signature under the pinned `owner-public-key` ([`Journal::signed`]), and the script is
//! a regular file in the signed tree. The bytes executed are a private copy in `STATE/hooks/`, whose size
//! and BLAKE3 are checked against the signed tree after copying, so a change to the data tree between the
//! check and the exec runs nothing. A local hook runs before a shipped one.
//!
//! **Crash safety.** Before the post-apply hooks run, the journal is committed again with
//! [`Phase::HooksPending`]: a crash from then on runs them on the next start, without repeating the swap,
//! with `MAILFERRY_RERUN=1` (at least once, not exactly once).
//!
//! **Waiting.** With `install = "manual"`, or outside every `apply-window`, a verified and staged update
//! is kept ready (its uncommitted journal in the state database, its staged files in the staging root)
//! and nothing touches the tree; `recipient approve` (or the window opening) installs it. A newer verified
//! update replaces the one waiting.
//!
//! This module must not verify anything itself, and runs nothing before the engine accepted a reply.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::apply::{Journal, JournalKind, OnExtra, Phase, tree};
use crate::config::{RecipientConfig, RecipientSection};
use crate::crypto::Nonce;
use crate::db::{Db, HookFailureRow, WaitingRow, now};
use crate::manifest::{Digest, Entry, FileMeta, Manifest};
use crate::path::RelPath;
use crate::protocol::{Reason, Refusal, ReplyId};
use crate::scan::Scan;

/// Where an update's own pre-apply script lives in the channel's tree.
pub const SHIPPED_PRE: &str = ".mailferry/hooks/pre-apply";
/// Where an update's own post-apply script lives in the channel's tree.
pub const SHIPPED_POST: &str = ".mailferry/hooks/post-apply";
/// How much of a hook's output is kept (its last bytes).
pub const OUTPUT_TAIL: usize = 4096;
/// The default `hook-timeout`.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// The only variable a hook inherits, fixed: nothing of mailferry's own environment reaches it.
const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a failed `post-apply` hook does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnHookFailure {
    /// Return the tree to the generation before (from the rollback store) and hold the failed one back.
    #[default]
    Rollback,
    /// Leave the new generation in place.
    Keep,
}

impl OnHookFailure {
    /// Whether this is the default (not written into a new config).
    pub fn is_default(&self) -> bool {
        *self == OnHookFailure::default()
    }
}

pub use crate::config::InstallMode;

/// Whether the scripts an update ships may run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ShippedHooks {
    /// Never (the default).
    #[default]
    Ignore,
    /// When the reply is signed under the pinned owner key and the script is the one its tree lists.
    RunSigned,
}

/// How one subscription installs updates: built from the `[recipient]` table.
#[derive(Clone, Debug, Default)]
pub struct InstallPolicy {
    /// `pre-apply`: may veto.
    pub pre_apply: Option<String>,
    /// `post-apply`.
    pub post_apply: Option<String>,
    /// `hook-timeout`.
    pub hook_timeout: Duration,
    /// `shipped-hooks`.
    pub shipped_hooks: ShippedHooks,
    /// `on-hook-failure`.
    pub on_hook_failure: OnHookFailure,
    /// `install`.
    pub install: InstallMode,
    /// `apply-window`: empty means at any time.
    pub windows: Vec<Window>,
}

impl InstallPolicy {
    /// The policy a `[recipient]` table sets.
    ///
    /// # Errors
    /// An `apply-window` that does not parse, an empty hook command, or a zero `hook-timeout`.
    pub fn from_section(r: &RecipientSection) -> Result<InstallPolicy> {
        InstallPolicy::for_tree(r, &crate::config::InstallOverrides::default())
    }

    /// The policy of one tree: its `[[subscription]]`'s own install keys, each unset one `[recipient]`'s.
    ///
    /// # Errors
    /// As [`InstallPolicy::from_section`].
    pub fn for_tree(r: &RecipientSection, own: &crate::config::InstallOverrides) -> Result<InstallPolicy> {
        let r = &RecipientSection {
            pre_apply: own.pre_apply.clone().or_else(|| r.pre_apply.clone()),
            post_apply: own.post_apply.clone().or_else(|| r.post_apply.clone()),
            hook_timeout: own.hook_timeout.or(r.hook_timeout),
            shipped_hooks: own.shipped_hooks.unwrap_or(r.shipped_hooks),
            on_hook_failure: own.on_hook_failure.unwrap_or(r.on_hook_failure),
            install: own.install.unwrap_or(r.install),
            apply_window: own.apply_window.clone().unwrap_or_else(|| r.apply_window.clone()),
            ..r.clone()
        };
        let windows = r.apply_window.iter().map(|w| w.parse()).collect::<Result<Vec<Window>, WindowError>>()?;
        for (key, cmd) in [("pre-apply", &r.pre_apply), ("post-apply", &r.post_apply)] {
            if cmd.as_deref().is_some_and(|c| c.trim().is_empty()) {
                anyhow::bail!("{key} is empty; remove it or name a command");
            }
        }
        let hook_timeout = r.hook_timeout.unwrap_or(DEFAULT_HOOK_TIMEOUT);
        anyhow::ensure!(!hook_timeout.is_zero(), "hook-timeout must be longer than 0s");
        Ok(InstallPolicy {
            pre_apply: r.pre_apply.clone(),
            post_apply: r.post_apply.clone(),
            hook_timeout,
            shipped_hooks: if r.shipped_hooks { ShippedHooks::RunSigned } else { ShippedHooks::Ignore },
            on_hook_failure: r.on_hook_failure,
            install: r.install,
            windows,
        })
    }

    /// Why a verified update must wait at local time `now` rather than be installed: `None` to install it.
    pub fn wait(&self, now: jiff::civil::DateTime) -> Option<Wait> {
        if self.install == InstallMode::Manual {
            Some(Wait::Manual)
        } else if !self.windows.is_empty() && !open_at(&self.windows, now) {
            Some(Wait::Window)
        } else {
            None
        }
    }
}

/// Why an update waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Wait {
    /// `install = "manual"`: for `recipient approve`.
    Manual,
    /// For its apply window.
    #[serde(rename = "apply-window")]
    Window,
}

impl Wait {
    /// The code kept in the state database and shown by `status`.
    pub fn code(self) -> &'static str {
        match self {
            Wait::Manual => "manual",
            Wait::Window => "apply-window",
        }
    }
}

/// The local wall-clock time now, in the recipient's time zone (`TZ`, else `/etc/localtime`).
pub fn local_now() -> jiff::civil::DateTime {
    jiff::Zoned::now().datetime()
}

// ---- apply windows ----

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// One `apply-window`: on the given days, from `start` until `end` (minutes after midnight, local time).
/// An `end` at or before `start` runs past midnight into the next day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Bit `i` is day `i` of the week, Monday first.
    days: u8,
    start: u16,
    end: u16,
}

/// Why an `apply-window` does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "apply-window {text:?}: {why} (write it as \"Sat 02:00-04:00\", \"Mon-Fri 22:00-23:30\" or \"daily 03:00-04:00\")"
)]
pub struct WindowError {
    text: String,
    why: String,
}

impl FromStr for Window {
    type Err = WindowError;

    fn from_str(text: &str) -> Result<Window, WindowError> {
        let err = |why: String| WindowError { text: text.to_owned(), why };
        let mut words = text.split_whitespace();
        let (days, times) = match (words.next(), words.next(), words.next()) {
            (Some(d), Some(t), None) => (d, t),
            _ => return Err(err("expected days and a time range".into())),
        };
        let day = |s: &str| {
            DAYS.iter()
                .position(|d| d.eq_ignore_ascii_case(s))
                .ok_or_else(|| err(format!("unknown day {s:?} (days are Mon..Sun, or daily)")))
        };
        let mut mask = 0u8;
        if days.eq_ignore_ascii_case("daily") {
            mask = 0x7f;
        } else {
            for item in days.split(',') {
                match item.split_once('-') {
                    Some((a, b)) => {
                        let (a, b) = (day(a)?, day(b)?);
                        // A range may wrap around the week (Fri-Mon).
                        let mut d = a;
                        loop {
                            mask |= 1 << d;
                            if d == b {
                                break;
                            }
                            d = (d + 1) % 7;
                        }
                    }
                    None => mask |= 1 << day(item)?,
                }
            }
        }
        let (from, to) = times.split_once('-').ok_or_else(|| err(format!("{times:?} is not a range HH:MM-HH:MM")))?;
        let minute = |s: &str, end: bool| -> Result<u16, WindowError> {
            let bad = || err(format!("{s:?} is not a time HH:MM"));
            let (h, m) = s.split_once(':').ok_or_else(bad)?;
            if h.is_empty() || h.len() > 2 || m.len() != 2 {
                return Err(bad());
            }
            let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            match (h, m) {
                (24, 0) if end => Ok(24 * 60),
                (0..=23, 0..=59) => Ok(h * 60 + m),
                _ => Err(bad()),
            }
        };
        let (start, end) = (minute(from, false)?, minute(to, true)?);
        if start == end % (24 * 60) && end != 24 * 60 {
            return Err(err("the window is empty (it starts when it ends)".into()));
        }
        Ok(Window { days: mask, start, end })
    }
}

impl Window {
    /// Whether the window is open on `weekday` (0 is Monday) at `minute` after local midnight.
    pub fn contains(&self, weekday: u8, minute: u16) -> bool {
        let on = |d: u8| self.days & (1 << (d % 7)) != 0;
        if self.start < self.end {
            on(weekday) && (self.start..self.end).contains(&minute)
        } else {
            // Past midnight: the evening of a listed day, or the small hours of the day after one.
            (on(weekday) && minute >= self.start) || (on(weekday + 6) && minute < self.end)
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.days == 0x7f {
            write!(f, "daily")?;
        } else {
            let names: Vec<&str> = (0..7)
                .filter(|d| self.days & (1 << d) != 0)
                .map(|d| ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][d])
                .collect();
            write!(f, "{}", names.join(","))?;
        }
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, " {}-{}", hm(self.start), hm(self.end))
    }
}

/// Whether any of `windows` is open at local time `t`.
pub fn open_at(windows: &[Window], t: jiff::civil::DateTime) -> bool {
    let weekday = t.weekday().to_monday_zero_offset() as u8;
    let minute = t.hour() as u16 * 60 + t.minute() as u16;
    windows.iter().any(|w| w.contains(weekday, minute))
}

/// When the next of `windows` opens after local time `t` (none when there are none).
pub fn next_opening(windows: &[Window], t: jiff::civil::DateTime) -> Option<jiff::civil::DateTime> {
    let mut best: Option<jiff::civil::DateTime> = None;
    for offset in 0..=7i64 {
        let Ok(date) = t.date().checked_add(jiff::Span::new().days(offset)) else { continue };
        let weekday = date.weekday().to_monday_zero_offset() as u8;
        for w in windows {
            if w.days & (1 << weekday) == 0 {
                continue;
            }
            let at = date.at((w.start / 60) as i8, (w.start % 60) as i8, 0, 0);
            if at > t && best.is_none_or(|b| at < b) {
                best = Some(at);
            }
        }
    }
    best
}

// ---- running hooks ----

/// What a hook is told, in its environment.
#[derive(Debug, Clone)]
pub struct HookEnv<'a> {
    /// `MAILFERRY_CHANNEL`.
    pub channel: &'a str,
    /// `MAILFERRY_GENERATION`: the generation being installed.
    pub generation: u64,
    /// `MAILFERRY_ROOT`: that generation's tree root.
    pub root: Digest,
    /// `MAILFERRY_DATA`: the data tree.
    pub data: &'a Path,
    /// `MAILFERRY_CHANGED`: a file listing every path the update changes, one per line.
    pub changed: &'a Path,
    /// `MAILFERRY_RERUN=1`: the hook may have run before for this update (a crash interrupted it).
    pub rerun: bool,
}

/// What a hook runs.
#[derive(Debug, Clone, Copy)]
pub enum Program<'a> {
    /// A command line, through `sh -c`.
    Shell(&'a str),
    /// An executable file (a shipped script's private copy).
    Script(&'a Path),
}

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookOutcome {
    /// Its exit code; none when a signal ended it or it could not be started.
    pub exit_status: Option<i32>,
    /// How it ended, in words (`exit status 3`, `killed by signal 9`, `killed at the hook-timeout (5m)`).
    pub ended: String,
    /// The last [`OUTPUT_TAIL`] bytes of its stdout and stderr together (lossy UTF-8).
    pub output_tail: String,
}

impl HookOutcome {
    /// Whether it exited with 0.
    pub fn success(&self) -> bool {
        self.exit_status == Some(0)
    }
}

/// A failed install hook, as the recipient records it and a failure receipt reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HookFailure {
    /// Which hook: `post-apply` or `shipped post-apply`.
    pub hook: String,
    /// Its exit code; none when it was killed (by a signal, or at the timeout) or could not start.
    pub exit_status: Option<i32>,
    /// The last bytes of its output.
    pub output_tail: String,
    /// How it ended, in words.
    pub ended: String,
}

/// Keeps the last `cap` bytes written.
#[derive(Debug, Default)]
struct Tail {
    buf: Vec<u8>,
    cap: usize,
}

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > self.cap {
            let cut = self.buf.len() - self.cap;
            self.buf.drain(..cut);
        }
    }
}

/// Runs one hook to its end or its timeout and says how it ended. Never fails: a hook that cannot be
/// started ends with no exit status and the reason as its output.
pub fn run_hook(program: Program<'_>, env: &HookEnv<'_>, timeout: Duration) -> HookOutcome {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let not_started = |e: &dyn fmt::Display| HookOutcome {
        exit_status: None,
        ended: "could not be started".into(),
        output_tail: format!("failed to start the hook: {e}"),
    };
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return not_started(&e),
    };
    let mut cmd = match program {
        Program::Shell(line) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(line);
            c
        }
        Program::Script(path) => Command::new(path),
    };
    let stderr = match writer.try_clone() {
        Ok(w) => w,
        Err(e) => return not_started(&e),
    };
    cmd.env_clear()
        .env("PATH", HOOK_PATH)
        .env("MAILFERRY_CHANNEL", env.channel)
        .env("MAILFERRY_GENERATION", env.generation.to_string())
        .env("MAILFERRY_ROOT", env.root.to_hex())
        .env("MAILFERRY_DATA", env.data)
        .env("MAILFERRY_CHANGED", env.changed)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(stderr)
        // Its own process group, so that the timeout kills whatever it started too.
        .process_group(0);
    if env.rerun {
        cmd.env("MAILFERRY_RERUN", "1");
    }
    let child = spawn_retrying(&mut cmd);
    // The command holds our copies of the pipe's write end: without dropping it the output never ends.
    drop(cmd);
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return not_started(&e),
    };
    let tail = Arc::new(Mutex::new(Tail { buf: Vec::new(), cap: OUTPUT_TAIL }));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    {
        let tail = tail.clone();
        let mut reader = reader;
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                tail.lock().unwrap_or_else(|p| p.into_inner()).push(&buf[..n]);
            }
            let _ = done_tx.send(());
        });
    }
    let pid = rustix::process::Pid::from_child(&child);
    let (wait_tx, wait_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = wait_tx.send(child.wait());
    });
    let started = std::time::Instant::now();
    let (status, timed_out) = match wait_rx.recv_timeout(timeout) {
        Ok(s) => (s, false),
        Err(_) => {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            (wait_rx.recv().unwrap_or_else(|_| Err(std::io::Error::other("the hook's waiter went away"))), true)
        }
    };
    // Output still open after the hook exited belongs to something it left running: wait a little for it,
    // then take what came.
    let grace = Duration::from_secs(2).min(timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(100)));
    let _ = done_rx.recv_timeout(grace);
    let output_tail = String::from_utf8_lossy(&tail.lock().unwrap_or_else(|p| p.into_inner()).buf).into_owned();
    let (exit_status, ended) = match status {
        Err(e) => (None, format!("could not be waited for: {e}")),
        Ok(_) if timed_out => (None, format!("killed at the hook-timeout ({})", humantime::format_duration(timeout))),
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => (Some(c), format!("exit status {c}")),
            (None, Some(sig)) => (None, format!("killed by signal {sig}")),
            (None, None) => (None, format!("ended with {s}")),
        },
    };
    HookOutcome { exit_status, ended, output_tail }
}

/// Spawns `cmd`, trying again briefly on `ETXTBSY`: a script just written can look busy while another
/// thread's fork still holds the descriptor it was written through.
fn spawn_retrying(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            other => return other,
        }
    }
}

// ---- the hooks of one install ----

/// Before or after the swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum When {
    Pre,
    Post,
}

impl When {
    fn key(self) -> &'static str {
        match self {
            When::Pre => "pre-apply",
            When::Post => "post-apply",
        }
    }

    fn shipped_path(self) -> RelPath {
        RelPath::new(match self {
            When::Pre => SHIPPED_PRE,
            When::Post => SHIPPED_POST,
        })
        .expect("the reserved hook paths are valid")
    }
}

/// The hooks of one subscription, with what running them needs.
#[derive(Debug, Clone, Copy)]
pub struct Hooks<'a> {
    /// The subscription's policy.
    pub policy: &'a InstallPolicy,
    /// The channel, for `MAILFERRY_CHANNEL`.
    pub channel: &'a str,
    /// The state directory (`hooks/` in it holds the list of changed paths and script copies).
    pub state_dir: &'a Path,
}

impl Hooks<'_> {
    /// Runs the pre-apply hooks for `journal` (not yet committed, its files staged): `Ok(Err(..))` is a
    /// veto, whose detail carries the hook's output. The caller discards the staged files then.
    ///
    /// # Errors
    /// Local failures (writing the list of changed paths, copying a shipped script).
    pub fn pre_apply(&self, journal: &Journal) -> Result<Result<(), Refusal>> {
        match self.run(When::Pre, journal, false)? {
            None => Ok(Ok(())),
            Some(f) => Ok(Err(Refusal::new(
                Reason::Vetoed,
                format!(
                    "the {} hook vetoed generation {} ({}); the tree is unchanged: {}",
                    f.hook,
                    journal.generation,
                    f.ended,
                    f.output_tail.trim_end()
                ),
            ))),
        }
    }

    /// After the swap of `journal`: when post-apply hooks are due, commits the journal as
    /// [`Phase::HooksPending`] (unless it already is: `rerun`), runs them, and returns the first failure.
    ///
    /// # Errors
    /// Local failures; the journal then stays and the next start runs the hooks.
    pub fn post_apply(&self, journal: &Journal, rerun: bool) -> Result<Option<HookFailure>> {
        if journal.kind != JournalKind::Apply {
            return Ok(None);
        }
        let target = journal.target()?;
        let due = self.policy.post_apply.is_some() || target.get(&When::Post.shipped_path()).is_some();
        if !due {
            return Ok(None);
        }
        if !rerun {
            let pending = Journal { phase: Phase::HooksPending, ..journal.clone() };
            pending.commit(self.state_dir)?;
            crate::failpoint::hit("after-swap-before-hook");
        }
        self.run(When::Post, journal, rerun)
    }

    /// Runs the local hook, then the shipped one, of `when`; stops at the first failure.
    fn run(&self, when: When, journal: &Journal, rerun: bool) -> Result<Option<HookFailure>> {
        let target = journal.target()?;
        let local = match when {
            When::Pre => self.policy.pre_apply.as_deref(),
            When::Post => self.policy.post_apply.as_deref(),
        };
        let script = self.shipped(when, journal, &target)?;
        if local.is_none() && script.is_none() {
            return Ok(None);
        }
        let dir = self.hooks_dir()?;
        let changed = dir.join(format!("changed-{}", self.channel));
        write_changed(&changed, journal)?;
        let env = HookEnv {
            channel: self.channel,
            generation: journal.generation,
            root: target.root(),
            data: &journal.data_root,
            changed: &changed,
            rerun,
        };
        let mut failure = None;
        let programs = local
            .map(|l| (when.key().to_owned(), Program::Shell(l)))
            .into_iter()
            .chain(script.as_deref().map(|s| (format!("shipped {}", when.key()), Program::Script(s))));
        for (name, program) in programs {
            let out = run_hook(program, &env, self.policy.hook_timeout);
            if out.success() {
                info!(hook = %name, generation = journal.generation, rerun, "ran the {name} hook");
                tracing::debug!(hook = %name, output = %out.output_tail, "hook output");
                continue;
            }
            warn!(
                hook = %name,
                generation = journal.generation,
                output = %out.output_tail.trim_end(),
                "the {name} hook failed ({})",
                out.ended
            );
            failure = Some(HookFailure {
                hook: name,
                exit_status: out.exit_status,
                output_tail: out.output_tail,
                ended: out.ended,
            });
            break;
        }
        if let Some(s) = &script {
            let _ = std::fs::remove_file(s);
        }
        let _ = std::fs::remove_file(&changed);
        Ok(failure)
    }

    /// `STATE/hooks/`, private.
    fn hooks_dir(&self) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.state_dir.join("hooks");
        std::fs::create_dir_all(&dir).with_context(|| format!("failed to create `{}`", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(dir)
    }

    /// The private copy of the shipped script of `when`, if it may run; every reason it may not is logged.
    fn shipped(&self, when: When, journal: &Journal, target: &Manifest) -> Result<Option<PathBuf>> {
        let rel = when.shipped_path();
        let Some(entry) = target.get(&rel) else { return Ok(None) };
        let what =
            format!("not running the shipped {} script `{rel}` of generation {}", when.key(), journal.generation);
        if self.policy.shipped_hooks != ShippedHooks::RunSigned {
            info!("{what}: this recipient did not opt in (shipped-hooks = true)");
            return Ok(None);
        }
        if !journal.signed {
            warn!("{what}: the reply was not signed with the owner's Ed25519 key pinned as owner-public-key");
            return Ok(None);
        }
        let Entry::File(meta) = entry else {
            warn!("{what}: the signed tree does not list it as a regular file");
            return Ok(None);
        };
        let source = match self.open_source(when, journal, &rel) {
            Ok(f) => f,
            Err(e) => {
                warn!("{what}: it cannot be read: {e:#}");
                return Ok(None);
            }
        };
        let dir = self.hooks_dir()?;
        let name = format!("shipped-{}-{}", when.key(), Nonce::generate().to_hex());
        let out = tree::Dir::open_root(&dir).with_context(|| format!("failed to open `{}`", dir.display()))?;
        if !copy_exact(source, &out, &name, meta).with_context(|| format!("failed to copy `{rel}`"))? {
            warn!(
                "{what}: its bytes are not the ones the signed tree lists ({} bytes, {})",
                meta.size,
                meta.blake3.short()
            );
            return Ok(None);
        }
        let path = dir.join(&name);
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Some(path))
    }

    /// The shipped script of `when` as it will be in the tree: before the swap the staged file when the
    /// update places it, else the one in the tree; after the swap the one in the tree. Opened without
    /// following a link.
    fn open_source(&self, when: When, journal: &Journal, rel: &RelPath) -> Result<std::fs::File> {
        if when == When::Pre {
            let staged = journal.steps.iter().find_map(|s| match s {
                crate::apply::Step::Place { path, staged, .. } if path == rel => Some(staged),
                _ => None,
            });
            if let Some(staged) = staged {
                let files = tree::Dir::open_root(&journal.stage_dir.join("files"))?;
                return Ok(files.open_file(staged)?);
            }
        }
        let root = tree::Dir::open_root(&journal.data_root)?;
        let (dir, name) = root.walk_parent(rel).map_err(|e| anyhow::format_err!("{e}"))?;
        Ok(dir.open_file(name)?)
    }
}

/// Copies `from` into a new file `name` in `dir`, keeping it only when it is exactly `meta`'s size and
/// BLAKE3: the check is made on the copy, which is what runs.
fn copy_exact(from: std::fs::File, dir: &tree::Dir, name: &str, meta: &FileMeta) -> std::io::Result<bool> {
    super::rollback::copy_checked(from, dir, name, meta)
}

/// Writes the paths `journal` changes, one per line, to `path`.
fn write_changed(path: &Path, journal: &Journal) -> Result<()> {
    use crate::apply::Step;
    let paths: BTreeSet<&str> = journal
        .steps
        .iter()
        .map(|s| match s {
            Step::RemoveFile { path }
            | Step::RemoveDir { path }
            | Step::Mkdir { path }
            | Step::Place { path, .. }
            | Step::Link { path, .. }
            | Step::Chmod { path, .. } => path.as_str(),
        })
        .collect();
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("failed to create `{}`", path.display()))?,
    );
    for p in paths {
        writeln!(f, "{p}")?;
    }
    f.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()?;
    Ok(())
}

// ---- failures ----

/// Records a failed post-apply hook of `journal` and what was done (`action`).
///
/// # Errors
/// SQLite errors.
pub fn record_failure(db: &Db, channel: &str, journal: &Journal, failure: &HookFailure, action: &str) -> Result<()> {
    db.sub(channel)?.record_hook_failure(&HookFailureRow {
        at: now(),
        generation: journal.generation,
        reply_id: journal.reply_id.clone(),
        hook: failure.hook.clone(),
        exit_status: failure.exit_status,
        output_tail: failure.output_tail.clone(),
        action: action.to_owned(),
    })
}

/// The journal that returns the tree from `journal`'s generation (just swapped in, its hooks failed) to
/// the generation applied before, `before`, staged from the apply's own `previous/` (or files of the tree
/// with the same content) into `stage_dir`. `Ok(Err(why))` when there is no way back.
///
/// # Errors
/// Local failures other than those that only mean there is no way back.
pub fn rollback_journal(
    journal: &Journal,
    before: (u64, &Manifest),
    scan: &Scan,
    on_extra: OnExtra,
    stage_dir: PathBuf,
) -> Result<Result<Journal, String>> {
    let (generation, manifest) = before;
    if generation == 0 || generation >= journal.generation {
        return Ok(Err("there is no older generation to return to".into()));
    }
    let plan = match super::rollback::plan(scan, &journal.target()?, manifest, on_extra) {
        Ok(p) => p,
        Err(e) => return Ok(Err(format!("cannot roll back: {e}"))),
    };
    if let Err(e) = super::rollback::stage(&plan, &journal.stage_dir, &journal.data_root, &scan.manifest, &stage_dir) {
        let _ = std::fs::remove_dir_all(&stage_dir);
        return Ok(Err(format!("cannot roll back: {e:#}")));
    }
    let id = stage_dir.file_name().and_then(|n| n.to_str()).context("a staging directory without a name")?.to_owned();
    Ok(Ok(Journal {
        version: 1,
        data_root: journal.data_root.clone(),
        stage_dir,
        generation,
        reply_id: ReplyId::unchecked(id),
        nonce: String::new(),
        message: Digest([0; 32]),
        ops: plan.ops.len(),
        target: manifest.listing(),
        steps: plan.steps,
        kind: JournalKind::Rollback { from: journal.generation },
        key_id: None,
        phase: Phase::Swap,
        signed: false,
    }))
}

// ---- waiting updates ----

/// Keeps `journal` (verified, staged, not committed) ready to install, replacing whatever waited, and
/// for `install = "manual"` queues a notice to the `admin-address`. Call it in the transaction that
/// marks the reply handled; the caller removes the staged files of the update replaced.
///
/// # Errors
/// State failures.
pub fn keep_ready(
    db: &Db,
    cfg: &RecipientConfig,
    channel: &str,
    journal: &Journal,
    base: Digest,
    wait: Wait,
) -> Result<()> {
    db.sub(channel)?.set_waiting_install(&WaitingRow {
        generation: journal.generation,
        reply_id: journal.reply_id.clone(),
        base,
        reason: wait.code().to_owned(),
        since: now(),
        journal: serde_json::to_vec(journal)?,
    })?;
    let r = &cfg.recipient;
    match wait {
        Wait::Manual => info!(
            generation = journal.generation,
            "generation {} of {channel} is verified and ready; `mailferry recipient approve --config {}` installs it",
            journal.generation,
            cfg.path.display()
        ),
        Wait::Window => {
            info!(
                generation = journal.generation,
                "generation {} is verified; it waits for its apply window", journal.generation
            )
        }
    }
    if wait != Wait::Manual {
        return Ok(());
    }
    let Some(admin) = &r.admin_address else { return Ok(()) };
    let text = format!(
        "Generation {} of channel {channel:?} is verified and ready to install on mailferry recipient {:?} (data \
         tree `{}`).\nNothing in the tree changes until it is approved:\n\n    mailferry recipient approve --config {}\n\n\
         A newer generation arriving first replaces this one.\n",
        journal.generation,
        r.name,
        r.data.display(),
        cfg.path.display()
    );
    let raw = mail_builder::MessageBuilder::new()
        .from(r.address.as_str())
        .to(admin.as_str())
        .subject(format!("mailferry: generation {} of {channel} is ready", journal.generation))
        .text_body(text)
        .write_to_vec()?;
    db.outbox_put(&format!("ready-notice-{}", journal.reply_id), &r.address, admin, &raw)
}

/// Forgets the waiting update and removes its staged files.
///
/// # Errors
/// State failures.
pub fn discard_waiting(db: &Db, channel: &str) -> Result<()> {
    let sub = db.sub(channel)?;
    let Some(w) = sub.waiting_install()? else { return Ok(()) };
    sub.clear_waiting_install()?;
    remove_staged(&w);
    Ok(())
}

/// Removes the staged files of a waiting update (logged when it fails: it costs space only).
pub fn remove_staged(w: &WaitingRow) {
    if let Ok(j) = serde_json::from_slice::<Journal>(&w.journal)
        && let Err(e) = std::fs::remove_dir_all(&j.stage_dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(error = %e, "could not remove `{}`", j.stage_dir.display());
    }
}

/// The staging directory of the waiting update, which the staging root's tidying must leave alone.
pub fn waiting_stage_dir(db: &Db, channel: &str) -> Option<PathBuf> {
    let w = db.sub(channel).ok()?.waiting_install().ok()??;
    serde_json::from_slice::<Journal>(&w.journal).ok().map(|j| j.stage_dir)
}

/// What waits to be installed, for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct WaitingStatus {
    /// The generation.
    pub generation: u64,
    /// The reply that brought it.
    pub reply_id: ReplyId,
    /// `manual` (for `recipient approve`) or `apply-window`.
    pub reason: String,
    /// Since when (Unix seconds).
    pub since: u64,
    /// For `apply-window`: when the next window opens, local time (`2026-05-02T02:00:00`).
    pub window_opens: Option<String>,
}

/// What waits, if anything, as `status` shows it.
///
/// # Errors
/// State failures.
pub fn waiting_status(db: &Db, channel: &str, policy: &InstallPolicy) -> Result<Option<WaitingStatus>> {
    let Some(w) = db.sub(channel)?.waiting_install()? else { return Ok(None) };
    let window_opens = (w.reason == Wait::Window.code())
        .then(|| next_opening(&policy.windows, local_now()))
        .flatten()
        .map(|t| t.to_string());
    Ok(Some(WaitingStatus {
        generation: w.generation,
        reply_id: w.reply_id,
        reason: w.reason,
        since: w.since,
        window_opens,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Window {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn at(s: &str) -> jiff::civil::DateTime {
        s.parse().unwrap()
    }

    #[test]
    fn windows_parse_days_ranges_and_times() {
        // 2026-05-02 is a Saturday.
        assert_eq!(at("2026-05-02T00:00").weekday(), jiff::civil::Weekday::Saturday);
        let cases: &[(&str, &[(&str, bool)])] = &[
            (
                "Sat 02:00-04:00",
                &[
                    ("2026-05-02T01:59", false),
                    ("2026-05-02T02:00", true),
                    ("2026-05-02T03:59", true),
                    ("2026-05-02T04:00", false),
                    ("2026-05-03T02:30", false),
                    ("2026-04-25T02:30", true),
                ],
            ),
            (
                "Mon-Fri 22:00-23:30",
                &[("2026-05-04T22:00", true), ("2026-05-08T23:29", true), ("2026-05-02T22:30", false)],
            ),
            (
                "daily 03:00-04:00",
                &[("2026-05-02T03:10", true), ("2026-05-05T03:10", true), ("2026-05-05T04:10", false)],
            ),
            // Past midnight: Saturday evening into Sunday morning, not Saturday morning.
            (
                "sat 23:00-01:00",
                &[
                    ("2026-05-02T23:30", true),
                    ("2026-05-03T00:30", true),
                    ("2026-05-02T00:30", false),
                    ("2026-05-03T23:30", false),
                ],
            ),
            (
                "Fri-Mon 12:00-13:00",
                &[("2026-05-03T12:00", true), ("2026-05-04T12:00", true), ("2026-05-05T12:00", false)],
            ),
            (
                "Tue,Thu 00:00-24:00",
                &[("2026-05-05T23:59", true), ("2026-05-07T00:00", true), ("2026-05-06T12:00", false)],
            ),
        ];
        for (text, times) in cases {
            let win = w(text);
            for (t, open) in *times {
                assert_eq!(open_at(&[win], at(t)), *open, "{text} at {t}");
            }
        }
        assert_eq!(w("Mon-Fri 22:00-23:30").to_string(), "Mon,Tue,Wed,Thu,Fri 22:00-23:30");
        assert_eq!(w("DAILY 03:00-04:00").to_string(), "daily 03:00-04:00");
    }

    #[test]
    fn bad_windows_are_refused_with_the_reason() {
        for (text, why) in [
            ("Sat", "expected days and a time range"),
            ("Sat 02:00-04:00 extra", "expected days and a time range"),
            ("Someday 02:00-04:00", "unknown day"),
            ("Sat 02:00", "not a range"),
            ("Sat 2-4", "not a time"),
            ("Sat 25:00-26:00", "not a time"),
            ("Sat 02:60-03:00", "not a time"),
            ("Sat 24:00-01:00", "not a time"),
            ("Sat 02:00-02:00", "empty"),
        ] {
            let e = text.parse::<Window>().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(text), "{text}: {e}");
        }
    }

    #[test]
    fn the_next_opening_is_the_nearest_start_after_now() {
        let ws = [w("Sat 02:00-04:00"), w("Wed 12:00-13:00")];
        assert_eq!(next_opening(&ws, at("2026-05-02T02:30")), Some(at("2026-05-06T12:00")));
        assert_eq!(next_opening(&ws, at("2026-05-02T01:00")), Some(at("2026-05-02T02:00")));
        assert_eq!(next_opening(&[], at("2026-05-02T01:00")), None);
    }

    #[test]
    fn a_policy_waits_when_manual_or_outside_every_window() {
        let mut p = InstallPolicy::default();
        assert_eq!(p.wait(at("2026-05-02T12:00")), None);
        p.windows = vec![w("Sat 02:00-04:00"), w("Sun 02:00-04:00")];
        assert_eq!(p.wait(at("2026-05-02T12:00")), Some(Wait::Window));
        assert_eq!(p.wait(at("2026-05-03T03:00")), None);
        p.install = InstallMode::Manual;
        assert_eq!(p.wait(at("2026-05-03T03:00")), Some(Wait::Manual), "manual waits even in a window");
    }

    #[test]
    fn tidying_the_staging_root_leaves_the_update_waiting_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let db = Db::open(&tmp.path().join("state.db")).unwrap();
        let root = tmp.path().join("staging");
        let (waiting, other) = (root.join("a".repeat(32)), root.join("b".repeat(32)));
        for d in [&waiting, &other] {
            std::fs::create_dir_all(d.join("files")).unwrap();
        }
        let journal = Journal {
            version: 1,
            data_root: tmp.path().join("data"),
            stage_dir: waiting.clone(),
            generation: 2,
            reply_id: ReplyId::unchecked("a".repeat(32)),
            nonce: "0".repeat(32),
            message: Digest::of(b"m"),
            ops: 0,
            target: vec![],
            steps: vec![],
            kind: JournalKind::Apply,
            key_id: None,
            phase: Phase::Swap,
            signed: false,
        };
        let cfg_dir = tmp.path();
        let cfg = RecipientConfig {
            path: cfg_dir.join("recipient.toml"),
            recipient: toml::from_str(
                "name = \"r\"\naddress = \"r@x.test\"\nowner-address = \"o@x.test\"\ndata = \"/d\"\nkey-file = \"k\"",
            )
            .unwrap(),
            transport: crate::config::TransportConfig::Maildir { root: cfg_dir.join("spool") },
            limits: Default::default(),
            state_dir: cfg_dir.to_path_buf(),
            subscriptions: Vec::new(),
        };
        keep_ready(&db, &cfg, "default", &journal, Digest::of(b"base"), Wait::Manual).unwrap();
        crate::node::rollback::tidy_staging(db.sub("default").unwrap(), &root);
        assert!(waiting.join("files").exists(), "the update waiting keeps its staged files");
        assert!(!other.exists());
        assert_eq!(db.outbox_pending().unwrap().len(), 0, "no admin-address: no notice");
        discard_waiting(&db, "default").unwrap();
        assert!(!waiting.exists() && db.sub("default").unwrap().waiting_install().unwrap().is_none());
    }

    fn env<'a>(changed: &'a Path, data: &'a Path) -> HookEnv<'a> {
        HookEnv { channel: "default", generation: 7, root: Digest::of(b"r"), data, changed, rerun: true }
    }

    #[test]
    fn a_hook_sees_a_clean_environment_and_its_output_tail_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let changed = tmp.path().join("changed");
        let out = run_hook(
            Program::Shell("env | sort; head -c 10000 /dev/zero | tr '\\0' x; echo; echo tail >&2; exit 3"),
            &env(&changed, tmp.path()),
            Duration::from_secs(30),
        );
        assert_eq!((out.exit_status, out.ended.as_str()), (Some(3), "exit status 3"));
        assert_eq!(out.output_tail.len(), OUTPUT_TAIL, "only the tail is kept");
        assert!(out.output_tail.ends_with("xxx\ntail\n"), "{:?}", &out.output_tail[OUTPUT_TAIL - 20..]);
        let out = run_hook(Program::Shell("env | sort"), &env(&changed, tmp.path()), Duration::from_secs(30));
        let vars: BTreeSet<&str> = out.output_tail.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
        let want: BTreeSet<&str> = [
            "PATH",
            "MAILFERRY_CHANNEL",
            "MAILFERRY_GENERATION",
            "MAILFERRY_ROOT",
            "MAILFERRY_DATA",
            "MAILFERRY_CHANGED",
            "MAILFERRY_RERUN",
            // The shell sets these itself.
            "PWD",
            "SHLVL",
            "_",
        ]
        .into();
        assert!(vars.is_subset(&want), "unexpected variables: {:?}", vars.difference(&want).collect::<Vec<_>>());
        assert!(
            out.output_tail.contains("MAILFERRY_GENERATION=7\n") && out.output_tail.contains("MAILFERRY_RERUN=1\n")
        );
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed_with_everything_it_started() {
        let tmp = tempfile::tempdir().unwrap();
        let changed = tmp.path().join("changed");
        let started = std::time::Instant::now();
        let pid_file = tmp.path().join("pid");
        // The background sleep keeps the output open: the group kill must end it too.
        let line = format!("echo started; sleep 60 & echo $! > {}; wait", pid_file.display());
        let out = run_hook(Program::Shell(&line), &env(&changed, tmp.path()), Duration::from_millis(500));
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
        assert_eq!(out.exit_status, None);
        assert!(out.ended.starts_with("killed at the hook-timeout"), "{}", out.ended);
        assert_eq!(out.output_tail, "started\n");
        // What the hook started in the background is gone too (or a zombie nobody reaped yet).
        let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_owned();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = state.rsplit_once(") ").map_or("", |(_, rest)| &rest[..1]);
            if state.is_empty() || state == "Z" {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the hook's background process {pid} still runs ({state})");
            std::thread::sleep(Duration::from_millis(20));
        }
        let missing =
            run_hook(Program::Script(&tmp.path().join("nothing")), &env(&changed, tmp.path()), Duration::from_secs(5));
        assert!(!missing.success() && missing.output_tail.contains("failed to start"), "{missing:?}");
    }
}
