//! The owner's packer: decides how each file of a reply travels and writes the reply's pack.
//!
//! For every put, in order of preference:
//! 1. **local**: the recipient already has the content (same BLAKE3) somewhere in its tree, so nothing
//!    travels; it copies the file (renames, duplicates, reverted edits).
//! 2. **delta stream**: files are grouped (in path order, up to [`GROUP_OUTPUT`] of output per group) and
//!    each group is compressed as one zstd frame whose reference prefix is the recipient's current
//!    versions of those paths plus the content of files the reply deletes (so renamed-and-edited files
//!    find their old selves). One frame per group also shares redundancy across files, which per-file
//!    frames cannot. A group is sent this way only if that is smaller than its files' stored frames.
//! 3. **frame**: the file's zstd frame from the content store, as published.
//!
//! Before that, the method is chosen from what the content is, and measured against zstd-prefix:
//! - a changed **text** file (at least [`LINES_MIN`] bytes, no NUL byte and short lines in its first
//!   [`TEXT_SNIFF`] bytes, see [`lines::looks_like_text`]) is diffed line by line against its old version,
//!   when the recipient decodes line deltas ([`Packer::lines`]). If the delta is smaller than a
//!   zstd-prefix stream of the file alone over the same base (by [`LINES_GAIN`] when the file would
//!   otherwise share a group) and than its frame, the file travels alone as that delta: a signature
//!   database gains and loses whole lines, which a line delta sends near the floor (the new lines at
//!   zstd -19).
//! - a changed **binary** (at least [`BSDIFF_MIN`] bytes with a NUL byte in its first [`BINARY_SNIFF`]
//!   bytes, it and its old version at most [`bsdiff_max_input`]) is diffed with bsdiff against its old
//!   version. If the patch is clearly smaller (at most [`BSDIFF_GAIN`]) than a zstd-prefix stream over the
//!   same base, and smaller than the file's frame, the file travels alone as that patch. Executables shift
//!   addresses everywhere, which bsdiff encodes far more compactly than LZ matching does.
//!
//! zstd-prefix streams are compressed at levels chosen for their window ([`prefix_levels`]), not at the
//! store's `compression-level`: high levels pay off on small windows and on groups where content moves
//! between files, and cost minutes (and sometimes lose ratio) on one large file against its old version,
//! where the smaller of levels 12 and 3 does better.
//!
//! bsdiff is the one method whose cost a request can choose: its inventory names, for every path, a content
//! the owner stores (any kept version of any file), and each new choice of bases misses the cache. Fresh
//! bsdiff work is therefore bounded by a **budget** in bytes (bases plus output fed to the diff): per
//! reply ([`Packer::bsdiff_budget`], from `bsdiff-request-budget`) and per recipient and day
//! ([`bsdiff_allowance`], [`charge_bsdiff`], from `bsdiff-daily-budget`). A binary whose patch would
//! exceed what is left is packed like any other file (zstd-prefix or its frame): the reply stays correct,
//! only less compact. Cached patches cost nothing and are used whatever is left.
//!
//! A base is only used when the store holds it (the recipient reported a version the owner published and
//! has not pruned). Delta frames are cached under the state directory by the digest of (method, level,
//! bases, outputs), so a fleet moving between the same two generations costs one compression.
//!
//! The pack is written to a temporary file: the owner's memory follows the largest group, not the reply.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::db::Db;
use crate::delta::{self, bsdiff, lines};
use crate::manifest::{Digest, Entry, Manifest, Op, Source};
use crate::protocol::{Base, Body, Frame, Method, Stream, VERSION};
use crate::store::Store;

/// Most output bytes one delta stream carries.
pub const GROUP_OUTPUT: u64 = 32 << 20;
/// Most prefix bytes one delta stream uses.
pub const GROUP_PREFIX: u64 = 96 << 20;
/// Files above this travel alone: as a patch against their old version when both fit [`PATCH_WINDOW`],
/// else as their stored frame.
pub const PATCH_WINDOW: u64 = 768 << 20;
/// Smallest changed file tried as a bsdiff patch: below this the two methods differ by little.
pub const BSDIFF_MIN: u64 = 64 << 10;
/// How much of a file is looked at for a NUL byte, which makes it a binary worth a bsdiff patch.
pub const BINARY_SNIFF: usize = 8 << 10;
/// Lowest zstd level a bsdiff patch is compressed at. The raw patch is as long as the file but mostly
/// zeros: level 19 takes about as long as the diff itself and gains a fifth over level 9.
pub const BSDIFF_LEVEL: i32 = 19;
/// A binary travels alone as a bsdiff patch only when the patch is at most this fraction (numerator,
/// denominator) of the zstd-prefix stream over the same base.
pub const BSDIFF_GAIN: (u64, u64) = (3, 4);
/// Smallest changed text file tried as a line delta: below this a group's zstd-prefix stream, which shares
/// redundancy across files, is as small.
pub const LINES_MIN: u64 = 64 << 10;
/// How much of a file is looked at to tell text (see [`lines::looks_like_text`]).
pub const TEXT_SNIFF: usize = 64 << 10;
/// A text file that would otherwise share a group travels alone as a line delta only when the delta is at
/// most this fraction of the zstd-prefix stream of the file alone over the same base. A file larger than a
/// group travels alone anyway, and takes whichever is smaller.
pub const LINES_GAIN: (u64, u64) = (15, 16);
/// Most bytes of a file or its old version diffed line by line (about 40 bytes of memory per line).
pub const LINES_MAX_INPUT: u64 = PATCH_WINDOW;

/// The zstd levels tried for a zstd-prefix stream of `files` files whose prefix plus output is `window`
/// bytes; the smallest frame is sent. Measured with `zstd --long=31 --patch-from` on the benchmark's pairs
/// (`docs/benchmark.md`):
/// - up to 1 MiB, level 19 is best and cheap;
/// - a group of several files up to 64 MiB, where content moves between files (a bundler's output), gains
///   most from 19: typescript's changed files, 54 MB with their old versions, are 132 KB at 19, 149 KB at
///   12, 223 KB at 3 (19 costs about 10 s, once per pair of generations: streams are cached);
/// - one file against its old version, and anything larger: the smaller of 12 and 3. Level 19 takes seconds
///   to minutes there and on some content fails badly (the 100 MB signature database's 45 MB file:
///   2.66 MB at 19, 240 KB at 12, 218 KB at 3), while 12 stays under a second.
pub fn prefix_levels(window: u64, files: usize) -> &'static [i32] {
    match window {
        0..=0x10_0000 => &[19],
        _ if files > 1 && window <= 64 << 20 => &[19, 3],
        _ => &[12, 3],
    }
}

/// The largest base (and output) diffed with bsdiff on this machine: [`bsdiff::MAX_INPUT`] always, and up
/// to 256 MiB when the memory available (`MemAvailable` in `/proc/meminfo`) covers the suffix sort's 16
/// bytes per base byte with room to spare (a quarter of what is available).
pub fn bsdiff_max_input() -> u64 {
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb.saturating_mul(1024))
    });
    available.map_or(bsdiff::MAX_INPUT, |a| (a / 4 / 16).clamp(bsdiff::MAX_INPUT, 256 << 20))
}

/// What the packer produced.
#[derive(Debug)]
pub struct Packed {
    /// The operations with their sources, and the delta streams.
    pub body: Body,
    /// The pack: frames, streams, then the body frame.
    pub file: tempfile::NamedTempFile,
    /// The pack's length.
    pub size: u64,
    /// Where the body is in the pack.
    pub body_frame: Frame,
    /// How the files travel.
    pub stats: PackStats,
}

/// Counts for logs and the benchmark.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PackStats {
    /// Puts copied from the recipient's own files.
    pub local: usize,
    /// Distinct contents sent as stored frames.
    pub frames: usize,
    /// Distinct contents sent inside delta streams.
    pub streamed: usize,
    /// Delta streams.
    pub streams: usize,
    /// Delta streams taken from the cache.
    pub cached: usize,
    /// Delta streams that are bsdiff patches.
    pub bsdiff: usize,
    /// Bytes (bases plus outputs) fed to fresh bsdiff diffs: what counts against the budget.
    pub bsdiff_bytes: u64,
    /// Delta streams that are line deltas.
    pub lines: usize,
    /// Binaries not diffed with bsdiff because the budget was spent.
    pub bsdiff_skipped: usize,
}

/// Packs replies from a content store.
#[derive(Debug)]
pub struct Packer<'a> {
    /// Where the content comes from.
    pub store: &'a Store,
    /// zstd level of the reply body (the store's `compression-level`, within 3..=19) and of streams
    /// without bases (files compressed together). Delta streams have their own levels:
    /// [`prefix_levels`], [`BSDIFF_LEVEL`], [`lines::LEVEL`].
    pub level: i32,
    /// Whether the recipient decodes line deltas (its request names the `lines` method).
    pub lines: bool,
    /// Largest base and output diffed with bsdiff ([`bsdiff_max_input`]).
    pub bsdiff_max: u64,
    /// Directory of cached delta frames.
    pub cache: PathBuf,
    /// Directory for the temporary pack file.
    pub tmp: PathBuf,
    /// Most bytes (bases plus outputs) that fresh bsdiff diffs may take for this reply; what is left
    /// goes down as they are made. `u64::MAX` for no bound, 0 for no fresh bsdiff at all.
    pub bsdiff_budget: Cell<u64>,
    /// Cache entries this packer made: a stream made to measure a method and then used is fresh work of
    /// this reply, not a cache hit (the stats say what earlier replies saved).
    pub made: std::cell::RefCell<HashSet<PathBuf>>,
}

/// Meta key of the bsdiff bytes `recipient` spent: the value is "DAY BYTES" (days since the epoch).
/// What `recipient` spent on fresh bsdiff diffs on day `day` (days since the epoch).
fn spent_on(db: &Db, recipient: &str, day: u64) -> Result<u64> {
    Ok(match db.bsdiff_spent(recipient)? {
        Some((d, bytes)) if d == day => bytes,
        _ => 0,
    })
}

/// The bsdiff budget of one reply to `recipient` at `now` (seconds since the epoch): `per_request`, or
/// what is left of `per_day` today if that is less.
///
/// # Errors
/// State failures.
pub fn bsdiff_allowance(db: &Db, recipient: &str, per_request: u64, per_day: u64, now: u64) -> Result<u64> {
    Ok(per_request.min(per_day.saturating_sub(spent_on(db, recipient, now / 86_400)?)))
}

/// Counts `bytes` of fresh bsdiff work against `recipient`'s day. Recorded as soon as a reply is packed,
/// whether or not it is then sent: the work was done.
///
/// # Errors
/// State failures.
pub fn charge_bsdiff(db: &Db, recipient: &str, bytes: u64, now: u64) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    let day = now / 86_400;
    let total = spent_on(db, recipient, day)?.saturating_add(bytes);
    db.set_bsdiff_spent(recipient, day, total)
}

struct Need {
    blake3: Digest,
    size: u64,
    base: Option<Base>,
}

/// A delta stream's frame, ready for the pack.
struct Delta {
    method: Method,
    frame: Vec<u8>,
    /// BLAKE3 of what it decodes to.
    output: Digest,
    /// Whether it came from the cache.
    cached: bool,
}

struct Writer {
    out: BufWriter<File>,
    at: u64,
}

impl Writer {
    fn put(&mut self, bytes: &[u8]) -> io::Result<(u64, u64)> {
        let offset = self.at;
        self.out.write_all(bytes)?;
        self.at += bytes.len() as u64;
        Ok((offset, bytes.len() as u64))
    }
}

impl Packer<'_> {
    /// Gives every put of `ops` a source and writes the pack. `have` is the recipient's tree (none when the
    /// owner could not rebuild it); with `full_content` no local copies or deltas are used.
    ///
    /// # Errors
    /// A store object missing or unreadable, or local I/O errors.
    pub fn pack(&self, have: Option<&Manifest>, mut ops: Vec<Op>, full_content: bool) -> Result<Packed> {
        fs::create_dir_all(&self.tmp)?;
        let file = tempfile::NamedTempFile::new_in(&self.tmp)?;
        let mut w = Writer { out: BufWriter::new(file.reopen()?), at: 0 };
        let mut stats = PackStats::default();
        let empty = Manifest::default();
        let have = if full_content { &empty } else { have.unwrap_or(&empty) };
        let local: HashSet<Digest> = have
            .iter()
            .filter_map(|(_, e)| match e {
                Entry::File(m) => Some(m.blake3),
                _ => None,
            })
            .collect();
        let known_base = |d: &Digest, size: u64| self.store.contains(d).then_some(Base { blake3: *d, size });

        // What must travel: each distinct content once, with the recipient's old version of its path.
        let mut needs: Vec<Need> = Vec::new();
        let mut queued: HashSet<Digest> = HashSet::new();
        for op in &ops {
            let Op::Put { path, size, blake3, .. } = op else { continue };
            if local.contains(blake3) || !queued.insert(*blake3) {
                continue;
            }
            let base = match have.get(path) {
                Some(Entry::File(m)) => known_base(&m.blake3, m.size),
                _ => None,
            };
            needs.push(Need { blake3: *blake3, size: *size, base });
        }
        // Content the reply deletes may have moved into new or changed files.
        let mut moved: Vec<Base> = Vec::new();
        for op in &ops {
            if let Op::Delete { path } = op
                && let Some(Entry::File(m)) = have.get(path)
                && let Some(b) = known_base(&m.blake3, m.size)
            {
                moved.push(b);
            }
        }

        let progress = crate::progress::Progress::bytes("packing", needs.iter().map(|n| n.size).sum());
        let mut sources: HashMap<Digest, Source> = HashMap::new();
        let mut streams: Vec<Stream> = Vec::new();
        let mut group: Vec<&Need> = Vec::new();
        let mut group_out = 0u64;
        for need in &needs {
            if let Some(base) = need.base
                && let Some(patch) = self.alone(need, base, &mut stats)?
            {
                put_stream(&[need], &[base], patch, &mut w, &mut streams, &mut sources, &mut stats)?;
                progress.add(need.size);
                continue;
            }
            if need.size > GROUP_OUTPUT {
                let alone = need.base.filter(|b| b.size.saturating_add(need.size) <= PATCH_WINDOW);
                self.send(&[need], alone.as_slice(), &mut w, &mut streams, &mut sources, &mut stats)?;
                progress.add(need.size);
                continue;
            }
            if group_out + need.size > GROUP_OUTPUT && !group.is_empty() {
                let bases = group_bases(&group, &mut moved);
                self.send(&group, &bases, &mut w, &mut streams, &mut sources, &mut stats)?;
                progress.add(group_out);
                group.clear();
                group_out = 0;
            }
            group_out += need.size;
            group.push(need);
        }
        if !group.is_empty() {
            let bases = group_bases(&group, &mut moved);
            self.send(&group, &bases, &mut w, &mut streams, &mut sources, &mut stats)?;
        }

        for op in &mut ops {
            if let Op::Put { blake3, source, .. } = op {
                *source = Some(match sources.get(blake3) {
                    Some(s) => s.clone(),
                    None => {
                        stats.local += 1;
                        Source::Local
                    }
                });
            }
        }
        if stats.bsdiff_skipped > 0 {
            tracing::warn!(
                skipped = stats.bsdiff_skipped,
                spent = stats.bsdiff_bytes,
                "the bsdiff budget is spent: binaries travel as zstd-prefix streams or frames instead"
            );
        }
        let body = Body { mailferry: VERSION, ops, streams };
        let json = crate::protocol::encode(&body);
        let compressed = zstd::bulk::compress(&json, 19.min(self.level.max(3)))?;
        let (offset, length) = w.put(&compressed)?;
        let body_frame = Frame { offset, length, size: json.len() as u64, blake3: Digest::of(&json) };
        let mut out = w.out.into_inner().map_err(io::IntoInnerError::into_error)?;
        out.flush()?;
        let size = out.stream_position()?;
        Ok(Packed { body, file, size, body_frame, stats })
    }

    /// The delta of `need` against its old version `base` by the method its content calls for, when that is
    /// clearly the best way for the file to travel alone: a line delta for text, a bsdiff patch for a
    /// binary (see the module doc). The margins are there because a file sent alone leaves its group,
    /// whose other files could have found content in its old version.
    fn alone(&self, need: &Need, base: Base, stats: &mut PackStats) -> Result<Option<Delta>> {
        let text_size = self.lines && need.size >= LINES_MIN && need.size.max(base.size) <= LINES_MAX_INPUT;
        let binary_size = need.size >= BSDIFF_MIN && need.size.max(base.size) <= self.bsdiff_max;
        if !text_size && !binary_size {
            return Ok(None);
        }
        let (frame, frame_len) = self.store.open_frame(&need.blake3)?;
        let mut head = Vec::with_capacity(TEXT_SNIFF);
        zstd::stream::read::Decoder::new(frame)?.take(TEXT_SNIFF as u64).read_to_end(&mut head)?;
        let (method, (num, den)) = if binary_size && head[..head.len().min(BINARY_SNIFF)].contains(&0) {
            (Method::Bsdiff, BSDIFF_GAIN)
        } else if text_size && lines::looks_like_text(&head) {
            (Method::Lines, if need.size > GROUP_OUTPUT { (1, 1) } else { LINES_GAIN })
        } else {
            return Ok(None);
        };
        let Some(delta) = self.stream(&[need], &[base], method, stats)? else { return Ok(None) };
        let Some(lz) = self.stream(&[need], &[base], Method::ZstdPrefix, stats)? else { return Ok(None) };
        let len = delta.frame.len() as u64;
        Ok((len < frame_len && len * den <= lz.frame.len() as u64 * num).then_some(delta))
    }

    /// Sends `group` as one zstd-prefix delta stream over `bases` if that is smaller than its stored
    /// frames, else as the frames.
    fn send(
        &self,
        group: &[&Need],
        bases: &[Base],
        w: &mut Writer,
        streams: &mut Vec<Stream>,
        sources: &mut HashMap<Digest, Source>,
        stats: &mut PackStats,
    ) -> Result<()> {
        let frame_lens: Vec<u64> =
            group.iter().map(|n| self.store.open_frame(&n.blake3).map(|(_, len)| len)).collect::<io::Result<_>>()?;
        let frames_total: u64 = frame_lens.iter().sum();
        // A lone file without a base gains nothing from a stream of its own.
        let stream = if group.len() == 1 && bases.is_empty() {
            None
        } else {
            self.stream(group, bases, Method::ZstdPrefix, stats)?
        };
        match stream {
            Some(delta) if (delta.frame.len() as u64) < frames_total => {
                put_stream(group, bases, delta, w, streams, sources, stats)?;
            }
            _ => {
                for n in group {
                    let (mut f, _) = self.store.open_frame(&n.blake3)?;
                    let offset = w.at;
                    let length = io::copy(&mut f, &mut w.out)?;
                    w.at += length;
                    sources.insert(n.blake3, Source::Pack { offset, length });
                    stats.frames += 1;
                }
            }
        }
        Ok(())
    }

    /// The delta frame of `group` over `bases` by `method` (from the cache or freshly made), the digest
    /// of its output, and whether it was cached; `None` when the method does not apply (a bsdiff patch
    /// over [`bsdiff::max_raw`], or one that does not apply back, which would be a bug in the diff; and a
    /// bsdiff patch not cached that the budget has no room for, which is then not cached either).
    fn stream(&self, group: &[&Need], bases: &[Base], method: Method, stats: &mut PackStats) -> Result<Option<Delta>> {
        let window = bases.iter().map(|b| b.size).chain(group.iter().map(|n| n.size)).fold(0u64, u64::saturating_add);
        let levels = match method {
            // Without bases a stream only compresses files together (a first sync): the store's level,
            // as their frames have.
            Method::ZstdPrefix if bases.is_empty() => std::slice::from_ref(&self.level),
            Method::ZstdPrefix => prefix_levels(window, group.len()),
            Method::Bsdiff => &[BSDIFF_LEVEL],
            Method::Lines => &[lines::LEVEL],
        };
        let mut key = blake3::Hasher::new_derive_key("mailferry delta cache v4");
        key.update(method.code().as_bytes()).update(b"m");
        for level in levels {
            key.update(&level.to_le_bytes());
        }
        for b in bases {
            key.update(&b.blake3.0).update(b"b");
        }
        for n in group {
            key.update(&n.blake3.0).update(b"o");
        }
        let path = self.cache.join(format!("{}.zst", Digest::from(key.finalize()).to_hex()));
        // A cached entry is the output's digest, then the frame: a hit reads nothing from the store. A
        // digest alone records that the method does not apply.
        if let Ok(mut cached) = fs::read(&path)
            && cached.len() >= 32
        {
            let frame = cached.split_off(32);
            let digest = Digest(cached.try_into().expect("32 bytes"));
            let cached = !self.made.borrow().contains(&path);
            return Ok((!frame.is_empty()).then_some(Delta { method, frame, output: digest, cached }));
        }
        if method == Method::Bsdiff {
            // Counted before the work, from the declared sizes: the suffix sort of the base and the scan
            // of the output are what a hostile choice of bases makes the owner do again and again.
            let cost = window;
            let left = self.bsdiff_budget.get();
            if cost > left {
                stats.bsdiff_skipped += 1;
                return Ok(None);
            }
            self.bsdiff_budget.set(left - cost);
            stats.bsdiff_bytes += cost;
        }
        let mut output = Vec::new();
        for n in group {
            output.extend_from_slice(&self.store.content(&n.blake3)?);
        }
        let digest = Digest::of(&output);
        let mut prefix = Vec::new();
        for b in bases {
            // A base's size comes from the request: read no more of it than claimed, and use no base of
            // another size. A small claim for a large stored file would otherwise get past
            // `bsdiff::MAX_INPUT`, `GROUP_PREFIX` and the budget. Not cached: the lie is the request's.
            // Read through the store: an old version kept as a delta is a base like any kept file.
            let start = prefix.len();
            prefix.extend_from_slice(&self.store.content_prefix(&b.blake3, b.size.saturating_add(1))?);
            if (prefix.len() - start) as u64 != b.size {
                tracing::warn!(base = %b.blake3.short(), claimed = b.size, "a request gave a base another size than it has; not using it");
                return Ok(None);
            }
        }
        let frame = match method {
            Method::ZstdPrefix => {
                let mut best: Option<Vec<u8>> = None;
                for &level in levels {
                    let frame = delta::compress(&prefix, &output, level)?;
                    if best.as_ref().is_none_or(|b| frame.len() < b.len()) {
                        best = Some(frame);
                    }
                }
                best.unwrap_or_default()
            }
            Method::Bsdiff => self.patch(&prefix, &output, &digest)?.unwrap_or_default(),
            Method::Lines => line_delta(&prefix, &output, &digest)?.unwrap_or_default(),
        };
        fs::create_dir_all(&self.cache)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.cache)?;
        tmp.write_all(&digest.0)?;
        tmp.write_all(&frame)?;
        tmp.persist(&path).map_err(|e| e.error).with_context(|| format!("failed to cache `{}`", path.display()))?;
        self.made.borrow_mut().insert(path);
        Ok((!frame.is_empty()).then_some(Delta { method, frame, output: digest, cached: false }))
    }

    /// The zstd frame of the bsdiff patch from `base` to `output`, checked by applying it as a recipient
    /// would; `None` when there is no usable patch.
    fn patch(&self, base: &[u8], output: &[u8], digest: &Digest) -> Result<Option<Vec<u8>>> {
        let Some(raw) = bsdiff::diff(base, output) else { return Ok(None) };
        let frame = delta::compress(&[], &raw, BSDIFF_LEVEL)?;
        drop(raw);
        let size = output.len() as u64;
        let why = match bsdiff::apply(&frame[..], base, size, io::sink()) {
            Ok((n, d)) if n == size && d == *digest => return Ok(Some(frame)),
            Ok((n, d)) => format!("it gives {n} bytes with digest {}", d.short()),
            Err(e) => e.to_string(),
        };
        tracing::warn!(output = %digest.short(), "a bsdiff patch does not apply back, not using it: {why}");
        Ok(None)
    }
}

/// The zstd frame of the line delta from `base` to `output`, checked by applying it as a recipient would;
/// `None` when it does not apply back (a bug in the diff, logged).
fn line_delta(base: &[u8], output: &[u8], digest: &Digest) -> Result<Option<Vec<u8>>> {
    let raw = lines::diff(base, output);
    let frame = delta::compress(&[], &raw, lines::LEVEL)?;
    drop(raw);
    let size = output.len() as u64;
    let why = match lines::apply(&frame[..], base, size, io::sink()) {
        Ok((n, d)) if n == size && d == *digest => return Ok(Some(frame)),
        Ok((n, d)) => format!("it gives {n} bytes with digest {}", d.short()),
        Err(e) => e.to_string(),
    };
    tracing::warn!(output = %digest.short(), "a line delta does not apply back, not using it: {why}");
    Ok(None)
}

/// Writes `delta`, the stream of `group` over `bases`, into the pack, and makes it the source of the
/// group's files.
fn put_stream(
    group: &[&Need],
    bases: &[Base],
    delta: Delta,
    w: &mut Writer,
    streams: &mut Vec<Stream>,
    sources: &mut HashMap<Digest, Source>,
    stats: &mut PackStats,
) -> Result<()> {
    let (offset, length) = w.put(&delta.frame)?;
    let index = u32::try_from(streams.len()).context("too many delta streams")?;
    let mut start = 0u64;
    for n in group {
        sources.insert(n.blake3, Source::Delta { stream: index, start });
        start += n.size;
    }
    let (method, blake3) = (delta.method, delta.output);
    streams.push(Stream { offset, length, size: start, blake3, method, bases: bases.to_vec() });
    stats.streams += 1;
    stats.streamed += group.len();
    stats.cached += usize::from(delta.cached);
    stats.bsdiff += usize::from(method == Method::Bsdiff);
    stats.lines += usize::from(method == Method::Lines);
    Ok(())
}

/// The prefix of a group: its files' old versions, then moved content, without repeats, up to
/// [`GROUP_PREFIX`] bytes. Moved content is used by the first group that has room for it.
fn group_bases(group: &[&Need], moved: &mut Vec<Base>) -> Vec<Base> {
    let mut seen = HashSet::new();
    let mut bases = Vec::new();
    let mut total = 0u64;
    for b in group.iter().filter_map(|n| n.base).chain(moved.iter().copied()) {
        if total + b.size <= GROUP_PREFIX && seen.insert(b.blake3) {
            total += b.size;
            bases.push(b);
        }
    }
    moved.retain(|m| !seen.contains(&m.blake3));
    bases
}

/// Removes cached delta frames not used for `max_age` (by modification time).
///
/// # Errors
/// An unreadable cache directory.
pub fn prune_cache(cache: &Path, max_age: std::time::Duration) -> io::Result<usize> {
    let mut removed = 0;
    let Ok(entries) = fs::read_dir(cache) else { return Ok(0) };
    for e in entries {
        let e = e?;
        let old = e.metadata()?.modified()?.elapsed().is_ok_and(|age| age > max_age);
        if old && fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// A pack cut into chunks that fit a part size: every chunk's descriptor, and a reader of each chunk.
pub(crate) struct Chunks<'a> {
    packed: &'a Packed,
    file: std::fs::File,
    chunk: u64,
    /// The chunks' descriptors, `pack-0001.bin` on (every part lists them all).
    pub payloads: Vec<crate::protocol::Payload>,
}

impl<'a> Chunks<'a> {
    /// Cuts `packed` into the fewest chunks such that a part carrying one, with a control part of
    /// `control_len(parts, chunk)` bytes (it lists every chunk, so it grows with their number), fits
    /// `limit` once encoded.
    ///
    /// # Errors
    /// Reading the pack, or more parts than a `u32` counts.
    pub(crate) fn cut(packed: &'a Packed, limit: u64, control_len: impl Fn(u32, u64) -> usize) -> Result<Chunks<'a>> {
        let mut chunk = crate::protocol::envelope::chunk_size(limit, 0);
        let parts = loop {
            let parts = u32::try_from(packed.size.div_ceil(chunk).max(1)).context("a pack needs too many parts")?;
            let fits = crate::protocol::envelope::chunk_size(limit, control_len(parts, chunk));
            if fits >= chunk {
                break parts;
            }
            chunk = fits;
        };
        let mut c = Chunks { packed, file: packed.file.reopen()?, chunk, payloads: Vec::with_capacity(parts as usize) };
        for k in 1..=parts {
            let bytes = c.read(k)?;
            c.payloads.push(crate::protocol::Payload {
                id: chunk_id(k),
                size: bytes.len() as u64,
                blake3: Digest::of(&bytes),
            });
        }
        Ok(c)
    }

    /// The number of parts.
    pub(crate) fn parts(&self) -> u32 {
        self.payloads.len() as u32
    }

    /// The bytes of chunk `k` (from 1).
    ///
    /// # Errors
    /// Reading the pack.
    pub(crate) fn read(&mut self, k: u32) -> Result<Vec<u8>> {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let start = u64::from(k - 1) * self.chunk;
        let len = self.chunk.min(self.packed.size - start);
        let mut buf = vec![0; usize::try_from(len)?];
        self.file.seek(SeekFrom::Start(start))?;
        self.file.read_exact(&mut buf)?;
        Ok(buf)
    }
}

/// The attachment name of chunk `k`.
pub(crate) fn chunk_id(k: u32) -> String {
    format!("pack-{k:04}.bin")
}

/// The chunk descriptors a size probe lists: `parts` chunks of `chunk` bytes (digests do not change the
/// encoded length).
pub(crate) fn probe_payloads(parts: u32, chunk: u64) -> Vec<crate::protocol::Payload> {
    (1..=parts).map(|k| crate::protocol::Payload { id: chunk_id(k), size: chunk, blake3: Digest([0; 32]) }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{FileMeta, Mode, diff};
    use crate::path::RelPath;

    /// Something like machine code: pseudo-random bytes with NULs sprinkled in.
    fn machine_code(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 7 == 3 { 0 } else { x as u8 }
            })
            .collect()
    }

    /// What a rebuild does to a binary: addresses a few dozen bytes apart move by the same amount, and a
    /// little code is new.
    fn rebuilt(old: &[u8]) -> Vec<u8> {
        let mut new = old.to_vec();
        let mut at = 0;
        while at + 4 <= new.len() {
            let word = u32::from_le_bytes(new[at..at + 4].try_into().unwrap()).wrapping_add(0x1230);
            new[at..at + 4].copy_from_slice(&word.to_le_bytes());
            at += 16 + (at * 7919) % 48;
        }
        new.splice(100_000..100_000, machine_code(500, 99));
        new
    }

    fn tree(store: &Store, files: &[(&str, &[u8])]) -> Manifest {
        files
            .iter()
            .map(|(p, data)| {
                let blake3 = store.put_bytes(data).unwrap();
                let meta = FileMeta { size: data.len() as u64, mode: Mode::Regular, blake3 };
                (RelPath::new(p).unwrap(), Entry::File(meta))
            })
            .collect()
    }

    /// Decodes every put of `packed` as a recipient would, and checks it against `want`.
    fn check_contents(store: &Store, packed: &Packed, want: &HashMap<Digest, &[u8]>) {
        let pack = fs::read(packed.file.path()).unwrap();
        let slice = |offset: u64, length: u64| &pack[offset as usize..(offset + length) as usize];
        for op in &packed.body.ops {
            let Op::Put { blake3, size, source, .. } = op else { continue };
            let got = match source.as_ref().unwrap() {
                Source::Pack { offset, length } => zstd::decode_all(slice(*offset, *length)).unwrap(),
                Source::Delta { stream, start } => {
                    let s = &packed.body.streams[*stream as usize];
                    let prefix: Vec<u8> = s.bases.iter().flat_map(|b| store.content(&b.blake3).unwrap()).collect();
                    let mut out = Vec::new();
                    let (n, digest) = match s.method {
                        Method::ZstdPrefix => delta::decompress(slice(s.offset, s.length), &prefix, s.size, &mut out),
                        Method::Bsdiff => bsdiff::apply(slice(s.offset, s.length), &prefix, s.size, &mut out),
                        Method::Lines => lines::apply(slice(s.offset, s.length), &prefix, s.size, &mut out),
                    }
                    .unwrap();
                    assert_eq!((n, digest), (s.size, s.blake3));
                    out[*start as usize..(*start + *size) as usize].to_vec()
                }
                other => panic!("unexpected source {other:?}"),
            };
            assert_eq!(got, want[blake3], "content of {}", blake3.short());
        }
    }

    #[test]
    fn fresh_bsdiff_work_stops_at_the_budget_and_the_reply_stays_correct() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store"), 9).unwrap();
        let olds = [machine_code(600_000, 1), machine_code(600_000, 2)];
        let news = [rebuilt(&olds[0]), rebuilt(&olds[1])];
        let have = tree(&store, &[("a.so", &olds[0]), ("b.so", &olds[1])]);
        let target = tree(&store, &[("a.so", &news[0]), ("b.so", &news[1])]);
        let want: HashMap<Digest, &[u8]> = news.iter().map(|n| (Digest::of(n), n.as_slice())).collect();
        // What one binary's fresh patch costs: its old version and its new one.
        let one = (olds[0].len() + news[0].len()) as u64;
        let pack = |budget: u64, cache: &str| {
            let packer = Packer {
                store: &store,
                level: 9,
                lines: true,
                bsdiff_max: bsdiff::MAX_INPUT,
                cache: dir.path().join(cache),
                tmp: dir.path().join("tmp"),
                bsdiff_budget: Cell::new(budget),
                made: Default::default(),
            };
            let packed = packer.pack(Some(&have), diff(&have, &target), false).unwrap();
            check_contents(&store, &packed, &want);
            (packed.stats, packer.bsdiff_budget.get())
        };

        let (s, _) = pack(u64::MAX, "unbounded");
        assert_eq!((s.bsdiff, s.bsdiff_skipped, s.bsdiff_bytes), (2, 0, 2 * one), "{s:?}");
        // Room for one patch and a half: the second binary travels by zstd-prefix instead.
        let (s, left) = pack(one + one / 2, "one");
        assert_eq!((s.bsdiff, s.bsdiff_skipped, s.bsdiff_bytes, left), (1, 1, one, one / 2), "{s:?}");
        assert!(s.streams >= 2, "the skipped binary still travels as a delta: {s:?}");
        let (s, left) = pack(0, "none");
        assert_eq!((s.bsdiff, s.bsdiff_skipped, s.bsdiff_bytes, left), (0, 2, 0, 0), "{s:?}");
        // A patch skipped for the budget is not remembered as unusable, and a cached one costs nothing.
        let (s, left) = pack(one, "one");
        assert_eq!((s.bsdiff, s.bsdiff_skipped, s.bsdiff_bytes, left), (2, 0, one, 0), "{s:?}");
        let (s, _) = pack(0, "one");
        assert_eq!((s.bsdiff, s.bsdiff_skipped, s.bsdiff_bytes), (2, 0, 0), "both from the cache: {s:?}");
    }

    #[test]
    fn a_base_claimed_smaller_than_it_is_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store"), 9).unwrap();
        let old = machine_code(600_000, 3);
        let new = rebuilt(&old);
        let mut have = tree(&store, &[("a.so", &old)]);
        let target = tree(&store, &[("a.so", &new)]);
        // The request says its old version is 1000 bytes: within any bound, if the owner believed it.
        let path = RelPath::new("a.so").unwrap();
        let Some(Entry::File(meta)) = have.get(&path).cloned() else { panic!() };
        have.insert(path, Entry::File(FileMeta { size: 1000, ..meta }));
        let packer = Packer {
            store: &store,
            level: 9,
            lines: true,
            bsdiff_max: bsdiff::MAX_INPUT,
            cache: dir.path().join("cache"),
            tmp: dir.path().join("tmp"),
            bsdiff_budget: Cell::new(u64::MAX),
            made: Default::default(),
        };
        let packed = packer.pack(Some(&have), diff(&have, &target), false).unwrap();
        let s = packed.stats;
        assert_eq!((s.bsdiff, s.streams, s.frames), (0, 0, 1), "the file travels as its frame: {s:?}");
        check_contents(&store, &packed, &[(Digest::of(&new), new.as_slice())].into_iter().collect());
    }

    /// Signature-database-like text: unique lines of hex.
    fn sig_text(from: usize, n: usize) -> Vec<u8> {
        (from..from + n)
            .flat_map(|i| format!("Win.Trojan.Agent-{i}:0:*:{:016x}{:08x}\n", i * 7919, i * 31).into_bytes())
            .collect()
    }

    #[test]
    fn the_method_follows_the_content_and_what_the_recipient_decodes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store"), 9).unwrap();
        // A text file that loses scattered lines and gains new ones, and a rebuilt binary.
        let old_text = sig_text(0, 40_000);
        let new_text: Vec<u8> = [
            old_text
                .split_inclusive(|&b| b == b'\n')
                .enumerate()
                .filter(|(i, _)| i % 150 != 3)
                .flat_map(|(_, l)| l.to_vec())
                .collect(),
            sig_text(900_000, 400),
        ]
        .concat();
        let old_bin = machine_code(600_000, 5);
        let new_bin = rebuilt(&old_bin);
        let have = tree(&store, &[("db/main.hdb", &old_text), ("lib/a.so", &old_bin)]);
        let target = tree(&store, &[("db/main.hdb", &new_text), ("lib/a.so", &new_bin)]);
        let want: HashMap<Digest, &[u8]> =
            [(Digest::of(&new_text), new_text.as_slice()), (Digest::of(&new_bin), new_bin.as_slice())]
                .into_iter()
                .collect();
        let pack = |lines: bool, cache: &str| {
            let packer = Packer {
                store: &store,
                level: 9,
                lines,
                bsdiff_max: bsdiff::MAX_INPUT,
                cache: dir.path().join(cache),
                tmp: dir.path().join("tmp"),
                bsdiff_budget: Cell::new(u64::MAX),
                made: Default::default(),
            };
            let packed = packer.pack(Some(&have), diff(&have, &target), false).unwrap();
            check_contents(&store, &packed, &want);
            packed
        };
        let new = pack(true, "new");
        let methods: Vec<Method> = new.body.streams.iter().map(|s| s.method).collect();
        assert_eq!((new.stats.lines, new.stats.bsdiff), (1, 1), "{methods:?}");
        // A recipient that does not name `lines` never gets one: the text travels by zstd-prefix.
        let old = pack(false, "old");
        assert!(old.body.streams.iter().all(|s| s.method != Method::Lines), "{:?}", old.body.streams);
        assert_eq!((old.stats.lines, old.stats.bsdiff), (0, 1));
        let text_stream = |p: &Packed| {
            let Some(Op::Put { source: Some(Source::Delta { stream, .. }), .. }) =
                p.body.ops.iter().find(|o| matches!(o, Op::Put { blake3, .. } if *blake3 == Digest::of(&new_text)))
            else {
                panic!("the text file travels in a stream")
            };
            p.body.streams[*stream as usize].length
        };
        assert!(text_stream(&new) < text_stream(&old), "the line delta is the smaller");
    }

    #[test]
    fn the_daily_budget_is_per_recipient_and_per_day() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("state.db")).unwrap();
        let day = 20_000 * 86_400;
        assert_eq!(bsdiff_allowance(&db, "a", 100, 250, day).unwrap(), 100);
        charge_bsdiff(&db, "a", 100, day).unwrap();
        charge_bsdiff(&db, "a", 100, day + 3_600).unwrap();
        assert_eq!(bsdiff_allowance(&db, "a", 100, 250, day + 7_200).unwrap(), 50, "250 a day, 200 spent");
        assert_eq!(bsdiff_allowance(&db, "b", 100, 250, day).unwrap(), 100, "another recipient's day");
        assert_eq!(bsdiff_allowance(&db, "a", 100, 250, day + 86_400).unwrap(), 100, "the next day");
        charge_bsdiff(&db, "a", 300, day + 86_400).unwrap();
        assert_eq!(bsdiff_allowance(&db, "a", 100, 250, day + 86_400).unwrap(), 0);
    }
}
