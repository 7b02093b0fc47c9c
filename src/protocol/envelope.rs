//! MIME envelopes: turning control, auth and payload bytes into a mail message and back.
//!
//! Building uses mail-builder; reading uses mail-parser and returns the *decoded* bytes of each named
//! attachment, which is all that is ever authenticated. Relays may re-encode, re-wrap, refold, tag the
//! subject or append a footer part; none of that changes decoded attachment bytes, so none of it matters.
//! Headers are returned only as hints for logs ([`Hints`]).
//!
//! Pure: bytes in, bytes out.

use std::collections::BTreeMap;

use mail_builder::MessageBuilder;
use mail_builder::headers::raw::Raw;
use mail_parser::{MessageParser, MimeHeaders, PartType};

use super::{Kind, Reason, Refusal};

/// File name of the control attachment.
pub const CONTROL_NAME: &str = "control.json";
/// File name of the auth attachment.
pub const AUTH_NAME: &str = "auth.json";
/// Header that marks a message as mailferry's, so that filters and IMAP searches can find it. A hint only.
pub const MARKER_HEADER: &str = "X-Mailferry";

const CONTROL_TYPE: &str = "application/vnd.mailferry.control+json";
const AUTH_TYPE: &str = "application/vnd.mailferry.auth+json";
const PAYLOAD_TYPE: &str = "application/octet-stream";

/// Everything needed to write one message.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// Envelope and header sender address.
    pub from: &'a str,
    /// Envelope and header recipient address.
    pub to: &'a str,
    /// Subject line, for humans.
    pub subject: String,
    /// Human-readable text part.
    pub text: String,
    /// What the message is (goes into the marker header).
    pub kind: Kind,
    /// Canonical control bytes.
    pub control: &'a [u8],
    /// Auth part bytes.
    pub auth: &'a [u8],
    /// Payload attachments by id.
    pub payloads: Vec<(&'a str, &'a [u8])>,
}

/// Writes `msg` as an RFC 5322 message.
///
/// # Errors
/// Only if writing to memory fails, which it does not.
pub fn build(msg: &Outgoing<'_>) -> std::io::Result<Vec<u8>> {
    let mut b = MessageBuilder::new()
        .from(msg.from)
        .to(msg.to)
        .subject(msg.subject.as_str())
        .header(MARKER_HEADER, Raw::new(format!("{} {}", super::VERSION, msg.kind)))
        .text_body(msg.text.as_str())
        .attachment(CONTROL_TYPE, CONTROL_NAME, msg.control)
        .attachment(AUTH_TYPE, AUTH_NAME, msg.auth);
    for (id, bytes) in &msg.payloads {
        b = b.attachment(PAYLOAD_TYPE, *id, *bytes);
    }
    b.write_to_vec()
}

/// Room in a message for everything but the payload and the control part: headers, the text part, the
/// auth part and MIME structure, with margin (relays add headers too, but limits apply as submitted).
const MESSAGE_OVERHEAD: u64 = 8 * 1024;

/// The largest payload chunk that fits a message of at most `limit` bytes next to a control part of
/// `control_len` bytes. Payloads are base64 in lines of 76 characters plus CRLF: 57 bytes take 78.
pub fn chunk_size(limit: u64, control_len: usize) -> u64 {
    // The control part may itself be base64-encoded: budget for that.
    let control = (control_len as u64).div_ceil(57) * 78;
    let room = limit.saturating_sub(MESSAGE_OVERHEAD + control);
    (room / 78 * 57).max(1024)
}

/// Untrusted header values, recorded when a message is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hints {
    /// The `From` address as written.
    pub from: Option<String>,
    /// The `Message-ID`.
    pub message_id: Option<String>,
    /// The `Subject`.
    pub subject: Option<String>,
}

/// The attachments of a message, decoded.
#[derive(Debug)]
pub struct Parsed {
    /// Decoded control bytes.
    pub control: Vec<u8>,
    /// Decoded auth bytes.
    pub auth: Vec<u8>,
    /// Every other named attachment, by file name.
    pub attachments: BTreeMap<String, Vec<u8>>,
    /// Header hints.
    pub hints: Hints,
}

/// Reads only the header hints of `raw`, for logging a message that cannot be parsed further.
pub fn hints(raw: &[u8]) -> Hints {
    let end = raw.len().min(64 * 1024);
    MessageParser::default().parse_headers(&raw[..end]).map(|m| hints_of(&m)).unwrap_or_default()
}

fn hints_of(m: &mail_parser::Message<'_>) -> Hints {
    Hints {
        from: m.from().and_then(|a| a.first()).and_then(|a| a.address()).map(str::to_owned),
        message_id: m.message_id().map(str::to_owned),
        subject: m.subject().map(str::to_owned),
    }
}

/// Parses `raw` and extracts its named attachments.
///
/// # Errors
/// [`Reason::Limit`] when `raw` is larger than `max_bytes` (checked before parsing), [`Reason::Malformed`]
/// when the control or auth part is missing or present twice, or an attachment name repeats.
pub fn parse(raw: &[u8], max_bytes: u64) -> Result<Parsed, Refusal> {
    if raw.len() as u64 > max_bytes {
        return Err(Refusal::new(Reason::Limit, format!("message is {} bytes, limit is {max_bytes}", raw.len())));
    }
    let msg =
        MessageParser::default().parse(raw).ok_or_else(|| Refusal::new(Reason::Malformed, "not a MIME message"))?;
    let mut control = None;
    let mut auth = None;
    let mut attachments = BTreeMap::new();
    for part in &msg.parts {
        let bytes = match &part.body {
            PartType::Binary(b) | PartType::InlineBinary(b) => b.as_ref(),
            PartType::Text(t) | PartType::Html(t) => t.as_bytes(),
            // Containers carry nothing themselves; a nested message is not ours to open.
            PartType::Multipart(_) | PartType::Message(_) => continue,
        };
        // Parts without a file name are text for humans (our summary, a list footer): ignored.
        let Some(name) = part.attachment_name() else { continue };
        // A decoder that meets a byte outside the encoding's alphabet gives up; relays never produce
        // that, corruption does. Say so rather than hand on undecoded bytes.
        if part.is_encoding_problem {
            return Err(Refusal::new(Reason::Malformed, format!("attachment {name:?} is not validly encoded")));
        }
        let slot = match name {
            CONTROL_NAME => &mut control,
            AUTH_NAME => &mut auth,
            other => {
                if attachments.insert(other.to_owned(), bytes.to_vec()).is_some() {
                    return Err(Refusal::new(Reason::Malformed, format!("attachment {other:?} appears twice")));
                }
                continue;
            }
        };
        if slot.replace(bytes.to_vec()).is_some() {
            return Err(Refusal::new(Reason::Malformed, format!("attachment {name:?} appears twice")));
        }
    }
    let hints = hints_of(&msg);
    let control =
        control.ok_or_else(|| Refusal::new(Reason::Malformed, "no control part (not a mailferry message)"))?;
    let auth = auth.ok_or_else(|| Refusal::new(Reason::Malformed, "no auth part"))?;
    Ok(Parsed { control, auth, attachments, hints })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(payload: &[u8]) -> Vec<u8> {
        build(&Outgoing {
            from: "owner@example.org",
            to: "site1@example.org",
            subject: "mailferry update".into(),
            text: "An update.".into(),
            kind: Kind::Reply,
            control: br#"{"mailferry":1,"type":"reply"}"#,
            auth: br#"{"mailferry":1}"#,
            payloads: vec![("p1.zst", payload)],
        })
        .unwrap()
    }

    #[test]
    fn binary_payloads_survive_exactly() {
        let payload: Vec<u8> =
            (0..=255u8).cycle().take(100_000).chain(b"\r\n.\r\nFrom x\n\0".iter().copied()).collect();
        let raw = sample(&payload);
        let parsed = parse(&raw, u64::MAX).unwrap();
        assert_eq!(parsed.control, br#"{"mailferry":1,"type":"reply"}"#);
        assert_eq!(parsed.auth, br#"{"mailferry":1}"#);
        assert_eq!(parsed.attachments["p1.zst"], payload);
        assert_eq!(parsed.hints.from.as_deref(), Some("owner@example.org"));
        assert!(String::from_utf8_lossy(&raw).contains("X-Mailferry: 1 reply"));
    }

    #[test]
    fn refuses_corrupt_transfer_encoding() {
        let raw = sample(&[7u8; 3000]);
        let at = raw.windows(6).position(|w| w == b"p1.zst").unwrap();
        let body = at + raw[at..].windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let mut bad = raw.clone();
        let nl = body + bad[body..].iter().position(|&b| b == b'\n').unwrap();
        bad[nl] = 0x0b;
        assert_eq!(parse(&bad, u64::MAX).unwrap_err().reason, Reason::Malformed);
    }

    #[test]
    fn chunks_fit_the_limit_once_encoded() {
        let control = vec![b'x'; 3000];
        for limit in [65_536u64, 1_000_000, 10_240_000] {
            let chunk = chunk_size(limit, control.len());
            let payload = vec![0xa5u8; chunk as usize];
            let raw = build(&Outgoing {
                from: "owner@example.org",
                to: "site1@example.org",
                subject: "mailferry: generation 12 for site1 (3 changes, part 1 of 9)".into(),
                text: "An update, in several words of explanation for the human reader.\n".repeat(4),
                kind: Kind::Reply,
                control: &control,
                auth: &[b'a'; 240],
                payloads: vec![("pack-0001.bin", &payload)],
            })
            .unwrap();
            assert!(raw.len() as u64 <= limit, "{} > {limit}", raw.len());
            assert!(raw.len() as u64 > limit * 9 / 10, "{} wastes room under {limit}", raw.len());
        }
    }

    #[test]
    fn refuses_oversize_and_non_mailferry_mail() {
        let raw = sample(b"x");
        assert_eq!(parse(&raw, 100).unwrap_err().reason, Reason::Limit);
        let plain = b"From: a@b\r\nSubject: hi\r\n\r\nhello\r\n";
        assert_eq!(parse(plain, u64::MAX).unwrap_err().reason, Reason::Malformed);
        assert_eq!(hints(plain).subject.as_deref(), Some("hi"));
    }
}
