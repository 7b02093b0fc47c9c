//! `mailferry recipient rollback`: the data tree returns to the generation before, exactly, from files kept
//! locally; the undone generation is held back until a newer one arrives or the hold is released; a crash
//! at any step converges; and it is refused when there is nothing to return to or the tree is not as applied.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;

use crate::crash::{crashed, run_with_failpoint};
use crate::util::*;

/// A recipient that applied generation 1 and then generation 2; returns a copy of generation 1's tree.
/// Generation 2 edits, deletes, adds, changes modes, turns a file into a directory and the other way
/// round, retargets a link and turns a link into a file.
fn two_generations() -> (World, Site, PathBuf) {
    let w = World::new();
    let site = w.site("site1");
    varied_tree(&w.source);
    symlink("README", w.source.join("latest")).unwrap();
    symlink("../data", w.source.join("bin/data-link")).unwrap();
    w.publish();
    w.sync(&site);
    let gen1 = w.path("generation-1");
    copy_tree(&w.source, &gen1);

    put(&w.source, "README", b"generation 2\n", 0o644);
    fs::remove_dir_all(w.source.join("old")).unwrap();
    put(&w.source, "bin/tool", b"#!/bin/sh\necho tool\n", 0o644);
    put(&w.source, "deep/a/b/c/d/e/leaf.txt", b"leaf\n", 0o755);
    fs::remove_file(w.source.join("typechange")).unwrap();
    put(&w.source, "typechange/x", b"x\n", 0o644);
    fs::remove_dir_all(w.source.join("dir-to-file")).unwrap();
    put(&w.source, "dir-to-file", b"now a file\n", 0o755);
    put(&w.source, "added/new.bin", &[7u8; 5000], 0o644);
    fs::remove_file(w.source.join("latest")).unwrap();
    symlink("added/new.bin", w.source.join("latest")).unwrap();
    fs::remove_file(w.source.join("bin/data-link")).unwrap();
    put(&w.source, "bin/data-link", b"a file now\n", 0o644);
    w.publish();
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["previous_generation"], 1);
    assert_eq!(count(&site.dir.join("staging")), 1, "only the store of generation 1 is kept");
    (w, site, gen1)
}

fn rollback(site: &Site) -> String {
    let args = ["recipient", "rollback", "--config", site.config.as_str()];
    let out = run(&args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

#[test]
fn rollback_restores_the_exact_tree_before_and_holds_the_undone_generation_back() {
    let (w, site, gen1) = two_generations();
    let log = rollback(&site);
    assert!(log.contains("rolled back generation 2 to generation 1"), "{log}");
    assert_same_tree(&gen1, &site.data);
    let s = site.status();
    assert_eq!((s["generation"].as_u64(), s["rollback_held"].as_u64()), (Some(1), Some(2)), "{s}");
    assert!(s["previous_generation"].is_null(), "one level: nothing is kept after a rollback");
    assert_eq!(count(&site.dir.join("staging")), 0);
    let out = run(&["status", "--config", &site.config]);
    assert_eq!(out.status.code(), Some(1), "a hold needs attention");
    assert!(String::from_utf8_lossy(&out.stdout).contains("HELD"));

    // The owner still offers generation 2: it is not applied, and nothing is refused either.
    site.run(true);
    w.owner_run();
    let log = site.run(false);
    assert!(log.contains("not applying generation 2") && log.contains("--release"), "{log}");
    assert_same_tree(&gen1, &site.data);
    assert_eq!(site.status()["generation"], 1);
    assert_eq!(site.rejections(), Vec::<String>::new());
    assert_eq!(site.status()["outstanding"], 0, "the request counts as answered");

    // A newer generation applies normally and ends the hold.
    put(&w.source, "README", b"generation 3\n", 0o644);
    w.publish();
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    let s = site.status();
    assert_eq!((s["generation"].as_u64(), s["rollback_held"].as_u64()), (Some(3), None), "{s}");
    assert_eq!(s["previous_generation"], 1, "the generation applied before 3 is kept");
    assert_eq!(count(&site.dir.join("staging")), 1);
}

#[test]
fn a_released_hold_lets_the_undone_generation_apply_again() {
    let (w, site, gen1) = two_generations();
    rollback(&site);
    assert_same_tree(&gen1, &site.data);
    let args = ["recipient", "rollback", "--config", site.config.as_str(), "--release"];
    let out = run(&args);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stderr).contains("generation 2 may be applied"));
    assert!(site.status()["rollback_held"].is_null());
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 2);
    assert_eq!(run(&["status", "--config", &site.config]).status.code(), Some(0));
}

#[test]
fn rollback_is_refused_with_nothing_kept_a_drifted_tree_or_an_interrupted_apply() {
    let w = World::new();
    let site = w.site("site1");
    put(&w.source, "a", b"1", 0o644);
    w.publish();
    w.sync(&site);
    let err = fails(&["recipient", "rollback", "--config", &site.config], 2);
    assert!(err.contains("nothing to roll back to"), "{err}");
    assert_eq!(site.status()["generation"], 1);

    // Generation 2, then someone edits the tree: the rollback would lose the edit, so it is refused.
    put(&w.source, "a", b"2", 0o644);
    put(&w.source, "b", b"new", 0o644);
    w.publish();
    w.sync(&site);
    put(&site.data, "b", b"edited locally", 0o644);
    let before = snapshot(&site.data);
    let err = fails(&["recipient", "rollback", "--config", &site.config], 2);
    assert!(err.contains("`b` was changed since the generation was applied"), "{err}");
    assert_eq!(snapshot(&site.data), before);
    // The next sync repairs the drift; the generation before is still kept, and the rollback works.
    w.sync(&site);
    assert_eq!(site.status()["previous_generation"], 1);
    rollback(&site);
    assert_eq!(fs::read(site.data.join("a")).unwrap(), b"1");
    assert!(!site.data.join("b").exists());
    // One level only.
    let err = fails(&["recipient", "rollback", "--config", &site.config], 2);
    assert!(err.contains("nothing to roll back to"), "{err}");

    // An apply interrupted after its commit must be finished first.
    put(&w.source, "a", b"3", 0o644);
    w.publish();
    site.run(true);
    w.owner_run();
    let args = ["recipient", "run", "--config", site.config.as_str(), "--once", "--no-request"];
    assert!(crashed(&run_with_failpoint(&args, "apply-committed:1")));
    let err = fails(&["recipient", "rollback", "--config", &site.config], 2);
    assert!(err.contains("the apply of generation 3 was interrupted"), "{err}");
    site.run(false);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 3);
}

#[test]
fn killed_at_every_rollback_step_the_tree_ends_as_the_generation_before() {
    let mut k = 1;
    loop {
        let (w, site, gen1) = two_generations();
        let gen2 = snapshot(&site.data);
        let args = ["recipient", "rollback", "--config", site.config.as_str()];
        let out = run_with_failpoint(&args, &format!("apply-step:{k}"));
        if !crashed(&out) {
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert!(k > 10, "killed at only {} distinct points; the rollback should have more steps", k - 1);
            assert_same_tree(&gen1, &site.data);
            break;
        }
        assert_ne!(snapshot(&site.data), gen2, "step {k} ran, so the tree is no longer generation 2");
        assert_eq!(run(&["status", "--config", &site.config]).status.code(), Some(1), "step {k}");
        // Either a rollback or an ordinary run finishes it.
        if k % 2 == 1 {
            assert!(rollback(&site).contains("finished rolling back generation 2 to generation 1"));
        } else {
            site.run(false);
        }
        assert_same_tree(&gen1, &site.data);
        let s = site.status();
        assert_eq!((s["generation"].as_u64(), s["rollback_held"].as_u64()), (Some(1), Some(2)), "step {k}: {s}");
        // The owner's generation 2 is held back after a crash as well.
        w.sync(&site);
        assert_same_tree(&gen1, &site.data);
        k += 1;
    }
}

#[test]
fn killed_right_after_the_rollback_commits_the_next_run_finishes_it() {
    let (_w, site, gen1) = two_generations();
    let gen2 = snapshot(&site.data);
    let args = ["recipient", "rollback", "--config", site.config.as_str()];
    assert!(crashed(&run_with_failpoint(&args, "apply-committed:1")));
    assert_eq!(snapshot(&site.data), gen2, "nothing was touched before the first step");
    site.run(false);
    assert_same_tree(&gen1, &site.data);
    assert_eq!(site.status()["rollback_held"], 2);
}
