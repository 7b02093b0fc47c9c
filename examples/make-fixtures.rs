//! Regenerates the golden messages in `fixtures/mail/` (a request, its reply and the receipt) by running
//! one real first sync over a Maildir spool with the throwaway key in `fixtures/keys/site1.fixture-key`.
//!
//! Only for a deliberate change of the wire format (see `tests/golden.rs`); afterwards run
//! `fixtures/relay/make-corpus.py` so the relay corpus is rebuilt from the new reply.
//!
//! Usage: `cargo run --example make-fixtures`

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use mailferry::config::NodeConfig;
use mailferry::crypto::Key;
use mailferry::db::Db;
use mailferry::node::owner::{self, Owner};
use mailferry::node::recipient::{self, Recipient};
use mailferry::transport::AnyTransport;

const OWNER: &str = "owner@vendor.test";
const SITE: &str = "site1@customer.test";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let key_hex = fs::read_to_string(repo.join("fixtures/keys/site1.fixture-key"))?;
    let key = Key::from_hex(key_hex.trim()).context("fixture key")?;
    let tmp = tempfile::tempdir()?;
    let base = tmp.path();
    let (source, data, spool) = (base.join("source"), base.join("data"), base.join("spool"));
    fs::create_dir_all(source.join("bin"))?;
    fs::write(source.join("hello.txt"), "hello\n")?;
    fs::write(source.join("empty"), "")?;
    fs::write(source.join("bin/hi.sh"), "#!/bin/sh\necho hi\n")?;
    fs::set_permissions(source.join("bin/hi.sh"), fs::Permissions::from_mode(0o755))?;

    let owner_cfg = owner::init(&base.join("owner"), &source, OWNER, &spool)?;
    let enrollment = base.join("site1.enrollment");
    open_owner(&owner_cfg)?.add_recipient("site1", SITE, &enrollment)?;
    // Swap the fresh key for the fixture key on both sides.
    let db = Db::open(&base.join("owner/state.db"))?;
    db.remove_recipient("site1")?;
    db.add_recipient("site1", SITE, &key.to_hex(), &key.id())?;
    drop(db);
    let text = fs::read_to_string(&enrollment)?;
    let mut e: toml::Table = toml::from_str(&text)?;
    e.insert("key".into(), key.to_hex().into());
    e.insert("key-id".into(), key.id().to_string().into());
    fs::write(&enrollment, toml::to_string(&e)?)?;
    fs::set_permissions(&enrollment, fs::Permissions::from_mode(0o600))?;
    let site_cfg = recipient::init(&base.join("site1"), &data, &enrollment, &spool)?;
    open_owner(&owner_cfg)?.publish()?;

    let request = step_site(&site_cfg, true, &spool.join(OWNER)).await?;
    let reply = step_owner(&owner_cfg, &spool.join(SITE)).await?;
    let receipt = step_site(&site_cfg, false, &spool.join(OWNER)).await?;
    let out = repo.join("fixtures/mail");
    for (name, raw) in [("request", request), ("reply", reply), ("receipt", receipt)] {
        fs::write(out.join(format!("{name}.eml")), raw)?;
        println!("wrote fixtures/mail/{name}.eml");
    }
    Ok(())
}

fn open_owner(cfg: &Path) -> Result<Owner> {
    match NodeConfig::load(cfg)? {
        NodeConfig::Owner(c) => Owner::open(c),
        NodeConfig::Recipient(_) => bail!("wrong role"),
    }
}

/// Runs the recipient once; returns the one message it sent (from the owner's `new/`).
async fn step_site(cfg: &Path, request: bool, inbox: &Path) -> Result<Vec<u8>> {
    let NodeConfig::Recipient(c) = NodeConfig::load(cfg)? else { bail!("wrong role") };
    let mut site = Recipient::open(c)?;
    let mut t = AnyTransport::open(&site.config().transport, SITE)?;
    site.run_once(&mut t, request).await?;
    only_new(inbox)
}

/// Runs the owner once; returns the one message it sent (from the recipient's `new/`).
async fn step_owner(cfg: &Path, inbox: &Path) -> Result<Vec<u8>> {
    let mut o = open_owner(cfg)?;
    let mut t = AnyTransport::open(&o.config().transport, OWNER)?;
    o.run_once(&mut t).await?;
    only_new(inbox)
}

fn only_new(maildir: &Path) -> Result<Vec<u8>> {
    let files: Vec<PathBuf> =
        fs::read_dir(maildir.join("new"))?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    let [one] = files.as_slice() else {
        bail!("expected one new message in `{}`, found {}", maildir.display(), files.len())
    };
    Ok(fs::read(one)?)
}
