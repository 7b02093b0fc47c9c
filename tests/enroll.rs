//! Bulk enrollment (`owner add-recipients`) and the owner's tags (`owner tag`), through the binary.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::*;

/// A CSV list of `n` recipients `site0..`, each tagged `eu` and `tier-N%3`.
fn csv(n: usize) -> String {
    std::iter::once("name,address,tags\n".to_owned())
        .chain((0..n).map(|i| format!("site{i},site{i}@customer.test,eu;tier-{}\n", i % 3)))
        .collect()
}

/// `owner add-recipients --json`, parsed.
fn enroll(w: &World, list: &Path, out: &Path) -> Value {
    let text = ok(&[
        "owner",
        "add-recipients",
        "--config",
        &w.owner_config,
        "--list",
        list.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `owner add-recipients` expected to fail with exit 2; returns stderr.
fn enroll_fails(w: &World, list: &Path, out: &Path) -> String {
    fails(
        &[
            "owner",
            "add-recipients",
            "--config",
            &w.owner_config,
            "--list",
            list.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        2,
    )
}

/// The names the owner has registered.
fn registered(w: &World) -> Vec<String> {
    w.owner_status()["recipients"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect()
}

/// A recipient set up from an enrollment file the bulk command wrote.
fn site_from(w: &World, name: &str, enrollment: &Path) -> Site {
    let dir = w.path(name);
    let data = w.path(&format!("{name}-data"));
    init_recipient(&dir, &data, enrollment, &w.spool);
    let config = dir.join("recipient.toml").to_str().unwrap().to_owned();
    Site { address: format!("{name}@customer.test"), dir, data, config }
}

#[test]
fn a_hundred_recipients_enroll_from_csv_and_their_files_work() {
    let w = World::new();
    varied_tree(&w.source);
    w.publish();
    let list = w.path("site.csv");
    fs::write(&list, csv(100)).unwrap();
    let out = w.path("enrollments");
    let done = enroll(&w, &list, &out);
    assert_eq!(done["count"], 100);
    let recipients = done["recipients"].as_array().unwrap();
    assert_eq!(recipients.len(), 100);
    for (i, r) in recipients.iter().enumerate() {
        let file = PathBuf::from(r["enrollment"].as_str().unwrap());
        assert_eq!(file, out.join(format!("site{i}.enrollment")));
        assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600, "{}", file.display());
        let text = fs::read_to_string(&file).unwrap();
        assert!(text.contains(&format!("name = \"site{i}\"")) && text.contains(r["key_id"].as_str().unwrap()));
        assert_eq!(r["tags"], serde_json::json!(["eu", format!("tier-{}", i % 3)]));
    }
    assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(registered(&w).len(), 100);

    // Two of the files, taken to their machines, sync over the Maildir transport.
    for name in ["site0", "site99"] {
        let site = site_from(&w, name, &out.join(format!("{name}.enrollment")));
        w.sync(&site);
        assert_same_tree(&w.source, &site.data);
        assert_eq!(site.status()["generation"], 1, "{name}");
    }

    // The tags from the list are the owner's tags, and `owner tag` changes them.
    let tags = ok(&["owner", "tag", "--config", &w.owner_config, "--name", "site4", "--add", "beta", "--json"]);
    let tags: Value = serde_json::from_str(&tags).unwrap();
    assert_eq!(tags, serde_json::json!({"name": "site4", "tags": ["beta", "eu", "tier-1"]}));

    // The same list again registers nothing more: every name is taken and every file is there.
    let err = enroll_fails(&w, &list, &out);
    assert!(err.contains("line 2: a recipient named \"site0\" is already registered"), "{err}");
    assert!(err.contains("`") && err.contains("site0.enrollment` already exists"), "{err}");
    assert_eq!(registered(&w).len(), 100);
}

#[test]
fn a_list_with_one_bad_line_changes_nothing() {
    let w = World::new();
    let out = w.path("enrollments");
    let list = w.path("site.csv");
    let good = csv(100);
    let cases = [
        (format!("{good}../../etc/cron.d/x,evil@customer.test\n"), "line 102: recipient name \"../../etc/cron.d/x\""),
        (
            format!("{good}.profile,evil@customer.test\n"),
            "line 102: recipient name \".profile\" must not start with `.`",
        ),
        (format!("{good}SITE7,other@customer.test\n"), "line 102: the name \"SITE7\" is already listed at line 9"),
        (
            format!("{good}site100,site3@customer.test\n"),
            "the address \"site3@customer.test\" is already listed at line 5",
        ),
        (format!("{good}site100,../spool/owner@vendor.test\n"), "is not a usable mail address"),
        (format!("{good}site100,s100@customer.test,gold tier\n"), "tag \"gold tier\" may hold only"),
        (good.replacen("name,address,tags\n", "", 1), "line 1: the first line must be the header"),
    ];
    for (text, want) in cases {
        fs::write(&list, &text).unwrap();
        let err = enroll_fails(&w, &list, &out);
        assert!(err.contains(want), "{want:?} not in\n{err}");
        assert!(err.contains("nothing was registered"), "{err}");
        assert!(!out.exists(), "no enrollment directory, no file: {want}");
        assert!(registered(&w).is_empty(), "{want}");
    }

    // A name registered before: the whole list is refused, the others are not registered either.
    w.site("site42");
    fs::write(&list, csv(100)).unwrap();
    let err = enroll_fails(&w, &list, &out);
    assert!(err.contains("line 44: a recipient named \"site42\" is already registered"), "{err}");
    assert_eq!(registered(&w), ["site42"]);
    assert!(!out.exists());

    // An enrollment file already there (from another owner, say) is never overwritten.
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("site7.enrollment"), "someone else's").unwrap();
    fs::write(&list, csv(10)).unwrap();
    let err = enroll_fails(&w, &list, &out);
    assert!(err.contains("line 9: `") && err.contains("site7.enrollment` already exists"), "{err}");
    assert_eq!(fs::read_to_string(out.join("site7.enrollment")).unwrap(), "someone else's");
    assert_eq!(count(&out), 1);
    assert_eq!(registered(&w), ["site42"]);
}

#[test]
fn enrollment_files_never_go_into_the_source_tree() {
    let w = World::new();
    let list = w.path("site.csv");
    fs::write(&list, csv(3)).unwrap();
    for out in [w.source.join("keys"), w.source.clone()] {
        let err = enroll_fails(&w, &list, &out);
        assert!(err.contains("overlap: publishing would send every recipient's key to every recipient"), "{err}");
        assert!(registered(&w).is_empty());
        assert!(!w.source.join("keys").exists() && count(&w.source) == 0, "nothing written into the source");
    }
}

#[test]
fn a_toml_list_enrolls_the_same_way() {
    let w = World::new();
    put(&w.source, "product/signatures.db", b"v1", 0o644);
    w.publish();
    let list = w.path("site.toml");
    fs::write(
        &list,
        "[[recipient]]\nname = \"berlin\"\naddress = \"berlin@customer.test\"\ntags = [\"eu\", \"gold\"]\n\n\
         [[recipient]]\nname = \"boston\"\naddress = \"boston@customer.test\"\n",
    )
    .unwrap();
    let out = w.path("enrollments");
    let done = enroll(&w, &list, &out);
    assert_eq!(done["count"], 2);
    assert_eq!(done["recipients"][0]["tags"], serde_json::json!(["eu", "gold"]));
    assert_eq!(done["recipients"][1]["tags"], serde_json::json!([]));
    let site = site_from(&w, "boston", &out.join("boston.enrollment"));
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);

    // A TOML list with a mistake is refused whole, its entry named.
    fs::write(&list, "[[recipient]]\nname = \"ok\"\naddress = \"ok@c.test\"\n[[recipient]]\nname = \"x/y\"\naddress = \"a@c.test\"\n").unwrap();
    let err = enroll_fails(&w, &list, &w.path("more"));
    assert!(err.contains("recipient 2: recipient name \"x/y\""), "{err}");
    assert_eq!(registered(&w), ["berlin", "boston"]);
    // And a list that is neither CSV nor TOML by name is refused before it is read.
    let err = enroll_fails(&w, &w.path("site.txt"), &w.path("more"));
    assert!(err.contains("a list is a `.csv` or a `.toml` file"), "{err}");
}

#[test]
fn a_crash_before_the_commit_registers_nothing() {
    let w = World::new();
    let list = w.path("site.csv");
    fs::write(&list, csv(5)).unwrap();
    let out = w.path("enrollments");
    let args = [
        "owner",
        "add-recipients",
        "--config",
        &w.owner_config,
        "--list",
        list.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let crashed = std::process::Command::new(bin())
        .args(args)
        .env("MAILFERRY_FAILPOINT", "enroll-before-commit:1")
        .output()
        .unwrap();
    assert!(!crashed.status.success());
    assert!(String::from_utf8_lossy(&crashed.stderr).contains("failpoint enroll-before-commit:1 reached"));
    assert!(registered(&w).is_empty(), "the files are written, the keys never registered");
    assert_eq!(count(&out), 5);
    // Enrolling again says so rather than overwriting; once the files are removed it works.
    let err = enroll_fails(&w, &list, &out);
    assert!(err.contains("site0.enrollment` already exists"), "{err}");
    fs::remove_dir_all(&out).unwrap();
    enroll(&w, &list, &out);
    assert_eq!(registered(&w).len(), 5);
}

#[test]
fn owner_tag_refuses_mistakes() {
    let w = World::new();
    w.site("site1");
    let tag = |extra: &[&str]| {
        let mut args = vec!["owner", "tag", "--config", &w.owner_config];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let cases: &[(&[&str], &str)] = &[
        (&["--name", "site1"], "say which tags to --add or --remove"),
        (&["--name", "site1", "--add", "a,b", "--remove", "b"], "tag \"b\" is both added and removed"),
        (&["--name", "site1", "--add", "ok,bad tag"], "tag \"bad tag\" may hold only"),
        (&["--name", "site1", "--add", "ok,,x"], "tag \"\" must be 1-64 characters long"),
        (&["--name", "nobody", "--add", "eu"], "no recipient named \"nobody\" is registered"),
    ];
    for (extra, want) in cases {
        let args = tag(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = fails(&args, 2);
        assert!(err.contains(want), "{want:?} not in {err}");
    }
    let out = ok(&["owner", "tag", "--config", &w.owner_config, "--name", "site1", "--add", "eu,gold"]);
    assert_eq!(out.trim(), "\"site1\" has the tags eu, gold");
    let out = ok(&["owner", "tag", "--config", &w.owner_config, "--name", "site1", "--remove", "eu,gold,never"]);
    assert_eq!(out.trim(), "\"site1\" has no tags");
}
