//! The owner: publishes generations and answers recipients' requests.
//!
//! A request is answered only after its MAC verifies under the key of the recipient it names, its sequence
//! number is new and its nonce unseen; the reply goes to the address registered for that recipient, never
//! to any address the message itself names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use tracing::{info, warn};

use super::{Handled, Node, Outbox, RunReport, lock_state, process_inbox};
use crate::config::{Enrollment, OwnerConfig, OwnerSection, TransportConfig, TransportHint, write_secret};
use crate::crypto::{Key, random_id};
use crate::db::{Db, GenerationRow, RecipientRow, now};
use crate::manifest::{Digest, Manifest, Op, Source, diff};
use crate::protocol::envelope::{self, Outgoing};
use crate::protocol::{self, Auth, Control, InventoryKind, Kind, Payload, Reason, Refusal, Reply, Request, VERSION};
use crate::scan::{ForeignKind, scan_with};
use crate::store::Store;
use crate::transport::{Transport, maildir::check_address};

/// Largest payload attachment the owner packs before starting another one.
const PAYLOAD_TARGET_BYTES: usize = 32 << 20;

/// An owner node with its state open.
#[derive(Debug)]
pub struct Owner {
    cfg: OwnerConfig,
    db: Db,
    store: Store,
    manifests: HashMap<u64, Manifest>,
    _lock: std::fs::File,
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
    /// A locked or unreadable state directory.
    pub fn open(cfg: OwnerConfig) -> Result<Owner> {
        let lock = lock_state(&cfg.state_dir)?;
        let db = Db::open(&cfg.state_dir.join("state.db"))?;
        let store = Store::open(&cfg.state_dir.join("store"), cfg.owner.compression_level)?;
        Ok(Owner { cfg, db, store, manifests: HashMap::new(), _lock: lock })
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
    /// # Errors
    /// A source tree with symlinks, device files, unrepresentable names or case collisions, or I/O errors.
    pub fn publish(&mut self) -> Result<Published> {
        let source = self.cfg.owner.source.clone();
        let scan = scan_with(&source, &|p| self.store.put_file(p))
            .with_context(|| format!("failed to publish `{}`", source.display()))?;
        if let Some(f) = scan.foreign.first() {
            let what = match &f.kind {
                ForeignKind::Symlink { target } => {
                    format!("a symlink leading outside the tree (-> `{}`)", target.display())
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
        let generation = self.db.add_generation(&manifest)?;
        info!(generation, root = %root.short(), files, bytes, "published");
        Ok(Published { generation, root, files: files as u64, bytes, new: true })
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
        report.sent += Outbox::flush(&self.db, transport).await?.sent;
        process_inbox(self, transport, &mut report).await?;
        report.sent += Outbox::flush(&self.db, transport).await?.sent;
        Ok(report)
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
        let key = Key::from_hex(&rec.key_hex).context("stored key is corrupt")?;
        if auth.key_id != key.id() {
            return Ok(Err(Refusal::new(
                Reason::BadMac,
                format!("message names key {}, {:?}'s key is {}", auth.key_id, rec.name, key.id()),
            )));
        }
        if let Err(r) = protocol::verify_mac(&key, &auth, &parsed.control) {
            return Ok(Err(r));
        }
        // Requests and receipts carry no payloads: any attachment besides control and auth is refused.
        if let Some(name) = parsed.attachments.keys().next() {
            return Ok(Err(Refusal::new(Reason::BadPayload, format!("unexpected attachment {name:?}"))));
        }
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
            Control::Request(req) => self.answer(&rec, &key, &req),
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

    fn answer(&mut self, rec: &RecipientRow, key: &Key, req: &Request) -> Result<Result<Action, Refusal>> {
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
            InventoryKind::Changes if req.generation == 0 || req.generation > generation.number => None,
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
        let target = self.manifest(generation.number)?.clone();
        // Without a tree to diff against (a generation this owner does not know), ask for the full one.
        let need_full_inventory = inventory.is_none();
        let mut ops = inventory.map_or_else(Vec::new, |inv| diff(&inv, &target));
        let (payloads, blobs) = self.pack(&mut ops)?;
        let reply_id = random_id(16);
        let reply = Reply {
            mailferry: VERSION,
            kind: Kind::Reply,
            recipient: rec.name.clone(),
            nonce: req.nonce,
            request_seq: req.seq,
            reply_id: reply_id.clone(),
            part: 1,
            parts: 1,
            created: now(),
            generation: generation.number,
            root: generation.root,
            base: req.root,
            need_full_inventory,
            ops,
            payloads,
        };
        let control = protocol::encode(&reply);
        let auth = protocol::encode(&Auth::sign(&rec.name, key, &control));
        let n_ops = reply.ops.len();
        let changed = if n_ops == 0 { "no changes: you are current".to_owned() } else { format!("{n_ops} changes") };
        let text = format!(
            "This is an automatic message from mailferry.\n\n\
             It brings recipient {:?} to generation {} ({changed}).\n\
             mailferry verifies and applies it; there is nothing to do by hand.\n",
            rec.name, generation.number
        );
        let payload_refs: Vec<(&str, &[u8])> = blobs.iter().map(|(id, b)| (id.as_str(), b.as_slice())).collect();
        let raw = envelope::build(&Outgoing {
            from: &self.cfg.owner.address,
            to: &rec.address,
            subject: format!("mailferry: generation {} for {} ({changed})", generation.number, rec.name),
            text,
            kind: Kind::Reply,
            control: &control,
            auth: &auth,
            payloads: payload_refs,
        })?;
        Ok(Ok(Action::Answer {
            recipient: rec.name.clone(),
            nonce: req.nonce.to_hex(),
            seq: req.seq,
            generation: generation.number,
            reply_id,
            ops: n_ops,
            raw,
            to: rec.address.clone(),
        }))
    }

    /// Fills in every put's [`Source`], packing each distinct content's stored zstd frame once.
    fn pack(&self, ops: &mut [Op]) -> Result<(Vec<Payload>, Vec<Blob>)> {
        let mut blobs: Vec<Blob> = Vec::new();
        let mut placed: HashMap<Digest, Source> = HashMap::new();
        for op in ops.iter_mut() {
            let Op::Put { blake3, source, .. } = op else { continue };
            if let Some(s) = placed.get(blake3) {
                *source = Some(s.clone());
                continue;
            }
            let frame = self.store.frame(blake3)?;
            if blobs.last().is_none_or(|(_, b)| !b.is_empty() && b.len() + frame.len() > PAYLOAD_TARGET_BYTES) {
                blobs.push((format!("p{}.zst", blobs.len() + 1), Vec::new()));
            }
            let (id, buf) = blobs.last_mut().expect("just pushed");
            let s = Source { payload: id.clone(), offset: buf.len() as u64, length: frame.len() as u64 };
            buf.extend_from_slice(&frame);
            placed.insert(*blake3, s.clone());
            *source = Some(s);
        }
        let payloads = blobs
            .iter()
            .map(|(id, b)| Payload { id: id.clone(), size: b.len() as u64, blake3: Digest::of(b) })
            .collect();
        Ok((payloads, blobs))
    }

    /// Unregisters a recipient: its key stops verifying at once.
    ///
    /// # Errors
    /// No such recipient, or state failures.
    pub fn remove_recipient(&mut self, name: &str) -> Result<()> {
        self.db.remove_recipient(name)
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
        recipients: db.recipients()?,
        rejected: db.rejection_count()?,
        outbox: Outbox::status(&db)?,
        transport: super::TransportStatus::read(&db)?,
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
        let action = match self.evaluate(raw)? {
            Ok(a) => a,
            Err(refusal) => return Ok(Err(refusal)),
        };
        Ok(Ok(match action {
            Action::Answer { recipient, nonce, seq, generation, reply_id, ops, raw: reply, to } => {
                // The reply is queued in the same transaction that records the request as answered: a
                // crash leaves both or neither, so every request is answered exactly once.
                let from = &self.cfg.owner.address;
                self.db.transaction(|db| {
                    db.outbox_put(&format!("reply-{nonce}"), from, &to, &reply)?;
                    db.record_answer(&recipient, &nonce, seq, &reply_id, generation, ops, reply.len())?;
                    db.mark_seen(digest, "processed")
                })?;
                crate::failpoint::hit("owner-queued");
                info!(recipient = %recipient, generation, ops, bytes = reply.len(), to = %to, "answered request");
                Handled::Answered { recipient, generation, ops }
            }
            Action::Receipt(r) => {
                self.db.transaction(|db| {
                    db.record_receipt(&r)?;
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

/// A payload attachment being packed: its id and bytes.
type Blob = (String, Vec<u8>);

enum Action {
    Answer {
        recipient: String,
        nonce: String,
        seq: u64,
        generation: u64,
        reply_id: String,
        ops: usize,
        raw: Vec<u8>,
        to: String,
    },
    Receipt(crate::protocol::Receipt),
    Defer(String),
}
