//! The owner's web console (`mailferry owner serve`): the fleet, each recipient, channels and
//! generations, and the intrusion log as server-rendered HTML, plus the admin's few actions (approve a
//! generation, suspend or resume a recipient) behind a login.
//!
//! It reads the state database in short read transactions ([`data`]) and writes only through the
//! actions' short transactions ([`actions`]); it never takes the state lock, so it runs beside the owner
//! daemon and one-shot commands without holding either up. Every page and action needs a login
//! ([`auth`]); every form that posts carries the session's CSRF token. It listens on loopback unless it
//! has TLS (rustls, ring) or is told `--insecure-listen-any`. No JavaScript: forms and links only.
//!
//! Must not: take the state lock, write anything but the actions' rows, serve anything to a client
//! without a session but the login page and the stylesheet.

pub mod actions;
pub mod auth;
pub mod data;
pub mod pages;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use axum::Router;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::Markup;
use tracing::{info, warn};

use self::auth::{Auth, LoginError, Session};
use self::data::{Filter, RowPolicy, form_urlencoded};
use crate::config::OwnerConfig;
use crate::db::{Db, now};

/// How `owner serve` listens and who may log in.
#[derive(Debug, Clone)]
pub struct Options {
    /// The address to listen on (port 0: any free port, logged).
    pub listen: SocketAddr,
    /// The TLS certificate chain and private key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Listen beyond loopback without TLS.
    pub insecure_listen_any: bool,
    /// A file holding the password (or token) that opens a session; without one, a random token is
    /// written to `STATE/console-token` at every start.
    pub password_file: Option<PathBuf>,
}

/// Refuses to listen beyond loopback without TLS, unless told to.
///
/// # Errors
/// A non-loopback address with neither TLS nor `insecure_listen_any`.
pub fn check_listen(addr: &SocketAddr, tls: bool, insecure_listen_any: bool) -> Result<()> {
    if addr.ip().is_loopback() || tls || insecure_listen_any {
        return Ok(());
    }
    bail!(
        "refusing to listen on {addr} without TLS: the console's password and session cookie would cross the \
         network in clear; give --tls-cert and --tls-key, listen on 127.0.0.1, or (on a network you trust) add \
         --insecure-listen-any"
    )
}

/// Reads the console's secret from `path`: one line (its line ending dropped), not empty, readable by
/// its owner only.
///
/// # Errors
/// A missing, empty or too-open file.
pub fn read_password_file(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).with_context(|| format!("failed to read password file `{}`", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "password file `{}` is readable by others (mode {mode:o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let mut text = std::fs::read(path).with_context(|| format!("failed to read password file `{}`", path.display()))?;
    while text.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        text.pop();
    }
    if text.is_empty() {
        bail!("password file `{}` is empty", path.display());
    }
    Ok(text)
}

/// Writes a fresh random token to `STATE/console-token` (mode 0600), replacing the last one.
fn fresh_token(state_dir: &Path) -> Result<(PathBuf, Vec<u8>)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut b = [0u8; 24];
    crate::crypto::random(&mut b);
    let token = hex::encode(b);
    let path = state_dir.join("console-token");
    let tmp = state_dir.join("console-token.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("failed to create `{}`", tmp.display()))?;
    writeln!(f, "{token}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("failed to write `{}`", path.display()))?;
    Ok((path, token.into_bytes()))
}

fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::format_err!("failed to read certificates from `{}`: {e}", cert.display()))?;
    if chain.is_empty() {
        bail!("`{}` holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::format_err!("failed to read a private key from `{}`: {e}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not make a usable pair")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// What every request handler shares.
struct App {
    db: Mutex<Db>,
    auth: Mutex<Auth>,
    tls: bool,
    node: String,
    policy: RowPolicy,
}

type Shared = Arc<App>;

impl App {
    /// Runs `f` on the database off the async threads.
    async fn db<T: Send + 'static>(self: &Arc<Self>, f: impl FnOnce(&Db) -> Result<T> + Send + 'static) -> Result<T> {
        let app = self.clone();
        tokio::task::spawn_blocking(move || {
            let db = app.db.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&db)
        })
        .await
        .context("a database task failed")?
    }

    fn auth(&self) -> std::sync::MutexGuard<'_, Auth> {
        self.auth.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cookie<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| auth::session_id(v, self.tls))
    }

    /// The logged-in session of the request, if any.
    fn logged_in(&self, headers: &HeaderMap) -> Option<Session> {
        let id = self.cookie(headers)?;
        self.auth().session(id, now()).filter(|s| s.authenticated)
    }

    fn page(&self, title: &str, nav: pages::Nav, session: &Session, body: Markup) -> Response {
        html(StatusCode::OK, pages::layout(title, nav, Some(&session.csrf), &self.node, body))
    }

    fn failure(&self, status: StatusCode, title: &str, text: &str) -> Response {
        html(status, pages::message(&self.node, None, title, text))
    }

    fn internal(&self, e: &anyhow::Error) -> Response {
        warn!(error = %format!("{e:#}"), "console: a page failed");
        self.failure(StatusCode::INTERNAL_SERVER_ERROR, "Internal error", &format!("{e:#}"))
    }
}

fn html(status: StatusCode, m: Markup) -> Response {
    let mut r = (status, m).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Headers on every response: nothing but our own stylesheet loads, no framing, no referrer, no sniffing.
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; \
             base-uri 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

fn with_cookie(mut r: Response, id: Option<&str>, tls: bool) -> Response {
    if let Ok(v) = HeaderValue::from_str(&auth::set_cookie(id, tls)) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

/// The value of `key` in a posted form.
fn field(form: &[(String, String)], key: &str) -> String {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_default()
}

fn router(app: Shared) -> Router {
    Router::new()
        .route("/", get(fleet))
        .route("/recipient", get(recipient))
        .route("/generations", get(generations))
        .route("/intrusions", get(intrusions))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/approve", post(approve))
        .route("/suspend", post(suspend))
        .route("/style.css", get(style))
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(app)
}

async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "max-age=3600")], pages::STYLE)
        .into_response()
}

async fn login_form(State(app): State<Shared>, headers: HeaderMap) -> Response {
    if app.logged_in(&headers).is_some() {
        return Redirect::to("/").into_response();
    }
    // The form's CSRF token is bound to a session that is not logged in yet; an existing one is reused.
    let existing = app.cookie(&headers).and_then(|id| app.auth().session(id, now()).map(|s| (id.to_owned(), s)));
    let (id, session) = existing.unwrap_or_else(|| app.auth().anonymous(now()));
    with_cookie(html(StatusCode::OK, pages::login(&app.node, &session.csrf, None)), Some(&id), app.tls)
}

async fn login(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let form = form_urlencoded(&body);
    let id = app.cookie(&headers).map(str::to_owned);
    let result = app.auth().login(id.as_deref(), &field(&form, "csrf"), &field(&form, "secret"), peer.ip(), now());
    match result {
        Ok((new, _)) => {
            info!(client = %peer.ip(), "console: logged in");
            with_cookie(Redirect::to("/").into_response(), Some(&new), app.tls)
        }
        Err(e) => {
            let (status, text) = match e {
                LoginError::Csrf => (
                    StatusCode::FORBIDDEN,
                    "The login form expired or did not come from this console; try again.".to_owned(),
                ),
                LoginError::TooMany(wait) => {
                    (StatusCode::TOO_MANY_REQUESTS, format!("Too many failed logins; try again in {} s.", wait))
                }
                LoginError::Wrong => (StatusCode::UNAUTHORIZED, "Wrong password or token.".to_owned()),
            };
            warn!(client = %peer.ip(), reason = ?e, "console: login refused");
            // A fresh form (a new anonymous session when the old one was not valid).
            let existing = id.and_then(|id| app.auth().session(&id, now()).map(|s| (id, s)));
            let (id, session) = existing.unwrap_or_else(|| app.auth().anonymous(now()));
            with_cookie(html(status, pages::login(&app.node, &session.csrf, Some(&text))), Some(&id), app.tls)
        }
    }
}

/// Whether a posted form may act: it comes from a logged-in session and carries that session's CSRF token.
fn may_act(app: &App, headers: &HeaderMap, form: &[(String, String)]) -> bool {
    let ok = app.auth().may_act(app.cookie(headers), &field(form, "csrf"), now());
    if !ok {
        warn!("console: refused a form without a logged-in session and its CSRF token");
    }
    ok
}

/// The answer to a form that may not act.
fn refused_form(app: &App) -> Response {
    app.failure(
        StatusCode::FORBIDDEN,
        "Refused",
        "This form did not come from a logged-in page of this console (its CSRF token is missing or wrong). Log in and try again.",
    )
}

async fn logout(State(app): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let form = form_urlencoded(&body);
    if !may_act(&app, &headers, &form) {
        return refused_form(&app);
    }
    if let Some(id) = app.cookie(&headers) {
        app.auth().logout(id);
    }
    with_cookie(Redirect::to("/login").into_response(), None, app.tls)
}

async fn approve(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let form = form_urlencoded(&body);
    if !may_act(&app, &headers, &form) {
        return refused_form(&app);
    }
    let channel = field(&form, "channel");
    let Ok(number) = field(&form, "generation").parse::<u64>() else {
        return app.failure(StatusCode::BAD_REQUEST, "Refused", "no generation number in the form");
    };
    let actor = actor(peer.ip());
    match app.db(move |db| actions::approve(db, &channel, number, &actor)).await {
        Ok(_) => Redirect::to("/generations").into_response(),
        Err(e) => app.failure(StatusCode::BAD_REQUEST, "Not approved", &format!("{e:#}")),
    }
}

async fn suspend(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let form = form_urlencoded(&body);
    if !may_act(&app, &headers, &form) {
        return refused_form(&app);
    }
    let name = field(&form, "name");
    let on = field(&form, "on") != "false";
    let actor = actor(peer.ip());
    let n = name.clone();
    match app.db(move |db| actions::suspend(db, &n, on, &actor)).await {
        Ok(_) => {
            let q: String = form_urlencoded::Serializer::new(String::new()).append_pair("name", &name).finish();
            Redirect::to(&format!("/recipient?{q}")).into_response()
        }
        Err(e) => app.failure(StatusCode::BAD_REQUEST, "Not changed", &format!("{e:#}")),
    }
}

fn actor(ip: IpAddr) -> String {
    format!("console {ip}")
}

async fn fleet(State(app): State<Shared>, headers: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let Some(s) = app.logged_in(&headers) else { return Redirect::to("/login").into_response() };
    let filter = Filter::parse(q.as_deref().unwrap_or(""));
    let (policy, f) = (app.policy, filter.clone());
    let now = now();
    match app.db(move |db| data::fleet_page(db, &policy, &f, now)).await {
        Ok(page) => app.page("Fleet", pages::Nav::Fleet, &s, pages::fleet(&page, &filter, now)),
        Err(e) => app.internal(&e),
    }
}

async fn recipient(State(app): State<Shared>, headers: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let Some(s) = app.logged_in(&headers) else { return Redirect::to("/login").into_response() };
    let name = field(&form_urlencoded(q.as_deref().unwrap_or("")), "name");
    let (policy, n) = (app.policy, name.clone());
    let now = now();
    match app.db(move |db| data::recipient_page(db, &policy, &n, now)).await {
        Ok(Some(page)) => app.page(&name, pages::Nav::Fleet, &s, pages::recipient(&s.csrf, &page, now)),
        Ok(None) => html(
            StatusCode::NOT_FOUND,
            pages::message(
                &app.node,
                Some(&s.csrf),
                "Not found",
                &format!("no recipient named {name:?} is registered"),
            ),
        ),
        Err(e) => app.internal(&e),
    }
}

async fn generations(State(app): State<Shared>, headers: HeaderMap) -> Response {
    let Some(s) = app.logged_in(&headers) else { return Redirect::to("/login").into_response() };
    let policy = app.policy;
    match app.db(move |db| data::generations_page(db, &policy)).await {
        Ok(page) => app.page("Generations", pages::Nav::Generations, &s, pages::generations(&s.csrf, &page, now())),
        Err(e) => app.internal(&e),
    }
}

async fn intrusions(State(app): State<Shared>, headers: HeaderMap) -> Response {
    let Some(s) = app.logged_in(&headers) else { return Redirect::to("/login").into_response() };
    match app.db(|db| data::intrusions(db, 200)).await {
        Ok((total, rows)) => {
            app.page("Intrusion log", pages::Nav::Intrusions, &s, pages::intrusions(total, &rows, now()))
        }
        Err(e) => app.internal(&e),
    }
}

/// A console bound to its address, ready to serve.
pub struct Console {
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Shared,
}

/// How long a client may take to finish the TLS handshake or send a request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 64;

impl Console {
    /// Checks the options, opens the owner's state database (without its lock), reads or makes the secret,
    /// and binds the address.
    ///
    /// # Errors
    /// A refused listen address, an owner with no state, an unusable password file or TLS files, an
    /// address that cannot be bound.
    pub async fn bind(cfg: &OwnerConfig, opts: &Options) -> Result<Console> {
        check_listen(&opts.listen, opts.tls.is_some(), opts.insecure_listen_any)?;
        let tls = opts.tls.as_ref().map(|(c, k)| tls_acceptor(c, k)).transpose()?;
        let db_path = cfg.state_dir.join("state.db");
        if !db_path.is_file() {
            bail!("no owner state at `{}`; run `mailferry owner init` first", db_path.display());
        }
        let db = Db::open(&db_path)?;
        let secret = match &opts.password_file {
            Some(p) => read_password_file(p)?,
            None => {
                let (path, token) = fresh_token(&cfg.state_dir)?;
                info!(token_file = %path.display(), "console: log in with the token in `{}`", path.display());
                token
            }
        };
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("failed to listen on {}", opts.listen))?;
        let app = Arc::new(App {
            db: Mutex::new(db),
            auth: Mutex::new(Auth::new(secret)),
            tls: tls.is_some(),
            node: cfg.owner.address.clone(),
            policy: RowPolicy {
                require_approval: cfg.owner.require_approval,
                fleet: crate::fleet::FleetPolicy::of(cfg),
            },
        });
        Ok(Console { listener, tls, app })
    }

    /// The address it listens on.
    ///
    /// # Errors
    /// The socket's address cannot be read.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// The URL to open.
    ///
    /// # Errors
    /// As [`Console::local_addr`].
    pub fn url(&self) -> Result<String> {
        Ok(format!("{}://{}/", if self.tls.is_some() { "https" } else { "http" }, self.local_addr()?))
    }

    /// Serves until `shutdown` completes.
    ///
    /// # Errors
    /// Accepting connections fails for good.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let router = router(self.app.clone());
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => break,
                p = permits.clone().acquire_owned() => p?,
            };
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => break,
                a = self.listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a moment rather than spin.
                        warn!(error = %e, "console: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let service = router.clone().layer(axum::Extension(ConnectInfo(peer)));
            let tls = self.tls.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper_util::service::TowerToHyperService::new(service);
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HANDSHAKE_TIMEOUT);
                let served = match tls {
                    None => http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service).await,
                    Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await,
                        Ok(Err(e)) => {
                            tracing::debug!(client = %peer, error = %e, "console: TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    },
                };
                if let Err(e) = served {
                    tracing::debug!(client = %peer, error = %e, "console: connection ended with an error");
                }
            });
        }
        info!("console stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_beyond_loopback_needs_tls_or_the_explicit_flag() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        for ok in ["127.0.0.1:8480", "127.8.9.1:1", "[::1]:8480"] {
            check_listen(&addr(ok), false, false).unwrap();
        }
        for beyond in ["0.0.0.0:8480", "192.0.2.7:8480", "[::]:8480"] {
            let err = format!("{:#}", check_listen(&addr(beyond), false, false).unwrap_err());
            assert!(err.contains("without TLS") && err.contains("--insecure-listen-any"), "{err}");
            check_listen(&addr(beyond), true, false).unwrap();
            check_listen(&addr(beyond), false, true).unwrap();
        }
    }

    #[test]
    fn a_password_file_is_private_one_line_and_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\r\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(format!("{:#}", read_password_file(&p).unwrap_err()).contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_password_file(&p).unwrap(), b"s3cret");
        std::fs::write(&p, "\n").unwrap();
        assert!(format!("{:#}", read_password_file(&p).unwrap_err()).contains("is empty"));
    }
}
