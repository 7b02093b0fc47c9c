//! Registration facts and grant selectors (placeholder until the registration branch lands).

use std::collections::BTreeSet;

/// A recipient's registration facts.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Facts {}

/// A selector over registration facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector;

impl Selector {
    /// Parses a selector.
    ///
    /// # Errors
    /// Always, for now.
    pub fn parse(s: &str) -> Result<Selector, String> {
        Err(format!("selectors are not supported yet: {s:?}"))
    }

    /// Whether facts and tags match.
    pub fn matches(&self, _facts: Option<&Facts>, _tags: &BTreeSet<String>) -> bool {
        false
    }
}
