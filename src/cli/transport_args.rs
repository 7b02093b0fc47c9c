//! The transport options of `owner init` and `recipient init`: a Maildir spool, or SMTP and IMAP servers.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use mailferry::config::TransportConfig;
use mailferry::transport::mail::MailConfig;

/// How the new node exchanges mail: `--transport-root SPOOL`, or `--smtp-host`/`--imap-host` and a password
/// source.
#[derive(Debug, Args)]
#[group(id = "transport", required = true, multiple = true, args = ["transport_root", "smtp_host", "imap_host"])]
pub struct TransportArgs {
    /// Maildir spool root.
    #[arg(long, value_name = "SPOOL", conflicts_with_all = ["smtp_host", "imap_host"])]
    transport_root: Option<PathBuf>,
    /// SMTP submission server (kind = "mail"); the IMAP host when --imap-host is not given.
    #[arg(long, value_name = "HOST", help_heading = "Mail transport")]
    smtp_host: Option<String>,
    /// SMTP port [default: 587 for starttls, 465 for tls].
    #[arg(long, value_name = "PORT", help_heading = "Mail transport")]
    smtp_port: Option<u16>,
    /// SMTP connection security.
    #[arg(long, value_name = "MODE", default_value = "starttls", value_parser = ["starttls", "tls", "none"], help_heading = "Mail transport")]
    smtp_security: String,
    /// IMAP server holding this node's mailbox; the SMTP host when not given.
    #[arg(long, value_name = "HOST", help_heading = "Mail transport")]
    imap_host: Option<String>,
    /// IMAP port [default: 143 for starttls, 993 for tls].
    #[arg(long, value_name = "PORT", help_heading = "Mail transport")]
    imap_port: Option<u16>,
    /// IMAP connection security.
    #[arg(long, value_name = "MODE", default_value = "tls", value_parser = ["starttls", "tls", "none"], help_heading = "Mail transport")]
    imap_security: String,
    /// Login name on both servers [default: the node's mail address].
    #[arg(long, value_name = "USER", help_heading = "Mail transport")]
    mail_user: Option<String>,
    /// File holding the password for both servers (keep it mode 0600; never a password on the command line).
    #[arg(long, value_name = "FILE", conflicts_with = "password_command", help_heading = "Mail transport")]
    password_file: Option<PathBuf>,
    /// Shell command printing the password for both servers, e.g. "pass show mail/site1".
    #[arg(long, value_name = "CMD", help_heading = "Mail transport")]
    password_command: Option<String>,
}

impl TransportArgs {
    /// The `[transport]` settings these options describe, for a node whose address is `own`.
    ///
    /// # Errors
    /// Mail options without a password source, or settings the mail transport refuses.
    pub fn config(&self, own: &str) -> Result<TransportConfig> {
        if let Some(root) = &self.transport_root {
            return Ok(TransportConfig::Maildir { root: std::path::absolute(root)? });
        }
        let Some(smtp_host) = self.smtp_host.clone().or_else(|| self.imap_host.clone()) else {
            bail!("give --transport-root SPOOL, or --smtp-host/--imap-host for a mail transport");
        };
        let imap_host = self.imap_host.clone().unwrap_or_else(|| smtp_host.clone());
        let secret = match (&self.password_file, &self.password_command) {
            (Some(f), None) => {
                let f = std::path::absolute(f)?;
                ("password-file", toml::Value::String(f.to_string_lossy().into_owned()))
            }
            (None, Some(c)) => ("password-command", toml::Value::String(c.clone())),
            _ => bail!("a mail transport needs --password-file FILE or --password-command CMD"),
        };
        let user = self.mail_user.clone().unwrap_or_else(|| own.to_owned());
        let table = |host: String, port: Option<u16>, security: &str| {
            let mut t = toml::Table::new();
            t.insert("host".into(), host.into());
            if let Some(p) = port {
                t.insert("port".into(), i64::from(p).into());
            }
            t.insert("security".into(), security.into());
            t.insert("username".into(), user.clone().into());
            t.insert(secret.0.into(), secret.1.clone());
            toml::Value::Table(t)
        };
        let mut both = toml::Table::new();
        both.insert("smtp".into(), table(smtp_host, self.smtp_port, &self.smtp_security));
        both.insert("imap".into(), table(imap_host, self.imap_port, &self.imap_security));
        let mail: MailConfig = toml::Value::Table(both).try_into().context("invalid mail transport options")?;
        mail.validate().context("invalid mail transport options")?;
        Ok(TransportConfig::Mail(Box::new(mail)))
    }
}
