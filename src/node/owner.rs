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

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use tracing::{info, warn};

use super::pack::{Packed, Packer};
use super::{Handled, Node, Outbox, RunReport, lock_state, process_inbox};
use crate::config::{Enrollment, OwnerConfig, OwnerSection, Signing, TransportConfig, TransportHint, write_secret};
use crate::crypto::{Key, SigningKey, random_id};
use crate::db::{Db, GenerationRow, RecipientRow, now};
use crate::manifest::{Digest, Manifest, diff};
use crate::protocol::envelope::{self, Outgoing};
use crate::protocol::{
    self, Auth, Control, InventoryKind, Kind, Payload, Reason, Refusal, Rekey, Reply, Request, VERSION,
};
use crate::scan::{Exclude, ForeignKind, scan_excluding};
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
    db: Db,
    store: Store,
    manifests: HashMap<u64, Manifest>,
    /// The outgoing server's `SIZE`, learned at the start of a run.
    server_limit: Option<u64>,
    /// The Ed25519 key replies are signed with (`signing = "hmac+ed25519"`).
    signer: Option<SigningKey>,
    _lock: std::fs::File,
}

/// Meta key of the owner's Ed25519 signing key (hex seed; the database is private to the owner).
const SIGNING_KEY_META: &str = "signing_key";

/// Default grace period of a rotated key: a week.
pub const DEFAULT_KEY_GRACE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The owner's Ed25519 signing key, made on first use.
fn signing_key(db: &Db) -> Result<SigningKey> {
    db.transaction(|db| match db.meta(SIGNING_KEY_META)? {
        Some(hex) => SigningKey::from_hex(&hex).context("the stored signing key is corrupt"),
        None => {
            let k = SigningKey::generate();
            db.set_meta(SIGNING_KEY_META, &k.to_hex())?;
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
}

/// Creates an owner: `DIR/owner.toml`, the state database and content store.
///
/// # Errors
/// An existing config, an unusable address or source, or I/O errors.
pub fn init(dir: &Path, source: &Path, address: &str, transport_root: &Path) -> Result<PathBuf> {
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
        state_dir: None,
        interval: std::time::Duration::from_secs(60),
        compression_level: 9,
        admin_address: None,
        relay_limit: crate::config::DEFAULT_RELAY_LIMIT,
        keep_generations: 16,
        signing: Signing::Hmac,
        bsdiff_request_budget: crate::config::DEFAULT_BSDIFF_REQUEST_BUDGET,
        bsdiff_daily_budget: crate::config::DEFAULT_BSDIFF_DAILY_BUDGET,
    };
    let transport = TransportConfig::Maildir { root: std::path::absolute(transport_root)? };
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
    Db::open(&dir.join("state.db"))?;
    Store::open(&dir.join("store"), 9)?;
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
        let lock = lock_state(&cfg.state_dir)?;
        let db = Db::open(&cfg.state_dir.join("state.db"))?;
        let store = Store::open(&cfg.state_dir.join("store"), cfg.owner.compression_level)?;
        let signer = match cfg.owner.signing {
            Signing::Hmac => None,
            Signing::HmacEd25519 => Some(signing_key(&db)?),
        };
        Ok(Owner { cfg, db, store, manifests: HashMap::new(), server_limit: None, signer, _lock: lock })
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
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            bail!("recipient name {name:?} must be 1-64 characters of letters, digits, `-`, `_` and `.`");
        }
        check_address(address).map_err(anyhow::Error::msg)?;
        if out.exists() {
            bail!("`{}` already exists", out.display());
        }
        let key = Key::generate();
        let enrollment = Enrollment {
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
                interval: "1h".into(),
            },
        };
        self.db.add_recipient(name, address, &key.to_hex(), &key.id())?;
        let text = format!(
            "# mailferry enrollment for {name:?}. It holds this recipient's secret key: keep it private,\n\
             # carry it by a trusted path, and give it to `mailferry recipient init --enrollment`.\n{}",
            toml::to_string(&enrollment)?
        );
        write_secret(out, &text)?;
        Ok(enrollment)
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
        let source = self.cfg.owner.source.clone();
        crate::config::check_state_outside_source(&self.cfg.state_dir, &source)?;
        let state = Exclude::directory(&self.cfg.state_dir)
            .with_context(|| format!("failed to list the state directory `{}`", self.cfg.state_dir.display()))?;
        let batch = self.store.batch();
        let scan = scan_excluding(&source, &|p| batch.put_file(p), &state)
            .with_context(|| format!("cannot publish `{}`", source.display()))?;
        if let Some(f) = scan.foreign.first() {
            let what = match &f.kind {
                ForeignKind::Symlink { target } => {
                    // Say so when it leads to the owner's state: that is the mistake to fix, not the link.
                    let into_state =
                        crate::config::check_state_outside_source(&self.cfg.state_dir, &source.join(f.path.as_str()))
                            .is_err();
                    let why = if into_state { ", to the owner's state directory or one that holds it" } else { "" };
                    format!("a symlink leading outside the tree{why} (-> `{}`)", target.display())
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
        // Recipients may run on case-insensitive file systems: a generation must be portable.
        manifest.validate().with_context(|| format!("cannot publish `{}`", source.display()))?;
        let root = manifest.root();
        let (files, bytes) = manifest.file_stats();
        if let Some(latest) = self.db.latest_generation()?
            && latest.root == root
        {
            return Ok(Published { generation: latest.number, root, files: files as u64, bytes, new: false });
        }
        // The new objects are durable and in place before the generation that refers to them exists.
        batch.commit().context("failed to store the new generation's content")?;
        let generation = self.db.add_generation(&manifest)?;
        info!(generation, root = %root.short(), files, bytes, "published");
        self.prune()?;
        Ok(Published { generation, root, files: files as u64, bytes, new: true })
    }

    /// Keeps the newest `keep-generations` generations and the content they refer to. Replies already
    /// made are unaffected: their parts are kept whole, apart from the store.
    fn prune(&mut self) -> Result<()> {
        let gone = self.db.prune_generations(self.cfg.owner.keep_generations)?;
        if gone.is_empty() {
            return Ok(());
        }
        for g in &gone {
            self.manifests.remove(g);
        }
        let keep = self.db.kept_contents()?;
        let (objects, bytes) = self.store.retain(&keep)?;
        let cached = super::pack::prune_cache(&self.cfg.state_dir.join("deltas"), KEEP_DELTAS)?;
        info!(generations = ?gone, objects, bytes, cached, "pruned generations beyond keep-generations");
        Ok(())
    }

    fn manifest(&mut self, generation: u64) -> Result<&Manifest> {
        if !self.manifests.contains_key(&generation) {
            let m = self.db.generation_manifest(generation)?;
            self.manifests.insert(generation, m);
        }
        Ok(&self.manifests[&generation])
    }

    /// Answers every waiting request and records every receipt, then sends what is queued.
    ///
    /// # Errors
    /// Transport or state failures that stop the run; refusals of single messages are not errors.
    pub async fn run_once<T: Transport>(&mut self, transport: &mut T) -> Result<RunReport> {
        let mut report = RunReport::default();
        self.db.drop_sent_parts(None, KEEP_SENT_PARTS)?;
        let flushed = Outbox::flush(&self.db, transport).await?;
        self.learn_from(&flushed)?;
        report.sent += flushed.sent;
        self.server_limit = transport.size_limit().await;
        process_inbox(self, transport, &mut report).await?;
        let flushed = Outbox::flush(&self.db, transport).await?;
        self.learn_from(&flushed)?;
        report.sent += flushed.sent;
        Ok(report)
    }

    /// A reply part refused as too large teaches the limit for its recipient: later replies to it are cut
    /// into parts a quarter smaller than the refused one, and the refused reply's kept parts are dropped
    /// so that the recipient's request for them is answered afresh, in the smaller parts. Each refusal
    /// shrinks the limit, down to the smallest usable one, so this cannot loop.
    fn learn_from(&mut self, flushed: &super::FlushReport) -> Result<()> {
        for t in &flushed.too_large {
            let Some(rec) = self.db.recipients()?.into_iter().find(|r| r.address == t.to) else { continue };
            let reply_id = self.db.reply_of_outbox_name(&t.name)?;
            let limit = self.db.transaction(|db| {
                let limit = shrink_relay_limit(db, &rec.name, t.bytes)?;
                if let Some(id) = &reply_id {
                    db.drop_sent_parts(Some(id), KEEP_SENT_PARTS)?;
                }
                Ok(limit)
            })?;
            warn!(
                recipient = %rec.name, refused = t.bytes, limit,
                "a relay refused a reply part as too large; later replies to this recipient use smaller parts"
            );
        }
        Ok(())
    }

    /// Acts on a delivery report about a reply part: one refused as too large shrinks the parts for its
    /// recipient and drops the reply's kept parts (so the request for the missing one is answered afresh,
    /// in smaller parts); another failure is logged and shown by `status`. Reports are not authenticated,
    /// so this is all they can do, and only for a message id this owner sent.
    fn bounced(&mut self, report: &envelope::Bounce, digest: &Digest) -> Result<Result<Handled, Refusal>> {
        let what = report.summary();
        let sent = match &report.message_id {
            Some(id) => self.db.sent_id(id)?,
            None => None,
        };
        let Some((recipient, reply_id, part, bytes)) = sent else {
            return Ok(Err(Refusal::new(
                Reason::Unexpected,
                format!("a delivery report ({what}) about a message this owner did not send, or no longer remembers"),
            )));
        };
        if report.too_large() {
            let limit = self.db.transaction(|db| {
                let limit = shrink_relay_limit(db, &recipient, bytes)?;
                db.drop_sent_parts(Some(&reply_id), KEEP_SENT_PARTS)?;
                db.mark_seen(digest, "processed")?;
                Ok(limit)
            })?;
            warn!(
                recipient, reply = %reply_id, part, refused = bytes, limit,
                "a relay returned a reply part as too large ({what}); later replies to this recipient use smaller parts"
            );
        } else if report.failed() {
            self.db.transaction(|db| {
                db.set_meta(&bounce_key(&recipient), &format!("{} {what}", now()))?;
                db.mark_seen(digest, "processed")
            })?;
            warn!(recipient, reply = %reply_id, part, "a reply part could not be delivered: {what}");
        } else {
            self.db.mark_seen(digest, "processed")?;
            info!(recipient, reply = %reply_id, part, "delivery report about a reply part: {what}");
        }
        Ok(Ok(Handled::Bounced { status: what }))
    }

    /// The pure-ish decision: verifies the message and builds the reply. Outer `Err` is a local failure,
    /// inner `Err` a refusal of the message.
    fn evaluate(&mut self, raw: &[u8]) -> Result<Result<Action, Refusal>> {
        let limits = self.cfg.limits.clone();
        let parsed = match envelope::parse(raw, limits.max_message_bytes) {
            Ok(p) => p,
            Err(r) => return Ok(Err(r)),
        };
        let auth = match protocol::decode_auth(&parsed.auth) {
            Ok(a) => a,
            Err(r) => return Ok(Err(r)),
        };
        let Some(rec) = self.db.recipient(&auth.recipient)? else {
            return Ok(Err(Refusal::new(
                Reason::UnknownRecipient,
                format!("no recipient named {:?} is registered", auth.recipient),
            )));
        };
        // The recipient's key, the one a rotation is delivering, or a retired one still in its grace.
        let current = Key::from_hex(&rec.key_hex).context("stored key is corrupt")?;
        let pending = self.db.key_rotation(&rec.name)?.filter(|p| p.key_id == auth.key_id);
        let key = if auth.key_id == current.id() {
            current
        } else if let Some(p) = &pending {
            Key::from_hex(&p.key_hex).context("stored key is corrupt")?
        } else if let Some(hex) = self.db.retired_key(&rec.name, &auth.key_id)? {
            Key::from_hex(&hex).context("stored key is corrupt")?
        } else {
            return Ok(Err(Refusal::new(
                Reason::BadMac,
                format!("message names key {}, {:?}'s key is {}", auth.key_id, rec.name, current.id()),
            )));
        };
        if let Err(r) = protocol::verify_mac(&key, &auth, &parsed.control) {
            return Ok(Err(r));
        }
        // Only the recipient can have made this MAC: it has the new key, which is its key from now on.
        let rec = if pending.is_some() {
            let old = self.db.complete_key_rotation(&rec.name)?;
            info!(recipient = %rec.name, key = %key.id(), old, "the recipient uses its new key: rotation complete");
            self.db.recipient(&rec.name)?.context("recipient vanished during key rotation")?
        } else {
            rec
        };
        let control = match protocol::decode_control(&parsed.control, &limits) {
            Ok(c) => c,
            Err(r) => return Ok(Err(r)),
        };
        if control.recipient() != rec.name {
            return Ok(Err(Refusal::new(
                Reason::WrongRecipient,
                format!("control part names {:?} but is signed by {:?}'s key", control.recipient(), rec.name),
            )));
        }
        match control {
            Control::Request(req) => {
                // A request's only possible attachment is its inventory.
                let inventory = match protocol::open_inventory(&req, &parsed.attachments, &limits) {
                    Ok(i) => i,
                    Err(r) => return Ok(Err(r)),
                };
                self.answer(&rec, &Request { inventory, inventory_payload: None, ..req })
            }
            // Receipts carry no payloads: any attachment besides control and auth is refused.
            Control::Receipt(_) if !parsed.attachments.is_empty() => {
                let name = parsed.attachments.keys().next().map_or("", String::as_str);
                Ok(Err(Refusal::new(Reason::BadPayload, format!("unexpected attachment {name:?}"))))
            }
            Control::Receipt(r) => {
                let Some((reply_id, generation)) = self.db.answered_for(&rec.name, &r.nonce.to_hex())? else {
                    return Ok(Err(Refusal::new(
                        Reason::Replay,
                        format!("receipt for nonce {} that was never answered", r.nonce),
                    )));
                };
                if r.reply_id != reply_id || r.generation != generation {
                    return Ok(Err(Refusal::new(
                        Reason::Malformed,
                        format!(
                            "receipt names reply {} and generation {}, but the reply sent was {reply_id} with generation {generation}",
                            r.reply_id, r.generation
                        ),
                    )));
                }
                if self.db.receipt_recorded(&rec.name, &r.reply_id)? {
                    return Ok(Err(Refusal::new(
                        Reason::Replay,
                        format!("a receipt for reply {reply_id} was recorded before"),
                    )));
                }
                Ok(Ok(Action::Receipt(r)))
            }
            Control::Reply(_) => Ok(Err(Refusal::new(Reason::Unexpected, "an owner does not accept replies"))),
        }
    }

    fn answer(&mut self, rec: &RecipientRow, req: &Request) -> Result<Result<Action, Refusal>> {
        if self.db.request_answered(&req.nonce.to_hex())? {
            return Ok(Err(Refusal::new(Reason::Replay, format!("request nonce {} was answered before", req.nonce))));
        }
        if req.seq <= rec.last_seq {
            return Ok(Err(Refusal::new(
                Reason::Replay,
                format!("request seq {} is not newer than {} (replayed or reordered)", req.seq, rec.last_seq),
            )));
        }
        let Some(generation) = self.db.latest_generation()? else {
            return Ok(Ok(Action::Defer(format!(
                "request from {:?} left waiting: nothing is published yet (run `mailferry owner publish`)",
                rec.name
            ))));
        };
        // The recipient's tree: listed whole, or rebuilt from the generation it names plus its changes.
        let inventory = match req.inventory_kind {
            InventoryKind::Full => match Manifest::from_listing(req.inventory.clone()) {
                Ok(m) => Some(m),
                Err(e) => {
                    return Ok(Err(Refusal::new(Reason::BadPath, format!("inventory is not a valid tree: {e}"))));
                }
            },
            InventoryKind::Changes
                if req.generation == 0
                    || req.generation > generation.number
                    || !self.db.has_generation(req.generation)? =>
            {
                None
            }
            InventoryKind::Changes => {
                let mut m = self.manifest(req.generation)?.clone();
                for p in &req.removed {
                    if m.remove(p).is_none() {
                        return Ok(Err(Refusal::new(
                            Reason::Malformed,
                            format!("request removes `{p}`, which generation {} does not have", req.generation),
                        )));
                    }
                }
                for l in &req.inventory {
                    m.insert(l.path.clone(), l.entry.clone());
                }
                if let Err(e) = m.validate_shape() {
                    return Ok(Err(Refusal::new(Reason::BadPath, format!("inventory is not a valid tree: {e}"))));
                }
                Some(m)
            }
        };
        if let Some(inv) = &inventory
            && inv.root() != req.root
        {
            return Ok(Err(Refusal::new(Reason::Malformed, "request root does not match its inventory")));
        }
        // The parts of an earlier reply that never arrived, if they are still kept.
        if let Some(resend) = &req.resend {
            let kept: Option<Vec<(u32, Vec<u8>)>> = resend
                .parts
                .iter()
                .map(|&k| Ok(self.db.sent_part(&rec.name, &resend.reply_id, k)?.map(|raw| (k, raw))))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .collect();
            // Parts asked for twice were lost twice: a relay on the way likely refuses them as too big
            // (and its bounce went where mailferry does not look). Answer afresh in smaller parts.
            let asked = self.db.meta_u64(&format!("resent.{}", resend.reply_id))?;
            if asked >= 1
                && let Some(parts) = &kept
                && let Some(largest) = parts.iter().map(|(_, raw)| raw.len() as u64).max()
            {
                let limit = shrink_relay_limit(&self.db, &rec.name, largest)?;
                warn!(
                    recipient = %rec.name, reply = %resend.reply_id, limit,
                    "parts were lost twice; answering afresh with smaller parts"
                );
            }
            match (kept, self.db.reply_generation(&rec.name, &resend.reply_id)?) {
                (Some(parts), Some(generation)) if !parts.is_empty() && asked == 0 => {
                    self.db.set_meta(&format!("resent.{}", resend.reply_id), "1")?;
                    return Ok(Ok(Action::Resend {
                        recipient: rec.name.clone(),
                        nonce: req.nonce.to_hex(),
                        seq: req.seq,
                        generation,
                        reply_id: resend.reply_id.clone(),
                        parts,
                        to: rec.address.clone(),
                    }));
                }
                _ => info!(
                    recipient = %rec.name,
                    reply = %resend.reply_id,
                    "parts asked for again are no longer kept; answering afresh"
                ),
            }
        }
        let target = self.manifest(generation.number)?.clone();
        // Without a tree to diff against (a generation this owner does not know), ask for the full one.
        let need_full_inventory = inventory.is_none();
        let ops = inventory.as_ref().map_or_else(Vec::new, |inv| diff(inv, &target));
        let n_ops = ops.len();
        let packer = Packer {
            store: &self.store,
            level: self.cfg.owner.compression_level,
            cache: self.cfg.state_dir.join("deltas"),
            tmp: self.cfg.state_dir.join("tmp"),
            bsdiff_budget: std::cell::Cell::new(super::pack::bsdiff_allowance(
                &self.db,
                &rec.name,
                self.cfg.owner.bsdiff_request_budget,
                self.cfg.owner.bsdiff_daily_budget,
                now(),
            )?),
        };
        let packed = packer.pack(inventory.as_ref(), ops, req.full_content)?;
        super::pack::charge_bsdiff(&self.db, &rec.name, packed.stats.bsdiff_bytes, now())?;
        let head = Reply {
            mailferry: VERSION,
            kind: Kind::Reply,
            recipient: rec.name.clone(),
            nonce: req.nonce,
            request_seq: req.seq,
            reply_id: random_id(16),
            part: 1,
            parts: 1,
            created: now(),
            generation: generation.number,
            root: generation.root,
            base: req.root,
            need_full_inventory,
            payloads: Vec::new(),
            body: packed.body_frame,
            rekey: None,
        };
        // Replies are made under the recipient's key as the owner knows it now (the request may have come
        // under a retired one), and carry the next key while a rotation is under way.
        let key = Key::from_hex(&rec.key_hex).context("stored key is corrupt")?;
        let head = match self.db.key_rotation(&rec.name)? {
            Some(p) => {
                let new = Key::from_hex(&p.key_hex).context("stored key is corrupt")?;
                Reply {
                    rekey: Some(Rekey { key_id: p.key_id, sealed: key.seal_key(&rec.name, &new), grace: p.grace }),
                    ..head
                }
            }
            None => head,
        };
        let limit = self.relay_limit(&rec.name)?;
        Ok(Ok(Action::Answer(Box::new(Answer {
            head,
            packed,
            ops: n_ops,
            seq: req.seq,
            key,
            to: rec.address.clone(),
            limit,
        }))))
    }

    /// The message size replies to `recipient` must fit: `relay-limit`, the server's `SIZE`, or what a
    /// relay refusal taught, whichever is smallest.
    fn relay_limit(&self, recipient: &str) -> Result<u64> {
        let learned = self.db.meta(&relay_limit_key(recipient))?.and_then(|v| v.parse::<u64>().ok());
        Ok([Some(self.cfg.owner.relay_limit), self.server_limit, learned]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.cfg.owner.relay_limit)
            .max(crate::config::MIN_RELAY_LIMIT))
    }

    /// Unregisters a recipient: its key stops verifying at once.
    ///
    /// # Errors
    /// No such recipient, or state failures.
    pub fn remove_recipient(&mut self, name: &str) -> Result<()> {
        self.db.remove_recipient(name)
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
    pub fn rotate_key(&mut self, name: &str, grace: std::time::Duration) -> Result<String> {
        if grace.as_secs() > protocol::MAX_REKEY_GRACE {
            bail!("a grace period of {} is longer than a year", humantime::format_duration(grace));
        }
        let key = Key::generate();
        self.db.start_key_rotation(name, &key.to_hex(), &key.id(), grace.as_secs())?;
        info!(recipient = name, key = %key.id(), "key rotation started");
        Ok(key.id())
    }
}

/// The owner's status, read without taking the state lock (so it works while the daemon runs).
///
/// # Errors
/// State failures.
pub fn status(cfg: &OwnerConfig) -> Result<OwnerStatus> {
    let db = Db::open(&cfg.state_dir.join("state.db"))?;
    Ok(OwnerStatus {
        role: "owner",
        address: cfg.owner.address.clone(),
        generation: db.latest_generation()?,
        recipients: db
            .recipients()?
            .into_iter()
            .map(|mut r| {
                r.last_bounce = db.meta(&bounce_key(&r.name))?;
                r.relay_limit = db.meta(&relay_limit_key(&r.name))?.and_then(|v| v.parse().ok());
                Ok(r)
            })
            .collect::<Result<_>>()?,
        rejected: db.rejection_count()?,
        outbox: Outbox::status(&db)?,
        transport: super::TransportStatus::read(&db)?,
        signing: cfg.owner.signing,
        public_key: db
            .meta(SIGNING_KEY_META)?
            .map(|hex| SigningKey::from_hex(&hex).map(|k| k.public().to_hex()))
            .transpose()
            .context("the stored signing key is corrupt")?,
    })
}

impl Node for Owner {
    fn db(&self) -> &Db {
        &self.db
    }

    fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }

    fn act(&mut self, raw: &[u8], digest: &Digest) -> Result<Result<Handled, Refusal>> {
        if raw.len() as u64 <= self.cfg.limits.max_message_bytes
            && let Some(report) = envelope::bounce(raw)
        {
            return self.bounced(&report, digest);
        }
        let action = match self.evaluate(raw)? {
            Ok(a) => a,
            Err(refusal) => return Ok(Err(refusal)),
        };
        Ok(Ok(match action {
            Action::Answer(answer) => {
                let Answer { head, packed, ops, seq, key, to, limit } = *answer;
                let signer = self.signer.clone();
                let (recipient, nonce, generation) = (head.recipient.clone(), head.nonce.to_hex(), head.generation);
                let reply_id = head.reply_id.clone();
                let stats = packed.stats;
                // The reply is queued in the same transaction that records the request as answered: a
                // crash leaves both or neither, so every request is answered exactly once. Parts are built
                // one at a time, so memory follows the part size, not the reply.
                let from = self.cfg.owner.address.clone();
                let (parts, bytes) = self.db.transaction(|db| {
                    let mut bytes = 0;
                    let keys = (&key, signer.as_ref());
                    let parts = split(&head, &packed, limit, keys, &from, &to, ops, |k, raw| {
                        bytes += raw.len();
                        db.outbox_put(&format!("reply-{nonce}-{k:04}"), &from, &to, raw)?;
                        if let Some(id) = envelope::hints(raw).message_id {
                            db.record_sent_id(&id, &head.recipient, &head.reply_id, k, raw.len())?;
                        }
                        db.keep_sent_part(&head.reply_id, k, &head.recipient, raw)
                    })?;
                    db.record_answer(&recipient, &nonce, seq, &reply_id, generation, ops, bytes)?;
                    db.mark_seen(digest, "processed")?;
                    Ok((parts, bytes))
                })?;
                crate::failpoint::hit("owner-queued");
                info!(
                    recipient = %recipient, generation, ops, parts, bytes, to = %to,
                    local = stats.local, frames = stats.frames, streamed = stats.streamed,
                    streams = stats.streams, cached = stats.cached, bsdiff = stats.bsdiff,
                    "answered request"
                );
                Handled::Answered { recipient, generation, ops }
            }
            Action::Resend { recipient, nonce, seq, generation, reply_id, parts, to } => {
                let from = &self.cfg.owner.address;
                let n = parts.len();
                self.db.transaction(|db| {
                    let mut bytes = 0;
                    for (k, raw) in &parts {
                        bytes += raw.len();
                        db.outbox_put(&format!("reply-{nonce}-{k:04}"), from, &to, raw)?;
                    }
                    db.record_answer(&recipient, &nonce, seq, &reply_id, generation, 0, bytes)?;
                    db.mark_seen(digest, "processed")
                })?;
                info!(recipient = %recipient, reply = %reply_id, parts = n, "sent lost parts again");
                Handled::Answered { recipient, generation, ops: 0 }
            }
            Action::Receipt(r) => {
                self.db.transaction(|db| {
                    db.record_receipt(&r)?;
                    // Its parts arrived: no need to keep them for sending again.
                    db.drop_sent_parts(Some(&r.reply_id), KEEP_SENT_PARTS)?;
                    db.mark_seen(digest, "processed")
                })?;
                info!(recipient = %r.recipient, generation = r.generation, "receipt recorded");
                Handled::Receipt { recipient: r.recipient, generation: r.generation }
            }
            Action::Defer(why) => {
                warn!("{why}");
                Handled::Deferred(why)
            }
        }))
    }
}

fn bounce_key(recipient: &str) -> String {
    format!("bounce.{recipient}")
}

fn relay_limit_key(recipient: &str) -> String {
    format!("relay_limit.{recipient}")
}

/// Learns that a message of `refused` bytes did not reach `recipient`: its parts are cut to three quarters
/// of that from now on (never below the smallest usable limit). Returns the new limit.
fn shrink_relay_limit(db: &Db, recipient: &str, refused: u64) -> Result<u64> {
    let limit = (refused / 4 * 3).max(crate::config::MIN_RELAY_LIMIT);
    db.set_meta(&relay_limit_key(recipient), &limit.to_string())?;
    Ok(limit)
}

/// A reply ready to be cut into parts.
struct Answer {
    head: Reply,
    packed: Packed,
    ops: usize,
    seq: u64,
    key: Key,
    to: String,
    limit: u64,
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
    from: &str,
    to: &str,
    ops: usize,
    mut emit: impl FnMut(u32, &[u8]) -> Result<()>,
) -> Result<u32> {
    use std::io::{Read, Seek, SeekFrom};
    let chunk_id = |k: u32| format!("pack-{k:04}.bin");
    // The control part grows with the number of parts (each lists every chunk): find a chunk size that
    // leaves room for it.
    let mut chunk = envelope::chunk_size(limit, 0);
    let mut parts;
    loop {
        parts = u32::try_from(packed.size.div_ceil(chunk).max(1)).context("reply needs too many parts")?;
        let probe = Reply {
            part: parts,
            parts,
            payloads: (1..=parts).map(|k| Payload { id: chunk_id(k), size: chunk, blake3: Digest([0; 32]) }).collect(),
            ..head.clone()
        };
        let fits = envelope::chunk_size(limit, protocol::encode(&probe).len());
        if fits >= chunk {
            break;
        }
        chunk = fits;
    }
    let mut file = packed.file.reopen()?;
    let mut read_chunk = |k: u32| -> Result<Vec<u8>> {
        let start = u64::from(k - 1) * chunk;
        let len = chunk.min(packed.size - start);
        let mut buf = vec![0; usize::try_from(len)?];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf)?;
        Ok(buf)
    };
    let mut payloads = Vec::with_capacity(parts as usize);
    for k in 1..=parts {
        let bytes = read_chunk(k)?;
        payloads.push(Payload { id: chunk_id(k), size: bytes.len() as u64, blake3: Digest::of(&bytes) });
    }
    let changed = if ops == 0 { "no changes: you are current".to_owned() } else { format!("{ops} changes") };
    for k in 1..=parts {
        let bytes = read_chunk(k)?;
        let reply = Reply { part: k, parts, payloads: payloads.clone(), ..head.clone() };
        let control = protocol::encode(&reply);
        let auth = protocol::encode(&Auth::sign(&head.recipient, key, &control).signed_by(signer, &control));
        let of = if parts > 1 { format!(", part {k} of {parts}") } else { String::new() };
        let raw = envelope::build(&Outgoing {
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
        })?;
        anyhow::ensure!(
            raw.len() as u64 <= limit,
            "reply part {k} is {} bytes, over the {limit}-byte limit it was cut for (a bug)",
            raw.len()
        );
        emit(k, &raw)?;
    }
    Ok(parts)
}

enum Action {
    Answer(Box<Answer>),
    Resend {
        recipient: String,
        nonce: String,
        seq: u64,
        generation: u64,
        reply_id: String,
        parts: Vec<(u32, Vec<u8>)>,
        to: String,
    },
    Receipt(crate::protocol::Receipt),
    Defer(String),
}
