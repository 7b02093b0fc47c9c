//! Where a recipient stages new files: a directory from which a rename into the data tree works.
//!
//! The apply moves staged files into the tree, and replaced ones out of it, with `renameat`, which works
//! only within one mount. Equal device numbers do not prove that: a bind mount of the same file system
//! (systemd mounts every `ReadWritePaths=` entry separately) has the device of the file system but is a
//! mount of its own, and `rename` across it fails with `EXDEV`. So a candidate is tried for real: a probe
//! file is renamed from it into the data tree's root and back, which catches every cause of `EXDEV` (bind
//! mounts, overlay file systems, other devices). The probe's name is unique, so it never replaces a file
//! of the tree, and it is in the tree only between the two renames.
//!
//! This module writes nothing into the data tree but that probe, and decides nothing about a reply.

use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use super::tree::Dir;

/// What systemd users have to change when no candidate works.
const FIX: &str = "under systemd every `ReadWritePaths=` entry is a mount of its own: list the data tree's parent \
                   directory there instead of the data tree itself, or set `staging-dir` to a directory on the data \
                   tree's mount (inside the same `ReadWritePaths=` entry)";

/// Chooses the staging root for the data tree `data`: `configured` if set, else `STATE/staging`, else
/// `.NAME.mailferry-staging` beside the data tree; the first from which a rename into the tree works.
///
/// # Errors
/// A missing data tree; a configured `staging-dir` from which files cannot be renamed into the tree; no
/// candidate that works (the error names each candidate, why it failed, and the fix).
pub fn choose(configured: Option<&Path>, state_dir: &Path, data: &Path) -> Result<PathBuf> {
    if !data.is_dir() {
        bail!("data tree `{}` is missing", data.display());
    }
    if let Some(dir) = configured {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create staging directory `{}`", dir.display()))?;
        probe(dir, data).with_context(|| {
            format!(
                "files cannot be renamed from staging-dir `{}` into data tree `{}`; it must be on the data tree's \
                 mount ({FIX})",
                dir.display(),
                data.display()
            )
        })?;
        return Ok(dir.to_owned());
    }
    let mut tried = Vec::new();
    let in_state = state_dir.join("staging");
    match std::fs::create_dir_all(&in_state).and_then(|()| probe(&in_state, data)) {
        Ok(()) => return Ok(in_state),
        Err(e) => tried.push((in_state, e)),
    }
    let parent = data.parent().context("the data tree has no parent directory")?;
    let name = data.file_name().map_or_else(|| "data".into(), |n| n.to_string_lossy().into_owned());
    let beside = parent.join(format!(".{name}.mailferry-staging"));
    match std::fs::create_dir_all(&beside).and_then(|()| probe(&beside, data)) {
        Ok(()) => {
            tracing::debug!(staging = %beside.display(), "staging beside the data tree");
            return Ok(beside);
        }
        Err(e) => tried.push((beside, e)),
    }
    let why: Vec<String> = tried.iter().map(|(p, e)| format!("from `{}`: {e}", p.display())).collect();
    bail!("cannot stage files for data tree `{}`: a rename into it fails {}; {FIX}", data.display(), why.join(", and "))
}

/// Renames a fresh probe file from `stage` into the root of `data` and back, then removes it.
///
/// # Errors
/// The error of the first step that failed: `EXDEV` when the two are on different mounts.
pub fn probe(stage: &Path, data: &Path) -> io::Result<()> {
    let from = Dir::open_root(stage)?;
    let to = Dir::open_root(data)?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let name = format!(".mailferry-staging-probe-{}-{nanos}", std::process::id());
    if to.kind(&name)?.is_some() {
        // Never rename over something in the tree, however unlikely the name.
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("`{name}` exists in the data tree")));
    }
    drop(from.create_file(&name, 0o600)?);
    let moved = from.rename_to(&name, &to, &name);
    if moved.is_ok() && to.rename_to(&name, &from, &name).is_err() {
        to.remove_file(&name)?;
    }
    let _ = from.remove_file(&name);
    moved
}

/// Whether `err` was caused by a rename across mounts (`EXDEV`).
pub fn is_cross_device(err: &anyhow::Error) -> bool {
    err.chain().any(|c| c.downcast_ref::<io::Error>().is_some_and(|e| e.raw_os_error() == Some(libc::EXDEV)))
}

/// Explains an apply that fails because its staging directory and the data tree are on different mounts,
/// so it can never finish where it runs now.
pub fn cross_device_help(stage_dir: &Path, data: &Path) -> String {
    format!(
        "staging directory `{}` and data tree `{}` are on different mounts, so no file can be renamed from one \
         into the other and the apply cannot finish here. Run `mailferry recipient run --once --no-request` once where both are on one \
         mount (outside the service's sandbox, as the service user), which finishes it; then fix the unit \
         ({FIX})",
        stage_dir.display(),
        data.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_directory_is_chosen_when_a_rename_works() {
        let tmp = tempfile::tempdir().unwrap();
        let (state, data) = (tmp.path().join("state"), tmp.path().join("data"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        assert_eq!(choose(None, &state, &data).unwrap(), state.join("staging"));
        // The probe leaves nothing behind on either side.
        assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(state.join("staging")).unwrap().count(), 0);
    }

    #[test]
    fn a_missing_data_tree_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = choose(None, tmp.path(), &tmp.path().join("nope")).unwrap_err();
        assert!(format!("{err:#}").contains("is missing"), "{err:#}");
    }

    #[test]
    fn cross_device_errors_are_recognised_through_context() {
        let e = anyhow::Error::new(io::Error::from_raw_os_error(libc::EXDEV)).context("failed to place `x`");
        assert!(is_cross_device(&e));
        let e = anyhow::Error::new(io::Error::from_raw_os_error(libc::ENOSPC)).context("failed to place `x`");
        assert!(!is_cross_device(&e));
    }
}
