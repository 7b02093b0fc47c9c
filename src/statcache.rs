//! The recipient's stat cache: what every regular file of the data tree looked like when it was last hashed
//! (a [`Stamp`]) and its digest, so that a rescan reads only the files that changed (see
//! [`crate::scan::scan_cached`]).
//!
//! The cache is one file in the state directory, `stat-cache`, read whole and written whole (to a temporary
//! file beside it, synced, then renamed over it). It is only ever an optimisation: a missing, truncated,
//! corrupt or unknown-version file is an empty cache, which costs one full rehash and never a wrong answer,
//! because an entry is used only when the file's whole stamp still matches.
//!
//! # Format, version 1
//! All integers are little-endian.
//! - Header, 24 bytes: the magic `MFSTATC\0`, the version (`u32`, 1), flags (`u32`, 0), the number of
//!   records (`u64`).
//! - The records, sorted by path bytes, each path strictly greater than the one before. Each record: the
//!   number of leading bytes its path shares with the previous path (`u16`), the number of bytes that follow
//!   (`u16`), those bytes, then size (`u64`), mtime and ctime in nanoseconds since the epoch (`i64` each),
//!   inode (`u64`), mode bits (`u32`) and the BLAKE3 digest (32 bytes).
//! - Trailer: the BLAKE3 digest of everything before it (32 bytes).

use std::io::{self, Write};
use std::path::Path;

use crate::manifest::Digest;
use crate::path::RelPath;

const MAGIC: &[u8; 8] = b"MFSTATC\0";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 24;
const FIXED_LEN: usize = 8 + 8 + 8 + 8 + 4 + 32;

/// What a regular file looked like on disk. When all of it is unchanged, so is the content: any write
/// changes `ctime`, which no one can set back.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Stamp {
    /// Length.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Status change time, nanoseconds since the epoch.
    pub ctime_ns: i64,
    /// Inode number.
    pub ino: u64,
    /// Mode bits.
    pub mode: u32,
}

/// The name of the stat cache file in a recipient's state directory.
pub const FILE_NAME: &str = "stat-cache";

/// Digests of files as they were when last hashed, by tree-relative path, sorted by path bytes.
///
/// Paths are kept in one buffer, so loading a cache of a large tree allocates a handful of times rather than
/// once per file.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct StatCache {
    /// Every path, concatenated in order.
    names: Vec<u8>,
    /// One record per path; a record's path ends at `end` in `names` and starts where the one before ends.
    records: Vec<Record>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Record {
    end: usize,
    stamp: Stamp,
    digest: Digest,
}

/// Why a stat cache file was not used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The file could not be read.
    #[error("failed to read `{}`", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file is not a stat cache this version of mailferry can read.
    #[error("not a version {VERSION} stat cache")]
    Unknown,
    /// The file ends early, its checksum does not match, or its records are out of order.
    #[error("corrupt stat cache: {0}")]
    Corrupt(&'static str),
}

impl StatCache {
    /// The empty cache.
    pub fn new() -> StatCache {
        StatCache::default()
    }

    /// Number of files in the cache.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn path_at(&self, idx: usize) -> &[u8] {
        let start = if idx == 0 { 0 } else { self.records[idx - 1].end };
        &self.names[start..self.records[idx].end]
    }

    /// The stamp and digest cached for `path`.
    pub fn get(&self, path: &str) -> Option<(Stamp, Digest)> {
        let idx = self.position(path.as_bytes()).ok()?;
        let r = &self.records[idx];
        Some((r.stamp, r.digest))
    }

    /// Where `path` is in the records, or where it would go.
    fn position(&self, path: &[u8]) -> Result<usize, usize> {
        let (mut lo, mut hi) = (0, self.records.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.path_at(mid).cmp(path) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(mid),
            }
        }
        Err(lo)
    }

    /// Every entry, sorted by path bytes.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Stamp, Digest)> {
        (0..self.records.len()).map(|i| (self.path_at(i), self.records[i].stamp, self.records[i].digest))
    }

    /// A cursor that looks paths up in ascending order, each lookup starting where the one before stopped.
    pub(crate) fn cursor(&self) -> Cursor<'_> {
        Cursor { cache: self, next: 0 }
    }

    /// Appends an entry whose path sorts after every path already in the cache.
    ///
    /// # Panics
    /// When `path` does not sort after the last path (a bug in the caller).
    pub(crate) fn push(&mut self, path: &str, stamp: Stamp, digest: Digest) {
        if let Some(last) = self.records.len().checked_sub(1) {
            assert!(self.path_at(last) < path.as_bytes(), "stat cache entries must be pushed in path order");
        }
        self.names.extend_from_slice(path.as_bytes());
        self.records.push(Record { end: self.names.len(), stamp, digest });
    }

    /// Reads the cache file at `path`. A missing file is an empty cache.
    ///
    /// # Errors
    /// See [`CacheError`]; the caller should carry on with an empty cache.
    pub fn load(path: &Path) -> Result<StatCache, CacheError> {
        match std::fs::read(path) {
            Ok(bytes) => StatCache::decode(&bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(StatCache::new()),
            Err(source) => Err(CacheError::Read { path: path.to_path_buf(), source }),
        }
    }

    /// Writes the cache to `path` atomically: a temporary file in the same directory, synced, then renamed
    /// over `path`. After a crash, `path` holds the old cache or the new one.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let mut tmp = tempfile::Builder::new().prefix(".stat-cache.").tempfile_in(dir)?;
        tmp.write_all(&self.encode())?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }

    /// The file form (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.names.len() + self.records.len() * (FIXED_LEN + 4) + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(self.records.len() as u64).to_le_bytes());
        let mut prev: &[u8] = &[];
        for (path, stamp, digest) in self.iter() {
            // Paths are at most 3072 bytes (`RelPath`), so both lengths fit in a u16.
            let shared = prev.iter().zip(path).take_while(|(a, b)| a == b).count().min(usize::from(u16::MAX));
            let rest = &path[shared..];
            out.extend_from_slice(&(shared as u16).to_le_bytes());
            out.extend_from_slice(&(rest.len() as u16).to_le_bytes());
            out.extend_from_slice(rest);
            out.extend_from_slice(&stamp.size.to_le_bytes());
            out.extend_from_slice(&stamp.mtime_ns.to_le_bytes());
            out.extend_from_slice(&stamp.ctime_ns.to_le_bytes());
            out.extend_from_slice(&stamp.ino.to_le_bytes());
            out.extend_from_slice(&stamp.mode.to_le_bytes());
            out.extend_from_slice(&digest.0);
            prev = path;
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parses the file form, checking the checksum and the order of the records.
    ///
    /// # Errors
    /// [`CacheError::Unknown`] or [`CacheError::Corrupt`].
    pub fn decode(bytes: &[u8]) -> Result<StatCache, CacheError> {
        if bytes.len() < HEADER_LEN + 32 || &bytes[..8] != MAGIC {
            return Err(CacheError::Unknown);
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) != VERSION
            || u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")) != 0
        {
            return Err(CacheError::Unknown);
        }
        if blake3::hash(body) != blake3::Hash::from_bytes(sum.try_into().expect("32 bytes")) {
            return Err(CacheError::Corrupt("checksum mismatch"));
        }
        let count = u64::from_le_bytes(body[16..24].try_into().expect("8 bytes"));
        // Each record takes at least FIXED_LEN + 4 bytes: a count the body cannot hold is corrupt.
        let count = usize::try_from(count)
            .ok()
            .filter(|n| n.saturating_mul(FIXED_LEN + 4) <= body.len() - HEADER_LEN)
            .ok_or(CacheError::Corrupt("record count too large"))?;
        let mut r = Reader { rest: &body[HEADER_LEN..] };
        let mut cache = StatCache { names: Vec::with_capacity(body.len() / 2), records: Vec::with_capacity(count) };
        let mut prev_start = 0;
        for _ in 0..count {
            let shared = usize::from(r.u16()?);
            let len = usize::from(r.u16()?);
            let prev_len = cache.names.len() - prev_start;
            if shared > prev_len {
                return Err(CacheError::Corrupt("shared prefix longer than the previous path"));
            }
            let start = cache.names.len();
            cache.names.extend_from_within(prev_start..prev_start + shared);
            cache.names.extend_from_slice(r.take(len)?);
            if start > 0 && cache.names[prev_start..start] >= cache.names[start..] {
                return Err(CacheError::Corrupt("records out of order"));
            }
            if start == cache.names.len() {
                return Err(CacheError::Corrupt("empty path"));
            }
            let stamp = Stamp {
                size: r.u64()?,
                mtime_ns: r.u64()? as i64,
                ctime_ns: r.u64()? as i64,
                ino: r.u64()?,
                mode: r.u32()?,
            };
            let digest = Digest(r.take(32)?.try_into().expect("32 bytes"));
            cache.records.push(Record { end: cache.names.len(), stamp, digest });
            prev_start = start;
        }
        if !r.rest.is_empty() {
            return Err(CacheError::Corrupt("bytes after the last record"));
        }
        Ok(cache)
    }
}

impl FromIterator<(RelPath, (Stamp, Digest))> for StatCache {
    fn from_iter<I: IntoIterator<Item = (RelPath, (Stamp, Digest))>>(it: I) -> StatCache {
        let mut all: Vec<_> = it.into_iter().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.dedup_by(|b, a| a.0 == b.0);
        let mut cache = StatCache::new();
        for (p, (stamp, digest)) in all {
            cache.push(p.as_str(), stamp, digest);
        }
        cache
    }
}

/// Looks up paths given in ascending order in one pass over a [`StatCache`].
pub(crate) struct Cursor<'a> {
    cache: &'a StatCache,
    next: usize,
}

impl Cursor<'_> {
    /// The entry for `path`, which must not sort before any path given earlier.
    pub(crate) fn seek(&mut self, path: &str) -> Option<(Stamp, Digest)> {
        let path = path.as_bytes();
        while self.next < self.cache.records.len() {
            let here = self.cache.path_at(self.next);
            match here.cmp(path) {
                std::cmp::Ordering::Less => self.next += 1,
                std::cmp::Ordering::Equal => {
                    let r = &self.cache.records[self.next];
                    self.next += 1;
                    return Some((r.stamp, r.digest));
                }
                std::cmp::Ordering::Greater => return None,
            }
        }
        None
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CacheError> {
        if self.rest.len() < n {
            return Err(CacheError::Corrupt("truncated record"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, CacheError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, CacheError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, CacheError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(n: u64) -> Stamp {
        Stamp { size: n, mtime_ns: n as i64 * 10, ctime_ns: -(n as i64), ino: n + 7, mode: 0o100644 }
    }

    fn sample() -> StatCache {
        // "a.txt" sorts between "a" and "a/b": byte order, not walk order.
        ["a/b", "a", "a.txt", "a/b/c", "zz", "a/bc"]
            .iter()
            .enumerate()
            .map(|(i, p)| (RelPath::new(p).unwrap(), (stamp(i as u64), Digest::of(p.as_bytes()))))
            .collect()
    }

    #[test]
    fn round_trips_and_looks_up() {
        let c = sample();
        let back = StatCache::decode(&c.encode()).unwrap();
        assert_eq!(back, c);
        let paths: Vec<&[u8]> = back.iter().map(|(p, _, _)| p).collect();
        assert_eq!(paths, [&b"a"[..], b"a.txt", b"a/b", b"a/b/c", b"a/bc", b"zz"]);
        assert_eq!(back.get("a/b/c"), Some((stamp(3), Digest::of(b"a/b/c"))));
        assert_eq!(back.get("a/b/"), None);
        let mut cur = back.cursor();
        assert_eq!(cur.seek("a.txt").map(|(s, _)| s), Some(stamp(2)));
        assert_eq!(cur.seek("a/a"), None);
        assert_eq!(cur.seek("zz").map(|(s, _)| s), Some(stamp(4)));
        assert_eq!(StatCache::decode(&StatCache::new().encode()).unwrap(), StatCache::new());
    }

    #[test]
    fn any_damage_is_refused() {
        let bytes = sample().encode();
        for cut in [0, 8, 23, 24, bytes.len() - 33, bytes.len() - 1] {
            assert!(StatCache::decode(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
        for i in (0..bytes.len()).step_by(7) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(StatCache::decode(&bad).is_err(), "bit flipped at {i}");
        }
        let mut other_version = bytes.clone();
        other_version[8] = 2;
        assert!(matches!(StatCache::decode(&other_version), Err(CacheError::Unknown)));
    }

    #[test]
    fn records_out_of_order_are_refused_even_with_a_valid_checksum() {
        let mut swapped = StatCache::new();
        swapped.names = b"ba".to_vec();
        swapped.records = vec![
            Record { end: 1, stamp: stamp(1), digest: Digest::of(b"b") },
            Record { end: 2, stamp: stamp(2), digest: Digest::of(b"a") },
        ];
        assert!(matches!(StatCache::decode(&swapped.encode()), Err(CacheError::Corrupt(_))));
    }

    #[test]
    fn saves_atomically_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        assert_eq!(StatCache::load(&path).unwrap(), StatCache::new());
        sample().save(&path).unwrap();
        assert_eq!(StatCache::load(&path).unwrap(), sample());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [FILE_NAME], "no temporary file is left behind");
    }
}
