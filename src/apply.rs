//! Applying a verified reply to the data tree, atomically with respect to crashes.
//!
//! Three stages, each with its own guarantee:
//! 1. [`plan`] (pure) decides whether the reply may be applied to the tree as scanned and turns its
//!    operations into [`Step`]s. It refuses unless the result is exactly the generation the reply promises
//!    and no step would cross a symbolic link or touch a device file.
//! 2. [`stage`] decompresses every new file into a staging directory on the data tree's file system,
//!    checking size and BLAKE3 as it writes, and syncs them (one `syncfs`). Nothing in the data tree
//!    changes; a failure here (a bad payload, a full disk) leaves the tree exactly as it was.
//! 3. [`Journal::commit`] durably records the steps, then [`Journal::execute`] performs them with renames.
//!    Every step is idempotent, so after a crash the next run calls [`Journal::execute`] again and the tree
//!    ends as the new generation. Before the journal is committed the old generation stands; after, the new
//!    one is reached on the next run, never a mix.
//!
//! Every step reaches the data tree through [`tree::Dir`] handles: parents are opened one component at a
//! time without following symbolic links and the final component is changed with `*at` calls, so a link
//! swapped in for a directory between the plan and a write makes the step fail instead of writing outside
//! the tree.
//!
//! Replaced and deleted files are kept (by rename or hard link) under the staging directory's `previous/`.
//! After an apply that moves to a newer generation, that staging directory is kept as the store that
//! `mailferry recipient rollback` restores the generation before from (see `node::rollback`).

pub mod staging;
pub mod tree;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::crypto::KeyId;
use crate::delta::{self, DecodeError};
use crate::manifest::{Digest, Entry, LinkTarget, Listed, Manifest, Mode, Op, Source, ordered};
use crate::path::RelPath;
use crate::protocol::ReplyId;
use crate::protocol::{Method, Reason, Refusal, Update};
use crate::scan::{ForeignKind, Scan};

/// What to do with files in the data tree that the owner does not list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnExtra {
    /// Remove them, so the tree is exactly the generation (the default).
    #[default]
    Delete,
    /// Leave them alone; files the owner once sent and later removed are still deleted.
    Keep,
}

/// One change to the data tree, in the order executed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Move a file or symlink out of the tree (into `previous/`).
    RemoveFile {
        /// Which.
        path: RelPath,
    },
    /// Remove an empty directory.
    RemoveDir {
        /// Which.
        path: RelPath,
    },
    /// Create a directory (mode 755).
    Mkdir {
        /// Which.
        path: RelPath,
    },
    /// Rename a staged file into place.
    Place {
        /// Where.
        path: RelPath,
        /// The staged file's name inside the staging directory's `files/`.
        staged: String,
        /// The content's digest, to recognize a placement already done.
        blake3: Digest,
    },
    /// Create or replace a symbolic link (made beside the tree, then renamed into place).
    Link {
        /// Where.
        path: RelPath,
        /// What it points to.
        target: LinkTarget,
    },
    /// Set a file's mode.
    Chmod {
        /// Which.
        path: RelPath,
        /// To what.
        mode: Mode,
    },
}

/// A checked plan for one reply.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The generation's full tree, as the recipient will hold it (kept extras aside).
    pub target: Manifest,
    /// The steps, in execution order.
    pub steps: Vec<Step>,
    /// Extras left in place because of [`OnExtra::Keep`].
    pub kept: Vec<RelPath>,
}

fn local(detail: String) -> Refusal {
    Refusal::new(Reason::LocalTree, detail)
}

/// Decides whether `reply` can be applied to the tree as `scan` found it, and how.
///
/// `previous` is the manifest of the generation applied before; with [`OnExtra::Keep`] only paths in it
/// may be deleted.
///
/// # Errors
/// A refusal: [`Reason::LocalTree`] when the tree holds a symlink leading outside it, a device file, or
/// has changed since the request (its root is not the reply's `base`); [`Reason::BadPath`] when the
/// operations do not form a valid tree; [`Reason::TreeMismatch`] when the result would not have the
/// promised root.
pub fn plan(scan: &Scan, previous: &Manifest, update: &Update, on_extra: OnExtra) -> Result<Plan, Refusal> {
    let (reply, ops) = (&update.head, &update.body.ops);
    // Symbolic links inside the tree are ordinary entries of the manifest; what is left here is what
    // mailferry must not touch at all.
    if let Some(f) = scan.foreign.first() {
        return Err(local(match &f.kind {
            ForeignKind::Symlink { target } => format!(
                "data tree holds symlink `{}` -> `{}`, which leads outside it or cannot be represented",
                f.path,
                target.display()
            ),
            ForeignKind::Special(what) => format!("data tree holds a {what} at `{}`", f.path),
        }));
    }
    let current = &scan.manifest;
    if current.root() != reply.base {
        return Err(local(format!(
            "tree changed since the request was sent (root {} now, reply is for {})",
            current.root().short(),
            reply.base.short()
        )));
    }
    let target = current
        .apply(ops)
        .map_err(|e| Refusal::new(Reason::BadPath, format!("operations do not form a valid tree: {e}")))?;
    if target.root() != reply.root {
        return Err(Refusal::new(
            Reason::TreeMismatch,
            format!("operations produce root {}, reply promises {}", target.root().short(), reply.root.short()),
        ));
    }
    // No step passes through a symlink: replaying the operations above refused any path below a link
    // (its parent would not be a directory), and the executor never follows a link it writes over.

    let mut steps = Vec::new();
    let mut kept: Vec<RelPath> = Vec::new();
    let keep = |p: &RelPath| on_extra == OnExtra::Keep && previous.get(p).is_none() && target.get(p).is_none();
    let mut n_staged = 0usize;
    for op in ordered(ops) {
        match op {
            Op::Delete { path } => {
                let has_kept_child = kept.iter().any(|k| k.starts_with(path));
                if keep(path) || has_kept_child {
                    kept.push(path.clone());
                    continue;
                }
                match current.get(path) {
                    Some(Entry::Dir) => steps.push(Step::RemoveDir { path: path.clone() }),
                    _ => steps.push(Step::RemoveFile { path: path.clone() }),
                }
            }
            Op::Mkdir { path } => steps.push(Step::Mkdir { path: path.clone() }),
            Op::Put { path, blake3, .. } => {
                steps.push(Step::Place { path: path.clone(), staged: format!("{n_staged:08}"), blake3: *blake3 });
                n_staged += 1;
            }
            Op::Link { path, target } => steps.push(Step::Link { path: path.clone(), target: target.clone() }),
            Op::Chmod { path, mode } => steps.push(Step::Chmod { path: path.clone(), mode: *mode }),
        }
    }
    // Kept extras stay on disk beside the target, and a link among them can give a link of the target a way
    // out (`d/k -> ..` kept, `d/z -> k/..` new): links are judged again on what the tree will really hold.
    if !kept.is_empty() {
        let mut on_disk = target.clone();
        for k in &kept {
            if let (Some(entry), None) = (current.get(k), target.get(k)) {
                on_disk.insert(k.clone(), entry.clone());
            }
        }
        on_disk.validate_links().map_err(|e| {
            Refusal::new(Reason::BadPath, format!("operations do not form a valid tree with the extras kept: {e}"))
        })?;
    }
    // Every file that gets placed ends with a chmod to its final mode, so a re-run after a crash is exact.
    for op in ops {
        if let Op::Put { path, mode, .. } = op {
            steps.push(Step::Chmod { path: path.clone(), mode: *mode });
        }
    }
    Ok(Plan { target, steps, kept })
}

/// Why staging failed: the reply is bad (refuse it) or the machine is (report and retry later).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A payload does not decompress to what the control part promised.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Local I/O failed (full disk, permissions): the reply may be fine.
    #[error("failed to stage files in `{}`", dir.display())]
    Io {
        /// The staging directory.
        dir: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// Where [`stage`] finds content.
pub struct Sources<'a> {
    /// The reply's assembled, verified pack.
    pub pack: &'a Path,
    /// A path in the data tree whose content should have this digest (from the scan), for local copies
    /// and delta bases.
    pub local: &'a dyn Fn(&Digest) -> Option<PathBuf>,
}

/// Writes every put of `update` into `stage_dir/files/`, verifying each file's size and BLAKE3 as it is
/// written, and makes them durable (one `syncfs` of their file system at the end). Content comes from the pack (a zstd frame, or a slice of a delta stream
/// decoded against the recipient's own files) or is copied from another path of the tree.
///
/// Memory stays bounded by the zstd window: files stream from pack to disk; a delta stream holds only its
/// prefix (the bases) in memory and is decoded to a file under `stage_dir/streams/` first.
///
/// # Errors
/// See [`StageError`]. A base or local copy that is not what the owner thought (the tree changed since
/// the scan) is a [`Reason::LocalTree`] refusal. On error the staging directory may hold partial files;
/// the caller removes it.
pub fn stage(plan: &Plan, update: &Update, src: &Sources<'_>, stage_dir: &Path) -> Result<(), StageError> {
    let files = stage_dir.join("files");
    let io_err = |source| StageError::Io { dir: stage_dir.to_path_buf(), source };
    fs::create_dir_all(&files).map_err(io_err)?;
    let puts: std::collections::HashMap<&RelPath, (u64, Digest, &Option<Source>)> = update
        .body
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::Put { path, size, blake3, source, .. } => Some((path, (*size, *blake3, source))),
            _ => None,
        })
        .collect();
    let pack = File::open(src.pack).map_err(io_err)?;
    let progress = crate::progress::Progress::bytes("staging", puts.values().map(|(size, ..)| *size).sum());
    let mut decoded: std::collections::HashMap<u32, PathBuf> = std::collections::HashMap::new();
    for step in &plan.steps {
        let Step::Place { path, staged, .. } = step else { continue };
        let &(size, blake3, source) =
            puts.get(path).ok_or_else(|| Refusal::new(Reason::Malformed, format!("no put for `{path}`")))?;
        let source =
            source.as_ref().ok_or_else(|| Refusal::new(Reason::Malformed, format!("put `{path}` names no source")))?;
        let out_path = files.join(staged);
        // Never an existing file, never through a link.
        let out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&out_path)
            .map_err(io_err)?;
        let out = BufWriter::new(out);
        let bad = |why: String| StageError::Refused(Refusal::new(Reason::BadPayload, format!("`{path}`: {why}")));
        let (written, digest, out) = match source {
            Source::Pack { offset, length } => {
                let frame = io::BufReader::new(section(&pack, *offset, *length).map_err(io_err)?);
                let mut out = out;
                let (n, d) = delta::decompress(frame, &[], size, &mut out).map_err(|e| match e {
                    DecodeError::Io(source) => io_err(source),
                    DecodeError::Bad(why) => bad(why),
                })?;
                (n, d, out)
            }
            Source::Local => {
                let from = (src.local)(&blake3).ok_or_else(|| {
                    local(format!("`{path}` is to be copied from local content {}, which is gone", blake3.short()))
                })?;
                let f = crate::scan::open_regular(&from)
                    .map_err(|e| local(format!("cannot read `{}` to copy it to `{path}`: {e}", from.display())))?;
                copy_hashing(f.take(size.saturating_add(1)), out).map_err(io_err)?
            }
            Source::Delta { stream, start } => {
                let file = match decoded.get(stream) {
                    Some(f) => f.clone(),
                    None => {
                        let f = decode_stream(update, *stream, &pack, src, stage_dir)?;
                        decoded.insert(*stream, f.clone());
                        f
                    }
                };
                let f = section(&File::open(&file).map_err(io_err)?, *start, size).map_err(io_err)?;
                copy_hashing(f, out).map_err(io_err)?
            }
        };
        // Flushed all together below: one syncfs instead of one fsync per file.
        out.into_inner().map_err(|e| io_err(e.into_error()))?;
        progress.add(written);
        if written != size || digest != blake3 {
            return Err(Refusal::new(
                Reason::BadPayload,
                format!(
                    "`{path}` unpacks to {written} bytes with digest {}, control part says {size} bytes, {}",
                    digest.short(),
                    blake3.short()
                ),
            )
            .into());
        }
    }
    let _ = fs::remove_dir_all(stage_dir.join("streams"));
    // Every staged file and the directory's entries reach the disk before the journal is committed (on
    // the data tree's file system: staging must be there). A write error of any of them shows here.
    File::open(&files).and_then(|d| rustix::fs::syncfs(&d).map_err(io::Error::from)).map_err(io_err)?;
    Ok(())
}

/// `length` bytes of `file` from `offset`, as a reader of its own.
fn section(file: &File, offset: u64, length: u64) -> io::Result<io::Take<File>> {
    use std::io::{Seek, SeekFrom};
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    Ok(f.take(length))
}

/// Copies `from` into `out`; returns the bytes copied, their digest, and `out`.
fn copy_hashing<R: Read>(mut from: R, mut out: BufWriter<File>) -> io::Result<(u64, Digest, BufWriter<File>)> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
    Ok((total, h.finalize().into(), out))
}

/// Decodes delta stream `index` into `stage_dir/streams/<index>`, with its bases read from the tree
/// (each checked against its digest) as the prefix or the patch's base, by the stream's method; checks
/// the output's size and digest.
fn decode_stream(
    update: &Update,
    index: u32,
    pack: &File,
    src: &Sources<'_>,
    stage_dir: &Path,
) -> Result<PathBuf, StageError> {
    let io_err = |source| StageError::Io { dir: stage_dir.to_path_buf(), source };
    let stream = usize::try_from(index)
        .ok()
        .and_then(|i| update.body.streams.get(i))
        .ok_or_else(|| Refusal::new(Reason::Malformed, format!("no delta stream {index}")))?;
    let mut prefix = Vec::with_capacity(usize::try_from(stream.prefix_size()).unwrap_or(0));
    for base in &stream.bases {
        let from = (src.local)(&base.blake3).ok_or_else(|| {
            local(format!("delta base {} is not in the tree (it changed since the request)", base.blake3.short()))
        })?;
        let start = prefix.len();
        crate::scan::open_regular(&from)
            .and_then(|f| f.take(base.size.saturating_add(1)).read_to_end(&mut prefix))
            .map_err(|e| local(format!("cannot read delta base `{}`: {e}", from.display())))?;
        if Digest::of(&prefix[start..]) != base.blake3 {
            return Err(local(format!(
                "delta base `{}` is not {} any more (it changed since the request)",
                from.display(),
                base.blake3.short()
            ))
            .into());
        }
    }
    let dir = stage_dir.join("streams");
    fs::create_dir_all(&dir).map_err(io_err)?;
    let path = dir.join(index.to_string());
    let out = BufWriter::new(File::create(&path).map_err(io_err)?);
    let frame = io::BufReader::new(section(pack, stream.offset, stream.length).map_err(io_err)?);
    let bad =
        |why: String| StageError::Refused(Refusal::new(Reason::BadPayload, format!("delta stream {index}: {why}")));
    let mut out = out;
    let decoded = match stream.method {
        Method::ZstdPrefix => delta::decompress(frame, &prefix, stream.size, &mut out),
        Method::Bsdiff => delta::bsdiff::apply(frame, &prefix, stream.size, &mut out),
        Method::Lines => delta::lines::apply(frame, &prefix, stream.size, &mut out),
    };
    let (n, d) = decoded.map_err(|e| match e {
        DecodeError::Io(source) => io_err(source),
        DecodeError::Bad(why) => bad(why),
    })?;
    out.flush().map_err(io_err)?;
    if n != stream.size || d != stream.blake3 {
        return Err(bad(format!(
            "decodes to {n} bytes with digest {}, body says {} bytes, {}",
            d.short(),
            stream.size,
            stream.blake3.short()
        )));
    }
    Ok(path)
}

/// The durable record of an apply in progress. Present in the state directory exactly while the data tree
/// may be between two generations.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Journal {
    /// Journal format version.
    pub version: u32,
    /// The data tree.
    pub data_root: PathBuf,
    /// The staging directory of this apply.
    pub stage_dir: PathBuf,
    /// Generation being applied.
    pub generation: u64,
    /// The reply's id (for a rollback, a fresh id of the same form).
    pub reply_id: ReplyId,
    /// The nonce the reply answered.
    pub nonce: String,
    /// BLAKE3 of the raw message, for the seen-store.
    pub message: Digest,
    /// Number of operations in the reply (for history).
    pub ops: usize,
    /// The generation's full tree.
    pub target: Vec<Listed>,
    /// The steps.
    pub steps: Vec<Step>,
    /// A reply's apply, or a local rollback; journals written before rollbacks existed are applies.
    #[serde(default)]
    pub kind: JournalKind,
    /// The id of the key that authenticated the reply (recorded with the applied generation); none for a
    /// rollback, or in journals written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<KeyId>,
    /// How far the apply got: journals written before hooks existed are [`Phase::Swap`].
    #[serde(default, skip_serializing_if = "Phase::is_swap")]
    pub phase: Phase,
    /// The reply carried the owner's Ed25519 signature under the pinned key, so the scripts its tree lists
    /// may run (with `shipped-hooks = true`); false for a rollback and in journals written before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub signed: bool,
}

/// Where the apply of a [`Journal`] stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The steps are being performed (they may be repeated).
    #[default]
    Swap,
    /// Every step is done and post-apply hooks are due: a crash from here on runs them on the next start
    /// (at least once; the hook is told it may be a rerun), without performing the steps again.
    HooksPending,
}

impl Phase {
    fn is_swap(&self) -> bool {
        *self == Phase::Swap
    }
}

/// What a [`Journal`] records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JournalKind {
    /// The apply of a reply: finished by recording the generation and queueing a receipt.
    #[default]
    Apply,
    /// `mailferry recipient rollback`: finished by recording the generation before and holding back the
    /// one undone.
    Rollback {
        /// The generation being undone.
        from: u64,
    },
}

impl Journal {
    /// Path of the journal file in a state directory.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("journal.json")
    }

    /// Reads the journal of `state_dir`, if an apply was interrupted.
    ///
    /// # Errors
    /// An unreadable or corrupt journal: the operator must look.
    pub fn load(state_dir: &Path) -> Result<Option<Journal>> {
        let path = Journal::path(state_dir);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes).with_context(|| format!("journal `{}` is corrupt", path.display()))?,
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("failed to read `{}`", path.display())),
        }
    }

    /// Durably writes the journal: from this moment the apply will be finished, by this run or the next.
    ///
    /// # Errors
    /// I/O errors; the tree is untouched then.
    pub fn commit(&self, state_dir: &Path) -> Result<()> {
        let path = Journal::path(state_dir);
        let mut tmp = tempfile::NamedTempFile::new_in(state_dir)?;
        serde_json::to_writer(&mut tmp, self)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path).with_context(|| format!("failed to write `{}`", path.display()))?;
        File::open(state_dir)?.sync_all()?;
        Ok(())
    }

    /// Removes the journal once the apply is recorded. The staging directory is left to the caller: it may
    /// become the store of the generation before (see `node::rollback::tidy_staging`).
    ///
    /// # Errors
    /// I/O errors.
    pub fn finish(&self, state_dir: &Path) -> Result<()> {
        let path = Journal::path(state_dir);
        fs::remove_file(&path).with_context(|| format!("failed to remove `{}`", path.display()))?;
        File::open(state_dir)?.sync_all()?;
        Ok(())
    }

    /// The generation's manifest.
    ///
    /// # Errors
    /// A corrupt journal.
    pub fn target(&self) -> Result<Manifest> {
        Ok(Manifest::from_listing(self.target.clone())?)
    }

    /// Performs every step. Safe to call again after a crash at any point: each step checks whether it was
    /// already done.
    ///
    /// The data tree is reached only through [`tree::Dir`] handles. A step that writes (creates, places,
    /// links, changes a mode) fails when a parent directory has become a symbolic link or a file; a step
    /// that removes treats such a path as already gone (it was removed by an earlier run, or a later step
    /// replaced its parent), and removes nothing through a link either way.
    ///
    /// # Errors
    /// I/O errors, or a tree changed under the apply so that a step cannot be completed; a staging
    /// directory on another mount than the data tree is explained as such.
    pub fn execute(&self) -> Result<()> {
        self.execute_steps().map_err(|e| {
            if staging::is_cross_device(&e) {
                e.context(staging::cross_device_help(&self.stage_dir, &self.data_root))
            } else {
                e
            }
        })
    }

    fn execute_steps(&self) -> Result<()> {
        let root = tree::Dir::open_root(&self.data_root)
            .with_context(|| format!("failed to open data tree `{}`", self.data_root.display()))?;
        let own = |name: &str| -> Result<tree::Dir> {
            let dir = self.stage_dir.join(name);
            fs::create_dir_all(&dir).with_context(|| format!("failed to create `{}`", dir.display()))?;
            tree::Dir::open_root(&dir).with_context(|| format!("failed to open `{}`", dir.display()))
        };
        let (files, previous, links) = (own("files")?, own("previous")?, own("links")?);
        let shown = |p: &RelPath| self.data_root.join(p.as_str());
        // The parents whose entries changed, to be flushed at the end (`None` is the root).
        let mut dirty: BTreeSet<Option<RelPath>> = BTreeSet::new();
        // The swap of a large apply takes a while (a rename and an fsync per directory): say so.
        if self.steps.len() >= 10_000 {
            tracing::info!(steps = self.steps.len(), "swapping the new generation into place");
        }
        let progress = crate::progress::Progress::steps("swapping", self.steps.len() as u64);
        for (i, step) in self.steps.iter().enumerate() {
            progress.add(1);
            match step {
                Step::RemoveFile { path } => {
                    let Some((dir, name)) = removal_parent(&root, path)? else { continue };
                    match dir.kind(name).with_context(|| format!("failed to inspect `{}`", shown(path).display()))? {
                        // Done before, or the path became a directory in a later step of a previous run.
                        None | Some(tree::Kind::Dir) => {}
                        Some(_) => {
                            dir.rename_to(name, &previous, &format!("{i:08}"))
                                .with_context(|| format!("failed to remove `{}`", shown(path).display()))?;
                            dirty.insert(path.parent());
                        }
                    }
                }
                Step::RemoveDir { path } => {
                    let Some((dir, name)) = removal_parent(&root, path)? else { continue };
                    if dir.kind(name)? == Some(tree::Kind::Dir) {
                        dir.remove_dir(name)
                            .with_context(|| format!("failed to remove directory `{}`", shown(path).display()))?;
                        dirty.insert(path.parent());
                    }
                }
                Step::Mkdir { path } => {
                    let what = || format!("failed to create directory `{}`", shown(path).display());
                    let (dir, name) = root.walk_parent(path).with_context(what)?;
                    match dir.create_dir(name, 0o755) {
                        Ok(()) => {
                            dirty.insert(path.parent());
                        }
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                            anyhow::ensure!(
                                dir.kind(name)? == Some(tree::Kind::Dir),
                                "{}: something else is in its place",
                                what()
                            );
                        }
                        Err(e) => return Err(e).with_context(what),
                    }
                    dir.set_dir_mode(name, 0o755).with_context(what)?;
                }
                Step::Place { path, staged, blake3 } => {
                    let what = || format!("failed to place `{}`", shown(path).display());
                    let (dir, name) = root.walk_parent(path).with_context(what)?;
                    if files.kind(staged)?.is_some() {
                        // Keep the old content, if any, for the operator and for a rollback.
                        let keep = format!("{i:08}");
                        if dir.kind(name)? == Some(tree::Kind::File)
                            && previous.kind(&keep)?.is_none()
                            && let Err(e) = dir.hard_link_to(name, &previous, &keep)
                        {
                            tracing::warn!(
                                path = %path,
                                error = %e,
                                "could not keep the replaced file; a rollback to the generation before will miss it"
                            );
                        }
                        files.rename_to(staged, &dir, name).with_context(what)?;
                        dirty.insert(path.parent());
                    } else {
                        // Placed by an earlier run; make sure it is what we placed.
                        let (_, got) = dir.open_file(name).and_then(digest_of).with_context(|| {
                            format!("cannot finish the interrupted apply: `{}` is gone", shown(path).display())
                        })?;
                        anyhow::ensure!(
                            got == *blake3,
                            "cannot finish the interrupted apply: `{}` was changed by someone else",
                            shown(path).display()
                        );
                    }
                }
                Step::Link { path, target } => {
                    let what = || format!("failed to place link `{}`", shown(path).display());
                    let (dir, name) = root.walk_parent(path).with_context(what)?;
                    let already = dir.kind(name)? == Some(tree::Kind::Link)
                        && dir.read_link(name).is_ok_and(|t| t.as_os_str() == target.as_str());
                    if !already {
                        let tmp = format!("{i:08}");
                        let _ = links.remove_file(&tmp);
                        links.symlink(target.as_str(), &tmp).with_context(what)?;
                        links.rename_to(&tmp, &dir, name).with_context(what)?;
                        dirty.insert(path.parent());
                    }
                }
                Step::Chmod { path, mode } => {
                    let what = || format!("failed to set the mode of `{}`", shown(path).display());
                    let (dir, name) = root.walk_parent(path).with_context(what)?;
                    dir.set_file_mode(name, mode.bits()).with_context(what)?;
                }
            }
            crate::failpoint::hit("apply-step");
        }
        for rel in dirty {
            let opened = match &rel {
                None => None,
                Some(rel) => match root.walk_dir(rel) {
                    Ok(d) => Some(d),
                    // Gone by now: a later step removed it, and flushes its parent instead.
                    Err(_) => continue,
                },
            };
            let d = opened.as_ref().unwrap_or(&root);
            d.sync().with_context(|| format!("failed to sync `{}`", d.path().display()))?;
        }
        previous.sync().with_context(|| format!("failed to sync `{}`", previous.path().display()))?;
        Ok(())
    }
}

/// The parent directory of a path to remove, or `None` when the path cannot be there: a parent is missing,
/// or is not a directory (removed by an earlier run, replaced by a later step, or swapped for a link,
/// which is never followed).
fn removal_parent<'a>(root: &tree::Dir, path: &'a RelPath) -> Result<Option<(tree::Dir, &'a str)>> {
    match root.walk_parent(path) {
        Ok(found) => Ok(Some(found)),
        Err(tree::WalkError::Missing { .. } | tree::WalkError::NotDir { .. }) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("failed to remove `{path}`")),
    }
}

/// Size and BLAKE3 of an open file, read once.
fn digest_of(f: File) -> io::Result<(u64, Digest)> {
    let len = f.metadata()?.len();
    crate::scan::hash_reader(f, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Nonce;
    use crate::manifest::{FileMeta, diff};
    use crate::protocol::{Body, Frame, Kind, Reply, VERSION};
    use crate::scan::Foreign;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn tree(items: &[(&str, Option<&[u8]>)]) -> Manifest {
        let mut m = Manifest::new();
        for (path, c) in items {
            m.insert(
                p(path),
                c.map_or(Entry::Dir, |c| {
                    Entry::File(FileMeta { size: c.len() as u64, mode: Mode::Regular, blake3: Digest::of(c) })
                }),
            );
        }
        m.validate().unwrap();
        m
    }

    fn reply_for(from: &Manifest, to: &Manifest) -> Update {
        let head = Reply {
            mailferry: VERSION,
            kind: Kind::Reply,
            recipient: "r".into(),
            nonce: Nonce([0; 16]),
            request_seq: 1,
            reply_id: ReplyId::unchecked("x"),
            part: 1,
            parts: 1,
            created: 0,
            generation: 1,
            root: to.root(),
            base: from.root(),
            need_full_inventory: false,
            payloads: vec![],
            body: Frame { offset: 0, length: 0, size: 0, blake3: Digest([0; 32]) },
            rekey: None,
            same_as: None,
            sealed_key: None,
            broadcast: None,
            channel: "default".into(),
            standing: None,
            pinned: None,
        };
        Update { head, body: Body { mailferry: VERSION, ops: diff(from, to), streams: vec![] } }
    }

    #[test]
    fn plan_refuses_unsafe_trees_and_mismatches() {
        let from = tree(&[("a", None), ("a/x", Some(b"1"))]);
        let to = tree(&[("a", None), ("a/x", Some(b"2"))]);
        let ok = Scan { manifest: from.clone(), foreign: vec![] };
        assert!(plan(&ok, &from, &reply_for(&from, &to), OnExtra::Delete).is_ok());

        let mut lying = reply_for(&from, &to);
        lying.head.root = Digest([9; 32]);
        assert_eq!(plan(&ok, &from, &lying, OnExtra::Delete).unwrap_err().reason, Reason::TreeMismatch);

        let drifted = Scan { manifest: tree(&[("a", None)]), foreign: vec![] };
        assert_eq!(
            plan(&drifted, &from, &reply_for(&from, &to), OnExtra::Delete).unwrap_err().reason,
            Reason::LocalTree
        );

        for kind in [ForeignKind::Symlink { target: "/etc".into() }, ForeignKind::Special("character device")] {
            let bad = Scan { manifest: from.clone(), foreign: vec![Foreign { path: p("z"), kind }] };
            assert_eq!(
                plan(&bad, &from, &reply_for(&from, &to), OnExtra::Delete).unwrap_err().reason,
                Reason::LocalTree
            );
        }
        // A path below a symlink that the tree manages is refused: the link is not a directory.
        let mut linked = from.clone();
        linked.insert(p("a"), Entry::Link(LinkTarget::new("elsewhere").unwrap()));
        linked.insert(p("elsewhere"), Entry::Dir);
        let mut via = reply_for(&from, &to);
        via.head.base = linked.root();
        let through_link = Scan { manifest: linked, foreign: vec![] };
        assert_eq!(plan(&through_link, &from, &via, OnExtra::Delete).unwrap_err().reason, Reason::BadPath);
    }

    #[test]
    fn plan_refuses_results_whose_names_collide_or_whose_links_lead_out() {
        let from = tree(&[("d", None), ("d/x", Some(b"1"))]);
        let current = Scan { manifest: from.clone(), foreign: vec![] };
        let link = |t: &str| Entry::Link(LinkTarget::new(t).unwrap());
        // (case, entries the target adds, what the refusal's detail says)
        type Case<'a> = (&'a str, Vec<(&'a str, Entry)>, &'a str);
        let cases: Vec<Case> = vec![
            ("escaping chain", vec![("d/y", link("..")), ("d/z", link("y/../.."))], "link `d/z` leads outside"),
            ("loop", vec![("a", link("b")), ("b", link("a"))], "link `a` never resolves"),
            ("NFD beside NFC", vec![("cafe\u{301}", Entry::Dir), ("caf\u{e9}", Entry::Dir)], "name the same file"),
            ("case", vec![("D", Entry::Dir)], "`D` and `d` name the same file"),
        ];
        for (why, add, detail) in cases {
            let mut to = from.clone();
            for (path, entry) in add {
                to.insert(p(path), entry);
            }
            let err = plan(&current, &from, &reply_for(&from, &to), OnExtra::Delete).unwrap_err();
            assert_eq!(err.reason, Reason::BadPath, "{why}");
            assert!(err.detail.contains(detail), "{why}: {}", err.detail);
        }

        // An extra link that is kept gives a new link a way out that the target alone does not show.
        let mut with_extra = from.clone();
        with_extra.insert(p("d/k"), link(".."));
        let current = Scan { manifest: with_extra.clone(), foreign: vec![] };
        let mut to = from.clone();
        to.insert(p("d/z"), link("k/.."));
        let update = reply_for(&with_extra, &to);
        let err = plan(&current, &from, &update, OnExtra::Keep).unwrap_err();
        assert_eq!(err.reason, Reason::BadPath);
        assert!(err.detail.contains("through link `d/k`"), "{}", err.detail);
        assert!(plan(&current, &from, &update, OnExtra::Delete).is_ok(), "deleted, the extra leads nowhere");
    }

    /// What a directory holds, with modes and link targets, to prove nothing in it changed.
    fn listing(dir: &Path) -> Vec<(String, u32, Option<Vec<u8>>)> {
        use std::os::unix::fs::PermissionsExt;
        let mut out: Vec<_> = walkdir::WalkDir::new(dir)
            .follow_links(false)
            .into_iter()
            .map(|e| {
                let e = e.unwrap();
                let m = e.path().symlink_metadata().unwrap();
                let content = if m.is_file() { Some(fs::read(e.path()).unwrap()) } else { None };
                (e.path().display().to_string(), m.permissions().mode(), content)
            })
            .collect();
        out.sort();
        out
    }

    /// A journal whose steps act below `a/`, and `a/` swapped for a link to a directory outside the tree
    /// after the journal was committed: no step may write, remove or change anything outside.
    #[test]
    fn a_directory_swapped_for_a_link_before_execute_is_never_written_through() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let cases: Vec<(&str, Step, bool)> = vec![
            ("place", Step::Place { path: p("a/x"), staged: "00000000".into(), blake3: Digest::of(b"new") }, true),
            ("mkdir", Step::Mkdir { path: p("a/new") }, true),
            ("link", Step::Link { path: p("a/l"), target: LinkTarget::new("y").unwrap() }, true),
            ("chmod", Step::Chmod { path: p("a/y"), mode: Mode::Executable }, true),
            ("chmod of a link itself", Step::Chmod { path: p("to-y"), mode: Mode::Executable }, true),
            ("mkdir over a link", Step::Mkdir { path: p("to-outside") }, true),
            ("remove file", Step::RemoveFile { path: p("a/y") }, false),
            ("remove dir", Step::RemoveDir { path: p("a/d") }, false),
        ];
        for (name, step, fails) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let (data, outside, stage) =
                (tmp.path().join("data"), tmp.path().join("outside"), tmp.path().join("stage"));
            for root in [&data, &outside] {
                let a = if root == &data { root.join("a") } else { root.clone() };
                fs::create_dir_all(a.join("d")).unwrap();
                fs::write(a.join("y"), b"y").unwrap();
                fs::set_permissions(a.join("y"), fs::Permissions::from_mode(0o644)).unwrap();
            }
            fs::create_dir_all(stage.join("files")).unwrap();
            fs::write(stage.join("files/00000000"), b"new").unwrap();
            symlink(outside.join("y"), data.join("to-y")).unwrap();
            symlink(&outside, data.join("to-outside")).unwrap();
            // The swap: the real `a` moves away and a link to the outside takes its place.
            fs::rename(data.join("a"), tmp.path().join("moved")).unwrap();
            symlink(&outside, data.join("a")).unwrap();
            let before = listing(&outside);
            let journal = Journal {
                version: 1,
                data_root: data.clone(),
                stage_dir: stage,
                generation: 2,
                reply_id: ReplyId::unchecked("0".repeat(32)),
                nonce: "0".repeat(32),
                message: Digest::of(b""),
                ops: 1,
                target: vec![],
                steps: vec![step],
                kind: JournalKind::Apply,
                key_id: None,
                phase: Phase::Swap,
                signed: false,
            };
            let res = journal.execute();
            assert_eq!(listing(&outside), before, "{name}: nothing outside the tree changed");
            match res {
                Err(e) if fails => {
                    let msg = format!("{e:#}");
                    assert!(
                        ["is not a directory", "in its place", "never followed"].iter().any(|w| msg.contains(w)),
                        "{name}: {msg}"
                    );
                }
                Ok(()) if !fails => {}
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_journal_written_before_hooks_existed_reads_as_swapping_and_unsigned() {
        let old = r#"{"version":1,"data-root":"/d","stage-dir":"/s","generation":2,
            "reply-id":"00000000000000000000000000000000","nonce":"00","message":"af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
            "ops":0,"target":[],"steps":[]}"#;
        let j: Journal = serde_json::from_str(old).unwrap();
        assert_eq!((j.phase, j.signed, j.kind), (Phase::Swap, false, JournalKind::Apply));
        let pending = Journal { phase: Phase::HooksPending, ..j };
        let back: Journal = serde_json::from_slice(&serde_json::to_vec(&pending).unwrap()).unwrap();
        assert_eq!(back.phase, Phase::HooksPending);
    }

    #[test]
    fn keep_leaves_extras_but_deletes_what_the_owner_removed() {
        let previous = tree(&[("old", Some(b"o"))]);
        let local = tree(&[("old", Some(b"o")), ("mine", None), ("mine/notes", Some(b"n"))]);
        let target = tree(&[("new", Some(b"n"))]);
        let scan = Scan { manifest: local.clone(), foreign: vec![] };
        let plan = plan(&scan, &previous, &reply_for(&local, &target), OnExtra::Keep).unwrap();
        assert_eq!(plan.kept, vec![p("mine/notes"), p("mine")]);
        assert!(plan.steps.contains(&Step::RemoveFile { path: p("old") }));
        assert!(!plan.steps.iter().any(
            |s| matches!(s, Step::RemoveFile { path } | Step::RemoveDir { path } if path.as_str().starts_with("mine"))
        ));
    }
}
