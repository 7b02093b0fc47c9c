//! `mailferry owner add-recipients`: enrolls every recipient of a CSV or TOML list, one enrollment file each.

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use mailferry::node::owner::{Enrolled, Owner};
use mailferry::registration::list::{self, Format};
use serde::Serialize;

use crate::cli::output::{Output, Render, Stream};
use crate::cli::{ConfigArg, Exit};

/// Largest list file read: ten thousand recipients fit in well under a mebibyte.
const MAX_LIST_BYTES: u64 = 16 << 20;

/// The arguments of `owner add-recipients` (its help text is the doc of its variant in the command enum).
#[derive(Debug, Args)]
pub struct AddRecipientsCommand {
    #[command(flatten)]
    config: ConfigArg,
    /// The list: `.csv` with the header `name,address[,tags]` (tags separated by `;`), or `.toml` with
    /// `[[recipient]]` tables of `name`, `address` and `tags = [...]`.
    #[arg(long, value_name = "FILE")]
    list: PathBuf,
    /// Where to write the enrollment files, NAME.enrollment each (created, mode 0700, when missing).
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

/// The recipients registered. The keys themselves are only in the enrollment files.
#[derive(Debug, Serialize)]
struct Registered {
    count: usize,
    recipients: Vec<Enrolled>,
}

impl Render for Registered {
    const STREAM: Stream = Stream::Stdout;

    fn human(&self, out: &mut dyn Write) -> io::Result<()> {
        for r in &self.recipients {
            writeln!(
                out,
                "wrote `{}` for {:?} at {} (key id {})",
                r.enrollment.display(),
                r.name,
                r.address,
                r.key_id
            )?;
        }
        writeln!(
            out,
            "registered {} recipient(s); each enrollment file (mode 600) holds a key: carry it by a trusted path",
            self.count
        )
    }
}

impl AddRecipientsCommand {
    /// Enrolls the list, all or nothing.
    ///
    /// # Errors
    /// An unreadable list or one with problems (every problem is named), names already registered,
    /// enrollment files already there, state failures.
    pub fn execute(self) -> Result<Exit> {
        let Some(format) = Format::of(&self.list) else {
            bail!("`{}`: a list is a `.csv` or a `.toml` file, named so", self.list.display());
        };
        let file = std::fs::File::open(&self.list)
            .with_context(|| format!("failed to read the list `{}`", self.list.display()))?;
        let mut text = String::new();
        io::Read::read_to_string(&mut io::Read::take(file, MAX_LIST_BYTES + 1), &mut text)
            .with_context(|| format!("failed to read the list `{}`", self.list.display()))?;
        if text.len() as u64 > MAX_LIST_BYTES {
            bail!("the list `{}` is larger than {MAX_LIST_BYTES} bytes", self.list.display());
        }
        let entries = list::parse(&text, format).with_context(|| format!("`{}`", self.list.display()))?;
        let mut o = Owner::open(self.config.owner()?)?;
        let recipients = o.add_recipients(&entries, &self.out).with_context(|| format!("`{}`", self.list.display()))?;
        Output::new(self.json).print(&Registered { count: recipients.len(), recipients })?;
        Ok(Exit::Success)
    }
}
