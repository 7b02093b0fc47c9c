//! Configuration of the mail transport: the `[smtp]` and `[imap]` tables of a node's config file.
//!
//! This module parses and checks settings and reads secrets (password files, password and token
//! commands) when asked to. It never opens a network connection and never keeps a secret in the
//! configuration itself: there is deliberately no inline `password` key.
//!
//! ```toml
//! [transport]
//! kind = "mail"
//!
//! [smtp]
//! host = "mail.example.org"
//! security = "starttls"            # or "tls" (implicit TLS) or "none" (loopback only)
//! username = "site1@example.org"
//! password-command = "pass show mail/site1"
//!
//! [imap]
//! host = "mail.example.org"
//! security = "tls"
//! username = "site1@example.org"
//! password-file = "/etc/mailferry/imap-password"
//! ```

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default for `timeout`: the limit on connecting and on each command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for `poll-interval`: how often to poll when the IMAP server has no IDLE.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(60);
/// The longest a secret command may run before it counts as failed.
const SECRET_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// How the connection to a server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Security {
    /// Plain connection upgraded with STARTTLS before anything else is sent; the upgrade is
    /// required, never optional.
    #[default]
    Starttls,
    /// TLS from the first byte (SMTP submissions on 465, IMAPS on 993).
    Tls,
    /// No encryption at all. Refused unless the host is loopback or `allow-insecure = true`.
    None,
}

/// SASL mechanism used to log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMechanism {
    /// AUTH PLAIN (SMTP) or LOGIN (IMAP) with a password.
    #[default]
    Plain,
    /// AUTH LOGIN (SMTP) or LOGIN (IMAP) with a password.
    Login,
    /// XOAUTH2 with an OAuth access token printed by `token-command`.
    Xoauth2,
}

/// `[smtp]`: where and how to submit outgoing messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SmtpConfig {
    /// Server host name or IP address; also the name checked against the server certificate.
    pub host: String,
    /// Port; defaults to 587 for `starttls` and `none`, 465 for `tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Connection protection; defaults to `starttls`.
    #[serde(default)]
    pub security: Security,
    /// Login name.
    pub username: String,
    /// File whose content (trailing newline removed) is the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Shell command (`sh -c`) whose trimmed standard output is the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_command: Option<String>,
    /// SASL mechanism; defaults to `plain`.
    #[serde(default)]
    pub auth: AuthMechanism,
    /// Shell command printing an OAuth access token; required by and only allowed with `xoauth2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_command: Option<String>,
    /// PEM file with extra CA certificates trusted besides the built-in web roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Limit on connecting and on each command, for example "30s"; defaults to 30 s.
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// Allows `security = "none"` to a host that is not loopback (passwords then travel in clear).
    #[serde(default)]
    pub allow_insecure: bool,
}

/// `[imap]`: the mailbox this node reads its messages from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ImapConfig {
    /// Server host name or IP address; also the name checked against the server certificate.
    pub host: String,
    /// Port; defaults to 143 for `starttls` and `none`, 993 for `tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Connection protection; defaults to `starttls`.
    #[serde(default)]
    pub security: Security,
    /// Login name.
    pub username: String,
    /// File whose content (trailing newline removed) is the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Shell command (`sh -c`) whose trimmed standard output is the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_command: Option<String>,
    /// SASL mechanism; defaults to `plain` (IMAP LOGIN).
    #[serde(default)]
    pub auth: AuthMechanism,
    /// Shell command printing an OAuth access token; required by and only allowed with `xoauth2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_command: Option<String>,
    /// PEM file with extra CA certificates trusted besides the built-in web roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Limit on connecting and on each command, for example "30s"; defaults to 30 s.
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// Allows `security = "none"` to a host that is not loopback (passwords then travel in clear).
    #[serde(default)]
    pub allow_insecure: bool,
    /// Folder the node's messages arrive in; defaults to "INBOX".
    #[serde(default = "default_inbox")]
    pub inbox: String,
    /// Folder for handled messages, `/` separating levels; defaults to "mailferry/processed".
    #[serde(default = "default_processed")]
    pub processed: String,
    /// Folder for refused messages, `/` separating levels; defaults to "mailferry/rejected".
    #[serde(default = "default_rejected")]
    pub rejected: String,
    /// Whether to use IMAP IDLE when the server offers it; defaults to true.
    #[serde(default = "default_true")]
    pub idle: bool,
    /// How often to look for new mail without IDLE, for example "60s"; defaults to 60 s.
    #[serde(default = "default_poll_interval", with = "duration")]
    pub poll_interval: Duration,
}

/// `[transport]` settings of `kind = "mail"`: outgoing SMTP plus the node's own IMAP mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MailConfig {
    /// Submission server for outgoing messages.
    pub smtp: SmtpConfig,
    /// The mailbox incoming messages are read from.
    pub imap: ImapConfig,
}

impl AuthMechanism {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMechanism::Plain => "plain",
            AuthMechanism::Login => "login",
            AuthMechanism::Xoauth2 => "xoauth2",
        }
    }
}

/// A configuration value that cannot work, with the table it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid [{section}] setting: {message}")]
pub struct ConfigError {
    /// `smtp` or `imap`.
    pub section: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Where the secret for logging in comes from; never the secret itself.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// Read a file at connect time.
    File(PathBuf),
    /// Run a password command at connect time.
    PasswordCommand(String),
    /// Run an OAuth token command at connect time (XOAUTH2).
    TokenCommand(String),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(p) => write!(f, "password-file `{}`", p.display()),
            SecretSource::PasswordCommand(c) => write!(f, "password-command `{c}`"),
            SecretSource::TokenCommand(c) => write!(f, "token-command `{c}`"),
        }
    }
}

/// A checked server endpoint: the settings SMTP and IMAP have in common, with defaults applied.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Host to connect to and to verify the certificate against.
    pub host: String,
    /// Port, default already applied.
    pub port: u16,
    /// Connection protection.
    pub security: Security,
    /// Login name.
    pub username: String,
    /// Mechanism to log in with.
    pub auth: AuthMechanism,
    /// Where the password or token comes from.
    pub secret: SecretSource,
    /// Extra trusted CA certificates (PEM).
    pub ca_file: Option<PathBuf>,
    /// Limit on connecting and on each command.
    pub timeout: Duration,
}

impl Endpoint {
    /// `host:port`, for messages.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

struct Common<'a> {
    section: &'static str,
    host: &'a str,
    port: Option<u16>,
    security: Security,
    username: &'a str,
    password_file: &'a Option<PathBuf>,
    password_command: &'a Option<String>,
    auth: AuthMechanism,
    token_command: &'a Option<String>,
    ca_file: &'a Option<PathBuf>,
    timeout: Duration,
    allow_insecure: bool,
    default_ports: (u16, u16),
}

impl Common<'_> {
    fn endpoint(self) -> Result<Endpoint, ConfigError> {
        let err = |message: String| ConfigError { section: self.section, message };
        if self.host.trim().is_empty() {
            return Err(err("host is empty".into()));
        }
        if self.username.is_empty() {
            return Err(err("username is empty".into()));
        }
        if self.timeout.is_zero() {
            return Err(err("timeout must be greater than zero".into()));
        }
        if self.security == Security::None && !self.allow_insecure && !is_loopback(self.host) {
            return Err(err(format!(
                "security = \"none\" would send the password for {} to {} unencrypted; use \"starttls\" or \"tls\", \
                 or set allow-insecure = true if the network path is trusted",
                self.username, self.host
            )));
        }
        let secret = match (self.auth, self.password_file, self.password_command, self.token_command) {
            (AuthMechanism::Xoauth2, None, None, Some(cmd)) => SecretSource::TokenCommand(cmd.clone()),
            (AuthMechanism::Xoauth2, _, _, None) => {
                return Err(err("auth = \"xoauth2\" needs token-command (a command printing the access token)".into()));
            }
            (AuthMechanism::Xoauth2, _, _, Some(_)) => {
                return Err(err(
                    "auth = \"xoauth2\" takes its token from token-command; remove password-file/password-command"
                        .into(),
                ));
            }
            (_, _, _, Some(_)) => {
                return Err(err("token-command is only used with auth = \"xoauth2\"".into()));
            }
            (_, Some(_), Some(_), None) => {
                return Err(err("set either password-file or password-command, not both".into()));
            }
            (_, None, None, None) => {
                return Err(err(format!(
                    "no password source for {}: set password-file or password-command (inline passwords are not supported)",
                    self.username
                )));
            }
            (_, Some(file), None, None) => SecretSource::File(file.clone()),
            (_, None, Some(cmd), None) => SecretSource::PasswordCommand(cmd.clone()),
        };
        let port = self.port.unwrap_or(match self.security {
            Security::Tls => self.default_ports.1,
            Security::Starttls | Security::None => self.default_ports.0,
        });
        if port == 0 {
            return Err(err("port 0 is not a valid server port".into()));
        }
        Ok(Endpoint {
            host: self.host.trim().to_string(),
            port,
            security: self.security,
            username: self.username.to_string(),
            auth: self.auth,
            secret,
            ca_file: self.ca_file.clone(),
            timeout: self.timeout,
        })
    }
}

impl SmtpConfig {
    /// Checks the settings and applies defaults (ports 587 / 465).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the problem: no or two password sources, `xoauth2` without
    /// `token-command`, `security = "none"` to a remote host without `allow-insecure`, empty host.
    pub fn endpoint(&self) -> Result<Endpoint, ConfigError> {
        Common {
            section: "smtp",
            host: &self.host,
            port: self.port,
            security: self.security,
            username: &self.username,
            password_file: &self.password_file,
            password_command: &self.password_command,
            auth: self.auth,
            token_command: &self.token_command,
            ca_file: &self.ca_file,
            timeout: self.timeout,
            allow_insecure: self.allow_insecure,
            default_ports: (587, 465),
        }
        .endpoint()
    }
}

impl ImapConfig {
    /// Checks the settings and applies defaults (ports 143 / 993).
    ///
    /// # Errors
    /// As [`SmtpConfig::endpoint`], plus empty or identical folder names.
    pub fn endpoint(&self) -> Result<Endpoint, ConfigError> {
        let err = |message: String| ConfigError { section: "imap", message };
        for (key, value) in [("inbox", &self.inbox), ("processed", &self.processed), ("rejected", &self.rejected)] {
            if value.trim().is_empty() {
                return Err(err(format!("{key} folder name is empty")));
            }
        }
        if self.processed == self.inbox || self.rejected == self.inbox {
            return Err(err(format!(
                "processed and rejected folders must differ from the inbox `{}`, or messages would be fetched again",
                self.inbox
            )));
        }
        if self.poll_interval.is_zero() {
            return Err(err("poll-interval must be greater than zero".into()));
        }
        Common {
            section: "imap",
            host: &self.host,
            port: self.port,
            security: self.security,
            username: &self.username,
            password_file: &self.password_file,
            password_command: &self.password_command,
            auth: self.auth,
            token_command: &self.token_command,
            ca_file: &self.ca_file,
            timeout: self.timeout,
            allow_insecure: self.allow_insecure,
            default_ports: (143, 993),
        }
        .endpoint()
    }
}

impl MailConfig {
    /// Makes relative `password-file` and `ca-file` paths relative to `base` (the directory of the
    /// config file that names them), like every other path in the configuration.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut Option<PathBuf>| {
            if let Some(path) = p
                && path.is_relative()
            {
                *path = base.join(&*path);
            }
        };
        fix(&mut self.smtp.password_file);
        fix(&mut self.smtp.ca_file);
        fix(&mut self.imap.password_file);
        fix(&mut self.imap.ca_file);
    }

    /// Checks both tables.
    ///
    /// # Errors
    /// The first [`ConfigError`] found, SMTP first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.smtp.endpoint()?;
        self.imap.endpoint()?;
        Ok(())
    }
}

/// True for `localhost`, `127.0.0.0/8` and `::1`: the only hosts `security = "none"` may use by default.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim().trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A secret read from its source, kept out of `Debug` output.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// The secret's text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl SecretSource {
    /// Reads the secret now (called at connect time, so rotated passwords and fresh tokens are used).
    ///
    /// # Errors
    /// The file cannot be read or is empty; the command cannot start, fails, times out, or prints nothing.
    /// The message names the file or command, never the secret.
    pub async fn read(&self) -> anyhow::Result<Secret> {
        let value = match self {
            SecretSource::File(path) => {
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| anyhow::anyhow!("failed to read password-file `{}`: {e}", path.display()))?;
                text.trim_end_matches(['\n', '\r']).to_string()
            }
            SecretSource::PasswordCommand(cmd) => run_secret_command("password-command", cmd).await?,
            SecretSource::TokenCommand(cmd) => run_secret_command("token-command", cmd).await?,
        };
        if value.is_empty() {
            anyhow::bail!("{self:?} gave an empty secret");
        }
        Ok(Secret(value))
    }
}

async fn run_secret_command(key: &str, cmd: &str) -> anyhow::Result<String> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(SECRET_COMMAND_TIMEOUT, child)
        .await
        .map_err(|_| anyhow::anyhow!("{key} `{cmd}` did not finish within {}s", SECRET_COMMAND_TIMEOUT.as_secs()))?
        .map_err(|e| anyhow::anyhow!("failed to run {key} `{cmd}` with sh -c: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or("").trim();
        anyhow::bail!(
            "{key} `{cmd}` failed ({}){}",
            out.status,
            if first.is_empty() { String::new() } else { format!(": {first}") }
        );
    }
    let text = String::from_utf8(out.stdout).map_err(|_| anyhow::anyhow!("{key} `{cmd}` printed non-UTF-8 output"))?;
    Ok(text.trim().to_string())
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

fn default_poll_interval() -> Duration {
    DEFAULT_POLL_INTERVAL
}

fn default_true() -> bool {
    true
}

fn default_inbox() -> String {
    "INBOX".into()
}

fn default_processed() -> String {
    "mailferry/processed".into()
}

fn default_rejected() -> String {
    "mailferry/rejected".into()
}

/// Durations as humantime strings ("30s", "1m 30s"), like the rest of the configuration.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration `{text}` (expected e.g. \"30s\"): {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smtp(extra: &str) -> Result<SmtpConfig, toml::de::Error> {
        toml::from_str(&format!("host = \"mail.example.org\"\nusername = \"u@example.org\"\n{extra}"))
    }

    fn imap(extra: &str) -> Result<ImapConfig, toml::de::Error> {
        toml::from_str(&format!("host = \"mail.example.org\"\nusername = \"u@example.org\"\n{extra}"))
    }

    #[test]
    fn defaults_and_ports() {
        let c = smtp("password-file = \"/p\"").unwrap();
        let e = c.endpoint().unwrap();
        assert_eq!(
            (e.port, e.security, e.auth, e.timeout),
            (587, Security::Starttls, AuthMechanism::Plain, DEFAULT_TIMEOUT)
        );
        assert_eq!(e.secret, SecretSource::File("/p".into()));
        let e = smtp("security = \"tls\"\npassword-command = \"echo x\"").unwrap().endpoint().unwrap();
        assert_eq!(e.port, 465);
        assert_eq!(e.secret, SecretSource::PasswordCommand("echo x".into()));

        let c = imap("password-file = \"/p\"\ntimeout = \"5s\"\npoll-interval = \"2m\"").unwrap();
        assert_eq!(
            (c.inbox.as_str(), c.processed.as_str(), c.rejected.as_str()),
            ("INBOX", "mailferry/processed", "mailferry/rejected")
        );
        assert!(c.idle);
        assert_eq!((c.timeout, c.poll_interval), (Duration::from_secs(5), Duration::from_secs(120)));
        assert_eq!(c.endpoint().unwrap().port, 143);
        assert_eq!(imap("security = \"tls\"\npassword-file = \"/p\"").unwrap().endpoint().unwrap().port, 993);
        assert_eq!(imap("port = 1993\npassword-file = \"/p\"").unwrap().endpoint().unwrap().port, 1993);
    }

    #[test]
    fn refuses_inline_password_and_unknown_keys() {
        let e = smtp("password = \"hunter2\"").unwrap_err().to_string();
        assert!(e.contains("unknown field `password`"), "{e}");
        let e = imap("password-file = \"/p\"\nidle-timeout = \"1s\"").unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
        let e = smtp("password-file = \"/p\"\ntimeout = \"soon\"").unwrap_err().to_string();
        assert!(e.contains("invalid duration `soon`"), "{e}");
    }

    #[test]
    fn password_sources_are_exclusive() {
        let cases: &[(&str, &str)] = &[
            ("", "no password source for u@example.org"),
            ("password-file = \"/p\"\npassword-command = \"x\"", "not both"),
            ("auth = \"xoauth2\"\npassword-file = \"/p\"", "needs token-command"),
            ("auth = \"xoauth2\"\ntoken-command = \"t\"\npassword-command = \"x\"", "remove password-file"),
            ("password-file = \"/p\"\ntoken-command = \"t\"", "only used with auth = \"xoauth2\""),
        ];
        for (extra, want) in cases {
            let err = smtp(extra).unwrap().endpoint().unwrap_err();
            assert_eq!(err.section, "smtp");
            assert!(err.to_string().contains(want), "{extra:?}: {err}");
        }
        let e = smtp("auth = \"xoauth2\"\ntoken-command = \"t\"").unwrap().endpoint().unwrap();
        assert_eq!(e.secret, SecretSource::TokenCommand("t".into()));
    }

    #[test]
    fn insecure_only_on_loopback_or_when_allowed() {
        let err = smtp("security = \"none\"\npassword-file = \"/p\"").unwrap().endpoint().unwrap_err().to_string();
        assert!(err.contains("unencrypted") && err.contains("mail.example.org"), "{err}");
        assert!(smtp("security = \"none\"\nallow-insecure = true\npassword-file = \"/p\"").unwrap().endpoint().is_ok());
        for host in ["127.0.0.1", "localhost", "::1", "[::1]", "127.3.4.5"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["10.0.0.1", "example.org", "localhost.example.org"] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn folders_must_differ_from_inbox() {
        let err = imap("password-file = \"/p\"\nprocessed = \"INBOX\"").unwrap().endpoint().unwrap_err().to_string();
        assert!(err.contains("must differ from the inbox"), "{err}");
    }

    #[tokio::test]
    async fn secrets_are_read_at_call_time() {
        let s = SecretSource::PasswordCommand("printf ' pw \\n'".into()).read().await.unwrap();
        assert_eq!(s.expose(), "pw");
        assert_eq!(format!("{s:?}"), "Secret(..)");
        let err = SecretSource::PasswordCommand("echo oops >&2; exit 3".into()).read().await.unwrap_err().to_string();
        assert!(err.contains("password-command `echo oops >&2; exit 3` failed") && err.contains("oops"), "{err}");
        let err = SecretSource::TokenCommand("true".into()).read().await.unwrap_err().to_string();
        assert!(err.contains("empty secret"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "file-secret\n").unwrap();
        assert_eq!(SecretSource::File(path.clone()).read().await.unwrap().expose(), "file-secret");
        let err = SecretSource::File(dir.path().join("missing")).read().await.unwrap_err().to_string();
        assert!(err.contains("failed to read password-file") && err.contains("missing"), "{err}");
    }
}
