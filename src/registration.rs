//! Registration: what a recipient tells its owner about itself, and the selectors that pick recipients by it.
//!
//! A recipient's [`Facts`] (platform, what it has installed per channel, its update timing, whether it
//! installs automatically, a contact) travel to the owner in an authenticated registration message
//! (`docs/protocol.md`, "Registration facts"). Grants may carry a [`selector::Selector`] over the facts
//! and the tags the owner sets; [`list`] reads the lists that bulk enrollment takes.
//!
//! Pure: nothing here opens a file, reads the clock or draws random bytes. The facts of the machine a
//! recipient runs on are gathered by [`crate::node::registration`].

pub mod list;
pub mod selector;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::config::InstallMode;

/// Most bytes of one string fact (`hostname`, `contact`, an installed root, ...).
pub const MAX_FACT_BYTES: usize = 256;
/// Most channels one recipient reports as installed.
pub const MAX_CHANNELS: usize = 64;
/// Most bytes of a name: a recipient, a tag, a channel.
pub const MAX_NAME_BYTES: usize = 64;
/// Most bytes of encoded facts a decoder reads.
pub const MAX_FACTS_JSON: usize = 32 * 1024;

/// What a recipient reports about itself.
///
/// On the wire this is one JSON object with kebab-case keys. Unknown keys are ignored when decoding, so
/// that a newer recipient can report more than an older owner reads. The fields are declared in the
/// order of their keys, and every map is sorted, so [`Facts::to_canonical_json`] writes keys sorted
/// without whitespace and the same facts always give the same bytes and the same [`Facts::digest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Facts {
    /// The machine's architecture as `uname -m` says it: `x86_64`, `aarch64`.
    pub arch: String,
    /// Who to contact about this machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact: Option<String>,
    /// The machine's host name.
    pub hostname: String,
    /// Whether updates are installed as they arrive or wait for the operator.
    pub install: InstallMode,
    /// What is installed per channel (channel name to generation and tree root); a channel with
    /// nothing applied yet is absent.
    #[serde(default)]
    pub installed: BTreeMap<String, Installed>,
    /// The mailferry version the recipient runs.
    pub mailferry_version: String,
    /// The operating system, lowercase: `linux`.
    pub os: String,
    /// The distribution and its version from `/etc/os-release`: `debian 13`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_release: Option<String>,
    /// When the recipient prefers to be updated: free text, or its interval or apply window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_timing: Option<String>,
}

/// What one channel has applied on a recipient.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Installed {
    /// The generation applied.
    pub generation: u64,
    /// Its tree root, 64 lowercase hex digits.
    pub root: String,
}

/// Why facts were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FactsError {
    /// The encoded facts are larger than [`MAX_FACTS_JSON`].
    #[error("registration facts of {bytes} bytes are larger than the {max} allowed")]
    TooLarge {
        /// Their size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// Not JSON of the facts' shape.
    #[error("registration facts are not valid: {0}")]
    Malformed(String),
    /// A string fact is too long or holds control characters.
    #[error("registration fact `{field}`: {problem}")]
    BadString {
        /// The fact's key (`installed.NAME.root` for a root).
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// More channels than [`MAX_CHANNELS`].
    #[error("registration facts list {count} installed channels, more than the {max} allowed")]
    TooManyChannels {
        /// How many.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A channel name that is not a name.
    #[error("registration facts: installed channel {name:?}: {problem}")]
    BadChannel {
        /// The name, as given.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl Facts {
    /// Checks every bound: each string at most [`MAX_FACT_BYTES`] and free of control characters, at most
    /// [`MAX_CHANNELS`] channels with valid names, each root 64 lowercase hex digits.
    ///
    /// # Errors
    /// The first fact out of bounds.
    pub fn validate(&self) -> Result<(), FactsError> {
        let strings = [
            ("arch", Some(&self.arch)),
            ("contact", self.contact.as_ref()),
            ("hostname", Some(&self.hostname)),
            ("mailferry-version", Some(&self.mailferry_version)),
            ("os", Some(&self.os)),
            ("os-release", self.os_release.as_ref()),
            ("update-timing", self.update_timing.as_ref()),
        ];
        for (field, value) in strings {
            if let Some(v) = value {
                check_fact(v).map_err(|problem| FactsError::BadString { field: field.into(), problem })?;
            }
        }
        if self.installed.len() > MAX_CHANNELS {
            return Err(FactsError::TooManyChannels { count: self.installed.len(), max: MAX_CHANNELS });
        }
        for (name, installed) in &self.installed {
            check_name(name).map_err(|problem| FactsError::BadChannel { name: name.clone(), problem })?;
            let root = &installed.root;
            if root.len() != 64 || !root.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return Err(FactsError::BadString {
                    field: format!("installed.{name}.root"),
                    problem: "is not 64 lowercase hex digits".into(),
                });
            }
        }
        Ok(())
    }

    /// Decodes facts from their JSON, bounded: at most [`MAX_FACTS_JSON`] bytes, then [`Facts::validate`].
    /// Unknown keys are ignored.
    ///
    /// # Errors
    /// Too large, malformed, or out of bounds.
    pub fn from_json(bytes: &[u8]) -> Result<Facts, FactsError> {
        if bytes.len() > MAX_FACTS_JSON {
            return Err(FactsError::TooLarge { bytes: bytes.len(), max: MAX_FACTS_JSON });
        }
        let facts: Facts = serde_json::from_slice(bytes).map_err(|e| FactsError::Malformed(e.to_string()))?;
        facts.validate()?;
        Ok(facts)
    }

    /// The canonical encoding: compact JSON, keys sorted (the field order is the key order, maps are
    /// sorted), absent optional facts left out.
    pub fn to_canonical_json(&self) -> Vec<u8> {
        // Serializing plain strings, integers and sorted maps cannot fail.
        serde_json::to_vec(self).expect("facts serialize")
    }

    /// BLAKE3 of the canonical encoding: equal digests mean equal facts, so a recipient registers
    /// again only when its digest changed.
    pub fn digest(&self) -> [u8; 32] {
        *blake3::hash(&self.to_canonical_json()).as_bytes()
    }
}

/// Checks one free-text fact: at most [`MAX_FACT_BYTES`] bytes and no control characters (which could
/// rewrite an operator's terminal when `owner show` prints them).
///
/// # Errors
/// What is wrong, in words.
pub fn check_fact(s: &str) -> Result<(), String> {
    if s.len() > MAX_FACT_BYTES {
        return Err(format!("is {} bytes long, more than the {MAX_FACT_BYTES} allowed", s.len()));
    }
    if s.chars().any(char::is_control) {
        return Err("holds a control character".into());
    }
    Ok(())
}

/// Checks a name (a recipient, a tag, a channel): 1 to [`MAX_NAME_BYTES`] letters, digits, `-`, `_`
/// and `.`, not starting with `.` (so a name never makes a hidden file, nor `.` or `..`).
///
/// # Errors
/// What is wrong, in words.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!("must be 1-{MAX_NAME_BYTES} characters long"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err("may hold only letters, digits, `-`, `_` and `.`".into());
    }
    if name.starts_with('.') {
        return Err("must not start with `.`".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Facts {
        Facts {
            arch: "x86_64".into(),
            contact: Some("ops@customer.test".into()),
            hostname: "web-1".into(),
            install: InstallMode::Auto,
            installed: BTreeMap::from([
                ("sigdb".into(), Installed { generation: 41, root: "ab".repeat(32) }),
                ("engine".into(), Installed { generation: 7, root: "cd".repeat(32) }),
            ]),
            mailferry_version: "0.1.0".into(),
            os: "linux".into(),
            os_release: Some("debian 13".into()),
            update_timing: Some("every 1h".into()),
        }
    }

    #[test]
    fn the_canonical_encoding_is_compact_and_sorted_and_decodes_back() {
        let f = sample();
        let json = f.to_canonical_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.starts_with(r#"{"arch":"x86_64","contact":"ops@customer.test","hostname":"web-1""#), "{text}");
        assert!(!text.contains('\n') && !text.contains("\": ") && !text.contains(", \""), "compact: {text}");
        // serde_json's Value sorts keys: the canonical bytes are the sorted encoding.
        let sorted = serde_json::to_vec(&serde_json::to_value(&f).unwrap()).unwrap();
        assert_eq!(json, sorted);
        assert_eq!(Facts::from_json(&json).unwrap(), f);
        assert_eq!(f.digest(), sample().digest());
        let mut g = sample();
        g.installed.get_mut("sigdb").unwrap().generation = 42;
        assert_ne!(f.digest(), g.digest(), "a new generation is a change");
    }

    #[test]
    fn newer_facts_decode_and_absent_optional_ones_stay_absent() {
        let text = br#"{"arch":"aarch64","hostname":"h","install":"manual","mailferry-version":"9.0","os":"linux",
            "gpu":"none","future":{"nested":[1,2,3]}}"#;
        let f = Facts::from_json(text).unwrap();
        assert_eq!(
            (f.arch.as_str(), f.install, f.contact.as_deref(), f.installed.len()),
            ("aarch64", InstallMode::Manual, None, 0)
        );
        assert!(!String::from_utf8(f.to_canonical_json()).unwrap().contains("contact"));
    }

    #[test]
    fn facts_out_of_bounds_are_refused() {
        let long = "x".repeat(MAX_FACT_BYTES + 1);
        type Edit = Box<dyn Fn(&mut Facts)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|f| f.hostname = "x".repeat(MAX_FACT_BYTES + 1)), "`hostname`: is 257 bytes long"),
            (Box::new(|f| f.contact = Some("evil\u{1b}[2J".into())), "`contact`: holds a control character"),
            (Box::new(|f| f.os_release = Some("a\nb".into())), "`os-release`: holds a control character"),
            (
                Box::new(|f| {
                    for i in 0..=MAX_CHANNELS {
                        f.installed.insert(format!("c{i}"), Installed { generation: 1, root: "0".repeat(64) });
                    }
                }),
                "installed channels, more than the 64 allowed",
            ),
            (
                Box::new(|f| {
                    f.installed.insert("../x".into(), Installed { generation: 1, root: "0".repeat(64) });
                }),
                "channel \"../x\"",
            ),
            (
                Box::new(|f| {
                    f.installed.insert("c".into(), Installed { generation: 1, root: "ZZ".into() });
                }),
                "`installed.c.root`: is not 64 lowercase hex digits",
            ),
        ];
        for (i, (edit, want)) in cases.into_iter().enumerate() {
            let mut f = sample();
            edit(&mut f);
            let err = f.validate().unwrap_err().to_string();
            assert!(err.contains(want), "case {i}: {err}");
            // Decoding applies the same bounds.
            assert_eq!(Facts::from_json(&f.to_canonical_json()).unwrap_err().to_string(), err);
        }
        sample().validate().unwrap();
        let big = format!(r#"{{"arch":"{}"}}"#, "x".repeat(MAX_FACTS_JSON));
        assert!(matches!(Facts::from_json(big.as_bytes()), Err(FactsError::TooLarge { .. })));
        assert!(matches!(Facts::from_json(b"{\"arch\": 1}"), Err(FactsError::Malformed(_))));
        assert!(check_fact(&long).is_err());
    }

    #[test]
    fn names_are_plain_and_never_hidden() {
        for good in ["site1", "a", "web-01.eu_x", &"n".repeat(64)] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "ü", &"n".repeat(65), "a\0"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
