//! The admin's actions, shared by the console's buttons and their command-line twins (`owner approve`,
//! `owner suspend`, `owner resume`): each is one short transaction that changes the state and logs who
//! did it, so the action and its log line exist together or not at all.
//!
//! They take no state lock: the daemon reads the approval and the suspension afresh for every request
//! it answers, so an action taken while it works on a step counts from its next step, as if it had been
//! taken a moment later.

use anyhow::Result;
use serde::Serialize;
use tracing::info;

use crate::db::Db;

/// What an action did.
#[derive(Debug, Clone, Serialize)]
pub struct Done {
    /// `approve`, `suspend` or `resume`.
    pub action: &'static str,
    /// A recipient's name, or `CHANNEL/GENERATION`.
    pub target: String,
    /// False when it was so already (approved before, already suspended, not suspended).
    pub changed: bool,
}

/// Approves generation `number` of `channel` for serving, as `actor` (`cli`, `console 127.0.0.1`).
///
/// # Errors
/// No such generation, or state failures.
pub fn approve(db: &Db, channel: &str, number: u64, actor: &str) -> Result<Done> {
    let target = format!("{channel}/{number}");
    let changed = db.transaction(|db| {
        let changed = db.approve_generation(channel, number, actor)?;
        if changed {
            db.log_action(actor, "approve", &target)?;
        }
        Ok(changed)
    })?;
    info!(actor, generation = number, channel, changed, "approved a generation for serving");
    Ok(Done { action: "approve", target, changed })
}

/// Suspends (`on`) or resumes recipient `name`, as `actor`.
///
/// # Errors
/// No such recipient, or state failures.
pub fn suspend(db: &Db, name: &str, on: bool, actor: &str) -> Result<Done> {
    let action = if on { "suspend" } else { "resume" };
    let changed = db.transaction(|db| {
        let was =
            db.recipient(name)?.ok_or_else(|| anyhow::format_err!("no recipient named {name:?} is registered"))?;
        if was.suspended == on {
            return Ok(false);
        }
        db.set_suspended(name, on)?;
        db.log_action(actor, action, name)?;
        Ok(true)
    })?;
    info!(actor, recipient = name, changed, "{}", if on { "suspended a recipient" } else { "resumed a recipient" });
    Ok(Done { action, target: name.to_owned(), changed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_change_the_state_and_are_logged_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("state.db")).unwrap();
        let key = crate::crypto::Key::generate();
        db.add_recipient("site1", "site1@example.org", &key.to_hex(), &key.id()).unwrap();
        let err = approve(&db, "default", 1, "cli").unwrap_err();
        assert!(format!("{err:#}").contains("generation 1 of channel \"default\" does not exist"), "{err:#}");
        db.add_generation("default", &crate::manifest::Manifest::default()).unwrap();
        assert_eq!(db.latest_approved_generation("default").unwrap().map(|g| g.number), None);
        assert!(approve(&db, "default", 1, "cli").unwrap().changed);
        assert!(!approve(&db, "default", 1, "console 127.0.0.1").unwrap().changed, "approved before");
        assert_eq!(db.latest_approved_generation("default").unwrap().map(|g| g.number), Some(1));
        assert!(suspend(&db, "site1", true, "cli").unwrap().changed);
        assert!(!suspend(&db, "site1", true, "cli").unwrap().changed);
        assert!(db.recipient("site1").unwrap().unwrap().suspended);
        assert!(suspend(&db, "site1", false, "cli").unwrap().changed);
        assert!(!db.recipient("site1").unwrap().unwrap().suspended);
        assert!(suspend(&db, "nobody", true, "cli").is_err());
        let log: Vec<_> = db.actions(10).unwrap().into_iter().map(|a| (a.action, a.target)).collect();
        let want = [("resume", "site1"), ("suspend", "site1"), ("approve", "default/1")];
        assert_eq!(log, want.map(|(a, t)| (a.to_owned(), t.to_owned())));
    }
}
