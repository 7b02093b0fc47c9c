//! Node drivers: the I/O shell around the pure core, one per role.
//!
//! A driver owns a node's state directory (database, outbox, lock, content store or staging area), feeds
//! incoming messages through the pure protocol and planning code, performs the resulting effects, and
//! tells the transport where to file each message. [`owner`] answers requests; [`recipient`] requests,
//! verifies and applies.
//!
//! # Invariants
//! - A message is settled only after its effects are durable (the reply in the outbox, the apply recorded),
//!   so a crash means it is fetched again, and the seen-store (BLAKE3 of the raw bytes) keeps it from
//!   being acted on twice.
//! - Outgoing mail goes through the [`Outbox`] first and leaves it only when the transport accepted it.

pub mod compose;
pub mod grants;
pub mod history;
pub mod install;
pub mod owner;
pub mod pack;
pub mod recipient;
pub mod registration;
pub mod rollback;
pub mod run;
pub mod sealing;

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::Serialize;
use tracing::{info, warn};

use crate::db::Db;
use crate::manifest::Digest;
use crate::protocol::envelope;
use crate::protocol::{Reason, Refusal};
use crate::transport::{Transport, TransportErrorKind};

/// What became of one incoming message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Owner: a request answered with a reply for `generation`.
    Answered {
        /// Who asked.
        recipient: String,
        /// The generation sent.
        generation: u64,
        /// Operations in the reply.
        ops: usize,
    },
    /// Owner: a receipt recorded.
    Receipt {
        /// From whom.
        recipient: String,
        /// The generation it reports.
        generation: u64,
        /// What the recipient did with its reply.
        status: crate::protocol::ReceiptStatus,
    },
    /// Recipient: a reply applied.
    Applied {
        /// The generation now in the tree.
        generation: u64,
        /// Operations performed.
        ops: usize,
    },
    /// Recipient: one part of a reply kept until the others arrive.
    PartKept {
        /// The reply.
        reply_id: crate::protocol::ReplyId,
        /// Parts kept so far.
        have: u32,
        /// Parts in the reply.
        of: u32,
    },
    /// Recipient: a reference reply, pointing to a reply sent before for the same tree.
    Referred {
        /// The reply referred to.
        reply_id: crate::protocol::ReplyId,
    },
    /// Recipient: the owner answered without an update (not entitled, expired, suspended, pinned).
    Standing {
        /// The channel.
        channel: String,
        /// What the owner said.
        standing: crate::protocol::Standing,
    },
    /// Recipient: a reply confirming the tree is current.
    Current {
        /// The generation in the tree.
        generation: u64,
    },
    /// A delivery report (bounce) about a message this node sent, read and acted on.
    Bounced {
        /// What it said, for the log.
        status: String,
    },
    /// Recipient: an authentic reply not applied because a local rollback holds its generation back.
    Held {
        /// The generation it brings.
        generation: u64,
        /// The newest generation held back.
        held: u64,
    },
    /// Recipient: a verified update kept ready, not installed: for `recipient approve` or its apply window.
    Ready {
        /// The generation it brings.
        generation: u64,
        /// Why it waits.
        wait: install::Wait,
    },
    /// Handled before (same raw bytes); `rejected` says how it was filed then.
    Duplicate {
        /// Whether it was refused the first time.
        rejected: bool,
    },
    /// Left for later (the owner has nothing published yet).
    Deferred(String),
    /// Authentic, but this node's own mail come back (a request at the recipient, a reply at the
    /// owner): nothing to do, and not an attack.
    NotForThisNode(String),
    /// Refused; recorded in the state database and logged.
    Refused(Refusal),
}

impl Handled {
    /// Where the transport should file the message; `None` to leave it in the inbox.
    pub fn disposition(&self) -> Option<crate::transport::Disposition> {
        use crate::transport::Disposition;
        match self {
            Handled::Deferred(_) => None,
            Handled::Refused(_) | Handled::Duplicate { rejected: true } => Some(Disposition::Rejected),
            _ => Some(Disposition::Processed),
        }
    }
}

/// What the owner and recipient drivers share: a state database and a way to act on one message.
pub trait Role {
    /// The state database.
    fn db(&self) -> &Db;

    /// The state directory.
    fn state_dir(&self) -> &Path;

    /// The largest message this node reads (`max-message-bytes`): a larger one waiting in the inbox is
    /// refused by its size, without being read.
    fn max_message_bytes(&self) -> u64 {
        crate::limits::Limits::default().max_message_bytes
    }

    /// Acts on one message that the seen-store has not handled before and makes the effects durable.
    /// Outer `Err` is a local failure (the message stays where it is); a refusal is `Ok(Err(..))`.
    ///
    /// # Errors
    /// Local failures.
    fn act(&mut self, raw: &[u8], digest: &Digest) -> Result<Result<Handled, Refusal>>;

    /// Decides what one raw message means, acts on it, and records the outcome. Idempotent: the same bytes
    /// are acted on once. A copy of a message whose original was already filed is refused as a replay; a
    /// message handled but never filed (a crash in between) is a harmless re-fetch.
    ///
    /// # Errors
    /// Local failures (database, store, outbox, a full disk); the message should then stay where it is.
    fn handle(&mut self, raw: &[u8]) -> Result<Handled> {
        let digest = Digest::of(raw);
        tracing::trace!(digest = %digest.short(), bytes = raw.len(), "handling a message");
        if let Some(seen) = self.db().seen(&digest)? {
            tracing::debug!(digest = %digest.short(), settled = seen.settled, "message seen before");
            if !seen.settled {
                return Ok(Handled::Duplicate { rejected: seen.rejected });
            }
            let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seen.at));
            let refusal = Refusal::new(
                Reason::Replay,
                format!("identical to a message handled at {at} (replayed, or delivered twice)"),
            );
            record_refusal(self.db(), &refusal, raw, &digest, false)?;
            return Ok(Handled::Refused(refusal));
        }
        match self.act(raw, &digest)? {
            Ok(h) => {
                tracing::debug!(digest = %digest.short(), outcome = ?h, "message handled");
                Ok(h)
            }
            Err(refusal) => {
                record_refusal(self.db(), &refusal, raw, &digest, true)?;
                Ok(Handled::Refused(refusal))
            }
        }
    }
}

/// Records and logs a refusal (and, for a first sighting, the seen-store entry).
fn record_refusal(db: &Db, refusal: &Refusal, raw: &[u8], digest: &Digest, first: bool) -> Result<()> {
    let hints = envelope::hints(raw);
    db.record_rejection(refusal, &hints, digest)?;
    if first {
        db.mark_seen(digest, "rejected")?;
    }
    warn!(
        reason = refusal.reason.code(),
        from = hints.from.as_deref().unwrap_or("-"),
        message_id = hints.message_id.as_deref().unwrap_or("-"),
        "refused message: {}",
        refusal.detail
    );
    Ok(())
}

/// Handles everything in the node's inbox, filing each message once its effects are durable.
///
/// # Errors
/// Transport fetch failures and local failures.
pub async fn process_inbox<N: Role, T: Transport>(
    node: &mut N,
    transport: &mut T,
    report: &mut RunReport,
) -> Result<()> {
    let waiting = transport.waiting().await?;
    tracing::debug!(count = waiting.len(), "listed the messages waiting");
    // One message at a time: memory follows the largest message accepted, not the inbox.
    let max = node.max_message_bytes();
    for w in waiting {
        if w.size() > max {
            refuse_unread(node, transport, w.id(), w.size(), max, report).await?;
            continue;
        }
        let Some(msg) = transport.read(w, max).await? else { continue };
        let handled = node.handle(&msg.raw)?;
        if matches!(handled, Handled::Refused(_)) {
            // A local copy gives `log` a file to point at whatever the transport does with the original;
            // failing to write it (a full disk) must not stop the message being filed.
            match keep_rejected(node.state_dir(), &msg.raw) {
                Ok(kept) => tracing::debug!(kept = %kept.display(), "kept a copy of the refused message"),
                Err(e) => warn!(error = %format!("{e:#}"), "could not keep a copy of the refused message"),
            }
        }
        report.count(&handled);
        crate::failpoint::hit("before-settle");
        if let Some(d) = handled.disposition() {
            tracing::trace!(id = %msg.id, disposition = ?d, "filing the message");
            match transport.settle(&msg.id, d).await {
                Ok(()) => node.db().mark_settled(&Digest::of(&msg.raw))?,
                Err(e) => {
                    warn!(id = %msg.id, error = %format!("{e:#}"), "could not file message; it will be seen again")
                }
            }
        }
    }
    Ok(())
}

/// Refuses a waiting message by its size alone, without reading it: recorded, logged, and filed as
/// rejected (not in the seen-store, whose key is the digest of bytes never read).
async fn refuse_unread<N: Role, T: Transport>(
    node: &mut N,
    transport: &mut T,
    id: &str,
    size: u64,
    max: u64,
    report: &mut RunReport,
) -> Result<()> {
    let refusal = Refusal::new(
        Reason::Limit,
        format!("message `{id}` is {size} bytes, over max-message-bytes ({max}); refused without reading it"),
    );
    node.db().record_unread_rejection(&refusal)?;
    warn!(reason = refusal.reason.code(), id = %id, "refused message: {}", refusal.detail);
    let handled = Handled::Refused(refusal);
    report.count(&handled);
    if let Err(e) = transport.settle(id, crate::transport::Disposition::Rejected).await {
        warn!(id = %id, error = %format!("{e:#}"), "could not file message; it will be seen again");
    }
    Ok(())
}

/// Handles messages that arrived outside the transport (`mailferry deliver`: files, an MTA pipe), then
/// sends what that queued (replies, receipts). Refused messages are kept in `STATE/rejected/`.
///
/// # Errors
/// Local failures.
pub async fn deliver<N: Role, T: Transport>(
    node: &mut N,
    transport: &mut T,
    messages: &[Vec<u8>],
) -> Result<RunReport> {
    let mut report = RunReport::default();
    deliver_messages(node, messages, &mut report)?;
    report.sent += Outbox::flush(node.db(), transport).await?.sent;
    Ok(report)
}

fn deliver_messages<N: Role>(node: &mut N, messages: &[Vec<u8>], report: &mut RunReport) -> Result<()> {
    for raw in messages {
        // A file carried twice is no attack: it was handled before, and is reported as such.
        if let Some(seen) = node.db().seen(&Digest::of(raw))? {
            let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seen.at));
            let what = if seen.rejected { "refused" } else { "handled" };
            info!("already {what} at {at} (delivered before); nothing to do");
            report.count(&Handled::Duplicate { rejected: seen.rejected });
            continue;
        }
        let handled = node.handle(raw)?;
        if matches!(handled, Handled::Refused(_)) {
            let kept = keep_rejected(node.state_dir(), raw)?;
            info!("kept refused message as `{}`", kept.display());
        }
        if !matches!(handled, Handled::Deferred(_)) {
            node.db().mark_settled(&Digest::of(raw))?;
        }
        report.count(&handled);
    }
    Ok(())
}

/// How often, at most, an admin gets a summary of refused messages.
const REJECTION_SUMMARY_EVERY: u64 = 3600;

/// Queues a summary of the messages refused since the last summary to `admin`, at most once an hour.
/// Returns whether one was queued; the caller's next outbox flush sends it.
///
/// # Errors
/// State failures.
pub fn summarize_rejections(db: &Db, from: &str, admin: &str, node: &str) -> Result<bool> {
    let (reported, last_at) = db.rejections_reported()?;
    let now = crate::db::now();
    if now.saturating_sub(last_at) < REJECTION_SUMMARY_EVERY {
        return Ok(false);
    }
    let new = db.rejections_after(reported)?;
    let Some((last_id, _)) = new.last() else { return Ok(false) };
    let mut text = format!("mailferry {node} refused {} message(s) since the last summary:\n\n", new.len());
    for (_, r) in &new {
        let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(r.at));
        text.push_str(&format!(
            "{at}  {}  from {}  message-id {}\n    {}\n",
            r.reason,
            r.sender.as_deref().unwrap_or("-"),
            r.message_id.as_deref().unwrap_or("-"),
            r.detail
        ));
    }
    text.push_str("\nThe senders and message ids are as claimed by the messages; nothing of them was trusted.\n");
    let raw = mail_builder::MessageBuilder::new()
        .from(from)
        .to(admin)
        .subject(format!("mailferry: {} refused message(s) at {node}", new.len()))
        .text_body(text)
        .write_to_vec()?;
    db.transaction(|db| {
        db.outbox_put(&format!("rejections-{last_id}"), from, admin, &raw)?;
        db.set_rejections_reported(*last_id, now)
    })?;
    Ok(true)
}

/// A node's state directory, open: its lock, held while the value lives, and its state database. Every
/// role of a node works on the one `State` (through an `Rc`), so roles never lock each other out.
#[derive(Debug)]
pub struct State {
    dir: PathBuf,
    pub(crate) db: Db,
    _lock: File,
}

impl State {
    /// Takes the state directory's lock ([`lock_state`]) and opens its database, migrating it.
    ///
    /// # Errors
    /// A locked or unreadable state directory, or a database from a newer mailferry.
    pub fn open(dir: &Path) -> Result<std::rc::Rc<State>> {
        let lock = lock_state(dir)?;
        let db = Db::open(&dir.join("state.db"))?;
        Ok(std::rc::Rc::new(State { dir: dir.to_owned(), db, _lock: lock }))
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The state database.
    pub fn db(&self) -> &Db {
        &self.db
    }
}

/// The operating system's random generator, the shell's [`crate::engine::Entropy`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemEntropy;

impl crate::engine::Entropy for SystemEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        crate::crypto::random(buf);
    }
}

/// Takes the state directory's lock so that two runs never interleave, waiting up to ten minutes for
/// another process to finish its step.
///
/// # Errors
/// When another process holds it, or the lock file cannot be created.
pub fn lock_state(state_dir: &Path) -> Result<File> {
    fs::create_dir_all(state_dir)
        .with_context(|| format!("failed to create state directory `{}`", state_dir.display()))?;
    let path = state_dir.join("lock");
    let f = File::create(&path).with_context(|| format!("failed to create `{}`", path.display()))?;
    // Daemons hold the lock only while they work on a step, so waiting a little is the normal case (a
    // `publish` while the owner daemon answers a request); waiting very long means something is stuck.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut said = false;
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                if !said {
                    info!("waiting for another mailferry process to finish with `{}`", state_dir.display());
                    said = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another mailferry process has held state directory `{}` for over {} minutes",
                state_dir.display(),
                LOCK_WAIT.as_secs() / 60
            ),
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("failed to lock `{}`", path.display()));
            }
        }
    }
}

/// How long [`lock_state`] waits for another process.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Outgoing messages waiting for the transport, kept in the state database's `outbox` table.
///
/// A message is queued in the same database transaction as the state change that depends on it (the
/// request recorded as answered, the apply recorded, the nonce recorded as outstanding), so a crash can
/// never leave one without the other. It is removed only after the transport accepted it. Names are
/// deterministic (`reply-<nonce>`, `receipt-<reply id>`, `request-<seq>`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Outbox;

/// Outbox contents, for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxStatus {
    /// Messages waiting to be sent.
    pub pending: u64,
    /// Messages the transport refused permanently (kept, not retried).
    pub failed: u64,
    /// The last permanent failure.
    pub last_error: Option<String>,
}

impl Outbox {
    /// Sends everything queued, oldest first. Permanent failures are marked and not retried; transient
    /// ones stay queued for the next flush.
    ///
    /// # Errors
    /// Only local failures on the state database; transport failures are logged and counted.
    pub async fn flush<T: Transport>(db: &Db, transport: &mut T) -> Result<FlushReport> {
        let mut report = FlushReport::default();
        let pending = db.outbox_pending()?;
        if !pending.is_empty() {
            tracing::debug!(count = pending.len(), "sending the outbox");
        }
        for name in pending {
            let (from, to, raw) = db.outbox_get(&name)?;
            // A broadcast part is queued once for all its envelope recipients, one address a line.
            let many: Vec<&str> = to.split('\n').collect();
            let sent = if many.len() > 1 {
                transport.send_many(&from, &many, &raw).await
            } else {
                transport.send(&from, &to, &raw).await
            };
            match sent {
                Ok(()) => {
                    db.outbox_sent(&name)?;
                    report.sent += 1;
                    info!(to = %to, bytes = raw.len(), "sent {name}");
                }
                Err(e) if matches!(e.kind, TransportErrorKind::Permanent | TransportErrorKind::TooLarge) => {
                    let text = format!("{e:#}");
                    if e.kind == TransportErrorKind::TooLarge {
                        report.too_large.push(TooLarge { name: name.clone(), to: to.clone(), bytes: raw.len() as u64 });
                    }
                    db.outbox_failed(&name, &text)?;
                    record_transport_error(db, &text)?;
                    warn!(to = %to, error = %text, "{name} refused permanently; not retrying");
                    report.failed += 1;
                    report.last_error = Some(text);
                }
                Err(e) => {
                    record_transport_error(db, &format!("{e:#}"))?;
                    warn!(to = %to, error = %format!("{e:#}"), "sending {name} failed; will retry");
                    report.deferred += 1;
                    report.last_error = Some(format!("{e:#}"));
                }
            }
        }
        Ok(report)
    }

    /// What is queued.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn status(db: &Db) -> Result<OutboxStatus> {
        let (pending, failed, last_error) = db.outbox_counts()?;
        Ok(OutboxStatus { pending, failed, last_error })
    }
}

pub use crate::db::TransportStatus;

impl TransportStatus {
    /// Reads what the last run recorded.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn read(db: &Db) -> Result<TransportStatus> {
        db.transport_status()
    }

    /// True when the last thing recorded is an error (no successful run since).
    pub fn failing(&self) -> bool {
        match (self.last_error_at, self.last_ok_at) {
            (Some(err), Some(ok)) => err > ok,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

/// Records a transport or run error for `status`.
///
/// # Errors
/// SQLite errors.
pub fn record_transport_error(db: &Db, text: &str) -> Result<()> {
    db.set_transport_error(text, crate::db::now())
}

/// Records that a run finished with nothing left to retry.
///
/// # Errors
/// SQLite errors.
pub fn record_transport_ok(db: &Db) -> Result<()> {
    db.set_transport_ok(crate::db::now())
}

/// Records how the running daemon notices new mail (`idle`, `poll`, `interval`).
///
/// # Errors
/// SQLite errors.
pub fn record_receive_mode(db: &Db, mode: &str) -> Result<()> {
    db.set_receive_mode(mode, crate::db::now())
}

/// The result of [`Outbox::flush`].
#[derive(Debug, Clone, Default)]
pub struct FlushReport {
    /// Messages accepted by the transport.
    pub sent: usize,
    /// Messages kept for a retry.
    pub deferred: usize,
    /// Messages refused permanently.
    pub failed: usize,
    /// The last transport error, if any.
    pub last_error: Option<String>,
    /// Messages refused as too large (also counted in `failed`).
    pub too_large: Vec<TooLarge>,
}

/// A queued message the transport refused as too large.
#[derive(Debug, Clone)]
pub struct TooLarge {
    /// Its outbox name.
    pub name: String,
    /// Its recipient address.
    pub to: String,
    /// Its size.
    pub bytes: u64,
}

/// Keeps a copy of a refused message as `STATE/rejected/DIGEST.eml` (every refused message, whether it
/// came through the transport or `mailferry deliver`), for `mailferry log` to point at.
///
/// # Errors
/// I/O errors.
pub fn keep_rejected(state_dir: &Path, raw: &[u8]) -> Result<PathBuf> {
    let dir = state_dir.join("rejected");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.eml", Digest::of(raw).to_hex()));
    fs::write(&path, raw).with_context(|| format!("failed to write `{}`", path.display()))?;
    Ok(path)
}

/// Counts of what a run did, for the command line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    /// Messages looked at.
    pub messages: usize,
    /// Messages acted on (answered, recorded, applied).
    pub handled: usize,
    /// Messages refused.
    pub refused: usize,
    /// Messages seen before.
    pub duplicates: usize,
    /// Authentic messages this node sent itself, come back to it.
    pub not_for_this_node: usize,
    /// Messages left in the inbox.
    pub deferred: usize,
    /// Messages sent.
    pub sent: usize,
    /// Whether a request was sent (recipient).
    pub requested: bool,
    /// What became of each message, in order, for a summary in words.
    #[serde(skip)]
    pub outcomes: Vec<Handled>,
}

impl RunReport {
    fn count(&mut self, h: &Handled) {
        self.messages += 1;
        match h {
            Handled::Refused(_) => self.refused += 1,
            Handled::NotForThisNode(_) => self.not_for_this_node += 1,
            Handled::Duplicate { .. } => self.duplicates += 1,
            Handled::Deferred(_) => self.deferred += 1,
            _ => self.handled += 1,
        }
        self.outcomes.push(h.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::maildir::MaildirTransport;

    /// A node that records which messages it was asked to act on.
    struct Counting {
        db: Db,
        dir: tempfile::TempDir,
        acted: Vec<usize>,
    }

    impl Role for Counting {
        fn db(&self) -> &Db {
            &self.db
        }

        fn state_dir(&self) -> &Path {
            self.dir.path()
        }

        fn max_message_bytes(&self) -> u64 {
            1 << 20
        }

        fn act(&mut self, raw: &[u8], _digest: &Digest) -> Result<Result<Handled, Refusal>> {
            self.acted.push(raw.len());
            Ok(Ok(Handled::NotForThisNode("counted".into())))
        }
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_refused_by_its_size_without_being_read() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let mut t = MaildirTransport::new(&spool, "owner@example.org").unwrap();
        // 200 MB of junk that costs no disk (sparse), beside one small message.
        let junk = t.inbox().join("new/junk");
        File::create(&junk).unwrap().set_len(200_000_000).unwrap();
        MaildirTransport::deliver_into(&t.inbox(), b"small").unwrap();
        let state = tempfile::tempdir().unwrap();
        let db = Db::open(&state.path().join("state.db")).unwrap();
        let mut node = Counting { db, dir: state, acted: Vec::new() };
        let mut report = RunReport::default();
        process_inbox(&mut node, &mut t, &mut report).await.unwrap();

        assert_eq!(node.acted, vec![5], "only the small message was read and acted on");
        assert_eq!((report.messages, report.refused), (2, 1));
        let rejections = node.db.rejections_after(0).unwrap();
        assert_eq!(rejections.len(), 1);
        let (_, r) = &rejections[0];
        assert_eq!(r.reason, "limit");
        assert!(
            r.detail.contains(
                "message `junk` is 200000000 bytes, over max-message-bytes (1048576); refused without reading it"
            ),
            "{}",
            r.detail
        );
        assert!(!junk.exists() && t.inbox().join(".rejected/cur/junk:2,S").exists(), "filed as rejected");
    }

    #[tokio::test]
    async fn a_message_is_read_no_further_than_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = MaildirTransport::new(dir.path(), "owner@example.org").unwrap();
        let name = MaildirTransport::deliver_into(&t.inbox(), &[7u8; 1000]).unwrap();
        let waiting = t.waiting().await.unwrap();
        assert_eq!(waiting.iter().map(|w| (w.id().to_owned(), w.size())).collect::<Vec<_>>(), vec![(name, 1000)]);
        // Grown past the limit since it was listed: read one byte past the limit, which refuses it.
        let m = t.read(waiting[0].clone(), 100).await.unwrap().unwrap();
        assert_eq!(m.raw.len(), 101);
        fs::remove_file(t.inbox().join("new").join(&m.id)).unwrap();
        assert!(t.read(waiting[0].clone(), 100).await.unwrap().is_none(), "gone: settled by another run");
    }
}
