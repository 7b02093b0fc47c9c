//! The console's HTML: maud templates over the read model, one function per page, no JavaScript. Every
//! value from the state database (names, addresses, the untrusted sender and subject of a refused message)
//! goes through maud's escaping; every form that posts carries the session's CSRF token.
//!
//! Tables carry `data-*` attributes with the raw values (name, state, generation), which the stylesheet
//! uses to label cells on a phone and tests use to read the page without parsing text.

use maud::{DOCTYPE, Markup, html};

use super::data::{Filter, FleetPage, FleetState, GenerationsPage, RecipientPage};
use crate::db::Rejection;

/// The stylesheet, served as `/style.css`: small, and the only one.
pub const STYLE: &str = r#"
:root { color-scheme: light dark; --line: #8884; --muted: #888; --bad: #c0392b; --warn: #b9770e; --good: #1e8449; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; padding: 0 1rem 2rem; max-width: 80rem; margin-inline: auto; }
header { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: center; padding: .75rem 0; border-bottom: 1px solid var(--line); }
header strong { margin-right: auto; }
nav a, nav button { margin-right: .75rem; }
a { color: inherit; }
nav a[aria-current] { font-weight: 600; text-decoration-thickness: 2px; }
h1 { font-size: 1.3rem; margin: 1rem 0 .5rem; }
h2 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .35rem .5rem; border-bottom: 1px solid var(--line); vertical-align: top; overflow-wrap: anywhere; }
th { font-weight: 600; }
code { font-size: .9em; }
.muted { color: var(--muted); }
.state { font-weight: 600; white-space: nowrap; }
.state-current { color: var(--good); } .state-behind, .state-in-flight { color: var(--warn); }
.state-failed, .error { color: var(--bad); }
.counts { display: flex; flex-wrap: wrap; gap: .25rem 1rem; margin: .5rem 0; }
form.filter { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: end; margin: .75rem 0; }
form.filter fieldset { border: 1px solid var(--line); padding: .25rem .5rem; margin: 0; }
form.inline { display: inline; }
input[type=text], input[type=password], select { font: inherit; padding: .3rem; max-width: 100%; }
button { font: inherit; padding: .3rem .8rem; cursor: pointer; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; }
dt { font-weight: 600; } dd { margin: 0; overflow-wrap: anywhere; }
.login { max-width: 22rem; margin: 3rem auto; display: grid; gap: .6rem; }
@media (max-width: 40rem) {
  table, thead, tbody, tr, th, td { display: block; }
  thead { position: absolute; left: -9999px; }
  tr { border: 1px solid var(--line); border-radius: .4rem; margin: .6rem 0; padding: .3rem .5rem; }
  td { border: 0; padding: .15rem 0 .15rem 8.5rem; position: relative; min-height: 1.6rem; }
  td::before { content: attr(data-label); position: absolute; left: 0; width: 8rem; font-weight: 600; color: var(--muted); }
}
"#;

/// The page a nav link is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// The fleet table (and a recipient's page).
    Fleet,
    /// Channels and generations.
    Generations,
    /// Refused messages.
    Intrusions,
    /// None (the login page, errors).
    None,
}

/// A time as `2026-11-01 12:00:00 UTC (5m ago)`, or a dash.
pub fn when(t: Option<u64>, now: u64) -> String {
    let Some(t) = t else { return "–".to_owned() };
    let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC");
    let age = now.saturating_sub(t);
    let ago = match age {
        0..60 => format!("{age}s ago"),
        60..3600 => format!("{}m ago", age / 60),
        3600..86_400 => format!("{}h ago", age / 3600),
        _ => format!("{}d ago", age / 86_400),
    };
    format!("{at} ({ago})")
}

fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "–".to_owned(), |v| v.to_string())
}

/// The frame of every page. `csrf` is the session's token when logged in (the nav then has a logout
/// button).
pub fn layout(title: &str, nav: Nav, csrf: Option<&str>, node: &str, body: Markup) -> Markup {
    let link = |href: &str, label: &str, this: Nav| {
        html! { a href=(href) aria-current=[(nav == this).then_some("page")] { (label) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · mailferry" }
                link rel="stylesheet" href="/style.css";
            }
            body {
                header {
                    strong { "mailferry owner " span.muted { (node) } }
                    @if let Some(csrf) = csrf {
                        nav {
                            (link("/", "Fleet", Nav::Fleet))
                            (link("/generations", "Generations", Nav::Generations))
                            (link("/intrusions", "Intrusion log", Nav::Intrusions))
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(csrf);
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// The login form; `error` says why the last attempt failed.
pub fn login(node: &str, csrf: &str, error: Option<&str>) -> Markup {
    layout(
        "Log in",
        Nav::None,
        None,
        node,
        html! {
            form.login method="post" action="/login" {
                h1 { "Log in" }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                input type="hidden" name="csrf" value=(csrf);
                label for="secret" { "Password or token" }
                input #secret type="password" name="secret" autocomplete="current-password" autofocus required;
                button type="submit" { "Log in" }
            }
        },
    )
}

/// A short message page (not found, refused).
pub fn message(node: &str, csrf: Option<&str>, title: &str, text: &str) -> Markup {
    layout(
        title,
        Nav::None,
        csrf,
        node,
        html! { h1 { (title) } p.error { (text) } p { a href="/" { "Back to the fleet" } } },
    )
}

fn state_badge(s: FleetState) -> Markup {
    html! { span class={ "state state-" (s.code()) } { (s.code()) } }
}

/// The fleet table with its filter.
pub fn fleet(page: &FleetPage, filter: &Filter, now: u64) -> Markup {
    let offered = page.offered.as_ref().map(|g| g.number);
    html! {
        h1 { "Fleet" }
        p {
            "Offered: generation " strong #offered { (opt(offered)) }
            @if let (Some(l), o) = (&page.latest, offered) {
                @if Some(l.number) != o {
                    " · " a href="/generations" { "generation " (l.number) " awaits approval" }
                }
            }
        }
        div.counts #counts {
            @for (s, n) in &page.counts {
                span data-state=(s.code()) { (state_badge(*s)) " " (n) }
            }
        }
        form.filter method="get" action="/" {
            fieldset {
                legend { "State" }
                @for s in FleetState::ALL {
                    label { input type="checkbox" name="state" value=(s.code()) checked[filter.states.contains(&s)]; " " (s.code()) } " "
                }
            }
            label { "Channel " select name="channel" {
                option value="" { "all" }
                @for c in &page.channels { option value=(c) selected[filter.channel.as_deref() == Some(c.as_str())] { (c) } }
            } }
            label { "Name " input type="text" name="q" value=(filter.q.as_deref().unwrap_or("")) placeholder="part of a name"; }
            button type="submit" { "Filter" }
            a href="/" { "clear" }
        }
        p.muted #shown { (page.rows.len()) " shown" }
        table #fleet {
            thead { tr { th { "Name" } th { "Channel" } th { "State" } th { "Generation" } th { "Behind" } th { "Root" } th { "Last contact" } th { "Note" } } }
            tbody {
                @for r in &page.rows {
                    tr data-name=(r.name) data-state=(r.state.code()) data-generation=(opt(r.generation)) data-suspended=(r.suspended) {
                        td data-label="Name" { a href={ "/recipient?name=" (r.name) } { (r.name) } }
                        td data-label="Channel" { (r.channel) }
                        td data-label="State" { (state_badge(r.state)) }
                        td data-label="Generation" { (opt(r.generation)) }
                        td data-label="Behind" { (opt(r.behind)) }
                        td data-label="Root" { code { (r.root.as_deref().map_or("–", short)) } }
                        td data-label="Last contact" { (when(r.last_contact_at, now)) }
                        td data-label="Note" {
                            @if r.suspended { strong.error { "suspended" } " " }
                            @if let Some(why) = r.reason.as_deref().filter(|w| !(r.suspended && *w == "suspended")) {
                                (why)
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A recipient's page.
pub fn recipient(csrf: &str, p: &RecipientPage, now: u64) -> Markup {
    let reg = &p.registration;
    html! {
        h1 { "Recipient " (reg.name) }
        dl #facts {
            dt { "State" } dd #state data-state=(p.row.state.code()) { (state_badge(p.row.state)) @if let Some(r) = &p.row.reason { " · " (r) } }
            dt { "Generation" } dd #generation { (opt(p.row.generation)) @if let Some(b) = p.row.behind { @if b > 0 { " (" (b) " behind)" } } }
            dt { "Root" } dd { code { (p.row.root.as_deref().unwrap_or("–")) } }
            dt { "Address" } dd { (reg.address) }
            dt { "Key id" } dd { code { (reg.key_id.as_str()) } @if let Some(k) = &reg.rotating_to { " → " code { (k) } " (rotating)" } }
            dt { "Last request" } dd { (when(reg.last_request_at, now)) }
            dt { "Last receipt" } dd { (when(reg.last_receipt_at, now)) }
            dt { "Last bounce" } dd { (p.bounce.as_deref().unwrap_or("–")) }
            dt { "Suspended" } dd #suspended { @if reg.suspended { strong.error { "yes" } ": its requests are refused" } @else { "no" } }
        }
        form method="post" action="/suspend" {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="name" value=(reg.name);
            @if reg.suspended {
                input type="hidden" name="on" value="false";
                button #resume type="submit" { "Resume " (reg.name) }
            } @else {
                input type="hidden" name="on" value="true";
                button #suspend type="submit" { "Suspend " (reg.name) }
            }
        }
        h2 { "Receipts" }
        table #receipts {
            thead { tr { th { "When" } th { "Generation" } th { "Root" } th { "Status" } th { "Reply" } } }
            tbody { @for r in &p.receipts { tr data-generation=(r.generation) {
                td data-label="When" { (when(Some(r.at), now)) }
                td data-label="Generation" { (r.generation) }
                td data-label="Root" { code { (short(&r.root)) } }
                td data-label="Status" { (r.status) }
                td data-label="Reply" { code { (short(r.reply_id.as_str())) } }
            } } }
        }
        @if p.receipts.is_empty() { p.muted { "No receipt recorded." } }
        h2 { "Requests answered" }
        table #answers {
            thead { tr { th { "When" } th { "Seq" } th { "Generation" } th { "Operations" } th { "Bytes" } th { "Parts" } } }
            tbody { @for a in &p.answers { tr {
                td data-label="When" { (when(Some(a.at), now)) }
                td data-label="Seq" { (a.seq) }
                td data-label="Generation" { (a.generation) }
                td data-label="Operations" { (a.ops) }
                td data-label="Bytes" { (a.bytes) }
                td data-label="Parts" { (opt(a.parts)) }
            } } }
        }
        @if p.answers.is_empty() { p.muted { "No request answered." } }
        h2 { "Refused messages naming it" }
        p.muted { "Messages refused whose reason names this recipient, or whose From claims its address; senders and subjects are claims." }
        (rejections(&p.refusals, now))
        h2 { "Admin actions" }
        ul #actions { @for a in &p.actions { li { (when(Some(a.at), now)) ": " (a.action) " by " (a.actor) } } }
        @if p.actions.is_empty() { p.muted { "None." } }
    }
}

fn rejections(rows: &[Rejection], now: u64) -> Markup {
    html! {
        table.rejections {
            thead { tr { th { "When" } th { "Reason" } th { "Detail" } th { "From (claimed)" } th { "Subject (claimed)" } } }
            tbody { @for r in rows { tr data-reason=(r.reason) {
                td data-label="When" { (when(Some(r.at), now)) }
                td data-label="Reason" { strong { (r.reason) } }
                td data-label="Detail" { (r.detail) }
                td data-label="From" { (r.sender.as_deref().unwrap_or("–")) }
                td data-label="Subject" { (r.subject.as_deref().unwrap_or("–")) }
            } } }
        }
        @if rows.is_empty() { p.muted { "None." } }
    }
}

/// The channels and generations page.
pub fn generations(csrf: &str, p: &GenerationsPage, now: u64) -> Markup {
    html! {
        h1 { "Channels and generations" }
        p {
            @if p.require_approval {
                "Approval is required: recipients are brought to the newest " strong { "approved" } " generation."
            } @else {
                "Approval is not required (" code { "[owner] require-approval" } "): recipients are brought to the newest generation; approving records the admin's sign-off."
            }
        }
        table #generations {
            thead { tr { th { "Channel" } th { "Generation" } th { "Published" } th { "Files" } th { "Bytes" } th { "Root" } th { "Recipients on it" } th { "Approval" } } }
            tbody { @for g in &p.generations {
                tr data-channel=(g.channel) data-generation=(g.generation.number) data-approved=(g.approved.is_some()) data-offered=(g.offered) {
                    td data-label="Channel" { (g.channel) }
                    td data-label="Generation" { (g.generation.number) @if g.offered { " " strong { "(offered)" } } }
                    td data-label="Published" { (when(Some(g.generation.created), now)) }
                    td data-label="Files" { (g.generation.files) }
                    td data-label="Bytes" { (g.generation.bytes) }
                    td data-label="Root" { code { (short(&g.generation.root.to_hex())) } }
                    td data-label="Recipients" { (g.recipients) }
                    td data-label="Approval" {
                        @if let Some((at, by)) = &g.approved {
                            "approved " (when(Some(*at), now)) " by " (by)
                        } @else {
                            form.inline method="post" action="/approve" {
                                input type="hidden" name="csrf" value=(csrf);
                                input type="hidden" name="channel" value=(g.channel);
                                input type="hidden" name="generation" value=(g.generation.number);
                                button type="submit" id={ "approve-" (g.channel) "-" (g.generation.number) } { "Approve " (g.generation.number) }
                            }
                        }
                    }
                }
            } }
        }
        @if p.generations.is_empty() { p.muted { "Nothing is published yet (" code { "mailferry owner publish" } ")." } }
        h2 { "Approvals" }
        ul { @for a in &p.actions { li { (when(Some(a.at), now)) ": " (a.target) " by " (a.actor) } } }
        @if p.actions.is_empty() { p.muted { "None logged." } }
    }
}

/// The intrusion log: refused messages with their reasons.
pub fn intrusions(total: u64, rows: &[Rejection], now: u64) -> Markup {
    html! {
        h1 { "Intrusion log" }
        p { (total) " message(s) refused in all; the newest " (rows.len()) " below. Nothing of a refused message was trusted: senders and subjects are what the messages claim." }
        (rejections(rows, now))
    }
}
