//! Limits that bound what a single message may make a node do, checked before the work is done.
//!
//! Each limit stops an endless-data or decompression-bomb attack: the message size is checked before
//! parsing, counts and declared sizes before anything is decompressed, and every decompressed stream is cut
//! off at the size its authenticated control part declared.

use serde::{Deserialize, Serialize};

/// Resource limits. Every field has a documented default; `[limits]` in a node's config overrides them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Limits {
    /// Largest raw message accepted, headers and encoding included. Default 256 MiB.
    pub max_message_bytes: u64,
    /// Most parts one reply may have. Default 1024.
    pub max_parts: usize,
    /// Most operations one reply may carry. Default 1,000,000.
    pub max_files_per_reply: usize,
    /// Largest single file a reply may write. Default 16 GiB.
    pub max_file_bytes: u64,
    /// Most bytes one reply may unpack to in total. Default 64 GiB.
    pub max_reply_bytes: u64,
    /// Most entries a request's inventory may list. Default 2,000,000.
    pub max_inventory_entries: usize,
    /// Largest reply body (the operation list, uncompressed). Default 1 GiB.
    pub max_body_bytes: u64,
    /// Largest window a delta stream may need (its prefix plus its output), which is what decoding it
    /// holds in memory. Default 1 GiB.
    pub max_delta_window: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_message_bytes: 256 << 20,
            max_parts: 1024,
            max_files_per_reply: 1_000_000,
            max_file_bytes: 16 << 30,
            max_reply_bytes: 64 << 30,
            max_inventory_entries: 2_000_000,
            max_body_bytes: 1 << 30,
            max_delta_window: 1 << 30,
        }
    }
}
