//! The owner's web console (`owner serve`) in a real browser: headless Chromium driven through
//! chromedriver (WebDriver, with fantoccini), on a fleet over the Maildir transport. It logs in (after a
//! wrong password is refused), approves a generation that `require-approval` held back, filters the fleet,
//! opens a recipient and suspends it, and checks every page against `owner status --json` and the state
//! database; a plain HTTP client checks that a form without its CSRF token changes nothing. The dashboard's
//! screenshot is kept as `target/artifacts/console-dashboard.png`.
//!
//! Chromium is not optional: without Debian's `chromium` and `chromium-driver` (which `scripts/test.sh`
//! installs) the test fails and says so.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::util::*;

const PASSWORD: &str = "correct horse battery staple";
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Polls `f` until it gives a value, for at most `secs` seconds.
fn poll<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// chromedriver on a free loopback port; killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start(log: &Path) -> Driver {
        for (bin, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(bin).exists(),
                "`{bin}` is missing: the console's browser test needs Debian's `{package}` package \
                 (`apt-get install chromium chromium-driver`; scripts/test.sh installs both)"
            );
        }
        // Its own process group, which the browsers it starts join: dropping the driver ends them all,
        // however the test ends.
        let child = Command::new(CHROMEDRIVER)
            .args(["--port=0", "--allowed-ips=127.0.0.1"])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start chromedriver");
        let port = poll(30, "chromedriver to start", || {
            let text = std::fs::read_to_string(log).ok()?;
            let rest = text.split("started successfully on port ").nth(1)?;
            rest.trim_end_matches(|c: char| !c.is_ascii_digit()).split('.').next()?.trim().parse().ok()
        });
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The `kill` command keeps the tests free of `unsafe`; the group is our own child's.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on its own connection: status, headers (lowercased names), body.
pub(crate) fn http(addr: &str, method: &str, path: &str, cookie: Option<&str>, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let cookie = cookie.map(|c| format!("Cookie: {c}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{cookie}Content-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    BufReader::new(s).read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap();
    (status, head.to_lowercase(), body.to_owned())
}

/// The rows of the fleet table now shown: name -> (state, generation, suspended).
async fn fleet_rows(c: &Client) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for tr in c.find_all(Locator::Css("#fleet tbody tr")).await.unwrap() {
        let a = |k: &'static str| {
            let tr = tr.clone();
            async move { tr.attr(k).await.unwrap().unwrap_or_default() }
        };
        out.push((a("data-name").await, a("data-state").await, a("data-generation").await, a("data-suspended").await));
    }
    out
}

/// Waits (at most 15 s) for an element of the page a click leads to; fails with the page's source.
async fn wait(c: &Client, css: &str) -> fantoccini::elements::Element {
    match c.wait().at_most(Duration::from_secs(15)).for_element(Locator::Css(css)).await {
        Ok(e) => e,
        Err(e) => panic!("no `{css}` on the page ({e}):\n{}", c.source().await.unwrap_or_default()),
    }
}

fn status_generations(w: &World) -> Vec<(String, String)> {
    let s = w.owner_status();
    s["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let g = r["applied_generation"].as_u64().map_or("–".to_owned(), |g| g.to_string());
            (r["name"].as_str().unwrap().to_owned(), g)
        })
        .collect()
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser_shows_the_fleet_and_its_actions_need_a_login_and_csrf_token() {
    let started = Instant::now();
    let w = World::new();
    // Under require-approval a published generation waits for the admin.
    let cfg = std::fs::read_to_string(&w.owner_config).unwrap();
    std::fs::write(&w.owner_config, cfg.replacen("[owner]\n", "[owner]\nrequire-approval = true\n", 1)).unwrap();
    put(&w.source, "app/config.txt", b"version 1\n", 0o644);
    put(&w.source, "README", b"fleet\n", 0o644);
    assert_eq!(w.publish(), 1);
    let approved = run(&["owner", "approve", "--config", &w.owner_config, "--generation", "1"]);
    assert!(approved.status.success(), "{}", String::from_utf8_lossy(&approved.stderr));
    assert!(String::from_utf8_lossy(&approved.stderr).contains("approved generation default/1"));

    let names = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];
    let sites: Vec<Site> = names.iter().map(|n| w.site(n)).collect();
    let seen = &sites[..5]; // foxtrot never asks
    for s in seen {
        s.run(true);
    }
    w.owner_run();
    for s in seen {
        s.run(false);
    }
    w.owner_run();

    // Generation 2 is published but not approved: a request is answered with generation 1.
    put(&w.source, "app/config.txt", b"version 2\n", 0o644);
    assert_eq!(w.publish(), 2);
    w.sync(&sites[0]);
    assert_eq!(std::fs::read(sites[0].data.join("app/config.txt")).unwrap(), b"version 1\n", "held back");

    // The console, and a browser.
    let pw = w.path("console.password");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let serve = Daemon::start(
        &[
            "owner",
            "serve",
            "--config",
            &w.owner_config,
            "--listen",
            "127.0.0.1:0",
            "--password-file",
            pw.to_str().unwrap(),
        ],
        w.path("serve.log"),
    );
    let base = poll(30, "the console to listen", || {
        let log = serve.log();
        let url = log.split("console listening on ").nth(1)?.split_whitespace().next()?.to_owned();
        Some(url.trim_end_matches('/').to_owned())
    });
    let addr = base.trim_start_matches("http://").to_owned();
    let driver = Driver::start(&w.path("chromedriver.log"));
    let profile = w.path("chromium-profile");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", format!("--user-data-dir={}", profile.display())],
        }),
    );
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("could not open a Chromium session through chromedriver");

    // Every page needs a login; a wrong password is refused.
    c.goto(&format!("{base}/")).await.unwrap();
    assert_eq!(c.current_url().await.unwrap().path(), "/login");
    c.find(Locator::Css("#secret")).await.unwrap().send_keys("not the password").await.unwrap();
    c.find(Locator::Css("form.login button")).await.unwrap().click().await.unwrap();
    let alert = wait(&c, "[role=alert]").await.text().await.unwrap();
    assert!(alert.contains("Wrong password"), "{alert}");
    assert_eq!(c.current_url().await.unwrap().path(), "/login");
    assert!(c.find(Locator::Css("#fleet")).await.is_err(), "no fleet table without a login");
    c.find(Locator::Css("#secret")).await.unwrap().send_keys(PASSWORD).await.unwrap();
    c.find(Locator::Css("form.login button")).await.unwrap().click().await.unwrap();
    wait(&c, "#fleet").await;
    assert_eq!(c.current_url().await.unwrap().path(), "/");
    let source = c.source().await.unwrap();
    assert!(!source.to_lowercase().contains("<script"), "the console works without JavaScript: it has none");

    // The fleet as `owner status --json` has it: five on generation 1, one never seen; 1 is offered.
    let rows = fleet_rows(&c).await;
    assert_eq!(rows.len(), 6, "{rows:?}");
    let shown: Vec<(String, String)> = rows.iter().map(|r| (r.0.clone(), r.2.clone())).collect();
    assert_eq!(shown, status_generations(&w));
    for (name, state, ..) in &rows {
        let want = if name == "foxtrot" { "never-seen" } else { "current" };
        assert_eq!(state, want, "{name}");
    }
    assert_eq!(c.find(Locator::Css("#offered")).await.unwrap().text().await.unwrap(), "1");

    // Approve generation 2 from the generations page.
    c.find(Locator::LinkText("Generations")).await.unwrap().click().await.unwrap();
    wait(&c, "#approve-default-2").await.click().await.unwrap();
    let row = wait(&c, "#generations tr[data-generation='2'][data-approved='true']").await;
    assert_eq!(row.attr("data-approved").await.unwrap().as_deref(), Some("true"));
    assert_eq!(row.attr("data-offered").await.unwrap().as_deref(), Some("true"));
    let state = w.path("owner/state.db");
    {
        let db = mailferry::db::Db::open(&state).unwrap();
        assert_eq!(db.latest_approved_generation("default").unwrap().map(|g| g.number), Some(2));
        let last = db.actions(1).unwrap().pop().unwrap();
        assert_eq!((last.action.as_str(), last.target.as_str()), ("approve", "default/2"));
        assert!(last.actor.starts_with("console 127.0.0.1"), "{}", last.actor);
    }
    // Now the owner offers it: bravo comes up to date, the others are behind.
    w.sync(&sites[1]);
    assert_eq!(std::fs::read(sites[1].data.join("app/config.txt")).unwrap(), b"version 2\n");

    // Filter to behind and failed recipients with the form.
    c.find(Locator::LinkText("Fleet")).await.unwrap().click().await.unwrap();
    for s in ["behind", "failed"] {
        wait(&c, &format!("input[name=state][value={s}]")).await.click().await.unwrap();
    }
    c.find(Locator::Css("form.filter button")).await.unwrap().click().await.unwrap();
    wait(&c, "input[name=state][value=failed][checked]").await;
    let url = c.current_url().await.unwrap();
    assert_eq!(url.query(), Some("state=behind&state=failed&channel=&q="), "{url}");
    let rows = fleet_rows(&c).await;
    let behind: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(behind, ["alpha", "charlie", "delta", "echo"], "{rows:?}");
    assert!(rows.iter().all(|r| r.1 == "behind" && r.2 == "1"), "{rows:?}");
    let want: Vec<String> = status_generations(&w).into_iter().filter(|(_, g)| g == "1").map(|(n, _)| n).collect();
    assert_eq!(behind, want, "the page and `owner status --json` agree");

    // One recipient's page: its history, then suspend it.
    c.find(Locator::LinkText("charlie")).await.unwrap().click().await.unwrap();
    let state_dd = wait(&c, "#state").await;
    assert_eq!(state_dd.attr("data-state").await.unwrap().as_deref(), Some("behind"));
    let receipts = c.find_all(Locator::Css("#receipts tbody tr")).await.unwrap();
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0].attr("data-generation").await.unwrap().as_deref(), Some("1"));
    c.find(Locator::Css("#suspend")).await.unwrap().click().await.unwrap();
    wait(&c, "#resume").await;
    let suspended = c.find(Locator::Css("#suspended")).await.unwrap().text().await.unwrap();
    assert!(suspended.starts_with("yes"), "{suspended}");
    // The owner answers it "suspended" now, and nothing else: its tree stays at generation 1, its status
    // says so, and the console shows it not entitled, for that reason.
    w.sync(&sites[2]);
    assert_eq!(std::fs::read(sites[2].data.join("app/config.txt")).unwrap(), b"version 1\n");
    assert_eq!(sites[2].status()["standing"], "suspended");
    c.goto(&format!("{base}/recipient?name=charlie")).await.unwrap();
    let state_dd = wait(&c, "#state").await;
    assert_eq!(state_dd.attr("data-state").await.unwrap().as_deref(), Some("not-entitled"));

    // A form without its session's CSRF token changes nothing, nor one without a session.
    let cookie = c.get_named_cookie("mf_session").await.unwrap();
    let cookie = format!("mf_session={}", cookie.value());
    let page = http(&addr, "GET", "/recipient?name=delta", Some(&cookie), "").2;
    let token = page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    for (cookie, body) in [
        (Some(cookie.as_str()), "name=delta&on=true".to_owned()),
        (Some(cookie.as_str()), format!("name=delta&on=true&csrf={}", "0".repeat(64))),
        (None, format!("name=delta&on=true&csrf={token}")),
    ] {
        let (status, _, text) = http(&addr, "POST", "/suspend", cookie, &body);
        assert_eq!(status, 403, "{body}: {text}");
        assert!(text.contains("CSRF token"), "{text}");
        let (status, ..) = http(&addr, "POST", "/approve", cookie, &body.replace("name=delta", "generation=1"));
        assert_eq!(status, 403);
    }
    let db = mailferry::db::Db::open(&state).unwrap();
    assert!(!db.recipient("delta").unwrap().unwrap().suspended, "nothing changed");
    // With the token, the same form acts (so the refusals above were the token's doing).
    let (status, head, _) = http(&addr, "POST", "/suspend", Some(&cookie), &format!("name=delta&on=true&csrf={token}"));
    assert_eq!(status, 303, "{head}");
    assert!(db.recipient("delta").unwrap().unwrap().suspended);
    ok(&["owner", "resume", "--config", &w.owner_config, "--name", "delta"]);
    assert!(!db.recipient("delta").unwrap().unwrap().suspended);
    // The session cookie is HttpOnly and SameSite=Strict (Secure needs TLS: see the TLS test).
    let (_, head, _) = http(&addr, "GET", "/login", None, "");
    assert!(head.contains("set-cookie: mf_session=") && head.contains("httponly; samesite=strict"), "{head}");
    assert!(head.contains("content-security-policy: default-src 'none'"), "{head}");
    // A session that has not logged in (the login form's) sees no page.
    let anonymous = head.split("set-cookie: ").nth(1).unwrap().split(';').next().unwrap().to_owned();
    for path in ["/", "/recipient?name=alpha", "/generations", "/intrusions"] {
        let (status, head, _) = http(&addr, "GET", path, Some(&anonymous), "");
        assert!(status == 303 && head.contains("location: /login"), "{path}: {head}");
    }

    // Resumed, delta is answered again. (Charlie stays suspended for the screenshot; a request refused while
    // suspended is not answered later: the recipient asks again after its reply-timeout.)
    w.sync(&sites[3]);
    assert_eq!(std::fs::read(sites[3].data.join("app/config.txt")).unwrap(), b"version 2\n");

    // The dashboard after it all, as a person sees it, and on a phone's width.
    c.goto(&format!("{base}/")).await.unwrap();
    wait(&c, "#fleet").await;
    let rows = fleet_rows(&c).await;
    let states: Vec<(&str, &str)> = rows.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
    let suspended: Vec<&str> = rows.iter().filter(|r| r.3 == "true").map(|r| r.0.as_str()).collect();
    assert_eq!(suspended, ["charlie"]);
    assert_eq!(
        states,
        [
            ("alpha", "behind"),
            ("bravo", "current"),
            ("charlie", "not-entitled"),
            ("delta", "current"),
            ("echo", "behind"),
            ("foxtrot", "never-seen")
        ]
    );
    let shown: Vec<(String, String)> = rows.iter().map(|r| (r.0.clone(), r.2.clone())).collect();
    assert_eq!(shown, status_generations(&w));
    let png = c.screenshot().await.unwrap();
    assert_eq!(&png[1..4], b"PNG");
    std::fs::write(artifacts().join("console-dashboard.png"), &png).unwrap();
    c.set_window_size(390, 844).await.unwrap();
    c.goto(&format!("{base}/")).await.unwrap();
    let (_, _, width, _) = c.find(Locator::Css("#fleet")).await.unwrap().rectangle().await.unwrap();
    let viewport = c.find(Locator::Css("body")).await.unwrap().rectangle().await.unwrap().2;
    assert!(width <= viewport + 1.0, "the table is {width}px wide on a {viewport}px phone screen");
    std::fs::write(artifacts().join("console-phone.png"), c.screenshot().await.unwrap()).unwrap();

    // Resumed from its page, charlie is answered again once its refused request counts as lost.
    c.set_window_size(1280, 900).await.unwrap();
    c.goto(&format!("{base}/recipient?name=charlie")).await.unwrap();
    wait(&c, "#resume").await.click().await.unwrap();
    wait(&c, "#suspend").await;
    let cfg = std::fs::read_to_string(&sites[2].config).unwrap();
    std::fs::write(&sites[2].config, cfg.replace("reply-timeout = \"6h\"", "reply-timeout = \"0s\"")).unwrap();
    w.sync(&sites[2]);
    assert_eq!(std::fs::read(sites[2].data.join("app/config.txt")).unwrap(), b"version 2\n");

    // Logging out ends the session.
    c.find(Locator::Css("nav form button")).await.unwrap().click().await.unwrap();
    wait(&c, "#secret").await;
    assert_eq!(c.current_url().await.unwrap().path(), "/login");
    let (status, head, _) = http(&addr, "GET", "/", Some(&cookie), "");
    assert!(status == 303 && head.contains("location: /login"), "{head}");

    c.close().await.unwrap();
    drop(driver);
    let log = serve.stop();
    assert!(log.contains("login refused"), "{log}");
    eprintln!("console browser test took {:.1} s", started.elapsed().as_secs_f64());
}

/// Runs `mailferry ARGS`, which must exit 2 within 20 s (a console that starts instead is killed and
/// the test fails); returns stderr.
fn refused_at_start(args: &[&str]) -> String {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status, Some(2), "mailferry {}: {err}", args.join(" "));
    err
}

#[test]
fn the_console_refuses_to_listen_beyond_loopback_without_tls_and_an_open_password_file() {
    let w = World::new();
    // A documentation address: were the rule gone, binding it would fail otherwise, and nothing listens.
    let err = refused_at_start(&["owner", "serve", "--config", &w.owner_config, "--listen", "192.0.2.1:8480"]);
    assert!(
        err.contains("refusing to listen on 192.0.2.1:8480 without TLS") && err.contains("--insecure-listen-any"),
        "{err}"
    );
    let pw = w.path("pw");
    std::fs::write(&pw, "x\n").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let args = ["owner", "serve", "--config", &w.owner_config, "--listen", "127.0.0.1:0", "--password-file"];
    let err = refused_at_start(&[&args[..], &[pw.to_str().unwrap()]].concat());
    assert!(err.contains("readable by others"), "{err}");
}

#[tokio::test]
async fn under_tls_the_session_cookie_is_secure_and_host_only() {
    use rustls::pki_types::pem::PemObject;
    let w = World::new();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (w.path("cert.pem"), w.path("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let serve = Daemon::start(
        &[
            "owner",
            "serve",
            "--config",
            &w.owner_config,
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        w.path("serve.log"),
    );
    let addr = poll(30, "the console to listen", || {
        let log = serve.log();
        let url = log.split("console listening on https://").nth(1)?.split('/').next()?.to_owned();
        Some(url)
    });
    // Without --password-file, the token is in the state directory, readable by its owner only.
    let token = w.path("owner/console-token");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(ck.cert.pem().as_bytes()).unwrap()).unwrap();
    let cfg =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(format!("GET /login HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(
        text.contains("set-cookie: __host-mf_session=") && text.contains("httponly; samesite=strict; secure"),
        "{text}"
    );
    // Plain HTTP on the TLS port gets nothing.
    let mut plain = TcpStream::connect(&addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    plain.write_all(b"GET /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(!got.starts_with(b"HTTP/"), "plain HTTP must not be served on the TLS port");
    serve.stop();
}
