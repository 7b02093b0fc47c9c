//! The model of a tree: what is in it, its root digest, and the operations that turn one tree into another.
//!
//! A [`Manifest`] maps validated paths to entries (directories and regular files with size, mode and
//! BLAKE3 digest). Its [`Manifest::root`] is the digest both sides compare to decide that two trees are
//! equal. [`diff`] computes the operations from one manifest to another and [`Manifest::apply`] replays
//! them, which is how a recipient checks a reply *before* touching its tree: the manifest that the reply
//! would produce must have exactly the root the owner promised.
//!
//! Pure: no I/O here. Reading a tree from disk is [`crate::scan`]'s job.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::crypto::{hex, unhex};
use crate::path::RelPath;

/// A BLAKE3 digest, written as 64 lowercase hex digits on the wire.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(*blake3::hash(data).as_bytes())
    }

    /// Lowercase hex form.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// The first 12 hex digits, for humans.
    pub fn short(&self) -> String {
        hex(&self.0[..6])
    }

    /// Parses 64 hex digits.
    ///
    /// # Errors
    /// When `s` is not exactly 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Digest, String> {
        let bytes = unhex(s).ok_or_else(|| format!("{s:?} is not a hex digest"))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| format!("{s:?} is not a 32-byte digest"))?;
        Ok(Digest(arr))
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Digest {
        Digest(*h.as_bytes())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// A file's permission bits as mailferry manages them: executable or not.
///
/// Only `0o644` and `0o755` exist on the wire. Set-uid, set-gid, sticky and write-for-others bits are never
/// carried, so a message cannot plant a set-uid binary or a world-writable file.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Mode {
    /// `0o644`.
    Regular,
    /// `0o755`.
    Executable,
}

impl Mode {
    /// The mode of a file whose permission bits are `bits`: executable when the owner may execute it.
    pub fn from_bits(bits: u32) -> Mode {
        if bits & 0o100 != 0 { Mode::Executable } else { Mode::Regular }
    }

    /// The permission bits written to disk.
    pub fn bits(self) -> u32 {
        match self {
            Mode::Regular => 0o644,
            Mode::Executable => 0o755,
        }
    }
}

impl Serialize for Mode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.bits())
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Mode, D::Error> {
        match u32::deserialize(d)? {
            0o644 => Ok(Mode::Regular),
            0o755 => Ok(Mode::Executable),
            other => Err(serde::de::Error::custom(format!("file mode {other:o} is not 644 or 755"))),
        }
    }
}

/// A regular file's identity: what two trees must agree on for the file to count as equal.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileMeta {
    /// Length in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: Mode,
    /// BLAKE3 of the content.
    pub blake3: Digest,
}

/// The target of a symbolic link: a relative path that, resolved from the link's directory, stays inside
/// the tree (checked by [`Manifest::validate_shape`], which knows where the link is).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize)]
#[serde(transparent)]
pub struct LinkTarget(String);

impl LinkTarget {
    /// Validates the form of a target: relative, `/`-separated, no empty components, no NUL, backslash or
    /// control character, at most 1024 bytes. `..` and `.` components are allowed here.
    ///
    /// # Errors
    /// A message naming the rule broken.
    pub fn new(s: &str) -> Result<LinkTarget, String> {
        if s.is_empty() || s.len() > 1024 {
            return Err(format!("link target {s:?} is empty or longer than 1024 bytes"));
        }
        if s.starts_with('/') {
            return Err(format!("link target {s:?} is absolute"));
        }
        if s.contains('\\') || s.chars().any(char::is_control) {
            return Err(format!("link target {s:?} contains a backslash or a control character"));
        }
        if s.split('/').any(str::is_empty) {
            return Err(format!("link target {s:?} has an empty component"));
        }
        Ok(LinkTarget(s.to_owned()))
    }

    /// The target as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for LinkTarget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<LinkTarget, D::Error> {
        LinkTarget::new(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// One entry of a tree.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Entry {
    /// A directory (listed explicitly so that empty directories are part of the tree).
    Dir,
    /// A regular file.
    File(FileMeta),
    /// A symbolic link that stays inside the tree.
    Link(LinkTarget),
}

/// An entry with its path, as listed in requests and stored manifests.
///
/// On the wire a directory is `{"path":"a"}`, a file `{"path":"a/x","size":5,"mode":420,"blake3":"..."}`
/// and a symbolic link `{"path":"a/l","link":"x"}`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(try_from = "WireListed", into = "WireListed")]
pub struct Listed {
    /// Where the entry is.
    pub path: RelPath,
    /// What it is.
    pub entry: Entry,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct WireListed {
    path: RelPath,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blake3: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    link: Option<LinkTarget>,
}

impl TryFrom<WireListed> for Listed {
    type Error = String;
    fn try_from(w: WireListed) -> Result<Listed, String> {
        let entry = match (w.size, w.mode, w.blake3, w.link) {
            (None, None, None, None) => Entry::Dir,
            (Some(size), Some(mode), Some(blake3), None) => Entry::File(FileMeta { size, mode, blake3 }),
            (None, None, None, Some(target)) => Entry::Link(target),
            _ => {
                return Err(format!("entry `{}` must be a directory, a file (size, mode, blake3) or a link", w.path));
            }
        };
        Ok(Listed { path: w.path, entry })
    }
}

impl From<Listed> for WireListed {
    fn from(l: Listed) -> WireListed {
        let (file, link) = match l.entry {
            Entry::Dir => (None, None),
            Entry::File(f) => (Some(f), None),
            Entry::Link(t) => (None, Some(t)),
        };
        WireListed {
            path: l.path,
            size: file.map(|f| f.size),
            mode: file.map(|f| f.mode),
            blake3: file.map(|f| f.blake3),
            link,
        }
    }
}

/// Why a set of entries or operations does not form a valid tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TreeError {
    /// The same path is listed twice.
    #[error("path `{0}` is listed twice")]
    Duplicate(RelPath),
    /// An entry's parent is missing or is a file.
    #[error("`{0}` has no parent directory in the tree")]
    Orphan(RelPath),
    /// Two paths that a file system folding case or normalizing Unicode would hold as one file (see
    /// [`crate::path::fold_name`]).
    #[error("`{0}` and `{1}` name the same file on a case-insensitive or Unicode-normalizing file system")]
    CaseCollision(RelPath, RelPath),
    /// A symbolic link whose target, read lexically from the link's directory, climbs above the tree.
    #[error("link `{0}` points outside the tree")]
    LinkEscapes(RelPath),
    /// A symbolic link whose own target stays inside, but that leads outside the tree when followed through
    /// the tree's other links.
    #[error("link `{link}` leads outside the tree when followed, through link `{through}`")]
    LinkEscapesThrough {
        /// The link refused.
        link: RelPath,
        /// The link in its chain that took the walk where a `..` left the tree.
        through: RelPath,
    },
    /// A symbolic link that never resolves: a loop, or a chain of more than [`MAX_LINK_HOPS`] links.
    #[error("link `{0}` never resolves: it loops, or follows more than 40 links")]
    LinkLoop(RelPath),
    /// An operation names a path that is not there, or is of the wrong type.
    #[error("operation on `{path}` does not fit the tree: {why}")]
    BadOp {
        /// The path operated on.
        path: RelPath,
        /// What did not fit.
        why: &'static str,
    },
}

/// A whole tree: every directory and regular file by path.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct Manifest {
    entries: BTreeMap<RelPath, Entry>,
}

impl FromIterator<(RelPath, Entry)> for Manifest {
    /// Collects entries without checking tree shape, a later duplicate replacing an earlier one as with
    /// [`Manifest::insert`]; call [`Manifest::validate`] when done. Sorted input is built in linear time.
    fn from_iter<I: IntoIterator<Item = (RelPath, Entry)>>(it: I) -> Manifest {
        Manifest { entries: it.into_iter().collect() }
    }
}

impl Manifest {
    /// The empty tree.
    pub fn new() -> Manifest {
        Manifest::default()
    }

    /// Builds a manifest from a listing and checks that it forms a tree (see [`Manifest::validate_shape`]).
    /// Case collisions are allowed here: a recipient's own tree may have them; a generation may not.
    ///
    /// # Errors
    /// Duplicates, orphans and bad links.
    pub fn from_listing(listing: Vec<Listed>) -> Result<Manifest, TreeError> {
        let mut entries = BTreeMap::new();
        for l in listing {
            if entries.insert(l.path.clone(), l.entry).is_some() {
                return Err(TreeError::Duplicate(l.path));
            }
        }
        let m = Manifest { entries };
        m.validate_shape()?;
        Ok(m)
    }

    /// The listing form, sorted by path.
    pub fn listing(&self) -> Vec<Listed> {
        self.entries.iter().map(|(path, e)| Listed { path: path.clone(), entry: e.clone() }).collect()
    }

    /// Adds or replaces an entry without checking tree shape; call [`Manifest::validate`] when done.
    pub fn insert(&mut self, path: RelPath, entry: Entry) {
        self.entries.insert(path, entry);
    }

    /// Removes the entry at `path`, returning it.
    pub fn remove(&mut self, path: &RelPath) -> Option<Entry> {
        self.entries.remove(path)
    }

    /// The entry at `path`.
    pub fn get(&self, path: &RelPath) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// Every entry, sorted by path.
    pub fn iter(&self) -> impl Iterator<Item = (&RelPath, &Entry)> {
        self.entries.iter()
    }

    /// Number of entries (files and directories).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the tree is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of regular files and their total size.
    pub fn file_stats(&self) -> (usize, u64) {
        self.entries.values().fold((0, 0), |(n, b), e| match e {
            Entry::File(f) => (n + 1, b + f.size),
            Entry::Dir | Entry::Link(_) => (n, b),
        })
    }

    /// Checks that the entries form a tree: every parent is a listed directory, and every symbolic link
    /// stays inside the tree (see [`Manifest::validate_links`]).
    ///
    /// # Errors
    /// The first orphan or bad link found.
    pub fn validate_shape(&self) -> Result<(), TreeError> {
        for path in self.entries.keys() {
            if let Some((parent, _)) = path.as_str().rsplit_once('/')
                && self.entries.get(parent) != Some(&Entry::Dir)
            {
                return Err(TreeError::Orphan(path.clone()));
            }
        }
        self.validate_links()
    }

    /// Checks that every symbolic link stays inside the tree however it is followed: its target, read
    /// lexically from the link's directory, never climbs above the root (as a shell's `cd` or a path
    /// cleaner reads it), and resolving it component by component through the tree's own links, as the
    /// kernel does, never climbs above the root either, and ends within [`MAX_LINK_HOPS`] links.
    ///
    /// # Errors
    /// The first link, in path order, that leads outside or never resolves.
    pub fn validate_links(&self) -> Result<(), TreeError> {
        match self.bad_links(&|_| false).into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Every symbolic link that leads outside the tree or never resolves (see
    /// [`Manifest::validate_links`]), in path order, with why. `outside(path)` tells of paths outside the
    /// manifest that are known to lead out (a scan's foreign links), so that a chain through one of them
    /// is judged too.
    pub fn bad_links(&self, outside: &dyn Fn(&str) -> bool) -> Vec<(RelPath, TreeError)> {
        let mut judge = LinkJudge { entries: &self.entries, outside, memo: HashMap::new() };
        let mut bad = Vec::new();
        for (path, entry) in &self.entries {
            let Entry::Link(target) = entry else { continue };
            let fault = if link_escapes(path, target.as_str()) {
                TreeError::LinkEscapes(path.clone())
            } else {
                match judge.judge(path) {
                    Ok(()) => continue,
                    Err(LinkFault::Loops) => TreeError::LinkLoop(path.clone()),
                    Err(LinkFault::Escapes { through }) if through == *path => TreeError::LinkEscapes(path.clone()),
                    Err(LinkFault::Escapes { through }) => {
                        TreeError::LinkEscapesThrough { link: path.clone(), through }
                    }
                }
            };
            bad.push((path.clone(), fault));
        }
        bad
    }

    /// Checks that the entries form a tree that every file system can hold: the shape (see
    /// [`Manifest::validate_shape`]) and no two paths that one file system or another holds as one file,
    /// because it folds case, normalizes Unicode or skips ignorable code points (their
    /// [`RelPath::fold_key`]s are equal). Generations and reply results must pass this.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), TreeError> {
        self.validate_shape()?;
        let mut folded: HashMap<String, &RelPath> = HashMap::with_capacity(self.entries.len());
        for path in self.entries.keys() {
            if let Some(other) = folded.insert(path.fold_key(), path) {
                return Err(TreeError::CaseCollision(other.clone(), path.clone()));
            }
        }
        Ok(())
    }

    /// The tree root: a BLAKE3 digest over every entry in path order.
    ///
    /// Two trees have the same root exactly when they have the same paths, types, sizes, modes and
    /// contents. The encoding is documented in `docs/protocol.md` ("Tree root").
    pub fn root(&self) -> Digest {
        let mut h = blake3::Hasher::new_derive_key("mailferry tree root v1");
        for (path, entry) in &self.entries {
            let p = path.as_str().as_bytes();
            match entry {
                Entry::Dir => {
                    h.update(b"d");
                    h.update(&(p.len() as u64).to_le_bytes());
                    h.update(p);
                }
                Entry::File(f) => {
                    h.update(b"f");
                    h.update(&(p.len() as u64).to_le_bytes());
                    h.update(p);
                    h.update(&f.mode.bits().to_le_bytes());
                    h.update(&f.size.to_le_bytes());
                    h.update(&f.blake3.0);
                }
                Entry::Link(t) => {
                    let t = t.as_str().as_bytes();
                    h.update(b"l");
                    h.update(&(p.len() as u64).to_le_bytes());
                    h.update(p);
                    h.update(&(t.len() as u64).to_le_bytes());
                    h.update(t);
                }
            }
        }
        h.finalize().into()
    }

    /// Replays `ops` on a copy of this tree and returns the result, checked to be a valid tree.
    ///
    /// Operations are applied in the canonical order of [`Op::phase`]: deletes (deepest first), then
    /// directories (shallowest first), then file contents, then modes. That is also the order in which
    /// [`crate::apply`] touches the disk.
    ///
    /// # Errors
    /// An operation that does not fit (deleting what is not there, a mode change on a missing file) or a
    /// result that is not a valid tree.
    pub fn apply(&self, ops: &[Op]) -> Result<Manifest, TreeError> {
        let mut out = self.clone();
        for op in ordered(ops) {
            match op {
                Op::Delete { path } => {
                    if out.entries.remove(path).is_none() {
                        return Err(TreeError::BadOp {
                            path: path.clone(),
                            why: "deleting a path that does not exist",
                        });
                    }
                }
                Op::Mkdir { path } => match out.entries.get(path) {
                    None => {
                        out.entries.insert(path.clone(), Entry::Dir);
                    }
                    Some(_) => {
                        return Err(TreeError::BadOp { path: path.clone(), why: "creating a directory that exists" });
                    }
                },
                Op::Put { path, size, mode, blake3, .. } => {
                    if out.entries.get(path) == Some(&Entry::Dir) {
                        return Err(TreeError::BadOp { path: path.clone(), why: "writing a file over a directory" });
                    }
                    out.entries
                        .insert(path.clone(), Entry::File(FileMeta { size: *size, mode: *mode, blake3: *blake3 }));
                }
                Op::Link { path, target } => {
                    if out.entries.get(path) == Some(&Entry::Dir) {
                        return Err(TreeError::BadOp { path: path.clone(), why: "writing a link over a directory" });
                    }
                    out.entries.insert(path.clone(), Entry::Link(target.clone()));
                }
                Op::Chmod { path, mode } => match out.entries.get_mut(path) {
                    Some(Entry::File(f)) => f.mode = *mode,
                    _ => {
                        return Err(TreeError::BadOp {
                            path: path.clone(),
                            why: "changing the mode of a missing file",
                        });
                    }
                },
            }
        }
        out.validate()?;
        Ok(out)
    }
}

/// Where a put's content comes from.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Source {
    /// A zstd frame of the whole content, in the reply's pack.
    Pack {
        /// Offset of the frame in the pack.
        offset: u64,
        /// Length of the frame.
        length: u64,
    },
    /// A slice of a delta stream's output.
    Delta {
        /// Index of the stream in the reply body.
        stream: u32,
        /// Where the content starts in the stream's output.
        start: u64,
    },
    /// The recipient already has this content (same BLAKE3) under another path.
    Local,
}

/// One step from a recipient's tree towards the target generation.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Op {
    /// Remove a file or an (by then empty) directory.
    Delete {
        /// What to remove.
        path: RelPath,
    },
    /// Create a directory.
    Mkdir {
        /// What to create.
        path: RelPath,
    },
    /// Write a file with this content and mode.
    Put {
        /// Where.
        path: RelPath,
        /// Length of the content.
        size: u64,
        /// Permission bits.
        mode: Mode,
        /// BLAKE3 of the content.
        blake3: Digest,
        /// Where the content is; `None` only while planning, before payloads are packed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<Source>,
    },
    /// Create or replace a symbolic link.
    Link {
        /// Where.
        path: RelPath,
        /// What it points to (relative, inside the tree).
        target: LinkTarget,
    },
    /// Change only the mode of a file whose content is already right.
    Chmod {
        /// Which file.
        path: RelPath,
        /// Its new mode.
        mode: Mode,
    },
}

impl Op {
    /// A put of `meta` at `path`, without a source yet.
    pub fn put(path: RelPath, meta: FileMeta) -> Op {
        Op::Put { path, size: meta.size, mode: meta.mode, blake3: meta.blake3, source: None }
    }

    /// The path the operation acts on.
    pub fn path(&self) -> &RelPath {
        match self {
            Op::Delete { path }
            | Op::Mkdir { path }
            | Op::Put { path, .. }
            | Op::Link { path, .. }
            | Op::Chmod { path, .. } => path,
        }
    }

    /// Sort key giving the order operations are applied in (see [`Manifest::apply`]).
    pub fn phase(&self) -> (u8, i64, &RelPath) {
        match self {
            // Deepest first, so that a directory is empty when its turn comes.
            Op::Delete { path } => (0, -(path.depth() as i64), path),
            Op::Mkdir { path } => (1, path.depth() as i64, path),
            Op::Put { path, .. } | Op::Link { path, .. } => (2, 0, path),
            Op::Chmod { path, .. } => (3, 0, path),
        }
    }
}

/// `ops` in the order they are applied.
pub fn ordered(ops: &[Op]) -> Vec<&Op> {
    let mut v: Vec<&Op> = ops.iter().collect();
    v.sort_by(|a, b| a.phase().cmp(&b.phase()));
    v
}

/// The operations that turn `from` into `to`. Puts carry no [`Source`] yet.
///
/// Invariant: `from.apply(&diff(from, to)) == Ok(to)` whenever both are valid trees.
pub fn diff(from: &Manifest, to: &Manifest) -> Vec<Op> {
    let mut ops = Vec::new();
    for (path, old) in &from.entries {
        // A directory is replaced by deleting it; a file or link is replaced by renaming over it, except by
        // a directory.
        let replaced = match (old, to.entries.get(path)) {
            (_, None) => true,
            (Entry::Dir, Some(new)) => *new != Entry::Dir,
            (_, Some(new)) => *new == Entry::Dir,
        };
        if replaced {
            ops.push(Op::Delete { path: path.clone() });
        }
    }
    for (path, new) in &to.entries {
        match (from.entries.get(path), new) {
            (Some(Entry::Dir), Entry::Dir) => {}
            (_, Entry::Dir) => ops.push(Op::Mkdir { path: path.clone() }),
            (Some(Entry::File(old)), Entry::File(new)) if old.blake3 == new.blake3 && old.size == new.size => {
                if old.mode != new.mode {
                    ops.push(Op::Chmod { path: path.clone(), mode: new.mode });
                }
            }
            (_, Entry::File(new)) => ops.push(Op::put(path.clone(), *new)),
            (Some(Entry::Link(old)), Entry::Link(new)) if old == new => {}
            (_, Entry::Link(target)) => ops.push(Op::Link { path: path.clone(), target: target.clone() }),
        }
    }
    ops
}

/// Most symbolic links that following one link may pass through, itself included: Linux's `MAXSYMLINKS`,
/// past which `open` fails with `ELOOP`.
pub const MAX_LINK_HOPS: usize = 40;

/// Why a link was refused by [`LinkJudge`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum LinkFault {
    /// A `..` left the tree's root; `through` is the last link the walk followed before it (or the link
    /// itself when it followed none).
    Escapes { through: RelPath },
    /// A loop, or more than [`MAX_LINK_HOPS`] links.
    Loops,
}

/// Where a walk through the tree stands: an existing directory (`None` for the root), and how many levels
/// below it the walk went through names that are not directories of the tree.
///
/// A missing name and a file are taken as directories, so that a `..` after them climbs back as a lexical
/// reading would: the kernel would stop there (`ENOENT`, `ENOTDIR`), so this can only make the judgement
/// stricter, and it stays right if such a directory is made later.
#[derive(Clone, Copy, Debug)]
struct Place<'a> {
    dir: Option<&'a RelPath>,
    below: usize,
}

/// A link resolved: where following it ends, and how many links that followed, itself included.
#[derive(Clone, Copy, Debug)]
struct Resolved<'a> {
    place: Place<'a>,
    hops: usize,
}

/// A link being resolved: where its walk stands and what is left of its target.
struct Frame<'a> {
    link: &'a RelPath,
    place: Place<'a>,
    rest: std::str::Split<'a, char>,
    hops: usize,
    /// The last link this frame's walk followed.
    last: Option<&'a RelPath>,
}

/// What one component of a walk found.
enum Step<'a> {
    Dir(Place<'a>),
    Link(&'a RelPath),
    Outside(RelPath),
}

/// Resolves links through the tree's own links, each link once: a link's resolution does not depend on
/// where the walk that met it came from, so it is remembered (and so is a fault, which every link whose
/// walk met it shares). The walk keeps its own stack of frames, so a long chain costs no recursion.
struct LinkJudge<'a> {
    entries: &'a BTreeMap<RelPath, Entry>,
    outside: &'a dyn Fn(&str) -> bool,
    memo: HashMap<&'a RelPath, Result<Resolved<'a>, LinkFault>>,
}

impl<'a> LinkJudge<'a> {
    /// Follows the link at `top` (which must be a link of the tree) to its end.
    fn judge(&mut self, top: &'a RelPath) -> Result<(), LinkFault> {
        let mut frames: Vec<Frame<'a>> = Vec::new();
        // The links in `frames`: met again, they loop.
        let mut open: HashSet<&'a RelPath> = HashSet::new();
        // The result of a link just entered (when known without walking it) or just finished.
        let mut done = self.enter(top, &mut frames, &mut open);
        loop {
            if let Some(result) = done.take() {
                let resolved = match result {
                    Ok(r) => r,
                    Err(fault) => {
                        // Every walk under way reached this fault through the links it followed.
                        for f in frames.drain(..) {
                            self.memo.insert(f.link, Err(fault.clone()));
                        }
                        return Err(fault);
                    }
                };
                let Some(f) = frames.last_mut() else { return Ok(()) };
                f.hops += resolved.hops;
                if f.hops > MAX_LINK_HOPS {
                    done = Some(Err(LinkFault::Loops));
                    continue;
                }
                f.place = resolved.place;
            }
            let f = frames.last_mut().expect("a walk is under way");
            let step = match f.rest.next() {
                None => {
                    let f = frames.pop().expect("a walk is under way");
                    open.remove(f.link);
                    let resolved = Resolved { place: f.place, hops: f.hops };
                    self.memo.insert(f.link, Ok(resolved));
                    done = Some(Ok(resolved));
                    continue;
                }
                Some("" | ".") => continue,
                Some("..") => match self.up(f.place) {
                    Some(place) => Step::Dir(place),
                    None => Step::Outside(f.last.unwrap_or(f.link).clone()),
                },
                Some(name) => self.down(f.place, name),
            };
            match step {
                Step::Dir(place) => f.place = place,
                Step::Outside(through) => done = Some(Err(LinkFault::Escapes { through })),
                Step::Link(link) => {
                    f.last = Some(link);
                    done = self.enter(link, &mut frames, &mut open);
                }
            }
        }
    }

    /// Starts resolving `link`: its result when already known (or a loop, when it is being resolved
    /// already), else `None` with a frame pushed for it.
    fn enter(
        &self,
        link: &'a RelPath,
        frames: &mut Vec<Frame<'a>>,
        open: &mut HashSet<&'a RelPath>,
    ) -> Option<Result<Resolved<'a>, LinkFault>> {
        if let Some(known) = self.memo.get(link) {
            return Some(known.clone());
        }
        if !open.insert(link) {
            return Some(Err(LinkFault::Loops));
        }
        let Some(Entry::Link(target)) = self.entries.get(link) else { unreachable!("only links are entered") };
        let place = match link.as_str().rsplit_once('/') {
            None => Place { dir: None, below: 0 },
            Some((parent, _)) => match self.entries.get_key_value(parent) {
                Some((dir, Entry::Dir)) => Place { dir: Some(dir), below: 0 },
                // An orphan (refused by the shape check): judged lexically from its depth.
                _ => Place { dir: None, below: link.depth() - 1 },
            },
        };
        frames.push(Frame { link, place, rest: target.as_str().split('/'), hops: 1, last: None });
        None
    }

    /// The place one `..` above `place`, or `None` above the root.
    fn up(&self, place: Place<'a>) -> Option<Place<'a>> {
        if place.below > 0 {
            return Some(Place { below: place.below - 1, ..place });
        }
        let dir = place.dir?;
        Some(match dir.as_str().rsplit_once('/') {
            None => Place { dir: None, below: 0 },
            Some((parent, _)) => match self.entries.get_key_value(parent) {
                Some((p, _)) => Place { dir: Some(p), below: 0 },
                None => Place { dir: None, below: dir.depth() - 1 },
            },
        })
    }

    /// What the name `name` in `place` is.
    fn down(&self, place: Place<'a>, name: &str) -> Step<'a> {
        let virtual_dir = Step::Dir(Place { below: place.below + 1, ..place });
        if place.below > 0 {
            return virtual_dir;
        }
        let path = match place.dir {
            None => name.to_owned(),
            Some(d) => format!("{d}/{name}"),
        };
        match self.entries.get_key_value(path.as_str()) {
            Some((p, Entry::Dir)) => Step::Dir(Place { dir: Some(p), below: 0 }),
            Some((p, Entry::Link(_))) => Step::Link(p),
            Some((_, Entry::File(_))) => virtual_dir,
            None if (self.outside)(&path) => match RelPath::new(&path) {
                Ok(p) => Step::Outside(p),
                Err(_) => virtual_dir,
            },
            None => virtual_dir,
        }
    }
}

/// Whether a link at `link` (tree-relative) pointing at `target` leads outside the tree, judged lexically:
/// absolute targets do, and so does any `..` that climbs above the tree's root.
pub fn link_escapes(link: &RelPath, target: &str) -> bool {
    if target.starts_with('/') {
        return true;
    }
    let mut depth = link.depth() as i64 - 1;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => depth -= 1,
            _ => depth += 1,
        }
        if depth < 0 {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn hex_is_strict() {
        assert_eq!(unhex("00ffAb").unwrap(), [0, 255, 171]);
        assert_eq!(hex(&[0, 255, 171]), "00ffab");
        // `u8::from_str_radix` takes a sign: "+f" must not pass for a byte.
        for bad in ["+f", "f", "0g", "é0", " 0"] {
            assert_eq!(unhex(bad), None, "{bad:?}");
        }
        let d = Digest::of(b"x").to_hex();
        let signed = format!("+{}", &d[1..]);
        assert!(Digest::from_hex(&signed).is_err(), "{signed}");
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn file(content: &[u8], mode: Mode) -> Entry {
        Entry::File(FileMeta { size: content.len() as u64, mode, blake3: Digest::of(content) })
    }

    fn tree(items: &[(&str, Option<&[u8]>)]) -> Manifest {
        let mut m = Manifest::new();
        for (path, content) in items {
            m.insert(p(path), content.map_or(Entry::Dir, |c| file(c, Mode::Regular)));
        }
        m.validate().unwrap();
        m
    }

    #[test]
    fn root_depends_on_every_attribute() {
        let base = tree(&[("a", None), ("a/x", Some(b"1"))]);
        let mut roots = vec![base.root(), Manifest::new().root()];
        let mut exec = base.clone();
        exec.insert(p("a/x"), file(b"1", Mode::Executable));
        roots.push(exec.root());
        roots.push(tree(&[("a", None), ("a/x", Some(b"2"))]).root());
        roots.push(tree(&[("a", None), ("a/y", Some(b"1"))]).root());
        roots.push(tree(&[("a", None), ("a/x", Some(b"1")), ("b", None)]).root());
        let unique: std::collections::HashSet<_> = roots.iter().collect();
        assert_eq!(unique.len(), roots.len(), "distinct trees must have distinct roots");
        assert_eq!(base.root(), tree(&[("a/x", Some(b"1")), ("a", None)]).root(), "order of insertion is irrelevant");
    }

    #[test]
    fn validate_refuses_bad_shapes() {
        let mut orphan = Manifest::new();
        orphan.insert(p("a/b"), file(b"", Mode::Regular));
        assert_eq!(orphan.validate(), Err(TreeError::Orphan(p("a/b"))));

        let mut under_file = Manifest::new();
        under_file.insert(p("a"), file(b"", Mode::Regular));
        under_file.insert(p("a/b"), file(b"", Mode::Regular));
        assert_eq!(under_file.validate(), Err(TreeError::Orphan(p("a/b"))));

        let collide = Manifest::from_listing(vec![
            Listed { path: p("README"), entry: Entry::Dir },
            Listed { path: p("readme"), entry: Entry::Dir },
        ])
        .expect("a recipient's tree may hold names that differ in case");
        assert!(matches!(collide.validate(), Err(TreeError::CaseCollision(..))));
        assert!(collide.apply(&[]).is_err(), "but no reply may produce such a tree");
        let fixed = collide.apply(&[Op::Delete { path: p("readme") }]).unwrap();
        assert_eq!(fixed.len(), 1);

        let dup = Manifest::from_listing(vec![
            Listed { path: p("a"), entry: Entry::Dir },
            Listed { path: p("a"), entry: Entry::Dir },
        ]);
        assert_eq!(dup, Err(TreeError::Duplicate(p("a"))));
    }

    /// A tree of directories (`name/`), files (`name`) and links (`name -> target`).
    fn links(items: &[&str]) -> Manifest {
        let mut m = Manifest::new();
        for item in items {
            let entry = match item.split_once(" -> ") {
                Some((path, target)) => (p(path), Entry::Link(LinkTarget::new(target).unwrap())),
                None => match item.strip_suffix('/') {
                    Some(dir) => (p(dir), Entry::Dir),
                    None => (p(item), file(b"", Mode::Regular)),
                },
            };
            m.insert(entry.0, entry.1);
        }
        m
    }

    fn bad(m: &Manifest) -> Vec<(String, TreeError)> {
        m.bad_links(&|_| false).into_iter().map(|(p, e)| (p.as_str().to_owned(), e)).collect()
    }

    #[test]
    fn links_are_judged_by_following_the_trees_own_links() {
        let escapes = |l: &str| TreeError::LinkEscapes(p(l));
        let through = |l: &str, t: &str| TreeError::LinkEscapesThrough { link: p(l), through: p(t) };
        let looped = |l: &str| TreeError::LinkLoop(p(l));
        // (case, the tree, its bad links in path order)
        type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, TreeError)>);
        let cases: Vec<Case> = vec![
            ("a link to the root is inside", vec!["d/", "d/y -> .."], vec![]),
            (
                "a chain that passes the lexical check leaves through another link",
                vec!["d/", "d/y -> ..", "d/z -> y/../.."],
                vec![("d/z", through("d/z", "d/y"))],
            ),
            ("a link to a link's parent", vec!["d/", "d/y -> ..", "x -> d/y/.."], vec![("x", through("x", "d/y"))]),
            (
                "a chain through a chain",
                vec!["d/", "d/e/", "d/e/up -> ../..", "d/via -> e/up", "w -> d/via/.."],
                vec![("w", through("w", "d/via"))],
            ),
            (
                "a file or a missing name is taken as a directory, so `..` climbs back",
                vec!["d/", "d/y -> ..", "f", "d/w -> y/f/../..", "d/m -> y/missing/x/../../.."],
                vec![("d/m", through("d/m", "d/y")), ("d/w", through("d/w", "d/y"))],
            ),
            ("a lexical escape", vec!["a/", "a/l -> ../../etc"], vec![("a/l", escapes("a/l"))]),
            (
                "a lexical escape is refused even where the kernel would stay inside",
                vec!["deep/", "deep/er/", "l -> deep/er", "m -> l/../.."],
                vec![("m", escapes("m"))],
            ),
            ("a loop", vec!["a -> b", "b -> a"], vec![("a", looped("a")), ("b", looped("b"))]),
            ("a link to itself", vec!["s -> s"], vec![("s", looped("s"))]),
            (
                "a loop met on the way",
                vec!["d/", "d/a -> b", "d/b -> a", "x -> d/a/f"],
                vec![("d/a", looped("d/a")), ("d/b", looped("d/b")), ("x", looped("x"))],
            ),
            ("a loop through a directory", vec!["d/", "d/l -> ../d/l/x"], vec![("d/l", looped("d/l"))]),
            (
                "ordinary links",
                vec![
                    "usr/",
                    "usr/bin/",
                    "bin -> usr/bin",
                    "lib64/",
                    "lib -> lib64",
                    "usr/lib -> ../lib/.",
                    "usr/sh -> bin/../../bin/sh",
                    "dangling -> nowhere/at/all",
                    "deep/",
                    "deep/er/",
                    "l -> deep/er",
                    "m -> l/..",
                ],
                vec![],
            ),
        ];
        for (why, items, want) in cases {
            let m = links(&items);
            let got = bad(&m);
            let want: Vec<(String, TreeError)> = want.into_iter().map(|(l, e)| (l.to_owned(), e)).collect();
            assert_eq!(got, want, "{why}");
            assert_eq!(m.validate_shape().err(), want.first().map(|w| w.1.clone()), "{why}");
        }
    }

    #[test]
    fn a_chain_of_more_than_forty_links_never_resolves() {
        // l0 -> l1 -> ... -> l40 -> dir: l1 follows 40 links in all, l0 one more.
        let mut items: Vec<String> = (0..=MAX_LINK_HOPS).map(|i| format!("l{i:02} -> l{:02}", i + 1)).collect();
        items[MAX_LINK_HOPS] = format!("l{MAX_LINK_HOPS} -> dir");
        items.push("dir/".into());
        let m = links(&items.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(bad(&m), [("l00".to_owned(), TreeError::LinkLoop(p("l00")))]);
        // A long chain is judged in linear time: each link is resolved once.
        let n = 20_000;
        let mut items: Vec<String> = (0..n).map(|i| format!("c{i:05} -> c{:05}", i + 1)).collect();
        items.push(format!("c{n:05}/"));
        let m = links(&items.iter().map(String::as_str).collect::<Vec<_>>());
        let got = bad(&m);
        assert_eq!(got.len(), n - MAX_LINK_HOPS, "all but the last 40 follow too many links");
        assert_eq!(got.last().unwrap().1, TreeError::LinkLoop(p(&format!("c{:05}", n - MAX_LINK_HOPS - 1))));
    }

    #[test]
    fn a_chain_through_a_link_known_to_lead_outside_leads_outside() {
        // As a scan finds it: `out` is a foreign link, not in the manifest.
        let m = links(&["d/", "d/in -> ../out/x", "ok -> d"]);
        let got = m.bad_links(&|path| path == "out");
        assert_eq!(got, [(p("d/in"), TreeError::LinkEscapesThrough { link: p("d/in"), through: p("out") })]);
        assert_eq!(bad(&m), [], "without that knowledge `out` is a missing name");
    }

    #[test]
    fn names_colliding_under_normalization_or_case_folding_are_refused() {
        for (a, b) in [
            ("caf\u{e9}", "cafe\u{301}"),
            ("Stra\u{df}e", "STRASSE"),
            ("\u{131}", "I"),
            ("a\u{200d}b", "ab"),
            ("\u{fb01}", "FI"),
        ] {
            let listing = vec![Listed { path: p(a), entry: Entry::Dir }, Listed { path: p(b), entry: Entry::Dir }];
            let t = Manifest::from_listing(listing).expect("a recipient's own tree may hold them");
            match t.validate() {
                Err(TreeError::CaseCollision(x, y)) => {
                    assert_eq!([x.as_str(), y.as_str()].map(str::to_owned), {
                        let mut v = [a.to_owned(), b.to_owned()];
                        v.sort();
                        v
                    });
                }
                other => panic!("{a:?} and {b:?}: {other:?}"),
            }
            assert!(t.apply(&[]).is_err(), "no reply may produce such a tree");
        }
    }

    #[test]
    fn diff_handles_type_changes_and_modes() {
        let from = tree(&[("a", Some(b"file")), ("d", None), ("d/x", Some(b"x")), ("keep", Some(b"k"))]);
        let mut to = tree(&[("a", None), ("a/inner", Some(b"i")), ("d", Some(b"now a file")), ("keep", Some(b"k"))]);
        to.insert(p("keep"), file(b"k", Mode::Executable));
        let ops = diff(&from, &to);
        assert!(ops.contains(&Op::Chmod { path: p("keep"), mode: Mode::Executable }));
        assert_eq!(from.apply(&ops).unwrap(), to);
    }

    #[test]
    fn apply_refuses_ops_that_do_not_fit() {
        let t = tree(&[("a", Some(b"1"))]);
        assert!(t.apply(&[Op::Delete { path: p("nope") }]).is_err());
        assert!(t.apply(&[Op::Chmod { path: p("nope"), mode: Mode::Executable }]).is_err());
        let put = Op::put(p("x/y"), FileMeta { size: 0, mode: Mode::Regular, blake3: Digest::of(b"") });
        assert_eq!(t.apply(&[put]), Err(TreeError::Orphan(p("x/y"))));
    }

    #[test]
    fn listing_round_trips_through_json() {
        let t = tree(&[("a", None), ("a/x", Some(b"hello")), ("e", Some(b""))]);
        let json = serde_json::to_string(&t.listing()).unwrap();
        assert!(json.contains(r#"{"path":"a"}"#), "{json}");
        let back = Manifest::from_listing(serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(back, t);
        assert!(serde_json::from_str::<Vec<Listed>>(r#"[{"path":"x","size":1,"mode":420,"blake3":"00"}]"#).is_err());
        assert!(
            serde_json::from_str::<Vec<Listed>>(r#"[{"path":"x","bogus":1}]"#).is_err(),
            "unknown fields are refused"
        );
    }

    fn arb_tree() -> impl Strategy<Value = Manifest> {
        let names = prop::sample::select(vec!["a", "b", "c", "d"]);
        let content = prop::collection::vec(any::<u8>(), 0..4);
        // A leaf is a directory (None), a file (content, exec) or, when the content is empty and exec set,
        // a link to a sibling name.
        prop::collection::vec((prop::collection::vec(names, 1..4), prop::option::of((content, any::<bool>()))), 0..12)
            .prop_map(|items| {
                let mut m = Manifest::new();
                for (comps, leaf) in items {
                    let full = comps.join("/");
                    let path = RelPath::new(&full).unwrap();
                    // Directories for the ancestors, unless an ancestor is already a file or a link.
                    if path.ancestors().any(|a| matches!(m.get(&a), Some(Entry::File(_) | Entry::Link(_)))) {
                        continue;
                    }
                    if m.iter().any(|(q, _)| q.starts_with(&path) && *q != path) {
                        continue;
                    }
                    for a in path.ancestors() {
                        m.insert(a, Entry::Dir);
                    }
                    let entry = match leaf {
                        None => Entry::Dir,
                        Some((c, true)) if c.is_empty() => Entry::Link(LinkTarget::new("sibling").unwrap()),
                        Some((c, exec)) => file(&c, if exec { Mode::Executable } else { Mode::Regular }),
                    };
                    m.insert(path, entry);
                }
                m.validate().unwrap();
                m
            })
    }

    proptest! {
        #[test]
        fn diff_then_apply_reaches_the_target(from in arb_tree(), to in arb_tree()) {
            let ops = diff(&from, &to);
            let got = from.apply(&ops).unwrap();
            prop_assert_eq!(got.root(), to.root());
            prop_assert_eq!(got, to);
        }

        #[test]
        fn diff_of_equal_trees_is_empty(t in arb_tree()) {
            prop_assert!(diff(&t, &t).is_empty());
        }
    }
}
