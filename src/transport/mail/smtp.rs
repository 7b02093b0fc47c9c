//! Outgoing mail: submits finished messages to the configured SMTP server with lettre.
//!
//! The caller hands over the exact bytes of an RFC 5322 message plus the envelope addresses; this module
//! never builds, parses or rewrites messages. It maps every failure onto a [`TransportErrorKind`] a retry
//! policy can act on, and bounds every network wait with a timeout.

use std::time::Duration;

use lettre::address::{Address, Envelope};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Tls, TlsParameters};
use lettre::transport::smtp::commands::Ehlo;
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Tokio1Executor};

use super::config::{AuthMechanism, ConfigError, Endpoint, Security, SmtpConfig};
use super::tls;
use crate::transport::{TransportError, TransportErrorKind};

/// The slowest upload rate a send is allowed before it times out, on top of the configured `timeout`:
/// a 10 MB message may take `timeout` + 320 s.
const MIN_UPLOAD_BYTES_PER_SEC: u64 = 32 * 1024;

/// SMTP reply codes that mean the credentials were refused (RFC 4954): authentication required,
/// mechanism too weak, credentials invalid, encryption required for the mechanism.
const AUTH_REFUSED_CODES: [u16; 4] = [530, 534, 535, 538];

/// Submits messages to one SMTP server, reusing connections between sends.
pub struct SmtpSender {
    endpoint: Endpoint,
    /// Built at the first send, so the password is read at connect time; dropped after an
    /// authentication failure so that a rotated password is picked up on the next try.
    transport: Option<AsyncSmtpTransport<Tokio1Executor>>,
    /// The server's `SIZE` limit once learned with [`SmtpSender::size_limit`]; `Some(None)` if it has none.
    size_limit: Option<Option<u64>>,
}

impl std::fmt::Debug for SmtpSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSender")
            .field("endpoint", &self.endpoint)
            .field("connected", &self.transport.is_some())
            .field("size_limit", &self.size_limit)
            .finish()
    }
}

impl SmtpSender {
    /// Checks `config`; does not connect.
    ///
    /// # Errors
    /// The settings are unusable (see [`SmtpConfig::endpoint`]).
    pub fn new(config: &SmtpConfig) -> Result<Self, ConfigError> {
        Ok(SmtpSender { endpoint: config.endpoint()?, transport: None, size_limit: None })
    }

    /// The checked server settings.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Submits `raw` unchanged, with envelope sender `from` and the single recipient `to`.
    ///
    /// If the server's `SIZE` limit is already known (see [`SmtpSender::size_limit`]), a message over it is
    /// refused before anything is uploaded.
    ///
    /// # Errors
    /// - [`TransportErrorKind::Auth`]: the server refused the credentials, or the secret could not be read.
    /// - [`TransportErrorKind::TooLarge`]: over the server's `SIZE`, or a 552 reply (`552 5.3.4 message
    ///   file too big`).
    /// - [`TransportErrorKind::Permanent`]: another 5xx reply (the server's text is included), an invalid
    ///   address, a certificate that does not verify.
    /// - [`TransportErrorKind::Transient`]: a 4xx reply, a refused or dropped connection, a timeout.
    pub async fn send(&mut self, from: &str, to: &str, raw: &[u8]) -> Result<(), TransportError> {
        self.send_to(from, &[to], raw).await
    }

    /// As [`SmtpSender::send`], to several envelope recipients in one transaction.
    ///
    /// # Errors
    /// As [`SmtpSender::send`].
    pub async fn send_to(&mut self, from: &str, to: &[&str], raw: &[u8]) -> Result<(), TransportError> {
        let to_text = to.join(", ");
        let what =
            format!("smtp send from {from} to {to_text} via {} as {}", self.endpoint.addr(), self.endpoint.username);
        let envelope = envelope(from, to).map_err(|e| TransportError::new(TransportErrorKind::Permanent, &what, e))?;
        if let Some(Some(limit)) = self.size_limit
            && raw.len() as u64 > limit
        {
            return Err(TransportError::new(
                TransportErrorKind::TooLarge,
                &what,
                anyhow::anyhow!("message of {} bytes exceeds the server's SIZE limit of {limit} bytes", raw.len()),
            ));
        }
        let transport = match &self.transport {
            Some(t) => t.clone(),
            None => {
                let t = self.build().await?;
                // Tokens expire, so XOAUTH2 fetches a fresh one for every send instead of keeping it.
                if self.endpoint.auth != AuthMechanism::Xoauth2 {
                    self.transport = Some(t.clone());
                }
                t
            }
        };
        let limit = self.endpoint.timeout + Duration::from_secs(raw.len() as u64 / MIN_UPLOAD_BYTES_PER_SEC);
        let res = match tokio::time::timeout(limit, transport.send_raw(&envelope, raw)).await {
            Ok(res) => res,
            Err(_) => {
                // The pooled connection is in an unknown state after an abandoned send.
                self.transport = None;
                return Err(TransportError::new(
                    TransportErrorKind::Transient,
                    what,
                    anyhow::anyhow!("no answer within {}s", limit.as_secs()),
                ));
            }
        };
        match res {
            Ok(_) => Ok(()),
            Err(e) => {
                let kind = classify(&e);
                if kind == TransportErrorKind::Auth {
                    self.transport = None;
                    let what = format!("smtp login to {} as {} refused", self.endpoint.addr(), self.endpoint.username);
                    return Err(TransportError::new(kind, what, e));
                }
                if !matches!(kind, TransportErrorKind::Permanent | TransportErrorKind::TooLarge) {
                    self.transport = None;
                }
                Err(TransportError::new(kind, what, e))
            }
        }
    }

    /// The server's message size limit from its EHLO `SIZE` keyword, or `None` if it announces none.
    ///
    /// lettre's `ServerInfo` does not keep `SIZE`, so the first call opens a separate connection (TLS as
    /// configured, no login), sends EHLO and reads the reply; the answer is cached afterwards.
    ///
    /// # Errors
    /// The server cannot be reached or TLS fails ([`TransportErrorKind::Transient`] or `Permanent`).
    pub async fn size_limit(&mut self) -> Result<Option<u64>, TransportError> {
        if let Some(known) = self.size_limit {
            return Ok(known);
        }
        let what = format!("smtp EHLO to {} to learn its SIZE limit", self.endpoint.addr());
        let fut = probe_size(&self.endpoint, &what);
        let limit = match tokio::time::timeout(self.endpoint.timeout * 3, fut).await {
            Ok(res) => res?,
            Err(_) => {
                return Err(TransportError::new(
                    TransportErrorKind::Transient,
                    what,
                    anyhow::anyhow!("no answer within {}s", (self.endpoint.timeout * 3).as_secs()),
                ));
            }
        };
        self.size_limit = Some(limit);
        Ok(limit)
    }

    /// Connects, secures the connection as configured, logs in and sends NOOP, once, as
    /// `msmtp --serverinfo` does (`mailferry check`). Returns what the server showed, for a person.
    ///
    /// # Errors
    /// As [`SmtpSender::send`]: `Auth` for refused credentials, `Permanent` for a certificate that does not
    /// verify, `Transient` for a server that cannot be reached.
    pub async fn probe(&mut self) -> Result<String, TransportError> {
        let limit = self.size_limit().await?;
        let what = format!("smtp login to {} as {}", self.endpoint.addr(), self.endpoint.username);
        let transport = self.build().await?;
        let res = tokio::time::timeout(self.endpoint.timeout * 3, transport.test_connection()).await;
        match res {
            Err(_) => Err(TransportError::new(
                TransportErrorKind::Transient,
                what,
                anyhow::anyhow!("no answer within {}s", (self.endpoint.timeout * 3).as_secs()),
            )),
            Ok(Err(e)) => {
                let kind = classify(&e);
                let what = if kind == TransportErrorKind::Auth { format!("{what} refused") } else { what };
                Err(TransportError::new(kind, what, e))
            }
            Ok(Ok(false)) => Err(TransportError::new(
                TransportErrorKind::Transient,
                what,
                anyhow::anyhow!("the server did not answer NOOP"),
            )),
            Ok(Ok(true)) => {
                let security = match self.endpoint.security {
                    Security::Starttls => "STARTTLS",
                    Security::Tls => "TLS",
                    Security::None => "no encryption",
                };
                let size = limit.map_or_else(|| "no SIZE limit".to_owned(), |n| format!("SIZE {n}"));
                Ok(format!("logged in ({security}, {}, {size})", self.endpoint.auth.as_str()))
            }
        }
    }

    async fn build(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, TransportError> {
        let ep = &self.endpoint;
        let secret = ep.secret.read().await.map_err(|e| {
            TransportError::new(
                TransportErrorKind::Auth,
                format!("smtp credentials for {} at {}", ep.username, ep.addr()),
                e,
            )
        })?;
        let tls = self.tls()?;
        let mechanism = match ep.auth {
            AuthMechanism::Plain => Mechanism::Plain,
            AuthMechanism::Login => Mechanism::Login,
            AuthMechanism::Xoauth2 => Mechanism::Xoauth2,
        };
        Ok(AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(ep.host.as_str())
            .port(ep.port)
            .timeout(Some(ep.timeout))
            .tls(tls)
            .credentials(Credentials::new(ep.username.clone(), secret.expose().to_string()))
            .authentication(vec![mechanism])
            .build())
    }

    fn tls(&self) -> Result<Tls, TransportError> {
        let params = || -> Result<TlsParameters, TransportError> {
            tls::lettre_parameters(&self.endpoint).map_err(|e| {
                TransportError::new(
                    TransportErrorKind::Permanent,
                    format!("smtp TLS setup for {}", self.endpoint.addr()),
                    e,
                )
            })
        };
        Ok(match self.endpoint.security {
            Security::Starttls => Tls::Required(params()?),
            Security::Tls => Tls::Wrapper(params()?),
            Security::None => Tls::None,
        })
    }
}

async fn probe_size(ep: &Endpoint, what: &str) -> Result<Option<u64>, TransportError> {
    let hello = ClientId::default();
    let smtp_err = |e: lettre::transport::smtp::Error| TransportError::new(classify(&e), what, e);
    let params = || tls::lettre_parameters(ep).map_err(|e| TransportError::new(TransportErrorKind::Permanent, what, e));
    let wrapper = match ep.security {
        Security::Tls => Some(params()?),
        Security::Starttls | Security::None => None,
    };
    let mut conn =
        AsyncSmtpConnection::connect_tokio1((ep.host.as_str(), ep.port), Some(ep.timeout), &hello, wrapper, None)
            .await
            .map_err(smtp_err)?;
    if ep.security == Security::Starttls {
        conn.starttls(params()?, &hello).await.map_err(smtp_err)?;
    }
    let reply = conn.command(Ehlo::new(hello)).await.map_err(smtp_err)?;
    let limit = parse_size(reply.message());
    // The answer is already known; a failed QUIT changes nothing.
    let _ = conn.quit().await;
    Ok(limit)
}

/// Reads the `SIZE n` keyword from EHLO reply lines; `SIZE 0` or a bare `SIZE` means no fixed limit.
fn parse_size<'a>(lines: impl Iterator<Item = &'a str>) -> Option<u64> {
    lines
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            if !words.next()?.eq_ignore_ascii_case("SIZE") {
                return None;
            }
            words.next()?.parse::<u64>().ok().filter(|n| *n > 0)
        })
        .next()
}

fn envelope(from: &str, to: &[&str]) -> anyhow::Result<Envelope> {
    let from: Address = from.parse().map_err(|e| anyhow::anyhow!("invalid sender address `{from}`: {e}"))?;
    let to = to
        .iter()
        .map(|t| t.parse::<Address>().map_err(|e| anyhow::anyhow!("invalid recipient address `{t}`: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Envelope::new(Some(from), to)?)
}

/// Maps a lettre error onto what a retry policy needs to know.
fn classify(e: &lettre::transport::smtp::Error) -> TransportErrorKind {
    if let Some(code) = e.status() {
        let n = u16::from(code);
        return if AUTH_REFUSED_CODES.contains(&n) {
            TransportErrorKind::Auth
        } else if n == 552 {
            // "Requested mail action aborted: exceeded storage allocation": in practice, too big.
            TransportErrorKind::TooLarge
        } else if e.is_permanent() {
            TransportErrorKind::Permanent
        } else {
            TransportErrorKind::Transient
        };
    }
    let text = format!("{e:#}");
    if e.is_client() && text.contains("authentication mechanism") {
        // The server offers none of the configured mechanisms: a configuration problem.
        return TransportErrorKind::Auth;
    }
    if tls::is_certificate_error(e) {
        return TransportErrorKind::Permanent;
    }
    if e.is_client() && text.contains("STARTTLS is not supported") {
        // security = "starttls" against a server without STARTTLS: never fall back to plain text.
        return TransportErrorKind::Permanent;
    }
    TransportErrorKind::Transient
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_keyword() {
        let lines = ["mx.example.org", "PIPELINING", "SIZE 10485760", "AUTH PLAIN LOGIN"];
        assert_eq!(parse_size(lines.into_iter()), Some(10_485_760));
        assert_eq!(parse_size(["mx", "SIZE"].into_iter()), None);
        assert_eq!(parse_size(["mx", "SIZE 0"].into_iter()), None);
        assert_eq!(parse_size(["mx", "8BITMIME"].into_iter()), None);
    }

    #[test]
    fn envelope_addresses_are_checked() {
        assert!(envelope("a@example.org", &["b@example.org"]).is_ok());
        assert_eq!(envelope("a@example.org", &["b@example.org", "c@example.org"]).unwrap().to().len(), 2);
        let err = envelope("not an address", &["b@example.org"]).unwrap_err().to_string();
        assert!(err.contains("invalid sender address `not an address`"), "{err}");
        let err = envelope("a@example.org", &[""]).unwrap_err().to_string();
        assert!(err.contains("invalid recipient address"), "{err}");
    }
}
