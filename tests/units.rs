//! What an operator meets: the shipped systemd units' sandbox (each `ReadWritePaths=` entry a mount of its
//! own, everything else read-only), reproduced with `unshare` and `mount --bind` in a private mount
//! namespace, so nothing leaks to the host even when a test fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::crash::{crashed, run_with_failpoint};
use crate::util::*;

/// Exit code of the sandbox script when a mount fails (the test then fails and says why).
const MOUNT_FAILED: i32 = 97;

/// Runs `mailferry ARGS` in a private mount namespace where `read_only` (if any) is read-only and each of
/// `rw` is a separate writable bind mount of itself, as systemd sets up `ProtectSystem=strict` with
/// `ReadWritePaths=`.
fn sandboxed(read_only: Option<&Path>, rw: &[PathBuf], args: &[&str]) -> Output {
    let mut script = String::from("set -e\n");
    let q = |p: &Path| format!("'{}'", p.display());
    if let Some(root) = read_only {
        script += &format!("mount --bind {0} {0} && mount -o remount,bind,ro {0} || exit {MOUNT_FAILED}\n", q(root));
    }
    for p in rw {
        script += &format!("mount --bind {0} {0} && mount -o remount,bind,rw {0} || exit {MOUNT_FAILED}\n", q(p));
    }
    script += "exec \"$@\"\n";
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script, "sandbox"])
        .arg(bin())
        .args(args)
        .env_remove("MAILFERRY_FAILPOINT")
        .env("MAILFERRY_LOG", "mailferry=info")
        .output()
        .expect("failed to start `unshare` (util-linux): these tests need it");
    assert_ne!(
        out.status.code(),
        Some(MOUNT_FAILED),
        "could not set up the sandbox's bind mounts (these tests need root and `mount --bind`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("unshare failed"),
        "could not create a mount namespace (these tests need root):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One value of `KEY=` lines in a unit file, all of them joined (whitespace-separated values).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// `path` (absolute) moved under `root`.
fn rebase(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('-').trim_start_matches('/'))
}

/// A world with a published tree and a recipient whose state directory and data tree are at `state` and
/// `data`; returns the world and the recipient's config.
fn world_with(state: &Path, data: &Path) -> (World, String) {
    let w = World::new();
    varied_tree(&w.source);
    w.publish();
    let enrollment = w.path("site.enrollment");
    let e = enrollment.to_str().unwrap();
    ok(&[
        "owner",
        "add-recipient",
        "--config",
        &w.owner_config,
        "--name",
        "site",
        "--address",
        "site@customer.test",
        "--out",
        e,
    ]);
    init_recipient(state, data, &enrollment, &w.spool);
    (w, state.join("recipient.toml").to_str().unwrap().to_owned())
}

fn recipient_run(config: &str, request: bool) -> Vec<String> {
    let mut args = vec!["recipient".to_owned(), "run".into(), "--config".into(), config.into(), "--once".into()];
    if !request {
        args.push("--no-request".into());
    }
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The old shipped unit listed the state directory and the data tree as two `ReadWritePaths=`: same file
/// system, two mounts, so every rename from the state directory's staging into the tree failed with
/// EXDEV and left an apply that could never finish. Now the recipient tries a rename before staging and,
/// when no staging place works, refuses with the fix before it touches anything.
#[test]
fn separate_mounts_of_state_and_data_tree_are_refused_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let (state, data) = (tmp.path().join("state"), tmp.path().join("mnt/db"));
    let (w, config) = world_with(&state, &data);
    ok(&strs(&recipient_run(&config, true)));
    w.owner_run();
    let before = snapshot(&data);
    let out = sandboxed(None, &[state.clone(), data.clone()], &strs(&recipient_run(&config, false)));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(err.contains("cannot stage files for data tree"), "{}", text(&out));
    assert!(err.contains("ReadWritePaths="), "the error names the fix\n{}", text(&out));
    assert!(err.contains(&format!("{}", state.join("staging").display())), "{}", text(&out));
    assert!(err.contains(".db.mailferry-staging"), "{}", text(&out));
    // Nothing started: no interrupted apply, the tree as it was, and the next run outside the sandbox
    // applies the reply.
    assert_eq!(snapshot(&data), before);
    assert!(!state.join("journal.json").exists(), "an apply was left interrupted\n{}", text(&out));
    ok(&strs(&recipient_run(&config, false)));
    assert_same_tree(&w.source, &data);
}

/// The recipient unit as shipped (`packaging/systemd/mailferry-recipient.service`): the example config's
/// data tree and the unit's state directory, under a read-only root where only the unit's
/// `ReadWritePaths=` and `StateDirectory=` are writable, each its own mount. A sync works.
#[test]
fn the_shipped_recipient_unit_sandbox_syncs() {
    let unit =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/systemd/mailferry-recipient.service"))
            .unwrap();
    let example = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/recipient.toml")).unwrap();
    let example: toml::Table = toml::from_str(&example).unwrap();
    let data_path = example["recipient"]["data"].as_str().unwrap();
    let state_name = unit_values(&unit, "StateDirectory");
    assert_eq!(state_name.len(), 1, "one StateDirectory= in the unit");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let state = root.join("var/lib").join(&state_name[0]);
    let data = rebase(&root, data_path);
    let mut rw = vec![state.clone()];
    for p in unit_values(&unit, "ReadWritePaths") {
        let p = rebase(&root, &p);
        fs::create_dir_all(&p).unwrap();
        rw.push(p);
    }
    assert!(
        rw.iter().any(|p| data.starts_with(p)),
        "the unit's ReadWritePaths= do not cover the data tree {data_path}"
    );
    let (w, config) = world_with(&state, &data);
    // The sandbox makes the recipient's own directories look like the unit's; the spool is outside it.
    let run = |request| {
        let out = sandboxed(Some(&root), &rw, &strs(&recipient_run(&config, request)));
        assert!(out.status.success(), "{}", text(&out));
    };
    run(true);
    w.owner_run();
    run(false);
    assert_same_tree(&w.source, &data);
    w.owner_run();
    assert_eq!(w.owner_status()["recipients"][0]["applied_generation"], 1, "the owner recorded the receipt");
    // A second generation, with files replaced and removed (renames both ways), works too.
    put(&w.source, "README", b"changed\n", 0o644);
    fs::remove_file(w.source.join("old/gone.txt")).unwrap();
    w.publish();
    run(true);
    w.owner_run();
    run(false);
    assert_same_tree(&w.source, &data);
}

/// An apply interrupted after its journal was committed, with its staging directory in the state
/// directory, cannot be finished inside the sandbox (renames across two mounts): the error says so and
/// how to finish it; doing that finishes it.
#[test]
fn an_interrupted_apply_that_cannot_cross_mounts_says_how_to_finish_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (state, parent) = (tmp.path().join("state"), tmp.path().join("mnt"));
    let data = parent.join("db");
    let (w, config) = world_with(&state, &data);
    put(&data, "README", b"old\n", 0o644);
    ok(&strs(&recipient_run(&config, true)));
    w.owner_run();
    let out = run_with_failpoint(&strs(&recipient_run(&config, false)), "apply-committed:1");
    assert!(crashed(&out), "{}", text(&out));
    assert!(state.join("journal.json").exists());
    let out = sandboxed(None, &[state.clone(), parent.clone()], &strs(&recipient_run(&config, false)));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(err.contains("are on different mounts"), "{}", text(&out));
    assert!(err.contains("recipient run --once --no-request"), "{}", text(&out));
    assert!(err.contains("ReadWritePaths="), "{}", text(&out));
    // As the message says: once where both are one mount.
    ok(&strs(&recipient_run(&config, false)));
    assert!(!state.join("journal.json").exists());
    assert_same_tree(&w.source, &data);
}

/// The visible subcommands under `path` (`[]` is the top level), as `--help` lists them.
fn subcommands(path: &[&str]) -> Vec<String> {
    let mut args = path.to_vec();
    args.push("--help");
    let help = ok(&args);
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

/// Every command path: `["owner"], ["owner", "run"], ...`.
fn command_paths() -> Vec<Vec<String>> {
    let mut out = vec![];
    for top in subcommands(&[]) {
        let nested = subcommands(&[&top]);
        out.push(vec![top.clone()]);
        out.extend(nested.into_iter().map(|n| vec![top.clone(), n]));
    }
    assert!(out.len() > 10, "{out:?}");
    out
}

#[test]
fn man_pages_render_and_name_every_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("man");
    ok(&["manpage", "--out", dir.to_str().unwrap()]);
    let mut pages = vec![dir.join("mailferry.1")];
    for path in command_paths() {
        let page = dir.join(format!("mailferry-{}.1", path.join("-")));
        assert!(page.exists(), "no man page for `mailferry {}`", path.join(" "));
        pages.push(page);
    }
    for page in &pages {
        // groff with every warning on but `break` (a long synopsis that cannot be justified is typography,
        // not a broken page): a page that does not render cleanly fails here.
        let out =
            Command::new("groff").args(["-man", "-Tutf8", "-ww", "-Wbreak", "-z"]).arg(page).output().expect("groff");
        assert!(out.status.success() && out.stderr.is_empty(), "{}: {}", page.display(), text(&out));
    }
    let rendered = Command::new("man").arg("-l").arg(&pages[0]).env("MANPAGER", "cat").output().expect("man");
    let rendered = String::from_utf8_lossy(&rendered.stdout);
    for top in subcommands(&[]) {
        assert!(rendered.contains(&format!("mailferry-{top}(1)")), "`man mailferry` does not list {top}:\n{rendered}");
    }
    // Without --out the main page goes to stdout.
    assert!(ok(&["manpage"]).contains(".TH mailferry 1"));
}

#[test]
fn completions_name_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(&["completions", shell]);
        for path in command_paths() {
            let name = path.last().unwrap();
            assert!(script.contains(name.as_str()), "{shell} completions miss `mailferry {}`", path.join(" "));
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let bash = tmp.path().join("mailferry.bash");
    fs::write(&bash, ok(&["completions", "bash"])).unwrap();
    let out = Command::new("bash").arg("-n").arg(&bash).output().unwrap();
    assert!(out.status.success(), "the bash completions do not parse: {}", text(&out));
}

/// `Type=notify`: a daemon tells systemd it is ready (READY=1 on `$NOTIFY_SOCKET`) once its loop starts.
#[test]
fn a_daemon_tells_systemd_it_is_ready() {
    let w = World::new();
    let tmp = tempfile::tempdir().unwrap();
    let socket_path = tmp.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let log = tmp.path().join("owner.log");
    let mut child = Command::new(bin())
        .args(["owner", "run", "--config", &w.owner_config])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("MAILFERRY_LOG", "mailferry=info")
        .stdin(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let got = socket.recv(&mut buf);
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    let n = got.unwrap_or_else(|e| {
        panic!("no readiness notification within 30 s ({e})\n{}", fs::read_to_string(&log).unwrap())
    });
    let msg = String::from_utf8_lossy(&buf[..n]);
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert!(msg.contains(&format!("MAINPID={}", child.id())), "{msg:?}");
    assert!(status.success(), "{status}\n{}", fs::read_to_string(&log).unwrap());
}

/// Both units: readiness by notification, no restart loop on a config error, and a sandbox that
/// `systemd-analyze security` rates at most 2.0 (it rated the first units 6.8).
#[test]
fn the_shipped_units_are_hardened() {
    for name in ["mailferry-owner.service", "mailferry-recipient.service"] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd").join(name);
        let unit = fs::read_to_string(&path).unwrap();
        for (key, want) in [
            ("Type", "notify"),
            ("RestartPreventExitStatus", "2"),
            ("UMask", "0077"),
            ("User", "mailferry"),
            ("ProtectSystem", "strict"),
        ] {
            assert_eq!(unit_values(&unit, key), [want], "{name}: {key}=");
        }
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=20"])
            .arg(&path)
            .output()
            .expect("systemd-analyze (package systemd) is needed to check the units");
        assert!(out.status.success(), "{name} is exposed more than 2.0:\n{}", text(&out));
    }
}
