//! The console's login, sessions, CSRF tokens and the brake on guessing: pure state and decisions, with
//! the time passed in, so every rule is unit-tested without a clock.
//!
//! One secret (a password or token read from a file, or a random token written to the state directory)
//! opens a session. A session is a random id in a cookie (`HttpOnly`, `SameSite=Strict`, `Secure` and the
//! `__Host-` prefix under TLS) with a synchronizer CSRF token that every form carries back; the login
//! form has one too, bound to a session that is not logged in yet, and logging in replaces the session id
//! so that an id planted before cannot ride along. Failed logins are counted per client address and in
//! all; past the limit, attempts are refused until the window passes. Nothing here writes to the state.

use std::collections::HashMap;
use std::net::IpAddr;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// A session unused for this long ends (seconds).
pub const IDLE_TIMEOUT: u64 = 30 * 60;
/// A session ends this long after login however busy it is (seconds).
pub const MAX_SESSION_AGE: u64 = 12 * 3600;
/// Failed logins from one address allowed per [`FAILURE_WINDOW`].
pub const MAX_FAILURES_PER_CLIENT: u32 = 5;
/// Failed logins from all addresses together allowed per [`FAILURE_WINDOW`].
pub const MAX_FAILURES_TOTAL: u32 = 20;
/// The window failed logins are counted over (seconds).
pub const FAILURE_WINDOW: u64 = 5 * 60;
/// Sessions kept at most (logged in or not); the oldest go first, so a flood of login pages cannot fill
/// memory.
pub const MAX_SESSIONS: usize = 1024;

/// Whether `given` is the secret: both are hashed to a fixed length first, so the comparison takes the
/// same time whatever the input's length and wherever it differs.
pub fn secret_matches(secret: &[u8], given: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(secret), Sha256::digest(given));
    bool::from(a.as_slice().ct_eq(b.as_slice()))
}

/// Whether two tokens are equal, in constant time for tokens of one length (a different length is not
/// equal, and tells nothing: every token this console makes has the same length).
pub fn token_matches(want: &str, given: &str) -> bool {
    bool::from(want.as_bytes().ct_eq(given.as_bytes()))
}

fn random_hex() -> String {
    let mut b = [0u8; 32];
    crate::crypto::random(&mut b);
    hex::encode(b)
}

/// One session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The synchronizer token its forms carry.
    pub csrf: String,
    /// Logged in (else only the login form may be posted from it).
    pub authenticated: bool,
    /// When it was made (for a logged-in one: when it logged in).
    pub created: u64,
    /// When it was last used.
    pub last_seen: u64,
}

/// Why a login was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    /// The form's CSRF token is missing or not its session's.
    Csrf,
    /// Too many failures: try again in this many seconds.
    TooMany(u64),
    /// Not the secret.
    Wrong,
}

#[derive(Debug, Default)]
struct Failures {
    /// Per client: failures in the current window and when it started.
    clients: HashMap<IpAddr, (u32, u64)>,
    /// All clients.
    total: (u32, u64),
}

impl Failures {
    /// Seconds until `client` may try again, if it may not now.
    fn blocked(&mut self, client: IpAddr, now: u64) -> Option<u64> {
        let open = |(n, start): (u32, u64), max: u32| {
            (n >= max && now < start + FAILURE_WINDOW).then(|| start + FAILURE_WINDOW - now)
        };
        let c = self.clients.get(&client).copied().unwrap_or((0, now));
        open(c, MAX_FAILURES_PER_CLIENT).or_else(|| open(self.total, MAX_FAILURES_TOTAL))
    }

    fn count(&mut self, client: IpAddr, now: u64) {
        let bump = |(n, start): &mut (u32, u64)| {
            if now >= *start + FAILURE_WINDOW {
                (*n, *start) = (0, now);
            }
            *n += 1;
        };
        self.clients.retain(|_, (_, start)| now < *start + FAILURE_WINDOW);
        bump(self.clients.entry(client).or_insert((0, now)));
        bump(&mut self.total);
    }
}

/// The console's sessions and its one secret.
#[derive(Debug)]
pub struct Auth {
    secret: Vec<u8>,
    sessions: HashMap<String, Session>,
    failures: Failures,
}

impl Auth {
    /// Sessions opened by `secret`.
    pub fn new(secret: Vec<u8>) -> Auth {
        Auth { secret, sessions: HashMap::new(), failures: Failures::default() }
    }

    /// The live session with id `id`, touched; an expired one is forgotten.
    pub fn session(&mut self, id: &str, now: u64) -> Option<Session> {
        let s = self.sessions.get_mut(id)?;
        let expired =
            now.saturating_sub(s.last_seen) >= IDLE_TIMEOUT || now.saturating_sub(s.created) >= MAX_SESSION_AGE;
        if expired {
            self.sessions.remove(id);
            return None;
        }
        s.last_seen = now;
        Some(s.clone())
    }

    /// A new session, not logged in: returns its id.
    pub fn anonymous(&mut self, now: u64) -> (String, Session) {
        self.insert(false, now)
    }

    fn insert(&mut self, authenticated: bool, now: u64) -> (String, Session) {
        if self.sessions.len() >= MAX_SESSIONS {
            self.sessions.retain(|_, s| {
                now.saturating_sub(s.last_seen) < IDLE_TIMEOUT && now.saturating_sub(s.created) < MAX_SESSION_AGE
            });
        }
        while self.sessions.len() >= MAX_SESSIONS {
            // Anonymous sessions go first, then the least recently used.
            let Some(oldest) =
                self.sessions.iter().min_by_key(|(_, s)| (s.authenticated, s.last_seen)).map(|(k, _)| k.clone())
            else {
                break;
            };
            self.sessions.remove(&oldest);
        }
        let id = random_hex();
        let s = Session { csrf: random_hex(), authenticated, created: now, last_seen: now };
        self.sessions.insert(id.clone(), s.clone());
        (id, s)
    }

    /// Logs in from the session `id` (the one the login form was served in) with the form's `csrf` token
    /// and `secret`, from `client`. On success the old session ends and a new, logged-in one is returned.
    ///
    /// # Errors
    /// A [`LoginError`]; a wrong secret counts against `client`.
    pub fn login(
        &mut self,
        id: Option<&str>,
        csrf: &str,
        secret: &str,
        client: IpAddr,
        now: u64,
    ) -> Result<(String, Session), LoginError> {
        let session = id.and_then(|id| self.session(id, now));
        if !session.is_some_and(|s| token_matches(&s.csrf, csrf)) {
            return Err(LoginError::Csrf);
        }
        if let Some(wait) = self.failures.blocked(client, now) {
            return Err(LoginError::TooMany(wait));
        }
        if !secret_matches(&self.secret, secret.as_bytes()) {
            self.failures.count(client, now);
            return Err(LoginError::Wrong);
        }
        if let Some(id) = id {
            self.sessions.remove(id);
        }
        Ok(self.insert(true, now))
    }

    /// Ends session `id`.
    pub fn logout(&mut self, id: &str) {
        self.sessions.remove(id);
    }

    /// Whether a form posted from session `id` with token `csrf` may act: the session is logged in and the
    /// token is its own.
    pub fn may_act(&mut self, id: Option<&str>, csrf: &str, now: u64) -> bool {
        id.and_then(|id| self.session(id, now)).is_some_and(|s| s.authenticated && token_matches(&s.csrf, csrf))
    }
}

/// The session cookie's name: with the `__Host-` prefix under TLS, which browsers accept only from a
/// secure origin, for the whole host and no subdomain.
pub fn cookie_name(tls: bool) -> &'static str {
    if tls { "__Host-mf_session" } else { "mf_session" }
}

/// The `Set-Cookie` value for session `id` (`None` ends the cookie).
pub fn set_cookie(id: Option<&str>, tls: bool) -> String {
    let secure = if tls { "; Secure" } else { "" };
    match id {
        Some(id) => format!("{}={id}; Path=/; HttpOnly; SameSite=Strict{secure}", cookie_name(tls)),
        None => format!("{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}", cookie_name(tls)),
    }
}

/// The session id in a `Cookie` header, if any.
pub fn session_id(cookie_header: &str, tls: bool) -> Option<&str> {
    let name = cookie_name(tls);
    cookie_header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

    fn auth() -> Auth {
        Auth::new(b"correct horse".to_vec())
    }

    #[test]
    fn the_secret_compare_is_by_fixed_length_digest() {
        assert!(secret_matches(b"correct horse", b"correct horse"));
        for wrong in [&b""[..], b"correct hors", b"correct horse ", b"Correct horse", b"correct horsf"] {
            assert!(!secret_matches(b"correct horse", wrong), "{wrong:?}");
        }
        assert!(token_matches("ab", "ab"));
        assert!(!token_matches("ab", "ac") && !token_matches("ab", "abc") && !token_matches("ab", ""));
    }

    #[test]
    fn a_login_needs_the_forms_own_csrf_token_and_the_secret_and_replaces_the_session() {
        let mut a = auth();
        let (id, s) = a.anonymous(100);
        assert_eq!(a.login(Some(&id), "", "correct horse", HOME, 101), Err(LoginError::Csrf));
        assert_eq!(a.login(None, &s.csrf, "correct horse", HOME, 101), Err(LoginError::Csrf));
        let (other, _) = a.anonymous(100);
        assert_eq!(a.login(Some(&other), &s.csrf, "correct horse", HOME, 101), Err(LoginError::Csrf));
        assert_eq!(a.login(Some(&id), &s.csrf, "wrong", HOME, 101), Err(LoginError::Wrong));
        assert!(!a.may_act(Some(&id), &s.csrf, 101), "an anonymous session may not act");
        let (new, ns) = a.login(Some(&id), &s.csrf, "correct horse", HOME, 102).unwrap();
        assert_ne!(new, id, "the session id is new after login");
        assert!(a.session(&id, 102).is_none(), "the old id is gone");
        assert!(a.may_act(Some(&new), &ns.csrf, 103));
        assert!(!a.may_act(Some(&new), "", 103), "no token");
        assert!(!a.may_act(Some(&new), &s.csrf, 103), "the token of another session");
        assert!(!a.may_act(None, &ns.csrf, 103), "no session");
        a.logout(&new);
        assert!(!a.may_act(Some(&new), &ns.csrf, 104), "logged out");
    }

    #[test]
    fn sessions_end_when_idle_and_at_their_maximum_age() {
        let mut a = auth();
        let (id, s) = a.anonymous(0);
        let (id, s) = a.login(Some(&id), &s.csrf, "correct horse", HOME, 0).unwrap();
        assert!(a.may_act(Some(&id), &s.csrf, IDLE_TIMEOUT - 1));
        assert!(!a.may_act(Some(&id), &s.csrf, 2 * IDLE_TIMEOUT - 1), "idle for the whole timeout");
        let (id, s) = a.anonymous(0);
        let (id, s) = a.login(Some(&id), &s.csrf, "correct horse", HOME, 0).unwrap();
        let mut t = 0;
        while t + IDLE_TIMEOUT / 2 < MAX_SESSION_AGE {
            t += IDLE_TIMEOUT / 2;
            assert!(a.may_act(Some(&id), &s.csrf, t), "busy at {t}");
        }
        assert!(!a.may_act(Some(&id), &s.csrf, MAX_SESSION_AGE), "too old however busy");
    }

    #[test]
    fn failed_logins_are_braked_per_client_and_in_all() {
        let mut a = auth();
        let (id, s) = a.anonymous(0);
        for _ in 0..MAX_FAILURES_PER_CLIENT {
            assert_eq!(a.login(Some(&id), &s.csrf, "guess", HOME, 10), Err(LoginError::Wrong));
        }
        // Even the right secret is refused now, from that client, until the window ends.
        assert_eq!(
            a.login(Some(&id), &s.csrf, "correct horse", HOME, 11),
            Err(LoginError::TooMany(FAILURE_WINDOW - 1))
        );
        let (oid, os) = a.anonymous(11);
        assert!(a.login(Some(&oid), &os.csrf, "correct horse", OTHER, 11).is_ok(), "another client is not blocked");
        assert!(a.login(Some(&id), &s.csrf, "correct horse", HOME, 10 + FAILURE_WINDOW).is_ok(), "the window passed");

        let mut a = auth();
        let (id, s) = a.anonymous(0);
        for i in 0..MAX_FAILURES_TOTAL {
            let client = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, (i / 200) as u8, (i % 200) as u8));
            assert_eq!(a.login(Some(&id), &s.csrf, "guess", client, 10), Err(LoginError::Wrong));
        }
        assert!(matches!(a.login(Some(&id), &s.csrf, "correct horse", HOME, 11), Err(LoginError::TooMany(_))));
    }

    #[test]
    fn sessions_are_bounded_anonymous_ones_going_first() {
        let mut a = auth();
        let (id, s) = a.anonymous(0);
        let (id, s) = a.login(Some(&id), &s.csrf, "correct horse", HOME, 0).unwrap();
        for _ in 0..MAX_SESSIONS + 10 {
            a.anonymous(1);
        }
        assert_eq!(a.sessions.len(), MAX_SESSIONS);
        assert!(a.may_act(Some(&id), &s.csrf, 2), "the logged-in session survives a flood of login pages");
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_under_tls() {
        let plain = set_cookie(Some("ab"), false);
        assert_eq!(plain, "mf_session=ab; Path=/; HttpOnly; SameSite=Strict");
        let tls = set_cookie(Some("ab"), true);
        assert_eq!(tls, "__Host-mf_session=ab; Path=/; HttpOnly; SameSite=Strict; Secure");
        assert!(set_cookie(None, false).contains("Max-Age=0"));
        let id = "a".repeat(64);
        assert_eq!(session_id(&format!("x=1; mf_session={id}"), false), Some(id.as_str()));
        assert_eq!(session_id(&format!("mf_session={id}"), true), None, "not the TLS cookie");
        assert_eq!(session_id("mf_session=zz", false), None, "not one of ours");
    }
}
