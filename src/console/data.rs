//! The console's read model: what each page shows, read from the state database in one read transaction
//! (one snapshot, no writer held up, the state lock never taken).
//!
//! The fleet rows come from [`fleet_rows`]: the owner's version database's rows ([`crate::fleet::fleet`],
//! the same `owner fleet` shows), with whether each recipient is suspended.

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::db::{AdminAction, AnswerRow, Db, GenerationRow, ReceiptRow, RecipientRow, Rejection};

/// The channel of every generation and recipient today.
pub const CHANNEL: &str = crate::db::DEFAULT_SUBSCRIPTION;

/// A recipient's state, as the fleet table shows and filters it: the owner's version database's.
pub use crate::fleet::FleetState;

/// One recipient's line in the fleet table: its row in the owner's version database
/// ([`crate::fleet::FleetRow`], whose fields it reads as its own), and whether it is suspended.
#[derive(Debug, Clone, Serialize)]
pub struct FleetRow {
    /// The version database's row.
    #[serde(flatten)]
    pub row: crate::fleet::FleetRow,
    /// Suspended: the owner answers its requests with "suspended" and nothing else.
    pub suspended: bool,
}

impl std::ops::Deref for FleetRow {
    type Target = crate::fleet::FleetRow;

    fn deref(&self) -> &crate::fleet::FleetRow {
        &self.row
    }
}

/// What decides the offered generation (`[owner] require-approval`).
#[derive(Debug, Clone, Copy)]
pub struct RowPolicy {
    /// Only approved generations are offered.
    pub require_approval: bool,
    /// How states are derived (`[owner] recipient-interval`, `silent-after-intervals`).
    pub fleet: crate::fleet::FleetPolicy,
}

/// The generation recipients are brought to now: the newest, or under `require-approval` the newest
/// approved.
///
/// # Errors
/// SQLite errors.
pub fn offered(db: &Db, policy: &RowPolicy) -> Result<Option<GenerationRow>> {
    if policy.require_approval { db.latest_approved_generation(CHANNEL) } else { db.latest_generation(CHANNEL) }
}

/// Every recipient's line on every channel, by channel and name: the owner's version database's rows
/// ([`crate::fleet::fleet`]), with whether each recipient is suspended.
///
/// # Errors
/// SQLite errors.
pub fn fleet_rows(db: &Db, policy: &RowPolicy, now: u64) -> Result<Vec<FleetRow>> {
    crate::fleet::fleet(db, &policy.fleet, now)?.into_iter().map(|r| row_of(db, r)).collect()
}

fn row_of(db: &Db, row: crate::fleet::FleetRow) -> Result<FleetRow> {
    Ok(FleetRow { suspended: db.suspended(&row.name)?, row })
}

/// The fleet table's filter, from the query string (`?state=behind&state=failed&channel=default&q=site`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// States shown (all when empty).
    pub states: Vec<FleetState>,
    /// The channel shown (all when none).
    pub channel: Option<String>,
    /// A part of the name (case-insensitive).
    pub q: Option<String>,
}

impl Filter {
    /// Reads a query string; unknown keys and states are ignored (a filter never fails a page).
    pub fn parse(query: &str) -> Filter {
        let mut f = Filter::default();
        for (k, v) in form_urlencoded(query) {
            match k.as_str() {
                "state" => {
                    for code in v.split(',') {
                        if let Some(s) = FleetState::from_code(code.trim())
                            && !f.states.contains(&s)
                        {
                            f.states.push(s);
                        }
                    }
                }
                "channel" if !v.is_empty() => f.channel = Some(v),
                "q" if !v.trim().is_empty() => f.q = Some(v.trim().to_owned()),
                _ => {}
            }
        }
        f
    }

    /// Whether `row` passes.
    pub fn keeps(&self, row: &FleetRow) -> bool {
        (self.states.is_empty() || self.states.contains(&row.state))
            && self.channel.as_ref().is_none_or(|c| *c == row.channel)
            && self.q.as_ref().is_none_or(|q| row.name.to_lowercase().contains(&q.to_lowercase()))
    }
}

/// Decodes `application/x-www-form-urlencoded` pairs (query strings and posted forms).
pub fn form_urlencoded(s: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(s.as_bytes()).into_owned().collect()
}

/// The fleet page.
#[derive(Debug, Clone)]
pub struct FleetPage {
    /// The rows the filter keeps.
    pub rows: Vec<FleetRow>,
    /// How many rows of each state there are in all (before the filter), in [`FleetState::ALL`] order.
    pub counts: Vec<(FleetState, usize)>,
    /// The generation offered.
    pub offered: Option<GenerationRow>,
    /// The newest generation published (newer than `offered` when one awaits approval).
    pub latest: Option<GenerationRow>,
    /// Every channel there is.
    pub channels: Vec<String>,
}

/// Reads the fleet page.
///
/// # Errors
/// SQLite errors.
pub fn fleet_page(db: &Db, policy: &RowPolicy, filter: &Filter, now: u64) -> Result<FleetPage> {
    db.read(|db| {
        let all = fleet_rows(db, policy, now)?;
        let counts = FleetState::ALL.iter().map(|s| (*s, all.iter().filter(|r| r.state == *s).count())).collect();
        let mut channels: Vec<String> = all.iter().map(|r| r.channel.clone()).collect();
        channels.push(CHANNEL.to_owned());
        channels.sort();
        channels.dedup();
        Ok(FleetPage {
            rows: all.into_iter().filter(|r| filter.keeps(r)).collect(),
            counts,
            offered: offered(db, policy)?,
            latest: db.latest_generation(CHANNEL)?,
            channels,
        })
    })
}

/// A recipient's page.
#[derive(Debug, Clone)]
pub struct RecipientPage {
    /// Its fleet row.
    pub row: FleetRow,
    /// Its registration.
    pub registration: RecipientRow,
    /// The requests answered, newest first.
    pub answers: Vec<AnswerRow>,
    /// The receipts recorded, newest first.
    pub receipts: Vec<ReceiptRow>,
    /// The last bounce of a reply part sent to it.
    pub bounce: Option<String>,
    /// Refused messages that name it or claim to come from its address (claims: untrusted).
    pub refusals: Vec<Rejection>,
    /// Admin actions on it, newest first.
    pub actions: Vec<AdminAction>,
}

/// How many rows of history a page shows.
pub const HISTORY: u64 = 50;

/// Reads recipient `name`'s page, `None` when no such recipient is registered.
///
/// # Errors
/// SQLite errors.
pub fn recipient_page(db: &Db, policy: &RowPolicy, name: &str, now: u64) -> Result<Option<RecipientPage>> {
    db.read(|db| {
        let Some(reg) = db.recipient(name)? else { return Ok(None) };
        let row = crate::fleet::fleet_of(db, CHANNEL, &policy.fleet, now)?
            .into_iter()
            .find(|r| r.name == name)
            .map(|r| row_of(db, r))
            .transpose()?
            .context("a registered recipient has no row on the default channel")?;
        let quoted = format!("{name:?}");
        let refusals = db
            .recent_rejections(1000)?
            .into_iter()
            .filter(|r| r.detail.contains(&quoted) || r.sender.as_deref().is_some_and(|s| s.contains(&reg.address)))
            .take(HISTORY as usize)
            .collect();
        let actions = db.actions(1000)?.into_iter().filter(|a| a.target == name).take(HISTORY as usize).collect();
        Ok(Some(RecipientPage {
            row,
            answers: db.answers_of(name, HISTORY)?,
            receipts: db.receipts_of(name, HISTORY)?,
            bounce: db.bounce(name)?,
            registration: reg,
            refusals,
            actions,
        }))
    })
}

/// One generation as the generations page lists it.
#[derive(Debug, Clone)]
pub struct GenerationLine {
    /// Its channel.
    pub channel: String,
    /// The generation.
    pub generation: GenerationRow,
    /// When and by whom it was approved.
    pub approved: Option<(u64, String)>,
    /// It is the one offered now.
    pub offered: bool,
    /// Recipients that have it.
    pub recipients: usize,
}

/// The channels and generations page.
#[derive(Debug, Clone)]
pub struct GenerationsPage {
    /// Whether generations need approval before they are offered.
    pub require_approval: bool,
    /// Every kept generation, newest first per channel.
    pub generations: Vec<GenerationLine>,
    /// Admin actions on generations, newest first.
    pub actions: Vec<AdminAction>,
}

/// Reads the generations page.
///
/// # Errors
/// SQLite errors.
pub fn generations_page(db: &Db, policy: &RowPolicy) -> Result<GenerationsPage> {
    db.read(|db| {
        let offered = offered(db, policy)?.map(|g| g.number);
        let recipients = db.recipients()?;
        let generations = db
            .kept_generations()?
            .into_iter()
            .map(|k| GenerationLine {
                offered: k.channel == CHANNEL && Some(k.generation.number) == offered,
                recipients: recipients.iter().filter(|r| r.applied_generation == Some(k.generation.number)).count(),
                channel: k.channel,
                generation: k.generation,
                approved: k.approved,
            })
            .collect();
        let actions = db.actions(1000)?.into_iter().filter(|a| a.action == "approve").take(HISTORY as usize).collect();
        Ok(GenerationsPage { require_approval: policy.require_approval, generations, actions })
    })
}

/// Reads the intrusion log: the newest refused messages.
///
/// # Errors
/// SQLite errors.
pub fn intrusions(db: &Db, limit: u64) -> Result<(u64, Vec<Rejection>)> {
    db.read(|db| Ok((db.rejection_count()?, db.recent_rejections(limit)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_reads_states_channels_and_names_and_ignores_the_rest() {
        let f = Filter::parse("state=behind&state=failed%2Cnever-seen&state=bogus&channel=&q=+Site%31+&x=1");
        assert_eq!(f.states, vec![FleetState::Behind, FleetState::Failed, FleetState::NeverSeen]);
        assert_eq!((f.channel, f.q.as_deref()), (None, Some("Site1")));
        let row = |name: &str, state| FleetRow {
            row: crate::fleet::FleetRow {
                name: name.into(),
                channel: CHANNEL.into(),
                state,
                generation: None,
                root: None,
                behind: None,
                last_contact_at: None,
                reason: None,
                detail: None,
                in_flight: None,
                address: format!("{name}@example.org"),
                expected_interval: 3600,
            },
            suspended: false,
        };
        let f = Filter::parse("state=behind&q=site1");
        assert!(f.keeps(&row("SITE10", FleetState::Behind)));
        assert!(!f.keeps(&row("site1", FleetState::Current)));
        assert!(!f.keeps(&row("site2", FleetState::Behind)));
        assert!(Filter::parse("").keeps(&row("x", FleetState::Failed)));
        assert!(!Filter::parse("channel=beta").keeps(&row("x", FleetState::Failed)));
    }
}
