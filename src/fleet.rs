//! The owner's fleet view: who has which generation, who is behind, in flight, silent, failing or held,
//! their history, and the alerts an admin gets when a recipient turns silent or failed and when it recovers.
//!
//! The version database (tables `fleet`, `fleet_events`, `fleet_alerts` of [`crate::db`]) holds facts only:
//! what each recipient's authenticated requests and receipts stated, when it last made contact, and every
//! outcome its receipts reported. A recipient's one [`FleetState`] is derived from those facts and the time
//! by [`derive()`], a pure function; [`fleet`] reads the facts and derives every row. [`pending_alerts`] (pure)
//! says which transitions an alert mail must list, and [`queue_alerts`] queues at most one such mail per
//! `alert-interval` through the outbox, recording what it alerted in the same transaction, so that each
//! transition alerts once, across restarts too.
//!
//! Nothing here decides whether a message is valid: the engine did that before any fact was recorded.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::Result;
use serde::Serialize;

use crate::db::Db;
use crate::manifest::Digest;
use crate::protocol::ReplyId;

/// The one channel of today (`docs/protocol.md` §16); every fleet fact is kept per channel.
pub const DEFAULT_CHANNEL: &str = "default";

/// Default `[owner] silent-after-intervals`: a recipient is silent after this many expected intervals
/// without a request.
pub const DEFAULT_SILENT_AFTER_INTERVALS: u32 = 3;

/// A recipient's state on one channel, derived from the facts by [`derive()`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FleetState {
    /// Its last negative receipt says it could not apply a reply (see `reason`), and it has reported no
    /// success since.
    Failed,
    /// No contact for longer than its expected interval times `silent-after-intervals`.
    Silent,
    /// It rolled back locally, or holds the newest generation back after a rollback.
    Held,
    /// Not entitled to the channel: no grant reaches it, or it is suspended (`reason` says which).
    NotEntitled,
    /// Its grants to the channel expired (`reason` names the last day).
    Expired,
    /// Registered, but never made contact.
    NeverSeen,
    /// Behind the newest generation (see `behind`), or its tree differs from the generation it has.
    Behind,
    /// A reply bringing a newer generation is on its way, or its receipt is.
    InFlight,
    /// It has the newest generation.
    Current,
}

impl FleetState {
    /// The kebab-case code, as in `owner fleet --json`.
    pub fn code(self) -> &'static str {
        match self {
            FleetState::Current => "current",
            FleetState::Behind => "behind",
            FleetState::InFlight => "in-flight",
            FleetState::Silent => "silent",
            FleetState::Failed => "failed",
            FleetState::Held => "held",
            FleetState::NotEntitled => "not-entitled",
            FleetState::Expired => "expired",
            FleetState::NeverSeen => "never-seen",
        }
    }

    /// The state of a code, as [`FleetState::code`] gives it.
    pub fn from_code(code: &str) -> Option<FleetState> {
        FleetState::ALL.into_iter().find(|s| s.code() == code)
    }

    /// Every state, in the order a summary lists them.
    pub const ALL: [FleetState; 9] = [
        FleetState::Current,
        FleetState::Behind,
        FleetState::InFlight,
        FleetState::Silent,
        FleetState::Failed,
        FleetState::Held,
        FleetState::NotEntitled,
        FleetState::Expired,
        FleetState::NeverSeen,
    ];

    /// Whether the state needs an admin: `owner fleet` exits 1, and an alert goes out.
    pub fn alarming(self) -> bool {
        matches!(self, FleetState::Failed | FleetState::Silent)
    }
}

impl fmt::Display for FleetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// How the fleet's states are derived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FleetPolicy {
    /// The interval a recipient is expected to request at when none was recorded for it, in seconds
    /// (`[owner] recipient-interval`).
    pub default_interval: u64,
    /// Silent after this many intervals without contact (`[owner] silent-after-intervals`).
    pub silent_after_intervals: u32,
    /// Recipients are measured against the newest approved generation, the one they are offered
    /// (`[owner] require-approval`), not the newest published.
    pub require_approval: bool,
}

impl FleetPolicy {
    /// The policy an owner's configuration sets.
    pub fn of(cfg: &crate::config::OwnerConfig) -> FleetPolicy {
        FleetPolicy {
            default_interval: cfg.owner.recipient_interval.as_secs(),
            silent_after_intervals: cfg.owner.silent_after_intervals,
            require_approval: cfg.owner.require_approval,
        }
    }
}

/// The newest outcome a recipient's receipts reported for one of its replies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `applied`, `current`, `failed` or `rolled-back`.
    pub event: String,
    /// When the owner recorded it.
    pub at: u64,
    /// The reply.
    pub reply_id: Option<ReplyId>,
    /// The generation the recipient had after it.
    pub generation: Option<u64>,
    /// `failed`: the reason code.
    pub reason: Option<String>,
    /// `failed`: the detail.
    pub detail: Option<String>,
}

/// A reply that changes the tree, sent and not yet answered by a receipt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InFlight {
    /// The reply.
    pub reply_id: ReplyId,
    /// The generation it brings.
    pub generation: u64,
    /// When it was queued.
    pub sent_at: u64,
}

/// What the version database knows about one recipient on one channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    /// The recipient's name.
    pub name: String,
    /// Its registered address.
    pub address: String,
    /// The channel.
    pub channel: String,
    /// When it was registered.
    pub enrolled_at: u64,
    /// The generation it has, as its newest request or receipt states it.
    pub generation: Option<u64>,
    /// The root of its tree, as stated with `generation`.
    pub root: Option<Digest>,
    /// When an authenticated request or receipt of it was last accepted.
    pub last_contact_at: Option<u64>,
    /// The interval it is expected to request at, in seconds (`None`: the owner's default).
    pub interval: Option<u64>,
    /// The newest outcome its receipts reported.
    pub last_outcome: Option<Outcome>,
    /// A reply on its way.
    pub in_flight: Option<InFlight>,
}

/// One recipient on one channel as the fleet view shows it (`docs/fleet.schema.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FleetRow {
    /// The recipient's name.
    pub name: String,
    /// The channel.
    pub channel: String,
    /// Its state.
    pub state: FleetState,
    /// The generation it has (`None` before it said).
    pub generation: Option<u64>,
    /// The root of its tree, hex.
    pub root: Option<String>,
    /// How many generations it is behind the newest (`None` when it has not said what it has, or nothing
    /// is published).
    pub behind: Option<u64>,
    /// When it last made contact.
    pub last_contact_at: Option<u64>,
    /// `failed` and `held`: the reason code; `silent`: `silent`; `behind` with 0: `drift`.
    pub reason: Option<String>,
    /// A sentence on the reason.
    pub detail: Option<String>,
    /// The reply on its way, if any.
    pub in_flight: Option<InFlight>,
    /// Its registered address.
    pub address: String,
    /// The interval it is expected to request at, in seconds.
    pub expected_interval: u64,
}

/// Derives one recipient's row from its facts, the channel's newest generation and the time. Pure.
///
/// In order: a recipient that never made contact is `never-seen`; one whose newest outcome is a failure
/// (other than a hold) and whose tree is not the newest is `failed`, silent or not, because a recipient that
/// failed waits for `reply-timeout` before it asks again; one quiet for longer than its interval times
/// `silent-after-intervals` is `silent`; one that rolled back or holds a generation back is `held`; then
/// `current` (its root is the newest generation's, or nothing is published), `in-flight` (a reply that
/// changes its tree has no receipt yet) or `behind`.
pub fn derive(f: &Facts, latest: Option<(u64, Digest)>, policy: &FleetPolicy, now: u64) -> FleetRow {
    let interval = f.interval.unwrap_or(policy.default_interval).max(1);
    let current = match (latest, f.root) {
        (None, _) => f.last_contact_at.is_some(),
        (Some((_, newest)), Some(root)) => root == newest,
        (Some(_), None) => false,
    };
    let behind = match (latest, f.generation) {
        (Some((n, _)), Some(g)) if !current => Some(n.saturating_sub(g)),
        (Some(_), Some(_)) => Some(0),
        (Some((n, _)), None) if f.last_contact_at.is_some() => Some(n),
        _ => None,
    };
    let silent = f.last_contact_at.is_some_and(|t| {
        now.saturating_sub(t) > interval.saturating_mul(u64::from(policy.silent_after_intervals.max(1)))
    });
    let outcome = f.last_outcome.as_ref();
    let failed = outcome.filter(|o| o.event == "failed" && o.reason.as_deref() != Some("held"));
    let held =
        outcome.filter(|o| o.event == "rolled-back" || (o.event == "failed" && o.reason.as_deref() == Some("held")));
    let mut reason = None;
    let mut detail = None;
    let state = if f.last_contact_at.is_none() && f.generation.is_none() {
        FleetState::NeverSeen
    } else if let Some(o) = failed.filter(|o| !current || o.reason.as_deref() == Some("hook-failed")) {
        // A failed install hook is a failure even when the files are in place (`on-hook-failure = "keep"`):
        // the scanner did not reload, the server did not restart.
        reason.clone_from(&o.reason);
        detail.clone_from(&o.detail);
        FleetState::Failed
    } else if silent {
        reason = Some("silent".to_owned());
        detail = Some(format!(
            "no contact for {}, expected every {}",
            humantime::format_duration(std::time::Duration::from_secs(
                now.saturating_sub(f.last_contact_at.unwrap_or(0))
            )),
            humantime::format_duration(std::time::Duration::from_secs(interval))
        ));
        FleetState::Silent
    } else if let Some(o) = held.filter(|_| !current) {
        reason = Some(if o.event == "rolled-back" { "rolled-back".to_owned() } else { "held".to_owned() });
        detail = o.detail.clone().or_else(|| {
            o.generation.map(|g| format!("rolled back locally to generation {g}; newer generations are held back"))
        });
        FleetState::Held
    } else if current {
        FleetState::Current
    } else if let Some(fl) = f.in_flight.as_ref().filter(|fl| f.generation.is_none_or(|g| fl.generation >= g)) {
        detail = Some(format!("reply {} brings generation {}", fl.reply_id, fl.generation));
        FleetState::InFlight
    } else {
        if behind == Some(0) {
            reason = Some("drift".to_owned());
            detail = Some("its tree differs from the generation it has (local changes)".to_owned());
        }
        FleetState::Behind
    };
    FleetRow {
        name: f.name.clone(),
        channel: f.channel.clone(),
        state,
        generation: f.generation,
        root: f.root.map(|r| r.to_hex()),
        behind,
        last_contact_at: f.last_contact_at,
        reason,
        detail,
        in_flight: f.in_flight.clone(),
        address: f.address.clone(),
        expected_interval: interval,
    }
}

/// Every recipient's row on every channel, by channel (the default one first) and name: on the default
/// channel every registered recipient, on the others those entitled to it or that asked for it.
///
/// # Errors
/// State failures.
pub fn fleet(db: &Db, policy: &FleetPolicy, now: u64) -> Result<Vec<FleetRow>> {
    let mut all = Vec::new();
    for c in db.channels()? {
        all.extend(fleet_of(db, &c.name, policy, now)?);
    }
    Ok(all)
}

/// Every recipient's row on `channel`, by name: on the default channel every registered recipient, on the
/// others those entitled to it or that asked for it. What a recipient is entitled to comes first
/// ([`crate::engine::owner::entitlement`]): one refused the channel is `not-entitled` or `expired` (a
/// suspended one is `not-entitled`, reason `suspended`), and one pinned is measured against its pin.
///
/// # Errors
/// State failures.
pub fn fleet_of(db: &Db, channel: &str, policy: &FleetPolicy, now: u64) -> Result<Vec<FleetRow>> {
    use crate::engine::owner::{Entitlement, entitlement};
    use crate::protocol::Standing;
    let latest = if policy.require_approval {
        db.latest_approved_generation(channel)?.map(|g| (g.number, g.root))
    } else {
        db.channel_latest(channel)?
    };
    let mut rows = Vec::new();
    for f in db.fleet_facts(channel)? {
        let ent = entitlement(&db.access(&f.name, channel)?, now);
        if channel != DEFAULT_CHANNEL && f.last_contact_at.is_none() && !matches!(ent, Entitlement::Granted { .. }) {
            continue;
        }
        let row = match ent {
            Entitlement::Granted { pin: Some(p) } if latest.is_some_and(|(n, _)| p < n) => {
                let at_pin = db.generation(channel, p)?.map(|g| (g.number, g.root));
                let mut row = derive(&f, at_pin.or(latest), policy, now);
                if row.state == FleetState::Current {
                    row.reason = Some("pinned".into());
                    row.detail = Some(format!("pinned at generation {p}"));
                }
                row
            }
            Entitlement::Granted { .. } => derive(&f, latest, policy, now),
            Entitlement::Denied(standing) => {
                let mut row = derive(&f, latest, policy, now);
                row.state = match standing {
                    Standing::Expired { .. } => FleetState::Expired,
                    _ => FleetState::NotEntitled,
                };
                row.reason = Some(match &standing {
                    Standing::Suspended => "suspended".to_owned(),
                    s => s.to_string(),
                });
                row.detail = Some(format!("the owner answers its requests: {standing}"));
                row
            }
        };
        rows.push(row);
    }
    Ok(rows)
}

/// One line of a recipient's history: a reply sent, or an outcome its receipts reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// When the owner sent or recorded it.
    pub at: u64,
    /// The channel.
    pub channel: String,
    /// `sent`, `applied`, `current`, `failed` or `rolled-back`.
    pub event: String,
    /// The reply.
    pub reply_id: Option<ReplyId>,
    /// `sent`: the generation the reply brings; otherwise the generation the recipient had after it.
    pub generation: Option<u64>,
    /// The root with `generation`, hex.
    pub root: Option<String>,
    /// `failed`: the reason code.
    pub reason: Option<String>,
    /// `failed`: the detail; `sent`: what the reply held.
    pub detail: Option<String>,
}

/// A recipient's history, oldest first: replies sent, applies, failures and rollbacks.
///
/// # Errors
/// No such recipient, or state failures.
pub fn history(db: &Db, name: &str) -> Result<Vec<HistoryEntry>> {
    anyhow::ensure!(db.recipient(name)?.is_some(), "no recipient named {name:?} is registered");
    db.fleet_history(name)
}

/// Counts per state, in the order of [`FleetState::ALL`]; states with none are left out.
pub fn summary(rows: &[FleetRow]) -> Vec<(FleetState, usize)> {
    FleetState::ALL
        .into_iter()
        .map(|s| (s, rows.iter().filter(|r| r.state == s).count()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// The summary in words: `412 current, 9 behind, 2 silent, 1 failed`.
pub fn summary_line(rows: &[FleetRow]) -> String {
    let parts: Vec<String> = summary(rows).iter().map(|(s, n)| format!("{n} {s}")).collect();
    if parts.is_empty() { "no recipients".to_owned() } else { parts.join(", ") }
}

/// A change an alert mail reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The recipient.
    pub name: String,
    /// The channel.
    pub channel: String,
    /// The alarming state it was last alerted in (`None`: it was fine).
    pub from: Option<FleetState>,
    /// Its state now.
    pub to: FleetState,
    /// Why, when it is alarming.
    pub reason: Option<String>,
    /// A sentence on it.
    pub detail: Option<String>,
}

impl Transition {
    /// Whether it reports a recovery (from an alarming state to one that is not).
    pub fn recovered(&self) -> bool {
        !self.to.alarming()
    }
}

/// The transitions an alert must report: every recipient now in an alarming state other than the one it
/// was last alerted in, and every recipient last alerted in an alarming state that has left it. Pure.
pub fn pending_alerts(rows: &[FleetRow], alerted: &BTreeMap<(String, String), FleetState>) -> Vec<Transition> {
    let mut out = Vec::new();
    for r in rows {
        let from = alerted.get(&(r.name.clone(), r.channel.clone())).copied();
        let changed = match (from, r.state.alarming()) {
            (Some(f), true) => f != r.state,
            (None, true) | (Some(_), false) => true,
            (None, false) => false,
        };
        if changed {
            out.push(Transition {
                name: r.name.clone(),
                channel: r.channel.clone(),
                from,
                to: r.state,
                reason: r.reason.clone(),
                detail: r.detail.clone(),
            });
        }
    }
    out
}

/// Whether an alert may go now: none went before, or the last one is `alert_interval` old. Pure.
pub fn alert_due(last: Option<u64>, alert_interval: u64, now: u64) -> bool {
    last.is_none_or(|t| now.saturating_sub(t) >= alert_interval)
}

/// The text of the one mail that reports `transitions`, for an owner called `node`.
pub fn alert_text(node: &str, transitions: &[Transition], rows: &[FleetRow]) -> (String, String) {
    let bad: Vec<&Transition> = transitions.iter().filter(|t| !t.recovered()).collect();
    let good: Vec<&Transition> = transitions.iter().filter(|t| t.recovered()).collect();
    let subject = match (bad.len(), good.len()) {
        (0, n) => format!("mailferry: {n} recipient(s) recovered at {node}"),
        (n, 0) => format!("mailferry: {n} recipient(s) need attention at {node}"),
        (n, m) => format!("mailferry: {n} recipient(s) need attention, {m} recovered at {node}"),
    };
    let mut text = format!("mailferry {node}: {}.\n", summary_line(rows));
    if !bad.is_empty() {
        text.push_str("\nNeed attention:\n");
        for t in &bad {
            text.push_str(&format!("  {} ({}): {}", t.name, t.channel, t.to));
            if let Some(r) = &t.reason {
                text.push_str(&format!(" ({r})"));
            }
            if let Some(d) = &t.detail {
                text.push_str(&format!(": {d}"));
            }
            text.push('\n');
        }
    }
    if !good.is_empty() {
        text.push_str("\nRecovered:\n");
        for t in &good {
            let from = t.from.map_or("-", FleetState::code);
            text.push_str(&format!("  {} ({}): {} -> {}\n", t.name, t.channel, from, t.to));
        }
    }
    text.push_str("\nRun `mailferry owner fleet` on the owner for the whole fleet.\n");
    (subject, text)
}

/// If the owner has an `admin-address` and some recipient turned silent or failed, or recovered, since the
/// last alert, and the last alert is `alert-interval` old: queues one mail listing them all, and records
/// in the same transaction what it reported. Returns whether one was queued; the caller's next outbox
/// flush sends it.
///
/// # Errors
/// State failures.
pub fn queue_alerts(db: &Db, cfg: &crate::config::OwnerConfig, now: u64) -> Result<bool> {
    let o = &cfg.owner;
    let Some(admin) = o.admin_address.as_deref() else { return Ok(false) };
    if !alert_due(db.fleet_alert_at()?, o.alert_interval.as_secs(), now) {
        return Ok(false);
    }
    let rows = fleet(db, &FleetPolicy::of(cfg), now)?;
    let alerted: BTreeMap<(String, String), FleetState> =
        db.fleet_alerted()?.into_iter().filter_map(|(k, s)| FleetState::from_code(&s).map(|s| (k, s))).collect();
    let transitions = pending_alerts(&rows, &alerted);
    if transitions.is_empty() {
        return Ok(false);
    }
    let node = format!("owner {}", o.address);
    let (subject, text) = alert_text(&node, &transitions, &rows);
    let raw = mail_builder::MessageBuilder::new()
        .from(o.address.as_str())
        .to(admin)
        .subject(subject)
        .text_body(text)
        .write_to_vec()?;
    db.transaction(|db| {
        for t in &transitions {
            db.set_fleet_alerted(&t.name, &t.channel, t.to.alarming().then_some(t.to.code()))?;
        }
        db.outbox_put(&format!("fleet-alert-{now}"), &o.address, admin, &raw)?;
        db.set_fleet_alert_at(now)
    })?;
    tracing::info!(recipients = transitions.len(), to = admin, "queued a fleet alert");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const HOUR: u64 = 3600;

    fn root(n: u8) -> Digest {
        Digest([n; 32])
    }

    fn facts() -> Facts {
        Facts {
            name: "site1".into(),
            address: "site1@example.org".into(),
            channel: DEFAULT_CHANNEL.into(),
            enrolled_at: NOW - 100 * HOUR,
            generation: Some(5),
            root: Some(root(5)),
            last_contact_at: Some(NOW - 10),
            interval: None,
            last_outcome: None,
            in_flight: None,
        }
    }

    fn outcome(event: &str, reason: Option<&str>, generation: u64) -> Option<Outcome> {
        Some(Outcome {
            event: event.into(),
            at: NOW - 20,
            reply_id: Some(ReplyId::unchecked("ab".repeat(16))),
            generation: Some(generation),
            reason: reason.map(Into::into),
            detail: reason.map(|r| format!("{r} detail")),
        })
    }

    fn flight(generation: u64) -> Option<InFlight> {
        Some(InFlight { reply_id: ReplyId::unchecked("cd".repeat(16)), generation, sent_at: NOW - 5 })
    }

    const POLICY: FleetPolicy =
        FleetPolicy { default_interval: HOUR, silent_after_intervals: 3, require_approval: false };

    /// Each rule of [`derive`], one case each, with the state, `behind` and `reason` it must give.
    #[test]
    fn the_state_follows_from_the_facts_and_the_time() {
        let latest = Some((7, root(7)));
        type Case = (&'static str, Facts, Option<(u64, Digest)>, FleetState, Option<u64>, Option<&'static str>);
        let cases: Vec<Case> = vec![
            (
                "has the newest root",
                Facts { generation: Some(7), root: Some(root(7)), ..facts() },
                latest,
                FleetState::Current,
                Some(0),
                None,
            ),
            (
                "an older number with the newest root",
                Facts { generation: Some(6), root: Some(root(7)), ..facts() },
                latest,
                FleetState::Current,
                Some(0),
                None,
            ),
            ("two generations behind", facts(), latest, FleetState::Behind, Some(2), None),
            (
                "the newest number with another root",
                Facts { generation: Some(7), root: Some(root(9)), ..facts() },
                latest,
                FleetState::Behind,
                Some(0),
                Some("drift"),
            ),
            (
                "a reply on its way",
                Facts { in_flight: flight(7), ..facts() },
                latest,
                FleetState::InFlight,
                Some(2),
                None,
            ),
            (
                "a reply older than what it has is not in flight",
                Facts { in_flight: flight(4), ..facts() },
                latest,
                FleetState::Behind,
                Some(2),
                None,
            ),
            (
                "quiet for three intervals and a second",
                Facts { last_contact_at: Some(NOW - 3 * HOUR - 1), ..facts() },
                latest,
                FleetState::Silent,
                Some(2),
                Some("silent"),
            ),
            (
                "quiet for exactly three intervals",
                Facts { last_contact_at: Some(NOW - 3 * HOUR), ..facts() },
                latest,
                FleetState::Behind,
                Some(2),
                None,
            ),
            (
                "quiet and current is silent",
                Facts { generation: Some(7), root: Some(root(7)), last_contact_at: Some(NOW - 4 * HOUR), ..facts() },
                latest,
                FleetState::Silent,
                Some(0),
                Some("silent"),
            ),
            (
                "its own interval",
                Facts { interval: Some(10), last_contact_at: Some(NOW - 31), ..facts() },
                latest,
                FleetState::Silent,
                Some(2),
                Some("silent"),
            ),
            (
                "a failure",
                Facts { last_outcome: outcome("failed", Some("disk-full"), 5), ..facts() },
                latest,
                FleetState::Failed,
                Some(2),
                Some("disk-full"),
            ),
            (
                "a failure, then silence, is still a failure",
                Facts {
                    last_outcome: outcome("failed", Some("disk-full"), 5),
                    last_contact_at: Some(NOW - 10 * HOUR),
                    ..facts()
                },
                latest,
                FleetState::Failed,
                Some(2),
                Some("disk-full"),
            ),
            (
                "a failure, but the tree is the newest",
                Facts {
                    generation: Some(7),
                    root: Some(root(7)),
                    last_outcome: outcome("failed", Some("tree-mismatch"), 7),
                    ..facts()
                },
                latest,
                FleetState::Current,
                Some(0),
                None,
            ),
            (
                "a failed install hook with the files kept in place",
                Facts {
                    generation: Some(7),
                    root: Some(root(7)),
                    last_outcome: outcome("failed", Some("hook-failed"), 7),
                    ..facts()
                },
                latest,
                FleetState::Failed,
                Some(0),
                Some("hook-failed"),
            ),
            (
                "a success after a failure",
                Facts { last_outcome: outcome("applied", None, 5), ..facts() },
                latest,
                FleetState::Behind,
                Some(2),
                None,
            ),
            (
                "rolled back",
                Facts { last_outcome: outcome("rolled-back", None, 5), ..facts() },
                latest,
                FleetState::Held,
                Some(2),
                Some("rolled-back"),
            ),
            (
                "a reply held back",
                Facts { last_outcome: outcome("failed", Some("held"), 5), ..facts() },
                latest,
                FleetState::Held,
                Some(2),
                Some("held"),
            ),
            (
                "held, then silent",
                Facts {
                    last_outcome: outcome("rolled-back", None, 5),
                    last_contact_at: Some(NOW - 4 * HOUR),
                    ..facts()
                },
                latest,
                FleetState::Silent,
                Some(2),
                Some("silent"),
            ),
            (
                "never made contact",
                Facts { generation: None, root: None, last_contact_at: None, ..facts() },
                latest,
                FleetState::NeverSeen,
                None,
                None,
            ),
            (
                "made contact, never said what it has",
                Facts { generation: None, root: None, ..facts() },
                latest,
                FleetState::Behind,
                Some(7),
                None,
            ),
            ("nothing published yet", facts(), None, FleetState::Current, None, None),
        ];
        for (name, f, latest, state, behind, reason) in cases {
            let row = derive(&f, latest, &POLICY, NOW);
            assert_eq!((row.state, row.behind, row.reason.as_deref()), (state, behind, reason), "{name}: {row:?}");
        }
    }

    #[test]
    fn a_summary_counts_states_in_a_fixed_order() {
        let latest = Some((7, root(7)));
        let mut rows: Vec<FleetRow> = (0..3)
            .map(|_| derive(&Facts { generation: Some(7), root: Some(root(7)), ..facts() }, latest, &POLICY, NOW))
            .collect();
        rows.push(derive(
            &Facts { last_outcome: outcome("failed", Some("disk-full"), 5), ..facts() },
            latest,
            &POLICY,
            NOW,
        ));
        rows.push(derive(&facts(), latest, &POLICY, NOW));
        assert_eq!(summary_line(&rows), "3 current, 1 behind, 1 failed");
        assert_eq!(summary_line(&[]), "no recipients");
        for s in FleetState::ALL {
            assert_eq!(FleetState::from_code(s.code()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.code());
        }
    }

    fn row(name: &str, state: FleetState) -> FleetRow {
        FleetRow {
            name: name.into(),
            channel: DEFAULT_CHANNEL.into(),
            state,
            generation: Some(1),
            root: None,
            behind: None,
            last_contact_at: None,
            reason: None,
            detail: None,
            in_flight: None,
            address: format!("{name}@example.org"),
            expected_interval: HOUR,
        }
    }

    /// Alerts report each transition once: into an alarming state, between two alarming states, and out
    /// of one; a recipient that stays where it was alerted, or was never alarming, is not reported.
    #[test]
    fn alerts_report_each_transition_once_and_batch_them() {
        use FleetState::*;
        let key = |n: &str| (n.to_owned(), DEFAULT_CHANNEL.to_owned());
        let alerted: BTreeMap<_, _> =
            [(key("still-failed"), Failed), (key("was-silent"), Silent), (key("now-silent"), Failed)].into();
        let rows = vec![
            row("fine", Current),
            row("behind", Behind),
            row("newly-failed", Failed),
            row("newly-silent", Silent),
            row("still-failed", Failed),
            row("was-silent", Current),
            row("now-silent", Silent),
        ];
        let got: Vec<(String, Option<FleetState>, FleetState)> =
            pending_alerts(&rows, &alerted).into_iter().map(|t| (t.name, t.from, t.to)).collect();
        assert_eq!(
            got,
            vec![
                ("newly-failed".into(), None, Failed),
                ("newly-silent".into(), None, Silent),
                ("was-silent".into(), Some(Silent), Current),
                ("now-silent".into(), Some(Failed), Silent),
            ]
        );
        // Once recorded, nothing is pending any more.
        let after: BTreeMap<_, _> =
            rows.iter().filter(|r| r.state.alarming()).map(|r| (key(&r.name), r.state)).collect();
        assert!(pending_alerts(&rows, &after).is_empty());
        // One mail lists them all.
        let transitions = pending_alerts(&rows, &alerted);
        let (subject, text) = alert_text("owner o@example.org", &transitions, &rows);
        assert_eq!(subject, "mailferry: 3 recipient(s) need attention, 1 recovered at owner o@example.org");
        for name in ["newly-failed", "newly-silent", "now-silent", "was-silent (default): silent -> current"] {
            assert!(text.contains(name), "{name} in {text}");
        }
        assert!(!text.contains("still-failed ("), "{text}");
        // At most one mail per alert interval.
        let cases = [(None, true), (Some(NOW - HOUR), true), (Some(NOW - HOUR + 1), false), (Some(NOW), false)];
        for (last, due) in cases {
            assert_eq!(alert_due(last, HOUR, NOW), due, "{last:?}");
        }
    }
}
