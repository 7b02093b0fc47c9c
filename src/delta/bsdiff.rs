//! bsdiff patches: the delta method for executables and other binaries.
//!
//! A new build of a binary shifts addresses all over it: most 4- or 8-byte words change by the same small
//! amount, a few bytes apart. LZ matching (the `zstd-prefix` method) sees that as countless short matches
//! broken by literals; bsdiff instead pairs each region of the new file with an *approximately* matching
//! region of the base and sends the bytewise difference, which is mostly zeros with a few repeating small
//! values, and compresses far better. For the numpy 2.1.0 → 2.1.1 wheel's 10.5 MB extension module the
//! patch is about a third of the zstd-prefix frame.
//!
//! The diff side is the `bsdiff` crate (Colin Percival's algorithm with a suffix array of the base). The
//! apply side is [`apply`], written here and bounded: it trusts nothing in the patch.
//!
//! # Patch format
//!
//! The raw patch (what the stream's zstd frame decompresses to) is a sequence of records and nothing else:
//! no header, no trailer; it ends where the frame's output ends. A record is
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 8 | `mix` | how many bytes to produce by adding the next `mix` patch bytes to the base, from the base position |
//! | 8 | `copy` | how many bytes to copy literally from the patch after those |
//! | 8 | `seek` | how far to move the base position after the mix (may be negative) |
//! | `mix` | diff bytes | output byte = (patch byte + base byte) mod 256; the base position advances by `mix` |
//! | `copy` | literal bytes | output byte = patch byte |
//!
//! The three numbers are 64-bit little-endian **sign-magnitude** integers: bit 63 is the sign, bits 0–62
//! the magnitude. The base position starts at 0. The rules [`apply`] enforces:
//! - `mix` and `copy` are not negative (a set sign bit is refused, even with magnitude 0);
//! - the output never grows past the declared size, and at the end of the patch equals it exactly;
//! - the mix reads only inside the base: position + `mix` ≤ base length;
//! - after the seek the position is in `0..=` base length;
//! - the raw patch is at most [`max_raw`] bytes; a record cut short by the end is refused.
//!
//! The owner applies every fresh patch with [`apply`] before using it, so a patch it sends always passes.
//!
//! Pure: bytes in, bytes out.

use std::io::{self, BufRead, Read, Write};

use super::{DecodeError, MAX_WINDOW_LOG, window_log};
use crate::manifest::Digest;

/// Largest base, and largest output, that the owner diffs with bsdiff: the suffix sort holds 16 bytes per
/// base byte, so this bounds the owner's memory to about 1 GiB plus the inputs.
pub const MAX_INPUT: u64 = 64 << 20;

/// Bytes of one record's control numbers.
const CONTROL: usize = 24;

/// Most raw patch bytes accepted for an output of `size` bytes: the output's own bytes (each is a diff or
/// a literal byte) plus as many again and 64 KiB for control records. An honest patch has one record per
/// region that matches approximately, far below this; the bound keeps a hostile patch of empty records
/// from running forever.
pub fn max_raw(size: u64) -> u64 {
    size.saturating_mul(2).saturating_add(64 << 10)
}

/// The raw bsdiff patch that turns `base` into `target`, or `None` when it would exceed [`max_raw`].
///
/// Memory: about 16 times `base` for the suffix array, plus `target`; callers keep both within
/// [`MAX_INPUT`].
pub fn diff(base: &[u8], target: &[u8]) -> Option<Vec<u8>> {
    let mut raw = Vec::with_capacity(target.len() + 4096);
    ::bsdiff::diff(base, target, &mut raw).expect("writing to a Vec cannot fail");
    (raw.len() as u64 <= max_raw(target.len() as u64)).then_some(raw)
}

/// Decodes a zstd frame holding a raw bsdiff patch (format in the module doc) against `base`, streaming
/// the output into `out`; returns the bytes written (always `size` on success) and their digest.
///
/// Every length and position is checked against `base`, `size` and [`max_raw`] before anything is read
/// or written for it; memory stays at a fixed buffer whatever the patch says.
///
/// # Errors
/// [`DecodeError::Bad`] for a corrupt frame or a malformed patch; [`DecodeError::Io`] when writing fails.
pub fn apply<R: BufRead, W: Write>(frame: R, base: &[u8], size: u64, mut out: W) -> Result<(u64, Digest), DecodeError> {
    let limit = max_raw(size);
    let mut dec = zstd::stream::read::Decoder::with_buffer(frame).map_err(zstd_bad)?;
    dec.window_log_max((window_log(limit) + 1).min(MAX_WINDOW_LOG)).map_err(zstd_bad)?;
    let mut patch = Patch { from: dec.single_frame(), read: 0, limit };
    let base_len = base.len() as u64;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    let mut pos = 0u64;
    while let Some(control) = patch.control()? {
        let [mix, copy, seek] = control;
        let mix = length(mix, "mix", written)?;
        let copy = length(copy, "copy", written)?;
        let room = size - written;
        if mix > room || copy > room - mix {
            return Err(bad(format!(
                "record at output byte {written} writes {mix} + {copy} bytes, past the declared {size}"
            )));
        }
        if mix > base_len - pos {
            return Err(bad(format!(
                "record at output byte {written} reads base bytes {pos}..{}, the base is {base_len} bytes",
                u128::from(pos) + u128::from(mix)
            )));
        }
        // Both fit in the base, so in usize.
        let mut old = &base[pos as usize..(pos + mix) as usize];
        while !old.is_empty() {
            let n = old.len().min(buf.len());
            patch.fill(&mut buf[..n])?;
            for (b, o) in buf[..n].iter_mut().zip(&old[..n]) {
                *b = b.wrapping_add(*o);
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(DecodeError::Io)?;
            old = &old[n..];
        }
        let mut left = copy;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            patch.fill(&mut buf[..n])?;
            h.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(DecodeError::Io)?;
            left -= n as u64;
        }
        pos += mix;
        written += mix + copy;
        let next = i128::from(pos) + i128::from(signed(seek));
        pos = u64::try_from(next).ok().filter(|&p| p <= base_len).ok_or_else(|| {
            bad(format!(
                "record ending at output byte {written} seeks to base byte {next}, the base is {base_len} bytes"
            ))
        })?;
    }
    if written != size {
        return Err(bad(format!("patch ends after {written} bytes of output, {size} declared")));
    }
    Ok((written, h.finalize().into()))
}

/// The raw patch being read: counts what it reads against `limit`.
struct Patch<R> {
    from: R,
    read: u64,
    limit: u64,
}

impl<R: Read> Patch<R> {
    /// The next record's control numbers, or `None` at the end of the patch (only between records).
    fn control(&mut self) -> Result<Option<[[u8; 8]; 3]>, DecodeError> {
        let mut c = [0u8; CONTROL];
        let mut got = 0;
        while got < CONTROL {
            match self.from.read(&mut c[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(bad(format!("patch is truncated inside a record's control at byte {}", self.read)));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(zstd_bad(e)),
            }
        }
        self.count(CONTROL)?;
        let word = |i: usize| c[i * 8..i * 8 + 8].try_into().expect("8 bytes");
        Ok(Some([word(0), word(1), word(2)]))
    }

    /// Fills `buf` from the patch.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), DecodeError> {
        self.count(buf.len())?;
        self.from.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                bad(format!("patch is truncated: it ends within the {} bytes after byte {}", buf.len(), self.read))
            } else {
                zstd_bad(e)
            }
        })
    }

    fn count(&mut self, n: usize) -> Result<(), DecodeError> {
        self.read = self.read.saturating_add(n as u64);
        if self.read > self.limit {
            return Err(bad(format!("patch is longer than {} bytes", self.limit)));
        }
        Ok(())
    }
}

/// A sign-magnitude 64-bit number.
fn signed(word: [u8; 8]) -> i64 {
    let raw = u64::from_le_bytes(word);
    // The magnitude has 63 bits, so it fits an i64 either way.
    let magnitude = (raw & !(1 << 63)) as i64;
    if raw >> 63 == 1 { -magnitude } else { magnitude }
}

/// A record's `mix` or `copy`: sign-magnitude, and never negative.
fn length(word: [u8; 8], what: &str, written: u64) -> Result<u64, DecodeError> {
    let raw = u64::from_le_bytes(word);
    if raw >> 63 == 1 {
        return Err(bad(format!("record at output byte {written} has a negative {what} length")));
    }
    Ok(raw)
}

fn bad(why: String) -> DecodeError {
    DecodeError::Bad(format!("bad bsdiff patch: {why}"))
}

fn zstd_bad(e: io::Error) -> DecodeError {
    DecodeError::Bad(format!("bad zstd frame: {e}"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Random-looking bytes with a few NULs, like machine code.
    fn binary(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x.is_multiple_of(5) { 0 } else { x as u8 }
            })
            .collect()
    }

    fn frame(raw: &[u8]) -> Vec<u8> {
        crate::delta::compress(&[], raw, 3).unwrap()
    }

    fn run(raw: &[u8], base: &[u8], size: u64) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        let (n, d) = apply(&frame(raw)[..], base, size, &mut out)?;
        assert_eq!((n, d), (out.len() as u64, Digest::of(&out)));
        Ok(out)
    }

    fn word(x: i64) -> [u8; 8] {
        let magnitude = x.unsigned_abs();
        (if x < 0 { magnitude | 1 << 63 } else { magnitude }).to_le_bytes()
    }

    /// One record: control numbers, then the diff and literal bytes.
    fn record(mix: i64, copy: i64, seek: i64, bytes: &[u8]) -> Vec<u8> {
        [&word(mix)[..], &word(copy), &word(seek), bytes].concat()
    }

    fn refused(raw: &[u8], base: &[u8], size: u64, needle: &str) {
        match run(raw, base, size) {
            Err(DecodeError::Bad(why)) => assert!(why.contains(needle), "{why:?} does not say {needle:?}"),
            other => panic!("expected a refusal saying {needle:?}, got {other:?}"),
        }
    }

    /// Addresses shifted everywhere: every 4-byte word of every ~1 KB changes by the same amount.
    fn shifted(old: &[u8]) -> Vec<u8> {
        let mut new = old.to_vec();
        for at in (0..new.len() - 4).step_by(1000) {
            let w = u32::from_le_bytes(new[at..at + 4].try_into().unwrap()).wrapping_add(0x1230);
            new[at..at + 4].copy_from_slice(&w.to_le_bytes());
        }
        new.splice(5000..5000, b"inserted".iter().copied());
        new
    }

    #[test]
    fn a_diff_applies_back_to_the_target_and_beats_lz_on_shifted_addresses() {
        let old = binary(400_000, 1);
        let new = shifted(&old);
        let raw = diff(&old, &new).unwrap();
        assert_eq!(run(&raw, &old, new.len() as u64).unwrap(), new);
        let patch = crate::delta::compress(&[], &raw, 19).unwrap();
        let lz = crate::delta::compress(&old, &new, 19).unwrap();
        assert!(patch.len() * 2 < lz.len(), "bsdiff {} bytes, zstd-prefix {} bytes", patch.len(), lz.len());
    }

    #[test]
    fn empty_inputs_round_trip() {
        for (old, new) in [(&b""[..], &b""[..]), (b"", b"new"), (b"old", b"")] {
            let raw = diff(old, new).unwrap();
            assert_eq!(run(&raw, old, new.len() as u64).unwrap(), new);
        }
    }

    #[test]
    fn hand_made_records_follow_the_documented_format() {
        let base = b"abcdefgh";
        // Mix 3 from 0 ("abc" + 1 each = "bcd"), copy "XY", seek +2 to 5; mix 2 ("fg" + 0), seek -7 to 0.
        let raw = [record(3, 2, 2, b"\x01\x01\x01XY"), record(2, 0, -7, b"\0\0"), record(1, 0, 0, b"\0")].concat();
        assert_eq!(run(&raw, base, 8).unwrap(), b"bcdXYfga");
    }

    #[test]
    fn malformed_patches_are_refused_clearly() {
        let base = binary(1000, 2);
        let good = record(10, 5, 0, &[0; 15]);
        run(&good, &base, 15).unwrap();
        refused(&good[..good.len() - 1], &base, 15, "truncated");
        refused(&good[..10], &base, 15, "truncated inside a record's control");
        refused(&good, &base, 14, "past the declared 14");
        refused(&good, &base, 16, "ends after 15 bytes of output, 16 declared");
        refused(&record(10, 0, 0, &[0; 10]), &base[..5], 10, "reads base bytes 0..10, the base is 5 bytes");
        refused(&record(0, 1, 1001, b"x"), &base, 1, "seeks to base byte 1001");
        refused(&record(0, 1, -1, b"x"), &base, 1, "seeks to base byte -1");
        refused(&[record(0, 1, 1000, b"x"), record(1, 0, 0, b"\0")].concat(), &base, 2, "reads base bytes 1000..1001");
        refused(&record(-1, 0, 0, b""), &base, 1, "negative mix length");
        refused(&record(0, -2, 0, b""), &base, 1, "negative copy length");
        let mut minus_zero = record(0, 1, 0, b"x");
        minus_zero[7] = 0x80;
        refused(&minus_zero, &base, 1, "negative mix length");
        refused(&record(i64::MAX, i64::MAX, 0, b""), &base, u64::MAX, "reads base bytes");
        refused(&record(0, i64::MAX, 0, b""), &base, u64::MAX, "truncated");
        // Empty records that go on forever stop at the bound on the raw patch.
        refused(&vec![0u8; (64 << 10) + 48], &base, 0, "longer than");
        assert!(matches!(apply(&b"not zstd"[..], &base, 1, Vec::new()), Err(DecodeError::Bad(_))));
    }

    #[test]
    fn a_wrong_base_gives_other_bytes_or_an_error() {
        let old = binary(50_000, 3);
        let new = shifted(&old);
        let raw = diff(&old, &new).unwrap();
        if let Ok(out) = run(&raw, &binary(50_000, 4), new.len() as u64) {
            assert_ne!(Digest::of(&out), Digest::of(&new));
        }
        refused(&raw, &old[..1000], new.len() as u64, "the base is 1000 bytes");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_pair_round_trips(old in proptest::collection::vec(any::<u8>(), 0..3000),
                                edits in proptest::collection::vec((any::<u16>(), any::<u8>()), 0..20)) {
            let mut new = old.clone();
            for (at, b) in edits {
                let at = usize::from(at) % (new.len() + 1);
                if b % 3 == 0 { new.insert(at, b) } else if at < new.len() { new[at] = b }
            }
            let raw = diff(&old, &new).unwrap();
            prop_assert_eq!(run(&raw, &old, new.len() as u64).unwrap(), new);
        }
    }
}
