//! Replacing a small file atomically, and only when its bytes change.
//!
//! The new content goes to a hidden temporary file in the same directory
//! (same file system, so the rename is atomic), is fsynced, renamed over the
//! final name, and the directory is fsynced so the rename survives a crash.
//! Readers see the old file or the new one, never a partial one; a failure
//! at any step leaves the old file in place and removes the temporary one.
//!
//! Blocking: call from `spawn_blocking`. The caller has checked the path
//! against the allowed roots; neither the final name nor the temporary one
//! is followed if it is a symlink.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

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

fn open_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// The current content of `path` equals `bytes` (read only as far as
/// needed). `Ok(None)`: there is no file.
fn same_content(path: &Path, bytes: &[u8]) -> std::io::Result<Option<(bool, std::fs::Metadata)>> {
    let file = match open_nofollow(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other(format!("{} is not a regular file", path.display())));
    }
    if meta.len() != bytes.len() as u64 {
        return Ok(Some((false, meta)));
    }
    let mut current = Vec::with_capacity(bytes.len());
    file.take(bytes.len() as u64 + 1).read_to_end(&mut current)?;
    Ok(Some((current == bytes, meta)))
}

fn temp_name(path: &Path) -> std::io::Result<PathBuf> {
    let parent = path.parent().ok_or_else(|| std::io::Error::other("the path has no parent directory"))?;
    let name = path.file_name().ok_or_else(|| std::io::Error::other("the path has no file name"))?;
    Ok(parent.join(format!(".{}.ferry-tmp", name.to_string_lossy())))
}

/// Makes `path` hold exactly `bytes`. An existing file with the same bytes
/// is left alone (same inode, same times). Otherwise the file is replaced
/// atomically, keeping an existing file's mode and (when permitted) owner;
/// a new file gets [`DEFAULT_MODE`]. Missing parent directories are created.
pub fn replace_if_changed(path: &Path, bytes: &[u8]) -> std::io::Result<Outcome> {
    let existing = match same_content(path, bytes)? {
        Some((true, _)) => return Ok(Outcome::Unchanged),
        Some((false, meta)) => Some(meta),
        None => None,
    };
    let parent = path.parent().ok_or_else(|| std::io::Error::other("the path has no parent directory"))?;
    std::fs::create_dir_all(parent)?;
    let temp = temp_name(path)?;
    // A temporary file left by a crash is stale: nobody else writes it.
    match std::fs::remove_file(&temp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let written = write_temp(&temp, bytes, existing.as_ref()).and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    // The rename is durable once the directory is.
    File::open(parent)?.sync_all()?;
    Ok(Outcome::Written)
}

fn write_temp(temp: &Path, bytes: &[u8], existing: Option<&std::fs::Metadata>) -> std::io::Result<()> {
    let mut file =
        OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).mode(0o600).open(temp)?;
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

    #[test]
    fn writes_only_changed_bytes_and_keeps_the_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub/dir/app.conf");
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
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("app.conf");
        std::fs::write(&path, b"good").unwrap();
        // A directory where the temporary file would go makes the write fail.
        std::fs::create_dir(temp_name(&path).unwrap()).unwrap();
        assert!(replace_if_changed(&path, b"new").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"good");
        // A stale temporary file from a crash is replaced.
        std::fs::remove_dir(temp_name(&path).unwrap()).unwrap();
        std::fs::write(temp_name(&path).unwrap(), b"partial").unwrap();
        assert_eq!(replace_if_changed(&path, b"new").unwrap(), Outcome::Written);
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!temp_name(&path).unwrap().exists());
    }

    #[test]
    fn refuses_a_symlink_or_a_directory_at_the_final_name() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("elsewhere");
        std::fs::write(&target, b"keep").unwrap();
        let link = tmp.path().join("link.conf");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(replace_if_changed(&link, b"x").is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let dir = tmp.path().join("dir.conf");
        std::fs::create_dir(&dir).unwrap();
        assert!(replace_if_changed(&dir, b"x").is_err());
    }
}
