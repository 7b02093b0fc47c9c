//! The node's state database (SQLite): generations, recipients, nonces, seen messages, rejections.
//!
//! The database is the durable memory that makes the protocol safe across restarts: which nonces are
//! outstanding or answered, which sequence numbers were seen, which messages were already handled (by the
//! BLAKE3 of their raw bytes), and every refusal with its reason. It lives in the node's state directory,
//! never in the data tree, and is created readable by its owner only because it holds keys.
//!
//! Both roles share one schema; each uses the tables it needs.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context as _, Result};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::manifest::{Digest, Listed, Manifest};
use crate::protocol::Refusal;
use crate::protocol::envelope::Hints;

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE manifests (name TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE generations (
    number INTEGER PRIMARY KEY, root TEXT NOT NULL, created INTEGER NOT NULL,
    files INTEGER NOT NULL, bytes INTEGER NOT NULL, manifest BLOB NOT NULL);
CREATE TABLE recipients (
    name TEXT PRIMARY KEY, address TEXT NOT NULL, key TEXT NOT NULL, key_id TEXT NOT NULL,
    created INTEGER NOT NULL, last_seq INTEGER NOT NULL DEFAULT 0,
    last_request_at INTEGER, last_reply_at INTEGER, last_receipt_at INTEGER,
    applied_generation INTEGER, applied_root TEXT);
CREATE TABLE requests (
    nonce TEXT PRIMARY KEY, recipient TEXT NOT NULL, seq INTEGER NOT NULL, received_at INTEGER NOT NULL,
    reply_id TEXT NOT NULL, generation INTEGER NOT NULL, ops INTEGER NOT NULL, reply_bytes INTEGER NOT NULL);
CREATE TABLE outstanding (nonce TEXT PRIMARY KEY, seq INTEGER NOT NULL, sent_at INTEGER NOT NULL);
CREATE TABLE seen (digest TEXT PRIMARY KEY, at INTEGER NOT NULL, outcome TEXT NOT NULL, settled INTEGER NOT NULL DEFAULT 0);
CREATE TABLE rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL,
    sender TEXT, message_id TEXT, subject TEXT, digest TEXT);
CREATE TABLE receipts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, recipient TEXT NOT NULL, at INTEGER NOT NULL, nonce TEXT NOT NULL,
    reply_id TEXT NOT NULL, generation INTEGER NOT NULL, root TEXT NOT NULL, status TEXT NOT NULL,
    UNIQUE (recipient, reply_id));
CREATE TABLE outbox (
    name TEXT PRIMARY KEY, queued_at INTEGER NOT NULL, sender TEXT NOT NULL, rcpt TEXT NOT NULL,
    raw BLOB NOT NULL, failed_at INTEGER, error TEXT);
CREATE TABLE applied (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, generation INTEGER NOT NULL, root TEXT NOT NULL,
    reply_id TEXT NOT NULL, nonce TEXT NOT NULL, ops INTEGER NOT NULL);
";

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// An open state database.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
}

/// What the seen-store knows about a message handled before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// It was refused.
    pub rejected: bool,
    /// Its transport filed it (or it came through `deliver`).
    pub settled: bool,
    /// When it was handled.
    pub at: u64,
}

/// A refused message as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    /// When, in seconds since the Unix epoch.
    pub at: u64,
    /// Reason code.
    pub reason: String,
    /// Details.
    pub detail: String,
    /// Claimed sender (untrusted).
    pub sender: Option<String>,
    /// Message-ID (untrusted).
    pub message_id: Option<String>,
    /// Subject (untrusted).
    pub subject: Option<String>,
}

/// A registered recipient, as the owner knows it.
#[derive(Debug, Clone, Serialize)]
pub struct RecipientRow {
    /// Name.
    pub name: String,
    /// Registered address: the only one replies go to.
    pub address: String,
    /// Key in hex (secret; never serialized for output).
    #[serde(skip)]
    pub key_hex: String,
    /// Public key id.
    pub key_id: String,
    /// Highest request sequence number seen.
    pub last_seq: u64,
    /// Last authenticated request.
    pub last_request_at: Option<u64>,
    /// Last reply sent.
    pub last_reply_at: Option<u64>,
    /// Last receipt.
    pub last_receipt_at: Option<u64>,
    /// Generation the last receipt reported.
    pub applied_generation: Option<u64>,
    /// Root the last receipt reported.
    pub applied_root: Option<String>,
    /// Id of the key a rotation is delivering, until the recipient first uses it.
    pub rotating_to: Option<String>,
    /// The last delivery report of a failed reply part: seconds since the epoch, status, diagnostic
    /// (filled by the owner's `status`).
    pub last_bounce: Option<String>,
    /// The part size learned for this recipient from refusals, if any (filled by the owner's `status`).
    pub relay_limit: Option<u64>,
}

/// A key rotation under way: the new key travels with every reply until the recipient uses it.
#[derive(Debug, Clone)]
pub struct PendingKey {
    /// The new key in hex (secret).
    pub key_hex: String,
    /// Its public id.
    pub key_id: String,
    /// When the rotation started.
    pub started: u64,
    /// Seconds the old key stays valid once the new one is in use.
    pub grace: u64,
}

/// A published generation's summary.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationRow {
    /// Number, from 1.
    pub number: u64,
    /// Tree root.
    pub root: Digest,
    /// When published.
    pub created: u64,
    /// Regular files.
    pub files: u64,
    /// Bytes in regular files.
    pub bytes: u64,
}

/// The generation a recipient keeps for `mailferry recipient rollback`.
#[derive(Debug, Clone)]
pub struct Previous {
    /// Its number.
    pub generation: u64,
    /// Its tree.
    pub manifest: Manifest,
    /// The directory (under the staging root) whose `previous/` holds the files it had that the current
    /// generation replaced or deleted.
    pub store: std::path::PathBuf,
}

fn pack_manifest(m: &Manifest) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(&m.listing())?;
    Ok(zstd::bulk::compress(&json, 3)?)
}

fn unpack_manifest(data: &[u8]) -> Result<Manifest> {
    let json = zstd::stream::decode_all(data).context("stored manifest is corrupt")?;
    let listing: Vec<Listed> = serde_json::from_slice(&json).context("stored manifest is corrupt")?;
    Ok(Manifest::from_listing(listing)?)
}

impl Db {
    /// Opens or creates the database at `path` (mode 0600), applying the schema.
    ///
    /// # Errors
    /// I/O or SQLite errors, or a database from a newer mailferry.
    pub fn open(path: &Path) -> Result<Db> {
        let existed = path.exists();
        let conn =
            Connection::open(path).with_context(|| format!("failed to open state database `{}`", path.display()))?;
        if !existed {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("failed to restrict `{}`", path.display()))?;
        }
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        match version {
            0 => {
                conn.execute_batch(&format!(
                    "BEGIN; {SCHEMA} INSERT INTO meta (key, value) VALUES ('created_at', '{}'); \
                     PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;",
                    now()
                ))?;
            }
            SCHEMA_VERSION => {}
            v => anyhow::bail!(
                "state database `{}` has schema version {v}, newer than this mailferry understands ({SCHEMA_VERSION})",
                path.display()
            ),
        }
        // Added after schema 1 shipped to nobody: created when missing, so older state databases get it.
        // The stat cache was a table here before it became its own file (`crate::statcache`).
        conn.execute_batch(
            "DROP TABLE IF EXISTS stat_cache;
             CREATE TABLE IF NOT EXISTS sent_parts (
                reply_id TEXT NOT NULL, part INTEGER NOT NULL, recipient TEXT NOT NULL, created INTEGER NOT NULL,
                raw BLOB NOT NULL, PRIMARY KEY (reply_id, part));
             CREATE TABLE IF NOT EXISTS received_parts (
                reply_id TEXT NOT NULL, part INTEGER NOT NULL, nonce TEXT NOT NULL, received_at INTEGER NOT NULL,
                control BLOB NOT NULL, PRIMARY KEY (reply_id, part));
             CREATE TABLE IF NOT EXISTS sent_ids (
                message_id TEXT PRIMARY KEY, recipient TEXT NOT NULL, reply_id TEXT NOT NULL,
                part INTEGER NOT NULL, bytes INTEGER NOT NULL, at INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS key_rotations (
                recipient TEXT PRIMARY KEY, key TEXT NOT NULL, key_id TEXT NOT NULL, started INTEGER NOT NULL,
                grace INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS retired_keys (
                recipient TEXT NOT NULL, key TEXT NOT NULL, key_id TEXT NOT NULL, valid_until INTEGER NOT NULL,
                PRIMARY KEY (recipient, key_id));",
        )?;
        Ok(Db { conn })
    }

    /// Runs `f` in one transaction, committed only if `f` succeeds.
    ///
    /// # Errors
    /// Whatever `f` returns, or SQLite errors.
    pub fn transaction<T>(&self, f: impl FnOnce(&Db) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(self) {
            Ok(v) => {
                self.conn.execute_batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    // ---- shared ----

    /// A value from the key-value table.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self.conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?)
    }

    /// Sets a value in the key-value table.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// A numeric meta value, 0 when absent.
    ///
    /// # Errors
    /// SQLite errors or a non-numeric value.
    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        Ok(self
            .meta(key)?
            .map(|v| v.parse())
            .transpose()
            .with_context(|| format!("meta {key} is not a number"))?
            .unwrap_or(0))
    }

    /// What is recorded about a message with raw-bytes digest `digest`, if it was handled before.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn seen(&self, digest: &Digest) -> Result<Option<Seen>> {
        Ok(self
            .conn
            .query_row("SELECT outcome, settled, at FROM seen WHERE digest = ?1", [digest.to_hex()], |r| {
                Ok(Seen {
                    rejected: r.get::<_, String>(0)? == "rejected",
                    settled: r.get::<_, i64>(1)? != 0,
                    at: r.get::<_, i64>(2)? as u64,
                })
            })
            .optional()?)
    }

    /// Records that a handled message was filed by its transport (or arrived outside one): from now on an
    /// identical copy is a replay, not a re-fetch after a crash.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn mark_settled(&self, digest: &Digest) -> Result<()> {
        self.conn.execute("UPDATE seen SET settled = 1 WHERE digest = ?1", [digest.to_hex()])?;
        Ok(())
    }

    /// Records that a message was handled with `outcome` ("processed" or "rejected").
    ///
    /// # Errors
    /// SQLite errors.
    pub fn mark_seen(&self, digest: &Digest, outcome: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO seen (digest, at, outcome) VALUES (?1, ?2, ?3)",
            params![digest.to_hex(), now() as i64, outcome],
        )?;
        Ok(())
    }

    /// Records a refused message.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_rejection(&self, refusal: &Refusal, hints: &Hints, digest: &Digest) -> Result<()> {
        self.conn.execute(
            "INSERT INTO rejections (at, reason, detail, sender, message_id, subject, digest) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                now() as i64,
                refusal.reason.code(),
                refusal.detail,
                hints.from,
                hints.message_id,
                hints.subject,
                digest.to_hex()
            ],
        )?;
        Ok(())
    }

    /// Rejections recorded after id `after`, oldest first, with their ids.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn rejections_after(&self, after: i64) -> Result<Vec<(i64, Rejection)>> {
        let mut st = self.conn.prepare(
            "SELECT id, at, reason, detail, sender, message_id, subject FROM rejections WHERE id > ?1 ORDER BY id",
        )?;
        let rows = st.query_map([after], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                Rejection {
                    at: r.get::<_, i64>(1)? as u64,
                    reason: r.get(2)?,
                    detail: r.get(3)?,
                    sender: r.get(4)?,
                    message_id: r.get(5)?,
                    subject: r.get(6)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every recorded rejection, oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn rejections(&self) -> Result<Vec<Rejection>> {
        let mut st =
            self.conn.prepare("SELECT at, reason, detail, sender, message_id, subject FROM rejections ORDER BY id")?;
        let rows = st.query_map([], |r| {
            Ok(Rejection {
                at: r.get::<_, i64>(0)? as u64,
                reason: r.get(1)?,
                detail: r.get(2)?,
                sender: r.get(3)?,
                message_id: r.get(4)?,
                subject: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Number of recorded rejections.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn rejection_count(&self) -> Result<u64> {
        Ok(self.conn.query_row("SELECT count(*) FROM rejections", [], |r| r.get::<_, i64>(0))? as u64)
    }

    // ---- outbox ----

    /// Queues `raw` for `to` under `name`, replacing a message queued under the same name. Call it in the
    /// same transaction as the state change that depends on the message being sent.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outbox_put(&self, name: &str, from: &str, to: &str, raw: &[u8]) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO outbox (name, queued_at, sender, rcpt, raw) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, now() as i64, from, to, raw],
        )?;
        Ok(())
    }

    /// Names of queued messages not marked failed, oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outbox_pending(&self) -> Result<Vec<String>> {
        let mut st = self.conn.prepare("SELECT name FROM outbox WHERE failed_at IS NULL ORDER BY queued_at, name")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A queued message: sender, recipient, raw bytes.
    ///
    /// # Errors
    /// SQLite errors or no such message.
    pub fn outbox_get(&self, name: &str) -> Result<(String, String, Vec<u8>)> {
        Ok(self.conn.query_row("SELECT sender, rcpt, raw FROM outbox WHERE name = ?1", [name], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?)
    }

    /// Removes a message the transport accepted.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outbox_sent(&self, name: &str) -> Result<()> {
        self.conn.execute("DELETE FROM outbox WHERE name = ?1", [name])?;
        Ok(())
    }

    /// Marks a message the transport refused permanently; it is kept but not retried.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outbox_failed(&self, name: &str, error: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE outbox SET failed_at = ?2, error = ?3 WHERE name = ?1",
            params![name, now() as i64, error],
        )?;
        Ok(())
    }

    /// Counts of pending and failed messages, and the last failure's text.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outbox_counts(&self) -> Result<(u64, u64, Option<String>)> {
        let (pending, failed): (i64, i64) =
            self.conn.query_row("SELECT count(*) - count(failed_at), count(failed_at) FROM outbox", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        let last: Option<String> = self
            .conn
            .query_row(
                "SELECT error FROM outbox WHERE failed_at IS NOT NULL ORDER BY failed_at DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok((pending as u64, failed as u64, last))
    }

    // ---- owner ----

    /// Stores a new generation and returns its number.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn add_generation(&self, m: &Manifest) -> Result<u64> {
        let number = self.latest_generation()?.map_or(1, |g| g.number + 1);
        let (files, bytes) = m.file_stats();
        self.conn.execute(
            "INSERT INTO generations (number, root, created, files, bytes, manifest) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![number as i64, m.root().to_hex(), now() as i64, files as i64, bytes as i64, pack_manifest(m)?],
        )?;
        Ok(number)
    }

    /// The newest generation, if any was published.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn latest_generation(&self) -> Result<Option<GenerationRow>> {
        self.conn
            .query_row(
                "SELECT number, root, created, files, bytes FROM generations ORDER BY number DESC LIMIT 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                },
            )
            .optional()?
            .map(|(n, root, c, f, b)| {
                Ok(GenerationRow {
                    number: n as u64,
                    root: Digest::from_hex(&root).map_err(anyhow::Error::msg)?,
                    created: c as u64,
                    files: f as u64,
                    bytes: b as u64,
                })
            })
            .transpose()
    }

    /// The manifest of generation `number`.
    ///
    /// # Errors
    /// SQLite errors, a missing generation, or a corrupt manifest.
    pub fn generation_manifest(&self, number: u64) -> Result<Manifest> {
        let data: Vec<u8> = self
            .conn
            .query_row("SELECT manifest FROM generations WHERE number = ?1", [number as i64], |r| r.get(0))
            .optional()?
            .with_context(|| format!("generation {number} does not exist"))?;
        unpack_manifest(&data)
    }

    /// Whether generation `number` is still kept.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn has_generation(&self, number: u64) -> Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM generations WHERE number = ?1", [number as i64], |r| r.get::<_, i64>(0))?
            > 0)
    }

    /// Forgets every generation but the newest `keep`; returns the numbers forgotten.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn prune_generations(&self, keep: u64) -> Result<Vec<u64>> {
        let Some(latest) = self.latest_generation()? else { return Ok(Vec::new()) };
        let cutoff = latest.number.saturating_sub(keep) as i64;
        let mut st = self.conn.prepare("SELECT number FROM generations WHERE number <= ?1 ORDER BY number")?;
        let gone: Vec<u64> =
            st.query_map([cutoff], |r| r.get::<_, i64>(0))?.map(|n| n.map(|n| n as u64)).collect::<Result<_, _>>()?;
        self.conn.execute("DELETE FROM generations WHERE number <= ?1", [cutoff])?;
        Ok(gone)
    }

    /// Every content digest a kept generation refers to.
    ///
    /// # Errors
    /// SQLite errors or a corrupt manifest.
    pub fn kept_contents(&self) -> Result<std::collections::HashSet<Digest>> {
        let mut st = self.conn.prepare("SELECT manifest FROM generations")?;
        let mut all = std::collections::HashSet::new();
        for data in st.query_map([], |r| r.get::<_, Vec<u8>>(0))? {
            for (_, e) in unpack_manifest(&data?)?.iter() {
                if let crate::manifest::Entry::File(m) = e {
                    all.insert(m.blake3);
                }
            }
        }
        Ok(all)
    }

    /// Registers a recipient.
    ///
    /// # Errors
    /// SQLite errors, including a name that is taken.
    pub fn add_recipient(&self, name: &str, address: &str, key_hex: &str, key_id: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO recipients (name, address, key, key_id, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, address, key_hex, key_id, now() as i64],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                    anyhow::format_err!("a recipient named {name:?} is already registered")
                }
                e => e.into(),
            })?;
        Ok(())
    }

    /// A registered recipient by name.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn recipient(&self, name: &str) -> Result<Option<RecipientRow>> {
        Ok(self.recipients_where("WHERE name = ?1", [name])?.pop())
    }

    /// Every registered recipient, by name.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn recipients(&self) -> Result<Vec<RecipientRow>> {
        self.recipients_where("ORDER BY name", [])
    }

    fn recipients_where<P: rusqlite::Params>(&self, clause: &str, p: P) -> Result<Vec<RecipientRow>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT name, address, recipients.key, recipients.key_id, last_seq, last_request_at, last_reply_at,
                    last_receipt_at, applied_generation, applied_root, key_rotations.key_id
             FROM recipients LEFT JOIN key_rotations ON key_rotations.recipient = recipients.name {clause}"
        ))?;
        let rows = st.query_map(p, |r| {
            Ok(RecipientRow {
                name: r.get(0)?,
                address: r.get(1)?,
                key_hex: r.get(2)?,
                key_id: r.get(3)?,
                last_seq: r.get::<_, i64>(4)? as u64,
                last_request_at: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
                last_reply_at: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
                last_receipt_at: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
                applied_generation: r.get::<_, Option<i64>>(8)?.map(|v| v as u64),
                applied_root: r.get(9)?,
                rotating_to: r.get(10)?,
                last_bounce: None,
                relay_limit: None,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes a recipient: its key stops verifying at once.
    ///
    /// # Errors
    /// SQLite errors, or no such recipient.
    pub fn remove_recipient(&self, name: &str) -> Result<()> {
        self.transaction(|db| {
            let n = db.conn.execute("DELETE FROM recipients WHERE name = ?1", [name])?;
            anyhow::ensure!(n == 1, "no recipient named {name:?} is registered");
            db.conn.execute("DELETE FROM key_rotations WHERE recipient = ?1", [name])?;
            db.conn.execute("DELETE FROM retired_keys WHERE recipient = ?1", [name])?;
            Ok(())
        })
    }

    /// Starts (or restarts, with a fresh key) rotating `name`'s key to `key_hex`.
    ///
    /// # Errors
    /// SQLite errors, or no such recipient.
    pub fn start_key_rotation(&self, name: &str, key_hex: &str, key_id: &str, grace: u64) -> Result<()> {
        anyhow::ensure!(self.recipient(name)?.is_some(), "no recipient named {name:?} is registered");
        self.conn.execute(
            "INSERT OR REPLACE INTO key_rotations (recipient, key, key_id, started, grace) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, key_hex, key_id, now() as i64, grace as i64],
        )?;
        Ok(())
    }

    /// The rotation under way for `name`, if any.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn key_rotation(&self, name: &str) -> Result<Option<PendingKey>> {
        Ok(self
            .conn
            .query_row("SELECT key, key_id, started, grace FROM key_rotations WHERE recipient = ?1", [name], |r| {
                Ok(PendingKey {
                    key_hex: r.get(0)?,
                    key_id: r.get(1)?,
                    started: r.get::<_, i64>(2)? as u64,
                    grace: r.get::<_, i64>(3)? as u64,
                })
            })
            .optional()?)
    }

    /// The recipient used its new key: it becomes the key, and the old one is retired, still valid for
    /// the rotation's grace period. Returns the old key's id.
    ///
    /// # Errors
    /// SQLite errors, or no rotation under way.
    pub fn complete_key_rotation(&self, name: &str) -> Result<String> {
        self.transaction(|db| {
            let pending = db.key_rotation(name)?.with_context(|| format!("no key rotation for {name:?}"))?;
            let rec = db.recipient(name)?.with_context(|| format!("no recipient named {name:?}"))?;
            db.conn.execute(
                "INSERT OR REPLACE INTO retired_keys (recipient, key, key_id, valid_until) VALUES (?1, ?2, ?3, ?4)",
                params![name, rec.key_hex, rec.key_id, now().saturating_add(pending.grace) as i64],
            )?;
            db.conn.execute(
                "UPDATE recipients SET key = ?2, key_id = ?3 WHERE name = ?1",
                params![name, pending.key_hex, pending.key_id],
            )?;
            db.conn.execute("DELETE FROM key_rotations WHERE recipient = ?1", [name])?;
            Ok(rec.key_id)
        })
    }

    /// A retired key of `name` with id `key_id`, if its grace period has not ended.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn retired_key(&self, name: &str, key_id: &str) -> Result<Option<String>> {
        self.conn.execute("DELETE FROM retired_keys WHERE valid_until <= ?1", [now() as i64])?;
        Ok(self
            .conn
            .query_row(
                "SELECT key FROM retired_keys WHERE recipient = ?1 AND key_id = ?2",
                params![name, key_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Whether a request nonce was answered before.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn request_answered(&self, nonce: &str) -> Result<bool> {
        Ok(self.conn.query_row("SELECT count(*) FROM requests WHERE nonce = ?1", [nonce], |r| r.get::<_, i64>(0))? > 0)
    }

    /// Records an answered request and advances the recipient's sequence number.
    ///
    /// # Errors
    /// SQLite errors.
    #[allow(clippy::too_many_arguments)]
    pub fn record_answer(
        &self,
        recipient: &str,
        nonce: &str,
        seq: u64,
        reply_id: &str,
        generation: u64,
        ops: usize,
        reply_bytes: usize,
    ) -> Result<()> {
        let t = now() as i64;
        self.conn.execute(
            "INSERT INTO requests (nonce, recipient, seq, received_at, reply_id, generation, ops, reply_bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![nonce, recipient, seq as i64, t, reply_id, generation as i64, ops as i64, reply_bytes as i64],
        )?;
        self.conn.execute(
            "UPDATE recipients SET last_seq = ?2, last_request_at = ?3, last_reply_at = ?3 WHERE name = ?1",
            params![recipient, seq as i64, t],
        )?;
        Ok(())
    }

    /// The reply id and generation the owner sent for `recipient`'s request `nonce`, if it answered it.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn answered_for(&self, recipient: &str, nonce: &str) -> Result<Option<(String, u64)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT reply_id, generation FROM requests WHERE nonce = ?1 AND recipient = ?2",
                params![nonce, recipient],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)),
            )
            .optional()?)
    }

    /// The generation of reply `reply_id` sent to `recipient`, if the owner sent it.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn reply_generation(&self, recipient: &str, reply_id: &str) -> Result<Option<u64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT generation FROM requests WHERE reply_id = ?1 AND recipient = ?2 LIMIT 1",
                params![reply_id, recipient],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(|g| g as u64))
    }

    /// Whether a receipt for this reply was recorded already.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn receipt_recorded(&self, recipient: &str, reply_id: &str) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT count(*) FROM receipts WHERE recipient = ?1 AND reply_id = ?2",
            params![recipient, reply_id],
            |r| r.get::<_, i64>(0),
        )? > 0)
    }

    /// Records a receipt and what it says the recipient now has.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_receipt(&self, r: &crate::protocol::Receipt) -> Result<()> {
        let t = now() as i64;
        let status = serde_json::to_value(r.status)?.as_str().unwrap_or("applied").to_owned();
        self.conn.execute(
            "INSERT OR IGNORE INTO receipts (recipient, at, nonce, reply_id, generation, root, status)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![r.recipient, t, r.nonce.to_hex(), r.reply_id, r.generation as i64, r.root.to_hex(), status],
        )?;
        self.conn.execute(
            "UPDATE recipients SET last_receipt_at = ?2, applied_generation = ?3, applied_root = ?4 WHERE name = ?1",
            params![r.recipient, t, r.generation as i64, r.root.to_hex()],
        )?;
        Ok(())
    }

    // ---- recipient ----

    /// Takes the next request sequence number.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn next_seq(&self) -> Result<u64> {
        let seq = self.meta_u64("seq")? + 1;
        self.set_meta("seq", &seq.to_string())?;
        Ok(seq)
    }

    /// Records a request as sent and awaiting its reply.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn add_outstanding(&self, nonce: &str, seq: u64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO outstanding (nonce, seq, sent_at) VALUES (?1, ?2, ?3)",
            params![nonce, seq as i64, now() as i64],
        )?;
        self.set_meta("last_request_at", &now().to_string())
    }

    /// The sequence number of the request with `nonce`, if it is still outstanding.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outstanding(&self, nonce: &str) -> Result<Option<u64>> {
        Ok(self
            .conn
            .query_row("SELECT seq FROM outstanding WHERE nonce = ?1", [nonce], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|v| v as u64))
    }

    /// The send time of the newest outstanding request.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn newest_outstanding(&self) -> Result<Option<u64>> {
        Ok(self
            .conn
            .query_row("SELECT max(sent_at) FROM outstanding", [], |r| r.get::<_, Option<i64>>(0))?
            .map(|v| v as u64))
    }

    /// Number of outstanding requests.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outstanding_count(&self) -> Result<u64> {
        Ok(self.conn.query_row("SELECT count(*) FROM outstanding", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Marks a request answered: its nonce is no longer accepted.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn close_outstanding(&self, nonce: &str) -> Result<()> {
        self.conn.execute("DELETE FROM outstanding WHERE nonce = ?1", [nonce])?;
        Ok(())
    }

    /// Records that a fresh, authenticated reply was accepted now (applied, or confirming the tree is
    /// current): the clock that staleness is measured on.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn mark_fresh_reply(&self) -> Result<()> {
        self.set_meta("last_reply_at", &now().to_string())?;
        self.set_meta("stale_notified_at", "")
    }

    /// When this state database was created (the start of the staleness clock before any reply).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn created_at(&self) -> Result<Option<u64>> {
        Ok(self.meta("created_at")?.and_then(|v| v.parse().ok()))
    }

    /// Forgets outstanding requests older than `max_age` seconds, keeping the newest 16 in any case.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn expire_outstanding(&self, max_age: u64) -> Result<()> {
        let cutoff = now().saturating_sub(max_age) as i64;
        self.conn.execute(
            "DELETE FROM outstanding WHERE sent_at < ?1
               AND nonce NOT IN (SELECT nonce FROM outstanding ORDER BY sent_at DESC LIMIT 16)",
            [cutoff],
        )?;
        Ok(())
    }

    /// The generation and root this recipient last applied, without loading the manifest.
    ///
    /// # Errors
    /// SQLite errors or a corrupt root.
    pub fn applied_root(&self) -> Result<(u64, Option<Digest>)> {
        let generation = self.meta_u64("applied_generation")?;
        let root = self.meta("applied_root")?.map(|r| Digest::from_hex(&r)).transpose().map_err(anyhow::Error::msg)?;
        Ok((generation, root))
    }

    /// The generation, root and manifest this recipient last applied.
    ///
    /// # Errors
    /// SQLite errors or a corrupt manifest.
    pub fn applied(&self) -> Result<(u64, Option<Digest>, Manifest)> {
        let (generation, root) = self.applied_root()?;
        let manifest: Option<Vec<u8>> =
            self.conn.query_row("SELECT data FROM manifests WHERE name = 'applied'", [], |r| r.get(0)).optional()?;
        let manifest = manifest.map(|d| unpack_manifest(&d)).transpose()?.unwrap_or_default();
        Ok((generation, root, manifest))
    }

    /// Records a completed apply: the new generation, its root and manifest, and the history row.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_applied(
        &self,
        generation: u64,
        manifest: &Manifest,
        reply_id: &str,
        nonce: &str,
        ops: usize,
    ) -> Result<()> {
        let root = manifest.root();
        self.set_meta("applied_generation", &generation.to_string())?;
        self.set_meta("applied_root", &root.to_hex())?;
        self.conn.execute(
            "INSERT OR REPLACE INTO manifests (name, data) VALUES ('applied', ?1)",
            [pack_manifest(manifest)?],
        )?;
        self.conn.execute(
            "INSERT INTO applied (at, generation, root, reply_id, nonce, ops) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![now() as i64, generation as i64, root.to_hex(), reply_id, nonce, ops as i64],
        )?;
        Ok(())
    }

    /// The generation kept for `mailferry recipient rollback`, if any.
    ///
    /// # Errors
    /// SQLite errors or a corrupt manifest.
    pub fn previous(&self) -> Result<Option<Previous>> {
        let generation = self.meta_u64("previous_generation")?;
        let store = self.meta("previous_store")?.filter(|s| !s.is_empty());
        let manifest: Option<Vec<u8>> =
            self.conn.query_row("SELECT data FROM manifests WHERE name = 'previous'", [], |r| r.get(0)).optional()?;
        let (Some(store), Some(manifest), true) = (store, manifest, generation > 0) else { return Ok(None) };
        Ok(Some(Previous { generation, manifest: unpack_manifest(&manifest)?, store: store.into() }))
    }

    /// Keeps `generation` with `manifest` for a rollback, its files in `store`, replacing what was kept.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_previous(&self, generation: u64, manifest: &Manifest, store: &Path) -> Result<()> {
        let store = store.to_str().with_context(|| format!("`{}` is not UTF-8", store.display()))?;
        self.set_meta("previous_generation", &generation.to_string())?;
        self.set_meta("previous_store", store)?;
        self.conn.execute(
            "INSERT OR REPLACE INTO manifests (name, data) VALUES ('previous', ?1)",
            [pack_manifest(manifest)?],
        )?;
        Ok(())
    }

    /// Forgets the generation kept for a rollback.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn clear_previous(&self) -> Result<()> {
        self.set_meta("previous_generation", "0")?;
        self.set_meta("previous_store", "")?;
        self.conn.execute("DELETE FROM manifests WHERE name = 'previous'", [])?;
        Ok(())
    }

    /// Records a finished rollback: `generation` with `manifest` is applied again (a history row under
    /// `id`), nothing is kept for another rollback, and generations up to `held` are held back.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_rollback(&self, generation: u64, manifest: &Manifest, id: &str, ops: usize, held: u64) -> Result<()> {
        // A history row with no nonce: no reply brought it.
        self.record_applied(generation, manifest, id, "", ops)?;
        self.clear_previous()?;
        let held = held.max(self.rollback_hold()?.unwrap_or(0));
        self.set_rollback_hold(Some(held))
    }

    /// The generation a rollback holds back: replies bringing it or an older one are not applied.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn rollback_hold(&self) -> Result<Option<u64>> {
        Ok(Some(self.meta_u64("rollback_hold")?).filter(|g| *g > 0))
    }

    /// Sets or (with `None`) ends the rollback hold.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_rollback_hold(&self, held: Option<u64>) -> Result<()> {
        self.set_meta("rollback_hold", &held.unwrap_or(0).to_string())
    }

    /// Whether a reply with this id was applied already.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn reply_applied(&self, reply_id: &str) -> Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM applied WHERE reply_id = ?1", [reply_id], |r| r.get::<_, i64>(0))?
            > 0)
    }

    // ---- parts ----

    /// Keeps a sent reply part, so that it can be sent again if it is lost.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn keep_sent_part(&self, reply_id: &str, part: u32, recipient: &str, raw: &[u8]) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO sent_parts (reply_id, part, recipient, created, raw) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![reply_id, part, recipient, now() as i64, raw],
        )?;
        Ok(())
    }

    /// Remembers which reply part went out under `message_id`, so that a delivery report naming it can be
    /// understood. Forgotten with the kept parts' age limit.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_sent_id(
        &self,
        message_id: &str,
        recipient: &str,
        reply_id: &str,
        part: u32,
        bytes: usize,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO sent_ids (message_id, recipient, reply_id, part, bytes, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![message_id, recipient, reply_id, part, bytes as i64, now() as i64],
        )?;
        Ok(())
    }

    /// The reply part sent under `message_id`: recipient, reply id, part number and size in bytes.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn sent_id(&self, message_id: &str) -> Result<Option<(String, String, u32, u64)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT recipient, reply_id, part, bytes FROM sent_ids WHERE message_id = ?1",
                [message_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)? as u64)),
            )
            .optional()?)
    }

    /// The reply a queued reply part (outbox name `reply-NONCE-PART`) belongs to.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn reply_of_outbox_name(&self, name: &str) -> Result<Option<String>> {
        let Some(nonce) = name.strip_prefix("reply-").and_then(|r| r.split('-').next()) else { return Ok(None) };
        Ok(self.conn.query_row("SELECT reply_id FROM requests WHERE nonce = ?1", [nonce], |r| r.get(0)).optional()?)
    }

    /// A kept reply part of `recipient`'s, if it is still kept.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn sent_part(&self, recipient: &str, reply_id: &str, part: u32) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .query_row(
                "SELECT raw FROM sent_parts WHERE reply_id = ?1 AND part = ?2 AND recipient = ?3",
                params![reply_id, part, recipient],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Forgets the kept parts of a reply (its receipt arrived) or of every reply older than `max_age`
    /// seconds. Returns how many parts were dropped.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn drop_sent_parts(&self, reply_id: Option<&str>, max_age: u64) -> Result<usize> {
        let cutoff = now().saturating_sub(max_age) as i64;
        // Message ids outlive the parts (a report may come after a receipt dropped them), not their age.
        self.conn.execute("DELETE FROM sent_ids WHERE at < ?1", [cutoff])?;
        Ok(self
            .conn
            .execute("DELETE FROM sent_parts WHERE reply_id = ?1 OR created < ?2", params![reply_id, cutoff])?)
    }

    /// Records a verified part of a reply (its chunk is on disk) with its control bytes.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_part(&self, reply_id: &str, part: u32, nonce: &str, control: &[u8]) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO received_parts (reply_id, part, nonce, received_at, control)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![reply_id, part, nonce, now() as i64, control],
        )?;
        Ok(())
    }

    /// The parts of a reply received so far, with their control bytes.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn received_parts(&self, reply_id: &str) -> Result<Vec<(u32, Vec<u8>)>> {
        let mut st = self.conn.prepare("SELECT part, control FROM received_parts WHERE reply_id = ?1 ORDER BY part")?;
        let rows = st.query_map([reply_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Incomplete replies: reply id, nonce, and when the last part arrived.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn partial_replies(&self) -> Result<Vec<(String, String, u64)>> {
        let mut st = self.conn.prepare(
            "SELECT reply_id, nonce, max(received_at) FROM received_parts GROUP BY reply_id ORDER BY 3 DESC",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets the received parts of a reply.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn forget_parts(&self, reply_id: &str) -> Result<()> {
        self.conn.execute("DELETE FROM received_parts WHERE reply_id = ?1", [reply_id])?;
        Ok(())
    }

    /// Forgets every outstanding request (a reply was applied: the tree they described is gone).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn close_all_outstanding(&self) -> Result<()> {
        self.conn.execute("DELETE FROM outstanding", [])?;
        Ok(())
    }
}
