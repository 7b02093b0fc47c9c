//! Command-line interface: parsing, dispatch, logging setup, config lookup and exit codes.
//!
//! One command per file: [`owner`] and [`recipient`] hold their subcommands, and `status`, `deliver`,
//! `log`, `check` and `demo` have a file each. Every command is a clap struct whose `execute` does the work
//! and hands its result, a value, to [`output::Output`], which shows it to a person or as JSON. Data and
//! `--json` go to stdout; narration, warnings and logs go to stderr. Exit codes are [`Exit`].

mod check;
mod completions;
mod deliver;
mod demo;
mod log;
mod manpage;
mod notify;
mod output;
mod owner;
mod prometheus;
mod recipient;
mod signal;
mod status;
mod transport_args;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};
use mailferry::config::{NodeConfig, OwnerConfig, RecipientConfig};
use mailferry::transport::{TransportError, TransportErrorKind};

/// Typed exit codes (documented in `--help`, the README and the man page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything is fine.
    Success,
    /// `status`/`check` found something that needs attention; `deliver` (or `run --once
    /// --fail-on-refusal`) refused a message.
    Attention,
    /// An error was reported (bad command line or config, a local failure).
    Error,
    /// A temporary failure: try again later (`deliver` as an MTA pipe: the MTA defers the message).
    TempFail,
}

/// `EX_TEMPFAIL` from `sysexits.h`, which MTAs read as "defer and retry".
pub const EX_TEMPFAIL: u8 = 75;

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> std::process::ExitCode {
        std::process::ExitCode::from(match e {
            Exit::Success => 0,
            Exit::Attention => 1,
            Exit::Error => 2,
            Exit::TempFail => EX_TEMPFAIL,
        })
    }
}

/// An error after which the same command may well succeed later (the MTA should defer, a timer retry).
#[derive(Debug)]
pub struct Temporary(pub anyhow::Error);

impl std::fmt::Display for Temporary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Temporary {}

/// The exit code for an error `run` returned: 75 for a temporary failure (a [`Temporary`], or a mail
/// server that could not be reached), else 2.
pub fn exit_for(err: &anyhow::Error) -> Exit {
    let temporary = err.chain().any(|c| {
        c.downcast_ref::<Temporary>().is_some()
            || c.downcast_ref::<TransportError>().is_some_and(|t| t.kind == TransportErrorKind::Transient)
    });
    if temporary { Exit::TempFail } else { Exit::Error }
}

const AFTER_HELP: &str = "\
Examples:
  mailferry demo --keep /tmp/mf-demo         the whole story, files kept for a look
  mailferry owner init --dir /etc/mailferry --source /srv/tree --address owner@example.org \\
      --transport-root /var/spool/mailferry
  mailferry owner publish                    (config found at a default place, see below)
  mailferry recipient run --once --config /etc/mailferry/recipient.toml
  mailferry check                            validate config, key modes, staging; log in to SMTP/IMAP
  mailferry status --format prometheus       for node_exporter's textfile collector

Config files (first found): --config FILE, $MAILFERRY_CONFIG, $XDG_CONFIG_HOME/mailferry/ROLE.toml
(default ~/.config/mailferry/), /etc/mailferry/ROLE.toml; ROLE is owner or recipient. Commands of one
role look for their role's file; status, log, deliver and check take whichever one is there, and ask
for --config when both are.

Exit codes:
  0    success
  1    status/check: something needs attention; deliver, run --once --fail-on-refusal: a message was
       refused (kept in STATE/rejected/, see `mailferry log --rejected`)
  2    error: bad command line or config, a local failure (one line on stderr)
  75   temporary failure (EX_TEMPFAIL): a mail server could not be reached, or deliver could not handle
       the message now; an MTA defers it, try again later
  130  interrupted by SIGINT (Ctrl-C) during a one-shot command; nothing is left half-done (the next
       run finishes an interrupted apply)

Logs go to stderr: -v/-vv add detail, -q leaves warnings and errors; MAILFERRY_LOG takes a tracing
filter (for example mailferry=debug) and overrides both.";

/// Store-and-forward file-tree updates whose only transport is email.
#[derive(Debug, Parser)]
#[command(name = "mailferry", version, about, propagate_version = true, after_help = AFTER_HELP)]
pub struct Cli {
    /// More log output: -v for decisions, -vv for every step.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, help_heading = "Global options")]
    verbose: u8,
    /// Only warnings and errors: no summaries, no progress bars.
    #[arg(short, long, global = true, conflicts_with = "verbose", help_heading = "Global options")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Commands of the node that publishes the authoritative tree.
    #[command(subcommand)]
    Owner(owner::OwnerCommand),
    /// Commands of a node that keeps a data tree in sync with an owner.
    #[command(subcommand)]
    Recipient(recipient::RecipientCommand),
    /// Show a node's generation, tree root, last request and reply, and refusals.
    Status(status::StatusCommand),
    /// Hand messages to a node from files or stdin (an MTA pipe, a USB stick).
    Deliver(deliver::DeliverCommand),
    /// List refused messages with their reasons.
    Log(log::LogCommand),
    /// Check a node's setup: config, file modes, data tree, staging, one login to each mail server.
    ///
    /// Validates the config, the modes of the key file, password files and state database, the data tree
    /// and where files are staged (the data tree's file system and mount), and logs in to SMTP and IMAP
    /// once; one line per finding, each problem with its fix. Nothing is changed or sent.
    Check(check::CheckCommand),
    /// Run the whole story in a temporary directory: publish, sync, change, sync, tamper.
    Demo(demo::DemoCommand),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions(completions::CompletionsCommand),
    /// Print the man page, or write every page into a directory.
    #[command(hide = true)]
    Manpage(manpage::ManpageCommand),
}

/// A node's role, for finding its config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `owner.toml`.
    Owner,
    /// `recipient.toml`.
    Recipient,
}

impl Role {
    fn file_name(self) -> &'static str {
        match self {
            Role::Owner => "owner.toml",
            Role::Recipient => "recipient.toml",
        }
    }
}

/// The `--config` argument shared by the commands that work on an existing node.
#[derive(Debug, Args)]
struct ConfigArg {
    /// The node's config file (owner.toml or recipient.toml); default: $MAILFERRY_CONFIG, then
    /// $XDG_CONFIG_HOME/mailferry/, then /etc/mailferry/.
    #[arg(long, value_name = "FILE", env = "MAILFERRY_CONFIG")]
    config: Option<PathBuf>,
}

/// The default places for config files, in the order they are tried: `$XDG_CONFIG_HOME/mailferry`
/// (`~/.config/mailferry` when unset), then `/etc/mailferry`.
pub fn default_config_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let xdg = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from).filter(|p| p.is_absolute());
    let home = std::env::var_os("HOME").map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(base) = xdg.or_else(|| home.map(|h| h.join(".config"))) {
        dirs.push(base.join("mailferry"));
    }
    dirs.push(PathBuf::from("/etc/mailferry"));
    dirs
}

/// Finds the config file: `explicit` (from `--config` or `MAILFERRY_CONFIG`), else the first default
/// place holding the role's file (or, with no role, holding exactly one of the two).
///
/// # Errors
/// Nothing found, or both roles' files at the same place when the command has no role.
pub fn locate_config(explicit: Option<&Path>, role: Option<Role>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let dirs = default_config_dirs();
    let roles = match role {
        Some(r) => vec![r],
        None => vec![Role::Owner, Role::Recipient],
    };
    for dir in &dirs {
        let found: Vec<PathBuf> = roles.iter().map(|r| dir.join(r.file_name())).filter(|p| p.is_file()).collect();
        match found.as_slice() {
            [] => continue,
            [one] => {
                tracing::info!("using config file `{}`", one.display());
                return Ok(one.clone());
            }
            [a, b, ..] => {
                bail!("both `{}` and `{}` exist; say which node this is with --config FILE", a.display(), b.display())
            }
        }
    }
    let tried: Vec<String> =
        dirs.iter().flat_map(|d| roles.iter().map(move |r| format!("`{}`", d.join(r.file_name()).display()))).collect();
    bail!("no config file found (looked for {}); give --config FILE or set MAILFERRY_CONFIG", tried.join(", "))
}

impl ConfigArg {
    /// The config file for a command of `role` (any role when `None`).
    fn locate(&self, role: Option<Role>) -> Result<PathBuf> {
        locate_config(self.config.as_deref(), role)
    }

    /// Loads the config, whichever role it is for.
    fn load(&self) -> Result<NodeConfig> {
        NodeConfig::load(&self.locate(None)?)
    }

    /// Loads the config of an owner; a recipient's is an error.
    fn owner(&self) -> Result<OwnerConfig> {
        let path = self.locate(Some(Role::Owner))?;
        match NodeConfig::load(&path)? {
            NodeConfig::Owner(cfg) => Ok(cfg),
            NodeConfig::Recipient(_) => {
                bail!("`{}` is a recipient's config; this command needs the owner's", path.display())
            }
        }
    }

    /// Loads the config of a recipient; an owner's is an error.
    fn recipient(&self) -> Result<RecipientConfig> {
        let path = self.locate(Some(Role::Recipient))?;
        match NodeConfig::load(&path)? {
            NodeConfig::Recipient(cfg) => Ok(cfg),
            NodeConfig::Owner(_) => {
                bail!("`{}` is an owner's config; this command needs a recipient's", path.display())
            }
        }
    }
}

/// Parses the command line.
pub fn parse() -> Cli {
    Cli::parse()
}

/// Sends logs to stderr; `MAILFERRY_LOG` (tracing filter syntax) overrides -v/-q. Under journald (stderr is
/// the stream `JOURNAL_STREAM` names) lines carry no timestamp of their own: the journal adds one.
///
/// # Errors
/// `MAILFERRY_LOG` is set but is not a valid filter.
pub fn init_logging(cli: &Cli) -> Result<()> {
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let default = if matches!(cli.command, Command::Demo(_)) && cli.verbose == 0 { "warn" } else { default };
    let filter = match std::env::var("MAILFERRY_LOG") {
        Ok(text) => tracing_subscriber::EnvFilter::try_new(&text).map_err(|e| {
            anyhow::anyhow!(
                "MAILFERRY_LOG={text:?} is not a valid log filter ({e}); use a level such as `debug`, or \
                 `mailferry=debug,warn`"
            )
        })?,
        Err(std::env::VarError::NotPresent) => tracing_subscriber::EnvFilter::new(format!("mailferry={default},warn")),
        Err(std::env::VarError::NotUnicode(_)) => bail!("MAILFERRY_LOG is not valid UTF-8"),
    };
    let journald = stderr_is_journal();
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(terminal && !journald);
    if journald {
        builder.without_time().init()
    } else {
        builder.init()
    }
    output::set_quiet(cli.quiet);
    // Progress bars only for a person watching a terminal, and not in quiet mode.
    if terminal && !cli.quiet {
        mailferry::progress::enable();
    }
    Ok(())
}

/// Whether stderr is the journal stream systemd names in `JOURNAL_STREAM` (`DEVICE:INODE`); a child whose
/// stderr was redirected elsewhere inherits the variable but not the stream.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else { return false };
    std::fs::File::from(fd).metadata().is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Runs the parsed command.
///
/// # Errors
/// Whatever the command reports; `main` prints it and exits with [`exit_for`].
pub fn run(cli: Cli) -> Result<Exit> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> Result<Exit> {
    match command {
        Command::Owner(c) => c.execute().await,
        Command::Recipient(c) => c.execute().await,
        Command::Status(c) => c.execute(),
        Command::Deliver(c) => c.execute().await,
        Command::Log(c) => c.execute(),
        Command::Check(c) => c.execute().await,
        Command::Demo(c) => c.execute().await,
        Command::Completions(c) => c.execute(),
        Command::Manpage(c) => c.execute(),
    }
}
