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

    /// The key under which two names collide on a case-insensitive file system.
    pub fn fold_key(&self) -> String {
        self.0.to_lowercase()
    }
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
    fn deserializing_validates() {
        assert!(serde_json::from_str::<RelPath>("\"../x\"").is_err());
        assert_eq!(serde_json::from_str::<RelPath>("\"x/y\"").unwrap().as_str(), "x/y");
    }
}
