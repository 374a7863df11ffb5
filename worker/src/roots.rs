//! The allowed roots: a worker reads (as a source) and writes (as a target)
//! only below them. Paths must be absolute with no `.` or `..` parts; the
//! deepest existing ancestor is resolved (symlinks included) and must lie in
//! a root, so a symlink cannot lead a write outside.
//!
//! A check by path holds only at the moment it is made: a directory on the
//! way could be swapped for a symlink before the write. So a target writes
//! through a handle on the destination's directory, opened by
//! [`Roots::open_dir`] without following any symlink below the root, and
//! creates, renames and removes names relative to that handle.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// The canonical allowed roots of one worker.
#[derive(Debug, Clone)]
pub struct Roots {
    roots: Vec<PathBuf>,
}

fn plain_absolute(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("{path} is not an absolute path"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err(format!("{path} contains . or .."));
    }
    Ok(p.to_path_buf())
}

impl Roots {
    /// Creates missing roots and resolves them.
    pub fn new(roots: &[PathBuf]) -> std::io::Result<Self> {
        let mut out = Vec::new();
        for r in roots {
            std::fs::create_dir_all(r)?;
            out.push(r.canonicalize()?);
        }
        Ok(Self { roots: out })
    }

    /// The roots, resolved.
    pub fn list(&self) -> &[PathBuf] {
        &self.roots
    }

    fn inside(&self, resolved: &Path) -> bool {
        self.roots.iter().any(|r| resolved.starts_with(r))
    }

    /// An existing file to read: resolved completely and inside a root.
    pub fn check_read(&self, path: &str) -> Result<PathBuf, String> {
        let p = plain_absolute(path)?;
        let resolved = p.canonicalize().map_err(|e| format!("{path}: {e}"))?;
        if !self.inside(&resolved) {
            return Err(format!("{path} is outside the allowed roots"));
        }
        if !resolved.is_file() {
            return Err(format!("{path} is not a regular file"));
        }
        Ok(resolved)
    }

    /// Opens directory `dir`, a directory below a root (as in a path
    /// [`Roots::check_write`] returned), following no symlink on the way
    /// from the root: a directory swapped for a symlink since the check is
    /// refused, not followed. Names created, renamed or removed relative to
    /// the handle stay in that directory, wherever a path points later.
    pub fn open_dir(&self, dir: &Path) -> Result<OwnedFd, String> {
        let shown = dir.display();
        let root = self
            .roots
            .iter()
            .filter(|r| dir.starts_with(r))
            .max_by_key(|r| r.as_os_str().len())
            .ok_or_else(|| format!("{shown} is outside the allowed roots"))?;
        let rest = dir.strip_prefix(root).map_err(|_| format!("{shown} is outside the allowed roots"))?;
        let root_fd = open_directory(root).map_err(|e| format!("{}: {e}", root.display()))?;
        if rest.as_os_str().is_empty() {
            return Ok(root_fd);
        }
        let rest = CString::new(rest.as_os_str().as_bytes()).map_err(|_| format!("{shown} contains a NUL byte"))?;
        // SAFETY: open_how is plain integers; all zero is its documented default.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: valid descriptor, NUL-terminated path and a live open_how of
        // the size passed; the kernel only reads them.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root_fd.as_raw_fd(),
                rest.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a descriptor the kernel just opened for us and nobody else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENOSYS) => self.open_dir_checked(dir),
            Some(libc::ELOOP) | Some(libc::EXDEV) => {
                Err(format!("{shown} leads through a symlink now; refused (the path was checked without one)"))
            }
            _ => Err(format!("{shown}: {err}")),
        }
    }

    /// [`Roots::open_dir`] on kernels before 5.6 (no `openat2`): open, then
    /// check where the handle really is.
    fn open_dir_checked(&self, dir: &Path) -> Result<OwnedFd, String> {
        let fd = open_directory(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|e| format!("{}: cannot tell where it leads ({e})", dir.display()))?;
        if !self.inside(&real) {
            return Err(format!("{} leads outside the allowed roots", dir.display()));
        }
        Ok(fd)
    }

    /// A file to create or replace: its deepest existing ancestor resolves
    /// inside a root, and the path itself is not a symlink.
    pub fn check_write(&self, path: &str) -> Result<PathBuf, String> {
        let p = plain_absolute(path)?;
        if p.symlink_metadata().map(|m| m.file_type().is_symlink()).unwrap_or(false) {
            return Err(format!("{path} is a symlink"));
        }
        let mut existing = p.parent().ok_or_else(|| format!("{path} has no parent directory"))?;
        let mut rest = Vec::new();
        rest.push(p.file_name().ok_or_else(|| format!("{path} has no file name"))?.to_owned());
        while !existing.exists() {
            rest.push(existing.file_name().ok_or_else(|| format!("{path} has no existing ancestor"))?.to_owned());
            existing = existing.parent().ok_or_else(|| format!("{path} has no existing ancestor"))?;
        }
        let mut resolved = existing.canonicalize().map_err(|e| format!("{path}: {e}"))?;
        // Roots exist, so for a path inside one the deepest existing
        // ancestor is that root or below it.
        if !self.inside(&resolved) {
            return Err(format!("{path} is outside the allowed roots"));
        }
        for part in rest.into_iter().rev() {
            resolved.push(part);
        }
        if !self.inside(&resolved) || self.roots.contains(&resolved) {
            return Err(format!("{path} is outside the allowed roots"));
        }
        Ok(resolved)
    }
}

fn open_directory(dir: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(dir)?;
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_stay_inside_roots_even_through_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let roots = Roots::new(std::slice::from_ref(&root)).unwrap();
        let r = roots.list()[0].clone();
        let ok = format!("{}/a/b/file.bin", r.display());
        assert_eq!(roots.check_write(&ok).unwrap(), r.join("a/b/file.bin"));
        assert!(roots.check_write(&format!("{}/../outside/x", r.display())).is_err());
        assert!(roots.check_write("relative/x").is_err());
        assert!(roots.check_write(&format!("{}/x", outside.display())).is_err());
        std::os::unix::fs::symlink(&outside, r.join("escape")).unwrap();
        let err = roots.check_write(&format!("{}/escape/x", r.display())).unwrap_err();
        assert!(err.contains("outside"), "{err}");
        std::fs::write(outside.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), r.join("link")).unwrap();
        assert!(roots.check_write(&format!("{}/link", r.display())).is_err());
        assert!(roots.check_read(&format!("{}/link", r.display())).is_err(), "reads resolve symlinks too");
        assert!(roots.check_write(&r.display().to_string()).is_err(), "the root itself is not a file");
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_after_the_check_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let roots = Roots::new(&[tmp.path().join("root")]).unwrap();
        let r = roots.list()[0].clone();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        let checked = roots.check_write(&format!("{}/a/b/file.bin", r.display())).unwrap();
        let dir = checked.parent().unwrap();
        assert!(roots.open_dir(dir).is_ok());
        assert!(roots.open_dir(&r).is_ok(), "the root itself");
        // Now `a` becomes a symlink to a directory outside the roots.
        std::fs::create_dir_all(outside.join("b")).unwrap();
        std::fs::remove_dir_all(r.join("a")).unwrap();
        std::os::unix::fs::symlink(&outside, r.join("a")).unwrap();
        let err = roots.open_dir(dir).unwrap_err();
        assert!(err.contains("symlink"), "{err}");
        assert!(roots.open_dir(&outside).is_err());
        // The check used where the kernel has no openat2.
        let err = roots.open_dir_checked(dir).unwrap_err();
        assert!(err.contains("outside"), "{err}");
        assert!(roots.open_dir_checked(&r).is_ok());
    }
}
