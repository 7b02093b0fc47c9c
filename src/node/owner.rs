//! The owner: publishes generations and answers recipients' requests.
//!
//! A request is answered only after its MAC verifies under the key of the recipient it names, its sequence
//! number is new and its nonce unseen; the reply goes to the address registered for that recipient, never
//! to any address the message itself names.
//!
//! Keys rotate without a trusted courier (`owner rotate-key`): the new key travels with every reply,
//! sealed under the current one, until the recipient first uses it; then it becomes the key and the old
//! one stays valid for a grace period, for messages already on their way. With `signing = "hmac+ed25519"`
//! replies also carry the owner's Ed25519 signature, which enrollment files pin.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use tracing::{info, warn};

mod enroll;
pub use enroll::Enrolled;

use super::SystemEntropy;
use super::pack::{Packed, Packer};
use super::{Handled, Outbox, Role, RunReport, State, process_inbox};
use crate::config::{Enrollment, OwnerConfig, OwnerSection, Signing, TransportConfig, TransportHint, write_secret};
use crate::crypto::{Key, KeyId, Nonce, SigningKey};
use crate::db::{Answered, ChannelRow, Db, GenerationRow, LearnedLimit, RecipientRow, SentMessage, now};
use crate::engine::owner::{
    Access, AnswerPlan, Budget, Effect, Generation, Outcome, OwnerKeys, OwnerPolicy, OwnerView, Registered,
    ReportOutcome, ResendPlan, Rotation, SentReply, Spent,
};
use crate::engine::{self, Entropy, verify};
use crate::manifest::{Digest, Manifest};
use crate::protocol::envelope::{self, Outgoing};
use crate::protocol::{self, Auth, Kind, Refusal, Reply, ReplyId};
use crate::scan::{Exclude, ForeignKind, StatCache, scan_excluding_cached};
use crate::store::Store;
use crate::transport::{Transport, maildir::check_address};

/// How long a cached delta stream is kept after it was made.
const KEEP_DELTAS: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// How long sent reply parts are kept for re-sending when no receipt arrives.
const KEEP_SENT_PARTS: u64 = 14 * 24 * 3600;

/// An owner node with its state open.
#[derive(Debug)]
pub struct Owner {
    cfg: OwnerConfig,
    state: Rc<State>,
    store: Store,
    manifests: RefCell<HashMap<(String, u64), Arc<Manifest>>>,
    /// The outgoing server's `SIZE`, learned at the start of a run.
    server_limit: Option<u64>,
    /// The Ed25519 key replies are signed with (`signing = "hmac+ed25519"`).
    signer: Option<SigningKey>,
    /// The updates this run sends by broadcast, and the broadcasts made so far.
    broadcasting: broadcast::Broadcasting,
    /// Packs made recently, by what determines them: a fleet on the same base and generation is packed
    /// once, and each recipient's reply only cut into parts and authenticated.
    packs: RefCell<Vec<(PackKey, Rc<Packed>)>>,
}

/// What a pack is a function of: the channel, the recipient's tree (by its root), the generation, whole
/// files or not, and whether line deltas may be used. (The bsdiff budget only decides how compact a pack
/// is.)
#[derive(Clone, PartialEq, Eq, Debug)]
struct PackKey {
    // Generation numbers count per channel, and two channels' trees may share a root (an empty one).
    channel: String,
    base: Digest,
    generation: u64,
    full_content: bool,
    lines: bool,
}

/// How many packs an owner keeps in memory (each is a temporary file and its body).
const KEEP_PACKS: usize = 4;

mod broadcast;

/// Default grace period of a rotated key: a week.
pub const DEFAULT_KEY_GRACE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The owner's Ed25519 signing key, made on first use.
fn signing_key(db: &Db) -> Result<SigningKey> {
    db.transaction(|db| match db.signing_key()? {
        Some(hex) => SigningKey::from_hex(&hex).context("the stored signing key is corrupt"),
        None => {
            let k = SigningKey::generate();
            db.set_signing_key(&k.to_hex())?;
            info!(public_key = %k.public().to_hex(), "made the owner's Ed25519 signing key");
            Ok(k)
        }
    })
}

/// What `publish` did.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    /// The generation now current.
    pub generation: u64,
    /// Its root.
    pub root: Digest,
    /// Regular files in it.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    /// False when the source was unchanged since the last generation (no new generation made).
    pub new: bool,
}

/// The owner's view for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct OwnerStatus {
    /// Always "owner".
    pub role: &'static str,
    /// The owner's address.
    pub address: String,
    /// Newest generation.
    pub generation: Option<GenerationRow>,
    /// Registered recipients and what they last reported.
    pub recipients: Vec<RecipientRow>,
    /// Refused messages recorded.
    pub rejected: u64,
    /// Outgoing mail not yet accepted by the transport.
    pub outbox: super::OutboxStatus,
    /// The last server error and how new mail is noticed.
    pub transport: super::TransportStatus,
    /// How replies are authenticated.
    pub signing: Signing,
    /// The Ed25519 public key recipients pin, when replies are signed.
    pub public_key: Option<String>,
    /// What each recipient may be sent per period (each recipient's `spent_replies` and `spent_bytes`
    /// count the current period).
    pub budget: Budget,
}

/// Creates an owner: `DIR/owner.toml`, the state database and content store.
///
/// # Errors
/// An existing config, an unusable address or source, or I/O errors.
pub fn init(dir: &Path, source: &Path, address: &str, transport_root: &Path) -> Result<PathBuf> {
    let transport = TransportConfig::Maildir { root: std::path::absolute(transport_root)? };
    init_with(dir, source, address, None, transport)
}

/// Creates an owner as [`init`] does, with its state in `state_dir` (default `dir`) and any transport.
///
/// # Errors
/// As [`init`].
pub fn init_with(
    dir: &Path,
    source: &Path,
    address: &str,
    state_dir: Option<&Path>,
    transport: TransportConfig,
) -> Result<PathBuf> {
    check_address(address).map_err(anyhow::Error::msg)?;
    if !source.is_dir() {
        bail!("source tree `{}` is not a directory", source.display());
    }
    crate::config::check_state_outside_source(dir, source)?;
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create `{}`", dir.display()))?;
    set_private(dir)?;
    let path = dir.join("owner.toml");
    if path.exists() {
        bail!("`{}` already exists", path.display());
    }
    let section = OwnerSection {
        address: address.to_owned(),
        source: std::path::absolute(source)?,
        state_dir: state_dir.map(std::path::absolute).transpose()?,
        interval: std::time::Duration::from_secs(60),
        compression_level: 9,
        admin_address: None,
        relay_limit: crate::config::DEFAULT_RELAY_LIMIT,
        keep_generations: 16,
        signing: Signing::Hmac,
        budget_replies: crate::config::default_budget_replies(),
        budget_bytes: crate::config::default_budget_bytes(),
        budget_period: crate::config::default_budget_period(),
        bsdiff_request_budget: crate::config::DEFAULT_BSDIFF_REQUEST_BUDGET,
        bsdiff_daily_budget: crate::config::DEFAULT_BSDIFF_DAILY_BUDGET,
        recipient_interval: crate::config::default_recipient_interval(),
        silent_after_intervals: crate::config::default_silent_after_intervals(),
        alert_interval: crate::config::default_alert_interval(),
        require_approval: false,
        keep_history: Default::default(),
        broadcast_address: None,
        broadcast_min: crate::config::default_broadcast_min(),
    };
    let state = state_dir.unwrap_or(dir);
    if state != dir {
        std::fs::create_dir_all(state).with_context(|| format!("failed to create `{}`", state.display()))?;
        set_private(state)?;
    }
    #[derive(Serialize)]
    struct File<'a> {
        owner: &'a OwnerSection,
        transport: &'a TransportConfig,
    }
    let text = format!(
        "# mailferry owner configuration (see README.md, \"Configuration\").\n{}",
        toml::to_string(&File { owner: &section, transport: &transport })?
    );
    std::fs::write(&path, text).with_context(|| format!("failed to write `{}`", path.display()))?;
    Db::open(&state.join("state.db"))?;
    Store::open(&state.join("store"), 9)?;
    Ok(path)
}

fn set_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("failed to restrict `{}`", dir.display()))
}

impl Owner {
    /// Opens the owner's state, taking the state directory's lock.
    ///
    /// # Errors
    /// A state directory that overlaps the source tree, or a locked or unreadable one.
    pub fn open(cfg: OwnerConfig) -> Result<Owner> {
        crate::config::check_state_outside_source(&cfg.state_dir, &cfg.owner.source)?;
        let state = State::open(&cfg.state_dir)?;
        Owner::open_in(cfg, state)
    }

    /// The owner part of a node whose state is already open (a node holding several roles).
    ///
    /// # Errors
    /// A state directory other than the config's, one that overlaps the source tree, or an unreadable
    /// store.
    pub fn open_in(cfg: OwnerConfig, state: Rc<State>) -> Result<Owner> {
        anyhow::ensure!(
            state.dir() == cfg.state_dir,
            "the owner's state directory `{}` is not the node's `{}`",
            cfg.state_dir.display(),
            state.dir().display()
        );
        crate::config::check_state_outside_source(&cfg.state_dir, &cfg.owner.source)?;
        let store = Store::open(&cfg.state_dir.join("store"), cfg.owner.compression_level)?;
        let signer = match cfg.owner.signing {
            Signing::Hmac => None,
            Signing::HmacEd25519 => Some(signing_key(&state.db)?),
        };
        Ok(Owner {
            cfg,
            state,
            store,
            manifests: RefCell::default(),
            server_limit: None,
            signer,
            broadcasting: broadcast::Broadcasting::default(),
            packs: RefCell::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &OwnerConfig {
        &self.cfg
    }

    /// Registers a recipient with a fresh key and writes its enrollment file (mode 0600) to `out`.
    ///
    /// # Errors
    /// A taken name, an unusable address, an existing `out`, or I/O errors.
    pub fn add_recipient(&mut self, name: &str, address: &str, out: &Path) -> Result<Enrollment> {
        self.add_recipient_with(name, address, out, None)
    }

    /// Registers a recipient as [`Owner::add_recipient`] does, expected to request every `interval`
    /// (written into its enrollment file; default `recipient-interval`), which `owner fleet` holds it to.
    ///
    /// # Errors
    /// As [`Owner::add_recipient`].
    pub fn add_recipient_with(
        &mut self,
        name: &str,
        address: &str,
        out: &Path,
        interval: Option<std::time::Duration>,
    ) -> Result<Enrollment> {
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            bail!("recipient name {name:?} must be 1-64 characters of letters, digits, `-`, `_` and `.`");
        }
        check_address(address).map_err(anyhow::Error::msg)?;
        if out.exists() {
            bail!("`{}` already exists", out.display());
        }
        let key = Key::generate();
        let mut enrollment = self.enrollment(name, address, &key);
        if let Some(i) = interval {
            enrollment.transport.interval = humantime::format_duration(i).to_string();
        }
        self.state.db.transaction(|db| {
            db.add_recipient(name, address, &key.to_hex(), &key.id())?;
            db.set_fleet_interval(name, crate::fleet::DEFAULT_CHANNEL, interval.map(|i| i.as_secs()))
        })?;
        write_enrollment(&enrollment, out, "recipient init")?;
        Ok(enrollment)
    }

    /// Enrolls a registered recipient afresh: a new key replaces its key at once (the old one, a key in
    /// rotation and retired keys stop verifying), and a new enrollment file is written to `out`. For a key
    /// that may be stolen: unlike `rotate-key`, the new key never travels under the old one. On the
    /// recipient, `recipient enroll` takes the file up, and a generation applied under the old key no
    /// longer binds replies under the new one (`docs/protocol.md` §11.3 step 10).
    ///
    /// # Errors
    /// No such recipient, an existing `out`, or state and I/O failures.
    pub fn reenroll(&mut self, name: &str, out: &Path) -> Result<Enrollment> {
        let rec =
            self.state.db.recipient(name)?.with_context(|| format!("no recipient named {name:?} is registered"))?;
        if out.exists() {
            bail!("`{}` already exists", out.display());
        }
        let key = Key::generate();
        let enrollment = self.enrollment(name, &rec.address, &key);
        self.state.db.transaction(|db| db.replace_key(name, &key.to_hex(), &key.id()))?;
        write_enrollment(&enrollment, out, "recipient enroll")?;
        info!(recipient = name, key = %key.id(), old = %rec.key_id, "enrolled afresh: the old key no longer verifies");
        Ok(enrollment)
    }

    fn enrollment(&self, name: &str, address: &str, key: &Key) -> Enrollment {
        Enrollment {
            mailferry_enrollment: 1,
            owner_address: self.cfg.owner.address.clone(),
            name: name.to_owned(),
            address: address.to_owned(),
            key: key.to_hex(),
            key_id: key.id(),
            owner_public_key: self.signer.as_ref().map(|s| s.public().to_hex()),
            transport: TransportHint {
                kind: match self.cfg.transport {
                    TransportConfig::Maildir { .. } => "maildir".into(),
                    TransportConfig::Mail(_) => "mail".into(),
                },
                interval: humantime::format_duration(self.cfg.owner.recipient_interval).to_string(),
            },
        }
    }

    /// Snapshots the source tree into the content store and, if it changed, records a new generation.
    ///
    /// A generation never holds a file of the owner's own state: the source may have come to overlap the
    /// state directory since the owner was opened, and a hard link or bind mount overlaps it where no path
    /// shows, so every directory and file scanned is checked by device and inode too.
    ///
    /// # Errors
    /// A source tree with symlinks, device files, unrepresentable names or case collisions, one that holds
    /// any of the owner's state, or I/O errors.
    pub fn publish(&mut self) -> Result<Published> {
        self.publish_channel(protocol::DEFAULT_CHANNEL)
    }

    /// Snapshots the source tree of `channel` as [`Owner::publish`] does the default channel's.
    ///
    /// # Errors
    /// No such channel, or what [`Owner::publish`] reports.
    pub fn publish_channel(&mut self, channel: &str) -> Result<Published> {
        let source = self.channel_source(channel)?;
        crate::config::check_state_outside_source(&self.cfg.state_dir, &source)?;
        let state = Exclude::directory(&self.cfg.state_dir)
            .with_context(|| format!("failed to list the state directory `{}`", self.cfg.state_dir.display()))?;
        let batch = self.store.batch();
        // Files whose stamp is as at the last publish are not read again: their content is in the store
        // (in the newest generation, which pruning keeps). The cache is used only with the generation it
        // was saved with.
        let latest = self.state.db.latest_generation(channel)?;
        let cache = PublishCache::new(&self.cfg.state_dir, channel);
        let old = cache.load(latest.as_ref().map(|g| g.root));
        let cached = scan_excluding_cached(&source, &|p| batch.put_file(p), &state, &old)
            .with_context(|| format!("cannot publish `{}`", source.display()))?;
        tracing::debug!(files = cached.scan.manifest.len(), read = cached.hashed, "scanned the source tree");
        // No new cache means the old one still holds; an old one not used (stale) must not stay.
        let keep = match cached.cache {
            Some(c) => Some(c),
            None if old.is_empty() => Some(StatCache::new()),
            None => None,
        };
        let scan = cached.scan;
        if let Some(f) = scan.foreign.first() {
            let what = match &f.kind {
                ForeignKind::Symlink { target } => {
                    // Say so when it leads to the owner's state: that is the mistake to fix, not the link.
                    let into_state =
                        crate::config::check_state_outside_source(&self.cfg.state_dir, &source.join(f.path.as_str()))
                            .is_err();
                    if into_state {
                        format!(
                            "a symlink leading outside the tree, to the owner's state directory or one that holds it \
                             (-> `{}`)",
                            target.display()
                        )
                    } else {
                        format!("a symlink that leads outside the tree or never resolves (-> `{}`)", target.display())
                    }
                }
                ForeignKind::Special(what) => format!("a {what}"),
            };
            bail!(
                "cannot publish `{}`: `{}` is {what}; mailferry carries regular files, directories and symlinks that stay inside the tree",
                source.display(),
                f.path
            );
        }
        let manifest = scan.manifest;
        let root = manifest.root();
        let (files, bytes) = manifest.file_stats();
        // The same root is the same tree, checked when that generation was published.
        if let Some(latest) = latest
            && latest.root == root
        {
            cache.save(keep.as_ref(), root);
            return Ok(Published { generation: latest.number, root, files: files as u64, bytes, new: false });
        }
        // Recipients may run on case-insensitive file systems: a generation must be portable.
        manifest.validate().with_context(|| format!("cannot publish `{}`", source.display()))?;
        // The new objects are durable and in place before the generation that refers to them exists.
        batch.commit().context("failed to store the new generation's content")?;
        let generation = self.state.db.add_generation(channel, &manifest)?;
        cache.save(keep.as_ref(), root);
        info!(channel, generation, root = %root.short(), files, bytes, "published");
        self.prune(channel)?;
        Ok(Published { generation, root, files: files as u64, bytes, new: true })
    }

    /// Keeps the newest `keep-generations` generations and the content they refer to; older ones become
    /// old generations (their file lists kept, their content as deltas, until `keep-history`: see
    /// [`super::history`]). Replies already made are unaffected: their parts are kept whole, apart from
    /// the store.
    fn prune(&mut self, channel: &str) -> Result<()> {
        let gone = self.state.db.prune_generations(channel, self.cfg.owner.keep_generations)?;
        if gone.is_empty() {
            return Ok(());
        }
        for g in &gone {
            self.manifests.borrow_mut().remove(&(channel.to_owned(), *g));
        }
        let r = super::history::retire(&self.state.db, &self.store, self.cfg.owner.keep_history, crate::db::now())?;
        if r.forgotten > 0 {
            self.manifests.borrow_mut().clear();
        }
        let cached = super::pack::prune_cache(&self.cfg.state_dir.join("deltas"), KEEP_DELTAS)?;
        info!(
            channel, generations = ?gone, deltas = r.deltas, whole = r.whole, removed = r.removed,
            bytes = r.removed_bytes, forgotten = r.forgotten, cached,
            "generations beyond keep-generations kept as old generations"
        );
        Ok(())
    }

    /// The tree `channel` publishes: the config's `source` for the default channel, the one
    /// `owner channel add` named for the others.
    fn channel_source(&self, channel: &str) -> Result<PathBuf> {
        if channel == protocol::DEFAULT_CHANNEL {
            return Ok(self.cfg.owner.source.clone());
        }
        let row = self.state.db.channel(channel)?.with_context(|| format!("no channel named {channel:?}"))?;
        row.source.with_context(|| format!("channel {channel:?} has no source tree"))
    }

    /// Adds a channel publishing `source` (`mailferry owner channel add`). An open channel is sent to every
    /// registered recipient; any other only through grants. With `encrypt`, its reply payloads are
    /// encrypted under a key only the recipients it is sent to receive.
    ///
    /// # Errors
    /// A bad or taken name, a source that is not a directory or overlaps the owner's state, or state
    /// failures.
    pub fn add_channel(&mut self, name: &str, source: &Path, open: bool, encrypt: bool) -> Result<ChannelRow> {
        if !protocol::valid_channel_name(name) {
            bail!(
                "channel name {name:?} must be 1-64 characters of letters, digits, `-`, `_` and `.`, not starting \
                 with `-` or `.`"
            );
        }
        if !source.is_dir() {
            bail!("source tree `{}` is not a directory", source.display());
        }
        let source = std::path::absolute(source)?;
        crate::config::check_state_outside_source(&self.cfg.state_dir, &source)?;
        let text = source.to_str().with_context(|| format!("`{}` is not UTF-8", source.display()))?;
        self.state.db.add_channel(name, Some(text), open, encrypt)?;
        info!(channel = name, source = %source.display(), open, encrypt, "channel added");
        self.state.db.channel(name)?.context("the channel just added is gone")
    }

    /// Starts a new key epoch for channel `name` (`mailferry owner channel rekey`): replies made from now
    /// on are encrypted under a fresh key, so a recipient no longer sent the channel cannot read later
    /// payloads with the key it kept. Returns the new epoch.
    ///
    /// # Errors
    /// No such channel, or state failures.
    pub fn rekey_channel(&mut self, name: &str) -> Result<u64> {
        super::sealing::rekey_channel(&self.state.db, name)
    }

    /// Answers every waiting request and records every receipt, then sends what is queued.
    ///
    /// # Errors
    /// Transport or state failures that stop the run; refusals of single messages are not errors.
    pub async fn run_once<T: Transport>(&mut self, transport: &mut T) -> Result<RunReport> {
        let mut report = RunReport::default();
        report.sent += self.begin_run(transport).await?;
        self.survey(transport).await?;
        process_inbox(self, transport, &mut report).await?;
        report.sent += self.end_run(transport).await?;
        Ok(report)
    }

    /// What a run does before it reads the inbox: forgets kept parts past their age, sends what is queued
    /// (learning from relays that refuse it), and learns the outgoing server's `SIZE`. Returns how many
    /// messages were sent.
    ///
    /// # Errors
    /// State failures.
    pub(crate) async fn begin_run<T: Transport>(&mut self, transport: &mut T) -> Result<usize> {
        self.state.db.drop_sent_parts(None, KEEP_SENT_PARTS)?;
        let flushed = Outbox::flush(&self.state.db, transport).await?;
        self.learn_from(&flushed)?;
        self.server_limit = transport.size_limit().await;
        Ok(flushed.sent)
    }

    /// The reply part this owner sent under `message_id`, if it remembers it.
    ///
    /// # Errors
    /// State failures.
    pub(crate) fn sent_message(&self, message_id: &str) -> Result<Option<SentMessage>> {
        self.state.db.sent_id(message_id)
    }

    /// What a run does after the inbox: sends what it queued. Returns how many messages were sent.
    ///
    /// # Errors
    /// State failures.
    pub(crate) async fn end_run<T: Transport>(&mut self, transport: &mut T) -> Result<usize> {
        let flushed = Outbox::flush(&self.state.db, transport).await?;
        self.learn_from(&flushed)?;
        Ok(flushed.sent)
    }

    /// A reply part refused as too large teaches the limit for its recipient: later replies to it are cut
    /// into parts a quarter smaller than the refused one, and the refused reply's kept parts are dropped
    /// so that the recipient's request for them is answered afresh, in the smaller parts. Each refusal
    /// shrinks the limit, down to the smallest usable one, so this cannot loop.
    pub(crate) fn learn_from(&mut self, flushed: &super::FlushReport) -> Result<()> {
        for t in &flushed.too_large {
            let Some(rec) = self.state.db.recipients()?.into_iter().find(|r| r.address == t.to) else { continue };
            let reply_id = self.state.db.reply_of_outbox_name(&t.name)?;
            // Our own submission server said so: no report to corroborate.
            let limit = engine::owner::shrunk_limit(t.bytes, crate::config::MIN_RELAY_LIMIT);
            let learned = LearnedLimit { limit, learned_at: now(), refused: Some(t.bytes), reply_id: reply_id.clone() };
            self.state.db.transaction(|db| {
                db.set_relay_limit(&rec.name, Some(&learned))?;
                if let Some(id) = &reply_id {
                    db.drop_sent_parts(Some(id), KEEP_SENT_PARTS)?;
                }
                Ok(())
            })?;
            warn!(
                recipient = %rec.name, refused = t.bytes, limit,
                "a relay refused a reply part as too large; later replies to this recipient use smaller parts"
            );
        }
        Ok(())
    }

    /// Unregisters a recipient: its key stops verifying at once.
    ///
    /// # Errors
    /// No such recipient, or state failures.
    pub fn remove_recipient(&mut self, name: &str) -> Result<()> {
        self.state.db.remove_recipient(name)
    }

    /// Starts rotating `name`'s key: a fresh key travels, sealed under the current one, with every reply
    /// until the recipient first uses it; then the current key stays valid for `grace` more. Rotating
    /// again before that replaces the key in transit. Returns the new key's id.
    ///
    /// Routine hygiene, not a cure for a stolen key: whoever holds the current key can open the new one
    /// from the reply. For a key known to be stolen, remove the recipient and enroll it afresh.
    ///
    /// # Errors
    /// No such recipient, a grace longer than a year, or state failures.
    pub fn rotate_key(&mut self, name: &str, grace: std::time::Duration) -> Result<KeyId> {
        if grace.as_secs() > protocol::MAX_REKEY_GRACE {
            bail!("a grace period of {} is longer than a year", humantime::format_duration(grace));
        }
        let key = Key::generate();
        self.state.db.start_key_rotation(name, &key.to_hex(), &key.id(), grace.as_secs())?;
        info!(recipient = name, key = %key.id(), "key rotation started");
        Ok(key.id())
    }
}

/// The stat cache of `owner publish` (the recipient's format, [`crate::statcache`]): `publish-stat-cache`
/// in the state directory for the default channel (`publish-stat-cache.CHANNEL` for the others), with
/// `….root` beside it naming the root of the generation it was saved with. It is only an optimisation: a missing, damaged or stale one costs one full read of the source.
struct PublishCache {
    file: PathBuf,
    root_file: PathBuf,
}

impl PublishCache {
    fn new(state_dir: &Path, channel: &str) -> PublishCache {
        // Channel names are plain file names (letters, digits, `-`, `_`, `.`, never starting with `.`).
        let name = if channel == protocol::DEFAULT_CHANNEL {
            "publish-stat-cache".to_owned()
        } else {
            format!("publish-stat-cache.{channel}")
        };
        PublishCache { file: state_dir.join(&name), root_file: state_dir.join(format!("{name}.root")) }
    }

    /// The cache, if it was saved with the generation whose root is `latest`; else the empty cache.
    fn load(&self, latest: Option<Digest>) -> StatCache {
        let saved_with = std::fs::read_to_string(&self.root_file).ok().and_then(|t| Digest::from_hex(t.trim()).ok());
        if latest.is_none() || saved_with != latest {
            return StatCache::new();
        }
        StatCache::load(&self.file).unwrap_or_else(|e| {
            warn!("{:#}; every source file will be read again", anyhow::Error::from(e));
            StatCache::new()
        })
    }

    /// Keeps `cache` (when the scan made a new one) for the generation whose root is `root`. Failing to is
    /// not fatal: the next publish reads everything.
    fn save(&self, cache: Option<&StatCache>, root: Digest) {
        // The root is written last and removed first: a cache and a root that disagree are never used.
        let _ = std::fs::remove_file(&self.root_file);
        let saved = cache.map_or(Ok(()), |c| c.save(&self.file)).and_then(|()| {
            let tmp = self.root_file.with_extension("root.tmp");
            std::fs::write(&tmp, format!("{}\n", root.to_hex()))?;
            std::fs::rename(&tmp, &self.root_file)
        });
        if let Err(e) = saved {
            warn!("failed to keep the publish stat cache `{}`: {e}", self.file.display());
        }
    }
}

/// The owner's status, read without taking the state lock (so it works while the daemon runs).
///
/// # Errors
/// State failures.
pub fn status(cfg: &OwnerConfig) -> Result<OwnerStatus> {
    let db = Db::open(&cfg.state_dir.join("state.db"))?;
    // What each recipient has is what it last stated (a request, or a receipt of any outcome), never a
    // generation it refused or rolled back from.
    let has: HashMap<String, (Option<u64>, Option<Digest>)> =
        db.fleet_facts(crate::fleet::DEFAULT_CHANNEL)?.into_iter().map(|f| (f.name, (f.generation, f.root))).collect();
    Ok(OwnerStatus {
        role: "owner",
        address: cfg.owner.address.clone(),
        generation: db.latest_generation(protocol::DEFAULT_CHANNEL)?,
        recipients: db
            .recipients()?
            .into_iter()
            .map(|mut r| {
                if let Some((generation, root)) = has.get(&r.name)
                    && generation.is_some()
                {
                    r.applied_generation = *generation;
                    r.applied_root = root.map(|d| d.to_hex());
                }
                r.last_bounce = db.bounce(&r.name)?;
                r.relay_limit = db
                    .relay_limit(&r.name)?
                    .filter(|l| now().saturating_sub(l.learned_at) < engine::owner::LEARNED_LIMIT_TTL)
                    .map(|l| l.limit);
                let since = now().saturating_sub(cfg.owner.budget_period.as_secs());
                (r.spent_replies, r.spent_bytes) = db.spent_since(&r.name, since)?;
                Ok(r)
            })
            .collect::<Result<_>>()?,
        rejected: db.rejection_count()?,
        outbox: Outbox::status(&db)?,
        transport: super::TransportStatus::read(&db)?,
        signing: cfg.owner.signing,
        public_key: db
            .signing_key()?
            .map(|hex| SigningKey::from_hex(&hex).map(|k| k.public().to_hex()))
            .transpose()
            .context("the stored signing key is corrupt")?,
        budget: Budget {
            replies: cfg.owner.budget_replies,
            bytes: cfg.owner.budget_bytes,
            period: cfg.owner.budget_period.as_secs(),
        },
    })
}

impl Role for Owner {
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
        let now = now();
        let policy = self.policy();
        if raw.len() as u64 <= self.cfg.limits.max_message_bytes
            && let Some(report) = envelope::bounce(raw)
        {
            return match engine::owner::on_report(&self.view(), &report, &policy, now)? {
                ReportOutcome::Refused(r) => Ok(Err(r)),
                ReportOutcome::Act { effects, what, failed } => {
                    self.state.db.transaction(|db| {
                        apply_effects(db, &effects)?;
                        db.mark_seen(digest, "processed")
                    })?;
                    if failed {
                        warn!("{what}");
                    } else {
                        info!("{what}");
                    }
                    Ok(Ok(Handled::Bounced { status: report.summary() }))
                }
            };
        }
        let view = self.view();
        let (accepts, sends) = ([Kind::Request, Kind::Receipt], [Kind::Reply]);
        let verify = verify::Policy { accepts: &accepts, sends: &sends, pinned_owner: None, limits: &self.cfg.limits };
        let msg = match verify::open(raw, &OwnerKeys(&view), &verify, now)? {
            Ok(verify::Opened::Verified(m)) => *m,
            Ok(verify::Opened::NotForThisNode { kind, recipient }) => {
                let what = format!(
                    "not for this node: a {kind} this owner sent to {recipient:?} (carry it to the recipient); nothing to do"
                );
                self.state.db.mark_seen(digest, "processed")?;
                info!("{what}");
                return Ok(Ok(Handled::NotForThisNode(what)));
            }
            Err(r) => return Ok(Err(r)),
        };
        let outcome = engine::owner::on_message(&view, msg, &policy, now)?;
        Ok(Ok(match outcome {
            Outcome::Refused(r) => return Ok(Err(r)),
            Outcome::Deferred(why) => {
                warn!("{why}");
                Handled::Deferred(why)
            }
            Outcome::Answer(plan) => self.answer(*plan, digest, now)?,
            Outcome::Resend(plan) => {
                let ResendPlan { recipient: rec, request: req, reply_id, generation, parts, effects } = *plan;
                let from = &self.cfg.owner.address;
                let nonce = req.nonce.to_hex();
                let n = parts.len();
                let root = self.view().manifest(&req.channel, generation)?.map_or(req.root, |m| m.root());
                self.state.db.transaction(|db| {
                    apply_effects(db, &effects)?;
                    let mut bytes = 0;
                    for (k, raw) in &parts {
                        bytes += raw.len();
                        db.outbox_put_kept(&format!("reply-{nonce}-{k:04}"), from, &rec.address, &reply_id, *k)?;
                    }
                    db.record_answer(&Answered {
                        recipient: &rec.name,
                        channel: &req.channel,
                        nonce: &nonce,
                        seq: req.seq,
                        created: req.created,
                        reply_id: &reply_id,
                        generation,
                        root,
                        base: req.root,
                        ops: 0,
                        reply_bytes: bytes,
                        parts: n as u32,
                        full_content: req.full_content,
                        stated_generation: req.generation,
                    })?;
                    db.mark_seen(digest, "processed")
                })?;
                info!(recipient = %rec.name, reply = %reply_id, parts = n, "sent lost parts again");
                Handled::Answered { recipient: rec.name, generation, ops: 0 }
            }
            Outcome::Receipt { receipt: r, effects } => {
                self.state.db.transaction(|db| {
                    apply_effects(db, &effects)?;
                    db.mark_seen(digest, "processed")
                })?;
                match (&r.reason, &r.detail) {
                    (Some(reason), Some(detail)) => warn!(
                        recipient = %r.recipient, generation = r.generation, reply = %r.reply_id,
                        reason = reason.code(), "the recipient could not apply its reply: {detail}"
                    ),
                    _ => {
                        info!(recipient = %r.recipient, generation = r.generation, status = r.status.code(), "receipt recorded")
                    }
                }
                Handled::Receipt { recipient: r.recipient, generation: r.generation, status: r.status }
            }
        }))
    }
}

impl Owner {
    /// What the configuration allows, as the engine needs it.
    fn policy(&self) -> OwnerPolicy {
        let o = &self.cfg.owner;
        OwnerPolicy {
            limits: self.cfg.limits.clone(),
            budget: Budget { replies: o.budget_replies, bytes: o.budget_bytes, period: o.budget_period.as_secs() },
            relay_limit: self.server_limit.map_or(o.relay_limit, |s| s.min(o.relay_limit)),
            min_relay_limit: crate::config::MIN_RELAY_LIMIT,
        }
    }

    pub(crate) fn view(&self) -> View<'_> {
        View { db: &self.state.db, manifests: &self.manifests, require_approval: self.cfg.owner.require_approval }
    }

    /// Packs the reply an [`AnswerPlan`] calls for, cuts it into parts, and queues them with the record of
    /// the answer and the plan's effects, in one transaction: a crash leaves both or neither, so every
    /// request is answered exactly once. Parts are built one at a time, so memory follows the part size,
    /// not the reply.
    fn answer(&mut self, plan: AnswerPlan, digest: &Digest, now: u64) -> Result<Handled> {
        if let Some(key) = self.joins_broadcast(&plan) {
            return self.answer_ticket(plan, key, digest, now);
        }
        let packer = Packer {
            store: &self.store,
            level: self.cfg.owner.compression_level,
            lines: plan.request.decodes(protocol::Method::Lines),
            bsdiff_max: super::pack::bsdiff_max_input(),
            cache: self.cfg.state_dir.join("deltas"),
            tmp: self.cfg.state_dir.join("tmp"),
            bsdiff_budget: std::cell::Cell::new(super::pack::bsdiff_allowance(
                &self.state.db,
                &plan.recipient.name,
                self.cfg.owner.bsdiff_request_budget,
                self.cfg.owner.bsdiff_daily_budget,
                now,
            )?),
            made: Default::default(),
        };
        let ops = plan.ops.clone();
        let n_ops = ops.len();
        // Only a fresh answer with operations is worth keeping (a reference or "current" packs nothing).
        let key = (plan.inventory.is_some() && plan.same_as.is_none() && n_ops > 0).then(|| PackKey {
            channel: plan.request.channel.clone(),
            base: plan.request.root,
            generation: plan.generation.number,
            full_content: plan.request.full_content,
            lines: packer.lines,
        });
        let kept = key
            .as_ref()
            .and_then(|k| self.packs.borrow().iter().find(|(p, _)| p == k).map(|(_, packed)| packed.clone()));
        let reused = kept.is_some();
        let packed = match kept {
            Some(p) => p,
            None => {
                let p = Rc::new(packer.pack(plan.inventory.as_deref(), ops, plan.request.full_content)?);
                super::pack::charge_bsdiff(&self.state.db, &plan.recipient.name, p.stats.bsdiff_bytes, now)?;
                if let Some(k) = key {
                    let mut packs = self.packs.borrow_mut();
                    if packs.len() >= KEEP_PACKS {
                        packs.remove(0);
                    }
                    packs.push((k, p.clone()));
                }
                p
            }
        };
        let mut rng = SystemEntropy;
        let mut head = engine::owner::reply_head(&plan, &mut rng, now, packed.body_frame);
        // A channel that encrypts: the whole pack is encrypted before it is cut into parts.
        let packed = super::sealing::seal_pack(&self.state.db, &mut head, packed, &plan.key, &mut rng)?;
        let limit = plan.limit;
        let (rec, req) = (&plan.recipient, &plan.request);
        let signer = self.signer.clone();
        let nonce = req.nonce.to_hex();
        let stats = packed.stats;
        let from = self.cfg.owner.address.clone();
        let to = rec.address.clone();
        let (parts, bytes) = self.state.db.transaction(|db| {
            apply_effects(db, &plan.effects)?;
            let mut bytes = 0;
            let keys = (&plan.key, signer.as_ref());
            let parts = split(&head, &packed, limit, keys, (&from, &to), n_ops, &mut rng, |k, token, raw| {
                bytes += raw.len();
                // Kept for resending, and queued as a reference to that one copy.
                db.keep_sent_part(&head.reply_id, k, &rec.name, raw)?;
                db.outbox_put_kept(&format!("reply-{nonce}-{k:04}"), &from, &to, &head.reply_id, k)?;
                if let Some(id) = envelope::hints(raw).message_id {
                    let sent = SentMessage {
                        recipient: rec.name.clone(),
                        reply_id: head.reply_id.clone(),
                        part: k,
                        bytes: raw.len() as u64,
                        token: Some(token.to_owned()),
                    };
                    db.record_sent_id(&id, &sent)?;
                }
                Ok(())
            })?;
            db.record_answer(&Answered {
                recipient: &rec.name,
                channel: &req.channel,
                nonce: &nonce,
                seq: req.seq,
                created: req.created,
                reply_id: &head.reply_id,
                generation: head.generation,
                root: head.root,
                base: req.root,
                ops: n_ops,
                reply_bytes: bytes,
                parts,
                full_content: req.full_content,
                stated_generation: req.generation,
            })?;
            db.mark_seen(digest, "processed")?;
            Ok((parts, bytes))
        })?;
        crate::failpoint::hit("owner-queued");
        if let Some(same) = &plan.same_as {
            info!(
                recipient = %rec.name, generation = head.generation, bytes, earlier = %same.reply_id,
                "answered a repeated request with a reference to the reply already sent for the same tree"
            );
            return Ok(Handled::Answered { recipient: rec.name.clone(), generation: head.generation, ops: 0 });
        }
        info!(
            recipient = %rec.name, generation = head.generation, ops = n_ops, parts, bytes, to = %to,
            local = stats.local, frames = stats.frames, streamed = stats.streamed,
            streams = stats.streams, cached = stats.cached, bsdiff = stats.bsdiff, lines = stats.lines, reused,
            "answered request"
        );
        Ok(Handled::Answered { recipient: rec.name.clone(), generation: head.generation, ops: n_ops })
    }
}

/// Writes an enrollment file (mode 0600), with a comment saying what it is and which command takes it.
fn write_enrollment(e: &Enrollment, out: &Path, command: &str) -> Result<()> {
    let text = format!(
        "# mailferry enrollment for {:?}. It holds this recipient's secret key: keep it private,\n\
         # carry it by a trusted path, and give it to `mailferry {command} --enrollment`.\n{}",
        e.name,
        toml::to_string(e)?
    );
    write_secret(out, &text)
}

/// Applies the engine's effects, in order, inside the caller's transaction.
fn apply_effects(db: &Db, effects: &[Effect]) -> Result<()> {
    for e in effects {
        match e {
            Effect::CompleteRotation { recipient } => {
                let old = db.complete_key_rotation(recipient)?;
                info!(recipient = %recipient, old = %old, "the recipient uses its new key: rotation complete");
            }
            Effect::SetRelayLimit { recipient, limit } => db.set_relay_limit(recipient, Some(limit))?,
            Effect::ClearRelayLimit { recipient } => {
                db.set_relay_limit(recipient, None)?;
                info!(recipient = %recipient, "parts to this recipient are back to the configured size");
            }
            Effect::SetBounce { recipient, summary } => db.set_bounce(recipient, summary)?,
            Effect::CountResend { reply_id } => db.count_resend(reply_id)?,
            Effect::RecordReceipt(r) => db.record_receipt(r)?,
            Effect::RecordRegistration { recipient, facts, created } => {
                db.record_registration(recipient, facts, *created)?;
            }
            Effect::DropSentParts { reply_id } => {
                db.drop_sent_parts(Some(reply_id), KEEP_SENT_PARTS)?;
            }
        }
    }
    Ok(())
}

/// The owner's state as the engine reads it. Generation manifests are decoded once and cached.
pub(crate) struct View<'a> {
    db: &'a Db,
    manifests: &'a RefCell<HashMap<(String, u64), Arc<Manifest>>>,
    /// `require-approval`: the newest generation offered is the newest approved one.
    require_approval: bool,
}

impl OwnerView for View<'_> {
    fn recipient(&self, name: &str) -> Result<Option<Registered>> {
        self.db
            .recipient(name)?
            .map(|r| {
                Ok(Registered {
                    key: Key::from_hex(&r.key_hex).context("stored key is corrupt")?,
                    name: r.name,
                    address: r.address,
                })
            })
            .transpose()
    }

    fn rotation(&self, name: &str) -> Result<Option<Rotation>> {
        self.db
            .key_rotation(name)?
            .map(|p| Ok(Rotation { key: Key::from_hex(&p.key_hex).context("stored key is corrupt")?, grace: p.grace }))
            .transpose()
    }

    fn retired_key(&self, name: &str, key_id: &KeyId, _now: u64) -> Result<Option<Key>> {
        self.db.retired_key(name, key_id)?.map(|hex| Key::from_hex(&hex).context("stored key is corrupt")).transpose()
    }

    fn request_answered(&self, nonce: &Nonce) -> Result<bool> {
        self.db.request_answered(&nonce.to_hex())
    }

    fn latest_generation(&self, channel: &str) -> Result<Option<Generation>> {
        let latest = if self.require_approval {
            self.db.latest_approved_generation(channel)?
        } else {
            self.db.latest_generation(channel)?
        };
        Ok(latest.map(|g| Generation { number: g.number, root: g.root }))
    }

    fn generation(&self, channel: &str, number: u64) -> Result<Option<Generation>> {
        Ok(self.db.generation(channel, number)?.map(|g| Generation { number: g.number, root: g.root }))
    }

    fn manifest(&self, channel: &str, generation: u64) -> Result<Option<Arc<Manifest>>> {
        let at = (channel.to_owned(), generation);
        if let Some(m) = self.manifests.borrow().get(&at) {
            return Ok(Some(m.clone()));
        }
        // A kept generation, or an old one (beyond `keep-generations`, within `keep-history`).
        let m = if self.db.has_generation(channel, generation)? {
            self.db.generation_manifest(channel, generation)?
        } else {
            match self.db.old_generation_manifest(channel, generation)? {
                Some(m) => m,
                None => return Ok(None),
            }
        };
        let m = Arc::new(m);
        self.manifests.borrow_mut().insert(at, m.clone());
        Ok(Some(m))
    }

    fn access(&self, recipient: &str, channel: &str) -> Result<Access> {
        self.db.access(recipient, channel)
    }

    fn last_seq(&self, recipient: &str, channel: &str) -> Result<u64> {
        self.db.last_seq(recipient, channel)
    }

    fn answered_for(&self, recipient: &str, nonce: &Nonce) -> Result<Option<SentReply>> {
        self.db.answered_for(recipient, &nonce.to_hex())
    }

    fn receipt_recorded(&self, recipient: &str, reply_id: &ReplyId) -> Result<bool> {
        self.db.receipt_recorded(recipient, reply_id)
    }

    fn reply_generation(&self, recipient: &str, reply_id: &ReplyId) -> Result<Option<u64>> {
        self.db.reply_generation(recipient, reply_id)
    }

    fn outcome_recorded(&self, recipient: &str, reply_id: &ReplyId, status: protocol::ReceiptStatus) -> Result<bool> {
        self.db.outcome_recorded(recipient, reply_id, status.code())
    }

    fn sent_part(&self, recipient: &str, reply_id: &ReplyId, part: u32) -> Result<Option<Vec<u8>>> {
        self.db.sent_part(recipient, reply_id, part)
    }

    fn resent(&self, reply_id: &ReplyId) -> Result<u64> {
        self.db.resent(reply_id)
    }

    fn spent_since(&self, recipient: &str, since: u64) -> Result<Spent> {
        let (replies, bytes) = self.db.spent_since(recipient, since)?;
        Ok(Spent { replies, bytes })
    }

    fn sent_message(&self, message_id: &str) -> Result<Option<SentMessage>> {
        self.db.sent_id(message_id)
    }

    fn sent_part_count(&self, reply_id: &ReplyId) -> Result<u64> {
        self.db.sent_part_count(reply_id)
    }

    fn relay_limit(&self, recipient: &str) -> Result<Option<LearnedLimit>> {
        self.db.relay_limit(recipient)
    }

    fn last_request_created(&self, recipient: &str, channel: &str) -> Result<Option<u64>> {
        self.db.last_request_created(recipient, channel)
    }

    fn repeat_of(
        &self,
        recipient: &str,
        channel: &str,
        base: &Digest,
        generation: u64,
        full_content: bool,
    ) -> Result<Option<protocol::SameAs>> {
        self.db
            .repeat_of(recipient, channel, base, generation, full_content)?
            .map(|(reply_id, nonce, parts)| {
                let nonce = Nonce::from_hex(&nonce).map_err(anyhow::Error::msg)?;
                Ok(protocol::SameAs { reply_id, nonce, parts })
            })
            .transpose()
    }
}

/// Cuts the pack into chunks that fit `limit` once encoded, and hands each finished part message to
/// `emit` in order. Returns the number of parts.
///
/// # Errors
/// Reading the pack, or `emit`'s errors.
#[allow(clippy::too_many_arguments)]
fn split(
    head: &Reply,
    packed: &Packed,
    limit: u64,
    (key, signer): (&Key, Option<&SigningKey>),
    (from, to): (&str, &str),
    ops: usize,
    rng: &mut dyn Entropy,
    mut emit: impl FnMut(u32, &str, &[u8]) -> Result<()>,
) -> Result<u32> {
    // The control part grows with the number of parts (each lists every chunk): the chunks leave room for it.
    let mut chunks = super::pack::Chunks::cut(packed, limit, |parts, chunk| {
        let probe = Reply { part: parts, parts, payloads: super::pack::probe_payloads(parts, chunk), ..head.clone() };
        protocol::encode(&probe).len()
    })?;
    let (parts, payloads) = (chunks.parts(), chunks.payloads.clone());
    let changed = if ops == 0 { "no changes: you are current".to_owned() } else { format!("{ops} changes") };
    for k in 1..=parts {
        let bytes = chunks.read(k)?;
        let reply = Reply { part: k, parts, payloads: payloads.clone(), ..head.clone() };
        let control = protocol::encode(&reply);
        let auth = protocol::encode(&Auth::sign(&head.recipient, key, &control).signed_by(signer, &control));
        let of = if parts > 1 { format!(", part {k} of {parts}") } else { String::new() };
        // Each part gets its own delivery token, which a genuine bounce quotes back, and a Message-ID of
        // our own making (random, so nothing about the reply can be guessed from it).
        let token = rng.hex_id(16);
        let message_id = format!("{}@{}", rng.hex_id(16), from.rsplit_once('@').map_or("mailferry", |(_, d)| d));
        let boundary = format!("mf_{}", rng.hex_id(16));
        let env = envelope::Envelope {
            message_id: Some(&message_id),
            date: Some(head.created),
            token: Some(&token),
            boundary: Some(&boundary),
        };
        let raw = envelope::build_with(
            &Outgoing {
                from,
                to,
                subject: format!("mailferry: generation {} for {} ({changed}{of})", head.generation, head.recipient),
                text: format!(
                    "This is an automatic message from mailferry.\n\n\
                 It brings recipient {:?} to generation {} ({changed}{of}).\n\
                 mailferry verifies and applies it; there is nothing to do by hand.\n",
                    head.recipient, head.generation
                ),
                kind: Kind::Reply,
                control: &control,
                auth: &auth,
                payloads: vec![(&payloads[k as usize - 1].id, &bytes)],
            },
            &env,
        )?;
        anyhow::ensure!(
            raw.len() as u64 <= limit,
            "reply part {k} is {} bytes, over the {limit}-byte limit it was cut for (a bug)",
            raw.len()
        );
        emit(k, &token, &raw)?;
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db_with_site() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("state.db")).unwrap();
        let key = Key::generate();
        db.add_recipient("site1", "site1@example.org", &key.to_hex(), &key.id()).unwrap();
        (dir, db)
    }

    /// A step's effects are applied in one transaction: when one fails, none of them is.
    #[test]
    fn a_steps_effects_are_all_or_nothing() {
        let (_dir, db) = db_with_site();
        let limit = LearnedLimit { limit: 70_000, learned_at: 1, refused: Some(100_000), reply_id: None };
        let failing = [
            Effect::SetBounce { recipient: "site1".into(), summary: "1 5.1.1 unknown".into() },
            Effect::SetRelayLimit { recipient: "site1".into(), limit: limit.clone() },
            // No rotation is under way: this one fails, after the others ran.
            Effect::CompleteRotation { recipient: "site1".into() },
        ];
        let err = db.transaction(|db| apply_effects(db, &failing)).unwrap_err();
        assert!(format!("{err:#}").contains("no key rotation"), "{err:#}");
        assert_eq!(db.bounce("site1").unwrap(), None, "the first effect was rolled back");
        assert_eq!(db.relay_limit("site1").unwrap(), None, "and the second");
        db.transaction(|db| apply_effects(db, &failing[..2])).unwrap();
        assert_eq!(db.bounce("site1").unwrap().as_deref(), Some("1 5.1.1 unknown"));
        assert_eq!(db.relay_limit("site1").unwrap(), Some(limit));
    }
}
