//! Node configuration files (`owner.toml`, `recipient.toml`) and enrollment files.
//!
//! Files are TOML with kebab-case keys; unknown keys are errors, so a typo never silently falls back to a
//! default. Relative paths are resolved against the directory of the file that names them. Secrets never
//! live in a config file: the recipient's key is in its own file (mode 0600, checked on load), the owner's
//! keys in its state database.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::apply::OnExtra;
use crate::crypto::Key;
use crate::limits::Limits;
use crate::transport::mail::{ImapConfig, MailConfig, SmtpConfig};

/// `humantime` strings ("90s", "15m", "2h") for durations.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration: {e}")))
    }
}

/// Optional `humantime` durations.
mod duration_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration: {e}")))
    }
}

impl RecipientSection {
    /// How long without a fresh reply before the recipient is stale.
    pub fn stale_after(&self) -> Duration {
        self.stale_after.unwrap_or(self.interval * 3)
    }
}

pub use crate::transport::TransportConfig;

/// The `[transport]` table as written.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
enum RawTransport {
    Maildir { root: PathBuf },
    Mail { smtp: Option<Box<SmtpConfig>>, imap: Option<Box<ImapConfig>> },
}

/// The `[owner]` table.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct OwnerSection {
    /// The owner's mail address; recipients send requests here.
    pub address: String,
    /// The authoritative source tree that `publish` snapshots.
    pub source: PathBuf,
    /// State directory (database, content store, outbox). Default: the config file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// How often `run` checks for requests when not in `--once` mode. Default 1m.
    #[serde(with = "duration", default = "default_owner_interval")]
    pub interval: Duration,
    /// zstd level for the content store (1-19). Default 9.
    #[serde(default = "default_level")]
    pub compression_level: i32,
    /// Where to mail a summary of refused messages (at most one an hour). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_address: Option<String>,
    /// Largest message the relays between owner and recipients accept, in bytes, headers and encoding
    /// included. Replies larger than this (or than the SMTP server's `SIZE`, if smaller) travel in
    /// several parts. Default 10,240,000; at least 65,536.
    #[serde(default = "default_relay_limit")]
    pub relay_limit: u64,
    /// How many of the newest generations recipients can be updated from by delta (older ones are pruned
    /// from the state database and content store; a recipient on a pruned generation gets whole files).
    /// Default 16; at least 1.
    #[serde(default = "default_keep_generations")]
    pub keep_generations: u64,
    /// How replies are authenticated: `hmac` (the recipient's shared key) or `hmac+ed25519` (also signed
    /// with the owner's Ed25519 key, which enrollment files then pin). Default `hmac`.
    #[serde(default)]
    pub signing: Signing,
    /// Most replies one recipient is sent per `budget-period` (answers and resends); requests over it are
    /// refused (`limit`). Bounds what a stolen key or a looping recipient can make the owner mail.
    /// Default 200.
    #[serde(default = "default_budget_replies")]
    pub budget_replies: u64,
    /// Most reply bytes one recipient is sent per `budget-period`. Default 4 GiB.
    #[serde(default = "default_budget_bytes")]
    pub budget_bytes: u64,
    /// The period the budget counts over. Default 1d.
    #[serde(with = "duration", default = "default_budget_period")]
    pub budget_period: Duration,
    /// Most bytes (bases plus new versions) that one reply may feed to fresh bsdiff diffs; binaries past
    /// it travel as zstd-prefix streams or frames. Patches already cached do not count. Default
    /// 268,435,456 (256 MiB, about two minutes of one core); 0 turns fresh bsdiff diffs off.
    #[serde(default = "default_bsdiff_request_budget")]
    pub bsdiff_request_budget: u64,
    /// Most bytes of fresh bsdiff diffs for one recipient in a day (UTC), all its replies together: a
    /// recipient choosing new bases for every request costs the owner at most this. Default
    /// 1,073,741,824 (1 GiB).
    #[serde(default = "default_bsdiff_daily_budget")]
    pub bsdiff_daily_budget: u64,
    /// How often recipients are expected to request: written into enrollment files as their interval,
    /// and what `owner fleet` expects of a recipient enrolled without one of its own. Default 1h.
    #[serde(with = "duration", default = "default_recipient_interval")]
    pub recipient_interval: Duration,
    /// A recipient is `silent` in `owner fleet` after this many of its intervals without a request.
    /// Default 3; at least 1.
    #[serde(default = "default_silent_after_intervals")]
    pub silent_after_intervals: u32,
    /// At most one fleet alert mail (recipients turned silent or failed, or recovered) goes to
    /// `admin-address` per this period. Default 1h.
    #[serde(with = "duration", default = "default_alert_interval")]
    pub alert_interval: Duration,
    /// Offer a newly published generation to recipients only once it is approved (`owner approve`, or the
    /// console's button); until then they are answered with the newest approved one. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_approval: bool,
    /// How long a generation beyond `keep-generations` stays answerable by delta: its file list is kept
    /// and its content as deltas against the newest version of each path (`docs/protocol.md` §10.4). A
    /// duration since it was published (`"1y"`, `"90d"`) or a number of old generations per channel.
    /// Past it the generation is forgotten, and a recipient still on it sends its whole inventory and gets
    /// whole files. Default `"1y"`.
    #[serde(default)]
    pub keep_history: KeepHistory,
    /// Where a broadcast (`docs/protocol.md` §7.11) is sent: a list address or MTA alias that expands to
    /// the recipients. Default: none, so each broadcast part is one submission with every recipient that
    /// got a ticket as an envelope recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broadcast_address: Option<String>,
    /// How many requests of one run must need the same update (channel, base tree, generation) before it
    /// is sent once as a broadcast, with a ticket each, instead of a reply each. Needs `signing =
    /// "hmac+ed25519"` and recipients that pinned the owner key. Default 2; at least 1.
    #[serde(default = "default_broadcast_min")]
    pub broadcast_min: usize,
}

pub(crate) fn default_broadcast_min() -> usize {
    2
}

/// `keep-history`: how long old generations stay answerable by delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepHistory {
    /// Old generations published less than this long ago.
    Age(Duration),
    /// The newest this many old generations of each channel.
    Generations(u64),
}

impl Default for KeepHistory {
    fn default() -> Self {
        KeepHistory::Age(Duration::from_secs(31_557_600))
    }
}

impl Serialize for KeepHistory {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            KeepHistory::Age(d) => duration::serialize(d, s),
            KeepHistory::Generations(n) => s.serialize_u64(*n),
        }
    }
}

impl<'de> Deserialize<'de> for KeepHistory {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(KeepHistory::Generations(n)),
            Raw::Text(t) => humantime::parse_duration(&t).map(KeepHistory::Age).map_err(|e| {
                serde::de::Error::custom(format!("{t:?} is neither a duration nor a number of generations: {e}"))
            }),
        }
    }
}

pub(crate) fn default_silent_after_intervals() -> u32 {
    crate::fleet::DEFAULT_SILENT_AFTER_INTERVALS
}

pub(crate) fn default_alert_interval() -> Duration {
    Duration::from_secs(3600)
}

pub(crate) fn default_budget_replies() -> u64 {
    200
}

pub(crate) fn default_budget_bytes() -> u64 {
    4 << 30
}

pub(crate) fn default_budget_period() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// How an owner authenticates its replies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Signing {
    /// HMAC-SHA256 under the recipient's key only.
    #[default]
    #[serde(rename = "hmac")]
    Hmac,
    /// HMAC-SHA256 and the owner's Ed25519 signature.
    #[serde(rename = "hmac+ed25519")]
    HmacEd25519,
}

/// Default `relay-limit`: a little under the common 10 MiB relay limit.
pub const DEFAULT_RELAY_LIMIT: u64 = 10_240_000;
/// Smallest `relay-limit` accepted.
pub const MIN_RELAY_LIMIT: u64 = 65_536;

fn default_relay_limit() -> u64 {
    DEFAULT_RELAY_LIMIT
}
fn default_keep_generations() -> u64 {
    16
}
/// Default `bsdiff-request-budget`.
pub const DEFAULT_BSDIFF_REQUEST_BUDGET: u64 = 256 << 20;
/// Default `bsdiff-daily-budget`.
pub const DEFAULT_BSDIFF_DAILY_BUDGET: u64 = 1 << 30;
fn default_bsdiff_request_budget() -> u64 {
    DEFAULT_BSDIFF_REQUEST_BUDGET
}
fn default_bsdiff_daily_budget() -> u64 {
    DEFAULT_BSDIFF_DAILY_BUDGET
}

fn default_owner_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_level() -> i32 {
    9
}
pub(crate) fn default_recipient_interval() -> Duration {
    Duration::from_secs(3600)
}
fn default_reply_timeout() -> Duration {
    Duration::from_secs(6 * 3600)
}

/// The `[recipient]` table.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RecipientSection {
    /// The name the owner registered this recipient under.
    pub name: String,
    /// This recipient's mail address (replies arrive here).
    pub address: String,
    /// The owner's address (requests go there).
    pub owner_address: String,
    /// The channel `data` keeps. Default `default` (an owner's one tree).
    #[serde(default = "default_channel", skip_serializing_if = "is_default_channel")]
    pub channel: String,
    /// The data tree kept in sync.
    pub data: PathBuf,
    /// State directory. Default: the config file's directory. Must not be inside `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// File holding the 64-hex-digit key (mode 0600).
    pub key_file: PathBuf,
    /// Where new files are staged; must be on the data tree's mount (a rename into the tree is tried).
    /// Default: `STATE/staging` when a rename from there into the tree works, else
    /// `.NAME.mailferry-staging` beside the data tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging_dir: Option<PathBuf>,
    /// How often `run` requests an update. Default 1h.
    #[serde(with = "duration", default = "default_recipient_interval")]
    pub interval: Duration,
    /// How long a request may stay unanswered before it counts as lost. Default 6h.
    #[serde(with = "duration", default = "default_reply_timeout")]
    pub reply_timeout: Duration,
    /// What to do with files the owner does not list. Default `delete`.
    #[serde(default)]
    pub on_extra: OnExtra,
    /// With no fresh, authenticated reply for this long the recipient reports itself stale (an attacker
    /// may be withholding updates). Default: three `interval`s.
    #[serde(default, with = "duration_opt", skip_serializing_if = "Option::is_none")]
    pub stale_after: Option<Duration>,
    /// Where to mail a notice when the recipient becomes stale (once per stale spell), and a summary of
    /// refused messages (at most one an hour). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_address: Option<String>,
    /// The owner's Ed25519 public key (64 hex digits), pinned from the enrollment file: every reply must
    /// carry the owner's signature under it. Default: none (replies are checked by HMAC alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_public_key: Option<String>,
    /// Whether updates are installed as they arrive (`auto`) or wait for the operator (`manual`); also
    /// reported to the owner in the registration facts. Default `auto`.
    #[serde(default, skip_serializing_if = "InstallMode::is_auto")]
    pub install: InstallMode,
    /// Who to contact about this machine (free text, at most 256 bytes), reported to the owner in the
    /// registration facts. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact: Option<String>,
    /// When this machine prefers to be updated (free text, at most 256 bytes, such as "nights, weekends"),
    /// reported to the owner in the registration facts. Default: the request interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_timing: Option<String>,
    /// A command (run with `sh -c`) after an update is verified and staged, before the tree changes; a
    /// non-zero exit vetoes the update (see `node::install`). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_apply: Option<String>,
    /// A command (run with `sh -c`) after an update is in the tree, such as `systemctl reload
    /// clamav-daemon`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_apply: Option<String>,
    /// How long a hook may run before it (its whole process group) is killed and counts as failed.
    /// Default 5m.
    #[serde(default, with = "duration_opt", skip_serializing_if = "Option::is_none")]
    pub hook_timeout: Option<Duration>,
    /// Run the install scripts an update ships in `.mailferry/hooks/` (only when the reply is signed under
    /// `owner-public-key`, and only the exact bytes the signed tree lists). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shipped_hooks: bool,
    /// What a failed `post-apply` hook does: `rollback` (to the generation before, which is then held
    /// back) or `keep`. Default `rollback`.
    #[serde(default, skip_serializing_if = "crate::node::install::OnHookFailure::is_default")]
    pub on_hook_failure: crate::node::install::OnHookFailure,
    /// When verified updates may be installed, in the local time zone: `"Sat 02:00-04:00"`, or a list
    /// (`["Mon-Fri 22:00-23:30", "daily 03:00-04:00"]`). Default: at any time.
    #[serde(default, deserialize_with = "one_or_many", serialize_with = "many", skip_serializing_if = "Vec::is_empty")]
    pub apply_window: Vec<String>,
}

/// A string or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

fn many<S: serde::Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v)
}

/// Whether a recipient installs updates as they arrive or waits for its operator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstallMode {
    /// Installed as soon as a reply is verified.
    #[default]
    Auto,
    /// Kept until the operator approves it.
    Manual,
}

impl InstallMode {
    fn is_auto(&self) -> bool {
        *self == InstallMode::Auto
    }

    /// Whether this is the default (not written into a new config).
    pub fn is_default(&self) -> bool {
        self.is_auto()
    }

    /// The word used in config files and registration facts: `auto` or `manual`.
    pub fn as_str(self) -> &'static str {
        match self {
            InstallMode::Auto => "auto",
            InstallMode::Manual => "manual",
        }
    }
}

impl std::fmt::Display for InstallMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_channel() -> String {
    crate::protocol::DEFAULT_CHANNEL.to_owned()
}

fn is_default_channel(c: &str) -> bool {
    c == crate::protocol::DEFAULT_CHANNEL
}

/// A `[[subscription]]` table: one more channel this recipient keeps, in its own data tree
/// (`mailferry recipient subscribe`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SubscriptionSection {
    /// The channel.
    pub channel: String,
    /// Its data tree. Must not overlap the state directory or another subscription's tree.
    pub data: PathBuf,
    /// Where its new files are staged (as `[recipient] staging-dir`). Default: chosen as for the main tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging_dir: Option<PathBuf>,
    /// What to do with files the owner does not list. Default: as `[recipient] on-extra`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_extra: Option<OnExtra>,
    /// `pre-apply` for this tree (each install key unset is `[recipient]`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_apply: Option<String>,
    /// `post-apply` for this tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_apply: Option<String>,
    /// `hook-timeout` for this tree.
    #[serde(default, with = "duration_opt", skip_serializing_if = "Option::is_none")]
    pub hook_timeout: Option<Duration>,
    /// `shipped-hooks` for this tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipped_hooks: Option<bool>,
    /// `on-hook-failure` for this tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_hook_failure: Option<crate::node::install::OnHookFailure>,
    /// `install` for this tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install: Option<InstallMode>,
    /// `apply-window` for this tree.
    #[serde(default, deserialize_with = "opt_one_or_many", skip_serializing_if = "Option::is_none")]
    pub apply_window: Option<Vec<String>>,
}

/// A `[[subscription]]`'s own install keys (`pre-apply`, `post-apply`, `hook-timeout`, `shipped-hooks`,
/// `on-hook-failure`, `install`, `apply-window`): each one set replaces `[recipient]`'s for that tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstallOverrides {
    /// `pre-apply`.
    pub pre_apply: Option<String>,
    /// `post-apply`.
    pub post_apply: Option<String>,
    /// `hook-timeout`.
    pub hook_timeout: Option<Duration>,
    /// `shipped-hooks`.
    pub shipped_hooks: Option<bool>,
    /// `on-hook-failure`.
    pub on_hook_failure: Option<crate::node::install::OnHookFailure>,
    /// `install`.
    pub install: Option<InstallMode>,
    /// `apply-window`.
    pub apply_window: Option<Vec<String>>,
}

fn opt_one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    one_or_many(d).map(Some)
}

/// One data tree a recipient keeps, resolved: its channel, its tree, and where its own state lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// The channel.
    pub channel: String,
    /// The data tree.
    pub data: PathBuf,
    /// Its `staging-dir`, if set.
    pub staging_dir: Option<PathBuf>,
    /// What to do with files the owner does not list.
    pub on_extra: OnExtra,
    /// Where this tree's journal, stat cache, kept parts and rollback store live: the state directory for
    /// the main tree, `STATE/channels/CHANNEL` for the others.
    pub dir: PathBuf,
    /// Its own install keys (none for the main tree: `[recipient]`'s are its own).
    pub install: InstallOverrides,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawFile {
    owner: Option<OwnerSection>,
    recipient: Option<RecipientSection>,
    #[serde(default)]
    subscription: Vec<SubscriptionSection>,
    transport: RawTransport,
    smtp: Option<SmtpConfig>,
    imap: Option<ImapConfig>,
    #[serde(default)]
    limits: Limits,
}

/// A loaded owner configuration, paths resolved.
#[derive(Clone, Debug)]
pub struct OwnerConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// The `[owner]` table.
    pub owner: OwnerSection,
    /// The `[transport]` table.
    pub transport: TransportConfig,
    /// The `[limits]` table.
    pub limits: Limits,
    /// Resolved state directory.
    pub state_dir: PathBuf,
}

/// A loaded recipient configuration, paths resolved.
#[derive(Clone, Debug)]
pub struct RecipientConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// The `[recipient]` table.
    pub recipient: RecipientSection,
    /// The `[transport]` table.
    pub transport: TransportConfig,
    /// The `[limits]` table.
    pub limits: Limits,
    /// Resolved state directory.
    pub state_dir: PathBuf,
    /// Every data tree it keeps: the `[recipient]` one first, then each `[[subscription]]`.
    pub subscriptions: Vec<Subscription>,
}

impl RecipientConfig {
    /// The subscription of `channel`, if this recipient keeps it.
    pub fn subscription(&self, channel: &str) -> Option<&Subscription> {
        self.subscriptions.iter().find(|s| s.channel == channel)
    }

    /// The `[recipient]` table's subscription.
    pub fn main(&self) -> &Subscription {
        &self.subscriptions[0]
    }
}

/// Either role's configuration.
// Loaded once per command and moved, never kept in bulk: boxing a variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum NodeConfig {
    /// An owner.
    Owner(OwnerConfig),
    /// A recipient.
    Recipient(RecipientConfig),
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

/// Builds the transport settings from the `[transport]`, `[smtp]` and `[imap]` tables, resolves relative
/// paths (`root`, `password-file`, `ca-file`) against `base`, and checks the mail settings.
fn resolve_transport(
    base: &Path,
    t: RawTransport,
    smtp: Option<SmtpConfig>,
    imap: Option<ImapConfig>,
) -> Result<TransportConfig> {
    match t {
        RawTransport::Maildir { root } => {
            if smtp.is_some() || imap.is_some() {
                bail!("[smtp] and [imap] are only used with [transport] kind = \"mail\", not \"maildir\"");
            }
            Ok(TransportConfig::Maildir { root: resolve(base, &root) })
        }
        RawTransport::Mail { smtp: nested_smtp, imap: nested_imap } => {
            fn pick<T>(top: Option<T>, nested: Option<T>, name: &str) -> Result<T> {
                match (top, nested) {
                    (Some(t), None) | (None, Some(t)) => Ok(t),
                    (Some(_), Some(_)) => {
                        bail!(
                            "both [{name}] and [transport.{name}] are set; keep one of them (the README uses [{name}])"
                        )
                    }
                    (None, None) => bail!("[transport] kind = \"mail\" needs an [{name}] table"),
                }
            }
            let mut mail = MailConfig {
                smtp: pick(smtp, nested_smtp.map(|b| *b), "smtp")?,
                imap: pick(imap, nested_imap.map(|b| *b), "imap")?,
            };
            mail.resolve_paths(base);
            mail.validate()?;
            Ok(TransportConfig::Mail(Box::new(mail)))
        }
    }
}

impl NodeConfig {
    /// Reads and checks a config file of either role.
    ///
    /// # Errors
    /// A missing or unreadable file, invalid TOML, unknown keys, both or neither role, or a recipient state
    /// directory inside its data tree.
    pub fn load(path: &Path) -> Result<NodeConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::format_err!("config file `{}` does not exist", path.display())
            } else {
                anyhow::Error::new(e).context(format!("failed to read config file `{}`", path.display()))
            }
        })?;
        let raw: RawFile =
            toml::from_str(&text).with_context(|| format!("config file `{}` is invalid", path.display()))?;
        let path = std::path::absolute(path)?;
        let base = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let transport = resolve_transport(&base, raw.transport, raw.smtp, raw.imap)
            .with_context(|| format!("config file `{}` is invalid", path.display()))?;
        if raw.recipient.is_none() && !raw.subscription.is_empty() {
            bail!("config file `{}`: [[subscription]] belongs to a recipient's config", path.display());
        }
        match (raw.owner, raw.recipient) {
            (Some(mut owner), None) => {
                owner.source = resolve(&base, &owner.source);
                let state_dir = owner.state_dir.as_deref().map_or_else(|| base.clone(), |s| resolve(&base, s));
                crate::transport::maildir::check_address(&owner.address).map_err(anyhow::Error::msg)?;
                if let Some(list) = &owner.broadcast_address {
                    crate::transport::maildir::check_address(list)
                        .map_err(|e| anyhow::format_err!("config file `{}`: broadcast-address: {e}", path.display()))?;
                }
                if owner.broadcast_min == 0 {
                    bail!("config file `{}`: broadcast-min must be at least 1", path.display());
                }
                if owner.relay_limit < MIN_RELAY_LIMIT {
                    bail!(
                        "config file `{}`: relay-limit = {} is below the smallest usable {MIN_RELAY_LIMIT}",
                        path.display(),
                        owner.relay_limit
                    );
                }
                if owner.keep_generations == 0 {
                    bail!("config file `{}`: keep-generations must be at least 1", path.display());
                }
                if owner.silent_after_intervals == 0 || owner.recipient_interval.is_zero() {
                    bail!(
                        "config file `{}`: silent-after-intervals and recipient-interval must be at least 1",
                        path.display()
                    );
                }
                Ok(NodeConfig::Owner(OwnerConfig { path, owner, transport, limits: raw.limits, state_dir }))
            }
            (None, Some(mut recipient)) => {
                recipient.data = resolve(&base, &recipient.data);
                recipient.key_file = resolve(&base, &recipient.key_file);
                recipient.staging_dir = recipient.staging_dir.as_deref().map(|s| resolve(&base, s));
                let state_dir = recipient.state_dir.as_deref().map_or_else(|| base.clone(), |s| resolve(&base, s));
                check_state_outside_data(&state_dir, &recipient.data)?;
                for (key, value) in [("contact", &recipient.contact), ("update-timing", &recipient.update_timing)] {
                    if let Some(v) = value {
                        crate::registration::check_fact(v)
                            .map_err(|e| anyhow::format_err!("config file `{}`: {key}: {e}", path.display()))?;
                    }
                }
                if let Some(k) = &recipient.owner_public_key {
                    crate::crypto::PublicKey::from_hex(k)
                        .with_context(|| format!("config file `{}`: owner-public-key", path.display()))?;
                }
                let subscriptions = resolve_subscriptions(&path, &base, &recipient, raw.subscription, &state_dir)?;
                for t in &subscriptions {
                    crate::node::install::InstallPolicy::for_tree(&recipient, &t.install).with_context(|| {
                        format!("config file `{}` is invalid (channel {:?})", path.display(), t.channel)
                    })?;
                }
                Ok(NodeConfig::Recipient(RecipientConfig {
                    path,
                    recipient,
                    transport,
                    limits: raw.limits,
                    state_dir,
                    subscriptions,
                }))
            }
            (Some(_), Some(_)) => bail!("config file `{}` has both [owner] and [recipient]", path.display()),
            (None, None) => bail!("config file `{}` has neither [owner] nor [recipient]", path.display()),
        }
    }
}

/// The recipient's data trees, checked: valid channel names, each channel once, no tree overlapping
/// another or the state directory.
fn resolve_subscriptions(
    path: &Path,
    base: &Path,
    r: &RecipientSection,
    extra: Vec<SubscriptionSection>,
    state_dir: &Path,
) -> Result<Vec<Subscription>> {
    let main = Subscription {
        channel: r.channel.clone(),
        data: r.data.clone(),
        staging_dir: r.staging_dir.clone(),
        on_extra: r.on_extra,
        dir: state_dir.to_path_buf(),
        install: InstallOverrides::default(),
    };
    let mut all = vec![main];
    for s in extra {
        all.push(Subscription {
            dir: state_dir.join("channels").join(&s.channel),
            channel: s.channel,
            data: resolve(base, &s.data),
            staging_dir: s.staging_dir.as_deref().map(|p| resolve(base, p)),
            on_extra: s.on_extra.unwrap_or(r.on_extra),
            install: InstallOverrides {
                pre_apply: s.pre_apply,
                post_apply: s.post_apply,
                hook_timeout: s.hook_timeout,
                shipped_hooks: s.shipped_hooks,
                on_hook_failure: s.on_hook_failure,
                install: s.install,
                apply_window: s.apply_window,
            },
        });
    }
    for (i, s) in all.iter().enumerate() {
        if !crate::protocol::valid_channel_name(&s.channel) {
            bail!("config file `{}`: channel name {:?} is not valid", path.display(), s.channel);
        }
        check_state_outside_data(state_dir, &s.data)?;
        for t in &all[..i] {
            if t.channel == s.channel {
                bail!("config file `{}`: channel {:?} is subscribed twice", path.display(), s.channel);
            }
            if let Some((a, b)) = overlap(&t.data, &s.data) {
                bail!(
                    "config file `{}`: data trees `{}` and `{}` overlap: each channel needs its own tree",
                    path.display(),
                    a.display(),
                    b.display()
                );
            }
        }
    }
    Ok(all)
}

/// Refuses a state directory inside the data tree (or the data tree inside the state directory): the
/// recipient's own state must never be synced, deleted or overwritten by an apply.
///
/// # Errors
/// When they overlap.
pub fn check_state_outside_data(state_dir: &Path, data: &Path) -> Result<()> {
    if let Some((s, d)) = overlap(state_dir, data) {
        bail!(
            "state directory `{}` and data tree `{}` overlap: mailferry's state must live outside the data tree",
            s.display(),
            d.display()
        );
    }
    Ok(())
}

/// Refuses an owner whose state directory and source tree overlap, in either direction: `publish` would
/// snapshot `state.db`, which holds every recipient's key, into the generation every recipient receives,
/// and any of them could then forge updates for all the others. Symbolic links in either path are
/// resolved first; what a path check cannot see (hard links, bind mounts) the publish scan refuses by
/// device and inode ([`crate::scan::Exclude`]).
///
/// # Errors
/// When they overlap.
pub fn check_state_outside_source(state_dir: &Path, source: &Path) -> Result<()> {
    if let Some((s, d)) = overlap(state_dir, source) {
        bail!(
            "the owner's state directory `{}` and source tree `{}` overlap: publishing would send the owner's \
             state (every recipient's key) to every recipient; keep the state directory (`--dir`, or \
             `state-dir` in [owner]) outside the source tree, and the source tree outside it",
            s.display(),
            d.display()
        );
    }
    Ok(())
}

/// The two paths, resolved, when one is inside the other (or they are the same directory).
pub(crate) fn overlap(a: &Path, b: &Path) -> Option<(PathBuf, PathBuf)> {
    let (a, b) = (resolved(a), resolved(b));
    (a.starts_with(&b) || b.starts_with(&a)).then_some((a, b))
}

/// `p` with every symbolic link resolved, as far as it exists: the longest existing ancestor is
/// canonicalized and the rest appended, so a directory not made yet still compares with real paths.
fn resolved(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut rest = Vec::new();
    let mut at = abs.as_path();
    loop {
        if let Ok(c) = std::fs::canonicalize(at) {
            return rest.iter().rev().fold(c, |acc: PathBuf, name| acc.join(name));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                at = parent;
            }
            _ => return abs,
        }
    }
}

/// Reads a key file, refusing one that group or others can read.
///
/// # Errors
/// A missing, unreadable, too-open or malformed key file.
pub fn read_key_file(path: &Path) -> Result<Key> {
    ensure_private(path)?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("failed to read key file `{}`", path.display()))?;
    Key::from_hex(&text).with_context(|| format!("key file `{}` is invalid", path.display()))
}

/// Writes `contents` to `path` with mode 0600, creating it exclusively (never overwriting a secret).
///
/// # Errors
/// An existing file or I/O errors.
pub fn write_secret(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("failed to create `{}`", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// What a recipient needs to join an owner, written by `owner add-recipient`. Contains the key: keep it
/// secret and carry it by a trusted path.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Enrollment {
    /// Enrollment format version (1).
    pub mailferry_enrollment: u32,
    /// The owner's address.
    pub owner_address: String,
    /// The recipient's registered name.
    pub name: String,
    /// The recipient's registered address: the only address replies go to.
    pub address: String,
    /// The recipient's key, 64 hex digits.
    pub key: String,
    /// The key's public id.
    pub key_id: crate::crypto::KeyId,
    /// The owner's Ed25519 public key, when it signs replies (`signing = "hmac+ed25519"`): the recipient
    /// pins it and refuses replies without the owner's signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_public_key: Option<String>,
    /// How the owner expects to exchange mail.
    pub transport: TransportHint,
}

/// Transport hints in an enrollment file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TransportHint {
    /// `maildir` or `mail`.
    pub kind: String,
    /// Suggested request interval.
    pub interval: String,
}

impl Enrollment {
    /// Reads an enrollment file, refusing one that others can read.
    ///
    /// # Errors
    /// A missing, too-open or invalid file.
    pub fn load(path: &Path) -> Result<Enrollment> {
        ensure_private(path)?;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read enrollment file `{}`", path.display()))?;
        let e: Enrollment =
            toml::from_str(&text).with_context(|| format!("enrollment file `{}` is invalid", path.display()))?;
        if e.mailferry_enrollment != 1 {
            bail!("enrollment file `{}` has version {}, this build reads 1", path.display(), e.mailferry_enrollment);
        }
        Ok(e)
    }
}

/// Refuses a file holding a key that group or others can read.
fn ensure_private(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("failed to read `{}`", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "`{}` holds a key but is readable by others (mode {mode:o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These adapters stay hand-written: `humantime-serde` accepts the same syntax (it calls the same
    /// `humantime::parse_duration`) but says only "invalid value: string \"10\", expected a duration",
    /// dropping humantime's reason.
    #[test]
    fn durations_say_what_is_wrong_with_them() {
        #[derive(Debug, Deserialize)]
        struct T {
            #[serde(with = "duration")]
            d: Duration,
            #[serde(default, with = "duration_opt")]
            o: Option<Duration>,
        }
        let t: T = toml::from_str("d = \"1h 30m\"\no = \"90s\"").unwrap();
        assert_eq!((t.d, t.o), (Duration::from_secs(5400), Some(Duration::from_secs(90))));
        for (text, want) in [
            ("d = \"10\"", "\"10\" is not a duration: time unit needed, for example 10sec or 10ms"),
            (
                "d = \"1h\"\no = \"5 fortnights\"",
                "\"5 fortnights\" is not a duration: unknown time unit \"fortnights\"",
            ),
        ] {
            let err = toml::from_str::<T>(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn loads_both_roles_and_refuses_typos() {
        let dir = tempfile::tempdir().unwrap();
        let owner = dir.path().join("owner.toml");
        std::fs::write(
            &owner,
            "[owner]\naddress = \"o@x\"\nsource = \"src\"\ninterval = \"90s\"\n[transport]\nkind = \"maildir\"\nroot = \"spool\"\n",
        )
        .unwrap();
        let NodeConfig::Owner(o) = NodeConfig::load(&owner).unwrap() else { panic!("owner expected") };
        assert_eq!(o.owner.interval, Duration::from_secs(90));
        assert_eq!(o.owner.source, dir.path().join("src"));
        assert_eq!(o.transport, TransportConfig::Maildir { root: dir.path().join("spool") });
        assert_eq!(o.limits, Limits::default());

        std::fs::write(&owner, "[owner]\naddress = \"o@x\"\nsource = \"s\"\nintervall = \"1m\"\n[transport]\nkind = \"maildir\"\nroot = \"s\"\n").unwrap();
        let err = format!("{:#}", NodeConfig::load(&owner).unwrap_err());
        assert!(err.contains("intervall"), "{err}");
        std::fs::write(&owner, "[owner]\naddress = \"o@x\"\nsource = \"s\"\n[transport]\nkind = \"carrier-pigeon\"\n")
            .unwrap();
        assert!(NodeConfig::load(&owner).is_err());
        assert!(
            format!("{:#}", NodeConfig::load(&dir.path().join("nope.toml")).unwrap_err()).contains("does not exist")
        );
    }

    #[test]
    fn mail_transport_tables_resolve_paths_and_refuse_mixups() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("owner.toml");
        let owner = "[owner]\naddress = \"o@example.org\"\nsource = \"src\"\n";
        let smtp =
            "host = \"mail.example.org\"\nusername = \"o@example.org\"\npassword-file = \"pw\"\nca-file = \"ca.pem\"\n";
        let imap = "host = \"mail.example.org\"\nsecurity = \"tls\"\nusername = \"o@example.org\"\npassword-command = \"cat pw\"\npoll-interval = \"5m\"\n";
        let load = |text: String| {
            std::fs::write(&cfg, text).unwrap();
            NodeConfig::load(&cfg)
        };

        // The layout: top-level [smtp] and [imap].
        let top = format!("{owner}[transport]\nkind = \"mail\"\n[smtp]\n{smtp}[imap]\n{imap}");
        let NodeConfig::Owner(o) = load(top.clone()).unwrap() else { panic!("owner expected") };
        let TransportConfig::Mail(mail) = &o.transport else { panic!("mail expected: {:?}", o.transport) };
        assert_eq!(mail.smtp.password_file.as_deref(), Some(dir.path().join("pw").as_path()));
        assert_eq!(mail.smtp.ca_file.as_deref(), Some(dir.path().join("ca.pem").as_path()));
        assert_eq!(mail.imap.poll_interval, Duration::from_secs(300));
        assert_eq!((mail.imap.inbox.as_str(), mail.imap.processed.as_str()), ("INBOX", "mailferry/processed"));

        // Nested tables are the same settings.
        let nested = format!("{owner}[transport]\nkind = \"mail\"\n[transport.smtp]\n{smtp}[transport.imap]\n{imap}");
        let NodeConfig::Owner(n) = load(nested).unwrap() else { panic!("owner expected") };
        assert_eq!(n.transport, o.transport);

        let cases: Vec<(String, &str)> = vec![
            (format!("{owner}[transport]\nkind = \"mail\"\n[smtp]\n{smtp}"), "needs an [imap] table"),
            (format!("{top}[transport.imap]\n{imap}"), "both [imap] and [transport.imap]"),
            (format!("{owner}[transport]\nkind = \"maildir\"\nroot = \"s\"\n[smtp]\n{smtp}"), "only used with"),
            (top.replace("password-file = \"pw\"", "password = \"hunter2\""), "unknown field `password`"),
            (top.replace("security = \"tls\"", "security = \"none\""), "invalid [imap] setting"),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", load(text.clone()).unwrap_err());
            assert!(err.contains(want), "{want:?} not in {err:?}\n{text}");
        }
    }

    #[test]
    fn recipient_state_must_not_be_inside_data() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("data/r.toml");
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(
            &cfg,
            "[recipient]\nname = \"r\"\naddress = \"r@x\"\nowner-address = \"o@x\"\ndata = \".\"\nkey-file = \"k\"\n[transport]\nkind = \"maildir\"\nroot = \"/tmp/s\"\n",
        )
        .unwrap();
        assert!(format!("{:#}", NodeConfig::load(&cfg).unwrap_err()).contains("overlap"));
    }

    #[test]
    fn owner_state_and_source_must_not_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let (src, state) = (dir.path().join("src"), dir.path().join("state"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::os::unix::fs::symlink(&src, dir.path().join("via-link")).unwrap();
        let refused = [
            (src.clone(), src.clone()),
            (src.join("owner"), src.clone()),
            (src.join("not/made/yet"), src.clone()),
            (state.clone(), state.join("tree")),
            (dir.path().join("via-link/owner"), src.clone()),
            (state.clone(), dir.path().to_path_buf()),
        ];
        for (s, d) in refused {
            let err = format!("{:#}", check_state_outside_source(&s, &d).unwrap_err());
            assert!(err.contains("overlap") && err.contains("outside the source tree"), "{err}");
        }
        check_state_outside_source(&state, &src).unwrap();
        check_state_outside_source(&dir.path().join("src2"), &src).unwrap();
    }

    #[test]
    fn key_files_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        write_secret(&k, &Key::generate().to_hex()).unwrap();
        read_key_file(&k).unwrap();
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(format!("{:#}", read_key_file(&k).unwrap_err()).contains("readable by others"));
        assert!(write_secret(&k, "again").is_err(), "secrets are never overwritten");
    }
}
