//! Arbitrary bytes as a line delta's raw delta, against a fixed base and an arbitrary declared size: the
//! applier must refuse or produce exactly the declared size, never panic, never read or write past its
//! bounds. And any two texts made from the input round-trip through the diff.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailferry::delta::{self, lines};

fuzz_target!(|bytes: &[u8]| {
    let base = b"one\ntwo\nthree\nfour\nfive\nsix\nseven";
    let size = bytes.first().map_or(0, |&b| u64::from(b));
    let frame = delta::compress(&[], bytes, 1).expect("compresses");
    let mut out = Vec::new();
    if let Ok((n, digest)) = lines::apply(&frame[..], base, size, &mut out) {
        assert_eq!((n, digest), (size, mailferry::manifest::Digest::of(&out)));
    }
    // The input cut in two, as an old and a new text.
    let (a, b) = bytes.split_at(bytes.len() / 2);
    let raw = lines::diff(a, b);
    let frame = delta::compress(&[], &raw, 1).expect("compresses");
    let mut got = Vec::new();
    lines::apply(&frame[..], a, b.len() as u64, &mut got).expect("a delta the diff made applies");
    assert_eq!(got, b);
});
