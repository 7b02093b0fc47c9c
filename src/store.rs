//! The owner's content store: every file of every published generation, deduplicated by BLAKE3 and kept
//! as a zstd frame, so that replies can be packed without reading the source tree again.
//!
//! Objects live at `store/objects/<2 hex>/<64 hex>.zst` and are written once (temp file, fsync, rename):
//! an object that exists is complete and never changes. This is what makes a published generation
//! immutable: later edits to the source tree change nothing here.

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
        fs::create_dir_all(root.join("tmp"))?;
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
        for _ in 0..3 {
            let mut f = open_regular(source)?;
            let before = f.metadata()?;
            let (size, digest, tmp) = self.compress_from(&mut f)?;
            let after = fs::symlink_metadata(source)?;
            if before.len() != after.len()
                || before.mtime_nsec() != after.mtime_nsec()
                || before.mtime() != after.mtime()
                || size != after.len()
            {
                drop(tmp);
                continue;
            }
            self.persist(tmp, &digest)?;
            return Ok((size, digest));
        }
        Err(io::Error::other(format!("`{}` kept changing while it was being published", source.display())))
    }

    /// Stores `data` and returns its digest.
    ///
    /// # Errors
    /// I/O errors.
    pub fn put_bytes(&self, data: &[u8]) -> io::Result<Digest> {
        let (_, digest, tmp) = self.compress_from(&mut &data[..])?;
        self.persist(tmp, &digest)?;
        Ok(digest)
    }

    fn compress_from(&self, input: &mut dyn Read) -> io::Result<(u64, Digest, tempfile::NamedTempFile)> {
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))?;
        let mut enc = zstd::stream::write::Encoder::new(BufWriter::new(tmp.reopen()?), self.level)?;
        enc.include_checksum(false)?;
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            size += n as u64;
            h.update(&buf[..n]);
            enc.write_all(&buf[..n])?;
        }
        let out = enc.finish()?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok((size, h.finalize().into(), tmp))
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
}
