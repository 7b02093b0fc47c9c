//! Bulk enrollment (`owner add-recipients`) and the owner's tags (`owner tag`).
//!
//! A list is enrolled all or nothing. Everything that can be checked is checked before anything is
//! written: the list itself ([`crate::registration::list::parse`]), names already registered,
//! enrollment files already there, and an enrollment directory inside the source tree (publishing would
//! send every key to every recipient). Then the enrollment files are written (mode 0600, created
//! exclusively) and every recipient is registered in one database transaction; if any of that fails,
//! the files written are removed again. A crash between the files and the commit leaves files whose
//! keys were never registered: they verify nothing, and enrolling the list again says they exist.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use tracing::info;

use super::{Owner, write_enrollment};
use crate::crypto::{Key, KeyId};
use crate::registration::list::{Entry, ListError, check_tag};

/// One recipient enrolled from a list.
#[derive(Clone, Debug, Serialize)]
pub struct Enrolled {
    /// Its name.
    pub name: String,
    /// Its registered address.
    pub address: String,
    /// Its key's public id (the key itself is only in the enrollment file).
    pub key_id: KeyId,
    /// The owner's tags for it.
    pub tags: BTreeSet<String>,
    /// The enrollment file written for it.
    pub enrollment: PathBuf,
}

impl Owner {
    /// Registers every recipient of a checked list and writes one enrollment file each,
    /// `out_dir/NAME.enrollment` (mode 0600), all or nothing. `out_dir` is created (mode 0700) when
    /// missing.
    ///
    /// # Errors
    /// Names already registered, enrollment files already there, an `out_dir` that overlaps the source
    /// tree (each a [`ListError`] listing them all), or I/O and state failures; in every case nothing is
    /// registered and no file is left.
    pub fn add_recipients(&mut self, entries: &[Entry], out_dir: &Path) -> Result<Vec<Enrolled>> {
        if let Some((o, s)) = crate::config::overlap(out_dir, &self.cfg.owner.source) {
            bail!(
                "the enrollment directory `{}` and the source tree `{}` overlap: publishing would send every \
                 recipient's key to every recipient; write the enrollment files outside the source tree",
                o.display(),
                s.display()
            );
        }
        let mut problems = Vec::new();
        let mut planned = Vec::with_capacity(entries.len());
        for e in entries {
            if self.state.db.recipient(&e.name)?.is_some() {
                problems.push(format!("{}: a recipient named {:?} is already registered", e.at, e.name));
            }
            let path = out_dir.join(format!("{}.enrollment", e.name));
            if path.symlink_metadata().is_ok() {
                problems.push(format!("{}: `{}` already exists", e.at, path.display()));
            }
            planned.push((e, path));
        }
        if !problems.is_empty() {
            return Err(ListError::new(problems).into());
        }
        if !out_dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(out_dir)
                .with_context(|| format!("failed to create `{}`", out_dir.display()))?;
        }
        let keys: Vec<Key> = planned.iter().map(|_| Key::generate()).collect();
        let mut written: Vec<&Path> = Vec::new();
        let done = (|| -> Result<()> {
            for ((e, path), key) in planned.iter().zip(&keys) {
                write_enrollment(&self.enrollment(&e.name, &e.address, key), path, "recipient init")?;
                written.push(path);
            }
            std::fs::File::open(out_dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("failed to sync `{}`", out_dir.display()))?;
            crate::failpoint::hit("enroll-before-commit");
            self.state.db.transaction(|db| {
                for ((e, _), key) in planned.iter().zip(&keys) {
                    db.add_recipient(&e.name, &e.address, &key.to_hex(), &key.id())?;
                    let tags: Vec<String> = e.tags.iter().cloned().collect();
                    db.change_recipient_tags(&e.name, &tags, &[])?;
                }
                Ok(())
            })
        })();
        if let Err(err) = done {
            for path in written {
                let _ = std::fs::remove_file(path);
            }
            return Err(err.context("nothing was registered"));
        }
        info!(count = entries.len(), dir = %out_dir.display(), "enrolled recipients from a list");
        Ok(planned
            .into_iter()
            .zip(keys)
            .map(|((e, path), key)| Enrolled {
                name: e.name.clone(),
                address: e.address.clone(),
                key_id: key.id(),
                tags: e.tags.clone(),
                enrollment: path,
            })
            .collect())
    }

    /// Adds and removes the owner's tags of a registered recipient, in one transaction; returns its
    /// tags after.
    ///
    /// # Errors
    /// A tag that is not a name, no such recipient, or state failures.
    pub fn change_tags(&mut self, name: &str, add: &[String], remove: &[String]) -> Result<BTreeSet<String>> {
        for t in add.iter().chain(remove) {
            check_tag(t).map_err(|e| anyhow::format_err!("tag {t:?} {e}"))?;
        }
        self.state.db.transaction(|db| {
            db.change_recipient_tags(name, add, remove)?;
            db.recipient_tags(name)
        })
    }

    /// The owner's tags of a recipient.
    ///
    /// # Errors
    /// State failures.
    pub fn tags(&self, name: &str) -> Result<BTreeSet<String>> {
        self.state.db.recipient_tags(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeConfig;
    use crate::registration::list::{Format, parse};

    fn owner() -> (tempfile::TempDir, Owner) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("source")).unwrap();
        let cfg = super::super::init(
            &dir.path().join("owner"),
            &dir.path().join("source"),
            "owner@vendor.test",
            &dir.path().join("spool"),
        )
        .unwrap();
        let NodeConfig::Owner(cfg) = NodeConfig::load(&cfg).unwrap() else { panic!("owner expected") };
        (dir, Owner::open(cfg).unwrap())
    }

    fn list(n: usize) -> Vec<Entry> {
        let text: String = std::iter::once("name,address,tags\n".to_owned())
            .chain((0..n).map(|i| format!("site{i},site{i}@customer.test,eu\n")))
            .collect();
        parse(&text, Format::Csv).unwrap()
    }

    #[test]
    fn a_failing_registration_leaves_no_file_and_no_recipient() {
        let (dir, mut o) = owner();
        // A trigger makes the tenth insert fail inside the one transaction, after every file is written.
        let conn = rusqlite::Connection::open(dir.path().join("owner/state.db")).unwrap();
        conn.execute_batch(
            "CREATE TRIGGER boom BEFORE INSERT ON recipients WHEN NEW.name = 'site9'
             BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
        )
        .unwrap();
        let out = dir.path().join("enroll");
        let err = format!("{:#}", o.add_recipients(&list(20), &out).unwrap_err());
        assert!(err.starts_with("nothing was registered"), "{err}");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "every file written is removed");
        assert!(o.state.db.recipients().unwrap().is_empty(), "the nine before are rolled back");
        assert!(o.state.db.all_recipient_tags().unwrap().is_empty());

        conn.execute_batch("DROP TRIGGER boom").unwrap();
        let done = o.add_recipients(&list(20), &out).unwrap();
        assert_eq!((done.len(), o.state.db.recipients().unwrap().len()), (20, 20));
        assert_eq!(o.tags("site9").unwrap(), BTreeSet::from(["eu".to_owned()]));
    }

    #[test]
    fn tags_are_checked_and_changed_together() {
        let (dir, mut o) = owner();
        o.add_recipients(&list(1), &dir.path().join("e")).unwrap();
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let after = o.change_tags("site0", &t(&["gold", "beta"]), &t(&["eu"])).unwrap();
        assert_eq!(after.into_iter().collect::<Vec<_>>(), t(&["beta", "gold"]));
        let err = o.change_tags("site0", &t(&["ok", "bad tag"]), &[]).unwrap_err().to_string();
        assert!(err.contains("tag \"bad tag\" may hold only"), "{err}");
        assert!(!o.tags("site0").unwrap().contains("ok"), "a bad tag changes nothing");
        assert!(o.change_tags("nobody", &t(&["x"]), &[]).is_err());
    }
}
