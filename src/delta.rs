//! zstd frames with a reference prefix: how mailferry sends files as deltas.
//!
//! A delta stream is one zstd frame compressed with the concatenated contents of some files the recipient
//! already has (the *bases*) as its reference prefix, in the manner of `zstd --patch-from`. Matches may
//! point anywhere in the prefix, so content that moved between files or was renamed costs as little as
//! content edited in place. Without a prefix it is an ordinary frame.
//!
//! The window covers the whole prefix plus the output and long-distance matching is on; without both a
//! prefix larger than a few megabytes is nearly useless. The decoder is told the window it may use, derived
//! from the sizes the authenticated body declared, so a hostile frame cannot make it reserve more.
//!
//! That is the `zstd-prefix` method. The other, [`bsdiff`], suits executables better: their addresses shift
//! everywhere, which LZ matching handles poorly.
//!
//! Pure: bytes in, bytes out (the decoder streams from any reader to any writer).

pub mod bsdiff;
pub mod lines;

use std::io::{self, BufRead, Read, Write};

use crate::manifest::Digest;

/// Smallest window the decoder is always allowed: covers every compression level's default window.
const MIN_WINDOW_LOG: u32 = 23;
/// Largest window zstd supports.
const MAX_WINDOW_LOG: u32 = 31;

/// The window log that covers `bytes` of prefix plus output.
pub fn window_log(bytes: u64) -> u32 {
    (64 - bytes.max(1).leading_zeros()).clamp(MIN_WINDOW_LOG, MAX_WINDOW_LOG)
}

/// Compresses `data` at `level` with `prefix` as reference (empty for none).
///
/// # Errors
/// Only zstd parameter errors, which mean a bug.
pub fn compress(prefix: &[u8], data: &[u8], level: i32) -> io::Result<Vec<u8>> {
    let mut c = zstd::bulk::Compressor::default();
    // The level first: setting it reloads the (empty) dictionary, which would drop the prefix.
    c.set_compression_level(level)?;
    c.window_log(window_log((prefix.len() + data.len()) as u64))?;
    c.long_distance_matching(true)?;
    c.include_checksum(false)?;
    c.set_pledged_src_size(Some(data.len() as u64))?;
    if !prefix.is_empty() {
        c.context_mut().ref_prefix(prefix).map_err(|e| io::Error::other(zstd::zstd_safe::get_error_name(e)))?;
    }
    c.compress(data)
}

/// Why a frame did not decode to what was declared.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Writing the output failed: a local problem (full disk), not the frame's fault.
    #[error(transparent)]
    Io(io::Error),
    /// The frame is corrupt, or decodes to more than declared.
    #[error("{0}")]
    Bad(String),
}

/// Streams the zstd frame from `frame` into `out`, with `prefix` as reference, refusing to produce more
/// than `limit` bytes; returns the bytes written and their digest.
///
/// # Errors
/// See [`DecodeError`].
pub fn decompress<R: BufRead, W: Write>(
    frame: R,
    prefix: &[u8],
    limit: u64,
    mut out: W,
) -> Result<(u64, Digest), DecodeError> {
    let bad = |e: io::Error| DecodeError::Bad(format!("bad zstd frame: {e}"));
    let mut dec = zstd::stream::read::Decoder::with_ref_prefix(frame, prefix).map_err(bad)?;
    // One more than the window covering prefix and output, but never past what zstd accepts: asking for
    // more is an error, which made every frame of a file of 1 GiB or more undecodable.
    let max = (window_log((prefix.len() as u64).saturating_add(limit)) + 1).min(MAX_WINDOW_LOG);
    dec.window_log_max(max).map_err(bad)?;
    let mut dec = dec.single_frame();
    let mut h = blake3::Hasher::new();
    // Sized to the output (a small file's frame needs no 256 KiB of zeroed buffer).
    let mut buf = vec![0u8; limit.saturating_add(1).clamp(4096, 256 * 1024) as usize];
    let mut total = 0u64;
    loop {
        let n = dec.read(&mut buf).map_err(bad)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(DecodeError::Bad(format!("unpacks to more than the declared {limit} bytes")));
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(DecodeError::Io)?;
    }
    Ok((total, h.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn decode(frame: &[u8], prefix: &[u8], limit: u64) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        let (n, d) = decompress(frame, prefix, limit, &mut out)?;
        assert_eq!((n, d), (out.len() as u64, Digest::of(&out)));
        Ok(out)
    }

    #[test]
    fn a_prefix_turns_an_edit_of_incompressible_data_into_a_small_delta() {
        let old = pseudo_random(12 << 20, 1);
        let mut new = old.clone();
        new[5 << 20..(5 << 20) + 1000].copy_from_slice(&pseudo_random(1000, 2));
        new.extend_from_slice(&pseudo_random(3000, 3));
        let full = compress(&[], &new, 9).unwrap();
        let delta = compress(&old, &new, 9).unwrap();
        assert!(full.len() > 12 << 20, "random data does not compress: {}", full.len());
        // 4,000 new bytes; the rest is found in the prefix.
        assert!(delta.len() < 12_000, "delta is {} bytes", delta.len());
        assert_eq!(decode(&delta, &old, new.len() as u64).unwrap(), new);
        assert_eq!(decode(&full, &[], new.len() as u64).unwrap(), new);
    }

    #[test]
    fn content_that_moved_between_files_is_found_in_the_prefix() {
        let a = pseudo_random(300_000, 4);
        let b = pseudo_random(300_000, 5);
        // The new "files" swap halves and contents: all of it is somewhere in the prefix.
        let prefix = [a.as_slice(), b.as_slice()].concat();
        let out = [&b[..150_000], &a[..], &b[150_000..]].concat();
        let delta = compress(&prefix, &out, 3).unwrap();
        assert!(delta.len() < 2_000, "delta is {} bytes", delta.len());
        assert_eq!(decode(&delta, &prefix, out.len() as u64).unwrap(), out);
    }

    #[test]
    fn a_limit_of_a_gigabyte_or_more_still_decodes() {
        let frame = compress(&[], b"hello", 3).unwrap();
        for limit in [1 << 30, 1 << 40, u64::MAX] {
            assert_eq!(decode(&frame, &[], limit).unwrap(), b"hello", "limit {limit}");
        }
    }

    #[test]
    fn wrong_base_or_short_limit_is_refused() {
        let old = pseudo_random(200_000, 6);
        let mut new = old.clone();
        new[100] ^= 1;
        let delta = compress(&old, &new, 3).unwrap();
        // Decoding against another base yields other bytes (caught by the digest) or an error.
        let other = pseudo_random(200_000, 7);
        if let Ok(out) = decode(&delta, &other, new.len() as u64) {
            assert_ne!(Digest::of(&out), Digest::of(&new));
        }
        assert!(matches!(decode(&delta, &old, 1000), Err(DecodeError::Bad(_))));
        assert!(matches!(decode(b"not zstd at all", &[], 1000), Err(DecodeError::Bad(_))));
    }
}
