//! The fleet view end to end over the Maildir transport: a scripted fleet of 51 recipients, some current,
//! some behind, one whose apply fails on a full disk, one that rolls back, one that goes quiet and one
//! never set up, each shown in its true state by `owner fleet` (text and JSON, checked against
//! `docs/fleet.schema.json`) within one cycle of the event, the exit code following, and the admin's alert
//! mails arriving once per transition.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

const ADMIN: &str = "admin@vendor.test";

/// Runs `f` over `items` on a few threads (each item is its own process and state directory).
fn in_parallel<T: Sync>(items: &[T], f: impl Fn(&T) + Sync) {
    let chunk = items.len().div_ceil(4).max(1);
    std::thread::scope(|s| {
        for part in items.chunks(chunk) {
            let f = &f;
            s.spawn(move || part.iter().for_each(f));
        }
    });
}

/// Enrolls and initializes recipient `name` (with its own request interval, if given) with its data tree at
/// `data`.
fn enroll(w: &World, name: &str, interval: Option<&str>, data: &Path) -> Site {
    let address = format!("{name}@customer.test");
    let enrollment = w.path(&format!("{name}.enrollment"));
    let e = enrollment.to_str().unwrap();
    let mut args = vec!["owner", "add-recipient", "--config", &w.owner_config, "--name", name, "--address", &address];
    args.extend(["--out", e]);
    if let Some(i) = interval {
        args.extend(["--interval", i]);
    }
    ok(&args);
    let dir = w.path(name);
    init_recipient(&dir, data, &enrollment, &w.spool);
    Site {
        address,
        dir: dir.clone(),
        data: data.to_path_buf(),
        config: dir.join("recipient.toml").to_str().unwrap().into(),
    }
}

/// `owner fleet --json`: the object and the exit code.
fn fleet(w: &World) -> (Value, i32) {
    let args = ["owner", "fleet", "--config", &w.owner_config, "--json"];
    let out = run(&args);
    let code = out.status.code().unwrap();
    assert!(matches!(code, 0 | 1), "owner fleet exited {code}: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    crate::ops::assert_valid("fleet.schema.json", &v);
    assert_eq!(v["attention"].as_bool(), Some(code == 1), "the exit code says what `attention` says");
    (v, code)
}

/// The row of recipient `name`.
fn row<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {v:#}"))
}

/// The alert mails the admin got so far, oldest first.
fn alerts(w: &World) -> Vec<String> {
    let dir = w.spool.join(ADMIN).join("new");
    let mut files: Vec<PathBuf> =
        fs::read_dir(&dir).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    files.sort();
    files
        .iter()
        .map(|p| String::from_utf8_lossy(&fs::read(p).unwrap()).replace("=\r\n", "").replace("\r\n", "\n"))
        .collect()
}

/// How many alert mails mention `needle`.
fn mentions(mails: &[String], needle: &str) -> usize {
    mails.iter().filter(|m| m.contains(needle)).count()
}

/// Runs the owner until `done` holds for the admin's mail, or panics at the deadline.
fn owner_until(w: &World, what: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        w.owner_run();
        let mails = alerts(w);
        if done(&mails) {
            return mails;
        }
        assert!(Instant::now() < deadline, "{what} within 30 s; alert mails so far:\n{}", mails.join("\n-----\n"));
    }
}

#[test]
fn a_fleet_of_fifty_shows_each_recipient_in_its_true_state_and_alerts_once_per_transition() {
    let w = World::new();
    // Alerts go to the admin at most once a second; the fleet's usual interval is an hour.
    let cfg = fs::read_to_string(&w.owner_config).unwrap();
    let cfg = cfg.replace("alert-interval = \"1h\"", "alert-interval = \"1s\"");
    fs::write(&w.owner_config, cfg.replace("[owner]\n", &format!("[owner]\nadmin-address = \"{ADMIN}\"\n"))).unwrap();
    put(&w.source, "a.txt", b"generation 1\n", 0o644);
    assert_eq!(w.publish(), 1);

    // 47 ordinary sites, one whose data tree is on a small file system, one that will roll back, one that
    // is expected every second and goes quiet, and one registered but never set up.
    let names: Vec<String> = (0..47).map(|i| format!("site{i:02}")).collect();
    let disk = Tmpfs::mount(&w.path("small-fs"), "300k");
    let mut sites: Vec<Site> = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = names
            .chunks(12)
            .map(|part| {
                let w = &w;
                s.spawn(move || {
                    part.iter().map(|n| enroll(w, n, None, &w.path(&format!("{n}-data")))).collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            sites.extend(h.join().unwrap());
        }
    });
    let full = enroll(&w, "full", None, &w.path("small-fs/data"));
    let rolled = enroll(&w, "rolled", None, &w.path("rolled-data"));
    let quiet = enroll(&w, "quiet", Some("1s"), &w.path("quiet-data"));
    ok(&[
        "owner",
        "add-recipient",
        "--config",
        &w.owner_config,
        "--name",
        "absent",
        "--address",
        "absent@customer.test",
        "--out",
        w.path("absent.enrollment").to_str().unwrap(),
    ]);
    let (v, code) = fleet(&w);
    assert_eq!(v["recipients"].as_array().unwrap().len(), 51);
    assert_eq!((v["summary"]["never-seen"].as_u64(), code), (Some(51), 0), "nobody made contact yet");

    // Generation 1 everywhere: one cycle.
    let everyone: Vec<&Site> = sites.iter().chain([&full, &rolled, &quiet]).collect();
    in_parallel(&everyone, |s| {
        s.run(true);
    });
    w.owner_run();
    let (v, _) = fleet(&w);
    assert_eq!(row(&v, "site00")["state"], "in-flight", "answered, not yet applied: {v:#}");
    in_parallel(&everyone, |s| {
        s.run(false);
    });
    w.owner_run();
    let (v, code) = fleet(&w);
    assert_eq!(v["summary"]["current"].as_u64(), Some(50), "{v:#}");
    assert_eq!((row(&v, "absent")["state"].as_str(), code), (Some("never-seen"), 0));
    assert!(alerts(&w).is_empty(), "nothing alarming yet");

    // Generation 2 adds 400 KiB that do not compress, more than the small file system holds. Forty sites
    // take it; seven do not run; `full` fails to stage it; `rolled` takes it and rolls back; `quiet` is gone.
    put(&w.source, "a.txt", b"generation 2\n", 0o644);
    put(&w.source, "big.bin", &noise(400 << 10, 7), 0o644);
    assert_eq!(w.publish(), 2);
    let (taking, idle) = sites.split_at(40);
    let active: Vec<&Site> = taking.iter().chain([&full, &rolled]).collect();
    in_parallel(&active, |s| {
        s.run(true);
    });
    w.owner_run();
    in_parallel(&taking.iter().chain([&rolled]).collect::<Vec<_>>(), |s| {
        s.run(false);
    });
    let out = run(&["recipient", "run", "--config", &full.config, "--once", "--no-request"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    ok(&["recipient", "rollback", "--config", &rolled.config]);
    // Its receipt goes with its next run (a daemon's next step).
    rolled.run(false);
    w.owner_run();

    // One cycle later every recipient shows what it has.
    let (v, code) = fleet(&w);
    for s in taking {
        let r = row(&v, s.dir.file_name().unwrap().to_str().unwrap());
        assert_eq!(
            (r["state"].as_str(), r["generation"].as_u64(), r["behind"].as_u64()),
            (Some("current"), Some(2), Some(0)),
            "{r:#}"
        );
    }
    for s in idle {
        let r = row(&v, s.dir.file_name().unwrap().to_str().unwrap());
        assert_eq!(
            (r["state"].as_str(), r["generation"].as_u64(), r["behind"].as_u64()),
            (Some("behind"), Some(1), Some(1)),
            "{r:#}"
        );
    }
    let f = row(&v, "full");
    assert_eq!(
        (f["state"].as_str(), f["reason"].as_str(), f["generation"].as_u64()),
        (Some("failed"), Some("disk-full"), Some(1)),
        "{f:#}"
    );
    assert!(f["detail"].as_str().unwrap().contains("No space left on device"), "{f:#}");
    let r = row(&v, "rolled");
    assert_eq!(
        (r["state"].as_str(), r["generation"].as_u64(), r["reason"].as_str()),
        (Some("held"), Some(1), Some("rolled-back")),
        "{r:#}"
    );
    assert_eq!(code, 1, "a failed recipient makes the fleet need attention");
    // The console shows every recipient in the same state.
    let shown = console_states(&w);
    let want: Vec<(String, String)> = v["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_owned(), r["state"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(shown.len(), want.len());
    let mut shown_sorted = shown.clone();
    shown_sorted.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(shown_sorted, want_sorted, "the console and `owner fleet --json` agree");
    // The owner's status no longer shows the rolled-back recipient at the generation it left.
    let status = w.owner_status();
    let shown = status["recipients"].as_array().unwrap().iter().find(|x| x["name"] == "rolled").unwrap();
    assert_eq!(shown["applied_generation"], 1, "{shown:#}");
    // The text form: a line each, and the summary.
    let text =
        ok_or_attention(&["owner", "fleet", "--config", &w.owner_config, "--state", "failed,held", "--sort", "state"]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[1].starts_with("full") && lines[1].contains("failed") && lines[1].contains("disk-full"), "{text}");
    assert!(lines[2].starts_with("rolled") && lines[2].contains("held"), "{text}");
    assert_eq!(lines.last(), Some(&"1 failed, 1 held"), "{text}");
    // Its history says what happened.
    let h: Value =
        serde_json::from_str(&ok(&["owner", "history", "--config", &w.owner_config, "--name", "rolled", "--json"]))
            .unwrap();
    let events: Vec<&str> = h["entries"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["sent", "applied", "sent", "applied", "rolled-back"], "{h:#}");

    // `quiet` turns silent three of its one-second intervals after its last contact; the failure and the
    // silence are each alerted once, whatever the number of runs.
    let mails = owner_until(&w, "an alert for quiet's silence", |m| mentions(m, "quiet (default): silent") == 1);
    let (v, code) = fleet(&w);
    assert_eq!((row(&v, "quiet")["state"].as_str(), code), (Some("silent"), 1));
    assert_eq!(mentions(&mails, "full (default): failed (disk-full)"), 1, "{}", mails.join("\n-----\n"));
    let before = mails.len();
    let settle = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < settle {
        w.owner_run();
    }
    assert_eq!(alerts(&w).len(), before, "no second alert for a state already alerted");

    // Room again, and `quiet` is back: each recovers, and each recovery is alerted once.
    disk.resize("8m");
    full.run(false);
    w.sync(&quiet);
    let (v, code) = fleet(&w);
    assert_eq!(row(&v, "full")["state"], "current", "{v:#}");
    assert_eq!(row(&v, "quiet")["state"], "current", "{v:#}");
    assert_eq!(code, 0, "held, behind and never-seen need no attention");
    let mails = owner_until(&w, "recovery alerts", |m| {
        mentions(m, "full (default): failed -> current") == 1 && mentions(m, "quiet (default): silent -> ") == 1
    });
    assert_eq!(mentions(&mails, "full (default): failed (disk-full)"), 1);
    assert_eq!(mentions(&mails, "quiet (default): silent ("), 1);
    assert!(mails.iter().all(|m| !m.contains("site") && !m.contains("rolled (")), "only the alarming ones are listed");
}

/// Starts `owner serve`, logs in over plain HTTP, and reads the fleet table: (name, state) per row.
fn console_states(w: &World) -> Vec<(String, String)> {
    use crate::console::http;
    let pw = w.path("console.password");
    fs::write(&pw, "fleet-secret\n").unwrap();
    fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let args = ["owner", "serve", "--config", &w.owner_config, "--listen", "127.0.0.1:0", "--password-file"];
    let serve = Daemon::start(&[&args[..], &[pw.to_str().unwrap()]].concat(), w.path("serve.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        let log = serve.log();
        if let Some(url) = log.split("console listening on http://").nth(1).and_then(|r| r.split_whitespace().next()) {
            break url.trim_end_matches('/').to_owned();
        }
        assert!(Instant::now() < deadline, "the console did not start: {log}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (_, head, page) = http(&addr, "GET", "/login", None, "");
    let cookie = head.split("set-cookie: ").nth(1).unwrap().split(';').next().unwrap().to_owned();
    let token = page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let (status, head, _) = http(&addr, "POST", "/login", Some(&cookie), &format!("secret=fleet-secret&csrf={token}"));
    assert_eq!(status, 303, "{head}");
    let cookie = head.split("set-cookie: ").nth(1).map_or(cookie.clone(), |c| c.split(';').next().unwrap().to_owned());
    let (status, _, page) = http(&addr, "GET", "/", Some(&cookie), "");
    assert_eq!(status, 200, "{page}");
    let rows = page
        .split("<tr data-name=\"")
        .skip(1)
        .map(|r| {
            let name = r.split('"').next().unwrap().to_owned();
            let state = r.split("data-state=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
            (name, state)
        })
        .collect();
    serve.stop();
    rows
}

/// Runs mailferry and returns stdout if it exits 0 or 1.
fn ok_or_attention(args: &[&str]) -> String {
    let out = run(args);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}
