//! Directory handles: how the apply writes into the data tree without following symbolic links.
//!
//! Every change starts from one handle on the data tree's root. Each parent component of a path is opened
//! relative to the handle before it with `openat(O_DIRECTORY | O_NOFOLLOW)`, and the final component is
//! acted on with a `*at` call relative to its parent's handle (`renameat`, `unlinkat`, `mkdirat`,
//! `symlinkat`, `linkat`, and `fchmod` on a file opened with `O_NOFOLLOW`). A symbolic link or a file
//! swapped in for a directory anywhere on the way makes the walk fail with [`WalkError::NotDir`], and a
//! link swapped in for the final component is acted on as a link (renamed over, removed), never through.
//! So a swap between a check and a write cannot redirect the write outside the tree.
//!
//! Only the root's own path is resolved, once, when it is opened: it is the operator's configuration, not
//! part of the tree.
//!
//! This module performs what [`super::Journal::execute`] and the rollback ask for; it decides nothing.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode as RawMode, OFlags};
use rustix::io::Errno;

use crate::path::RelPath;

/// What is at a name inside a directory (not following a symbolic link).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Link,
    /// A device, FIFO or socket.
    Special,
}

/// Why the parent directory of a path could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    /// A component does not exist.
    #[error("`{at}` does not exist")]
    Missing {
        /// The tree-relative path of the missing component.
        at: String,
    },
    /// A component is a symbolic link, a file or something else that is not a directory.
    #[error("`{at}` is not a directory (a symbolic link or a file is in its place); nothing is written through it")]
    NotDir {
        /// The tree-relative path of the component.
        at: String,
    },
    /// Opening a component failed otherwise (permissions, I/O).
    #[error("failed to open directory `{at}`")]
    Io {
        /// The tree-relative path of the component.
        at: String,
        /// The cause.
        source: io::Error,
    },
}

/// An open directory, reached without following any symbolic link below the root it was opened from.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

fn no_follow_dir() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

impl Dir {
    /// Opens the directory at `path`, resolving `path` itself first (a data tree configured through a
    /// symbolic link stays usable), then opening the result with `O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC`.
    ///
    /// # Errors
    /// I/O errors, or `path` is not a directory.
    pub fn open_root(path: &Path) -> io::Result<Dir> {
        let real = std::fs::canonicalize(path)?;
        let fd = rustix::fs::open(&real, no_follow_dir(), RawMode::empty())?;
        Ok(Dir { fd, path: path.to_path_buf() })
    }

    /// The path this handle was reached by, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the directory `name` inside this one, refusing a symbolic link.
    ///
    /// # Errors
    /// `NotFound`; `ENOTDIR` when `name` is a link, a file or anything but a directory; other I/O errors.
    pub fn open_dir(&self, name: &str) -> io::Result<Dir> {
        let fd = rustix::fs::openat(&self.fd, name, no_follow_dir(), RawMode::empty()).map_err(not_dir_on_loop)?;
        Ok(Dir { fd, path: self.path.join(name) })
    }

    /// Walks from this directory (a tree's root) to the parent of `rel`, one component at a time, and
    /// returns the parent's handle and `rel`'s last component.
    ///
    /// # Errors
    /// See [`WalkError`].
    pub fn walk_parent<'a>(&self, rel: &'a RelPath) -> Result<(Dir, &'a str), WalkError> {
        let s = rel.as_str();
        let (parent, name) = s.rsplit_once('/').unwrap_or(("", s));
        let fd = self.fd.try_clone().map_err(|source| WalkError::Io { at: ".".into(), source })?;
        let mut dir = Dir { fd, path: self.path.clone() };
        if parent.is_empty() {
            return Ok((dir, name));
        }
        let mut end = 0;
        for part in parent.split('/') {
            end += part.len();
            let at = &parent[..end];
            end += 1;
            dir = dir.open_dir(part).map_err(|source| match source.raw_os_error() {
                Some(libc::ENOENT) => WalkError::Missing { at: at.to_owned() },
                Some(libc::ENOTDIR) => WalkError::NotDir { at: at.to_owned() },
                _ => WalkError::Io { at: at.to_owned(), source },
            })?;
        }
        Ok((dir, name))
    }

    /// Walks from this directory (a tree's root) to the directory `rel` itself.
    ///
    /// # Errors
    /// See [`WalkError`].
    pub fn walk_dir(&self, rel: &RelPath) -> Result<Dir, WalkError> {
        let (parent, name) = self.walk_parent(rel)?;
        parent.open_dir(name).map_err(|source| match source.raw_os_error() {
            Some(libc::ENOENT) => WalkError::Missing { at: rel.to_string() },
            Some(libc::ENOTDIR) => WalkError::NotDir { at: rel.to_string() },
            _ => WalkError::Io { at: rel.to_string(), source },
        })
    }

    /// What `name` is, without following a symbolic link; `None` when nothing is there.
    ///
    /// # Errors
    /// I/O errors other than `NotFound`.
    pub fn kind(&self, name: &str) -> io::Result<Option<Kind>> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => Kind::Dir,
                FileType::RegularFile => Kind::File,
                FileType::Symlink => Kind::Link,
                _ => Kind::Special,
            })),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Renames `name` in this directory to `to_name` in `to` (replacing a file or link there, never
    /// following one).
    ///
    /// # Errors
    /// I/O errors.
    pub fn rename_to(&self, name: &str, to: &Dir, to_name: &str) -> io::Result<()> {
        Ok(rustix::fs::renameat(&self.fd, name, &to.fd, to_name)?)
    }

    /// Makes `to_name` in `to` a second hard link to `name` in this directory (a symbolic link is linked
    /// as itself).
    ///
    /// # Errors
    /// I/O errors.
    pub fn hard_link_to(&self, name: &str, to: &Dir, to_name: &str) -> io::Result<()> {
        Ok(rustix::fs::linkat(&self.fd, name, &to.fd, to_name, AtFlags::empty())?)
    }

    /// Removes the file or symbolic link `name`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn remove_file(&self, name: &str) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())?)
    }

    /// Removes the empty directory `name`.
    ///
    /// # Errors
    /// I/O errors (not empty, not a directory).
    pub fn remove_dir(&self, name: &str) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR)?)
    }

    /// Creates the directory `name` with `mode` (less the umask).
    ///
    /// # Errors
    /// I/O errors, `AlreadyExists` among them.
    pub fn create_dir(&self, name: &str, mode: u32) -> io::Result<()> {
        Ok(rustix::fs::mkdirat(&self.fd, name, RawMode::from_bits_truncate(mode))?)
    }

    /// Creates the symbolic link `name` pointing at `target`.
    ///
    /// # Errors
    /// I/O errors, `AlreadyExists` among them.
    pub fn symlink(&self, target: &str, name: &str) -> io::Result<()> {
        Ok(rustix::fs::symlinkat(target, &self.fd, name)?)
    }

    /// The target of the symbolic link `name`.
    ///
    /// # Errors
    /// I/O errors; `EINVAL` when `name` is not a link.
    pub fn read_link(&self, name: &str) -> io::Result<OsString> {
        let target = rustix::fs::readlinkat(&self.fd, name, Vec::new())?;
        Ok(OsString::from_vec(target.into_bytes()))
    }

    /// Opens the regular file `name` for reading, refusing a symbolic link, and anything that is not a
    /// regular file (without blocking on a FIFO).
    ///
    /// # Errors
    /// I/O errors, and `InvalidInput` when `name` is not a regular file.
    pub fn open_file(&self, name: &str) -> io::Result<File> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let f =
            File::from(rustix::fs::openat(&self.fd, name, flags, RawMode::empty()).map_err(|e| self.link_refused(e))?);
        if !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{}` is not a regular file", self.path.join(name).display()),
            ));
        }
        Ok(f)
    }

    /// Creates the file `name` for writing with `O_CREAT | O_EXCL | O_NOFOLLOW`: never an existing file,
    /// never through a link.
    ///
    /// # Errors
    /// I/O errors, `AlreadyExists` among them.
    pub fn create_file(&self, name: &str, mode: u32) -> io::Result<File> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        Ok(File::from(rustix::fs::openat(&self.fd, name, flags, RawMode::from_bits_truncate(mode))?))
    }

    /// Sets the permission bits of the regular file `name`. The file is opened with `O_NOFOLLOW` and
    /// changed through that descriptor (`fchmodat` cannot refuse a link on Linux), so a link swapped in is
    /// refused, not followed.
    ///
    /// # Errors
    /// I/O errors, and `InvalidInput` when `name` is not a regular file.
    pub fn set_file_mode(&self, name: &str, mode: u32) -> io::Result<()> {
        let f = match self.open_file(name) {
            // A file its owner may not read can still be opened for writing (without truncation).
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                let flags = OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
                let f = File::from(
                    rustix::fs::openat(&self.fd, name, flags, RawMode::empty()).map_err(|e| self.link_refused(e))?,
                );
                if !f.metadata()?.is_file() {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
                }
                f
            }
            other => other?,
        };
        Ok(rustix::fs::fchmod(&f, RawMode::from_bits_truncate(mode))?)
    }

    /// Sets the permission bits of the directory `name`, refusing a symbolic link.
    ///
    /// # Errors
    /// I/O errors; `ENOTDIR` when `name` is not a directory.
    pub fn set_dir_mode(&self, name: &str, mode: u32) -> io::Result<()> {
        let d = self.open_dir(name)?;
        Ok(rustix::fs::fchmod(&d.fd, RawMode::from_bits_truncate(mode))?)
    }

    /// Flushes this directory's entries to disk.
    ///
    /// # Errors
    /// I/O errors.
    pub fn sync(&self) -> io::Result<()> {
        Ok(rustix::fs::fsync(&self.fd)?)
    }
}

impl Dir {
    /// `O_NOFOLLOW` on a link reports `ELOOP` ("too many levels of symbolic links"): say what happened.
    fn link_refused(&self, e: Errno) -> io::Error {
        if e == Errno::LOOP {
            io::Error::new(io::ErrorKind::InvalidInput, "it is a symbolic link, which is never followed")
        } else {
            e.into()
        }
    }
}

/// `open(O_DIRECTORY | O_NOFOLLOW)` on a link reports `ENOTDIR` on Linux, `ELOOP` elsewhere: one answer.
fn not_dir_on_loop(e: Errno) -> io::Error {
    if e == Errno::LOOP { Errno::NOTDIR.into() } else { e.into() }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::{Read, Write};
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn walks_directories_and_refuses_links_and_files_on_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(root.join("file"), b"x").unwrap();
        symlink(&outside, root.join("link")).unwrap();
        symlink("a", root.join("inner-link")).unwrap();
        let dir = Dir::open_root(&root).unwrap();

        let (abc, top) = (p("a/b/c"), p("top"));
        let (parent, name) = dir.walk_parent(&abc).unwrap();
        assert_eq!((parent.path(), name), (root.join("a/b").as_path(), "c"));
        let (parent, name) = dir.walk_parent(&top).unwrap();
        assert_eq!((parent.path(), name), (root.as_path(), "top"));
        for (path, at) in [("link/x", "link"), ("inner-link/b/x", "inner-link"), ("file/x", "file")] {
            match dir.walk_parent(&p(path)) {
                Err(WalkError::NotDir { at: got }) => assert_eq!(got, at, "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
        assert!(matches!(dir.walk_parent(&p("a/nope/x")), Err(WalkError::Missing { at }) if at == "a/nope"));
        assert!(matches!(dir.walk_dir(&p("link")), Err(WalkError::NotDir { .. })));
        assert_eq!(dir.walk_dir(&p("a/b")).unwrap().path(), root.join("a/b"));
    }

    #[test]
    fn acts_on_links_as_links_never_through_them() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("secret"), b"keep").unwrap();
        fs::set_permissions(outside.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        symlink(outside.join("secret"), root.join("to-file")).unwrap();
        symlink(&outside, root.join("to-dir")).unwrap();
        let dir = Dir::open_root(&root).unwrap();

        assert_eq!(dir.kind("to-file").unwrap(), Some(Kind::Link));
        assert_eq!(dir.kind("nothing").unwrap(), None);
        assert_eq!(dir.read_link("to-dir").unwrap(), outside.as_os_str());
        // Neither opening, nor a mode change, nor a directory mode change goes through a link.
        assert!(dir.open_file("to-file").is_err());
        assert!(dir.set_file_mode("to-file", 0o755).is_err());
        assert!(dir.set_dir_mode("to-dir", 0o777).is_err());
        assert!(dir.open_dir("to-dir").is_err());
        assert!(dir.create_file("to-file", 0o644).is_err(), "O_EXCL refuses an existing link");
        assert_eq!(fs::metadata(outside.join("secret")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&outside).unwrap().permissions().mode() & 0o777, 0o755);
        // Removing and renaming over a link affect the link.
        dir.remove_file("to-file").unwrap();
        fs::write(root.join("new"), b"new").unwrap();
        dir.rename_to("new", &dir, "to-dir").unwrap();
        assert_eq!(fs::read(root.join("to-dir")).unwrap(), b"new");
        assert_eq!(fs::read(outside.join("secret")).unwrap(), b"keep");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    }

    #[test]
    fn creates_changes_and_removes_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_root(tmp.path()).unwrap();
        dir.create_dir("d", 0o700).unwrap();
        assert_eq!(dir.create_dir("d", 0o700).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        dir.set_dir_mode("d", 0o755).unwrap();
        assert_eq!(fs::metadata(tmp.path().join("d")).unwrap().permissions().mode() & 0o777, 0o755);
        let d = dir.open_dir("d").unwrap();
        d.create_file("f", 0o600).unwrap().write_all(b"hello").unwrap();
        d.set_file_mode("f", 0o755).unwrap();
        assert_eq!(fs::metadata(tmp.path().join("d/f")).unwrap().permissions().mode() & 0o777, 0o755);
        let mut s = String::new();
        d.open_file("f").unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        d.hard_link_to("f", &dir, "g").unwrap();
        d.symlink("f", "l").unwrap();
        assert_eq!(d.kind("l").unwrap(), Some(Kind::Link));
        assert_eq!(dir.kind("g").unwrap(), Some(Kind::File));
        d.remove_file("f").unwrap();
        d.remove_file("l").unwrap();
        d.sync().unwrap();
        dir.remove_dir("d").unwrap();
        assert_eq!(fs::read(tmp.path().join("g")).unwrap(), b"hello");
    }
}
