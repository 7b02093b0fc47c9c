//! Old generations: a recipient far behind `keep-generations` is answered in one round trip, with a
//! reply about the size of a direct delta, while the owner keeps the old content as small deltas.

use std::fs;
use std::path::Path;

use crate::util::*;

fn set_owner(w: &World, from: &str, to: &str) {
    let text = fs::read_to_string(&w.owner_config).unwrap();
    assert!(text.contains(from), "{from:?} not in the owner config:\n{text}");
    fs::write(&w.owner_config, text.replace(from, to)).unwrap();
}

/// A signature database of `n` unique lines from line `from`.
fn sigs(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| {
            format!("Win.Trojan.Agent-{i}:0:*:{:032x}{:032x}\n", (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15), i)
        })
        .collect()
}

/// Messages waiting in `dir`'s Maildir `new/`, with their sizes.
fn waiting(dir: &Path) -> Vec<u64> {
    match fs::read_dir(dir.join("new")) {
        Ok(rd) => rd.map(|e| e.unwrap().metadata().unwrap().len()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Everything a store directory holds under `sub` (`objects` or `deltas`), in bytes.
fn stored(store: &Path, sub: &str) -> u64 {
    let Ok(dirs) = fs::read_dir(store.join(sub)) else { return 0 };
    dirs.flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap()).map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

/// Lines of the database at generation `g`: 6,000 to start, 0.5% more each generation.
const START: usize = 6_000;
const PER_GENERATION: usize = 30;

/// Syncs `site` in one exchange and returns the bytes of the one reply it was sent.
fn one_round_trip(w: &World, site: &Site) -> u64 {
    let to_owner = w.spool.join(OWNER);
    let before = waiting(&to_owner).len();
    site.run(true);
    assert_eq!(waiting(&to_owner).len(), before + 1, "one request");
    w.owner_run();
    let replies = waiting(&site.maildir(w));
    assert_eq!(replies.len(), 1, "one reply, in one part: {replies:?}");
    let log = site.run(false);
    assert!(!log.contains("asked for the full tree"), "no need-full-inventory round trip: {log}");
    assert!(waiting(&site.maildir(w)).is_empty());
    w.owner_run();
    replies[0]
}

#[test]
fn a_recipient_twenty_generations_behind_is_answered_in_one_round_trip_by_a_direct_delta() {
    let last = 23;
    // The reference: an owner that kept both the recipient's generation and the newest.
    let reference = {
        let w = World::new();
        let site = w.site("site1");
        put(&w.source, "db/main.hdb", sigs(0, START).as_bytes(), 0o644);
        put(&w.source, "notes.txt", b"notes\n", 0o644);
        w.publish();
        w.sync(&site);
        put(&w.source, "db/main.hdb", sigs(0, START + PER_GENERATION * (last - 1)).as_bytes(), 0o644);
        assert_eq!(w.publish(), 2);
        let bytes = one_round_trip(&w, &site);
        assert_same_tree(&w.source, &site.data);
        bytes
    };

    let w = World::new();
    let site = w.site("site1");
    set_owner(&w, "keep-generations = 16", "keep-generations = 2");
    put(&w.source, "db/main.hdb", sigs(0, START).as_bytes(), 0o644);
    put(&w.source, "notes.txt", b"notes\n", 0o644);
    put(&w.source, "gone.txt", sigs(50_000, 2_000).as_bytes(), 0o644);
    assert_eq!(w.publish(), 1);
    w.sync(&site);
    assert_eq!(site.status()["generation"], 1);
    fs::remove_file(w.source.join("gone.txt")).unwrap();
    for g in 2..=last {
        put(&w.source, "db/main.hdb", sigs(0, START + PER_GENERATION * (g - 1)).as_bytes(), 0o644);
        assert_eq!(w.publish(), g as u64);
    }

    // The owner keeps 21 old versions of the database as deltas, far smaller than whole copies: all of
    // them together are smaller than a tenth of one whole copy.
    let store = w.path("owner/store");
    let one_whole = fs::metadata(
        fs::read_dir(store.join("objects"))
            .unwrap()
            .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
            .map(|e| e.unwrap().path())
            .max_by_key(|p| fs::metadata(p).unwrap().len())
            .unwrap(),
    )
    .unwrap()
    .len();
    let deltas = stored(&store, "deltas");
    assert!(deltas > 0, "old versions are kept as deltas");
    assert!(deltas * 10 < one_whole, "21 old versions take {deltas} bytes, one whole copy {one_whole}");
    // Whole objects: the two kept versions of the database, notes.txt, and gone.txt (its path is in no
    // kept generation, so it stays whole until keep-history).
    assert!(stored(&store, "objects") < one_whole * 2 + 40_000, "{} bytes of whole objects", stored(&store, "objects"));

    // The recipient still on generation 1: one request, one reply, no need-full-inventory.
    let bytes = one_round_trip(&w, &site);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], last as u64);
    assert!(
        bytes * 10 <= reference * 12,
        "the reply is {bytes} bytes, a direct delta's {reference} (at most 1.2 times that)"
    );
}

#[test]
fn past_keep_history_an_old_generation_is_forgotten_and_costs_a_full_inventory() {
    let w = World::new();
    let site = w.site("site1");
    set_owner(&w, "keep-generations = 16", "keep-generations = 2");
    set_owner(&w, "keep-history = \"1year\"", "keep-history = 1");
    put(&w.source, "db/main.hdb", sigs(0, START).as_bytes(), 0o644);
    w.publish();
    w.sync(&site);
    for g in 2..=5 {
        put(&w.source, "db/main.hdb", sigs(0, START + PER_GENERATION * g).as_bytes(), 0o644);
        w.publish();
    }
    // Generations 4 and 5 are kept, 3 is the one old generation kept: 1 is forgotten, content and all.
    assert!(stored(&w.path("owner/store"), "deltas") > 0, "generation 3's old version is kept as a delta");
    site.run(true);
    w.owner_run();
    let log = site.run(false);
    assert!(log.contains("asked for the full tree"), "{log}");
    w.sync(&site);
    assert_same_tree(&w.source, &site.data);
    assert_eq!(site.status()["generation"], 5);
}
