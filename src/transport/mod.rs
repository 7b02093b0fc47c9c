//! Transports: the only code that moves mail in and out of a node.
//!
//! A transport delivers raw RFC 5322 messages to an address and hands back the messages waiting in the
//! node's own mailbox. It knows nothing about the protocol: it never parses control parts, never decides
//! whether a message is valid, and never touches the data tree or the state database. The node drivers in
//! [`crate::node`] decide what a message means and then tell the transport where to file it with
//! [`Disposition`].
//!
//! Two kinds exist:
//! - [`maildir`]: a Maildir spool shared by nodes on one machine, or carried between machines as files.
//! - [`mail`] (SMTP submission + IMAP), for nodes that talk to real mail servers.
//!
//! # Invariant
//! Every transport files a message exactly once: a message handed out by [`Transport::fetch`] stays
//! where it is until [`Transport::settle`] moves it, so a crash between the two means the message is
//! fetched again and the node's seen-store (keyed by the message's content digest) keeps it from being
//! acted on twice.

pub mod mail;
pub mod maildir;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use mail::Wake;

/// A message found in the node's mailbox, not yet trusted in any way.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Transport-specific handle used to settle the message (a Maildir file name, an IMAP UID).
    pub id: String,
    /// The raw message bytes, exactly as stored.
    pub raw: Vec<u8>,
}

/// A message waiting in the node's mailbox, listed and perhaps not read yet: a node reads one message at
/// a time, and refuses one whose size is over its limit without reading it at all.
#[derive(Debug, Clone)]
pub enum Waiting {
    /// Read already (a transport that fetches whole messages).
    Read(Incoming),
    /// Listed only; [`Transport::read`] reads it.
    Listed {
        /// As [`Incoming::id`].
        id: String,
        /// Its size in bytes, as the mailbox says (a file's length).
        size: u64,
    },
}

impl Waiting {
    /// The handle to read or settle it by.
    pub fn id(&self) -> &str {
        match self {
            Waiting::Read(m) => &m.id,
            Waiting::Listed { id, .. } => id,
        }
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Waiting::Read(m) => m.raw.len() as u64,
            Waiting::Listed { size, .. } => *size,
        }
    }
}

/// Where a handled message is filed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Understood and acted on (or a harmless duplicate): moved to the processed folder.
    Processed,
    /// Refused: moved to the rejected folder so that an operator can look at it.
    Rejected,
}

/// What went wrong, in the terms a retry policy needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportErrorKind {
    /// Worth retrying later: connection refused, timeout, SMTP 4xx.
    Transient,
    /// Credentials refused.
    Auth,
    /// Retrying the same thing will fail the same way: SMTP 5xx, bad address.
    Permanent,
    /// The message is larger than the server or a relay accepts (over the announced `SIZE`, or SMTP 552):
    /// permanent for this message, but a smaller one would pass.
    TooLarge,
    /// Local I/O on the spool or outbox failed.
    Io,
}

/// A transport failure with enough context to act on and to show to an operator.
///
/// It shows as `WHAT: CAUSE`, the cause's whole chain included once, and reports no `source()` of its
/// own: the errors of the mail crates repeat their cause in their own text (`io: Connection refused`
/// over `Connection refused`), so a chain printed link by link would say the same thing three times.
#[derive(Debug)]
pub struct TransportError {
    /// What kind of failure this is.
    pub kind: TransportErrorKind,
    /// What the transport was doing, naming the server, user, folder or path involved.
    pub what: String,
    /// The underlying cause.
    pub source: anyhow::Error,
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, cause_text(&self.source))
    }
}

impl std::error::Error for TransportError {}

/// An error's chain as one line, `a: b: c`, leaving out a link whose text the link before already holds.
pub fn cause_text(err: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for link in err.chain() {
        let text = link.to_string();
        if !last.is_empty() && last.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        last = text;
    }
    out
}

impl TransportError {
    /// Builds an error of `kind` while doing `what`.
    pub fn new(kind: TransportErrorKind, what: impl Into<String>, source: impl Into<anyhow::Error>) -> Self {
        TransportError { kind, what: what.into(), source: source.into() }
    }

    /// Local I/O failure while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        TransportError::new(TransportErrorKind::Io, what, source)
    }
}

/// The seam between the node drivers and the mail system.
///
/// Implementations must be safe to call again after any error: a failed `send` has either delivered the
/// message or not (never a partial message), a failed `settle` leaves the message where it was.
#[allow(async_fn_in_trait)]
pub trait Transport: fmt::Debug {
    /// Delivers `raw` to the mailbox of `to`, sent from `from`.
    async fn send(&mut self, from: &str, to: &str, raw: &[u8]) -> Result<(), TransportError>;

    /// Delivers one message to several envelope recipients at once (a broadcast): a mail server gets
    /// one submission with a `RCPT TO` per address and delivers a copy to each. The default sends one
    /// copy per address, as a spool does.
    async fn send_many(&mut self, from: &str, to: &[&str], raw: &[u8]) -> Result<(), TransportError> {
        for t in to {
            self.send(from, t, raw).await?;
        }
        Ok(())
    }

    /// Returns the messages waiting in this node's own mailbox, oldest first, without moving them.
    async fn fetch(&mut self) -> Result<Vec<Incoming>, TransportError>;

    /// Files a fetched message as processed or rejected.
    async fn settle(&mut self, id: &str, disposition: Disposition) -> Result<(), TransportError>;

    /// The messages waiting in this node's own mailbox, oldest first, without moving them, each read only
    /// when [`Transport::read`] is asked for it. The default fetches them all at once.
    async fn waiting(&mut self) -> Result<Vec<Waiting>, TransportError> {
        Ok(self.fetch().await?.into_iter().map(Waiting::Read).collect())
    }

    /// Reads one message that [`Transport::waiting`] listed, at most `max + 1` bytes of it (so that a
    /// message grown past the limit since it was listed is still refused by size, not read whole); `None`
    /// when it is gone (settled by a concurrent run). A transport whose `waiting` lists messages unread
    /// implements this.
    async fn read(&mut self, waiting: Waiting, max: u64) -> Result<Option<Incoming>, TransportError> {
        let _ = max;
        Ok(match waiting {
            Waiting::Read(m) => Some(m),
            Waiting::Listed { .. } => None,
        })
    }

    /// The largest message the outgoing server accepts, if it says (SMTP `SIZE`). A spool has none.
    async fn size_limit(&mut self) -> Option<u64> {
        None
    }
}

/// How a node sends and receives mail.
///
/// `kind = "maildir"` takes `root` in the `[transport]` table. `kind = "mail"` takes its settings from the
/// top-level `[smtp]` and `[imap]` tables (the layout the README documents); `[transport.smtp]` and
/// `[transport.imap]` are accepted as well, but one file may not use both spellings.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum TransportConfig {
    /// A Maildir spool: mail to address A is delivered into `root/A/`.
    Maildir {
        /// The spool directory.
        root: PathBuf,
    },
    /// SMTP submission out, the node's own IMAP mailbox in. Boxed: the settings are large.
    Mail(Box<mail::MailConfig>),
}

/// The transport a node's config selects, dispatched statically.
#[derive(Debug)]
pub enum AnyTransport {
    /// A Maildir spool.
    Maildir(maildir::MaildirTransport),
    /// SMTP submission and an IMAP mailbox.
    Mail(Box<mail::MailTransport>),
}

/// How a transport learns about new mail, for `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveMode {
    /// The spool is looked at every interval.
    Interval,
    /// IMAP IDLE: the server reports new mail as it arrives.
    Idle,
    /// IMAP polling every `poll-interval` (the server has no IDLE, or `idle = false`).
    Poll,
}

impl ReceiveMode {
    /// The word `status` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiveMode::Interval => "interval",
            ReceiveMode::Idle => "idle",
            ReceiveMode::Poll => "poll",
        }
    }
}

impl AnyTransport {
    /// Opens the transport `config` describes for the node whose own address is `own`.
    ///
    /// # Errors
    /// When the transport cannot be set up (an unusable address, an uncreatable spool).
    pub fn open(config: &TransportConfig, own: &str) -> Result<AnyTransport, TransportError> {
        match config {
            TransportConfig::Maildir { root } => Ok(AnyTransport::Maildir(maildir::MaildirTransport::new(root, own)?)),
            TransportConfig::Mail(mail) => {
                let t = mail::MailTransport::new(mail).map_err(|e| {
                    TransportError::new(TransportErrorKind::Permanent, "invalid mail transport settings", e)
                })?;
                Ok(AnyTransport::Mail(Box::new(t)))
            }
        }
    }

    /// Waits until new mail may have arrived, at most `max`: IMAP IDLE (or polling at `poll-interval`)
    /// for the mail transport, a plain sleep of `max` for a spool.
    ///
    /// # Errors
    /// The mail server could not be reached again before `max` passed, or refused the login.
    pub async fn wait_for_mail(&mut self, max: Duration) -> Result<Wake, TransportError> {
        match self {
            AnyTransport::Maildir(_) => {
                tokio::time::sleep(max).await;
                Ok(Wake::MaybeNewMail)
            }
            AnyTransport::Mail(t) => t.wait_for_mail(max).await,
        }
    }

    /// How new mail is noticed; `None` while the mail transport has not connected yet.
    pub fn receive_mode(&self) -> Option<ReceiveMode> {
        match self {
            AnyTransport::Maildir(_) => Some(ReceiveMode::Interval),
            AnyTransport::Mail(t) => t.receive_mode(),
        }
    }

    /// Whether new mail is reported by the server (IMAP) rather than found by looking at a spool.
    pub fn is_mail(&self) -> bool {
        matches!(self, AnyTransport::Mail(_))
    }

    /// Closes server connections politely (a no-op for a spool).
    pub async fn close(&mut self) {
        if let AnyTransport::Mail(t) = self {
            t.logout().await;
        }
    }
}

/// What logging in to one mail server once showed (`mailferry check`, like `msmtp --serverinfo`).
#[derive(Debug)]
pub struct ServerInfo {
    /// `smtp` or `imap`.
    pub service: &'static str,
    /// `host:port`.
    pub server: String,
    /// The login name.
    pub user: String,
    /// What the server offers, or why the login failed.
    pub result: Result<String, TransportError>,
}

/// Logs in to the SMTP and IMAP servers of `config` once each and logs out; nothing is sent or moved.
///
/// # Errors
/// Settings the transport refuses (checked again here, as `MailTransport::new` does).
pub async fn probe(config: &mail::MailConfig) -> Result<Vec<ServerInfo>, mail::ConfigError> {
    let mut smtp = mail::smtp::SmtpSender::new(&config.smtp)?;
    let mut imap = mail::imap::ImapMailbox::new(&config.imap)?;
    let (s, i) = (smtp.endpoint().clone(), imap.endpoint().clone());
    Ok(vec![
        ServerInfo { service: "smtp", server: s.addr(), user: s.username, result: smtp.probe().await },
        ServerInfo { service: "imap", server: i.addr(), user: i.username, result: imap.probe().await },
    ])
}

impl Transport for AnyTransport {
    async fn send(&mut self, from: &str, to: &str, raw: &[u8]) -> Result<(), TransportError> {
        match self {
            AnyTransport::Maildir(t) => t.send(from, to, raw).await,
            AnyTransport::Mail(t) => t.send(from, to, raw).await,
        }
    }

    async fn send_many(&mut self, from: &str, to: &[&str], raw: &[u8]) -> Result<(), TransportError> {
        match self {
            AnyTransport::Maildir(t) => t.send_many(from, to, raw).await,
            AnyTransport::Mail(t) => t.send_many(from, to, raw).await,
        }
    }

    async fn fetch(&mut self) -> Result<Vec<Incoming>, TransportError> {
        match self {
            AnyTransport::Maildir(t) => t.fetch().await,
            AnyTransport::Mail(t) => t.fetch().await,
        }
    }

    async fn settle(&mut self, id: &str, disposition: Disposition) -> Result<(), TransportError> {
        match self {
            AnyTransport::Maildir(t) => t.settle(id, disposition).await,
            AnyTransport::Mail(t) => t.settle(id, disposition).await,
        }
    }

    async fn waiting(&mut self) -> Result<Vec<Waiting>, TransportError> {
        match self {
            AnyTransport::Maildir(t) => t.waiting().await,
            AnyTransport::Mail(t) => t.waiting().await,
        }
    }

    async fn read(&mut self, waiting: Waiting, max: u64) -> Result<Option<Incoming>, TransportError> {
        match self {
            AnyTransport::Maildir(t) => t.read(waiting, max).await,
            AnyTransport::Mail(t) => t.read(waiting, max).await,
        }
    }

    async fn size_limit(&mut self) -> Option<u64> {
        match self {
            AnyTransport::Maildir(t) => t.size_limit().await,
            AnyTransport::Mail(t) => Transport::size_limit(t.as_mut()).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_is_said_once() {
        // What async-imap reports for a refused connection: its own text repeats its source's.
        #[derive(Debug, thiserror::Error)]
        #[error("io: {0}")]
        struct Io(#[source] std::io::Error);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        let e = TransportError::new(TransportErrorKind::Transient, "imap connect to 127.0.0.1:1", Io(io));
        let shown = format!("{:#}", anyhow::Error::new(e));
        assert_eq!(shown, "imap connect to 127.0.0.1:1: io: Connection refused (os error 111)");
    }
}
