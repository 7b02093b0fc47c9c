//! `mailferry demo`: the whole story in a fresh directory, narrated.
//!
//! It uses the same library calls as the real commands (each step opens and closes its node, as separate
//! processes would) over the Maildir transport, and exits 0 only if the recipient's tree ends equal to
//! the owner's newest generation.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use mailferry::config::NodeConfig;
use mailferry::manifest::{Digest, Entry};
use mailferry::node::Role;
use mailferry::node::owner::{self, Owner};
use mailferry::node::recipient::{self, Recipient};
use mailferry::scan;
use mailferry::transport::AnyTransport;

use super::Exit;

/// The arguments of `demo` (its help text is the doc of its variant in the command enum).
#[derive(Debug, clap::Args)]
pub struct DemoCommand {
    /// Keep the demo's files in this directory instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
}

impl DemoCommand {
    /// Runs the demo.
    ///
    /// # Errors
    /// A step of the story failed, or the trees ended different.
    pub async fn execute(self) -> Result<Exit> {
        run(self.keep.as_deref()).await
    }
}

const OWNER: &str = "owner@vendor.example";
const SITE: &str = "site1@customer.example";

struct Demo {
    owner_cfg: PathBuf,
    site_cfg: PathBuf,
    source: PathBuf,
    data: PathBuf,
    spool: PathBuf,
}

fn say(s: &str) {
    println!("{s}");
}

fn heading(n: u32, s: &str) {
    println!("\n== {n}. {s}");
}

/// Runs the demo in `keep` or a temporary directory.
///
/// # Errors
/// Any failure of the story, which is a bug.
pub async fn run(keep: Option<&Path>) -> Result<Exit> {
    let tmp;
    let base = match keep {
        Some(d) => {
            if d.exists() && fs::read_dir(d)?.next().is_some() {
                bail!("`{}` is not empty; give --keep a new or empty directory", d.display());
            }
            fs::create_dir_all(d)?;
            fs::canonicalize(d)?
        }
        None => {
            tmp = tempfile::Builder::new().prefix("mailferry-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    match keep {
        Some(_) => say(&format!("mailferry demo in `{}` (kept afterwards)", base.display())),
        None => say(&format!(
            "mailferry demo in `{}` (removed at the end; `mailferry demo --keep DIR` keeps the files)",
            base.display()
        )),
    }
    say("An owner (a vendor) keeps a recipient (a customer site) in sync through a Maildir spool,");
    say("the transport that air-gapped sites carry on removable media.");

    let d = Demo {
        owner_cfg: base.join("owner/owner.toml"),
        site_cfg: base.join("site1/recipient.toml"),
        source: base.join("source"),
        data: base.join("site1-data"),
        spool: base.join("spool"),
    };

    heading(1, "The owner's source tree");
    sample_tree(&d.source)?;
    show_tree(&d.source)?;

    heading(2, "Set up the owner and enroll one recipient");
    owner::init(&base.join("owner"), &d.source, OWNER, &d.spool)?;
    say(&format!("  $ mailferry owner init --dir owner --source source --address {OWNER} --transport-root spool"));
    say(&format!("    wrote {}", d.owner_cfg.display()));
    let enrollment = base.join("site1.enrollment");
    open_owner(&d)?.add_recipient("site1", SITE, &enrollment)?;
    say(&format!(
        "  $ mailferry owner add-recipient --config owner/owner.toml --name site1 --address {SITE} --out site1.enrollment"
    ));
    say(&format!("    wrote {} (mode 600, holds site1's own key)", enrollment.display()));
    recipient::init(&base.join("site1"), &d.data, &enrollment, &d.spool)?;
    say(
        "  $ mailferry recipient init --dir site1 --data site1-data --enrollment site1.enrollment --transport-root spool",
    );
    say(&format!("    wrote {} (data tree {})", d.site_cfg.display(), d.data.display()));

    heading(3, "Publish generation 1 and sync");
    let g1 = open_owner(&d)?.publish()?;
    say("  $ mailferry owner publish --config owner/owner.toml");
    say(&format!("    generation {} root {} ({} files)", g1.generation, g1.root.short(), g1.files));
    sync(&d).await?;
    check_equal(&d, g1.root)?;

    heading(4, "Change the source: edit, add, delete, rename, exec bit, empty directory");
    change_tree(&d.source)?;
    let g2 = open_owner(&d)?.publish()?;
    say("  $ mailferry owner publish --config owner/owner.toml");
    say(&format!("    generation {} root {} ({} files)", g2.generation, g2.root.short(), g2.files));
    fs::write(d.source.join("README.txt"), "edited after publishing: must not leak into replies\n")?;
    say("  (and edited README.txt again after publishing: generations are immutable)");
    sync(&d).await?;
    check_equal(&d, g2.root)?;

    heading(5, "Tamper with a reply in transit");
    let before = scan::scan(&d.data)?.manifest.root();
    recipient_step(&d, true, "recipient asks").await?;
    owner_step(&d, "owner answers").await?;
    let reply = newest_file(&d.spool.join(SITE).join("new"))?;
    flip_byte(&reply)?;
    say(&format!("  flipped one byte of the control part in `{}`", reply.display()));
    let mut site = open_site(&d)?;
    let mut t = AnyTransport::open(&site.config().transport, SITE)?;
    let rep = site.run_once(&mut t, false).await?;
    say(&format!(
        "  $ mailferry recipient run --config site1/recipient.toml --once --no-request\n    recipient: {}",
        super::output::summary_words(&rep)
    ));
    if rep.refused != 1 {
        bail!("the tampered reply was not refused: {rep:?}");
    }
    let rejected = site.db().rejections()?;
    let last = rejected.last().context("refusal was not recorded")?;
    say(&format!("  recipient refused it: {}: {}", last.reason, last.detail));
    say(&format!("  the message is in `{}`", d.spool.join(SITE).join(".rejected/cur").display()));
    say("  $ mailferry log --config site1/recipient.toml --rejected   (lists it, with its reason)");
    let after = scan::scan(&d.data)?.manifest.root();
    if after != before {
        bail!("the data tree changed after a refused reply");
    }
    say(&format!("  data tree untouched: root still {}", after.short()));
    drop(site);

    heading(6, "Result");
    let latest = {
        let NodeConfig::Owner(cfg) = NodeConfig::load(&d.owner_cfg)? else { bail!("wrong role") };
        owner::status(&cfg)?.generation.context("no generation")?
    };
    let have = scan::scan(&d.data)?.manifest.root();
    if have == latest.root {
        say(&format!("  recipient tree == owner generation {} (root {})", latest.number, have));
        say("  demo finished: every step behaved as it should");
        if keep.is_none() {
            say(&format!("  removing `{}`; run `mailferry demo --keep DIR` to look around afterwards", base.display()));
        }
        Ok(Exit::Success)
    } else {
        say(&format!("  MISMATCH: recipient root {have}, owner generation {} root {}", latest.number, latest.root));
        Ok(Exit::Error)
    }
}

fn open_owner(d: &Demo) -> Result<Owner> {
    match NodeConfig::load(&d.owner_cfg)? {
        NodeConfig::Owner(c) => Owner::open(c),
        NodeConfig::Recipient(_) => bail!("wrong role"),
    }
}

fn open_site(d: &Demo) -> Result<Recipient> {
    match NodeConfig::load(&d.site_cfg)? {
        NodeConfig::Recipient(c) => Recipient::open(c),
        NodeConfig::Owner(_) => bail!("wrong role"),
    }
}

async fn recipient_step(d: &Demo, request: bool, what: &str) -> Result<()> {
    let mut site = open_site(d)?;
    let mut t = AnyTransport::open(&site.config().transport, SITE)?;
    let r = site.run_once(&mut t, request).await?;
    say(&format!(
        "  {what:<22} $ mailferry recipient run --config site1/recipient.toml --once{}",
        if request { "" } else { " --no-request" },
    ));
    say(&format!("  {:<24}recipient: {}", "", super::output::summary_words(&r)));
    Ok(())
}

async fn owner_step(d: &Demo, what: &str) -> Result<()> {
    let mut o = open_owner(d)?;
    let mut t = AnyTransport::open(&o.config().transport, OWNER)?;
    let r = o.run_once(&mut t).await?;
    say(&format!("  {what:<22} $ mailferry owner run --config owner/owner.toml --once"));
    say(&format!("  {:<24}owner: {}", "", super::output::summary_words(&r)));
    Ok(())
}

async fn sync(d: &Demo) -> Result<()> {
    recipient_step(d, true, "recipient asks").await?;
    owner_step(d, "owner answers").await?;
    recipient_step(d, false, "recipient applies").await?;
    owner_step(d, "owner records receipt").await?;
    let mails: usize = ["new", "cur"]
        .iter()
        .flat_map(|sub| [d.spool.join(OWNER).join(sub), d.spool.join(SITE).join(sub)])
        .map(|p| fs::read_dir(p).map(|r| r.count()).unwrap_or(0))
        .sum();
    say(&format!("  ({mails} messages in the spool so far)"));
    Ok(())
}

fn check_equal(d: &Demo, root: Digest) -> Result<()> {
    let have = scan::scan(&d.data)?.manifest.root();
    if have != root {
        bail!("recipient root {} differs from the generation's {}", have.short(), root.short());
    }
    say(&format!("  recipient tree equals the generation (root {})", have.short()));
    show_tree(&d.data)
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p)?;
    }
    fs::write(path, data)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Deterministic pseudo-random bytes (a stand-in for a signature database).
fn noise(seed: &str, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    blake3::Hasher::new().update(seed.as_bytes()).finalize_xof().fill(&mut out);
    out
}

fn sample_tree(root: &Path) -> Result<()> {
    write(&root.join("README.txt"), b"Signature databases for ExampleScan.\n", 0o644)?;
    write(&root.join("bin/update-hook.sh"), b"#!/bin/sh\necho updated\n", 0o755)?;
    write(&root.join("db/main.cvd"), &noise("main", 256 * 1024), 0o644)?;
    write(&root.join("db/daily/a.ldb"), &"signature-a:0123456789abcdef\n".repeat(400).into_bytes(), 0o644)?;
    write(&root.join("db/daily/b.ldb"), &"signature-b:fedcba9876543210\n".repeat(400).into_bytes(), 0o644)?;
    write(&root.join("docs/guide/old.md"), b"# Old guide\n", 0o644)?;
    write(&root.join("etc/empty.conf"), b"", 0o644)?;
    write(&root.join("scripts/rotate.sh"), b"#!/bin/sh\nexit 0\n", 0o644)?;
    fs::create_dir_all(root.join("var/cache"))?;
    std::os::unix::fs::symlink("main.cvd", root.join("db/current.cvd"))?;
    Ok(())
}

fn change_tree(root: &Path) -> Result<()> {
    write(&root.join("README.txt"), b"Signature databases for ExampleScan, release 2.\n", 0o644)?;
    say("  edit    README.txt");
    let mut main = fs::read(root.join("db/main.cvd"))?;
    main.extend_from_slice(&noise("main-append", 4096));
    write(&root.join("db/main.cvd"), &main, 0o644)?;
    say("  edit    db/main.cvd (4 KiB appended to 256 KiB)");
    write(&root.join("db/daily/c.ldb"), b"signature-c:new\n", 0o644)?;
    say("  add     db/daily/c.ldb");
    fs::remove_file(root.join("docs/guide/old.md"))?;
    say("  delete  docs/guide/old.md");
    fs::rename(root.join("db/daily/a.ldb"), root.join("db/daily/a-2026.ldb"))?;
    say("  rename  db/daily/a.ldb -> db/daily/a-2026.ldb");
    fs::set_permissions(root.join("scripts/rotate.sh"), fs::Permissions::from_mode(0o755))?;
    say("  chmod   +x scripts/rotate.sh");
    fs::create_dir_all(root.join("var/spool/incoming"))?;
    say("  mkdir   var/spool/incoming (empty)");
    Ok(())
}

fn show_tree(root: &Path) -> Result<()> {
    let s = scan::scan(root)?;
    for l in s.manifest.listing() {
        match l.entry {
            Entry::Dir => say(&format!("    {}/", l.path)),
            Entry::File(f) => say(&format!(
                "    {}  {}{}  {}",
                l.path,
                super::output::bytes(f.size),
                if f.mode == mailferry::manifest::Mode::Executable { ", executable" } else { "" },
                f.blake3.short()
            )),
            Entry::Link(t) => say(&format!("    {} -> {}", l.path, t.as_str())),
        }
    }
    Ok(())
}

fn newest_file(dir: &Path) -> Result<PathBuf> {
    fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .with_context(|| format!("no message in `{}`", dir.display()))
}

/// Changes one character inside the encoded control part so that its decoded bytes change, as a relay
/// with bad intentions (or bad memory) would.
fn flip_byte(path: &Path) -> Result<()> {
    let mut raw = fs::read(path)?;
    let name = b"control.json";
    let at = raw.windows(name.len()).position(|w| w == name).context("no control part found")?;
    let body =
        raw[at..].windows(4).position(|w| w == b"\r\n\r\n" || w[..2] == *b"\n\n").context("no part body")? + at + 4;
    let pos = (body + 40..raw.len()).find(|&i| raw[i].is_ascii_alphanumeric()).context("part body too short")?;
    raw[pos] = if raw[pos] == b'A' { b'B' } else { b'A' };
    fs::write(path, raw)?;
    Ok(())
}
