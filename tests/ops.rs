//! Operating a node: config lookup, `check`, the monitoring contract (`status --json` and `log --json`
//! against `docs/*.schema.json`, `status --format prometheus`), exit codes, and output (`-q`,
//! `MAILFERRY_LOG`, journald, summaries in words). No test here talks to a mail server: a refused
//! connection to 127.0.0.1:1 stands for one that cannot be reached.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use crate::util::*;

/// Runs mailferry with `env` set and `unset` removed, nothing inherited from the test's own config.
fn run_with(args: &[&str], env: &[(&str, &str)], unset: &[&str]) -> Output {
    let mut c = Command::new(bin());
    c.args(args)
        .env_remove("MAILFERRY_FAILPOINT")
        .env_remove("MAILFERRY_CONFIG")
        .env("MAILFERRY_LOG", "mailferry=info");
    for k in unset {
        c.env_remove(k);
    }
    c.envs(env.iter().copied()).output().expect("failed to start the mailferry binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(args: &[&str], out: &Output) -> String {
    format!(
        "mailferry {}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

// ---- a small JSON Schema validator: exactly the keywords docs/*.schema.json use, and no others ----

pub(crate) fn schema(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join(name);
    serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The problems of `v` against `s` (whose `$ref`s point into `root`); empty when it is valid.
pub(crate) fn validate(root: &Value, s: &Value, v: &Value, at: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let obj = s.as_object().unwrap_or_else(|| panic!("schema at {at} is not an object"));
    for (k, sv) in obj {
        match k.as_str() {
            "$schema" | "$id" | "$defs" | "title" | "description" => {}
            "$ref" => {
                let name = sv.as_str().unwrap().strip_prefix("#/$defs/").expect("local $ref");
                errs.extend(validate(root, &root["$defs"][name], v, at));
            }
            "type" => {
                let types: Vec<&str> = match sv {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(a) => a.iter().map(|t| t.as_str().unwrap()).collect(),
                    _ => panic!("bad type at {at}"),
                };
                let ok = types.iter().any(|t| match *t {
                    "object" => v.is_object(),
                    "array" => v.is_array(),
                    "string" => v.is_string(),
                    "integer" => v.is_u64() || v.is_i64(),
                    "number" => v.is_number(),
                    "boolean" => v.is_boolean(),
                    "null" => v.is_null(),
                    other => panic!("unknown type {other} at {at}"),
                });
                if !ok {
                    errs.push(format!("{at}: {v} is not {types:?}"));
                }
            }
            "required" => {
                if let Some(o) = v.as_object() {
                    for r in sv.as_array().unwrap() {
                        if !o.contains_key(r.as_str().unwrap()) {
                            errs.push(format!("{at}: `{r}` is missing"));
                        }
                    }
                }
            }
            "properties" => {
                if let Some(o) = v.as_object() {
                    for (name, ps) in sv.as_object().unwrap() {
                        if let Some(pv) = o.get(name) {
                            errs.extend(validate(root, ps, pv, &format!("{at}.{name}")));
                        }
                    }
                }
            }
            "items" => {
                if let Some(a) = v.as_array() {
                    for (i, item) in a.iter().enumerate() {
                        errs.extend(validate(root, sv, item, &format!("{at}[{i}]")));
                    }
                }
            }
            "const" if v != sv => errs.push(format!("{at}: {v} is not {sv}")),
            "const" => {}
            "enum" => {
                if !sv.as_array().unwrap().contains(v) {
                    errs.push(format!("{at}: {v} is not one of {sv}"));
                }
            }
            "minimum" => {
                if let Some(n) = v.as_f64()
                    && n < sv.as_f64().unwrap()
                {
                    errs.push(format!("{at}: {n} is below {sv}"));
                }
            }
            "minLength" | "maxLength" => {
                if let Some(t) = v.as_str() {
                    let n = sv.as_u64().unwrap() as usize;
                    let len = t.chars().count();
                    if (k == "minLength" && len < n) || (k == "maxLength" && len > n) {
                        errs.push(format!("{at}: {t:?} breaks {k} {n}"));
                    }
                }
            }
            "allOf" => {
                for sub in sv.as_array().unwrap() {
                    errs.extend(validate(root, sub, v, at));
                }
            }
            "oneOf" => {
                let passing = sv.as_array().unwrap().iter().filter(|sub| validate(root, sub, v, at).is_empty()).count();
                if passing != 1 {
                    errs.push(format!("{at}: {passing} of the oneOf schemas match, not exactly 1"));
                }
            }
            other => panic!("the test's validator does not know the keyword `{other}` (at {at}); teach it"),
        }
    }
    errs
}

pub(crate) fn assert_valid(schema_name: &str, v: &Value) {
    let root = schema(schema_name);
    let errs = validate(&root, &root, v, "$");
    assert!(errs.is_empty(), "{schema_name} refuses {v:#}:\n{}", errs.join("\n"));
}

/// Changes one character of the encoded control part, so that its decoded bytes change.
fn tamper(path: &Path) {
    let mut raw = fs::read(path).unwrap();
    let at = raw.windows(12).position(|w| w == b"control.json").unwrap();
    let body = at + raw[at..].windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let pos = (body + 30..raw.len()).find(|&i| raw[i].is_ascii_alphanumeric()).unwrap();
    raw[pos] = if raw[pos] == b'Q' { b'R' } else { b'Q' };
    fs::write(path, raw).unwrap();
}

/// A world with one synced recipient and one refusal on each side's log.
fn synced_world() -> (World, Site) {
    let w = World::new();
    let site = w.site("site1");
    varied_tree(&w.source);
    w.publish();
    w.sync(&site);
    // A reply with one byte changed is refused by the recipient; a copy of it reaches the owner too.
    put(&w.source, "README", b"version 2\n", 0o644);
    w.publish();
    let reply = w.pending_reply(&site);
    tamper(&reply);
    let tampered = w.path("tampered.eml");
    fs::copy(&reply, &tampered).unwrap();
    site.run(false);
    let out = run(&["deliver", "--config", &w.owner_config, tampered.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&["deliver"], &out));
    (w, site)
}

#[test]
fn status_and_log_json_of_both_roles_match_their_schemas() {
    let (w, site) = synced_world();
    let owner = w.owner_status();
    assert_valid("status.schema.json", &owner);
    assert_eq!((owner["schema_version"].as_u64(), owner["role"].as_str()), (Some(1), Some("owner")));
    let recipient = site.status();
    assert_valid("status.schema.json", &recipient);
    assert_eq!(recipient["config"].as_str(), Some(site.config.as_str()));
    for config in [&w.owner_config, &site.config] {
        let lines = ok(&["log", "--config", config, "--rejected", "--json"]);
        assert!(!lines.trim().is_empty(), "each side refused something");
        for line in lines.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_valid("log.schema.json", &v);
            // Each refusal names the kept copy, which holds the refused bytes.
            let kept = v["kept"].as_str().unwrap_or_else(|| panic!("no kept copy in {v}"));
            let digest = blake3::hash(&fs::read(kept).unwrap()).to_hex().to_string();
            assert_eq!(v["digest"].as_str(), Some(digest.as_str()));
        }
    }
    // The check can fail: a documented property missing, or of the wrong type, is refused.
    let mut broken = recipient.clone();
    broken.as_object_mut().unwrap().remove("schema_version");
    broken["stale"] = Value::from(3);
    let root = schema("status.schema.json");
    assert!(!validate(&root, &root, &broken, "$").is_empty(), "the schema must refuse a broken status");
    // Additional properties are allowed (the lead may add recipient fields).
    let mut more = recipient;
    more["a_new_field"] = Value::from(1);
    assert_valid("status.schema.json", &more);
}

/// Parses Prometheus text format: every sample's family has HELP and TYPE lines before it. Returns
/// (name with labels, value) pairs.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut helped = std::collections::HashSet::new();
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has a text");
            assert!(!help.is_empty() && helped.insert(name.to_owned()), "one HELP per family: {line}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["gauge", "counter"].contains(&kind), "{line}");
            assert!(helped.contains(name) && typed.insert(name.to_owned()), "TYPE after HELP, once: {line}");
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
            let name = series.split('{').next().unwrap();
            assert!(
                name.starts_with("mailferry_") && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
            assert!(typed.contains(name), "sample before its TYPE: {line}");
            if let Some(labels) = series.strip_prefix(name) {
                assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "{line}");
            }
            samples.push((series.to_owned(), value.parse::<f64>().unwrap_or_else(|_| panic!("value of {line}"))));
        }
    }
    samples
}

#[test]
fn status_in_prometheus_format_for_both_roles() {
    let (w, site) = synced_world();
    let get = |samples: &[(String, f64)], name: &str| {
        samples.iter().find(|(n, _)| n == name).map(|(_, v)| *v).unwrap_or_else(|| panic!("no {name} in {samples:?}"))
    };
    let owner = parse_prometheus(&ok(&["status", "--config", &w.owner_config, "--format", "prometheus"]));
    assert_eq!(get(&owner, "mailferry_generation"), 2.0);
    assert_eq!(get(&owner, "mailferry_rejected_messages_total"), 1.0);
    assert_eq!(get(&owner, "mailferry_recipient_applied_generation{recipient=\"site1\"}"), 1.0);
    assert_eq!(get(&owner, "mailferry_attention"), 0.0);
    let out = run(&["status", "--config", &site.config, "--format", "prometheus"]);
    let recipient = parse_prometheus(&text(&out.stdout));
    assert_eq!(get(&recipient, "mailferry_generation"), 1.0);
    assert_eq!(get(&recipient, "mailferry_key_readable"), 1.0);
    assert_eq!(get(&recipient, "mailferry_outstanding_requests"), 1.0, "the refused reply left the request open");
    let attention = get(&recipient, "mailferry_attention");
    assert_eq!(out.status.code(), Some(attention as i32), "the metric says what the exit code says");
}

#[test]
fn status_exits_1_when_the_key_file_is_unreadable() {
    let w = World::new();
    let site = w.site("site1");
    assert_eq!(run(&["status", "--config", &site.config]).status.code(), Some(0));
    let key = site.dir.join("recipient.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&["status", "--config", &site.config]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&["status"], &out));
    assert!(text(&out.stdout).contains("key file cannot be read"), "{}", text(&out.stdout));
    let s = site.status();
    assert!(s["key_id"].is_null() && s["attention"] == true, "{s}");
}

#[test]
fn deliver_exits_1_for_a_refusal_and_75_for_what_can_be_handled_later() {
    let w = World::new();
    let site = w.site("site1");
    // Nothing is published: the owner leaves the request for later, and an MTA should defer it.
    site.run(true);
    let request = fs::read_dir(w.spool.join(OWNER).join("new")).unwrap().next().unwrap().unwrap().path();
    let args = ["deliver", "--config", &w.owner_config, request.to_str().unwrap()];
    let out = run(&args);
    assert_eq!(out.status.code(), Some(75), "{}", show(&args, &out));
    // Delivered again once something is published, it is answered.
    varied_tree(&w.source);
    w.publish();
    assert_eq!(run(&args).status.code(), Some(0));
    // Junk is refused: exit 1, and the copy is kept.
    let junk = w.path("junk.eml");
    fs::write(&junk, "From: a@b\r\nSubject: hi\r\n\r\nhello\r\n").unwrap();
    let args = ["deliver", "--config", &site.config, junk.to_str().unwrap()];
    let out = run(&args);
    assert_eq!(out.status.code(), Some(1), "{}", show(&args, &out));
    assert_eq!(count(&site.dir.join("rejected")), 1);
}

#[test]
fn run_once_exits_1_after_a_refusal_only_when_asked() {
    let w = World::new();
    let site = w.site("site1");
    varied_tree(&w.source);
    w.publish();
    let reply = w.pending_reply(&site);
    tamper(&reply);
    let args = ["recipient", "run", "--config", &site.config, "--once", "--no-request", "--fail-on-refusal"];
    let out = run(&args);
    assert_eq!(out.status.code(), Some(1), "{}", show(&args, &out));
    assert!(text(&out.stderr).contains("refused 1 message(s)"), "{}", text(&out.stderr));
    // Nothing more to refuse: 0 again.
    assert_eq!(run(&args).status.code(), Some(0));
}

/// A node whose mail servers are 127.0.0.1:1, where nothing listens.
fn unreachable_owner(w: &World) -> String {
    let pw = w.path("mail-password");
    fs::write(&pw, "secret\n").unwrap();
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).unwrap();
    let dir = w.path("mail-owner");
    ok(&[
        "owner",
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--state-dir",
        w.path("mail-owner-state").to_str().unwrap(),
        "--source",
        w.source.to_str().unwrap(),
        "--address",
        "mailowner@vendor.test",
        "--smtp-host",
        "127.0.0.1",
        "--smtp-port",
        "1",
        "--smtp-security",
        "none",
        "--imap-port",
        "1",
        "--imap-security",
        "none",
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    dir.join("owner.toml").to_str().unwrap().to_owned()
}

#[test]
fn an_unreachable_mail_server_exits_75_and_says_its_cause_once() {
    let w = World::new();
    let config = unreachable_owner(&w);
    let cfg = fs::read_to_string(&config).unwrap();
    assert!(cfg.contains("kind = \"mail\"") && cfg.contains("state-dir = "), "{cfg}");
    assert!(w.path("mail-owner-state/state.db").is_file(), "the state is in --state-dir");
    let args = ["owner", "run", "--config", &config, "--once"];
    let out = run(&args);
    assert_eq!(out.status.code(), Some(75), "{}", show(&args, &out));
    let err = text(&out.stderr);
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert_eq!(err.matches("Connection refused").count(), 1, "the cause once: {err}");
}

#[test]
fn check_names_each_problem_with_its_fix() {
    let w = World::new();
    let site = w.site("site1");
    let check = |config: &str| run(&["check", "--offline", "--config", config]);
    let out = check(&site.config);
    assert_eq!(out.status.code(), Some(0), "{}", show(&["check"], &out));
    let out = check(&w.owner_config);
    assert_eq!(out.status.code(), Some(0), "{}", show(&["check"], &out));

    // A readable key file.
    let key = site.dir.join("recipient.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let out = check(&site.config);
    assert_eq!(out.status.code(), Some(1));
    let lines = text(&out.stdout);
    let fail = lines.lines().find(|l| l.starts_with("FAIL  key-file")).unwrap_or_else(|| panic!("{lines}"));
    assert!(fail.contains(&format!("fix: chmod 600 {}", key.display())), "{fail}");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();

    // Staging on another file system than the data tree.
    let shm = tempfile::Builder::new().prefix("mailferry-check-").tempdir_in("/dev/shm").unwrap();
    assert_ne!(
        fs::metadata(shm.path()).unwrap().dev(),
        fs::metadata(&site.data).unwrap().dev(),
        "test needs /dev/shm apart"
    );
    let cfg = fs::read_to_string(&site.config).unwrap();
    let staged = cfg.replace("[recipient]\n", &format!("[recipient]\nstaging-dir = \"{}\"\n", shm.path().display()));
    fs::write(&site.config, &staged).unwrap();
    let out = check(&site.config);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("is on another file system than the data tree"), "{}", text(&out.stdout));
    // Staging inside the data tree.
    let inside =
        cfg.replace("[recipient]\n", &format!("[recipient]\nstaging-dir = \"{}/stage\"\n", site.data.display()));
    fs::write(&site.config, inside).unwrap();
    assert!(text(&check(&site.config).stdout).contains("is inside the data tree"));
    fs::write(&site.config, &cfg).unwrap();

    // A config that does not load is one FAIL line, not an error.
    fs::write(&site.config, cfg.replace("[recipient]\n", "[recipient]\nintervall = \"1h\"\n")).unwrap();
    let out = check(&site.config);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).lines().any(|l| l.starts_with("FAIL  config:") && l.contains("intervall")),
        "{}",
        text(&out.stdout)
    );
    fs::write(&site.config, &cfg).unwrap();

    // A world-readable password file, and servers that cannot be reached (through the transport's probe).
    let mail = unreachable_owner(&w);
    let pw = w.path("mail-password");
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o644)).unwrap();
    let out = check(&mail);
    assert_eq!(out.status.code(), Some(1));
    let lines = text(&out.stdout);
    assert!(lines.contains(&format!("readable by others (mode 644); fix: chmod 600 {}", pw.display())), "{lines}");
    let out = run(&["check", "--config", &mail, "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let failed: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["ok"] == false)
        .map(|f| f["check"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["smtp", "imap", "smtp", "imap"], "{v:#}");
    assert!(v["findings"].to_string().contains("check host and port"), "{v:#}");
}

/// Copies the config `from` to `to`, its state directory and key file named absolutely, so that the copy
/// is the same node.
fn copy_config(from: &str, to: &Path) {
    let dir = Path::new(from).parent().unwrap();
    let text = fs::read_to_string(from).unwrap();
    let text = text.replace("key-file = \"recipient.key\"", &format!("key-file = \"{}/recipient.key\"", dir.display()));
    let section = if text.contains("[owner]\n") { "[owner]\n" } else { "[recipient]\n" };
    let text = text.replace(section, &format!("{section}state-dir = \"{}\"\n", dir.display()));
    fs::write(to, text).unwrap();
}

#[test]
fn config_is_found_by_flag_then_env_then_xdg() {
    assert!(!Path::new("/etc/mailferry/owner.toml").exists(), "this machine has a system-wide owner config");
    assert!(!Path::new("/etc/mailferry/recipient.toml").exists(), "this machine has a system-wide recipient config");
    let w = World::new();
    let site = w.site("site1");
    let xdg = w.path("xdg");
    let home = w.path("home");
    fs::create_dir_all(xdg.join("mailferry")).unwrap();
    let env = [("XDG_CONFIG_HOME", xdg.to_str().unwrap()), ("HOME", home.to_str().unwrap())];
    let status = |args: &[&str]| {
        let mut all = vec!["status", "--json"];
        all.extend_from_slice(args);
        let out = run_with(&all, &env, &[]);
        (out.status.code(), serde_json::from_slice::<Value>(&out.stdout).ok(), text(&out.stderr))
    };

    // Nothing anywhere: the error names the places looked at.
    let (code, _, err) = status(&[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains(&format!("{}/mailferry/owner.toml", xdg.display())) && err.contains("/etc/mailferry/"),
        "{err}"
    );

    // The recipient's config at the XDG place is used, and status says so.
    let recipient_toml = xdg.join("mailferry/recipient.toml");
    copy_config(&site.config, &recipient_toml);
    let (code, v, err) = status(&[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(v.unwrap()["config"].as_str(), recipient_toml.to_str());
    assert!(err.contains("using config file"), "{err}");

    // Both roles there: status asks, a command of one role takes its own.
    let owner_toml = xdg.join("mailferry/owner.toml");
    copy_config(&w.owner_config, &owner_toml);
    let (code, _, err) = status(&[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--config"), "{err}");
    let out = run_with(&["owner", "publish"], &env, &[]);
    assert!(out.status.success(), "{}", show(&["owner", "publish"], &out));

    // MAILFERRY_CONFIG beats the XDG place; --config beats both.
    let env_cfg = [env[0], env[1], ("MAILFERRY_CONFIG", w.owner_config.as_str())];
    let out = run_with(&["status", "--json"], &env_cfg, &[]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["config"].as_str(), Some(w.owner_config.as_str()));
    let out = run_with(&["status", "--json", "--config", &site.config], &env_cfg, &[]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["config"].as_str(), Some(site.config.as_str()));

    // Without XDG_CONFIG_HOME, ~/.config is the place.
    fs::create_dir_all(home.join(".config/mailferry")).unwrap();
    copy_config(&site.config, &home.join(".config/mailferry/recipient.toml"));
    let out = run_with(&["status", "--json"], &[env[1]], &["XDG_CONFIG_HOME"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", show(&["status"], &out)));
    assert_eq!(v["config"].as_str(), home.join(".config/mailferry/recipient.toml").to_str());
}

#[test]
fn quiet_silences_summaries_and_a_bad_log_filter_is_an_error() {
    let w = World::new();
    let site = w.site("site1");
    varied_tree(&w.source);
    w.publish();
    site.run(true);
    w.owner_run();
    // The summary says what happened, in words.
    let said = site.run(false);
    assert!(said.contains("recipient: applied generation 1 ("), "{said}");
    let args = ["recipient", "run", "--config", &site.config, "--once", "-q"];
    let out = run_with(&args, &[], &["MAILFERRY_LOG"]);
    assert!(out.status.success(), "{}", show(&args, &out));
    assert_eq!(text(&out.stderr), "", "-q leaves nothing but warnings and errors");
    let out = run_with(&["status", "--config", &site.config], &[("MAILFERRY_LOG", "mailferry=loud")], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("MAILFERRY_LOG=\"mailferry=loud\" is not a valid log filter"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn no_second_timestamp_under_journald() {
    let w = World::new();
    let site = w.site("site1");
    let log = w.path("journal.log");
    let run_logged = |journal: bool| {
        let f = fs::File::create(&log).unwrap();
        let meta = f.metadata().unwrap();
        let mut c = Command::new(bin());
        c.args(["recipient", "run", "--config", &site.config, "--once"])
            .env("MAILFERRY_LOG", "mailferry=info")
            .env_remove("JOURNAL_STREAM")
            .stderr(f);
        if journal {
            c.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        assert!(c.status().unwrap().success());
        fs::read_to_string(&log).unwrap()
    };
    let with_time = run_logged(false);
    let first = with_time.lines().next().unwrap_or_default();
    assert!(first.starts_with("20") && first.contains('T'), "a plain log line starts with its time: {with_time}");
    let journal = run_logged(true);
    assert!(!journal.is_empty() && journal.lines().all(|l| !l.starts_with("20")), "{journal}");
}

#[test]
fn help_has_examples_exit_codes_and_global_options() {
    let top = ok(&["--help"]);
    for want in ["Examples:", "Exit codes:", "75", "/etc/mailferry", "Global options"] {
        assert!(top.contains(want), "{want:?} not in --help:\n{top}");
    }
    let sub = ok(&["status", "--help"]);
    assert!(sub.contains("Global options:") && sub.contains("prometheus"), "{sub}");
    let init = ok(&["owner", "init", "--help"]);
    assert!(init.contains("--state-dir") && init.contains("--smtp-host") && init.contains("Mail transport"), "{init}");
}

#[test]
fn check_finds_staging_on_another_mount_of_the_same_file_system() {
    // systemd's ReadWritePaths= bind-mounts each path on its own: the device numbers stay equal, but a
    // rename from one mount to another fails with EXDEV. A private mount namespace makes the same here.
    let w = World::new();
    let site = w.site("site1");
    let script = format!(
        "mount --bind '{d}' '{d}' && exec '{bin}' check --offline --config '{cfg}'",
        d = site.data.display(),
        bin = bin().display(),
        cfg = site.config
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env_remove("MAILFERRY_CONFIG")
        .output()
        .expect("unshare(1) runs");
    assert_eq!(out.status.code(), Some(1), "{}", show(&["check (in a mount namespace)"], &out));
    let lines = text(&out.stdout);
    let fail = lines.lines().find(|l| l.starts_with("FAIL  staging")).unwrap_or_else(|| panic!("{lines}"));
    assert!(fail.contains("different mounts") && fail.contains("ReadWritePaths="), "{fail}");
    // Outside the namespace the same node is fine.
    assert_eq!(run(&["check", "--offline", "--config", &site.config]).status.code(), Some(0));
}
