//! The `mail` transport (`[transport] kind = "mail"`): SMTP submission out, the node's IMAP mailbox in.
//!
//! [`MailTransport`] implements [`Transport`] on top of [`smtp::SmtpSender`] and [`imap::ImapMailbox`].
//! It moves raw messages and nothing else: it never builds, parses, verifies or interprets a message,
//! and it never fetches or moves mail that lacks the `X-Mailferry` header (or, for a delivery report,
//! does not quote one), so a mailbox shared with a person stays usable. TLS is always verified ([`tls`]); secrets are read at connect time ([`config`]).

pub mod config;
pub mod imap;
pub mod smtp;
pub mod tls;

use std::time::Duration;

pub use config::{ConfigError, ImapConfig, MailConfig, SmtpConfig};
pub use imap::Wake;

use super::{Disposition, Incoming, ReceiveMode, Transport, TransportError};

/// Outgoing SMTP plus the incoming IMAP mailbox of one node.
#[derive(Debug)]
pub struct MailTransport {
    smtp: smtp::SmtpSender,
    imap: imap::ImapMailbox,
}

impl MailTransport {
    /// Checks `config`; connects lazily at the first send or fetch.
    ///
    /// # Errors
    /// The first unusable setting, naming its table (`[smtp]` or `[imap]`).
    pub fn new(config: &MailConfig) -> Result<Self, ConfigError> {
        Ok(MailTransport { smtp: smtp::SmtpSender::new(&config.smtp)?, imap: imap::ImapMailbox::new(&config.imap)? })
    }

    /// Waits until new mail may have arrived (IMAP IDLE, or polling), at most `max`.
    ///
    /// # Errors
    /// See [`imap::ImapMailbox::wait_for_mail`].
    pub async fn wait_for_mail(&mut self, max: Duration) -> Result<Wake, TransportError> {
        self.imap.wait_for_mail(max).await
    }

    /// The SMTP server's message size limit (EHLO `SIZE`), learned once and cached.
    ///
    /// # Errors
    /// See [`smtp::SmtpSender::size_limit`].
    pub async fn size_limit(&mut self) -> Result<Option<u64>, TransportError> {
        self.smtp.size_limit().await
    }

    /// IDLE or polling, once the IMAP connection has shown what the server offers.
    pub fn receive_mode(&self) -> Option<ReceiveMode> {
        self.imap.uses_idle().map(|idle| if idle { ReceiveMode::Idle } else { ReceiveMode::Poll })
    }

    /// Closes the IMAP session politely.
    pub async fn logout(&mut self) {
        self.imap.logout().await;
    }
}

impl Transport for MailTransport {
    /// Learns the server's SIZE limit before the first send, so that a message too large for it is a
    /// permanent error (marked failed, never retried) instead of an upload the server cuts off. If the
    /// limit cannot be learned now, the send goes ahead and the server's own 552 says the same thing.
    async fn send(&mut self, from: &str, to: &str, raw: &[u8]) -> Result<(), TransportError> {
        if let Err(e) = self.smtp.size_limit().await {
            tracing::debug!(error = %e, "could not learn the SMTP SIZE limit; sending anyway");
        }
        self.smtp.send(from, to, raw).await
    }

    /// One SMTP transaction with a `RCPT TO` per address.
    async fn send_many(&mut self, from: &str, to: &[&str], raw: &[u8]) -> Result<(), TransportError> {
        if let Err(e) = self.smtp.size_limit().await {
            tracing::debug!(error = %e, "could not learn the SMTP SIZE limit; sending anyway");
        }
        self.smtp.send_to(from, to, raw).await
    }

    async fn size_limit(&mut self) -> Option<u64> {
        match self.smtp.size_limit().await {
            Ok(limit) => limit,
            Err(e) => {
                tracing::debug!(error = %e, "could not learn the SMTP SIZE limit");
                None
            }
        }
    }

    async fn fetch(&mut self) -> Result<Vec<Incoming>, TransportError> {
        self.imap.fetch().await
    }

    async fn settle(&mut self, id: &str, disposition: Disposition) -> Result<(), TransportError> {
        self.imap.settle(id, disposition).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    /// Node drivers may run the transport on a multi-threaded runtime (`tokio::spawn`).
    #[test]
    fn transport_and_its_futures_are_send() {
        let text = r#"
[smtp]
host = "127.0.0.1"
username = "u@example.test"
password-file = "/nonexistent"
[imap]
host = "127.0.0.1"
username = "u@example.test"
password-file = "/nonexistent"
"#;
        let mut t = MailTransport::new(&toml::from_str(text).unwrap()).unwrap();
        assert_send(&t);
        assert_send(&t.send("a@example.test", "b@example.test", b""));
        assert_send(&t.fetch());
        assert_send(&t.settle("1:1", Disposition::Processed));
        assert_send(&t.wait_for_mail(Duration::ZERO));
        assert_send(&t.size_limit());
    }
}
