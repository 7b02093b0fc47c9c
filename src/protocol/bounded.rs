//! Bounded decoding: the JSON of control parts, inventory payloads and reply bodies is read as a stream
//! whose counts and sizes are checked as the bytes come in, so a message over a limit costs about one
//! element of memory, not what it claims to hold.
//!
//! Every list an attacker controls (inventory, removed paths, chunks, resent part numbers, operations,
//! delta streams, bases) is deserialized through [`seq`], which counts its elements against the limit of
//! its [`List`] and refuses the first one over it. A value is decoded in two passes over the same bytes:
//! the first keeps no element (each is skipped, or for a list holding lists, decoded and dropped), so it
//! costs no memory whatever the counts are; only when it passed does the second build the value, whose
//! size the limits now bound. Between two elements of any list at most [`MAX_ELEMENT_BYTES`] may pass,
//! which bounds what a single string or a run of whitespace can make the parser buffer, and zstd frames
//! are decoded with a window of at most [`MAX_WINDOW_LOG`].
//!
//! The derived `Deserialize` of a struct cannot pass state to a field's deserializer, so the decode in
//! progress keeps its limits and counts in a thread-local `Scope`; outside one (local, trusted state
//! read back from the database), [`seq`] reads a list without bounds.
//!
//! Pure: bytes in, values out.

use std::cell::RefCell;
use std::fmt;
use std::io::{self, BufReader, Read};
use std::marker::PhantomData;

use serde::de::{DeserializeOwned, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::{Reason, Refusal};
use crate::limits::Limits;

/// Most JSON bytes that may pass between the starts of two elements of a list (and before the first):
/// an honest element is at most a few kilobytes (a path is at most 3,072 bytes, six times that escaped).
pub const MAX_ELEMENT_BYTES: u64 = 64 * 1024;

/// Largest zstd window an inventory payload or a body frame may need: 8 MiB, which covers every level up
/// to 19, the highest the reference sender uses for them.
pub const MAX_WINDOW_LOG: u32 = 23;

/// The lists on the wire whose length an attacker chooses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum List {
    /// A request's `inventory` and `removed` together, or an inventory payload.
    Inventory,
    /// A reply's `payloads`.
    Payloads,
    /// A request's `resend.parts`.
    Resend,
    /// A body's `ops`.
    Ops,
    /// A body's `streams`.
    Streams,
    /// One stream's `bases`.
    Bases,
    /// A request's `methods`.
    Methods,
}

/// Most delta methods a request may name.
pub const MAX_METHODS: usize = 16;

impl List {
    fn name(self) -> &'static str {
        match self {
            List::Inventory => "inventory entries",
            List::Payloads => "chunks",
            List::Resend => "part numbers to resend",
            List::Ops => "operations",
            List::Streams => "delta streams",
            List::Bases => "bases in one stream",
            List::Methods => "delta methods",
        }
    }

    fn max(self, limits: &Limits) -> usize {
        match self {
            List::Inventory => limits.max_inventory_entries,
            List::Payloads | List::Resend => limits.max_parts,
            List::Ops | List::Streams | List::Bases => limits.max_files_per_reply,
            List::Methods => MAX_METHODS,
        }
    }

    /// Whether the counts of all lists of this kind in one value add up (rather than each counting alone).
    fn shared(self) -> bool {
        !matches!(self, List::Bases | List::Methods)
    }

    /// Whether an element holds a bounded list itself, so even a counting pass must decode it.
    fn nested(self) -> bool {
        self == List::Streams
    }
}

/// The state of the decode in progress.
struct Context {
    limits: Limits,
    /// Second pass: keep the elements.
    keep: bool,
    /// Elements seen per shared list kind.
    seen: [usize; 6],
    /// Bytes read since the last element began.
    since: u64,
    /// The limit that stopped the decode, if one did (serde only carries a message).
    refusal: Option<Refusal>,
}

thread_local! {
    static CONTEXT: RefCell<Option<Context>> = const { RefCell::new(None) };
}

/// One pass of a bounded decode on this thread; ends when dropped.
struct Scope;

impl Scope {
    fn enter(limits: &Limits, keep: bool) -> Scope {
        CONTEXT.with(|c| {
            let mut c = c.borrow_mut();
            assert!(c.is_none(), "bounded decodes do not nest");
            *c = Some(Context { limits: limits.clone(), keep, seen: [0; 6], since: 0, refusal: None });
        });
        Scope
    }

    /// The refusal recorded by a limit, if any.
    fn refusal(&self) -> Option<Refusal> {
        CONTEXT.with(|c| c.borrow_mut().as_mut().and_then(|c| c.refusal.take()))
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        CONTEXT.with(|c| c.borrow_mut().take());
    }
}

/// Records `refusal` as the reason a decode stops; the first one recorded wins.
fn refuse(refusal: Refusal) {
    CONTEXT.with(|c| {
        if let Some(c) = c.borrow_mut().as_mut() {
            c.refusal.get_or_insert(refusal);
        }
    });
}

/// An element begins: the bytes before it no longer count against [`MAX_ELEMENT_BYTES`].
fn element_begins() {
    CONTEXT.with(|c| {
        if let Some(c) = c.borrow_mut().as_mut() {
            c.since = 0;
        }
    });
}

/// Reads a list of `what`, counting its elements against `what`'s limit in the decode in progress (see
/// the module doc). For `#[serde(deserialize_with)]`.
///
/// # Errors
/// The deserializer's, and a custom error when the list is over its limit (the refusal is recorded).
pub fn seq<'de, D, T>(d: D, what: List) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Elements<T>(List, PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for Elements<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a list of {}", self.0.name())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let what = self.0;
            let Some((keep, max)) = CONTEXT.with(|c| c.borrow().as_ref().map(|c| (c.keep, what.max(&c.limits)))) else {
                // Outside a bounded decode: trusted local state.
                let mut out = Vec::new();
                while let Some(x) = seq.next_element()? {
                    out.push(x);
                }
                return Ok(out);
            };
            let mut out = Vec::new();
            let mut alone = 0usize;
            loop {
                element_begins();
                let more = if keep || what.nested() {
                    match seq.next_element::<T>()? {
                        Some(x) if keep => {
                            out.push(x);
                            true
                        }
                        other => other.is_some(),
                    }
                } else {
                    seq.next_element::<IgnoredAny>()?.is_some()
                };
                if !more {
                    return Ok(out);
                }
                alone += 1;
                let count = if what.shared() {
                    CONTEXT.with(|c| {
                        let mut c = c.borrow_mut();
                        let c = c.as_mut().expect("inside a bounded decode");
                        c.seen[what as usize] += 1;
                        c.seen[what as usize]
                    })
                } else {
                    alone
                };
                if count > max {
                    refuse(Refusal::new(Reason::Limit, format!("more than {max} {}", what.name())));
                    return Err(serde::de::Error::custom(format_args!("more than {max} {}", what.name())));
                }
            }
        }
    }

    d.deserialize_seq(Elements(what, PhantomData))
}

/// A reader that refuses to give more than `max` bytes in total, or more than [`MAX_ELEMENT_BYTES`]
/// between two elements of a list, recording the refusal.
pub struct Capped<R> {
    inner: R,
    left: u64,
    what: &'static str,
    max: u64,
}

impl<R: Read> Capped<R> {
    /// `inner`, cut off after `max` bytes of `what`.
    pub fn new(inner: R, max: u64, what: &'static str) -> Capped<R> {
        Capped { inner, left: max, what, max }
    }
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // One byte beyond the limit is asked for, so that reaching the limit exactly is not an error.
        let want = buf.len().min(usize::try_from(self.left.saturating_add(1)).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > self.left {
            let detail = format!("{} is larger than {} bytes", self.what, self.max);
            refuse(Refusal::new(Reason::Limit, detail.clone()));
            return Err(io::Error::other(detail));
        }
        self.left -= n as u64;
        let since = CONTEXT.with(|c| {
            c.borrow_mut().as_mut().map_or(0, |c| {
                c.since += n as u64;
                c.since
            })
        });
        // The buffer above reads ahead, so an element may be counted with up to one buffer of what
        // follows it; the bound leaves room for that.
        if since > MAX_ELEMENT_BYTES + READ_AHEAD as u64 {
            let detail = format!("{} has more than {MAX_ELEMENT_BYTES} bytes in one element of a list", self.what);
            refuse(Refusal::new(Reason::Limit, detail.clone()));
            return Err(io::Error::other(detail));
        }
        Ok(n)
    }
}

/// The buffer between a [`Capped`] reader and the JSON parser.
const READ_AHEAD: usize = 8 * 1024;

/// Decodes one `T` of at most `max_bytes` from the readers `open` gives, in two passes (see the module
/// doc). `what` names the bytes in refusals; errors that are not limits become `bad-path` for a path and
/// `malformed` otherwise.
///
/// # Errors
/// A refusal naming the first problem: a limit, an error of `open`, or a JSON error.
pub fn decode<T, R, F>(open: F, max_bytes: u64, limits: &Limits, what: &'static str) -> Result<T, Refusal>
where
    T: DeserializeOwned,
    R: Read,
    F: Fn() -> Result<R, Refusal>,
{
    {
        let scope = Scope::enter(limits, false);
        pass::<T, R>(Capped::new(open()?, max_bytes, what), &scope, what)?;
    }
    let scope = Scope::enter(limits, true);
    pass(Capped::new(open()?, max_bytes, what), &scope, what)
}

fn pass<T: DeserializeOwned, R: Read>(reader: Capped<R>, scope: &Scope, what: &str) -> Result<T, Refusal> {
    let mut de = serde_json::Deserializer::from_reader(BufReader::with_capacity(READ_AHEAD, reader));
    let value = T::deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    value.map_err(|e| {
        scope.refusal().unwrap_or_else(|| {
            if e.is_io() {
                // Not a limit, so the source failed: a zstd frame that does not decode.
                return Refusal::new(Reason::BadPayload, format!("{what} does not decode: {e}"));
            }
            // Path errors surface through serde as custom messages; give them their own reason.
            let msg = e.to_string();
            let reason = if msg.starts_with("path ") { Reason::BadPath } else { Reason::Malformed };
            Refusal::new(reason, format!("{what} is not valid: {msg}"))
        })
    })
}

/// A zstd decoder for a JSON frame (an inventory payload or a body) allowed a window of at most
/// [`MAX_WINDOW_LOG`], reading one frame only.
///
/// # Errors
/// `bad-payload` when zstd cannot start.
pub fn zstd_json(frame: &[u8]) -> Result<impl Read + '_, Refusal> {
    let bad = |e: io::Error| Refusal::new(Reason::BadPayload, format!("not a zstd frame: {e}"));
    let mut dec = zstd::stream::read::Decoder::with_buffer(frame).map_err(bad)?;
    dec.window_log_max(MAX_WINDOW_LOG).map_err(bad)?;
    Ok(dec.single_frame())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts what the parser pulled from the bytes, to prove a refusal did not read on.
    struct Counting<'a> {
        inner: &'a [u8],
        read: &'a std::cell::Cell<usize>,
    }

    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.set(self.read.get() + n);
            Ok(n)
        }
    }

    #[derive(Deserialize, Debug)]
    #[serde(transparent)]
    struct Entries(#[serde(deserialize_with = "entries")] Vec<u32>);

    fn entries<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        seq(d, List::Inventory)
    }

    fn decode_counting(json: &[u8], limits: &Limits) -> (Result<Entries, Refusal>, usize) {
        let read = std::cell::Cell::new(0);
        let r = decode(|| Ok(Counting { inner: json, read: &read }), u64::MAX, limits, "test list");
        (r, read.get())
    }

    #[test]
    fn a_list_over_its_limit_is_refused_at_the_first_element_too_many() {
        let limits = Limits { max_inventory_entries: 1000, ..Limits::default() };
        let at_limit = format!("[{}0]", "0,".repeat(999));
        assert_eq!(decode_counting(at_limit.as_bytes(), &limits).0.unwrap().0.len(), 1000);
        // Ten million entries: refused after the 1001st, having read little more than 2,000 bytes of 20 MB.
        let huge = format!("[{}0]", "0,".repeat(10_000_000));
        let (r, read) = decode_counting(huge.as_bytes(), &limits);
        let err = r.unwrap_err();
        assert_eq!(err.reason, Reason::Limit, "{err}");
        assert!(err.detail.contains("more than 1000 inventory entries"), "{err}");
        assert!(read <= 2002 + READ_AHEAD, "read {read} bytes");
    }

    #[test]
    fn the_counting_pass_keeps_nothing() {
        let limits = Limits { max_inventory_entries: 10, ..Limits::default() };
        let _scope = Scope::enter(&limits, false);
        let mut de = serde_json::Deserializer::from_str("[1,2,3]");
        assert!(Entries::deserialize(&mut de).unwrap().0.is_empty());
    }

    #[test]
    fn outside_a_bounded_decode_a_list_is_read_whole() {
        let json = format!("[{}0]", "0,".repeat(3000));
        assert_eq!(serde_json::from_str::<Entries>(&json).unwrap().0.len(), 3001);
    }

    #[test]
    fn a_huge_element_or_whitespace_run_is_cut_off() {
        let limits = Limits::default();
        for huge in [
            format!("[\"{}\"]", "a".repeat(10 << 20)),
            format!("[1,{}2]", " ".repeat(10 << 20)),
            format!("{}[1]", " ".repeat(10 << 20)),
        ] {
            let (r, read) = decode_counting(huge.as_bytes(), &limits);
            let err = r.unwrap_err();
            assert_eq!(err.reason, Reason::Limit, "{err}");
            // The element bound plus a few buffers of read-ahead: not the 10 MiB.
            assert!(read as u64 <= MAX_ELEMENT_BYTES + 6 * READ_AHEAD as u64, "read {read} bytes of {}", &huge[..12]);
        }
        // Many elements of honest size add up to any length.
        let long = format!("[{}0]", format!("{}1,", " ".repeat(1000)).repeat(20_000));
        assert_eq!(decode_counting(long.as_bytes(), &limits).0.unwrap().0.len(), 20_001);
    }

    #[test]
    fn a_capped_reader_stops_one_byte_past_its_limit() {
        let data = vec![b' '; 100_000];
        let read = std::cell::Cell::new(0);
        let mut capped = Capped::new(Counting { inner: &data, read: &read }, 1000, "test bytes");
        let mut out = Vec::new();
        let err = capped.read_to_end(&mut out).unwrap_err();
        assert!(err.to_string().contains("larger than 1000 bytes"), "{err}");
        assert_eq!(read.get(), 1001);
        let mut exact = Capped::new(&data[..1000], 1000, "test bytes");
        assert_eq!(exact.read_to_end(&mut Vec::new()).unwrap(), 1000);
    }

    #[test]
    fn a_json_frame_may_not_ask_for_a_large_window() {
        let json = format!("[{}0]", "0,".repeat(6 << 20));
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        c.window_log(MAX_WINDOW_LOG + 2).unwrap();
        let big = c.compress(json.as_bytes()).unwrap();
        let mut out = Vec::new();
        assert!(zstd_json(&big).unwrap().read_to_end(&mut out).is_err(), "a 32 MiB window is refused");
        let usual = zstd::bulk::compress(json.as_bytes(), 19).unwrap();
        out.clear();
        zstd_json(&usual).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, json.as_bytes());
    }
}
