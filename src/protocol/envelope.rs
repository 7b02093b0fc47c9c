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
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::{BodyPart, MimePart};
use mail_parser::{Encoding, MessageParser, MimeHeaders, PartType};

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

/// The header that carries a sent message's delivery token: 32 random hex digits the sender keeps, which a
/// genuine delivery report quotes back with the rest of the original headers. Relays and readers of the
/// mailbox that only saw a `Message-ID` (in a log, a `References` header) cannot forge a report with it.
pub const TOKEN_HEADER: &str = "X-Mailferry-Token";

/// What [`build_with`] sets beyond [`Outgoing`]: headers that mail-builder would otherwise make up.
#[derive(Debug, Clone, Default)]
pub struct Envelope<'a> {
    /// The `Message-ID` (without angle brackets); made up when `None`.
    pub message_id: Option<&'a str>,
    /// The `Date`, in seconds since the Unix epoch; now when `None`.
    pub date: Option<u64>,
    /// The delivery token ([`TOKEN_HEADER`]).
    pub token: Option<&'a str>,
    /// The MIME boundary; made up when `None`.
    pub boundary: Option<&'a str>,
}

/// Writes `msg` as an RFC 5322 message.
///
/// # Errors
/// Only if writing to memory fails, which it does not.
pub fn build(msg: &Outgoing<'_>) -> std::io::Result<Vec<u8>> {
    build_with(msg, &Envelope::default())
}

/// [`build`] with the given `Message-ID`, `Date` and delivery token.
///
/// # Errors
/// Only if writing to memory fails, which it does not.
pub fn build_with(msg: &Outgoing<'_>, env: &Envelope<'_>) -> std::io::Result<Vec<u8>> {
    let mut b = MessageBuilder::new();
    if let Some(id) = env.message_id {
        b = b.message_id(id.to_owned());
    }
    if let Some(date) = env.date {
        b = b.date(i64::try_from(date).unwrap_or(i64::MAX));
    }
    if let Some(token) = env.token {
        b = b.header(TOKEN_HEADER, Raw::new(token.to_owned()));
    }
    // The structure mail-builder makes of a text body and attachments, written out so that the boundary
    // can be given (mail-builder makes one up from the clock otherwise).
    let mut parts = vec![
        MimePart::new("text/plain", BodyPart::Text(msg.text.as_str().into())),
        MimePart::new(CONTROL_TYPE, msg.control).attachment(CONTROL_NAME),
        MimePart::new(AUTH_TYPE, msg.auth).attachment(AUTH_NAME),
    ];
    for (id, bytes) in &msg.payloads {
        parts.push(MimePart::new(PAYLOAD_TYPE, *bytes).attachment(*id));
    }
    let mixed = match env.boundary {
        Some(boundary) => ContentType::new("multipart/mixed").attribute("boundary", boundary),
        None => ContentType::new("multipart/mixed"),
    };
    b.from(msg.from)
        .to(msg.to)
        .subject(msg.subject.as_str())
        .header(MARKER_HEADER, Raw::new(format!("{} {}", super::VERSION, msg.kind)))
        .body(MimePart::new(mixed, parts))
        .write_to_vec()
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

/// Most header fields, and most MIME parts, a message may have room for: at most this many `:` bytes and
/// this many `--` pairs. A mailferry message has a few dozen of each (its attachments are base64, which
/// has neither); the parser's memory grows with both, about 150 bytes per header or part, before anything
/// is authenticated.
pub const MAX_STRUCTURE: usize = 20_000;

/// Refuses a message whose raw bytes could make the MIME parser build more than [`MAX_STRUCTURE`] header
/// fields or parts: every header field needs a `:`, and every boundary a `--`, so counting those bounds
/// both without parsing.
fn check_structure(raw: &[u8]) -> Result<(), Refusal> {
    let (mut colons, mut dashes, mut last) = (0usize, 0usize, 0u8);
    for &b in raw {
        colons += usize::from(b == b':');
        dashes += usize::from(b == b'-' && last == b'-');
        last = b;
    }
    if colons > MAX_STRUCTURE || dashes > MAX_STRUCTURE {
        return Err(Refusal::new(
            Reason::Limit,
            format!(
                "message has room for {colons} header fields and {dashes} MIME parts, limit is {MAX_STRUCTURE} of each"
            ),
        ));
    }
    Ok(())
}

/// Parses `raw` and extracts its named attachments.
///
/// Memory: the raw message, the decoded attachments (owned, not copied again), and the parser's
/// structures, which [`MAX_STRUCTURE`] bounds to a few megabytes.
///
/// # Errors
/// [`Reason::Limit`] when `raw` is larger than `max_bytes` or has room for more than [`MAX_STRUCTURE`]
/// header fields or parts (both checked before parsing), [`Reason::Malformed`] when the control or auth
/// part is missing or present twice, or an attachment name repeats.
pub fn parse(raw: &[u8], max_bytes: u64) -> Result<Parsed, Refusal> {
    if raw.len() as u64 > max_bytes {
        return Err(Refusal::new(Reason::Limit, format!("message is {} bytes, limit is {max_bytes}", raw.len())));
    }
    check_structure(raw)?;
    let msg =
        MessageParser::default().parse(raw).ok_or_else(|| Refusal::new(Reason::Malformed, "not a MIME message"))?;
    let hints = hints_of(&msg);
    let mut control = None;
    let mut auth = None;
    let mut attachments = BTreeMap::new();
    for part in msg.parts {
        // Parts without a file name are text for humans (our summary, a list footer): ignored.
        let Some(name) = part.attachment_name().map(str::to_owned) else { continue };
        let bytes = match part.body {
            // Taken, not copied: a large attachment is in memory once decoded, not twice.
            PartType::Binary(b) | PartType::InlineBinary(b) => b.into_owned(),
            PartType::Text(t) | PartType::Html(t) => t.into_owned().into_bytes(),
            // Containers carry nothing themselves; a nested message is not ours to open.
            PartType::Multipart(_) | PartType::Message(_) => continue,
        };
        // A decoder that meets a byte outside the encoding's alphabet gives up; relays never produce
        // that, corruption does. Say so rather than hand on undecoded bytes.
        // The parser keeps a broken quoted-printable escape as it is, which would only surface as a MAC or
        // digest that does not verify: look at the raw part.
        let raw_body = raw.get(part.offset_body as usize..part.offset_end as usize).unwrap_or_default();
        if part.is_encoding_problem || (part.encoding == Encoding::QuotedPrintable && !valid_qp(raw_body)) {
            return Err(Refusal::new(Reason::Malformed, format!("attachment {name:?} is not validly encoded")));
        }
        let slot = match name.as_str() {
            CONTROL_NAME => &mut control,
            AUTH_NAME => &mut auth,
            _ => {
                if attachments.contains_key(&name) {
                    return Err(Refusal::new(Reason::Malformed, format!("attachment {name:?} appears twice")));
                }
                attachments.insert(name, bytes);
                continue;
            }
        };
        if slot.replace(bytes).is_some() {
            return Err(Refusal::new(Reason::Malformed, format!("attachment {name:?} appears twice")));
        }
    }
    let control =
        control.ok_or_else(|| Refusal::new(Reason::Malformed, "no control part (not a mailferry message)"))?;
    let auth = auth.ok_or_else(|| Refusal::new(Reason::Malformed, "no auth part"))?;
    Ok(Parsed { control, auth, attachments, hints })
}

/// Whether every `=` of a quoted-printable body starts an escape of two hex digits or a soft line break
/// (`=`, optional spaces or tabs, then the end of the line).
fn valid_qp(body: &[u8]) -> bool {
    let mut i = 0;
    while let Some(at) = body[i..].iter().position(|&b| b == b'=') {
        let rest = &body[i + at + 1..];
        let hex = rest.len() >= 2 && rest[0].is_ascii_hexdigit() && rest[1].is_ascii_hexdigit();
        let blank = rest.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
        let soft = matches!(rest.get(blank), None | Some(b'\r' | b'\n'));
        if !hex && !soft {
            return false;
        }
        i += at + 1;
    }
    true
}

/// A delivery status notification (RFC 3464): a relay's report that a message could not be delivered.
/// Nothing in it is authenticated; it can only name a message by its `Message-ID`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bounce {
    /// The `Message-ID` of the message reported on, from the report's copy of its headers.
    pub message_id: Option<String>,
    /// The delivery token ([`TOKEN_HEADER`]) of the message reported on, from the same copy.
    pub token: Option<String>,
    /// `Action` of the first recipient reported on: `failed`, `delayed`, `delivered`, ...
    pub action: Option<String>,
    /// Its `Status`, an RFC 3463 code such as `5.3.4`.
    pub status: Option<String>,
    /// Its `Diagnostic-Code`, such as `smtp; 552 5.3.4 Message size exceeds fixed limit`.
    pub diagnostic: Option<String>,
}

impl Bounce {
    /// Status and diagnostic in one line, for logs and `status`.
    pub fn summary(&self) -> String {
        format!("{} {}", self.status.as_deref().unwrap_or("(no status)"), self.diagnostic.as_deref().unwrap_or(""))
            .trim()
            .to_owned()
    }

    /// Whether delivery failed for good (as opposed to a delay or a success notice).
    pub fn failed(&self) -> bool {
        self.action.as_deref().is_some_and(|a| a.eq_ignore_ascii_case("failed"))
            || self.status.as_deref().is_some_and(|s| s.starts_with('5'))
    }

    /// Whether it failed because the message was too large for a server on the way: status 5.3.4
    /// ("message too big for system") or 5.2.3 ("message length exceeds administrative limit"), or an
    /// SMTP 552 in the diagnostic.
    pub fn too_large(&self) -> bool {
        let status = self.status.as_deref().unwrap_or("");
        let smtp_552 = self.diagnostic.as_deref().is_some_and(|d| {
            let code = d.rsplit(';').next().unwrap_or(d).trim_start();
            code.starts_with("552")
        });
        self.failed() && (status == "5.3.4" || status == "5.2.3" || smtp_552)
    }
}

/// Reads `raw` as a delivery status notification: a `multipart/report` with `report-type=delivery-status`.
/// `None` for anything else (every mailferry message is `multipart/mixed`).
pub fn bounce(raw: &[u8]) -> Option<Bounce> {
    let is_report = |m: &mail_parser::Message<'_>| {
        m.content_type().is_some_and(|ct| {
            ct.ctype().eq_ignore_ascii_case("multipart")
                && ct.subtype().is_some_and(|s| s.eq_ignore_ascii_case("report"))
                && ct.attribute("report-type").is_some_and(|t| t.eq_ignore_ascii_case("delivery-status"))
        })
    };
    // Every message is asked this first, reply parts of megabytes included: the headers decide it.
    let end = raw.len().min(64 * 1024);
    if !MessageParser::default().parse_headers(&raw[..end]).is_some_and(|m| is_report(&m)) {
        return None;
    }
    // A report is parsed whole, so it is bounded like any message.
    check_structure(raw).ok()?;
    let msg = MessageParser::default().parse(raw)?;
    if !is_report(&msg) {
        return None;
    }
    let mut b = Bounce::default();
    for part in &msg.parts {
        let Some(pct) = part.content_type() else { continue };
        let kind = (pct.ctype().to_ascii_lowercase(), pct.subtype().map(str::to_ascii_lowercase));
        match (kind.0.as_str(), kind.1.as_deref(), &part.body) {
            ("message", Some("delivery-status" | "global-delivery-status"), body) => {
                let bytes = match body {
                    PartType::Binary(b) | PartType::InlineBinary(b) => b.as_ref(),
                    PartType::Text(t) => t.as_bytes(),
                    _ => continue,
                };
                read_status_fields(&String::from_utf8_lossy(bytes), &mut b);
            }
            ("message", Some("rfc822" | "global"), PartType::Message(original)) => {
                b.message_id = b.message_id.or_else(|| original.message_id().map(str::to_owned));
                b.token = b.token.or_else(|| token_of(original));
            }
            ("text", Some("rfc822-headers" | "global-headers"), body) => {
                let bytes = match body {
                    PartType::Text(t) => t.as_bytes(),
                    PartType::Binary(b) | PartType::InlineBinary(b) => b.as_ref(),
                    _ => continue,
                };
                let headers = MessageParser::default().parse_headers(bytes);
                b.message_id = b.message_id.or_else(|| headers.as_ref()?.message_id().map(str::to_owned));
                b.token = b.token.or_else(|| token_of(headers.as_ref()?));
            }
            _ => {}
        }
    }
    Some(b)
}

/// The delivery token in a copy of a message's headers, if it has a well-formed one.
fn token_of(m: &mail_parser::Message<'_>) -> Option<String> {
    let v = m.header(TOKEN_HEADER)?.as_text()?.trim();
    (v.len() == 32 && v.bytes().all(|c| c.is_ascii_hexdigit())).then(|| v.to_ascii_lowercase())
}

/// The fields of the first per-recipient group of a `message/delivery-status` body (RFC 3464 §2.3):
/// header-style lines, groups separated by blank lines, the first group being per-message.
fn read_status_fields(text: &str, b: &mut Bounce) {
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = fields.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            fields.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    b.action = b.action.take().or_else(|| get("action"));
    b.status = b.status.take().or_else(|| get("status").map(|s| s.split_whitespace().next().unwrap_or("").to_owned()));
    b.diagnostic = b.diagnostic.take().or_else(|| get("diagnostic-code"));
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
    fn a_broken_quoted_printable_escape_is_malformed() {
        let qp = |body: &str| {
            format!(
                "From: <a@b>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
                 --b\r\nContent-Disposition: attachment; filename=\"control.json\"\r\n\
                 Content-Transfer-Encoding: quoted-printable\r\n\r\n{body}\r\n\
                 --b\r\nContent-Disposition: attachment; filename=\"auth.json\"\r\n\r\n{{}}\r\n--b--\r\n"
            )
            .into_bytes()
        };
        let good = parse(&qp("{\"a\"=3A1,=\r\n \"b\":2}=20"), u64::MAX).unwrap();
        assert_eq!(good.control, b"{\"a\":1, \"b\":2} ");
        for bad in ["{\"a\"=ZZ1}", "{\"a\"=4", "x=4g", "=\"="] {
            assert_eq!(parse(&qp(bad), u64::MAX).unwrap_err().reason, Reason::Malformed, "{bad}");
        }
    }

    #[test]
    fn a_message_with_room_for_too_many_parts_is_refused_before_parsing() {
        let raw = sample(b"x");
        let many = [raw.as_slice(), b"\r\n", &b"--".repeat(MAX_STRUCTURE + 1)].concat();
        assert_eq!(parse(&many, u64::MAX).unwrap_err().reason, Reason::Limit);
        let colons = [b"X-A: b\r\n".repeat(MAX_STRUCTURE).as_slice(), &raw].concat();
        assert_eq!(parse(&colons, u64::MAX).unwrap_err().reason, Reason::Limit);
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

    /// A report as Postfix writes it when the next hop refuses a message as too large; the original's
    /// headers only (Postfix returns headers alone for large messages).
    const POSTFIX_552: &str = "From: MAILER-DAEMON@mx-a.example.test (Mail Delivery System)\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
To: owner@example.test\r\n\
Auto-Submitted: auto-replied\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status;\r\n\
\tboundary=\"4F2A.1795393157/mx-a.example.test\"\r\n\
Message-Id: <20261123020000.4F2A@mx-a.example.test>\r\n\
\r\n\
This is a MIME-encapsulated message.\r\n\
\r\n\
--4F2A.1795393157/mx-a.example.test\r\n\
Content-Description: Notification\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
I'm sorry to have to inform you that your message could not\r\n\
be delivered to one or more recipients.\r\n\
\r\n\
--4F2A.1795393157/mx-a.example.test\r\n\
Content-Description: Delivery report\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx-a.example.test\r\n\
X-Postfix-Queue-ID: 4F2A\r\n\
Arrival-Date: Mon, 23 Nov 2026 02:00:00 +0000 (UTC)\r\n\
\r\n\
Final-Recipient: rfc822; site1@example.test\r\n\
Action: failed\r\n\
Status: 5.3.4\r\n\
Remote-MTA: dns; 127.0.0.1\r\n\
Diagnostic-Code: smtp; 552 5.3.4 Message size exceeds fixed limit\r\n\
\r\n\
--4F2A.1795393157/mx-a.example.test\r\n\
Content-Description: Undelivered Message Headers\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
From: owner@example.test\r\n\
To: site1@example.test\r\n\
Subject: mailferry: generation 2 for site1 (3 changes, part 1 of 2)\r\n\
Message-ID: <p1.0123456789abcdef0123456789abcdef@example.test>\r\n\
X-Mailferry: 1 reply\r\n\
\r\n\
--4F2A.1795393157/mx-a.example.test--\r\n";

    #[test]
    fn delivery_reports_name_the_message_and_why() {
        let b = bounce(POSTFIX_552.as_bytes()).expect("a delivery report");
        assert_eq!(b.message_id.as_deref(), Some("p1.0123456789abcdef0123456789abcdef@example.test"));
        assert_eq!(b.status.as_deref(), Some("5.3.4"));
        assert!(b.failed() && b.too_large(), "{b:?}");
        let unknown_user = POSTFIX_552
            .replace("Status: 5.3.4", "Status: 5.1.1")
            .replace("552 5.3.4 Message size exceeds fixed limit", "550 5.1.1 User unknown");
        let b = bounce(unknown_user.as_bytes()).unwrap();
        assert!(b.failed() && !b.too_large(), "{b:?}");
        let delayed =
            POSTFIX_552.replace("Action: failed", "Action: delayed").replace("Status: 5.3.4", "Status: 4.4.1");
        let b = bounce(delayed.replace("552 5.3.4", "421 4.4.1").as_bytes()).unwrap();
        assert!(!b.failed() && !b.too_large(), "{b:?}");
        // Anything that is not a delivery report, our own messages included, is not read as one.
        assert_eq!(bounce(&sample(b"x")), None);
        assert_eq!(
            bounce(
                POSTFIX_552.replace("report-type=delivery-status", "report-type=disposition-notification").as_bytes()
            ),
            None
        );
        assert_eq!(bounce(b"From: a@b\r\n\r\nhello\r\n"), None);
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
