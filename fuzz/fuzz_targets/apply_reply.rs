//! A decoded reply applied to a scratch tree: the first byte picks a small starting tree, the rest is a
//! control part followed (after a NUL) by its one-chunk pack, which holds the body. Planning must refuse or
//! produce steps that, staged (from the pack, local copies and delta streams over local bases) and executed
//! in a temporary directory, leave exactly the promised tree; nothing may be written outside it.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use mailferry::apply::{self, Journal, OnExtra};
use mailferry::limits::Limits;
use mailferry::manifest::{Digest, Entry};
use mailferry::protocol::{self, Control, Update};
use mailferry::scan;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let (control, payload) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(Control::Reply(reply)) = protocol::decode_control(control, &Limits::default()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    std::fs::create_dir_all(&root).unwrap();
    if pick & 1 == 1 {
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(root.join("a/x"), b"x").unwrap();
    }
    if pick & 2 == 2 {
        std::fs::write(root.join("b"), b"").unwrap();
    }
    let mut attachments = BTreeMap::new();
    if let Some(p) = reply.payloads.first() {
        attachments.insert(p.id.clone(), payload.to_vec());
    }
    if protocol::check_payloads(&reply, &attachments).is_err() {
        return;
    }
    let Some(frame) = usize::try_from(reply.body.offset)
        .ok()
        .zip(usize::try_from(reply.body.offset + reply.body.length).ok())
        .and_then(|(a, b)| payload.get(a..b))
    else {
        return;
    };
    let Ok(body) = protocol::open_body(&reply, frame, &Limits::default()) else { return };
    let update = Update { head: (*reply).clone(), body };
    let Ok(scan) = scan::scan(&root) else { return };
    let Ok(plan) = apply::plan(&scan, &scan.manifest, &update, OnExtra::Delete) else { return };
    let pack = dir.path().join("pack");
    std::fs::write(&pack, payload).unwrap();
    let local = |d: &Digest| {
        scan.manifest.iter().find_map(|(p, e)| match e {
            Entry::File(m) if m.blake3 == *d => Some(root.join(p.as_str())),
            _ => None,
        })
    };
    let stage = dir.path().join("stage");
    if apply::stage(&plan, &update, &apply::Sources { pack: &pack, local: &local }, &stage).is_err() {
        return;
    }
    let journal = Journal {
        version: 1,
        data_root: root.clone(),
        stage_dir: stage,
        generation: reply.generation,
        reply_id: reply.reply_id.clone(),
        nonce: reply.nonce.to_hex(),
        message: Digest::of(data),
        ops: update.body.ops.len(),
        target: plan.target.listing(),
        steps: plan.steps.clone(),
        kind: apply::JournalKind::Apply,
        key_id: None,
    };
    journal.execute().expect("a planned and staged apply executes");
    let after = scan::scan(&root).expect("the tree is readable");
    assert_eq!(after.manifest.root(), reply.root, "the tree is exactly the promised generation");
    // Nothing escaped: the temporary directory holds only data/, pack and stage/.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(names.len() <= 3, "{names:?}");
});
