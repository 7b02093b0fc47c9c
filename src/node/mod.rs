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

pub mod owner;
pub mod recipient;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::Serialize;
use tracing::{info, warn};

use crate::manifest::Digest;
use crate::protocol::Refusal;
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
    },
    /// Recipient: a reply applied.
    Applied {
        /// The generation now in the tree.
        generation: u64,
        /// Operations performed.
        ops: usize,
    },
    /// Recipient: a reply confirming the tree is current.
    Current {
        /// The generation in the tree.
        generation: u64,
    },
    /// Handled before (same raw bytes); `rejected` says how it was filed then.
    Duplicate {
        /// Whether it was refused the first time.
        rejected: bool,
    },
    /// Left for later (the owner has nothing published yet).
    Deferred(String),
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

/// Takes the state directory's lock so that two runs never interleave.
///
/// # Errors
/// When another process holds it, or the lock file cannot be created.
pub fn lock_state(state_dir: &Path) -> Result<File> {
    fs::create_dir_all(state_dir)
        .with_context(|| format!("failed to create state directory `{}`", state_dir.display()))?;
    let path = state_dir.join("lock");
    let f = File::create(&path).with_context(|| format!("failed to create `{}`", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => {
            anyhow::bail!("another mailferry process is using state directory `{}`", state_dir.display())
        }
        Err(fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("failed to lock `{}`", path.display())),
    }
}

/// Outgoing messages waiting for the transport, one file each in `STATE/outbox/`.
///
/// A file is written (fsynced, renamed into place) before anything that depends on the message being sent
/// is recorded, and removed only after the transport accepted the message. Names are chosen by the caller
/// and deterministic (`reply-<nonce>`), so writing the same message twice leaves one file.
#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
}

/// Outbox contents, for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxStatus {
    /// Messages waiting to be sent.
    pub pending: usize,
    /// Messages the transport refused permanently (kept in `outbox/failed/`).
    pub failed: usize,
}

const OUTBOX_MAGIC: &str = "mailferry-outbox 1";

impl Outbox {
    /// The outbox of a state directory.
    ///
    /// # Errors
    /// When it cannot be created.
    pub fn open(state_dir: &Path) -> Result<Outbox> {
        let dir = state_dir.join("outbox");
        fs::create_dir_all(dir.join("failed")).with_context(|| format!("failed to create `{}`", dir.display()))?;
        Ok(Outbox { dir })
    }

    /// Durably queues `raw` for `to` under `name`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn put(&self, name: &str, from: &str, to: &str, raw: &[u8]) -> Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        writeln!(tmp, "{OUTBOX_MAGIC} from={from} to={to}")?;
        tmp.write_all(raw)?;
        tmp.as_file().sync_all()?;
        let dest = self.dir.join(format!("{name}.eml"));
        tmp.persist(&dest).with_context(|| format!("failed to write `{}`", dest.display()))?;
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    fn read(path: &Path) -> Result<(String, String, Vec<u8>)> {
        let data = fs::read(path).with_context(|| format!("failed to read `{}`", path.display()))?;
        let nl = data.iter().position(|&b| b == b'\n').context("outbox file has no header line")?;
        let head = std::str::from_utf8(&data[..nl]).context("outbox header is not UTF-8")?;
        let rest = head.strip_prefix(OUTBOX_MAGIC).context("not a mailferry outbox file")?;
        let mut from = None;
        let mut to = None;
        for field in rest.split_whitespace() {
            if let Some(v) = field.strip_prefix("from=") {
                from = Some(v.to_owned());
            } else if let Some(v) = field.strip_prefix("to=") {
                to = Some(v.to_owned());
            }
        }
        Ok((
            from.context("outbox header has no from")?,
            to.context("outbox header has no to")?,
            data[nl + 1..].to_vec(),
        ))
    }

    /// Sends everything queued, oldest first. Permanent failures move the message to `failed/` and are
    /// not retried; transient ones stay queued for the next flush.
    ///
    /// # Errors
    /// Only local I/O errors on the outbox itself; transport failures are logged and counted.
    pub async fn flush<T: Transport>(&self, transport: &mut T) -> Result<FlushReport> {
        let mut report = FlushReport::default();
        let mut names: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        names.sort_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok());
        for path in names {
            let (from, to, raw) = Outbox::read(&path)?;
            match transport.send(&from, &to, &raw).await {
                Ok(()) => {
                    fs::remove_file(&path).with_context(|| format!("failed to remove `{}`", path.display()))?;
                    report.sent += 1;
                    info!(to = %to, bytes = raw.len(), "sent");
                }
                Err(e) if e.kind == TransportErrorKind::Permanent => {
                    let dest = self.dir.join("failed").join(path.file_name().expect("outbox files have names"));
                    fs::rename(&path, &dest)?;
                    warn!(to = %to, error = %format!("{e:#}"), "message refused permanently; kept in `{}`", dest.display());
                    report.failed += 1;
                    report.last_error = Some(format!("{e:#}"));
                }
                Err(e) => {
                    warn!(to = %to, error = %format!("{e:#}"), "send failed; will retry");
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
    /// I/O errors.
    pub fn status(&self) -> Result<OutboxStatus> {
        let count = |d: &Path| -> Result<usize> {
            Ok(fs::read_dir(d)?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                .count())
        };
        Ok(OutboxStatus { pending: count(&self.dir)?, failed: count(&self.dir.join("failed"))? })
    }
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
}

/// Keeps a copy of a refused message in `STATE/rejected/` (for messages that arrived outside the
/// transport, through `mailferry deliver`).
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
    /// Messages left in the inbox.
    pub deferred: usize,
    /// Messages sent.
    pub sent: usize,
    /// Whether a request was sent (recipient).
    pub requested: bool,
}

impl RunReport {
    fn count(&mut self, h: &Handled) {
        self.messages += 1;
        match h {
            Handled::Refused(_) => self.refused += 1,
            Handled::Duplicate { .. } => self.duplicates += 1,
            Handled::Deferred(_) => self.deferred += 1,
            _ => self.handled += 1,
        }
    }
}
