//! Gathers a recipient's registration facts: the machine it runs on, what it has installed, its config.
//!
//! The platform comes from `uname` (the system call, through rustix) and `/etc/os-release`; the
//! preferences (`contact`, `update-timing`, `install`) from the `[recipient]` table; what is installed
//! from the state database. Every string is cut to the bounds of [`Facts::validate`] and stripped of
//! control characters here, so that an odd host name never stops a recipient from registering.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::config::RecipientConfig;
use crate::db::Db;
use crate::registration::{Facts, Installed, MAX_FACT_BYTES};

/// The channel today's one data tree is: until subscriptions name their channels it is `default`.
pub const DEFAULT_CHANNEL: &str = "default";

/// The platform part of the facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    /// `uname -s`, lowercase: `linux`.
    pub os: String,
    /// `uname -m`: `x86_64`.
    pub arch: String,
    /// `uname -n`.
    pub hostname: String,
    /// `ID VERSION_ID` from `/etc/os-release` (else `/usr/lib/os-release`): `debian 13`.
    pub os_release: Option<String>,
}

/// The platform this process runs on.
pub fn platform() -> Platform {
    let u = rustix::system::uname();
    let text = |s: &std::ffi::CStr| fact(&s.to_string_lossy());
    let os_release = ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| os_release(&t));
    Platform { os: text(u.sysname()).to_lowercase(), arch: text(u.machine()), hostname: text(u.nodename()), os_release }
}

/// `ID VERSION_ID` (or `ID` alone) of an os-release file, unquoted.
pub fn os_release(text: &str) -> Option<String> {
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let v = l.trim().strip_prefix(key)?.strip_prefix('=')?;
            let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
            (!v.is_empty()).then(|| v.to_owned())
        })
    };
    let id = value("ID")?;
    Some(fact(&match value("VERSION_ID") {
        Some(v) => format!("{id} {v}"),
        None => id,
    }))
}

/// What the recipient has applied, per channel it subscribes to (a channel with nothing applied yet is
/// left out).
///
/// # Errors
/// State failures.
pub fn installed(db: &Db, cfg: &RecipientConfig) -> Result<BTreeMap<String, Installed>> {
    let mut all = BTreeMap::new();
    for tree in &cfg.subscriptions {
        let (generation, root) = db.sub(&tree.channel)?.applied_root()?;
        if let Some(root) = root
            && generation > 0
        {
            all.insert(tree.channel.clone(), Installed { generation, root: root.to_hex() });
        }
    }
    Ok(all)
}

/// The facts of this recipient: the platform it runs on, `installed`, and its config's preferences.
/// `update-timing` defaults to the request interval (`every 1h`).
pub fn local_facts(cfg: &RecipientConfig, installed: BTreeMap<String, Installed>) -> Facts {
    facts_for(platform(), cfg, installed)
}

/// The facts from a given platform (for tests, and for a caller that gathered it once).
pub fn facts_for(p: Platform, cfg: &RecipientConfig, installed: BTreeMap<String, Installed>) -> Facts {
    let r = &cfg.recipient;
    Facts {
        arch: p.arch,
        contact: r.contact.as_deref().map(fact),
        hostname: p.hostname,
        install: r.install,
        installed,
        mailferry_version: env!("CARGO_PKG_VERSION").to_owned(),
        os: p.os,
        os_release: p.os_release,
        update_timing: Some(
            r.update_timing
                .as_deref()
                .map_or_else(|| format!("every {}", humantime::format_duration(r.interval)), fact),
        ),
    }
}

/// `s` without control characters, cut to at most [`MAX_FACT_BYTES`] on a character boundary.
fn fact(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_FACT_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{InstallMode, NodeConfig};

    fn config(extra: &str) -> (tempfile::TempDir, RecipientConfig) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recipient.toml");
        std::fs::write(
            &path,
            format!(
                "[recipient]\nname = \"r\"\naddress = \"r@x\"\nowner-address = \"o@x\"\ndata = \"data\"\n\
                 key-file = \"k\"\nstate-dir = \"state\"\ninterval = \"30m\"\n{extra}[transport]\nkind = \"maildir\"\nroot = \"s\"\n"
            ),
        )
        .unwrap();
        let NodeConfig::Recipient(cfg) = NodeConfig::load(&path).unwrap() else { panic!("recipient expected") };
        (dir, cfg)
    }

    #[test]
    fn os_release_files_read_as_id_and_version() {
        let cases = [
            (
                "PRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"13\"\nID=debian\n",
                Some("debian 13"),
            ),
            ("ID=arch\nBUILD_ID=rolling\n", Some("arch")),
            ("ID='alpine'\nVERSION_ID=3.20.1\n", Some("alpine 3.20.1")),
            ("ID_LIKE=debian\nNAME=x\n", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(os_release(text).as_deref(), want, "{text:?}");
        }
    }

    #[test]
    fn the_facts_take_the_configs_preferences_and_stay_in_bounds() {
        let (_d, cfg) = config("install = \"manual\"\ncontact = \"ops@customer.test\"\n");
        let p = Platform {
            os: "linux".into(),
            arch: "x86_64".into(),
            hostname: fact(&format!("evil\u{1b}[2J{}", "h".repeat(400))),
            os_release: Some("debian 13".into()),
        };
        let f = facts_for(p, &cfg, BTreeMap::new());
        assert_eq!(f.install, InstallMode::Manual);
        assert_eq!(f.contact.as_deref(), Some("ops@customer.test"));
        assert_eq!(f.update_timing.as_deref(), Some("every 30m"), "the interval when no timing is set");
        assert_eq!(f.hostname.len(), MAX_FACT_BYTES);
        assert!(f.hostname.starts_with("evil[2J"), "control characters are dropped");
        f.validate().unwrap();

        let (_d, cfg) = config("update-timing = \"nights\"\n");
        let f = local_facts(&cfg, BTreeMap::new());
        assert_eq!((f.install, f.update_timing.as_deref()), (InstallMode::Auto, Some("nights")));
        assert_eq!(f.os, std::env::consts::OS, "uname agrees with the build target");
        assert!(!f.arch.is_empty() && !f.hostname.is_empty());
        f.validate().unwrap();
        assert_eq!(fact(&"é".repeat(200)).len(), 256, "cut on a character boundary");
    }

    #[test]
    fn a_config_with_a_hostile_contact_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recipient.toml");
        for (extra, want) in [
            ("contact = \"a\\u001b[2Jb\"\n", "contact: holds a control character"),
            (&format!("update-timing = \"{}\"\n", "x".repeat(300)) as &str, "update-timing: is 300 bytes long"),
            ("install = \"sometimes\"\n", "unknown variant `sometimes`"),
        ] {
            std::fs::write(
                &path,
                format!(
                    "[recipient]\nname = \"r\"\naddress = \"r@x\"\nowner-address = \"o@x\"\ndata = \"data\"\n\
                     key-file = \"k\"\nstate-dir = \"state\"\n{extra}[transport]\nkind = \"maildir\"\nroot = \"s\"\n"
                ),
            )
            .unwrap();
            let err = format!("{:#}", NodeConfig::load(&path).unwrap_err());
            assert!(err.contains(want), "{extra}: {err}");
        }
    }

    #[test]
    fn installed_is_the_applied_generation_of_each_subscribed_channel() {
        let (_d, cfg) = config("");
        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        let db = Db::open(&cfg.state_dir.join("state.db")).unwrap();
        assert!(installed(&db, &cfg).unwrap().is_empty(), "nothing applied yet");
        let m = crate::manifest::Manifest::default();
        let id = crate::protocol::ReplyId::unchecked("0".repeat(32));
        db.sub("default").unwrap().record_applied(3, &m, &id, "n", 0, None).unwrap();
        // A channel this recipient does not subscribe to is not reported.
        db.sub("other").unwrap().record_applied(5, &m, &id, "n", 0, None).unwrap();
        let got = installed(&db, &cfg).unwrap();
        assert_eq!(got, BTreeMap::from([("default".to_owned(), Installed { generation: 3, root: m.root().to_hex() })]));
        local_facts(&cfg, got).validate().unwrap();
    }
}
