//! The owner's old generations: what happens to a generation when it leaves `keep-generations`.
//!
//! Its file list stays in the state database (as an old generation), so that a request naming it is
//! rebuilt and answered directly, without asking for a full inventory. Its content that no kept
//! generation refers to stays in the store as a delta against the newest kept version of the same path
//! ([`Store::put_delta`]), so the packer can use it as a delta base like any kept file, reading it through
//! the store. A delta's base is always a kept whole object: when that base itself leaves, the deltas on it
//! are made again against the new newest version (chains are one deep). Content whose path no kept
//! generation has any more stays whole. `keep-history` bounds all of it: old generations past it are
//! forgotten, and their content with them.

use std::collections::{HashMap, HashSet};

use anyhow::Result;
use tracing::warn;

use crate::config::KeepHistory;
use crate::db::Db;
use crate::manifest::{Digest, Entry};
use crate::store::Store;

/// What [`retire`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Retired {
    /// Old generations forgotten past `keep-history`.
    pub forgotten: usize,
    /// Old versions newly kept as deltas (or made again against a new base).
    pub deltas: usize,
    /// Old versions kept whole (no kept version of their path, or a delta would not be smaller).
    pub whole: usize,
    /// Whole objects and deltas removed, and their stored bytes.
    pub removed: usize,
    /// Stored bytes removed.
    pub removed_bytes: u64,
}

/// Forgets old generations past `keep` (at time `now`), keeps the content of the others small, and
/// removes from the store whatever neither a kept nor an old generation refers to. Call after
/// [`Db::prune_generations`].
///
/// # Errors
/// Database and store errors. An old version the store cannot read back is logged and dropped: a
/// recipient on it gets whole files, as it would past the horizon.
pub fn retire(db: &Db, store: &Store, keep: KeepHistory, now: u64) -> Result<Retired> {
    let mut done = Retired {
        forgotten: match keep {
            KeepHistory::Age(age) => db.forget_old_generations(Some(now.saturating_sub(age.as_secs())), None)?,
            KeepHistory::Generations(n) => db.forget_old_generations(None, Some(n))?,
        },
        ..Retired::default()
    };
    let kept = db.kept_contents()?;
    let newest = db.newest_versions()?;
    // Each old version, with the newest kept version of its path (from the newest old generation that
    // has it) as its base.
    let mut old: HashMap<Digest, Option<Digest>> = HashMap::new();
    for (channel, _, _, m) in db.old_generations()?.iter().rev() {
        for (path, e) in m.iter() {
            let Entry::File(f) = e else { continue };
            if kept.contains(&f.blake3) {
                continue;
            }
            let base = newest.get(&(channel.clone(), path.clone())).copied().filter(|b| *b != f.blake3);
            let slot = old.entry(f.blake3).or_insert(None);
            if slot.is_none() {
                *slot = base;
            }
        }
    }
    let mut keep_whole: HashSet<Digest> = kept.clone();
    let mut keep_delta: HashSet<Digest> = HashSet::new();
    // Old versions of one path share their bases: in that order, each base is read once.
    let mut order: Vec<(Digest, Option<Digest>, Option<Digest>)> = Vec::with_capacity(old.len());
    for (d, base) in &old {
        order.push((*d, store.delta_base(d)?, *base));
    }
    order.sort_by_key(|(d, now, new)| (*now, *new, *d));
    let mut bases = Bases::default();
    for (d, current, base) in &order {
        // Gone before (pruned by an older mailferry, or dropped as unreadable): nothing to keep.
        if !store.contains(d) {
            continue;
        }
        if let Some(b) = current
            && kept.contains(b)
            && store.has_whole(b)
        {
            keep_delta.insert(*d);
            continue;
        }
        // A new old version, or a delta whose base is leaving: read it while its base is still there.
        let got = match current {
            Some(b) => bases.get(store, b).and_then(|data| store.content_on(d, Some((b, &data)))),
            None => store.content(d),
        };
        let content = match got {
            Ok(c) => c,
            Err(e) => {
                warn!(object = %d.short(), "an old version cannot be read back, dropping it: {e}");
                continue;
            }
        };
        match base.filter(|b| store.has_whole(b)) {
            Some(b) => match store.put_delta_on(d, &content, &b, &bases.get(store, &b)?)? {
                Some(_) => {
                    keep_delta.insert(*d);
                    done.deltas += 1;
                }
                None => {
                    keep_whole.insert(*d);
                    done.whole += 1;
                }
            },
            None => {
                if !store.has_whole(d) {
                    store.put_bytes(&content)?;
                }
                keep_whole.insert(*d);
                done.whole += 1;
            }
        }
    }
    drop(bases);
    let (objects, bytes) = store.retain(&keep_whole)?;
    let (deltas, delta_bytes) = store.retain_deltas(&keep_delta)?;
    done.removed = objects + deltas;
    done.removed_bytes = bytes + delta_bytes;
    Ok(done)
}

/// The bases read last: in the order [`retire`] goes, the old versions of one path come together.
#[derive(Default)]
struct Bases(Vec<(Digest, std::rc::Rc<Vec<u8>>)>);

impl Bases {
    fn get(&mut self, store: &Store, d: &Digest) -> std::io::Result<std::rc::Rc<Vec<u8>>> {
        if let Some((_, data)) = self.0.iter().find(|(k, _)| k == d) {
            return Ok(data.clone());
        }
        let data = std::rc::Rc::new(store.content(d)?);
        // Two: the base an old version is read through and the one it is made a delta against.
        if self.0.len() >= 2 {
            self.0.remove(0);
        }
        self.0.push((*d, data.clone()));
        Ok(data)
    }
}
