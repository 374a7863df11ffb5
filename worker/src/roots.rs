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

use std::ffi::{CStr, CString};
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
        let (root, rest) = self.split(dir)?;
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

    /// The deepest root holding `dir`, and the rest of the path below it.
    fn split<'a>(&'a self, dir: &'a Path) -> Result<(&'a Path, &'a Path), String> {
        let outside = || format!("{} is outside the allowed roots", dir.display());
        let root = self.roots.iter().filter(|r| dir.starts_with(r)).max_by_key(|r| r.as_os_str().len());
        let root = root.ok_or_else(outside)?;
        Ok((root, dir.strip_prefix(root).map_err(|_| outside())?))
    }

    /// Like [`Roots::open_dir`], creating missing directories on the way
    /// (mode 0755 less the umask), one name at a time relative to its parent's
    /// handle, each opened without following a symlink: wherever the path
    /// points later, nothing is created or opened outside the root.
    pub fn create_dir(&self, dir: &Path) -> Result<OwnedFd, String> {
        let shown = dir.display();
        let (root, rest) = self.split(dir)?;
        let mut fd = open_directory(root).map_err(|e| format!("{}: {e}", root.display()))?;
        for part in rest.components() {
            let Component::Normal(part) = part else { return Err(format!("{shown} contains . or ..")) };
            let name = c_name(part.as_bytes())?;
            // SAFETY: valid descriptor and NUL-terminated name; the kernel only reads them.
            if let Err(e) = io_result(unsafe { libc::mkdirat(fd.as_raw_fd(), name.as_ptr(), 0o755) }) {
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(format!("{shown}: creating {}: {e}", part.to_string_lossy()));
                }
            }
            let flags = libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW;
            fd = match open_at(&fd, &name, flags, 0) {
                Ok(next) => OwnedFd::from(next),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                    return Err(format!("{shown}: {} is a symlink or not a directory; refused", part.to_string_lossy()))
                }
                Err(e) => return Err(format!("{shown}: {e}")),
            };
        }
        Ok(fd)
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

/// Opens `name` in directory `dir` with open(2) `flags` (and `mode` when
/// they create it).
pub(crate) fn open_at(dir: &OwnedFd, name: &CStr, flags: libc::c_int, mode: u32) -> std::io::Result<std::fs::File> {
    // SAFETY: valid descriptor and NUL-terminated name; the kernel only reads them.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    io_result(fd)?;
    // SAFETY: a descriptor the kernel just opened for us and nobody else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// A file name for the `*at` calls.
pub(crate) fn c_name(name: &[u8]) -> Result<CString, String> {
    CString::new(name).map_err(|_| format!("{:?} contains a NUL byte", String::from_utf8_lossy(name)))
}

/// A libc return value: negative means `errno` says what failed.
pub(crate) fn io_result(ret: libc::c_int) -> std::io::Result<()> {
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
