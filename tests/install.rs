//! Installing updates (`node::install`): local hooks and their environment, a failed hook rolling the
//! tree back, hooks pending across a crash, shipped scripts (only signed, opted in, and the exact bytes),
//! manual installation with `recipient approve`, apply windows with an injected clock, and pre-apply
//! vetoes. All over the Maildir transport, through the real binary.

use std::fs;
use std::path::{Path, PathBuf};

use crate::crash::{crashed, run_with_failpoint};
use crate::util::*;

/// Adds `lines` (TOML) to the `[recipient]` table of `site`'s config.
fn configure(site: &Site, lines: &str) {
    let text = fs::read_to_string(&site.config).unwrap();
    let text = text.replacen("[recipient]\n", &format!("[recipient]\n{lines}\n"), 1);
    fs::write(&site.config, text).unwrap();
}

/// A TOML string.
fn q(s: &str) -> String {
    format!("{s:?}")
}

/// Writes an executable shell script at `path`.
fn script(path: &Path, body: &str) {
    fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A hook that appends what it was told to `log`: one `run` line, its changed paths, its environment.
/// It exits with 3 (after saying why) when `fail` names a file that exists and holds its generation.
fn recording_hook(w: &World, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let (hook, log, fail) =
        (w.path(&format!("{name}.sh")), w.path(&format!("{name}.log")), w.path(&format!("{name}.fail")));
    script(
        &hook,
        &format!(
            "log={log}\n\
             echo \"run gen=$MAILFERRY_GENERATION channel=$MAILFERRY_CHANNEL rerun=${{MAILFERRY_RERUN:-0}} root=$MAILFERRY_ROOT data=$MAILFERRY_DATA cwd=$(pwd)\" >> \"$log\"\n\
             sed 's/^/changed: /' \"$MAILFERRY_CHANGED\" >> \"$log\"\n\
             env | sed 's/=.*//' | sort | sed 's/^/env: /' >> \"$log\"\n\
             if [ -f {fail} ] && [ \"$(cat {fail})\" = \"$MAILFERRY_GENERATION\" ]; then\n\
               echo \"reload failed: database is corrupt\"; echo \"more on stderr\" >&2; exit 3\n\
             fi",
            log = q(log.to_str().unwrap()),
            fail = q(fail.to_str().unwrap()),
        ),
    );
    (hook, log, fail)
}

/// The `run` lines a recording hook logged.
fn runs(log: &Path) -> Vec<String> {
    fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.starts_with("run ")).map(str::to_owned).collect()
}

/// Staging directories of `site` (its kept store, updates waiting).
fn staged(site: &Site) -> usize {
    count(&site.dir.join("staging"))
}

#[test]
fn a_post_apply_hook_runs_once_per_apply_and_sees_the_update() {
    let w = World::new();
    let site = w.site("site1");
    let (hook, log, _) = recording_hook(&w, "post");
    configure(&site, &format!("post-apply = {}", q(hook.to_str().unwrap())));
    put(&w.source, "a.txt", b"one", 0o644);
    put(&w.source, "sigs/main.cvd", b"signatures v1", 0o644);
    w.publish();
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    let root1 = site.status()["root"].as_str().unwrap().to_owned();
    assert_eq!(
        runs(&log),
        [format!("run gen=1 channel=default rerun=0 root={root1} data={} cwd=/", site.data.display())]
    );
    let text = fs::read_to_string(&log).unwrap();
    let changed: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("changed: ")).collect();
    assert_eq!(changed, ["a.txt", "sigs", "sigs/main.cvd"]);
    // The environment is clean: what mailferry says, and what the shell adds itself.
    let env: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("env: ")).collect();
    for var in &env {
        assert!(
            var.starts_with("MAILFERRY_") || ["PATH", "PWD", "SHLVL", "_", "OLDPWD"].contains(var),
            "the hook inherited {var}"
        );
    }
    assert!(!env.contains(&"MAILFERRY_LOG") && !env.contains(&"HOME"), "{env:?}");

    // Nothing new: no apply, no hook.
    w.sync(&site);
    assert_eq!(runs(&log).len(), 1);

    put(&w.source, "sigs/main.cvd", b"signatures v2", 0o644);
    w.publish();
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    let r = runs(&log);
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(r[1].starts_with("run gen=2 channel=default rerun=0 "), "{r:?}");
    let text = fs::read_to_string(&log).unwrap();
    let last: Vec<&str> =
        text.split("run gen=2").nth(1).unwrap().lines().filter_map(|l| l.strip_prefix("changed: ")).collect();
    assert_eq!(last, ["sigs/main.cvd"], "only what generation 2 changed");
    assert_eq!(w.owner_status()["recipients"][0]["applied_generation"], 2, "the receipt went out");
}

/// A recipient at generation 1 (the varied tree) with a recording post-apply hook, and generation 2
/// published; returns a copy of generation 1.
fn hooked_with_two_generations(extra: &str) -> (World, Site, PathBuf, PathBuf, PathBuf) {
    let w = World::new();
    let site = w.site("site1");
    let (hook, log, fail) = recording_hook(&w, "post");
    configure(&site, &format!("post-apply = {}\n{extra}", q(hook.to_str().unwrap())));
    varied_tree(&w.source);
    std::os::unix::fs::symlink("README", w.source.join("latest")).unwrap();
    w.publish();
    w.sync(&site);
    let gen1 = w.path("generation-1");
    copy_tree(&w.source, &gen1);
    put(&w.source, "README", b"generation 2\n", 0o644);
    fs::remove_dir_all(w.source.join("old")).unwrap();
    fs::remove_file(w.source.join("typechange")).unwrap();
    put(&w.source, "typechange/x", b"x\n", 0o755);
    put(&w.source, "added/new.bin", &[7u8; 5000], 0o644);
    fs::remove_file(w.source.join("latest")).unwrap();
    std::os::unix::fs::symlink("added/new.bin", w.source.join("latest")).unwrap();
    w.publish();
    (w, site, gen1, log, fail)
}

#[test]
fn a_failing_post_apply_hook_rolls_the_tree_back_to_exactly_the_generation_before() {
    let (w, site, gen1, log, fail) = hooked_with_two_generations("");
    fs::write(&fail, "2").unwrap();
    site.run(true);
    w.owner_run();
    let out = site.run(false);
    assert!(out.contains("the post-apply hook failed (exit status 3)"), "{out}");
    assert_same_tree(&gen1, &site.data);
    let s = site.status();
    assert_eq!((s["generation"].as_u64(), s["rollback_held"].as_u64()), (Some(1), Some(2)), "{s}");
    let f = &s["last_hook_failure"];
    assert_eq!(
        (f["hook"].as_str(), f["exit_status"].as_i64(), f["generation"].as_u64()),
        (Some("post-apply"), Some(3), Some(2))
    );
    assert_eq!(f["action"], "rolled-back");
    let tail = f["output_tail"].as_str().unwrap();
    assert!(tail.contains("reload failed: database is corrupt\n") && tail.contains("more on stderr"), "{tail}");
    assert_eq!(runs(&log).len(), 2, "once for generation 1, once for 2; the rollback runs no hook");
    let text = String::from_utf8(run(&["status", "--config", &site.config]).stdout).unwrap();
    assert!(text.contains("HOOK FAILED:  post-apply of generation 2") && text.contains("| reload failed"), "{text}");
    // The owner hears of it: a failure receipt with the hook's exit status and the end of its output.
    w.owner_run();
    let fleet: serde_json::Value =
        serde_json::from_slice(&run(&["owner", "fleet", "--config", &w.owner_config, "--json"]).stdout).unwrap();
    let row = &fleet["recipients"][0];
    assert_eq!((row["state"].as_str(), row["reason"].as_str()), (Some("failed"), Some("hook-failed")), "{row}");
    let detail = row["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("exit status 3") && detail.contains("more on stderr"), "{detail}");

    // The failed generation is held back; a newer one installs (and its hook succeeds).
    w.sync(&site);
    assert_same_tree(&gen1, &site.data);
    put(&w.source, "README", b"generation 3\n", 0o644);
    w.publish();
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 3);
    assert_eq!(w.owner_status()["recipients"][0]["applied_generation"], 3);
}

#[test]
fn with_on_hook_failure_keep_a_failed_hook_leaves_the_generation_and_records_the_failure() {
    let (w, site, _gen1, _log, fail) = hooked_with_two_generations("on-hook-failure = \"keep\"");
    fs::write(&fail, "2").unwrap();
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    let s = site.status();
    assert_eq!((s["generation"].as_u64(), s["rollback_held"].as_u64()), (Some(2), None));
    assert_eq!(
        (s["last_hook_failure"]["action"].as_str(), s["last_hook_failure"]["exit_status"].as_i64()),
        (Some("kept"), Some(3))
    );
    assert_eq!(run(&["status", "--config", &site.config]).status.code(), Some(1), "a failed hook needs attention");
    site.run(false);
    w.owner_run();
    let fleet: serde_json::Value =
        serde_json::from_slice(&run(&["owner", "fleet", "--config", &w.owner_config, "--json"]).stdout).unwrap();
    let row = &fleet["recipients"][0];
    assert_eq!((row["state"].as_str(), row["reason"].as_str()), (Some("failed"), Some("hook-failed")), "{row}");
}

#[test]
fn killed_between_the_swap_and_the_hook_the_next_start_runs_the_hook() {
    let (w, site, gen1, log, _) = hooked_with_two_generations("");
    site.run(true);
    w.owner_run();
    let args = ["recipient", "run", "--config", site.config.as_str(), "--once", "--no-request"];
    assert!(crashed(&run_with_failpoint(&args, "after-swap-before-hook:1")));
    assert_same_tree(&w.source, &site.data);
    assert_ne!(snapshot(&gen1), snapshot(&site.data));
    assert_eq!(runs(&log).len(), 1, "the hook of generation 2 has not run");
    assert_eq!(site.status()["interrupted_apply"], true);
    site.run(false);
    let r = runs(&log);
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(r[1].starts_with("run gen=2 channel=default rerun=1 "), "told it may be a rerun: {r:?}");
    let s = site.status();
    assert_eq!((s["generation"].as_u64(), s["interrupted_apply"].as_bool()), (Some(2), Some(false)));
    assert_same_tree(&w.source, &site.data);
    w.owner_run();
    assert_eq!(w.owner_status()["recipients"][0]["applied_generation"], 2);
}

#[test]
fn killed_with_sigkill_while_the_hook_runs_the_next_start_runs_it_again() {
    let w = World::new();
    let site = w.site("site1");
    let (log, mark) = (w.path("hook.log"), w.path("killed-once"));
    // The first time, the hook kills mailferry itself (its parent) with SIGKILL.
    let hook = w.path("hook.sh");
    script(
        &hook,
        &format!(
            "echo \"run rerun=${{MAILFERRY_RERUN:-0}}\" >> {log}\n[ -e {mark} ] || {{ touch {mark}; kill -9 $PPID; }}",
            log = q(log.to_str().unwrap()),
            mark = q(mark.to_str().unwrap())
        ),
    );
    configure(&site, &format!("post-apply = {}", q(&format!("exec {}", hook.display()))));
    put(&w.source, "a", b"1", 0o644);
    w.publish();
    site.run(true);
    w.owner_run();
    let out = run(&["recipient", "run", "--config", &site.config, "--once", "--no-request"]);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(9), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read_to_string(&log).unwrap(), "run rerun=0\n");
    site.run(false);
    assert_eq!(fs::read_to_string(&log).unwrap(), "run rerun=0\nrun rerun=1\n");
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 1);
}

#[test]
fn a_pre_apply_veto_leaves_the_tree_untouched_and_refuses_the_reply() {
    let (w, site, gen1, _, _) = hooked_with_two_generations("");
    let veto = w.path("veto.sh");
    script(&veto, "[ \"$MAILFERRY_GENERATION\" = 2 ] || exit 0\necho 'clamd is not running; not now'\nexit 1");
    configure(&site, &format!("pre-apply = {}", q(veto.to_str().unwrap())));
    site.run(true);
    w.owner_run();
    let out = site.run(false);
    assert!(out.contains("vetoed") && out.contains("clamd is not running; not now"), "{out}");
    assert_same_tree(&gen1, &site.data);
    assert_eq!(site.status()["generation"], 1);
    assert_eq!(site.rejections(), ["vetoed"]);
    assert_eq!(staged(&site), 0, "the staged files are discarded");
    assert_eq!(site.status()["outstanding"], 0, "the request counts as answered");
    // Once the hook agrees, the next exchange installs it.
    script(&veto, "exit 0");
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
}

#[test]
fn a_manual_recipient_changes_nothing_until_approve() {
    let w = World::new();
    let site = w.site("site1");
    let admin = "admin@customer.test";
    configure(&site, &format!("install = \"manual\"\nadmin-address = {}", q(admin)));
    put(&site.data, "local.txt", b"before", 0o644);
    let before = snapshot(&site.data);
    put(&w.source, "a", b"1", 0o644);
    w.publish();
    w.sync(&site);
    assert_eq!(snapshot(&site.data), before);
    let s = site.status();
    assert_eq!((s["generation"].as_u64(), s["waiting"]["generation"].as_u64()), (Some(0), Some(1)), "{s}");
    assert_eq!(s["waiting"]["reason"], "manual");
    assert_eq!(run(&["status", "--config", &site.config]).status.code(), Some(1), "an update waits for the admin");
    let inbox = w.spool.join(admin).join("new");
    assert_eq!(count(&inbox), 1, "the admin is told once");
    let notice = fs::read_to_string(fs::read_dir(&inbox).unwrap().next().unwrap().unwrap().path()).unwrap();
    assert!(notice.contains("generation 1 of default is ready") && notice.contains("recipient approve"), "{notice}");
    // Another exchange for the same generation keeps the one waiting, and says nothing new.
    w.sync(&site);
    assert_eq!(snapshot(&site.data), before);
    assert_eq!(count(&inbox), 1);
    // A newer generation replaces the one waiting.
    put(&w.source, "b", b"2", 0o644);
    w.publish();
    let reply = fs::read(w.pending_reply(&site)).unwrap();
    site.run(false);
    w.owner_run();
    assert_eq!(snapshot(&site.data), before);
    assert_eq!(site.status()["waiting"]["generation"], 2);
    assert_eq!(staged(&site), 1, "the staged files of generation 1 are gone");
    assert_eq!(count(&inbox), 2);

    let err = fails(&["recipient", "approve", "--config", &site.config, "--channel", "other"], 2);
    assert!(err.contains("does not subscribe to channel \"other\""), "{err}");
    let out = ok(&["recipient", "approve", "--config", &site.config, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["generation"].as_u64(), v["in_tree"].as_bool()), (Some(2), Some(true)), "{v}");
    assert_same_tree(&w.source, &site.data);
    let s = site.status();
    assert_eq!((s["generation"].as_u64(), s["waiting"].is_null()), (Some(2), true));
    let err = fails(&["recipient", "approve", "--config", &site.config], 2);
    assert!(err.contains("nothing waits"), "{err}");
    // The receipt goes with the next run.
    site.run(false);
    w.owner_run();
    assert_eq!(w.owner_status()["recipients"][0]["applied_generation"], 2);
    assert_eq!(site.rejections(), Vec::<String>::new());
    // Installing it later did not make its reply look unfiled: a copy of it is a replay.
    fs::write(site.maildir(&w).join("new").join("copy.eml"), &reply).unwrap();
    site.run(false);
    assert_eq!(site.rejections(), ["replay"]);
}

#[test]
fn an_apply_window_holds_an_update_until_the_window_opens() {
    use mailferry::node::install::local_now;
    let w = World::new();
    let site = w.site("site1");
    // A window that opens three hours from now (local time) and lasts an hour.
    let now = local_now();
    let opens = now.checked_add(jiff::Span::new().hours(3)).unwrap();
    let closes = opens.checked_add(jiff::Span::new().hours(1)).unwrap();
    let window = format!("daily {:02}:{:02}-{:02}:{:02}", opens.hour(), opens.minute(), closes.hour(), closes.minute());
    configure(&site, &format!("apply-window = [{}]", q(&window)));
    put(&w.source, "a", b"1", 0o644);
    w.publish();
    let out = {
        site.run(true);
        w.owner_run();
        site.run(false)
    };
    assert!(out.contains("waits for its apply window"), "{out}");
    assert!(snapshot(&site.data).is_empty(), "nothing is installed outside the window");
    let s = site.status();
    assert_eq!((s["waiting"]["generation"].as_u64(), s["waiting"]["reason"].as_str()), (Some(1), Some("apply-window")));
    assert!(s["waiting"]["window_opens"].as_str().is_some(), "{s}");
    assert_eq!(run(&["status", "--config", &site.config]).status.code(), Some(0), "waiting for a window is normal");
    // Requests go on outside the window.
    site.run(true);
    assert_eq!(site.status()["outstanding"], 1);
    w.owner_run();
    site.run(false);
    assert_eq!(site.status()["waiting"]["generation"], 1);

    // The clock, injected: outside the window nothing happens; inside, the update goes in.
    let cfg = match mailferry::config::NodeConfig::load(Path::new(&site.config)).unwrap() {
        mailferry::config::NodeConfig::Recipient(c) => c,
        _ => unreachable!(),
    };
    let mut r = mailferry::node::recipient::Recipient::open(cfg).unwrap();
    let before = opens.checked_sub(jiff::Span::new().minutes(1)).unwrap();
    assert!(r.install_due(before).unwrap().is_none());
    assert!(snapshot(&site.data).is_empty());
    let inside = opens.checked_add(jiff::Span::new().minutes(30)).unwrap();
    let done = r.install_due(inside).unwrap().expect("installed in the window");
    assert_eq!((done.generation, done.applied), (1, 1));
    drop(r);
    assert_same_tree(&w.source, &site.data);
    assert!(site.status()["waiting"].is_null());
    site.run(false);
    w.owner_run();
    assert_eq!(w.owner_status()["recipients"][0]["applied_generation"], 1);
}

// ---- shipped hooks ----

/// The script an owner ships: it notes that it ran, beside the data tree.
const SHIPPED: &str =
    "#!/bin/sh\necho \"shipped ran for generation $MAILFERRY_GENERATION\" >> \"$MAILFERRY_DATA/../shipped.log\"\n";

/// An owner that signs replies (or not), a recipient that pins its key (or not) and opts in (or not),
/// and generation 1 published with a shipped post-apply script.
fn shipping_world(sign: bool, pin: bool, opt_in: bool) -> (World, Site) {
    let w = World::new();
    let unpinned = if pin { None } else { Some(w.site("site1")) };
    if sign {
        let cfg = fs::read_to_string(&w.owner_config).unwrap();
        fs::write(&w.owner_config, cfg.replacen("signing = \"hmac\"", "signing = \"hmac+ed25519\"", 1)).unwrap();
    }
    let site = unpinned.unwrap_or_else(|| w.site("site1"));
    assert_eq!(site.status()["owner_public_key"].is_string(), pin);
    if opt_in {
        configure(&site, "shipped-hooks = true");
    }
    put(&w.source, "data.txt", b"data", 0o644);
    put(&w.source, ".mailferry/hooks/post-apply", SHIPPED.as_bytes(), 0o755);
    w.publish();
    (w, site)
}

fn shipped_log(site: &Site) -> String {
    fs::read_to_string(site.data.parent().unwrap().join("shipped.log")).unwrap_or_default()
}

#[test]
fn a_shipped_script_runs_when_signed_under_the_pinned_key_and_opted_in() {
    let (w, site) = shipping_world(true, true, true);
    site.run(true);
    w.owner_run();
    let out = site.run(false);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(shipped_log(&site), "shipped ran for generation 1\n", "{out}");
    assert_eq!(count(&site.dir.join("hooks")), 0, "the private copy is removed after it ran");
}

#[test]
fn a_shipped_script_does_not_run_without_the_opt_in() {
    let (w, site) = shipping_world(true, true, false);
    site.run(true);
    w.owner_run();
    let out = site.run(false);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(shipped_log(&site), "");
    assert!(out.contains("not running the shipped post-apply script") && out.contains("did not opt in"), "{out}");
}

#[test]
fn a_shipped_script_does_not_run_when_the_recipient_pins_no_owner_key() {
    // The owner signs, but a recipient that pinned nothing has not verified the signature.
    let (w, site) = shipping_world(true, false, true);
    site.run(true);
    w.owner_run();
    let out = site.run(false);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(shipped_log(&site), "");
    assert!(out.contains("the reply was not signed with the owner's Ed25519 key pinned"), "{out}");
}

#[test]
fn a_shipped_script_does_not_run_when_the_owner_does_not_sign() {
    let (w, site) = shipping_world(false, false, true);
    site.run(true);
    w.owner_run();
    let out = site.run(false);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(shipped_log(&site), "");
    assert!(out.contains("the reply was not signed with the owner's Ed25519 key pinned"), "{out}");
}

#[test]
fn a_shipped_script_changed_in_the_tree_after_the_swap_does_not_run() {
    let (w, site) = shipping_world(true, true, true);
    site.run(true);
    w.owner_run();
    let args = ["recipient", "run", "--config", site.config.as_str(), "--once", "--no-request"];
    assert!(crashed(&run_with_failpoint(&args, "after-swap-before-hook:1")));
    // Someone with write access to the data tree swaps the script before it runs.
    let evil = "#!/bin/sh\necho evil >> \"$MAILFERRY_DATA/../shipped.log\"\n";
    put(&site.data, ".mailferry/hooks/post-apply", evil.as_bytes(), 0o755);
    let out = site.run(false);
    assert_eq!(shipped_log(&site), "", "neither the script nor the evil one ran");
    assert!(out.contains("its bytes are not the ones the signed tree lists"), "{out}");
    assert_eq!(count(&site.dir.join("hooks")), 0, "the rejected copy is not kept");
}

#[test]
fn a_shipped_script_that_is_a_link_in_the_signed_tree_does_not_run() {
    let w = World::new();
    let cfg = fs::read_to_string(&w.owner_config).unwrap();
    fs::write(&w.owner_config, cfg.replacen("signing = \"hmac\"", "signing = \"hmac+ed25519\"", 1)).unwrap();
    let site = w.site("site1");
    configure(&site, "shipped-hooks = true");
    put(&w.source, "tools/install.sh", SHIPPED.as_bytes(), 0o755);
    fs::create_dir_all(w.source.join(".mailferry/hooks")).unwrap();
    std::os::unix::fs::symlink("../../tools/install.sh", w.source.join(".mailferry/hooks/post-apply")).unwrap();
    w.publish();
    site.run(true);
    w.owner_run();
    let out = site.run(false);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(shipped_log(&site), "");
    assert!(out.contains("does not list it as a regular file"), "{out}");
}

#[test]
fn a_subscription_has_its_own_hooks_and_install_mode_and_inherits_the_rest() {
    let w = World::new();
    put(&w.source, "README", b"main tree\n", 0o644);
    w.publish();
    let sig = w.path("src-sigdb");
    put(&sig, "main.cvd", b"signatures 1\n", 0o644);
    ok(&[
        "owner",
        "channel",
        "add",
        "--config",
        &w.owner_config,
        "--name",
        "sigdb",
        "--source",
        sig.to_str().unwrap(),
        "--open",
    ]);
    ok(&["owner", "publish", "--config", &w.owner_config, "--channel", "sigdb"]);
    let site = w.site("site1");
    let (main_hook, main_log, _) = recording_hook(&w, "main");
    let (sig_hook, sig_log, _) = recording_hook(&w, "sig");
    configure(&site, &format!("post-apply = {}", q(main_hook.to_str().unwrap())));
    let tree = w.path("site1-sigdb");
    ok(&["recipient", "subscribe", "--config", &site.config, "--channel", "sigdb", "--data", tree.to_str().unwrap()]);
    // The [[subscription]] table is the file's last: its own hook, and a manual install.
    let mut text = fs::read_to_string(&site.config).unwrap();
    text.push_str(&format!("post-apply = {}\ninstall = \"manual\"\n", q(sig_hook.to_str().unwrap())));
    fs::write(&site.config, text).unwrap();
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(runs(&main_log).len(), 1, "the main tree's hook ran for the main tree");
    assert!(runs(&main_log)[0].contains("channel=default"), "{:?}", runs(&main_log));
    assert_eq!(count(&tree), 0, "sigdb waits for approve");
    assert!(runs(&sig_log).is_empty());
    let st = site.status();
    let sub = st["subscriptions"].as_array().unwrap().iter().find(|s| s["channel"] == "sigdb").unwrap().clone();
    assert_eq!(sub["waiting"]["reason"], "manual", "{sub}");
    assert_eq!(st["waiting"], serde_json::Value::Null, "the main tree installs at once");
    let out = ok(&["recipient", "approve", "--config", &site.config, "--channel", "sigdb", "--json"]);
    assert!(out.contains("\"generation\":1"), "{out}");
    assert_same_tree(&sig, &tree);
    let r = runs(&sig_log);
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(r[0].contains("channel=sigdb"), "its own hook, told its channel: {r:?}");
    assert_eq!(runs(&main_log).len(), 1, "the main tree's hook did not run for sigdb");
}
