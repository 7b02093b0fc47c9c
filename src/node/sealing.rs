//! Payload encryption per channel (`docs/protocol.md` §6.6), as both roles perform it.
//!
//! The owner keeps one random key per channel and epoch (made on first use, a new epoch on
//! `owner channel rekey`). A reply for a channel that encrypts has its whole pack encrypted under that
//! key with [`crate::crypto::stream`] (streamed from the packer's temporary file to another), and carries
//! the key sealed under the key that authenticates the reply: only the recipient it is made for can
//! open it. The recipient decrypts the assembled pack (streamed) before it reads anything in it.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use tracing::info;

use super::pack::Packed;
use crate::crypto::stream::{self, StreamError};
use crate::crypto::{Key, hex};
use crate::db::Db;
use crate::engine::Entropy;
use crate::protocol::{self, Reason, Refusal, Reply, SealedKey};

/// The current key of `channel` and its epoch, made (epoch 1) if the channel has none yet.
///
/// # Errors
/// State failures, or a stored key that is corrupt.
pub fn channel_key(db: &Db, channel: &str) -> Result<(u64, Key)> {
    db.transaction(|db| match db.channel_key(channel)? {
        Some((epoch, hex)) => Ok((epoch, Key::from_hex(&hex).context("the stored channel key is corrupt")?)),
        None => {
            let key = Key::generate();
            let epoch = db.new_channel_key(channel, &key.to_hex())?;
            info!(channel, epoch, "made the channel's payload key");
            Ok((epoch, key))
        }
    })
}

/// Starts a new key epoch for `channel`: later replies are encrypted under a fresh key, which a
/// recipient no longer sent the channel never receives. Returns the new epoch.
///
/// # Errors
/// No such channel, or state failures.
pub fn rekey_channel(db: &Db, channel: &str) -> Result<u64> {
    let Some(row) = db.channel(channel)? else { bail!("no channel named {channel:?}") };
    let key = Key::generate();
    let epoch = db.transaction(|db| db.new_channel_key(channel, &key.to_hex()))?;
    info!(channel, epoch, encrypt = row.encrypt, "new channel key epoch");
    Ok(epoch)
}

/// Whether replies of `channel` are encrypted: the channel encrypts, and the reply carries an update (an
/// answer without one carries nothing to hide and no key).
///
/// # Errors
/// State failures.
pub fn encrypts(db: &Db, head: &Reply) -> Result<bool> {
    Ok(head.standing.is_none() && db.channel(&head.channel)?.is_some_and(|c| c.encrypt))
}

/// When the reply's channel encrypts: encrypts the pack to a new temporary file beside it (streamed, one
/// segment in memory) and records in `head` the channel key sealed under `under` (the key the reply is
/// made under), the nonce prefix and the plaintext size. Otherwise returns the pack as it is. Call after
/// every other field of `head` that [`protocol::pack_aad`] binds is final.
///
/// # Errors
/// State failures, or local I/O errors.
pub fn seal_pack(
    db: &Db,
    head: &mut Reply,
    packed: std::rc::Rc<Packed>,
    under: &Key,
    rng: &mut dyn Entropy,
) -> Result<std::rc::Rc<Packed>> {
    if !encrypts(db, head)? {
        return Ok(packed);
    }
    let (epoch, key) = channel_key(db, &head.channel)?;
    let mut nonce = [0u8; 12];
    rng.fill(&mut nonce);
    let mut prefix = [0u8; stream::PREFIX];
    rng.fill(&mut prefix);
    head.sealed_key = Some(SealedKey {
        epoch,
        sealed: under.seal_channel_key(&head.recipient, &head.channel, epoch, &key, nonce),
        nonce_prefix: hex(&prefix),
        plain_size: packed.size,
        alg: stream::ALG.to_owned(),
    });
    let dir = packed.file.path().parent().context("the pack has no directory")?;
    let out = tempfile::NamedTempFile::new_in(dir)?;
    let plain = BufReader::with_capacity(stream::SEGMENT, packed.file.reopen()?);
    let mut w = BufWriter::with_capacity(stream::SEGMENT, out.reopen()?);
    let n = stream::encrypt(&key, &prefix, &protocol::pack_aad(head), plain, &mut w)
        .map_err(|e| anyhow::anyhow!("failed to encrypt the pack: {e}"))?;
    w.into_inner().map_err(std::io::IntoInnerError::into_error)?;
    anyhow::ensure!(n == packed.size, "the pack changed while it was encrypted ({n} bytes, {} packed)", packed.size);
    let size = out.as_file().metadata()?.len();
    anyhow::ensure!(stream::sealed_len(n) == Some(size), "the encrypted pack is {size} bytes, not as its plaintext's");
    // The plaintext pack may be kept for the next recipient on the same base: the encrypted one is this
    // reply's alone (its associated data names the recipient and the reply).
    Ok(std::rc::Rc::new(Packed {
        body: packed.body.clone(),
        file: out,
        size,
        body_frame: packed.body_frame,
        stats: packed.stats,
    }))
}

/// The channel key of an encrypted reply, opened under `under` (the key its MAC verified under).
fn open_key(reply: &Reply, k: &SealedKey, under: &Key) -> Result<Key, Refusal> {
    under.open_channel_key(&reply.recipient, &reply.channel, k.epoch, &k.sealed).ok_or_else(|| {
        Refusal::new(
            Reason::Undecryptable,
            format!(
                "the key of channel {:?} (epoch {}) does not open under this recipient's key",
                reply.channel, k.epoch
            ),
        )
    })
}

/// Decrypts the encrypted pack of `reply` from `input` to `output`; a refusal when it does not decrypt
/// to exactly the size the reply declares. What was written to `output` is only the pack on success.
///
/// # Errors
/// Local I/O errors.
pub fn open_pack(
    reply: &Reply,
    under: &Key,
    input: impl std::io::Read,
    output: impl std::io::Write,
) -> Result<Result<(), Refusal>> {
    let Some(k) = &reply.sealed_key else {
        return Ok(Err(Refusal::new(Reason::Malformed, "the pack is not encrypted")));
    };
    let key = match open_key(reply, k, under) {
        Ok(key) => key,
        Err(r) => return Ok(Err(r)),
    };
    let prefix = k.prefix().context("decode_control checked the nonce prefix")?;
    match stream::decrypt(&key, &prefix, &protocol::pack_aad(reply), input, output) {
        Ok(n) if n == k.plain_size => Ok(Ok(())),
        Ok(n) => Ok(Err(Refusal::new(
            Reason::Undecryptable,
            format!("the pack decrypts to {n} bytes, the reply declares {}", k.plain_size),
        ))),
        Err(StreamError::Io(e)) => Err(anyhow::Error::new(e).context("failed to decrypt the pack")),
        Err(e) => Ok(Err(Refusal::new(Reason::Undecryptable, e.to_string()))),
    }
}

/// Decrypts the assembled pack at `sealed` into `plain` (streamed, fsynced), and removes `sealed`. On a
/// refusal neither file is left behind, so nothing of the reply's content stays.
///
/// # Errors
/// Local I/O errors.
pub fn open_pack_file(reply: &Reply, under: &Key, sealed: &Path, plain: &Path) -> Result<Result<(), Refusal>> {
    let input = BufReader::with_capacity(
        stream::SEGMENT,
        File::open(sealed).with_context(|| format!("failed to open `{}`", sealed.display()))?,
    );
    let file = File::create(plain).with_context(|| format!("failed to create `{}`", plain.display()))?;
    let mut out = BufWriter::with_capacity(stream::SEGMENT, file);
    let res = open_pack(reply, under, input, &mut out);
    let res = match res {
        Ok(Ok(())) => {
            out.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()?;
            Ok(Ok(()))
        }
        other => {
            drop(out);
            let _ = std::fs::remove_file(plain);
            other
        }
    };
    let _ = std::fs::remove_file(sealed);
    res
}

/// How a broadcast's pack was encrypted: what each of its tickets seals for its recipient.
#[derive(Clone, Debug)]
pub struct BroadcastSealing {
    /// The channel key's epoch.
    pub epoch: u64,
    /// The channel key.
    pub key: Key,
    /// The stream's nonce prefix, hex.
    pub nonce_prefix: String,
    /// The plaintext pack's length.
    pub plain_size: u64,
}

impl BroadcastSealing {
    /// The `sealed-key` of the ticket to `recipient`: the channel key sealed under `under` (that
    /// recipient's key) alone.
    pub fn for_recipient(&self, recipient: &str, channel: &str, under: &Key, rng: &mut dyn Entropy) -> SealedKey {
        let mut nonce = [0u8; 12];
        rng.fill(&mut nonce);
        SealedKey {
            epoch: self.epoch,
            sealed: under.seal_channel_key(recipient, channel, self.epoch, &self.key, nonce),
            nonce_prefix: self.nonce_prefix.clone(),
            plain_size: self.plain_size,
            alg: stream::ALG.to_owned(),
        }
    }
}

/// When `channel` encrypts: encrypts a broadcast's pack once, under the channel key, with associated data
/// `aad` ([`protocol::broadcast::broadcast_pack_aad`]: no recipient), and says how, for the tickets.
///
/// # Errors
/// State failures, or local I/O errors.
pub fn seal_broadcast_pack(
    db: &Db,
    channel: &str,
    aad: &[u8],
    packed: Packed,
    rng: &mut dyn Entropy,
) -> Result<(Packed, Option<BroadcastSealing>)> {
    if !db.channel(channel)?.is_some_and(|c| c.encrypt) {
        return Ok((packed, None));
    }
    let (epoch, key) = channel_key(db, channel)?;
    let mut prefix = [0u8; stream::PREFIX];
    rng.fill(&mut prefix);
    let dir = packed.file.path().parent().context("the pack has no directory")?;
    let out = tempfile::NamedTempFile::new_in(dir)?;
    let plain = BufReader::with_capacity(stream::SEGMENT, packed.file.reopen()?);
    let mut w = BufWriter::with_capacity(stream::SEGMENT, out.reopen()?);
    let n = stream::encrypt(&key, &prefix, aad, plain, &mut w)
        .map_err(|e| anyhow::anyhow!("failed to encrypt the broadcast pack: {e}"))?;
    w.into_inner().map_err(std::io::IntoInnerError::into_error)?;
    anyhow::ensure!(n == packed.size, "the pack changed while it was encrypted ({n} bytes, {} packed)", packed.size);
    let size = out.as_file().metadata()?.len();
    let sealing = BroadcastSealing { epoch, key, nonce_prefix: hex(&prefix), plain_size: n };
    Ok((Packed { file: out, size, ..packed }, Some(sealing)))
}
