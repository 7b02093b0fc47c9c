//! The owner's content store: every file of every published generation, deduplicated by BLAKE3 and kept
//! as a zstd frame, so that replies can be packed without reading the source tree again.
//!
//! Objects live at `store/objects/<2 hex>/<64 hex>.zst` and are written once (temp file, fsync, rename):
//! an object that exists is complete and never changes. This is what makes a published generation
//! immutable: later edits to the source tree change nothing here.
//!
//! A publish writes its new objects as a [`Batch`]: every temp file is written unsynced, then one
//! `syncfs` makes them all durable, and only then are they renamed into place (the object directories
//! synced once each). So an object under its final name is always complete, at the cost of two flushes
//! per publish instead of two per file.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::manifest::Digest;
use crate::scan::open_regular;

/// A content store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    level: i32,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, compressing new objects at zstd `level`.
    ///
    /// # Errors
    /// When the directories cannot be created.
    pub fn open(root: &Path, level: i32) -> io::Result<Store> {
        fs::create_dir_all(root.join("objects"))?;
        let tmp = root.join("tmp");
        fs::create_dir_all(&tmp)?;
        // Left by a batch that never committed (the owner holds the state lock: no batch is running).
        for e in fs::read_dir(&tmp)? {
            let _ = fs::remove_file(e?.path());
        }
        Ok(Store { root: root.to_path_buf(), level })
    }

    fn object_path(&self, d: &Digest) -> PathBuf {
        let h = d.to_hex();
        self.root.join("objects").join(&h[..2]).join(format!("{h}.zst"))
    }

    /// Whether the store holds `d`.
    pub fn contains(&self, d: &Digest) -> bool {
        self.object_path(d).is_file()
    }

    /// Reads `source` once, hashing and compressing it into the store, and returns its size and digest.
    ///
    /// A file that changes while it is read (size or modification time differ before and after) is read
    /// again, up to three times, so that the digest always describes bytes that were really stored.
    ///
    /// # Errors
    /// I/O errors, or a file that keeps changing.
    pub fn put_file(&self, source: &Path) -> io::Result<(u64, Digest)> {
        let (size, digest, tmp) = self.compress_file(source, true)?;
        if let Some(tmp) = tmp {
            self.persist(tmp, &digest)?;
        }
        Ok((size, digest))
    }

    /// Compresses `source` into a temp file (synced if `sync`), checking it did not change meanwhile.
    /// The temp file is `None` when the store has the object already.
    fn compress_file(&self, source: &Path, sync: bool) -> io::Result<(u64, Digest, Option<tempfile::NamedTempFile>)> {
        use std::io::Seek as _;
        for _ in 0..3 {
            let mut f = open_regular(source)?;
            let before = f.metadata()?;
            let unchanged = |size: u64| -> io::Result<bool> {
                let after = fs::symlink_metadata(source)?;
                Ok(before.len() == after.len()
                    && before.mtime_nsec() == after.mtime_nsec()
                    && before.mtime() == after.mtime()
                    && size == after.len())
            };
            // Content the store has costs a hash, not a compression (a publish after a small change).
            let (size, digest) = crate::scan::hash_reader(&mut f, before.len())?;
            if self.contains(&digest) {
                if unchanged(size)? {
                    return Ok((size, digest, None));
                }
                continue;
            }
            f.rewind()?;
            let (size, digest2, tmp) = self.compress_from(&mut f, false)?;
            if digest2 != digest || !unchanged(size)? {
                continue;
            }
            if sync {
                tmp.as_file().sync_all()?;
            }
            return Ok((size, digest, Some(tmp)));
        }
        Err(io::Error::other(format!("`{}` kept changing while it was being published", source.display())))
    }

    /// Stores `data` and returns its digest.
    ///
    /// # Errors
    /// I/O errors.
    pub fn put_bytes(&self, data: &[u8]) -> io::Result<Digest> {
        let (_, digest, tmp) = self.compress_from(&mut &data[..], true)?;
        self.persist(tmp, &digest)?;
        Ok(digest)
    }

    fn compress_from(&self, input: &mut dyn Read, sync: bool) -> io::Result<(u64, Digest, tempfile::NamedTempFile)> {
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))?;
        // Small content (most files of a big tree) is compressed in memory with this thread's reused
        // context: a fresh zstd context per file costs more than the file (its tables are zeroed pages).
        let mut head = Vec::new();
        input.take(SMALL_CONTENT + 1).read_to_end(&mut head)?;
        let (size, digest) = if head.len() as u64 <= SMALL_CONTENT {
            let frame = COMPRESSOR.with(|c| -> io::Result<Vec<u8>> {
                let mut c = c.borrow_mut();
                if c.as_ref().is_none_or(|(level, _)| *level != self.level) {
                    let mut fresh = zstd::bulk::Compressor::new(self.level)?;
                    fresh.include_checksum(false)?;
                    *c = Some((self.level, fresh));
                }
                let (_, compressor) = c.as_mut().expect("set above");
                compressor.compress(&head)
            })?;
            tmp.as_file().write_all(&frame)?;
            (head.len() as u64, Digest::of(&head))
        } else {
            let mut enc = zstd::stream::write::Encoder::new(BufWriter::new(tmp.reopen()?), self.level)?;
            enc.include_checksum(false)?;
            let mut h = blake3::Hasher::new();
            h.update(&head);
            enc.write_all(&head)?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut size = head.len() as u64;
            loop {
                let n = input.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                size += n as u64;
                h.update(&buf[..n]);
                enc.write_all(&buf[..n])?;
            }
            enc.finish()?.into_inner().map_err(|e| e.into_error())?;
            (size, h.finalize().into())
        };
        if sync {
            tmp.as_file().sync_all()?;
        }
        Ok((size, digest, tmp))
    }

    fn persist(&self, tmp: tempfile::NamedTempFile, digest: &Digest) -> io::Result<()> {
        let dest = self.object_path(digest);
        if dest.is_file() {
            return Ok(());
        }
        let dir = dest.parent().expect("object paths have a parent");
        fs::create_dir_all(dir)?;
        tmp.persist(&dest).map_err(|e| e.error)?;
        File::open(dir)?.sync_all()
    }

    /// Starts a batch of new objects (a publish): see the module docs.
    pub fn batch(&self) -> Batch<'_> {
        Batch { store: self, pending: std::sync::Mutex::new(Vec::new()) }
    }

    /// The stored zstd frame of `d`.
    ///
    /// # Errors
    /// `NotFound` when the store does not hold it.
    pub fn frame(&self, d: &Digest) -> io::Result<Vec<u8>> {
        let path = self.object_path(d);
        fs::read(&path).map_err(|e| io::Error::new(e.kind(), format!("store object `{}`: {e}", path.display())))
    }

    /// Removes every object not in `keep`; returns how many objects and stored bytes were removed.
    ///
    /// # Errors
    /// An unreadable store directory.
    pub fn retain(&self, keep: &std::collections::HashSet<Digest>) -> io::Result<(usize, u64)> {
        let (mut n, mut bytes) = (0, 0);
        for dir in fs::read_dir(self.root.join("objects"))? {
            for e in fs::read_dir(dir?.path())? {
                let e = e?;
                let name = e.file_name();
                let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".zst")) else { continue };
                if Digest::from_hex(hex).is_ok_and(|d| keep.contains(&d)) {
                    continue;
                }
                let len = e.metadata()?.len();
                fs::remove_file(e.path())?;
                n += 1;
                bytes += len;
            }
        }
        Ok((n, bytes))
    }

    /// The stored zstd frame of `d`, opened for streaming, and its length.
    ///
    /// # Errors
    /// `NotFound` when the store does not hold it.
    pub fn open_frame(&self, d: &Digest) -> io::Result<(File, u64)> {
        let path = self.object_path(d);
        let f = File::open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("store object `{}`: {e}", path.display())))?;
        let len = f.metadata()?.len();
        Ok((f, len))
    }

    /// The decompressed content of `d`.
    ///
    /// # Errors
    /// As [`Store::frame`], or a corrupt object.
    pub fn content(&self, d: &Digest) -> io::Result<Vec<u8>> {
        let data = zstd::stream::decode_all(&self.frame(d)?[..])?;
        if Digest::of(&data) != *d {
            return Err(io::Error::other(format!("store object {} is corrupt", d.to_hex())));
        }
        Ok(data)
    }
}

/// Content up to this size is compressed in memory with a reused context.
const SMALL_CONTENT: u64 = 1 << 20;

thread_local! {
    /// Each thread's zstd context, with the level it is set to.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// New objects written unsynced, made durable together by [`Batch::commit`]. Dropped without a commit,
/// its temp files are removed and the store is as before.
#[derive(Debug)]
pub struct Batch<'a> {
    store: &'a Store,
    pending: std::sync::Mutex<Vec<(tempfile::TempPath, Digest)>>,
}

impl Batch<'_> {
    /// Compresses `source` into the batch unless the store has it; returns its size and digest. Safe to
    /// call from several threads.
    pub fn put_file(&self, source: &Path) -> io::Result<(u64, Digest)> {
        let (size, digest, tmp) = self.store.compress_file(source, false)?;
        if let Some(tmp) = tmp {
            self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((tmp.into_temp_path(), digest));
        }
        Ok((size, digest))
    }

    /// Makes every new object durable and puts it in place; returns how many were new. Call before
    /// recording anything that refers to them.
    pub fn commit(self) -> io::Result<usize> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if pending.is_empty() {
            return Ok(0);
        }
        // Every temp file's content reaches the disk before any of them gets its final name.
        rustix::fs::syncfs(File::open(&self.store.root)?)?;
        let mut dirs = std::collections::BTreeSet::new();
        let mut n = 0;
        for (tmp, digest) in pending {
            let dest = self.store.object_path(&digest);
            let dir = dest.parent().expect("object paths have a parent").to_path_buf();
            if !dest.is_file() {
                fs::create_dir_all(&dir)?;
                tmp.persist(&dest).map_err(|e| e.error)?;
                dirs.insert(dir);
                n += 1;
            }
        }
        for dir in &dirs {
            File::open(dir)?.sync_all()?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_once_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store"), 3).unwrap();
        let src = dir.path().join("f");
        fs::write(&src, b"content ".repeat(1000)).unwrap();
        let (size, d) = store.put_file(&src).unwrap();
        assert_eq!((size, d), (8000, Digest::of(&b"content ".repeat(1000))));
        assert_eq!(store.content(&d).unwrap(), b"content ".repeat(1000));
        assert!(store.frame(&d).unwrap().len() < 200, "stored compressed");
        // Edits to the source after storing do not change the object.
        fs::write(&src, b"changed").unwrap();
        assert_eq!(store.content(&d).unwrap(), b"content ".repeat(1000));
        assert_eq!(store.put_bytes(b"").unwrap(), Digest::of(b""));
        assert_eq!(store.content(&Digest::of(b"")).unwrap(), b"");
        // Retention removes what is not kept, and only that.
        let keep = std::collections::HashSet::from([d]);
        assert_eq!(store.retain(&keep).unwrap().0, 1, "the empty object goes");
        assert!(store.contains(&d) && !store.contains(&Digest::of(b"")));
    }

    #[test]
    fn a_batch_puts_objects_in_place_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store"), 3).unwrap();
        let tmp_files = || fs::read_dir(dir.path().join("store/tmp")).unwrap().count();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, b"alpha").unwrap();
        fs::write(&b, b"beta").unwrap();
        let (_, da) = store.put_file(&a).unwrap();

        // Abandoned (a publish that failed): nothing new in the store, no temp file left.
        let batch = store.batch();
        let (_, db) = batch.put_file(&b).unwrap();
        assert_eq!(batch.put_file(&a).unwrap().1, da, "known content is not written again");
        assert_eq!(tmp_files(), 1);
        assert!(!store.contains(&db), "not in place before the commit");
        drop(batch);
        assert!(!store.contains(&db));
        assert_eq!(tmp_files(), 0);

        // Committed: in place and readable. The same content twice in one batch is one object.
        let batch = store.batch();
        batch.put_file(&b).unwrap();
        fs::copy(&b, dir.path().join("b2")).unwrap();
        batch.put_file(&dir.path().join("b2")).unwrap();
        assert_eq!(batch.commit().unwrap(), 1);
        assert_eq!(store.content(&db).unwrap(), b"beta");
        assert_eq!(tmp_files(), 0);

        // A crash before the commit leaves temp files, which the next open removes.
        let batch = store.batch();
        fs::write(&a, b"gamma").unwrap();
        batch.put_file(&a).unwrap();
        std::mem::forget(batch);
        assert_eq!(tmp_files(), 1);
        Store::open(&dir.path().join("store"), 3).unwrap();
        assert_eq!(tmp_files(), 0);
    }
}
