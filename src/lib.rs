//! mailferry keeps a recipient's data tree in sync with an owner's, using nothing but email.
//!
//! # Bird's-eye view
//!
//! A **recipient** scans its data tree, and mails the owner an authenticated **request**: its name, a fresh
//! nonce, a sequence number, the generation it has applied and what is in its tree now. The **owner**
//! checks the request against the recipient it registered, diffs the tree against its newest immutable
//! **generation**, and mails back a **reply** to the recipient's *registered* address: the operations that
//! turn the recipient's tree into the generation, with the new contents as local copies, zstd, line or
//! bsdiff deltas against the recipient's own files, or whole zstd frames, whichever is smallest; all in one **pack** cut
//! into parts that fit the relays, each part authenticated by an HMAC under that recipient's own key. The recipient verifies everything,
//! stages the new files beside the tree, commits a journal, and renames them into place; after a crash the
//! next run finishes the journal, so the tree is the old generation or the new one. It then mails a
//! **receipt**, which the owner records.
//!
//! ```text
//!  recipient                                   owner
//!  scan ─► request(nonce, seq, gen, inventory) ─►  verify MAC, seq, nonce ─► diff vs generation
//!  keep parts ◄─ reply part k/n(nonce, gen, root, chunk k) ◄─ pack: deltas, frames, body(ops)
//!  (missing after reply-timeout? request names them ─► the same parts again)
//!  verify ─► stage ─► journal ─► rename ─► receipt ─►  record
//! ```
//!
//! # Code map
//!
//! Pure core (no I/O, unit-tested):
//! - [`path`]: validated tree-relative paths; the one place hostile names are refused.
//! - [`manifest`]: trees, tree roots, [`manifest::diff`] and [`manifest::Manifest::apply`].
//! - [`crypto`]: keys, HMAC-SHA256, nonces, sealing a rotated key under the old one (and a channel key
//!   under a recipient's), the owner's optional Ed25519 reply signatures; [`crypto::stream`], the
//!   streamed XChaCha20-Poly1305 encryption of an encrypting channel's packs.
//! - [`protocol`]: control messages (request, reply part, receipt), the reply body, auth part, refusal
//!   reasons, [`protocol::envelope`] for MIME (and how large a chunk fits a message, delivery tokens),
//!   [`protocol::bounded`], decoding that counts and caps as the bytes stream in, and
//!   [`protocol::broadcast`], the signed broadcast's parts, tickets and capability.
//! - [`engine`]: the protocol's decisions. [`engine::verify`] is the one verification pipeline of both
//!   roles (raw bytes to a verified message or a refusal); [`engine::owner`] and [`engine::recipient`]
//!   take a verified message, a read-only view of the state and the time, and return a refusal or a plan
//!   with the effects the shell applies in one transaction; randomness comes in through
//!   [`engine::Entropy`]. Tested table-driven, one case per refusal rule of `docs/protocol.md` §11.
//! - [`delta`]: zstd frames with a reference prefix (`--patch-from`), [`delta::bsdiff`] patches for
//!   binaries and [`delta::lines`] line deltas for text (our own appliers); all streamed and bounded when
//!   decoding.
//! - [`limits`]: bounds on what one message may make a node do.
//! - [`apply::plan`]: whether and how a verified reply may be applied to a scanned tree.
//! - [`registration`]: a recipient's registration facts (bounded, canonically encoded, digested),
//!   [`registration::selector`], the grant selectors over facts and owner tags, and
//!   [`registration::list`], the CSV and TOML lists that bulk enrollment reads.
//!
//! I/O shell:
//! - [`scan`]: reads a tree into a manifest (never follows symlinks); the stat cache that lets a rescan
//!   read only changed files.
//! - [`statcache`]: the stat cache file (one checksummed file in the recipient's state directory,
//!   replaced atomically; a damaged one only costs a full rehash).
//! - [`store`]: the owner's content-addressed store of every kept generation's files.
//! - [`db`]: the state database (SQLite, numbered migrations, typed tables): generations per channel,
//!   recipients, nonces, seen messages, rejections; the owner's channels, groups, grants and
//!   registrations ([`db::Db::channels`]); the recipient's facts per subscription ([`db::Db::sub`] scopes
//!   them to one tree).
//! - [`apply`] (staging, journal, execution; [`apply::staging`] picks a staging place a rename into the tree
//!   works from): the only code that writes into a data tree, and only through
//!   [`apply::tree`] directory handles that never follow a symbolic link.
//! - [`transport`]: the only code that moves mail: [`transport::maildir`] (a spool, carried by hand
//!   between machines) and [`transport::mail`] (SMTP submission with lettre, IMAP with IDLE, rustls).
//! - [`node`]: the shell around the engine. [`node::State`] is a state directory open (its lock and
//!   database); [`node::owner`] and [`node::recipient`] are the two roles on it, each feeding messages
//!   through [`engine`] and performing the effects (the recipient's one `finish` ends every journal:
//!   apply, rollback, recovery); [`node::compose::Node`] holds both roles on one state and routes each
//!   message to its part (a relay); [`node::pack`] chooses how each file travels and writes the pack; the
//!   outbox (in the state database); the signed broadcast (the owner's survey of waiting requests, one
//!   payload and a ticket each; the recipient's tickets and held broadcast parts); [`node::sealing`], a channel's key and its packs encrypted and
//!   decrypted; kept parts on both sides; staleness and admin notices;
//!   [`node::registration`], the facts of the machine a recipient runs on;
//!   [`node::rollback`], the recipient's local return to the generation before (the kept store, the
//!   hold); [`node::grants`], the owner's groups, grants and suspensions; [`node::install`], what
//!   happens around an install (hooks, shipped scripts, a failed hook rolled back, updates kept ready for
//!   `recipient approve` or an apply window), per tree; [`node::run`], the daemon loop (a step at a time
//!   under the state lock, IDLE or polling in between, capped backoff with jitter, an injected shutdown).
//! - [`fleet`]: the owner's version database seen whole: each recipient's state per channel (current,
//!   behind, in flight, silent, failed, held, not entitled, expired, never seen) derived purely from what
//!   its requests and receipts stated, its entitlement and the time; its history; batched, rate-limited
//!   alerts to the admin.
//! - [`console`]: the owner's web console (`owner serve`): axum and maud, a login with CSRF tokens,
//!   read-only pages from short read transactions, the admin's actions ([`console::actions`], shared
//!   with `owner approve`, `owner suspend`, `owner resume`); never the state lock.
//! - [`config`]: config and enrollment files.
//! - [`retry`]: capped exponential backoff with jitter (the daemons' retries, IMAP reconnects).
//! - [`failpoint`]: crash points that tests arm through the environment.
//! - [`progress`]: progress bars, off unless the binary turns them on for a terminal.
//!
//! The binary's `cli` module is the only code that knows about the terminal, clap, signals and exit codes:
//! one file per command, each result a value shown as text or `--json`; its daemons are [`node::run`].
//!
//! # Invariants
//! - Nothing in a message is interpreted before its MAC verifies, except the auth part's recipient name
//!   and key id, which only select the key (and, where the owner's key is pinned, nothing before its
//!   signature verifies too). Headers, subject and text parts are never trusted.
//! - No byte reaches the data tree before every part of the reply is verified and every new file is
//!   staged and checked against its BLAKE3 (delta bases and local copies included).
//! - Replies go only to the address registered for a recipient.
//! - mailferry's own state (database, journal, outbox, keys) never lives inside a data tree.
//! - Anything that depends on a message being sent is committed in the same database transaction that
//!   queues the message, and a message is filed by its transport only after its effects are durable.
//! - The core modules listed above as pure do no I/O; only [`transport`] talks to mail systems. Nothing
//!   under [`engine`] opens a file or a database, reads the clock or draws random bytes.
//! - A refused message changes nothing: refusals carry no effects, and every effect of one step is
//!   applied in one transaction, in the order the engine gives.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod apply;
pub mod config;
pub mod console;
pub mod crypto;
pub mod db;
pub mod delta;
pub mod engine;
pub mod failpoint;
pub mod fleet;
pub mod limits;
pub mod manifest;
pub mod node;
pub mod path;
pub mod progress;
pub mod protocol;
pub mod registration;
pub mod retry;
pub mod scan;
pub mod statcache;
pub mod store;
pub mod transport;
