//! Arbitrary bytes as a whole mail message: parsing (as ours and as a delivery report), the auth part and
//! the control part must never panic, and nothing may verify without the key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailferry::crypto::Key;
use mailferry::limits::Limits;
use mailferry::protocol::{self, envelope};

fuzz_target!(|raw: &[u8]| {
    let _ = envelope::hints(raw);
    if let Some(report) = envelope::bounce(raw) {
        let _ = (report.failed(), report.too_large());
    }
    let Ok(parsed) = envelope::parse(raw, 1 << 20) else { return };
    let Ok(auth) = protocol::decode_auth(&parsed.auth) else { return };
    let key = Key::from_hex(&"11".repeat(32)).unwrap();
    if protocol::verify_mac(&key, &auth, &parsed.control).is_ok() {
        // Only possible if the input carries a MAC made with this fixed key: then decoding must not panic.
        let _ = protocol::decode_control(&parsed.control, &Limits::default());
    }
});
