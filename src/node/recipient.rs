//! The recipient: asks the owner for updates, verifies replies completely, and applies them atomically.
//!
//! Order of checks for a reply (each refusal is recorded and the message filed as rejected): size limit,
//! MIME structure, auth part names this recipient, MAC under this recipient's key, control part decodes
//! (paths, modes, limits), the nonce is outstanding, the generation is not older than the applied one,
//! the generation is not held back by a local rollback (then the reply is answered but not applied), every
//! attachment is listed and every listed payload has its digest, the local tree is safe and is the
//! one the reply was computed for, the operations produce exactly the promised root, and every file
//! unpacks to its promised size and digest. Only then does the journal commit and the tree change.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use tracing::{info, warn};

use super::{Handled, Node, Outbox, RunReport, lock_state, process_inbox};
use crate::apply::{self, Journal, JournalKind, OnExtra, StageError};
use crate::config::{Enrollment, RecipientConfig, RecipientSection, TransportConfig, read_key_file, write_secret};
use crate::crypto::{Key, Nonce};
use crate::db::{Db, now};
use crate::manifest::{Digest, Listed};
use crate::protocol::envelope::{self, Outgoing};
use crate::protocol::{
    self, Auth, Control, InventoryKind, Kind, Reason, Receipt, ReceiptStatus, Refusal, Reply, Request, VERSION, Want,
};
use crate::scan;
use crate::transport::Transport;

/// A recipient node with its state open.
#[derive(Debug)]
pub struct Recipient {
    cfg: RecipientConfig,
    db: Db,
    key: Key,
    _lock: std::fs::File,
}

/// The recipient's view for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct RecipientStatus {
    /// Always "recipient".
    pub role: &'static str,
    /// Registered name.
    pub name: String,
    /// The data tree.
    pub data: PathBuf,
    /// Generation applied, 0 for none.
    pub generation: u64,
    /// Root of the applied generation.
    pub root: Option<String>,
    /// When the last request was sent.
    pub last_request_at: Option<u64>,
    /// When the last authenticated reply was accepted.
    pub last_reply_at: Option<u64>,
    /// Requests awaiting replies.
    pub outstanding: u64,
    /// Refused messages recorded.
    pub rejected: u64,
    /// An interrupted apply waiting to be finished.
    pub interrupted_apply: bool,
    /// Outgoing mail not yet accepted by the transport.
    pub outbox: super::OutboxStatus,
    /// The generation kept for `recipient rollback`, if any.
    pub previous_generation: Option<u64>,
    /// After a rollback: replies bringing this generation or an older one are not applied.
    pub rollback_held: Option<u64>,
    /// No fresh, authenticated reply for longer than `stale-after` (updates may be withheld).
    pub stale: bool,
    /// The `stale-after` in force, in seconds.
    pub stale_after: u64,
    /// The last server error and how new mail is noticed.
    pub transport: super::TransportStatus,
}

/// Creates a recipient: `DIR/recipient.toml` and `DIR/recipient.key` from an enrollment file.
///
/// # Errors
/// An unreadable or too-open enrollment file, a state directory inside the data tree, an existing
/// config, or I/O errors.
pub fn init(dir: &Path, data: &Path, enrollment: &Path, transport_root: &Path) -> Result<PathBuf> {
    let e = Enrollment::load(enrollment)?;
    let key = Key::from_hex(&e.key)
        .with_context(|| format!("enrollment file `{}` has an invalid key", enrollment.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create `{}`", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    std::fs::create_dir_all(data).with_context(|| format!("failed to create data tree `{}`", data.display()))?;
    crate::config::check_state_outside_data(dir, data)?;
    let path = dir.join("recipient.toml");
    if path.exists() {
        bail!("`{}` already exists", path.display());
    }
    let key_file = dir.join("recipient.key");
    write_secret(&key_file, &format!("{}\n", key.to_hex()))?;
    let section = RecipientSection {
        name: e.name.clone(),
        address: e.address.clone(),
        owner_address: e.owner_address.clone(),
        data: std::path::absolute(data)?,
        state_dir: None,
        key_file: PathBuf::from("recipient.key"),
        staging_dir: None,
        interval: humantime::parse_duration(&e.transport.interval).unwrap_or(std::time::Duration::from_secs(3600)),
        reply_timeout: std::time::Duration::from_secs(6 * 3600),
        on_extra: OnExtra::Delete,
        stale_after: None,
        admin_address: None,
    };
    let transport = TransportConfig::Maildir { root: std::path::absolute(transport_root)? };
    #[derive(Serialize)]
    struct File<'a> {
        recipient: &'a RecipientSection,
        transport: &'a TransportConfig,
    }
    let text = format!(
        "# mailferry recipient configuration (see README.md, \"Configuration\").\n{}",
        toml::to_string(&File { recipient: &section, transport: &transport })?
    );
    std::fs::write(&path, text).with_context(|| format!("failed to write `{}`", path.display()))?;
    Db::open(&dir.join("state.db"))?;
    Ok(path)
}

impl Recipient {
    /// Opens the recipient's state, taking the state directory's lock, and finishes an interrupted apply.
    ///
    /// # Errors
    /// A locked state directory, an unreadable or too-open key file, or an interrupted apply that cannot be
    /// finished.
    pub fn open(cfg: RecipientConfig) -> Result<Recipient> {
        let mut r = Recipient::open_as_is(cfg)?;
        r.recover()?;
        Ok(r)
    }

    /// Opens the recipient's state, taking the state directory's lock, and leaves an interrupted apply
    /// alone (`recipient rollback` decides what to do about one).
    ///
    /// # Errors
    /// A locked state directory, or an unreadable or too-open key file.
    pub fn open_as_is(cfg: RecipientConfig) -> Result<Recipient> {
        let lock = lock_state(&cfg.state_dir)?;
        let key = read_key_file(&cfg.recipient.key_file)?;
        let db = Db::open(&cfg.state_dir.join("state.db"))?;
        Ok(Recipient { cfg, db, key, _lock: lock })
    }

    /// The configuration.
    pub fn config(&self) -> &RecipientConfig {
        &self.cfg
    }

    /// Finishes an apply that a crash interrupted after its journal was committed.
    fn recover(&mut self) -> Result<()> {
        let Some(journal) = Journal::load(&self.cfg.state_dir)? else { return Ok(()) };
        warn!(generation = journal.generation, "finishing an apply that was interrupted");
        journal.execute().context("failed to finish the interrupted apply")?;
        if let JournalKind::Rollback { .. } = journal.kind {
            return super::rollback::complete(&self.db, &self.cfg.state_dir, &journal);
        }
        self.complete(&journal)?;
        Ok(())
    }

    /// Records a finished apply and queues its receipt in one transaction; then removes the journal.
    fn complete(&mut self, journal: &Journal) -> Result<()> {
        let target = journal.target()?;
        let nonce = Nonce::from_hex(&journal.nonce).map_err(anyhow::Error::msg)?;
        let receipt =
            self.receipt(nonce, &journal.reply_id, journal.generation, target.root(), ReceiptStatus::Applied)?;
        let (from, to) = (&self.cfg.recipient.address, &self.cfg.recipient.owner_address);
        self.db.transaction(|db| {
            if !db.reply_applied(&journal.reply_id)? {
                super::rollback::keep_previous(db, journal)?;
                db.record_applied(journal.generation, &target, &journal.reply_id, &journal.nonce, journal.ops)?;
            }
            db.close_outstanding(&journal.nonce)?;
            db.mark_fresh_reply()?;
            db.mark_seen(&journal.message, "processed")?;
            db.outbox_put(&format!("receipt-{}", journal.reply_id), from, to, &receipt)
        })?;
        journal.finish(&self.cfg.state_dir)?;
        if let Some(root) = journal.stage_dir.parent() {
            super::rollback::tidy_staging(&self.db, root);
        }
        Ok(())
    }

    fn receipt(
        &self,
        nonce: Nonce,
        reply_id: &str,
        generation: u64,
        root: Digest,
        status: ReceiptStatus,
    ) -> Result<Vec<u8>> {
        let receipt = Receipt {
            mailferry: VERSION,
            kind: Kind::Receipt,
            recipient: self.cfg.recipient.name.clone(),
            nonce,
            reply_id: reply_id.to_owned(),
            created: now(),
            generation,
            root,
            status,
        };
        let control = protocol::encode(&receipt);
        let auth = protocol::encode(&Auth::sign(&self.cfg.recipient.name, &self.key, &control));
        Ok(envelope::build(&Outgoing {
            from: &self.cfg.recipient.address,
            to: &self.cfg.recipient.owner_address,
            subject: format!("mailferry: {} has generation {generation}", self.cfg.recipient.name),
            text: format!(
                "This is an automatic receipt from mailferry: recipient {:?} now has generation {generation}.\n",
                self.cfg.recipient.name
            ),
            kind: Kind::Receipt,
            control: &control,
            auth: &auth,
            payloads: vec![],
        })?)
    }

    /// Applies every verified reply waiting, then, if `request` and no request is still awaiting its reply,
    /// sends a fresh one.
    ///
    /// # Errors
    /// Transport or local failures (a full disk while staging, an unreadable data tree).
    pub async fn run_once<T: Transport>(&mut self, transport: &mut T, request: bool) -> Result<RunReport> {
        let mut report = RunReport::default();
        report.sent += Outbox::flush(&self.db, transport).await?.sent;
        process_inbox(self, transport, &mut report).await?;
        if request {
            report.requested = self.maybe_request()?;
        }
        report.sent += Outbox::flush(&self.db, transport).await?.sent;
        Ok(report)
    }

    /// When [`Recipient::maybe_request`] will next send a request (Unix seconds), if an unanswered request
    /// holds it back now: the newest outstanding request's time plus `reply-timeout`.
    ///
    /// # Errors
    /// State failures.
    pub fn request_blocked_until(&self) -> Result<Option<u64>> {
        let timeout = self.cfg.recipient.reply_timeout.as_secs();
        Ok(self.db.newest_outstanding()?.map(|sent| sent + timeout).filter(|at| *at > now()))
    }

    /// Sends a request unless one sent less than `reply-timeout` ago is still unanswered. Returns whether
    /// one was queued.
    ///
    /// # Errors
    /// An unreadable data tree or state failures.
    pub fn maybe_request(&mut self) -> Result<bool> {
        let timeout = self.cfg.recipient.reply_timeout.as_secs();
        self.db.expire_outstanding(timeout.max(7 * 24 * 3600))?;
        if let Some(sent) = self.db.newest_outstanding()?
            && now().saturating_sub(sent) < timeout
        {
            info!(
                "a request sent {}s ago is still awaiting its reply; not sending another",
                now().saturating_sub(sent)
            );
            return Ok(false);
        }
        let scan = self.scan_tree()?;
        let (generation, _, applied) = self.db.applied()?;
        // After first contact only the drift from the applied generation travels, unless the owner asked
        // for the whole tree.
        let full = generation == 0 || self.db.meta("need_full_inventory")?.as_deref() == Some("1");
        let (inventory_kind, inventory, removed) = if full {
            (InventoryKind::Full, scan.manifest.listing(), Vec::new())
        } else {
            let changed = scan
                .manifest
                .iter()
                .filter(|(p, e)| applied.get(p) != Some(*e))
                .map(|(p, e)| Listed { path: p.clone(), entry: e.clone() })
                .collect();
            let removed =
                applied.iter().filter(|(p, _)| scan.manifest.get(p).is_none()).map(|(p, _)| p.clone()).collect();
            (InventoryKind::Changes, changed, removed)
        };
        let nonce = Nonce::generate();
        let seq = self.db.meta_u64("seq")? + 1;
        let req = Request {
            mailferry: VERSION,
            kind: Kind::Request,
            recipient: self.cfg.recipient.name.clone(),
            nonce,
            seq,
            created: now(),
            generation,
            root: scan.manifest.root(),
            inventory_kind,
            inventory,
            removed,
            want: Want::Latest,
        };
        let control = protocol::encode(&req);
        let auth = protocol::encode(&Auth::sign(&self.cfg.recipient.name, &self.key, &control));
        let raw = envelope::build(&Outgoing {
            from: &self.cfg.recipient.address,
            to: &self.cfg.recipient.owner_address,
            subject: format!("mailferry: update request from {} (generation {generation})", self.cfg.recipient.name),
            text: format!(
                "This is an automatic update request from mailferry recipient {:?}, which has generation {generation}.\n",
                self.cfg.recipient.name
            ),
            kind: Kind::Request,
            control: &control,
            auth: &auth,
            payloads: vec![],
        })?;
        // The nonce becomes outstanding in the same transaction that queues the request.
        let (from, to) = (&self.cfg.recipient.address, &self.cfg.recipient.owner_address);
        self.db.transaction(|db| {
            anyhow::ensure!(db.next_seq()? == seq, "another process sent a request meanwhile");
            db.add_outstanding(&nonce.to_hex(), seq)?;
            if full {
                db.set_meta("need_full_inventory", "")?;
            }
            db.outbox_put(&format!("request-{seq:010}"), from, to, &raw)
        })?;
        info!(seq, generation, entries = req.inventory.len(), bytes = raw.len(), "request queued");
        Ok(true)
    }

    fn evaluate(&mut self, raw: &[u8], digest: &Digest) -> Result<Result<Handled, Refusal>> {
        let me = self.cfg.recipient.name.clone();
        let limits = self.cfg.limits.clone();
        macro_rules! refuse {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(r) => return Ok(Err(r)),
                }
            };
        }
        let parsed = refuse!(envelope::parse(raw, limits.max_message_bytes));
        let auth = refuse!(protocol::decode_auth(&parsed.auth));
        if auth.recipient != me {
            return Ok(Err(Refusal::new(
                Reason::WrongRecipient,
                format!("message is for recipient {:?}, this is {me:?}", auth.recipient),
            )));
        }
        if auth.key_id != self.key.id() {
            return Ok(Err(Refusal::new(
                Reason::BadMac,
                format!("message is authenticated with key {}, this recipient's key is {}", auth.key_id, self.key.id()),
            )));
        }
        refuse!(protocol::verify_mac(&self.key, &auth, &parsed.control));
        let reply = match refuse!(protocol::decode_control(&parsed.control, &limits)) {
            Control::Reply(r) => r,
            other => {
                return Ok(Err(Refusal::new(
                    Reason::Unexpected,
                    format!("a recipient does not accept a {}", other.kind()),
                )));
            }
        };
        if reply.recipient != me {
            return Ok(Err(Refusal::new(
                Reason::WrongRecipient,
                format!("reply is for {:?}, this is {me:?}", reply.recipient),
            )));
        }
        let nonce = reply.nonce.to_hex();
        let Some(seq) = self.db.outstanding(&nonce)? else {
            let why = if self.db.reply_applied(&reply.reply_id)? {
                format!("reply {} was applied before (replayed)", reply.reply_id)
            } else {
                format!("reply answers nonce {nonce}, which is not outstanding (replayed, or answered already)")
            };
            return Ok(Err(Refusal::new(Reason::Replay, why)));
        };
        // From here on the reply is authentic and answers a request of ours: whatever happens, that request
        // is answered, so the next run asks again at once instead of waiting for `reply-timeout`.
        let res = self.answer_reply(&reply, &parsed, digest, &nonce, seq)?;
        if res.is_err() {
            self.db.close_outstanding(&nonce)?;
        }
        Ok(res)
    }

    /// The checks and the apply for an authentic reply to an outstanding request.
    fn answer_reply(
        &mut self,
        reply: &Reply,
        parsed: &envelope::Parsed,
        digest: &Digest,
        nonce: &str,
        seq: u64,
    ) -> Result<Result<Handled, Refusal>> {
        macro_rules! refuse {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(r) => return Ok(Err(r)),
                }
            };
        }
        if reply.request_seq != seq {
            return Ok(Err(Refusal::new(
                Reason::Malformed,
                format!("reply names request {}, but nonce {nonce} belongs to request {seq}", reply.request_seq),
            )));
        }
        let (applied, applied_root, previous) = self.db.applied()?;
        if reply.generation < applied {
            return Ok(Err(Refusal::new(
                Reason::Rollback,
                format!("reply brings generation {}, older than the applied {applied}", reply.generation),
            )));
        }
        if reply.generation == applied
            && let Some(root) = applied_root
            && root != reply.root
        {
            return Ok(Err(Refusal::new(
                Reason::Rollback,
                format!(
                    "reply brings generation {applied} with root {}, but generation {applied} has root {}",
                    reply.root.short(),
                    root.short()
                ),
            )));
        }
        // A local rollback holds back the generation it undid (node::rollback).
        if let Some(held) = super::rollback::hold(&self.db, reply.generation, nonce, digest)? {
            return Ok(Ok(held));
        }
        if reply.parts != 1 {
            return Ok(Err(Refusal::new(
                Reason::Unexpected,
                format!("reply in {} parts; this build reads single-part replies", reply.parts),
            )));
        }
        refuse!(protocol::check_payloads(reply, &parsed.attachments));
        if reply.need_full_inventory {
            if !reply.ops.is_empty() {
                return Ok(Err(Refusal::new(
                    Reason::Malformed,
                    "a reply asking for a full inventory carries operations",
                )));
            }
            info!("the owner asked for the full tree; the next request lists it");
            self.db.set_meta("need_full_inventory", "1")?;
            return self.current(nonce, digest, applied);
        }

        let data = self.cfg.recipient.data.clone();
        let scan = self.scan_tree()?;
        if reply.generation == applied
            && reply.ops.is_empty()
            && scan.manifest.root() == reply.root
            && scan.foreign.is_empty()
        {
            return self.current(nonce, digest, applied);
        }
        let plan = refuse!(apply::plan(&scan, &previous, reply, self.cfg.recipient.on_extra));
        if plan.steps.is_empty() && reply.generation == applied {
            // Only kept extras differ from the generation: nothing to do.
            return self.current(nonce, digest, applied);
        }
        let stage_dir = self.staging_root()?.join(&reply.reply_id);
        if stage_dir.exists() {
            std::fs::remove_dir_all(&stage_dir)
                .with_context(|| format!("failed to clear `{}`", stage_dir.display()))?;
        }
        let payload = |id: &str| parsed.attachments.get(id).map(Vec::as_slice);
        match apply::stage(&plan, reply, &payload, &stage_dir) {
            Ok(()) => {}
            Err(e) => {
                let _ = std::fs::remove_dir_all(&stage_dir);
                match e {
                    StageError::Refused(r) => return Ok(Err(r)),
                    io @ StageError::Io { .. } => {
                        return Err(anyhow::Error::new(io).context("the data tree is unchanged"));
                    }
                }
            }
        }
        let journal = Journal {
            version: 1,
            data_root: data,
            stage_dir,
            generation: reply.generation,
            reply_id: reply.reply_id.clone(),
            nonce: nonce.to_owned(),
            message: *digest,
            ops: reply.ops.len(),
            target: plan.target.listing(),
            steps: plan.steps,
            kind: JournalKind::Apply,
        };
        journal.commit(&self.cfg.state_dir)?;
        crate::failpoint::hit("apply-committed");
        journal.execute().context("apply interrupted; the next run finishes it")?;
        crate::failpoint::hit("apply-done");
        self.complete(&journal)?;
        if !plan.kept.is_empty() {
            info!(kept = plan.kept.len(), "left files the owner does not list in place (on-extra = \"keep\")");
        }
        info!(generation = reply.generation, ops = reply.ops.len(), root = %reply.root.short(), "applied");
        Ok(Ok(Handled::Applied { generation: reply.generation, ops: reply.ops.len() }))
    }

    /// Scans the data tree, reading only files that changed since the last scan (the stat cache).
    pub(crate) fn scan_tree(&self) -> Result<scan::Scan> {
        let data = &self.cfg.recipient.data;
        let old = self.db.stat_cache()?;
        let c =
            scan::scan_cached(data, &old).with_context(|| format!("failed to scan data tree `{}`", data.display()))?;
        self.db.transaction(|db| db.save_stat_cache(&old, &c.cache))?;
        tracing::debug!(entries = c.scan.manifest.len(), hashed = c.hashed, "scanned the data tree");
        Ok(c.scan)
    }

    /// Records a reply that confirms the tree is current.
    fn current(&mut self, nonce: &str, digest: &Digest, generation: u64) -> Result<Result<Handled, Refusal>> {
        self.db.transaction(|db| {
            db.close_outstanding(nonce)?;
            db.mark_fresh_reply()?;
            db.mark_seen(digest, "processed")
        })?;
        info!(generation, "owner confirms the tree is current");
        Ok(Ok(Handled::Current { generation }))
    }

    /// Where files are staged: on the data tree's file system, outside the data tree.
    pub(crate) fn staging_root(&self) -> Result<PathBuf> {
        if let Some(dir) = &self.cfg.recipient.staging_dir {
            std::fs::create_dir_all(dir)?;
            return Ok(dir.clone());
        }
        let data = &self.cfg.recipient.data;
        let in_state = self.cfg.state_dir.join("staging");
        std::fs::create_dir_all(&in_state)?;
        let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev());
        if dev(&in_state)? == dev(data).with_context(|| format!("data tree `{}` is missing", data.display()))? {
            return Ok(in_state);
        }
        let parent = data.parent().context("the data tree has no parent directory")?;
        let name = data.file_name().map_or_else(|| "data".into(), |n| n.to_string_lossy().into_owned());
        let beside = parent.join(format!(".{name}.mailferry-staging"));
        std::fs::create_dir_all(&beside)
            .with_context(|| format!("failed to create staging directory `{}`", beside.display()))?;
        Ok(beside)
    }
}

/// The recipient's status, read without taking the state lock and without finishing an interrupted apply.
///
/// # Errors
/// State failures.
pub fn status(cfg: &RecipientConfig) -> Result<RecipientStatus> {
    let db = Db::open(&cfg.state_dir.join("state.db"))?;
    let (generation, root, _) = db.applied()?;
    Ok(RecipientStatus {
        role: "recipient",
        name: cfg.recipient.name.clone(),
        data: cfg.recipient.data.clone(),
        generation,
        root: root.map(|r| r.to_hex()),
        last_request_at: db.meta("last_request_at")?.and_then(|v| v.parse().ok()),
        last_reply_at: db.meta("last_reply_at")?.and_then(|v| v.parse().ok()),
        outstanding: db.outstanding_count()?,
        rejected: db.rejection_count()?,
        interrupted_apply: Journal::path(&cfg.state_dir).exists(),
        outbox: Outbox::status(&db)?,
        previous_generation: db.previous()?.map(|p| p.generation),
        rollback_held: db.rollback_hold()?,
        stale: stale_since(&db, cfg)?.is_some(),
        stale_after: cfg.recipient.stale_after().as_secs(),
        transport: super::TransportStatus::read(&db)?,
    })
}

/// How long the recipient has gone without a fresh, authenticated reply, if that is longer than its
/// `stale-after`. The clock starts at the last accepted reply, or when the recipient was set up.
///
/// # Errors
/// State failures.
pub fn stale_since(db: &Db, cfg: &RecipientConfig) -> Result<Option<std::time::Duration>> {
    let since = db.meta("last_reply_at")?.and_then(|v| v.parse::<u64>().ok()).or(db.created_at()?);
    let Some(since) = since else { return Ok(None) };
    let quiet = std::time::Duration::from_secs(now().saturating_sub(since));
    // Times are whole seconds: stale once the quiet reaches `stale-after`.
    Ok((quiet >= cfg.recipient.stale_after()).then_some(quiet))
}

/// If the recipient is stale and has an `admin-address`, queues one notice per stale spell. Returns whether
/// it is stale.
///
/// # Errors
/// State failures.
pub fn notice_staleness(db: &Db, cfg: &RecipientConfig) -> Result<bool> {
    let Some(quiet) = stale_since(db, cfg)? else { return Ok(false) };
    let r = &cfg.recipient;
    warn!(
        quiet = %humantime::format_duration(std::time::Duration::from_secs(quiet.as_secs())),
        "no fresh reply from the owner for longer than stale-after ({}): updates may be withheld",
        humantime::format_duration(r.stale_after())
    );
    let Some(admin) = &r.admin_address else { return Ok(true) };
    if db.meta("stale_notified_at")?.is_some_and(|v| !v.is_empty()) {
        return Ok(true);
    }
    let text = format!(
        "mailferry recipient {:?} (data tree `{}`) has had no fresh, authenticated reply from {} for {}.\n\
         Its stale-after is {}. Updates may be withheld, or mail between the sites is failing.\n\
         Run `mailferry status --config {}` on the recipient for details.\n",
        r.name,
        r.data.display(),
        r.owner_address,
        humantime::format_duration(std::time::Duration::from_secs(quiet.as_secs())),
        humantime::format_duration(r.stale_after()),
        cfg.path.display()
    );
    let raw = mail_builder::MessageBuilder::new()
        .from(r.address.as_str())
        .to(admin.as_str())
        .subject(format!("mailferry: recipient {} is stale", r.name))
        .text_body(text)
        .write_to_vec()?;
    db.transaction(|db| {
        db.outbox_put(&format!("stale-notice-{}", now()), &r.address, admin, &raw)?;
        db.set_meta("stale_notified_at", &now().to_string())
    })?;
    Ok(true)
}

impl Node for Recipient {
    fn db(&self) -> &Db {
        &self.db
    }

    fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }

    fn act(&mut self, raw: &[u8], digest: &Digest) -> Result<Result<Handled, Refusal>> {
        self.evaluate(raw, digest)
    }
}
