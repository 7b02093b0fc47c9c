//! The recipient: asks the owner for updates, verifies replies completely, and applies them atomically.
//!
//! Order of checks for a reply (each refusal is recorded and the message filed as rejected): size limit,
//! MIME structure, auth part names this recipient, MAC under this recipient's key, control part decodes
//! (paths, modes, limits), the nonce is outstanding, the generation is not older than the applied one,
//! the generation is not held back by a local rollback (then the reply is answered but not applied), every
//! attachment is listed and every listed payload has its digest, the local tree is safe and is the
//! one the reply was computed for, the operations produce exactly the promised root, and every file
//! unpacks to its promised size and digest. Only then does the journal commit and the tree change.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use tracing::{info, warn};

use super::{Handled, Outbox, Role, RunReport, State, process_inbox};
use crate::apply::{self, Journal, JournalKind, OnExtra, StageError};
use crate::config::{Enrollment, RecipientConfig, RecipientSection, TransportConfig, read_key_file, write_secret};
use crate::crypto::{Key, KeyId, Nonce, PublicKey};
use crate::db::{Db, now};
use crate::engine::recipient::{Applied, Effect as RecipientEffect, PartStep, RecipientKeys, RecipientView, WholeStep};
use crate::engine::{self, verify};
use crate::manifest::{Digest, Entry, Listed};
use crate::path::RelPath;
use crate::protocol::envelope::{self, Outgoing};
use crate::protocol::{
    self, Auth, Control, InventoryKind, Kind, Method, Reason, Receipt, ReceiptStatus, Refusal, Reply, ReplyId, Request,
    Resend, Update, VERSION, Want,
};
use crate::scan;
use crate::statcache::{self, StatCache};
use crate::transport::Transport;

/// Returns the refusal of a `Result<_, Refusal>` from the enclosing `Result<Result<_, Refusal>>` function.
macro_rules! refuse {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(r) => return Ok(Err(r)),
        }
    };
}

/// A recipient node with its state open.
#[derive(Debug)]
pub struct Recipient {
    cfg: RecipientConfig,
    state: Rc<State>,
    key: Key,
    /// The owner's pinned Ed25519 key: replies must be signed under it.
    owner_key: Option<PublicKey>,
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
    /// Public id of the key in the key file (none if it cannot be read).
    pub key_id: Option<KeyId>,
    /// The owner's Ed25519 key replies must be signed with, if pinned.
    pub owner_public_key: Option<String>,
}

/// Creates a recipient: `DIR/recipient.toml` and `DIR/recipient.key` from an enrollment file.
///
/// # Errors
/// An unreadable or too-open enrollment file, a state directory inside the data tree, an existing
/// config, or I/O errors.
pub fn init(dir: &Path, data: &Path, enrollment: &Path, transport_root: &Path) -> Result<PathBuf> {
    let transport = TransportConfig::Maildir { root: std::path::absolute(transport_root)? };
    init_with(dir, data, enrollment, None, transport)
}

/// Creates a recipient as [`init`] does, with its state in `state_dir` (default `dir`) and any transport.
///
/// # Errors
/// As [`init`].
pub fn init_with(
    dir: &Path,
    data: &Path,
    enrollment: &Path,
    state_dir: Option<&Path>,
    transport: TransportConfig,
) -> Result<PathBuf> {
    let e = Enrollment::load(enrollment)?;
    let key = Key::from_hex(&e.key)
        .with_context(|| format!("enrollment file `{}` has an invalid key", enrollment.display()))?;
    if let Some(k) = &e.owner_public_key {
        PublicKey::from_hex(k)
            .with_context(|| format!("enrollment file `{}` has an invalid owner-public-key", enrollment.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create `{}`", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    std::fs::create_dir_all(data).with_context(|| format!("failed to create data tree `{}`", data.display()))?;
    crate::config::check_state_outside_data(dir, data)?;
    let state = state_dir.unwrap_or(dir);
    if state != dir {
        crate::config::check_state_outside_data(state, data)?;
        std::fs::create_dir_all(state).with_context(|| format!("failed to create `{}`", state.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700))?;
    }
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
        state_dir: state_dir.map(std::path::absolute).transpose()?,
        key_file: PathBuf::from("recipient.key"),
        staging_dir: None,
        interval: humantime::parse_duration(&e.transport.interval).unwrap_or(std::time::Duration::from_secs(3600)),
        reply_timeout: std::time::Duration::from_secs(6 * 3600),
        on_extra: OnExtra::Delete,
        stale_after: None,
        admin_address: None,
        owner_public_key: e.owner_public_key.clone(),
    };
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
    Db::open(&state.join("state.db"))?;
    Ok(path)
}

/// Takes up a new enrollment for this recipient (`mailferry recipient enroll`): its key replaces the key
/// file at once, and the previous and pending keys are forgotten. The enrollment must be for this
/// recipient (name, address, owner address) and pin the owner key the config pins. Returns the new key id.
///
/// # Errors
/// An enrollment for another recipient or another owner key, an unreadable enrollment, or I/O failures.
pub fn enroll(cfg: &RecipientConfig, enrollment: &Path) -> Result<KeyId> {
    let e = Enrollment::load(enrollment)?;
    let r = &cfg.recipient;
    let mine = [
        ("name", &e.name, &r.name),
        ("address", &e.address, &r.address),
        ("owner address", &e.owner_address, &r.owner_address),
    ];
    for (what, theirs, ours) in mine {
        if theirs != ours {
            bail!("enrollment file `{}` is for {what} {theirs:?}, this recipient's is {ours:?}", enrollment.display());
        }
    }
    if e.owner_public_key != r.owner_public_key {
        bail!(
            "enrollment file `{}` pins owner key {}, but `{}` pins {}: set `owner-public-key` in the config to what \
             the owner's `status` shows first",
            enrollment.display(),
            e.owner_public_key.as_deref().unwrap_or("none"),
            cfg.path.display(),
            r.owner_public_key.as_deref().unwrap_or("none")
        );
    }
    let key = Key::from_hex(&e.key)
        .with_context(|| format!("enrollment file `{}` has an invalid key", enrollment.display()))?;
    let mut node = Recipient::open_as_is(cfg.clone())?;
    let old = node.key.id();
    node.state.db.forget_keys()?;
    let path = &r.key_file;
    write_durably(path, format!("{}\n", key.to_hex()).as_bytes())
        .with_context(|| format!("failed to write the new key to `{}`", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all())?;
    }
    info!(key = %key.id(), old = %old, "enrolled afresh");
    node.key = key;
    Ok(node.key.id())
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
        let state = State::open(&cfg.state_dir)?;
        Recipient::open_in(cfg, state)
    }

    /// The recipient part of a node whose state is already open (a node holding several roles), leaving an
    /// interrupted apply alone.
    ///
    /// # Errors
    /// A state directory other than the config's, or an unreadable or too-open key file.
    pub fn open_in(cfg: RecipientConfig, state: Rc<State>) -> Result<Recipient> {
        anyhow::ensure!(
            state.dir() == cfg.state_dir,
            "the recipient's state directory `{}` is not the node's `{}`",
            cfg.state_dir.display(),
            state.dir().display()
        );
        let key = read_key_file(&cfg.recipient.key_file)?;
        let owner_key = cfg.recipient.owner_public_key.as_deref().map(PublicKey::from_hex).transpose()?;
        let mut r = Recipient { cfg, state, key, owner_key };
        // A key taken up just before a crash is written now.
        r.finish_key()?;
        Ok(r)
    }

    /// `mailferry recipient rollback`: returns the tree to the generation kept for a rollback
    /// ([`super::rollback`]), or finishes a rollback that was interrupted. The recipient must have been
    /// opened with [`Recipient::open_as_is`], so that an interrupted apply is refused here rather than
    /// finished.
    ///
    /// # Errors
    /// Nothing kept, an interrupted apply, a drifted tree (see [`super::rollback::Refused`]), content
    /// missing from the store,
    /// or I/O and state failures. Before the journal is committed the tree is unchanged; after, the next run
    /// finishes the rollback.
    pub fn rollback(&mut self) -> Result<super::rollback::RolledBack> {
        if let Some(journal) = Journal::load(self.state_dir())? {
            let JournalKind::Rollback { from } = journal.kind else {
                bail!(
                    "the apply of generation {} was interrupted; finish it first (`mailferry recipient run --once \
                     --no-request`), then roll back",
                    journal.generation
                );
            };
            warn!(from, to = journal.generation, "finishing a rollback that was interrupted");
            self.finish(&journal).context("failed to finish the interrupted rollback")?;
            return Ok(super::rollback::RolledBack { from, to: journal.generation, ops: journal.ops, resumed: true });
        }
        let (applied, _, current) = self.db().applied()?;
        let Some(previous) = self.db().previous()? else {
            bail!(
                "nothing to roll back to: no generation before {applied} is kept (one is kept after an update to a \
                 newer generation, and only one level: a rollback uses it up)"
            );
        };
        let scan = self.scan_tree()?;
        let to = previous.generation;
        let plan = super::rollback::plan(&scan, &current, &previous.manifest, self.config().recipient.on_extra)
            .map_err(|e| {
                anyhow::format_err!(
                    "cannot roll back generation {applied} to {to}: {e}; let the next sync repair the tree (`mailferry \
                 recipient run --once`), or undo the change, then roll back"
                )
            })?;
        let id = Nonce::generate().to_hex();
        let stage_dir = self.staging_root()?.join(&id);
        let data = &self.config().recipient.data;
        if let Err(e) = super::rollback::stage(&plan, &previous.store, data, &scan.manifest, &stage_dir) {
            let _ = std::fs::remove_dir_all(&stage_dir);
            return Err(e.context(format!("cannot roll back generation {applied} to {to}; the data tree is unchanged")));
        }
        let journal = Journal {
            version: 1,
            data_root: data.clone(),
            stage_dir,
            generation: to,
            // A rollback's history row gets a fresh id of the form of a reply id.
            reply_id: ReplyId::unchecked(id),
            nonce: String::new(),
            message: Digest([0; 32]),
            ops: plan.ops.len(),
            target: previous.manifest.listing(),
            steps: plan.steps,
            kind: JournalKind::Rollback { from: applied },
            key_id: None,
        };
        journal.commit(self.state_dir())?;
        crate::failpoint::hit("apply-committed");
        self.finish(&journal).context("rollback interrupted; the next run finishes it")?;
        Ok(super::rollback::RolledBack { from: applied, to, ops: journal.ops, resumed: false })
    }

    /// The configuration.
    pub fn config(&self) -> &RecipientConfig {
        &self.cfg
    }

    /// Finishes an apply that a crash interrupted after its journal was committed.
    pub(crate) fn recover(&mut self) -> Result<()> {
        let Some(journal) = Journal::load(&self.cfg.state_dir)? else { return Ok(()) };
        warn!(generation = journal.generation, "finishing an apply that was interrupted");
        self.finish(&journal).context("failed to finish the interrupted apply")
    }

    /// The one place a committed journal is finished, whether it is an apply just committed, a rollback,
    /// or either found after a crash: its steps are performed (they may be repeated safely), then the
    /// outcome is recorded: for an apply the applied generation and its receipt, for a rollback the
    /// generation before and the hold. Whatever must follow every change of the tree goes here.
    ///
    /// # Errors
    /// I/O or state failures; the journal then stays and the next run finishes it.
    pub(crate) fn finish(&mut self, journal: &Journal) -> Result<()> {
        journal.execute()?;
        crate::failpoint::hit("apply-done");
        match journal.kind {
            JournalKind::Apply => self.complete(journal),
            JournalKind::Rollback { .. } => super::rollback::complete(&self.state.db, &self.cfg.state_dir, journal),
        }
    }

    /// Records a finished apply and queues its receipt in one transaction; then removes the journal.
    fn complete(&mut self, journal: &Journal) -> Result<()> {
        let target = journal.target()?;
        let nonce = Nonce::from_hex(&journal.nonce).map_err(anyhow::Error::msg)?;
        // A key this reply brought is the key from now on: the receipt is made under it, which tells the
        // owner the rotation arrived.
        let key = match self.state.db.subscription()?.pending_key {
            Some(hex) => Key::from_hex(&hex).context("the pending key in the state database is corrupt")?,
            None => self.key.clone(),
        };
        let receipt =
            self.receipt(&key, nonce, &journal.reply_id, journal.generation, target.root(), ReceiptStatus::Applied)?;
        let (from, to) = (&self.cfg.recipient.address, &self.cfg.recipient.owner_address);
        self.state.db.transaction(|db| {
            if !db.reply_applied(&journal.reply_id)? {
                super::rollback::keep_previous(db, journal)?;
                let key_id = journal.key_id.as_ref();
                db.record_applied(journal.generation, &target, &journal.reply_id, &journal.nonce, journal.ops, key_id)?;
            }
            // Any other request described the tree as it was before: none of them is answerable now.
            db.close_all_outstanding()?;
            db.mark_fresh_reply()?;
            db.mark_seen(&journal.message, "processed")?;
            db.outbox_put(&format!("receipt-{}", journal.reply_id), from, to, &receipt)
        })?;
        journal.finish(&self.cfg.state_dir)?;
        if let Some(root) = journal.stage_dir.parent() {
            super::rollback::tidy_staging(&self.state.db, root);
        }
        self.finish_key()
    }

    fn receipt(
        &self,
        key: &Key,
        nonce: Nonce,
        reply_id: &ReplyId,
        generation: u64,
        root: Digest,
        status: ReceiptStatus,
    ) -> Result<Vec<u8>> {
        let receipt = Receipt {
            mailferry: VERSION,
            kind: Kind::Receipt,
            recipient: self.cfg.recipient.name.clone(),
            nonce,
            reply_id: reply_id.clone(),
            created: now(),
            generation,
            root,
            status,
        };
        let control = protocol::encode(&receipt);
        let auth = protocol::encode(&Auth::sign(&self.cfg.recipient.name, key, &control));
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
        report.sent += Outbox::flush(&self.state.db, transport).await?.sent;
        process_inbox(self, transport, &mut report).await?;
        if request {
            report.requested = self.maybe_request()?;
        }
        report.sent += Outbox::flush(&self.state.db, transport).await?.sent;
        Ok(report)
    }

    /// When [`Recipient::maybe_request`] will next send a request (Unix seconds), if an unanswered request
    /// holds it back now: the newest outstanding request's time plus `reply-timeout`.
    ///
    /// # Errors
    /// State failures.
    pub fn request_blocked_until(&self) -> Result<Option<u64>> {
        let timeout = self.cfg.recipient.reply_timeout.as_secs();
        Ok(self.state.db.newest_outstanding()?.map(|sent| sent + timeout).filter(|at| *at > now()))
    }

    /// Sends a request unless one sent less than `reply-timeout` ago is still unanswered. Returns whether
    /// one was queued.
    ///
    /// # Errors
    /// An unreadable data tree or state failures.
    pub fn maybe_request(&mut self) -> Result<bool> {
        let timeout = self.cfg.recipient.reply_timeout.as_secs();
        self.state.db.expire_outstanding(timeout.max(7 * 24 * 3600))?;
        let resend = self.missing_parts()?;
        let last_part = resend.as_ref().map_or(0, |(_, at)| *at);
        if let Some(sent) = self.state.db.newest_outstanding()?
            && now().saturating_sub(sent.max(last_part)) < timeout
        {
            info!(
                "a request sent {}s ago is still awaiting its reply; not sending another",
                now().saturating_sub(sent)
            );
            return Ok(false);
        }
        let resend = resend.map(|(r, _)| r);
        let sub = self.state.db.subscription()?;
        let full_content = sub.full_content;
        let scan = self.scan_tree()?;
        let root = scan.manifest.root();
        let (generation, applied_root) = self.state.db.applied_root()?;
        // After first contact only the drift from the applied generation travels, unless the owner asked
        // for the whole tree.
        let full = generation == 0 || sub.need_full_inventory;
        tracing::debug!(
            generation,
            full,
            unchanged = applied_root == Some(root),
            resend = resend.is_some(),
            "building a request"
        );
        let (inventory_kind, inventory, removed) = if full {
            (InventoryKind::Full, scan.manifest.listing(), Vec::new())
        } else if applied_root == Some(root) {
            // Equal roots are equal trees: no drift, and no need to load the applied manifest.
            (InventoryKind::Changes, Vec::new(), Vec::new())
        } else {
            let (_, _, applied) = self.state.db.applied()?;
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
        // A large inventory goes as a compressed attachment rather than in the control part.
        let (inventory, packed) = if protocol::encode(&inventory).len() > protocol::INVENTORY_INLINE_MAX {
            let (payload, bytes) = protocol::pack_inventory(&inventory);
            (Vec::new(), Some((payload, bytes)))
        } else {
            (inventory, None)
        };
        let nonce = Nonce::generate();
        let seq = sub.seq + 1;
        let req = Request {
            mailferry: VERSION,
            kind: Kind::Request,
            recipient: self.cfg.recipient.name.clone(),
            nonce,
            seq,
            created: now(),
            generation,
            root,
            inventory_kind,
            inventory,
            removed,
            inventory_payload: packed.as_ref().map(|(p, _)| p.clone()),
            want: Want::Latest,
            full_content,
            resend,
            fresh: sub.fresh_next,
            methods: Method::ALL.to_vec(),
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
            payloads: packed.iter().map(|(p, bytes)| (p.id.as_str(), bytes.as_slice())).collect(),
        })?;
        // The nonce becomes outstanding in the same transaction that queues the request.
        let (from, to) = (&self.cfg.recipient.address, &self.cfg.recipient.owner_address);
        self.state.db.transaction(|db| {
            anyhow::ensure!(db.next_seq()? == seq, "another process sent a request meanwhile");
            db.add_outstanding(&nonce.to_hex(), seq)?;
            if sub.fresh_next {
                db.set_fresh_next(false)?;
            }
            if full {
                db.set_need_full_inventory(false)?;
            }
            db.outbox_put(&format!("request-{seq:010}"), from, to, &raw)
        })?;
        match &req.resend {
            Some(r) => {
                info!(seq, reply = %r.reply_id, parts = ?r.parts, bytes = raw.len(), "request queued, asking for lost parts again")
            }
            None => info!(seq, generation, entries = req.inventory.len(), bytes = raw.len(), "request queued"),
        }
        Ok(true)
    }

    /// The newest incomplete reply whose request is still outstanding, with the parts it lacks and when
    /// its last part arrived. Incomplete replies whose request was given up are dropped.
    fn missing_parts(&mut self) -> Result<Option<(Resend, u64)>> {
        let mut found = None;
        for (reply_id, nonce, at) in self.state.db.partial_replies()? {
            let kept = self.state.db.received_parts(&reply_id)?;
            let parts = kept.first().and_then(|(_, c)| serde_json::from_slice::<Reply>(c).ok()).map_or(0, |r| r.parts);
            if self.state.db.outstanding(&nonce)?.is_none() {
                info!(reply = %reply_id, "dropping the kept parts of a reply whose request was given up");
                self.forget_parts(&reply_id)?;
                continue;
            }
            if found.is_some() || parts == 0 {
                continue;
            }
            let have: BTreeSet<u32> = kept.iter().map(|(k, _)| *k).collect();
            let missing = (1..=parts).filter(|k| !have.contains(k)).collect();
            found = Some((Resend { reply_id, parts: missing }, at));
        }
        // A reply a reference pointed to, none of which is here: every part of it.
        for (reply_id, nonce, parts) in self.state.db.wanted_replies()? {
            if self.state.db.outstanding(&nonce)?.is_none() {
                self.state.db.forget_parts(&reply_id)?;
                continue;
            }
            if found.is_none() && self.state.db.received_parts(&reply_id)?.is_empty() {
                found = Some((Resend { reply_id, parts: (1..=parts).collect() }, 0));
            }
        }
        Ok(found)
    }

    fn evaluate(&mut self, raw: &[u8], digest: &Digest) -> Result<Result<Handled, Refusal>> {
        let now = now();
        let view = self.view();
        let policy = self.policy();
        let msg = match refuse!(verify::open(raw, &RecipientKeys(&view), &policy, now)?) {
            verify::Opened::Verified(m) => *m,
            verify::Opened::NotForThisNode { kind, .. } => {
                let what =
                    format!("not for this node: a {kind} this recipient sent (carry it to the owner); nothing to do");
                self.state.db.mark_seen(digest, "processed")?;
                info!("{what}");
                return Ok(Ok(Handled::NotForThisNode(what)));
            }
        };
        let Control::Reply(reply) = msg.control else {
            return Ok(Err(Refusal::new(Reason::Unexpected, "a recipient accepts only replies")));
        };
        let nonce = reply.nonce.to_hex();
        match engine::recipient::on_part(&view, &reply, msg.key_role)? {
            PartStep::Refused { refusal, give_up } => {
                if give_up {
                    self.give_up(&nonce, &reply.reply_id)?;
                }
                return Ok(Err(refusal));
            }
            PartStep::Held { generation, .. } => {
                // A local rollback holds back the generation it undid (node::rollback).
                if let Some(held) = super::rollback::hold(&self.state.db, generation, &nonce, digest)? {
                    self.forget_parts(&reply.reply_id)?;
                    self.state.db.set_fresh_next(true)?;
                    return Ok(Ok(held));
                }
            }
            PartStep::Keep { .. } => {}
        }
        // A part that does not carry its chunk intact is refused alone: the others stay, and the missing
        // one is asked for again after `reply-timeout`.
        refuse!(protocol::check_payloads(&reply, &msg.attachments));
        let Some(update) = refuse!(self.keep_part(&reply, &msg.attachments, &nonce)?) else {
            let have = self.state.db.received_parts(&reply.reply_id)?.len() as u32;
            self.state.db.mark_seen(digest, "processed")?;
            info!(reply = %reply.reply_id, part = reply.part, have, of = reply.parts, "kept a part of a reply");
            return Ok(Ok(Handled::PartKept { reply_id: reply.reply_id.clone(), have, of: reply.parts }));
        };
        // From here on the reply is authentic, whole, and answers a request of ours: whatever happens,
        // that request is answered, so the next run asks again at once instead of waiting for
        // `reply-timeout`.
        let res = self.answer_reply(&update, &msg.key, digest, &nonce, now);
        match &res {
            Ok(Err(_)) => self.give_up(&nonce, &update.head.reply_id)?,
            Ok(Ok(_)) => self.forget_parts(&update.head.reply_id)?,
            // A local failure (a full disk): keep the parts, the next run tries again.
            Err(_) => {}
        }
        res
    }

    /// Applies the effects the engine accepted a reply with, in the caller's transaction. A new key goes
    /// into the state database first (the current key kept as the previous one for the grace period, the
    /// new one pending); [`Recipient::finish_key`] then writes the key file.
    fn apply_effects(db: &Db, current: &Key, effects: &[RecipientEffect]) -> Result<()> {
        for e in effects {
            match e {
                RecipientEffect::TakeKey { new, previous_until } => {
                    db.take_key(&current.to_hex(), &current.id(), *previous_until, &new.to_hex(), &new.id())?;
                }
                RecipientEffect::NeedFullInventory => db.set_need_full_inventory(true)?,
            }
        }
        Ok(())
    }

    /// Writes a key taken up but not yet in the key file (after a crash, on the next start), then forgets
    /// it was pending. The key file is replaced whole (temporary file, fsync, rename, directory fsync).
    fn finish_key(&mut self) -> Result<()> {
        let Some(hex) = self.state.db.subscription()?.pending_key else { return Ok(()) };
        let new = Key::from_hex(&hex).context("the pending key in the state database is corrupt")?;
        if new != self.key {
            crate::failpoint::hit("rekey-saved");
            let path = &self.cfg.recipient.key_file;
            write_durably(path, format!("{}\n", new.to_hex()).as_bytes())
                .with_context(|| format!("failed to write the new key to `{}`", path.display()))?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir).and_then(|d| d.sync_all())?;
            }
            info!(key = %new.id(), old = %self.key.id(), "took up the new key the owner sent");
            self.key = new;
        }
        self.state.db.clear_pending_key()
    }

    /// Closes request `nonce` after its reply was refused, and drops the reply's kept parts. The next
    /// request asks `fresh`: a reference to the reply refused would be of no use.
    fn give_up(&self, nonce: &str, reply_id: &ReplyId) -> Result<()> {
        self.state.db.close_outstanding(nonce)?;
        self.state.db.set_fresh_next(true)?;
        self.forget_parts(reply_id)
    }

    fn forget_parts(&self, reply_id: &ReplyId) -> Result<()> {
        self.state.db.forget_parts(reply_id)?;
        let dir = self.parts_dir(reply_id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                warn!(error = %e, "could not remove `{}`", dir.display());
            }
            _ => {}
        }
        Ok(())
    }

    fn parts_dir(&self, reply_id: &ReplyId) -> PathBuf {
        // Reply ids are 32 hex digits (checked when the control part was decoded): a plain file name.
        self.cfg.state_dir.join("parts").join(reply_id.as_str())
    }

    /// Keeps a verified part on disk. When every part is here, assembles the pack, checks it, and returns
    /// the whole reply with its body decoded.
    fn keep_part(
        &mut self,
        reply: &Reply,
        attachments: &std::collections::BTreeMap<String, Vec<u8>>,
        nonce: &str,
    ) -> Result<Result<Option<Update>, Refusal>> {
        let dir = self.parts_dir(&reply.reply_id);
        let kept = self.state.db.received_parts(&reply.reply_id)?;
        if let Some((_, first)) = kept.first() {
            let first: Reply = serde_json::from_slice(first).context("a kept part's control is corrupt")?;
            if !first.same_reply(reply) {
                return Ok(Err(Refusal::new(
                    Reason::Malformed,
                    format!("part {} of reply {} disagrees with the parts kept before", reply.part, reply.reply_id),
                )));
            }
        }
        let own = reply.own_payload().expect("check_payloads found this part's chunk");
        std::fs::create_dir_all(&dir).with_context(|| format!("failed to create `{}`", dir.display()))?;
        let chunk = dir.join(format!("{}.chunk", reply.part));
        write_durably(&chunk, &attachments[&own.id])?;
        self.state.db.record_part(&reply.reply_id, reply.part, nonce, &protocol::encode(reply))?;
        let have: BTreeSet<u32> = self.state.db.received_parts(&reply.reply_id)?.into_iter().map(|(k, _)| k).collect();
        if have.len() < reply.parts as usize {
            return Ok(Ok(None));
        }
        // Every part is here: one pack file, each chunk checked again on the way (the disk may lie).
        let pack_path = dir.join("pack");
        {
            let mut out = std::io::BufWriter::new(
                std::fs::File::create(&pack_path)
                    .with_context(|| format!("failed to create `{}`", pack_path.display()))?,
            );
            for (k, p) in (1..).zip(&reply.payloads) {
                let path = dir.join(format!("{k}.chunk"));
                let bytes = std::fs::read(&path).with_context(|| format!("failed to read `{}`", path.display()))?;
                if bytes.len() as u64 != p.size || Digest::of(&bytes) != p.blake3 {
                    self.state.db.forget_parts(&reply.reply_id)?;
                    bail!("kept part {k} of reply {} is damaged on disk; it will be asked for again", reply.reply_id);
                }
                out.write_all(&bytes)?;
            }
            out.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()?;
        }
        let body = refuse!(read_body(&pack_path, reply, &self.cfg.limits)?);
        Ok(Ok(Some(Update { head: reply.clone(), body })))
    }

    /// The checks and the apply for an authentic, whole reply to an outstanding request, made under `under`.
    fn answer_reply(
        &mut self,
        update: &Update,
        under: &Key,
        digest: &Digest,
        nonce: &str,
        now: u64,
    ) -> Result<Result<Handled, Refusal>> {
        let reply = &update.head;
        let (_, _, previous) = self.state.db.applied()?;
        let data = self.cfg.recipient.data.clone();
        let step = {
            let view = self.view();
            let mut scan = || self.scan_tree();
            engine::recipient::on_whole(&view, update, under, &mut scan, &previous, self.cfg.recipient.on_extra, now)?
        };
        let (plan, effects, scan) = match step {
            WholeStep::Refused(r) => return Ok(Err(r)),
            WholeStep::Current { generation, effects } => {
                if effects.contains(&RecipientEffect::NeedFullInventory) {
                    info!("the owner asked for the full tree; the next request lists it");
                }
                return self.current(nonce, digest, generation, &effects);
            }
            WholeStep::Apply { plan, effects, scan } => (plan, effects, scan),
            WholeStep::Referred { same, step, effects } => return self.referred(nonce, digest, &same, step, &effects),
        };
        let stage_dir = self.staging_root()?.join(reply.reply_id.as_str());
        if stage_dir.exists() {
            std::fs::remove_dir_all(&stage_dir)
                .with_context(|| format!("failed to clear `{}`", stage_dir.display()))?;
        }
        // Where local content is: any path whose scanned digest matches.
        let mut by_digest: HashMap<Digest, PathBuf> = HashMap::new();
        for (p, e) in scan.manifest.iter() {
            if let Entry::File(m) = e {
                by_digest.entry(m.blake3).or_insert_with(|| data.join(p.as_str()));
            }
        }
        let pack = self.parts_dir(&reply.reply_id).join("pack");
        let lookup = |d: &Digest| by_digest.get(d).cloned();
        let sources = apply::Sources { pack: &pack, local: &lookup };
        if let Err(e) = apply::stage(&plan, update, &sources, &stage_dir) {
            let _ = std::fs::remove_dir_all(&stage_dir);
            match e {
                StageError::Refused(r) => {
                    // Whole files can be checked without trusting anything local: ask for them next time.
                    warn!("{r}; the next request asks for whole files");
                    self.state.db.set_full_content(true)?;
                    return Ok(Err(r));
                }
                io @ StageError::Io { .. } => {
                    return Err(anyhow::Error::new(io).context("the data tree is unchanged"));
                }
            }
        }
        // Everything is verified and staged: the reply is accepted. A key it brings is taken up now, before
        // the journal commits (a crash in between finishes writing the key on the next start, and the reply,
        // not yet marked seen, is applied under the key it was made with, kept as the previous one).
        let key = &self.key;
        self.state.db.transaction(|db| Recipient::apply_effects(db, key, &effects))?;
        let journal = Journal {
            version: 1,
            data_root: data,
            stage_dir,
            generation: reply.generation,
            reply_id: reply.reply_id.clone(),
            nonce: nonce.to_owned(),
            message: *digest,
            ops: update.body.ops.len(),
            target: plan.target.listing(),
            steps: plan.steps,
            kind: JournalKind::Apply,
            key_id: Some(under.id()),
        };
        journal.commit(&self.cfg.state_dir)?;
        crate::failpoint::hit("apply-committed");
        self.finish(&journal).context("apply interrupted; the next run finishes it")?;
        self.state.db.set_full_content(false)?;
        if !plan.kept.is_empty() {
            info!(kept = plan.kept.len(), "left files the owner does not list in place (on-extra = \"keep\")");
        }
        let ops = update.body.ops.len();
        info!(generation = reply.generation, ops, root = %reply.root.short(), "applied");
        Ok(Ok(Handled::Applied { generation: reply.generation, ops }))
    }

    /// Scans the data tree, reading only files that changed since the last scan (the stat cache).
    pub(crate) fn scan_tree(&self) -> Result<scan::Scan> {
        self.scan_tree_saving(true)
    }

    /// Scans the data tree; with `save`, keeps the stat cache for the next scan.
    fn scan_tree_saving(&self, save: bool) -> Result<scan::Scan> {
        let data = &self.cfg.recipient.data;
        let cache_file = self.cfg.state_dir.join(statcache::FILE_NAME);
        let old = StatCache::load(&cache_file).unwrap_or_else(|e| {
            warn!("{:#}; every file will be read again", anyhow::Error::from(e));
            StatCache::new()
        });
        let c =
            scan::scan_cached(data, &old).with_context(|| format!("failed to scan data tree `{}`", data.display()))?;
        // An unchanged tree writes nothing. The cache only saves work, so failing to write it is not fatal.
        if save
            && let Some(new) = &c.cache
            && let Err(e) = new.save(&cache_file)
        {
            warn!("failed to write the stat cache `{}`: {e}", cache_file.display());
        }
        tracing::debug!(entries = c.scan.manifest.len(), hashed = c.hashed, "scanned the data tree");
        Ok(c.scan)
    }

    /// Records a reference reply: the request is answered, and the reply it points to is waited for, asked for
    /// again, or (when it can no longer be used here) the next request asks `fresh`.
    fn referred(
        &mut self,
        nonce: &str,
        digest: &Digest,
        same: &protocol::SameAs,
        step: engine::recipient::Referred,
        effects: &[RecipientEffect],
    ) -> Result<Result<Handled, Refusal>> {
        use engine::recipient::Referred;
        let key = &self.key;
        self.state.db.transaction(|db| {
            Recipient::apply_effects(db, key, effects)?;
            match step {
                Referred::Wait => {}
                Referred::AskParts => db.want_reply(&same.reply_id, &same.nonce.to_hex(), same.parts)?,
                Referred::AskFresh => db.set_fresh_next(true)?,
            }
            db.close_outstanding(nonce)?;
            db.mark_fresh_reply()?;
            db.mark_seen(digest, "processed")
        })?;
        self.finish_key()?;
        let what = match step {
            Referred::Wait => "its parts are arriving",
            Referred::AskParts => "none of it is here: the next request asks for its parts",
            Referred::AskFresh => "its request is no longer outstanding here: the next request asks afresh",
        };
        info!(earlier = %same.reply_id, "the owner answered with a reference to a reply sent before; {what}");
        Ok(Ok(Handled::Referred { reply_id: same.reply_id.clone() }))
    }

    /// Records a reply that confirms the tree is current, with the effects the engine accepted it with.
    fn current(
        &mut self,
        nonce: &str,
        digest: &Digest,
        generation: u64,
        effects: &[RecipientEffect],
    ) -> Result<Result<Handled, Refusal>> {
        let key = &self.key;
        self.state.db.transaction(|db| {
            Recipient::apply_effects(db, key, effects)?;
            db.close_outstanding(nonce)?;
            db.mark_fresh_reply()?;
            db.mark_seen(digest, "processed")
        })?;
        self.finish_key()?;
        info!(generation, "owner confirms the tree is current");
        Ok(Ok(Handled::Current { generation }))
    }

    /// Where files are staged: a directory from which a rename into the data tree works (see
    /// [`apply::staging::choose`]), outside the data tree.
    pub(crate) fn staging_root(&self) -> Result<PathBuf> {
        let r = &self.cfg.recipient;
        apply::staging::choose(r.staging_dir.as_deref(), &self.cfg.state_dir, &r.data)
    }
}

/// What a waiting reply would do, as `recipient run --dry-run` shows it (nothing is changed to find out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Preview {
    /// Applying it would make these changes to the tree.
    Apply {
        /// The generation it brings.
        generation: u64,
        /// The reply.
        reply_id: ReplyId,
        /// Each change, itemized as `rsync -i` does (`>f+++++++++`, `>fc........`, `*deleting`, ...).
        changes: Vec<Change>,
    },
    /// The tree already is what it brings.
    Current {
        /// The generation.
        generation: u64,
    },
    /// Not all of its parts are here yet.
    Incomplete {
        /// The reply.
        reply_id: ReplyId,
        /// Parts here (kept, or waiting in the inbox).
        have: u32,
        /// Parts it has.
        of: u32,
    },
    /// It points to a reply sent before (`same-as`).
    Referred {
        /// The reply referred to.
        reply_id: ReplyId,
    },
    /// A local rollback holds its generation back.
    Held {
        /// The generation it brings.
        generation: u64,
    },
    /// It would be refused.
    Refused {
        /// The reason code.
        reason: String,
        /// Why.
        detail: String,
    },
}

/// One change an apply would make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The `rsync -i` code.
    pub code: String,
    /// The path.
    pub path: RelPath,
}

/// The changes from `from` to `to`, itemized as `rsync -i` does; paths in `kept` stay.
fn itemize(from: &crate::manifest::Manifest, to: &crate::manifest::Manifest, kept: &[RelPath]) -> Vec<Change> {
    let mut out = Vec::new();
    for op in crate::manifest::diff(from, to) {
        let path = op.path().clone();
        let code = match (&op, from.get(&path)) {
            (crate::manifest::Op::Delete { .. }, _) if kept.contains(&path) => continue,
            (crate::manifest::Op::Delete { .. }, _) => "*deleting".to_owned(),
            (crate::manifest::Op::Mkdir { .. }, _) => "cd+++++++++".to_owned(),
            (crate::manifest::Op::Put { blake3, size, mode, .. }, Some(Entry::File(old))) => format!(
                ">f{}{}..{}....",
                if old.blake3 != *blake3 { 'c' } else { '.' },
                if old.size != *size { 's' } else { '.' },
                if old.mode != *mode { 'p' } else { '.' }
            ),
            (crate::manifest::Op::Put { .. }, _) => ">f+++++++++".to_owned(),
            (_, Some(Entry::Link(_))) => "cL.c.......".to_owned(),
            _ => "cL+++++++++".to_owned(),
        };
        out.push(Change { code, path });
    }
    out
}

impl Recipient {
    /// Verifies and plans the replies in `messages` (and the parts kept before) as a run would, and says
    /// what applying each would change, without changing anything: no part is kept, no message marked
    /// seen, no request answered, the stat cache not written. Staging (delta bases checked against their
    /// digests) is not tried, so a reply that staging would refuse shows as it would be planned.
    ///
    /// # Errors
    /// Local failures (an unreadable tree or state).
    pub fn preview(&self, messages: &[Vec<u8>]) -> Result<Vec<Preview>> {
        use std::collections::BTreeMap;
        let now = now();
        let view = self.view();
        let policy = self.policy();
        let refused = |r: Refusal| Preview::Refused { reason: r.reason.code().to_owned(), detail: r.detail };
        let mut out = Vec::new();
        // Per reply: its control fields, the key that made it, and its chunks by part number.
        type Gathered = (Reply, Key, BTreeMap<u32, Vec<u8>>);
        let mut replies: BTreeMap<ReplyId, Gathered> = BTreeMap::new();
        for raw in messages {
            let msg = match verify::open(raw, &RecipientKeys(&view), &policy, now)? {
                Ok(verify::Opened::Verified(m)) => *m,
                Ok(verify::Opened::NotForThisNode { .. }) => continue,
                Err(r) => {
                    out.push(refused(r));
                    continue;
                }
            };
            let Control::Reply(reply) = msg.control else { continue };
            match engine::recipient::on_part(&view, &reply, msg.key_role)? {
                PartStep::Refused { refusal, .. } => out.push(refused(refusal)),
                PartStep::Held { generation, .. } => out.push(Preview::Held { generation }),
                PartStep::Keep { .. } => match protocol::check_payloads(&reply, &msg.attachments) {
                    Err(r) => out.push(refused(r)),
                    Ok(()) => {
                        let own = reply.own_payload().expect("check_payloads found this part's chunk");
                        let chunk = msg.attachments[&own.id].clone();
                        let entry = replies
                            .entry(reply.reply_id.clone())
                            .or_insert_with(|| ((*reply).clone(), msg.key, BTreeMap::new()));
                        entry.2.insert(reply.part, chunk);
                    }
                },
            }
        }
        for (reply_id, (reply, key, mut chunks)) in replies {
            // Parts kept from earlier runs complete it.
            for (k, p) in (1..).zip(&reply.payloads) {
                if chunks.contains_key(&k) {
                    continue;
                }
                if let Ok(bytes) = std::fs::read(self.parts_dir(&reply_id).join(format!("{k}.chunk")))
                    && bytes.len() as u64 == p.size
                    && Digest::of(&bytes) == p.blake3
                {
                    chunks.insert(k, bytes);
                }
            }
            if chunks.len() < reply.parts as usize {
                out.push(Preview::Incomplete { reply_id, have: chunks.len() as u32, of: reply.parts });
                continue;
            }
            let pack: Vec<u8> = chunks.into_values().flatten().collect();
            let (at, len) = (reply.body.offset as usize, reply.body.length as usize);
            let Some(frame) = pack.get(at..at.saturating_add(len)) else {
                out.push(refused(Refusal::new(Reason::BadPayload, "the body frame lies outside the pack")));
                continue;
            };
            let body = match protocol::open_body(&reply, frame, &self.cfg.limits) {
                Ok(b) => b,
                Err(r) => {
                    out.push(refused(r));
                    continue;
                }
            };
            let update = Update { head: reply.clone(), body };
            let (_, _, previous) = self.state.db.applied()?;
            let mut scan = || self.scan_tree_saving(false);
            let step = engine::recipient::on_whole(
                &view,
                &update,
                &key,
                &mut scan,
                &previous,
                self.cfg.recipient.on_extra,
                now,
            )?;
            out.push(match step {
                WholeStep::Refused(r) => refused(r),
                WholeStep::Current { generation, .. } => Preview::Current { generation },
                WholeStep::Referred { same, .. } => Preview::Referred { reply_id: same.reply_id },
                WholeStep::Apply { plan, scan, .. } => Preview::Apply {
                    generation: reply.generation,
                    reply_id,
                    changes: itemize(&scan.manifest, &plan.target, &plan.kept),
                },
            });
        }
        Ok(out)
    }
}

/// Reads the body frame of a whole reply from its pack and decodes it.
fn read_body(pack: &Path, reply: &Reply, limits: &crate::limits::Limits) -> Result<Result<protocol::Body, Refusal>> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(pack).with_context(|| format!("failed to open `{}`", pack.display()))?;
    f.seek(SeekFrom::Start(reply.body.offset))?;
    let mut frame = Vec::new();
    f.take(reply.body.length).read_to_end(&mut frame)?;
    Ok(protocol::open_body(reply, &frame, limits))
}

/// Writes `bytes` to `path` through a temporary file, fsynced, so `path` is whole or absent.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("no parent directory")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error).with_context(|| format!("failed to write `{}`", path.display()))?;
    Ok(())
}

/// The recipient's status, read without taking the state lock and without finishing an interrupted apply.
///
/// # Errors
/// State failures.
pub fn status(cfg: &RecipientConfig) -> Result<RecipientStatus> {
    let db = Db::open(&cfg.state_dir.join("state.db"))?;
    let (generation, root) = db.applied_root()?;
    let sub = db.subscription()?;
    Ok(RecipientStatus {
        role: "recipient",
        name: cfg.recipient.name.clone(),
        data: cfg.recipient.data.clone(),
        generation,
        root: root.map(|r| r.to_hex()),
        last_request_at: sub.last_request_at,
        last_reply_at: sub.last_reply_at,
        outstanding: db.outstanding_count()?,
        rejected: db.rejection_count()?,
        interrupted_apply: Journal::path(&cfg.state_dir).exists(),
        outbox: Outbox::status(&db)?,
        previous_generation: db.previous()?.map(|p| p.generation),
        rollback_held: db.rollback_hold()?,
        stale: stale_since(&db, cfg)?.is_some(),
        stale_after: cfg.recipient.stale_after().as_secs(),
        transport: super::TransportStatus::read(&db)?,
        key_id: read_key_file(&cfg.recipient.key_file).ok().map(|k| k.id()),
        owner_public_key: cfg.recipient.owner_public_key.clone(),
    })
}

/// How long the recipient has gone without a fresh, authenticated reply, if that is longer than its
/// `stale-after`. The clock starts at the last accepted reply, or when the recipient was set up.
///
/// # Errors
/// State failures.
pub fn stale_since(db: &Db, cfg: &RecipientConfig) -> Result<Option<std::time::Duration>> {
    let since = db.subscription()?.last_reply_at.or(db.created_at()?);
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
    if db.subscription()?.stale_notified_at.is_some() {
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
        db.set_stale_notified(Some(now()))
    })?;
    Ok(true)
}

impl Role for Recipient {
    fn db(&self) -> &Db {
        &self.state.db
    }

    fn max_message_bytes(&self) -> u64 {
        self.cfg.limits.max_message_bytes
    }

    fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }

    fn act(&mut self, raw: &[u8], digest: &Digest) -> Result<Result<Handled, Refusal>> {
        // A delivery report about a request or receipt: nothing to do but say so (a lost request is asked
        // again after `reply-timeout`). Not authenticated, so it changes nothing.
        if raw.len() as u64 <= self.cfg.limits.max_message_bytes
            && let Some(report) = envelope::bounce(raw)
        {
            let what = report.summary();
            if report.failed() {
                warn!(
                    message_id = report.message_id.as_deref().unwrap_or("-"),
                    "a message to the owner could not be delivered: {what}"
                );
            } else {
                info!(message_id = report.message_id.as_deref().unwrap_or("-"), "delivery report: {what}");
            }
            self.state.db.mark_seen(digest, "processed")?;
            return Ok(Ok(Handled::Bounced { status: what }));
        }
        self.evaluate(raw, digest)
    }
}

impl Recipient {
    fn view(&self) -> View<'_> {
        View { db: &self.state.db, name: &self.cfg.recipient.name, key: &self.key }
    }

    /// What the recipient expects of a message: replies, under its pinned owner key if it has one; its
    /// own requests and receipts come back as "not for this node".
    fn policy(&self) -> verify::Policy<'_> {
        verify::Policy {
            accepts: &[Kind::Reply],
            sends: &[Kind::Request, Kind::Receipt],
            pinned_owner: self.owner_key.as_ref(),
            limits: &self.cfg.limits,
        }
    }
}

/// The recipient's state as the engine reads it.
struct View<'a> {
    db: &'a Db,
    name: &'a str,
    key: &'a Key,
}

impl RecipientView for View<'_> {
    fn name(&self) -> &str {
        self.name
    }

    fn key(&self) -> &Key {
        self.key
    }

    fn previous_key(&self, now: u64) -> Result<Option<Key>> {
        let sub = self.db.subscription()?;
        let (Some(hex), Some(until)) = (sub.previous_key, sub.previous_key_until) else { return Ok(None) };
        if now >= until {
            return Ok(None);
        }
        Ok(Some(Key::from_hex(&hex).context("the previous key in the state database is corrupt")?))
    }

    fn outstanding(&self, nonce: &Nonce) -> Result<Option<u64>> {
        self.db.outstanding(&nonce.to_hex())
    }

    fn reply_applied(&self, reply_id: &ReplyId) -> Result<bool> {
        self.db.reply_applied(reply_id)
    }

    fn applied(&self) -> Result<Applied> {
        let sub = self.db.subscription()?;
        let root = sub.applied_root.map(|r| Digest::from_hex(&r)).transpose().map_err(anyhow::Error::msg)?;
        Ok(Applied { generation: sub.applied_generation, root, key_id: sub.applied_key_id })
    }

    fn rollback_hold(&self) -> Result<Option<u64>> {
        self.db.rollback_hold()
    }

    fn last_seq(&self) -> Result<u64> {
        Ok(self.db.subscription()?.seq)
    }

    fn has_parts(&self, reply_id: &ReplyId) -> Result<bool> {
        Ok(!self.db.received_parts(reply_id)?.is_empty())
    }
}
