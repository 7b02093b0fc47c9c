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
//!
//! # Old versions as deltas
//!
//! Content that no kept generation refers to any more, but an old generation does (one beyond
//! `keep-generations` whose file list is still kept), is kept small, the way git packs keep old versions:
//! as a delta against a newer version of the same path, at `store/deltas/<2 hex>/<64 hex>.delta` under the
//! old content's digest. A delta file is a header (the magic `MFDELTA1`, the method byte: 1 for a line
//! delta, 2 for a zstd frame with the base as its reference prefix; the base's BLAKE3; the content's size,
//! 8 bytes little-endian) and the frame. A delta's base is always a whole object, never another delta, so
//! reading one back costs one base and one frame. Reading verifies the BLAKE3 of the result: a damaged
//! delta (or base) is an error, never other content.

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

    fn delta_path(&self, d: &Digest) -> PathBuf {
        let h = d.to_hex();
        self.root.join("deltas").join(&h[..2]).join(format!("{h}.delta"))
    }

    /// Whether the store holds `d`, whole or as a delta.
    pub fn contains(&self, d: &Digest) -> bool {
        self.has_whole(d) || self.delta_path(d).is_file()
    }

    /// Whether the store holds `d` as a whole object (a zstd frame of its own).
    pub fn has_whole(&self, d: &Digest) -> bool {
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
            // Only a whole object counts: an old version kept as a delta may come back (a revert), and a
            // kept generation's content must be whole to serve as a base.
            if self.has_whole(&digest) {
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
        remove_unkept(&self.root.join("objects"), ".zst", keep)
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
        if !self.has_whole(d) && self.delta_path(d).is_file() {
            return self.delta_content(d);
        }
        let data = zstd::stream::decode_all(&self.frame(d)?[..])?;
        if Digest::of(&data) != *d {
            return Err(io::Error::other(format!("store object {} is corrupt", d.to_hex())));
        }
        Ok(data)
    }

    /// The first `limit` bytes of `d`'s content (all of it when shorter), whole or from its delta: what a
    /// delta base is read through.
    ///
    /// # Errors
    /// As [`Store::content`].
    pub fn content_prefix(&self, d: &Digest, limit: u64) -> io::Result<Vec<u8>> {
        if !self.has_whole(d) && self.delta_path(d).is_file() {
            let mut data = self.delta_content(d)?;
            data.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            return Ok(data);
        }
        let (frame, _) = self.open_frame(d)?;
        let mut data = Vec::new();
        zstd::stream::read::Decoder::new(frame)?.take(limit).read_to_end(&mut data)?;
        Ok(data)
    }

    /// The base a delta-stored `d` is read through, `None` when `d` is not stored as a delta.
    ///
    /// # Errors
    /// An unreadable or damaged delta header.
    pub fn delta_base(&self, d: &Digest) -> io::Result<Option<Digest>> {
        match fs::read(self.delta_path(d)) {
            Ok(raw) => Ok(Some(DeltaHeader::parse(&raw, d)?.0.base)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn delta_content(&self, d: &Digest) -> io::Result<Vec<u8>> {
        self.delta_content_on(d, None)
    }

    /// The content of `d`, whole or from its delta; `base` is a whole object's digest and content the
    /// caller has already read, used when it is `d`'s delta base (retiring many old versions of one path
    /// reads their common base once).
    ///
    /// # Errors
    /// As [`Store::content`].
    pub fn content_on(&self, d: &Digest, base: Option<(&Digest, &[u8])>) -> io::Result<Vec<u8>> {
        if !self.has_whole(d) && self.delta_path(d).is_file() {
            return self.delta_content_on(d, base);
        }
        self.content(d)
    }

    fn delta_content_on(&self, d: &Digest, known: Option<(&Digest, &[u8])>) -> io::Result<Vec<u8>> {
        let path = self.delta_path(d);
        let raw =
            fs::read(&path).map_err(|e| io::Error::new(e.kind(), format!("store delta `{}`: {e}", path.display())))?;
        let (head, frame) = DeltaHeader::parse(&raw, d)?;
        // A delta's base is whole by construction; a delta on a delta would be a damaged store.
        if !self.has_whole(&head.base) {
            return Err(io::Error::other(format!(
                "store delta {} names base {}, which the store does not hold whole",
                d.to_hex(),
                head.base.to_hex()
            )));
        }
        let read;
        let base = match known {
            Some((k, data)) if *k == head.base => data,
            _ => {
                read = self.content(&head.base)?;
                &read[..]
            }
        };
        let mut out = Vec::with_capacity(usize::try_from(head.size).unwrap_or(0).min(1 << 30));
        let got = match head.method {
            DeltaMethod::Lines => crate::delta::lines::apply(frame, base, head.size, &mut out),
            DeltaMethod::Prefix => crate::delta::decompress(frame, base, head.size, &mut out),
        };
        match got {
            Ok((n, digest)) if n == head.size && digest == *d => Ok(out),
            Ok((n, digest)) => Err(io::Error::other(format!(
                "store delta {} is corrupt: it gives {n} bytes with digest {}",
                d.to_hex(),
                digest.to_hex()
            ))),
            Err(e) => Err(io::Error::other(format!("store delta {} is corrupt: {e}", d.to_hex()))),
        }
    }

    /// Keeps `d` (whose content is `content`) as a delta against the whole object `base`, by the smaller of
    /// a line delta (for text) and a zstd frame with `base` as its prefix, when that is smaller than `d`'s
    /// whole frame; returns the bytes the delta takes, or `None` when `d` stays (or is made) whole. The
    /// delta is read back and checked before it is put in place; the whole object, if any, is left for
    /// [`Store::retain`] to remove.
    ///
    /// # Errors
    /// I/O errors, a `base` the store does not hold whole, or `content` that is not `d`'s.
    pub fn put_delta(&self, d: &Digest, content: &[u8], base: &Digest) -> io::Result<Option<u64>> {
        if !self.has_whole(base) {
            return Err(io::Error::other(format!("delta base {} is not a whole object", base.to_hex())));
        }
        let base_data = self.content(base)?;
        self.put_delta_on(d, content, base, &base_data)
    }

    /// [`Store::put_delta`] with the base's content already read (`base_data`, checked against `base`).
    ///
    /// # Errors
    /// As [`Store::put_delta`].
    pub fn put_delta_on(&self, d: &Digest, content: &[u8], base: &Digest, base_data: &[u8]) -> io::Result<Option<u64>> {
        if Digest::of(content) != *d {
            return Err(io::Error::other(format!("content given for {} has another digest", d.to_hex())));
        }
        if !self.has_whole(base) || Digest::of(base_data) != *base {
            return Err(io::Error::other(format!("delta base {} is not a whole object", base.to_hex())));
        }
        let mut best: Option<(DeltaMethod, Vec<u8>)> = None;
        let sample = &content[..content.len().min(64 << 10)];
        if crate::delta::lines::looks_like_text(sample) {
            let raw = crate::delta::lines::diff(base_data, content);
            best = Some((DeltaMethod::Lines, crate::delta::compress(&[], &raw, self.level.clamp(1, 19))?));
        }
        // A low level: the window is the whole base, and old versions are read rarely.
        let prefix = crate::delta::compress(base_data, content, PREFIX_LEVEL)?;
        if best.as_ref().is_none_or(|(_, b)| prefix.len() < b.len()) {
            best = Some((DeltaMethod::Prefix, prefix));
        }
        let Some((method, frame)) = best else { return Ok(None) };
        let head = DeltaHeader { method, base: *base, size: content.len() as u64 };
        let mut raw = head.encode();
        raw.extend_from_slice(&frame);
        // Compressing the whole content only to compare costs more than the delta: a delta under an
        // eighth of the base's own frame (another version of the same path) is clearly the smaller.
        let base_frame = fs::metadata(self.object_path(base))?.len();
        let whole = match self.has_whole(d) {
            true => fs::metadata(self.object_path(d))?.len(),
            false if (raw.len() as u64).saturating_mul(8) < base_frame => u64::MAX,
            false => self.compress_from(&mut &content[..], false)?.2.as_file().metadata()?.len(),
        };
        if raw.len() as u64 >= whole {
            if !self.has_whole(d) {
                self.put_bytes(content)?;
            }
            return Ok(None);
        }
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))?;
        tmp.as_file().write_all(&raw)?;
        tmp.as_file().sync_all()?;
        let dest = self.delta_path(d);
        let dir = dest.parent().expect("delta paths have a parent");
        fs::create_dir_all(dir)?;
        tmp.persist(&dest).map_err(|e| e.error)?;
        File::open(dir)?.sync_all()?;
        // Checked as it will be read: a delta that does not give `d` back is never kept.
        if let Err(e) = self.delta_content_on(d, Some((base, base_data))) {
            let _ = fs::remove_file(&dest);
            return Err(e);
        }
        Ok(Some(raw.len() as u64))
    }

    /// Removes every delta not in `keep`; returns how many deltas and stored bytes were removed.
    ///
    /// # Errors
    /// An unreadable store directory.
    pub fn retain_deltas(&self, keep: &std::collections::HashSet<Digest>) -> io::Result<(usize, u64)> {
        remove_unkept(&self.root.join("deltas"), ".delta", keep)
    }

    /// Stored bytes and count of whole objects and of deltas.
    ///
    /// # Errors
    /// An unreadable store directory.
    pub fn usage(&self) -> io::Result<StoreUsage> {
        let count = |dir: &Path| -> io::Result<(u64, u64)> {
            let (mut n, mut bytes) = (0, 0);
            let Ok(dirs) = fs::read_dir(dir) else { return Ok((0, 0)) };
            for sub in dirs {
                for e in fs::read_dir(sub?.path())? {
                    n += 1;
                    bytes += e?.metadata()?.len();
                }
            }
            Ok((n, bytes))
        };
        let (objects, object_bytes) = count(&self.root.join("objects"))?;
        let (deltas, delta_bytes) = count(&self.root.join("deltas"))?;
        Ok(StoreUsage { objects, object_bytes, deltas, delta_bytes })
    }
}

/// What a store holds, as [`Store::usage`] counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Whole objects.
    pub objects: u64,
    /// Their stored bytes.
    pub object_bytes: u64,
    /// Old versions kept as deltas.
    pub deltas: u64,
    /// Their stored bytes.
    pub delta_bytes: u64,
}

/// zstd level of a stored delta with a reference prefix.
const PREFIX_LEVEL: i32 = 3;

/// How a stored delta is applied to its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeltaMethod {
    Lines,
    Prefix,
}

/// The header of a stored delta (see the module doc).
#[derive(Debug)]
struct DeltaHeader {
    method: DeltaMethod,
    base: Digest,
    size: u64,
}

const DELTA_MAGIC: &[u8; 8] = b"MFDELTA1";
const DELTA_HEADER: usize = 8 + 1 + 32 + 8;

impl DeltaHeader {
    fn encode(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(DELTA_HEADER);
        raw.extend_from_slice(DELTA_MAGIC);
        raw.push(match self.method {
            DeltaMethod::Lines => 1,
            DeltaMethod::Prefix => 2,
        });
        raw.extend_from_slice(&self.base.0);
        raw.extend_from_slice(&self.size.to_le_bytes());
        raw
    }

    fn parse<'a>(raw: &'a [u8], d: &Digest) -> io::Result<(DeltaHeader, &'a [u8])> {
        let bad = |why: &str| io::Error::other(format!("store delta {} is corrupt: {why}", d.to_hex()));
        if raw.len() < DELTA_HEADER || &raw[..8] != DELTA_MAGIC {
            return Err(bad("no delta header"));
        }
        let method = match raw[8] {
            1 => DeltaMethod::Lines,
            2 => DeltaMethod::Prefix,
            _ => return Err(bad("unknown method")),
        };
        let base = Digest(raw[9..41].try_into().expect("32 bytes"));
        let size = u64::from_le_bytes(raw[41..49].try_into().expect("8 bytes"));
        Ok((DeltaHeader { method, base, size }, &raw[DELTA_HEADER..]))
    }
}

/// Removes every file `<hex><suffix>` under the two-level directory `dir` whose digest is not in `keep`.
fn remove_unkept(dir: &Path, suffix: &str, keep: &std::collections::HashSet<Digest>) -> io::Result<(usize, u64)> {
    let (mut n, mut bytes) = (0, 0);
    let Ok(dirs) = fs::read_dir(dir) else { return Ok((0, 0)) };
    for sub in dirs {
        for e in fs::read_dir(sub?.path())? {
            let e = e?;
            let name = e.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(suffix)) else { continue };
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

    /// Signature-database-like text: `n` unique lines from line `from`.
    fn sig_text(from: usize, n: usize) -> Vec<u8> {
        (from..from + n)
            .map(|i| format!("Win.Trojan.Agent-{i}:0:*:{:064x}\n", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn an_old_version_is_kept_as_a_small_delta_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store"), 3).unwrap();
        let old = sig_text(0, 20_000);
        let mut new = old.clone();
        new.extend_from_slice(&sig_text(20_000, 100));
        let (d_old, d_new) = (store.put_bytes(&old).unwrap(), store.put_bytes(&new).unwrap());
        let whole = store.frame(&d_old).unwrap().len() as u64;
        let stored = store.put_delta(&d_old, &old, &d_new).unwrap().expect("a delta is smaller");
        assert!(stored * 20 < whole, "delta {stored} bytes against a whole frame of {whole}");
        // The whole object goes; the old version is still there, read through its base.
        store.retain(&std::collections::HashSet::from([d_new])).unwrap();
        assert!(!store.has_whole(&d_old) && store.contains(&d_old));
        assert_eq!(store.delta_base(&d_old).unwrap(), Some(d_new));
        assert_eq!(store.content(&d_old).unwrap(), old);
        assert_eq!(store.content_prefix(&d_old, 10).unwrap(), &old[..10]);
        assert_eq!(store.delta_base(&d_new).unwrap(), None);
        let usage = store.usage().unwrap();
        assert_eq!((usage.objects, usage.deltas, usage.delta_bytes), (1, 1, stored));
        // Content that is not the digest's is refused, and so is a base that is not whole.
        assert!(store.put_delta(&d_old, &new, &d_new).is_err());
        assert!(store.put_delta(&d_new, &new, &d_old).is_err());
        // Deltas not kept go.
        assert_eq!(store.retain_deltas(&std::collections::HashSet::new()).unwrap().0, 1);
        assert!(!store.contains(&d_old));
    }

    #[test]
    fn a_damaged_delta_is_an_error_never_other_content() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store"), 3).unwrap();
        let old = sig_text(0, 5_000);
        let mut new = sig_text(0, 4_000);
        new.extend_from_slice(&sig_text(9_000, 50));
        let (d_old, d_new) = (store.put_bytes(&old).unwrap(), store.put_bytes(&new).unwrap());
        store.put_delta(&d_old, &old, &d_new).unwrap().expect("a delta is smaller");
        store.retain(&std::collections::HashSet::from([d_new])).unwrap();
        let path = store.delta_path(&d_old);
        let good = fs::read(&path).unwrap();
        // Another whole object of the same size named as the base (one byte differs): the delta applies,
        // to other bytes, which only the digest check refuses.
        let mut near = new.clone();
        near[0] = b'X';
        let other = store.put_bytes(&near).unwrap();
        let mut rebased = good.clone();
        rebased[9..41].copy_from_slice(&other.0);
        fs::write(&path, &rebased).unwrap();
        let Err(e) = store.content(&d_old) else { panic!("wrong content is refused") };
        let e = e.to_string();
        assert!(e.contains("corrupt"), "{e}");
        // A flipped byte in the frame, a cut frame, a bad header: errors all.
        let mut flipped = good.clone();
        let at = flipped.len() - 3;
        flipped[at] ^= 0x55;
        for bad in [flipped, good[..good.len() - 5].to_vec(), b"MFDELTA2".to_vec()] {
            fs::write(&path, &bad).unwrap();
            assert!(store.content(&d_old).is_err(), "a damaged delta is an error");
            assert!(store.content_prefix(&d_old, 1 << 20).is_err(), "a damaged delta is an error");
        }
        // A base stored only as a delta is not followed: the chain is one deep.
        fs::write(&path, &good).unwrap();
        assert_eq!(store.content(&d_old).unwrap(), old);
        store.put_delta(&d_new, &new, &other).unwrap().expect("a delta is smaller");
        store.retain(&std::collections::HashSet::from([other])).unwrap();
        let Err(e) = store.content(&d_old) else { panic!("a chain is refused") };
        let e = e.to_string();
        assert!(e.contains("does not hold whole"), "{e}");
    }
}
