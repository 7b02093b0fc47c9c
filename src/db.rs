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
pub use crate::engine::owner::{LearnedLimit, SentMessage, SentReply};
use crate::manifest::{Digest, Listed, Manifest};
use crate::protocol::envelope::Hints;
use crate::protocol::{Refusal, ReplyId};

mod broadcast;
mod channels;
mod subscription;

pub use broadcast::{HeldPart, TicketRow};
pub use channels::{ChannelRow, GrantRow, GroupRow};
pub use subscription::Sub;

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
    // 3: channels, groups and grants (owner); keys move from the default subscription to the node, and
    // each subscription learns what the owner said of its entitlement (recipient).
    "CREATE TABLE channels (
        name TEXT PRIMARY KEY, source TEXT, created INTEGER NOT NULL,
        open INTEGER NOT NULL DEFAULT 0, encrypt INTEGER NOT NULL DEFAULT 0);
     INSERT INTO channels (name, source, created, open) VALUES ('default', NULL, CAST(strftime('%s', 'now') AS INTEGER), 1);
     CREATE TABLE groups (name TEXT PRIMARY KEY, created INTEGER NOT NULL);
     CREATE TABLE group_members (
        grp TEXT NOT NULL, recipient TEXT NOT NULL, PRIMARY KEY (grp, recipient));
     CREATE TABLE grants (
        grp TEXT NOT NULL, channel TEXT NOT NULL, until TEXT, pin INTEGER, selector TEXT,
        created INTEGER NOT NULL, PRIMARY KEY (grp, channel));
     CREATE TABLE channel_seqs (
        recipient TEXT NOT NULL, channel TEXT NOT NULL, last_seq INTEGER NOT NULL,
        PRIMARY KEY (recipient, channel));
     INSERT INTO channel_seqs SELECT name, 'default', last_seq FROM recipients;
     CREATE TABLE channel_keys (
        channel TEXT NOT NULL, epoch INTEGER NOT NULL, key TEXT NOT NULL, created INTEGER NOT NULL,
        PRIMARY KEY (channel, epoch));
     ALTER TABLE recipients ADD COLUMN suspended INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE requests ADD COLUMN channel TEXT NOT NULL DEFAULT 'default';
     ALTER TABLE receipts ADD COLUMN channel TEXT NOT NULL DEFAULT 'default';
     CREATE INDEX requests_by_recipient ON requests (recipient, channel);

     ALTER TABLE node ADD COLUMN previous_key TEXT;
     ALTER TABLE node ADD COLUMN previous_key_until INTEGER;
     ALTER TABLE node ADD COLUMN pending_key TEXT;
     UPDATE node SET
        previous_key = (SELECT previous_key FROM subscriptions WHERE name = 'default'),
        previous_key_until = (SELECT previous_key_until FROM subscriptions WHERE name = 'default'),
        pending_key = (SELECT pending_key FROM subscriptions WHERE name = 'default');
     ALTER TABLE subscriptions ADD COLUMN standing TEXT;
     ALTER TABLE subscriptions ADD COLUMN pinned INTEGER;",
    // 4: registration: the owner's tags per recipient, which grant selectors test (`tag = "eu"`); the facts
    // each recipient last registered (owner); what the recipient last registered (recipient).
    "CREATE TABLE recipient_tags (
        recipient TEXT NOT NULL, tag TEXT NOT NULL, PRIMARY KEY (recipient, tag));
     CREATE TABLE registrations (
        recipient TEXT PRIMARY KEY, facts TEXT NOT NULL, digest TEXT NOT NULL, created INTEGER NOT NULL,
        received_at INTEGER NOT NULL);
     ALTER TABLE node ADD COLUMN registered_digest TEXT;
     ALTER TABLE node ADD COLUMN registered_pending TEXT;",
    // 5 (install): failed install hooks, and the verified update kept ready for `recipient approve` or
    // its apply window (its uncommitted journal, as JSON), per subscription.
    "CREATE TABLE hook_failures (
        id INTEGER PRIMARY KEY AUTOINCREMENT, subscription TEXT NOT NULL, at INTEGER NOT NULL,
        generation INTEGER NOT NULL, reply_id TEXT NOT NULL, hook TEXT NOT NULL, exit_status INTEGER,
        output_tail TEXT NOT NULL, action TEXT NOT NULL);
     CREATE TABLE install_waiting (
        subscription TEXT PRIMARY KEY, generation INTEGER NOT NULL, reply_id TEXT NOT NULL,
        base TEXT NOT NULL, reason TEXT NOT NULL, since INTEGER NOT NULL, journal BLOB NOT NULL);",
    // 6: the fleet's version database (owner): per recipient and channel what it has, as its requests and
    // receipts state it, when it last made contact and the interval it is expected at; every outcome of a
    // reply (applied, current, failed, rolled back) as history, the receipts recorded so far moved into it;
    // which state each recipient was last alerted in, and when the last alert went. On a recipient, which
    // negative receipts it sent (at most one per request).
    "CREATE TABLE fleet (
        recipient TEXT NOT NULL, channel TEXT NOT NULL DEFAULT 'default',
        generation INTEGER, root TEXT, stated_created INTEGER, stated_at INTEGER,
        last_contact_at INTEGER, interval INTEGER,
        PRIMARY KEY (recipient, channel));
     INSERT INTO fleet (recipient, channel, generation, root, stated_at, last_contact_at)
        SELECT name, 'default', applied_generation, applied_root, last_receipt_at,
               CASE WHEN last_request_at IS NULL THEN last_receipt_at
                    WHEN last_receipt_at IS NULL THEN last_request_at
                    ELSE max(last_request_at, last_receipt_at) END
        FROM recipients WHERE applied_generation IS NOT NULL OR last_request_at IS NOT NULL;
     CREATE TABLE fleet_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, recipient TEXT NOT NULL, channel TEXT NOT NULL DEFAULT 'default',
        at INTEGER NOT NULL, created INTEGER, event TEXT NOT NULL, reply_id TEXT, nonce TEXT,
        generation INTEGER, root TEXT, reason TEXT, detail TEXT);
     CREATE INDEX fleet_events_by_recipient ON fleet_events (recipient, channel, id);
     INSERT INTO fleet_events (recipient, channel, at, event, reply_id, nonce, generation, root)
        SELECT recipient, 'default', at, status, reply_id, nonce, generation, root FROM receipts ORDER BY id;
     CREATE TABLE fleet_alerts (
        recipient TEXT NOT NULL, channel TEXT NOT NULL DEFAULT 'default', state TEXT NOT NULL, at INTEGER NOT NULL,
        PRIMARY KEY (recipient, channel));
     ALTER TABLE node ADD COLUMN fleet_alert_at INTEGER;
     CREATE TABLE failure_receipts (
        subscription TEXT NOT NULL DEFAULT 'default', nonce TEXT NOT NULL, reply_id TEXT NOT NULL,
        reason TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (subscription, nonce));",
    // 7: the owner's console (`owner serve`) and its command-line twins: under `require-approval` a
    // generation is offered only once approved; every admin action is logged with who took it.
    "CREATE TABLE approvals (
        channel TEXT NOT NULL, number INTEGER NOT NULL, approved_at INTEGER NOT NULL, approved_by TEXT NOT NULL,
        PRIMARY KEY (channel, number));
     CREATE TABLE admin_actions (
        id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
        target TEXT NOT NULL);",
    // 8: a reply part is stored once. A queued reply part refers to the kept copy in `sent_parts` (which
    // its resends need anyway) instead of holding its own bytes: `raw` is then empty.
    "ALTER TABLE outbox ADD COLUMN kept_reply TEXT;
     ALTER TABLE outbox ADD COLUMN kept_part INTEGER;",
    // 9: the signed broadcast (protocol §7.11). On an owner, each broadcast made (its parts travel through
    // the outbox, once). On a recipient, the tickets it accepted and the broadcast parts it holds for a
    // ticket to come, with the message's hints for the refusal recorded when the bound passes.
    "CREATE TABLE broadcasts (
        id TEXT PRIMARY KEY, channel TEXT NOT NULL, generation INTEGER NOT NULL, root TEXT NOT NULL,
        base TEXT NOT NULL, parts INTEGER NOT NULL, bytes INTEGER NOT NULL, tickets INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL);
     CREATE TABLE tickets (
        reply_id TEXT PRIMARY KEY, subscription TEXT NOT NULL, broadcast_id TEXT NOT NULL, nonce TEXT NOT NULL,
        key_id TEXT NOT NULL, control BLOB NOT NULL, at INTEGER NOT NULL);
     CREATE INDEX tickets_by_broadcast ON tickets (broadcast_id);
     CREATE TABLE held_broadcast_parts (
        broadcast_id TEXT NOT NULL, part INTEGER NOT NULL, subscription TEXT NOT NULL, control BLOB NOT NULL,
        size INTEGER NOT NULL, digest TEXT NOT NULL, sender TEXT, message_id TEXT, subject TEXT,
        at INTEGER NOT NULL, PRIMARY KEY (broadcast_id, part));",
    // 10: old generations. A generation beyond `keep-generations` keeps its file list here (its content
    // maybe only as deltas in the store), so a request naming it is still rebuilt and answered directly;
    // `keep-history` bounds how long.
    "CREATE TABLE old_generations (
        channel TEXT NOT NULL, number INTEGER NOT NULL, root TEXT NOT NULL, created INTEGER NOT NULL,
        pruned_at INTEGER NOT NULL, manifest BLOB NOT NULL, PRIMARY KEY (channel, number));",
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

/// The recipient's keys besides the key file (node-wide: one identity for every subscription).
#[derive(Debug, Clone, Default)]
pub struct NodeKeys {
    /// The key a rotation replaced (hex, secret).
    pub previous_key: Option<String>,
    /// Until when replies under it are accepted.
    pub previous_key_until: Option<u64>,
    /// A new key taken up but not yet written to the key file (hex, secret).
    pub pending_key: Option<String>,
}

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
    /// What the owner last said of this recipient's entitlement to the channel (`not-entitled`,
    /// `expired on DATE`, `suspended`, `pinned at N`), if anything but plain service.
    pub standing: Option<String>,
    /// The generation the owner pins this recipient at, if it said so.
    pub pinned: Option<u64>,
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
    /// Generation the recipient has, as its last request or receipt (of any outcome) stated it.
    pub applied_generation: Option<u64>,
    /// Root of its tree, as stated with `applied_generation`.
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
    /// Suspended (`owner suspend`, or the console): its requests are refused and nothing is sent to it.
    pub suspended: bool,
}

/// A request answered, as recorded.
#[derive(Debug, Clone, Copy)]
pub struct Answered<'a> {
    /// Who asked.
    pub recipient: &'a str,
    /// For which channel.
    pub channel: &'a str,
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
    /// The root of the tree the reply was computed against (the request's).
    pub base: Digest,
    /// The generation the request says the recipient has (with `base`, what the fleet's version database
    /// notes of it).
    pub stated_generation: u64,
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

/// A failed install hook, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HookFailureRow {
    /// When (Unix seconds).
    pub at: u64,
    /// The generation being installed.
    pub generation: u64,
    /// The reply that brought it.
    pub reply_id: ReplyId,
    /// Which hook: `post-apply`, or `shipped post-apply`.
    pub hook: String,
    /// Its exit code; none when it was killed (by a signal, or at the timeout).
    pub exit_status: Option<i32>,
    /// The last bytes of what it wrote to stdout and stderr.
    pub output_tail: String,
    /// What was done: `rolled-back`, `kept`, or `kept: WHY` when a rollback was not possible.
    pub action: String,
}

/// A verified, staged update kept ready to install (`install = "manual"` or an apply window).
#[derive(Debug, Clone)]
pub struct WaitingRow {
    /// The generation it brings.
    pub generation: u64,
    /// The reply.
    pub reply_id: ReplyId,
    /// The tree root it was planned against: the tree must still be that when it is installed.
    pub base: Digest,
    /// `manual` or `apply-window`.
    pub reason: String,
    /// Since when it waits (Unix seconds).
    pub since: u64,
    /// Its journal, not yet committed (JSON).
    pub journal: Vec<u8>,
}

/// A kept generation with its channel and approval (when, by whom).
#[derive(Debug, Clone, Serialize)]
pub struct KeptGeneration {
    /// Its channel.
    pub channel: String,
    /// The generation.
    pub generation: GenerationRow,
    /// When and by whom it was approved for serving.
    pub approved: Option<(u64, String)>,
}

/// An admin action as logged (`owner serve`, `owner approve`, `owner suspend`, `owner resume`).
#[derive(Debug, Clone, Serialize)]
pub struct AdminAction {
    /// When (Unix seconds).
    pub at: u64,
    /// Who: `console ADDRESS` or `cli`.
    pub actor: String,
    /// What: `approve`, `suspend`, `resume`.
    pub action: String,
    /// On what: a recipient's name, or `CHANNEL/GENERATION`.
    pub target: String,
}

/// A receipt the owner recorded.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiptRow {
    /// When it was recorded (Unix seconds).
    pub at: u64,
    /// The reply it confirms.
    pub reply_id: ReplyId,
    /// The generation it reports.
    pub generation: u64,
    /// That generation's root, hex.
    pub root: String,
    /// What it says (`applied`, ...).
    pub status: String,
}

/// A request the owner answered.
#[derive(Debug, Clone, Serialize)]
pub struct AnswerRow {
    /// When it was answered (Unix seconds).
    pub at: u64,
    /// The request's sequence number.
    pub seq: u64,
    /// The reply.
    pub reply_id: ReplyId,
    /// The generation it brings.
    pub generation: u64,
    /// Operations in it.
    pub ops: u64,
    /// Bytes queued.
    pub bytes: u64,
    /// Parts it went out in (unknown for replies of the first release).
    pub parts: Option<u64>,
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

    /// Runs `f` in one read transaction: everything it reads is one snapshot, and (in WAL mode) it blocks
    /// no writer, so a reader such as the console never holds up the daemon.
    ///
    /// # Errors
    /// Whatever `f` returns, or SQLite errors.
    pub fn read<T>(&self, f: impl FnOnce(&Db) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN DEFERRED")?;
        let out = f(self);
        // A read transaction has nothing to commit: ending it either way releases the snapshot.
        let _ = self.conn.execute_batch(if out.is_ok() { "COMMIT" } else { "ROLLBACK" });
        out
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
        self.rejections_where("ORDER BY id", [])
    }

    fn rejections_where<P: rusqlite::Params>(&self, clause: &str, p: P) -> Result<Vec<Rejection>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT at, reason, detail, sender, message_id, subject, digest FROM rejections {clause}"
        ))?;
        let rows = st.query_map(p, |r| {
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
    pub fn add_generation(&self, channel: &str, m: &Manifest) -> Result<u64> {
        let number = self.latest_generation(channel)?.map_or(1, |g| g.number + 1);
        let (files, bytes) = m.file_stats();
        self.conn.execute(
            "INSERT INTO generations (channel, number, root, created, files, bytes, manifest)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                channel,
                number as i64,
                m.root().to_hex(),
                now() as i64,
                files as i64,
                bytes as i64,
                pack_manifest(m)?
            ],
        )?;
        Ok(number)
    }

    /// The newest generation of `channel`, if any was published.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn latest_generation(&self, channel: &str) -> Result<Option<GenerationRow>> {
        Ok(self.generations_where("WHERE channel = ?1 ORDER BY number DESC LIMIT 1", [channel])?.pop())
    }

    /// Generation `number` of `channel`, if it is kept.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn generation(&self, channel: &str, number: u64) -> Result<Option<GenerationRow>> {
        Ok(self.generations_where("WHERE channel = ?1 AND number = ?2", params![channel, number as i64])?.pop())
    }

    /// The kept generations of `channel`, oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn generations(&self, channel: &str) -> Result<Vec<GenerationRow>> {
        self.generations_where("WHERE channel = ?1 ORDER BY number", [channel])
    }

    fn generations_where<P: rusqlite::Params>(&self, clause: &str, p: P) -> Result<Vec<GenerationRow>> {
        let mut st =
            self.conn.prepare(&format!("SELECT number, root, created, files, bytes FROM generations {clause}"))?;
        let rows = st.query_map(p, |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        rows.map(|row| {
            let (n, root, c, f, b) = row?;
            Ok(GenerationRow {
                number: n as u64,
                root: Digest::from_hex(&root).map_err(anyhow::Error::msg)?,
                created: c as u64,
                files: f as u64,
                bytes: b as u64,
            })
        })
        .collect()
    }

    /// The manifest of generation `number`.
    ///
    /// # Errors
    /// SQLite errors, a missing generation, or a corrupt manifest.
    pub fn generation_manifest(&self, channel: &str, number: u64) -> Result<Manifest> {
        let data: Vec<u8> = self
            .conn
            .query_row(
                "SELECT manifest FROM generations WHERE channel = ?1 AND number = ?2",
                params![channel, number as i64],
                |r| r.get(0),
            )
            .optional()?
            .with_context(|| format!("generation {number} of channel {channel:?} does not exist"))?;
        unpack_manifest(&data)
    }

    /// Whether generation `number` is still kept.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn has_generation(&self, channel: &str, number: u64) -> Result<bool> {
        Ok(self.generation(channel, number)?.is_some())
    }

    /// Forgets every generation of `channel` but the newest `keep` and those a grant pins; returns the
    /// numbers forgotten.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn prune_generations(&self, channel: &str, keep: u64) -> Result<Vec<u64>> {
        let Some(latest) = self.latest_generation(channel)? else { return Ok(Vec::new()) };
        let cutoff = latest.number.saturating_sub(keep) as i64;
        let pinned = "SELECT pin FROM grants WHERE channel = ?1 AND pin IS NOT NULL";
        let mut st = self.conn.prepare(&format!(
            "SELECT number FROM generations WHERE channel = ?1 AND number <= ?2 AND number NOT IN ({pinned}) ORDER BY number"
        ))?;
        let gone: Vec<u64> = st
            .query_map(params![channel, cutoff], |r| r.get::<_, i64>(0))?
            .map(|n| n.map(|n| n as u64))
            .collect::<Result<_, _>>()?;
        // Their file lists stay, as old generations (see `old_generation_manifest`).
        self.conn.execute(
            &format!(
                "INSERT OR REPLACE INTO old_generations (channel, number, root, created, pruned_at, manifest)
                 SELECT channel, number, root, created, ?3, manifest FROM generations
                 WHERE channel = ?1 AND number <= ?2 AND number NOT IN ({pinned})"
            ),
            params![channel, cutoff, now() as i64],
        )?;
        self.conn.execute(
            &format!("DELETE FROM generations WHERE channel = ?1 AND number <= ?2 AND number NOT IN ({pinned})"),
            params![channel, cutoff],
        )?;
        Ok(gone)
    }

    /// The file list of generation `number` of `channel` if it is an old generation (beyond
    /// `keep-generations`, within `keep-history`), `None` otherwise.
    ///
    /// # Errors
    /// SQLite errors or a corrupt manifest.
    pub fn old_generation_manifest(&self, channel: &str, number: u64) -> Result<Option<Manifest>> {
        let data: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT manifest FROM old_generations WHERE channel = ?1 AND number = ?2",
                params![channel, number as i64],
                |r| r.get(0),
            )
            .optional()?;
        data.map(|d| unpack_manifest(&d)).transpose()
    }

    /// Every old generation: channel, number, when it was published, and its file list; oldest first.
    ///
    /// # Errors
    /// SQLite errors or a corrupt manifest.
    pub fn old_generations(&self) -> Result<Vec<(String, u64, u64, Manifest)>> {
        let mut st =
            self.conn.prepare("SELECT channel, number, created, manifest FROM old_generations ORDER BY number")?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, Vec<u8>>(3)?))
        })?;
        rows.map(|row| {
            let (c, n, created, data) = row?;
            Ok((c, n as u64, created as u64, unpack_manifest(&data)?))
        })
        .collect()
    }

    /// Forgets old generations past the history horizon: those published before `before`, and, with a
    /// count, all but the newest `keep` old ones of each channel. Returns how many were forgotten.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn forget_old_generations(&self, before: Option<u64>, keep: Option<u64>) -> Result<usize> {
        let mut n = 0;
        if let Some(before) = before {
            n += self.conn.execute("DELETE FROM old_generations WHERE created < ?1", [before as i64])?;
        }
        if let Some(keep) = keep {
            n += self.conn.execute(
                "DELETE FROM old_generations WHERE number <= (SELECT max(o.number) FROM old_generations o
                   WHERE o.channel = old_generations.channel) - ?1",
                [keep as i64],
            )?;
        }
        Ok(n)
    }

    /// The newest version of every path of every kept generation, by channel and path: what an old version
    /// of the same path is kept as a delta against.
    ///
    /// # Errors
    /// SQLite errors or a corrupt manifest.
    pub fn newest_versions(&self) -> Result<std::collections::HashMap<(String, crate::path::RelPath), Digest>> {
        let mut st = self.conn.prepare("SELECT channel, manifest FROM generations ORDER BY number DESC")?;
        let mut out = std::collections::HashMap::new();
        for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))? {
            let (channel, data) = row?;
            for (path, e) in unpack_manifest(&data)?.iter() {
                if let crate::manifest::Entry::File(m) = e {
                    out.entry((channel.clone(), path.clone())).or_insert(m.blake3);
                }
            }
        }
        Ok(out)
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
                    last_receipt_at, applied_generation, applied_root, key_rotations.key_id, suspended
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
                suspended: r.get(11)?,
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
            db.conn.execute("DELETE FROM recipient_tags WHERE recipient = ?1", [name])?;
            Ok(())
        })
    }

    /// The owner's tags of a recipient, sorted.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn recipient_tags(&self, name: &str) -> Result<std::collections::BTreeSet<String>> {
        let mut st = self.conn.prepare("SELECT tag FROM recipient_tags WHERE recipient = ?1")?;
        let tags = st.query_map([name], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(tags)
    }

    /// Every recipient's tags (recipients without tags are absent).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn all_recipient_tags(&self) -> Result<std::collections::BTreeMap<String, std::collections::BTreeSet<String>>> {
        let mut st = self.conn.prepare("SELECT recipient, tag FROM recipient_tags")?;
        let mut all = std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
        for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
            let (recipient, tag) = row?;
            all.entry(recipient).or_default().insert(tag);
        }
        Ok(all)
    }

    /// Adds tags to a registered recipient (a tag it has already is kept) and removes others; the
    /// caller checks the tags' names.
    ///
    /// # Errors
    /// SQLite errors, or no such recipient.
    pub fn change_recipient_tags(&self, name: &str, add: &[String], remove: &[String]) -> Result<()> {
        anyhow::ensure!(self.recipient(name)?.is_some(), "no recipient named {name:?} is registered");
        for tag in add {
            self.conn.execute("INSERT OR IGNORE INTO recipient_tags (recipient, tag) VALUES (?1, ?2)", [name, tag])?;
        }
        for tag in remove {
            self.conn.execute("DELETE FROM recipient_tags WHERE recipient = ?1 AND tag = ?2", [name, tag])?;
        }
        Ok(())
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
        self.conn.execute("UPDATE node SET previous_key = NULL, previous_key_until = NULL, pending_key = NULL", [])?;
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
            channel,
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
            stated_generation,
        } = *a;
        self.conn.execute(
            "INSERT INTO requests (nonce, recipient, seq, received_at, reply_id, generation, ops, reply_bytes, root, base,
                                   created, parts, full_content, channel)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
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
                full_content,
                channel
            ],
        )?;
        self.conn.execute(
            "INSERT INTO channel_seqs (recipient, channel, last_seq) VALUES (?1, ?2, ?3)
             ON CONFLICT (recipient, channel) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
            params![recipient, channel, seq as i64],
        )?;
        // `recipients.last_seq` is the default channel's, as it always was.
        self.conn.execute(
            "UPDATE recipients SET last_seq = CASE WHEN ?4 = 'default' THEN ?2 ELSE last_seq END,
                    last_request_at = ?3, last_reply_at = ?3 WHERE name = ?1",
            params![recipient, seq as i64, t, channel],
        )?;
        // What the recipient has, as its authenticated request says, and that it made contact.
        self.fleet_note(recipient, channel, stated_generation, &base, created)?;
        Ok(())
    }

    /// The reply id and generation the owner sent for `recipient`'s request `nonce`, if it answered it.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn answered_for(&self, recipient: &str, nonce: &str) -> Result<Option<SentReply>> {
        let row = self
            .conn
            .query_row(
                "SELECT reply_id, generation, root, channel FROM requests WHERE nonce = ?1 AND recipient = ?2",
                params![nonce, recipient],
                |r| {
                    Ok((
                        r.get::<_, ReplyId>(0)?,
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                },
            )
            .optional()?;
        row.map(|(reply_id, generation, root, channel)| {
            let root = root.map(|r| Digest::from_hex(&r)).transpose().map_err(anyhow::Error::msg)?;
            Ok(SentReply { reply_id, generation, root, channel })
        })
        .transpose()
    }

    /// The highest request seq answered for `recipient` on `channel` (0 for none).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn last_seq(&self, recipient: &str, channel: &str) -> Result<u64> {
        Ok(self
            .conn
            .query_row(
                "SELECT last_seq FROM channel_seqs WHERE recipient = ?1 AND channel = ?2",
                params![recipient, channel],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map_or(0, |v| v as u64))
    }

    /// The `created` time stated by `recipient`'s request with the highest seq answered.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn last_request_created(&self, recipient: &str, channel: &str) -> Result<Option<u64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT created FROM requests WHERE recipient = ?1 AND channel = ?2 ORDER BY seq DESC LIMIT 1",
                [recipient, channel],
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
        channel: &str,
        base: &Digest,
        generation: u64,
        full_content: bool,
    ) -> Result<Option<(ReplyId, String, u32)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT q.reply_id, q.nonce, q.parts FROM requests q
                 WHERE q.recipient = ?1 AND q.base = ?2 AND q.generation = ?3 AND q.full_content = ?4
                   AND q.channel = ?5 AND q.ops > 0 AND q.parts IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM receipts r WHERE r.recipient = q.recipient AND r.reply_id = q.reply_id)
                   AND EXISTS (SELECT 1 FROM sent_parts p WHERE p.reply_id = q.reply_id AND p.part = 1)
                 ORDER BY q.seq DESC LIMIT 1",
                params![recipient, base.to_hex(), generation as i64, full_content, channel],
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

    /// Records a receipt of `channel`: its outcome in the fleet's history, and what it says the recipient
    /// now has. An `applied` or `current` receipt is also the recipient's receipt of that reply.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn record_receipt(&self, r: &crate::protocol::Receipt) -> Result<()> {
        let channel = r.channel.as_str();
        use crate::protocol::ReceiptStatus;
        let t = now() as i64;
        let status = r.status.code();
        if matches!(r.status, ReceiptStatus::Applied | ReceiptStatus::Current) {
            self.conn.execute(
                "INSERT OR IGNORE INTO receipts (recipient, at, nonce, reply_id, generation, root, status, channel)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    r.recipient,
                    t,
                    r.nonce.to_hex(),
                    r.reply_id,
                    r.generation as i64,
                    r.root.to_hex(),
                    status,
                    r.channel
                ],
            )?;
        }
        // What the recipient has now, whatever the outcome: `status` never shows a generation it no longer has.
        // The recipient row shows the default channel's state, as it always did.
        self.conn.execute(
            "UPDATE recipients SET last_receipt_at = ?2,
                    applied_generation = CASE WHEN ?5 = 'default' THEN ?3 ELSE applied_generation END,
                    applied_root = CASE WHEN ?5 = 'default' THEN ?4 ELSE applied_root END
             WHERE name = ?1",
            params![r.recipient, t, r.generation as i64, r.root.to_hex(), r.channel],
        )?;
        self.conn.execute(
            "INSERT INTO fleet_events (recipient, channel, at, created, event, reply_id, nonce, generation, root,
                                       reason, detail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                r.recipient,
                channel,
                t,
                r.created as i64,
                status,
                r.reply_id,
                r.nonce.to_hex(),
                r.generation as i64,
                r.root.to_hex(),
                r.reason.map(|x| x.code()),
                r.detail
            ],
        )?;
        self.fleet_note(&r.recipient, channel, r.generation, &r.root, r.created)
    }

    /// Whether an outcome `status` (`failed`, `rolled-back`) of reply `reply_id` was recorded for `recipient`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn outcome_recorded(&self, recipient: &str, reply_id: &ReplyId, status: &str) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT count(*) FROM fleet_events WHERE recipient = ?1 AND reply_id = ?2 AND event = ?3",
            params![recipient, reply_id, status],
            |r| r.get::<_, i64>(0),
        )? > 0)
    }

    /// Notes what `recipient` has on `channel`, as an authenticated request or receipt made at `created`
    /// (the recipient's clock) states it, and that it made contact now. A statement made before the one
    /// recorded (mail that was overtaken on its way) only counts as contact.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn fleet_note(
        &self,
        recipient: &str,
        channel: &str,
        generation: u64,
        root: &Digest,
        created: u64,
    ) -> Result<()> {
        let t = now() as i64;
        self.conn.execute(
            "INSERT INTO fleet (recipient, channel, generation, root, stated_created, stated_at, last_contact_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
             ON CONFLICT (recipient, channel) DO UPDATE SET
                generation = CASE WHEN stated_created IS NULL OR excluded.stated_created >= stated_created
                                  THEN excluded.generation ELSE generation END,
                root = CASE WHEN stated_created IS NULL OR excluded.stated_created >= stated_created
                            THEN excluded.root ELSE root END,
                stated_at = CASE WHEN stated_created IS NULL OR excluded.stated_created >= stated_created
                                 THEN excluded.stated_at ELSE stated_at END,
                stated_created = max(coalesce(stated_created, 0), excluded.stated_created),
                last_contact_at = excluded.last_contact_at",
            params![recipient, channel, generation as i64, root.to_hex(), created as i64, t],
        )?;
        Ok(())
    }

    /// Sets the interval `recipient` is expected to make contact at on `channel` (`None`: the owner's
    /// default).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_fleet_interval(&self, recipient: &str, channel: &str, interval: Option<u64>) -> Result<()> {
        self.conn.execute(
            "INSERT INTO fleet (recipient, channel, interval) VALUES (?1, ?2, ?3)
             ON CONFLICT (recipient, channel) DO UPDATE SET interval = excluded.interval",
            params![recipient, channel, interval.map(|v| v as i64)],
        )?;
        Ok(())
    }

    /// The facts the fleet view derives each registered recipient's state on `channel` from, by name.
    ///
    /// # Errors
    /// SQLite errors or corrupt roots.
    pub fn fleet_facts(&self, channel: &str) -> Result<Vec<crate::fleet::Facts>> {
        use crate::fleet::{Facts, InFlight, Outcome};
        let mut st = self.conn.prepare(
            "SELECT r.name, r.address, r.created, f.generation, f.root, f.last_contact_at, f.interval
             FROM recipients r LEFT JOIN fleet f ON f.recipient = r.name AND f.channel = ?1 ORDER BY r.name",
        )?;
        let rows = st
            .query_map([channel], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        // The newest outcome by the recipient's clock (whole seconds). Within one second a failure comes
        // after a success: an install hook fails after its apply, and the two receipts may arrive in either
        // order.
        let mut outcome = self.conn.prepare_cached(
            "SELECT event, at, reply_id, generation, reason, detail FROM fleet_events
             WHERE recipient = ?1 AND channel = ?2
             ORDER BY coalesce(created, at) DESC, event = 'failed' DESC, id DESC LIMIT 1",
        )?;
        // The newest reply that changes the tree and has no outcome yet, sent after the last outcome.
        let mut flight = self.conn.prepare_cached(
            "SELECT q.reply_id, q.generation, q.received_at FROM requests q
             WHERE q.recipient = ?1 AND q.base IS NOT NULL AND q.root IS NOT NULL AND q.base != q.root
               AND NOT EXISTS (SELECT 1 FROM fleet_events e WHERE e.recipient = q.recipient AND e.reply_id = q.reply_id)
               AND q.received_at >= coalesce((SELECT max(e.at) FROM fleet_events e WHERE e.recipient = q.recipient
                                              AND e.channel = ?2), 0)
             ORDER BY q.seq DESC LIMIT 1",
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for (name, address, enrolled, generation, root, contact, interval) in rows {
            let last = outcome
                .query_row(params![name, channel], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, Option<ReplyId>>(2)?,
                        r.get::<_, Option<i64>>(3)?.map(|g| g as u64),
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                    ))
                })
                .optional()?
                .map(|(event, at, reply_id, generation, reason, detail)| Outcome {
                    event,
                    at,
                    reply_id,
                    generation,
                    reason,
                    detail,
                });
            let in_flight = flight
                .query_row(params![name, channel], |r| {
                    Ok(InFlight {
                        reply_id: r.get(0)?,
                        generation: r.get::<_, i64>(1)? as u64,
                        sent_at: r.get::<_, i64>(2)? as u64,
                    })
                })
                .optional()?;
            out.push(Facts {
                name,
                address,
                channel: channel.to_owned(),
                enrolled_at: enrolled as u64,
                generation: generation.map(|g| g as u64),
                root: root.map(|r| Digest::from_hex(&r)).transpose().map_err(anyhow::Error::msg)?,
                last_contact_at: contact.map(|t| t as u64),
                interval: interval.map(|t| t as u64),
                last_outcome: last,
                in_flight,
            });
        }
        Ok(out)
    }

    /// The newest generation of `channel`: its number and root.
    ///
    /// # Errors
    /// SQLite errors or a corrupt root.
    pub fn channel_latest(&self, channel: &str) -> Result<Option<(u64, Digest)>> {
        self.conn
            .query_row(
                "SELECT number, root FROM generations WHERE channel = ?1 ORDER BY number DESC LIMIT 1",
                [channel],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?)),
            )
            .optional()?
            .map(|(n, root)| Ok((n, Digest::from_hex(&root).map_err(anyhow::Error::msg)?)))
            .transpose()
    }

    /// What happened to `recipient`'s replies, oldest first: every outcome its receipts reported, and every
    /// reply sent (with `event` `sent`).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn fleet_history(&self, recipient: &str) -> Result<Vec<crate::fleet::HistoryEntry>> {
        let mut st = self.conn.prepare(
            // Each outcome goes after the reply it is about (by that request's seq), in the order recorded.
            "SELECT at, channel, event, reply_id, generation, root, reason, detail FROM (
                SELECT coalesce((SELECT max(q.seq) FROM requests q WHERE q.recipient = e.recipient
                                 AND q.reply_id = e.reply_id), 0) AS s, 1 AS o, e.id AS k,
                       e.at, e.channel, e.event, e.reply_id, e.generation, e.root, e.reason, e.detail
                  FROM fleet_events e WHERE e.recipient = ?1
                UNION ALL
                SELECT seq AS s, 0 AS o, 0 AS k, received_at, 'default', 'sent', reply_id, generation, root, NULL,
                       CASE WHEN base = root THEN 'no changes: the tree was current' ELSE ops || ' operations' END
                  FROM requests WHERE recipient = ?1)
             ORDER BY s, o, k",
        )?;
        let rows = st.query_map([recipient], |r| {
            Ok(crate::fleet::HistoryEntry {
                at: r.get::<_, i64>(0)? as u64,
                channel: r.get(1)?,
                event: r.get(2)?,
                reply_id: r.get(3)?,
                generation: r.get::<_, Option<i64>>(4)?.map(|g| g as u64),
                root: r.get(5)?,
                reason: r.get(6)?,
                detail: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The state each recipient was last alerted in (only `silent` and `failed` are kept), by
    /// (recipient, channel).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn fleet_alerted(&self) -> Result<std::collections::BTreeMap<(String, String), String>> {
        let mut st = self.conn.prepare("SELECT recipient, channel, state FROM fleet_alerts")?;
        let rows = st.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records that (recipient, channel) was alerted in `state`, or with `None` that it recovered.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_fleet_alerted(&self, recipient: &str, channel: &str, state: Option<&str>) -> Result<()> {
        match state {
            Some(s) => self.conn.execute(
                "INSERT OR REPLACE INTO fleet_alerts (recipient, channel, state, at) VALUES (?1, ?2, ?3, ?4)",
                params![recipient, channel, s, now() as i64],
            )?,
            None => self.conn.execute(
                "DELETE FROM fleet_alerts WHERE recipient = ?1 AND channel = ?2",
                params![recipient, channel],
            )?,
        };
        Ok(())
    }

    /// When the last fleet alert was queued.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn fleet_alert_at(&self) -> Result<Option<u64>> {
        Ok(self
            .conn
            .query_row("SELECT fleet_alert_at FROM node WHERE id = 1", [], |r| r.get::<_, Option<i64>>(0))?
            .map(|t| t as u64))
    }

    /// Records when the last fleet alert was queued.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_fleet_alert_at(&self, at: u64) -> Result<()> {
        self.conn.execute("UPDATE node SET fleet_alert_at = ?1 WHERE id = 1", [at as i64])?;
        Ok(())
    }

    // ---- owner: the console's actions and read model ----

    /// Suspends (or resumes) a registered recipient.
    ///
    /// # Errors
    /// SQLite errors, or no such recipient.
    pub fn set_suspended(&self, name: &str, suspended: bool) -> Result<()> {
        let n = self.conn.execute("UPDATE recipients SET suspended = ?2 WHERE name = ?1", params![name, suspended])?;
        anyhow::ensure!(n == 1, "no recipient named {name:?} is registered");
        Ok(())
    }

    /// Approves generation `number` of `channel` for serving (under `require-approval`), by `by`. Returns
    /// false when it was approved before (the first approval is kept).
    ///
    /// # Errors
    /// SQLite errors, or no such generation.
    pub fn approve_generation(&self, channel: &str, number: u64, by: &str) -> Result<bool> {
        let exists: i64 = self.conn.query_row(
            "SELECT count(*) FROM generations WHERE channel = ?1 AND number = ?2",
            params![channel, number as i64],
            |r| r.get(0),
        )?;
        anyhow::ensure!(exists > 0, "generation {number} of channel {channel:?} does not exist (or was pruned)");
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO approvals (channel, number, approved_at, approved_by) VALUES (?1, ?2, ?3, ?4)",
            params![channel, number as i64, now() as i64, by],
        )?;
        Ok(n == 1)
    }

    /// The newest kept generation of `channel` that was approved for serving.
    ///
    /// # Errors
    /// SQLite errors or a corrupt root.
    pub fn latest_approved_generation(&self, channel: &str) -> Result<Option<GenerationRow>> {
        Ok(self.kept_generations_where(
            "WHERE g.channel = ?1 AND EXISTS (SELECT 1 FROM approvals a WHERE a.channel = g.channel AND a.number = g.number)
             ORDER BY g.number DESC LIMIT 1",
            [channel],
        )?
        .pop()
        .map(|k| k.generation))
    }

    /// Every kept generation, newest first, with its channel and approval (when and by whom).
    ///
    /// # Errors
    /// SQLite errors or a corrupt root.
    pub fn kept_generations(&self) -> Result<Vec<KeptGeneration>> {
        self.kept_generations_where("ORDER BY g.channel != 'default', g.channel, g.number DESC", [])
    }

    fn kept_generations_where<P: rusqlite::Params>(&self, clause: &str, p: P) -> Result<Vec<KeptGeneration>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT g.channel, g.number, g.root, g.created, g.files, g.bytes, a.approved_at, a.approved_by
             FROM generations g LEFT JOIN approvals a ON a.channel = g.channel AND a.number = g.number {clause}"
        ))?;
        let rows = st.query_map(p, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                (r.get::<_, i64>(3)?, r.get::<_, i64>(4)?, r.get::<_, i64>(5)?),
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, Option<String>>(7)?,
            ))
        })?;
        rows.map(|row| {
            let (channel, n, root, (c, f, b), at, by) = row?;
            let root = Digest::from_hex(&root).map_err(anyhow::Error::msg)?;
            let g = GenerationRow { number: n as u64, root, created: c as u64, files: f as u64, bytes: b as u64 };
            Ok(KeptGeneration { channel, generation: g, approved: at.map(|at| (at as u64, by.unwrap_or_default())) })
        })
        .collect()
    }

    /// Logs an admin action (`approve`, `suspend`, `resume`, ...) on `target`, taken by `actor`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn log_action(&self, actor: &str, action: &str, target: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO admin_actions (at, actor, action, target) VALUES (?1, ?2, ?3, ?4)",
            params![now() as i64, actor, action, target],
        )?;
        Ok(())
    }

    /// The newest `limit` admin actions, newest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn actions(&self, limit: u64) -> Result<Vec<AdminAction>> {
        let mut st =
            self.conn.prepare("SELECT at, actor, action, target FROM admin_actions ORDER BY id DESC LIMIT ?1")?;
        let rows = st.query_map([limit as i64], |r| {
            Ok(AdminAction { at: r.get::<_, i64>(0)? as u64, actor: r.get(1)?, action: r.get(2)?, target: r.get(3)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The newest `limit` receipts of `recipient`, newest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn receipts_of(&self, recipient: &str, limit: u64) -> Result<Vec<ReceiptRow>> {
        let mut st = self.conn.prepare(
            "SELECT at, reply_id, generation, root, status FROM receipts WHERE recipient = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![recipient, limit as i64], |r| {
            Ok(ReceiptRow {
                at: r.get::<_, i64>(0)? as u64,
                reply_id: r.get(1)?,
                generation: r.get::<_, i64>(2)? as u64,
                root: r.get(3)?,
                status: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The newest `limit` requests of `recipient` the owner answered, newest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn answers_of(&self, recipient: &str, limit: u64) -> Result<Vec<AnswerRow>> {
        let mut st = self.conn.prepare(
            "SELECT received_at, seq, reply_id, generation, ops, reply_bytes, parts FROM requests
             WHERE recipient = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![recipient, limit as i64], |r| {
            Ok(AnswerRow {
                at: r.get::<_, i64>(0)? as u64,
                seq: r.get::<_, i64>(1)? as u64,
                reply_id: r.get(2)?,
                generation: r.get::<_, i64>(3)? as u64,
                ops: r.get::<_, i64>(4)? as u64,
                bytes: r.get::<_, i64>(5)? as u64,
                parts: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The newest `limit` rejections, newest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn recent_rejections(&self, limit: u64) -> Result<Vec<Rejection>> {
        self.rejections_where("ORDER BY id DESC LIMIT ?1", [limit as i64])
    }

    // ---- recipient ----

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
        // A rotation authenticated by the key an applied generation came under continues its epoch, in
        // every subscription.
        self.conn.execute(
            "UPDATE node SET previous_key = ?1, previous_key_until = ?2, pending_key = ?3",
            params![current_hex, until as i64, new_hex],
        )?;
        self.conn.execute(
            "UPDATE subscriptions SET applied_key_id = ?2 WHERE applied_key_id = ?1",
            params![current_id, new_id],
        )?;
        Ok(())
    }

    /// The new key is in the key file: nothing is pending any more.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn clear_pending_key(&self) -> Result<()> {
        self.conn.execute("UPDATE node SET pending_key = NULL", [])?;
        Ok(())
    }

    /// The recipient's keys besides the key file: the one a rotation replaced and until when it is
    /// accepted, and one taken up but not yet written to the key file.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn keys(&self) -> Result<NodeKeys> {
        Ok(self.conn.query_row("SELECT previous_key, previous_key_until, pending_key FROM node", [], |r| {
            Ok(NodeKeys {
                previous_key: r.get(0)?,
                previous_key_until: r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
                pending_key: r.get(2)?,
            })
        })?)
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
        let d = db.sub(DEFAULT_SUBSCRIPTION).unwrap();
        let sub = d.subscription().unwrap();
        assert_eq!(sub.seq, 2);
        assert_eq!(sub.applied_generation, 1);
        assert_eq!(sub.applied_root.as_deref().map(|r| &r[..12]), Some("4abc1472930a"));
        assert_eq!(sub.applied_key_id, None, "not recorded by the first release");
        assert!(sub.last_request_at.is_some() && sub.last_reply_at.is_some());
        assert_eq!((sub.need_full_inventory, sub.full_content, sub.rollback_hold), (false, false, 0));
        assert_eq!(sub.stale_notified_at, None, "an empty meta value is no notice");
        let (generation, root, manifest) = d.applied().unwrap();
        assert_eq!((generation, root.map(|r| r.short())), (1, Some("4abc1472930a".to_owned())));
        assert_eq!(manifest.len(), 3, "a.txt, d, d/b.txt");
        assert_eq!(d.outstanding_count().unwrap(), 1);
        assert!(d.previous().unwrap().is_none());
        assert!(db.keys().unwrap().pending_key.is_none());
        assert_eq!((sub.standing, sub.pinned), (None, None), "plain service until the owner says otherwise");
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
        let latest = db.latest_generation("default").unwrap().unwrap();
        assert_eq!((latest.number, latest.root.short()), (2, "4aab7bfbb7f7".to_owned()));
        assert_eq!(db.generation_manifest("default", 1).unwrap().root().short(), "4abc1472930a");
        let rec = db.recipient("site1").unwrap().unwrap();
        assert_eq!((rec.last_seq, rec.applied_generation), (2, Some(1)));
        // The sequence number moved to the channel; the default channel is open to every recipient.
        assert_eq!(db.last_seq("site1", "default").unwrap(), 2);
        let default = db.channel("default").unwrap().unwrap();
        assert!(default.open && !default.encrypt && default.source.is_none());
        assert!(!db.suspended("site1").unwrap());
        assert_eq!(db.key_rotation("site1").unwrap().unwrap().key_id, "c6dc7da7e7f1f2d6");
        // Replies recorded by the first release get the root of the generation they brought.
        let sent = db.answered_for("site1", "87a716c67a7bc3ea150eac524f3be194").unwrap().unwrap();
        let (reply_id, generation, root) = (sent.reply_id, sent.generation, sent.root);
        assert_eq!(sent.channel, "default");
        assert_eq!((reply_id.as_str(), generation), ("8db5a1a0e8b4c22675131103358015c7", 1));
        assert_eq!(root.map(|r| r.short()), Some("4abc1472930a".to_owned()));
        assert_eq!(db.spent_since("site1", 0).unwrap().0, 2);
        assert_eq!(db.relay_limit("site1").unwrap(), None);
        assert_eq!(db.signing_key().unwrap(), None);
        assert!(db.recipient_tags("site1").unwrap().is_empty(), "no tags before registration's migration");
        // Migration 6: the receipts recorded become the fleet's facts and history.
        let facts = db.fleet_facts("default").unwrap();
        let site1 = facts.iter().find(|f| f.name == "site1").unwrap();
        assert_eq!((site1.generation, site1.root.map(|r| r.short())), (Some(1), Some("4abc1472930a".to_owned())));
        assert!(site1.last_contact_at.is_some());
        let events: Vec<String> = db.fleet_history("site1").unwrap().into_iter().map(|e| e.event).collect();
        assert_eq!(events.iter().filter(|e| *e == "sent").count(), 2, "{events:?}");
        assert!(events.contains(&"applied".to_owned()), "{events:?}");
    }

    #[test]
    fn tags_are_kept_per_recipient_and_go_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("state.db")).unwrap();
        let k = KeyId::new("0123456789abcdef").unwrap();
        db.add_recipient("a", "a@x", &"0".repeat(64), &k).unwrap();
        db.add_recipient("b", "b@x", &"0".repeat(64), &k).unwrap();
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        db.change_recipient_tags("a", &t(&["eu", "gold", "eu"]), &[]).unwrap();
        db.change_recipient_tags("b", &t(&["us"]), &[]).unwrap();
        db.change_recipient_tags("a", &t(&["beta"]), &t(&["gold", "never-had"])).unwrap();
        assert_eq!(db.recipient_tags("a").unwrap().into_iter().collect::<Vec<_>>(), t(&["beta", "eu"]));
        assert!(db.change_recipient_tags("c", &t(&["x"]), &[]).unwrap_err().to_string().contains("no recipient"));
        db.remove_recipient("a").unwrap();
        assert!(db.recipient_tags("a").unwrap().is_empty(), "a recipient added again under the name starts bare");
        assert_eq!(db.all_recipient_tags().unwrap().into_keys().collect::<Vec<_>>(), t(&["b"]));
    }

    #[test]
    fn hook_failures_and_the_waiting_update_are_kept_per_subscription() {
        let (_dir, all) = open_fixture("recipient-v1.db");
        let db = all.sub(DEFAULT_SUBSCRIPTION).unwrap();
        let other = all.sub("sigdb").unwrap();
        assert_eq!(db.last_hook_failure().unwrap(), None);
        let f = |n: u64| HookFailureRow {
            at: n,
            generation: n,
            reply_id: ReplyId::unchecked("a".repeat(32)),
            hook: "post-apply".into(),
            exit_status: Some(3),
            output_tail: format!("out {n}"),
            action: "rolled-back".into(),
        };
        db.record_hook_failure(&f(1)).unwrap();
        db.record_hook_failure(&f(2)).unwrap();
        assert_eq!(db.last_hook_failure().unwrap(), Some(f(2)), "the newest");
        assert_eq!(other.last_hook_failure().unwrap(), None, "another tree's failures are its own");
        assert!(db.waiting_install().unwrap().is_none());
        let w = |g: u64| WaitingRow {
            generation: g,
            reply_id: ReplyId::unchecked("b".repeat(32)),
            base: Digest::of(b"base"),
            reason: "manual".into(),
            since: 7,
            journal: b"{}".to_vec(),
        };
        db.set_waiting_install(&w(2)).unwrap();
        db.set_waiting_install(&w(3)).unwrap();
        assert!(other.waiting_install().unwrap().is_none(), "another tree has nothing waiting");
        let got = db.waiting_install().unwrap().unwrap();
        assert_eq!((got.generation, got.base, got.journal), (3, Digest::of(b"base"), b"{}".to_vec()), "replaced");
        db.clear_waiting_install().unwrap();
        assert!(db.waiting_install().unwrap().is_none());
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
        db.sub(DEFAULT_SUBSCRIPTION).unwrap().next_seq().unwrap();
        drop(db);
        let db = Db::open(&path).unwrap();
        assert_eq!(db.sub(DEFAULT_SUBSCRIPTION).unwrap().subscription().unwrap().seq, 1, "state survives a reopen");
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
