//! Streamed authenticated encryption of a reply's pack: XChaCha20-Poly1305 in the STREAM construction.
//!
//! The plaintext is cut into segments of [`SEGMENT`] bytes (the last one shorter, or empty for an empty
//! plaintext); each segment is sealed on its own, with its own 16-byte tag, under the nonce
//! `prefix (19 bytes) ‖ counter (4 bytes, big-endian, from 0) ‖ last (1 byte: 1 for the final segment,
//! else 0)` and the same associated data. The ciphertext is the sealed segments back to back, so its
//! length follows from the plaintext's ([`sealed_len`]). Because the counter and the last-segment flag
//! are in every nonce, a stream cut short at a segment boundary, with segments reordered, dropped,
//! repeated or appended, or spliced from another stream fails to decrypt, as does a changed byte, another
//! key or other associated data. The cipher key is derived from the given key with BLAKE3 under its own
//! context, so the key is used for nothing else.
//!
//! Pure: no I/O beyond the given reader and writer, and memory bounded by one segment. Decrypted segments
//! are written as they verify: the output is only the plaintext when [`decrypt`] returns `Ok`, and a
//! caller discards it otherwise.

use std::io::{self, Read, Write};

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};

use super::Key;

/// Plaintext bytes per segment.
pub const SEGMENT: usize = 64 * 1024;

/// Bytes of the tag each segment carries.
pub const TAG: usize = 16;

/// Bytes of the random nonce prefix of a stream.
pub const PREFIX: usize = 19;

/// The algorithm's name on the wire.
pub const ALG: &str = "xchacha20poly1305-stream-64k";

/// Domain separation of the stream's cipher key.
const CONTEXT: &str = "mailferry pack stream v1";

/// Why a stream does not decrypt.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Segment `segment` (from 0) does not verify: another key, other associated data, a changed byte, or
    /// a segment of another stream or in another place.
    #[error(
        "encrypted pack does not decrypt at segment {segment}: another key, another reply's data, or changed, \
         reordered or spliced bytes"
    )]
    Damaged {
        /// The segment that failed.
        segment: u32,
    },
    /// The stream ends before its final segment (cut off at a segment boundary, or empty).
    #[error("encrypted pack ends before its final segment (truncated after {segments} segments)")]
    Truncated {
        /// Segments that verified before the end.
        segments: u32,
    },
    /// More segments than the counter can number.
    #[error("encrypted pack has more segments than a stream may have")]
    TooLong,
    /// Reading or writing failed.
    #[error("encrypted pack: {0}")]
    Io(#[from] io::Error),
}

/// Length of the ciphertext of a `plain`-byte plaintext: the plaintext and one tag per segment (at least
/// one segment). `None` when it would need more segments than the counter can number.
pub fn sealed_len(plain: u64) -> Option<u64> {
    let segments = plain.div_ceil(SEGMENT as u64).max(1);
    if segments > u64::from(u32::MAX) + 1 {
        return None;
    }
    plain.checked_add(segments * TAG as u64)
}

fn cipher(key: &Key) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(&chacha20poly1305::Key::from(blake3::derive_key(CONTEXT, &key.0)))
}

fn nonce(prefix: &[u8; PREFIX], counter: u32, last: bool) -> XNonce {
    let mut n = [0u8; 24];
    n[..PREFIX].copy_from_slice(prefix);
    n[PREFIX..PREFIX + 4].copy_from_slice(&counter.to_be_bytes());
    n[23] = u8::from(last);
    XNonce::from(n)
}

/// Reads until `buf` is full or the input ends; returns how many bytes were read.
fn fill(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Encrypts everything `input` yields to `output` under `key`, with the random `prefix` (fresh for every
/// stream sealed under the key) and the associated data `aad`. Returns the plaintext's length.
///
/// # Errors
/// [`StreamError::Io`] when reading or writing fails, [`StreamError::TooLong`] beyond 2^32 segments.
pub fn encrypt(
    key: &Key,
    prefix: &[u8; PREFIX],
    aad: &[u8],
    input: impl Read,
    mut output: impl Write,
) -> Result<u64, StreamError> {
    let cipher = cipher(key);
    let mut input = input;
    let mut buf = vec![0u8; SEGMENT + 1];
    let mut have = 0;
    let mut counter: u32 = 0;
    let mut total = 0u64;
    loop {
        have += fill(&mut input, &mut buf[have..])?;
        let last = have <= SEGMENT;
        let len = have.min(SEGMENT);
        let tag = cipher
            .encrypt_inout_detached(&nonce(prefix, counter, last), aad, (&mut buf[..len]).into())
            .map_err(|_| StreamError::TooLong)?;
        output.write_all(&buf[..len])?;
        output.write_all(&tag)?;
        total += len as u64;
        if last {
            output.flush()?;
            return Ok(total);
        }
        // The byte read ahead begins the next segment.
        buf[0] = buf[SEGMENT];
        have = 1;
        counter = counter.checked_add(1).ok_or(StreamError::TooLong)?;
    }
}

/// Decrypts a stream made by [`encrypt`] with the same key, prefix and associated data from `input` to
/// `output`. Returns the plaintext's length. On an error, what was written is not the plaintext.
///
/// # Errors
/// [`StreamError::Damaged`] for a segment that does not verify, [`StreamError::Truncated`] for a stream
/// that ends before its final segment, [`StreamError::TooLong`], and [`StreamError::Io`].
pub fn decrypt(
    key: &Key,
    prefix: &[u8; PREFIX],
    aad: &[u8],
    input: impl Read,
    mut output: impl Write,
) -> Result<u64, StreamError> {
    const SEALED: usize = SEGMENT + TAG;
    let cipher = cipher(key);
    let mut input = input;
    let mut buf = vec![0u8; SEALED + 1];
    let mut have = 0;
    let mut counter: u32 = 0;
    let mut total = 0u64;
    loop {
        have += fill(&mut input, &mut buf[have..])?;
        let last = have <= SEALED;
        let len = have.min(SEALED);
        if len < TAG {
            return Err(StreamError::Truncated { segments: counter });
        }
        let (msg, tag) = buf[..len].split_at_mut(len - TAG);
        let tag = Tag::try_from(&*tag).expect("the tag is 16 bytes");
        if last {
            // A segment sealed as not the last, at the end of the input: the stream was cut short. Tell
            // that apart (on a copy: a failed check leaves the bytes as they were, but be sure) from damage.
            let copy = msg.to_vec();
            if cipher.decrypt_inout_detached(&nonce(prefix, counter, true), aad, (&mut *msg).into(), &tag).is_err() {
                let mut probe = copy;
                let truncated = cipher.decrypt_inout_detached(
                    &nonce(prefix, counter, false),
                    aad,
                    probe.as_mut_slice().into(),
                    &tag,
                );
                return Err(match truncated {
                    Ok(()) => StreamError::Truncated { segments: counter + 1 },
                    Err(_) => StreamError::Damaged { segment: counter },
                });
            }
        } else if cipher.decrypt_inout_detached(&nonce(prefix, counter, false), aad, (&mut *msg).into(), &tag).is_err()
        {
            return Err(StreamError::Damaged { segment: counter });
        }
        output.write_all(msg)?;
        total += msg.len() as u64;
        if last {
            output.flush()?;
            return Ok(total);
        }
        buf[0] = buf[SEALED];
        have = 1;
        counter = counter.checked_add(1).ok_or(StreamError::TooLong)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(key: &Key, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        assert_eq!(encrypt(key, &[7; PREFIX], aad, plain, &mut out).unwrap(), plain.len() as u64);
        assert_eq!(out.len() as u64, sealed_len(plain.len() as u64).unwrap());
        out
    }

    fn open(key: &Key, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, StreamError> {
        let mut out = Vec::new();
        let n = decrypt(key, &[7; PREFIX], aad, sealed, &mut out)?;
        assert_eq!(n, out.len() as u64);
        Ok(out)
    }

    fn plain(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn round_trips_at_every_segment_boundary() {
        let key = Key::generate();
        for n in [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 2 * SEGMENT, 3 * SEGMENT + 17] {
            let p = plain(n);
            let sealed = seal(&key, b"aad", &p);
            assert_eq!(open(&key, b"aad", &sealed).unwrap(), p, "{n} bytes");
            if n > 64 {
                let marker = &p[..64];
                assert!(!sealed.windows(64).any(|w| w == marker), "the plaintext shows through at {n} bytes");
            }
        }
        assert_eq!(sealed_len(0), Some(16), "an empty pack is one empty final segment");
        assert_eq!(sealed_len(SEGMENT as u64), Some(SEGMENT as u64 + 16));
        assert_eq!(sealed_len(SEGMENT as u64 + 1), Some(SEGMENT as u64 + 33));
    }

    #[test]
    fn a_truncated_stream_fails() {
        let key = Key::generate();
        let sealed = seal(&key, b"aad", &plain(2 * SEGMENT + 100));
        let boundary = SEGMENT + TAG;
        // Cut at a segment boundary: what is left verifies, but its last segment was not sealed as last.
        assert!(matches!(open(&key, b"aad", &sealed[..boundary]), Err(StreamError::Truncated { segments: 1 })));
        assert!(matches!(open(&key, b"aad", &sealed[..2 * boundary]), Err(StreamError::Truncated { segments: 2 })));
        // Cut inside a segment, or to nothing.
        assert!(matches!(open(&key, b"aad", &sealed[..sealed.len() - 1]), Err(StreamError::Damaged { segment: 2 })));
        assert!(matches!(open(&key, b"aad", &sealed[..boundary + 40]), Err(StreamError::Damaged { segment: 1 })));
        assert!(matches!(open(&key, b"aad", &sealed[..boundary + 5]), Err(StreamError::Truncated { segments: 1 })));
        assert!(matches!(open(&key, b"aad", &[]), Err(StreamError::Truncated { segments: 0 })));
        let empty = seal(&key, b"aad", &[]);
        assert!(matches!(open(&key, b"aad", &empty[..15]), Err(StreamError::Truncated { segments: 0 })));
        // Bytes appended after the final segment make it a middle one, which it was not sealed as.
        let mut longer = sealed.clone();
        longer.extend_from_slice(&sealed[..boundary]);
        assert!(matches!(open(&key, b"aad", &longer), Err(StreamError::Damaged { segment: 2 })));
        let e = open(&key, b"aad", &sealed[..boundary]).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn reordered_or_spliced_segments_fail() {
        let key = Key::generate();
        let sealed = seal(&key, b"aad", &plain(3 * SEGMENT));
        let b = SEGMENT + TAG;
        let mut swapped = sealed.clone();
        swapped[..b].copy_from_slice(&sealed[b..2 * b]);
        swapped[b..2 * b].copy_from_slice(&sealed[..b]);
        assert!(matches!(open(&key, b"aad", &swapped), Err(StreamError::Damaged { segment: 0 })));
        // A segment of another stream under the same key and data (its own random prefix), in the same place.
        let mut other = Vec::new();
        encrypt(&key, &[9; PREFIX], b"aad", plain(3 * SEGMENT).as_slice(), &mut other).unwrap();
        let mut spliced = sealed.clone();
        spliced[b..2 * b].copy_from_slice(&other[b..2 * b]);
        assert!(matches!(open(&key, b"aad", &spliced), Err(StreamError::Damaged { segment: 1 })));
        // A segment dropped from the middle.
        let dropped = [&sealed[..b], &sealed[2 * b..]].concat();
        assert!(matches!(open(&key, b"aad", &dropped), Err(StreamError::Damaged { segment: 1 })));
        // Another stream's nonce prefix: nothing verifies.
        let mut moved = Vec::new();
        encrypt(&key, &[8; PREFIX], b"aad", plain(100).as_slice(), &mut moved).unwrap();
        assert!(matches!(open(&key, b"aad", &moved), Err(StreamError::Damaged { segment: 0 })));
    }

    #[test]
    fn a_flipped_bit_another_key_or_other_data_fail() {
        let key = Key::generate();
        let sealed = seal(&key, b"reply 1", &plain(SEGMENT + 10));
        for at in [0, SEGMENT - 1, SEGMENT + 3, SEGMENT + TAG + 2, sealed.len() - 1] {
            let mut flipped = sealed.clone();
            flipped[at] ^= 0x20;
            let segment = u32::from(at >= SEGMENT + TAG);
            assert!(
                matches!(open(&key, b"reply 1", &flipped), Err(StreamError::Damaged { segment: s }) if s == segment),
                "a flipped bit at {at} must not decrypt"
            );
        }
        assert!(matches!(open(&Key::generate(), b"reply 1", &sealed), Err(StreamError::Damaged { segment: 0 })));
        assert!(matches!(open(&key, b"reply 2", &sealed), Err(StreamError::Damaged { segment: 0 })));
        let e = open(&key, b"reply 2", &sealed).unwrap_err().to_string();
        assert!(e.contains("does not decrypt at segment 0"), "{e}");
    }

    #[test]
    fn an_empty_pack_round_trips_and_is_authenticated() {
        let key = Key::generate();
        let sealed = seal(&key, b"aad", &[]);
        assert_eq!(sealed.len(), TAG);
        assert_eq!(open(&key, b"aad", &sealed).unwrap(), Vec::<u8>::new());
        assert!(open(&Key::generate(), b"aad", &sealed).is_err());
        assert!(open(&key, b"other", &sealed).is_err());
    }
}
