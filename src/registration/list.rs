//! The lists `owner add-recipients` enrolls from: CSV (`name,address[,tags]`) or TOML (`[[recipient]]`).
//!
//! The whole list is checked before anything is registered, and every problem is reported at once (up
//! to [`MAX_PROBLEMS`]), with the line (CSV) or entry (TOML) it is on: a name or tag that is not a name,
//! an unusable address, a name or address given twice. Names are compared ignoring case, because the
//! enrollment files are named after them and may be written to a case-insensitive file system (a USB
//! stick). Pure: the caller reads the file.
//!
//! CSV is read by hand rather than with a CSV crate: names, addresses and tags can never hold a comma,
//! a quote or a line break, so quoting is refused as a mistake rather than interpreted.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde::Deserialize;

use super::check_name;

/// Most recipients in one list.
pub const MAX_ENTRIES: usize = 10_000;
/// Most tags of one recipient.
pub const MAX_TAGS: usize = 32;
/// Most problems reported for one list.
pub const MAX_PROBLEMS: usize = 50;

/// The two list formats, chosen by the file's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `.csv`: a header line `name,address` or `name,address,tags`, then one recipient a line, tags
    /// separated by `;`. Blank lines and lines starting with `#` are skipped.
    Csv,
    /// `.toml`: `[[recipient]]` tables with `name`, `address` and optional `tags = [...]`.
    Toml,
}

impl Format {
    /// The format of a file by its extension (`.csv` or `.toml`, any case).
    pub fn of(path: &std::path::Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "csv" => Some(Format::Csv),
            "toml" => Some(Format::Toml),
            _ => None,
        }
    }
}

/// One recipient to enroll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// Its mail address.
    pub address: String,
    /// The owner's tags for it.
    pub tags: BTreeSet<String>,
    /// Where it is in the list: `line 7` or `recipient 3`.
    pub at: String,
}

/// A list that cannot be enrolled, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ListError {
    /// How many problems were found.
    pub count: usize,
    /// `at: problem`, in list order: the first [`MAX_PROBLEMS`], then `and N more` if there are more.
    pub problems: Vec<String>,
}

impl ListError {
    /// The error for these problems: the first [`MAX_PROBLEMS`], and a last line counting the rest.
    pub fn new(mut problems: Vec<String>) -> ListError {
        let count = problems.len();
        if problems.len() > MAX_PROBLEMS {
            let more = problems.len() - MAX_PROBLEMS;
            problems.truncate(MAX_PROBLEMS);
            problems.push(format!("and {more} more"));
        }
        ListError { count, problems }
    }
}

impl fmt::Display for ListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.count;
        write!(f, "the list has {} problem{}; nothing was registered", n, if n == 1 { "" } else { "s" })?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct TomlList {
    #[serde(default)]
    recipient: Vec<TomlEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct TomlEntry {
    name: String,
    address: String,
    #[serde(default)]
    tags: Vec<String>,
}

/// Checks a tag the owner sets.
///
/// # Errors
/// What is wrong, in words.
pub fn check_tag(tag: &str) -> Result<(), String> {
    check_name(tag)
}

/// Reads and checks a whole list.
///
/// # Errors
/// Every problem found (a list with none is refused too).
pub fn parse(text: &str, format: Format) -> Result<Vec<Entry>, ListError> {
    // Problems keyed by where they are (line or entry number; 0 for the whole list), reported in
    // list order.
    let mut problems: Vec<(usize, String)> = Vec::new();
    let raw = match format {
        Format::Csv => csv(text, &mut problems),
        Format::Toml => match toml::from_str::<TomlList>(text) {
            Ok(list) => list
                .recipient
                .into_iter()
                .enumerate()
                .map(|(i, e)| (i + 1, format!("recipient {}", i + 1), e.name, e.address, e.tags))
                .collect(),
            Err(e) => {
                problems.push((0, format!("not a list of [[recipient]] tables: {}", e.message())));
                Vec::new()
            }
        },
    };
    if raw.is_empty() && problems.is_empty() {
        problems.push((0, "no recipients are listed".into()));
    }
    if raw.len() > MAX_ENTRIES {
        let n = raw.len();
        problems.push((0, format!("{n} recipients are listed, more than the {MAX_ENTRIES} one list may hold")));
    }
    let mut names: HashMap<String, String> = HashMap::new();
    let mut addresses: HashMap<String, String> = HashMap::new();
    let mut entries = Vec::new();
    for (key, at, name, address, tags) in raw {
        let mut problem = |p: String| problems.push((key, p));
        if let Err(e) = check_name(&name) {
            problem(format!("{at}: recipient name {name:?} {e}"));
        } else if let Some(first) = names.insert(name.to_ascii_lowercase(), at.clone()) {
            problem(format!("{at}: the name {name:?} is already listed at {first} (names are compared ignoring case)"));
        }
        if let Err(e) = crate::transport::maildir::check_address(&address) {
            problem(format!("{at}: {e}"));
        } else if let Some(first) = addresses.insert(address.to_ascii_lowercase(), at.clone()) {
            problem(format!("{at}: the address {address:?} is already listed at {first}"));
        }
        if tags.len() > MAX_TAGS {
            problem(format!("{at}: {} tags, more than the {MAX_TAGS} allowed", tags.len()));
        }
        for t in &tags {
            if let Err(e) = check_tag(t) {
                problem(format!("{at}: tag {t:?} {e}"));
            }
        }
        entries.push(Entry { name, address, tags: tags.into_iter().collect(), at });
    }
    if problems.is_empty() {
        Ok(entries)
    } else {
        problems.sort_by_key(|(key, _)| *key);
        Err(ListError::new(problems.into_iter().map(|(_, p)| p).collect()))
    }
}

type Raw = (usize, String, String, String, Vec<String>);

fn csv(text: &str, problems: &mut Vec<(usize, String)>) -> Vec<Raw> {
    let mut out = Vec::new();
    let mut header: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let at = format!("line {}", i + 1);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.contains('"') {
            problems.push((
                i + 1,
                format!("{at}: quotes are not understood here (names, addresses and tags never need them)"),
            ));
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let Some(columns) = header else {
            let names: Vec<String> = fields.iter().map(|f| f.to_ascii_lowercase()).collect();
            if names == ["name", "address"] || names == ["name", "address", "tags"] {
                header = Some(names.len());
            } else {
                problems.push((
                    i + 1,
                    format!("{at}: the first line must be the header `name,address` or `name,address,tags`"),
                ));
                return out;
            }
            continue;
        };
        if fields.len() < 2 || fields.len() > columns {
            problems.push((i + 1, format!("{at}: expected {columns} comma-separated fields, found {}", fields.len())));
            continue;
        }
        let tags = fields.get(2).map_or_else(Vec::new, |t| {
            t.split(';').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect()
        });
        out.push((i + 1, at, fields[0].to_owned(), fields[1].to_owned(), tags));
    }
    if header.is_none() && problems.is_empty() {
        problems
            .push((0, "the list is empty: it needs the header `name,address[,tags]` and one recipient a line".into()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_toml_read_the_same_recipients() {
        let csv =
            "name,address,tags\n# a comment\n\nsite1, s1@c.test, eu;tier-gold\nsite2,s2@c.test,\nsite3,s3@c.test\n";
        let toml = "[[recipient]]\nname = \"site1\"\naddress = \"s1@c.test\"\ntags = [\"tier-gold\", \"eu\"]\n\
                    [[recipient]]\nname = \"site2\"\naddress = \"s2@c.test\"\n\
                    [[recipient]]\nname = \"site3\"\naddress = \"s3@c.test\"\ntags = []\n";
        let a = parse(csv, Format::Csv).unwrap();
        let b = parse(toml, Format::Toml).unwrap();
        let strip = |v: Vec<Entry>| v.into_iter().map(|e| (e.name, e.address, e.tags)).collect::<Vec<_>>();
        assert_eq!(a[0].at, "line 4");
        assert_eq!(b[2].at, "recipient 3");
        let (a, b) = (strip(a), strip(b));
        assert_eq!(a, b);
        assert_eq!(a[0].2, BTreeSet::from(["eu".to_owned(), "tier-gold".to_owned()]));
        assert_eq!(parse("Name,Address\nx,x@c\n", Format::Csv).unwrap().len(), 1, "the header ignores case");
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let list = "name,address,tags\n\
                    good,g@c.test,eu\n\
                    ../etc,e@c.test\n\
                    .hidden,h@c.test\n\
                    Good,g2@c.test\n\
                    x,g@c.test\n\
                    y,/tmp/evil\n\
                    z,z@c.test,bad tag\n\
                    w,\"w@c.test\"\n\
                    v,v@c.test,a,b\n\
                    u\n";
        let err = parse(list, Format::Csv).unwrap_err();
        let want = [
            "line 3: recipient name \"../etc\" may hold only letters",
            "line 4: recipient name \".hidden\" must not start with `.`",
            "line 5: the name \"Good\" is already listed at line 2",
            "line 6: the address \"g@c.test\" is already listed at line 2",
            "line 7: \"/tmp/evil\" is not a usable mail address",
            "line 8: tag \"bad tag\" may hold only",
            "line 9: quotes are not understood",
            "line 10: expected 3 comma-separated fields, found 4",
            "line 11: expected 3 comma-separated fields, found 1",
        ];
        assert_eq!(err.problems.len(), want.len(), "{err}");
        for (got, want) in err.problems.iter().zip(want) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
        assert!(err.to_string().starts_with("the list has 9 problems; nothing was registered\n  line 3: "));
    }

    #[test]
    fn lists_without_recipients_or_header_are_refused() {
        let cases: &[(&str, Format, &str)] = &[
            ("", Format::Csv, "the list is empty"),
            ("name,address\n", Format::Csv, "no recipients are listed"),
            ("site1,s1@c.test\n", Format::Csv, "line 1: the first line must be the header"),
            ("", Format::Toml, "no recipients are listed"),
            ("[[recipient]]\nname = \"a\"\n", Format::Toml, "missing field `address`"),
            ("[[recipient]]\nname = \"a\"\naddress = \"a@c\"\nkey = \"x\"\n", Format::Toml, "unknown field `key`"),
        ];
        for (text, format, want) in cases {
            let err = parse(text, *format).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let many: String = std::iter::once("name,address\n".to_owned())
            .chain((0..=MAX_ENTRIES).map(|i| format!("s{i},s{i}@c.test\n")))
            .collect();
        assert!(parse(&many, Format::Csv).unwrap_err().problems[0].contains("more than the 10000"));
        let tags: Vec<String> = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
        let err = parse(&format!("name,address,tags\na,a@c,{}\n", tags.join(";")), Format::Csv).unwrap_err();
        assert!(err.problems[0].contains("33 tags"), "{err}");
        let bad: String =
            std::iter::once("name,address\n".to_owned()).chain((0..60).map(|i| format!(".s{i},s{i}@c\n"))).collect();
        let err = parse(&bad, Format::Csv).unwrap_err();
        assert_eq!(err.problems.len(), MAX_PROBLEMS + 1);
        assert_eq!(err.problems.last().unwrap(), "and 10 more");
        assert!(err.to_string().starts_with("the list has 60 problems"), "{err}");
    }

    #[test]
    fn the_format_follows_the_extension() {
        use std::path::Path;
        assert_eq!(Format::of(Path::new("site.csv")), Some(Format::Csv));
        assert_eq!(Format::of(Path::new("site.TOML")), Some(Format::Toml));
        assert_eq!(Format::of(Path::new("site.txt")), None);
        assert_eq!(Format::of(Path::new("site")), None);
    }
}
