//! TLS client settings shared by SMTP and IMAP: rustls with the ring provider, the Mozilla roots from
//! `webpki-roots`, plus the optional `ca-file`.
//!
//! Certificates are always verified against the configured host name; this module has no switch to
//! turn verification off and must never get one.

use std::sync::Arc;

use anyhow::Context as _;
use lettre::transport::smtp::client::{Certificate, TlsParameters};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};

use super::config::Endpoint;

/// Reads the extra CA certificates of `ca-file`, if set.
fn extra_roots(endpoint: &Endpoint) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let Some(path) = &endpoint.ca_file else {
        return Ok(Vec::new());
    };
    let pem = std::fs::read(path).with_context(|| format!("failed to read ca-file `{}`", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("failed to parse ca-file `{}` as PEM", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "ca-file `{}` contains no PEM certificate", path.display());
    Ok(certs)
}

/// A rustls client configuration for `endpoint` (ring provider, web roots plus `ca-file`).
///
/// # Errors
/// The `ca-file` cannot be read or parsed, or rustls refuses the settings.
pub fn rustls_config(endpoint: &Endpoint) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots(endpoint)? {
        roots.add(cert).context("ca-file holds a certificate rustls cannot use as a trust anchor")?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("rustls refused the default protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name the server certificate must match.
///
/// # Errors
/// `host` is neither a DNS name nor an IP address.
pub fn server_name(endpoint: &Endpoint) -> anyhow::Result<ServerName<'static>> {
    let host = endpoint.host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).with_context(|| format!("`{host}` is not a valid TLS server name"))
}

/// lettre TLS parameters for `endpoint`: lettre builds its own rustls config with the ring provider and
/// the web roots (feature `tokio1-rustls-tls`); the `ca-file` certificates are added on top.
///
/// # Errors
/// The `ca-file` cannot be read or parsed, or lettre refuses the settings.
pub fn lettre_parameters(endpoint: &Endpoint) -> anyhow::Result<TlsParameters> {
    let host = endpoint.host.trim_start_matches('[').trim_end_matches(']');
    let mut builder = TlsParameters::builder(host.to_string());
    for cert in extra_roots(endpoint)? {
        builder = builder.add_root_certificate(
            Certificate::from_der(cert.to_vec()).context("ca-file holds a certificate lettre cannot use")?,
        );
    }
    builder.build_rustls().with_context(|| format!("failed to set up TLS for {}", endpoint.addr()))
}

/// True if `err` or any error in its source chain is rustls refusing the server's certificate:
/// a configuration problem (wrong CA, wrong host name), so retrying cannot help.
pub fn is_certificate_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        let rustls_err = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|i| i.downcast_ref::<rustls::Error>())
        });
        if matches!(rustls_err, Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)) {
            return true;
        }
        cur = e.source();
    }
    false
}
