//! Arbitrary bytes as an (already authenticated) control part: decoding checks versions, paths, modes and
//! limits, and must refuse or accept without panicking. Whatever it accepts re-encodes to JSON that decodes
//! to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailferry::limits::Limits;
use mailferry::protocol::{self, Control};
use std::collections::BTreeMap;

fuzz_target!(|bytes: &[u8]| {
    let limits = Limits::default();
    let Ok(control) = protocol::decode_control(bytes, &limits) else { return };
    let again = match &control {
        Control::Request(r) => protocol::encode(r),
        Control::Reply(r) => protocol::encode(r.as_ref()),
        Control::Receipt(r) => protocol::encode(r),
    };
    assert_eq!(protocol::decode_control(&again, &limits).expect("re-encoded control decodes"), control);
    // A request's inventory payload, fed the same bytes as its attachment: refused or read, never a panic.
    if let Control::Request(r) = &control
        && let Some(p) = &r.inventory_payload
    {
        let _ = protocol::open_inventory(r, &BTreeMap::from([(p.id.clone(), bytes.to_vec())]), &limits);
    }
});
