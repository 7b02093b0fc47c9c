//! Incoming mail: reads mailferry's messages from the node's IMAP mailbox and files them afterwards.
//!
//! Only messages carrying an `X-Mailferry` header, and delivery reports quoting one, are ever fetched or
//! moved; anything else in the mailbox (a person's mail) is left exactly as it is. Bodies are fetched with `BODY.PEEK[]`, so the
//! `\Seen` flag is never set. A message stays in the inbox until [`ImapMailbox::settle`] moves it.
//!
//! This module must not interpret messages: it hands out raw bytes and moves what it is told to move.
//! Every network wait is bounded by the configured timeout, except IDLE, which is bounded by the
//! caller's `max` and re-issued at most every [`IDLE_REISSUE`].

use std::collections::HashSet;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_imap::error::Error as ImapError;
use async_imap::extensions::idle::IdleResponse;
use async_imap::imap_proto::{Response, Status};
use async_imap::types::UnsolicitedResponse;
use futures::TryStreamExt as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::config::{AuthMechanism, ConfigError, Endpoint, ImapConfig, Security};
use super::tls;
use crate::retry::{Backoff, random_unit};
use crate::transport::{Disposition, Incoming, TransportError, TransportErrorKind};

/// IDLE is ended and re-issued after this long, well below the 29 minutes of RFC 2177 and the
/// ~10-minute NAT and proxy timeouts seen in practice.
pub const IDLE_REISSUE: Duration = Duration::from_secs(9 * 60);
/// The search that selects mailferry's messages: any value of the header, not yet flagged deleted
/// (without MOVE and UIDPLUS a filed message stays behind with `\Deleted` until someone expunges).
/// mailferry's messages, and delivery reports about them (they quote the original's headers, marker
/// included, in their body).
const SEARCH: &str =
    "UNDELETED OR HEADER X-Mailferry \"\" (HEADER Content-Type \"delivery-status\" BODY \"X-Mailferry\")";
/// Bodies are fetched in batches of at most this many messages ...
const FETCH_BATCH_MESSAGES: usize = 16;
/// ... or this many bytes, whichever comes first, so one response stays reasonably small.
const FETCH_BATCH_BYTES: u64 = 32 * 1024 * 1024;
/// The slowest download rate a fetch is allowed before it times out, on top of the configured timeout.
const MIN_DOWNLOAD_BYTES_PER_SEC: u64 = 32 * 1024;

/// What ended a [`ImapMailbox::wait_for_mail`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The server reported a change, a poll interval passed, or the connection was re-established:
    /// call `fetch` now.
    MaybeNewMail,
    /// `max` passed without news.
    TimedOut,
}

/// The connection to the IMAP server: plain TCP (before STARTTLS or with `security = "none"`) or TLS.
#[derive(Debug)]
pub enum ImapStream {
    /// Unencrypted TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for ImapStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ImapStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

type Session = async_imap::Session<ImapStream>;

/// A logged-in session with the inbox selected.
struct Connected {
    session: Session,
    uid_validity: u32,
    has_move: bool,
    has_uidplus: bool,
    has_idle: bool,
    /// The server's hierarchy delimiter, used in place of `/` in configured folder names.
    delimiter: Option<String>,
    /// Folders known to exist (created or found) on this connection.
    folders: HashSet<String>,
}

/// The node's own IMAP mailbox.
pub struct ImapMailbox {
    endpoint: Endpoint,
    config: ImapConfig,
    conn: Option<Connected>,
    /// Waits between reconnection attempts: 1 s doubling up to 5 minutes, jittered.
    reconnect: Backoff,
}

impl std::fmt::Debug for ImapMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapMailbox")
            .field("endpoint", &self.endpoint)
            .field("inbox", &self.config.inbox)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl ImapMailbox {
    /// Checks `config`; does not connect.
    ///
    /// # Errors
    /// The settings are unusable (see [`ImapConfig::endpoint`]).
    pub fn new(config: &ImapConfig) -> Result<Self, ConfigError> {
        Ok(ImapMailbox {
            endpoint: config.endpoint()?,
            config: config.clone(),
            conn: None,
            reconnect: Backoff::default(),
        })
    }

    /// The checked server settings.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Returns mailferry's messages in the inbox, oldest (lowest UID) first, without moving them or
    /// setting `\Seen`. Each [`Incoming::id`] is `"{uidvalidity}:{uid}"`.
    ///
    /// A connection that was dropped since the last call is re-established once, transparently.
    ///
    /// # Errors
    /// [`TransportErrorKind::Auth`] if the login is refused, `Transient` for connection problems and
    /// timeouts, `Permanent` if the server refuses a command (for example a missing inbox).
    pub async fn fetch(&mut self) -> Result<Vec<Incoming>, TransportError> {
        let mut retried = false;
        loop {
            let was_connected = self.conn.is_some();
            self.ensure_connected().await?;
            let res = match self.conn.as_mut() {
                Some(conn) => fetch_in(conn, &self.endpoint, &self.config.inbox).await,
                None => Err(not_connected()),
            };
            match res {
                Err(e) if e.kind == TransportErrorKind::Transient && was_connected && !retried => {
                    tracing::debug!(error = %e, "imap connection lost, reconnecting once");
                    self.conn = None;
                    retried = true;
                }
                Err(e) => {
                    self.drop_unless_permanent(&e);
                    return Err(e);
                }
                Ok(found) => return Ok(found),
            }
        }
    }

    /// Moves the message `id` (from [`ImapMailbox::fetch`]) to the processed or rejected folder,
    /// creating the folder if needed. Uses `UID MOVE` when the server has it, otherwise `UID COPY`,
    /// `\Deleted` and `UID EXPUNGE` (only that UID; without UIDPLUS the deleted copy stays until
    /// someone expunges, and is no longer fetched).
    ///
    /// # Errors
    /// `Permanent` if `id` is malformed or from an older UIDVALIDITY (the message will be fetched
    /// again under a new id; nothing is moved), or the folder cannot be created; otherwise as `fetch`.
    pub async fn settle(&mut self, id: &str, disposition: Disposition) -> Result<(), TransportError> {
        let folder_cfg = match disposition {
            Disposition::Processed => self.config.processed.clone(),
            Disposition::Rejected => self.config.rejected.clone(),
        };
        let mut retried = false;
        loop {
            let was_connected = self.conn.is_some();
            self.ensure_connected().await?;
            let res = match self.conn.as_mut() {
                Some(conn) => settle_in(conn, &self.endpoint, &self.config.inbox, id, &folder_cfg).await,
                None => Err(not_connected()),
            };
            match res {
                Err(e) if e.kind == TransportErrorKind::Transient && was_connected && !retried => {
                    tracing::debug!(error = %e, "imap connection lost, reconnecting once");
                    self.conn = None;
                    retried = true;
                }
                Err(e) => {
                    self.drop_unless_permanent(&e);
                    return Err(e);
                }
                Ok(()) => return Ok(()),
            }
        }
    }

    /// Waits until new mail may be there, at most `max`.
    ///
    /// With IDLE (server capability and `idle = true`) this returns within about a second of a delivery
    /// (Dovecot notifies after 0.5 s); IDLE is re-issued every [`IDLE_REISSUE`]. Without IDLE it sleeps
    /// `poll-interval` and returns [`Wake::MaybeNewMail`]. A lost connection is re-established with a
    /// backoff of 1 s doubling up to 5 minutes, less up to half at random; once it is back this returns `MaybeNewMail`, because mail
    /// may have arrived meanwhile.
    ///
    /// # Errors
    /// The last connection error if the server could not be reached again before `max` passed;
    /// `Auth` at once if the login is refused.
    pub async fn wait_for_mail(&mut self, max: Duration) -> Result<Wake, TransportError> {
        let deadline = Instant::now() + max;
        loop {
            if self.conn.is_none() {
                match self.connect().await {
                    Ok(c) => {
                        self.conn = Some(c);
                        self.reconnect.reset();
                        return Ok(Wake::MaybeNewMail);
                    }
                    Err(e) if e.kind == TransportErrorKind::Transient => {
                        let now = Instant::now();
                        if now >= deadline {
                            return Err(e);
                        }
                        // Jittered, so that a fleet does not reconnect in step after an outage.
                        let delay = self.reconnect.failed_with(random_unit()).min(deadline - now);
                        tracing::warn!(error = %e, retry_in = ?delay, "imap server unreachable");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Wake::TimedOut);
            }
            let Some(mut c) = self.conn.take() else {
                continue;
            };
            // News that arrived with the responses to earlier commands (after fetch's search).
            if drain_news(&mut c.session) {
                self.conn = Some(c);
                return Ok(Wake::MaybeNewMail);
            }
            if !(self.config.idle && c.has_idle) {
                self.conn = Some(c);
                let nap = self.config.poll_interval.min(deadline - now);
                tokio::time::sleep(nap).await;
                return Ok(if nap == self.config.poll_interval { Wake::MaybeNewMail } else { Wake::TimedOut });
            }
            let slice = IDLE_REISSUE.min(deadline - now);
            match idle_once(c, &self.endpoint, slice).await {
                Ok((c, woke)) => {
                    self.conn = Some(c);
                    if woke {
                        return Ok(Wake::MaybeNewMail);
                    }
                }
                Err(e) => {
                    // The connection is gone; the next round reconnects (with backoff on failure).
                    tracing::debug!(error = %e, "imap idle ended with an error");
                }
            }
        }
    }

    /// Connects, logs in, selects the inbox and logs out, once (`mailferry check`). Returns what the
    /// server offers, for a person.
    ///
    /// # Errors
    /// As [`ImapMailbox::fetch`].
    pub async fn probe(&mut self) -> Result<String, TransportError> {
        let c = self.connect().await?;
        let idle = match (self.config.idle, c.has_idle) {
            (true, true) => "IDLE",
            (false, _) => "polling (idle = false)",
            (true, false) => "polling (no IDLE)",
        };
        let moves = if c.has_move { "MOVE" } else { "no MOVE: COPY and EXPUNGE" };
        let text = format!("logged in, `{}` selected ({idle}, {moves})", self.config.inbox);
        self.conn = Some(c);
        self.logout().await;
        Ok(text)
    }

    /// Whether [`ImapMailbox::wait_for_mail`] uses IDLE (true) or polls (false); `None` before the first
    /// connection, which is when the server's capabilities become known.
    pub fn uses_idle(&self) -> Option<bool> {
        self.conn.as_ref().map(|c| self.config.idle && c.has_idle)
    }

    /// Logs out politely; errors are ignored because the connection is dropped either way.
    pub async fn logout(&mut self) {
        if let Some(mut c) = self.conn.take() {
            let _ = tokio::time::timeout(self.endpoint.timeout, c.session.logout()).await;
        }
    }

    fn drop_unless_permanent(&mut self, e: &TransportError) {
        if e.kind != TransportErrorKind::Permanent {
            self.conn = None;
        }
    }

    async fn ensure_connected(&mut self) -> Result<(), TransportError> {
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
            self.reconnect.reset();
        }
        Ok(())
    }

    /// Connects, secures, logs in, learns capabilities and the delimiter, selects the inbox.
    async fn connect(&self) -> Result<Connected, TransportError> {
        let ep = &self.endpoint;
        let limit = ep.timeout;
        let what = format!("imap connect to {}", ep.addr());
        let tcp =
            timed(limit, &what, async { TcpStream::connect((ep.host.as_str(), ep.port)).await.map_err(Into::into) })
                .await?;
        let _ = tcp.set_nodelay(true);
        let client = match ep.security {
            Security::None => {
                let mut client = async_imap::Client::new(ImapStream::Plain(tcp));
                greeting(&mut client, ep).await?;
                client
            }
            Security::Tls => {
                let tls = handshake(ep, tcp).await?;
                let mut client = async_imap::Client::new(ImapStream::Tls(Box::new(tls)));
                greeting(&mut client, ep).await?;
                client
            }
            Security::Starttls => {
                let mut plain = async_imap::Client::new(tcp);
                greeting(&mut plain, ep).await?;
                let what = format!("imap STARTTLS with {} (required by security = \"starttls\")", ep.addr());
                timed(limit, &what, plain.run_command_and_check_ok("STARTTLS", None)).await.map_err(|mut e| {
                    // A server that refuses STARTTLS will refuse it next time too: never fall back.
                    if e.kind != TransportErrorKind::Transient {
                        e.kind = TransportErrorKind::Permanent;
                    }
                    e
                })?;
                let tls = handshake(ep, plain.into_inner()).await?;
                // No greeting after STARTTLS (RFC 3501 6.2.1).
                async_imap::Client::new(ImapStream::Tls(Box::new(tls)))
            }
        };

        let auth_what = format!("imap login to {} as {}", ep.addr(), ep.username);
        let secret = ep
            .secret
            .read()
            .await
            .map_err(|e| TransportError::new(TransportErrorKind::Auth, format!("{auth_what}: credentials"), e))?;
        let login = async {
            match ep.auth {
                AuthMechanism::Plain | AuthMechanism::Login => {
                    client.login(&ep.username, secret.expose()).await.map_err(|(e, _)| e)
                }
                AuthMechanism::Xoauth2 => {
                    let auth = XOauth2 { user: ep.username.clone(), token: secret.expose().to_string() };
                    client.authenticate("XOAUTH2", auth).await.map_err(|(e, _)| e)
                }
            }
        };
        let mut session = match tokio::time::timeout(limit, login).await {
            Err(_) => return Err(timeout_error(&auth_what, limit)),
            Ok(Err(e @ (ImapError::No(_) | ImapError::Bad(_)))) => {
                return Err(TransportError::new(TransportErrorKind::Auth, format!("{auth_what} refused"), e));
            }
            Ok(Err(e)) => return Err(TransportError::new(classify(&e), auth_what, e)),
            Ok(Ok(s)) => s,
        };

        // MOVE appears only after login on Dovecot, so ask now rather than trusting the greeting.
        let what = format!("imap CAPABILITY at {}", ep.addr());
        let caps = timed(limit, &what, session.capabilities()).await?;
        let has_move = caps.has_str("MOVE");
        let has_uidplus = caps.has_str("UIDPLUS");
        let has_idle = caps.has_str("IDLE");

        let what = format!("imap LIST for the hierarchy delimiter at {}", ep.addr());
        let names = timed(limit, &what, async {
            let stream = session.list(None, None).await?;
            stream.try_collect::<Vec<_>>().await
        })
        .await?;
        let delimiter = names.iter().find_map(|n| n.delimiter().map(str::to_string));

        let what = format!("imap SELECT `{}` as {} at {}", self.config.inbox, ep.username, ep.addr());
        let mailbox = timed(limit, &what, session.select(&self.config.inbox)).await?;
        let uid_validity = mailbox.uid_validity.ok_or_else(|| {
            TransportError::new(TransportErrorKind::Permanent, &what, anyhow::anyhow!("server sent no UIDVALIDITY"))
        })?;
        tracing::debug!(server = %ep.addr(), user = %ep.username, uid_validity, has_move, has_idle, "imap connected");
        Ok(Connected { session, uid_validity, has_move, has_uidplus, has_idle, delimiter, folders: HashSet::new() })
    }
}

/// XOAUTH2 initial response (Google/Microsoft style).
struct XOauth2 {
    user: String,
    token: String,
}

impl async_imap::Authenticator for XOauth2 {
    type Response = String;

    fn process(&mut self, _challenge: &[u8]) -> String {
        format!("user={}\x01auth=Bearer {}\x01\x01", self.user, self.token)
    }
}

async fn handshake(
    ep: &Endpoint,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TransportError> {
    let what = format!("imap TLS handshake with {}", ep.addr());
    let config = tls::rustls_config(ep).map_err(|e| TransportError::new(TransportErrorKind::Permanent, &what, e))?;
    let name = tls::server_name(ep).map_err(|e| TransportError::new(TransportErrorKind::Permanent, &what, e))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(ep.timeout, connector.connect(name, tcp)).await {
        Err(_) => Err(timeout_error(&what, ep.timeout)),
        Ok(Err(e)) => {
            let kind = if tls::is_certificate_error(&e) {
                TransportErrorKind::Permanent
            } else {
                TransportErrorKind::Transient
            };
            Err(TransportError::new(kind, what, e))
        }
        Ok(Ok(s)) => Ok(s),
    }
}

/// Reads the server greeting; `* BYE` (server busy or shutting down) is a transient failure.
async fn greeting<T>(client: &mut async_imap::Client<T>, ep: &Endpoint) -> Result<(), TransportError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + std::fmt::Debug + Send,
{
    let what = format!("imap greeting from {}", ep.addr());
    let res = tokio::time::timeout(ep.timeout, client.read_response())
        .await
        .map_err(|_| timeout_error(&what, ep.timeout))?
        .map_err(|e| TransportError::new(TransportErrorKind::Transient, &what, e))?;
    let Some(resp) = res else {
        return Err(TransportError::new(TransportErrorKind::Transient, what, anyhow::anyhow!("connection closed")));
    };
    match resp.parsed() {
        Response::Data { status: Status::Ok | Status::PreAuth, .. } => Ok(()),
        other => Err(TransportError::new(
            TransportErrorKind::Transient,
            what,
            anyhow::anyhow!("unexpected greeting {other:?}"),
        )),
    }
}

/// Body of [`ImapMailbox::fetch`] on an established connection.
async fn fetch_in(c: &mut Connected, ep: &Endpoint, inbox: &str) -> Result<Vec<Incoming>, TransportError> {
    let limit = ep.timeout;
    // Anything queued so far predates the search below, which sees those messages anyway.
    while c.session.unsolicited_responses.try_recv().is_ok() {}
    let what = format!("imap search for mailferry messages in `{inbox}` of {} at {}", ep.username, ep.addr());
    timed(limit, &what, c.session.noop()).await?;
    let mut uids: Vec<u32> = timed(limit, &what, c.session.uid_search(SEARCH)).await?.into_iter().collect();
    uids.sort_unstable();
    if uids.is_empty() {
        return Ok(Vec::new());
    }

    let what = format!("imap fetch sizes in `{inbox}` of {} at {}", ep.username, ep.addr());
    let set = uid_set(&uids);
    let sizes = timed(limit, &what, async {
        let stream = c.session.uid_fetch(&set, "(UID RFC822.SIZE)").await?;
        stream.try_collect::<Vec<_>>().await
    })
    .await?;
    let mut sized: Vec<(u32, u64)> = sizes
        .iter()
        .filter_map(|f| Some((f.uid?, u64::from(f.size.unwrap_or(0)))))
        .filter(|(u, _)| uids.binary_search(u).is_ok())
        .collect();
    sized.sort_unstable();
    sized.dedup_by_key(|(u, _)| *u);

    let mut out = Vec::with_capacity(sized.len());
    let mut batch: Vec<u32> = Vec::new();
    let mut batch_bytes = 0u64;
    for (idx, &(uid, size)) in sized.iter().enumerate() {
        batch.push(uid);
        batch_bytes += size;
        let last = idx + 1 == sized.len();
        if last || batch.len() >= FETCH_BATCH_MESSAGES || batch_bytes >= FETCH_BATCH_BYTES {
            let set = uid_set(&batch);
            let what = format!("imap fetch of UIDs {set} in `{inbox}` of {} at {}", ep.username, ep.addr());
            let limit = limit + Duration::from_secs(batch_bytes / MIN_DOWNLOAD_BYTES_PER_SEC);
            let fetched = timed(limit, &what, async {
                let stream = c.session.uid_fetch(&set, "(UID BODY.PEEK[])").await?;
                stream.try_collect::<Vec<_>>().await
            })
            .await?;
            for f in &fetched {
                let (Some(uid), Some(body)) = (f.uid, f.body()) else {
                    continue;
                };
                if batch.contains(&uid) {
                    out.push(Incoming { id: format!("{}:{uid}", c.uid_validity), raw: body.to_vec() });
                }
            }
            batch.clear();
            batch_bytes = 0;
        }
    }
    Ok(out)
}

/// Body of [`ImapMailbox::settle`] on an established connection.
async fn settle_in(
    c: &mut Connected,
    ep: &Endpoint,
    inbox: &str,
    id: &str,
    folder_cfg: &str,
) -> Result<(), TransportError> {
    let limit = ep.timeout;
    let folder = server_folder(folder_cfg, c.delimiter.as_deref());
    let what = format!("imap move of message {id} from `{inbox}` to `{folder}` for {} at {}", ep.username, ep.addr());
    let (validity, uid) = parse_id(id).map_err(|e| TransportError::new(TransportErrorKind::Permanent, &what, e))?;
    if validity != c.uid_validity {
        return Err(TransportError::new(
            TransportErrorKind::Permanent,
            what,
            anyhow::anyhow!(
                "UIDVALIDITY of `{inbox}` is now {} (id is from {validity}); nothing moved, the message will be fetched again under a new id",
                c.uid_validity
            ),
        ));
    }
    if !c.folders.contains(&folder) {
        let what = format!("imap create folder `{folder}` for {} at {}", ep.username, ep.addr());
        match timed(limit, &what, c.session.create(&folder)).await {
            Ok(()) => {}
            Err(e) if e.kind == TransportErrorKind::Permanent => {
                // Usually [ALREADYEXISTS]; anything else shows up as a failing LIST below.
                let exists = timed(limit, &what, async {
                    let pattern = quote(&folder);
                    let stream = c.session.list(None, Some(&pattern)).await?;
                    stream.try_collect::<Vec<_>>().await
                })
                .await?
                .iter()
                .any(|n| n.name() == folder);
                if !exists {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
        c.folders.insert(folder.clone());
    }
    let uid = uid.to_string();
    let moved = if c.has_move {
        timed(limit, &what, c.session.uid_mv(&uid, &folder)).await
    } else {
        timed(limit, &what, c.session.uid_copy(&uid, &folder)).await
    };
    if let Err(mut e) = moved {
        if format!("{:#}", e.source).to_ascii_uppercase().contains("TRYCREATE") {
            // The folder vanished since it was created (someone deleted it): create it again next time.
            c.folders.remove(&folder);
            e.kind = TransportErrorKind::Transient;
        }
        return Err(e);
    }
    if !c.has_move {
        timed(limit, &what, async {
            let stream = c.session.uid_store(&uid, "+FLAGS.SILENT (\\Deleted)").await?;
            stream.try_collect::<Vec<_>>().await
        })
        .await?;
        if c.has_uidplus {
            timed(limit, &what, async {
                let stream = c.session.uid_expunge(&uid).await?;
                stream.try_collect::<Vec<_>>().await
            })
            .await?;
        }
    }
    Ok(())
}

/// One IDLE round of at most `slice`. Returns the connection and whether the server reported news.
async fn idle_once(c: Connected, ep: &Endpoint, slice: Duration) -> Result<(Connected, bool), TransportError> {
    let what = format!("imap IDLE on {} at {}", ep.username, ep.addr());
    let Connected { session, uid_validity, has_move, has_uidplus, has_idle, delimiter, folders } = c;
    let mut handle = session.idle();
    timed(ep.timeout, &what, handle.init()).await?;
    let woke = {
        // The StopSource must live until the wait ends: dropping it interrupts the wait at once.
        let (wait, _stop) = handle.wait_with_timeout(slice);
        match tokio::time::timeout(slice + ep.timeout, wait).await {
            Err(_) => return Err(timeout_error(&what, slice + ep.timeout)),
            Ok(Err(e)) => return Err(TransportError::new(classify(&e), what, e)),
            Ok(Ok(IdleResponse::NewData(_))) => true,
            Ok(Ok(IdleResponse::Timeout | IdleResponse::ManualInterrupt)) => false,
        }
    };
    let session = timed(ep.timeout, &what, handle.done()).await?;
    Ok((Connected { session, uid_validity, has_move, has_uidplus, has_idle, delimiter, folders }, woke))
}

/// True if the server announced new or removed messages since the queue was last drained.
fn drain_news(session: &mut Session) -> bool {
    let mut news = false;
    while let Ok(r) = session.unsolicited_responses.try_recv() {
        news |= matches!(r, UnsolicitedResponse::Exists(_) | UnsolicitedResponse::Recent(_));
    }
    news
}

/// Runs one IMAP command with a time limit, mapping errors to transport errors.
async fn timed<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = async_imap::error::Result<T>>,
) -> Result<T, TransportError> {
    match tokio::time::timeout(limit, fut).await {
        Err(_) => Err(timeout_error(what, limit)),
        Ok(Err(e)) => Err(TransportError::new(classify(&e), what, e)),
        Ok(Ok(v)) => Ok(v),
    }
}

fn not_connected() -> TransportError {
    TransportError::new(TransportErrorKind::Transient, "imap connection", anyhow::anyhow!("not connected"))
}

fn timeout_error(what: &str, limit: Duration) -> TransportError {
    TransportError::new(TransportErrorKind::Transient, what, anyhow::anyhow!("no answer within {}s", limit.as_secs()))
}

/// Maps an async-imap error onto what a retry policy needs to know.
fn classify(e: &ImapError) -> TransportErrorKind {
    match e {
        ImapError::Io(io) if tls::is_certificate_error(io) => TransportErrorKind::Permanent,
        ImapError::Io(_) | ImapError::ConnectionLost | ImapError::Parse(_) => TransportErrorKind::Transient,
        // Response codes that say "try again later" (RFC 5530).
        // async-imap renders the code with Debug ("Some(Unavailable)"), hence the case-insensitive match.
        ImapError::No(text)
            if ["UNAVAILABLE", "INUSE", "LIMIT", "SERVERBUG", "EXPUNGEISSUED"]
                .iter()
                .any(|c| text.to_ascii_uppercase().contains(c)) =>
        {
            TransportErrorKind::Transient
        }
        _ => TransportErrorKind::Permanent,
    }
}

/// Splits an [`Incoming::id`] into UIDVALIDITY and UID.
fn parse_id(id: &str) -> anyhow::Result<(u32, u32)> {
    let parse = || -> Option<(u32, u32)> {
        let (v, u) = id.split_once(':')?;
        Some((v.parse().ok()?, u.parse().ok().filter(|u| *u > 0)?))
    };
    parse().ok_or_else(|| anyhow::anyhow!("malformed imap message id `{id}` (expected \"uidvalidity:uid\")"))
}

/// A folder name from the configuration (`/` between levels) in the server's own hierarchy delimiter.
fn server_folder(name: &str, delimiter: Option<&str>) -> String {
    match delimiter {
        Some(d) if d != "/" => name.split('/').collect::<Vec<_>>().join(d),
        _ => name.to_string(),
    }
}

/// `a,b,c` UID set; ranges are not needed for the small sets used here.
fn uid_set(uids: &[u32]) -> String {
    uids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// An IMAP quoted string.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        assert_eq!(parse_id("1700000000:42").unwrap(), (1_700_000_000, 42));
        for bad in ["", "42", "x:1", "1:x", "1:0", "1:2:3", "-1:2"] {
            let err = parse_id(bad).unwrap_err().to_string();
            assert!(err.contains("malformed imap message id"), "{bad}: {err}");
        }
    }

    #[test]
    fn folder_names_follow_the_server_delimiter() {
        assert_eq!(server_folder("mailferry/processed", Some(".")), "mailferry.processed");
        assert_eq!(server_folder("mailferry/processed", Some("/")), "mailferry/processed");
        assert_eq!(server_folder("mailferry/processed", None), "mailferry/processed");
        assert_eq!(uid_set(&[1, 5, 7]), "1,5,7");
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }

    #[test]
    fn no_responses_asking_to_retry_are_transient() {
        assert_eq!(classify(&ImapError::No("[UNAVAILABLE] try later".into())), TransportErrorKind::Transient);
        assert_eq!(classify(&ImapError::No("[NONEXISTENT] no such mailbox".into())), TransportErrorKind::Permanent);
        assert_eq!(classify(&ImapError::ConnectionLost), TransportErrorKind::Transient);
    }
}
