//! Reading a tree from disk into a [`Manifest`].
//!
//! The walk never follows symbolic links. Directories, regular files and symbolic links that stay inside
//! the tree become manifest entries; links that lead outside it (by their own target, or followed through
//! the tree's other links) or never resolve, and special files (devices, FIFOs,
//! sockets) are reported separately as [`Foreign`] entries, because mailferry never creates, follows or
//! writes through them, and the caller decides whether their presence is acceptable. Names that are not valid [`RelPath`]s (non-UTF-8, control characters...) stop
//! the scan with an error naming the file: mailferry cannot describe them, so it must not guess.
//!
//! Files are hashed on all cores. This module only reads.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use rustix::fs::{AtFlags, FileType, Mode as RawMode, OFlags};

use crate::manifest::{Digest, Entry, FileMeta, LinkTarget, Manifest, Mode, TreeError};
use crate::path::{PathError, RelPath};

/// A non-regular entry found in a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    /// Where it is.
    pub path: RelPath,
    /// What it is.
    pub kind: ForeignKind,
}

/// What a [`Foreign`] entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForeignKind {
    /// A symbolic link whose target leads outside the tree, by itself or through the tree's other links,
    /// or never resolves (a loop), or is not a valid UTF-8 relative path.
    Symlink {
        /// The link's target as stored.
        target: PathBuf,
    },
    /// A block or character device, FIFO or socket.
    Special(&'static str),
}

/// A tree as found on disk.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// The directories and regular files.
    pub manifest: Manifest,
    /// Everything else.
    pub foreign: Vec<Foreign>,
}

/// Why a tree could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    /// An I/O failure on a path.
    #[error("failed to read `{}`", path.display())]
    Io {
        /// The path being read.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A name mailferry cannot represent.
    #[error("cannot manage `{}`", path.display())]
    BadName {
        /// The offending file.
        path: PathBuf,
        /// Which rule it breaks.
        source: PathError,
    },
    /// A directory or file that is one of the [`Exclude`]d (the same device and inode), however the walk
    /// reached it: a hard link, a bind mount, or a tree that contains what must not be read.
    #[error(
        "`{}` is `{}`, part of mailferry's own state (the same file or directory, through a hard link or a mount); take it out of the tree",
        path.display(),
        excluded.display()
    )]
    Excluded {
        /// Where the walk found it.
        path: PathBuf,
        /// What it is, in the excluded directory.
        excluded: PathBuf,
    },
    /// The tree's names collide on a case-insensitive file system, or similar.
    #[error("tree at `{}` is not portable", root.display())]
    Tree {
        /// The tree root.
        root: PathBuf,
        /// What is wrong.
        source: TreeError,
    },
}

/// Reads the size and BLAKE3 of one regular file; the function [`scan_with`] calls per file.
pub type FileReader<'a> = dyn Fn(&Path) -> io::Result<(u64, Digest)> + Sync + 'a;

/// Scans `root`, hashing every regular file with [`hash_file`].
///
/// # Errors
/// See [`ScanError`].
pub fn scan(root: &Path) -> Result<Scan, ScanError> {
    scan_with(root, &hash_file)
}

/// Scans `root`, calling `read` once for every regular file (in parallel) to learn its size and digest.
/// The owner uses this to hash and store content in a single read.
///
/// # Errors
/// See [`ScanError`].
pub fn scan_with(root: &Path, read: &FileReader<'_>) -> Result<Scan, ScanError> {
    scan_excluding(root, read, &Exclude::default())
}

/// [`scan_with`], refusing the tree when any directory in it (the root included) or any regular file is
/// one of `exclude`, by device and inode. Every directory and file is checked while the tree is walked,
/// before `read` sees any file.
///
/// # Errors
/// [`ScanError::Excluded`], and see [`ScanError`].
pub fn scan_excluding(root: &Path, read: &FileReader<'_>, exclude: &Exclude) -> Result<Scan, ScanError> {
    Ok(walk(root, read, None, exclude, now_ns())?.scan)
}

/// Directories and files, by device and inode, that a scan must not reach: the owner's state directory,
/// its ancestors and everything in it. Paths cannot see a hard link or a bind mount; inodes can.
#[derive(Debug, Clone, Default)]
pub struct Exclude {
    /// (device, inode) and the path it was found at.
    ids: std::collections::HashMap<(u64, u64), PathBuf>,
}

impl Exclude {
    /// The directory `dir` (symbolic links resolved), each of its ancestors, and every directory and
    /// regular file below it (links inside it are not followed).
    ///
    /// # Errors
    /// I/O errors reading `dir`.
    pub fn directory(dir: &Path) -> io::Result<Exclude> {
        let dir = fs::canonicalize(dir)?;
        let mut ex = Exclude::default();
        for a in dir.ancestors().skip(1) {
            let m = fs::metadata(a)?;
            ex.ids.insert((m.dev(), m.ino()), a.to_path_buf());
        }
        let mut todo = vec![dir];
        while let Some(d) = todo.pop() {
            let m = fs::symlink_metadata(&d)?;
            ex.ids.insert((m.dev(), m.ino()), d.clone());
            for e in fs::read_dir(&d)? {
                let e = e?;
                // The directory entry's type and inode come with the listing: the store's many objects cost
                // no stat each (a file's device is its directory's; only directories can be mount points).
                // Files may come and go while the state is in use: one gone already matters no more.
                let Ok(kind) = e.file_type() else { continue };
                if kind.is_dir() {
                    todo.push(e.path());
                } else if kind.is_file() {
                    use std::os::unix::fs::DirEntryExt as _;
                    ex.ids.insert((m.dev(), e.ino()), e.path());
                }
            }
        }
        Ok(ex)
    }

    /// How many directories and files are excluded.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether nothing is excluded.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    // The field types of `struct stat` differ between architectures: a cast that changes nothing here
    // converts on another.
    #[allow(clippy::unnecessary_cast)]
    fn check(&self, st: &rustix::fs::Stat, path: impl FnOnce() -> PathBuf) -> Result<(), ScanError> {
        if self.ids.is_empty() {
            return Ok(());
        }
        match self.ids.get(&(st.st_dev as u64, st.st_ino as u64)) {
            Some(excluded) => Err(ScanError::Excluded { path: path(), excluded: excluded.clone() }),
            None => Ok(()),
        }
    }
}

pub use crate::statcache::Stamp;

impl Stamp {
    /// The stamp of a file's metadata.
    pub fn of(m: &fs::Metadata) -> Stamp {
        Stamp {
            size: m.len(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec()),
            ctime_ns: m.ctime().saturating_mul(1_000_000_000).saturating_add(m.ctime_nsec()),
            ino: m.ino(),
            mode: m.mode(),
        }
    }

    // The field types of `struct stat` differ between architectures: a cast that changes nothing here
    // converts on another.
    #[allow(clippy::unnecessary_cast)]
    fn from_stat(st: &rustix::fs::Stat) -> Stamp {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Stamp {
            size: st.st_size as u64,
            mtime_ns: ns(st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime_ns: ns(st.st_ctime as i64, st.st_ctime_nsec as i64),
            ino: st.st_ino as u64,
            mode: st.st_mode as u32,
        }
    }
}

pub use crate::statcache::StatCache;

/// The result of [`scan_cached`].
#[derive(Debug)]
pub struct CachedScan {
    /// The tree.
    pub scan: Scan,
    /// The cache to keep for the next scan, or `None` when it is the cache given: every entry of it still
    /// matched and no file read now could join it. An unchanged tree has nothing to write.
    pub cache: Option<StatCache>,
    /// How many files had to be read.
    pub hashed: usize,
}

/// Scans `root`, reading only files whose [`Stamp`] differs from the one in `cache`. Files changed within
/// two seconds of the scan are hashed but not cached: a later write in the same clock tick could leave
/// their stamp unchanged (git's "racily clean" problem).
///
/// # Errors
/// See [`ScanError`].
pub fn scan_cached(root: &Path, cache: &StatCache) -> Result<CachedScan, ScanError> {
    walk(root, &hash_file, Some(cache), &Exclude::default(), now_ns())
}

/// [`scan_excluding`] with a stat cache: `read` is called only for files whose [`Stamp`] differs from the
/// one in `cache` (the owner's `publish`, which stores what it reads). What is cached and when is as for
/// [`scan_cached`].
///
/// # Errors
/// [`ScanError::Excluded`], and see [`ScanError`].
pub fn scan_excluding_cached(
    root: &Path,
    read: &FileReader<'_>,
    exclude: &Exclude,
    cache: &StatCache,
) -> Result<CachedScan, ScanError> {
    walk(root, read, Some(cache), exclude, now_ns())
}

fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// An entry found by the walk, before the files' contents are known.
enum Found {
    Dir,
    Link(LinkTarget),
    File {
        stamp: Stamp,
        mode: Mode,
        /// Size and digest, and whether they were read now (rather than taken from the cache).
        content: Option<(u64, Digest, bool)>,
    },
}

/// Walks `root`; `started_ns` is when the scan started (nanoseconds since the epoch), the reference for
/// what counts as racily clean.
fn walk(
    root: &Path,
    read: &FileReader<'_>,
    cache: Option<&StatCache>,
    exclude: &Exclude,
    started_ns: i64,
) -> Result<CachedScan, ScanError> {
    let racy_after = started_ns - 2_000_000_000;
    let (mut found, foreign) = read_tree(root, exclude)?;
    // In path order, the cache is looked up in one pass and the manifest and the new cache are built
    // without searching.
    found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut todo = Vec::new();
    let mut hits = 0;
    if let Some(cache) = cache {
        let mut cursor = cache.cursor();
        for (idx, (rel, f)) in found.iter_mut().enumerate() {
            if let Found::File { stamp, content, .. } = f {
                match cursor.seek(rel.as_str()) {
                    Some((old, digest)) if old == *stamp => {
                        hits += 1;
                        *content = Some((stamp.size, digest, false));
                    }
                    _ => todo.push((idx, root.join(rel.as_str()), stamp.size)),
                }
            }
        }
    } else {
        for (idx, (rel, f)) in found.iter().enumerate() {
            if let Found::File { stamp, .. } = f {
                todo.push((idx, root.join(rel.as_str()), stamp.size));
            }
        }
    }
    let hashed = todo.len();
    for (idx, size, digest) in hash_all(&todo, read)? {
        if let Found::File { content, .. } = &mut found[idx].1 {
            *content = Some((size, digest, true));
        }
    }
    // A file read now is cached only if it was not changing while it was read and is old enough that a
    // write in the same clock tick as the stamp cannot have gone unnoticed.
    let cacheable = |stamp: &Stamp, content: &Option<(u64, Digest, bool)>| match content {
        Some((_, _, false)) => true,
        Some((size, _, true)) => stamp.size == *size && stamp.mtime_ns.max(stamp.ctime_ns) < racy_after,
        None => false,
    };
    // The new cache is built only when it differs from the old one: when an old entry went unused or a
    // file read now joins it.
    let mut new_cache = cache
        .filter(|old| {
            hits != old.len()
                || found.iter().any(|(_, f)| matches!(f, Found::File { stamp, content: c @ Some((_, _, true)), .. } if cacheable(stamp, c)))
        })
        .map(|_| StatCache::new());
    let mut entries = Vec::with_capacity(found.len());
    for (rel, f) in found {
        let entry = match f {
            Found::Dir => Entry::Dir,
            Found::Link(t) => Entry::Link(t),
            Found::File { stamp, mode, content } => {
                if let Some(c) = &mut new_cache
                    && cacheable(&stamp, &content)
                {
                    let (_, digest, _) = content.expect("cacheable content is known");
                    c.push(rel.as_str(), stamp, digest);
                }
                let (size, blake3, _) = content.expect("every file was found in the cache or read");
                Entry::File(FileMeta { size, mode, blake3 })
            }
        };
        entries.push((rel, entry));
    }
    let mut manifest: Manifest = entries.into_iter().collect();
    let foreign = judge_links(&mut manifest, foreign);
    let out = Scan { manifest, foreign };
    out.manifest.validate_shape().map_err(|source| ScanError::Tree { root: root.to_path_buf(), source })?;
    Ok(CachedScan { scan: out, cache: new_cache, hashed })
}

/// Moves the links of `manifest` that lead outside the tree or never resolve when followed through the
/// tree's other links (see [`Manifest::validate_links`]) to `foreign`, which is returned sorted by path.
///
/// Each link was judged by its own target during the walk; this judges the chains, which only the whole
/// tree shows (`d/y -> ..` and `d/z -> y/../..` each stay inside, and `d/z` followed leaves). A chain through
/// a link already found foreign leads outside too.
fn judge_links(manifest: &mut Manifest, mut foreign: Vec<Foreign>) -> Vec<Foreign> {
    let outside: std::collections::HashSet<&str> =
        foreign.iter().filter(|f| matches!(f.kind, ForeignKind::Symlink { .. })).map(|f| f.path.as_str()).collect();
    let bad: Vec<RelPath> = manifest.bad_links(&|p| outside.contains(p)).into_iter().map(|(p, _)| p).collect();
    if bad.is_empty() {
        return foreign;
    }
    for path in bad {
        if let Some(Entry::Link(target)) = manifest.remove(&path) {
            foreign.push(Foreign { path, kind: ForeignKind::Symlink { target: PathBuf::from(target.as_str()) } });
        }
    }
    foreign.sort_by(|a, b| a.path.cmp(&b.path));
    foreign
}

/// What a walk found: the entries a manifest can hold, and the others.
type Walked = (Vec<(RelPath, Found)>, Vec<Foreign>);

/// A directory waiting to be read: its parent's handle, its name there, and its path in the tree.
struct PendingDir {
    parent: Arc<OwnedFd>,
    name: CString,
    rel: RelPath,
}

/// A directory for a walker thread to read.
enum Job {
    Root(OwnedFd),
    Dir(PendingDir),
}

/// What the walker threads share.
struct Queue {
    /// The root's handle until a thread takes it.
    root: Option<OwnedFd>,
    pending: Vec<PendingDir>,
    /// Threads reading a directory now (and so perhaps about to queue more).
    busy: usize,
    error: Option<ScanError>,
}

/// Reads every directory entry below `root`, and stats every regular file, on several threads (the way
/// git's `preloadIndex` does). Each directory is opened relative to its parent's handle with
/// `O_NOFOLLOW`, so the walk never leaves the tree through a symbolic link swapped in while it runs, and
/// each entry is looked at relative to its directory, so the kernel never resolves a full path. Returns
/// the entries in no particular order, and the foreign ones sorted by path.
fn read_tree(root: &Path, exclude: &Exclude) -> Result<Walked, ScanError> {
    // The root itself may be reached through a symbolic link (a data tree configured through one).
    let fd = rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, RawMode::empty())
        .map_err(|e| ScanError::Io { path: root.to_path_buf(), source: e.into() })?;
    if !exclude.is_empty() {
        let st = rustix::fs::fstat(&fd).map_err(|e| ScanError::Io { path: root.to_path_buf(), source: e.into() })?;
        exclude.check(&st, || root.to_path_buf())?;
    }
    let queue = Mutex::new(Queue { root: Some(fd), pending: Vec::new(), busy: 0, error: None });
    let wake = Condvar::new();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, MAX_WALKERS);
    let parts = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers).map(|_| s.spawn(|| walker(root, exclude, &queue, &wake))).collect();
        handles.into_iter().map(|h| h.join().expect("walker threads do not panic")).collect::<Vec<_>>()
    });
    if let Some(e) = queue.into_inner().expect("no panics while held").error {
        return Err(e);
    }
    let (mut found, mut foreign) = (Vec::new(), Vec::new());
    for (f, x) in parts {
        found.extend(f);
        foreign.extend(x);
    }
    foreign.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((found, foreign))
}

/// One walker thread: takes directories from `queue` until none is left and no other thread can queue
/// more, or until any thread fails.
fn walker(root: &Path, exclude: &Exclude, queue: &Mutex<Queue>, wake: &Condvar) -> Walked {
    let mut out = (Vec::new(), Vec::new());
    let mut q = queue.lock().expect("no panics while held");
    loop {
        if q.error.is_some() {
            return out;
        }
        let job = match q.root.take() {
            Some(fd) => Job::Root(fd),
            None => match q.pending.pop() {
                Some(p) => Job::Dir(p),
                None if q.busy == 0 => return out,
                None => {
                    q = wake.wait(q).expect("no panics while held");
                    continue;
                }
            },
        };
        q.busy += 1;
        drop(q);
        // Opened outside the lock, so that threads wait for each other only to take work.
        let (dir, rel) = match job {
            Job::Root(fd) => (Ok(fd), None),
            Job::Dir(p) => {
                let io_err = |e: rustix::io::Errno| ScanError::Io { path: root.join(p.rel.as_str()), source: e.into() };
                // A directory is checked once opened: a mount point's own inode is only seen from inside.
                let dir = rustix::fs::openat(&*p.parent, &p.name, no_follow_dir(), RawMode::empty())
                    .map_err(io_err)
                    .and_then(|fd| {
                        if !exclude.is_empty() {
                            let st = rustix::fs::fstat(&fd).map_err(io_err)?;
                            exclude.check(&st, || root.join(p.rel.as_str()))?;
                        }
                        Ok(fd)
                    });
                (dir, Some(p.rel))
            }
        };
        let mut subdirs = Vec::new();
        let res = dir.and_then(|dir| read_dir(root, dir, rel.as_ref(), exclude, &mut out, &mut subdirs));
        q = queue.lock().expect("no panics while held");
        q.busy -= 1;
        match res {
            Ok(()) => q.pending.append(&mut subdirs),
            Err(e) => {
                q.error.get_or_insert(e);
            }
        }
        wake.notify_all();
    }
}

/// At most this many threads walk a tree: beyond it, they only contend for the directory queue.
const MAX_WALKERS: usize = 4;

fn no_follow_dir() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Reads the directory `dir` (at `rel` in the tree, `None` for the root): its entries go to `out`, its
/// subdirectories to `subdirs`.
fn read_dir(
    root: &Path,
    dir: OwnedFd,
    rel: Option<&RelPath>,
    exclude: &Exclude,
    out: &mut Walked,
    subdirs: &mut Vec<PendingDir>,
) -> Result<(), ScanError> {
    let dir = Arc::new(dir);
    let at = || rel.map_or_else(|| root.to_path_buf(), |r| root.join(r.as_str()));
    let mut entries = rustix::fs::Dir::read_from(&*dir).map_err(|e| ScanError::Io { path: at(), source: e.into() })?;
    let mut path = rel.map_or_else(String::new, |r| format!("{}/", r.as_str()));
    let base = path.len();
    while let Some(entry) = entries.read() {
        let entry = entry.map_err(|e| ScanError::Io { path: at(), source: e.into() })?;
        let name = entry.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        let full = || at().join(std::ffi::OsStr::from_bytes(bytes));
        let Ok(name_str) = std::str::from_utf8(bytes) else {
            return Err(ScanError::BadName {
                path: full(),
                source: PathError::NotUtf8(String::from_utf8_lossy(bytes).into_owned()),
            });
        };
        path.truncate(base);
        path.push_str(name_str);
        let rel = RelPath::new(&path).map_err(|source| ScanError::BadName { path: full(), source })?;
        let io_err = |e: rustix::io::Errno| ScanError::Io { path: full(), source: e.into() };
        let kind = match entry.file_type() {
            FileType::Directory => FileType::Directory,
            FileType::Symlink => FileType::Symlink,
            // Regular files need their stamp anyway; unknown types are found out the same way.
            _ => {
                let st = rustix::fs::statat(&*dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(io_err)?;
                let kind = FileType::from_raw_mode(st.st_mode as _);
                if kind == FileType::RegularFile {
                    exclude.check(&st, full)?;
                    let stamp = Stamp::from_stat(&st);
                    out.0.push((rel, Found::File { stamp, mode: Mode::from_bits(stamp.mode), content: None }));
                    continue;
                }
                kind
            }
        };
        match kind {
            FileType::Directory => {
                subdirs.push(PendingDir { parent: Arc::clone(&dir), name: name.to_owned(), rel: rel.clone() });
                out.0.push((rel, Found::Dir));
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(&*dir, name, Vec::new()).map_err(io_err)?;
                let target = PathBuf::from(std::ffi::OsString::from_vec(target.into_bytes()));
                let managed = target
                    .to_str()
                    .and_then(|t| LinkTarget::new(t).ok())
                    .filter(|t| !crate::manifest::link_escapes(&rel, t.as_str()));
                match managed {
                    Some(t) => out.0.push((rel, Found::Link(t))),
                    None => out.1.push(Foreign { path: rel, kind: ForeignKind::Symlink { target } }),
                }
            }
            FileType::BlockDevice => out.1.push(Foreign { path: rel, kind: ForeignKind::Special("block device") }),
            FileType::CharacterDevice => {
                out.1.push(Foreign { path: rel, kind: ForeignKind::Special("character device") });
            }
            FileType::Fifo => out.1.push(Foreign { path: rel, kind: ForeignKind::Special("FIFO") }),
            _ => out.1.push(Foreign { path: rel, kind: ForeignKind::Special("socket") }),
        }
    }
    Ok(())
}

/// Reads every file in `files` (its index in the walk, full path and expected size) on all cores, returning
/// each one's index, size and digest.
fn hash_all(files: &[(usize, PathBuf, u64)], read: &FileReader<'_>) -> Result<Vec<(usize, u64, Digest)>, ScanError> {
    let next = AtomicUsize::new(0);
    let total: u64 = files.iter().map(|(_, _, size)| size).sum();
    let progress = crate::progress::Progress::bytes("hashing", total);
    let results = Mutex::new(Vec::with_capacity(files.len()));
    let first_error = Mutex::new(None);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).min(files.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((idx, full, _)) = files.get(i) else { break };
                    match read(full) {
                        Ok((size, blake3)) => {
                            progress.add(size);
                            results.lock().expect("no panics while held").push((*idx, size, blake3));
                        }
                        Err(source) => {
                            first_error
                                .lock()
                                .expect("no panics while held")
                                .get_or_insert(ScanError::Io { path: full.clone(), source });
                            // Stop the other workers early.
                            next.store(files.len(), Ordering::Relaxed);
                            break;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().expect("no panics while held") {
        return Err(e);
    }
    Ok(results.into_inner().expect("no panics while held"))
}

/// Size and BLAKE3 of a regular file, reading it once. Refuses to open anything but a regular file (a
/// FIFO swapped in would block forever).
///
/// # Errors
/// I/O errors, and `InvalidInput` when the path is not a regular file.
pub fn hash_file(path: &Path) -> io::Result<(u64, Digest)> {
    let f = open_regular(path)?;
    let len = f.metadata()?.len();
    hash_reader(f, len)
}

/// Size and BLAKE3 of everything `r` yields, read in chunks sized for about `len` bytes (zeroing a
/// 256 KiB buffer costs more than reading a small file).
///
/// # Errors
/// Read errors.
pub fn hash_reader(mut r: impl Read, len: u64) -> io::Result<(u64, Digest)> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; chunk_for(len)];
    let mut size = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((size, h.finalize().into()));
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
}

/// A read buffer for `len` bytes: the length plus one (so end of file shows in one more read), at least
/// 4 KiB, at most 256 KiB.
pub fn chunk_for(len: u64) -> usize {
    usize::try_from(len.saturating_add(1)).unwrap_or(usize::MAX).clamp(4096, 256 * 1024)
}

/// Opens `path` for reading without following a final symlink and without blocking on a FIFO, and checks
/// that it is a regular file.
///
/// # Errors
/// I/O errors, and `InvalidInput` when the path is not a regular file.
pub fn open_regular(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("`{}` is not a regular file", path.display())));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    #[test]
    fn scans_files_dirs_and_foreign_entries() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/empty")).unwrap();
        fs::write(root.join("a/x"), b"hello").unwrap();
        fs::write(root.join("run.sh"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o750)).unwrap();
        symlink("x", root.join("a/inside")).unwrap();
        symlink("../../etc", root.join("a/outside")).unwrap();
        let s = scan(root).unwrap();
        let p = |s: &str| RelPath::new(s).unwrap();
        assert_eq!(s.manifest.get(&p("a/empty")), Some(&Entry::Dir));
        match s.manifest.get(&p("a/x")) {
            Some(Entry::File(f)) => assert_eq!((f.size, f.blake3, f.mode), (5, Digest::of(b"hello"), Mode::Regular)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.manifest.get(&p("run.sh")), Some(Entry::File(f)) if f.mode == Mode::Executable));
        assert_eq!(s.manifest.get(&p("a/inside")), Some(&Entry::Link(LinkTarget::new("x").unwrap())));
        assert_eq!(s.foreign.len(), 1);
        assert_eq!(s.foreign[0].path, p("a/outside"));
        assert!(matches!(&s.foreign[0].kind, ForeignKind::Symlink { .. }));
        assert_eq!(s.manifest.len(), 5);
    }

    /// The cache a scan long after the files were written would keep: every regular file, stamped now.
    fn aged_cache(root: &Path, m: &Manifest) -> StatCache {
        m.iter()
            .filter_map(|(p, e)| match e {
                Entry::File(f) => {
                    Some((p.clone(), (Stamp::of(&fs::symlink_metadata(root.join(p.as_str())).unwrap()), f.blake3)))
                }
                _ => None,
            })
            .collect()
    }

    fn digest_of(s: &Scan, p: &str) -> Option<Digest> {
        match s.manifest.get(&RelPath::new(p).unwrap()) {
            Some(Entry::File(f)) => Some(f.blake3),
            _ => None,
        }
    }

    #[test]
    fn the_stat_cache_skips_unchanged_files_and_notices_changed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("a"), b"one").unwrap();
        fs::write(root.join("b"), b"two").unwrap();
        let first = scan_cached(root, &StatCache::new()).unwrap();
        assert_eq!(first.hashed, 2);
        assert_eq!(first.cache, None, "files written just now are racily clean: not cached");
        // Pretend the files were hashed long ago, as they would be on a real tree.
        let old = aged_cache(root, &first.scan.manifest);
        let again = scan_cached(root, &old).unwrap();
        assert_eq!(again.hashed, 0, "an unchanged tree is not read");
        assert_eq!(again.scan.manifest, first.scan.manifest);
        assert_eq!(again.cache, None, "an unchanged tree keeps the same cache");
        // Same size, and the modification time put back: the status change time still gives it away.
        let m = fs::metadata(root.join("b")).unwrap();
        fs::write(root.join("b"), b"TWO").unwrap();
        let f = fs::File::options().write(true).open(root.join("b")).unwrap();
        f.set_modified(m.modified().unwrap()).unwrap();
        let changed = scan_cached(root, &old).unwrap();
        assert_eq!(changed.hashed, 1);
        assert_eq!(digest_of(&changed.scan, "b"), Some(Digest::of(b"TWO")));
        let new = changed.cache.expect("the changed file is racily clean: its stale entry goes");
        assert_eq!(new.get("b"), None);
        assert_eq!(new.get("a"), old.get("a"));
    }

    #[test]
    fn the_stat_cache_notices_modes_new_and_deleted_files_and_type_swaps() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for name in ["keep", "chmod", "gone", "swap"] {
            fs::write(root.join(name), name.as_bytes()).unwrap();
        }
        let old = aged_cache(root, &scan(root).unwrap().manifest);
        fs::set_permissions(root.join("chmod"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::remove_file(root.join("gone")).unwrap();
        fs::write(root.join("new"), b"new").unwrap();
        fs::remove_file(root.join("swap")).unwrap();
        symlink("keep", root.join("swap")).unwrap();
        let c = scan_cached(root, &old).unwrap();
        assert_eq!(c.scan.manifest, scan(root).unwrap().manifest, "the cache changes nothing in the result");
        assert!(
            matches!(c.scan.manifest.get(&RelPath::new("chmod").unwrap()), Some(Entry::File(f)) if f.mode == Mode::Executable)
        );
        assert_eq!(c.scan.manifest.get(&RelPath::new("gone").unwrap()), None);
        assert_eq!(
            c.scan.manifest.get(&RelPath::new("swap").unwrap()),
            Some(&Entry::Link(LinkTarget::new("keep").unwrap()))
        );
        assert_eq!(digest_of(&c.scan, "new"), Some(Digest::of(b"new")));
        // chmod changes the mode and the ctime; the new file must be read.
        assert_eq!(c.hashed, 2);
        let new = c.cache.unwrap();
        let kept: Vec<&[u8]> = new.iter().map(|(p, _, _)| p).collect();
        assert_eq!(kept, [&b"keep"[..]], "only what is still there and old enough stays cached");
    }

    #[test]
    fn a_racily_clean_file_is_read_until_it_is_old_enough() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("f"), b"v1").unwrap();
        let first = scan_cached(root, &StatCache::new()).unwrap();
        assert_eq!(first.cache, None);
        // The same clock tick could hold another write that leaves the stamp as it is, so a stamp from
        // within two seconds of the scan must never be trusted.
        let second = scan_cached(root, &StatCache::new()).unwrap();
        assert_eq!((second.hashed, second.cache), (1, None));
        // Set back, the modification time gives no cover: the status change time is fresh too.
        let f = fs::File::options().write(true).open(root.join("f")).unwrap();
        f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(60)).unwrap();
        let third = scan_cached(root, &StatCache::new()).unwrap();
        assert_eq!((third.hashed, third.cache), (1, None));
        // A scan that starts three seconds later caches it, and the one after reads nothing.
        let later = now_ns() + 3_000_000_000;
        let fourth =
            walk(root, &hash_file, Some(&StatCache::new()), &Exclude::default(), later).unwrap().cache.unwrap();
        assert_eq!(fourth.get("f").map(|(_, d)| d), Some(Digest::of(b"v1")));
        let fifth = walk(root, &hash_file, Some(&fourth), &Exclude::default(), later).unwrap();
        assert_eq!((fifth.hashed, fifth.cache), (0, None));
    }

    #[test]
    fn the_cache_survives_a_round_trip_through_its_file_and_a_damaged_file_costs_only_a_rehash() {
        let dir = tempfile::tempdir().unwrap();
        let (root, state) = (dir.path().join("data"), dir.path().join("state"));
        fs::create_dir_all(root.join("d/e")).unwrap();
        fs::create_dir_all(&state).unwrap();
        for (i, name) in ["d/e/x", "d/e.txt", "d/f", "g"].iter().enumerate() {
            fs::write(root.join(name), format!("{i}")).unwrap();
        }
        let file = state.join(crate::statcache::FILE_NAME);
        let full = scan(&root).unwrap();
        aged_cache(&root, &full.manifest).save(&file).unwrap();
        let loaded = StatCache::load(&file).unwrap();
        let warm = scan_cached(&root, &loaded).unwrap();
        assert_eq!((warm.hashed, &warm.scan.manifest), (0, &full.manifest));
        assert_eq!(warm.cache, None);
        // Every entry written pairs a path with that path's own digest.
        for (p, _, d) in loaded.iter() {
            let p = std::str::from_utf8(p).unwrap();
            assert_eq!(Some(d), digest_of(&full, p), "{p}");
        }
        // A flipped bit anywhere: the file is refused, and the scan without it reads everything and agrees.
        let mut bytes = fs::read(&file).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        fs::write(&file, &bytes).unwrap();
        assert!(StatCache::load(&file).is_err());
        let cold = scan_cached(&root, &StatCache::new()).unwrap();
        assert_eq!((cold.hashed, &cold.scan.manifest), (4, &full.manifest));
    }

    #[test]
    fn the_parallel_walk_finds_everything_in_a_wide_and_deep_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut want = std::collections::BTreeSet::new();
        for a in 0..12 {
            for b in 0..4 {
                // "d.x" and "d-y" sort between "d" and "d/...": byte order is not walk order.
                let deep = format!("a{a:02}/b{b}/d/e/f");
                fs::create_dir_all(root.join(&deep)).unwrap();
                for f in ["d.x", "d-y", "d/e/f/z"] {
                    let p = format!("a{a:02}/b{b}/{f}");
                    fs::write(root.join(&p), p.as_bytes()).unwrap();
                    want.insert(p);
                }
                for (i, c) in deep.char_indices().filter(|(_, c)| *c == '/') {
                    let _ = c;
                    want.insert(deep[..i].to_owned());
                }
                want.insert(deep);
            }
        }
        let _socket = std::os::unix::net::UnixListener::bind(root.join("a03/b1/d/sock")).unwrap();
        let s = scan(root).unwrap();
        let got: std::collections::BTreeSet<String> = s.manifest.iter().map(|(p, _)| p.as_str().to_owned()).collect();
        assert_eq!(got, want);
        assert_eq!(
            s.foreign,
            [Foreign { path: RelPath::new("a03/b1/d/sock").unwrap(), kind: ForeignKind::Special("socket") }]
        );
        assert_eq!(digest_of(&s, "a05/b2/d-y"), Some(Digest::of(b"a05/b2/d-y")));
    }

    #[test]
    fn refuses_names_it_cannot_represent() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(OsStr::from_bytes(b"bad\xffname")), b"").unwrap();
        assert!(matches!(scan(dir.path()), Err(ScanError::BadName { .. })));
    }

    #[test]
    fn links_leading_out_through_other_links_or_looping_are_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("d")).unwrap();
        for (link, target) in [
            ("d/y", ".."),
            ("d/z", "y/../.."),
            ("a", "b"),
            ("b", "a"),
            ("out", "../elsewhere"),
            ("in", "out/x"),
            ("fine", "d/y/d"),
        ] {
            symlink(target, root.join(link)).unwrap();
        }
        let s = scan(root).unwrap();
        let foreign: Vec<(&str, &Path)> = s
            .foreign
            .iter()
            .map(|f| match &f.kind {
                ForeignKind::Symlink { target } => (f.path.as_str(), target.as_path()),
                ForeignKind::Special(_) => panic!("{f:?}"),
            })
            .collect();
        let want: &[(&str, &str)] =
            &[("a", "b"), ("b", "a"), ("d/z", "y/../.."), ("in", "out/x"), ("out", "../elsewhere")];
        assert_eq!(foreign, want.iter().map(|(p, t)| (*p, Path::new(t))).collect::<Vec<_>>());
        let kept: Vec<&str> = s.manifest.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(kept, ["d", "d/y", "fine"]);
    }

    #[test]
    fn excluded_inodes_are_refused_wherever_the_walk_meets_them() {
        let dir = tempfile::tempdir().unwrap();
        let (state, tree) = (dir.path().join("state"), dir.path().join("tree"));
        fs::create_dir_all(state.join("store/ab")).unwrap();
        fs::write(state.join("state.db"), b"keys").unwrap();
        fs::write(state.join("store/ab/obj"), b"object").unwrap();
        fs::create_dir_all(tree.join("deep/er")).unwrap();
        fs::write(tree.join("ok"), b"fine").unwrap();
        let ex = Exclude::directory(&state).unwrap();
        assert!(ex.len() >= 5, "state, store, store/ab, two files and the ancestors: {ex:?}");
        scan_excluding(&tree, &hash_file, &ex).unwrap();
        for (link, of) in [("deep/er/db", "state.db"), ("obj", "store/ab/obj")] {
            fs::hard_link(state.join(of), tree.join(link)).unwrap();
            scan(&tree).unwrap();
            match scan_excluding(&tree, &hash_file, &ex) {
                Err(e @ ScanError::Excluded { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(link) && msg.contains(of) && msg.contains("own state"), "{msg}");
                }
                other => panic!("{link}: {other:?}"),
            }
            fs::remove_file(tree.join(link)).unwrap();
        }
        // A tree that is the state directory, or one of its ancestors, is refused at its root.
        for root in [&state, dir.path()] {
            assert!(matches!(scan_excluding(root, &hash_file, &ex), Err(ScanError::Excluded { .. })), "{root:?}");
        }
    }

    #[test]
    fn escape_judgement() {
        use crate::manifest::link_escapes;
        let l = RelPath::new("a/b/link").unwrap();
        for (target, escapes) in [
            ("x", false),
            ("../x", false),
            ("../../x", false),
            ("../../../x", true),
            ("/etc", true),
            ("c/../../../../x", true),
        ] {
            assert_eq!(link_escapes(&l, target), escapes, "{target}");
        }
    }
}
