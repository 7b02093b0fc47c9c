//! Line deltas: the delta method for large text files (signature databases, logs, CSV, source).
//!
//! A text file that gains and loses whole lines is best described as which lines of the old version to
//! keep and which lines are new, the way ClamAV's `.cdiff` files or `diff -e | zstd -19` describe it: the
//! new lines once, compressed, and the deleted ones as line ranges. LZ matching against the old version
//! (the `zstd-prefix` method) spends bytes on every match; with a prefix of tens of megabytes it also has to
//! run at a low level to stay fast. A line delta is near the floor (the new lines at zstd -19) in about a
//! second per 100 MB.
//!
//! The diff side is [`diff`]: lines are interned, then matched by patience diff (lines that occur once in
//! both versions are anchors, their longest increasing run the skeleton, the gaps diffed again), with a
//! small LCS table for gaps without unique lines and a bound on the total work. Any result is a correct
//! delta; the heuristics only decide how small it is. The apply side is [`apply`]: streamed and bounded,
//! trusting nothing in the delta.
//!
//! # Delta format
//!
//! The raw delta (what the stream's zstd frame decompresses to) is the **inserted bytes** first, then the
//! **records**, and nothing else: a count `D`, the `D` bytes that the records insert, one after the other,
//! then the records up to the end of the delta, which must be between two records. The base is split
//! into **lines**: each line ends just after a `\n` byte, and a last line without one is a line too. A
//! **cursor** into the base starts at its first line. A count is an unsigned LEB128 number of at most 10
//! bytes (7 bits a byte, low bits first, bit 7 set on every byte but the last); a record is one tag byte
//! and a count:
//!
//! | tag | record | meaning |
//! |---|---|---|
//! | `0x01` | `copy N` | append the next `N` lines of the base at the cursor to the output; the cursor moves past them |
//! | `0x02` | `skip N` | move the cursor past the next `N` lines of the base (they are deleted) |
//! | `0x03` | `insert N` | append the next `N` of the inserted bytes to the output |
//!
//! The inserted bytes come first because zstd compresses them much better that way: the records, short and
//! random, ahead of them spoil the statistics its level 19 parser carries from block to block (the 45 MB
//! file of the benchmark's signature database: 216 KB with the records first, 199 KB with them last). The
//! applier holds them in memory, as it holds the base: at most the declared output size.
//!
//! The rules [`apply`] enforces, each before it reads or writes anything for the record:
//! - `D` is at most the declared output size;
//! - the tag is one of the three; every count fits 64 bits and has at most 10 bytes, and a record's count
//!   is not zero;
//! - `copy` and `skip` never go past the base's last line; `insert` never past the inserted bytes;
//! - the output never grows past the declared size, and at the end of the delta equals it exactly, with
//!   every inserted byte used;
//! - the raw delta is at most [`max_raw`] bytes, and no record is cut short by the end.
//!
//! The owner applies every fresh delta with [`apply`] before using it, so a delta it sends always passes.
//!
//! Pure: bytes in, bytes out.

use std::collections::HashMap;
use std::io::{self, BufRead, Read, Write};

use super::{DecodeError, MAX_WINDOW_LOG, window_log};
use crate::manifest::Digest;

/// zstd level of a line delta's frame: the raw delta is about the size of the new lines, so level 19 costs
/// little and gets within a few percent of the floor.
pub const LEVEL: i32 = 19;

const COPY: u8 = 0x01;
const SKIP: u8 = 0x02;
const INSERT: u8 = 0x03;

/// Most bytes of a count.
const MAX_COUNT_BYTES: usize = 10;

/// Gaps without unique lines are matched line by line (longest common subsequence) up to this many cells
/// (old lines × new lines); larger ones are sent as replaced.
const LCS_CELLS: usize = 250_000;

/// Most raw delta bytes accepted for an output of `size` bytes over a base of `base` bytes. Every count is
/// at least 1, so every `copy` or `skip` takes at least one base line (one byte) and every `insert` writes
/// at least one output byte: there are at most `base + size` records of at most 11 bytes, plus the inserted
/// bytes themselves. The bound keeps a hostile delta from running on.
pub fn max_raw(size: u64, base: u64) -> u64 {
    size.saturating_add(base).saturating_mul(12).saturating_add(64 << 10)
}

/// Whether `sample` (the start of a file) looks like text a line delta suits: no NUL byte, and lines of at
/// most 1 KiB on average (a minified script is one long line, which a line delta cannot split).
pub fn looks_like_text(sample: &[u8]) -> bool {
    !sample.is_empty()
        && memchr::memchr(0, sample).is_none()
        && memchr::memchr_iter(b'\n', sample).count().saturating_mul(1024) >= sample.len()
}

/// The lines of `data`, each with its `\n` (the last one may have none).
fn split_lines(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(data.len() / 64 + 1);
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', data) {
        out.push(&data[start..=end]);
        start = end + 1;
    }
    if start < data.len() {
        out.push(&data[start..]);
    }
    out
}

/// The raw line delta that turns `base` into `target` (format in the module doc).
///
/// Memory: the two line lists and an interning table, about 40 bytes per line of both.
pub fn diff(base: &[u8], target: &[u8]) -> Vec<u8> {
    let a = split_lines(base);
    let b = split_lines(target);
    // Interned lines: equal ids mean equal bytes (the table compares the bytes, not only a hash).
    let mut ids: HashMap<&[u8], u32> = HashMap::with_capacity(a.len() + b.len());
    let ia = intern(&a, &mut ids);
    let ib = intern(&b, &mut ids);
    let n_ids = ids.len();
    drop(ids);
    let matches = Matcher::new(n_ids, a.len() + b.len()).run(&ia, &ib);

    let (mut records, mut data) = (Vec::new(), Vec::new());
    let (mut at_a, mut at_b, mut copy) = (0usize, 0usize, 0u64);
    for (i, j) in matches {
        let (i, j) = (i as usize, j as usize);
        gap(&mut records, &mut data, &mut copy, (at_a, i), &b[at_b..j]);
        copy += 1;
        at_a = i + 1;
        at_b = j + 1;
    }
    gap(&mut records, &mut data, &mut copy, (at_a, a.len()), &b[at_b..]);
    if copy > 0 {
        record(&mut records, COPY, copy);
    }
    let mut raw = Vec::with_capacity(data.len() + records.len() + MAX_COUNT_BYTES);
    leb128(&mut raw, data.len() as u64);
    raw.extend_from_slice(&data);
    raw.extend_from_slice(&records);
    raw
}

/// Writes the records of a gap between matched lines: the pending copy, the base lines `deleted` skipped,
/// the new lines `inserted` (their bytes go to `data`).
fn gap(raw: &mut Vec<u8>, data: &mut Vec<u8>, copy: &mut u64, deleted: (usize, usize), inserted: &[&[u8]]) {
    let skip = deleted.1 - deleted.0;
    if skip == 0 && inserted.is_empty() {
        return;
    }
    if *copy > 0 {
        record(raw, COPY, *copy);
        *copy = 0;
    }
    if skip > 0 {
        record(raw, SKIP, skip as u64);
    }
    if !inserted.is_empty() {
        record(raw, INSERT, inserted.iter().map(|l| l.len() as u64).sum());
        for l in inserted {
            data.extend_from_slice(l);
        }
    }
}

/// The ids of `lines`: equal ids mean equal bytes (the table compares the bytes, not only a hash).
fn intern<'a>(lines: &[&'a [u8]], ids: &mut HashMap<&'a [u8], u32>) -> Vec<u32> {
    lines
        .iter()
        .map(|l| {
            let next = ids.len() as u32;
            *ids.entry(l).or_insert(next)
        })
        .collect()
}

fn record(raw: &mut Vec<u8>, tag: u8, n: u64) {
    debug_assert!(n > 0);
    raw.push(tag);
    leb128(raw, n);
}

fn leb128(raw: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            raw.push(byte);
            return;
        }
        raw.push(byte | 0x80);
    }
}

/// Patience diff over interned lines, with per-range counters indexed by line id.
struct Matcher {
    count_a: Vec<u32>,
    count_b: Vec<u32>,
    pos_b: Vec<u32>,
    /// Lines still to be looked at before the matcher stops looking (the rest is sent as replaced).
    budget: usize,
}

impl Matcher {
    fn new(n_ids: usize, lines: usize) -> Matcher {
        Matcher {
            count_a: vec![0; n_ids],
            count_b: vec![0; n_ids],
            pos_b: vec![0; n_ids],
            budget: lines.saturating_mul(8).saturating_add(1 << 20),
        }
    }

    /// Matched pairs (line of `a`, line of `b`), both strictly increasing.
    fn run(mut self, a: &[u32], b: &[u32]) -> Vec<(u32, u32)> {
        let mut matches: Vec<(u32, u32)> = Vec::new();
        let mut stack = vec![(0usize, a.len(), 0usize, b.len())];
        while let Some((mut a0, mut a1, mut b0, mut b1)) = stack.pop() {
            while a0 < a1 && b0 < b1 && a[a0] == b[b0] {
                matches.push((a0 as u32, b0 as u32));
                a0 += 1;
                b0 += 1;
            }
            while a0 < a1 && b0 < b1 && a[a1 - 1] == b[b1 - 1] {
                a1 -= 1;
                b1 -= 1;
                matches.push((a1 as u32, b1 as u32));
            }
            let (na, nb) = (a1 - a0, b1 - b0);
            if na == 0 || nb == 0 || self.budget < na + nb {
                continue;
            }
            self.budget -= na + nb;
            let anchors = self.unique_anchors(&a[a0..a1], &b[b0..b1]);
            if anchors.is_empty() {
                if na.saturating_mul(nb) <= LCS_CELLS {
                    self.budget = self.budget.saturating_sub(na * nb / 8);
                    lcs(&a[a0..a1], &b[b0..b1], a0, b0, &mut matches);
                }
                continue;
            }
            let (mut pa, mut pb) = (a0, b0);
            for (i, j) in anchors {
                let (i, j) = (a0 + i as usize, b0 + j as usize);
                matches.push((i as u32, j as u32));
                stack.push((pa, i, pb, j));
                (pa, pb) = (i + 1, j + 1);
            }
            stack.push((pa, a1, pb, b1));
        }
        matches.sort_unstable();
        matches
    }

    /// The longest increasing run of lines that occur exactly once in `a` and once in `b`, as positions
    /// relative to the slices.
    fn unique_anchors(&mut self, a: &[u32], b: &[u32]) -> Vec<(u32, u32)> {
        for &x in a {
            self.count_a[x as usize] += 1;
        }
        for (j, &x) in b.iter().enumerate() {
            self.count_b[x as usize] += 1;
            self.pos_b[x as usize] = j as u32;
        }
        let pairs: Vec<(u32, u32)> = a
            .iter()
            .enumerate()
            .filter(|&(_, &x)| self.count_a[x as usize] == 1 && self.count_b[x as usize] == 1)
            .map(|(i, &x)| (i as u32, self.pos_b[x as usize]))
            .collect();
        for &x in a {
            self.count_a[x as usize] = 0;
        }
        for &x in b {
            self.count_b[x as usize] = 0;
        }
        longest_increasing(&pairs)
    }
}

/// The longest subsequence of `pairs` (sorted by their first element) whose second elements increase.
fn longest_increasing(pairs: &[(u32, u32)]) -> Vec<(u32, u32)> {
    // Patience sorting: `tails[k]` is the index of the smallest last element of an increasing run of
    // length k + 1; `prev` links each element to the one before it in its run.
    let mut tails: Vec<usize> = Vec::new();
    let mut prev = vec![usize::MAX; pairs.len()];
    for (i, &(_, y)) in pairs.iter().enumerate() {
        let k = tails.partition_point(|&t| pairs[t].1 < y);
        if k > 0 {
            prev[i] = tails[k - 1];
        }
        if k == tails.len() {
            tails.push(i);
        } else {
            tails[k] = i;
        }
    }
    let mut out = Vec::with_capacity(tails.len());
    let mut at = tails.last().copied().unwrap_or(usize::MAX);
    while at != usize::MAX {
        out.push(pairs[at]);
        at = prev[at];
    }
    out.reverse();
    out
}

/// Longest common subsequence of two small slices by the classic table, pushing the matched pairs
/// (offset by `a0`, `b0`).
fn lcs(a: &[u32], b: &[u32], a0: usize, b0: usize, matches: &mut Vec<(u32, u32)>) {
    let (n, m) = (a.len(), b.len());
    let w = m + 1;
    // table[i * w + j]: LCS length of a[i..] and b[j..]. At most LCS_CELLS cells, so u32 is plenty.
    let mut table = vec![0u32; (n + 1) * w];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            table[i * w + j] = if a[i] == b[j] {
                table[(i + 1) * w + j + 1] + 1
            } else {
                table[(i + 1) * w + j].max(table[i * w + j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    while i < n && j < m {
        if a[i] == b[j] {
            matches.push(((a0 + i) as u32, (b0 + j) as u32));
            i += 1;
            j += 1;
        } else if table[(i + 1) * w + j] >= table[i * w + j + 1] {
            i += 1;
        } else {
            j += 1;
        }
    }
}

/// Decodes a zstd frame holding a raw line delta (format in the module doc) against `base`, streaming the
/// output into `out`; returns the bytes written (always `size` on success) and their digest.
///
/// Every count is checked against `base`, `size` and [`max_raw`] before anything is read or written for
/// it; memory is a fixed buffer and the inserted bytes, never more than `size` whatever the delta says.
///
/// # Errors
/// [`DecodeError::Bad`] for a corrupt frame or a malformed delta; [`DecodeError::Io`] when writing fails.
pub fn apply<R: BufRead, W: Write>(frame: R, base: &[u8], size: u64, mut out: W) -> Result<(u64, Digest), DecodeError> {
    let limit = max_raw(size, base.len() as u64);
    let mut dec = zstd::stream::read::Decoder::with_buffer(frame).map_err(zstd_bad)?;
    dec.window_log_max((window_log(limit) + 1).min(MAX_WINDOW_LOG)).map_err(zstd_bad)?;
    let mut delta = Raw { from: dec.single_frame(), read: 0, limit };
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    let Some(d) = delta.number("the inserted bytes' length")? else {
        return Err(bad("delta is empty: it has no length of inserted bytes".into()));
    };
    if d > size {
        return Err(bad(format!("delta inserts {d} bytes, more than the declared {size}")));
    }
    // At most `size` bytes, read as they come (a lying length stops at the end of the delta).
    let mut data = Vec::with_capacity(usize::try_from(d.min(1 << 20)).unwrap_or(0));
    let mut left = d;
    while left > 0 {
        let k = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        delta.fill(&mut buf[..k])?;
        data.extend_from_slice(&buf[..k]);
        left -= k as u64;
    }
    let mut taken = 0usize;
    // The cursor: a byte offset into the base, always at the start of a line, and that line's number.
    let (mut pos, mut line) = (0usize, 0u64);
    while let Some((tag, n)) = delta.record(written)? {
        match tag {
            COPY | SKIP => {
                let start = pos;
                let end = lines_end(base, pos, n).ok_or_else(|| {
                    let what = if tag == COPY { "copies" } else { "skips" };
                    bad(format!(
                        "record at output byte {written} {what} {n} lines from base line {line}, past the base's last line"
                    ))
                })?;
                (pos, line) = (end, line + n);
                if tag == COPY {
                    let len = (end - start) as u64;
                    if len > size - written {
                        return Err(bad(format!(
                            "record at output byte {written} copies {len} bytes, past the declared {size}"
                        )));
                    }
                    h.update(&base[start..end]);
                    out.write_all(&base[start..end]).map_err(DecodeError::Io)?;
                    written += len;
                }
            }
            INSERT => {
                if n > size - written {
                    return Err(bad(format!(
                        "record at output byte {written} inserts {n} bytes, past the declared {size}"
                    )));
                }
                let rest = (data.len() - taken) as u64;
                if n > rest {
                    return Err(bad(format!(
                        "record at output byte {written} inserts {n} bytes, {rest} of the inserted bytes are left"
                    )));
                }
                // Fits in the data, so in usize.
                let bytes = &data[taken..taken + n as usize];
                h.update(bytes);
                out.write_all(bytes).map_err(DecodeError::Io)?;
                taken += bytes.len();
                written += n;
            }
            other => return Err(bad(format!("record at output byte {written} has unknown type {other:#04x}"))),
        }
    }
    if written != size {
        return Err(bad(format!("delta ends after {written} bytes of output, {size} declared")));
    }
    if taken != data.len() {
        return Err(bad(format!("delta leaves {} of its {d} inserted bytes unused", data.len() - taken)));
    }
    Ok((written, h.finalize().into()))
}

/// The byte offset just past the `n` lines of `base` that start at `pos`, or `None` when it has fewer.
fn lines_end(base: &[u8], mut pos: usize, n: u64) -> Option<usize> {
    for _ in 0..n {
        if pos >= base.len() {
            return None;
        }
        pos = memchr::memchr(b'\n', &base[pos..]).map_or(base.len(), |i| pos + i + 1);
    }
    Some(pos)
}

/// The raw delta being read: counts what it reads against `limit`.
struct Raw<R> {
    from: R,
    read: u64,
    limit: u64,
}

impl<R: Read> Raw<R> {
    /// The next record's tag and count, or `None` at the end of the delta (only between records).
    fn record(&mut self, written: u64) -> Result<Option<(u8, u64)>, DecodeError> {
        let Some(tag) = self.byte()? else { return Ok(None) };
        let what = format!("the record at output byte {written}");
        match self.number(&what)? {
            None => Err(bad(format!("delta is truncated inside the count of {what}"))),
            Some(0) => Err(bad(format!("{what} has a count of zero"))),
            Some(n) => Ok(Some((tag, n))),
        }
    }

    /// A count (of `what`, for messages), or `None` at the end of the delta before its first byte.
    fn number(&mut self, what: &str) -> Result<Option<u64>, DecodeError> {
        let mut n = 0u64;
        for i in 0..MAX_COUNT_BYTES {
            let Some(b) = self.byte()? else {
                if i == 0 {
                    return Ok(None);
                }
                return Err(bad(format!("delta is truncated inside the count of {what}")));
            };
            let bits = u64::from(b & 0x7f);
            if i == MAX_COUNT_BYTES - 1 && bits > 1 {
                return Err(bad(format!("{what} has a count over 64 bits")));
            }
            n |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Ok(Some(n));
            }
        }
        Err(bad(format!("{what} has a count longer than {MAX_COUNT_BYTES} bytes")))
    }

    fn byte(&mut self) -> Result<Option<u8>, DecodeError> {
        let mut b = [0u8; 1];
        loop {
            match self.from.read(&mut b) {
                Ok(0) => return Ok(None),
                Ok(_) => {
                    self.count(1)?;
                    return Ok(Some(b[0]));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(zstd_bad(e)),
            }
        }
    }

    /// Fills `buf` from the delta.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), DecodeError> {
        self.count(buf.len() as u64)?;
        self.from.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                bad(format!("delta is truncated: it ends within the {} bytes after byte {}", buf.len(), self.read))
            } else {
                zstd_bad(e)
            }
        })
    }

    fn count(&mut self, n: u64) -> Result<(), DecodeError> {
        self.read = self.read.saturating_add(n);
        if self.read > self.limit {
            return Err(bad(format!("delta is longer than {} bytes", self.limit)));
        }
        Ok(())
    }
}

fn bad(why: String) -> DecodeError {
    DecodeError::Bad(format!("bad line delta: {why}"))
}

fn zstd_bad(e: io::Error) -> DecodeError {
    DecodeError::Bad(format!("bad zstd frame: {e}"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn frame(raw: &[u8]) -> Vec<u8> {
        crate::delta::compress(&[], raw, 3).unwrap()
    }

    fn run(raw: &[u8], base: &[u8], size: u64) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        let (n, d) = apply(&frame(raw)[..], base, size, &mut out)?;
        assert_eq!((n, d), (out.len() as u64, Digest::of(&out)));
        Ok(out)
    }

    fn round_trip(a: &[u8], b: &[u8]) -> Vec<u8> {
        let raw = diff(a, b);
        assert_eq!(run(&raw, a, b.len() as u64).unwrap(), b, "apply(diff(a, b), a) == b");
        raw
    }

    fn refused(raw: &[u8], base: &[u8], size: u64, needle: &str) {
        match run(raw, base, size) {
            Err(DecodeError::Bad(why)) => assert!(why.contains(needle), "{why:?} does not say {needle:?}"),
            other => panic!("expected a refusal saying {needle:?}, got {other:?}"),
        }
    }

    fn rec(tag: u8, n: u64) -> Vec<u8> {
        let mut raw = Vec::new();
        record(&mut raw, tag, n);
        raw
    }

    /// A raw delta: the inserted bytes, then the records.
    fn delta(data: &[u8], records: &[Vec<u8>]) -> Vec<u8> {
        let mut raw = Vec::new();
        leb128(&mut raw, data.len() as u64);
        raw.extend_from_slice(data);
        raw.extend(records.concat());
        raw
    }

    /// Signature-database-like lines: unique, of hex.
    fn sig_lines(from: usize, n: usize) -> Vec<String> {
        (from..from + n).map(|i| format!("Win.Trojan.Agent-{i}:0:*:{:016x}{:08x}\n", i * 7919, i)).collect()
    }

    #[test]
    fn hand_made_records_follow_the_documented_format() {
        let base = b"one\ntwo\nthree\nfour";
        // The 4 inserted bytes "2\n3\n"; copy 1 ("one\n"), skip 2, insert 4, copy 1 ("four", no newline).
        let raw = delta(b"2\n3\n", &[rec(COPY, 1), rec(SKIP, 2), rec(INSERT, 4), rec(COPY, 1)]);
        assert_eq!(raw, b"\x042\n3\n\x01\x01\x02\x02\x03\x04\x01\x01", "as docs/protocol.md shows it");
        assert_eq!(run(&raw, base, 12).unwrap(), b"one\n2\n3\nfour");
        // A count of 300 takes two bytes: 0xac 0x02.
        assert_eq!(rec(INSERT, 300), [INSERT, 0xac, 0x02]);
    }

    #[test]
    fn appended_and_deleted_lines_cost_about_the_new_lines() {
        let old = sig_lines(0, 20_000);
        let mut new: Vec<String> =
            old.iter().enumerate().filter(|(i, _)| i % 200 != 7).map(|(_, l)| l.clone()).collect();
        new.extend(sig_lines(1_000_000, 200));
        let (a, b) = (old.concat(), new.concat());
        let raw = round_trip(a.as_bytes(), b.as_bytes());
        let appended: usize = sig_lines(1_000_000, 200).iter().map(String::len).sum();
        // The new lines, plus a copy and a skip record per deleted line (100 of them).
        assert!(raw.len() < appended + 100 * 8 + 24, "raw delta {} bytes, appended {appended}", raw.len());
    }

    #[test]
    fn edge_cases_round_trip() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b""),
            (b"", b"new\n"),
            (b"old\n", b""),
            (b"a\nb\nc", b"a\nb\nc\n"),
            (b"a\nb\nc\n", b"a\nb\nc"),
            (b"x\nx\nx\nx\n", b"x\nx\ny\nx\n"),
            (b"no newline at all", b"still none"),
            (b"\n\n\n", b"\n\n"),
            (b"a\r\nb\r\n", b"a\r\nc\r\nb\r\n"),
        ];
        for (a, b) in cases {
            round_trip(a, b);
        }
    }

    #[test]
    fn repeated_lines_and_moved_blocks_round_trip() {
        let block: String = (0..50).map(|i| format!("line {}\n", i % 5)).collect();
        let a = format!("{block}unique one\n{block}unique two\n");
        let b = format!("unique two\n{block}{block}}}\nunique one\n");
        round_trip(a.as_bytes(), b.as_bytes());
    }

    #[test]
    fn malformed_deltas_are_refused_clearly() {
        let base = b"one\ntwo\nthree\n";
        let good = delta(b"new", &[rec(COPY, 2), rec(INSERT, 3)]);
        assert_eq!(run(&good, base, 11).unwrap(), b"one\ntwo\nnew");
        refused(&good[..good.len() - 1], base, 11, "truncated");
        refused(&[0x00, COPY, 0x80], base, 1, "truncated inside the count");
        refused(&good, base, 10, "past the declared 10");
        refused(&good, base, 12, "ends after 11 bytes of output, 12 declared");
        refused(&delta(b"", &[rec(COPY, 4)]), base, 14, "copies 4 lines from base line 0, past the base's last line");
        refused(&delta(b"", &[rec(SKIP, 2), rec(SKIP, 2)]), base, 0, "skips 2 lines from base line 2");
        refused(&delta(b"", &[rec(COPY, u64::MAX)]), base, u64::MAX, "past the base's last line");
        // Counts that lie: more inserted bytes than declared, than there are, or than the records use.
        refused(&delta(b"abc", &[rec(INSERT, 4)]), base, 4, "inserts 4 bytes, 3 of the inserted bytes are left");
        refused(&delta(b"abcd", &[rec(INSERT, 3)]), base, 4, "ends after 3 bytes of output, 4 declared");
        refused(&delta(b"abcd", &[rec(INSERT, 3)]), base, 3, "more than the declared 3");
        refused(
            &[delta(b"abc", &[rec(INSERT, 2)]), rec(COPY, 1)].concat(),
            base,
            6,
            "leaves 1 of its 3 inserted bytes",
        );
        refused(&[&[0x0a][..], b"abc"].concat(), base, 100, "truncated");
        refused(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], base, u64::MAX, "truncated");
        refused(
            &delta(b"", &[rec(INSERT, u64::MAX)]),
            base,
            5,
            "inserts 18446744073709551615 bytes, past the declared 5",
        );
        refused(&[0x00, COPY, 0x00], base, 1, "count of zero");
        refused(&[0x00, 0x07, 0x01], base, 1, "unknown type 0x07");
        refused(&[0x00, COPY, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02], base, 1, "over 64 bits");
        refused(&[[0x00, COPY].as_slice(), &[0x80; 10], &[0x01]].concat(), base, 1, "longer than 10 bytes");
        refused(b"", base, 0, "delta is empty");
        // Counts are never zero, so every record makes output or moves the cursor: noise stops soon.
        let noise = delta(b"x", &vec![rec(INSERT, 1); 40_000]);
        refused(&noise, b"", 1, "record at output byte 1 inserts 1 bytes, past the declared 1");
        assert!(matches!(apply(&b"not zstd"[..], base, 1, Vec::new()), Err(DecodeError::Bad(_))));
    }

    #[test]
    fn a_wrong_base_gives_other_bytes_or_an_error() {
        let old = sig_lines(0, 500).concat();
        let new = [sig_lines(0, 250).concat(), sig_lines(900, 10).concat(), sig_lines(250, 250).concat()].concat();
        let raw = diff(old.as_bytes(), new.as_bytes());
        let other = sig_lines(5000, 500).concat();
        match run(&raw, other.as_bytes(), new.len() as u64) {
            Ok(out) => assert_ne!(Digest::of(&out), Digest::of(new.as_bytes())),
            Err(DecodeError::Bad(_)) => {}
            Err(e) => panic!("{e}"),
        }
        refused(&raw, &old.as_bytes()[..100], new.len() as u64, "past the base's last line");
    }

    #[test]
    fn text_is_told_from_binaries_and_long_lines() {
        assert!(looks_like_text(b"a line\nanother\n"));
        assert!(!looks_like_text(b"a line\n\0binary\n"));
        assert!(!looks_like_text(&[b'x'; 4096]), "one long line");
        assert!(!looks_like_text(b""));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn any_pair_round_trips(a in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'a'), Just(b'b'), any::<u8>()], 0..400),
                                edits in proptest::collection::vec((any::<u16>(), prop_oneof![Just(b'\n'), Just(b'a'), any::<u8>()], 0..3u8), 0..30)) {
            let mut b = a.clone();
            for (at, byte, kind) in edits {
                let at = usize::from(at) % (b.len() + 1);
                match kind {
                    0 => b.insert(at, byte),
                    1 if at < b.len() => { b.remove(at); }
                    _ if at < b.len() => b[at] = byte,
                    _ => b.push(byte),
                }
            }
            let raw = diff(&a, &b);
            prop_assert!(raw.len() as u64 <= max_raw(b.len() as u64, a.len() as u64));
            prop_assert_eq!(run(&raw, &a, b.len() as u64).unwrap(), b);
        }

        #[test]
        fn any_bytes_are_refused_or_decode_within_bounds(raw in proptest::collection::vec(any::<u8>(), 0..200),
                                                          size in 0u64..300) {
            let base = b"one\ntwo\nthree\nfour\n";
            if let Ok(out) = run(&raw, base, size) {
                prop_assert_eq!(out.len() as u64, size);
            }
        }
    }
}
