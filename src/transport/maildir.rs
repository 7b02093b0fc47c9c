//! The Maildir spool transport: mail to address `A` is a file in `ROOT/A/new/`.
//!
//! Delivery is atomic in the Maildir way: the message is written and fsynced in `tmp/`, then renamed into
//! `new/`. A node reads its own address's `new/` and files each handled message into `cur/` (processed) or
//! the Maildir++ subfolder `.rejected/cur/`. Several nodes on one machine share a spool; between machines
//! the files are carried (and can be fed in with `mailferry deliver`).
//!
//! Delivered file names are derived from the message's BLAKE3, so delivering the same bytes twice (an
//! outbox retried after a crash) leaves one file.
//!
//! The inbox is listed with each file's size ([`Transport::waiting`]) and read one message at a time
//! ([`Transport::read`], never more than the node's limit plus one byte), so a node's memory follows the
//! largest message it accepts, not the inbox: a file over the limit is refused by its size and filed
//! without being read.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::{Disposition, Incoming, Transport, TransportError, TransportErrorKind, Waiting};
use crate::crypto::hex;

/// A node's view of a Maildir spool.
#[derive(Debug, Clone)]
pub struct MaildirTransport {
    root: PathBuf,
    own: String,
}

/// Checks that `address` can name a spool directory: one path component, no separators or dot names.
///
/// # Errors
/// A message saying why it cannot.
pub fn check_address(address: &str) -> Result<(), String> {
    let bad = address.is_empty()
        || address == "."
        || address == ".."
        || address.starts_with('.')
        || address.len() > 254
        || address.chars().any(|c| c == '/' || c == '\\' || c.is_control() || c.is_whitespace());
    if bad {
        return Err(format!("{address:?} is not a usable mail address"));
    }
    Ok(())
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> TransportError {
    move |e| TransportError::io(what, e)
}

fn ensure_maildir(dir: &Path) -> Result<(), TransportError> {
    for sub in ["tmp", "new", "cur"] {
        let d = dir.join(sub);
        fs::create_dir_all(&d).map_err(io_err(format!("failed to create `{}`", d.display())))?;
    }
    Ok(())
}

impl MaildirTransport {
    /// A transport for the node with address `own` on the spool at `root`.
    ///
    /// # Errors
    /// An address that cannot name a directory, or a spool that cannot be created.
    pub fn new(root: &Path, own: &str) -> Result<MaildirTransport, TransportError> {
        check_address(own).map_err(|m| {
            TransportError::new(TransportErrorKind::Permanent, "invalid own address", anyhow::Error::msg(m))
        })?;
        let t = MaildirTransport { root: root.to_path_buf(), own: own.to_owned() };
        ensure_maildir(&t.inbox())?;
        Ok(t)
    }

    /// This node's Maildir.
    pub fn inbox(&self) -> PathBuf {
        self.root.join(&self.own)
    }

    fn rejected(&self) -> PathBuf {
        self.inbox().join(".rejected")
    }

    /// Writes `raw` into the `new/` of the Maildir at `dir`, atomically, under a content-derived name.
    ///
    /// # Errors
    /// I/O errors.
    pub fn deliver_into(dir: &Path, raw: &[u8]) -> Result<String, TransportError> {
        ensure_maildir(dir)?;
        let digest = blake3::hash(raw);
        let name = format!("mailferry.{}", hex(&digest.as_bytes()[..16]));
        let tmp = dir.join("tmp").join(&name);
        let dest = dir.join("new").join(&name);
        let what = format!("failed to deliver into `{}`", dir.display());
        let mut f = File::create(&tmp).map_err(io_err(what.clone()))?;
        f.write_all(raw).map_err(io_err(what.clone()))?;
        f.sync_all().map_err(io_err(what.clone()))?;
        fs::rename(&tmp, &dest).map_err(io_err(what.clone()))?;
        File::open(dir.join("new")).and_then(|d| d.sync_all()).map_err(io_err(what))?;
        Ok(name)
    }
}

impl Transport for MaildirTransport {
    async fn send(&mut self, _from: &str, to: &str, raw: &[u8]) -> Result<(), TransportError> {
        check_address(to).map_err(|m| {
            TransportError::new(
                TransportErrorKind::Permanent,
                format!("cannot deliver to {to:?}"),
                anyhow::Error::msg(m),
            )
        })?;
        MaildirTransport::deliver_into(&self.root.join(to), raw)?;
        Ok(())
    }

    async fn fetch(&mut self) -> Result<Vec<Incoming>, TransportError> {
        let mut out = Vec::new();
        for w in self.waiting().await? {
            if let Some(m) = self.read(w, u64::MAX).await? {
                out.push(m);
            }
        }
        Ok(out)
    }

    async fn waiting(&mut self) -> Result<Vec<Waiting>, TransportError> {
        let new = self.inbox().join("new");
        let mut names: Vec<(std::time::SystemTime, String, u64)> = Vec::new();
        let entries = fs::read_dir(&new).map_err(io_err(format!("failed to list `{}`", new.display())))?;
        for e in entries {
            let e = e.map_err(io_err(format!("failed to list `{}`", new.display())))?;
            let Ok(name) = e.file_name().into_string() else { continue };
            if name.starts_with('.') {
                continue;
            }
            let meta = e.metadata().map_err(io_err(format!("failed to stat `{}`", e.path().display())))?;
            if meta.is_file() {
                names.push((meta.modified().unwrap_or(std::time::UNIX_EPOCH), name, meta.len()));
            }
        }
        names.sort();
        Ok(names.into_iter().map(|(_, id, size)| Waiting::Listed { id, size }).collect())
    }

    async fn read(&mut self, waiting: Waiting, max: u64) -> Result<Option<Incoming>, TransportError> {
        let id = match waiting {
            Waiting::Read(m) => return Ok(Some(m)),
            Waiting::Listed { id, .. } => id,
        };
        let path = self.inbox().join("new").join(&id);
        let what = || format!("failed to read `{}`", path.display());
        let file = match File::open(&path) {
            Ok(f) => f,
            // Settled by a concurrent run between listing and reading.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TransportError::io(what(), e)),
        };
        let len = file.metadata().map_err(|e| TransportError::io(what(), e))?.len();
        let mut raw = Vec::with_capacity(usize::try_from(len.min(max.saturating_add(1))).unwrap_or(0));
        file.take(max.saturating_add(1)).read_to_end(&mut raw).map_err(|e| TransportError::io(what(), e))?;
        Ok(Some(Incoming { id, raw }))
    }

    async fn settle(&mut self, id: &str, disposition: Disposition) -> Result<(), TransportError> {
        let from = self.inbox().join("new").join(id);
        let dest_dir = match disposition {
            Disposition::Processed => self.inbox(),
            Disposition::Rejected => {
                ensure_maildir(&self.rejected())?;
                self.rejected()
            }
        };
        let to = dest_dir.join("cur").join(format!("{id}:2,S"));
        fs::rename(&from, &to).map_err(io_err(format!("failed to move `{}` to `{}`", from.display(), to.display())))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_fetches_and_settles() {
        let spool = tempfile::tempdir().unwrap();
        let mut owner = MaildirTransport::new(spool.path(), "owner@example.org").unwrap();
        let mut site = MaildirTransport::new(spool.path(), "site@example.org").unwrap();
        site.send("site@example.org", "owner@example.org", b"one").await.unwrap();
        site.send("site@example.org", "owner@example.org", b"two").await.unwrap();
        site.send("site@example.org", "owner@example.org", b"two").await.unwrap();
        let got = owner.fetch().await.unwrap();
        assert_eq!(got.len(), 2, "identical bytes are delivered once");
        owner.settle(&got[0].id, Disposition::Processed).await.unwrap();
        owner.settle(&got[1].id, Disposition::Rejected).await.unwrap();
        assert!(owner.fetch().await.unwrap().is_empty());
        assert_eq!(fs::read_dir(spool.path().join("owner@example.org/cur")).unwrap().count(), 1);
        assert_eq!(fs::read_dir(spool.path().join("owner@example.org/.rejected/cur")).unwrap().count(), 1);
        assert!(site.send("x", "../escape", b"x").await.is_err());
        assert!(MaildirTransport::new(spool.path(), "a/b").is_err());
    }
}
