//! Channels, groups and grants: an owner with several products serves each recipient exactly what it is
//! entitled to, answers the rest with an authenticated refusal, and keeps pinned recipients where they are.

use std::fs;
use std::path::PathBuf;

use crate::util::*;

/// The vendor of the README's walkthrough: three products besides the default channel, four customer
/// groups, six sites.
struct Vendor {
    w: World,
    sites: Vec<(Site, Vec<&'static str>)>,
}

const PRODUCTS: [&str; 3] = ["sigdb", "engine", "rules"];

impl Vendor {
    fn source(&self, channel: &str) -> PathBuf {
        self.w.path(&format!("src-{channel}"))
    }

    fn tree(site: &Site, channel: &str) -> PathBuf {
        site.dir.with_file_name(format!("{}-{channel}", site.dir.file_name().unwrap().to_str().unwrap()))
    }

    /// `mailferry owner ARGS` with this owner's `--config` after the (sub)command.
    fn owner(&self, args: &[&str]) -> String {
        ok(&owner_args(&self.w.owner_config, args))
    }

    fn publish(&self, channel: &str) -> String {
        ok(&["owner", "publish", "--config", &self.w.owner_config, "--channel", channel])
    }

    /// One cycle for every site: requests, answers, applies, receipts.
    fn cycle(&self) {
        for (s, _) in &self.sites {
            s.run(true);
        }
        self.w.owner_run();
        for (s, _) in &self.sites {
            s.run(false);
        }
        self.w.owner_run();
    }

    fn standing(site: &Site, channel: &str) -> Option<String> {
        let st = site.status();
        let sub = st["subscriptions"].as_array().unwrap().iter().find(|s| s["channel"] == channel).cloned();
        sub.and_then(|s| s["standing"].as_str().map(str::to_owned))
    }

    fn generation(site: &Site, channel: &str) -> u64 {
        let st = site.status();
        let sub = st["subscriptions"].as_array().unwrap().iter().find(|s| s["channel"] == channel).cloned().unwrap();
        sub["generation"].as_u64().unwrap()
    }
}

fn owner_args<'a>(config: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let words = if matches!(args[0], "channel" | "group") { 2 } else { 1 };
    let mut all = vec!["owner"];
    all.extend_from_slice(&args[..words]);
    all.extend_from_slice(&["--config", config]);
    all.extend_from_slice(&args[words..]);
    all
}

fn vendor() -> Vendor {
    let w = World::new();
    put(&w.source, "README", b"common to every customer\n", 0o644);
    w.publish();
    let v = Vendor { w, sites: Vec::new() };
    for p in PRODUCTS {
        let src = v.source(p);
        fs::create_dir_all(&src).unwrap();
        put(&src, &format!("{p}.dat"), format!("{p} generation 1\n").as_bytes(), 0o644);
        v.owner(&["channel", "add", "--name", p, "--source", src.to_str().unwrap()]);
        v.publish(p);
    }
    let mut v = v;
    // Which site subscribes to which products; what it is entitled to follows from the groups below.
    let plan: [(&str, Vec<&str>); 6] = [
        ("basic1", vec!["sigdb", "engine"]),
        ("pro1", vec!["sigdb", "engine", "rules"]),
        ("pro2", vec!["sigdb", "engine", "rules"]),
        ("eval1", vec!["sigdb"]),
        ("legacy1", vec!["engine"]),
        ("pro3", vec!["sigdb"]),
    ];
    for (name, subs) in plan {
        let site = v.w.site(name);
        for c in &subs {
            let tree = Vendor::tree(&site, c);
            ok(&["recipient", "subscribe", "--config", &site.config, "--channel", c, "--data", tree.to_str().unwrap()]);
        }
        v.sites.push((site, subs));
    }
    v.owner(&["group", "add", "--name", "basic", "--members", "basic1"]);
    v.owner(&["group", "add", "--name", "pro", "--members", "pro1,pro2,pro3"]);
    v.owner(&["group", "add", "--name", "eval", "--members", "eval1"]);
    v.owner(&["group", "add", "--name", "legacy", "--members", "legacy1"]);
    v.owner(&["grant", "--group", "basic", "--channel", "sigdb"]);
    for p in PRODUCTS {
        v.owner(&["grant", "--group", "pro", "--channel", p]);
    }
    v.owner(&["grant", "--group", "eval", "--channel", "sigdb", "--until", "2099-12-31"]);
    v.owner(&["grant", "--group", "legacy", "--channel", "engine", "--pin", "1"]);
    v
}

#[test]
fn each_recipient_ends_with_exactly_its_entitled_trees() {
    let v = vendor();
    v.cycle();
    let entitled = |site: &str, channel: &str| match site {
        "basic1" | "eval1" => channel == "sigdb",
        "pro1" | "pro2" | "pro3" => true,
        "legacy1" => channel == "engine",
        _ => unreachable!(),
    };
    for (site, subs) in &v.sites {
        let name = site.dir.file_name().unwrap().to_str().unwrap();
        // The default channel is open: everyone has it.
        assert_same_tree(&v.w.source, &site.data);
        for c in subs {
            let tree = Vendor::tree(site, c);
            if entitled(name, c) {
                assert_same_tree(&v.source(c), &tree);
                assert_eq!(Vendor::standing(site, c), None, "{name} {c}");
            } else {
                assert_eq!(count(&tree), 0, "{name} must not get {c}");
                assert_eq!(Vendor::standing(site, c).as_deref(), Some("not-entitled"), "{name} {c}");
            }
        }
    }
    // A refusal is not "current": the recipient's status needs attention, and says so.
    let basic = &v.sites[0].0;
    let out = run(&["status", "--config", &basic.config]);
    assert_eq!(out.status.code(), Some(1), "not entitled to a subscribed channel: exit 1");
    assert!(String::from_utf8_lossy(&out.stdout).contains("NOT-ENTITLED"));
    let pro = &v.sites[1].0;
    assert_eq!(run(&["status", "--config", &pro.config]).status.code(), Some(0), "everything granted: exit 0");
}

#[test]
fn an_expired_grant_turns_the_recipient_to_expired_within_one_cycle() {
    let v = vendor();
    v.cycle();
    let eval = &v.sites[3].0;
    assert_same_tree(&v.source("sigdb"), &Vendor::tree(eval, "sigdb"));
    // The evaluation ended yesterday.
    v.owner(&["grant", "--group", "eval", "--channel", "sigdb", "--until", "2020-01-31"]);
    put(&v.source("sigdb"), "sigdb.dat", b"sigdb generation 2\n", 0o644);
    v.publish("sigdb");
    v.cycle();
    assert_eq!(Vendor::standing(eval, "sigdb").as_deref(), Some("expired on 2020-01-31"));
    assert_eq!(Vendor::generation(eval, "sigdb"), 1, "an expired grant gets nothing new");
    assert_eq!(Vendor::generation(&v.sites[1].0, "sigdb"), 2, "others move on");
    assert_eq!(run(&["status", "--config", &eval.config]).status.code(), Some(1));
    // Renewed: back in service the next cycle.
    v.owner(&["grant", "--group", "eval", "--channel", "sigdb", "--until", "2099-12-31"]);
    v.cycle();
    assert_eq!(Vendor::standing(eval, "sigdb"), None);
    assert_eq!(Vendor::generation(eval, "sigdb"), 2);
}

#[test]
fn a_pinned_recipient_stays_on_its_generation_while_others_move_on() {
    let v = vendor();
    v.cycle();
    put(&v.source("engine"), "engine.dat", b"engine generation 2\n", 0o644);
    v.publish("engine");
    v.cycle();
    let (pro, legacy) = (&v.sites[1].0, &v.sites[4].0);
    assert_eq!(Vendor::generation(pro, "engine"), 2);
    assert_eq!(Vendor::generation(legacy, "engine"), 1, "pinned at 1");
    assert_eq!(fs::read(Vendor::tree(legacy, "engine").join("engine.dat")).unwrap(), b"engine generation 1\n");
    let st = legacy.status();
    let engine = st["subscriptions"].as_array().unwrap().iter().find(|s| s["channel"] == "engine").unwrap().clone();
    assert_eq!(engine["pinned"], 1);
    assert_eq!(run(&["status", "--config", &legacy.config]).status.code(), Some(0), "pinned is not a failure");
    // Approved for 2: the pin moves and the next cycle brings it.
    v.owner(&["grant", "--group", "legacy", "--channel", "engine", "--pin", "2"]);
    v.cycle();
    assert_eq!(Vendor::generation(legacy, "engine"), 2);
}

#[test]
fn a_suspended_recipient_is_told_so_and_sent_nothing() {
    let v = vendor();
    v.cycle();
    let pro3 = &v.sites[5].0;
    v.owner(&["suspend", "--name", "pro3"]);
    put(&v.source("sigdb"), "sigdb.dat", b"sigdb generation 2\n", 0o644);
    v.publish("sigdb");
    v.cycle();
    assert_eq!(Vendor::standing(pro3, "sigdb").as_deref(), Some("suspended"));
    assert_eq!(Vendor::generation(pro3, "sigdb"), 1);
    let shown: serde_json::Value = serde_json::from_str(&v.owner(&["show", "--name", "pro3", "--json"])).unwrap();
    assert_eq!(shown["suspended"], true);
    v.owner(&["resume", "--name", "pro3"]);
    v.cycle();
    assert_eq!(Vendor::generation(pro3, "sigdb"), 2);
}

#[test]
fn a_recipient_refuses_another_groups_reply() {
    let v = vendor();
    let (basic, pro) = (&v.sites[0].0, &v.sites[1].0);
    // pro1's reply for the rules channel, handed to basic1 (a shared mailbox, a misdirected relay).
    for (s, _) in &v.sites[..2] {
        s.run(true);
    }
    v.w.owner_run();
    let new = pro.maildir(&v.w).join("new");
    for e in fs::read_dir(&new).unwrap() {
        let p = e.unwrap().path();
        fs::copy(&p, basic.maildir(&v.w).join("new").join(p.file_name().unwrap())).unwrap();
    }
    basic.run(false);
    assert!(basic.rejections().iter().any(|r| r == "wrong-recipient"), "{:?}", basic.rejections());
    assert_eq!(count(&Vendor::tree(basic, "engine")), 0, "nothing of pro1's reached basic1's trees");
}

#[test]
fn owner_commands_show_channels_groups_and_entitlements() {
    let v = vendor();
    let list: serde_json::Value = serde_json::from_str(&v.owner(&["channel", "list", "--json"])).unwrap();
    let names: Vec<&str> = list["channels"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "engine", "rules", "sigdb"]);
    assert_eq!(list["channels"][0]["open"], true);
    assert_eq!(list["channels"][1]["latest"]["number"], 1);
    let shown: serde_json::Value = serde_json::from_str(&v.owner(&["show", "--name", "legacy1", "--json"])).unwrap();
    let ent: Vec<(String, String)> = shown["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["channel"].as_str().unwrap().to_owned(), c["entitlement"].as_str().unwrap().to_owned()))
        .collect();
    assert!(ent.contains(&("engine".into(), "pinned at 1".into())), "{ent:?}");
    assert!(ent.contains(&("sigdb".into(), "not-entitled".into())), "{ent:?}");
    assert!(ent.contains(&("default".into(), "granted".into())), "{ent:?}");
    // Mistakes are refused with a reason and change nothing.
    let cfg = &v.w.owner_config;
    for (args, says) in [
        (vec!["grant", "--group", "nobody", "--channel", "sigdb"], "no group named"),
        (vec!["grant", "--group", "pro", "--channel", "nothing"], "no channel named"),
        (vec!["grant", "--group", "pro", "--channel", "sigdb", "--until", "2026-02-30"], "YYYY-MM-DD"),
        (vec!["grant", "--group", "pro", "--channel", "sigdb", "--pin", "9"], "not kept"),
        (vec!["channel", "add", "--name", "../x", "--source", "/tmp"], "must be 1-64"),
        (vec!["group", "join", "--name", "pro", "--recipient", "ghost"], "no recipient named"),
    ] {
        let all = owner_args(cfg, &args);
        let err = fails(&all, 2);
        assert!(err.contains(says), "{all:?}: {err}");
    }
    let dry: serde_json::Value = serde_json::from_str(&v.owner(&[
        "grant",
        "--group",
        "pro",
        "--channel",
        "sigdb",
        "--until",
        "2030-01-01",
        "--dry-run",
        "--json",
    ]))
    .unwrap();
    assert_eq!(dry["reaches"], serde_json::json!(["pro1", "pro2", "pro3"]));
    assert_eq!(dry["made"], false);
    let groups: serde_json::Value = serde_json::from_str(&v.owner(&["group", "list", "--json"])).unwrap();
    let pro = groups["groups"].as_array().unwrap().iter().find(|g| g["name"] == "pro").unwrap().clone();
    let sig = pro["grants"].as_array().unwrap().iter().find(|g| g["channel"] == "sigdb").unwrap().clone();
    assert_eq!(sig["until"], serde_json::Value::Null, "the dry run changed nothing");
}

#[test]
fn registration_facts_show_in_owner_show_and_select_recipients() {
    let v = vendor();
    // The first requests carry the facts; the next ones what was installed since.
    v.cycle();
    v.cycle();
    let shown: serde_json::Value = serde_json::from_str(&v.owner(&["show", "--name", "pro1", "--json"])).unwrap();
    let facts = &shown["registration"];
    assert_eq!(facts["os"], std::env::consts::OS);
    assert_eq!(facts["arch"], std::env::consts::ARCH);
    assert_eq!(facts["installed"]["sigdb"]["generation"], 1, "{facts}");
    assert_eq!(facts["installed"]["rules"]["generation"], 1);
    assert!(shown["registered_at"].as_u64().is_some());
    // A grant whose selector reads the facts reaches only the recipients they match.
    let all = "basic1,pro1,pro2,eval1,legacy1,pro3";
    v.owner(&["group", "add", "--name", "everyone", "--members", all]);
    let dry: serde_json::Value = serde_json::from_str(&v.owner(&[
        "grant",
        "--group",
        "everyone",
        "--channel",
        "rules",
        "--selector",
        &format!("os = \"{}\" and installed.sigdb >= 1", std::env::consts::OS),
        "--dry-run",
        "--json",
    ]))
    .unwrap();
    assert_eq!(dry["reaches"], serde_json::json!(["basic1", "eval1", "pro1", "pro2", "pro3"]));
    assert_eq!(dry["leaves_out"], serde_json::json!(["legacy1"]), "legacy1 has no sigdb");
    // Owner tags select too, and a selector that does not parse is refused before anything changes.
    v.owner(&["tag", "--name", "legacy1", "--add", "eu"]);
    let dry: serde_json::Value = serde_json::from_str(&v.owner(&[
        "grant",
        "--group",
        "everyone",
        "--channel",
        "rules",
        "--selector",
        "tag = \"eu\"",
        "--dry-run",
        "--json",
    ]))
    .unwrap();
    assert_eq!(dry["reaches"], serde_json::json!(["legacy1"]));
    let err = fails(
        &owner_args(&v.w.owner_config, &["grant", "--group", "everyone", "--channel", "rules", "--selector", "arch ="]),
        2,
    );
    assert!(err.contains("--selector"), "{err}");
    // Granted for real: legacy1 subscribes to rules and gets it through the selector.
    v.owner(&["grant", "--group", "everyone", "--channel", "rules", "--selector", "tag = \"eu\""]);
    let legacy = &v.sites[4].0;
    let tree = Vendor::tree(legacy, "rules");
    ok(&["recipient", "subscribe", "--config", &legacy.config, "--channel", "rules", "--data", tree.to_str().unwrap()]);
    v.cycle();
    assert_same_tree(&v.source("rules"), &tree);
}

#[test]
fn the_fleet_view_shows_each_channel_with_entitlement_pins_and_groups() {
    let v = vendor();
    v.cycle();
    v.owner(&["grant", "--group", "eval", "--channel", "sigdb", "--until", "2020-01-31"]);
    put(&v.source("engine"), "engine.dat", b"engine generation 2\n", 0o644);
    v.publish("engine");
    v.cycle();
    let fleet = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["owner", "fleet", "--config", &v.w.owner_config, "--json"];
        all.extend_from_slice(args);
        let out = run(&all);
        assert!(matches!(out.status.code(), Some(0 | 1)), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let state = |j: &serde_json::Value, name: &str| {
        let r = j["recipients"].as_array().unwrap().iter().find(|r| r["name"] == name).cloned();
        r.map(|r| (r["state"].as_str().unwrap().to_owned(), r["reason"].as_str().map(str::to_owned)))
    };
    let sigdb = fleet(&["--channel", "sigdb"]);
    assert_eq!(state(&sigdb, "pro1"), Some(("current".into(), None)));
    assert_eq!(state(&sigdb, "eval1"), Some(("expired".into(), Some("expired on 2020-01-31".into()))));
    assert_eq!(state(&sigdb, "legacy1"), None, "never asked for sigdb and not entitled: not listed");
    let engine = fleet(&["--channel", "engine"]);
    assert_eq!(state(&engine, "pro1"), Some(("current".into(), None)));
    assert_eq!(state(&engine, "legacy1"), Some(("current".into(), Some("pinned".into()))), "current at its pin");
    assert_eq!(state(&engine, "basic1"), Some(("not-entitled".into(), Some("not-entitled".into()))), "it asked");
    let pro = fleet(&["--channel", "engine", "--group", "pro"]);
    let names: Vec<&str> = pro["recipients"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["pro1", "pro2", "pro3"]);
    assert_eq!(state(&pro, "pro3"), Some(("never-seen".into(), None)), "entitled, but it never asked for engine");
    let err = fails(&["owner", "fleet", "--config", &v.w.owner_config, "--channel", "nothing"], 2);
    assert!(err.contains("no channel named"), "{err}");
}
