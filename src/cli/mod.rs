//! Command-line interface: parsing, dispatch, logging setup and exit codes.
//!
//! One command per file: [`owner`] and [`recipient`] hold their subcommands, and `status`, `deliver`,
//! `log` and `demo` have a file each. Every command is a clap struct whose `execute` does the work and
//! hands its result, a value, to [`output::Output`], which shows it to a person or as JSON. Data and
//! `--json` go to stdout; narration, warnings and logs go to stderr. Exit codes: 0 success, 1 `status`
//! found something that needs attention, 2 error.

mod completions;
mod deliver;
mod demo;
mod log;
mod manpage;
mod notify;
mod output;
mod owner;
mod recipient;
mod signal;
mod status;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};
use mailferry::config::{NodeConfig, OwnerConfig, RecipientConfig};

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
    /// Run the whole story in a temporary directory: publish, sync, change, sync, tamper.
    Demo(demo::DemoCommand),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions(completions::CompletionsCommand),
    /// Print the man page, or write every page into a directory.
    #[command(hide = true)]
    Manpage(manpage::ManpageCommand),
}

/// The `--config` argument shared by the commands that work on an existing node.
#[derive(Debug, Args)]
struct ConfigArg {
    /// The node's config file (owner.toml or recipient.toml).
    #[arg(long, value_name = "FILE", env = "MAILFERRY_CONFIG")]
    config: PathBuf,
}

impl ConfigArg {
    /// Loads the config, whichever role it is for.
    fn load(&self) -> Result<NodeConfig> {
        NodeConfig::load(&self.config)
    }

    /// Loads the config of an owner; a recipient's is an error.
    fn owner(&self) -> Result<OwnerConfig> {
        match self.load()? {
            NodeConfig::Owner(cfg) => Ok(cfg),
            NodeConfig::Recipient(_) => {
                bail!("`{}` is a recipient's config; this command needs the owner's", self.config.display())
            }
        }
    }

    /// Loads the config of a recipient; an owner's is an error.
    fn recipient(&self) -> Result<RecipientConfig> {
        match self.load()? {
            NodeConfig::Recipient(cfg) => Ok(cfg),
            NodeConfig::Owner(_) => {
                bail!("`{}` is an owner's config; this command needs a recipient's", self.config.display())
            }
        }
    }

    fn path(&self) -> &Path {
        &self.config
    }
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
    let default = if matches!(cli.command, Command::Demo(_)) && cli.verbose == 0 { "warn" } else { default };
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
        Command::Owner(c) => c.execute().await,
        Command::Recipient(c) => c.execute().await,
        Command::Status(c) => c.execute(),
        Command::Deliver(c) => c.execute().await,
        Command::Log(c) => c.execute(),
        Command::Demo(c) => c.execute().await,
        Command::Completions(c) => c.execute(),
        Command::Manpage(c) => c.execute(),
    }
}
