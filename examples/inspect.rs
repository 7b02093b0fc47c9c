//! Shows what a mailferry message says and whether it verifies.
//!
//! ```sh
//! cargo run --example inspect -- MESSAGE.eml [KEY-FILE]
//! ```
//!
//! Prints the untrusted header hints, the auth part, the control part (pretty-printed) and the payload
//! attachments; with the recipient's key file it also checks the MAC. Nothing is applied anywhere.

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use mailferry::limits::Limits;
use mailferry::protocol::{self, envelope};

fn main() -> ExitCode {
    match run() {
        Ok(verified) => {
            if verified {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let mut args = std::env::args_os().skip(1);
    let path = args.next().context("usage: inspect MESSAGE.eml [KEY-FILE]")?;
    let raw = std::fs::read(&path).with_context(|| format!("failed to read {path:?}"))?;
    let parsed = envelope::parse(&raw, u64::MAX).map_err(anyhow::Error::msg)?;
    let h = &parsed.hints;
    println!("from (untrusted):       {}", h.from.as_deref().unwrap_or("-"));
    println!("subject (untrusted):    {}", h.subject.as_deref().unwrap_or("-"));
    println!("message-id (untrusted): {}", h.message_id.as_deref().unwrap_or("-"));
    let auth = protocol::decode_auth(&parsed.auth).map_err(anyhow::Error::msg)?;
    println!("auth: recipient {:?}, key id {}, {}", auth.recipient, auth.key_id, auth.alg);
    let control: serde_json::Value = serde_json::from_slice(&parsed.control).context("control part is not JSON")?;
    println!("control part ({} bytes):\n{}", parsed.control.len(), serde_json::to_string_pretty(&control)?);
    for (name, bytes) in &parsed.attachments {
        println!("attachment {name}: {} bytes, blake3 {}", bytes.len(), blake3::hash(bytes).to_hex());
    }
    let Some(key_file) = args.next() else {
        println!("(give the recipient's key file to check the MAC)");
        return Ok(true);
    };
    let key = mailferry::config::read_key_file(std::path::Path::new(&key_file))?;
    match protocol::verify_mac(&key, &auth, &parsed.control)
        .and_then(|()| protocol::decode_control(&parsed.control, &Limits::default()))
    {
        Ok(c) => {
            println!("MAC verifies; {} for {:?} decodes cleanly", c.kind(), c.recipient());
            Ok(true)
        }
        Err(r) => {
            println!("REFUSED: {r}");
            Ok(false)
        }
    }
}
