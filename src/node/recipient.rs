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

use super::install::{self, InstallMode, InstallPolicy, OnHookFailure};
use super::{Handled, Outbox, Role, RunReport, State, process_inbox};
use crate::apply::{self, Journal, JournalKind, OnExtra, StageError};
use crate::config::{
    Enrollment, RecipientConfig, RecipientSection, Subscription, TransportConfig, read_key_file, write_secret,
};
use crate::crypto::{Key, KeyId, Nonce, PublicKey};
use crate::db::{Db, now};
use crate::engine::recipient::{Applied, Effect as RecipientEffect, PartStep, RecipientKeys, RecipientView, WholeStep};
use crate::engine::{self, verify};
use crate::manifest::{Digest, Entry, Listed};
use crate::path::RelPath;
use crate::protocol::envelope::{self, Outgoing};
use crate::protocol::{
    self, Auth, Control, FailureReason, InventoryKind, Kind, Method, Reason, Receipt, ReceiptStatus, Refusal, Reply,
    ReplyId, Request, Resend, Update, VERSION, Want,
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

mod broadcast;

/// A recipient node with its state open.
#[derive(Debug)]
pub struct Recipient {
    cfg: RecipientConfig,
    state: Rc<State>,
    key: Key,
    /// The owner's pinned Ed25519 key: replies must be signed under it.
    owner_key: Option<PublicKey>,
    /// Hooks, manual installation, apply windows.
    /// How each tree's updates are installed, by channel.
    install: std::collections::BTreeMap<String, InstallPolicy>,
}

/// What installing a waiting update did.
#[derive(Debug, Clone, Serialize)]
pub struct Installed {
    /// The generation installed.
    pub generation: u64,
    /// Its operations.
    pub ops: usize,
    /// The generation the tree has now: `generation`, or the one before when a failed post-apply hook
    /// rolled it back.
    pub applied: u64,
    /// The post-apply hook that failed, if one did.
    pub hook_failure: Option<crate::db::HookFailureRow>,
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
    /// The channel of the main tree (`data`).
    pub channel: String,
    /// What the owner last said of the main tree's entitlement, when not plain service (`not-entitled`,
    /// `expired on DATE`, `suspended`, `pinned at N`).
    pub standing: Option<String>,
    /// Every tree this recipient keeps, the main one first.
    pub subscriptions: Vec<SubscriptionStatus>,
    /// A verified update kept ready to install (`install = "manual"`, or outside its apply window).
    pub waiting: Option<install::WaitingStatus>,
    /// The most recent failed install hook.
    pub last_hook_failure: Option<crate::db::HookFailureRow>,
}

/// One tree's part of the recipient's `status`.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionStatus {
    /// The channel.
    pub channel: String,
    /// The data tree.
    pub data: PathBuf,
    /// Generation applied, 0 for none.
    pub generation: u64,
    /// Root of the applied generation.
    pub root: Option<String>,
    /// When the last request for it was sent.
    pub last_request_at: Option<u64>,
    /// When the last authenticated reply for it was accepted.
    pub last_reply_at: Option<u64>,
    /// Requests for it awaiting replies.
    pub outstanding: u64,
    /// An interrupted apply waiting to be finished.
    pub interrupted_apply: bool,
    /// The generation kept for `recipient rollback --channel`, if any.
    pub previous_generation: Option<u64>,
    /// After a rollback: replies bringing this generation or an older one are not applied.
    pub rollback_held: Option<u64>,
    /// No fresh, authenticated reply for it for longer than `stale-after`.
    pub stale: bool,
    /// What the owner last said of its entitlement, when not plain service.
    pub standing: Option<String>,
    /// The generation the owner pins it at, if it said so.
    pub pinned: Option<u64>,
    /// A verified update kept ready to install for this tree (`install = "manual"`, or outside its apply
    /// window).
    pub waiting: Option<install::WaitingStatus>,
    /// The most recent failed install hook of this tree.
    pub last_hook_failure: Option<crate::db::HookFailureRow>,
}

impl SubscriptionStatus {
    /// Whether the owner refuses this tree (not entitled, expired, suspended): nothing reaches it.
    pub fn refused(&self) -> bool {
        self.standing.as_deref().is_some_and(|s| !s.starts_with("pinned"))
    }
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
        channel: protocol::DEFAULT_CHANNEL.to_owned(),
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
        install: crate::config::InstallMode::Auto,
        contact: None,
        update_timing: None,
        pre_apply: None,
        post_apply: None,
        hook_timeout: None,
        shipped_hooks: false,
        on_hook_failure: Default::default(),
        apply_window: Vec::new(),
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

/// What `recipient subscribe` did.
#[derive(Debug, Clone, Serialize)]
pub struct Subscribed {
    /// The channel.
    pub channel: String,
    /// Its data tree.
    pub data: PathBuf,
}

/// Adds a `[[subscription]]` to the recipient's config (`mailferry recipient subscribe`): the next run
/// requests `channel` for the tree `data`. The config is rewritten whole (a temporary file, then a rename)
/// and checked as it will be loaded before it replaces the old one; its comments and other tables stay.
///
/// # Errors
/// A bad channel name, a channel subscribed already, a tree overlapping another or the state directory, or
/// I/O failures; the config is unchanged then.
pub fn subscribe(cfg: &RecipientConfig, channel: &str, data: &Path) -> Result<Subscribed> {
    if cfg.subscription(channel).is_some() {
        bail!("this recipient subscribes to channel {channel:?} already");
    }
    std::fs::create_dir_all(data).with_context(|| format!("failed to create data tree `{}`", data.display()))?;
    let data = std::path::absolute(data)?;
    let text =
        std::fs::read_to_string(&cfg.path).with_context(|| format!("failed to read `{}`", cfg.path.display()))?;
    #[derive(Serialize)]
    struct Table<'a> {
        subscription: [&'a crate::config::SubscriptionSection; 1],
    }
    let section = crate::config::SubscriptionSection {
        channel: channel.to_owned(),
        data: data.clone(),
        staging_dir: None,
        on_extra: None,
        pre_apply: None,
        post_apply: None,
        hook_timeout: None,
        shipped_hooks: None,
        on_hook_failure: None,
        install: None,
        apply_window: None,
    };
    let added = toml::to_string(&Table { subscription: [&section] })?;
    let text = format!(
        "{}

{added}",
        text.trim_end()
    );
    let dir = cfg.path.parent().context("the config file has no directory")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    // Checked as the next start will load it, before it replaces the config.
    let checked = crate::config::NodeConfig::load(tmp.path()).and_then(|c| match c {
        crate::config::NodeConfig::Recipient(r) => Ok(r),
        crate::config::NodeConfig::Owner(_) => bail!("not a recipient config"),
    });
    let checked = checked.map_err(|e| e.context(format!("cannot subscribe to {channel:?}")))?;
    let tree = checked.subscription(channel).context("the subscription did not load")?;
    std::fs::create_dir_all(&tree.dir).with_context(|| format!("failed to create `{}`", tree.dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&cfg.path)?.permissions().mode();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(mode & 0o7777))?;
    }
    tmp.persist(&cfg.path).map_err(|e| e.error)?;
    info!(channel, data = %data.display(), "subscribed");
    Ok(Subscribed { channel: channel.to_owned(), data })
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
        let install = cfg
            .subscriptions
            .iter()
            .map(|t| Ok((t.channel.clone(), InstallPolicy::for_tree(&cfg.recipient, &t.install)?)))
            .collect::<Result<_>>()?;
        state.db.add_subscriptions(cfg.subscriptions.iter().map(|t| t.channel.as_str()))?;
        let mut r = Recipient { cfg, state, key, owner_key, install };
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
        let channel = self.cfg.main().channel.clone();
        self.rollback_channel(&channel)
    }

    /// [`Recipient::rollback`] for the tree of `channel`.
    ///
    /// # Errors
    /// A channel this recipient does not keep, or what [`Recipient::rollback`] reports.
    pub fn rollback_channel(&mut self, channel: &str) -> Result<super::rollback::RolledBack> {
        let sub = self.sub(channel)?;
        if let Some(journal) = Journal::load(&sub.dir)? {
            let JournalKind::Rollback { from } = journal.kind else {
                bail!(
                    "the apply of generation {} was interrupted; finish it first (`mailferry recipient run --once \
                     --no-request`), then roll back",
                    journal.generation
                );
            };
            warn!(from, to = journal.generation, "finishing a rollback that was interrupted");
            self.finish(&sub, &journal).context("failed to finish the interrupted rollback")?;
            return Ok(super::rollback::RolledBack { from, to: journal.generation, ops: journal.ops, resumed: true });
        }
        let db = self.state.db.sub(&sub.channel)?;
        let (applied, _, current) = db.applied()?;
        let Some(previous) = db.previous()? else {
            bail!(
                "nothing to roll back to: no generation before {applied} is kept (one is kept after an update to a \
                 newer generation, and only one level: a rollback uses it up)"
            );
        };
        let scan = self.scan_tree(&sub)?;
        let to = previous.generation;
        let plan = super::rollback::plan(&scan, &current, &previous.manifest, sub.on_extra).map_err(|e| {
            anyhow::format_err!(
                "cannot roll back generation {applied} to {to}: {e}; let the next sync repair the tree (`mailferry \
                 recipient run --once`), or undo the change, then roll back"
            )
        })?;
        let id = Nonce::generate().to_hex();
        let stage_dir = self.staging_root(&sub)?.join(&id);
        let data = &sub.data;
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
            phase: apply::Phase::Swap,
            signed: false,
        };
        journal.commit(&sub.dir)?;
        crate::failpoint::hit("apply-committed");
        self.finish(&sub, &journal).context("rollback interrupted; the next run finishes it")?;
        Ok(super::rollback::RolledBack { from: applied, to, ops: journal.ops, resumed: false })
    }

    /// The configuration.
    pub fn config(&self) -> &RecipientConfig {
        &self.cfg
    }

    /// Finishes an apply that a crash interrupted after its journal was committed.
    pub(crate) fn recover(&mut self) -> Result<()> {
        for sub in self.cfg.subscriptions.clone() {
            let Some(journal) = Journal::load(&sub.dir)? else { continue };
            warn!(channel = %sub.channel, generation = journal.generation, "finishing an apply that was interrupted");
            self.finish(&sub, &journal).context("failed to finish the interrupted apply")?;
        }
        Ok(())
    }

    /// The subscription of `channel`.
    ///
    /// # Errors
    /// A channel this recipient does not keep.
    pub fn sub(&self, channel: &str) -> Result<Subscription> {
        self.cfg.subscription(channel).cloned().with_context(|| {
            format!("this recipient does not subscribe to channel {channel:?} (`mailferry recipient subscribe`)")
        })
    }

    /// The one place a committed journal is finished, whether it is an apply just committed, a rollback,
    /// or either found after a crash: its steps are performed (they may be repeated safely), then the
    /// outcome is recorded: for an apply the applied generation and its receipt, for a rollback the
    /// generation before and the hold. Whatever must follow every change of the tree goes here.
    ///
    /// # Errors
    /// I/O or state failures; the journal then stays and the next run finishes it.
    pub(crate) fn finish(&mut self, sub: &Subscription, journal: &Journal) -> Result<()> {
        // Hooks pending: the steps are done; the post-apply hooks run again (node::install).
        let rerun = journal.phase == apply::Phase::HooksPending;
        if !rerun {
            journal.execute()?;
            crate::failpoint::hit("apply-done");
        }
        match journal.kind {
            JournalKind::Apply => match self.hooks(sub).post_apply(journal, rerun)? {
                None => self.complete(sub, journal),
                Some(failure) => self.hook_failed(sub, journal, &failure),
            },
            JournalKind::Rollback { from } => {
                // The owner hears of it, through the reply that brought the generation undone (if one did).
                let receipt = match self.state.db.sub(&sub.channel)?.applied_reply(from)? {
                    Some((reply_id, nonce)) => {
                        let nonce = Nonce::from_hex(&nonce).map_err(anyhow::Error::msg)?;
                        let state = (journal.generation, journal.target()?.root());
                        let raw = self.receipt(
                            &self.key,
                            &sub.channel,
                            nonce,
                            &reply_id,
                            state,
                            ReceiptStatus::RolledBack,
                            None,
                        )?;
                        Some((format!("receipt-rolled-back-{}", journal.reply_id), raw))
                    }
                    None => None,
                };
                let (sender, owner) = (&self.cfg.recipient.address, &self.cfg.recipient.owner_address);
                super::rollback::complete(&self.state.db, sub, journal, |db| match &receipt {
                    Some((name, raw)) => db.outbox_put(name, sender, owner, raw),
                    None => Ok(()),
                })
            }
        }
    }

    /// The hooks of one tree: `[recipient]`'s install keys, for the tree's channel and state.
    fn hooks<'a>(&'a self, tree: &'a Subscription) -> install::Hooks<'a> {
        install::Hooks { policy: self.install_policy(tree), channel: &tree.channel, state_dir: &tree.dir }
    }

    /// How `tree`'s updates are installed.
    fn install_policy(&self, tree: &Subscription) -> &InstallPolicy {
        &self.install[&tree.channel]
    }

    /// A post-apply hook of `journal` failed after the swap. The failure is recorded; then with
    /// `on-hook-failure = "rollback"` the tree returns to the generation before (which also holds the
    /// failed one back), else (or when there is no way back) the apply is recorded as usual.
    fn hook_failed(&mut self, tree: &Subscription, journal: &Journal, failure: &install::HookFailure) -> Result<()> {
        let back = match self.install_policy(tree).on_hook_failure {
            OnHookFailure::Keep => Err(String::new()),
            OnHookFailure::Rollback => {
                let (before, _, manifest) = self.state.db.sub(&tree.channel)?.applied()?;
                let scan = self.scan_tree(tree)?;
                let stage_dir = self.staging_root(tree)?.join(Nonce::generate().to_hex());
                let on_extra = tree.on_extra;
                install::rollback_journal(journal, (before, &manifest), &scan, on_extra, stage_dir)?
            }
        };
        let action = match &back {
            Ok(_) => "rolled-back".to_owned(),
            Err(why) if why.is_empty() => "kept".to_owned(),
            Err(why) => format!("kept: {why}"),
        };
        // The fleet's failure receipt (`install::HookFailure`) is queued here, in this transaction.
        self.state.db.transaction(|db| {
            install::record_failure(db, &tree.channel, journal, failure, &action)?;
            if back.is_ok() {
                // The apply is never recorded: its reply is answered here.
                let sdb = db.sub(&tree.channel)?;
                sdb.close_outstanding(&journal.nonce)?;
                sdb.mark_fresh_reply()?;
                db.mark_seen(&journal.message, "processed")?;
            }
            Ok(())
        })?;
        // The owner hears of it in a failure receipt with the hook's exit status and the tail of its output,
        // sent after the outcome is recorded, so that it is the newest thing the owner hears of the reply.
        // The receipt's detail is bounded: the head says what happened, the rest is the output's end.
        let head = format!("{} {} ({action}); output: ", failure.hook, failure.ended);
        let out = failure.output_tail.trim_end();
        let room = protocol::MAX_RECEIPT_DETAIL.saturating_sub(head.len());
        let mut from = out.len().saturating_sub(room);
        while !out.is_char_boundary(from) {
            from += 1;
        }
        let detail = format!("{head}{}", &out[from..]);
        let base = journal.target()?.root();
        let tell =
            |r: &Recipient| r.fail(tree, &journal.nonce, &journal.reply_id, base, FailureReason::HookFailed, &detail);
        match back {
            Ok(rollback) => {
                warn!(
                    generation = journal.generation,
                    to = rollback.generation,
                    "returning to generation {}",
                    rollback.generation
                );
                rollback.commit(&tree.dir)?;
                crate::failpoint::hit("apply-committed");
                self.finish(tree, &rollback)?;
                tell(self)?;
                self.finish_key()
            }
            Err(_) => {
                warn!(
                    generation = journal.generation,
                    "keeping generation {} although its hook failed ({action})", journal.generation
                );
                self.complete(tree, journal)?;
                tell(self).map(|_| ())
            }
        }
    }

    /// Records a finished apply and queues its receipt in one transaction; then removes the journal.
    fn complete(&mut self, sub: &Subscription, journal: &Journal) -> Result<()> {
        let target = journal.target()?;
        let nonce = Nonce::from_hex(&journal.nonce).map_err(anyhow::Error::msg)?;
        // A key this reply brought is the key from now on: the receipt is made under it, which tells the
        // owner the rotation arrived.
        let key = match self.state.db.keys()?.pending_key {
            Some(hex) => Key::from_hex(&hex).context("the pending key in the state database is corrupt")?,
            None => self.key.clone(),
        };
        let receipt = self.receipt(
            &key,
            &sub.channel,
            nonce,
            &journal.reply_id,
            (journal.generation, target.root()),
            ReceiptStatus::Applied,
            None,
        )?;
        let (from, to) = (&self.cfg.recipient.address, &self.cfg.recipient.owner_address);
        self.state.db.transaction(|db| {
            let sdb = db.sub(&sub.channel)?;
            if !sdb.reply_applied(&journal.reply_id)? {
                super::rollback::keep_previous(sdb, journal)?;
                let key_id = journal.key_id.as_ref();
                sdb.record_applied(
                    journal.generation,
                    &target,
                    &journal.reply_id,
                    &journal.nonce,
                    journal.ops,
                    key_id,
                )?;
            }
            // Any other request described the tree as it was before: none of them is answerable now.
            sdb.close_all_outstanding()?;
            sdb.mark_fresh_reply()?;
            db.mark_seen(&journal.message, "processed")?;
            db.outbox_put(&format!("receipt-{}", journal.reply_id), from, to, &receipt)
        })?;
        journal.finish(&sub.dir)?;
        if let Some(root) = journal.stage_dir.parent()
            && let Ok(sdb) = self.state.db.sub(&sub.channel)
        {
            super::rollback::tidy_staging(sdb, root);
        }
        self.finish_key()
    }

    /// A receipt for reply `reply_id` (answering `nonce`) saying the tree now is `(generation, root)`;
    /// a negative one (`failed`) carries its reason and detail.
    #[allow(clippy::too_many_arguments)]
    fn receipt(
        &self,
        key: &Key,
        channel: &str,
        nonce: Nonce,
        reply_id: &ReplyId,
        (generation, root): (u64, Digest),
        status: ReceiptStatus,
        failure: Option<(FailureReason, &str)>,
    ) -> Result<Vec<u8>> {
        let receipt = Receipt {
            mailferry: VERSION,
            kind: Kind::Receipt,
            recipient: self.cfg.recipient.name.clone(),
            channel: channel.to_owned(),
            nonce,
            reply_id: reply_id.clone(),
            created: now(),
            generation,
            root,
            status,
            reason: failure.map(|(r, _)| r),
            detail: failure.map(|(_, d)| protocol::bounded_detail(d)),
        };
        let control = protocol::encode(&receipt);
        let auth = protocol::encode(&Auth::sign(&self.cfg.recipient.name, key, &control));
        let name = &self.cfg.recipient.name;
        let (subject, text) = match (status, failure) {
            (_, Some((reason, detail))) => (
                format!("mailferry: {name} could not apply generation update ({})", reason.code()),
                format!(
                    "This is an automatic receipt from mailferry: recipient {name:?} could not apply reply {reply_id} \
                     ({}: {detail}); it has generation {generation}.\n",
                    reason.code()
                ),
            ),
            (ReceiptStatus::RolledBack, None) => (
                format!("mailferry: {name} rolled back to generation {generation}"),
                format!(
                    "This is an automatic receipt from mailferry: recipient {name:?} rolled back to generation {generation}.\n"
                ),
            ),
            _ => (
                format!("mailferry: {name} has generation {generation}"),
                format!(
                    "This is an automatic receipt from mailferry: recipient {name:?} now has generation {generation}.\n"
                ),
            ),
        };
        Ok(envelope::build(&Outgoing {
            from: &self.cfg.recipient.address,
            to: &self.cfg.recipient.owner_address,
            subject,
            text,
            kind: Kind::Receipt,
            control: &control,
            auth: &auth,
            payloads: vec![],
        })?)
    }

    /// Sends the owner a negative receipt for reply `reply_id`, which answered request `nonce` (hex): the
    /// recipient refused it or could not apply it, for `reason` (`detail` is cut to
    /// [`protocol::MAX_RECEIPT_DETAIL`] bytes). At most one per request: that one was sent is recorded in
    /// the transaction that queues it, and a second call does nothing. The receipt states the generation
    /// applied and its root (`base` when nothing is applied yet: the tree the request described). Returns
    /// whether one was queued; the run's next outbox flush sends it. For an install hook that failed, too.
    ///
    /// # Errors
    /// State failures, or a `nonce` that is not hex.
    pub fn fail(
        &self,
        tree: &Subscription,
        nonce: &str,
        reply_id: &ReplyId,
        base: Digest,
        reason: FailureReason,
        detail: &str,
    ) -> Result<bool> {
        let sdb = self.state.db.sub(&tree.channel)?;
        if sdb.failure_receipt_sent(nonce)? {
            return Ok(false);
        }
        let (generation, root) = sdb.applied_root()?;
        let parsed = Nonce::from_hex(nonce).map_err(anyhow::Error::msg)?;
        let receipt = self.receipt(
            &self.key,
            &tree.channel,
            parsed,
            reply_id,
            (generation, root.unwrap_or(base)),
            ReceiptStatus::Failed,
            Some((reason, detail)),
        )?;
        let (from, to) = (&self.cfg.recipient.address, &self.cfg.recipient.owner_address);
        let queued = self.state.db.transaction(|db| {
            let sdb = db.sub(&tree.channel)?;
            if sdb.failure_receipt_sent(nonce)? {
                return Ok(false);
            }
            sdb.record_failure_receipt(nonce, reply_id, reason.code())?;
            db.outbox_put(&format!("receipt-failed-{nonce}"), from, to, &receipt)?;
            Ok(true)
        })?;
        if queued {
            info!(reply = %reply_id, reason = reason.code(), "queued a negative receipt for the owner");
        }
        Ok(queued)
    }

    /// Applies every verified reply waiting, then, if `request` and no request is still awaiting its reply,
    /// sends a fresh one.
    ///
    /// # Errors
    /// Transport or local failures (a full disk while staging, an unreadable data tree).
    pub async fn run_once<T: Transport>(&mut self, transport: &mut T, request: bool) -> Result<RunReport> {
        let mut report = RunReport::default();
        report.sent += Outbox::flush(&self.state.db, transport).await?.sent;
        self.expire_held_broadcasts()?;
        if let Some(done) = self.install_due(install::local_now())? {
            report.outcomes.push(Handled::Applied { generation: done.generation, ops: done.ops });
        }
        if let Err(e) = process_inbox(self, transport, &mut report).await {
            // A local failure (a full disk) may have queued a negative receipt: the owner hears of it now.
            if let Err(flush) = Outbox::flush(&self.state.db, transport).await {
                warn!(error = %format!("{flush:#}"), "could not send the outbox after a failed run");
            }
            return Err(e);
        }
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
        let mut earliest: Option<u64> = None;
        for sub in &self.cfg.subscriptions {
            let blocked = self.state.db.sub(&sub.channel)?.newest_outstanding()?.map(|sent| sent + timeout);
            match blocked.filter(|at| *at > now()) {
                // One tree may ask now: nothing holds the recipient back.
                None => return Ok(None),
                Some(at) => earliest = Some(earliest.map_or(at, |e| e.min(at))),
            }
        }
        Ok(earliest)
    }

    /// Sends a request for each tree unless one sent for it less than `reply-timeout` ago is still
    /// unanswered. Returns whether one was queued.
    ///
    /// # Errors
    /// An unreadable data tree or state failures.
    pub fn maybe_request(&mut self) -> Result<bool> {
        let mut any = false;
        for sub in self.cfg.subscriptions.clone() {
            any |= self.maybe_request_for(&sub)?;
        }
        Ok(any)
    }

    /// [`Recipient::maybe_request`] for one tree.
    fn maybe_request_for(&mut self, tree: &Subscription) -> Result<bool> {
        let timeout = self.cfg.recipient.reply_timeout.as_secs();
        let db = self.state.db.sub(&tree.channel)?;
        db.expire_outstanding(timeout.max(7 * 24 * 3600))?;
        let resend = self.missing_parts(tree)?;
        let last_part = resend.as_ref().map_or(0, |(_, at)| *at);
        if let Some(sent) = db.newest_outstanding()?
            && now().saturating_sub(sent.max(last_part)) < timeout
        {
            info!(
                channel = %tree.channel,
                "a request sent {}s ago is still awaiting its reply; not sending another",
                now().saturating_sub(sent)
            );
            return Ok(false);
        }
        let resend = resend.map(|(r, _)| r);
        let sub = db.subscription()?;
        let full_content = sub.full_content;
        let scan = self.scan_tree(tree)?;
        let root = scan.manifest.root();
        let (generation, applied_root) = db.applied_root()?;
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
            let (_, _, applied) = db.applied()?;
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
        // The facts travel with the first request after they change, until a request carrying them is
        // answered (`docs/protocol.md` §7.8).
        let facts =
            super::registration::local_facts(&self.cfg, super::registration::installed(&self.state.db, &self.cfg)?);
        let digest = hex::encode(facts.digest());
        let registration = (self.state.db.registered()?.0.as_deref() != Some(digest.as_str())).then(|| Box::new(facts));
        let req = Request {
            mailferry: VERSION,
            kind: Kind::Request,
            recipient: self.cfg.recipient.name.clone(),
            channel: tree.channel.clone(),
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
            registration,
            // Broadcast tickets need a pinned owner key: without it a broadcast part could not be verified.
            accepts: if self.owner_key.is_some() {
                vec![protocol::broadcast::Capability::Broadcast]
            } else {
                Vec::new()
            },
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
        // The default channel's outbox names are as they always were.
        let outbox_name = if tree.channel == protocol::DEFAULT_CHANNEL {
            format!("request-{seq:010}")
        } else {
            format!("request-{}-{seq:010}", tree.channel)
        };
        self.state.db.transaction(|all| {
            let db = all.sub(&tree.channel)?;
            anyhow::ensure!(db.next_seq()? == seq, "another process sent a request meanwhile");
            db.add_outstanding(&nonce.to_hex(), seq)?;
            if sub.fresh_next {
                db.set_fresh_next(false)?;
            }
            if full {
                db.set_need_full_inventory(false)?;
            }
            if req.registration.is_some() {
                all.set_registration_pending(&digest, &nonce.to_hex())?;
            }
            all.outbox_put(&outbox_name, from, to, &raw)
        })?;
        match &req.resend {
            Some(r) => {
                info!(channel = %tree.channel, seq, reply = %r.reply_id, parts = ?r.parts, bytes = raw.len(), "request queued, asking for lost parts again")
            }
            None => {
                info!(channel = %tree.channel, seq, generation, entries = req.inventory.len(), bytes = raw.len(), "request queued")
            }
        }
        Ok(true)
    }

    /// The newest incomplete reply whose request is still outstanding, with the parts it lacks and when
    /// its last part arrived. Incomplete replies whose request was given up are dropped.
    fn missing_parts(&self, tree: &Subscription) -> Result<Option<(Resend, u64)>> {
        let mut found = None;
        let db = self.state.db.sub(&tree.channel)?;
        for (reply_id, nonce, at) in db.partial_replies()? {
            let kept = db.received_parts(&reply_id)?;
            let parts = kept.first().and_then(|(_, c)| serde_json::from_slice::<Reply>(c).ok()).map_or(0, |r| r.parts);
            if db.outstanding(&nonce)?.is_none() {
                info!(reply = %reply_id, "dropping the kept parts of a reply whose request was given up");
                self.forget_parts(tree, &reply_id)?;
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
        for (reply_id, nonce, parts) in db.wanted_replies()? {
            if db.outstanding(&nonce)?.is_none() {
                db.forget_parts(&reply_id)?;
                continue;
            }
            if found.is_none() && db.received_parts(&reply_id)?.is_empty() {
                found = Some((Resend { reply_id, parts: (1..=parts).collect() }, 0));
            }
        }
        Ok(found)
    }

    fn evaluate(&mut self, raw: &[u8], digest: &Digest) -> Result<Result<Handled, Refusal>> {
        let now = now();
        // A broadcast part is signed by the owner, not MACed for anyone: its own path (§7.11).
        if let Some(done) = self.broadcast_part(raw, digest)? {
            return Ok(done);
        }
        let main = self.cfg.main().clone();
        let view = self.view(&main);
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
        // The channel is authenticated now: the reply goes to that tree, and only that tree's requests,
        // parts and generation count for it.
        let Some(tree) = self.cfg.subscription(&reply.channel).cloned() else {
            return Ok(Err(Refusal::new(
                Reason::Unexpected,
                format!("reply is for channel {:?}, which this recipient does not subscribe to", reply.channel),
            )));
        };
        let view = self.view(&tree);
        let nonce = reply.nonce.to_hex();
        // An authentic answer to a request that carried facts: the owner has them.
        self.state.db.registration_answered(&nonce)?;
        match engine::recipient::on_part(&view, &reply, msg.key_role)? {
            PartStep::Refused { refusal, give_up } => {
                if give_up {
                    self.give_up(&tree, &nonce, &reply.reply_id)?;
                    let reason = FailureReason::of_refusal(refusal.reason);
                    self.fail(&tree, &nonce, &reply.reply_id, reply.base, reason, &refusal.to_string())?;
                }
                return Ok(Err(refusal));
            }
            PartStep::Held { generation, held } => {
                // A local rollback holds back the generation it undid (node::rollback).
                let db = self.state.db.sub(&tree.channel)?;
                if let Some(handled) = super::rollback::hold(&self.state.db, db, generation, &nonce, digest)? {
                    self.forget_parts(&tree, &reply.reply_id)?;
                    db.set_fresh_next(true)?;
                    let detail = format!(
                        "a local rollback holds generation {held} and older back; generation {generation} is not \
                         applied until a newer one arrives or `mailferry recipient rollback --release`"
                    );
                    self.fail(&tree, &nonce, &reply.reply_id, reply.base, FailureReason::Held, &detail)?;
                    return Ok(Ok(handled));
                }
            }
            PartStep::Standing(standing) => return self.standing(&tree, &nonce, digest, &reply, standing),
            PartStep::Keep { .. } => {}
        }
        if reply.broadcast.is_some() {
            return self.accept_ticket(&tree, &reply, &msg.attachments, &msg.key, digest);
        }
        // A part that does not carry its chunk intact is refused alone: the others stay, and the missing
        // one is asked for again after `reply-timeout`.
        refuse!(protocol::check_payloads(&reply, &msg.attachments));
        let Some(update) = refuse!(self.keep_part(&tree, &reply, &msg.attachments, &nonce, &msg.key)?) else {
            let have = self.state.db.sub(&tree.channel)?.received_parts(&reply.reply_id)?.len() as u32;
            self.state.db.mark_seen(digest, "processed")?;
            info!(reply = %reply.reply_id, part = reply.part, have, of = reply.parts, "kept a part of a reply");
            return Ok(Ok(Handled::PartKept { reply_id: reply.reply_id.clone(), have, of: reply.parts }));
        };
        // From here on the reply is authentic, whole, and answers a request of ours: whatever happens,
        // that request is answered, so the next run asks again at once instead of waiting for
        // `reply-timeout`.
        let res = self.answer_reply(&tree, &update, &msg.key, digest, &nonce, now);
        match &res {
            Ok(Err(r)) => {
                self.give_up(&tree, &nonce, &update.head.reply_id)?;
                let reason = FailureReason::of_refusal(r.reason);
                self.fail(&tree, &nonce, &update.head.reply_id, update.head.base, reason, &r.to_string())?;
            }
            Ok(Ok(_)) => self.forget_parts(&tree, &update.head.reply_id)?,
            // A local failure (a full disk): keep the parts, the next run tries again.
            Err(_) => {}
        }
        res
    }

    /// Applies the effects the engine accepted a reply with, in the caller's transaction. A new key goes
    /// into the state database first (the current key kept as the previous one for the grace period, the
    /// new one pending); [`Recipient::finish_key`] then writes the key file.
    fn apply_effects(db: &Db, channel: &str, current: &Key, effects: &[RecipientEffect]) -> Result<()> {
        for e in effects {
            match e {
                RecipientEffect::TakeKey { new, previous_until } => {
                    db.take_key(&current.to_hex(), &current.id(), *previous_until, &new.to_hex(), &new.id())?;
                }
                RecipientEffect::NeedFullInventory => db.sub(channel)?.set_need_full_inventory(true)?,
            }
        }
        Ok(())
    }

    /// Records an answer without an update (not entitled, expired, suspended, pinned): the request is
    /// answered, the tree is unchanged, and `status` shows what the owner said.
    fn standing(
        &mut self,
        tree: &Subscription,
        nonce: &str,
        digest: &Digest,
        reply: &Reply,
        standing: protocol::Standing,
    ) -> Result<Result<Handled, Refusal>> {
        let text = standing.to_string();
        self.state.db.transaction(|db| {
            let sdb = db.sub(&tree.channel)?;
            sdb.set_standing(Some(&text), reply.pinned)?;
            sdb.close_outstanding(nonce)?;
            sdb.mark_fresh_reply()?;
            db.mark_seen(digest, "processed")
        })?;
        warn!(channel = %tree.channel, "the owner answers: {text}; the tree is unchanged");
        Ok(Ok(Handled::Standing { channel: tree.channel.clone(), standing }))
    }

    /// Writes a key taken up but not yet in the key file (after a crash, on the next start), then forgets
    /// it was pending. The key file is replaced whole (temporary file, fsync, rename, directory fsync).
    fn finish_key(&mut self) -> Result<()> {
        let Some(hex) = self.state.db.keys()?.pending_key else { return Ok(()) };
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
    fn give_up(&self, tree: &Subscription, nonce: &str, reply_id: &ReplyId) -> Result<()> {
        let db = self.state.db.sub(&tree.channel)?;
        db.close_outstanding(nonce)?;
        db.set_fresh_next(true)?;
        self.forget_parts(tree, reply_id)
    }

    fn forget_parts(&self, tree: &Subscription, reply_id: &ReplyId) -> Result<()> {
        self.state.db.sub(&tree.channel)?.forget_parts(reply_id)?;
        self.state.db.sub(&tree.channel)?.forget_ticket(reply_id)?;
        let dir = self.parts_dir(tree, reply_id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                warn!(error = %e, "could not remove `{}`", dir.display());
            }
            _ => {}
        }
        Ok(())
    }

    fn parts_dir(&self, tree: &Subscription, reply_id: &ReplyId) -> PathBuf {
        // Reply ids are 32 hex digits (checked when the control part was decoded): a plain file name.
        tree.dir.join("parts").join(reply_id.as_str())
    }

    /// Keeps a verified part on disk. When every part is here, assembles the pack, checks it, decrypts it
    /// when it is encrypted (its channel key sealed under `under`, the key the part verified under), and
    /// returns the whole reply with its body decoded.
    fn keep_part(
        &mut self,
        tree: &Subscription,
        reply: &Reply,
        attachments: &std::collections::BTreeMap<String, Vec<u8>>,
        nonce: &str,
        under: &Key,
    ) -> Result<Result<Option<Update>, Refusal>> {
        let dir = self.parts_dir(tree, &reply.reply_id);
        let db = self.state.db.sub(&tree.channel)?;
        let kept = db.received_parts(&reply.reply_id)?;
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
        db.record_part(&reply.reply_id, reply.part, nonce, &protocol::encode(reply))?;
        let have: BTreeSet<u32> = db.received_parts(&reply.reply_id)?.into_iter().map(|(k, _)| k).collect();
        if have.len() < reply.parts as usize {
            return Ok(Ok(None));
        }
        // Every part is here: one pack file, each chunk checked again on the way (the disk may lie).
        let pack_path = dir.join("pack");
        // An encrypted pack is assembled beside it, then decrypted into it.
        let assembled = if reply.sealed_key.is_some() { dir.join("sealed") } else { pack_path.clone() };
        {
            let mut out = std::io::BufWriter::new(
                std::fs::File::create(&assembled)
                    .with_context(|| format!("failed to create `{}`", assembled.display()))?,
            );
            for (k, p) in (1..).zip(&reply.payloads) {
                let path = dir.join(format!("{k}.chunk"));
                let bytes = std::fs::read(&path).with_context(|| format!("failed to read `{}`", path.display()))?;
                if bytes.len() as u64 != p.size || Digest::of(&bytes) != p.blake3 {
                    db.forget_parts(&reply.reply_id)?;
                    bail!("kept part {k} of reply {} is damaged on disk; it will be asked for again", reply.reply_id);
                }
                out.write_all(&bytes)?;
            }
            out.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()?;
        }
        if reply.sealed_key.is_some() {
            refuse!(super::sealing::open_pack_file(reply, under, &assembled, &pack_path)?);
        }
        let body = refuse!(read_body(&pack_path, reply, &self.cfg.limits)?);
        Ok(Ok(Some(Update { head: reply.clone(), body })))
    }

    /// The checks and the apply for an authentic, whole reply to an outstanding request, made under `under`.
    fn answer_reply(
        &mut self,
        tree: &Subscription,
        update: &Update,
        under: &Key,
        digest: &Digest,
        nonce: &str,
        now: u64,
    ) -> Result<Result<Handled, Refusal>> {
        let reply = &update.head;
        let (_, _, previous) = self.state.db.sub(&tree.channel)?.applied()?;
        let data = tree.data.clone();
        let step = {
            let view = self.view(tree);
            let mut scan = || self.scan_tree(tree);
            engine::recipient::on_whole(&view, update, under, &mut scan, &previous, tree.on_extra, now)?
        };
        let (plan, effects, scan) = match step {
            WholeStep::Refused(r) => return Ok(Err(r)),
            WholeStep::Current { generation, effects } => {
                if effects.contains(&RecipientEffect::NeedFullInventory) {
                    info!("the owner asked for the full tree; the next request lists it");
                }
                // A reply that meant to change the tree found it current already (another reply got there
                // first, or the tree was repaired by hand): the owner could not know, so it is told.
                let receipt = if reply.base != reply.root {
                    let nonce = Nonce::from_hex(nonce).map_err(anyhow::Error::msg)?;
                    let state = (generation, reply.root);
                    Some(self.receipt(
                        &self.key,
                        &tree.channel,
                        nonce,
                        &reply.reply_id,
                        state,
                        ReceiptStatus::Current,
                        None,
                    )?)
                } else {
                    None
                };
                let receipt = receipt.map(|r| (&reply.reply_id, r));
                return self.current(tree, nonce, digest, generation, reply.pinned, &effects, receipt);
            }
            WholeStep::Apply { plan, effects, scan } => (plan, effects, scan),
            WholeStep::Referred { same, step, effects } => {
                return self.referred(tree, nonce, digest, &same, step, &effects);
            }
        };
        let wait = self.install_policy(tree).wait(install::local_now());
        if let Some(wait) = wait
            && let Some(w) = self.state.db.sub(&tree.channel)?.waiting_install()?
            && (w.generation, w.base) == (reply.generation, reply.base)
        {
            // The same generation is waiting already, planned against the same tree: keep that one.
            return self.keep_ready(tree, None, wait, &effects, digest, nonce);
        }
        let stage_dir = self.staging_root(tree)?.join(reply.reply_id.as_str());
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
        let pack = self.parts_dir(tree, &reply.reply_id).join("pack");
        let lookup = |d: &Digest| by_digest.get(d).cloned();
        let sources = apply::Sources { pack: &pack, local: &lookup };
        if let Err(e) = apply::stage(&plan, update, &sources, &stage_dir) {
            let _ = std::fs::remove_dir_all(&stage_dir);
            match e {
                StageError::Refused(r) => {
                    // Whole files can be checked without trusting anything local: ask for them next time.
                    warn!("{r}; the next request asks for whole files");
                    self.state.db.sub(&tree.channel)?.set_full_content(true)?;
                    return Ok(Err(r));
                }
                StageError::Io { dir, source } => {
                    // The reply may be fine and stays in the inbox for the next run; the owner hears of it once.
                    let full =
                        matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded);
                    let reason = if full { FailureReason::DiskFull } else { FailureReason::StagingFailed };
                    let detail = format!("failed to stage files in `{}`: {source}", dir.display());
                    self.fail(tree, nonce, &reply.reply_id, reply.base, reason, &detail)?;
                    return Err(
                        anyhow::Error::new(StageError::Io { dir, source }).context("the data tree is unchanged")
                    );
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
            ops: update.body.ops.len(),
            target: plan.target.listing(),
            steps: plan.steps,
            kind: JournalKind::Apply,
            key_id: Some(under.id()),
            phase: apply::Phase::Swap,
            // With a pinned owner key every reply that got this far carried a signature that verifies
            // under it (engine::verify step 5a): shipped hooks may run.
            signed: self.owner_key.is_some(),
        };
        if let Some(wait) = wait {
            return self.keep_ready(tree, Some((journal, reply.base)), wait, &effects, digest, nonce);
        }
        if let Err(veto) = self.hooks(tree).pre_apply(&journal)? {
            let _ = std::fs::remove_dir_all(&journal.stage_dir);
            return Ok(Err(veto));
        }
        // Everything is verified and staged: the reply is accepted. A key it brings is taken up now, before
        // the journal commits (a crash in between finishes writing the key on the next start, and the reply,
        // not yet marked seen, is applied under the key it was made with, kept as the previous one).
        let key = &self.key;
        self.state.db.transaction(|db| {
            Recipient::apply_effects(db, &tree.channel, key, &effects)?;
            db.sub(&tree.channel)?.set_standing(None, reply.pinned)?;
            // An older update waiting to be installed is superseded.
            install::discard_waiting(db, &tree.channel)
        })?;
        journal.commit(&tree.dir)?;
        crate::failpoint::hit("apply-committed");
        self.finish(tree, &journal).context("apply interrupted; the next run finishes it")?;
        self.state.db.sub(&tree.channel)?.set_full_content(false)?;
        if !plan.kept.is_empty() {
            info!(kept = plan.kept.len(), "left files the owner does not list in place (on-extra = \"keep\")");
        }
        let ops = update.body.ops.len();
        if self.state.db.sub(&tree.channel)?.applied_root()?.0 != reply.generation {
            // Its post-apply hook failed and the tree went back (node::install).
            return Ok(Ok(Handled::Held { generation: reply.generation, held: reply.generation }));
        }
        info!(channel = %tree.channel, generation = reply.generation, ops, root = %reply.root.short(), "applied");
        Ok(Ok(Handled::Applied { generation: reply.generation, ops }))
    }

    /// Keeps a verified, staged update ready rather than installing it (`ready`: its journal, not committed,
    /// and the tree root it was planned against; `None` when the same one waits already). The reply counts
    /// as answered and accepted (a key it brings is taken up); the update replaced, if any, is discarded.
    fn keep_ready(
        &mut self,
        tree: &Subscription,
        ready: Option<(Journal, Digest)>,
        wait: install::Wait,
        effects: &[RecipientEffect],
        digest: &Digest,
        nonce: &str,
    ) -> Result<Result<Handled, Refusal>> {
        let channel = tree.channel.as_str();
        let replaced = if ready.is_some() { self.state.db.sub(channel)?.waiting_install()? } else { None };
        let (key, cfg) = (&self.key, &self.cfg);
        let generation = self.state.db.transaction(|db| {
            Recipient::apply_effects(db, channel, key, effects)?;
            let sdb = db.sub(channel)?;
            let generation = match &ready {
                Some((journal, base)) => {
                    install::keep_ready(db, cfg, channel, journal, *base, wait)?;
                    journal.generation
                }
                None => sdb.waiting_install()?.map_or(0, |w| w.generation),
            };
            sdb.close_outstanding(nonce)?;
            sdb.mark_fresh_reply()?;
            db.mark_seen(digest, "processed")?;
            Ok(generation)
        })?;
        if let Some(old) = replaced
            && ready.as_ref().is_some_and(|(j, _)| j.reply_id != old.reply_id)
        {
            info!(channel, old = old.generation, new = generation, "a newer verified update replaces the one waiting");
            install::remove_staged(&old);
        }
        self.finish_key()?;
        Ok(Ok(Handled::Ready { generation, wait }))
    }

    /// Installs the updates kept ready whose apply window is open at local time `now` (unless installation
    /// is manual). Returns the last one installed, if any was.
    ///
    /// # Errors
    /// Local failures; see [`Recipient::approve`].
    pub fn install_due(&mut self, now: jiff::civil::DateTime) -> Result<Option<Installed>> {
        let mut done = None;
        for tree in self.cfg.subscriptions.clone() {
            let policy = self.install_policy(&tree);
            if policy.install == InstallMode::Manual || policy.wait(now).is_some() {
                continue;
            }
            let Some(w) = self.state.db.sub(&tree.channel)?.waiting_install()? else { continue };
            info!(channel = %tree.channel, generation = w.generation, "the apply window is open: installing the update that waited");
            match self.install_waiting(&tree, w)? {
                Ok(d) => done = Some(d),
                Err(why) => warn!("{why}"),
            }
        }
        Ok(done)
    }

    /// `mailferry recipient approve`: installs the update kept ready for `channel` (default: the main
    /// tree's), whatever the apply window.
    ///
    /// # Errors
    /// An unknown channel, nothing waiting, a tree changed since the update was made ready or a pre-apply
    /// veto (the update is discarded then, and the next request asks again), or local failures.
    pub fn approve(&mut self, channel: Option<&str>) -> Result<Installed> {
        let tree = match channel {
            Some(c) => self.sub(c)?,
            None => self.cfg.main().clone(),
        };
        let Some(w) = self.state.db.sub(&tree.channel)?.waiting_install()? else {
            bail!("nothing waits to be installed for channel {:?} (`mailferry status` shows what does)", tree.channel);
        };
        self.install_waiting(&tree, w)?.map_err(anyhow::Error::msg)
    }

    /// Installs a waiting update: the tree must still be what it was planned against, then the pre-apply
    /// hooks, the journal, the swap and the post-apply hooks, as for an update installed at once.
    /// `Ok(Err(why))` when it cannot be installed and was discarded.
    fn install_waiting(&mut self, tree: &Subscription, w: crate::db::WaitingRow) -> Result<Result<Installed, String>> {
        let journal: Journal = serde_json::from_slice(&w.journal).context("a waiting update's journal is corrupt")?;
        let discard = |r: &Recipient, why: String| -> Result<Result<Installed, String>> {
            install::discard_waiting(&r.state.db, &tree.channel)?;
            r.state.db.sub(&tree.channel)?.set_fresh_next(true)?;
            Ok(Err(format!("{why}; it is discarded, and the next request asks again")))
        };
        let scan = self.scan_tree(tree)?;
        if !scan.foreign.is_empty() || scan.manifest.root() != w.base {
            let why = format!("the data tree changed since generation {} was made ready", w.generation);
            return discard(self, why);
        }
        if let Err(veto) = self.hooks(tree).pre_apply(&journal)? {
            return discard(self, veto.to_string());
        }
        // The message was filed long ago; recording the apply marks it seen again, as not yet filed.
        let settled = self.state.db.seen(&journal.message)?.is_some_and(|s| s.settled);
        journal.commit(&tree.dir)?;
        self.state.db.sub(&tree.channel)?.clear_waiting_install()?;
        crate::failpoint::hit("apply-committed");
        self.finish(tree, &journal).context("apply interrupted; the next run finishes it")?;
        if settled {
            self.state.db.mark_settled(&journal.message)?;
        }
        let sdb = self.state.db.sub(&tree.channel)?;
        let (now_at, _) = sdb.applied_root()?;
        let failure = sdb.last_hook_failure()?.filter(|f| f.reply_id == journal.reply_id);
        info!(channel = %tree.channel, generation = journal.generation, "installed the update that waited");
        Ok(Ok(Installed { generation: journal.generation, ops: journal.ops, applied: now_at, hook_failure: failure }))
    }

    /// Scans the data tree, reading only files that changed since the last scan (the stat cache).
    pub(crate) fn scan_tree(&self, tree: &Subscription) -> Result<scan::Scan> {
        self.scan_tree_saving(tree, true)
    }

    /// Scans the data tree; with `save`, keeps the stat cache for the next scan.
    fn scan_tree_saving(&self, tree: &Subscription, save: bool) -> Result<scan::Scan> {
        let data = &tree.data;
        std::fs::create_dir_all(&tree.dir).with_context(|| format!("failed to create `{}`", tree.dir.display()))?;
        let cache_file = tree.dir.join(statcache::FILE_NAME);
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
        tree: &Subscription,
        nonce: &str,
        digest: &Digest,
        same: &protocol::SameAs,
        step: engine::recipient::Referred,
        effects: &[RecipientEffect],
    ) -> Result<Result<Handled, Refusal>> {
        use engine::recipient::Referred;
        let key = &self.key;
        self.state.db.transaction(|db| {
            Recipient::apply_effects(db, &tree.channel, key, effects)?;
            let sdb = db.sub(&tree.channel)?;
            match step {
                Referred::Wait => {}
                Referred::AskParts => sdb.want_reply(&same.reply_id, &same.nonce.to_hex(), same.parts)?,
                Referred::AskFresh => sdb.set_fresh_next(true)?,
            }
            sdb.close_outstanding(nonce)?;
            sdb.mark_fresh_reply()?;
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
    #[allow(clippy::too_many_arguments)]
    fn current(
        &mut self,
        tree: &Subscription,
        nonce: &str,
        digest: &Digest,
        generation: u64,
        pinned: Option<u64>,
        effects: &[RecipientEffect],
        receipt: Option<(&ReplyId, Vec<u8>)>,
    ) -> Result<Result<Handled, Refusal>> {
        let key = &self.key;
        let (from, to) = (&self.cfg.recipient.address, &self.cfg.recipient.owner_address);
        self.state.db.transaction(|db| {
            Recipient::apply_effects(db, &tree.channel, key, effects)?;
            let sdb = db.sub(&tree.channel)?;
            sdb.set_standing(None, pinned)?;
            sdb.close_outstanding(nonce)?;
            sdb.mark_fresh_reply()?;
            if let Some((reply_id, raw)) = &receipt {
                db.outbox_put(&format!("receipt-{reply_id}"), from, to, raw)?;
            }
            db.mark_seen(digest, "processed")
        })?;
        self.finish_key()?;
        info!(channel = %tree.channel, generation, "owner confirms the tree is current");
        Ok(Ok(Handled::Current { generation }))
    }

    /// Where files are staged: a directory from which a rename into the data tree works (see
    /// [`apply::staging::choose`]), outside the data tree.
    pub(crate) fn staging_root(&self, tree: &Subscription) -> Result<PathBuf> {
        apply::staging::choose(tree.staging_dir.as_deref(), &tree.dir, &tree.data)
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
    /// The owner answers without an update (not entitled, expired, suspended, pinned).
    Standing {
        /// What it says.
        standing: String,
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
        let main = self.cfg.main().clone();
        let view = self.view(&main);
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
            let Some(tree) = self.cfg.subscription(&reply.channel) else {
                let r = format!("reply is for channel {:?}, which this recipient does not subscribe to", reply.channel);
                out.push(refused(Refusal::new(Reason::Unexpected, r)));
                continue;
            };
            match engine::recipient::on_part(&self.view(tree), &reply, msg.key_role)? {
                PartStep::Refused { refusal, .. } => out.push(refused(refusal)),
                PartStep::Held { generation, .. } => out.push(Preview::Held { generation }),
                PartStep::Standing(standing) => out.push(Preview::Standing { standing: standing.to_string() }),
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
            let tree = self.sub(&reply.channel)?;
            let view = self.view(&tree);
            // Parts kept from earlier runs complete it.
            for (k, p) in (1..).zip(&reply.payloads) {
                if chunks.contains_key(&k) {
                    continue;
                }
                if let Ok(bytes) = std::fs::read(self.parts_dir(&tree, &reply_id).join(format!("{k}.chunk")))
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
            let mut pack: Vec<u8> = chunks.into_values().flatten().collect();
            if reply.sealed_key.is_some() {
                let mut plain = Vec::new();
                if let Err(r) = super::sealing::open_pack(&reply, &key, pack.as_slice(), &mut plain)? {
                    out.push(refused(r));
                    continue;
                }
                pack = plain;
            }
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
            let (_, _, previous) = self.state.db.sub(&tree.channel)?.applied()?;
            let mut scan = || self.scan_tree_saving(&tree, false);
            let step = engine::recipient::on_whole(&view, &update, &key, &mut scan, &previous, tree.on_extra, now)?;
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
    let subscriptions =
        cfg.subscriptions.iter().map(|t| subscription_status(&db, cfg, t)).collect::<Result<Vec<_>>>()?;
    let main = subscriptions[0].clone();
    Ok(RecipientStatus {
        role: "recipient",
        name: cfg.recipient.name.clone(),
        data: main.data.clone(),
        generation: main.generation,
        root: main.root.clone(),
        last_request_at: main.last_request_at,
        last_reply_at: main.last_reply_at,
        outstanding: main.outstanding,
        rejected: db.rejection_count()?,
        interrupted_apply: subscriptions.iter().any(|s| s.interrupted_apply),
        outbox: Outbox::status(&db)?,
        previous_generation: main.previous_generation,
        rollback_held: main.rollback_held,
        stale: subscriptions.iter().any(|s| s.stale),
        stale_after: cfg.recipient.stale_after().as_secs(),
        transport: super::TransportStatus::read(&db)?,
        key_id: read_key_file(&cfg.recipient.key_file).ok().map(|k| k.id()),
        owner_public_key: cfg.recipient.owner_public_key.clone(),
        channel: main.channel.clone(),
        standing: main.standing.clone(),
        waiting: main.waiting.clone(),
        last_hook_failure: main.last_hook_failure.clone(),
        subscriptions,
    })
}

fn subscription_status(db: &Db, cfg: &RecipientConfig, tree: &Subscription) -> Result<SubscriptionStatus> {
    let sdb = db.sub(&tree.channel)?;
    let (generation, root) = sdb.applied_root()?;
    let sub = sdb.subscription()?;
    Ok(SubscriptionStatus {
        channel: tree.channel.clone(),
        data: tree.data.clone(),
        generation,
        root: root.map(|r| r.to_hex()),
        last_request_at: sub.last_request_at,
        last_reply_at: sub.last_reply_at,
        outstanding: sdb.outstanding_count()?,
        interrupted_apply: Journal::path(&tree.dir).exists(),
        previous_generation: sdb.previous()?.map(|p| p.generation),
        rollback_held: sdb.rollback_hold()?,
        stale: stale_since(db, cfg, tree)?.is_some(),
        standing: sub.standing,
        pinned: sub.pinned,
        waiting: install::waiting_status(db, &tree.channel, &InstallPolicy::for_tree(&cfg.recipient, &tree.install)?)?,
        last_hook_failure: sdb.last_hook_failure()?,
    })
}

/// How long the recipient has gone without a fresh, authenticated reply, if that is longer than its
/// `stale-after`. The clock starts at the last accepted reply, or when the recipient was set up.
///
/// # Errors
/// State failures.
pub fn stale_since(db: &Db, cfg: &RecipientConfig, tree: &Subscription) -> Result<Option<std::time::Duration>> {
    let since = db.sub(&tree.channel)?.subscription()?.last_reply_at.or(db.created_at()?);
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
    let mut stale = false;
    for tree in &cfg.subscriptions {
        stale |= notice_tree_staleness(db, cfg, tree)?;
    }
    Ok(stale)
}

fn notice_tree_staleness(db: &Db, cfg: &RecipientConfig, tree: &Subscription) -> Result<bool> {
    let Some(quiet) = stale_since(db, cfg, tree)? else { return Ok(false) };
    let r = &cfg.recipient;
    warn!(
        channel = %tree.channel,
        quiet = %humantime::format_duration(std::time::Duration::from_secs(quiet.as_secs())),
        "no fresh reply from the owner for longer than stale-after ({}): updates may be withheld",
        humantime::format_duration(r.stale_after())
    );
    let Some(admin) = &r.admin_address else { return Ok(true) };
    if db.sub(&tree.channel)?.subscription()?.stale_notified_at.is_some() {
        return Ok(true);
    }
    let text = format!(
        "mailferry recipient {:?} (data tree `{}`) has had no fresh, authenticated reply from {} for {}.\n\
         Its stale-after is {}. Updates may be withheld, or mail between the sites is failing.\n\
         Run `mailferry status --config {}` on the recipient for details.\n",
        r.name,
        tree.data.display(),
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
        db.outbox_put(&format!("stale-notice-{}-{}", tree.channel, now()), &r.address, admin, &raw)?;
        db.sub(&tree.channel)?.set_stale_notified(Some(now()))
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
    fn view<'a>(&'a self, tree: &'a Subscription) -> View<'a> {
        View { db: &self.state.db, sub: &tree.channel, name: &self.cfg.recipient.name, key: &self.key }
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
    sub: &'a str,
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
        let keys = self.db.keys()?;
        let (Some(hex), Some(until)) = (keys.previous_key, keys.previous_key_until) else { return Ok(None) };
        if now >= until {
            return Ok(None);
        }
        Ok(Some(Key::from_hex(&hex).context("the previous key in the state database is corrupt")?))
    }

    fn outstanding(&self, nonce: &Nonce) -> Result<Option<u64>> {
        self.db.sub(self.sub)?.outstanding(&nonce.to_hex())
    }

    fn reply_applied(&self, reply_id: &ReplyId) -> Result<bool> {
        self.db.sub(self.sub)?.reply_applied(reply_id)
    }

    fn channel(&self) -> &str {
        self.sub
    }

    fn applied(&self) -> Result<Applied> {
        let sub = self.db.sub(self.sub)?.subscription()?;
        let root = sub.applied_root.map(|r| Digest::from_hex(&r)).transpose().map_err(anyhow::Error::msg)?;
        Ok(Applied { generation: sub.applied_generation, root, key_id: sub.applied_key_id })
    }

    fn rollback_hold(&self) -> Result<Option<u64>> {
        self.db.sub(self.sub)?.rollback_hold()
    }

    fn last_seq(&self) -> Result<u64> {
        Ok(self.db.sub(self.sub)?.subscription()?.seq)
    }

    fn has_parts(&self, reply_id: &ReplyId) -> Result<bool> {
        Ok(!self.db.sub(self.sub)?.received_parts(reply_id)?.is_empty())
    }
}
