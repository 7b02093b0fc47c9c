//! Command-line interface: parsing, dispatch, human and JSON output, exit codes.
//!
//! Data and `--json` go to stdout; narration, warnings and logs go to stderr. Exit codes: 0 success,
//! 1 `status` found something that needs attention, 2 error.

mod demo;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use mailferry::config::{NodeConfig, OwnerConfig, RecipientConfig};
use mailferry::db::{Db, Rejection};
use mailferry::node::owner::{self, Owner};
use mailferry::node::recipient::{self, Recipient};
use mailferry::node::rollback;
use mailferry::node::{self, Node as _, Outbox, RunReport};
use mailferry::transport::AnyTransport;
use tracing::{info, warn};

/// Typed exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything is fine.
    Success,
    /// `status`: the node needs attention (interrupted apply, failed outgoing mail, a rollback hold).
    Attention,
    /// An error was reported.
    Error,
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> std::process::ExitCode {
        std::process::ExitCode::from(match e {
            Exit::Success => 0,
            Exit::Attention => 1,
            Exit::Error => 2,
        })
    }
}

/// Store-and-forward file-tree updates whose only transport is email.
#[derive(Debug, Parser)]
#[command(name = "mailferry", version, about, propagate_version = true)]
pub struct Cli {
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Commands of the node that publishes the authoritative tree.
    #[command(subcommand)]
    Owner(OwnerCommand),
    /// Commands of a node that keeps a data tree in sync with an owner.
    #[command(subcommand)]
    Recipient(RecipientCommand),
    /// Show a node's generation, tree root, last request and reply, and refusals.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Hand messages to a node from files or stdin (an MTA pipe, a USB stick).
    Deliver {
        #[command(flatten)]
        config: ConfigArg,
        /// Message files; stdin when none.
        #[arg(value_name = "EML")]
        files: Vec<PathBuf>,
    },
    /// List refused messages with their reasons.
    Log {
        #[command(flatten)]
        config: ConfigArg,
        /// Refused messages (the only log kept so far).
        #[arg(long)]
        rejected: bool,
        /// One JSON object per line on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run the whole story in a temporary directory: publish, sync, change, sync, tamper.
    Demo {
        /// Keep the demo's files in this directory instead of a temporary one.
        #[arg(long, value_name = "DIR")]
        keep: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct ConfigArg {
    /// The node's config file (owner.toml or recipient.toml).
    #[arg(long, value_name = "FILE", env = "MAILFERRY_CONFIG")]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum OwnerCommand {
    /// Create an owner: DIR/owner.toml, its state database and content store.
    Init {
        /// Directory for the config and state.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The authoritative source tree.
        #[arg(long, value_name = "TREE")]
        source: PathBuf,
        /// The owner's mail address.
        #[arg(long, value_name = "ADDR")]
        address: String,
        /// Maildir spool root.
        #[arg(long, value_name = "SPOOL")]
        transport_root: PathBuf,
    },
    /// Register a recipient with a fresh key and write its enrollment file (mode 0600).
    AddRecipient {
        #[command(flatten)]
        config: ConfigArg,
        /// The recipient's name.
        #[arg(long)]
        name: String,
        /// The recipient's mail address: the only address replies go to.
        #[arg(long, value_name = "ADDR")]
        address: String,
        /// Where to write the enrollment file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Unregister a recipient; its key stops verifying at once.
    RemoveRecipient {
        #[command(flatten)]
        config: ConfigArg,
        /// The recipient's name.
        #[arg(long)]
        name: String,
    },
    /// Give a recipient a new key, delivered with its next reply sealed under the current key; the current
    /// key stays valid until the recipient uses the new one, and for the grace period after.
    RotateKey {
        #[command(flatten)]
        config: ConfigArg,
        /// The recipient's name.
        #[arg(long)]
        name: String,
        /// How long the old key stays valid once the new one is in use (messages already on their way).
        #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
    },
    /// Snapshot the source tree into the next immutable generation.
    Publish {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Answer requests: once with --once, else until SIGINT/SIGTERM.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Answer every pending request, then exit.
        #[arg(long)]
        once: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RecipientCommand {
    /// Create a recipient from an enrollment file: DIR/recipient.toml and DIR/recipient.key.
    Init {
        /// Directory for the config and state (outside the data tree).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The data tree to keep in sync.
        #[arg(long, value_name = "TREE")]
        data: PathBuf,
        /// The enrollment file from `owner add-recipient`.
        #[arg(long, value_name = "FILE")]
        enrollment: PathBuf,
        /// Maildir spool root.
        #[arg(long, value_name = "SPOOL")]
        transport_root: PathBuf,
    },
    /// Apply replies and request updates: once with --once, else until SIGINT/SIGTERM.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Apply waiting replies, request if nothing is outstanding, then exit.
        #[arg(long)]
        once: bool,
        /// Only apply; send no request.
        #[arg(long)]
        no_request: bool,
    },
    /// Return the data tree to the generation applied before the current one, from files kept locally,
    /// and hold the current one back until a newer generation arrives or --release.
    ///
    /// One level: the generation before is kept after each update to a newer generation, and a rollback
    /// uses it up. Refused when nothing is kept, while an apply is interrupted, or when the tree has
    /// changed since the current generation was applied.
    Rollback {
        #[command(flatten)]
        config: ConfigArg,
        /// Only end the hold of an earlier rollback: the held generation may be applied again.
        #[arg(long)]
        release: bool,
    },
}

/// Parses the command line.
pub fn parse() -> Cli {
    Cli::parse()
}

/// Sends logs to stderr; `MAILFERRY_LOG` (tracing filter syntax) overrides -v/-q.
pub fn init_logging(cli: &Cli) {
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let default = if matches!(cli.command, Command::Demo { .. }) && cli.verbose == 0 { "warn" } else { default };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAILFERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("mailferry={default},warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Progress bars only for a person watching a terminal, and not in quiet mode.
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) && !cli.quiet {
        mailferry::progress::enable();
    }
}

/// Runs the parsed command.
///
/// # Errors
/// Whatever the command reports; `main` prints it and exits 2.
pub fn run(cli: Cli) -> Result<Exit> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> Result<Exit> {
    match command {
        Command::Owner(c) => owner_command(c).await,
        Command::Recipient(c) => recipient_command(c).await,
        Command::Status { config, json } => status(&config.config, json),
        Command::Deliver { config, files } => deliver(&config.config, &files).await,
        Command::Log { config, rejected: _, json } => log(&config.config, json),
        Command::Demo { keep } => demo::run(keep.as_deref()).await,
    }
}

fn load_owner(path: &Path) -> Result<Owner> {
    match NodeConfig::load(path)? {
        NodeConfig::Owner(cfg) => Owner::open(cfg),
        NodeConfig::Recipient(_) => {
            bail!("`{}` is a recipient's config; this command needs the owner's", path.display())
        }
    }
}

async fn owner_command(c: OwnerCommand) -> Result<Exit> {
    match c {
        OwnerCommand::Init { dir, source, address, transport_root } => {
            let path = owner::init(&dir, &source, &address, &transport_root)?;
            eprintln!("created owner `{}` for {address}", path.display());
            eprintln!(
                "next: mailferry owner add-recipient --config {} --name NAME --address ADDR --out FILE",
                path.display()
            );
        }
        OwnerCommand::AddRecipient { config, name, address, out } => {
            let mut o = load_owner(&config.config)?;
            let e = o.add_recipient(&name, &address, &out)?;
            eprintln!("registered recipient {name:?} at {address} (key id {})", e.key_id);
            eprintln!(
                "wrote enrollment file `{}` (mode 600): it holds the key, carry it by a trusted path",
                out.display()
            );
        }
        OwnerCommand::RemoveRecipient { config, name } => {
            load_owner(&config.config)?.remove_recipient(&name)?;
            eprintln!("removed recipient {name:?}; its requests are refused from now on");
        }
        OwnerCommand::RotateKey { config, name, grace } => {
            let id = load_owner(&config.config)?.rotate_key(&name, grace)?;
            eprintln!(
                "rotating the key of {name:?} to key id {id}: it travels with the next reply, sealed under the \
                 current key; the current key stays valid until {name:?} uses the new one, then for {} more",
                humantime::format_duration(grace)
            );
        }
        OwnerCommand::Publish { config } => {
            let mut o = load_owner(&config.config)?;
            let p = o.publish()?;
            if p.new {
                println!("generation {} root {} ({} files, {} bytes)", p.generation, p.root, p.files, p.bytes);
            } else {
                println!(
                    "generation {} root {} (unchanged: source equals the latest generation)",
                    p.generation, p.root
                );
            }
        }
        OwnerCommand::Run { config, once } => {
            let NodeConfig::Owner(cfg) = NodeConfig::load(&config.config)? else {
                bail!("`{}` is a recipient's config; this command needs the owner's", config.config.display());
            };
            let mut t = AnyTransport::open(&cfg.transport, &cfg.owner.address)?;
            if once {
                let mut o = Owner::open(cfg)?;
                let res = o.run_once(&mut t).await;
                note_step(o.db(), &t, &res)?;
                let c = &o.config().owner;
                admin_summary(o.db(), &mut t, &c.address, c.admin_address.as_deref(), &format!("owner {}", c.address))
                    .await?;
                t.close().await;
                summary("owner", &res?);
            } else {
                owner_daemon(&cfg, &mut t).await?;
            }
        }
    }
    Ok(Exit::Success)
}

async fn recipient_command(c: RecipientCommand) -> Result<Exit> {
    match c {
        RecipientCommand::Init { dir, data, enrollment, transport_root } => {
            let path = recipient::init(&dir, &data, &enrollment, &transport_root)?;
            eprintln!("created recipient `{}` for data tree `{}`", path.display(), data.display());
            eprintln!("next: mailferry recipient run --config {} --once", path.display());
        }
        RecipientCommand::Run { config, once, no_request } => {
            let NodeConfig::Recipient(cfg) = NodeConfig::load(&config.config)? else {
                bail!("`{}` is an owner's config; this command needs a recipient's", config.config.display());
            };
            let mut t = AnyTransport::open(&cfg.transport, &cfg.recipient.address)?;
            if once {
                let mut r = Recipient::open(cfg)?;
                let res = r.run_once(&mut t, !no_request).await;
                note_step(r.db(), &t, &res)?;
                let c = &r.config().recipient;
                admin_summary(r.db(), &mut t, &c.address, c.admin_address.as_deref(), &format!("recipient {}", c.name))
                    .await?;
                if res.is_ok() && recipient::notice_staleness(r.db(), r.config())? {
                    // Send the admin notice, if one was queued, now rather than on the next run.
                    Outbox::flush(r.db(), &mut t).await?;
                }
                t.close().await;
                summary("recipient", &res?);
            } else {
                recipient_daemon(&cfg, &mut t, no_request).await?;
            }
        }
        RecipientCommand::Rollback { config, release } => {
            let NodeConfig::Recipient(cfg) = NodeConfig::load(&config.config)? else {
                bail!("`{}` is an owner's config; this command needs a recipient's", config.config.display());
            };
            let r = Recipient::open_as_is(cfg)?;
            if release {
                match rollback::release(r.db())? {
                    Some(g) => eprintln!("released the hold: generation {g} may be applied again by the next sync"),
                    None => eprintln!("no rollback hold to release"),
                }
            } else {
                let done = rollback::rollback(&r)?;
                eprintln!(
                    "{} generation {} to generation {} ({} changes); generation {} is held back",
                    if done.resumed { "finished rolling back" } else { "rolled back" },
                    done.from,
                    done.to,
                    done.ops,
                    done.from
                );
                eprintln!(
                    "a newer generation ends the hold; so does: mailferry recipient rollback --release --config {}",
                    config.config.display()
                );
            }
        }
    }
    Ok(Exit::Success)
}

/// If the node has an admin address, mails it a summary of newly refused messages (at most one an hour),
/// sending it at once.
async fn admin_summary(db: &Db, t: &mut AnyTransport, from: &str, admin: Option<&str>, node: &str) -> Result<()> {
    if let Some(admin) = admin
        && node::summarize_rejections(db, from, admin, node)?
    {
        Outbox::flush(db, t).await?;
    }
    Ok(())
}

/// Records what a step left behind for `status` (the last error, or that all went well; how new mail is
/// noticed). Returns true when the step needs a retry soon: it failed, or mail is still queued because
/// the server could not take it.
fn note_step(db: &Db, t: &AnyTransport, res: &Result<RunReport>) -> Result<bool> {
    if let Some(mode) = t.receive_mode() {
        node::record_receive_mode(db, mode.as_str())?;
    }
    match res {
        Err(e) => {
            node::record_transport_error(db, &format!("{e:#}"))?;
            Ok(true)
        }
        Ok(_) if Outbox::status(db)?.pending > 0 => Ok(true),
        Ok(_) => {
            node::record_transport_ok(db)?;
            Ok(false)
        }
    }
}

/// `owner run` without `--once`: answers whatever is waiting, then waits for news. With the mail
/// transport that wait is IMAP IDLE (or polling at `poll-interval` when the server has no IDLE), so a
/// request is answered as soon as it is delivered; the owner also runs every `interval` regardless. A
/// spool is looked at every `interval`. Failures are retried after a capped exponential backoff.
///
/// The state lock is taken for each step and released while waiting, so `owner publish` and
/// `owner add-recipient` work while the daemon runs.
async fn owner_daemon(cfg: &OwnerConfig, t: &mut AnyTransport) -> Result<()> {
    let interval = cfg.owner.interval;
    let db = Db::open(&cfg.state_dir.join("state.db"))?;
    let mut stop = Shutdown::new()?;
    let mut backoff = Backoff::new();
    info!(interval = %humantime::format_duration(interval), "owner running until SIGINT or SIGTERM");
    loop {
        let res = match Owner::open(cfg.clone()) {
            Ok(mut o) => o.run_once(t).await,
            Err(e) => Err(e),
        };
        match &res {
            Ok(r) if r.messages > 0 || r.sent > 0 => summary("owner", r),
            Ok(_) => {}
            Err(e) => warn!(error = %format!("{e:#}"), "run failed"),
        }
        let owner = &cfg.owner;
        admin_summary(&db, t, &owner.address, owner.admin_address.as_deref(), &format!("owner {}", owner.address))
            .await?;
        if note_step(&db, t, &res)? {
            let delay = backoff.failed();
            info!(retry_in = %humantime::format_duration(delay), "retrying soon");
            if stop.sleep(delay).await {
                break;
            }
            continue;
        }
        backoff.reset();
        match stop.until(t.wait_for_mail(interval)).await {
            None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                node::record_transport_error(&db, &format!("{e:#}"))?;
                let delay = backoff.failed();
                warn!(error = %format!("{e:#}"), retry_in = %humantime::format_duration(delay), "waiting for mail failed");
                if stop.sleep(delay).await {
                    break;
                }
            }
        }
    }
    t.close().await;
    Ok(())
}

/// `recipient run` without `--once`: requests on `interval` (plus up to 10% jitter so that a fleet does not
/// ask all at once), applies replies as they arrive (IMAP IDLE, or polling; a spool is looked at at least
/// every 30 s), and asks again once an unanswered request is `reply-timeout` old.
///
/// The state lock is taken for each step and released while waiting.
async fn recipient_daemon(cfg: &RecipientConfig, t: &mut AnyTransport, no_request: bool) -> Result<()> {
    let interval = cfg.recipient.interval;
    let db = Db::open(&cfg.state_dir.join("state.db"))?;
    let mut next_request = Instant::now();
    let mut next_stale_check = Instant::now();
    let mut stop = Shutdown::new()?;
    let mut backoff = Backoff::new();
    info!(interval = %humantime::format_duration(interval), "recipient running until SIGINT or SIGTERM");
    loop {
        if Instant::now() >= next_stale_check {
            // Warns (and queues the admin notice, sent by the step below) at most once an interval.
            recipient::notice_staleness(&db, cfg)?;
            next_stale_check = Instant::now() + interval;
        }
        let due = !no_request && Instant::now() >= next_request;
        let mut blocked_until = None;
        let res = match Recipient::open(cfg.clone()) {
            Ok(mut r) => {
                let res = r.run_once(t, due).await;
                if matches!(&res, Ok(rep) if due && !rep.requested) {
                    blocked_until = r.request_blocked_until()?;
                }
                res
            }
            Err(e) => Err(e),
        };
        match &res {
            Ok(rep) => {
                if rep.requested {
                    next_request = Instant::now() + interval + (interval / 10).mul_f64(rand_unit());
                } else if due {
                    // An unanswered request holds the next one back until it is `reply-timeout` old.
                    next_request = match blocked_until {
                        Some(at) => Instant::now() + Duration::from_secs(at.saturating_sub(mailferry::db::now()) + 1),
                        None => Instant::now() + interval,
                    };
                }
                if rep.messages > 0 || rep.requested {
                    summary("recipient", rep);
                }
            }
            Err(e) => warn!(error = %format!("{e:#}"), "run failed"),
        }
        let rc = &cfg.recipient;
        admin_summary(&db, t, &rc.address, rc.admin_address.as_deref(), &format!("recipient {}", rc.name)).await?;
        if note_step(&db, t, &res)? {
            let delay = backoff.failed();
            info!(retry_in = %humantime::format_duration(delay), "retrying soon");
            if stop.sleep(delay).await {
                break;
            }
            continue;
        }
        backoff.reset();
        let mut max = if no_request { interval } else { next_request.saturating_duration_since(Instant::now()) };
        if !t.is_mail() {
            max = max.min(Duration::from_secs(30));
        }
        match stop.until(t.wait_for_mail(max)).await {
            None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                node::record_transport_error(&db, &format!("{e:#}"))?;
                let delay = backoff.failed();
                warn!(error = %format!("{e:#}"), retry_in = %humantime::format_duration(delay), "waiting for mail failed");
                if stop.sleep(delay).await {
                    break;
                }
            }
        }
    }
    t.close().await;
    Ok(())
}

/// Capped exponential backoff between retries of a failed daemon step: 1 s after the first failure,
/// doubling up to 5 minutes, back to 1 s after a step succeeds.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(300);

    fn new() -> Backoff {
        Backoff { next: Backoff::MIN }
    }

    /// The delay before the next retry.
    fn failed(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Backoff::MAX);
        d
    }

    fn reset(&mut self) {
        self.next = Backoff::MIN;
    }
}

/// Notices SIGINT and SIGTERM for the daemons. Signals are only acted on while waiting between steps (a
/// signal that arrives during a step is kept and ends the next wait at once), so a step in progress (an
/// apply, a reply being written, a message being filed) always finishes.
struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn new() -> Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Shutdown { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Runs `f` until it finishes (`Some`) or a signal asks to stop (`None`; `f` is dropped, which for
    /// IMAP IDLE drops the connection).
    async fn until<F: Future>(&mut self, f: F) -> Option<F::Output> {
        let out = tokio::select! {
            v = f => Some(v),
            _ = self.int.recv() => None,
            _ = self.term.recv() => None,
        };
        if out.is_none() {
            info!("stopping");
        }
        out
    }

    /// Sleeps for `d`; true when a signal asked to stop.
    async fn sleep(&mut self, d: Duration) -> bool {
        self.until(tokio::time::sleep(d)).await.is_none()
    }
}

fn rand_unit() -> f64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap_or_default();
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

fn summary(role: &str, r: &RunReport) {
    eprintln!(
        "{role}: {} message(s): {} handled, {} refused, {} duplicate, {} waiting; {} sent{}",
        r.messages,
        r.handled,
        r.refused,
        r.duplicates,
        r.deferred,
        r.sent,
        if r.requested { "; request sent" } else { "" }
    );
}

fn fmt_time(t: Option<u64>) -> String {
    match t {
        None => "never".into(),
        Some(t) => {
            let ago = mailferry::db::now().saturating_sub(t);
            let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t));
            format!("{at} ({} ago)", humantime::format_duration(Duration::from_secs(ago)))
        }
    }
}

/// The `status` lines about mail: a permanently refused message, the last server error, how new mail is
/// noticed. `pad` aligns them with the role's other lines.
fn write_transport_status(
    out: &mut impl Write,
    pad: &str,
    outbox: &node::OutboxStatus,
    t: &node::TransportStatus,
) -> Result<()> {
    if let Some(e) = &outbox.last_error {
        writeln!(out, "refused:    {pad} {e}")?;
    }
    match (&t.last_error, t.failing()) {
        (Some(e), true) => writeln!(out, "last error: {pad} {} ({e})", fmt_time(t.last_error_at))?,
        (Some(e), false) => writeln!(
            out,
            "last error: {pad} {} ({e}); fine again since {}",
            fmt_time(t.last_error_at),
            fmt_time(t.last_ok_at)
        )?,
        (None, _) => writeln!(out, "last error: {pad} none")?,
    }
    let mode = match t.receive_mode.as_deref() {
        Some("idle") => "IMAP IDLE (new mail is reported by the server)",
        Some("poll") => "IMAP polling every poll-interval (no IDLE)",
        Some("interval") => "spool checked every interval",
        Some(other) => other,
        None => "not known yet (no run so far)",
    };
    writeln!(out, "receiving:  {pad} {mode}, as of {}", fmt_time(t.receive_mode_at))?;
    Ok(())
}

fn status(path: &Path, json: bool) -> Result<Exit> {
    let mut out = std::io::stdout().lock();
    match NodeConfig::load(path)? {
        NodeConfig::Owner(cfg) => {
            let s = owner::status(&cfg)?;
            if json {
                serde_json::to_writer(&mut out, &s)?;
                writeln!(out)?;
            } else {
                writeln!(out, "role:        owner ({})", s.address)?;
                match &s.generation {
                    Some(g) => writeln!(
                        out,
                        "generation:  {} ({} files, {} bytes, published {})",
                        g.number,
                        g.files,
                        g.bytes,
                        fmt_time(Some(g.created))
                    )?,
                    None => writeln!(out, "generation:  none published")?,
                }
                if let Some(g) = &s.generation {
                    writeln!(out, "tree root:   {}", g.root)?;
                }
                writeln!(out, "rejected:    {}", s.rejected)?;
                if let Some(k) = &s.public_key {
                    let on = if s.signing == mailferry::config::Signing::HmacEd25519 { "" } else { " (not in use)" };
                    writeln!(out, "signing key: ed25519 {k}{on}")?;
                }
                writeln!(out, "outbox:      {} pending, {} failed", s.outbox.pending, s.outbox.failed)?;
                write_transport_status(&mut out, "", &s.outbox, &s.transport)?;
                writeln!(out, "recipients:  {}", s.recipients.len())?;
                for r in &s.recipients {
                    let applied = r.applied_generation.map_or("unknown".into(), |g| format!("generation {g}"));
                    writeln!(out, "  {} <{}>: {applied}", r.name, r.address)?;
                    if let Some(k) = &r.rotating_to {
                        writeln!(out, "    key:          {} (rotating to {k})", r.key_id)?;
                    }
                    if let Some(limit) = r.relay_limit {
                        writeln!(out, "    part size:    {limit} bytes (learned from a relay's refusal)")?;
                    }
                    if let Some((at, what)) = r.last_bounce.as_deref().and_then(|b| b.split_once(' ')) {
                        writeln!(out, "    last bounce:  {} {what}", fmt_time(at.parse().ok()))?;
                    }
                    writeln!(out, "    last request: {}", fmt_time(r.last_request_at))?;
                    writeln!(out, "    last reply:   {}", fmt_time(r.last_reply_at))?;
                    writeln!(out, "    last receipt: {}", fmt_time(r.last_receipt_at))?;
                }
            }
            Ok(if s.outbox.failed > 0 || s.transport.failing() { Exit::Attention } else { Exit::Success })
        }
        NodeConfig::Recipient(cfg) => {
            let s = recipient::status(&cfg)?;
            if json {
                serde_json::to_writer(&mut out, &s)?;
                writeln!(out)?;
            } else {
                writeln!(out, "role:         recipient {:?} (data `{}`)", s.name, s.data.display())?;
                writeln!(
                    out,
                    "generation:   {}",
                    if s.generation == 0 { "none applied".into() } else { s.generation.to_string() }
                )?;
                writeln!(out, "tree root:    {}", s.root.as_deref().unwrap_or("-"))?;
                writeln!(out, "last request: {}", fmt_time(s.last_request_at))?;
                writeln!(out, "last reply:   {}", fmt_time(s.last_reply_at))?;
                writeln!(out, "key id:       {}", s.key_id.as_deref().unwrap_or("(key file unreadable)"))?;
                if let Some(k) = &s.owner_public_key {
                    writeln!(out, "owner key:    ed25519 {k} (replies must be signed)")?;
                }
                writeln!(out, "outstanding:  {}", s.outstanding)?;
                writeln!(out, "rejected:     {}", s.rejected)?;
                writeln!(out, "outbox:       {} pending, {} failed", s.outbox.pending, s.outbox.failed)?;
                write_transport_status(&mut out, " ", &s.outbox, &s.transport)?;
                match s.previous_generation {
                    Some(g) => writeln!(out, "kept:         generation {g}, for `recipient rollback`")?,
                    None => writeln!(out, "kept:         nothing to roll back to")?,
                }
                if s.interrupted_apply {
                    writeln!(out, "WARNING: an interrupted apply is waiting; the next run finishes it")?;
                }
                if let Some(held) = s.rollback_held {
                    writeln!(
                        out,
                        "HELD: rolled back locally; generation {held} and older are not applied until a newer one \
                         arrives or `mailferry recipient rollback --release`"
                    )?;
                }
                if s.stale {
                    writeln!(
                        out,
                        "STALE: no fresh reply from the owner for longer than stale-after ({}); updates may be withheld",
                        humantime::format_duration(Duration::from_secs(s.stale_after))
                    )?;
                }
            }
            let held = s.rollback_held.is_some();
            Ok(if s.outbox.failed > 0 || s.interrupted_apply || s.transport.failing() || s.stale || held {
                Exit::Attention
            } else {
                Exit::Success
            })
        }
    }
}

fn read_messages(files: &[PathBuf]) -> Result<Vec<Vec<u8>>> {
    if files.is_empty() {
        let mut raw = Vec::new();
        std::io::stdin().lock().read_to_end(&mut raw).context("failed to read a message from stdin")?;
        return Ok(vec![raw]);
    }
    files.iter().map(|f| std::fs::read(f).with_context(|| format!("failed to read `{}`", f.display()))).collect()
}

async fn deliver(path: &Path, files: &[PathBuf]) -> Result<Exit> {
    let messages = read_messages(files)?;
    let report = match NodeConfig::load(path)? {
        NodeConfig::Owner(cfg) => {
            let mut o = Owner::open(cfg)?;
            let mut t = AnyTransport::open(&o.config().transport, &o.config().owner.address)?;
            let r = node::deliver(&mut o, &mut t, &messages).await?;
            let c = &o.config().owner;
            admin_summary(o.db(), &mut t, &c.address, c.admin_address.as_deref(), &format!("owner {}", c.address))
                .await?;
            summary("owner", &r);
            r
        }
        NodeConfig::Recipient(cfg) => {
            let mut rcp = Recipient::open(cfg)?;
            let mut t = AnyTransport::open(&rcp.config().transport, &rcp.config().recipient.address)?;
            let r = node::deliver(&mut rcp, &mut t, &messages).await?;
            let c = &rcp.config().recipient;
            admin_summary(rcp.db(), &mut t, &c.address, c.admin_address.as_deref(), &format!("recipient {}", c.name))
                .await?;
            summary("recipient", &r);
            r
        }
    };
    if report.deferred > 0 {
        warn!("{} message(s) could not be handled yet; deliver them again later", report.deferred);
    }
    Ok(Exit::Success)
}

fn log(path: &Path, json: bool) -> Result<Exit> {
    let rows: Vec<Rejection> = match NodeConfig::load(path)? {
        NodeConfig::Owner(cfg) => Db::open(&cfg.state_dir.join("state.db"))?.rejections()?,
        NodeConfig::Recipient(cfg) => Db::open(&cfg.state_dir.join("state.db"))?.rejections()?,
    };
    let mut out = std::io::stdout().lock();
    for r in rows {
        if json {
            serde_json::to_writer(&mut out, &r)?;
            writeln!(out)?;
        } else {
            let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(r.at));
            writeln!(
                out,
                "{at} {} from={} message-id={} {}",
                r.reason,
                r.sender.as_deref().unwrap_or("-"),
                r.message_id.as_deref().unwrap_or("-"),
                r.detail
            )?;
        }
    }
    Ok(Exit::Success)
}
