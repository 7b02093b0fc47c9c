//! Crash safety: the process is aborted (as by `kill -9`) at every step of an apply, and at the points
//! where a message has been acted on but not yet filed. After the next run the tree must be exactly the new
//! generation, nothing applied twice, nothing answered twice.

use std::fs;
use std::process::Command;

use crate::util::*;

pub fn run_with_failpoint(args: &[&str], point: &str) -> std::process::Output {
    Command::new(bin()).args(args).env("MAILFERRY_FAILPOINT", point).output().unwrap()
}

pub fn crashed(out: &std::process::Output) -> bool {
    use std::os::unix::process::ExitStatusExt;
    out.status.signal() == Some(6) // SIGABRT
}

/// A world whose recipient has generation 1 and a reply to generation 2 waiting, with many steps.
fn pending_update() -> (World, Site) {
    let w = World::new();
    let site = w.site("site1");
    varied_tree(&w.source);
    for i in 0..50 {
        put(&w.source, &format!("many/f{i:02}"), format!("v1 {i}").as_bytes(), 0o644);
    }
    w.publish();
    w.sync(&site);
    // 50 changed files: a place and a mode step each, plus deletes, a type change and directories.
    for i in 0..50 {
        put(&w.source, &format!("many/f{i:02}"), format!("v2 {i}").as_bytes(), 0o644);
    }
    fs::remove_dir_all(w.source.join("old")).unwrap();
    fs::remove_file(w.source.join("typechange")).unwrap();
    put(&w.source, "typechange/x", b"x", 0o755);
    w.publish();
    site.run(true);
    w.owner_run();
    (w, site)
}

#[test]
fn killed_at_every_apply_step_the_next_run_finishes_the_generation() {
    let mut k = 1;
    loop {
        let (w, site) = pending_update();
        let v1 = snapshot(&site.data);
        let args = ["recipient", "run", "--config", site.config.as_str(), "--once", "--no-request"];
        let out = run_with_failpoint(&args, &format!("apply-step:{k}"));
        if !crashed(&out) {
            // k is past the last step: the run completed normally.
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert!(k > 100, "killed at only {} distinct points; the update should have more steps", k - 1);
            assert_same_tree(&w.source, &site.data);
            break;
        }
        assert_ne!(snapshot(&site.data), v1, "step {k} ran, so the tree is between generations on disk");
        let status = run(&["status", "--config", &site.config]);
        assert_eq!(status.status.code(), Some(1), "status flags the interrupted apply");
        assert!(String::from_utf8_lossy(&status.stdout).contains("interrupted apply"));
        site.run(false);
        assert_same_tree(&w.source, &site.data);
        assert_eq!(site.status()["generation"], 2, "after crash at step {k}");
        assert_eq!(site.rejections(), Vec::<String>::new(), "the re-fetched reply is not a replay (step {k})");
        // The receipt arrives exactly once.
        w.owner_run();
        assert_eq!(w.owner_status()["recipients"][0]["applied_generation"], 2);
        k += 1;
    }
}

#[test]
fn killed_around_the_journal_commit_the_tree_is_old_or_new() {
    for point in ["apply-committed:1", "apply-done:1", "before-settle:1"] {
        let (w, site) = pending_update();
        let v1 = snapshot(&site.data);
        let args = ["recipient", "run", "--config", site.config.as_str(), "--once", "--no-request"];
        let out = run_with_failpoint(&args, point);
        assert!(crashed(&out), "{point} was reached");
        let now = snapshot(&site.data);
        if point == "apply-committed:1" {
            assert_eq!(now, v1, "nothing was touched before the first step");
        }
        site.run(false);
        assert_same_tree(&w.source, &site.data);
        assert_eq!(site.status()["generation"], 2);
        assert!(site.rejections().is_empty(), "{point}: {:?}", site.rejections());
    }
}

#[test]
fn owner_killed_while_answering_replies_exactly_once() {
    for point in ["owner-queued:1", "before-settle:1"] {
        let w = World::new();
        let site = w.site("site1");
        varied_tree(&w.source);
        w.publish();
        site.run(true);
        let args = ["owner", "run", "--config", w.owner_config.as_str(), "--once"];
        let out = run_with_failpoint(&args, point);
        assert!(crashed(&out), "{point} was reached");
        w.owner_run();
        w.owner_run();
        let replies = fs::read_dir(site.maildir(&w).join("new")).unwrap().count();
        assert_eq!(replies, 1, "{point}: exactly one reply");
        site.run(false);
        assert_same_tree(&w.source, &site.data);
        assert!(rejections(&w.owner_config).is_empty(), "{point}");
    }
}

#[test]
fn a_full_disk_while_staging_leaves_the_tree_and_the_reply_alone() {
    let w = World::new();
    let fs_root = w.path("small-fs");
    let disk = Tmpfs::mount(&fs_root, "600k");
    let site = w.site("site1");
    // Move the data tree onto the small file system (staging then goes beside it, on the same one).
    let data = fs_root.join("data");
    fs::create_dir_all(&data).unwrap();
    let cfg = fs::read_to_string(&site.config).unwrap().replace(site.data.to_str().unwrap(), data.to_str().unwrap());
    fs::write(&site.config, cfg).unwrap();
    put(&w.source, "small.txt", b"fits\n", 0o644);
    w.publish();
    w.sync(&site);
    assert_same_tree(&w.source, &data);
    let v1 = snapshot(&data);

    // 1 MiB that does not compress cannot be staged in 600 KiB.
    let noise: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2654435761).rotate_left(7) >> 3) as u8).collect();
    put(&w.source, "big.bin", &noise, 0o644);
    w.publish();
    site.run(true);
    w.owner_run();
    let out = run(&["recipient", "run", "--config", &site.config, "--once", "--no-request"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("No space left on device") && err.contains("data tree is unchanged"), "{err}");
    assert_eq!(snapshot(&data), v1, "the tree is still generation 1");
    assert!(site.rejections().is_empty(), "a full disk is not the message's fault");
    assert_eq!(fs::read_dir(site.maildir(&w).join("new")).unwrap().count(), 1, "the reply waits in the inbox");
    assert_eq!(site.status()["generation"], 1);

    // With room, the same reply applies.
    disk.resize("8m");
    site.run(false);
    assert_same_tree(&w.source, &data);
    assert_eq!(site.status()["generation"], 2);
}

/// An apply interrupted after its journal was committed; before the next run finishes it, a directory of
/// the tree is swapped for a link to a look-alike directory outside. The next run must refuse to write
/// through the link (not one byte outside changes), and finish once the tree is put back.
#[test]
fn a_directory_swapped_for_a_link_mid_apply_is_never_written_through() {
    let w = World::new();
    let site = w.site("site1");
    varied_tree(&w.source);
    w.publish();
    w.sync(&site);
    put(&w.source, "deep/a/b/c/d/e/leaf.txt", b"leaf v2\n", 0o755);
    put(&w.source, "deep/a/b/new.txt", b"new\n", 0o644);
    w.publish();
    site.run(true);
    w.owner_run();
    let args = ["recipient", "run", "--config", site.config.as_str(), "--once", "--no-request"];
    assert!(crashed(&run_with_failpoint(&args, "apply-committed:1")));

    let outside = w.path("outside");
    copy_tree(&site.data.join("deep/a"), &outside);
    let before = snapshot(&outside);
    fs::rename(site.data.join("deep/a"), w.path("real-a")).unwrap();
    std::os::unix::fs::symlink(&outside, site.data.join("deep/a")).unwrap();
    let err = fails(&args, 2);
    assert!(err.contains("deep/a` is not a directory") && err.contains("nothing is written through it"), "{err}");
    assert_eq!(snapshot(&outside), before, "nothing outside the tree changed");
    assert_eq!(run(&["status", "--config", &site.config]).status.code(), Some(1), "the apply still waits");

    fs::remove_file(site.data.join("deep/a")).unwrap();
    fs::rename(w.path("real-a"), site.data.join("deep/a")).unwrap();
    site.run(false);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 2);
}
