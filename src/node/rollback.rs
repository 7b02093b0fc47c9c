//! `mailferry recipient rollback`: returns the data tree to the generation applied before the current one,
//! from files kept locally, and holds the undone generation back.
//!
//! What is kept: after an apply that moves the tree to a newer generation, the apply's staging directory
//! stays under the staging root (on the data tree's file system, so files move by rename) as the *store*
//! of the generation before: its `previous/` holds every file the apply replaced or deleted. The state
//! database keeps that generation's number and manifest and the store's path ([`Sub::previous`]), recorded
//! in the transaction that records the apply ([`keep_previous`]). The next such apply replaces both and
//! [`tidy_staging`] removes the old store: one generation is kept, so there is one level of rollback.
//!
//! A rollback plans the way back ([`plan`], pure), stages every file it needs from the store or from a file
//! of the tree with the same content (BLAKE3 checked while copying), and runs through the same journal as
//! an apply ([`Journal::execute`]): after a crash the next run finishes it, so the tree is the current
//! generation or the one before, never a mix. It then records the generation before as applied and holds
//! back the undone one ([`Sub::record_rollback`]): a reply bringing it or an older generation is not
//! applied ([`hold`]); a newer generation applies normally and ends the hold; `rollback --release` ends it
//! by hand.
//!
//! Refused: with nothing kept, while an apply is interrupted, and when the tree has drifted from the
//! applied generation (a rollback would silently overwrite or mix in the drift; the next sync repairs it,
//! then the rollback works). Nothing here talks to the owner: the wire protocol is unchanged, and the next
//! request simply names the generation the recipient has again.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use tracing::{info, warn};

use super::Handled;
use crate::apply::{Journal, JournalKind, OnExtra, Step, tree};
use crate::config::Subscription;
use crate::db::{Db, Sub};
use crate::manifest::{Digest, Entry, FileMeta, Manifest, Op, diff, ordered};
use crate::path::RelPath;
use crate::scan::Scan;

/// Why a rollback cannot be planned on the tree as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// The tree holds something mailferry never touches.
    #[error("the data tree holds `{0}`, a special file or a symbolic link leading outside it")]
    Foreign(RelPath),
    /// The tree is not the applied generation.
    #[error("`{path}` {why} since the generation was applied")]
    Drift {
        /// Where.
        path: RelPath,
        /// What happened to it.
        why: &'static str,
    },
    /// A file left in place by `on-extra = "keep"` sits where the generation before has no directory.
    #[error("`{0}` is kept by on-extra = \"keep\", but the generation before has a file or link on its way")]
    Conflict(RelPath),
}

/// The way back to the generation before.
#[derive(Debug, Clone)]
pub struct RollbackPlan {
    /// The tree afterwards: the generation before, plus files left in place by `on-extra = "keep"`.
    pub result: Manifest,
    /// The operations from the tree to `result`.
    pub ops: Vec<Op>,
    /// The journal's steps, in execution order.
    pub steps: Vec<Step>,
    /// Every file to stage: its staged name, where it goes, and what it must be.
    pub puts: Vec<(String, RelPath, FileMeta)>,
}

/// Plans the way from the tree as `scan` found it, which must be the `applied` generation (plus extras when
/// `on_extra` keeps them), back to `previous`.
///
/// # Errors
/// See [`Refused`].
pub fn plan(scan: &Scan, applied: &Manifest, previous: &Manifest, on_extra: OnExtra) -> Result<RollbackPlan, Refused> {
    if let Some(f) = scan.foreign.first() {
        return Err(Refused::Foreign(f.path.clone()));
    }
    let tree = &scan.manifest;
    for (path, entry) in applied.iter() {
        match tree.get(path) {
            None => return Err(Refused::Drift { path: path.clone(), why: "was removed" }),
            Some(now) if now != entry => return Err(Refused::Drift { path: path.clone(), why: "was changed" }),
            Some(_) => {}
        }
    }
    let mut result = previous.clone();
    let extras: Vec<(&RelPath, &Entry)> = tree.iter().filter(|(p, _)| applied.get(p).is_none()).collect();
    for (path, entry) in &extras {
        if on_extra == OnExtra::Delete || previous.get(path).is_some() {
            return Err(Refused::Drift { path: (*path).clone(), why: "was added" });
        }
        result.insert((*path).clone(), (*entry).clone());
    }
    // A kept file's directories stay too, when the generation before does not have them.
    for (path, _) in &extras {
        let mut up = path.parent();
        while let Some(dir) = up {
            match result.get(&dir) {
                Some(Entry::Dir) => {}
                None => result.insert(dir.clone(), Entry::Dir),
                Some(_) => return Err(Refused::Conflict((*path).clone())),
            }
            up = dir.parent();
        }
    }
    let ops = diff(tree, &result);
    let (steps, puts) = steps_for(tree, &ops);
    Ok(RollbackPlan { result, ops, steps, puts })
}

/// Turns operations on `tree` into journal steps, as [`crate::apply::plan`] does for a reply: in
/// [`ordered`] order, every put staged under its own name, and every placed file ending with a mode step so
/// that a re-run after a crash is exact.
fn steps_for(tree: &Manifest, ops: &[Op]) -> (Vec<Step>, Vec<(String, RelPath, FileMeta)>) {
    let mut steps = Vec::new();
    let mut puts: Vec<(String, RelPath, FileMeta)> = Vec::new();
    for op in ordered(ops) {
        steps.push(match op {
            Op::Delete { path } if tree.get(path) == Some(&Entry::Dir) => Step::RemoveDir { path: path.clone() },
            Op::Delete { path } => Step::RemoveFile { path: path.clone() },
            Op::Mkdir { path } => Step::Mkdir { path: path.clone() },
            Op::Put { path, size, mode, blake3, .. } => {
                let staged = format!("{:08}", puts.len());
                puts.push((staged.clone(), path.clone(), FileMeta { size: *size, mode: *mode, blake3: *blake3 }));
                Step::Place { path: path.clone(), staged, blake3: *blake3 }
            }
            Op::Link { path, target } => Step::Link { path: path.clone(), target: target.clone() },
            Op::Chmod { path, mode } => Step::Chmod { path: path.clone(), mode: *mode },
        });
    }
    steps.extend(puts.iter().map(|(_, path, meta)| Step::Chmod { path: path.clone(), mode: meta.mode }));
    (steps, puts)
}

/// What a rollback ([`crate::node::recipient::Recipient::rollback`]) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolledBack {
    /// The generation undone, now held back.
    pub from: u64,
    /// The generation the tree has again.
    pub to: u64,
    /// Operations performed.
    pub ops: usize,
    /// It finished a rollback that a crash had interrupted.
    pub resumed: bool,
}

/// Records a rollback whose steps are done (the generation before is applied, the undone one held back),
/// removes its journal, and tidies the staging root.
///
/// # Errors
/// State or I/O failures; the journal then stays and the next run finishes.
pub(crate) fn complete(
    db: &Db,
    tree: &Subscription,
    journal: &Journal,
    also: impl FnOnce(&Db) -> Result<()>,
) -> Result<()> {
    let JournalKind::Rollback { from } = journal.kind else {
        bail!("journal of reply {} is not a rollback", journal.reply_id)
    };
    let target = journal.target()?;
    db.transaction(|all| {
        let db = all.sub(&tree.channel)?;
        if !db.reply_applied(&journal.reply_id)? {
            db.record_rollback(journal.generation, &target, &journal.reply_id, journal.ops, from)?;
            // What depends on the rollback being recorded (its receipt) is queued with the record.
            also(all)?;
        }
        Ok(())
    })?;
    journal.finish(&tree.dir)?;
    if let Some(root) = journal.stage_dir.parent() {
        tidy_staging(db.sub(&tree.channel)?, root);
    }
    info!(from, to = journal.generation, "rolled back; generation {from} and older are held back");
    Ok(())
}

/// Ends the rollback hold; returns the generation that was held back, if any.
///
/// # Errors
/// State failures.
pub fn release(db: Sub<'_>) -> Result<Option<u64>> {
    let held = db.rollback_hold()?;
    db.set_rollback_hold(None)?;
    Ok(held)
}

/// The hook in the recipient's reply checks, after the generation checks: a reply bringing a generation a
/// rollback holds back (or an older one) is not applied. Its request counts as answered and the owner as
/// heard from (it answered, authentically, with nothing newer); nothing is confirmed and no receipt is
/// sent. `None` when the reply may go on.
///
/// # Errors
/// State failures.
pub fn hold(all: &Db, db: Sub<'_>, generation: u64, nonce: &str, digest: &Digest) -> Result<Option<Handled>> {
    let Some(held) = db.rollback_hold()? else { return Ok(None) };
    if generation > held {
        return Ok(None);
    }
    all.transaction(|all| {
        let db = all.sub(db.name())?;
        db.close_outstanding(nonce)?;
        db.mark_fresh_reply()?;
        all.mark_seen(digest, "processed")
    })?;
    warn!(
        generation,
        held,
        "not applying generation {generation}: a local rollback holds back generation {held} and older \
         (`mailferry recipient rollback --release` ends the hold)"
    );
    Ok(Some(Handled::Held { generation, held }))
}

/// Called in the transaction that records an apply, before recording it. When the apply moves to a newer
/// generation, the generation it replaces becomes the one kept for a rollback, with this apply's staging
/// directory as its store (its `previous/` holds what the apply replaced or deleted); a first apply keeps
/// nothing. A newer generation than a held one ends the hold. An apply that repairs drift in the same
/// generation changes neither.
///
/// # Errors
/// State failures.
pub fn keep_previous(db: Sub<'_>, journal: &Journal) -> Result<()> {
    let (applied, _, manifest) = db.applied()?;
    if journal.generation > applied {
        if applied > 0 {
            db.set_previous(applied, &manifest, &journal.stage_dir)?;
        } else {
            db.clear_previous()?;
        }
    }
    if let Some(held) = db.rollback_hold()?
        && journal.generation > held
    {
        info!(generation = journal.generation, held, "a newer generation than the one rolled back ends the hold");
        db.set_rollback_hold(None)?;
    }
    Ok(())
}

/// Removes staging directories under `root` other than the store of the kept generation: those of finished
/// applies and rollbacks, of failed stagings, and the store of the generation kept before. Only entries
/// named like staging directories (32 hex digits) are touched, whatever else an operator keeps there.
/// Failures are logged: a leftover directory costs space, not correctness.
pub fn tidy_staging(db: Sub<'_>, root: &Path) {
    let keep = match db.previous() {
        Ok(p) => p.map(|p| p.store),
        Err(e) => {
            warn!(error = %format!("{e:#}"), "not tidying the staging directory");
            return;
        }
    };
    // An update kept ready to install (node::install) has its files staged there too.
    let waiting = super::install::waiting_stage_dir(db.db(), db.name());
    let Ok(entries) = fs::read_dir(root) else { return };
    for e in entries.flatten() {
        let path = e.path();
        if !is_staging_name(&e.file_name().to_string_lossy()) || waiting.as_deref() == Some(path.as_path()) {
            continue;
        }
        let res = if keep.as_deref() == Some(path.as_path()) {
            // The store needs only what the apply kept.
            ["files", "links"].iter().map(|d| path.join(d)).filter(|d| d.exists()).try_for_each(fs::remove_dir_all)
        } else {
            fs::remove_dir_all(&path)
        };
        if let Err(err) = res {
            warn!(error = %err, "failed to remove `{}`", path.display());
        }
    }
}

fn is_staging_name(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Stages every file of `plan` into `stage_dir/files/`: from the store's `previous/`, or else from a file
/// of the tree (as `tree` lists it) with the same content. Every copy is checked against its size and
/// BLAKE3 as it is written, and fsynced.
pub(crate) fn stage(plan: &RollbackPlan, store: &Path, data: &Path, tree: &Manifest, stage_dir: &Path) -> Result<()> {
    // Kept files are named by step, not content: learn their content by reading them (the store holds only
    // what one apply replaced or deleted). Files that cannot be read are simply not used.
    let kept_dir = store.join("previous");
    let mut kept: HashMap<Digest, PathBuf> = HashMap::new();
    match fs::read_dir(&kept_dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                if let Ok((_, d)) = crate::scan::hash_file(&e.path()) {
                    kept.insert(d, e.path());
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("failed to read `{}`", kept_dir.display())),
    }
    let in_tree: HashMap<Digest, &RelPath> = tree
        .iter()
        .filter_map(|(p, e)| match e {
            Entry::File(f) => Some((f.blake3, p)),
            _ => None,
        })
        .collect();
    let root = tree::Dir::open_root(data).with_context(|| format!("failed to open data tree `{}`", data.display()))?;
    let files = stage_dir.join("files");
    fs::create_dir_all(&files).with_context(|| format!("failed to create `{}`", files.display()))?;
    let out = tree::Dir::open_root(&files).with_context(|| format!("failed to open `{}`", files.display()))?;
    for (staged, path, meta) in &plan.puts {
        let from_store = kept.get(&meta.blake3).and_then(|p| crate::scan::open_regular(p).ok());
        let from_tree = || {
            let rel = in_tree.get(&meta.blake3)?;
            let (dir, name) = root.walk_parent(rel).ok()?;
            dir.open_file(name).ok()
        };
        let mut copied = false;
        for src in [from_store, from_tree()].into_iter().flatten() {
            if copy_checked(src, &out, staged, meta).with_context(|| format!("failed to stage `{path}`"))? {
                copied = true;
                break;
            }
        }
        if !copied {
            bail!(
                "the content of `{path}` ({}) is kept neither in `{}` nor elsewhere in the tree",
                meta.blake3.short(),
                kept_dir.display()
            );
        }
    }
    out.sync().with_context(|| format!("failed to sync `{}`", files.display()))?;
    Ok(())
}

/// Copies `from` into a new file `name` in `dir`, checking the size and BLAKE3 of `meta` as it goes, and
/// fsyncs it. Returns false, leaving no file, when the content is not `meta`'s.
pub(crate) fn copy_checked(mut from: File, dir: &tree::Dir, name: &str, meta: &FileMeta) -> io::Result<bool> {
    let mut out = dir.create_file(name, 0o600)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > meta.size {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    if total != meta.size || Digest::from(h.finalize()) != meta.blake3 {
        drop(out);
        dir.remove_file(name)?;
        return Ok(false);
    }
    out.sync_all()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{LinkTarget, Mode};
    use crate::scan::{Foreign, ForeignKind};

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn file(content: &[u8], mode: Mode) -> Entry {
        Entry::File(FileMeta { size: content.len() as u64, mode, blake3: Digest::of(content) })
    }

    fn tree(items: &[(&str, Entry)]) -> Manifest {
        let mut m = Manifest::new();
        for (path, e) in items {
            m.insert(p(path), e.clone());
        }
        m.validate_shape().unwrap();
        m
    }

    fn link(t: &str) -> Entry {
        Entry::Link(LinkTarget::new(t).unwrap())
    }

    fn scan(m: &Manifest) -> Scan {
        Scan { manifest: m.clone(), foreign: vec![] }
    }

    /// Generation 1 and generation 2: an edit, a deletion, an addition, a mode change, a file that became a
    /// directory and a link that moved.
    fn generations() -> (Manifest, Manifest) {
        let g1 = tree(&[
            ("README", file(b"v1", Mode::Regular)),
            ("gone.txt", file(b"gone", Mode::Regular)),
            ("tool", file(b"tool", Mode::Executable)),
            ("typechange", file(b"was a file", Mode::Regular)),
            ("latest", link("README")),
        ]);
        let g2 = tree(&[
            ("README", file(b"v2", Mode::Regular)),
            ("new.txt", file(b"new", Mode::Regular)),
            ("tool", file(b"tool", Mode::Regular)),
            ("typechange", Entry::Dir),
            ("typechange/x", file(b"x", Mode::Regular)),
            ("latest", link("new.txt")),
        ]);
        (g1, g2)
    }

    #[test]
    fn plans_the_exact_generation_before() {
        let (g1, g2) = generations();
        let plan = plan(&scan(&g2), &g2, &g1, OnExtra::Delete).unwrap();
        assert_eq!(plan.result, g1);
        assert_eq!(g2.apply(&plan.ops).unwrap(), g1, "the operations lead exactly to generation 1");
        let placed: Vec<&str> = plan.puts.iter().map(|(_, path, _)| path.as_str()).collect();
        assert_eq!(placed, ["README", "gone.txt", "typechange"], "only content that differs is staged");
        // The directory goes before the file takes its place, and every placed file ends with its mode.
        let at = |want: &Step| plan.steps.iter().position(|s| s == want).unwrap();
        assert!(at(&Step::RemoveFile { path: p("typechange/x") }) < at(&Step::RemoveDir { path: p("typechange") }));
        assert!(
            at(&Step::RemoveDir { path: p("typechange") })
                < at(&Step::Chmod { path: p("typechange"), mode: Mode::Regular })
        );
        for (_, path, meta) in &plan.puts {
            assert_eq!(
                plan.steps.iter().rev().find(|s| matches!(s, Step::Chmod { path: c, .. } if c == path)),
                Some(&Step::Chmod { path: path.clone(), mode: meta.mode })
            );
        }
        assert!(plan.steps.contains(&Step::Chmod { path: p("tool"), mode: Mode::Executable }));
        assert!(plan.steps.contains(&Step::Link { path: p("latest"), target: LinkTarget::new("README").unwrap() }));
    }

    #[test]
    fn refuses_a_tree_that_drifted_or_holds_foreign_entries() {
        let (g1, g2) = generations();
        let mut changed = g2.clone();
        changed.insert(p("README"), file(b"edited", Mode::Regular));
        let mut removed = g2.clone();
        removed.remove(&p("new.txt"));
        let mut added = g2.clone();
        added.insert(p("stray"), file(b"s", Mode::Regular));
        for (name, tree, why) in
            [("changed", changed, "was changed"), ("removed", removed, "was removed"), ("added", added, "was added")]
        {
            match plan(&scan(&tree), &g2, &g1, OnExtra::Delete) {
                Err(Refused::Drift { why: got, .. }) => assert_eq!(got, why, "{name}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        let foreign = Scan {
            manifest: g2.clone(),
            foreign: vec![Foreign { path: p("fifo"), kind: ForeignKind::Special("FIFO") }],
        };
        assert_eq!(plan(&foreign, &g2, &g1, OnExtra::Delete).unwrap_err(), Refused::Foreign(p("fifo")));
    }

    #[test]
    fn keep_leaves_local_files_and_their_directories_in_place() {
        let (g1, g2) = generations();
        let mut local = g2.clone();
        local.insert(p("typechange/mine.txt"), file(b"mine", Mode::Regular));
        local.insert(p("notes"), Entry::Dir);
        local.insert(p("notes/a"), file(b"a", Mode::Regular));
        // `typechange` is a file in generation 1: a kept file cannot stay inside it.
        assert_eq!(
            plan(&scan(&local), &g2, &g1, OnExtra::Keep).unwrap_err(),
            Refused::Conflict(p("typechange/mine.txt"))
        );

        local.remove(&p("typechange/mine.txt"));
        let ok = plan(&scan(&local), &g2, &g1, OnExtra::Keep).unwrap();
        assert_eq!(ok.result.get(&p("notes/a")), local.get(&p("notes/a")));
        assert!(!ok.ops.iter().any(|op| op.path().as_str().starts_with("notes")));
        // With delete, the same files are drift.
        assert!(matches!(plan(&scan(&local), &g2, &g1, OnExtra::Delete), Err(Refused::Drift { .. })));
        // A kept file whose path the generation before uses is drift either way.
        let mut clash = g2.clone();
        clash.insert(p("gone.txt"), file(b"other", Mode::Regular));
        assert!(matches!(plan(&scan(&clash), &g2, &g1, OnExtra::Keep), Err(Refused::Drift { .. })));
    }

    #[test]
    fn staging_names_are_recognised_and_nothing_else() {
        assert!(is_staging_name(&"0123456789abcdef".repeat(2)));
        for other in [
            "previous",
            "0123456789ABCDEF0123456789ABCDEF",
            "0123",
            &"0".repeat(33),
            "../0123456789abcdef0123456789abcd",
        ] {
            assert!(!is_staging_name(other), "{other}");
        }
    }

    #[test]
    fn copies_only_content_that_matches() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("src"), b"content").unwrap();
        let dir = tree::Dir::open_root(tmp.path()).unwrap();
        let meta = |c: &[u8]| FileMeta { size: c.len() as u64, mode: Mode::Regular, blake3: Digest::of(c) };
        let open = || File::open(tmp.path().join("src")).unwrap();
        assert!(!copy_checked(open(), &dir, "a", &meta(b"other")).unwrap());
        assert!(!copy_checked(open(), &dir, "b", &meta(b"conten")).unwrap(), "longer than declared");
        assert!(!tmp.path().join("a").exists() && !tmp.path().join("b").exists());
        assert!(copy_checked(open(), &dir, "c", &meta(b"content")).unwrap());
        assert_eq!(fs::read(tmp.path().join("c")).unwrap(), b"content");
    }
}
