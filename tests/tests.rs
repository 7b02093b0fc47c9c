//! Integration tests: one binary, real processes, real files.

mod support;
mod util;

// Syncing real trees end to end over the Maildir transport.
mod sync;
// Deltas, local copies, replies in parts, lost parts sent again.
mod transfer;
// Old generations beyond keep-generations: one round trip, a direct delta, old content kept as deltas.
mod history;
// Forged, tampered, replayed, hostile and oversized input.
mod hostile;
// kill -9 at every step of an apply and while answering.
mod crash;
// `recipient rollback`: the tree back to the generation before, the undone one held back, kill -9 in between.
mod rollback;
// Install hooks (local and shipped), hooks pending across a crash, manual installs, apply windows.
mod install;
// `owner rotate-key` and Ed25519-signed replies.
mod keys;
// `owner add-recipients` (bulk enrollment from CSV or TOML) and `owner tag`.
mod enroll;
// Payload encryption per channel: what another reader of a reply mail can read of it.
mod encryption;
// The signed broadcast: one payload for a fleet on one base, a ticket each; stragglers; unsolicited parts.
mod broadcast;
// The shipped units' sandbox (state directory and data tree on separate mounts), the package, man pages.
mod units;
// The fleet view: a scripted fleet of 50 recipients, failures, rollbacks, silence, alerts.
mod fleet;
// Operating a node: config lookup, `check`, the JSON schemas and Prometheus output, exit codes, output.
mod ops;
// Channels, groups, grants, expiry, pins, suspension: each site gets exactly what it is entitled to.
mod channels;
// The owner's web console in headless Chromium (Debian's chromium and chromium-driver).
mod console;
// Protocol v1 messages from fixtures/ that must keep verifying.
mod golden;
// Real mail: Postfix + Dovecot on 127.0.0.1 (tests/mailserver/), one shared instance per run.
// The mail transport on its own, through the library.
mod live_transport;
// Owners and recipients with kind = "mail", through the binary.
mod live_mail;
