//! `status --format prometheus`: a node's own state in the Prometheus text exposition format (0.0.4), for
//! node_exporter's textfile collector or a scrape wrapper. Every metric is named `mailferry_...` and has its
//! `# HELP` and `# TYPE` lines; times are Unix seconds; a value not known yet (no reply so far) is left
//! out rather than shown as 0.

use std::fmt::Write as _;

use mailferry::node::owner::OwnerStatus;
use mailferry::node::recipient::RecipientStatus;

/// One metric family being written.
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    kind: &'a str,
    samples: Vec<(Vec<(&'a str, String)>, f64)>,
}

/// Collects families and writes them in order.
#[derive(Default)]
struct Metrics<'a> {
    families: Vec<Family<'a>>,
}

impl<'a> Metrics<'a> {
    fn family(&mut self, name: &'a str, kind: &'a str, help: &'a str) -> &mut Family<'a> {
        if let Some(i) = self.families.iter().position(|f| f.name == name) {
            return &mut self.families[i];
        }
        self.families.push(Family { name, help, kind, samples: Vec::new() });
        self.families.last_mut().expect("just pushed")
    }

    fn gauge(&mut self, name: &'a str, help: &'a str, labels: Vec<(&'a str, String)>, value: Option<f64>) {
        let f = self.family(name, "gauge", help);
        if let Some(v) = value {
            f.samples.push((labels, v));
        }
    }

    fn counter(&mut self, name: &'a str, help: &'a str, value: f64) {
        self.family(name, "counter", help).samples.push((vec![], value));
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for f in self.families.iter().filter(|f| !f.samples.is_empty()) {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            for (labels, v) in &f.samples {
                let _ = write!(out, "{}", f.name);
                if !labels.is_empty() {
                    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
                    let _ = write!(out, "{{{}}}", inner.join(","));
                }
                let _ = writeln!(out, " {v}");
            }
        }
        out
    }
}

/// Escapes a label value (backslash, double quote, newline), as the format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn flag(b: bool) -> Option<f64> {
    Some(if b { 1.0 } else { 0.0 })
}

fn time(t: Option<u64>) -> Option<f64> {
    t.map(|t| t as f64)
}

/// What both roles show.
fn common<'a>(
    m: &mut Metrics<'a>,
    role: &str,
    rejected: u64,
    outbox: &mailferry::node::OutboxStatus,
    transport: &mailferry::node::TransportStatus,
    attention: bool,
) {
    m.gauge("mailferry_info", "The node's role (always 1).", vec![("role", role.to_owned())], Some(1.0));
    m.gauge(
        "mailferry_attention",
        "1 when `mailferry status` exits 1 (the node needs attention).",
        vec![],
        flag(attention),
    );
    m.counter(
        "mailferry_rejected_messages_total",
        "Refused messages recorded (see `mailferry log --rejected`).",
        rejected as f64,
    );
    m.gauge(
        "mailferry_outbox_pending",
        "Outgoing messages waiting for the mail server.",
        vec![],
        Some(outbox.pending as f64),
    );
    m.gauge(
        "mailferry_outbox_failed",
        "Outgoing messages the mail server refused permanently.",
        vec![],
        Some(outbox.failed as f64),
    );
    m.gauge(
        "mailferry_transport_failing",
        "1 when the last run ended with a mail server or spool error.",
        vec![],
        flag(transport.failing()),
    );
    m.gauge(
        "mailferry_transport_last_error_timestamp_seconds",
        "When the last mail server or spool error happened.",
        vec![],
        time(transport.last_error_at),
    );
    m.gauge(
        "mailferry_transport_last_ok_timestamp_seconds",
        "When a run last finished with nothing left to retry.",
        vec![],
        time(transport.last_ok_at),
    );
}

/// The owner's metrics.
pub fn owner(s: &OwnerStatus, attention: bool) -> String {
    let mut m = Metrics::default();
    common(&mut m, "owner", s.rejected, &s.outbox, &s.transport, attention);
    let g = s.generation.as_ref();
    m.gauge(
        "mailferry_generation",
        "The newest published generation (0 for none).",
        vec![],
        Some(g.map_or(0, |g| g.number) as f64),
    );
    m.gauge("mailferry_generation_files", "Regular files in the newest generation.", vec![], g.map(|g| g.files as f64));
    m.gauge(
        "mailferry_generation_bytes",
        "Bytes in the regular files of the newest generation.",
        vec![],
        g.map(|g| g.bytes as f64),
    );
    m.gauge(
        "mailferry_generation_published_timestamp_seconds",
        "When the newest generation was published.",
        vec![],
        g.map(|g| g.created as f64),
    );
    m.gauge("mailferry_recipients", "Registered recipients.", vec![], Some(s.recipients.len() as f64));
    m.gauge(
        "mailferry_budget_replies",
        "Most replies one recipient is sent per budget period.",
        vec![],
        Some(s.budget.replies as f64),
    );
    m.gauge(
        "mailferry_budget_bytes",
        "Most reply bytes one recipient is sent per budget period.",
        vec![],
        Some(s.budget.bytes as f64),
    );
    for r in &s.recipients {
        let l = || vec![("recipient", r.name.clone())];
        m.gauge(
            "mailferry_recipient_applied_generation",
            "The generation a recipient last reported applied.",
            l(),
            r.applied_generation.map(|g| g as f64),
        );
        m.gauge(
            "mailferry_recipient_last_request_timestamp_seconds",
            "When a recipient's last request arrived.",
            l(),
            time(r.last_request_at),
        );
        m.gauge(
            "mailferry_recipient_last_reply_timestamp_seconds",
            "When a recipient was last replied to.",
            l(),
            time(r.last_reply_at),
        );
        m.gauge(
            "mailferry_recipient_last_receipt_timestamp_seconds",
            "When a recipient's last receipt arrived.",
            l(),
            time(r.last_receipt_at),
        );
        m.gauge(
            "mailferry_recipient_spent_replies",
            "Replies sent to a recipient in the current budget period.",
            l(),
            Some(r.spent_replies as f64),
        );
        m.gauge(
            "mailferry_recipient_spent_bytes",
            "Reply bytes sent to a recipient in the current budget period.",
            l(),
            Some(r.spent_bytes as f64),
        );
    }
    m.render()
}

/// The fleet's metrics (`owner fleet --format prometheus`): recipients per state, and each recipient's
/// state, generation, lag and last contact.
pub fn fleet(rows: &[mailferry::fleet::FleetRow], attention: bool) -> String {
    use mailferry::fleet::FleetState;
    let mut m = Metrics::default();
    m.gauge(
        "mailferry_fleet_attention",
        "1 when `mailferry owner fleet` exits 1 (a recipient shown is failed or silent).",
        vec![],
        flag(attention),
    );
    for s in FleetState::ALL {
        m.gauge(
            "mailferry_fleet_recipients",
            "Recipients shown in each state.",
            vec![("state", s.code().to_owned())],
            Some(rows.iter().filter(|r| r.state == s).count() as f64),
        );
    }
    for r in rows {
        let l = || vec![("recipient", r.name.clone()), ("channel", r.channel.clone())];
        let mut with_state = l();
        with_state.push(("state", r.state.code().to_owned()));
        m.gauge("mailferry_fleet_recipient_state", "A recipient's state (the label; always 1).", with_state, Some(1.0));
        m.gauge(
            "mailferry_fleet_recipient_generation",
            "The generation a recipient has, as it last stated.",
            l(),
            r.generation.map(|g| g as f64),
        );
        m.gauge(
            "mailferry_fleet_recipient_behind",
            "How many generations a recipient is behind the newest.",
            l(),
            r.behind.map(|b| b as f64),
        );
        m.gauge(
            "mailferry_fleet_recipient_last_contact_timestamp_seconds",
            "When a recipient last made authenticated contact.",
            l(),
            time(r.last_contact_at),
        );
    }
    m.render()
}

/// The recipient's metrics.
pub fn recipient(s: &RecipientStatus, attention: bool) -> String {
    let mut m = Metrics::default();
    common(&mut m, "recipient", s.rejected, &s.outbox, &s.transport, attention);
    m.gauge(
        "mailferry_generation",
        "The generation applied to the data tree (0 for none).",
        vec![],
        Some(s.generation as f64),
    );
    m.gauge(
        "mailferry_last_request_timestamp_seconds",
        "When the last request was sent.",
        vec![],
        time(s.last_request_at),
    );
    m.gauge(
        "mailferry_last_reply_timestamp_seconds",
        "When the last authenticated reply was accepted.",
        vec![],
        time(s.last_reply_at),
    );
    m.gauge("mailferry_outstanding_requests", "Requests awaiting their reply.", vec![], Some(s.outstanding as f64));
    m.gauge(
        "mailferry_interrupted_apply",
        "1 while an interrupted apply waits for the next run.",
        vec![],
        flag(s.interrupted_apply),
    );
    m.gauge("mailferry_stale", "1 when no fresh reply came for longer than stale-after.", vec![], flag(s.stale));
    m.gauge("mailferry_stale_after_seconds", "The stale-after in force.", vec![], Some(s.stale_after as f64));
    m.gauge(
        "mailferry_rollback_held_generation",
        "After a local rollback: the newest generation held back.",
        vec![],
        s.rollback_held.map(|g| g as f64),
    );
    m.gauge("mailferry_key_readable", "1 when the key file can be read.", vec![], flag(s.key_id.is_some()));
    m.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_empty_families_left_out() {
        let mut m = Metrics::default();
        m.gauge("mailferry_a", "A.", vec![("recipient", "x\"y\\z\n".into())], Some(1.0));
        m.gauge("mailferry_b", "B.", vec![], None);
        let text = m.render();
        assert_eq!(
            text,
            "# HELP mailferry_a A.\n# TYPE mailferry_a gauge\nmailferry_a{recipient=\"x\\\"y\\\\z\\n\"} 1\n"
        );
    }
}
