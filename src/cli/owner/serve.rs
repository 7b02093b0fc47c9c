//! `mailferry owner serve`: the web console ([`mailferry::console`]); this file only reads the flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mailferry::console::{Console, Options};
use tracing::info;

use crate::cli::{ConfigArg, Exit};

/// The arguments of `owner serve` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
#[command(after_help = "Every page needs a login: the password in --password-file, or else the random token \
written to STATE/console-token at each start.\n\
Examples:\n  mailferry owner serve --listen 127.0.0.1:8480 --password-file /etc/mailferry/console.password\n  \
mailferry owner serve --listen 0.0.0.0:8443 --tls-cert cert.pem --tls-key key.pem --password-file pw")]
pub struct ServeCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The address to listen on; beyond loopback only with TLS or --insecure-listen-any (port 0: any free
    /// port, logged).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8480")]
    listen: SocketAddr,
    /// The TLS certificate chain (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Listen beyond loopback without TLS (the password and session cookie cross the network in clear).
    #[arg(long)]
    insecure_listen_any: bool,
    /// A file (mode 0600) holding the password or token that logs in; default: a fresh random token in
    /// STATE/console-token.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
}

impl ServeCommand {
    /// Serves the console until SIGINT or SIGTERM.
    ///
    /// # Errors
    /// An unusable config, a refused listen address, unusable TLS or password files, an address in use.
    pub async fn execute(self) -> Result<Exit> {
        let cfg = self.config.owner()?;
        let opts = Options {
            listen: self.listen,
            tls: self.tls_cert.zip(self.tls_key),
            insecure_listen_any: self.insecure_listen_any,
            password_file: self.password_file,
        };
        let console = Console::bind(&cfg, &opts).await?;
        let shutdown = crate::cli::signal::shutdown()?;
        info!(url = %console.url()?, "console listening on {}", console.url()?);
        crate::cli::notify::ready("console listening");
        console.serve(shutdown).await?;
        Ok(Exit::Success)
    }
}
