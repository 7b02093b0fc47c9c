//! Validated tree-relative paths: the only form in which a path from the wire reaches the file system.
//!
//! A [`RelPath`] is a non-empty, `/`-separated, normalized relative UTF-8 path. Constructing one is the
//! single place where hostile names are refused; everything downstream (diff, apply planning, apply) can
//! join it onto the data root without re-checking. This module is pure: it never touches the file system.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest path accepted, in bytes (Linux `PATH_MAX` less room for the data root).
pub const MAX_PATH_BYTES: usize = 3072;
/// Longest single component accepted, in bytes (Linux `NAME_MAX`).
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Deepest nesting accepted.
pub const MAX_DEPTH: usize = 64;

/// Why a path was refused. Each variant names the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The empty string.
    #[error("path is empty")]
    Empty,
    /// Starts with `/`.
    #[error("path {0:?} is absolute")]
    Absolute(String),
    /// Has a `..` component.
    #[error("path {0:?} has a `..` component")]
    DotDot(String),
    /// Has a `.` component.
    #[error("path {0:?} has a `.` component")]
    Dot(String),
    /// Has an empty component (`a//b` or a trailing `/`).
    #[error("path {0:?} has an empty component")]
    EmptyComponent(String),
    /// Has a NUL byte.
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    /// Has a backslash, which Windows and some tools treat as a separator.
    #[error("path {0:?} contains a backslash")]
    Backslash(String),
    /// Has a control character (newline, escape...), which makes logs and terminals lie.
    #[error("path {0:?} contains a control character")]
    Control(String),
    /// Is not valid UTF-8.
    #[error("path {0:?} is not valid UTF-8")]
    NotUtf8(String),
    /// Too long, too deep, or a component too long.
    #[error("path {path:?} is too long ({why})")]
    TooLong {
        /// The offending path, possibly shortened.
        path: String,
        /// Which limit it broke.
        why: &'static str,
    },
}

/// A validated, normalized, tree-relative path such as `lib/x86_64/libfoo.so`.
///
/// Ordering is byte order of the UTF-8 string, which is also the order of the tree root (see
/// [`crate::manifest`]), so that a parent directory always sorts before its children.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(String);

impl RelPath {
    /// Validates `s` as a tree-relative path.
    ///
    /// # Errors
    /// Returns the first rule `s` breaks; see [`PathError`].
    pub fn new(s: &str) -> Result<RelPath, PathError> {
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        let shown = || shorten(s);
        if s.contains('\0') {
            return Err(PathError::Nul(shown()));
        }
        if s.contains('\\') {
            return Err(PathError::Backslash(shown()));
        }
        if s.chars().any(char::is_control) {
            return Err(PathError::Control(shown()));
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(shown()));
        }
        if s.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong { path: shown(), why: "more than 3072 bytes" });
        }
        let mut depth = 0;
        for comp in s.split('/') {
            depth += 1;
            match comp {
                "" => return Err(PathError::EmptyComponent(shown())),
                "." => return Err(PathError::Dot(shown())),
                ".." => return Err(PathError::DotDot(shown())),
                c if c.len() > MAX_COMPONENT_BYTES => {
                    return Err(PathError::TooLong { path: shown(), why: "a component over 255 bytes" });
                }
                _ => {}
            }
        }
        if depth > MAX_DEPTH {
            return Err(PathError::TooLong { path: shown(), why: "deeper than 64 levels" });
        }
        Ok(RelPath(s.to_owned()))
    }

    /// Validates raw bytes, as found in a directory entry.
    ///
    /// # Errors
    /// [`PathError::NotUtf8`] for invalid UTF-8, else as [`RelPath::new`].
    pub fn from_bytes(b: &[u8]) -> Result<RelPath, PathError> {
        match std::str::from_utf8(b) {
            Ok(s) => RelPath::new(s),
            Err(_) => Err(PathError::NotUtf8(String::from_utf8_lossy(b).into_owned())),
        }
    }

    /// The path as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parent path, or `None` for a top-level entry.
    pub fn parent(&self) -> Option<RelPath> {
        self.0.rsplit_once('/').map(|(p, _)| RelPath(p.to_owned()))
    }

    /// Every proper ancestor, outermost first: `a/b/c` gives `a`, `a/b`.
    pub fn ancestors(&self) -> impl Iterator<Item = RelPath> + '_ {
        self.0.match_indices('/').map(|(i, _)| RelPath(self.0[..i].to_owned()))
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit_once('/').map_or(&self.0, |(_, n)| n)
    }

    /// Number of components.
    pub fn depth(&self) -> usize {
        self.0.split('/').count()
    }

    /// Joins one more component (which must itself be valid).
    ///
    /// # Errors
    /// As [`RelPath::new`] on the joined path.
    pub fn join(&self, name: &str) -> Result<RelPath, PathError> {
        RelPath::new(&format!("{}/{name}", self.0))
    }

    /// Whether `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0 == other.0 || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }

    /// The key under which two paths name the same file on some file system a recipient may use: two paths
    /// whose keys are equal collide (see [`fold_name`] for what is folded).
    pub fn fold_key(&self) -> String {
        let mut key = String::with_capacity(self.0.len());
        for (i, comp) in self.0.split('/').enumerate() {
            if i > 0 {
                // NUL is never in a path nor produced by folding, so a component that folds to text holding a
                // `/` (U+2100 `℀` gives `a/c`) cannot be mistaken for two components.
                key.push('\0');
            }
            key.push_str(&fold_name(comp));
        }
        key
    }
}

/// Code points that HFS+ and APFS skip when comparing names, and that render as nothing: Unicode's
/// `Default_Ignorable_Code_Point` set (a superset of the ones git's `is_hfs_dotgit` skips, U+200C–U+200F,
/// U+202A–U+202E, U+206A–U+206F and U+FEFF). Written out here because the rule is part of the wire
/// protocol: owner and recipient must agree on it whatever Unicode version their libraries know.
const IGNORABLE: &[(char, char)] = &[
    ('\u{00AD}', '\u{00AD}'),
    ('\u{034F}', '\u{034F}'),
    ('\u{061C}', '\u{061C}'),
    ('\u{115F}', '\u{1160}'),
    ('\u{17B4}', '\u{17B5}'),
    ('\u{180B}', '\u{180F}'),
    ('\u{200B}', '\u{200F}'),
    ('\u{202A}', '\u{202E}'),
    ('\u{2060}', '\u{206F}'),
    ('\u{3164}', '\u{3164}'),
    ('\u{FE00}', '\u{FE0F}'),
    ('\u{FEFF}', '\u{FEFF}'),
    ('\u{FFA0}', '\u{FFA0}'),
    ('\u{FFF0}', '\u{FFF8}'),
    ('\u{1BCA0}', '\u{1BCA3}'),
    ('\u{1D173}', '\u{1D17A}'),
    ('\u{E0000}', '\u{E0FFF}'),
];

/// Whether `c` is skipped when names are compared (the list `IGNORABLE` in this file).
pub fn is_ignorable(c: char) -> bool {
    IGNORABLE.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

/// Each character upper-cased then lower-cased, with Unicode's full, locale-independent mappings.
fn fold_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else {
            c.to_uppercase().for_each(|u| out.extend(u.to_lowercase()));
        }
    }
    out
}

/// The form of one name under which names collide: two names with the same fold are one file on a file
/// system that normalizes Unicode (APFS and HFS+ compare canonically equivalent names, NFC `café` and NFD
/// `café`, as one), folds case (NTFS compares upper-cased names, APFS and HFS+ fold case by default), or
/// skips ignorable code points (HFS+).
///
/// The fold is deliberately wider than any one file system, so that one rule protects them all:
/// ignorable code points (see [`is_ignorable`]) are dropped; the name is brought to compatibility
/// decomposition (NFKD, which also merges `ﬁ` with `fi` and fullwidth `Ａ` with `A`); and each character is
/// upper-cased then lower-cased with Unicode's full, locale-independent mappings, twice, with NFKD between
/// and after. So `Straße`, `STRASSE` and `strasse` collide (full folding), `ẞ` with `ss`, the Kelvin sign
/// `K` with `k`, and the Turkish dotless `ı` with `i` and `I` (its upper case is `I`, as NTFS compares);
/// the dotted capital `İ` folds to `i` followed by U+0307 and does not collide with a plain `i`. An ASCII
/// name folds to its ASCII lower case.
pub fn fold_name(name: &str) -> String {
    if name.is_ascii() {
        return name.to_ascii_lowercase();
    }
    let nfkd = icu_normalizer::DecomposingNormalizerBorrowed::new_nfkd();
    let strip = |s: &str| -> String { s.chars().filter(|&c| !is_ignorable(c)).collect() };
    // Decompose, then map case and decompose again, twice, as Unicode's compatibility caseless match
    // does; NFKD being idempotent, a round whose case mapping changes nothing ends the fold early.
    let mut now = nfkd.normalize(&strip(name)).into_owned();
    for _ in 0..2 {
        let cased = fold_case(&now);
        if cased == now {
            return strip(&now);
        }
        now = nfkd.normalize(&cased).into_owned();
    }
    strip(&now)
}

fn shorten(s: &str) -> String {
    if s.len() <= 200 {
        return s.to_owned();
    }
    let mut end = 200;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Lets maps keyed by `RelPath` be searched with a `&str` (the derived order and hash are the string's).
impl std::borrow::Borrow<str> for RelPath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl Serialize for RelPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RelPath, D::Error> {
        let s = String::deserialize(d)?;
        RelPath::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_normal_paths() {
        for ok in ["a", "a/b", "lib/x86_64/libfoo.so.1", ".hidden", "a/.b/c", "ünïcode/名前", "a b/c d", "..."] {
            assert_eq!(RelPath::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_hostile_paths() {
        type Check = fn(&PathError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, PathError::Empty)),
            ("/etc/passwd", |e| matches!(e, PathError::Absolute(_))),
            ("..", |e| matches!(e, PathError::DotDot(_))),
            ("a/../../etc", |e| matches!(e, PathError::DotDot(_))),
            ("a/..", |e| matches!(e, PathError::DotDot(_))),
            (".", |e| matches!(e, PathError::Dot(_))),
            ("a/./b", |e| matches!(e, PathError::Dot(_))),
            ("a//b", |e| matches!(e, PathError::EmptyComponent(_))),
            ("a/", |e| matches!(e, PathError::EmptyComponent(_))),
            ("a\0b", |e| matches!(e, PathError::Nul(_))),
            ("a\\..\\b", |e| matches!(e, PathError::Backslash(_))),
            ("a\nb", |e| matches!(e, PathError::Control(_))),
        ];
        for (input, check) in cases {
            let err = RelPath::new(input).expect_err(input);
            assert!(check(&err), "{input:?} gave {err:?}");
        }
        assert!(matches!(RelPath::from_bytes(b"a/\xff"), Err(PathError::NotUtf8(_))));
        let deep = vec!["d"; MAX_DEPTH + 1].join("/");
        assert!(matches!(RelPath::new(&deep), Err(PathError::TooLong { .. })));
        let long_name = "x".repeat(256);
        assert!(matches!(RelPath::new(&long_name), Err(PathError::TooLong { .. })));
    }

    #[test]
    fn structure() {
        let p = RelPath::new("a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert_eq!(p.file_name(), "c");
        assert_eq!(p.ancestors().map(|a| a.0).collect::<Vec<_>>(), ["a", "a/b"]);
        assert!(p.starts_with(&RelPath::new("a/b").unwrap()));
        assert!(!RelPath::new("ab").unwrap().starts_with(&RelPath::new("a").unwrap()));
        assert_eq!(RelPath::new("a").unwrap().parent(), None);
    }

    #[test]
    fn names_that_one_file_system_or_another_holds_as_one_collide() {
        // (a, b, whether they collide, why)
        let cases: &[(&str, &str, bool, &str)] = &[
            ("README", "readme", true, "ASCII case"),
            ("caf\u{e9}", "cafe\u{301}", true, "NFC and NFD"),
            ("CAF\u{c9}", "cafe\u{301}", true, "NFC upper case and NFD lower case"),
            ("\u{212b}ngstr\u{f6}m", "\u{c5}ngstro\u{308}m", true, "the Angstrom sign is canonically A with ring"),
            ("a\u{327}\u{301}", "a\u{301}\u{327}", true, "combining marks in either order"),
            ("Stra\u{df}e", "STRASSE", true, "full case folding of sharp s"),
            ("stra\u{1e9e}e", "strasse", true, "capital sharp s"),
            ("\u{212a}elvin", "kelvin", true, "Kelvin sign"),
            ("\u{131}d", "id", true, "Turkish dotless i upper-cases to I"),
            ("\u{131}d", "ID", true, "Turkish dotless i against upper case"),
            ("\u{130}d", "i\u{307}d", true, "dotted capital I is i with a combining dot"),
            ("\u{130}d", "id", false, "dotted capital I is not a plain i"),
            ("\u{3c3}\u{3c2}", "\u{3a3}\u{3a3}", true, "Greek final sigma"),
            ("\u{fb01}le", "file", true, "ligature (compatibility form)"),
            ("\u{ff21}", "a", true, "fullwidth letter (compatibility form)"),
            ("\u{3392}", "mhz", true, "a compatibility form that decomposes to upper case"),
            ("a\u{200c}b", "ab", true, "zero width non-joiner (HFS+ ignorable)"),
            ("a\u{200d}b", "ab", true, "zero width joiner"),
            ("a\u{200e}b\u{202e}", "ab", true, "direction marks and overrides"),
            ("\u{feff}ab\u{206a}", "ab", true, "byte order mark and deprecated format characters"),
            ("a\u{ad}b", "ab", true, "soft hyphen"),
            ("a\u{fe0f}", "a", true, "variation selector"),
            ("a\u{e0041}", "a", true, "tag character"),
            ("a", "b", false, "different letters"),
            ("a\u{301}", "a", false, "an accent is not ignorable"),
            ("\u{e9}", "e", false, "an accented letter is not its base"),
            ("i", "j", false, "ASCII"),
            ("\u{2100}", "a/c", false, "a name never collides with a deeper path"),
        ];
        for (a, b, collide, why) in cases {
            let (pa, pb) = (RelPath::new(a).unwrap(), RelPath::new(b).unwrap());
            assert_eq!(pa.fold_key() == pb.fold_key(), *collide, "{why}: {a:?} {b:?}");
            // A collision of names is a collision of every path through them.
            let (da, db) = (RelPath::new(&format!("d/{a}/x")).unwrap(), RelPath::new(&format!("D/{b}/X")).unwrap());
            assert_eq!(da.fold_key() == db.fold_key(), *collide, "{why}, nested: {a:?} {b:?}");
        }
    }

    #[test]
    fn deserializing_validates() {
        assert!(serde_json::from_str::<RelPath>("\"../x\"").is_err());
        assert_eq!(serde_json::from_str::<RelPath>("\"x/y\"").unwrap().as_str(), "x/y");
    }
}
