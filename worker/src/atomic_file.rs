//! Replacing a small file atomically, and only when its bytes change.
//!
//! The new content goes to a hidden temporary file in the same directory
//! (same file system, so the rename is atomic), is fsynced, renamed over the
//! final name, and the directory is fsynced so the rename survives a crash.
//! Readers see the old file or the new one, never a partial one; a failure
//! at any step leaves the old file in place and removes the temporary one.
//!
//! Blocking: call from `spawn_blocking`. The directory is opened through
//! [`Roots::create_dir`] (no symlink followed below the root, missing
//! directories created), and every name is read, created, renamed and
//! removed relative to that handle, so a directory swapped for a symlink
//! after the caller's check cannot lead the write elsewhere. Neither the
//! final name nor the temporary one is followed if it is a symlink.

use std::ffi::CStr;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::roots::{c_name, io_result, open_at, Roots};

/// Mode of a file created new (an existing file keeps its own).
pub const DEFAULT_MODE: u32 = 0o644;

/// What [`replace_if_changed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The file held these bytes already; nothing was touched.
    Unchanged,
    /// The file was created or replaced.
    Written,
}

/// The current content of `name` in `dir` equals `bytes` (read only as far
/// as needed). `Ok(None)`: there is no file.
fn same_content(dir: &OwnedFd, name: &CStr, bytes: &[u8]) -> std::io::Result<Option<(bool, std::fs::Metadata)>> {
    let file = match open_at(dir, name, libc::O_RDONLY | libc::O_NOFOLLOW, 0) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other(format!("{} is not a regular file", name.to_string_lossy())));
    }
    if meta.len() != bytes.len() as u64 {
        return Ok(Some((false, meta)));
    }
    let mut current = Vec::with_capacity(bytes.len());
    file.take(bytes.len() as u64 + 1).read_to_end(&mut current)?;
    Ok(Some((current == bytes, meta)))
}

/// The hidden temporary name beside `name`.
fn temp_name(name: &[u8]) -> Vec<u8> {
    [b".", name, b".ferry-tmp"].concat()
}

fn unlink(dir: &OwnedFd, name: &CStr) -> std::io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated name; the kernel only reads them.
    io_result(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) })
}

/// Makes `path` (below one of `roots`) hold exactly `bytes`. An existing
/// file with the same bytes is left alone (same inode, same times).
/// Otherwise the file is replaced atomically, keeping an existing file's
/// mode and (when permitted) owner; a new file gets [`DEFAULT_MODE`].
/// Missing parent directories are created.
pub fn replace_if_changed(roots: &Roots, path: &Path, bytes: &[u8]) -> std::io::Result<Outcome> {
    let parent = path.parent().ok_or_else(|| std::io::Error::other("the path has no parent directory"))?;
    let name = path.file_name().ok_or_else(|| std::io::Error::other("the path has no file name"))?.as_bytes();
    let dir = roots.create_dir(parent).map_err(std::io::Error::other)?;
    let (name, temp) =
        (c_name(name).map_err(std::io::Error::other)?, c_name(&temp_name(name)).map_err(std::io::Error::other)?);
    let existing = match same_content(&dir, &name, bytes)? {
        Some((true, _)) => return Ok(Outcome::Unchanged),
        Some((false, meta)) => Some(meta),
        None => None,
    };
    // A temporary file left by a crash is stale: nobody else writes it.
    match unlink(&dir, &temp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let written = write_temp(&dir, &temp, bytes, existing.as_ref()).and_then(|()| {
        // SAFETY: valid descriptor and NUL-terminated names; the kernel only reads them.
        io_result(unsafe { libc::renameat(dir.as_raw_fd(), temp.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
    });
    if let Err(e) = written {
        let _ = unlink(&dir, &temp);
        return Err(e);
    }
    // The rename is durable once the directory is.
    // SAFETY: a valid descriptor.
    io_result(unsafe { libc::fsync(dir.as_raw_fd()) })?;
    Ok(Outcome::Written)
}

fn write_temp(dir: &OwnedFd, temp: &CStr, bytes: &[u8], existing: Option<&std::fs::Metadata>) -> std::io::Result<()> {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
    let mut file = open_at(dir, temp, flags, 0o600)?;
    file.write_all(bytes)?;
    if let Some(meta) = existing {
        // Best effort: only root may give a file away; a worker running as
        // the file's owner already matches.
        let _ = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()));
    }
    // fchmod after fchown (which can clear setuid bits) and independent of
    // the umask.
    let mode = existing.map(|m| m.mode() & 0o7777).unwrap_or(DEFAULT_MODE);
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary directory as the one allowed root, and its canonical path.
    fn rooted() -> (tempfile::TempDir, Roots, std::path::PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let roots = Roots::new(&[tmp.path().to_path_buf()]).unwrap();
        let root = roots.list()[0].clone();
        (tmp, roots, root)
    }

    fn temp_path(path: &Path) -> std::path::PathBuf {
        path.with_file_name(std::ffi::OsStr::from_bytes(&temp_name(path.file_name().unwrap().as_bytes())))
    }

    #[test]
    fn writes_only_changed_bytes_and_keeps_the_mode() {
        let (_tmp, roots, root) = rooted();
        let replace_if_changed = |p: &Path, b: &[u8]| replace_if_changed(&roots, p, b);
        let path = root.join("sub/dir/app.conf");
        assert_eq!(replace_if_changed(&path, b"one\n").unwrap(), Outcome::Written);
        assert_eq!(std::fs::read(&path).unwrap(), b"one\n");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, DEFAULT_MODE);

        assert_eq!(replace_if_changed(&path, b"one\n").unwrap(), Outcome::Unchanged);
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), meta.ino(), "an unchanged file is not rewritten");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(replace_if_changed(&path, b"two\n").unwrap(), Outcome::Written);
        let after = std::fs::metadata(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two\n");
        assert_ne!(after.ino(), meta.ino(), "replaced by rename, not rewritten in place");
        assert_eq!(after.mode() & 0o7777, 0o600, "an existing file keeps its mode");
        // Same length, other bytes: still a change.
        assert_eq!(replace_if_changed(&path, b"owt\n").unwrap(), Outcome::Written);
        assert_eq!(replace_if_changed(&path, b"").unwrap(), Outcome::Written);
        assert_eq!(std::fs::read(&path).unwrap(), b"");

        let names: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("app.conf")], "no temporary file is left behind");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary_one() {
        let (_tmp, roots, root) = rooted();
        let replace_if_changed = |p: &Path, b: &[u8]| replace_if_changed(&roots, p, b);
        let path = root.join("app.conf");
        std::fs::write(&path, b"good").unwrap();
        // A directory where the temporary file would go makes the write fail.
        std::fs::create_dir(temp_path(&path)).unwrap();
        assert!(replace_if_changed(&path, b"new").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"good");
        // A stale temporary file from a crash is replaced.
        std::fs::remove_dir(temp_path(&path)).unwrap();
        std::fs::write(temp_path(&path), b"partial").unwrap();
        assert_eq!(replace_if_changed(&path, b"new").unwrap(), Outcome::Written);
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!temp_path(&path).exists());
    }

    #[test]
    fn refuses_a_symlink_or_a_directory_at_the_final_name() {
        let (_tmp, roots, root) = rooted();
        let replace_if_changed = |p: &Path, b: &[u8]| replace_if_changed(&roots, p, b);
        let target = root.join("elsewhere");
        std::fs::write(&target, b"keep").unwrap();
        let link = root.join("link.conf");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(replace_if_changed(&link, b"x").is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let dir = root.join("dir.conf");
        std::fs::create_dir(&dir).unwrap();
        assert!(replace_if_changed(&dir, b"x").is_err());
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_is_not_followed() {
        let (_tmp, roots, root) = rooted();
        let elsewhere = tempfile::tempdir().unwrap();
        let outside = elsewhere.path();
        let conf = root.join("etc/app/app.conf");
        assert_eq!(replace_if_changed(&roots, &conf, b"one").unwrap(), Outcome::Written);
        // After the caller's check, etc/app becomes a symlink leading out.
        std::fs::rename(root.join("etc/app"), root.join("etc/app.old")).unwrap();
        std::os::unix::fs::symlink(outside, root.join("etc/app")).unwrap();
        let err = replace_if_changed(&roots, &conf, b"two").unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
        // A missing directory is not created through a symlink either.
        let deeper = root.join("etc/app/new/app.conf");
        assert!(replace_if_changed(&roots, &deeper, b"two").is_err());
        assert_eq!(std::fs::read_dir(outside).unwrap().count(), 0, "nothing written outside the root");
        assert!(replace_if_changed(&roots, &outside.join("x.conf"), b"x").is_err(), "outside the roots");
    }
}
