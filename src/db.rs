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

use crate::crypto::KeyId;
pub use crate::engine::owner::{LearnedLimit, SentMessage};
use crate::manifest::{Digest, Listed, Manifest};
use crate::protocol::envelope::Hints;
use crate::protocol::{Refusal, ReplyId};

// Reply ids and key ids are stored as TEXT, exactly as before they had types. A value read back was
// checked before it was written (or made by this node), so it is taken as it is.
macro_rules! sql_text_id {
    ($t:ty) => {
        impl rusqlite::ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(rusqlite::types::ToSqlOutput::from(self.as_str()))
            }
        }

        impl rusqlite::types::FromSql for $t {
            fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
                String::column_result(value).map(<$t>::unchecked)
            }
        }
    };
}
sql_text_id!(ReplyId);
sql_text_id!(KeyId);

/// The schema, as numbered migrations: migration `i` (from 0) takes a database from schema version `i` to
/// `i + 1`. A database is created by running them all, and an existing one is brought up to date by
/// running those it has not had, each in its own transaction together with the version it sets. Written
/// once: never edit a migration that has shipped, add one.
const MIGRATIONS: &[&str] = &[
    // 1: the schema of the first release.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
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
     INSERT INTO meta (key, value) VALUES ('created_at', CAST(strftime('%s', 'now') AS TEXT));",
    // 2: typed state. The tables the first release created on open when missing (so a database of any
    // build of it has them), the facts that lived as untyped `meta` keys moved into typed tables, the
    // recipient's facts keyed by subscription ('default' for the one data tree of today), the owner's
    // generations keyed by channel ('default'), and replies' roots kept so that receipts can be checked.
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
        PRIMARY KEY (recipient, key_id));

     CREATE TABLE node (
        id INTEGER PRIMARY KEY CHECK (id = 1), created_at INTEGER NOT NULL,
        rejections_reported_id INTEGER NOT NULL DEFAULT 0, rejections_reported_at INTEGER NOT NULL DEFAULT 0,
        signing_key TEXT);
     INSERT INTO node (id, created_at, rejections_reported_id, rejections_reported_at, signing_key) VALUES (1,
        coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'created_at'), CAST(strftime('%s', 'now') AS INTEGER)),
        coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'rejections_reported_id'), 0),
        coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'rejections_reported_at'), 0),
        (SELECT value FROM meta WHERE key = 'signing_key'));

     CREATE TABLE transport_status (
        id INTEGER PRIMARY KEY CHECK (id = 1), last_error TEXT, last_error_at INTEGER, last_ok_at INTEGER,
        receive_mode TEXT, receive_mode_at INTEGER);
     INSERT INTO transport_status VALUES (1,
        (SELECT value FROM meta WHERE key = 'transport.last_error'),
        (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'transport.last_error_at'),
        (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'transport.last_ok_at'),
        (SELECT value FROM meta WHERE key = 'transport.receive_mode'),
        (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'transport.receive_mode_at'));

     ALTER TABLE sent_ids ADD COLUMN token TEXT;
     CREATE TABLE relay_limits (
        recipient TEXT PRIMARY KEY, limit_bytes INTEGER NOT NULL, learned_at INTEGER NOT NULL,
        refused_bytes INTEGER, reply_id TEXT);
     INSERT INTO relay_limits (recipient, limit_bytes, learned_at)
        SELECT substr(key, 13), CAST(value AS INTEGER), CAST(strftime('%s', 'now') AS INTEGER) FROM meta WHERE key LIKE 'relay\\_limit.%' ESCAPE '\\' AND value != '';
     CREATE TABLE bounces (recipient TEXT PRIMARY KEY, summary TEXT NOT NULL);
     INSERT INTO bounces SELECT substr(key, 8), value FROM meta WHERE key LIKE 'bounce.%' AND value != '';
     CREATE TABLE resends (reply_id TEXT PRIMARY KEY, count INTEGER NOT NULL);
     CREATE TABLE bsdiff_spent (recipient TEXT PRIMARY KEY, day INTEGER NOT NULL, bytes INTEGER NOT NULL);
     INSERT INTO resends SELECT substr(key, 8), CAST(value AS INTEGER) FROM meta WHERE key LIKE 'resent.%' AND value != '';

     CREATE TABLE subscriptions (
        name TEXT PRIMARY KEY, seq INTEGER NOT NULL DEFAULT 0,
        applied_generation INTEGER NOT NULL DEFAULT 0, applied_root TEXT, applied_key_id TEXT,
        last_request_at INTEGER, last_reply_at INTEGER, stale_notified_at INTEGER,
        need_full_inventory INTEGER NOT NULL DEFAULT 0, full_content INTEGER NOT NULL DEFAULT 0,
        previous_generation INTEGER NOT NULL DEFAULT 0, previous_store TEXT,
        rollback_hold INTEGER NOT NULL DEFAULT 0, previous_key TEXT, previous_key_until INTEGER, pending_key TEXT,
        fresh_next INTEGER NOT NULL DEFAULT 0);
     INSERT INTO subscriptions (name, seq, applied_generation, applied_root, last_request_at, last_reply_at,
            stale_notified_at, need_full_inventory, full_content, previous_generation, previous_store,
            rollback_hold, previous_key, previous_key_until) VALUES ('default',
        coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'seq'), 0),
        coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'applied_generation'), 0),
        (SELECT nullif(value, '') FROM meta WHERE key = 'applied_root'),
        (SELECT CAST(nullif(value, '') AS INTEGER) FROM meta WHERE key = 'last_request_at'),
        (SELECT CAST(nullif(value, '') AS INTEGER) FROM meta WHERE key = 'last_reply_at'),
        (SELECT CAST(nullif(value, '') AS INTEGER) FROM meta WHERE key = 'stale_notified_at'),
        coalesce((SELECT value = '1' FROM meta WHERE key = 'need_full_inventory'), 0),
        coalesce((SELECT value = '1' FROM meta WHERE key = 'full_content'), 0),
        coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'previous_generation'), 0),
        (SELECT nullif(value, '') FROM meta WHERE key = 'previous_store'),
        coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'rollback_hold'), 0),
        (SELECT nullif(value, '') FROM meta WHERE key = 'previous_key'),
        (SELECT CAST(nullif(value, '') AS INTEGER) FROM meta WHERE key = 'previous_key_until'));
     DROP TABLE meta;

     ALTER TABLE manifests RENAME TO manifests_v1;
     CREATE TABLE manifests (subscription TEXT NOT NULL, name TEXT NOT NULL, data BLOB NOT NULL,
        PRIMARY KEY (subscription, name));
     INSERT INTO manifests SELECT 'default', name, data FROM manifests_v1;
     DROP TABLE manifests_v1;

     ALTER TABLE generations RENAME TO generations_v1;
     CREATE TABLE generations (
        channel TEXT NOT NULL DEFAULT 'default', number INTEGER NOT NULL, root TEXT NOT NULL,
        created INTEGER NOT NULL, files INTEGER NOT NULL, bytes INTEGER NOT NULL, manifest BLOB NOT NULL,
        PRIMARY KEY (channel, number));
     INSERT INTO generations SELECT 'default', number, root, created, files, bytes, manifest FROM generations_v1;
     DROP TABLE generations_v1;

     ALTER TABLE requests ADD COLUMN root TEXT;
     ALTER TABLE requests ADD COLUMN base TEXT;
     ALTER TABLE requests ADD COLUMN created INTEGER;
     ALTER TABLE requests ADD COLUMN parts INTEGER;
     ALTER TABLE requests ADD COLUMN full_content INTEGER NOT NULL DEFAULT 0;
     CREATE TABLE wanted_replies (
        reply_id TEXT PRIMARY KEY, subscription TEXT NOT NULL, nonce TEXT NOT NULL, parts INTEGER NOT NULL);
     UPDATE requests SET root = (SELECT g.root FROM generations g WHERE g.number = requests.generation);
     ALTER TABLE outstanding ADD COLUMN subscription TEXT NOT NULL DEFAULT 'default';
     ALTER TABLE applied ADD COLUMN subscription TEXT NOT NULL DEFAULT 'default';
     ALTER TABLE received_parts ADD COLUMN subscription TEXT NOT NULL DEFAULT 'default';",
    // 3: a reply part is stored once. A queued reply part refers to the kept copy in `sent_parts` (which
    // its resends need anyway) instead of holding its own bytes: `raw` is then empty.
    "ALTER TABLE outbox ADD COLUMN kept_reply TEXT;
     ALTER TABLE outbox ADD COLUMN kept_part INTEGER;",
];

/// The schema version this build writes: the number of migrations.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The one data tree of a recipient today; the state keys the recipient's facts by subscription.
pub const DEFAULT_SUBSCRIPTION: &str = "default";

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Brings the database up to [`SCHEMA_VERSION`], one migration per transaction.
fn migrate(conn: &Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        anyhow::bail!(
            "it has schema version {version}, newer than this mailferry understands ({SCHEMA_VERSION}); \
             use a newer mailferry"
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version)?) {
        let to = i + 1;
        conn.execute_batch(&format!("BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {to}; COMMIT;"))
            .inspect_err(|_| {
                let _ = conn.execute_batch("ROLLBACK");
            })
            .with_context(|| format!("migration to schema version {to} failed"))?;
        if version > 0 {
            tracing::info!(from = to - 1, to, "migrated the state database");
        }
    }
    Ok(())
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

/// The one subscription of today's recipient, whose facts the state keys by subscription.
const SUB: &str = DEFAULT_SUBSCRIPTION;

/// What a recipient knows about one subscription (its data tree).
#[derive(Debug, Clone, Default)]
pub struct Subscription {
    /// The last request sequence number used.
    pub seq: u64,
    /// The generation applied, 0 for none.
    pub applied_generation: u64,
    /// Its root, hex.
    pub applied_root: Option<String>,
    /// The id of the key whose reply brought it (none for a rollback, or before ids were recorded).
    pub applied_key_id: Option<KeyId>,
    /// When the last request was queued.
    pub last_request_at: Option<u64>,
    /// When the last fresh, authenticated reply was accepted.
    pub last_reply_at: Option<u64>,
    /// When a staleness notice went out in the current stale spell.
    pub stale_notified_at: Option<u64>,
    /// The next request lists the whole tree.
    pub need_full_inventory: bool,
    /// The next request asks for whole files only.
    pub full_content: bool,
    /// Replies bringing this generation or an older one are held back (0: no hold).
    pub rollback_hold: u64,
    /// The key a rotation replaced (hex, secret).
    pub previous_key: Option<String>,
    /// Until when replies under it are accepted.
    pub previous_key_until: Option<u64>,
    /// A new key taken up but not yet written to the key file (hex, secret).
    pub pending_key: Option<String>,
    /// The next request asks `fresh` (a reference reply pointed to a reply this recipient cannot use).
    pub fresh_next: bool,
}

/// What `status` shows about the mail system: the last server error and how new mail is noticed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TransportStatus {
    /// The last error a mail server (or the spool) reported, as shown to the operator.
    pub last_error: Option<String>,
    /// When it happened (Unix seconds).
    pub last_error_at: Option<u64>,
    /// When a run last completed with nothing left to retry (Unix seconds); later than `last_error_at`
    /// means the error is over.
    pub last_ok_at: Option<u64>,
    /// `idle`, `poll` (IMAP) or `interval` (spool), as the last run found it.
    pub receive_mode: Option<String>,
    /// When `receive_mode` was recorded (Unix seconds).
    pub receive_mode_at: Option<u64>,
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
    /// BLAKE3 of the raw message (names its kept copy, `STATE/rejected/DIGEST.eml`).
    pub digest: Option<String>,
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
    pub key_id: KeyId,
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
    /// Replies sent to it in the current budget period (filled by the owner's `status`).
    pub spent_replies: u64,
    /// Their bytes (filled by the owner's `status`).
    pub spent_bytes: u64,
}

/// A request answered, as recorded.
#[derive(Debug, Clone, Copy)]
pub struct Answered<'a> {
    /// Who asked.
    pub recipient: &'a str,
    /// The request's nonce, hex.
    pub nonce: &'a str,
    /// Its seq (the recipient's new last seq).
    pub seq: u64,
    /// The time the request says it was made (a hint, kept to tell a second machine from a delay).
    pub created: u64,
    /// The reply.
    pub reply_id: &'a ReplyId,
    /// The generation it brings.
    pub generation: u64,
    /// That generation's root.
    pub root: Digest,
    /// The root of the tree the reply was computed against.
    pub base: Digest,
    /// Operations in it.
    pub ops: usize,
    /// Bytes queued.
    pub reply_bytes: usize,
    /// The parts it went out in.
    pub parts: u32,
    /// Whether the request asked for whole files only.
    pub full_content: bool,
}

/// A key rotation under way: the new key travels with every reply until the recipient uses it.
#[derive(Debug, Clone)]
pub struct PendingKey {
    /// The new key in hex (secret).
    pub key_hex: String,
    /// Its public id.
    pub key_id: KeyId,
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
        migrate(&conn).with_context(|| format!("failed to bring state database `{}` up to date", path.display()))?;
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

    // ---- node ----

    /// When this state database was created (the start of the staleness clock before any reply).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn created_at(&self) -> Result<Option<u64>> {
        Ok(self
            .conn
            .query_row("SELECT created_at FROM node WHERE id = 1", [], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|v| v as u64))
    }

    /// The last rejection id summarised to the admin, and when.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn rejections_reported(&self) -> Result<(i64, u64)> {
        Ok(self.conn.query_row(
            "SELECT rejections_reported_id, rejections_reported_at FROM node WHERE id = 1",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// Records the last rejection summarised, and when.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_rejections_reported(&self, id: i64, at: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE node SET rejections_reported_id = ?1, rejections_reported_at = ?2 WHERE id = 1",
            params![id, at as i64],
        )?;
        Ok(())
    }

    /// The owner's Ed25519 signing key (hex seed), if one was made.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn signing_key(&self) -> Result<Option<String>> {
        Ok(self.conn.query_row("SELECT signing_key FROM node WHERE id = 1", [], |r| r.get(0))?)
    }

    /// Stores the owner's Ed25519 signing key.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_signing_key(&self, hex: &str) -> Result<()> {
        self.conn.execute("UPDATE node SET signing_key = ?1 WHERE id = 1", [hex])?;
        Ok(())
    }

    /// What the last run recorded about the mail system.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn transport_status(&self) -> Result<TransportStatus> {
        Ok(self.conn.query_row(
            "SELECT last_error, last_error_at, last_ok_at, receive_mode, receive_mode_at FROM transport_status",
            [],
            |r| {
                Ok(TransportStatus {
                    last_error: r.get(0)?,
                    last_error_at: r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
                    last_ok_at: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                    receive_mode: r.get(3)?,
                    receive_mode_at: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                })
            },
        )?)
    }

    /// Records a transport or run error.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_transport_error(&self, text: &str, at: u64) -> Result<()> {
        self.conn
            .execute("UPDATE transport_status SET last_error = ?1, last_error_at = ?2", params![text, at as i64])?;
        Ok(())
    }

    /// Records that a run finished with nothing left to retry.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_transport_ok(&self, at: u64) -> Result<()> {
        self.conn.execute("UPDATE transport_status SET last_ok_at = ?1", [at as i64])?;
        Ok(())
    }

    /// Records how the running daemon notices new mail.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_receive_mode(&self, mode: &str, at: u64) -> Result<()> {
        self.conn
            .execute("UPDATE transport_status SET receive_mode = ?1, receive_mode_at = ?2", params![mode, at as i64])?;
        Ok(())
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

    /// Records a refusal of a message that was never read (refused by its size): no sender, no digest.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_unread_rejection(&self, refusal: &Refusal) -> Result<()> {
        self.conn.execute(
            "INSERT INTO rejections (at, reason, detail) VALUES (?1, ?2, ?3)",
            params![now() as i64, refusal.reason.code(), refusal.detail],
        )?;
        Ok(())
    }

    /// Rejections recorded after id `after`, oldest first, with their ids.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn rejections_after(&self, after: i64) -> Result<Vec<(i64, Rejection)>> {
        let mut st = self.conn.prepare(
            "SELECT id, at, reason, detail, sender, message_id, subject, digest FROM rejections WHERE id > ?1 ORDER BY id",
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
                    digest: r.get(7)?,
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
        let mut st = self
            .conn
            .prepare("SELECT at, reason, detail, sender, message_id, subject, digest FROM rejections ORDER BY id")?;
        let rows = st.query_map([], |r| {
            Ok(Rejection {
                at: r.get::<_, i64>(0)? as u64,
                reason: r.get(1)?,
                detail: r.get(2)?,
                sender: r.get(3)?,
                message_id: r.get(4)?,
                subject: r.get(5)?,
                digest: r.get(6)?,
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

    /// Queues the kept reply part `part` of `reply_id` (see [`Db::keep_sent_part`]) for `to` under `name`,
    /// without storing its bytes a second time. The part stays kept while it is queued.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outbox_put_kept(&self, name: &str, from: &str, to: &str, reply_id: &ReplyId, part: u32) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO outbox (name, queued_at, sender, rcpt, raw, kept_reply, kept_part)
             VALUES (?1, ?2, ?3, ?4, x'', ?5, ?6)",
            params![name, now() as i64, from, to, reply_id, part],
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
        let (from, to, raw, kept): (String, String, Option<Vec<u8>>, Option<String>) = self.conn.query_row(
            "SELECT o.sender, o.rcpt, CASE WHEN o.kept_reply IS NULL THEN o.raw ELSE p.raw END, o.kept_reply
             FROM outbox o LEFT JOIN sent_parts p ON p.reply_id = o.kept_reply AND p.part = o.kept_part
             WHERE o.name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        let raw = raw.with_context(|| {
            format!("queued message {name:?} is reply {} whose kept part is gone", kept.unwrap_or_default())
        })?;
        Ok((from, to, raw))
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
    pub fn add_recipient(&self, name: &str, address: &str, key_hex: &str, key_id: &KeyId) -> Result<()> {
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
                spent_replies: 0,
                spent_bytes: 0,
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
    pub fn start_key_rotation(&self, name: &str, key_hex: &str, key_id: &KeyId, grace: u64) -> Result<()> {
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
    /// the rotation's grace period. Returns the old key's id. Call it in the transaction of the step that
    /// accepted the message made under the new key.
    ///
    /// # Errors
    /// SQLite errors, or no rotation under way.
    pub fn complete_key_rotation(&self, name: &str) -> Result<KeyId> {
        let db = self;
        {
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
        }
    }

    /// Replaces `name`'s key at once (enrolled afresh): a rotation under way and retired keys are dropped.
    ///
    /// # Errors
    /// SQLite errors, or no such recipient.
    pub fn replace_key(&self, name: &str, key_hex: &str, key_id: &KeyId) -> Result<()> {
        let n = self
            .conn
            .execute("UPDATE recipients SET key = ?2, key_id = ?3 WHERE name = ?1", params![name, key_hex, key_id])?;
        anyhow::ensure!(n == 1, "no recipient named {name:?} is registered");
        self.conn.execute("DELETE FROM key_rotations WHERE recipient = ?1", [name])?;
        self.conn.execute("DELETE FROM retired_keys WHERE recipient = ?1", [name])?;
        Ok(())
    }

    /// Forgets the recipient's previous and pending keys (its key file was replaced by a new enrollment).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn forget_keys(&self) -> Result<()> {
        self.conn.execute(
            "UPDATE subscriptions SET previous_key = NULL, previous_key_until = NULL, pending_key = NULL WHERE name = ?1",
            [SUB],
        )?;
        Ok(())
    }

    /// A retired key of `name` with id `key_id`, if its grace period has not ended.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn retired_key(&self, name: &str, key_id: &KeyId) -> Result<Option<String>> {
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
    pub fn record_answer(&self, a: &Answered<'_>) -> Result<()> {
        let t = now() as i64;
        let Answered {
            recipient,
            nonce,
            seq,
            created,
            reply_id,
            generation,
            root,
            base,
            ops,
            reply_bytes,
            parts,
            full_content,
        } = *a;
        self.conn.execute(
            "INSERT INTO requests (nonce, recipient, seq, received_at, reply_id, generation, ops, reply_bytes, root, base,
                                   created, parts, full_content)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                nonce,
                recipient,
                seq as i64,
                t,
                reply_id,
                generation as i64,
                ops as i64,
                reply_bytes as i64,
                root.to_hex(),
                base.to_hex(),
                created as i64,
                parts,
                full_content
            ],
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
    pub fn answered_for(&self, recipient: &str, nonce: &str) -> Result<Option<(ReplyId, u64, Option<Digest>)>> {
        let row = self
            .conn
            .query_row(
                "SELECT reply_id, generation, root FROM requests WHERE nonce = ?1 AND recipient = ?2",
                params![nonce, recipient],
                |r| Ok((r.get::<_, ReplyId>(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, Option<String>>(2)?)),
            )
            .optional()?;
        row.map(|(id, g, root)| {
            let root = root.map(|r| Digest::from_hex(&r)).transpose().map_err(anyhow::Error::msg)?;
            Ok((id, g, root))
        })
        .transpose()
    }

    /// The `created` time stated by `recipient`'s request with the highest seq answered.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn last_request_created(&self, recipient: &str) -> Result<Option<u64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT created FROM requests WHERE recipient = ?1 ORDER BY seq DESC LIMIT 1",
                [recipient],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()?
            .flatten()
            .map(|v| v as u64))
    }

    /// The newest reply with operations sent to `recipient` for a tree with root `base`, bringing
    /// `generation`, for a request asking `full_content` or not, whose receipt has not come and whose
    /// first part is still kept: reply id, the nonce it answered, its parts.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn repeat_of(
        &self,
        recipient: &str,
        base: &Digest,
        generation: u64,
        full_content: bool,
    ) -> Result<Option<(ReplyId, String, u32)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT q.reply_id, q.nonce, q.parts FROM requests q
                 WHERE q.recipient = ?1 AND q.base = ?2 AND q.generation = ?3 AND q.full_content = ?4
                   AND q.ops > 0 AND q.parts IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM receipts r WHERE r.recipient = q.recipient AND r.reply_id = q.reply_id)
                   AND EXISTS (SELECT 1 FROM sent_parts p WHERE p.reply_id = q.reply_id AND p.part = 1)
                 ORDER BY q.seq DESC LIMIT 1",
                params![recipient, base.to_hex(), generation as i64, full_content],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?)
    }

    /// How many replies (answers and resends) `recipient` was sent since `since`, and their bytes.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn spent_since(&self, recipient: &str, since: u64) -> Result<(u64, u64)> {
        Ok(self.conn.query_row(
            "SELECT count(*), coalesce(sum(reply_bytes), 0) FROM requests WHERE recipient = ?1 AND received_at >= ?2",
            params![recipient, since as i64],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// The part size learned for `recipient` from refusals and reports, and when it was learned.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn relay_limit(&self, recipient: &str) -> Result<Option<LearnedLimit>> {
        Ok(self
            .conn
            .query_row(
                "SELECT limit_bytes, learned_at, refused_bytes, reply_id FROM relay_limits WHERE recipient = ?1",
                [recipient],
                |r| {
                    Ok(LearnedLimit {
                        limit: r.get::<_, i64>(0)? as u64,
                        learned_at: r.get::<_, i64>(1)? as u64,
                        refused: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                        reply_id: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// Sets (or with `None` forgets) the part size learned for `recipient`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_relay_limit(&self, recipient: &str, limit: Option<&LearnedLimit>) -> Result<()> {
        match limit {
            Some(l) => self.conn.execute(
                "INSERT OR REPLACE INTO relay_limits (recipient, limit_bytes, learned_at, refused_bytes, reply_id)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![recipient, l.limit as i64, l.learned_at as i64, l.refused.map(|v| v as i64), l.reply_id],
            )?,
            None => self.conn.execute("DELETE FROM relay_limits WHERE recipient = ?1", [recipient])?,
        };
        Ok(())
    }

    /// The last failed delivery of a reply part to `recipient`, as shown by `status`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn bounce(&self, recipient: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT summary FROM bounces WHERE recipient = ?1", [recipient], |r| r.get(0))
            .optional()?)
    }

    /// Records the last failed delivery of a reply part to `recipient`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_bounce(&self, recipient: &str, summary: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO bounces (recipient, summary) VALUES (?1, ?2)",
            params![recipient, summary],
        )?;
        Ok(())
    }

    /// The day (since the epoch) and bytes of fresh bsdiff work last counted for `recipient`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn bsdiff_spent(&self, recipient: &str) -> Result<Option<(u64, u64)>> {
        Ok(self
            .conn
            .query_row("SELECT day, bytes FROM bsdiff_spent WHERE recipient = ?1", [recipient], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .optional()?)
    }

    /// Records `bytes` of fresh bsdiff work for `recipient` on `day`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_bsdiff_spent(&self, recipient: &str, day: u64, bytes: u64) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO bsdiff_spent (recipient, day, bytes) VALUES (?1, ?2, ?3)",
            params![recipient, day as i64, bytes as i64],
        )?;
        Ok(())
    }

    /// How often the kept parts of `reply_id` were sent again.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn resent(&self, reply_id: &ReplyId) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT count FROM resends WHERE reply_id = ?1", [reply_id], |r| r.get::<_, i64>(0))
            .optional()?
            .map_or(0, |v| v as u64))
    }

    /// Counts one more resend of the kept parts of `reply_id`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn count_resend(&self, reply_id: &ReplyId) -> Result<()> {
        self.conn.execute(
            "INSERT INTO resends (reply_id, count) VALUES (?1, 1)
             ON CONFLICT (reply_id) DO UPDATE SET count = count + 1",
            [reply_id],
        )?;
        Ok(())
    }

    /// The generation of reply `reply_id` sent to `recipient`, if the owner sent it.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn reply_generation(&self, recipient: &str, reply_id: &ReplyId) -> Result<Option<u64>> {
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
    pub fn receipt_recorded(&self, recipient: &str, reply_id: &ReplyId) -> Result<bool> {
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
        let seq = self.subscription()?.seq + 1;
        self.conn.execute("UPDATE subscriptions SET seq = ?1 WHERE name = ?2", params![seq as i64, SUB])?;
        Ok(seq)
    }

    /// The recipient's facts about its data tree.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn subscription(&self) -> Result<Subscription> {
        Ok(self.conn.query_row(
            "SELECT seq, applied_generation, applied_root, applied_key_id, last_request_at, last_reply_at,
                    stale_notified_at, need_full_inventory, full_content, rollback_hold, previous_key,
                    previous_key_until, pending_key, fresh_next
             FROM subscriptions WHERE name = ?1",
            [SUB],
            |r| {
                let opt = |v: Option<i64>| v.map(|v| v as u64);
                Ok(Subscription {
                    seq: r.get::<_, i64>(0)? as u64,
                    applied_generation: r.get::<_, i64>(1)? as u64,
                    applied_root: r.get(2)?,
                    applied_key_id: r.get(3)?,
                    last_request_at: opt(r.get(4)?),
                    last_reply_at: opt(r.get(5)?),
                    stale_notified_at: opt(r.get(6)?),
                    need_full_inventory: r.get(7)?,
                    full_content: r.get(8)?,
                    rollback_hold: r.get::<_, i64>(9)? as u64,
                    previous_key: r.get(10)?,
                    previous_key_until: opt(r.get(11)?),
                    pending_key: r.get(12)?,
                    fresh_next: r.get(13)?,
                })
            },
        )?)
    }

    /// Whether the next request lists the whole tree (the owner asked for it).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_need_full_inventory(&self, on: bool) -> Result<()> {
        self.conn.execute("UPDATE subscriptions SET need_full_inventory = ?1 WHERE name = ?2", params![on, SUB])?;
        Ok(())
    }

    /// Whether the next request asks for whole files only (a delta base was not what the owner thought).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_full_content(&self, on: bool) -> Result<()> {
        self.conn.execute("UPDATE subscriptions SET full_content = ?1 WHERE name = ?2", params![on, SUB])?;
        Ok(())
    }

    /// Whether the next request asks `fresh`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_fresh_next(&self, on: bool) -> Result<()> {
        self.conn.execute("UPDATE subscriptions SET fresh_next = ?1 WHERE name = ?2", params![on, SUB])?;
        Ok(())
    }

    /// Records that every part of reply `reply_id` (answering `nonce`, in `parts` parts) is wanted: a
    /// reference reply pointed to it and none of it is here. The next request asks for them.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn want_reply(&self, reply_id: &ReplyId, nonce: &str, parts: u32) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO wanted_replies (reply_id, subscription, nonce, parts) VALUES (?1, ?2, ?3, ?4)",
            params![reply_id, SUB, nonce, parts],
        )?;
        Ok(())
    }

    /// The replies wanted whole: reply id, nonce, parts.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn wanted_replies(&self) -> Result<Vec<(ReplyId, String, u32)>> {
        let mut st = self.conn.prepare("SELECT reply_id, nonce, parts FROM wanted_replies WHERE subscription = ?1")?;
        let rows = st.query_map([SUB], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records that a staleness notice went out (or, with `None`, that the stale spell is over).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_stale_notified(&self, at: Option<u64>) -> Result<()> {
        self.conn.execute(
            "UPDATE subscriptions SET stale_notified_at = ?1 WHERE name = ?2",
            params![at.map(|v| v as i64), SUB],
        )?;
        Ok(())
    }

    /// Takes up a new key (in the transaction that accepts the reply bringing it): the current key is kept
    /// as the previous one until `until`, and the new one waits in `pending_key` until the key file holds it.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn take_key(
        &self,
        current_hex: &str,
        current_id: &KeyId,
        until: u64,
        new_hex: &str,
        new_id: &KeyId,
    ) -> Result<()> {
        // A rotation authenticated by the key the applied generation came under continues its epoch.
        self.conn.execute(
            "UPDATE subscriptions SET previous_key = ?1, previous_key_until = ?2, pending_key = ?3,
                    applied_key_id = CASE WHEN applied_key_id = ?4 THEN ?5 ELSE applied_key_id END
             WHERE name = ?6",
            params![current_hex, until as i64, new_hex, current_id, new_id, SUB],
        )?;
        Ok(())
    }

    /// The new key is in the key file: nothing is pending any more.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn clear_pending_key(&self) -> Result<()> {
        self.conn.execute("UPDATE subscriptions SET pending_key = NULL WHERE name = ?1", [SUB])?;
        Ok(())
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
        self.conn
            .execute("UPDATE subscriptions SET last_request_at = ?1 WHERE name = ?2", params![now() as i64, SUB])?;
        Ok(())
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
        self.conn.execute(
            "UPDATE subscriptions SET last_reply_at = ?1, stale_notified_at = NULL WHERE name = ?2",
            params![now() as i64, SUB],
        )?;
        Ok(())
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
        let sub = self.subscription()?;
        let root = sub.applied_root.map(|r| Digest::from_hex(&r)).transpose().map_err(anyhow::Error::msg)?;
        Ok((sub.applied_generation, root))
    }

    fn manifest_named(&self, name: &str) -> Result<Option<Manifest>> {
        let data: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT data FROM manifests WHERE subscription = ?1 AND name = ?2", [SUB, name], |r| r.get(0))
            .optional()?;
        data.map(|d| unpack_manifest(&d)).transpose()
    }

    fn set_manifest_named(&self, name: &str, m: &Manifest) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO manifests (subscription, name, data) VALUES (?1, ?2, ?3)",
            params![SUB, name, pack_manifest(m)?],
        )?;
        Ok(())
    }

    /// The generation, root and manifest this recipient last applied.
    ///
    /// # Errors
    /// SQLite errors or a corrupt manifest.
    pub fn applied(&self) -> Result<(u64, Option<Digest>, Manifest)> {
        let (generation, root) = self.applied_root()?;
        Ok((generation, root, self.manifest_named("applied")?.unwrap_or_default()))
    }

    /// Records a completed apply: the new generation, its root and manifest, the id of the key whose reply
    /// brought it (`None` for a rollback), and the history row.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_applied(
        &self,
        generation: u64,
        manifest: &Manifest,
        reply_id: &ReplyId,
        nonce: &str,
        ops: usize,
        key_id: Option<&KeyId>,
    ) -> Result<()> {
        let root = manifest.root();
        self.conn.execute(
            "UPDATE subscriptions SET applied_generation = ?1, applied_root = ?2,
                    applied_key_id = coalesce(?3, applied_key_id) WHERE name = ?4",
            params![generation as i64, root.to_hex(), key_id, SUB],
        )?;
        self.set_manifest_named("applied", manifest)?;
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
        let (generation, store): (i64, Option<String>) = self.conn.query_row(
            "SELECT previous_generation, previous_store FROM subscriptions WHERE name = ?1",
            [SUB],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let store = store.filter(|s| !s.is_empty());
        let manifest = self.manifest_named("previous")?;
        let (Some(store), Some(manifest), true) = (store, manifest, generation > 0) else { return Ok(None) };
        Ok(Some(Previous { generation: generation as u64, manifest, store: store.into() }))
    }

    /// Keeps `generation` with `manifest` for a rollback, its files in `store`, replacing what was kept.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_previous(&self, generation: u64, manifest: &Manifest, store: &Path) -> Result<()> {
        let store = store.to_str().with_context(|| format!("`{}` is not UTF-8", store.display()))?;
        self.conn.execute(
            "UPDATE subscriptions SET previous_generation = ?1, previous_store = ?2 WHERE name = ?3",
            params![generation as i64, store, SUB],
        )?;
        self.set_manifest_named("previous", manifest)
    }

    /// Forgets the generation kept for a rollback.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn clear_previous(&self) -> Result<()> {
        self.conn.execute(
            "UPDATE subscriptions SET previous_generation = 0, previous_store = NULL WHERE name = ?1",
            [SUB],
        )?;
        self.conn.execute("DELETE FROM manifests WHERE subscription = ?1 AND name = 'previous'", [SUB])?;
        Ok(())
    }

    /// Records a finished rollback: `generation` with `manifest` is applied again (a history row under
    /// `id`), nothing is kept for another rollback, and generations up to `held` are held back.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_rollback(
        &self,
        generation: u64,
        manifest: &Manifest,
        id: &ReplyId,
        ops: usize,
        held: u64,
    ) -> Result<()> {
        // A history row with no nonce: no reply brought it.
        self.record_applied(generation, manifest, id, "", ops, None)?;
        self.clear_previous()?;
        let held = held.max(self.rollback_hold()?.unwrap_or(0));
        self.set_rollback_hold(Some(held))
    }

    /// The generation a rollback holds back: replies bringing it or an older one are not applied.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn rollback_hold(&self) -> Result<Option<u64>> {
        Ok(Some(self.subscription()?.rollback_hold).filter(|g| *g > 0))
    }

    /// Sets or (with `None`) ends the rollback hold.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_rollback_hold(&self, held: Option<u64>) -> Result<()> {
        self.conn.execute(
            "UPDATE subscriptions SET rollback_hold = ?1 WHERE name = ?2",
            params![held.unwrap_or(0) as i64, SUB],
        )?;
        Ok(())
    }

    /// Whether a reply with this id was applied already.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn reply_applied(&self, reply_id: &ReplyId) -> Result<bool> {
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
    pub fn keep_sent_part(&self, reply_id: &ReplyId, part: u32, recipient: &str, raw: &[u8]) -> Result<()> {
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
    pub fn record_sent_id(&self, message_id: &str, sent: &SentMessage) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO sent_ids (message_id, recipient, reply_id, part, bytes, at, token)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![message_id, sent.recipient, sent.reply_id, sent.part, sent.bytes as i64, now() as i64, sent.token],
        )?;
        Ok(())
    }

    /// The reply part sent under `message_id`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn sent_id(&self, message_id: &str) -> Result<Option<SentMessage>> {
        Ok(self
            .conn
            .query_row(
                "SELECT recipient, reply_id, part, bytes, token FROM sent_ids WHERE message_id = ?1",
                [message_id],
                |r| {
                    Ok(SentMessage {
                        recipient: r.get(0)?,
                        reply_id: r.get(1)?,
                        part: r.get(2)?,
                        bytes: r.get::<_, i64>(3)? as u64,
                        token: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// How many parts reply `reply_id` was sent in, as far as their message ids are remembered.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn sent_part_count(&self, reply_id: &ReplyId) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM sent_ids WHERE reply_id = ?1", [reply_id], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// The reply a queued reply part (outbox name `reply-NONCE-PART`) belongs to.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn reply_of_outbox_name(&self, name: &str) -> Result<Option<ReplyId>> {
        let Some(nonce) = name.strip_prefix("reply-").and_then(|r| r.split('-').next()) else { return Ok(None) };
        Ok(self.conn.query_row("SELECT reply_id FROM requests WHERE nonce = ?1", [nonce], |r| r.get(0)).optional()?)
    }

    /// A kept reply part of `recipient`'s, if it is still kept.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn sent_part(&self, recipient: &str, reply_id: &ReplyId, part: u32) -> Result<Option<Vec<u8>>> {
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
    pub fn drop_sent_parts(&self, reply_id: Option<&ReplyId>, max_age: u64) -> Result<usize> {
        let cutoff = now().saturating_sub(max_age) as i64;
        // Message ids outlive the parts (a report may come after a receipt dropped them), not their age.
        self.conn.execute("DELETE FROM sent_ids WHERE at < ?1", [cutoff])?;
        // A part still queued is the outbox's only copy of it: it stays until sent (or failed).
        Ok(self.conn.execute(
            "DELETE FROM sent_parts WHERE (reply_id = ?1 OR created < ?2)
               AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.kept_reply = sent_parts.reply_id
                               AND o.kept_part = sent_parts.part AND o.failed_at IS NULL)",
            params![reply_id, cutoff],
        )?)
    }

    /// Records a verified part of a reply (its chunk is on disk) with its control bytes.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_part(&self, reply_id: &ReplyId, part: u32, nonce: &str, control: &[u8]) -> Result<()> {
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
    pub fn received_parts(&self, reply_id: &ReplyId) -> Result<Vec<(u32, Vec<u8>)>> {
        let mut st = self.conn.prepare("SELECT part, control FROM received_parts WHERE reply_id = ?1 ORDER BY part")?;
        let rows = st.query_map([reply_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Incomplete replies: reply id, nonce, and when the last part arrived.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn partial_replies(&self) -> Result<Vec<(ReplyId, String, u64)>> {
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
    pub fn forget_parts(&self, reply_id: &ReplyId) -> Result<()> {
        self.conn.execute("DELETE FROM received_parts WHERE reply_id = ?1", [reply_id])?;
        self.conn.execute("DELETE FROM wanted_replies WHERE reply_id = ?1", [reply_id])?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens a copy of a state database that the first release (schema 1) wrote, in `fixtures/state/`.
    fn open_fixture(name: &str) -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/state").join(name), &path).unwrap();
        let db = Db::open(&path).unwrap();
        (dir, db)
    }

    fn version(db: &Db) -> i64 {
        db.conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_recipient_database_of_the_first_release_migrates_in_place() {
        let (_dir, db) = open_fixture("recipient-v1.db");
        assert_eq!(version(&db), SCHEMA_VERSION);
        let sub = db.subscription().unwrap();
        assert_eq!(sub.seq, 2);
        assert_eq!(sub.applied_generation, 1);
        assert_eq!(sub.applied_root.as_deref().map(|r| &r[..12]), Some("4abc1472930a"));
        assert_eq!(sub.applied_key_id, None, "not recorded by the first release");
        assert!(sub.last_request_at.is_some() && sub.last_reply_at.is_some());
        assert_eq!((sub.need_full_inventory, sub.full_content, sub.rollback_hold), (false, false, 0));
        assert_eq!(sub.stale_notified_at, None, "an empty meta value is no notice");
        let (generation, root, manifest) = db.applied().unwrap();
        assert_eq!((generation, root.map(|r| r.short())), (1, Some("4abc1472930a".to_owned())));
        assert_eq!(manifest.len(), 3, "a.txt, d, d/b.txt");
        assert_eq!(db.outstanding_count().unwrap(), 1);
        assert!(db.previous().unwrap().is_none());
        assert_eq!(db.created_at().unwrap(), Some(1_796_128_624));
        assert_eq!(db.transport_status().unwrap().receive_mode.as_deref(), Some("interval"));
        let meta: i64 =
            db.conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'meta'", [], |r| r.get(0)).unwrap();
        assert_eq!(meta, 0, "no untyped meta table is left");
    }

    #[test]
    fn an_owner_database_of_the_first_release_migrates_in_place() {
        let (_dir, db) = open_fixture("owner-v1.db");
        assert_eq!(version(&db), SCHEMA_VERSION);
        let latest = db.latest_generation().unwrap().unwrap();
        assert_eq!((latest.number, latest.root.short()), (2, "4aab7bfbb7f7".to_owned()));
        assert_eq!(db.generation_manifest(1).unwrap().root().short(), "4abc1472930a");
        let rec = db.recipient("site1").unwrap().unwrap();
        assert_eq!((rec.last_seq, rec.applied_generation), (2, Some(1)));
        assert_eq!(db.key_rotation("site1").unwrap().unwrap().key_id, "c6dc7da7e7f1f2d6");
        // Replies recorded by the first release get the root of the generation they brought.
        let (reply_id, generation, root) =
            db.answered_for("site1", "87a716c67a7bc3ea150eac524f3be194").unwrap().unwrap();
        assert_eq!((reply_id.as_str(), generation), ("8db5a1a0e8b4c22675131103358015c7", 1));
        assert_eq!(root.map(|r| r.short()), Some("4abc1472930a".to_owned()));
        assert_eq!(db.spent_since("site1", 0).unwrap().0, 2);
        assert_eq!(db.relay_limit("site1").unwrap(), None);
        assert_eq!(db.signing_key().unwrap(), None);
    }

    #[test]
    fn a_queued_reply_part_is_its_kept_copy_and_stays_kept_while_queued() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("state.db")).unwrap();
        let id = ReplyId::unchecked("ab".repeat(16));
        db.keep_sent_part(&id, 1, "site1", b"the part").unwrap();
        db.outbox_put_kept("reply-n-0001", "o@x", "s@x", &id, 1).unwrap();
        assert_eq!(db.outbox_get("reply-n-0001").unwrap(), ("o@x".into(), "s@x".into(), b"the part".to_vec()));
        // A receipt (or age) drops kept parts, but not one the outbox still has to send.
        assert_eq!(db.drop_sent_parts(Some(&id), 0).unwrap(), 0);
        assert_eq!(db.outbox_get("reply-n-0001").unwrap().2, b"the part");
        db.outbox_sent("reply-n-0001").unwrap();
        assert_eq!(db.drop_sent_parts(Some(&id), 0).unwrap(), 1, "sent: dropped");
        db.outbox_put_kept("reply-n-0002", "o@x", "s@x", &id, 2).unwrap();
        let err = format!("{:#}", db.outbox_get("reply-n-0002").unwrap_err());
        assert!(err.contains("whose kept part is gone"), "{err}");
    }

    #[test]
    fn a_database_is_reopened_without_migrating_again_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let db = Db::open(&path).unwrap();
        db.next_seq().unwrap();
        drop(db);
        let db = Db::open(&path).unwrap();
        assert_eq!(db.subscription().unwrap().seq, 1, "state survives a reopen");
        db.conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        drop(db);
        let err = format!("{:#}", Db::open(&path).unwrap_err());
        assert!(err.contains("newer than this mailferry understands"), "{err}");
    }

    #[test]
    fn a_failed_migration_leaves_the_database_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!("{}; PRAGMA user_version = 1;", MIGRATIONS[0])).unwrap();
        // A table in the way of migration 2 makes it fail part way.
        conn.execute_batch("CREATE TABLE node (x INTEGER);").unwrap();
        drop(conn);
        let err = format!("{:#}", Db::open(&path).unwrap_err());
        assert!(err.contains("migration to schema version 2 failed"), "{err}");
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        let meta: i64 = conn.query_row("SELECT count(*) FROM meta", [], |r| r.get(0)).unwrap();
        assert_eq!((v, meta), (1, 1), "still schema 1, meta untouched");
    }
}
