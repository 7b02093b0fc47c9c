//! Selectors: which recipients a grant reaches, by their registration facts and the owner's tags.
//!
//! ```text
//! selector   := or
//! or         := and ("or" and)*
//! and        := unary ("and" unary)*
//! unary      := "not" unary | "(" selector ")" | comparison
//! comparison := FIELD OP VALUE
//! FIELD      := os | arch | hostname | os-release | install | contact | update-timing
//!             | mailferry-version | tag | installed.CHANNEL
//! OP         := "=" | "!=" | "~" (glob: `*` any run, `?` one character, `\` takes the next literally)
//!             | "<" | "<=" | ">" | ">="            (installed.CHANNEL only)
//! VALUE      := "double-quoted string" (`\"` and `\\` escape) | INTEGER (installed.CHANNEL only)
//! ```
//!
//! `not` binds tightest, then `and`, then `or`. Comparisons are exact and case-sensitive. The string
//! fields take `=`, `!=` and `~`; `installed.CHANNEL` compares the generation applied and takes numbers
//! only. `tag = "eu"` holds when the recipient has that tag, `tag != "eu"` when it has not, and
//! `tag ~ "eu-*"` when any of its tags matches.
//!
//! **Recipients without facts.** A recipient that has not registered yet has no facts; it matches only
//! a selector that needs none (one over tags alone). Any selector naming a fact (even under `not`) does
//! not match it: a grant for `not arch = "aarch64"` never reaches a machine whose architecture is
//! unknown. Within facts, an absent optional fact (`contact`, `os-release`, `update-timing`) reads as
//! the empty string and a channel with nothing installed as generation 0.
//!
//! The parser is written by hand rather than with a parser crate: the grammar is a dozen lines, and the
//! errors should name the column and say what was expected there, which a hand-written recursive
//! descent does directly. Depth and length are bounded ([`MAX_SELECTOR_BYTES`], [`MAX_DEPTH`]).

use std::collections::BTreeSet;
use std::fmt;

use super::Facts;

/// Longest selector accepted, in bytes.
pub const MAX_SELECTOR_BYTES: usize = 4096;
/// Deepest nesting of `not` and parentheses accepted.
pub const MAX_DEPTH: usize = 32;

/// A parsed selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// One comparison.
    Cmp(Comparison),
    /// The negation.
    Not(Box<Selector>),
    /// All of them (two or more).
    And(Vec<Selector>),
    /// Any of them (two or more).
    Or(Vec<Selector>),
}

/// `FIELD OP VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comparison {
    /// What is compared.
    pub field: Field,
    /// How.
    pub op: Op,
    /// With what.
    pub value: Value,
}

/// A fact, a tag, or a channel's installed generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    /// `os`.
    Os,
    /// `arch`.
    Arch,
    /// `hostname`.
    Hostname,
    /// `os-release`.
    OsRelease,
    /// `install` (`auto` or `manual`).
    Install,
    /// `contact`.
    Contact,
    /// `update-timing`.
    UpdateTiming,
    /// `mailferry-version`.
    MailferryVersion,
    /// `tag`: the owner's tags of the recipient.
    Tag,
    /// `installed.CHANNEL`: the generation applied on that channel (0 for none).
    Installed(String),
}

const STRING_FIELDS: [(&str, Field); 8] = [
    ("os", Field::Os),
    ("arch", Field::Arch),
    ("hostname", Field::Hostname),
    ("os-release", Field::OsRelease),
    ("install", Field::Install),
    ("contact", Field::Contact),
    ("update-timing", Field::UpdateTiming),
    ("mailferry-version", Field::MailferryVersion),
];

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `=`.
    Eq,
    /// `!=`.
    Ne,
    /// `~`, a glob match.
    Glob,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Glob => "~",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }
}

/// A literal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// A string (or a glob pattern after `~`).
    Str(String),
    /// A generation number.
    Int(u64),
}

/// A selector that does not parse, with the column (1-based, in characters) where it went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {message}")]
pub struct SelectorError {
    /// Where, counting characters from 1.
    pub column: usize,
    /// What was wrong there.
    pub message: String,
}

impl Selector {
    /// Parses a selector.
    ///
    /// # Errors
    /// A selector that is too long, too deep or not of the grammar; the error names the column.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        if text.len() > MAX_SELECTOR_BYTES {
            return Err(SelectorError {
                column: 1,
                message: format!("a selector is at most {MAX_SELECTOR_BYTES} bytes long, this one is {}", text.len()),
            });
        }
        let tokens = lex(text)?;
        let mut p = Parser { tokens, at: 0, depth: 0 };
        let s = p.or()?;
        match p.peek() {
            (Tok::End, _) => Ok(s),
            (t, column) => {
                Err(SelectorError { column, message: format!("expected `and`, `or` or the end, found {t}") })
            }
        }
    }

    /// Whether the selector names a registration fact (anything but `tag`).
    pub fn needs_facts(&self) -> bool {
        match self {
            Selector::Cmp(c) => c.field != Field::Tag,
            Selector::Not(s) => s.needs_facts(),
            Selector::And(v) | Selector::Or(v) => v.iter().any(Selector::needs_facts),
        }
    }

    /// Whether a recipient with these facts (`None`: it has not registered) and the owner's `tags`
    /// for it is selected. Without facts only a selector that [needs none](Selector::needs_facts)
    /// can match.
    pub fn matches(&self, facts: Option<&Facts>, tags: &BTreeSet<String>) -> bool {
        if facts.is_none() && self.needs_facts() {
            return false;
        }
        self.eval(facts, tags)
    }

    fn eval(&self, facts: Option<&Facts>, tags: &BTreeSet<String>) -> bool {
        match self {
            Selector::Cmp(c) => c.eval(facts, tags),
            Selector::Not(s) => !s.eval(facts, tags),
            Selector::And(v) => v.iter().all(|s| s.eval(facts, tags)),
            Selector::Or(v) => v.iter().any(|s| s.eval(facts, tags)),
        }
    }
}

impl Comparison {
    fn eval(&self, facts: Option<&Facts>, tags: &BTreeSet<String>) -> bool {
        match (&self.field, &self.value) {
            (Field::Tag, Value::Str(v)) => match self.op {
                Op::Eq => tags.contains(v),
                Op::Ne => !tags.contains(v),
                Op::Glob => tags.iter().any(|t| glob(v, t)),
                _ => false,
            },
            (Field::Installed(channel), Value::Int(v)) => {
                let Some(f) = facts else { return false };
                let g = f.installed.get(channel).map_or(0, |i| i.generation);
                match self.op {
                    Op::Eq => g == *v,
                    Op::Ne => g != *v,
                    Op::Lt => g < *v,
                    Op::Le => g <= *v,
                    Op::Gt => g > *v,
                    Op::Ge => g >= *v,
                    Op::Glob => false,
                }
            }
            (field, Value::Str(v)) => {
                let Some(f) = facts else { return false };
                let have: &str = match field {
                    Field::Os => &f.os,
                    Field::Arch => &f.arch,
                    Field::Hostname => &f.hostname,
                    Field::OsRelease => f.os_release.as_deref().unwrap_or(""),
                    Field::Install => f.install.as_str(),
                    Field::Contact => f.contact.as_deref().unwrap_or(""),
                    Field::UpdateTiming => f.update_timing.as_deref().unwrap_or(""),
                    Field::MailferryVersion => &f.mailferry_version,
                    Field::Tag | Field::Installed(_) => return false,
                };
                match self.op {
                    Op::Eq => have == v,
                    Op::Ne => have != v,
                    Op::Glob => glob(v, have),
                    _ => false,
                }
            }
            // The parser never pairs a string field with a number.
            (_, Value::Int(_)) => false,
        }
    }
}

/// Whether `text` matches the glob `pattern`: `*` any run of characters, `?` one, `\` the next
/// character literally. Iterative with one backtrack point, so linear-ish and never recursive.
fn glob(pattern: &str, text: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum P {
        Star,
        Any,
        Lit(char),
    }
    let mut pat = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        pat.push(match c {
            '*' => P::Star,
            '?' => P::Any,
            '\\' => P::Lit(chars.next().unwrap_or('\\')),
            c => P::Lit(c),
        });
    }
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    let mut back: Option<(usize, usize)> = None;
    while t < text.len() {
        match pat.get(p) {
            Some(P::Star) => {
                back = Some((p, t));
                p += 1;
            }
            Some(P::Any) => {
                p += 1;
                t += 1;
            }
            Some(P::Lit(c)) if *c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match back {
                Some((bp, bt)) => {
                    p = bp + 1;
                    t = bt + 1;
                    back = Some((bp, bt + 1));
                }
                None => return false,
            },
        }
    }
    pat[p..].iter().all(|x| *x == P::Star)
}

// ---- lexing ----

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(u64),
    Op(Op),
    Open,
    Close,
    End,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Str(s) => write!(f, "the string {s:?}"),
            Tok::Int(n) => write!(f, "the number {n}"),
            Tok::Op(op) => write!(f, "`{}`", op.as_str()),
            Tok::Open => f.write_str("`(`"),
            Tok::Close => f.write_str("`)`"),
            Tok::End => f.write_str("the end"),
        }
    }
}

fn lex(text: &str) -> Result<Vec<(Tok, usize)>, SelectorError> {
    let chars: Vec<char> = text.chars().collect();
    let err = |column: usize, message: String| SelectorError { column, message };
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let column = i + 1;
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push((Tok::Open, column));
                i += 1;
            }
            ')' => {
                out.push((Tok::Close, column));
                i += 1;
            }
            '=' | '~' => {
                out.push((Tok::Op(if c == '=' { Op::Eq } else { Op::Glob }), column));
                i += 1;
            }
            '!' | '<' | '>' => {
                let eq = chars.get(i + 1) == Some(&'=');
                let op = match (c, eq) {
                    ('!', true) => Op::Ne,
                    ('!', false) => {
                        return Err(err(column, "`!` must be followed by `=`; for negation write `not`".into()));
                    }
                    ('<', true) => Op::Le,
                    ('<', false) => Op::Lt,
                    ('>', true) => Op::Ge,
                    _ => Op::Gt,
                };
                out.push((Tok::Op(op), column));
                i += if eq { 2 } else { 1 };
            }
            '"' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(err(column, "the string that starts here is not closed with `\"`".into())),
                        Some('"') => break,
                        Some('\\') => match chars.get(i + 1) {
                            Some(e @ ('"' | '\\')) => {
                                s.push(*e);
                                i += 2;
                            }
                            _ => {
                                return Err(err(i + 1, "only `\\\"` and `\\\\` are escapes in a string".into()));
                            }
                        },
                        Some(c) => {
                            s.push(*c);
                            i += 1;
                        }
                    }
                }
                i += 1;
                out.push((Tok::Str(s), column));
            }
            c if c.is_ascii_digit() => {
                let start = i;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
                let digits: String = chars[start..i].iter().collect();
                let n = digits.parse().map_err(|_| err(column, format!("the number {digits} is too large")))?;
                out.push((Tok::Int(n), column));
            }
            c if c.is_ascii_alphabetic() => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "-_.".contains(chars[i])) {
                    i += 1;
                }
                out.push((Tok::Ident(chars[start..i].iter().collect()), column));
            }
            c => return Err(err(column, format!("unexpected character {c:?}"))),
        }
    }
    out.push((Tok::End, chars.len() + 1));
    Ok(out)
}

// ---- parsing ----

struct Parser {
    tokens: Vec<(Tok, usize)>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> (Tok, usize) {
        self.tokens[self.at].clone()
    }

    fn next(&mut self) -> (Tok, usize) {
        let t = self.peek();
        if t.0 != Tok::End {
            self.at += 1;
        }
        t
    }

    fn keyword(&mut self, word: &str) -> bool {
        if matches!(&self.tokens[self.at].0, Tok::Ident(s) if s == word) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<Selector, SelectorError> {
        let mut all = vec![self.and()?];
        while self.keyword("or") {
            all.push(self.and()?);
        }
        Ok(if all.len() == 1 { all.pop().expect("one") } else { Selector::Or(all) })
    }

    fn and(&mut self) -> Result<Selector, SelectorError> {
        let mut all = vec![self.unary()?];
        while self.keyword("and") {
            all.push(self.unary()?);
        }
        Ok(if all.len() == 1 { all.pop().expect("one") } else { Selector::And(all) })
    }

    fn unary(&mut self) -> Result<Selector, SelectorError> {
        let column = self.peek().1;
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(SelectorError { column, message: format!("nested deeper than {MAX_DEPTH} levels") });
        }
        let s = if self.keyword("not") {
            Selector::Not(Box::new(self.unary()?))
        } else if self.peek().0 == Tok::Open {
            self.next();
            let inner = self.or()?;
            match self.next() {
                (Tok::Close, _) => inner,
                (t, c) => {
                    return Err(SelectorError {
                        column: c,
                        message: format!("expected `)` to close the `(` at column {column}, found {t}"),
                    });
                }
            }
        } else {
            Selector::Cmp(self.comparison()?)
        };
        self.depth -= 1;
        Ok(s)
    }

    fn comparison(&mut self) -> Result<Comparison, SelectorError> {
        let (tok, column) = self.next();
        let field = match tok {
            Tok::Ident(name) => field_named(&name).ok_or_else(|| SelectorError {
                column,
                message: format!(
                    "unknown field `{name}` (fields: os, arch, hostname, os-release, install, contact, \
                     update-timing, mailferry-version, tag, installed.CHANNEL)"
                ),
            })?,
            t => {
                return Err(SelectorError {
                    column,
                    message: format!("expected a field such as `arch`, `tag` or `installed.CHANNEL`, found {t}"),
                });
            }
        };
        let (tok, op_column) = self.next();
        let Tok::Op(op) = tok else {
            return Err(SelectorError {
                column: op_column,
                message: format!("expected `=`, `!=`, `~`, `<`, `<=`, `>` or `>=` after the field, found {tok}"),
            });
        };
        let numeric = matches!(field, Field::Installed(_));
        if !numeric && !matches!(op, Op::Eq | Op::Ne | Op::Glob) {
            return Err(SelectorError {
                column: op_column,
                message: format!("`{}` compares generations: only `installed.CHANNEL` takes it", op.as_str()),
            });
        }
        if numeric && op == Op::Glob {
            return Err(SelectorError {
                column: op_column,
                message: "`~` matches strings: `installed.CHANNEL` is a generation number".into(),
            });
        }
        let (tok, value_column) = self.next();
        let value = match (tok, numeric) {
            (Tok::Str(s), false) => Value::Str(s),
            (Tok::Int(n), true) => Value::Int(n),
            (Tok::Int(_), false) => {
                return Err(SelectorError {
                    column: value_column,
                    message: "expected a string in double quotes: only `installed.CHANNEL` compares numbers".into(),
                });
            }
            (Tok::Str(_), true) => {
                return Err(SelectorError {
                    column: value_column,
                    message: "expected a generation number, not a string".into(),
                });
            }
            (t, _) => {
                return Err(SelectorError {
                    column: value_column,
                    message: format!("expected a value after `{}`, found {t}", op.as_str()),
                });
            }
        };
        Ok(Comparison { field, op, value })
    }
}

fn field_named(name: &str) -> Option<Field> {
    if name == "tag" {
        return Some(Field::Tag);
    }
    if let Some(channel) = name.strip_prefix("installed.") {
        return super::check_name(channel).is_ok().then(|| Field::Installed(channel.to_owned()));
    }
    STRING_FIELDS.iter().find(|(n, _)| *n == name).map(|(_, f)| f.clone())
}

// ---- display ----

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Tag => f.write_str("tag"),
            Field::Installed(c) => write!(f, "installed.{c}"),
            other => {
                let (name, _) = STRING_FIELDS.iter().find(|(_, x)| x == other).expect("every string field is listed");
                f.write_str(name)
            }
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(n) => write!(f, "{n}"),
            Value::Str(s) => {
                f.write_str("\"")?;
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        f.write_str("\\")?;
                    }
                    write!(f, "{c}")?;
                }
                f.write_str("\"")
            }
        }
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.field, self.op.as_str(), self.value)
    }
}

/// Writes the selector so that [`Selector::parse`] gives it back: parentheses exactly where the
/// structure needs them.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn child(f: &mut fmt::Formatter<'_>, s: &Selector, bare: bool) -> fmt::Result {
            if bare { write!(f, "{s}") } else { write!(f, "({s})") }
        }
        match self {
            Selector::Cmp(c) => write!(f, "{c}"),
            Selector::Not(s) => {
                f.write_str("not ")?;
                child(f, s, matches!(**s, Selector::Cmp(_) | Selector::Not(_)))
            }
            Selector::And(v) | Selector::Or(v) => {
                let (word, is_and) = if matches!(self, Selector::And(_)) { (" and ", true) } else { (" or ", false) };
                for (i, s) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(word)?;
                    }
                    // Under `and` any `and`/`or` needs parentheses; under `or` only a nested `or` (which
                    // would otherwise flatten into this one).
                    let bare = match s {
                        Selector::Cmp(_) | Selector::Not(_) => true,
                        Selector::And(_) => !is_and,
                        Selector::Or(_) => false,
                    };
                    child(f, s, bare)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::registration::{InstallMode, Installed};

    fn facts() -> Facts {
        Facts {
            arch: "x86_64".into(),
            contact: None,
            hostname: "web-12".into(),
            install: InstallMode::Manual,
            installed: BTreeMap::from([("sigdb".into(), Installed { generation: 41, root: "ab".repeat(32) })]),
            mailferry_version: "0.1.0".into(),
            os: "linux".into(),
            os_release: Some("debian 13".into()),
            update_timing: None,
        }
    }

    fn tags(t: &[&str]) -> BTreeSet<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn selectors_pick_by_facts_and_tags() {
        let f = facts();
        let eu = tags(&["eu", "tier-gold"]);
        let cases: &[(&str, bool)] = &[
            (r#"arch = "x86_64""#, true),
            (r#"arch != "x86_64""#, false),
            (r#"os = "linux" and arch != "aarch64""#, true),
            (r#"os = "windows" or arch = "x86_64""#, true),
            (r#"tag = "eu""#, true),
            (r#"tag = "us""#, false),
            (r#"tag != "us""#, true),
            (r#"tag ~ "tier-*""#, true),
            (r#"hostname ~ "web-*""#, true),
            (r#"hostname ~ "web-?""#, false),
            (r#"hostname ~ "web-??""#, true),
            (r#"hostname ~ "*-1*""#, true),
            (r#"hostname ~ "db-*""#, false),
            ("installed.sigdb >= 41", true),
            ("installed.sigdb > 41", false),
            ("installed.sigdb < 42", true),
            ("installed.sigdb <= 40", false),
            ("installed.sigdb = 41", true),
            ("installed.sigdb != 41", false),
            ("installed.engine = 0", true),
            ("installed.engine >= 1", false),
            (r#"install = "manual""#, true),
            (r#"os-release = "debian 13""#, true),
            (r#"os-release ~ "debian *""#, true),
            (r#"contact = """#, true),
            (r#"update-timing != """#, false),
            (r#"mailferry-version = "0.1.0""#, true),
            (r#"not arch = "x86_64""#, false),
            (r#"not not arch = "x86_64""#, true),
            (r#"not (tag = "us" or arch = "aarch64")"#, true),
            (r#"arch = "x86_64" and (tag = "us" or tag = "eu")"#, true),
            (r#"arch = "x86_64" and tag = "us" or tag = "eu""#, true),
            (r#"arch = "aarch64" and (tag = "us" or tag = "eu")"#, false),
            (r#"not tag = "eu" and arch = "x86_64""#, false),
        ];
        for (text, want) in cases {
            let s = Selector::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(s.matches(Some(&f), &eu), *want, "{text}");
        }
    }

    #[test]
    fn a_recipient_without_facts_matches_only_selectors_that_need_none() {
        let t = tags(&["eu"]);
        let cases: &[(&str, bool)] = &[
            (r#"tag = "eu""#, true),
            (r#"not tag = "us""#, true),
            (r#"tag = "eu" or tag = "us""#, true),
            (r#"arch = "x86_64""#, false),
            (r#"not arch = "aarch64""#, false),
            (r#"tag = "eu" or arch = "x86_64""#, false),
            ("installed.sigdb = 0", false),
        ];
        for (text, want) in cases {
            let s = Selector::parse(text).unwrap();
            assert_eq!(s.matches(None, &t), *want, "{text}");
        }
    }

    #[test]
    fn errors_name_the_column_and_what_was_expected() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 1, "expected a field"),
            ("arch", 5, "expected `=`"),
            ("arch =", 7, "expected a value after `=`"),
            (r#"archh = "x""#, 1, "unknown field `archh`"),
            (r#"arch >= "x""#, 6, "only `installed.CHANNEL` takes it"),
            ("arch = 5", 8, "expected a string in double quotes"),
            (r#"installed.sigdb >= "41""#, 20, "expected a generation number"),
            ("installed.sigdb ~ 4", 17, "`~` matches strings"),
            (r#"installed./x = 1"#, 11, "unexpected character '/'"),
            (r#"installed..x = 1"#, 1, "unknown field `installed..x`"),
            (r#"arch = "x86_64"#, 8, "not closed"),
            (r#"arch = "a\nb""#, 10, "only `\\\"` and `\\\\` are escapes"),
            (r#"(arch = "x""#, 12, "expected `)` to close the `(` at column 1"),
            (r#"arch = "x" tag = "eu""#, 12, "expected `and`, `or` or the end, found `tag`"),
            (r#"arch = "x" and"#, 15, "expected a field"),
            (r#"arch ! "x""#, 6, "for negation write `not`"),
            ("installed.x = 99999999999999999999999", 15, "too large"),
            (r#"arch = "x" & os = "y""#, 12, "unexpected character '&'"),
            (r#"ü = "x""#, 1, "unexpected character 'ü'"),
            (r#"hostname = "ü" and §"#, 20, "unexpected character '§'"),
        ];
        for (text, column, want) in cases {
            let e = Selector::parse(text).unwrap_err();
            assert!(e.message.contains(want), "{text}: {e}");
            assert_eq!(e.column, *column, "{text}: {e}");
            assert!(e.to_string().starts_with(&format!("column {column}: ")));
        }
    }

    #[test]
    fn length_and_depth_are_bounded() {
        let deep = format!("{}arch = \"x\"{}", "(".repeat(MAX_DEPTH + 1), ")".repeat(MAX_DEPTH + 1));
        assert!(Selector::parse(&deep).unwrap_err().message.contains("nested deeper"));
        let nots = format!("{}arch = \"x\"", "not ".repeat(10_000));
        assert!(Selector::parse(&nots).is_err(), "no stack overflow, a refusal");
        let ok = format!("{}arch = \"x\"{}", "(".repeat(MAX_DEPTH - 1), ")".repeat(MAX_DEPTH - 1));
        Selector::parse(&ok).unwrap();
        let long = format!("hostname = \"{}\"", "x".repeat(MAX_SELECTOR_BYTES));
        assert!(Selector::parse(&long).unwrap_err().message.contains("at most 4096 bytes"));
    }

    #[test]
    fn display_writes_the_canonical_form() {
        let cases = [
            (r#"arch="x86_64""#, r#"arch = "x86_64""#),
            (r#"(arch = "1" or os = "2") and hostname = "3""#, ""),
            (r#"((arch = "1"))"#, r#"arch = "1""#),
            (r#"not (arch = "1" and os = "2")"#, ""),
            (r#"arch = "1" or (os = "2" or hostname = "3")"#, ""),
            (r#"arch = "1" and (os = "2" and hostname = "3")"#, ""),
            (r#"arch = "1" or os = "2" and hostname = "3""#, ""),
            (r#"hostname = "q\"uote\\""#, ""),
            ("installed.sigdb>=41", "installed.sigdb >= 41"),
        ];
        for (text, want) in cases {
            let s = Selector::parse(text).unwrap();
            let want = if want.is_empty() { text } else { want };
            assert_eq!(s.to_string(), want, "{text}");
            assert_eq!(Selector::parse(&s.to_string()).unwrap(), s);
        }
    }

    fn field() -> impl Strategy<Value = Field> {
        prop_oneof![
            (0..STRING_FIELDS.len()).prop_map(|i| STRING_FIELDS[i].1.clone()),
            Just(Field::Tag),
            "[a-z0-9][a-z0-9._-]{0,8}".prop_map(Field::Installed),
        ]
    }

    fn comparison() -> impl Strategy<Value = Comparison> {
        (field(), "(?s).{0,12}", any::<u64>(), 0..7usize).prop_map(|(field, s, n, k)| {
            if matches!(field, Field::Installed(_)) {
                let op = [Op::Eq, Op::Ne, Op::Lt, Op::Le, Op::Gt, Op::Ge][k % 6];
                Comparison { field, op, value: Value::Int(n) }
            } else {
                let op = [Op::Eq, Op::Ne, Op::Glob][k % 3];
                Comparison { field, op, value: Value::Str(s) }
            }
        })
    }

    fn selector() -> impl Strategy<Value = Selector> {
        comparison().prop_map(Selector::Cmp).prop_recursive(5, 40, 4, |inner| {
            prop_oneof![
                inner.clone().prop_map(|s| Selector::Not(Box::new(s))),
                proptest::collection::vec(inner.clone(), 2..4).prop_map(Selector::And),
                proptest::collection::vec(inner, 2..4).prop_map(Selector::Or),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn display_round_trips(s in selector()) {
            let text = s.to_string();
            prop_assert_eq!(Selector::parse(&text).map_err(|e| format!("{text}: {e}")), Ok(s));
        }

        #[test]
        fn glob_without_wildcards_is_equality(p in "[a-z.-]{0,6}", t in "[a-z.-]{0,6}") {
            prop_assert_eq!(glob(&p, &t), p == t);
            let star = format!("{p}*");
            prop_assert_eq!(glob(&star, &t), t.starts_with(&p));
        }
    }
}
