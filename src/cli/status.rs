//! `mailferry status`: a node's generation, tree root, last request and reply, refusals and mail, as
//! text, one JSON object (`docs/status.schema.json`) or Prometheus metrics; exits 1 when something needs
//! attention.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use clap::{Args, ValueEnum};
use mailferry::config::{NodeConfig, Signing};
use mailferry::node::owner::{self, OwnerStatus};
use mailferry::node::recipient::{self, RecipientStatus};
use mailferry::node::{OutboxStatus, TransportStatus};
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream, bytes};
use crate::cli::{ConfigArg, Exit};

/// The version of the `status --json` and `log --json` objects (`schema_version`): raised when a field
/// is removed or changes meaning; fields may be added without a raise.
pub const SCHEMA_VERSION: u32 = 1;

/// How `status` shows the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Lines for a person.
    Human,
    /// One JSON object (docs/status.schema.json).
    Json,
    /// Prometheus text exposition format, for node_exporter's textfile collector.
    Prometheus,
}

/// The arguments of `status` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
#[command(after_help = "Exit codes: 0 all is well; 1 needs attention (an interrupted apply, mail that could not be \
sent or a failing server, a rollback hold, stale, an unreadable key file); 2 error.\n\
Examples:\n  mailferry status --json | jq .generation\n  \
mailferry status --format prometheus > /var/lib/node_exporter/mailferry.prom")]
pub struct StatusCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// One JSON object on stdout (the same as --format json).
    #[arg(long, conflicts_with = "format")]
    json: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
}

/// A node's status as shown: the schema version and the config file it came from, then the node's own
/// fields.
#[derive(Debug, Serialize)]
pub struct Shown<'a, T> {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The config file used (found at a default place, or given).
    pub config: PathBuf,
    /// Whether `status` exits 1.
    pub attention: bool,
    /// The node's fields.
    #[serde(flatten)]
    pub status: &'a T,
}

impl<T: Render> Render for Shown<'_, T> {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        self.status.human(out)?;
        writeln!(out, "config:      {}", self.config.display())
    }
}

impl StatusCommand {
    /// Shows the status.
    ///
    /// # Errors
    /// An unreadable config or state.
    pub fn execute(self) -> Result<Exit> {
        let format = if self.json { Format::Json } else { self.format };
        let out = Output::new(format == Format::Json);
        let attention = match self.config.load()? {
            NodeConfig::Owner(cfg) => {
                let s = owner::status(&cfg)?;
                let attention = owner_attention(&s);
                show(format, &out, &cfg.path, attention, &s, crate::cli::prometheus::owner)?;
                attention
            }
            NodeConfig::Recipient(cfg) => {
                let s = recipient::status(&cfg)?;
                let attention = recipient_attention(&s);
                show(format, &out, &cfg.path, attention, &s, crate::cli::prometheus::recipient)?;
                attention
            }
        };
        Ok(if attention { Exit::Attention } else { Exit::Success })
    }
}

fn show<T: Render>(
    format: Format,
    out: &Output,
    config: &Path,
    attention: bool,
    status: &T,
    metrics: fn(&T, bool) -> String,
) -> Result<()> {
    if format == Format::Prometheus {
        let mut stdout = io::stdout().lock();
        stdout.write_all(metrics(status, attention).as_bytes())?;
        return Ok(());
    }
    out.print(&Shown { schema_version: SCHEMA_VERSION, config: config.to_owned(), attention, status })
}

/// Whether an owner's `status` exits 1.
pub fn owner_attention(s: &OwnerStatus) -> bool {
    s.outbox.failed > 0 || s.transport.failing()
}

/// Whether a recipient's `status` exits 1.
pub fn recipient_attention(s: &RecipientStatus) -> bool {
    s.outbox.failed > 0
        || s.interrupted_apply
        || s.transport.failing()
        || s.stale
        || s.rollback_held.is_some()
        || s.key_id.is_none()
        || s.subscriptions.iter().any(|t| t.refused() || t.rollback_held.is_some() || t.interrupted_apply)
        || s.waiting.as_ref().is_some_and(|w| w.reason == "manual")
        || s.last_hook_failure.as_ref().is_some_and(|f| f.generation == s.generation)
}

impl Render for OwnerStatus {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        let s = self;
        writeln!(out, "role:        owner ({})", s.address)?;
        match &s.generation {
            Some(g) => writeln!(
                out,
                "generation:  {} ({} files, {}, published {})",
                g.number,
                g.files,
                bytes(g.bytes),
                fmt_time(Some(g.created))
            )?,
            None => writeln!(out, "generation:  none published")?,
        }
        if let Some(g) = &s.generation {
            writeln!(out, "tree root:   {}", g.root)?;
        }
        writeln!(out, "rejected:    {}", s.rejected)?;
        if let Some(k) = &s.public_key {
            let on = if s.signing == Signing::HmacEd25519 { "" } else { " (not in use)" };
            writeln!(out, "signing key: ed25519 {k}{on}")?;
        }
        writeln!(out, "outbox:      {} pending, {} failed", s.outbox.pending, s.outbox.failed)?;
        write_transport_status(out, "", &s.outbox, &s.transport)?;
        writeln!(out, "recipients:  {}", s.recipients.len())?;
        for r in &s.recipients {
            let applied = r.applied_generation.map_or("unknown".into(), |g| format!("generation {g}"));
            writeln!(out, "  {} <{}>: {applied}", r.name, r.address)?;
            if r.suspended {
                writeln!(
                    out,
                    "    suspended:    its requests are refused (`mailferry owner resume --name {}`)",
                    r.name
                )?;
            }
            if let Some(k) = &r.rotating_to {
                writeln!(out, "    key:          {} (rotating to {k})", r.key_id)?;
            }
            if let Some(limit) = r.relay_limit {
                writeln!(out, "    part size:    {} (learned from a relay's refusal)", bytes(limit))?;
            }
            if let Some((at, what)) = r.last_bounce.as_deref().and_then(|b| b.split_once(' ')) {
                writeln!(out, "    last bounce:  {} {what}", fmt_time(at.parse().ok()))?;
            }
            if r.spent_replies > 0 {
                let period = humantime::format_duration(std::time::Duration::from_secs(s.budget.period));
                writeln!(
                    out,
                    "    sent:         {} replies, {} in the last {period} (budget {} replies, {})",
                    r.spent_replies,
                    bytes(r.spent_bytes),
                    s.budget.replies,
                    bytes(s.budget.bytes)
                )?;
            }
            writeln!(out, "    last request: {}", fmt_time(r.last_request_at))?;
            writeln!(out, "    last reply:   {}", fmt_time(r.last_reply_at))?;
            writeln!(out, "    last receipt: {}", fmt_time(r.last_receipt_at))?;
        }
        Ok(())
    }
}

impl Render for RecipientStatus {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        let s = self;
        writeln!(out, "role:         recipient {:?} (data `{}`)", s.name, s.data.display())?;
        writeln!(
            out,
            "generation:   {}",
            if s.generation == 0 { "none applied".into() } else { s.generation.to_string() }
        )?;
        writeln!(out, "tree root:    {}", s.root.as_deref().unwrap_or("-"))?;
        writeln!(out, "last request: {}", fmt_time(s.last_request_at))?;
        writeln!(out, "last reply:   {}", fmt_time(s.last_reply_at))?;
        match &s.key_id {
            Some(k) => writeln!(out, "key id:       {k}")?,
            None => {
                writeln!(out, "KEY: the key file cannot be read (see `mailferry check`); replies cannot be verified")?
            }
        }
        if let Some(k) = &s.owner_public_key {
            writeln!(out, "owner key:    ed25519 {k} (replies must be signed)")?;
        }
        writeln!(out, "outstanding:  {}", s.outstanding)?;
        writeln!(out, "rejected:     {}", s.rejected)?;
        writeln!(out, "outbox:       {} pending, {} failed", s.outbox.pending, s.outbox.failed)?;
        write_transport_status(out, " ", &s.outbox, &s.transport)?;
        match s.previous_generation {
            Some(g) => writeln!(out, "kept:         generation {g}, for `recipient rollback`")?,
            None => writeln!(out, "kept:         nothing to roll back to")?,
        }
        if s.interrupted_apply {
            writeln!(out, "WARNING: an interrupted apply is waiting; the next run finishes it")?;
        }
        if let Some(held) = s.rollback_held {
            writeln!(
                out,
                "HELD: rolled back locally; generation {held} and older are not applied until a newer one \
                 arrives or `mailferry recipient rollback --release`"
            )?;
        }
        if let Some(w) = &s.waiting {
            match w.reason.as_str() {
                "manual" => writeln!(
                    out,
                    "READY: generation {} is verified and waits since {} for `mailferry recipient approve`",
                    w.generation,
                    fmt_time(Some(w.since))
                )?,
                _ => writeln!(
                    out,
                    "waiting:      generation {} for its apply window (next opens {})",
                    w.generation,
                    w.window_opens.as_deref().unwrap_or("-")
                )?,
            }
        }
        if let Some(f) = &s.last_hook_failure {
            let code = f.exit_status.map_or("killed".to_owned(), |c| format!("exit {c}"));
            writeln!(
                out,
                "HOOK FAILED:  {} of generation {} at {} ({code}; {})",
                f.hook,
                f.generation,
                fmt_time(Some(f.at)),
                f.action
            )?;
            for line in f.output_tail.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev() {
                writeln!(out, "  | {line}")?;
            }
        }
        if s.stale {
            writeln!(
                out,
                "STALE: no fresh reply from the owner for longer than stale-after ({}); updates may be withheld",
                humantime::format_duration(Duration::from_secs(s.stale_after))
            )?;
        }
        if s.subscriptions.len() > 1 || s.subscriptions.iter().any(|t| t.standing.is_some() || t.pinned.is_some()) {
            writeln!(out, "channels:")?;
            for t in &s.subscriptions {
                let generation =
                    if t.generation == 0 { "none applied".into() } else { format!("generation {}", t.generation) };
                let mut notes = Vec::new();
                if let Some(st) = &t.standing {
                    notes.push(if t.refused() { st.to_uppercase() } else { st.clone() });
                } else if let Some(p) = t.pinned {
                    notes.push(format!("pinned at {p}"));
                }
                if let Some(h) = t.rollback_held {
                    notes.push(format!("held at {h}"));
                }
                if t.stale {
                    notes.push("stale".into());
                }
                let notes = if notes.is_empty() { String::new() } else { format!(" [{}]", notes.join(", ")) };
                writeln!(out, "  {:<16} {generation} in `{}`{notes}", t.channel, t.data.display())?;
            }
        }
        Ok(())
    }
}

/// A moment as RFC 3339 and how long ago it was; `never` for none.
pub fn fmt_time(t: Option<u64>) -> String {
    match t {
        None => "never".into(),
        Some(t) => {
            let ago = mailferry::db::now().saturating_sub(t);
            let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t));
            format!("{at} ({} ago)", humantime::format_duration(Duration::from_secs(ago)))
        }
    }
}

/// The `status` lines about mail: a permanently refused message, the last server error, how new mail is
/// noticed. `pad` aligns them with the role's other lines.
fn write_transport_status(
    out: &mut dyn Write,
    pad: &str,
    outbox: &OutboxStatus,
    t: &TransportStatus,
) -> io::Result<()> {
    if let Some(e) = &outbox.last_error {
        writeln!(out, "refused:    {pad} {e}")?;
    }
    match (&t.last_error, t.failing()) {
        (Some(e), true) => writeln!(out, "last error: {pad} {} ({e})", fmt_time(t.last_error_at))?,
        (Some(e), false) => writeln!(
            out,
            "last error: {pad} {} ({e}); fine again since {}",
            fmt_time(t.last_error_at),
            fmt_time(t.last_ok_at)
        )?,
        (None, _) => writeln!(out, "last error: {pad} none")?,
    }
    let mode = match t.receive_mode.as_deref() {
        Some("idle") => "IMAP IDLE (new mail is reported by the server)",
        Some("poll") => "IMAP polling every poll-interval (no IDLE)",
        Some("interval") => "spool checked every interval",
        Some(other) => other,
        None => "not known yet (no run so far)",
    };
    writeln!(out, "receiving:  {pad} {mode}, as of {}", fmt_time(t.receive_mode_at))
}
