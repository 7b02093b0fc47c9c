//! Integration tests: one binary, real processes, real files.

mod util;

// Syncing real trees end to end over the Maildir transport.
mod sync;
// Forged, tampered, replayed, hostile and oversized input.
mod hostile;
// kill -9 at every step of an apply and while answering.
mod crash;
// Protocol v1 messages from fixtures/ that must keep verifying.
mod golden;
