//! `mailferry owner tag`: adds and removes the owner's tags of a recipient, which grant selectors test.

use std::collections::BTreeSet;
use std::io::{self, Write};

use anyhow::{Result, bail};
use clap::Args;
use mailferry::node::owner::Owner;
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// The arguments of `owner tag` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct TagCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The recipient's name.
    #[arg(long)]
    name: String,
    /// Tags to add, separated by commas.
    #[arg(long, value_name = "TAGS", value_delimiter = ',')]
    add: Vec<String>,
    /// Tags to remove, separated by commas.
    #[arg(long, value_name = "TAGS", value_delimiter = ',')]
    remove: Vec<String>,
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

/// The recipient's tags after the change.
#[derive(Debug, Serialize)]
struct Tags {
    name: String,
    tags: BTreeSet<String>,
}

impl Render for Tags {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        if self.tags.is_empty() {
            writeln!(out, "{:?} has no tags", self.name)
        } else {
            let tags: Vec<&str> = self.tags.iter().map(String::as_str).collect();
            writeln!(out, "{:?} has the tags {}", self.name, tags.join(", "))
        }
    }
}

impl TagCommand {
    /// Changes the tags.
    ///
    /// # Errors
    /// Neither `--add` nor `--remove`, a tag that is not a name, an unknown recipient, state failures.
    pub fn execute(self) -> Result<Exit> {
        if self.add.is_empty() && self.remove.is_empty() {
            bail!("say which tags to --add or --remove (each a comma-separated list)");
        }
        if let Some(t) = self.add.iter().find(|t| self.remove.contains(t)) {
            bail!("tag {t:?} is both added and removed");
        }
        let mut o = Owner::open(self.config.owner()?)?;
        let tags = o.change_tags(&self.name, &self.add, &self.remove)?;
        Output::new(self.json).print(&Tags { name: self.name, tags })?;
        Ok(Exit::Success)
    }
}
