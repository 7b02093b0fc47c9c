//! Crash points for tests of crash safety.
//!
//! With `MAILFERRY_FAILPOINT=NAME:N` in the environment, the process aborts (no destructors, no flushing:
//! as close to `kill -9` as a process can do to itself) the N-th time it passes the point called NAME.
//! Without the variable a point costs one atomic load. Points:
//!
//! | name | where |
//! |---|---|
//! | `apply-step` | after each step of an apply or a rollback, journal committed |
//! | `apply-committed` | after the journal of an apply or a rollback is committed, before the first step |
//! | `apply-done` | after the last step, before the apply or rollback is recorded |
//! | `after-swap-before-hook` | after the journal records that post-apply hooks are due, before they run |
//! | `owner-queued` | after a reply is queued and the request recorded, before anything is sent |
//! | `before-settle` | after a message is handled, before the transport files it |
//! | `enroll-before-commit` | after `owner add-recipients` wrote every enrollment file, before it registers them |
//! | `rekey-saved` | after a recipient saved its old key as previous, before it writes the new key file |

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
static PASSES: AtomicU64 = AtomicU64::new(0);

/// Marks crash point `name`; aborts the process if the environment armed it for this pass.
pub fn hit(name: &str) {
    let armed = ARMED.get_or_init(|| {
        let v = std::env::var("MAILFERRY_FAILPOINT").ok()?;
        let (n, count) = v.rsplit_once(':')?;
        Some((n.to_owned(), count.parse().ok()?))
    });
    if let Some((n, count)) = armed
        && n == name
        && PASSES.fetch_add(1, Ordering::Relaxed) + 1 == *count
    {
        eprintln!("failpoint {name}:{count} reached: aborting");
        std::process::abort();
    }
}
